"""The functional optimizer type shared by ``sgd``, ``adam`` and ``sgld``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from tensordict import TensorDictBase

from .._checks import positional_arity
from .._torch import DataDependentError
from .._tree import Keys, Leaves, build, check_same_keys, check_tensordict, key_name, keys_of, leaves_of

#: A numeric optimizer argument: a number, a scalar tensor, or a function of the hyperparameters
#: (``h -> value``) or of the hyperparameters and the step (``(h, t) -> value``, ``t`` the 0-based inner
#: step: a Python int in a Python loop, an int64 scalar tensor in compiled kernels and in
#: ``Optimizer.update``; ``h["lrs"][t]`` and ``decay ** t`` work with both) returning a scalar tensor or a
#: TensorDict shaped like the params.
Arg = Union[float, torch.Tensor, Callable[..., Any]]
#: What an argument becomes for one step: a number, a scalar tensor, or one tensor per param leaf.
Resolved = Union[float, torch.Tensor, tuple]

#: ``rule(params, buffers, grads, args, step) -> (params, buffers)`` on tuples of tensors;
#: ``buffers`` is one tuple of leaves per buffer name, ``step`` counts from 0 (int or tensor).
Rule = Callable[[Leaves, tuple, Leaves, dict, Any], tuple]


@dataclass(frozen=True)
class Optimizer:
    r"""A stateless inner optimizer: ``init(params) -> state`` and ``update(state, grads, hparams) -> state``.

    The state is a TensorDict ``{"params": w, <buffer>: ..., "step": t}``; ``update`` returns a new
    state and never mutates its inputs. Numeric arguments may be functions of the hyperparameters
    (see :data:`Arg`), resolved at every update, so the update is differentiable in them.

    Build one with :func:`hyperfunc.optim.sgd`, :func:`~hyperfunc.optim.adam` or
    :func:`~hyperfunc.optim.sgld`.

    Besides its update, an optimizer declares the properties that transforms rely on (never
    its name): ``stationary`` (its fixed points are the stationary points of
    :math:`L_{in} + \tfrac{wd}{2}\|w\|^2`, which implicit differentiation needs) and
    ``langevin`` (its update is :math:`w - \eta (g + wd\, w)` plus optional Gaussian noise, the
    step of HPO-SGLD), ``preconditioned`` (the step rescales the gradient, as Adam does, so ``lr``
    is no step size for a Neumann series). ``lr`` and ``weight_decay`` give those arguments; ``seed``
    is the noise seed of a stochastic optimizer (``sgld``), None otherwise.
    """

    name: str
    buffers: tuple[str, ...]
    args: Mapping[str, Arg]
    rule: Rule
    stationary: bool = True
    langevin: bool = False
    preconditioned: bool = False
    seed: Optional[int] = None

    @property
    def lr(self) -> Arg:
        """The learning rate argument (number, scalar tensor or callable of the hyperparameters)."""
        return self.args["lr"]

    @property
    def weight_decay(self) -> Arg:
        """The weight decay argument (0.0 when the optimizer has none)."""
        return self.args.get("weight_decay", 0.0)

    @property
    def scheduled(self) -> tuple[str, ...]:
        """The names of the arguments that depend on the step (``(h, t) -> value``)."""
        return tuple(name for name, value in self.args.items() if isinstance(value, Scheduled))

    # -- public TensorDict API -------------------------------------------------------------
    def init(self, params: TensorDictBase) -> TensorDictBase:
        """The optimizer state before the first step: params, zero buffers and ``step = 0``."""
        check_tensordict(params, "params")
        keys = keys_of(params)
        step = torch.zeros((), dtype=torch.int64, device=_device(params))
        return self._state_dict(self._init_leaves(leaves_of(params, keys)), keys, step)

    def update(
        self, state: TensorDictBase, grads: TensorDictBase, hparams: TensorDictBase | None = None
    ) -> TensorDictBase:
        """One optimizer step from ``state`` with gradients ``grads``; returns the new state."""
        check_tensordict(grads, "grads")
        keys = keys_of(state.get("params"))
        check_same_keys(grads, keys, "grads", "state['params']")
        leaves = self._state_leaves(state, keys)
        grad_leaves = leaves_of(grads, keys)
        for key, g, w in zip(keys, grad_leaves, leaves):
            if g.shape != w.shape:  # a broadcasting gradient would update every entry with the same value
                raise ValueError(
                    f"grads[{key_name(key)!r}] has shape {tuple(g.shape)} but state['params'][{key_name(key)!r}] "
                    f"has {tuple(w.shape)}; pass one gradient entry per parameter entry"
                )
        step = state.get("step")
        new = self._step_leaves(leaves, grad_leaves, hparams, keys, step)
        return self._state_dict(new, keys, step + 1)

    # -- flat layout used by the inner loop: (w..., buffer_1..., buffer_2...) ----------------
    def _init_leaves(self, params: Leaves) -> Leaves:
        """Flat state ``(w..., buffer_1..., buffer_2...)`` with zero buffers."""
        return tuple(params) + tuple(torch.zeros_like(p) for _ in self.buffers for p in params)

    def _step_leaves(
        self, state: Leaves, grads: Leaves, hparams: TensorDictBase | None, keys: Keys, step: Any
    ) -> Leaves:
        """One update on the flat state; ``step`` is the 0-based index of this update."""
        n = len(keys)
        params = state[:n]
        buffers = tuple(state[n * (i + 1) : n * (i + 2)] for i in range(len(self.buffers)))
        args = {name: resolve(name, value, hparams, keys, params, step) for name, value in self.args.items()}
        params, buffers = self.rule(params, buffers, grads, args, step)
        new = tuple(params) + tuple(leaf for buffer in buffers for leaf in buffer)
        # the state keeps its dtypes: a float64 per-parameter lr must not promote float32 params
        return tuple(x.to(old.dtype) for x, old in zip(new, state))

    def _state_leaves(self, state: TensorDictBase, keys: Keys) -> Leaves:
        """Flatten a state TensorDict made by :meth:`init` into the flat layout."""
        return sum((leaves_of(state.get(name), keys) for name in ("params",) + self.buffers), ())

    def _state_dict(self, leaves: Leaves, keys: Keys, step: Any) -> TensorDictBase:
        """Rebuild the state TensorDict from the flat layout."""
        n = len(keys)
        names = ("params",) + self.buffers
        out: dict[str, Any] = {name: build(keys, leaves[i * n : (i + 1) * n]) for i, name in enumerate(names)}
        # torch.full, not as_tensor: a traced step count (an online t under torch.compile) stays symbolic
        out["step"] = step if torch.is_tensor(step) else torch.full((), step, dtype=torch.int64)
        return build(tuple(out), tuple(out.values()))


def _device(td: TensorDictBase) -> torch.device | None:
    leaves = list(td.values(include_nested=True, leaves_only=True))
    return leaves[0].device if leaves else None


@dataclass(frozen=True)
class Scheduled:
    """An optimizer argument given as ``fn(hparams, t)``: a value per inner step (a learned schedule)."""

    fn: Callable[[Any, Any], Any]

    def __call__(self, hparams: Any, t: Any) -> Any:  # t: an int or an int64 scalar tensor
        return self.fn(hparams, t)


def resolve(
    name: str, value: Arg, hparams: TensorDictBase | None, keys: Keys, params: Leaves, step: Any = 0
) -> Resolved:
    """Evaluate one optimizer argument for this step (a callable is called on ``hparams``, a
    :class:`Scheduled` one on ``hparams`` and the step)."""
    if not callable(value):
        return value
    if hparams is None:
        raise ValueError(f"optimizer argument {name!r} is a function of the hyperparameters: pass hparams to update()")
    try:
        if isinstance(value, Scheduled):
            # the step as the loop holds it: an int in a Python loop (dynamo unrolls it, and a tensor made
            # from it would index as a data-dependent value), an int64 tensor in hf.compile's kernels
            out = _call_scheduled(name, value, hparams, step)
        else:
            out = value(hparams)
    except KeyError as err:
        raise ValueError(
            f"optimizer argument {name!r} read a key that hparams lacks: {err}; hparams has keys "
            f"{[key_name(k) for k in keys_of(hparams)]}"
        ) from err
    if isinstance(out, numbers.Real):
        return float(out)
    if isinstance(out, TensorDictBase):
        check_same_keys(out, keys, f"the TensorDict returned by {name}(hparams)", "the params")
        leaves = leaves_of(out, keys)
        for key, leaf, param in zip(keys, leaves, params):
            if leaf.numel() != 1 and leaf.shape != param.shape:
                raise ValueError(
                    f"{name}(hparams)[{key!r}] has shape {tuple(leaf.shape)}; expected a scalar "
                    f"or the shape of params[{key!r}], {tuple(param.shape)}"
                )
        return tuple(leaf if leaf.numel() != 1 else leaf.reshape(()) for leaf in leaves)
    if torch.is_tensor(out):
        if out.numel() != 1:
            raise ValueError(
                f"{name}(hparams) returned a tensor of shape {tuple(out.shape)}; expected a scalar "
                "tensor, or a TensorDict shaped like the params for per-parameter values"
            )
        return out.reshape(())
    raise TypeError(f"{name}(hparams) must return a number, a scalar tensor or a TensorDict, got {type(out).__name__}")


def _call_scheduled(name: str, value: Scheduled, hparams: Any, step: Any) -> Any:
    try:
        return value(hparams, step)
    except DataDependentError as err:
        raise ValueError(
            f"optimizer argument {name!r} used the step t as a Python number (h['lrs'][t] indexes with its value); "
            "hf.compile's kernels hold t as one tensor for every step, whose value is unknown when they are traced. "
            f"Index with hf.optim.pick(h['lrs'], t), which works for an int and a tensor t"
        ) from err


def pick(values: Any, t: Any) -> Any:
    """``values[t]``: the entry of step ``t`` along the first dimension of a tensor (or of every leaf of a
    TensorDict), for ``t`` an int or an int64 scalar tensor. With a tensor ``t`` it is one ``index_select``,
    so a compiled kernel traces one graph for every step, where ``values[t]`` would read t's value.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> lrs = torch.tensor([0.3, 0.2, 0.1])
        >>> hf.optim.pick(lrs, 1), hf.optim.pick(lrs, torch.tensor(2))
        (tensor(0.2000), tensor(0.1000))
        >>> opt = hf.optim.sgd(lr=lambda h, t: hf.optim.pick(h["lrs"], t))  # a learned per-step schedule
    """
    if isinstance(values, TensorDictBase):
        return values.apply(lambda x: pick(x, t), batch_size=[])
    if torch.is_tensor(t):
        return values.index_select(0, t.reshape(1).to(values.device)).squeeze(0)
    return values[t]


def at(arg: Resolved, i: int) -> Any:
    """The value of a resolved argument for param leaf ``i``."""
    return arg[i] if isinstance(arg, tuple) else arg


def check_arg(name: str, value: Any, low: float = 0.0, high: float = math.inf, closed_high: bool = True) -> Arg:
    """Validate a numeric argument at construction (callables are checked when they are called; one that
    takes two positional arguments, ``(hparams, t)``, becomes :class:`Scheduled`)."""
    if isinstance(value, Scheduled):
        return value
    if callable(value):
        arity = positional_arity(value)
        if arity == 2:
            return Scheduled(value)
        if arity != 1:
            raise TypeError(
                f"{name} as a function takes the hyperparameters, h -> value, or the hyperparameters and the "
                f"0-based inner step, (h, t) -> value; got a function of {arity} positional arguments"
            )
        return value
    if torch.is_tensor(value):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point scalar tensor, got {value.dtype} of shape {tuple(value.shape)}"
            )
        _check_range(name, float(value.detach()), low, high, closed_high)  # once, at construction
        return value.detach().reshape(())
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a number, a scalar tensor or a callable of hparams, got {type(value).__name__}"
        )
    _check_range(name, float(value), low, high, closed_high)
    return float(value)


def _check_range(name: str, value: float, low: float, high: float, closed_high: bool) -> None:
    above = value > high if closed_high else value >= high
    if not math.isfinite(value) or value < low or above:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must lie in [{low}, {high}{bracket}, got {value}")


def is_zero(value: Arg) -> bool:
    """True for the number 0 (a tensor or callable is never structurally zero)."""
    return isinstance(value, float) and value == 0.0


def safe_sqrt(x: Any) -> Any:
    """``sqrt(x)`` for ``x >= 0`` (number or tensor) with derivative 0, not infinity, at ``x = 0``."""
    if not torch.is_tensor(x):
        return x**0.5
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))
