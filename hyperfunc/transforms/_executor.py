r"""Executors: how a bound problem's operations run.

An algorithm reaches the inner steps and the outer loss only through its :class:`~.base.Bound`,
whose calls delegate to one *executor*. The interface (``Executor``) is the operations an
algorithm needs, each on the bound problem ``bound`` (its hyperparameters ``bound.h``, its
prepared batches ``bound.prep``, its outer batch):

======================================================  =================================================
``prepare(bound) -> Prepared``                          ``prepare`` evaluated once, with its VJP
``run(bound, s, b, start, stop) -> (s, b)``             steps ``start..stop-1``
``run_vjp(bound, s, b, start, stop)``                   the same and ``pull(ct_s) -> (ct_s, HyperCotangent)``
``run_outer_vjp(bound, s, b, start, stop)``             the steps, :math:`L_{out}` after them and one VJP
``run_jvp(bound, s, b, Z, E, Zd, start, stop)``         the steps and their tangents (forward mode)
``outer_vjp(bound, s, b, with_h) -> (loss, α, direct)``  :math:`L_{out}`, its gradients in ``s`` and λ
``scan_blocks(bound, block, b, carry, start, stop, shared)``  a transform's per-step recursion
``piece(bound, fn, b, per_task, shared)``               a transform's own piece of math
``call(hg, args) -> (HyperGrad, aux)``                  a whole hypergradient call
``reverse_segment(bound, s, b, start, stop)``             an exact reverse pass's default segment length
======================================================  =================================================

:data:`EAGER` runs them as written, with the math of :mod:`._primitives`; ``hf.compile`` hands a
transform its compiled executor (``hyperfunc.compile``), which runs the same primitives inside
compiled kernels. No transform knows which one it runs on.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .._memory import PeakBytes
from .._rng import rng_state, set_rng_state
from .._torch import tree_leaves, vmap_sizes
from .._tree import Leaves, add, scale
from ._primitives import Layout, prepare_vjp, steps, steps_jvp, steps_outer_vjp, steps_vjp
from ._primitives import outer_vjp as _outer_vjp


class HyperCotangent(NamedTuple):
    """A cotangent on the hyperparameters ``h`` and on the prepared batches ``d``, kept together so
    that no transform can drop the ``prepare`` term; :meth:`Bound.finish` pulls ``d`` back."""

    h: Leaves
    d: Leaves

    def plus(self, other: HyperCotangent) -> HyperCotangent:
        return HyperCotangent(add(self.h, other.h), add(self.d, other.d))

    def times(self, a: Any) -> HyperCotangent:
        return HyperCotangent(scale(a, self.h), scale(a, self.d))


class Prepared(NamedTuple):
    """The prepared inner batches: their floating leaves ``d`` (differentiated), their other tensors, their
    layout (``rebuild(d)`` reassembles them) and prepare's pullback ``vjp(ct_d) -> (ct_h,)`` (None: not kept)."""

    d: Leaves
    others: Leaves
    layout: Layout
    vjp: Optional[Any]

    def rebuild(self, d: Leaves) -> Any:
        return self.layout.rebuild(d, self.others)


def cotangent_pull(pull: Any) -> Any:
    """``pull(ct_s) -> (ct_s, ct_h, ct_d)`` as ``pull(ct_s) -> (ct_s, HyperCotangent(ct_h, ct_d))``."""

    def cotangents(ct_s: Leaves) -> tuple[Leaves, HyperCotangent]:
        ct_s, ct_h, ct_d = pull(ct_s)
        return ct_s, HyperCotangent(ct_h, ct_d)

    return cotangents


#: the bytes of graph an exact reverse pass keeps alive at a time when its transform sets no segment length
GRAPH_BUDGET = 64 * 2**20
#: the input structures whose step measurement a hypergradient function keeps (the oldest is dropped first)
MEASURED_STRUCTURES = 64


