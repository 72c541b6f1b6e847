r"""Forward-mode hypergradient (real-time recurrent learning; Shaban et al. 2019, Eq. 7)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.func import jvp, vmap

from .._torch import tree_map
from .._tree import Leaves
from ..loop import InnerLoop, Loss
from ._executor import Prepared
from ._online import Online, OnlineState, Session
from ._primitives import prepare
from .base import Bound, HyperCotangent, HyperGradFunction, InitTerm, Inputs, Outcome, make_transform


def _first(outputs: tuple, *positions: int) -> tuple:
    """Row 0 of the outputs at ``positions`` of a vmap over tangent directions.

    The primal outputs of a vmapped JVP do not depend on the tangent, so every row is the same;
    they are returned batched (``out_dims=None`` fails when an enclosing ``vmap`` batches them).
    """
    return tuple(tree_map(lambda x: x[0], out) if i in positions else out for i, out in enumerate(outputs))


class ForwardState(NamedTuple):
    r"""State of forward-mode propagation after ``t`` inner steps.

    ``Z`` holds :math:`Z_t = ds_t/d\lambda`, one leading row per scalar hyperparameter; ``b`` the
    module buffers (carried, never differentiated).
    """

    t: int
    s: Leaves
    b: Any
    Z: Leaves


def basis(h: Leaves) -> Leaves:
    """The standard basis of the hyperparameter space: leaf ``i`` has shape ``(H, *h[i].shape)``."""
    numels = [x.numel() for x in h]
    eye = torch.eye(sum(numels), dtype=h[0].dtype, device=h[0].device)
    return tuple(block.reshape(-1, *x.shape) for block, x in zip(eye.split(numels, dim=1), h))


class Tangents(NamedTuple):
    """A bound problem linearized for forward mode: the basis ``E`` of the hyperparameters and the
    tangents ``Zd = dd/dλ`` of the prepared floats ``d`` (``prepare`` pushed forward once, its result
    the ``bound``'s prepared batches)."""

    bound: Bound
    E: Leaves
    Zd: Leaves

    @classmethod
    def of(cls, bound: Bound) -> Tangents:
        h, E = bound.h, basis(bound.h)
        if bound.loop.prepare is None:
            return cls(bound, E, ())
        layout: list = []

        def fn(h: Leaves) -> tuple:
            return prepare(bound.loop, bound.hkeys, h, bound.batches, layout)

        d, Zd, others = _first(vmap(lambda e: jvp(fn, (h,), (e,), has_aux=True))(E), 0, 2)
        return cls(bound.with_prepared(Prepared(d, others, layout[0], None)), E, Zd)

    def init(self, s: Leaves, b: Any, t: int = 0) -> ForwardState:
        r"""The state ``s`` (:math:`s_0`, or the online API's current state) with :math:`Z_0 = ds_0/d\lambda`:
        zero unless ``params0`` is learned and its exact term is asked for."""
        bound = self.bound
        if bound.learned_init and bound.exact_init:
            Z = vmap(bound.init_jvp)(self.E)
        else:
            Z = tuple(x.new_zeros((self.E[0].shape[0], *x.shape)) for x in s)
        return ForwardState(t, s, b, Z)

    def advance(self, state: ForwardState, stop: int) -> ForwardState:
        r"""Steps ``t..stop-1``: :math:`s_{t+1} = \Phi(s_t)`, :math:`Z_{t+1} = A_{t+1} Z_t + B_{t+1}`
        (:meth:`Bound.run_jvp`: one VJP per step, transposed for all ``H`` directions)."""
        s, b, Z = self.bound.run_jvp(state.s, state.b, state.Z, self.E, self.Zd, state.t, stop)
        return ForwardState(stop, s, b, Z)

    def hypergrad(self, state: ForwardState) -> tuple[Leaves, torch.Tensor]:
        r""":math:`\partial_\lambda L_{out}(w_t) + \alpha_t Z_t`, reshaped like the hyperparameters (one outer VJP)."""
        bound = self.bound
        loss, alpha, direct = bound.outer_vjp(state.s, state.b)
        # α_t Z_t, one entry per direction
        chain = sum((z * a).reshape(len(z), -1).sum(1) for z, a in zip(state.Z, alpha))
        numels = [x.numel() for x in bound.h]
        return tuple(g + c.reshape(g.shape) for g, c in zip(direct.h, chain.split(numels))), loss


def forward_pass(bound: Bound) -> Outcome:
    """Forward mode over all ``T`` steps; the ``prepare`` and ``w_0`` terms are inside the tangents."""
    fp = Tangents.of(bound)
    state = fp.advance(fp.init(bound.initial(), bound.buffers), bound.loop.steps)
    grads, loss = fp.hypergrad(state)
    init = InitTerm.INCLUDED if bound.exact_init else InitTerm.ABSENT
    return Outcome(HyperCotangent(grads, ()), loss, state.s, state.b, init)


def forward(loop: InnerLoop, outer_loss: Loss) -> HyperGradFunction:
    r"""Exact hypergradient by forward-mode differentiation (Shaban et al. 2019, Eq. 7).

    Propagates the total derivative of the state with respect to the hyperparameters,

    .. math::
        Z_0 = \frac{ds_0}{d\lambda}, \qquad Z_t = A_t Z_{t-1} + B_t, \qquad
        \frac{dF}{d\lambda} = \partial_\lambda L_{out}(w_T) + \alpha_T Z_T,

    with the products :math:`A_t Z_{t-1} + B_t` for all ``H`` basis directions of the hyperparameter
    space from one VJP of the step map per step, transposed (reverse-over-reverse: the VJP is
    linear in its cotangent, so its own VJP is the JVP; ``torch.func.jvp`` of a step holding a
    gradient does not compile under an outer ``vmap``). Equal to :func:`unroll` to rounding error.

    Cost: ``T`` step VJPs plus ``T·H`` transposed products (vmapped over the directions) and one
    outer VJP; memory O(H·|s|) plus one step's graph, flat in ``T``. Meant for few hyperparameters
    (learning rates, a weight decay): for thousands of them use a reverse-mode transform. Module
    buffers are carried with the primal state (no tangent).

    Examples:
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
    return make_transform(forward_pass, "forward", loop, outer_loss, segmented=True)


def online_forward(loop: InnerLoop, outer_loss: Loss) -> Online:
    r"""Online forward mode (real-time recurrent learning; Shaban et al. 2019, Eq. 7): carry
    :math:`Z_t = A_t Z_{t-1} + B_t` and emit :math:`\partial_\lambda L_{out}(w_t) + \alpha_t Z_t` after every step.

    With fixed hyperparameters every emission is the exact hypergradient of the horizon ``t``
    (equal to :func:`hyperfunc.forward` at ``t = T``); when they change, ``Z`` mixes the
    derivatives at past values, as in RTRL. Cost per step: one step VJP, ``H`` transposed products
    (vmapped) and one outer VJP; memory O(H·|s|).

    Examples:
        >>> import hyperfunc as hf
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum(), hf.optim.sgd(lr=lambda h: h["lr"]), steps=20)
        >>> opt = hf.online.forward(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    """
    session = Session.of(loop, outer_loss)

    def zero_tangents(inputs: Inputs, s0: Leaves) -> Leaves:
        H = sum(x.numel() for x in inputs.h)
        return tuple(x.new_zeros((H, *x.shape)) for x in s0)

    def init(hparams, params0, buffers=None) -> OnlineState:
        return session.start(hparams, params0, buffers, zero_tangents)

    def step(state, hparams, batch, outer_batch, t):
        bound, s, t = session.bind(state, hparams, batch, outer_batch, t)
        H = sum(x.numel() for x in bound.h)
        fits = isinstance(state.extra, tuple) and len(state.extra) == len(s)
        fits = fits and all(torch.is_tensor(z) and z.shape == (H, *x.shape) for z, x in zip(state.extra, s))
        session.check_extra(state, fits, f"online forward with {H} scalar hyperparameters")
        fp = Tangents.of(bound)
        new = fp.advance(ForwardState(t, s, bound.buffers, state.extra), t + 1)
        grads, loss = fp.hypergrad(new)
        result = bound.finish(Outcome(HyperCotangent(grads, ()), loss, new.s, new.b, InitTerm.ABSENT))
        return result, session.state(bound, new.s, new.b, t, new.Z)

    return Online(init, step)
