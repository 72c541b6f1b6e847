"""Approximations report the diagnostics that say when to distrust them, and warn past documented thresholds."""

import warnings

import pytest
from problems import Quadratic, td

import hyperfunc as hf

Q = Quadratic()


def test_implicit_warns_when_w_T_is_not_stationary():
    loop = hf.InnerLoop(Q.inner, hf.optim.sgd(lr=0.1, momentum=0.7), steps=3)
    with pytest.warns(RuntimeWarning, match="w_T is not a stationary point"):
        h, p0, b, y = Q.args()
        res = hf.implicit("cg", 4)(loop, Q.outer)(h, p0, b[:3], y)
    assert res.stationarity > 1e-3
    converged = hf.InnerLoop(Q.inner, hf.optim.sgd(lr=0.1, momentum=0.7), steps=300, full_batch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = hf.implicit("cg", 8)(converged, Q.outer)(Q.hparams(), td(w=Q.w0), Q.b[0], Q.y)
    assert res.stationarity < 1e-6


def test_linear_estimation_warns_on_an_implausible_theta():
    """A horizon-1 distillation (γ = 0) of a heavy-momentum trajectory must be scaled up tenfold: warned.
    γ = 0.99 spans the trajectory's memory and fits θ ≈ 1.7 quietly."""
    q = Quadratic(momentum=0.7, lr=0.05)
    with pytest.warns(RuntimeWarning, match=r"theta = 10.69.* outside \[0.0, 10.0\]"):
        fit = hf.linear_estimation(0.0)(q.loop(), q.outer)(*q.args())
    assert fit.theta > 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0 < hf.linear_estimation(0.99)(q.loop(), q.outer)(*q.args()).theta < 10
