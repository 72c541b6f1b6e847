"""Higher-order transforms: ``transform(loop, outer_loss) -> hg(hparams, params0, inner_batches, outer_batch)``."""

from ._problem import HyperGrad
from .distill import Estimate, distill, linear_estimation
from .forward import forward
from .greedy import greedy_accumulate
from .implicit import ImplicitHyperGrad, implicit
from .langevin import langevin
from .reverse import HyperGradFn, Transform, drmad, first_order, one_step, truncate, unroll

__all__ = [
    "Estimate",
    "HyperGrad",
    "HyperGradFn",
    "ImplicitHyperGrad",
    "Transform",
    "distill",
    "drmad",
    "first_order",
    "forward",
    "greedy_accumulate",
    "implicit",
    "langevin",
    "linear_estimation",
    "one_step",
    "truncate",
    "unroll",
]
