"""hyperfunc/transforms/greedy.py: greedy_accumulate against an explicit sum over stored states."""

import pytest
import torch
from problems import DT, Quadratic, tree_close

import hyperfunc as hf


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("learned_init", [False, True])
def test_greedy_equals_explicit_sum(gamma, learned_init):
    quad = Quadratic(learned_init=learned_init)
    A, B = quad.matrices()
    states = quad.states()
    T = quad.steps
    expected = quad.rho * quad.lam
    for t in range(1, T + 1):
        total_B = B + (A @ torch.cat([quad.E, torch.zeros(quad.n, quad.m, dtype=DT)]) if learned_init and t == 1 else 0)
        expected = expected + gamma ** (T - t) * total_B.T @ quad.alpha_at(states[t])
    res = hf.greedy_accumulate(gamma)(quad.loop(), quad.outer)(*quad.args())
    torch.testing.assert_close(res.grads["lam"], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.loss, quad.loss())


def test_greedy_zero_is_one_step():
    quad = Quadratic()
    args = quad.args()
    greedy = hf.greedy_accumulate(0.0)(quad.loop(), quad.outer)(*args)
    tree_close(greedy.grads, hf.one_step(quad.loop(), quad.outer)(*args).grads)


@pytest.mark.parametrize("gamma", [1.5, -0.1])
def test_bad_arguments(gamma):
    with pytest.raises(ValueError, match="gamma must lie in \\[0, 1\\]"):
        hf.greedy_accumulate(gamma)
