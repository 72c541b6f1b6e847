"""The global random states a computation may draw from, read and restored (a recomputed segment of the
inner loop replays the draws of its first run)."""

from __future__ import annotations

import torch

from ._tree import Leaves


def rng_state(leaves: Leaves) -> tuple:
    """The global random states that steps on ``leaves`` may draw from: CPU, and the CUDA devices of ``leaves``."""
    cuda = sorted({x.device for x in leaves if x.device.type == "cuda"}, key=str)
    return torch.get_rng_state(), tuple((d, torch.cuda.get_rng_state(d)) for d in cuda)


def set_rng_state(state: tuple) -> None:
    """Restore a state read by :func:`rng_state`."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in cuda:
        torch.cuda.set_rng_state(value, device)


def same_rng_state(before: tuple, after: tuple) -> bool:
    """Whether no random number was drawn between two :func:`rng_state` reads."""
    return torch.equal(before[0], after[0]) and all(torch.equal(x, y) for (_, x), (_, y) in zip(before[1], after[1]))
