r"""HyperDistill (Lee et al. 2022, "Online hyperparameter meta-learning with hypergradient
distillation", Algorithms 3 and 4, Eqs. 12-18).

The second-order term of the hypergradient at step t is distilled into one Jacobian-vector
product at a running average of the past states ``s*_t`` on a subsampled batch ``D*_t``, scaled by
a linear estimate ``θ·(1-γ^t)/(1-γ)`` of its size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import torch

from .._checks import check_real, check_seed, concrete, warn_outside
from .._torch import tree_map
from .._tree import Leaves, dot, safe_divide, tensor_leaves, tree_index
from ..loop import InnerLoop, Loss
from ..optim._noise import bits
from ._online import Online, OnlineState, Session
from ._primitives import split
from .base import (
    Bound,
    HyperCotangent,
    InitTerm,
    Outcome,
    Transform,
    check_transform_args,
    make_transform,
    refuse_loop,
    step_number,
)
from .greedy import check_gamma
from .reverse import HyperGradFn, drmad_pass, interpolate


def horizon(gamma: float, t: Any) -> Any:
    r""":math:`\sum_{i=1}^{t} \gamma^{t-i} = (1-\gamma^t)/(1-\gamma)` (``t`` when :math:`\gamma = 1`); ``t`` an
    int, or a floating tensor (a step traced in a scan kernel)."""
    return t * 1.0 if gamma == 1.0 else (1.0 - gamma**t) / (1.0 - gamma)


def keep_count(n: int, p: float) -> int:
    """``round_off(n·p)``, the examples kept from the older batch by SS of Eq. (14) (half rounds up)."""
    return min(n, int(math.floor(n * p + 0.5)))


def batch_size(batch: Any, name: str) -> int:
    """The shared leading (example) dimension of a batch's tensor leaves, or a clear error."""
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in tensor_leaves(batch)}
    if len(sizes) == 1 and (size := next(iter(sizes))) is not None:
        return size
    raise ValueError(
        f"distill subsamples examples (HyperDistill Eq. 14): every tensor of {name} must share a leading "
        f"example dimension, got leading sizes {sorted(map(str, sizes))}; pass full_batch=True for one fixed batch"
    )


def merge(old: Any, new: Any, keep: int, seed: int, step: int, stream: int) -> Any:
    r"""``SS(old, p) ∪ SS(new, 1-p)`` of Eq. (14): ``keep`` random examples of ``old`` followed by
    ``n - keep`` random examples of ``new`` (both pytrees of ``n`` examples), drawn without
    replacement from counter-based random numbers of ``(seed, step, stream)``."""
    n = batch_size(new, "the batch")
    device = tensor_leaves(new)[0].device
    old_bits, new_bits = bits([(n,), (n,)], seed, step, [2 * stream, 2 * stream + 1], device)
    take_old, take_new = torch.argsort(old_bits)[:keep], torch.argsort(new_bits)[: n - keep]

    def pick(a: Any, b: Any) -> Any:
        return torch.cat([a[take_old], b[take_new]]) if torch.is_tensor(b) else b

    return tree_map(pick, old, new)


