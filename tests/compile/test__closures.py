"""hyperfunc/compile/_closures.py: a value a loss reads from outside its arguments (a closed-over or global
number, a rebound tensor) changes between hf.compile calls: the kernels, traced with the old value baked
in, are compiled again (with a warning) instead of answering with it. T <= k (one kernel) and T > k (a
program of kernels)."""

import warnings

import pytest
import torch
from problems import DT, td

import hyperfunc as hf
from hyperfunc.compile._closures import fingerprint

IN_DIMS = (None, 0, 0, 0)
SCALE = 1.0  # a module global the outer loss reads


def _inner(p, h, x):
    return ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum()


def _args():
    w0 = td(w=torch.zeros(2, 1, dtype=DT)).expand(2)
    return td(l2=torch.tensor(0.5, dtype=DT)), w0, torch.ones(2, 1, dtype=DT), torch.zeros(2, 1, dtype=DT)


def _check(outer, change, steps):
    loop = hf.InnerLoop(_inner, hf.optim.sgd(lr=0.1), steps=steps, full_batch=True)
    hg = hf.unroll(loop, outer)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=4, backend="eager")
    args = _args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unchanged values: no recompile, no warning
        first = fast(*args).grads["l2"]
        torch.testing.assert_close(fast(*args).grads["l2"], first, rtol=0, atol=0)
    change()
    with pytest.warns(RuntimeWarning, match="changed since the kernels were traced"):
        after = fast(*args).grads["l2"]
    reference = torch.func.vmap(hg, in_dims=IN_DIMS)(*args).grads["l2"]
    torch.testing.assert_close(after, reference, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(after, first)


@pytest.mark.parametrize("steps", [3, 10], ids=["one kernel", "program"])
def test_a_closed_over_number_that_changes(steps):
    scale = 1.0

    def outer(p, h, y):
        return scale * ((p["w"] - y) ** 2).sum()

    def change():
        nonlocal scale
        scale = 3.0

    _check(outer, change, steps)


@pytest.mark.parametrize("steps", [3, 10], ids=["one kernel", "program"])
def test_a_rebound_tensor(steps):
    weight = torch.tensor(1.0, dtype=DT)

    def outer(p, h, y):
        return weight * ((p["w"] - y) ** 2).sum()

    def change():
        nonlocal weight
        weight = torch.tensor(2.0, dtype=DT)

    _check(outer, change, steps)


def test_a_module_global_number():
    def outer(p, h, y):
        return SCALE * ((p["w"] - y) ** 2).sum()

    def change():
        global SCALE
        SCALE = 0.5

    try:
        _check(outer, change, 3)
    finally:
        globals()["SCALE"] = 1.0


def test_fingerprint_follows_factories_and_ignores_arguments():
    def make(c):
        def loss(p, h, y):
            return c * p

        return loss

    assert fingerprint(make(1.0)) == fingerprint(make(1.0))  # new function objects, same values
    assert fingerprint(make(1.0)) != fingerprint(make(2.0))
