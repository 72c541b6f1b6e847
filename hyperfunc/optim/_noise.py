"""Counter-based Gaussian noise: a pure function of (seed, step, stream, element index).

SGLD needs noise that is reproducible when a segment of the trajectory is recomputed (checkpointing,
truncated reverse passes), identical under ``vmap`` and a Python loop, and free of global RNG
state. A stateless hash of integer counters gives all three; it runs as a few integer tensor ops
on any device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

_MASK = 0xFFFFFFFF


def _mul32(x: Any, c: int) -> Any:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK


def _hash(x: Any) -> Any:
    """A 32-bit integer mixing function (xor-shift-multiply, "lowbias32") of an int or an int64 tensor."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def bits(shape: Any, seed: Any, step: Any, stream: int, device: Any) -> torch.Tensor:
    """Uniform 32-bit integers (as int64) of ``shape`` determined by ``(seed, step, stream)`` alone."""
    if torch.is_tensor(step) or torch.is_tensor(seed):  # a traced step or per-task seeds: the key on the device
        step = torch.as_tensor(step, dtype=torch.int64, device=device)
        seed = torch.as_tensor(seed, dtype=torch.int64, device=device)
    # Python ints hash on the host (the same arithmetic): no host-to-device copy per draw on CUDA
    low, high = seed & _MASK, seed >> 32  # a seed in [0, 2**63): both halves enter the key
    key = _hash(_hash(_hash(_hash(low) ^ high) ^ step) ^ stream)
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device).reshape(shape)
    return _hash(_hash(index) ^ key)


def normal(shape: torch.Size, seed: Any, step: Any, stream: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Standard normal samples of ``shape`` determined by ``(seed, step, stream)`` alone (Box-Muller)."""
    u = (bits((2, *shape), seed, step, stream, device).to(torch.float64) + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u[0])) * torch.cos(2.0 * math.pi * u[1])
    return z.to(dtype)
