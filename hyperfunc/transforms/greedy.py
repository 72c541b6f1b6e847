r"""Greedy accumulation of per-step hypergradients (Yakovlev 2024, Eq. 6)."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .._tree import Leaves, add, scale, zeros_like
from ..loop import InnerLoop, Loss
from ._problem import HyperGrad, Prepared, Problem, check_transform_args
from .reverse import HyperGradFn, Transform


def check_gamma(gamma: Any, name: str = "gamma") -> float:
    if not isinstance(gamma, numbers.Real) or isinstance(gamma, bool):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(gamma).__name__}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {gamma}")
    return float(gamma)


def greedy_step(problem: Problem, prep: Prepared, s: Leaves, t: int, acc: tuple, gamma: float, with_direct: bool):
    r"""One inner step ``s_{t+1} = Φ(s_t)`` and the accumulation ``h ← γ h + α_{t+1} B_{t+1}``.

    ``acc = (h, d, s0)``: the accumulated cotangents on the hyperparameters, on the prepared
    batches, and on a learned ``s_0`` (each decays by γ like ``h``). Returns the new state, the
    new accumulators, the outer loss at the new params and, when ``with_direct``, its direct
    gradient in λ (else ``None``: the outer VJP then skips the backward through λ, e.g. through
    an ANIL body that only the last step needs).
    """
    h = problem.h
    s_new, vjp_fn = problem.step_vjp(prep, s, h, t, t + 1)
    if with_direct:
        loss, outer_vjp = torch.func.vjp(problem.outer, s_new, h)
        alpha, direct = outer_vjp(torch.ones_like(loss))
    else:
        loss, outer_vjp = torch.func.vjp(lambda s_: problem.outer(s_, h), s_new)
        (alpha,), direct = outer_vjp(torch.ones_like(loss)), None
    ct_s, ct_h, ct_d = vjp_fn(alpha)
    acc_h, acc_d, acc_s0 = acc
    acc_h = add(scale(gamma, acc_h), ct_h)
    acc_d = add(scale(gamma, acc_d), ct_d)
    acc_s0 = add(scale(gamma, acc_s0), ct_s) if t == 0 else scale(gamma, acc_s0)
    return s_new, (acc_h, acc_d, acc_s0), loss, direct


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
    at the last step); memory O(|s| + H), flat in ``T``.

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=20)
        >>> hg = hf.greedy_accumulate(0.9)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    gamma = check_gamma(gamma)

    def transform(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
        check_transform_args(loop, outer_loss)

        def hg(hparams, params0, inner_batches, outer_batch) -> HyperGrad:
            problem = Problem.bind(loop, outer_loss, hparams, params0, inner_batches, outer_batch)
            prep = problem.prepared()
            s, init_vjp = problem.initial()
            acc = (zeros_like(problem.h), zeros_like(prep.d), zeros_like(s))
            for t in range(loop.steps):
                s, acc, loss, direct = greedy_step(problem, prep, s, t, acc, gamma, t == loop.steps - 1)
            grads = problem.finish(prep, add(direct, acc[0]), acc[1], acc[2], init_vjp)
            return problem.result(grads, loss, s)

        return hg

    return transform
