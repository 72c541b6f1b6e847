"""hyperfunc: hypergradients through functional inner loops, built on ``torch.func``."""

from . import linalg, optim, tasks
from .loop import InnerLoop
from .transforms import (
    HyperGrad,
    HyperGradFn,
    ImplicitHyperGrad,
    Transform,
    drmad,
    first_order,
    forward,
    greedy_accumulate,
    implicit,
    langevin,
    one_step,
    truncate,
    unroll,
)

__version__ = "0.1.0"

__all__ = [
    "HyperGrad",
    "HyperGradFn",
    "ImplicitHyperGrad",
    "InnerLoop",
    "Transform",
    "drmad",
    "first_order",
    "forward",
    "greedy_accumulate",
    "implicit",
    "langevin",
    "linalg",
    "one_step",
    "optim",
    "tasks",
    "truncate",
    "unroll",
]