class Eager:
    """The executor that runs every operation as written: the primitives on the bound problem's tensors,
    a scan as one Python call over its whole range, a piece as a call of its function."""

    def prepare(self, bound) -> Prepared:
        if bound.loop.prepare is None:
            layout, d, others = Layout.of(bound.batches, False)
            return Prepared(d, others, layout, None)
        return Prepared(*prepare_vjp(bound.loop, bound.hkeys, bound.h, bound.batches))

    def run(self, bound, s: Leaves, b: Any, start: int, stop: int) -> tuple[Leaves, Any]:
        prep = bound.prep
        return steps(bound.statics(), s, b, bound.h, prep.d, prep.others, start, stop - start, start)

    def run_vjp(self, bound, s: Leaves, b: Any, start: int, stop: int):
        prep = bound.prep
        out, pull = steps_vjp(bound.statics(), s, b, bound.h, prep.d, prep.others, start, stop - start, start)
        return out, cotangent_pull(pull)

    def run_outer_vjp(self, bound, s: Leaves, b: Any, start: int, stop: int):
        prep = bound.prep
        loss, final, ct_s, ct_h, ct_d = steps_outer_vjp(
            bound.statics(), s, b, bound.h, prep.d, prep.others, bound.outer_batch, start, stop - start, start
        )
        return loss, final, ct_s, HyperCotangent(ct_h, ct_d)

    def run_jvp(self, bound, s: Leaves, b: Any, Z: Leaves, E: Leaves, Zd: Leaves, start: int, stop: int):
        """One step at a time: memory O(H·|s|) plus one step's graph."""
        p, prep = bound.statics(), bound.prep
        for i in range(stop - start):  # not range(start, stop): a traced start (an online t) stays symbolic
            s, b, Z = steps_jvp(p, s, b, bound.h, prep.d, prep.others, start + i, 1, Z, E, Zd, start + i)
        return s, b, Z

    def outer_vjp(self, bound, s: Leaves, b: Any, with_h: bool):
        loss, alpha, ct_h = _outer_vjp(bound.statics(), s, b, bound.h, bound.outer_batch, with_h)
        return loss, alpha, (HyperCotangent(ct_h, bound.zeros_d()) if with_h else None)

    def scan_blocks(self, bound, name: str, block: Any, b: Any, carry: tuple, start: int, stop: int, shared: tuple):
        b, *carry = block(bound, b, start, stop - start, *carry, *shared)
        return b, tuple(carry)

    def piece(self, bound, name: str, fn: Any, b: Any, per_task: tuple, shared: tuple) -> Leaves:
        return tuple(fn(bound, b, *per_task, *shared))

    def call(self, hg, args: tuple) -> tuple:
        return hg.outcome(*args)

    def reverse_segment(self, bound, s: Leaves, b: Any, start: int, stop: int) -> Optional[int]:
        """Steps per recomputed segment of an exact reverse pass over steps ``start..stop-1`` whose transform
        sets none: as many as keep the graphs alive at a time within :data:`GRAPH_BUDGET`, at least one.

        The size of one step's graph is measured on step ``start``, run once more without a graph: the peak
        bytes its operations allocate (:class:`~hyperfunc._memory.PeakBytes`; the gradient's forward and
        backward, which is what its VJP keeps). It is measured once per input structure (the shapes, dtypes
        and devices of the state, buffers, hyperparameters and batches, and the ``vmap`` batch sizes) and
        kept in :attr:`~.base.Bound.step_bytes`, which the calls of one hypergradient function share (the
        last :data:`MEASURED_STRUCTURES` structures): a later call with the same structure measures nothing.

        On a model-scale step (Conv-4 MAML: hundreds of MiB) that is one step: the forward keeps every state
        and no graph, the reverse recomputes one step's graph at a time (one more gradient evaluation per
        step, as TESLA, Cui et al. 2023). On a small one (an MLP head) the whole graph fits and nothing is
        recomputed. None (one segment, no measurement) while ``torch.compile`` traces: its partitioner
        chooses what to recompute, and a recomputed segment's random state cannot be replayed there.

        Cost: on a structure's first call, the measured step's gradient once more under a Python dispatch
        mode (ANIL sinusoids at T = 10, 10 tasks: 14% of a call)."""
        if torch.compiler.is_compiling() or stop - start <= 1:
            return None
        key = _structure(bound, s, b)
        if key not in bound.step_bytes:
            before = rng_state(s)
            with PeakBytes() as measured:
                self.run(bound, s, b, start, start + 1)
            set_rng_state(before)  # the measured step's draws (dropout) are the real step's
            if len(bound.step_bytes) >= MEASURED_STRUCTURES:  # bounded, for calls whose shapes keep changing
                del bound.step_bytes[next(iter(bound.step_bytes))]
            bound.step_bytes[key] = measured.peak
        return max(1, min(stop - start, GRAPH_BUDGET // max(bound.step_bytes[key], 1)))


def _structure(bound, s: Leaves, b: Any) -> tuple:
    """What one step's graph size depends on: the shape, dtype and device of every tensor it reads, and the
    batch size of every ``vmap`` level around the call."""
    leaves = tree_leaves((s, b, bound.h, bound.prep.d, bound.prep.others))
    return vmap_sizes(), tuple((tuple(x.shape), x.dtype, x.device) for x in leaves if torch.is_tensor(x))


#: The eager executor (stateless: one serves every transform).
EAGER = Eager()
