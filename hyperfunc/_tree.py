"""Small helpers between ``TensorDict`` (the public boundary) and flat tuples of tensors (the hot loop).

Inside a step loop hyperfunc works on tuples of tensors in a fixed key order: rebuilding a
``TensorDict`` costs a few microseconds, a per-leaf Python pass costs one dispatch per leaf, and
both add up over thousands of inner steps.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from ._torch import tree_leaves, tree_map

Leaves = tuple[torch.Tensor, ...]
Keys = tuple[Any, ...]


def check_tensordict(value: Any, name: str) -> None:
    """Raise a clear error unless ``value`` is a TensorDict of floating-point tensors."""
    if not isinstance(value, TensorDictBase):
        raise TypeError(
            f"{name} must be a tensordict.TensorDict, got {type(value).__name__}; "
            f"wrap your tensors with TensorDict({{...}}, batch_size=[]), or use hf.module_state(module)"
        )
    for key in value.keys(include_nested=True, leaves_only=True):
        leaf = value.get(key)
        if not torch.is_tensor(leaf) or not leaf.is_floating_point():
            raise TypeError(
                f"{name}[{key!r}] must be a floating-point tensor, got "
                f"{getattr(leaf, 'dtype', type(leaf).__name__)}; convert it with .double() or .float(). If {name} "
                "came from TensorDict.from_module(net) (params and buffers together), split it instead with "
                "params, buffers = hf.module_state(net) and pass hg(..., buffers=buffers)"
            )


def keys_of(td: TensorDictBase) -> Keys:
    """Leaf keys of ``td`` (nested keys as tuples) in a canonical, sorted order."""
    return tuple(sorted(td.keys(include_nested=True, leaves_only=True), key=key_name))


def key_name(key: Any) -> str:
    """A (nested) TensorDict key as messages write it: ``("1", "weight")`` -> ``"1.weight"``."""
    return ".".join(key) if isinstance(key, tuple) else str(key)


def leaves_of(td: TensorDictBase, keys: Keys) -> Leaves:
    """The tensors of ``td`` in the order of ``keys``."""
    return tuple(td.get(key) for key in keys)


def build(keys: Keys, leaves: Sequence[torch.Tensor]) -> TensorDict:
    """A TensorDict (batch size ``[]``) with ``leaves`` stored under ``keys``."""
    return TensorDict(dict(zip(keys, leaves)), batch_size=[])


def check_same_keys(td: TensorDictBase, keys: Keys, name: str, reference: str) -> None:
    """Raise ``ValueError`` unless ``td`` has exactly ``keys`` with the given names."""
    got = keys_of(td)
    if got != keys:
        missing = sorted(map(key_name, set(keys) - set(got)))
        extra = sorted(map(key_name, set(got) - set(keys)))
        raise ValueError(f"{name} must have the same keys as {reference}; missing {missing}, unexpected {extra}")


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over leaves of the elementwise product: the inner product of two flat states."""
    return functools.reduce(operator.add, (torch.sum(x * y) for x, y in zip(xs, ys)))


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` where ``b > 0`` and 0 elsewhere, with no NaN in the value or the gradient."""
    positive = b > 0
    return torch.where(positive, a / torch.where(positive, b, torch.ones_like(b)), torch.zeros_like(b))


def add(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> Leaves:
    return tuple(x + y for x, y in zip(xs, ys))


def axpy(a: Any, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> Leaves:
    """``a * xs + ys`` leaf by leaf."""
    return tuple(a * x + y for x, y in zip(xs, ys))


def scale(a: Any, xs: Sequence[torch.Tensor]) -> Leaves:
    return tuple(a * x for x in xs)


def zeros_like(xs: Sequence[torch.Tensor]) -> Leaves:
    return tuple(torch.zeros_like(x) for x in xs)


def tree_index(tree: Any, index: Any) -> Any:
    """Select ``index`` along the leading dimension of every tensor leaf of a pytree (an int, a 0-d
    integer tensor, e.g. a step index traced in a compiled kernel, or a tuple of index tensors)."""
    if torch.is_tensor(index) and index.dim() == 0:  # x[t] would read the value (a graph break when traced)
        return tree_map(lambda x: x.index_select(0, index.reshape(1))[0] if torch.is_tensor(x) else x, tree)
    return tree_map(lambda x: x[index] if torch.is_tensor(x) else x, tree)


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if torch.is_tensor(x)]
