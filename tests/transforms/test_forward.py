"""hyperfunc/transforms/forward.py: forward mode pushes prepare and a learned w_0 forward, equal to the closed
form and to reverse mode (float64)."""

import dataclasses

import pytest
import torch
from problems import Quadratic

import hyperfunc as hf


@pytest.mark.parametrize("learned_init", [False, True])
def test_forward_equals_the_closed_form(learned_init):
    q = Quadratic(learned_init=learned_init)
    torch.testing.assert_close(hf.forward(q.loop(), q.outer)(*q.args()).grads["lam"], q.exact(), rtol=1e-9, atol=1e-11)


def test_forward_through_prepare_equals_unroll():
    q = Quadratic()
    loop = dataclasses.replace(q.loop(), prepare=lambda h, b: b * (1 + h["lam"].sum()))
    fwd, rev = hf.forward(loop, q.outer)(*q.args()), hf.unroll(loop, q.outer)(*q.args())
    torch.testing.assert_close(fwd.grads["lam"], rev.grads["lam"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fwd.loss, rev.loss, rtol=1e-12, atol=0)
