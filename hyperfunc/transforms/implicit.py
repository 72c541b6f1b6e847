r"""Implicit differentiation at the final iterate (IFT; Lorraine et al. 2020, Rajeswaran et al. 2019)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union, cast

import torch
from tensordict import TensorDictBase

from .. import linalg
from .._checks import check_int, check_real, warn_outside
from .._tree import Leaves, axpy, dot, safe_divide
from ..loop import InnerLoop, Loss
from ._online import Online, OnlineState, Session
from ._primitives import split
from .base import Bound, HyperCotangent, InitTerm, Outcome, Transform, check_transform_args, make_transform, refuse_loop
from .reverse import HyperGradFn

SOLVERS = ("neumann", "cg")


#: warn when the inner gradient at w_T is above this fraction of the one at w_0
STATIONARITY_TOLERANCE = 1e-3


class ImplicitHyperGrad(NamedTuple):
    """:class:`~hyperfunc.HyperGrad` plus two diagnostics: ``residual = ‖(H + δI) v − ∇_w L_out‖`` of the
    linear solve, and ``stationarity = ‖∇_w L_in(w_T)‖ / ‖∇_w L_in(w_0)‖`` (weight decay included, on the
    last batch): IFT assumes ``w_T`` is stationary, so a large ratio means the hypergradient is off."""

    grads: TensorDictBase
    loss: torch.Tensor
    params: TensorDictBase
    buffers: Any
    residual: torch.Tensor
    stationarity: torch.Tensor


def _with_diagnostics(res, aux) -> ImplicitHyperGrad:
    residual, stationarity = aux
    warn_outside(
        stationarity,
        0.0,
        STATIONARITY_TOLERANCE,
        "implicit: w_T is not a stationary point of the inner loss (‖∇L_in(w_T)‖/‖∇L_in(w_0)‖ = {value}, above "
        f"{STATIONARITY_TOLERANCE}); the IFT hypergradient assumes one: run more inner steps or use unroll",
    )
    return ImplicitHyperGrad(res.grads, res.loss, res.params, res.buffers, residual, stationarity)


def _check_optimizer(loop: InnerLoop) -> Union[float, torch.Tensor]:
    """IFT needs a fixed point that does not depend on optimizer hyperparameters; returns its weight decay."""
    opt = loop.optimizer
    if not opt.stationary:
        raise ValueError(
            f"implicit differentiation needs a deterministic optimizer whose fixed points are stationary points "
            f"of the inner loss (sgd or adam), got {opt.name!r}; use unroll or langevin for SGLD"
        )
    if opt.scheduled:
        raise ValueError(
            f"implicit differentiation needs a fixed point, and an optimizer whose {list(opt.scheduled)} depend on "
            "the inner step has none (its fixed point has no step). Use unroll, forward or truncate"
        )
    dynamic = [name for name, value in opt.args.items() if callable(value)]
    if dynamic:
        raise ValueError(
            f"implicit differentiation cannot differentiate optimizer hyperparameters: {dynamic} depend on hparams, "
            "but the fixed point of the inner problem does not depend on them. Use unroll, forward or truncate"
        )
    return cast(Union[float, torch.Tensor], opt.weight_decay)  # not callable: checked above


class _IFT(NamedTuple):
    """The implicit hypergradient at a given iterate, for one loop (shared by the offline and online forms)."""

    loop: InnerLoop
    solve: Any
    shift: float
    wd: Union[float, torch.Tensor]

    def inner_grad(self, bound: Bound, w: Leaves, h: Leaves, d: Leaves, buffers: Any) -> Leaves:
        """The fixed-point condition: the inner gradient on the last batch plus the weight decay term."""
        batch = self.loop._batch_at(bound.prep.rebuild(d), self.loop.steps - 1)
        g = self.loop._grad(bound.pkeys, w, bound.hparams(h), batch, buffers)[0]
        return axpy(self.wd, w, g) if self.wd else g

    def __call__(self, bound: Bound, s: Leaves, b: Any, g_0_norm: torch.Tensor) -> Outcome:
        """IFT at the params of ``s`` (buffers ``b``); ``g_0_norm`` scales the stationarity diagnostic."""
        prep, w = bound.prep, bound.params(s)
        # H v = (vᵀ H)ᵀ (H is a Hessian, so symmetric): the gradient is linearised once and each product is
        # one VJP of it; reverse-over-reverse also compiles where jvp-of-grad does not
        g_w, hessian_vjp = torch.func.vjp(lambda w: self.inner_grad(bound, w, bound.h, prep.d, b), w)

        def hvp(v: Leaves) -> Leaves:
            hv = hessian_vjp(v)[0]
            return axpy(self.shift, v, hv) if self.shift else hv

        loss, alpha, direct = bound.outer_vjp(s, b)
        solution = self.solve(hvp, bound.params(alpha))
        pull = torch.func.vjp(lambda h, d: self.inner_grad(bound, w, h, d, b), bound.h, prep.d)[1]
        mixed = HyperCotangent(*pull(solution.x)).times(-1.0)
        stationarity = safe_divide(dot(g_w, g_w).sqrt(), g_0_norm)
        return Outcome(direct.plus(mixed), loss, s, b, InitTerm.ABSENT, (solution.residual, stationarity))


def _ift(method: str, iters: int, alpha: Optional[float], damping: float) -> Callable[[InnerLoop], _IFT]:
    """Check the arguments of ``implicit``; returns ``loop -> _IFT`` (which checks the loop's optimizer)."""
    refuse_loop(method, "hf.implicit(method, iters)")
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {SOLVERS}, got {method!r}")
    iters = check_int(iters, "iters", 1)
    if alpha is not None:
        alpha = check_real(alpha, "alpha", 0.0, positive=True)
    damping = check_real(damping, "damping", 0.0)

    def for_loop(loop: InnerLoop) -> _IFT:
        wd = _check_optimizer(loop)
        step: Any = alpha  # the loop's learning rate is a number or a tensor here: _check_optimizer refused callables
        if method == "neumann" and step is None:
            if loop.optimizer.preconditioned:
                raise ValueError(
                    f"implicit('neumann') needs alpha=... when the loop's optimizer ({loop.optimizer.name}) rescales "
                    "the gradient: its learning rate is not a step size for the Hessian"
                )
            step = loop.optimizer.lr
            if not float(step) > 0:
                raise ValueError(
                    f"implicit('neumann') takes its step alpha from the loop's learning rate, which is {float(step)}: "
                    "a zero step gives an all-zero hypergradient; pass alpha=... > 0"
                )
        if method == "neumann":
            return _IFT(loop, lambda mv, b: linalg.neumann(mv, b, iters, step), damping, wd)
        return _IFT(loop, lambda mv, b: linalg.cg(mv, b, iters, damping), 0.0, wd)  # cg applies its damping

    return for_loop


def implicit(method: str, iters: int, alpha: Optional[float] = None, damping: float = 0.0) -> Transform:
    r"""Hypergradient by the implicit function theorem at :math:`w_T` (treated as a stationary point).

    .. math::
        \frac{dF}{d\lambda} \approx \partial_\lambda L_{out}(w_T)
            - \big(\partial^2_{\lambda w} L_{in}(w_T, \lambda)\big)\, v,
        \qquad (H + \delta I)\, v = \nabla_w L_{out}(w_T), \quad H = \nabla^2_{ww} L_{in}(w_T, \lambda)

    ``method="neumann"`` approximates :math:`v = \alpha \sum_{k=0}^{K} (I - \alpha H)^k \nabla_w L_{out}`
    (Lorraine et al. 2020, Algorithm 3; ``alpha`` defaults to the SGD learning rate of the loop);
    ``method="cg"`` runs ``iters`` conjugate-gradient iterations with damping :math:`\delta`
    (Rajeswaran et al. 2019). Hessian-vector products are reverse-over-reverse: the
    gradient at :math:`w_T` is linearised once and each product is one VJP of it (exact, as
    :math:`H` is symmetric). The optimizer's constant weight decay is part of the inner objective
    (its fixed point solves :math:`\nabla L_{in} + \text{wd}\, w = 0`). With per-step batches the
    Hessian and the mixed term use the last batch :math:`D_T`. The result has two diagnostics:
    ``residual``, the norm of the linear system's residual, and ``stationarity``,
    :math:`\|\nabla_w L_{in}(w_T)\| / \|\nabla_w L_{in}(w_0)\|`; above ``1e-3`` a ``RuntimeWarning``
    says the hypergradient cannot be trusted (checked on eager CPU calls; under ``vmap``,
    ``torch.compile`` or on CUDA read the field).

    On an over-parameterised inner problem (more params than data, e.g. a linear head on few
    shots) :math:`H` is singular and ``damping=0`` leaves the system without a solution: ``cg``
    stays finite (see :func:`hyperfunc.linalg.cg`) but ``residual`` stays large and the
    hypergradient can steer meta-training into an unstable inner loop; use ``damping > 0``
    (iMAML's proximal term; ``docs/benchmarks.md``, stress run).

    Limits: IFT assumes :math:`w_T` is a stationary point of the inner loss; it cannot
    differentiate optimizer hyperparameters (a learning rate that depends on ``hparams`` is an
    error) and it has no :math:`w_0` term: a learned ``params0`` is a ``ValueError`` unless the
    transform is wrapped in :func:`hyperfunc.fomaml` or :func:`hyperfunc.reptile`. With module
    buffers, the Hessian is taken at :math:`(w_T, \text{buffers}_T)`.

    Cost: ``T`` gradient steps, one gradient at :math:`w_T` kept linearised (it is also the
    stationarity's numerator), ``iters`` Hessian-vector products (one VJP each), one mixed VJP, one
    more product for the residual and one gradient at :math:`w_0`; memory O(|s| + H) plus the
    graph of one inner gradient, flat in ``T``.

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=50)
        >>> hg = hf.implicit("cg", iters=10)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    ift_for = _ift(method, iters, alpha, damping)

    def transform(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
        check_transform_args(loop, outer_loss)
        ift = ift_for(loop)

        def at_end(bound: Bound, bT: Any, s0: Leaves, sT: Leaves) -> Leaves:
            g_0 = ift.inner_grad(bound, bound.params(s0), bound.h, bound.prep.d, bT)
            out = ift(bound, sT, bT, dot(g_0, g_0).sqrt())
            return (*out.cot.h, *out.cot.d, out.loss, *out.aux)

        def algorithm(bound: Bound) -> Outcome:
            s0 = bound.initial()
            sT, bT = bound.run(s0, bound.buffers, 0, loop.steps)
            out = bound.piece("ift", at_end, bT, (s0, sT))
            ct_h, ct_d, (loss, residual, stationarity) = split(out, len(bound.h), len(bound.prep.d))
            return Outcome(HyperCotangent(ct_h, ct_d), loss, sT, bT, InitTerm.ABSENT, (residual, stationarity))

        return make_transform(
            algorithm,
            f"implicit({method!r})",
            loop,
            outer_loss,
            _with_diagnostics,
            segmented=True,
        )

    return transform


def online_implicit(
    method: str, iters: int, alpha: Optional[float] = None, damping: float = 0.0
) -> Callable[[InnerLoop, Loss], Online]:
    r"""Online implicit differentiation (Lorraine et al. 2020; N.IFT(N, K) among HyperDistill's
    baselines): after inner step ``t`` emit the IFT hypergradient of :func:`hyperfunc.implicit` at
    the current iterate :math:`w_t`, on that step's batch,

    .. math:: g_t = \partial_\lambda L_{out}(w_t) - \big(\partial^2_{\lambda w} L_{in}(w_t)\big)\, v_t,
        \qquad (H_t + \delta I)\, v_t = \nabla_w L_{out}(w_t).

    N.IFT(N, K) applies ``g_t`` only over the last ``K`` of the ``T`` steps, with ``iters = N``
    (the emission before that is there to read, not to apply: IFT assumes :math:`w_t` is
    stationary). With the hyperparameters held fixed and one batch, the emission after step ``T``
    equals :func:`hyperfunc.implicit`'s result, diagnostics included (``stationarity`` is
    :math:`\|\nabla L_{in}(w_t)\| / \|\nabla L_{in}(w_0)\|`, the second norm taken at step 0 on
    its batch). Cost per step: one gradient step, ``iters`` Hessian-vector products, one mixed VJP;
    memory O(|s| + H).

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=50)
        >>> opt = hf.online.implicit("neumann", iters=5)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    ift_for = _ift(method, iters, alpha, damping)

    def transform(loop: InnerLoop, outer_loss: Loss) -> Online:
        session = Session.of(loop, outer_loss)
        ift = ift_for(session.loop)

        def init(hparams, params0, buffers=None) -> OnlineState:
            return session.start(hparams, params0, buffers, lambda inputs, s0: torch.zeros((), dtype=inputs.h[0].dtype))

        def step(state, hparams, batch, outer_batch, t):
            bound, s, t = session.bind(state, hparams, batch, outer_batch, t)
            fits = torch.is_tensor(state.extra) and state.extra.ndim == 0
            session.check_extra(state, fits, f"online implicit({method!r})")
            prep = bound.prep
            g_0_norm = state.extra
            if t == 0:  # the scale of the stationarity diagnostic: the inner gradient before the first step
                g_0 = ift.inner_grad(bound, bound.params(s), bound.h, prep.d, bound.buffers)
                g_0_norm = dot(g_0, g_0).sqrt().detach()
            s, b = bound.run(s, bound.buffers, t, t + 1)
            out = ift(bound, s, b, g_0_norm)
            result = _with_diagnostics(bound.finish(out), out.aux)
            return result, session.state(bound, s, b, t, g_0_norm)

        return Online(init, step)

    return transform
