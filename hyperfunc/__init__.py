"""hyperfunc: hypergradients through functional inner loops, built on ``torch.func``."""

from . import optim, tasks
from .loop import InnerLoop
from .transforms import HyperGrad, HyperGradFn, Transform, first_order, forward, one_step, truncate, unroll

__version__ = "0.1.0"

__all__ = [
    "HyperGrad",
    "HyperGradFn",
    "InnerLoop",
    "Transform",
    "first_order",
    "forward",
    "one_step",
    "optim",
    "tasks",
    "truncate",
    "unroll",
]
