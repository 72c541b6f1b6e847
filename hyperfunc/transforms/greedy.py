r"""Greedy accumulation of per-step hypergradients (Yakovlev 2024, Eq. 6)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

from tensordict import TensorDictBase

from .._tree import Leaves, add, build, check_same_keys, leaves_of, scale, zeros_like
from ..loop import InnerLoop, Loss
from ._online import Online, OnlineState, Session
from .base import Bound, HyperCotangent, InitTerm, Outcome, Transform, make_transform, refuse_loop, where_step
from .reverse import HyperGradFn


def check_gamma(gamma: Any, name: str = "gamma") -> float:
    if not isinstance(gamma, numbers.Real) or isinstance(gamma, bool):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(gamma).__name__}")
    value = float(gamma)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {gamma}")
    return value


class Accumulator(NamedTuple):
    """The discounted sums of greedy accumulation: on ``(λ, d)`` and on a learned ``s_0``."""

    cot: HyperCotangent
    s0: Leaves


def greedy_step(bound: Bound, s: Leaves, b: Any, t: int, acc: Accumulator, gamma: float, with_direct: bool):
    r"""One inner step ``s_{t+1} = Φ(s_t)`` and the accumulation ``h ← γ h + α_{t+1} B_{t+1}``.

    The accumulator on a learned ``s_0`` takes ``α_1 A_1`` at the first step and decays by γ like
    ``h``. Returns the new state and buffers, the new accumulator, the outer loss at the new params
    and, when ``with_direct``, its direct gradient in λ (else ``None``: the outer VJP then skips the
    backward through λ, e.g. through an ANIL body that only the last step needs).
    """
    (s_new, b_new), pull = bound.step_vjp(s, b, t)
    loss, alpha, direct = bound.outer_vjp(s_new, b_new, with_direct)
    ct_s, ct = pull(alpha)
    s0 = add(scale(gamma, acc.s0), where_step(t == 0, ct_s))
    return s_new, b_new, Accumulator(acc.cot.times(gamma).plus(ct), s0), loss, direct


def greedy_accumulate(gamma: float) -> Transform:
    r"""Greedy gradient accumulation (Yakovlev 2024, "Generalized greedy gradient-based HPO", Eq. 6).

    .. math::
        \hat d(\gamma) = \partial_\lambda L_{out}(w_T, \lambda)
        + \sum_{t=1}^{T} \gamma^{T-t}\, \nabla_{w_t} L_{out}(w_t, \lambda)\, B_t

    accumulated online during the single forward pass as :math:`h \leftarrow \gamma h + \alpha_t B_t`.
    Every step contributes its greedy (one-step) hypergradient, discounted by how long ago it
    happened; :math:`\gamma = 0` is one-step lookahead (T1-T2, Prop. 4.1), :math:`\gamma = 1` sums
    all greedy gradients. With a learned ``w_0`` the step-1 term includes
    :math:`\alpha_1 A_1\, ds_0/d\lambda`, discounted like :math:`\alpha_1 B_1`.

    Cost: one step VJP and one outer-loss gradient in ``w`` per inner step (the gradient in λ only
    at the last step); memory O(|s| + H), flat in ``T``. Module buffers are carried through the
    steps; each step's outer loss sees the buffers of that step.

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> hg = hf.greedy_accumulate(0.9)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    refuse_loop(gamma, "hf.greedy_accumulate(gamma)")
    gamma = check_gamma(gamma)

    def algorithm(bound: Bound) -> Outcome:
        s = bound.initial()
        carry = (s, *bound.zero_cotangent(), zeros_like(s))
        b, (s, acc_h, acc_d, acc_s0) = bound.scan("greedy", body, bound.buffers, carry, 0, bound.loop.steps)
        loss, _, direct = bound.outer_vjp(s, b)
        return Outcome(direct.plus(HyperCotangent(acc_h, acc_d)), loss, s, b, acc_s0)

    def body(bound: Bound, b: Any, t: Any, s: Leaves, acc_h: Leaves, acc_d: Leaves, acc_s0: Leaves) -> tuple:
        acc = Accumulator(HyperCotangent(acc_h, acc_d), acc_s0)
        s, b, acc, _, _ = greedy_step(bound, s, b, t, acc, gamma, False)
        return b, s, acc.cot.h, acc.cot.d, acc.s0

    def transform(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
        return make_transform(algorithm, f"greedy_accumulate({gamma})", loop, outer_loss, segmented=True)

    return transform


def accumulating(loop: InnerLoop, outer_loss: Loss, gamma: float) -> Online:
    r"""Online accumulation: emit :math:`\partial_\lambda L_{out}(w_t) + h_t`,
    :math:`h_t = \gamma h_{t-1} + \alpha_t B_t`.

    The accumulator is a TensorDict keyed like the hyperparameters (a renamed or missing key is an
    error, never another key's accumulator); ``prepare`` runs on each step's batch and its VJP
    is taken in that step."""
    session = Session.of(loop, outer_loss)

    def init(hparams, params0, buffers=None) -> OnlineState:
        return session.start(hparams, params0, buffers, lambda inputs, s0: build(inputs.hkeys, zeros_like(inputs.h)))

    def step(state, hparams, batch, outer_batch, t):
        bound, s, t = session.bind(state, hparams, batch, outer_batch, t)
        session.check_extra(state, isinstance(state.extra, TensorDictBase), "an accumulating online method")
        check_same_keys(state.extra, bound.hkeys, "state.extra (the accumulator)", "hparams")
        previous = HyperCotangent(tuple(x.detach() for x in leaves_of(state.extra, bound.hkeys)), bound.zeros_d())
        s, b, acc, loss, direct = greedy_step(
            bound, s, bound.buffers, t, Accumulator(previous, zeros_like(s)), gamma, True
        )
        acc_h = bound.to_hparams(acc.cot)
        result = bound.finish(Outcome(HyperCotangent(add(direct.h, acc_h), ()), loss, s, b, InitTerm.ABSENT))
        return result, session.state(bound, s, b, t, build(bound.hkeys, acc_h))

    return Online(init, step)


def online_one_step(loop: InnerLoop, outer_loss: Loss) -> Online:
    r"""Online one-step lookahead (Luketina et al. 2016): after step ``t`` emit
    :math:`\partial_\lambda L_{out}(w_t) + \alpha_t B_t`, with :math:`B_t` at :math:`s_{t-1}`.

    Cost per step: one step VJP and one outer gradient; memory O(|s|).

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> opt = hf.online.one_step(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    return accumulating(loop, outer_loss, 0.0)


def online_greedy_accumulate(gamma: float) -> Callable[[InnerLoop, Loss], Online]:
    r"""Online greedy accumulation (Yakovlev 2024, Eq. 6): after step ``t`` emit
    :math:`\partial_\lambda L_{out}(w_t) + h_t`, :math:`h_t = \gamma h_{t-1} + \alpha_t B_t`.

    With the hyperparameters held fixed, the emission after step ``T`` equals
    :func:`hyperfunc.greedy_accumulate`. Cost per step: one step VJP and one outer gradient
    (plus one VJP of ``prepare``); memory O(|s| + H).

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> opt = hf.online.greedy_accumulate(0.9)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    refuse_loop(gamma, "hf.greedy_accumulate(gamma)")
    gamma = check_gamma(gamma)
    return lambda loop, outer_loss: accumulating(loop, outer_loss, gamma)
