"""Transforms against matrix-algebra hypergradients of a quadratic bilevel problem (SGD + momentum, float64)."""

import pytest
import torch
from problems import DT, Quadratic, tree_close

import hyperfunc as hf


@pytest.fixture(params=[False, True], ids=["fixed-init", "learned-init"])
def quad(request):
    return Quadratic(learned_init=request.param)


def test_unroll_equals_closed_form(quad):
    res = hf.unroll(quad.loop(), quad.outer)(*quad.args())
    torch.testing.assert_close(res.grads["lam"], quad.exact(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.loss, quad.loss(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.params["w"], quad.trajectory()[: quad.n], rtol=1e-12, atol=1e-12)


def test_forward_equals_closed_form(quad):
    res = hf.forward(quad.loop(), quad.outer)(*quad.args())
    torch.testing.assert_close(res.grads["lam"], quad.exact(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.loss, quad.loss(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [0, 1, 2, 5, 11, 12, 30])
def test_truncate_equals_shaban_eq8(quad, K):
    if quad.learned_init and K < quad.steps:  # Eq. 8 has no w_0 term: refused, never a silent zero
        with pytest.raises(ValueError, match=r"truncate\(\d+\) has no term through a learned initialization"):
            hf.truncate(K)(quad.loop(), quad.outer)(*quad.args())
        return
    res = hf.truncate(K)(quad.loop(), quad.outer)(*quad.args())
    torch.testing.assert_close(res.grads["lam"], quad.truncated(K), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("K", [0, 1, 5, 12])
def test_fomaml_replaces_the_init_term_by_first_order(K):
    """hf.fomaml(truncate(K)): Eq. 8's terms plus (dw_0/dλ)ᵀ ∇_w L_out(w_T) (dw_T/dw_0 ≈ I) instead of
    the exact init term (which truncate(K >= T) has)."""
    quad = Quadratic(learned_init=True)
    A, _ = quad.matrices()
    E0 = torch.cat([quad.E, torch.zeros(quad.n, quad.m, dtype=DT)])
    exact_init = (torch.linalg.matrix_power(A, quad.steps) @ E0).T @ quad.alpha()
    expected = quad.truncated(K) - (exact_init if K >= quad.steps else 0) + quad.E.T @ quad.alpha()[: quad.n]
    res = hf.fomaml(hf.truncate(K))(quad.loop(), quad.outer)(*quad.args())
    torch.testing.assert_close(res.grads["lam"], expected, rtol=1e-10, atol=1e-12)


def test_reptile_init_term_is_w0_minus_wT():
    quad = Quadratic(learned_init=True)
    states = quad.states()
    expected = quad.rho * quad.lam + quad.E.T @ (states[0][: quad.n] - states[-1][: quad.n])
    res = hf.reptile(hf.first_order)(quad.loop(), quad.outer)(*quad.args())
    torch.testing.assert_close(res.grads["lam"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("every", [1, 3, 5, 12, 100])
def test_checkpointed_unroll_equals_unroll(quad, every):
    full = hf.unroll(quad.loop(), quad.outer)(*quad.args())
    ckpt = hf.unroll(quad.loop(), quad.outer, checkpoint_every=every)(*quad.args())
    tree_close(ckpt.grads, full.grads)
    tree_close(ckpt.params, full.params)


def test_identities(quad):
    loop, args = quad.loop(), quad.args()
    unrolled = hf.unroll(loop, quad.outer)(*args)
    tree_close(hf.truncate(quad.steps)(loop, quad.outer)(*args).grads, unrolled.grads)
    tree_close(hf.forward(loop, quad.outer)(*args).grads, unrolled.grads)
    init = hf.fomaml if quad.learned_init else (lambda transform: transform)
    first_order = init(hf.first_order)(loop, quad.outer)(*args).grads
    tree_close(init(hf.truncate(0))(loop, quad.outer)(*args).grads, first_order)
    tree_close(init(hf.truncate(1))(loop, quad.outer)(*args).grads, init(hf.one_step)(loop, quad.outer)(*args).grads)


def test_first_order_is_direct_gradient():
    quad = Quadratic()
    res = hf.first_order(quad.loop(), quad.outer)(*quad.args())
    torch.testing.assert_close(res.grads["lam"], quad.rho * quad.lam, rtol=1e-12, atol=1e-12)


def test_one_step_is_last_step_only():
    quad = Quadratic()
    A, B = quad.matrices()
    expected = quad.rho * quad.lam + B.T @ quad.alpha()
    torch.testing.assert_close(hf.one_step(quad.loop(), quad.outer)(*quad.args()).grads["lam"], expected)


def test_batches_are_used_in_step_order():
    # Reversing the per-step batches changes w_T, so an off-by-one or reversed index is caught.
    quad = Quadratic()
    h, p0, b, y = quad.args()
    res = hf.unroll(quad.loop(), quad.outer)(h, p0, b.flip(0), y)
    assert (res.params["w"] - quad.trajectory()[: quad.n]).abs().max() > 1e-3


def test_full_batch_reuses_one_batch():
    quad = Quadratic()
    quad.b = quad.b[:1].expand(quad.steps, -1).clone()
    h, p0, b, y = quad.args()
    res = hf.unroll(quad.loop(full_batch=True), quad.outer)(h, p0, b[0], y)
    torch.testing.assert_close(res.grads["lam"], quad.exact(), rtol=1e-10, atol=1e-12)
