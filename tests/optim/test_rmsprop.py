"""hyperfunc/optim/rmsprop.py: rmsprop against torch.optim.RMSprop trained in place (50 steps, float64), with
and without momentum, centered, weight decay, and its declared capabilities."""

import pytest
import torch
from problems import compare_with_torch_optim

import hyperfunc as hf


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.01),
        dict(lr=0.01, alpha=0.9, weight_decay=0.1),
        dict(lr=0.005, momentum=0.9),
        dict(lr=0.005, centered=True),
        dict(lr=0.005, alpha=0.95, eps=1e-4, weight_decay=0.05, momentum=0.5, centered=True),
    ],
)
def test_rmsprop_matches_torch(kw):
    compare_with_torch_optim(hf.optim.rmsprop(**kw), torch.optim.RMSprop, steps=50, **kw)


def test_rmsprop_buffers_follow_the_options():
    assert hf.optim.rmsprop().buffers == ("square_avg",)
    assert hf.optim.rmsprop(momentum=0.9, centered=True).buffers == ("square_avg", "momentum_buffer", "grad_avg")
    opt = hf.optim.rmsprop()
    assert opt.stationary and opt.preconditioned
    with pytest.raises(TypeError, match="centered"):
        hf.optim.rmsprop(centered=1)
