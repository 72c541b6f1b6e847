r"""Mixed precision: losses in bfloat16 (or float16), everything else in the params' precision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._torch import tree_leaves, tree_map

__all__ = ["mixed_precision"]

_LOW = (torch.bfloat16, torch.float16)


def mixed_precision(fn: Callable, dtype: torch.dtype = torch.bfloat16) -> Callable:
    r"""``fn`` (an inner or outer loss, or a loop's ``prepare``) evaluated under
    ``torch.autocast(device, dtype)``, its floating-point outputs returned in the master precision:
    the dtype of its first floating-point input (the params for a loss, the hyperparameters for
    ``prepare``), on whose device autocast runs.

    Inside ``fn``, autocast runs matmuls and convolutions in ``dtype`` and keeps reductions and
    normalisations in float32; gradients flow back to the float32 params, so the inner optimizer
    state, the hypergradient accumulators (``forward``'s tangents, ``drmad``/``greedy``
    accumulators) and the linear solves of ``implicit`` stay in float32: only the loss and its
    derivatives see the rounding of ``dtype`` (8 significant bits for bfloat16). Module buffers
    returned by a buffered loss come back in the master precision (integer buffers untouched).
    Works under ``vmap``, ``grad``, ``jvp``, on CPU and CUDA; ``docs/scale.md`` gives the measured
    agreement with float32.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> loss = hf.mixed_precision(lambda p, h, x: (p["w"] @ x - h["c"]) ** 2)
        >>> p, h = TensorDict({"w": torch.ones(3)}, []), TensorDict({"c": torch.tensor(1.0)}, [])
        >>> loss(p, h, torch.tensor([0.5, 0.25, 0.125]))
        tensor(0.0156)
    """
    if not callable(fn):
        raise TypeError(f"mixed_precision(fn, dtype): fn must be callable, got {type(fn).__name__}")
    if dtype not in _LOW:
        raise ValueError(f"mixed_precision(fn, dtype): dtype must be torch.bfloat16 or torch.float16, got {dtype}")

    def evaluated(*args: Any) -> Any:
        master = next((x for x in tree_leaves(args) if torch.is_tensor(x) and x.is_floating_point()), None)
        if master is None:
            raise TypeError("mixed_precision: the function's inputs hold no floating-point tensor")
        if master.dtype == torch.float64:  # autocast leaves float64 operations alone: nothing would run in dtype
            raise ValueError(
                "mixed_precision: the master precision (the first floating-point input) is float64, which "
                f"torch.autocast does not lower, so nothing would run in {dtype}; use float32 masters "
                "(params and hparams in float32), or drop mixed_precision for a float64 run"
            )
        with torch.autocast(master.device.type, dtype=dtype):
            out = fn(*args)
        return tree_map(lambda x: x.to(master.dtype) if torch.is_tensor(x) and x.is_floating_point() else x, out)

    return evaluated
