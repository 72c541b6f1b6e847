"""The peak bytes a computation allocates, seen below ``torch.func``'s wrappers (a dispatch mode)."""

from __future__ import annotations

import weakref
from typing import Any

from ._torch import TorchDispatchMode, allocates


class PeakBytes(TorchDispatchMode):
    """While active, the peak of the bytes held by the tensors that operators created (``peak``).

    Every non-aliasing operator output is counted when created and uncounted when freed; tensors that
    existed before are not counted. It sees the plain tensors under ``torch.func``'s wrappers (all tasks
    of a ``vmap``), on any device, without reading an allocator, so it never synchronizes a GPU.

    Examples:
        >>> import torch
        >>> from hyperfunc._memory import PeakBytes
        >>> x = torch.ones(1000)
        >>> with PeakBytes() as m:
        ...     y = (x * 2).sum()
        >>> m.peak  # x * 2, 1000 float32 numbers, and the sum's 4 bytes while both are alive
        4004
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if allocates(func):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if hasattr(t, "untyped_storage"):
                    nbytes = t.untyped_storage().nbytes()
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, nbytes)
        return out
