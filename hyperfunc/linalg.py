r"""Fixed-iteration linear solvers for ``A x = b`` over tuples of tensors or TensorDicts.

Small factories in the style of jaxopt's ``linear_solve``: ``matvec`` is any linear map (a
Hessian-vector product), the iteration count is fixed, and there is no data-dependent Python
control flow, so the solvers run under ``vmap`` without host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase

from ._checks import check_int, check_real
from ._tree import Leaves, add, axpy, build, dot, keys_of, leaves_of, safe_divide, scale


class Solution(NamedTuple):
    """``x`` (same type as ``b``) and the residual norm ``‖b − A x‖`` (scalar tensor)."""

    x: Any
    residual: torch.Tensor


def _flat(matvec: Callable, b: Any):
    """Run a solver on flat tuples whatever the type of ``b``; rebuild its type at the end."""
    if isinstance(b, TensorDictBase):
        keys = keys_of(b)
        return (lambda v: leaves_of(matvec(build(keys, v)), keys)), leaves_of(b, keys), (lambda x: build(keys, x))
    if torch.is_tensor(b):
        return (lambda v: (matvec(v[0]),)), (b,), (lambda x: x[0])
    return (lambda v: tuple(matvec(v))), tuple(b), tuple


def _residual(matvec: Callable, b: Leaves, x: Leaves) -> torch.Tensor:
    r = axpy(-1.0, matvec(x), b)
    return dot(r, r).sqrt()


def neumann(matvec: Callable, b: Any, iters: int, alpha: Any) -> Solution:
    r"""Truncated Neumann series for :math:`A^{-1} b` (Lorraine et al. 2020, Algorithm 3):

    .. math:: x_K = \alpha \sum_{k=0}^{K} (I - \alpha A)^k b

    Converges when the spectrum of :math:`\alpha A` lies in (0, 2). Cost: ``iters`` products with
    ``A`` (plus one for the reported residual).

    Examples:
        >>> import torch
        >>> from hyperfunc.linalg import neumann
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> neumann(lambda v: A @ v, torch.ones(2), iters=60, alpha=0.5).x
        tensor([0.5000, 1.0000])
    """
    iters = check_int(iters, "iters", 1)
    if not callable(alpha) and not torch.is_tensor(alpha):
        alpha = check_real(alpha, "alpha", 0.0, positive=True)
    mv, b_flat, back = _flat(matvec, b)
    p = b_flat
    total = b_flat
    for _ in range(iters):
        p = axpy(-alpha, mv(p), p)
        total = add(total, p)
    x = scale(alpha, total)
    return Solution(back(x), _residual(mv, b_flat, x))


def cg(matvec: Callable, b: Any, iters: int, damping: float = 0.0) -> Solution:
    r"""Conjugate gradient for :math:`(A + \delta I) x = b` with :math:`A` symmetric positive
    (semi)definite, ``iters`` iterations from :math:`x_0 = 0` (Hestenes & Stiefel 1952).

    Exact after ``n`` iterations for an ``n``-dimensional problem in exact arithmetic. Guards,
    all without host synchronisation, keep the answer finite and never worse than ``x = 0``:

    * the iterate freezes once the residual has converged (:math:`\|r\| \le \epsilon \|b\|`) or the
      search direction has lost its curvature (Rayleigh quotient :math:`p^\top A p / p^\top p` below
      :math:`100\,\epsilon` times the largest one met so far; :math:`\epsilon` is the dtype's
      machine epsilon), so a vanishing :math:`p^\top A p` never divides;
    * the iterate returned is the one with the smallest recursive residual met (the last one
      whenever the residuals decrease, as they do on a well-conditioned system);
    * a NaN or infinity in :math:`b` or in a product with :math:`A` makes ``x`` all NaN: the guards
      above would otherwise freeze at :math:`x = 0` and hand on a plausible zero.

    Both matter on a singular :math:`A` (an over-parameterised inner problem without damping) when
    :math:`b` leaves its range: plain CG then overshoots (its step :math:`r^\top r / p^\top A p`
    counts the unreachable part of :math:`r`) and its iterates grow without bound; here
    ``residual`` reports the part of :math:`b` the solve could not reach, the sign that the
    system needs ``damping``. Cost: ``iters`` products with ``A`` (plus one for the residual),
    memory four copies of ``b``.

    Examples:
        >>> import torch
        >>> from hyperfunc.linalg import cg
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
        >>> cg(lambda v: A @ v, torch.tensor([1.0, 0.0]), iters=2).x
        tensor([ 0.4000, -0.2000])
    """
    iters, damping = check_int(iters, "iters", 1), check_real(damping, "damping", 0.0)
    mv, b_flat, back = _flat(matvec, b)
    damped = (lambda v: axpy(damping, v, mv(v))) if damping else mv
    eps = torch.finfo(torch.promote_types(b_flat[0].dtype, torch.float32)).eps
    x = best = tuple(torch.zeros_like(v) for v in b_flat)
    r = p = b_flat
    rr = best_rr = dot(r, r)
    floor = rr * eps**2  # converged once rr is at this level
    top = torch.zeros_like(rr)  # largest Rayleigh quotient met so far
    active = rr > floor
    broken = ~torch.isfinite(rr)  # a NaN or inf in b, or (below) in a product with A
    for _ in range(iters):
        Ap = damped(p)
        pAp = dot(p, Ap)
        broken = broken | ~torch.isfinite(pAp)
        rayleigh = safe_divide(pAp, dot(p, p))
        top = torch.maximum(top, rayleigh)
        active = active & (rayleigh > 100 * eps * top) & (rr > floor)
        step = torch.where(active, safe_divide(rr, pAp), torch.zeros_like(rr))
        x = axpy(step, p, x)
        r = axpy(-step, Ap, r)
        rr_new = dot(r, r)
        beta = torch.where(active, safe_divide(rr_new, rr), torch.zeros_like(rr))
        p = _select(active, axpy(beta, p, r), p)
        rr = torch.where(active, rr_new, rr)
        better = rr < best_rr
        best, best_rr = _select(better, x, best), torch.where(better, rr, best_rr)
    best = _select(broken, tuple(torch.full_like(v, float("nan")) for v in best), best)
    return Solution(back(best), _residual(damped, b_flat, best))


def _select(mask: torch.Tensor, xs: Leaves, ys: Leaves) -> Leaves:
    return tuple(torch.where(mask, x, y) for x, y in zip(xs, ys))
