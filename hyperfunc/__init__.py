"""hyperfunc: hypergradients through functional inner loops, built on ``torch.func``."""

from . import diagnostics, distributed, linalg, online, optim, tasks
from .compile import Vmapped, compile, vmap
from .diagnostics import Agreement, agreement, compare
from .loop import InnerLoop
from .modules import functional_call, module_state
from .precision import mixed_precision
from .saving import from_state_dict, to_state_dict
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

__version__ = "0.2.0"

__all__ = [
    "Agreement",
    "Estimate",
    "HyperGrad",
    "HyperGradFn",
    "HyperGradFunction",
    "ImplicitHyperGrad",
    "InnerLoop",
    "Transform",
    "Vmapped",
    "agreement",
    "compare",
    "compile",
    "diagnostics",
    "distributed",
    "distill",
    "drmad",
    "first_order",
    "fomaml",
    "forward",
    "from_state_dict",
    "functional_call",
    "greedy_accumulate",
    "implicit",
    "langevin",
    "linalg",
    "linear_estimation",
    "mixed_precision",
    "module_state",
    "online",
    "one_step",
    "optim",
    "reptile",
    "tasks",
    "to_state_dict",
    "truncate",
    "unroll",
    "vmap",
]
