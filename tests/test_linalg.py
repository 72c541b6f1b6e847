"""hyperfunc.linalg: the solvers' guards against singular, converged and badly scaled systems."""

import pytest
import torch
from problems import DT, td

import hyperfunc as hf


def _singular(dtype, n=40, rank=6, seed=0):
    """A PSD matrix of the given rank (the Hessian of an over-parameterised least-squares head)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rank, n, generator=g, dtype=dtype)
    return X.T @ X, X


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("iters", [5, 20, 100])
def test_cg_stays_finite_when_b_leaves_the_range_of_a_singular_matrix(dtype, iters):
    A, _ = _singular(dtype)
    b = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(1), dtype=dtype)
    sol = hf.linalg.cg(lambda v: A @ v, b, iters=iters)
    assert torch.isfinite(sol.x).all() and torch.isfinite(sol.residual)
    # the residual cannot drop below the part of b outside the range of A, and reports it
    U = torch.linalg.svd(A)[0][:, :6]
    outside = (b - U @ (U.T @ b)).norm()
    assert sol.residual >= outside * (1 - 1e-3)
    # never worse than x = 0, whose residual is |b|: on this system CG's first step raises the residual in exact
    # arithmetic (|r_1|^2/|b|^2 = |b|^2 |Ab|^2/(b'Ab)^2 - 1 > 1), so x = 0 is returned and both sides are |b|,
    # summed in different orders: n squares summed in floating point differ by at most n eps relatively
    assert sol.residual <= b.norm() * (1 + A.shape[0] * torch.finfo(dtype).eps)


def test_cg_on_a_consistent_singular_system_gives_the_minimum_norm_solution():
    A, _ = _singular(torch.float64)
    b = A @ torch.randn(A.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sol = hf.linalg.cg(lambda v: A @ v, b, iters=50)
    torch.testing.assert_close(sol.x, torch.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)
    assert sol.residual < 1e-10 * b.norm()


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_cg_guards_are_relative_so_the_answer_does_not_depend_on_units(scale):
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    sol = hf.linalg.cg(lambda v: scale * (A @ v), scale * b, iters=3)
    torch.testing.assert_close(sol.x, torch.linalg.solve(A, b), rtol=1e-10, atol=0)


def test_cg_past_convergence_keeps_the_solution_in_float32():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    b = torch.tensor([1.0, 0.0])
    exact = torch.linalg.solve(A, b)
    for iters in (2, 3, 50):
        torch.testing.assert_close(hf.linalg.cg(lambda v: A @ v, b, iters=iters).x, exact)
    zero = hf.linalg.cg(lambda v: A @ v, torch.zeros(2), iters=5)
    assert torch.equal(zero.x, torch.zeros(2)) and zero.residual == 0


def test_cg_under_vmap_freezes_each_system_on_its_own():
    A, _ = _singular(torch.float32, n=12, rank=3)
    spd = torch.eye(12) + A
    As = torch.stack([A, spd])
    bs = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    xs = torch.func.vmap(lambda M, b: hf.linalg.cg(lambda v: M @ v, b, iters=30).x)(As, bs)
    assert torch.isfinite(xs).all()
    torch.testing.assert_close(xs[1], torch.linalg.solve(spd, bs[1]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xs[0], hf.linalg.cg(lambda v: A @ v, bs[0], iters=30).x)


def test_linalg_on_tensordicts():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=DT)
    b = td(x=torch.tensor([1.0, 2.0], dtype=DT))
    sol = hf.linalg.cg(lambda v: td(x=A @ v["x"]), b, iters=2)
    torch.testing.assert_close(sol.x["x"], torch.linalg.solve(A, b["x"]))
    sol = hf.linalg.neumann(lambda v: td(x=A @ v["x"]), b, iters=200, alpha=0.2)
    torch.testing.assert_close(sol.x["x"], torch.linalg.solve(A, b["x"]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["b", "matvec"])
def test_cg_makes_a_nan_or_inf_visible_instead_of_returning_zero(bad, where):
    """Without the check the guards freeze at x = 0: a plausible answer from a broken input."""
    A = torch.eye(3, dtype=DT) * 2
    b = torch.ones(3, dtype=DT)
    if where == "b":
        b[1] = bad
        matvec = lambda v: A @ v  # noqa: E731
    else:
        matvec = lambda v: A @ v + bad  # noqa: E731
    assert torch.isnan(hf.linalg.cg(matvec, b, iters=5).x).all()
    assert torch.isfinite(hf.linalg.cg(lambda v: A @ v, torch.ones(3, dtype=DT), iters=5).x).all()


def test_implicit_cg_with_a_nan_in_the_outer_batch_gives_nan_not_zero():
    loop = hf.InnerLoop(
        lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum(), hf.optim.sgd(lr=0.1), 50, True
    )
    hg = hf.implicit("cg", 5)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    args = (td(l2=torch.tensor(0.5, dtype=DT)), td(w=torch.zeros(2, dtype=DT)), torch.ones(2, dtype=DT))
    assert torch.isnan(hg(*args, torch.tensor([0.0, float("nan")], dtype=DT)).grads["l2"])
    assert torch.isfinite(hg(*args, torch.zeros(2, dtype=DT)).grads["l2"])
