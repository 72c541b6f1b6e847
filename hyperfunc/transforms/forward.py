r"""Forward-mode hypergradient (real-time recurrent learning; Shaban et al. 2019, Eq. 7)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils._pytree as pytree
from torch.func import jvp, vmap

from .._tree import Leaves
from ..loop import InnerLoop, Loss
from ._problem import HyperGrad, Problem, check_transform_args
from .reverse import HyperGradFn


def _first(outputs: tuple, *positions: int) -> tuple:
    """Row 0 of the outputs at ``positions`` of a vmap over tangent directions.

    The primal outputs of a vmapped JVP do not depend on the tangent, so every row is the same;
    they are returned batched (``out_dims=None`` fails when an enclosing ``vmap`` batches them).
    """
    return tuple(pytree.tree_map(lambda x: x[0], out) if i in positions else out for i, out in enumerate(outputs))


class ForwardState(NamedTuple):
    """State of forward-mode propagation after ``t`` inner steps.

    ``Z`` holds :math:`Z_t = ds_t/d\\lambda`, one leading row per scalar hyperparameter.
    """

    t: int
    s: Leaves
    Z: Leaves


def basis(h: Leaves) -> Leaves:
    """The standard basis of the hyperparameter space: leaf ``i`` has shape ``(H, *h[i].shape)``."""
    numels = [x.numel() for x in h]
    eye = torch.eye(sum(numels), dtype=h[0].dtype, device=h[0].device)
    return tuple(block.reshape(-1, *x.shape) for block, x in zip(eye.split(numels, dim=1), h))


class ForwardProblem(NamedTuple):
    """A problem bound for forward mode: the basis ``E`` and the prepared batches with tangents."""

    problem: Problem
    E: Leaves
    d: Leaves
    Zd: Leaves
    rebuild: object

    @classmethod
    def bind(cls, problem: Problem) -> ForwardProblem:
        h, E = problem.h, basis(problem.h)
        if problem.loop.prepare is None:
            return cls(problem, E, (), (), lambda d: problem.batches)
        fn, rebuild_with = problem.prepare_fn()
        d, Zd, others = _first(vmap(lambda e: jvp(fn, (h,), (e,), has_aux=True))(E), 0, 2)
        return cls(problem, E, d, Zd, rebuild_with(others))

    def init(self) -> ForwardState:
        r""":math:`s_0` and :math:`Z_0 = ds_0/d\lambda` (zero unless ``params0`` is learned)."""
        p, h = self.problem, self.problem.h
        if p.learned_init:
            s, Z = _first(vmap(lambda e: jvp(p.init_state, (h,), (e,)))(self.E), 0)
        else:
            s = p.init_state(h)
            Z = tuple(x.new_zeros((self.E[0].shape[0], *x.shape)) for x in s)
        return ForwardState(0, s, Z)

    def step(self, state: ForwardState) -> ForwardState:
        r""":math:`s_{t+1} = \Phi(s_t)`, :math:`Z_{t+1} = A_{t+1} Z_t + B_{t+1}` by one vmapped JVP."""
        p, t = self.problem, state.t

        def phi(s, h, d):
            return p.run(s, h, self.rebuild(d), t, t + 1)

        s, Z = _first(vmap(lambda z, e, zd: jvp(phi, (state.s, p.h, self.d), (z, e, zd)))(state.Z, self.E, self.Zd), 0)
        return ForwardState(t + 1, s, Z)

    def hypergrad(self, state: ForwardState) -> tuple[Leaves, torch.Tensor]:
        r""":math:`\partial_\lambda L_{out}(w_t) + \alpha_t Z_t`, reshaped like the hyperparameters."""
        p = self.problem
        loss, g = _first(vmap(lambda z, e: jvp(p.outer, (state.s, p.h), (z, e)))(state.Z, self.E), 0)
        numels = [x.numel() for x in p.h]
        return tuple(block.reshape(x.shape) for block, x in zip(g.split(numels), p.h)), loss


def forward(loop: InnerLoop, outer_loss: Loss) -> HyperGradFn:
    r"""Exact hypergradient by forward-mode differentiation (Shaban et al. 2019, Eq. 7).

    Propagates the total derivative of the state with respect to the hyperparameters,

    .. math::
        Z_0 = \frac{ds_0}{d\lambda}, \qquad Z_t = A_t Z_{t-1} + B_t, \qquad
        \frac{dF}{d\lambda} = \partial_\lambda L_{out}(w_T) + \alpha_T Z_T,

    with one ``torch.func.jvp`` of the step map per step, vmapped over the ``H`` basis directions
    of the hyperparameter space. Equal to :func:`unroll` to rounding error.

    Cost: ``T·H`` Jacobian-vector products (batched as ``T`` vmapped JVPs); memory O(H·|s|),
    flat in ``T``. Meant for few hyperparameters (learning rates, a weight decay): for thousands
    of them use a reverse-mode transform.

    Example:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> opt = hf.optim.sgd(lr=lambda h: h["lr"], momentum=0.9)
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum(), opt, steps=10, full_batch=True)
        >>> hg = hf.forward(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
        >>> res = hg(TensorDict({"lr": torch.tensor(0.05)}, []), TensorDict({"w": torch.zeros(3)}, []),
        ...          torch.ones(3), torch.full((3,), 2.0))
        >>> res.grads["lr"].shape
        torch.Size([])
    """
    check_transform_args(loop, outer_loss)

    def hg(hparams, params0, inner_batches, outer_batch) -> HyperGrad:
        fp = ForwardProblem.bind(Problem.bind(loop, outer_loss, hparams, params0, inner_batches, outer_batch))
        state = fp.init()
        for _ in range(loop.steps):
            state = fp.step(state)
        grads, loss = fp.hypergrad(state)
        return fp.problem.result(grads, loss, state.s)

    return hg
