r"""HyperDistill (Lee et al. 2022, "Online hyperparameter meta-learning with hypergradient
distillation", Algorithms 3 and 4, Eqs. 12-18).

The second-order term of the hypergradient at step t is distilled into one Jacobian-vector
product at a running average of the past states ``s*_t`` on a subsampled batch ``D*_t``, scaled by
a linear estimate ``θ·(1-γ^t)/(1-γ)`` of its size.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Optional

import torch
import torch.utils._pytree as pytree

from .._tree import Leaves, add, dot, safe_divide, scale, tensor_leaves, tree_index
from ..loop import InnerLoop, Loss
from ..optim._noise import bits
from ._problem import HyperGrad, Prepared, Problem, check_transform_args
from .greedy import check_gamma
from .reverse import HyperGradFn, Transform, drmad_pass, interpolate


def horizon(gamma: float, t: int) -> float:
    r""":math:`\sum_{i=1}^{t} \gamma^{t-i} = (1-\gamma^t)/(1-\gamma)` (``t`` when :math:`\gamma = 1`)."""
    return float(t) if gamma == 1.0 else (1.0 - gamma**t) / (1.0 - gamma)


def keep_count(n: int, p: float) -> int:
    """``round_off(n·p)``, the examples kept from the older batch by SS of Eq. (14) (half rounds up)."""
    return min(n, int(math.floor(n * p + 0.5)))


def batch_size(batch: Any, name: str) -> int:
    """The shared leading (example) dimension of a batch's tensor leaves, or a clear error."""
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in tensor_leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"distill subsamples examples (HyperDistill Eq. 14): every tensor of {name} must share a leading "
            f"example dimension, got leading sizes {sorted(map(str, sizes))}; pass full_batch=True for one fixed batch"
        )
    return sizes.pop()


def merge(old: Any, new: Any, keep: int, seed: int, step: int, stream: int) -> Any:
    r"""``SS(old, p) ∪ SS(new, 1-p)`` of Eq. (14): ``keep`` random examples of ``old`` followed by
    ``n - keep`` random examples of ``new`` (both pytrees of ``n`` examples), drawn without
    replacement from counter-based random numbers of ``(seed, step, stream)``."""
    n = batch_size(new, "the batch")
    device = tensor_leaves(new)[0].device
    take_old = torch.argsort(bits((n,), seed, step, 2 * stream, device))[:keep]
    take_new = torch.argsort(bits((n,), seed, step, 2 * stream + 1, device))[: n - keep]

    def pick(a: Any, b: Any) -> Any:
        return torch.cat([a[take_old], b[take_new]]) if torch.is_tensor(b) else b

    return pytree.tree_map(pick, old, new)