def step_indices(n: int, t: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of the batch of (0-based) step ``t`` as ``(step, example)`` index pairs."""
    idx = torch.arange(n, device=device)
    return torch.full_like(idx, t), idx


class Distilled(NamedTuple):
    r"""A running distillation: the state average ``s*`` and the batch ``D*`` as ``(step, example)``
    index pairs into the inner batches (``None`` with ``full_batch``, where ``D* = D``)."""

    s: Leaves
    D: Optional[tuple[torch.Tensor, torch.Tensor]]

    def batch(self, bound: Bound, batches: Any, t: int) -> Any:
        """The distilled batch gathered from the (prepared) batches; ``t`` is the step used with full_batch."""
        return bound.loop._batch_at(batches, t) if self.D is None else tree_index(batches, self.D)


def advance(bound: Bound, dist: Optional[Distilled], s: Leaves, t: int, p: float, seed: int, stream: int):
    """Add the state ``s`` and the batch of step ``t`` to the distillation with weight ``1 - p``."""
    D = advance_batch(bound, None if dist is None else dist.D, t, p, seed, stream)
    return Distilled(s if dist is None else interpolate(dist.s, s, 1.0 - p), D)


def advance_batch(bound: Bound, D: Any, t: int, p: float, seed: int, stream: int) -> Any:
    """The distilled batch after adding step ``t``'s batch with weight ``1 - p`` (None with ``full_batch``)."""
    if bound.loop.full_batch:
        return None
    n = batch_size(bound.loop._batch_at(bound.batches, t), "one step's inner batch")
    new = step_indices(n, t, tensor_leaves(bound.batches)[0].device)
    return new if D is None else merge(D, new, keep_count(n, p), seed, t, stream)


def _forward_step(gamma: float):
    r"""Inner step ``i`` with the running state average of Eq. (13), :math:`s^*_{t} = p_t s^*_{t-1} + (1-p_t) s_{t-1}`
    (``t = i + 1``), as a :meth:`Bound.scan` body; :math:`p_1 = 0` makes :math:`s^*_1 = s_0`."""

    def body(bound: Bound, b: Any, i: Any, s: Leaves, s_star: Leaves) -> tuple:
        k = step_number(i, s)
        s_star = interpolate(s_star, s, 1.0 - gamma * horizon(gamma, k) / horizon(gamma, k + 1))
        s, b = bound.step_on(s, b, bound.h, bound.loop._batch_at(bound.prep.rebuild(bound.prep.d), i), i)
        return b, s, s_star

    return body


def distilled_vjp(bound: Bound, dist: Distilled, b: Any, t: int, alpha: Leaves) -> HyperCotangent:
    r""":math:`v = \alpha\, \partial\Phi(s^*, \lambda; D^*)/\partial\lambda` as a cotangent on ``(λ, d)``.

    Module buffers are not averaged (integer counters cannot be): the step at :math:`s^*` runs with
    the current buffers ``b``. One :meth:`Bound.piece` (a compiled kernel under ``hf.compile``)."""
    D = () if dist.D is None else dist.D
    out = bound.piece("distilled_vjp", _distilled_vjp, b, (dist.s, alpha), (D, (t,)))
    return HyperCotangent(*split(out, len(bound.h)))


def _distilled_vjp(bound: Bound, b: Any, s_star: Leaves, alpha: Leaves, D: tuple, ts: tuple) -> Leaves:
    (t,), prep, dist = ts, bound.prep, Distilled(s_star, D or None)

    def phi(h: Leaves, d: Leaves) -> Leaves:
        return bound.step_on(s_star, b, h, dist.batch(bound, prep.rebuild(d), t), t)[0]

    ct_h, ct_d = torch.func.vjp(phi, bound.h, prep.d)[1](alpha)
    return (*ct_h, *ct_d)


#: the range of a trustworthy θ fit (see docs/errors.md)
THETA_RANGE = (0.0, 10.0)


class Estimate(NamedTuple):
    r"""LinearEstimation's fit: ``theta = x'y / x'x`` and its samples ``x_s``, ``y_s`` for ``s = 1..T``.

    Outside ``[0, 10]`` (a distilled term pointing against the second-order term, or one that must
    be scaled up tenfold) :func:`linear_estimation` warns: the distilled direction then explains the
    second-order term poorly and ``distill`` with this θ is unreliable."""

    theta: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    def pooled(self) -> torch.Tensor:
        r"""θ fitted on the samples of every task together, for a vmapped meta-batch (``x``, ``y`` of
        shape ``(n_tasks, T)``): Algorithm 4's least squares over the pooled samples,

        .. math:: \theta = \frac{\sum_{i,s} x_{i,s} y_{i,s}}{\sum_{i,s} x_{i,s}^2},

        not the mean of per-task fits, which one badly conditioned task can dominate (a task
        with :math:`\theta_i = 9.3` moved a meta-batch mean of ten fits to 3.1 while the pooled
        fit read 1.70). Warns outside ``[0, 10]`` like :func:`linear_estimation`.

        Examples:
            >>> import torch, hyperfunc as hf
            >>> x, y = torch.tensor([[1.0, 1.0], [0.1, 0.1]]), torch.tensor([[2.0, 2.0], [0.9, 0.9]])
            >>> est = hf.Estimate(theta=y.sum(1) / x.sum(1), x=x, y=y)
            >>> est.theta, est.pooled()
            (tensor([2., 9.]), tensor(2.0693))
        """
        theta = safe_divide((self.x * self.y).sum(), (self.x * self.x).sum())
        _warn_theta(theta)
        return theta


def _warn_theta(theta: torch.Tensor) -> None:
    warn_outside(
        theta,
        *THETA_RANGE,
        "linear_estimation: theta = {value} is outside "
        f"{list(THETA_RANGE)}: the distilled VJP explains the second-order term poorly, so distill with this theta "
        "is unreliable (compare it with hf.compare, lower gamma, or refit on more tasks)",
    )


def estimate(bound: Bound, gamma: float, seed: int) -> Estimate:
    r"""Algorithm 4 (LinearEstimation) on one bound problem; see :func:`linear_estimation`."""
    steps = bound.loop.steps
    s0 = bound.initial()
    sT, bT = bound.run(s0, bound.buffers, 0, steps)
    xs: list = []
    ys: list = []
    dist: list[Any] = [None]  # the distillation so far, rebound by on_step

    def on_step(t: int, s_hat: Leaves, second: HyperCotangent, alpha_T: Leaves) -> None:
        s = steps - t + 1
        dist[0] = advance(bound, dist[0], s_hat, t - 1, horizon(gamma, s - 1) / horizon(gamma, s), seed, 1)
        v = bound.to_hparams(distilled_vjp(bound, dist[0], bT, t - 1, alpha_T))
        g_so = bound.to_hparams(second)
        norm = dot(v, v).sqrt()
        xs.append(norm * horizon(gamma, s))
        ys.append(safe_divide(dot(v, g_so), norm))

    drmad_pass(bound, s0, sT, bT, on_step)
    x, y = torch.stack(xs), torch.stack(ys)
    theta = safe_divide(dot((x,), (y,)), dot((x,), (x,)))
    _warn_theta(theta)
    return Estimate(theta, x, y)


def check_theta(theta: Any) -> Any:
    if theta is None:
        raise TypeError(
            "theta must be a finite number or a scalar tensor here (online.distill fixes it; fit it "
            "with hf.linear_estimation and build a new online transform every N inner optimizations)"
        )
    if torch.is_tensor(theta):
        if theta.numel() != 1 or not theta.is_floating_point():
            raise ValueError(f"theta must be a floating scalar, got {theta.dtype} of shape {tuple(theta.shape)}")
        if concrete(theta) and not torch.isfinite(theta).all():
            raise ValueError(f"theta must be finite, got {theta}")
        return theta.reshape(())
    return check_real(theta, "theta")


def linear_estimation(gamma: float, seed: int = 0) -> Any:
    r"""HyperDistill's LinearEstimation (Algorithm 4, Eqs. 16-18): fit the size ``θ`` of the
    distilled hypergradient.

    One DrMAD backward travel (Algorithm 2) over :math:`\hat s_{t-1} = (1-\tfrac{t-1}{T}) s_0 + \tfrac{t-1}{T} s_T`
    yields, after step ``t``, the second-order term over the horizon ``s = T - t + 1`` (Eq. 16),
    :math:`g^{SO}_s = \sum_{i=t}^{T} \alpha_T \hat A_T \cdots \hat A_{i+1} \hat B_i`. Alongside it the
    distilled state and batch are built backwards (Eqs. 17-18, :math:`p_s = (1-\gamma^{s-1})/(1-\gamma^s)`),

    .. math::
        s^*_1 = \hat s_{T-1},\; s^*_s = p_s s^*_{s-1} + (1-p_s)\hat s_{T-s}, \qquad
        D^*_1 = D_T,\; D^*_s = SS(D^*_{s-1}, p_s) \cup SS(D_{T-s+1}, 1-p_s),

    :math:`v_s = \alpha_T\, \partial\Phi(s^*_s, \lambda; D^*_s)/\partial\lambda`, and the samples
    :math:`x_s = \|v_s\|\,(1-\gamma^s)/(1-\gamma)`, :math:`y_s = \sigma(v_s)^\top g^{SO}_s`
    (:math:`\sigma(v) = v/\|v\|`) give :math:`\theta = x^\top y / x^\top x`.

    Cost: ``T`` gradient steps forward, then ``2T`` step VJPs (``T`` of DrMAD, ``T`` for the
    ``v_s``); with ``prepare``, two VJPs of ``prepare`` per step. Memory O(|s| + H + T).

    For a meta-batch, ``vmap`` the fit and use :meth:`Estimate.pooled`, the fit over all tasks'
    samples together (not the mean of per-task θ).

    Returns:
        ``transform(loop, outer_loss) -> fit(hparams, params0, inner_batches, outer_batch) -> Estimate``.

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> fit = hf.linear_estimation(0.9)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    refuse_loop(gamma, "hf.linear_estimation(gamma)")
    gamma, seed = check_gamma(gamma), check_seed(seed)

    def transform(loop: InnerLoop, outer_loss: Loss):
        check_transform_args(loop, outer_loss)

        def fit(hparams, params0, inner_batches, outer_batch, buffers=None) -> Estimate:
            bound = Bound.bind(loop, outer_loss, hparams, params0, inner_batches, outer_batch, buffers)
            return estimate(bound, gamma, seed)

        return fit

    return transform


def distill(gamma: float, theta: Any = None, seed: int = 0) -> Transform:
    r"""HyperDistill (Lee et al. 2022, Algorithm 3): the hypergradient at step ``T`` with its
    second-order term distilled into one VJP.

    .. math::
        g_t = \partial_\lambda L_{out}(w_t, \lambda) + \theta\, \frac{1-\gamma^t}{1-\gamma}\, v_t,
        \qquad v_t = \alpha_t \frac{\partial \Phi(s^*_t, \lambda; D^*_t)}{\partial \lambda},

    with the running state average of Eq. (13) (equal to the weighted average of Eq. (12)),
    :math:`s^*_1 = s_0`, :math:`s^*_t = p_t s^*_{t-1} + (1-p_t) s_{t-1}`,
    :math:`p_t = (\gamma-\gamma^t)/(1-\gamma^t)` (:math:`\gamma = 0`: :math:`s^*_t = s_{t-1}`;
    :math:`\gamma = 1`: :math:`p_t = (t-1)/t`, the plain mean), and the distilled batch of Eq. (14),
    :math:`D^*_1 = D_1`, :math:`D^*_t = SS(D^*_{t-1}, p_t) \cup SS(D_t, 1-p_t)` (seeded subsampling of
    ``round(n p_t)`` and ``n - round(n p_t)`` examples; ``D* = D`` with ``full_batch``). The
    offline result is :math:`g_T`; :func:`hyperfunc.online.distill` emits every :math:`g_t`.
    ``theta=None`` fits θ by :func:`linear_estimation` (Algorithm 4) inside the call; a number
    fixes it (the paper's :math:`\pi^* = 1` case is ``theta=1``). :math:`\gamma = 0, \theta = 1`
    is one-step lookahead. Its formula has no :math:`w_0` term: a learned ``params0`` is a
    ``ValueError`` unless wrapped, ``hf.reptile(hf.distill(γ))`` as the paper meta-learns it
    (Algorithm 3, line 14) or ``hf.fomaml(...)``. Module buffers are carried through the steps;
    the distilled step runs with the current buffers (they are not averaged).

    Cost: ``T`` gradient steps, one outer gradient and one step VJP, plus ``2T`` VJPs when θ is
    fitted; memory O(|s| + H) (the distilled batch is kept as ``n`` index pairs).

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> hg = hf.distill(0.9, theta=1.0)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    refuse_loop(gamma, "hf.distill(gamma)")
    gamma, seed = check_gamma(gamma), check_seed(seed)
    theta = None if theta is None else check_theta(theta)

    def algorithm(bound: Bound) -> Outcome:
        steps, s, D = bound.loop.steps, bound.initial(), None
        b, carry, body = bound.buffers, (s, s), _forward_step(gamma)
        if bound.loop.full_batch:  # D* = D: the whole recursion is one scan
            b, carry = bound.scan(f"distill/{gamma}", body, b, carry, 0, steps)
        else:  # the subsampled batch of Eq. (14) is drawn on the host, one step at a time
            for t in range(1, steps + 1):
                D = advance_batch(bound, D, t - 1, gamma * horizon(gamma, t - 1) / horizon(gamma, t), seed, 0)
                b, carry = bound.scan(f"distill/{gamma}", body, b, carry, t - 1, t)
        s, dist = carry[0], Distilled(carry[1], D)
        loss, alpha, direct = bound.outer_vjp(s, b)
        size = (estimate(bound, gamma, seed).theta if theta is None else theta) * horizon(gamma, steps)
        v = distilled_vjp(bound, dist, b, steps - 1, alpha)
        return Outcome(direct.plus(v.times(size)), loss, s, b, InitTerm.ABSENT)

    def transform(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
        return make_transform(algorithm, f"distill({gamma})", loop, outer_loss, segmented=True)

    return transform


def online_distill(gamma: float, theta: Any, seed: int = 0) -> Callable[[InnerLoop, Loss], Online]:
    r"""Online HyperDistill (Lee et al. 2022, Algorithm 3): after step ``t`` emit

    .. math::
        g_t = \partial_\lambda L_{out}(w_t) + \theta\,\frac{1-\gamma^t}{1-\gamma}\, v_t, \qquad
        v_t = \alpha_t\, \partial\Phi(s^*_t, \lambda; D^*_t)/\partial\lambda,

    carrying the distilled state :math:`s^*_t` (Eq. 13) and the distilled batch :math:`D^*_t`
    (Eq. 14, kept as data: ``n`` examples) in the state. ``theta`` is fixed here; refresh it every
    ``N`` inner optimizations with :func:`hyperfunc.linear_estimation` (Algorithm 4; the paper uses
    N = 50) and build a new online transform with it. With fixed hyperparameters the emission after
    step ``T`` equals :func:`hyperfunc.distill` ``(gamma, theta, seed)``; ``gamma = 0, theta = 1`` is
    :func:`hyperfunc.online.one_step`. With module buffers the distilled step uses the buffers after step ``t``.

    Cost per step: one step VJP, one outer gradient and one distilled VJP (plus ``prepare`` on the
    distilled batch); memory O(|s| + H + n).

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> opt = hf.online.distill(0.9, theta=1.0)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    refuse_loop(gamma, "hf.online.distill(gamma, theta)")
    gamma, seed, theta = check_gamma(gamma), check_seed(seed), check_theta(theta)

    def transform(loop: InnerLoop, outer_loss: Loss) -> Online:
        session = Session.of(loop, outer_loss)

        def init(hparams, params0, buffers=None) -> OnlineState:
            return session.start(hparams, params0, buffers, lambda inputs, s0: (s0, ()))

        def step(state, hparams, batch, outer_batch, t):
            bound, s, t = session.bind(state, hparams, batch, outer_batch, t)
            fits = isinstance(state.extra, tuple) and len(state.extra) == 2 and len(state.extra[0]) == len(s)
            session.check_extra(state, fits, "online distill")
            s_star, D_star = state.extra
            p = gamma * horizon(gamma, t) / horizon(gamma, t + 1)
            s_star = s if t == 0 else interpolate(s_star, s, 1.0 - p)
            if t > 0 and not loop.full_batch:
                D_star = merge(D_star, batch, keep_count(batch_size(batch, "batch"), p), seed, t, 0)
            else:
                D_star = batch
            s_new, b_new = bound.run(s, bound.buffers, t, t + 1)
            star = bound.on(D_star)  # the rest on the distilled batch: its prepare, its one pullback
            loss, alpha, direct = star.outer_vjp(s_new, b_new)
            v = distilled_vjp(star, Distilled(s_star, None), b_new, t, alpha)
            cot = direct.plus(v.times(theta * horizon(gamma, t + 1)))
            result = star.finish(Outcome(cot, loss, s_new, b_new, InitTerm.ABSENT))
            return result, session.state(bound, s_new, b_new, t, (s_star, D_star))

        return Online(init, step)

    return transform
