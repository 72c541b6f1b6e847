"""``InnerLoop``: the inner optimization as a pure step map Φ over flat optimizer states."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tensordict import TensorDictBase

from ._checks import takes_at_most
from ._tree import (
    Keys,
    Leaves,
    build,
    check_same_keys,
    check_tensordict,
    key_name,
    keys_of,
    leaves_of,
    tensor_leaves,
    tree_index,
)
from .optim import Optimizer

#: ``loss(params, hparams, batch) -> scalar tensor``, or with module buffers
#: ``loss(params, hparams, batch, buffers) -> (scalar tensor, new_buffers)``; all are TensorDicts.
Loss = Callable[..., Any]


def call_loss(
    fn: Loss, name: str, params: TensorDictBase, hparams: TensorDictBase, batch: Any, buffers: Any = None
) -> tuple[torch.Tensor, Any]:
    """Evaluate a user loss as ``(loss, new_buffers)``, turning mistakes into a clear ``ValueError``.

    Without buffers (``buffers is None``) the loss is ``fn(params, hparams, batch) -> scalar`` and
    ``new_buffers`` is None; with buffers it is ``fn(params, hparams, batch, buffers) -> (scalar,
    new_buffers)``, and the new buffers are detached (module state is never differentiated).
    """
    try:
        out = fn(params, hparams, batch) if buffers is None else fn(params, hparams, batch, buffers)
    except KeyError as err:
        raise ValueError(
            f"{name} looked up a key that is missing: {err}. params has keys {_names(params)}, "
            f"hparams has keys {_names(hparams)}; make params0 and hparams hold every key the loss reads"
        ) from err
    except TypeError as err:
        if buffers is not None and takes_at_most(fn, 3):
            raise TypeError(
                f"buffers were given, so {name} is called as {name}(params, hparams, batch, buffers) and must return "
                f"(loss, new_buffers), but it takes 3 arguments: add the buffers argument and return "
                "hf.functional_call's new buffers, or pass no buffers"
            ) from err
        raise
    new = None
    if buffers is not None:
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], TensorDictBase)):
            raise ValueError(
                f"{name} was given buffers, so it must return (loss, new_buffers) with new_buffers a TensorDict "
                f"(from hf.functional_call), got {type(out).__name__}"
            )
        out, new = out
        check_same_keys(new, keys_of(buffers), f"the buffers returned by {name}", "the buffers passed to hg")
        new = new.detach()
    if not torch.is_tensor(out) or out.dim() != 0:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{name} must return a scalar tensor, got {shape}; reduce it with .mean() or .sum()")
    if not out.is_floating_point():
        raise ValueError(f"{name} must return a floating-point scalar, got {out.dtype}: its gradient would be zero")
    return out, new


def module_buffers(b: Any) -> Optional[TensorDictBase]:
    """The buffers TensorDict, or None for the internal "no buffers" marker ``()``."""
    return b if isinstance(b, TensorDictBase) else None


def _names(td: TensorDictBase) -> list[str]:
    return [key_name(k) for k in keys_of(td)]


@dataclass(frozen=True)
class InnerLoop:
    r"""The inner optimization: ``steps`` updates of ``optimizer`` on ``inner_loss``.

    One step is the map (DESIGN.md, notation)

    .. math::
        s_t = \Phi(s_{t-1}, \lambda; D_t)
            = \text{opt.update}(s_{t-1},\, \nabla_w L_{in}(w_{t-1}, \lambda; D_t),\, \lambda),
        \qquad t = 1..T,

    where the state :math:`s` holds the params :math:`w` and the optimizer's buffers.

    Args:
        inner_loss: ``inner_loss(params, hparams, batch) -> scalar tensor``.
        optimizer: a :class:`hyperfunc.optim.Optimizer` (``sgd``, ``adam``, ``sgld``); its
            arguments may be callables of the hyperparameters.
        steps: the number of inner steps ``T >= 1``.
        full_batch: if True, ``inner_batches`` is one batch reused at every step; otherwise every
            tensor leaf of ``inner_batches`` has leading dimension ``steps``.
        prepare: optional ``prepare(hparams, inner_batches) -> inner_batches'`` run once per call
            before the step loop, for work that depends on the hyperparameters but not on the
            params (the frozen feature extractor of ANIL). Every transform stays exact through it:
            the cotangents of the prepared batches are pulled back through ``prepare`` with one VJP.
            Memory: that VJP keeps ``prepare``'s graph over all of ``inner_batches`` until the reverse
            pass ends, so with per-step batches (``full_batch=False``) it grows with T: a Conv-4 ANIL
            body on 16x16 images at T = 12 peaked at 45 MiB of live tensors under ``drmad``, 7 MiB with
            the body computed inside ``inner_loss`` instead (``benchmarks/hyperdistill_costs.py
            --quick``). Compute a large body inside the loss when T batches of its activations do not fit.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> loss = lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum()
        >>> loop = hf.InnerLoop(loss, hf.optim.sgd(lr=0.1), steps=50, full_batch=True)
        >>> h, w0 = TensorDict({"l2": torch.tensor(1.0)}, []), TensorDict({"w": torch.zeros(2)}, [])
        >>> w = loop.run(h, w0, torch.ones(2))
        >>> w["w"]
        tensor([0.5000, 0.5000])
    """

    inner_loss: Loss
    optimizer: Optimizer
    steps: int
    full_batch: bool = False
    prepare: Optional[Callable[[TensorDictBase, Any], Any]] = None

    def __post_init__(self) -> None:
        if not callable(self.inner_loss):
            raise TypeError(
                f"inner_loss must be a function (params, hparams, batch) -> scalar, got {self.inner_loss!r}"
            )
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(
                "optimizer must be a hyperfunc.optim.Optimizer (hf.optim.sgd/adam/sgld), "
                f"got {type(self.optimizer).__name__}"
            )
        if not isinstance(self.full_batch, bool):
            raise TypeError(f"full_batch must be True or False, got {self.full_batch!r}")
        if not isinstance(self.steps, numbers.Integral) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.prepare is not None and not callable(self.prepare):
            raise TypeError(
                f"prepare must be None or a function (hparams, inner_batches) -> batches, got {self.prepare!r}"
            )

    # -- batches (internal) -------------------------------------------------------------------
    def _check_batches(self, batches: Any, name: str = "inner_batches") -> None:
        """Raise ``ValueError`` unless every tensor leaf has leading dimension ``steps`` (or full_batch)."""
        leaves = tensor_leaves(batches)
        if not leaves:
            raise ValueError(f"{name} must contain at least one tensor, got {type(batches).__name__}")
        if self.full_batch:
            return
        for leaf in leaves:
            if leaf.dim() == 0 or leaf.shape[0] != self.steps:
                raise ValueError(
                    f"every tensor in {name} must have leading dimension steps={self.steps} (one batch per "
                    f"inner step), got shape {tuple(leaf.shape)}; pass full_batch=True to reuse one batch"
                )

    def _batch_at(self, batches: Any, t: int) -> Any:
        """The batch of step ``t`` (0-based)."""
        return batches if self.full_batch else tree_index(batches, t)

    def _prepared(self, hparams: TensorDictBase, batches: Any) -> Any:
        """``prepare(hparams, batches)``, or ``batches`` when there is no ``prepare``."""
        if self.prepare is None:
            return batches
        try:
            out = self.prepare(hparams, batches)
        except KeyError as err:
            raise ValueError(
                f"prepare read a key that hparams lacks: {err}; hparams has keys {_names(hparams)}"
            ) from err
        self._check_batches(out, "the output of prepare(hparams, inner_batches)")
        return out

    # -- the step map (internal, on flat tuples) ------------------------------------------------
    def _grad(self, keys: Keys, params: Leaves, hparams: TensorDictBase, batch: Any, buffers: Any) -> tuple:
        r""":math:`\nabla_w L_{in}(w, \lambda; D)` on flat params, and the loss's new buffers (or None)."""

        def loss(w: Leaves):
            out, new = call_loss(self.inner_loss, "inner_loss", build(keys, w), hparams, batch, module_buffers(buffers))
            return out, (() if new is None else new)  # torch.func refuses None as aux

        return torch.func.grad(loss, has_aux=True)(params)

    def _step(self, keys: Keys, state: Leaves, buffers: Any, hparams: TensorDictBase, batch: Any, t: Any) -> tuple:
        r"""One inner step :math:`s_{t+1} = \Phi(s_t, \lambda; D)` on the flat state (``t`` is 0-based),
        and the new buffers (``()`` stands for "no buffers" inside the step loop)."""
        grads, buffers = self._grad(keys, state[: len(keys)], hparams, batch, buffers)
        return self.optimizer._step_leaves(state, grads, hparams, keys, t), buffers

    # -- convenience -------------------------------------------------------------------------
    def run(self, hparams: TensorDictBase, params0: Any, inner_batches: Any, buffers: Any = None) -> Any:
        """The final params :math:`w_T` without a hypergradient (with ``buffers``: ``(w_T, buffers_T)``).

        The inner loop as plain training, the work every hypergradient transform adds to.
        """
        check_tensordict(hparams, "hparams")
        self._check_batches(inner_batches)
        params = params0(hparams) if callable(params0) else params0
        check_tensordict(params, "params0")
        keys = keys_of(params)
        state = self.optimizer._init_leaves(leaves_of(params, keys))
        batches = self._prepared(hparams, inner_batches)
        b = () if buffers is None else buffers
        for t in range(self.steps):
            state, b = self._step(keys, state, b, hparams, self._batch_at(batches, t), t)
        w = build(keys, state[: len(keys)])
        return w if buffers is None else (w, b)
