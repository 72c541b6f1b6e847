r"""HPO-SGLD: hypergradients of an expectation over SGLD samples (Kim & Hospedales, Algorithm 1)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .._tree import add, axpy, scale, zeros_like
from ..loop import InnerLoop, Loss
from ..optim import sgld
from ._problem import HyperGrad, Problem, check_int, check_transform_args
from .reverse import HyperGradFn, Transform


def sampler(loop: InnerLoop, steps: int, tau: float, seed: Optional[int]) -> InnerLoop:
    """The loop re-run as ``steps`` SGLD steps at temperature ``tau`` with the loop's learning rate."""
    opt = loop.optimizer
    plain_sgd = opt.name == "sgd" and not opt.buffers
    if opt.name != "sgld" and not plain_sgd:
        raise ValueError(
            f"langevin needs a loop whose optimizer is plain SGD (no momentum) or hf.optim.sgld, got {opt.name!r}"
            + (" with momentum" if opt.name == "sgd" else "")
            + "; HPO-SGLD's recursion (Eq. 22) is derived for the Langevin update"
        )
    new = sgld(opt.args["lr"], temperature=tau, seed=seed or 0, weight_decay=opt.args.get("weight_decay", 0.0))
    return dataclasses.replace(loop, optimizer=new, steps=steps)


def check_langevin_args(tau: Any, seed: Any) -> tuple[float, Optional[int]]:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or tau < 0:
        raise ValueError(f"tau must be a number >= 0, got {tau!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return float(tau), seed


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
    Hessian-vector product; memory O(|s| + H), flat in ``B + M``.

    Example:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=1)
        >>> hg = hf.langevin(B=50, M=50, tau=1e-3, seed=0)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    B = check_int(B, "B", 1)
    M = check_int(M, "M", 1)
    tau, seed = check_langevin_args(tau, seed)

    def transform(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
        check_transform_args(loop, outer_loss)
        chain = sampler(loop, B + M, tau, seed)

        def hg(hparams, params0, inner_batches, outer_batch) -> HyperGrad:
            problem = Problem.bind(chain, outer_loss, hparams, params0, inner_batches, outer_batch)
            prep = problem.prepared()
            h = problem.h
            s, init_vjp = problem.initial()
            grad_f = torch.func.grad_and_value(problem.outer, argnums=(0, 1))
            # g_m = G_h + G_d·(dd/dλ) + G_0·(dθ_0/dλ); H_* are their averages over the last M samples
            G_h, G_d = zeros_like(h), zeros_like(prep.d)
            G_0 = grad_f(s, h)[0][0] if init_vjp is not None else zeros_like(s)
            H_h, H_d, H_0 = zeros_like(h), zeros_like(prep.d), zeros_like(s)
            for m in range(1, B + M + 1):
                s_new, step_vjp = problem.step_vjp(prep, s, h, m - 1, m)
                (alpha, direct), loss = grad_f(s_new, h)
                ct_s, ct_h, ct_d = step_vjp(alpha)
                G_h, G_d = add(G_h, ct_h), add(G_d, ct_d)
                if init_vjp is not None:
                    delta = axpy(-1.0, s, s_new)
                    hvp = torch.func.jvp(lambda x: grad_f(x, h)[0][0], (s,), (delta,))[1]
                    G_0 = add(G_0, add(hvp, axpy(-1.0, alpha, ct_s)))
                if m > B:
                    H_h = add(H_h, scale(1.0 / M, add(direct, G_h)))
                    H_d, H_0 = add(H_d, scale(1.0 / M, G_d)), add(H_0, scale(1.0 / M, G_0))
                s = s_new
            return problem.result(problem.finish(prep, H_h, H_d, H_0, init_vjp), loss, s)

        return hg

    return transform
