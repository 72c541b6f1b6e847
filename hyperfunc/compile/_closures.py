"""The values a compiled problem's functions read from outside their arguments.

``make_fx`` traces a loss with the Python numbers and tensors it closes over (or reads as module
globals) baked into the graph, and the kernels are keyed by their inputs' structure only: a closed-over
``scale = 0.5`` rebound to ``0.7`` between calls would keep computing with 0.5. :func:`fingerprint`
summarises those values (numbers by value, tensors by identity, shape, dtype and device; functions
through their own closures), so that the compiled executor can tell when they changed and compile
again instead of answering with the old ones.
"""

from __future__ import annotations

import functools
import numbers
import types
from typing import Any

import torch

_DEPTH = 6  # functions calling functions: deep enough for losses built by factories


def fingerprint(*fns: Any) -> tuple:
    """A hashable summary of what ``fns`` read from outside their arguments (see the module docstring)."""
    return tuple(_value(fn, _DEPTH, set()) for fn in fns)


def _value(x: Any, depth: int, seen: set) -> Any:
    if x is None or isinstance(x, (bool, str, numbers.Number)):
        return x
    if torch.is_tensor(x):
        return ("tensor", id(x), tuple(x.shape), x.dtype, x.device)
    if isinstance(x, (tuple, list)):
        return tuple(_value(v, depth, seen) for v in x)
    if isinstance(x, dict):
        return tuple((k, _value(v, depth, seen)) for k, v in x.items() if isinstance(k, (str, int)))
    if isinstance(x, functools.partial):
        return ("partial", _value(x.func, depth, seen), _value(x.args, depth, seen), _value(x.keywords, depth, seen))
    if isinstance(x, types.MethodType):
        return ("method", _value(x.__func__, depth, seen), id(x.__self__))
    if isinstance(x, types.FunctionType):
        return _function(x, depth, seen)
    return ("object", id(x))  # modules, nn.Modules, optimizers: by identity


def _function(fn: types.FunctionType, depth: int, seen: set) -> Any:
    if depth == 0 or id(fn) in seen:
        return ("function", id(fn.__code__))
    seen = seen | {id(fn)}
    code = fn.__code__
    cells = tuple(
        (name, _value(_contents(cell), depth - 1, seen)) for name, cell in zip(code.co_freevars, fn.__closure__ or ())
    )
    read = [name for name in _names(code) if name in fn.__globals__]
    globals_ = tuple(
        (name, _value(fn.__globals__[name], depth - 1, seen))
        for name in read
        if not isinstance(fn.__globals__[name], (types.ModuleType, type))
    )
    return ("function", id(code), cells, globals_, _value(fn.__defaults__, depth - 1, seen))


@functools.lru_cache(maxsize=1024)
def _names(code: types.CodeType) -> tuple:
    """The global names ``code`` and the functions defined inside it read (once per code object)."""
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= set(_names(const))
    return tuple(sorted(out))


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not filled yet (a function referring to itself before its definition ends)
        return None
