"""Higher-order transforms: ``transform(loop, outer_loss) -> hg(hparams, params0, inner_batches, outer_batch)``.

Every transform is an algorithm over the protocol of :mod:`hyperfunc.transforms.base`.
"""

from .base import HyperGrad, HyperGradFunction, Transform, fomaml, reptile
from .distill import Estimate, distill, linear_estimation
from .forward import forward
from .greedy import greedy_accumulate
from .implicit import ImplicitHyperGrad, implicit
from .langevin import langevin
from .reverse import HyperGradFn, drmad, first_order, one_step, truncate, unroll

__all__ = [
    "Estimate",
    "HyperGrad",
    "HyperGradFn",
    "HyperGradFunction",
    "ImplicitHyperGrad",
    "Transform",
    "distill",
    "drmad",
    "first_order",
    "fomaml",
    "forward",
    "greedy_accumulate",
    "implicit",
    "langevin",
    "linear_estimation",
    "one_step",
    "reptile",
    "truncate",
    "unroll",
]
