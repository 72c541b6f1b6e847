"""hyperfunc: hypergradients through functional inner loops, built on ``torch.func``."""

from . import diagnostics, linalg, online, optim, tasks
from .diagnostics import Agreement, agreement, compare
from .loop import InnerLoop
from .transforms import (
    Estimate,
    HyperGrad,
    HyperGradFn,
    ImplicitHyperGrad,
    Transform,
    distill,
    drmad,
    first_order,
    forward,
    greedy_accumulate,
    implicit,
    langevin,
    linear_estimation,
    one_step,
    truncate,
    unroll,
)

__version__ = "0.1.0"

__all__ = [
    "Agreement",
    "Estimate",
    "HyperGrad",
    "HyperGradFn",
    "ImplicitHyperGrad",
    "InnerLoop",
    "Transform",
    "agreement",
    "compare",
    "diagnostics",
    "distill",
    "drmad",
    "first_order",
    "forward",
    "greedy_accumulate",
    "implicit",
    "langevin",
    "linalg",
    "linear_estimation",
    "online",
    "one_step",
    "optim",
    "tasks",
    "truncate",
    "unroll",
]
