r"""Online hypergradients: an ``init``/``step`` pair that emits a hypergradient after every inner step.

Offline transforms return one hypergradient after ``T`` inner steps. Online ones let the
hyperparameters change *during* the inner optimization (HyperDistill's Algorithm 3, one-step
lookahead, real-time recurrent learning)::

    opt = hf.online.distill(0.99, theta=1.0)(loop, outer_loss)
    state = opt.init(hparams, params0)
    for t in range(T):
        res, state = opt.step(state, hparams, batch_t, outer_batch, t)
        updates, meta_state = meta_opt.update(res.grads, meta_state, params=hparams)
        hparams = torchopt.apply_updates(hparams, updates, inplace=False)

``state`` is a :class:`OnlineState` of tensors and TensorDicts only, so ``init`` and ``step`` can be
vmapped over a meta-batch of tasks. ``t`` is the 0-based index of the inner step that ``step``
takes (a Python int: it fixes the optimizer's step count and the subsampling sizes). Each call
runs the loop's ``prepare`` on that step's batch alone (as with ``full_batch=True``) and pulls
its cotangent back immediately. ``params0`` must be a TensorDict: an initialization learned by
hypergradient needs the offline transforms (or Reptile, as HyperDistill does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase

from ._tree import Leaves, add, check_tensordict, keys_of, leaves_of, scale, zeros_like
from .loop import InnerLoop, Loss
from .transforms._problem import HyperGrad, Prepared, Problem, check_int, check_transform_args
from .transforms.distill import (
    Distilled,
    batch_size,
    check_seed,
    check_theta,
    distilled_vjp,
    horizon,
    keep_count,
    merge,
)
from .transforms.forward import ForwardProblem, ForwardState
from .transforms.greedy import check_gamma, greedy_step
from .transforms.langevin import check_langevin_args, sampler
from .transforms.reverse import interpolate

__all__ = ["Online", "OnlineState", "distill", "forward", "greedy_accumulate", "langevin", "one_step"]


class OnlineState(NamedTuple):
    """The state between online steps.

    Attributes:
        inner: the inner optimizer's state TensorDict ``{"params", <buffers>, "step"}``.
        extra: the method's running quantities (tensors), e.g. the accumulated hypergradient.
    """

    inner: TensorDictBase
    extra: Any


class Online(NamedTuple):
    """``init(hparams, params0) -> state`` and
    ``step(state, hparams, batch, outer_batch, t) -> (HyperGrad, state)``."""

    init: Callable[[TensorDictBase, TensorDictBase], OnlineState]
    step: Callable[[OnlineState, TensorDictBase, Any, Any, int], tuple[HyperGrad, OnlineState]]


def _start(loop: InnerLoop, hparams: Any, params0: Any) -> TensorDictBase:
    check_tensordict(hparams, "hparams")
    if not isinstance(params0, TensorDictBase):
        raise TypeError(
            "online methods need params0 as a TensorDict (the hyperparameters change during the inner run, so "
            f"an initialization learned by hypergradient needs an offline transform), got {type(params0).__name__}"
        )
    check_tensordict(params0, "params0")
    return loop.optimizer.init(params0.detach())


class _Step(NamedTuple):
    """One online step bound to its inputs: the problem on this step's batch, and the flat state."""

    problem: Problem
    prep: Prepared
    s: Leaves
    t: int

    @classmethod
    def bind(cls, loop: InnerLoop, outer_loss: Loss, state: Any, hparams: Any, batch: Any, outer_batch: Any, t: Any):
        if not isinstance(state, OnlineState):
            raise TypeError(f"state must be the OnlineState returned by init or step, got {type(state).__name__}")
        t = check_int(t, "t", 0)
        one = dataclasses.replace(loop, full_batch=True)
        problem = Problem.bind(one, outer_loss, hparams, state.inner.get("params"), batch, outer_batch)
        return cls(problem, problem.prepared(), loop.optimizer.state_leaves(state.inner, problem.pkeys), t)

    def state(self, s: Leaves, extra: Any) -> OnlineState:
        inner = self.problem.loop.optimizer.state_dict(s, self.problem.pkeys, self.t + 1)
        return OnlineState(inner, extra)


def _accumulating(loop: InnerLoop, outer_loss: Loss, gamma: float) -> Online:
    r"""Emit :math:`\partial_\lambda L_{out}(w_t) + h_t` with :math:`h_t = \gamma h_{t-1} + \alpha_t B_t`."""
    check_transform_args(loop, outer_loss)

    def init(hparams, params0) -> OnlineState:
        inner = _start(loop, hparams, params0)
        return OnlineState(inner, zeros_like(leaves_of(hparams, keys_of(hparams))))

    def step(state, hparams, batch, outer_batch, t):
        b = _Step.bind(loop, outer_loss, state, hparams, batch, outer_batch, t)
        acc = (tuple(x.detach() for x in state.extra), zeros_like(b.prep.d), zeros_like(b.s))
        s, (acc_h, acc_d, _), loss, direct = greedy_step(b.problem, b.prep, b.s, b.t, acc, gamma, True)
        acc_h = b.prep.to_hparams(acc_h, acc_d)
        return b.problem.result(add(direct, acc_h), loss, s), b.state(s, acc_h)

    return Online(init, step)


