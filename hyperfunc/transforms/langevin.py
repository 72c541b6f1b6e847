r"""HPO-SGLD: hypergradients of an expectation over SGLD samples (Kim & Hospedales, Algorithm 1)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import torch

from .._checks import check_int, check_real, check_seed
from .._tree import add, axpy, scale, zeros_like
from ..loop import InnerLoop, Loss
from ..optim import sgld
from ._online import Online
from .base import (
    Bound,
    HyperCotangent,
    Outcome,
    Transform,
    check_transform_args,
    make_transform,
    refuse_loop,
    step_number,
    where_step,
)
from .greedy import accumulating
from .reverse import HyperGradFn


def sampler(loop: InnerLoop, steps: int, tau: float, seed: Optional[int]) -> InnerLoop:
    """The loop re-run as ``steps`` SGLD steps at temperature ``tau`` with the loop's learning rate."""
    opt = loop.optimizer
    if not opt.langevin:
        raise ValueError(
            f"langevin needs a loop whose optimizer is plain SGD (no momentum) or hf.optim.sgld, got {opt.name!r}"
            + (" with momentum" if opt.name == "sgd" else "")
            + "; HPO-SGLD's recursion (Eq. 22) is derived for the Langevin update"
        )
    if opt.seed is not None:  # the loop already samples with SGLD: its temperature and seed are the chain's
        temperature = opt.args["temperature"]
        if callable(temperature) or float(temperature) != tau:
            raise ValueError(
                f"the loop's sgld temperature ({temperature!r}) differs from langevin's tau ({tau}): HPO-SGLD samples "
                "at tau; give the loop sgld(..., temperature=tau) or plain SGD"
            )
        seed = opt.seed if seed is None else seed
    new = sgld(opt.lr, temperature=tau, seed=0 if seed is None else seed, weight_decay=opt.weight_decay)
    return dataclasses.replace(loop, optimizer=new, steps=steps)


def check_langevin_args(tau: Any, seed: Any) -> tuple[float, Optional[int]]:
    return check_real(tau, "tau", 0.0), (None if seed is None else check_seed(seed))


def langevin_pass(bound: Bound, B: int, M: int) -> Outcome:
    r"""Eqs. (22)-(25) over ``B + M`` steps of the bound (SGLD) loop; see :func:`langevin`."""
    s = bound.initial()
    with_init = bound.learned_init and bound.exact_init
    # g_m = G·(dλ, dd/dλ) + G_0·(dθ_0/dλ); H, H_0 are their averages over the last M samples
    G_0 = bound.outer_vjp(s, bound.buffers, with_h=False)[1] if with_init else zeros_like(s)
    carry = (s, *bound.zero_cotangent(), G_0, *bound.zero_cotangent(), zeros_like(s))
    b, (s, _, _, _, H_h, H_d, H_0) = bound.scan(  # B and M as shared counts: one kernel serves every (B, M)
        f"langevin/{with_init}", _langevin_step(with_init), bound.buffers, carry, 0, B + M, ((B, M),)
    )
    loss = bound.outer_vjp(s, b, with_h=False)[0]
    H = HyperCotangent(H_h, H_d)
    return Outcome(H, loss, s, b, H_0)


def _langevin_step(with_init: bool):
    """Sample ``m = i + 1`` of Eqs. (22)-(25) as a :meth:`Bound.scan` body (shared: the counts ``B, M``)."""

    def body(bound, b, i, s, G_h, G_d, G_0, H_h, H_d, H_0, counts) -> tuple:
        B, M = counts
        inv_M = 1.0 / step_number(M, s)
        (s_new, b_new), pull = bound.step_vjp(s, b, i)
        _, alpha, direct = bound.outer_vjp(s_new, b_new)
        ct_s, ct = pull(alpha)
        G = HyperCotangent(G_h, G_d).plus(ct)
        if with_init:
            # (∇²L_out) δ as the VJP of α = ∇L_out (the Hessian is symmetric); a JVP of a gradient does not
            # compile under an outer vmap
            hvp = torch.func.vjp(lambda x: bound.outer_vjp(x, b, with_h=False)[1], s)[1](axpy(-1.0, s, s_new))[0]
            G_0 = add(G_0, add(hvp, axpy(-1.0, alpha, ct_s)))
        averaged = i + 1 > B  # sample m = i + 1 is one of the last M
        g = direct.plus(G).times(inv_M)
        H_h, H_d = add(H_h, where_step(averaged, g.h)), add(H_d, where_step(averaged, g.d))
        return b_new, s_new, *G, G_0, H_h, H_d, add(H_0, where_step(averaged, scale(inv_M, G_0)))

    return body


