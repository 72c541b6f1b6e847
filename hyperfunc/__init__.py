"""hyperfunc: hypergradients through functional inner loops, built on ``torch.func``."""

from . import diagnostics, linalg, online, optim, tasks
from .diagnostics import Agreement, agreement, compare
from .loop import InnerLoop
from .modules import functional_call, module_state
from .transforms import (
    Estimate,
    HyperGrad,
    HyperGradFn,
    HyperGradFunction,
    ImplicitHyperGrad,
    Transform,
    distill,
    drmad,
    first_order,
    fomaml,
    forward,
    greedy_accumulate,
    implicit,
    langevin,
    linear_estimation,
    one_step,
    reptile,
    truncate,
    unroll,
)

__version__ = "0.1.0"

__all__ = [
    "Agreement",
    "Estimate",
    "HyperGrad",
    "HyperGradFn",
    "HyperGradFunction",
    "ImplicitHyperGrad",
    "InnerLoop",
    "Transform",
    "agreement",
    "compare",
    "diagnostics",
    "distill",
    "drmad",
    "first_order",
    "fomaml",
    "forward",
    "functional_call",
    "greedy_accumulate",
    "implicit",
    "langevin",
    "linalg",
    "linear_estimation",
    "module_state",
    "online",
    "one_step",
    "optim",
    "reptile",
    "tasks",
    "truncate",
    "unroll",
]
