"""Approximations report the diagnostics that say when to distrust them, and warn past documented thresholds."""

import warnings

import pytest
import torch
from problems import Quadratic, td
from tensordict import TensorDict

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


@pytest.mark.parametrize(
    "grads, reference, cosine, ratio",
    [
        ([1.0, 1.0], [2.0, 0.0], 0.5**0.5, 0.5**0.5),
        ([0.0, 0.0], [0.0, 0.0], 1.0, 1.0),  # both zero: they agree
        ([0.0, 0.0], [1.0, 0.0], 0.0, 0.0),
        ([1.0, 0.0], [0.0, 0.0], 0.0, float("inf")),
        ([float("nan"), 0.0], [1.0, 0.0], float("nan"), float("nan")),  # never a number that looks measured
        ([1.0, 0.0], [float("inf"), 0.0], float("nan"), float("nan")),
    ],
)
def test_agreement_edge_cases_stay_readable(grads, reference, cosine, ratio):
    def tree(v):
        return TensorDict({"x": torch.tensor(v, dtype=torch.float64)}, [])

    a = hf.agreement(tree(grads), tree(reference))
    torch.testing.assert_close(a.cosine, torch.tensor(cosine, dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(a.norm_ratio, torch.tensor(ratio, dtype=torch.float64), equal_nan=True)
