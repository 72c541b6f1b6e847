"""``hf.vmap(hg, in_dims, chunk_size=1)``: the tasks one at a time, as a Python loop without ``vmap``.

``torch.func.vmap(chunk_size=1)`` still runs every operation through vmap's batching rules, at a batch
of one. A loop calls ``hg`` on each task's slices as they are: no batching rule runs, batch norm runs
torch's own kernel (:mod:`hyperfunc._batch_norm`), and a compiled ``hg`` runs its kernels compiled
for one task, whose graphs have none of the task dimension's reshapes. The results are stacked as
``vmap`` stacks them.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDictBase

from .._rng import rng_state, same_rng_state, set_rng_state
from .._torch import tree_leaves, tree_map


def mapped(arg: Any, dim: Any) -> list:
    """``(tensor, dim)`` for every tensor of ``arg`` that ``dim`` (an int, None, or a tuple/list/dict of
    them matching ``arg``'s structure, as ``torch.func.vmap`` takes) maps."""
    if dim is None or (callable(arg) and not torch.is_tensor(arg)):
        return []
    if isinstance(dim, int):
        return [(x, dim) for x in tree_leaves(arg) if torch.is_tensor(x)]
    parts = dim.items() if isinstance(dim, dict) else enumerate(dim)
    return [pair for key, d in parts for pair in mapped(arg[key], d)]


def _select(arg: Any, dim: Any, i: int) -> Any:
    """Task ``i`` of ``arg``: each mapped tensor indexed at ``i`` along its dimension, the rest shared."""
    if dim is None or (callable(arg) and not torch.is_tensor(arg)):
        return arg
    if isinstance(dim, int):
        return tree_map(lambda x: x.select(dim, i) if torch.is_tensor(x) else x, arg)
    if isinstance(dim, dict):
        return type(arg)({k: _select(v, dim.get(k), i) for k, v in arg.items()})
    return type(arg)(_select(a, d, i) for a, d in zip(arg, dim))


def one_task_at_a_time(fn: Any, args: tuple, in_dims: tuple, randomness: str) -> Any:
    """``fn`` called on every task's slices of ``args`` in turn, its results stacked at dim 0 (as ``vmap``).

    ``randomness`` keeps ``vmap``'s meaning: ``"different"`` lets each task draw its own numbers,
    ``"same"`` replays the random state of the first task for every task, and ``"error"`` refuses a
    draw with a ``ValueError``."""
    pairs = [pair for arg, dim in zip(args, in_dims) for pair in mapped(arg, dim)]
    if not pairs:
        raise ValueError(
            "hf.vmap needs at least one argument mapped over the tasks (an in_dims entry that is not None)"
        )
    x, d = pairs[0]
    n = x.shape[d]  # the task count (hf.vmap checked that every mapped argument agrees)
    if n == 0:
        raise ValueError("hf.vmap got 0 tasks along in_dims: give every mapped argument at least one task")
    tensors = tuple(x for x, _ in pairs)  # rng_state reads the generators of their devices
    before = rng_state(tensors)
    results = []
    for i in range(n):
        if randomness == "same":
            set_rng_state(before)
        results.append(fn(*(_select(arg, dim, i) for arg, dim in zip(args, in_dims))))
    if randomness == "error" and not same_rng_state(before, rng_state(tensors)):
        raise ValueError(
            "hf.vmap(..., chunk_size=1) ran a random operation (dropout, torch.rand) with randomness='error'; "
            "pass randomness='different' (each task its own draws) or 'same' (one draw for every task)"
        )
    return _stack(results)


def _stack(values: list) -> Any:
    """The tasks' results stacked at dim 0 as ``vmap`` returns them (a TensorDict gains a leading batch dim)."""
    first = values[0]
    if torch.is_tensor(first) or isinstance(first, TensorDictBase):
        return torch.stack(values)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_stack(list(parts)) for parts in zip(*values)))
    if isinstance(first, (tuple, list)):
        return type(first)(_stack(list(parts)) for parts in zip(*values))
    if isinstance(first, dict):
        return type(first)({k: _stack([v[k] for v in values]) for k in first})
    if any(v != first for v in values):
        raise ValueError(f"hf.vmap: the tasks returned different non-tensor values {values[:3]}; vmap returns tensors")
    return first
