r"""Reverse-mode hypergradients: ``unroll``, ``truncate(K)``, ``one_step``, ``first_order``.

All four are one engine: run the inner loop without a graph up to step ``T - K``, then take one
VJP of ``λ ↦ L_out(Φ_T ∘ ⋯ ∘ Φ_{T-K+1}(s_{T-K}, λ), λ)`` (Shaban et al. 2019, Eqs. 5-8),
optionally split into checkpointed segments whose VJPs are chained from the last to the first.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_int
from .._rng import rng_state, set_rng_state
from .._tree import Leaves
from ..loop import InnerLoop, Loss
from .base import (
    HyperCotangent,
    HyperGradFunction,
    InitTerm,
    Outcome,
    Transform,
    make_transform,
    refuse_loop,
    step_number,
)

#: ``hg(hparams, params0, inner_batches, outer_batch, buffers=None) -> HyperGrad``
HyperGradFn = HyperGradFunction


def reverse_pass(bound, depth: int, every: Optional[int] = None) -> Outcome:
    """The truncated reverse pass over the last ``depth`` steps, in segments of ``every`` steps.

    ``depth >= T`` is the exact hypergradient, including the term through a learned ``w_0``; with
    buffers, every segment's buffers are stored beside its checkpoint and replayed. ``every=None`` is
    the executor's choice (eager: as many steps as fit a memory budget, see
    :meth:`~._executor.Eager.reverse_segment`; compiled: its kernels' segments).
    """
    steps = bound.loop.steps
    first = steps - min(depth, steps)
    s, b = bound.run(bound.initial(), bound.buffers, 0, first)
    every = every or bound.executor.reverse_segment(bound, s, b, first, steps) or max(steps - first, 1)
    starts = list(range(first, steps, every)) or [first]
    stops = starts[1:] + [steps]
    checkpoints, rng = [(s, b)], []
    if len(starts) > 1 and torch.compiler.is_compiling():
        raise ValueError(
            "unroll(checkpoint_every=k) cannot be compiled whole: replaying a recomputed segment's random draws "
            "reads torch.get_rng_state, which torch.compile does not trace. Compile it by segments instead, with "
            "the same memory: hf.compile(hf.vmap(hf.unroll(loop, outer_loss), in_dims), segment=k)"
        )
    for start, stop in zip(starts[:-1], stops[:-1]):
        rng.append(rng_state(s))
        checkpoints.append(bound.run(*checkpoints[-1], start, stop))
    s_last, b_last = checkpoints[-1]
    loss, (final, b_final), ct_s, cot = bound.run_outer_vjp(s_last, b_last, starts[-1], steps)
    after = rng_state(s_last) if rng else None
    for start, stop, (s, b), state in zip(*(reversed(x) for x in (starts[:-1], stops[:-1], checkpoints[:-1], rng))):
        set_rng_state(state)  # a recomputed segment replays the random numbers of its first run (dropout)
        ct_s, ct = bound.run_vjp(s, b, start, stop)[1](ct_s)
        cot = cot.plus(ct)
    if after is not None:
        set_rng_state(after)
    return Outcome(cot, loss, final, b_final, ct_s if first == 0 else InitTerm.ABSENT)


def interpolate(s0: Leaves, sT: Leaves, c: float) -> Leaves:
    """``(1 - c) s0 + c sT`` leaf by leaf (DrMAD's linear trajectory)."""
    return tuple((1 - c) * a + c * b for a, b in zip(s0, sT))


def drmad_pass(bound, s0: Leaves, sT: Leaves, bT, on_step=None):
    r"""DrMAD's backward travel (HyperDistill Algorithm 2) over ``ŝ_{t-1} = (1-(t-1)/T) s_0 + ((t-1)/T) s_T``.

    Returns the outer loss, the cotangent on ``(λ, d)`` and the cotangent on ``s_0``. Module
    buffers are not interpolated (integer counters cannot be): every backward step runs with the
    final buffers ``bT``. ``on_step(t, s_hat, second, alpha_T)`` is called after each step
    ``t = T..1`` with the interpolated state ``ŝ_{t-1}`` and the partial second-order sum over the
    horizon ``s = T - t + 1`` (HyperDistill Eq. 16) as a :class:`HyperCotangent`.
    """
    steps = bound.loop.steps
    loss, alpha_T, direct = bound.outer_vjp(sT, bT)
    carry, ends = (alpha_T, *bound.zero_cotangent()), (s0, sT)
    shared = (*ends, (steps,))  # T as a shared count: one kernel serves every horizon
    if on_step is None:
        carry = bound.scan("drmad", _drmad_step, bT, carry, 0, steps, shared)[1]
    else:
        for i in range(steps):  # one scan step at a time, reporting each
            carry = bound.scan("drmad", _drmad_step, bT, carry, i, i + 1, shared)[1]
            t = steps - i
            on_step(t, interpolate(s0, sT, (t - 1) / steps), HyperCotangent(*carry[1:]), alpha_T)
    ct_s, *second = carry
    return loss, direct.plus(HyperCotangent(*second)), ct_s


def _drmad_step(bound, b, i, ct_s: Leaves, sec_h: Leaves, sec_d: Leaves, s0: Leaves, sT: Leaves, total) -> tuple:
    """DrMAD's backward step ``i`` (step ``t = T - i``) as a :meth:`Bound.scan` body (shared: ``s_0, s_T, (T,)``)."""
    (steps,) = total
    t = steps - i
    c = step_number(t - 1, s0) / step_number(steps, s0)
    ct_s, ct = bound.step_vjp(interpolate(s0, sT, c), b, t - 1)[1](ct_s)
    return b, ct_s, *HyperCotangent(sec_h, sec_d).plus(ct)


def unroll(loop: InnerLoop, outer_loss: Loss, checkpoint_every: Optional[int] = None) -> HyperGradFn:
    r"""Exact hypergradient by reverse-mode differentiation through all ``T`` inner steps.

    .. math::
        \frac{dF}{d\lambda} = \partial_\lambda L_{out}(w_T) + \sum_{t=1}^{T} \alpha_T A_T \cdots A_{t+1} B_t
        \;(+\; \alpha_T A_T \cdots A_1 \tfrac{ds_0}{d\lambda} \text{ when } w_0 \text{ depends on } \lambda)

    (reverse-mode differentiation, RMD; Shaban et al. 2019, Eqs. 5-6; Maclaurin et al. 2015).

    Cost: the forward trajectory plus its reverse, ``T`` VJPs of the step map (each a
    Hessian-vector product of the inner loss). By default the reverse pass keeps at most 64 MiB of
    graph alive (one step measured on the first call with given input shapes;
    :meth:`~hyperfunc.transforms._executor.Eager.reverse_segment`):
    a small model keeps its whole graph (memory O(T) steps' graphs, nothing recomputed); a
    model-scale step (Conv-4 MAML: hundreds of MiB) runs the forward with no graph, keeping every
    state :math:`s_t`, and recomputes one step's graph at a time in the reverse (memory T·|s| plus
    one step's graph, for one more gradient evaluation per step; TESLA, Cui et al. 2023). On Conv-4
    MAML that is 1.9x-3.5x less memory than the whole graph at T = 5-50, in about its time at T = 5
    and 50 and 1.36x at T = 20 (``benchmarks/models.py``). One task at a time
    (``hf.vmap(hg, in_dims, chunk_size=1)``) it took 0.30x of higher's resident memory at T = 20 and
    0.15x at T = 50, for 1.4-1.5x higher's time; compiled (``hf.compile(..., segment=1)``), 0.10x and
    0.06x, in 0.92x higher's time (docs/benchmarks.md). ``checkpoint_every=k`` sets the segment
    length: every k-th state is kept and a k-step graph is alive at a time, memory
    O((T/k)·|s| + k steps' graphs);
    ``checkpoint_every=T`` keeps the whole graph. Under ``torch.compile`` the default is the whole
    graph, whose recomputation the compiler's partitioner chooses.

    Module buffers (``buffers=``) are carried through the steps, stored beside each checkpoint and
    replayed with it, never differentiated; ``res.buffers`` holds them after step ``T``.

    Args:
        loop: the inner loop.
        outer_loss: ``outer_loss(params, hparams, batch) -> scalar``.
        checkpoint_every: store every k-th state and recompute k-step segments (``None``: as many
            steps as fit 64 MiB of graph; ``T``: the whole graph).

    Returns:
        ``hg(hparams, params0, inner_batches, outer_batch) -> HyperGrad``.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> inner = lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum()
        >>> outer = lambda p, h, y: ((p["w"] - y) ** 2).sum()
        >>> loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1), steps=100, full_batch=True)
        >>> hg = hf.unroll(loop, outer)
        >>> res = hg(TensorDict({"l2": torch.tensor(1.0)}, []), TensorDict({"w": torch.zeros(1)}, []),
        ...          torch.ones(1), torch.zeros(1))
        >>> res.grads["l2"].round(decimals=4)  # d/dl2 of (1/(1+l2))^2 at l2 = 1
        tensor(-0.2500)
    """
    if checkpoint_every is not None:
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", 1)
    return make_transform(
        lambda bound: reverse_pass(bound, loop.steps, checkpoint_every), "unroll", loop, outer_loss, segmented=True
    )


def truncate(K: int) -> Transform:
    r"""K-step truncated back-propagation (Shaban et al. 2019, Eq. 8).

    .. math::
        h_K = \partial_\lambda L_{out}(w_T) + \sum_{t=T-K+1}^{T} \alpha_T A_T \cdots A_{t+1} B_t

    The first ``T - K`` steps run without a graph and ``s_{T-K}`` is held fixed. ``K >= T`` is
    exactly :func:`unroll` (including the ``w_0`` term), ``K = 0`` is :func:`first_order`,
    ``K = 1`` is :func:`one_step`. Prop. 3.1 of the paper bounds the bias by
    :math:`O(\kappa^K)` for a strongly convex inner problem whose steps contract by :math:`\kappa`.

    Cost: ``T`` gradient steps plus ``K`` step VJPs, their graphs kept within 64 MiB as in
    :func:`unroll` (a model-scale step is recomputed, one more gradient evaluation); memory O(K·|s|)
    plus the graphs, flat in ``T``. Module buffers
    run through the graph-free prefix and the last ``K`` steps alike. With a learned ``params0`` and
    ``K < T`` there is no ``w_0`` term: a ``ValueError`` unless wrapped in :func:`hyperfunc.fomaml` or
    :func:`hyperfunc.reptile`.

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> hg = hf.truncate(5)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    refuse_loop(K, "hf.truncate(K)")
    K = check_int(K, "K", 0)

    def transform(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
        return make_transform(lambda bound: reverse_pass(bound, K), f"truncate({K})", loop, outer_loss, segmented=True)

    return transform


def one_step(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
    r"""One-step lookahead (T1-T2, Luketina et al. 2016): ``truncate(1)``.

    .. math:: h = \partial_\lambda L_{out}(w_T) + \alpha_T B_T

    Cost: ``T`` gradient steps plus one step VJP; memory O(|s|).

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> hg = hf.one_step(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    return truncate(1)(loop, outer_loss)


def first_order(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
    r"""The direct gradient only, ignoring the inner optimization: ``truncate(0)``.

    .. math:: h = \partial_\lambda L_{out}(w_T, \lambda)

    Nonzero only for hyperparameters that the outer loss reads directly (a shared feature
    extractor, as in ANIL). A learned ``params0`` gets no term: first-order MAML is
    ``hf.fomaml(hf.first_order)``. Cost: ``T`` gradient steps and one gradient of the outer loss;
    memory O(|s|).

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> hg = hf.first_order(loop, lambda p, h, y: ((h["a"] * p["w"] - y) ** 2).sum())
    """
    return truncate(0)(loop, outer_loss)


def drmad(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
    r"""DrMAD (Fu et al. 2016; HyperDistill Algorithm 2): the reverse pass of :func:`unroll` on a
    linearly interpolated trajectory instead of the stored one.

    .. math::
        \hat s_{t-1} = \Big(1 - \tfrac{t-1}{T}\Big) s_0 + \tfrac{t-1}{T} s_T, \qquad
        h = \partial_\lambda L_{out}(w_T) + \sum_{t=1}^{T} \alpha_T \hat A_T \cdots \hat A_{t+1} \hat B_t

    with :math:`\hat A_t, \hat B_t` the step Jacobians at :math:`\hat s_{t-1}` (optimizer buffers are
    interpolated too). Exact when the step Jacobians are constant (a quadratic inner loss with
    plain gradient descent); otherwise biased by the curvature of the real trajectory. The
    learned-initialization term uses the same pulled-back cotangent on ``s_0``.

    Cost: ``T`` gradient steps forward, ``T`` step VJPs backward (2T products); memory O(|s|):
    only ``s_0`` and ``s_T`` are kept. Module buffers are not interpolated (integer counters cannot
    be): the backward travel runs every step with the final buffers.

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> hg = hf.drmad(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """

    def algorithm(bound) -> Outcome:
        s0 = bound.initial()
        sT, bT = bound.run(s0, bound.buffers, 0, loop.steps)
        loss, cot, ct_s0 = drmad_pass(bound, s0, sT, bT)
        return Outcome(cot, loss, sT, bT, ct_s0)

    return make_transform(algorithm, "drmad", loop, outer_loss, segmented=True)
