"""Counter-based Gaussian noise: a pure function of (seed, step, stream, element index).

SGLD needs noise that is reproducible when a segment of the trajectory is recomputed (checkpointing,
truncated reverse passes), identical under ``vmap`` and a Python loop, and free of global RNG
state. A stateless hash of integer counters gives all three. It runs as a few integer ops: numpy's
on the CPU, torch's on other devices, and under ``torch.compile`` inside one opaque operator
(``hyperfunc::counter_bits``), so that inductor does not inline it (see there).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np
import torch

from .._common_subexpressions import pure_call

_MASK = 0xFFFFFFFF


def _mul32(x: Any, c: int) -> Any:
    """``x * c mod 2**32`` for ``0 <= x, c < 2**32``: exact for ints; int64 tensors keep the low 64 bits
    of the product (two's complement wrap-around), whose low 32 bits are the same."""
    return (x * c) & _MASK


def _hash(x: Any) -> Any:
    """A 32-bit integer mixing function (xor-shift-multiply, "lowbias32") of an int or an int64 tensor."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed: Any, step: Any, stream: Any) -> Any:
    """The 32-bit key of ``(seed, step, stream)``: ints or int64 tensors (broadcast together)."""
    low, high = seed & _MASK, seed >> 32  # a seed in [0, 2**63): both halves enter the key
    return _hash(_hash(_hash(_hash(low) ^ high) ^ step) ^ stream)


def _draw(keys: list[int], sizes: tuple[int, ...], device: Any) -> torch.Tensor:
    """One key per stream (ints), ``sizes[i]`` hashed element indices of stream ``i``: ``sum(sizes)``
    integers on ``device``, the streams one after the other."""
    if torch.device(device).type == "cpu":  # numpy's int64 ops (which wrap around too) cost µs, torch's tens of µs
        return _draw_numpy(np.array(keys, dtype=np.int64), sizes)
    # Python ints enter the device's ops as scalars: no host-to-device copy
    return torch.cat([_hash(_index(n, device) ^ key) for key, n in zip(keys, sizes)])


@functools.lru_cache(maxsize=8)
def _index_bits(sizes: tuple[int, ...]) -> np.ndarray:
    """The hashed element indices of the streams of ``sizes``, concatenated (each stream counts from 0).
    Cached (a model's leaves draw the same sizes every step): 16 bytes per parameter per cached model,
    at most 8 models."""
    out = np.concatenate([_hash(np.arange(n, dtype=np.int64)) for n in sizes])
    out.flags.writeable = False
    return out


def _index(n: int, device: Any) -> torch.Tensor:
    return _hash(torch.arange(n, dtype=torch.int64, device=device))


def _draw_numpy(keys: Any, sizes: tuple[int, ...]) -> torch.Tensor:
    """:func:`_draw` on the CPU for an int64 array of keys whose last axis runs over the streams:
    ``keys.shape[:-1] + (sum(sizes),)`` integers."""
    keys = np.asarray(keys, dtype=np.int64)
    return torch.from_numpy(_hash(_index_bits(tuple(sizes)) ^ np.repeat(keys, sizes, axis=-1)))


def _draw_torch(keys: torch.Tensor, sizes: tuple[int, ...], device: Any) -> torch.Tensor:
    """:func:`_draw_numpy` by torch ops on ``device`` for an int64 tensor of keys there."""
    index = torch.cat([_index(n, device) for n in sizes])
    spread = torch.cat([keys[..., i : i + 1].expand(*keys.shape[:-1], n) for i, n in enumerate(sizes)], -1)
    return _hash(index ^ spread)


_LIB = torch.library.Library("hyperfunc", "FRAGMENT")
_LIB.define("counter_bits(Tensor seed, Tensor step, int[] streams, int[] sizes) -> Tensor")


def _counter_bits_impl(seed: torch.Tensor, step: torch.Tensor, streams: list[int], sizes: list[int]) -> torch.Tensor:
    """:func:`bits` for int64 tensor keys: ``broadcast(seed, step).shape + (sum(sizes),)`` integers, the
    ``sizes[i]`` of stream ``streams[i]`` one after the other.

    An opaque operator for ``torch.compile``: inductor inlines a hash as dozens of fused int64
    ops per draw, and a 10-step SGLD segment then compiled for minutes (260 s against 12 s
    without noise, 2 CPU threads); as one extern call the graph stays small. One call draws every
    stream of a step (every parameter leaf). Registered through ``torch.library.Library`` rather
    than ``torch.library.custom_op``, whose Python wrappers cost 55 of a call's 80 µs here (about 25 µs a call
    now; :func:`batch_draws` stacks the steps of a compiled kernel into one call).
    """
    if step.device.type != "cpu":  # hashed on the device: reading the counters would synchronise with the host
        seed, step = torch.broadcast_tensors(seed, step)
        return _draw_torch(torch.stack([_key(seed, step, c) for c in streams], -1), tuple(sizes), step.device)
    if seed.dim() == 0 and step.dim() == 0:  # one key per stream (the draw of an SGLD step): µs count here
        a, b = int(seed), int(step)
        return _draw_numpy(np.array([_key(a, b, c) for c in streams], dtype=np.int64), tuple(sizes))
    # many keys (per-task seeds, or the steps of a kernel stacked by batch_draws): numpy hashes them at once
    seeds: Any
    if seed.dim() == 0:  # one seed: its half of the key hashes as a Python int
        seeds = int(seed)
    else:
        seed, step = torch.broadcast_tensors(seed, step)
        seeds = seed.reshape(-1, 1).numpy()
    keys = _key(seeds, step.reshape(-1, 1).numpy(), np.asarray(streams, dtype=np.int64))
    return _draw_numpy(keys.reshape(*step.shape, len(streams)), tuple(sizes))


_LIB.impl("counter_bits", _counter_bits_impl, "CompositeExplicitAutograd")
_counter_bits = torch.ops.hyperfunc.counter_bits.default


@torch.library.register_fake("hyperfunc::counter_bits", lib=_LIB)
def _(seed: torch.Tensor, step: torch.Tensor, streams: list[int], sizes: list[int]) -> torch.Tensor:
    return step.new_empty((*torch.broadcast_shapes(seed.shape, step.shape), sum(sizes)))


@torch.library.register_vmap("hyperfunc::counter_bits", lib=_LIB)
def _(info: Any, in_dims: tuple, seed: torch.Tensor, step: torch.Tensor, streams: list[int], sizes: list[int]) -> tuple:
    if in_dims[0] is None and in_dims[1] is None:  # one key for every task
        return _counter_bits(seed, step, streams, sizes), None

    def batched(x: torch.Tensor, dim: Optional[int]) -> torch.Tensor:  # (batch, *x's own shape)
        if dim is None:
            return x.expand(info.batch_size, *x.shape)
        return x.movedim(dim, 0)

    seed, step = batched(seed, in_dims[0]), batched(step, in_dims[1])
    width = max(seed.dim(), step.dim())  # align the per-sample shapes on the right, after the batch dimension
    seed, step = (x.reshape(x.shape[0], *(1,) * (width - x.dim()), *x.shape[1:]) for x in (seed, step))
    return _counter_bits(seed, step, streams, sizes), 0


def _int64(x: Any, device: Any) -> torch.Tensor:
    """``x`` (a tensor or an int) as an int64 tensor on ``device``; ``torch.full`` keeps a traced int
    symbolic (``torch.as_tensor`` would specialise it: a recompile per step)."""
    return x.to(device, torch.int64) if torch.is_tensor(x) else torch.full((), x, dtype=torch.int64, device=device)


def bits(shapes: list, seed: Any, step: Any, streams: list[int], device: Any) -> list[torch.Tensor]:
    """Uniform 32-bit integers (as int64), one tensor of ``shapes[i]`` per stream ``streams[i]``, each
    determined by ``(seed, step, streams[i])`` alone; one draw for all of them."""
    sizes = [math.prod(shape) for shape in shapes]
    if torch.is_tensor(step) or torch.is_tensor(seed) or torch.compiler.is_compiling():
        # a traced step, per-task seeds, or any draw in a compiled graph: one opaque operator
        flat = _counter_bits(_int64(seed, device), _int64(step, device), list(streams), sizes)
    else:  # Python ints hash on the host (the same arithmetic)
        flat = _draw([_key(seed, step, c) for c in streams], tuple(sizes), device)
    keys = flat.shape[:-1]  # the per-sample shape of broadcast(seed, step): () unless keys were batched
    return [x.reshape((*keys, *shape)) for x, shape in zip(flat.split(sizes, -1), shapes)]


def normal(shapes: list, seed: Any, step: Any, streams: list[int], dtypes: list, device: Any) -> list[torch.Tensor]:
    """Standard normal samples, one tensor of ``shapes[i]`` and ``dtypes[i]`` per stream
    ``streams[i]``, determined by ``(seed, step, streams[i])`` alone (Box-Muller)."""
    out = []
    for b, shape, dtype in zip(bits([(2, *shape) for shape in shapes], seed, step, streams, device), shapes, dtypes):
        u0, u1 = ((b.to(torch.float64) + 0.5) / 2.0**32).unbind(b.dim() - len(shape) - 1)
        out.append((torch.sqrt(-2.0 * torch.log(u0)) * torch.cos(2.0 * math.pi * u1)).to(dtype))
    return out


def batch_draws(graph: torch.fx.Graph) -> None:
    """Replace, in place, the ``counter_bits`` calls of a functional graph that share their seed, streams
    and sizes and draw for one step each (a k-step SGLD kernel) by one call for the stacked steps,
    whose rows are the same bits: one operator call per kernel instead of one per step. A call costs
    about 25 µs on the CPU whatever its size; ten stacked steps about 55 µs. Run it after
    :func:`~hyperfunc._common_subexpressions.merge_common_subexpressions`, which gives equal seeds one
    node. The pure operators that compute the steps are moved ahead of the first draw; a group whose
    steps depend on anything else (a random draw) is left alone."""
    groups: dict = {}
    for node in graph.nodes:
        if (
            node.op == "call_function"
            and node.target is _counter_bits
            and _scalar(node.args[0])
            and _scalar(node.args[1])
        ):
            seed, _, streams, sizes = node.args
            groups.setdefault((seed, tuple(streams), tuple(sizes)), []).append(node)
    for (seed, streams, sizes), draws in groups.items():
        first = draws[0]
        position = {n: i for i, n in enumerate(graph.nodes)}
        if len(draws) < 2 or not all(_hoist(node.args[1], first, position) for node in draws):
            continue
        with graph.inserting_before(first):
            steps = graph.call_function(torch.ops.aten.stack.default, ([node.args[1] for node in draws],))
            merged = graph.call_function(_counter_bits, (seed, steps, list(streams), list(sizes)))
            rows = [graph.call_function(torch.ops.aten.select.int, (merged, 0, j)) for j in range(len(draws))]
        for node, row in zip(draws, rows):
            node.replace_all_uses_with(row)
            graph.erase_node(node)


def _scalar(node: Any) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return torch.is_tensor(value) and value.dim() == 0


def _hoist(node: torch.fx.Node, before: torch.fx.Node, position: dict) -> bool:
    """Move ``node`` and what it needs ahead of ``before`` when they are pure operator calls (``pure_call``);
    False if one is not. ``position`` (node -> graph index) is kept up to date for the nodes moved."""

    def visit(n: torch.fx.Node) -> bool:
        if position[n] < position[before]:
            return True
        if not pure_call(n) or not all(visit(a) for a in n.all_input_nodes):
            return False
        before.prepend(n)
        position[n] = position[before] - 0.5
        return True

    return visit(node)
