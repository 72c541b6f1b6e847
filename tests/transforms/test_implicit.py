"""hyperfunc/transforms/implicit.py: implicit against the closed-form IFT, and its argument checks."""

import pytest
import torch
from problems import DT, Quadratic

import hyperfunc as hf


def _strongly_convex(steps=400):
    quad = Quadratic(steps=steps, momentum=0.5, lr=0.2)
    quad.b = quad.b[:1].expand(steps, -1).clone()
    return quad


def _ift_closed_form(quad, w):
    Qe = quad.Q + quad.wd * torch.eye(quad.n, dtype=DT)
    v = torch.linalg.solve(Qe, quad.P.T @ (quad.P @ w - quad.y))
    return quad.rho * quad.lam + quad.C.T @ v


def test_cg_equals_closed_form_ift():
    quad = _strongly_convex()
    res = hf.implicit("cg", iters=quad.n)(quad.loop(), quad.outer)(*quad.args())
    torch.testing.assert_close(res.grads["lam"], _ift_closed_form(quad, res.params["w"]), rtol=1e-9, atol=1e-11)
    assert res.residual < 1e-9
    # at convergence the IFT hypergradient is the exact one
    torch.testing.assert_close(res.grads["lam"], quad.exact(), rtol=1e-6, atol=1e-8)


def test_neumann_converges_to_closed_form():
    quad = _strongly_convex()
    expected = _ift_closed_form(quad, quad.trajectory()[: quad.n])
    errors, residuals = [], []
    for iters in [1, 5, 20, 100, 400]:
        res = hf.implicit("neumann", iters=iters)(quad.loop(), quad.outer)(*quad.args())
        errors.append(float((res.grads["lam"] - expected).norm()))
        residuals.append(float(res.residual))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8 and residuals[-1] < 1e-8


def test_damped_cg_solves_the_damped_system():
    quad = _strongly_convex()
    res = hf.implicit("cg", iters=quad.n, damping=0.7)(quad.loop(), quad.outer)(*quad.args())
    w = res.params["w"]
    Qe = quad.Q + (quad.wd + 0.7) * torch.eye(quad.n, dtype=DT)
    expected = quad.rho * quad.lam + quad.C.T @ torch.linalg.solve(Qe, quad.P.T @ (quad.P @ w - quad.y))
    torch.testing.assert_close(res.grads["lam"], expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda q: hf.implicit("lu", iters=3), ValueError, "method must be one of"),
        (lambda q: hf.implicit("cg", iters=0), ValueError, "iters must be >= 1"),
        (lambda q: hf.implicit("cg", iters=3, damping=-1.0), ValueError, "damping must be"),
        (
            lambda q: hf.implicit("cg", iters=3)(
                hf.InnerLoop(q.inner, hf.optim.sgd(lr=lambda h: h["lam"].sum()), 5), q.outer
            ),
            ValueError,
            "cannot differentiate optimizer hyperparameters",
        ),
        (
            lambda q: hf.implicit("cg", iters=3)(hf.InnerLoop(q.inner, hf.optim.sgld(lr=0.1), 5), q.outer),
            ValueError,
            "deterministic optimizer",
        ),
        (
            lambda q: hf.implicit("neumann", iters=3)(hf.InnerLoop(q.inner, hf.optim.adam(lr=0.1), 5), q.outer),
            ValueError,
            "needs alpha",
        ),
    ],
)
def test_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make(Quadratic())
