"""Counter-based Gaussian noise: a pure function of (seed, step, stream, element index).

SGLD needs noise that is reproducible when a segment of the trajectory is recomputed (checkpointing,
truncated reverse passes), identical under ``vmap`` and a Python loop, and free of global RNG
state. A stateless hash of integer counters gives all three. It runs as a few integer ops: numpy's
on the CPU, torch's on other devices, and under ``torch.compile`` inside one opaque operator
(``hyperfunc::counter_bits``), so that inductor does not inline it (see there).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

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


def _key(seed: Any, step: Any, stream: int) -> Any:
    """The 32-bit key of ``(seed, step, stream)``: ints or int64 tensors (broadcast together)."""
    low, high = seed & _MASK, seed >> 32  # a seed in [0, 2**63): both halves enter the key
    return _hash(_hash(_hash(_hash(low) ^ high) ^ step) ^ stream)


def _draw(key: int, shape: Any, device: Any) -> torch.Tensor:
    """``shape`` hashed element indices under the int ``key``, on ``device``."""
    if torch.device(device).type == "cpu":  # numpy's int64 ops (which wrap around too) cost µs, torch's tens of µs
        return _draw_numpy(key, shape)
    return _draw_torch(key, shape, device)


def _draw_numpy(key: Any, shape: Any) -> torch.Tensor:
    """:func:`_draw` on the CPU for an int or an int64 array of keys: ``key.shape + shape`` integers."""
    key = np.asarray(key, dtype=np.int64)
    out = _hash(_hash(np.arange(math.prod(shape), dtype=np.int64)) ^ key.reshape(-1, 1))
    return torch.from_numpy(out.reshape((*key.shape, *shape)))


def _draw_torch(key: Any, shape: Any, device: Any) -> torch.Tensor:
    """:func:`_draw` by torch ops on ``device`` for an int or an int64 tensor of keys there."""
    index = _hash(torch.arange(math.prod(shape), dtype=torch.int64, device=device))
    if not torch.is_tensor(key):  # a Python int enters as a scalar: no host-to-device copy
        return _hash(index ^ key).reshape(shape)
    return _hash(index ^ key.reshape(-1, 1)).reshape((*key.shape, *shape))


@torch.library.custom_op("hyperfunc::counter_bits", mutates_args=())
def _counter_bits(seed: torch.Tensor, step: torch.Tensor, stream: int, shape: list[int]) -> torch.Tensor:
    """:func:`bits` for int64 tensor keys: ``broadcast(seed, step).shape + shape`` integers.

    An opaque operator for ``torch.compile``: inductor inlines a hash as dozens of fused int64
    ops per draw, and a 10-step SGLD segment then compiled for minutes (260 s against 12 s
    without noise, 2 CPU threads); as one extern call the graph stays small.
    """
    seed, step = torch.broadcast_tensors(seed, step)
    if step.device.type != "cpu":  # hashed on the device: reading the counters would synchronise with the host
        return _draw_torch(_key(seed, step, stream), shape, step.device)
    keys = [_key(a, b, stream) for a, b in zip(seed.flatten().tolist(), step.flatten().tolist())]
    return _draw_numpy(np.array(keys, dtype=np.int64).reshape(step.shape), shape)


@_counter_bits.register_fake
def _(seed: torch.Tensor, step: torch.Tensor, stream: int, shape: list[int]) -> torch.Tensor:
    return step.new_empty((*torch.broadcast_shapes(seed.shape, step.shape), *shape))


@_counter_bits.register_vmap
def _(info: Any, in_dims: tuple, seed: torch.Tensor, step: torch.Tensor, stream: int, shape: list[int]) -> tuple:
    if in_dims[0] is None and in_dims[1] is None:  # one key for every task
        return _counter_bits(seed, step, stream, shape), None

    def batched(x: torch.Tensor, dim: Optional[int]) -> torch.Tensor:  # (batch, *x's own shape)
        if dim is None:
            return x.expand(info.batch_size, *x.shape)
        return x.movedim(dim, 0)

    seed, step = batched(seed, in_dims[0]), batched(step, in_dims[1])
    width = max(seed.dim(), step.dim())  # align the per-sample shapes on the right, after the batch dimension
    seed, step = (x.reshape(x.shape[0], *(1,) * (width - x.dim()), *x.shape[1:]) for x in (seed, step))
    return _counter_bits(seed, step, stream, shape), 0


def _int64(x: Any, device: Any) -> torch.Tensor:
    """``x`` (a tensor or an int) as an int64 tensor on ``device``; ``torch.full`` keeps a traced int
    symbolic (``torch.as_tensor`` would specialise it: a recompile per step)."""
    return x.to(device, torch.int64) if torch.is_tensor(x) else torch.full((), x, dtype=torch.int64, device=device)


def bits(shape: Any, seed: Any, step: Any, stream: int, device: Any) -> torch.Tensor:
    """Uniform 32-bit integers (as int64) of ``shape`` determined by ``(seed, step, stream)`` alone."""
    if torch.is_tensor(step) or torch.is_tensor(seed) or torch.compiler.is_compiling():
        # a traced step, per-task seeds, or any draw in a compiled graph: one opaque operator
        return _counter_bits(_int64(seed, device), _int64(step, device), stream, list(shape))
    # Python ints hash on the host (the same arithmetic): no host-to-device copy per draw on CUDA
    return _draw(_key(seed, step, stream), shape, device)


def normal(shape: torch.Size, seed: Any, step: Any, stream: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Standard normal samples of ``shape`` determined by ``(seed, step, stream)`` alone (Box-Muller)."""
    u = (bits((2, *shape), seed, step, stream, device).to(torch.float64) + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2.0 * math.pi * u[1])
    return z.to(dtype)
