r"""Online hypergradients: an ``init``/``step`` pair that emits a hypergradient after every inner step.

Offline transforms return one hypergradient after ``T`` inner steps. Online ones let the
hyperparameters change *during* the inner optimization (HyperDistill's Algorithm 3, one-step
lookahead, real-time recurrent learning)::

    opt = hf.online.distill(0.99, theta=1.0)(loop, outer_loss)
    state = opt.init(hparams, params0)            # or opt.init(hparams, params0, buffers)
    for t in range(T):
        res, state = opt.step(state, hparams, batch_t, outer_batch, t)
        updates, meta_state = meta_opt.update(res.grads, meta_state, params=hparams)
        hparams = torchopt.apply_updates(hparams, updates, inplace=False)

``state`` is an :class:`OnlineState` of tensors and TensorDicts only (with the module buffers, when
``init`` got them), so ``init`` and ``step`` can be vmapped over a meta-batch of tasks. ``t`` is the
0-based index of the inner step that ``step`` takes (a Python int: it fixes the optimizer's step
count and the subsampling sizes). Each call runs the loop's ``prepare`` on that step's batch alone
(as with ``full_batch=True``) and pulls its cotangent back immediately. ``params0`` must be a
TensorDict: an initialization learned by hypergradient needs the offline transforms (or Reptile
outside the loop, as HyperDistill does). Each online variant is written next to its offline
transform, over the same protocol (:mod:`hyperfunc.transforms.base`).
"""

from .transforms._online import Online, OnlineState
from .transforms.distill import online_distill as distill
from .transforms.forward import online_forward as forward
from .transforms.greedy import online_greedy_accumulate as greedy_accumulate
from .transforms.greedy import online_one_step as one_step
from .transforms.implicit import online_implicit as implicit
from .transforms.langevin import online_langevin as langevin

__all__ = ["Online", "OnlineState", "distill", "forward", "greedy_accumulate", "implicit", "langevin", "one_step"]
