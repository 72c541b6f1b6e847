"""Higher-order transforms: ``transform(loop, outer_loss) -> hg(hparams, params0, inner_batches, outer_batch)``."""

from ._problem import HyperGrad
from .forward import forward
from .reverse import HyperGradFn, Transform, first_order, one_step, truncate, unroll

__all__ = ["HyperGrad", "HyperGradFn", "Transform", "first_order", "forward", "one_step", "truncate", "unroll"]
