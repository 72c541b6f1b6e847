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

    Example:
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

    Exact after ``n`` iterations for an ``n``-dimensional problem in exact arithmetic. A
    converged residual (zero curvature) stops the updates without NaNs and without host
    synchronisation. Cost: ``iters`` products with ``A`` (plus one for the residual).

    Example:
        >>> import torch
        >>> from hyperfunc.linalg import cg
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
        >>> cg(lambda v: A @ v, torch.tensor([1.0, 0.0]), iters=2).x
        tensor([ 0.4000, -0.2000])
    """
    iters, damping = check_int(iters, "iters", 1), check_real(damping, "damping", 0.0)
    mv, b_flat, back = _flat(matvec, b)
    damped = (lambda v: axpy(damping, v, mv(v))) if damping else mv
    x = tuple(torch.zeros_like(v) for v in b_flat)
    r = p = b_flat
    rr = dot(r, r)
    for _ in range(iters):
        Ap = damped(p)
        pAp = dot(p, Ap)
        step = safe_divide(rr, pAp)
        x = axpy(step, p, x)
        r = axpy(-step, Ap, r)
        rr_new = dot(r, r)
        beta = safe_divide(rr_new, rr)
        p = axpy(beta, p, r)
        rr = rr_new
    return Solution(back(x), _residual(damped, b_flat, x))
