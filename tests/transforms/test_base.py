"""hyperfunc/transforms/base.py: the bound problem is a frozen value; derived problems leave it as it was."""

import dataclasses

import pytest
import torch
from problems import Quadratic
from tensordict import TensorDict

import hyperfunc as hf


def _bound(prepare=None):
    q = Quadratic()
    loop = dataclasses.replace(q.loop(), prepare=prepare)
    return hf.unroll(loop, q.outer).bind(*q.args()), q


def test_bound_is_frozen():
    bound, _ = _bound()
    with pytest.raises(dataclasses.FrozenInstanceError):
        bound.h = ()


def test_a_bound_on_other_batches_prepares_them_afresh_and_leaves_the_original():
    bound, q = _bound(prepare=lambda h, b: b * h["lam"].sum())
    before = bound.prep.d[0].clone()
    other = bound.on(2 * q.b)
    torch.testing.assert_close(other.prep.d[0], 2 * before)
    torch.testing.assert_close(bound.prep.d[0], before)


def test_run_from_the_initial_state_reaches_the_closed_form_trajectory():
    bound, q = _bound()
    s, _ = bound.run(bound.initial(), bound.buffers, 0, q.steps)
    torch.testing.assert_close(torch.cat(s), q.trajectory(), rtol=1e-12, atol=1e-12)


def test_a_derived_bound_starts_with_its_own_cache():
    bound, _ = _bound()
    bound.statics()
    derived = bound.with_prepared(bound.prep)
    assert derived._cache is not bound._cache and not derived._cache


@pytest.mark.parametrize(
    "outer, inner", [(hf.reptile, hf.fomaml), (hf.fomaml, hf.reptile), (hf.fomaml, hf.fomaml)]
)
def test_nested_init_rules_are_refused(outer, inner):
    """One rule replaces the w_0 term; reptile(fomaml(t)) silently dropped fomaml's before."""
    loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=2, full_batch=True)
    with pytest.raises(ValueError, match=r"already replaces the learned-initialization term"):
        outer(inner(hf.first_order))(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())


_INIT_TRANSFORMS = {
    "unroll": hf.unroll,
    "checkpointed": lambda loop, outer: hf.unroll(loop, outer, checkpoint_every=2),
    "truncate(T)": hf.truncate(3),
    "drmad": hf.drmad,
    "forward": hf.forward,
    "greedy_accumulate": hf.greedy_accumulate(0.7),
    "fomaml(first_order)": hf.fomaml(hf.first_order),
    "reptile(first_order)": hf.reptile(hf.first_order),
    "reptile(distill)": hf.reptile(hf.distill(0.7, theta=1.0)),
}


@pytest.mark.parametrize("name", list(_INIT_TRANSFORMS))
def test_a_learned_init_is_evaluated_once_and_its_draws_serve_the_trajectory_and_the_init_term(name):
    """params0 with randomness: one evaluation per call, and the result equals the call with that draw fixed
    (before, the trajectory, the w_0 term and the input check each drew their own noise)."""
    loop = hf.InnerLoop(
        lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=3, full_batch=True
    )
    outer = lambda p, h, y: ((p["w"] - y) ** 2).sum()  # noqa: E731
    hg = _INIT_TRANSFORMS[name](loop, outer)
    dt = torch.float64
    hparams = TensorDict({"c": torch.tensor(0.7, dtype=dt), "init": torch.tensor([0.3, -0.2], dtype=dt)}, [])
    x, y = torch.tensor([1.0, 2.0], dtype=dt), torch.tensor([0.5, 0.1], dtype=dt)
    calls = []

    def noisy(h):
        calls.append(1)
        return TensorDict({"w": h["init"] + torch.randn(2, dtype=dt)}, [])

    torch.manual_seed(0)
    res = hg(hparams, noisy, x, y)
    assert len(calls) == 1
    torch.manual_seed(0)
    noise = torch.randn(2, dtype=dt)
    fixed = hg(hparams, lambda h: TensorDict({"w": h["init"] + noise}, []), x, y)
    torch.testing.assert_close(res.grads["init"], fixed.grads["init"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.grads["c"], fixed.grads["c"], rtol=1e-12, atol=1e-14)
