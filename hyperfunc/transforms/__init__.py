"""Higher-order transforms: ``transform(loop, outer_loss) -> hg(hparams, params0, inner_batches, outer_batch)``."""

from ._problem import HyperGrad
from .forward import forward
from .greedy import greedy_accumulate
from .implicit import ImplicitHyperGrad, implicit
from .langevin import langevin
from .reverse import HyperGradFn, Transform, drmad, first_order, one_step, truncate, unroll

__all__ = [
    "HyperGrad",
    "HyperGradFn",
    "ImplicitHyperGrad",
    "Transform",
    "drmad",
    "first_order",
    "forward",
    "greedy_accumulate",
    "implicit",
    "langevin",
    "one_step",
    "truncate",
    "unroll",
]
