"""What the online variants share: their state, their ``init``/``step`` pair, and binding a step.

Each online variant lives next to its offline transform and is an algorithm over the same
:class:`~hyperfunc.transforms.base.Bound` protocol, bound on one step's batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from tensordict import TensorDictBase

from .._checks import check_int, concrete
from .._tree import Leaves
from ..loop import InnerLoop, Loss
from .base import Bound, HyperGrad, Inputs, check_transform_args


class OnlineState(NamedTuple):
    """The state between online steps.

    Attributes:
        inner: the inner optimizer's state TensorDict ``{"params", <buffers>, "step"}``.
        extra: the method's running quantities (tensors), e.g. the accumulated hypergradient.
        buffers: the module buffers, carried like the params (``()`` when ``init`` got none).
    """

    inner: TensorDictBase
    extra: Any
    buffers: Any = ()


class Online(NamedTuple):
    """``init(hparams, params0, buffers=None) -> state`` and
    ``step(state, hparams, batch, outer_batch, t) -> (HyperGrad, state)``."""

    init: Callable[..., OnlineState]
    step: Callable[[OnlineState, TensorDictBase, Any, Any, int], tuple[HyperGrad, OnlineState]]


class Session(NamedTuple):
    """A loop and outer loss checked once for online use (the loop reads one batch per step)."""

    loop: InnerLoop
    outer_loss: Loss

    @classmethod
    def of(cls, loop: Any, outer_loss: Any) -> Session:
        check_transform_args(loop, outer_loss)
        return cls(dataclasses.replace(loop, full_batch=True), outer_loss)

    def start(self, hparams: Any, params0: Any, buffers: Any, extra: Callable[[Inputs, Leaves], Any]) -> OnlineState:
        """Validate the inputs once and build the first state, with ``extra(inputs, s_0)`` as running quantities
        (``inputs``: the validated :class:`~.base.Inputs`; ``s_0``: the flat initial optimizer state)."""
        if not isinstance(params0, TensorDictBase):
            raise TypeError(
                "online methods need params0 as a TensorDict (the hyperparameters change during the inner run, so "
                "an initialization learned by hypergradient needs an offline transform, or hf.reptile outside), "
                f"got {type(params0).__name__}"
            )
        inputs = Inputs.of(hparams, params0, buffers)
        inner = self.loop.optimizer.init(inputs.p0)
        s0 = self.loop.optimizer._state_leaves(inner, inputs.pkeys)
        return OnlineState(inner, extra(inputs, s0), inputs.buffers)

    def bind(self, state: Any, hparams: Any, batch: Any, outer_batch: Any, t: Any) -> tuple[Bound, Leaves, int]:
        """The problem of one step (``t`` 0-based) on its batch, and the flat optimizer state."""
        if not isinstance(state, OnlineState):
            raise TypeError(f"state must be the OnlineState returned by init or step, got {type(state).__name__}")
        t = check_int(t, "t", 0)
        taken = state.inner.get("step")
        if concrete(taken) and int(taken) != t:
            raise ValueError(
                f"t={t}, but this state has taken {int(taken)} inner steps: pass t = the 0-based index of the step "
                "being taken (restarting t resets Adam's bias correction and the distillation weights)"
            )
        params = state.inner.get("params")
        bound = Bound.bind(self.loop, self.outer_loss, hparams, params, batch, outer_batch, state.buffers)
        return bound, self.loop.optimizer._state_leaves(state.inner, bound.pkeys), t

    @staticmethod
    def check_extra(state: OnlineState, fits: bool, method: str) -> None:
        """Raise unless ``state.extra`` has the form this method's ``init`` gives it."""
        if not fits:
            raise TypeError(
                f"state.extra is not the running state of {method} ({type(state.extra).__name__}): pass the state "
                f"returned by this transform's init or step, not another method's"
            )

    def state(self, bound: Bound, s: Leaves, b: Any, t: int, extra: Any) -> OnlineState:
        """The state after step ``t``."""
        return OnlineState(self.loop.optimizer._state_dict(s, bound.pkeys, t + 1), extra, b)