def step_indices(n: int, t: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples of the batch of (0-based) step ``t`` as ``(step, example)`` index pairs."""
    idx = torch.arange(n, device=device)
    return torch.full_like(idx, t), idx


class Distilled(NamedTuple):
    r"""A running distillation: the state average ``s*`` and the batch ``D*`` as ``(step, example)``
    index pairs into the inner batches (``None`` with ``full_batch``, where ``D* = D``)."""

    s: Leaves
    D: Optional[tuple[torch.Tensor, torch.Tensor]]

    def batch(self, problem: Problem, batches: Any, t: int) -> Any:
        """The distilled batch gathered from the (prepared) batches; ``t`` is the step used with full_batch."""
        return problem.loop.batch_at(batches, t) if self.D is None else tree_index(batches, self.D)


def advance(problem: Problem, dist: Optional[Distilled], s: Leaves, t: int, p: float, seed: int, stream: int):
    """Add the state ``s`` and the batch of step ``t`` to the distillation with weight ``1 - p``."""
    if problem.loop.full_batch:
        D = None
    else:
        n = batch_size(problem.loop.batch_at(problem.batches, t), "one step's inner batch")
        new = step_indices(n, t, tensor_leaves(problem.batches)[0].device)
        D = new if dist is None else merge(dist.D, new, keep_count(n, p), seed, t, stream)
    return Distilled(s if dist is None else interpolate(dist.s, s, 1.0 - p), D)


def distilled_vjp(problem: Problem, prep: Prepared, dist: Distilled, t: int, alpha: Leaves) -> tuple[Leaves, Leaves]:
    r""":math:`v = \alpha\, \partial\Phi(s^*, \lambda; D^*)/\partial\lambda` as cotangents on ``h`` and the batches."""

    def phi(h: Leaves, d: Leaves) -> Leaves:
        return problem.step_on(dist.s, h, dist.batch(problem, prep.rebuild(d), t), t)

    return torch.func.vjp(phi, problem.h, prep.d)[1](alpha)


class Estimate(NamedTuple):
    r"""LinearEstimation's fit: ``theta = x'y / x'x`` and its samples ``x_s``, ``y_s`` for ``s = 1..T``."""

    theta: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor


def estimate(problem: Problem, prep: Prepared, gamma: float, seed: int) -> Estimate:
    r"""Algorithm 4 (LinearEstimation) on one bound problem; see :func:`linear_estimation`."""
    h, steps = problem.h, problem.loop.steps
    s0 = problem.init_state(h)
    sT = problem.run(s0, h, prep.rebuild(prep.d), 0, steps)
    xs, ys, dist = [], [], [None]

    def on_step(t: int, s_hat: Leaves, second_h: Leaves, second_d: Leaves, alpha_T: Leaves) -> None:
        s = steps - t + 1
        dist[0] = advance(problem, dist[0], s_hat, t - 1, horizon(gamma, s - 1) / horizon(gamma, s), seed, 1)
        v = prep.to_hparams(*distilled_vjp(problem, prep, dist[0], t - 1, alpha_T))
        g_so = prep.to_hparams(second_h, second_d)
        norm = dot(v, v).sqrt()
        xs.append(norm * horizon(gamma, s))
        ys.append(safe_divide(dot(v, g_so), norm))

    drmad_pass(problem, prep, s0, sT, on_step)
    x, y = torch.stack(xs), torch.stack(ys)
    return Estimate(safe_divide(dot((x,), (y,)), dot((x,), (x,))), x, y)


def check_seed(seed: Any) -> int:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return int(seed)


def check_theta(theta: Any) -> Any:
    if torch.is_tensor(theta):
        if theta.numel() != 1:
            raise ValueError(f"theta must be a scalar, got a tensor of shape {tuple(theta.shape)}")
        return theta.reshape(())
    if not isinstance(theta, numbers.Real) or isinstance(theta, bool) or not math.isfinite(theta):
        raise TypeError(f"theta must be None (fit by Algorithm 4), a finite number or a scalar tensor, got {theta!r}")
    return float(theta)


def refuse_learned_init(problem: Problem, what: str) -> None:
    if problem.learned_init:
        raise ValueError(
            f"{what} does not differentiate a learned initialization: HyperDistill meta-learns params0 with "
            "Reptile (Algorithm 3, line 14); pass params0 as a TensorDict and update it outside, or use "
            "unroll/forward/greedy_accumulate for a hypergradient in params0"
        )


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

    Returns:
        ``transform(loop, outer_loss) -> fit(hparams, params0, inner_batches, outer_batch) -> Estimate``.

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> fit = hf.linear_estimation(0.9)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    gamma, seed = check_gamma(gamma), check_seed(seed)

    def transform(loop: InnerLoop, outer_loss: Loss):
        check_transform_args(loop, outer_loss)

        def fit(hparams, params0, inner_batches, outer_batch) -> Estimate:
            problem = Problem.bind(loop, outer_loss, hparams, params0, inner_batches, outer_batch)
            refuse_learned_init(problem, "linear_estimation")
            return estimate(problem, problem.prepared(), gamma, seed)

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
    is one-step lookahead. A learned ``params0`` is refused (the paper meta-learns it by Reptile).

    Cost: ``T`` gradient steps, one outer gradient and one step VJP, plus ``2T`` VJPs when θ is
    fitted; memory O(|s| + H) (the distilled batch is kept as ``n`` index pairs).

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> hg = hf.distill(0.9, theta=1.0)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    gamma, seed = check_gamma(gamma), check_seed(seed)
    theta = None if theta is None else check_theta(theta)

    def transform(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
        check_transform_args(loop, outer_loss)

        def hg(hparams, params0, inner_batches, outer_batch) -> HyperGrad:
            problem = Problem.bind(loop, outer_loss, hparams, params0, inner_batches, outer_batch)
            refuse_learned_init(problem, "distill")
            prep = problem.prepared()
            h, steps, batches = problem.h, loop.steps, prep.rebuild(prep.d)
            s, dist = problem.init_state(h), None
            for t in range(1, steps + 1):
                dist = advance(problem, dist, s, t - 1, gamma * horizon(gamma, t - 1) / horizon(gamma, t), seed, 0)
                s = problem.run(s, h, batches, t - 1, t)
            loss, outer_vjp = torch.func.vjp(problem.outer, s, h)
            alpha, direct = outer_vjp(torch.ones_like(loss))
            v_h, v_d = distilled_vjp(problem, prep, dist, steps - 1, alpha)
            size = (estimate(problem, prep, gamma, seed).theta if theta is None else theta) * horizon(gamma, steps)
            grads = problem.finish(prep, add(direct, scale(size, v_h)), scale(size, v_d), None, None)
            return problem.result(grads, loss, s)

        return hg

    return transform