def langevin(B: int, M: int, tau: float, seed: Optional[int] = None) -> Transform:
    r"""HPO-SGLD (Kim & Hospedales, "A Stochastic Approach to Bi-Level Optimization", Algorithm 1).

    The hypergradient of :math:`\mathbb{E}_{p(\theta|\lambda)}[L_{out}(\lambda, \theta)]` with
    :math:`p(\theta|\lambda) \propto \exp(-L_{in}(\theta, \lambda)/\tau)`, sampled by ``B + M`` SGLD
    steps (Eq. 24 with :math:`\epsilon = 2\eta\tau`)

    .. math:: \theta_m = \theta_{m-1} - \eta \nabla_\theta L_{in}(\theta_{m-1}, \lambda) + \sqrt{2\eta\tau}\, z_{m-1},

    the recursion of Eq. (22) (with :math:`\tfrac{\epsilon}{2} B = \partial\Phi/\partial\lambda` and
    :math:`\tfrac{\epsilon}{2} A = \partial\Phi/\partial\theta - I` of the step map)

    .. math::
        g_m = g_{m-1}
        + (\theta_m - \theta_{m-1})^\top \nabla^2_{\theta} L_{out}(\theta_{m-1})\, \tfrac{d\theta_0}{d\lambda}
        + \nabla_\theta L_{out}(\theta_m) \big(\tfrac{\partial\Phi}{\partial\lambda}
        + (\tfrac{\partial\Phi}{\partial\theta} - I) \tfrac{d\theta_0}{d\lambda}\big)\Big|_{\theta_{m-1}},

    :math:`g_0 = \nabla_\theta L_{out}(\theta_0)\, d\theta_0/d\lambda` (zero unless ``params0`` is
    learned), and the average over the last ``M`` samples (Eq. 25)

    .. math:: h = \frac{1}{M} \sum_{m=B+1}^{B+M} \big(\partial_\lambda L_{out}(\theta_m) + g_m\big).

    :math:`\eta` is the loop's learning rate; its optimizer must be plain SGD or ``hf.optim.sgld``
    (anything else is a ``ValueError``); ``B + M`` replaces ``loop.steps``. The noise is a pure
    function of ``seed`` (``None`` means 0) and the step (see :func:`hyperfunc.optim.sgld`), so results are
    reproducible and ``vmap`` equals a loop. As ``tau → 0`` the sampler is gradient descent and
    the recursion is deterministic. ``res.loss`` and ``res.params`` are those of the last sample.

    Cost per step: one step VJP, one outer-loss gradient, and with a learned init one outer-loss
    Hessian-vector product; memory O(|s| + H), flat in ``B + M``. Module buffers are carried along
    the chain (``res.buffers`` after the last sample).

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=1)
        >>> hg = hf.langevin(B=50, M=50, tau=1e-3, seed=0)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    refuse_loop(B, "hf.langevin(B, M, tau)")
    B = check_int(B, "B", 1)
    M = check_int(M, "M", 1)
    tau, seed = check_langevin_args(tau, seed)

    def transform(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
        check_transform_args(loop, outer_loss)
        chain = sampler(loop, B + M, tau, seed)
        return make_transform(lambda bound: langevin_pass(bound, B, M), "langevin", chain, outer_loss, segmented=True)

    return transform


def online_langevin(tau: float, seed: int | None = None) -> Callable[[InnerLoop, Loss], Online]:
    r"""Online HPO-SGLD (Kim & Hospedales, Algorithm 1, Eqs. 22-24): step ``m`` is an SGLD step
    :math:`\theta_m = \theta_{m-1} - \eta\nabla L_{in} + \sqrt{2\eta\tau}\,z` and emits the Eq. (25)
    summand :math:`\partial_\lambda L_{out}(\theta_m) + g_m` with
    :math:`g_m = g_{m-1} + \nabla L_{out}(\theta_m)\,\partial\Phi/\partial\lambda`.

    With fixed hyperparameters, the mean of the emissions of steps ``B+1..B+M`` equals
    :func:`hyperfunc.langevin` ``(B, M, tau, seed)``. Cost per step: one step VJP and one outer
    gradient; memory O(|s| + H).

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=1)
        >>> opt = hf.online.langevin(tau=1e-3, seed=0)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    refuse_loop(tau, "hf.online.langevin(tau)")
    tau, seed = check_langevin_args(tau, seed)

    def transform(loop: InnerLoop, outer_loss: Loss) -> Online:
        check_transform_args(loop, outer_loss)
        return accumulating(sampler(loop, 1, tau, seed), outer_loss, 1.0)

    return transform
