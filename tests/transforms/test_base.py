"""hyperfunc/transforms/base.py: the bound problem is a frozen value; derived problems leave it as it was."""

import dataclasses

import pytest
import torch
from problems import Quadratic

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
