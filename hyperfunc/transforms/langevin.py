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


#: Samples whose direct terms :math:`\partial_\lambda L_{out}(\theta_m)` share one VJP (memory: the outer
#: loss's activations for this many samples)
DIRECT_BLOCK = 10


def langevin_pass(bound: Bound, B: int, M: int) -> Outcome:
    r"""Eqs. (22)-(25) over ``B + M`` steps of the bound (SGLD) loop; see :func:`langevin`.

    The average :math:`\frac1M \sum_{m>B} g_m` of the running sums :math:`g_m = g_0 + \sum_{j \le m} \Delta_j` is
    accumulated as :math:`g_0 + \sum_j c_j \Delta_j` with :math:`c_j = \min(M, B + M - j + 1)/M`, the share of
    averaged samples that contain :math:`\Delta_j`: no running sum is carried, and :math:`c_j` scales the
    cotangent :math:`\alpha_j` before the step's VJP instead of the (λ-sized) products after it. The burn-in
    (steps ``1..B``, where :math:`c_j = 1` and no sample is averaged) and the sampling (steps ``B+1..B+M``)
    are two scans, so the burn-in computes no direct term :math:`\partial_\lambda L_{out}`."""
    s = bound.initial()
    with_init = bound.learned_init and bound.exact_init
    # H, H_0: the averages of g_m over the last M samples, on (λ, d) and on dθ_0/dλ
    H_0 = bound.outer_vjp(s, bound.buffers, with_h=False)[1] if with_init else zeros_like(s)
    b, carry = bound.buffers, (s, *bound.zero_cotangent(), H_0)
    # the sampling takes B, M as shared counts: one kernel serves every (B, M); the burn-in needs neither
    for first, stop, block, shared in ((0, B, _burn_in(with_init), ()), (B, B + M, _sampling(with_init), ((B, M),))):
        b, carry = bound.scan_blocks(f"langevin/{block.__name__}/{with_init}", block, b, carry, first, stop, shared)
    s, H_h, H_d, H_0 = carry
    loss = bound.outer_vjp(s, b, with_h=False)[0]
    return Outcome(HyperCotangent(H_h, H_d), loss, s, b, H_0)


def _sample_step(bound, b, i, s, H_h, H_d, H_0, c, with_init: bool) -> tuple:
    """One SGLD step ``i`` (making sample ``i + 1``) and its summand of Eq. (22), weighted by the share ``c``:
    ``(b, s, H_h, H_d, H_0)`` after it."""
    (s_new, b_new), pull = bound.step_vjp(s, b, i)
    alpha = bound.outer_vjp(s_new, b_new, with_h=False)[1]
    ct_s, ct = pull(alpha if isinstance(c, int) else scale(c, alpha))
    H_h, H_d = HyperCotangent(H_h, H_d).plus(ct)
    if with_init:
        # (∇²L_out) δ as the VJP of α = ∇L_out (the Hessian is symmetric); a JVP of a gradient does not
        # compile under an outer vmap
        delta = axpy(-c, s, scale(c, s_new))
        hvp = torch.func.vjp(lambda x: bound.outer_vjp(x, b, with_h=False)[1], s)[1](delta)[0]
        H_0 = add(H_0, add(hvp, axpy(-c, alpha, ct_s)))
    return b_new, s_new, H_h, H_d, H_0


def _burn_in(with_init: bool):
    """Steps ``i0 .. i0 + n - 1`` of the burn-in as a :meth:`Bound.scan_blocks` block: every one of them
    precedes all M averaged samples (:math:`c_j = 1`), and none is a sample itself."""

    def burn_in(bound, b, i0, n, s, H_h, H_d, H_0) -> tuple:
        for j in range(n):
            b, s, H_h, H_d, H_0 = _sample_step(bound, b, i0 + j, s, H_h, H_d, H_0, 1, with_init)
        return b, s, H_h, H_d, H_0

    return burn_in


def _sampling(with_init: bool):
    """Samples ``m = i0 + 1 .. i0 + n`` (all averaged, ``i0 >= B``) of Eqs. (22)-(25) as a
    :meth:`Bound.scan_blocks` block (shared: the counts ``B, M``). The direct terms of up to
    :data:`DIRECT_BLOCK` samples share one VJP."""

    def sampling(bound, b, i0, n, s, H_h, H_d, H_0, counts) -> tuple:
        B, M = counts
        samples = []
        for j in range(n):
            i = i0 + j
            c = step_number(B + M - i, s) / step_number(M, s)  # min(M, B + M - i)/M with i >= B
            b, s, H_h, H_d, H_0 = _sample_step(bound, b, i, s, H_h, H_d, H_0, c, with_init)
            samples.append((s, b))
            if len(samples) == DIRECT_BLOCK or j == n - 1:
                weight = 1.0 / step_number(M, s)
                H_h = add(H_h, bound.outer_grad_h(samples, [weight] * len(samples)))
                samples = []
        return b, s, H_h, H_d, H_0

    return sampling


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

    Cost per step: one step VJP, one outer-loss gradient in θ, and with a learned init one outer-loss
    Hessian-vector product; the direct terms :math:`\partial_\lambda L_{out}(\theta_m)` of every
    :data:`DIRECT_BLOCK` (10) samples share one VJP in λ (:meth:`Bound.outer_grad_h`: ANIL's body is
    pulled back once per block, not per sample); the ``B`` burn-in steps have no direct term. Memory
    O(|s| + H) plus the outer loss's activations for 10 samples, flat in ``B + M``. Module buffers
    are carried along the chain (``res.buffers`` after the last sample). Under ``hf.compile`` the
    burn-in and the sampling are scanned apart, each in segments of k steps from its own start: a
    new ``(B, M)`` reuses the kernels compiled for another when ``B mod k`` and ``M mod k`` are
    unchanged (B and M enter the kernels as tensors).

    Examples:
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

    Examples:
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
