"""One hypergradient call's inputs in flat form, shared by every transform.

A transform sees the inner problem as pure functions of flat tuples: the hyperparameter leaves
``h``, the floating leaves ``d`` of the prepared inner batches, and the optimizer state ``s``.
``prepare`` and a callable ``params0`` are evaluated once, with their VJP (or JVP) kept, so each
transform pulls its cotangents back through them exactly once.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
import torch.utils._pytree as pytree
from tensordict import TensorDictBase

from .._tree import Keys, Leaves, add, build, check_same_keys, check_tensordict, keys_of, leaves_of
from ..loop import InnerLoop, Loss, call_loss


class HyperGrad(NamedTuple):
    """What a hypergradient function returns.

    Attributes:
        grads: the hypergradient, a TensorDict with exactly the keys and shapes of ``hparams``.
        loss: the outer loss at the final inner params (scalar tensor).
        params: the final inner params :math:`w_T` (TensorDict).
    """

    grads: TensorDictBase
    loss: torch.Tensor
    params: TensorDictBase


def check_int(value: Any, name: str, low: int) -> int:
    """Raise unless ``value`` is an integer ``>= low``; return it as an int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_transform_args(loop: Any, outer_loss: Any) -> None:
    if not isinstance(loop, InnerLoop):
        raise TypeError(f"loop must be a hyperfunc.InnerLoop, got {type(loop).__name__}")
    if not callable(outer_loss):
        raise TypeError(f"outer_loss must be a function (params, hparams, batch) -> scalar, got {outer_loss!r}")


