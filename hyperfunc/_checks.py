"""Argument checks shared by the public factories: each error names the argument and the fix."""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, Optional

import torch

from ._torch import is_wrapped


def check_int(value: Any, name: str, low: int) -> int:
    """Raise unless ``value`` is an integer ``>= low``; return it as an int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_real(value: Any, name: str, low: float = -math.inf, positive: bool = False) -> float:
    """Raise unless ``value`` is a finite real number (numpy scalars included) ``>= low`` (``> low`` when
    ``positive``); return it as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or (positive and value == low):
        bound = f"> {low}" if positive else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_seed(seed: Any, name: str = "seed") -> Any:
    """A seed: an integer in ``[0, 2**63)`` (all 63 bits reach the counter-based generator), or an int64
    scalar tensor, which may differ per task under ``vmap`` (see docs/errors.md, "Randomness")."""
    if torch.is_tensor(seed):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(
                f"{name} as a tensor must be an int64 scalar, got {seed.dtype} of shape {tuple(seed.shape)}"
            )
        if concrete(seed) and int(seed) < 0:
            raise ValueError(f"{name} must lie in [0, 2**63), got {int(seed)}")
        return seed.reshape(())
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    value = int(seed)
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must lie in [0, 2**63), got {seed}")
    return value


def concrete(x: Any) -> bool:
    """A CPU tensor outside any torch.func transform or compilation: its value can be read without a
    device synchronisation or a graph break (elsewhere value checks are skipped, see docs/errors.md)."""
    return (
        not torch.compiler.is_compiling()  # first: dynamo cannot trace the functorch query below
        and torch.is_tensor(x)
        and x.device.type == "cpu"
        and not is_wrapped(x)
    )


def warn_outside(value: Any, low: float, high: float, message: str) -> None:
    """Warn (``RuntimeWarning``) when a concrete diagnostic lies outside ``[low, high]`` (NaN included)."""
    if concrete(value) and not bool(((value >= low) & (value <= high)).all()):
        warnings.warn(message.format(value=value.tolist()), RuntimeWarning, stacklevel=4)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _parameters(fn: Callable) -> Optional[list]:
    """``fn``'s parameters, or None when its signature cannot be read."""
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def positional_arity(fn: Callable) -> int:
    """How many positional arguments ``fn`` requires (1 for a callable whose signature cannot be read)."""
    parameters = _parameters(fn)
    if parameters is None:
        return 1
    return sum(1 for p in parameters if p.kind in _POSITIONAL and p.default is inspect.Parameter.empty)


def _fixed_positionals(fn: Callable) -> Optional[list]:
    """``fn``'s positional parameters when its signature can be read and has no ``*args``, else None."""
    parameters = _parameters(fn)
    if parameters is None or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    return [p for p in parameters if p.kind in _POSITIONAL]


def requires_fewer(fn: Callable, n: int) -> bool:
    """True when ``fn``'s signature can be read, has no ``*args`` and requires fewer than ``n`` positional
    arguments (``hf.truncate(K)``, a factory, where a transform ``(loop, outer_loss)`` is expected)."""
    positionals = _fixed_positionals(fn)
    return positionals is not None and sum(p.default is inspect.Parameter.empty for p in positionals) < n


def takes_at_most(fn: Callable, n: int) -> bool:
    """True when ``fn``'s signature can be read and accepts no more than ``n`` positional arguments."""
    positionals = _fixed_positionals(fn)
    return positionals is not None and len(positionals) <= n