def one_step(loop: InnerLoop, outer_loss: Loss) -> Online:
    r"""Online one-step lookahead (Luketina et al. 2016): after step ``t`` emit
    :math:`\partial_\lambda L_{out}(w_t) + \alpha_t B_t`, with :math:`B_t` at :math:`s_{t-1}`.

    Cost per step: one step VJP and one outer gradient; memory O(|s|).

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> opt = hf.online.one_step(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    return _accumulating(loop, outer_loss, 0.0)


def greedy_accumulate(gamma: float) -> Callable[[InnerLoop, Loss], Online]:
    r"""Online greedy accumulation (Yakovlev 2024, Eq. 6): after step ``t`` emit
    :math:`\partial_\lambda L_{out}(w_t) + h_t`, :math:`h_t = \gamma h_{t-1} + \alpha_t B_t`.

    With the hyperparameters held fixed, the emission after step ``T`` equals
    :func:`hyperfunc.greedy_accumulate`. Cost per step: one step VJP and one outer gradient
    (plus one VJP of ``prepare``); memory O(|s| + H).

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> opt = hf.online.greedy_accumulate(0.9)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    gamma = check_gamma(gamma)
    return lambda loop, outer_loss: _accumulating(loop, outer_loss, gamma)


def langevin(tau: float, seed: int | None = None) -> Callable[[InnerLoop, Loss], Online]:
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
    tau, seed = check_langevin_args(tau, seed)
    return lambda loop, outer_loss: _accumulating(sampler(loop, 1, tau, seed), outer_loss, 1.0)


def forward(loop: InnerLoop, outer_loss: Loss) -> Online:
    r"""Online forward mode (real-time recurrent learning; Shaban et al. 2019, Eq. 7): carry
    :math:`Z_t = A_t Z_{t-1} + B_t` and emit :math:`\partial_\lambda L_{out}(w_t) + \alpha_t Z_t` after every step.

    With fixed hyperparameters every emission is the exact hypergradient of the horizon ``t``
    (equal to :func:`hyperfunc.forward` at ``t = T``); when they change, ``Z`` mixes the
    derivatives at past values, as in RTRL. Cost per step: ``H`` JVPs (vmapped); memory O(H·|s|).

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum(), hf.optim.sgd(lr=lambda h: h["lr"]), steps=20)
        >>> opt = hf.online.forward(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    check_transform_args(loop, outer_loss)

    def init(hparams, params0) -> OnlineState:
        inner = _start(loop, hparams, params0)
        H = sum(x.numel() for x in leaves_of(hparams, keys_of(hparams)))
        s = loop.optimizer.state_leaves(inner, keys_of(params0))
        return OnlineState(inner, tuple(x.new_zeros((H, *x.shape)) for x in s))

    def step(state, hparams, batch, outer_batch, t):
        b = _Step.bind(loop, outer_loss, state, hparams, batch, outer_batch, t)
        fp = ForwardProblem.bind(b.problem)
        new = fp.step(ForwardState(b.t, b.s, state.extra))
        grads, loss = fp.hypergrad(new)
        return b.problem.result(grads, loss, new.s), b.state(new.s, new.Z)

    return Online(init, step)


def distill(gamma: float, theta: Any, seed: int = 0) -> Callable[[InnerLoop, Loss], Online]:
    r"""Online HyperDistill (Lee et al. 2022, Algorithm 3): after step ``t`` emit

    .. math::
        g_t = \partial_\lambda L_{out}(w_t) + \theta\,\frac{1-\gamma^t}{1-\gamma}\, v_t, \qquad
        v_t = \alpha_t\, \partial\Phi(s^*_t, \lambda; D^*_t)/\partial\lambda,

    carrying the distilled state :math:`s^*_t` (Eq. 13) and the distilled batch :math:`D^*_t`
    (Eq. 14, kept as data: ``n`` examples) in the state. ``theta`` is fixed here; refresh it every
    ``N`` inner optimizations with :func:`hyperfunc.linear_estimation` (Algorithm 4; the paper uses
    N = 50) and build a new online transform with it. With fixed hyperparameters the emission after
    step ``T`` equals :func:`hyperfunc.distill` ``(gamma, theta, seed)``; ``gamma = 0, theta = 1`` is
    :func:`one_step`.

    Cost per step: one step VJP, one outer gradient and one distilled VJP (plus ``prepare`` on the
    distilled batch); memory O(|s| + H + n).

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> opt = hf.online.distill(0.9, theta=1.0)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    gamma, seed, theta = check_gamma(gamma), check_seed(seed), check_theta(theta)

    def transform(loop: InnerLoop, outer_loss: Loss) -> Online:
        check_transform_args(loop, outer_loss)

        def init(hparams, params0) -> OnlineState:
            inner = _start(loop, hparams, params0)
            return OnlineState(inner, (loop.optimizer.state_leaves(inner, keys_of(params0)), ()))

        def step(state, hparams, batch, outer_batch, t):
            b = _Step.bind(loop, outer_loss, state, hparams, batch, outer_batch, t)
            s_star, D_star = state.extra
            p = gamma * horizon(gamma, b.t) / horizon(gamma, b.t + 1)
            s_star = b.s if b.t == 0 else interpolate(s_star, b.s, 1.0 - p)
            if b.t > 0 and not loop.full_batch:
                D_star = merge(D_star, batch, keep_count(batch_size(batch, "batch"), p), seed, b.t, 0)
            else:
                D_star = batch
            s = b.problem.step_on(b.s, b.problem.h, b.prep.rebuild(b.prep.d), b.t)
            loss, outer_vjp = torch.func.vjp(b.problem.outer, s, b.problem.h)
            alpha, direct = outer_vjp(torch.ones_like(loss))
            star = Problem.bind(b.problem.loop, outer_loss, hparams, state.inner.get("params"), D_star, outer_batch)
            star_prep = star.prepared()
            v = star_prep.to_hparams(*distilled_vjp(star, star_prep, Distilled(s_star, None), b.t, alpha))
            grads = add(direct, scale(theta * horizon(gamma, b.t + 1), v))
            return b.problem.result(grads, loss, s), b.state(s, (s_star, D_star))

        return Online(init, step)

    return transform