@dataclass(frozen=True)
class Problem:
    """The flat view of ``hg(hparams, params0, inner_batches, outer_batch)`` for one call."""

    loop: InnerLoop
    outer_loss: Loss
    hkeys: Keys
    pkeys: Keys
    h: Leaves
    params0: Any
    batches: Any
    outer_batch: Any

    @classmethod
    def bind(
        cls, loop: InnerLoop, outer_loss: Loss, hparams: Any, params0: Any, inner_batches: Any, outer_batch: Any
    ) -> Problem:
        """Validate the inputs of a hypergradient call and flatten them (inputs are detached, never mutated)."""
        check_tensordict(hparams, "hparams")
        hparams = hparams.detach()
        loop.check_batches(inner_batches)
        if callable(params0) and not isinstance(params0, TensorDictBase):
            p0 = params0(hparams)
            check_tensordict(p0, "params0(hparams)")
        elif isinstance(params0, TensorDictBase):
            check_tensordict(params0, "params0")
            params0 = p0 = params0.detach()
        else:
            raise TypeError(
                f"params0 must be a TensorDict or a function hparams -> TensorDict, got {type(params0).__name__}"
            )
        hkeys = keys_of(hparams)
        return cls(loop, outer_loss, hkeys, keys_of(p0), leaves_of(hparams, hkeys), params0, inner_batches, outer_batch)

    # -- pieces as pure functions of flat tuples ----------------------------------------------
    def hparams(self, h: Leaves) -> TensorDictBase:
        return build(self.hkeys, h)

    @property
    def learned_init(self) -> bool:
        """True when ``params0`` is a function of the hyperparameters."""
        return not isinstance(self.params0, TensorDictBase)

    def init_state(self, h: Leaves) -> Leaves:
        r"""The flat initial state :math:`s_0 = \text{opt.init}(w_0(\lambda))`."""
        if self.learned_init:
            p0 = self.params0(self.hparams(h))
            check_same_keys(p0, self.pkeys, "params0(hparams)", "its first evaluation")
        else:
            p0 = self.params0
        return self.loop.optimizer.init_leaves(leaves_of(p0, self.pkeys))

    def run(self, s: Leaves, h: Leaves, batches: Any, start: int, stop: int) -> Leaves:
        """Inner steps ``start..stop-1`` from state ``s``."""
        return self.loop.run_leaves(self.pkeys, s, self.hparams(h), batches, start, stop)

    def step_on(self, s: Leaves, h: Leaves, batch: Any, t: int) -> Leaves:
        """One inner step (optimizer step index ``t``) from ``s`` on an explicit ``batch``."""
        return self.loop.step_leaves(self.pkeys, s, self.hparams(h), batch, t)

    def outer(self, s: Leaves, h: Leaves) -> torch.Tensor:
        r""":math:`L_{out}(w, \lambda; D_{val})` for the params held in state ``s``."""
        params = build(self.pkeys, s[: len(self.pkeys)])
        return call_loss(self.outer_loss, "outer_loss", params, self.hparams(h), self.outer_batch)

    def result(self, grads: Leaves, loss: torch.Tensor, s: Leaves) -> HyperGrad:
        return HyperGrad(build(self.hkeys, grads), loss, build(self.pkeys, s[: len(self.pkeys)]))

    def step_vjp(self, prep: Prepared, s: Leaves, h: Leaves, start: int, stop: int):
        """Steps ``start..stop-1`` from ``s`` and the VJP of that map in ``(s, h, d)``."""
        return torch.func.vjp(lambda s, h, d: self.run(s, h, prep.rebuild(d), start, stop), s, h, prep.d)

    def initial(self) -> tuple[Leaves, Optional[Callable]]:
        """``s_0`` and, for a learned initialization, the VJP of ``h ↦ s_0``."""
        if self.learned_init:
            return torch.func.vjp(self.init_state, self.h)
        return self.init_state(self.h), None

    def finish(self, prep: Prepared, ct_h: Leaves, ct_d: Leaves, ct_s0: Optional[Leaves], init_vjp) -> Leaves:
        """Add the terms through ``w_0(λ)`` (cotangent ``ct_s0`` on ``s_0``) and through ``prepare``."""
        if init_vjp is not None and ct_s0 is not None:
            ct_h = add(ct_h, init_vjp(ct_s0)[0])
        return prep.to_hparams(ct_h, ct_d)

    # -- prepared batches ----------------------------------------------------------------------
    def prepared(self) -> Prepared:
        """Evaluate ``prepare`` once, keeping its VJP (identity when the loop has no ``prepare``)."""
        if self.loop.prepare is None:
            return Prepared((), lambda d: self.batches, None)
        fn, rebuild_with = self.prepare_fn()
        d, vjp_fn, others = torch.func.vjp(fn, self.h, has_aux=True)
        return Prepared(d, rebuild_with(others), vjp_fn)

    def prepare_fn(self) -> tuple[Callable, Callable]:
        """``fn(h) -> (d, others)``: the floating leaves of prepare's output and its other tensors
        (returned as ``aux`` of a VJP/JVP); ``rebuild_with(others)(d)`` reassembles the batches."""
        layout: list = []

        def fn(h: Leaves):
            out = self.loop.prepared(self.hparams(h), self.batches)
            leaves, spec = pytree.tree_flatten(out)
            diff = [torch.is_tensor(x) and x.is_floating_point() for x in leaves]
            layout[:] = [spec, diff, [None if f else x for x, f in zip(leaves, diff)]]
            others = tuple(x for x, f in zip(leaves, diff) if not f and torch.is_tensor(x))
            return tuple(x for x, f in zip(leaves, diff) if f), others

        def rebuild_with(others: Leaves) -> Callable[[Leaves], Any]:
            def rebuild(d: Leaves) -> Any:
                spec, diff, fixed = layout
                floats, rest = iter(d), iter(others)
                leaves = [next(floats) if f else next(rest) if torch.is_tensor(x) else x for x, f in zip(fixed, diff)]
                return pytree.tree_unflatten(leaves, spec)

            return rebuild

        return fn, rebuild_with


class Prepared(NamedTuple):
    """The prepared inner batches: floating leaves ``d``, ``rebuild(d) -> batches``, and prepare's VJP."""

    d: Leaves
    rebuild: Callable[[Leaves], Any]
    vjp: Optional[Callable]

    def to_hparams(self, ct_h: Leaves, ct_d: Leaves) -> Leaves:
        """A cotangent on ``(h, d)`` as one on ``h``: ``ct_h`` plus ``ct_d`` pulled back through ``prepare``."""
        return ct_h if self.vjp is None else add(ct_h, self.vjp(ct_d)[0])
