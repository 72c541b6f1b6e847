r"""The compiled executor: a bound problem's operations run on compiled kernels, k steps per kernel.

``hf.compile(hg, segment=k)`` hands a transform a :class:`Compiled` executor. Its kernels are the
primitives of :mod:`hyperfunc.transforms._primitives` on flat inputs (the kernel builders below),
compiled once per kernel kind, segment length and input signature by :mod:`._kernels`, and reused
for every segment and every call. The step index enters a kernel as a tensor, so no segment
recompiles; so do a scan's or a piece's Python ints (counts such as T), so another horizon traces
the same graphs. A whole call is traced too (:mod:`._traced`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase

from .._rng import rng_state
from .._tree import Keys, Leaves, build, keys_of
from ..transforms import _primitives as primitives
from ..transforms._executor import EAGER, HyperCotangent, Prepared
from ..transforms._primitives import Layout, Statics, split
from ..transforms.base import Bound
from ._closures import fingerprint
from ._kernels import Kernel, Segments, check_no_draws
from ._traced import one_kernel, program, traced_call, traced_call_over_tasks


class Structure(NamedTuple):
    """What a kernel needs to know about one call beyond its tensors (all of it static)."""

    pkeys: Keys
    hkeys: Keys
    bkeys: Any  # the buffer keys, or None for no buffers
    n_state: int

    @property
    def n_buffers(self) -> int:
        return 0 if self.bkeys is None else len(self.bkeys)


def buffers_in(bkeys: Any, b: Leaves) -> Any:
    return () if bkeys is None else build(bkeys, b)


def buffers_out(bkeys: Any, b: Any) -> Leaves:
    return () if bkeys is None else tuple(b[k] for k in bkeys)


def step_index(s: Leaves, a: int) -> torch.Tensor:
    """The step index ``a`` as a tensor on the state's device (a kernel input: no recompile per segment)."""
    return torch.full((), a, dtype=torch.int64, device=s[0].device)


# -- kernels: the primitives on flat inputs -------------------------------------------------------
def _inputs(st: Structure, layout: Layout) -> tuple:
    """The group sizes of a segment kernel's flat inputs: state, buffers, hparams, d, other batch leaves."""
    n_d = sum(1 for f in layout.diff if f)
    n_o = sum(1 for f in layout.diff if f is False)
    return st.n_state, st.n_buffers, len(st.hkeys), n_d, n_o


def segment_map(p: Statics, st: Structure, n: int) -> Kernel:
    """``(s, b, h, d, others, t0) -> (s', b')``: ``n`` steps from step index ``t0`` (a tensor)."""
    sizes = _inputs(st, p.layout)

    def kernel(*flat):
        s, b, h, d, others, (t0,) = split(flat, *sizes)
        s, b = primitives.steps(p, s, buffers_in(st.bkeys, b), h, d, others, t0, n)
        return (*s, *buffers_out(st.bkeys, b))

    return kernel


def segment_vjp(p: Statics, st: Structure, n: int) -> Kernel:
    """``(s, b, h, d, others, t0, ct_s', acc_h, acc_d) -> (ct_s, acc_h + ct_h, acc_d + ct_d)``: the segment's VJP
    (its forward recomputed), the cotangents on λ and d accumulated inside the kernel. ``acc_d`` is
    empty unless the loop is full-batch; otherwise ``ct_d`` (the window's cotangent) is returned as is."""
    sizes = _inputs(st, p.layout)
    n_d = sizes[3]

    def kernel(*flat):
        s, b, h, d, others, (t0,), ct, acc_h, acc_d = split(flat, *sizes, 1, st.n_state, len(st.hkeys))
        _, pull = primitives.steps_vjp(p, s, buffers_in(st.bkeys, b), h, d, others, t0, n)
        ct_s, ct_h, ct_d = pull(ct)
        if len(acc_d) == n_d:
            ct_d = tuple(a + x for a, x in zip(acc_d, ct_d))
        return (*ct_s, *(a + x for a, x in zip(acc_h, ct_h)), *ct_d)

    return kernel


def segment_jvp(p: Statics, st: Structure, n: int) -> Kernel:
    r"""``(s, b, h, d, others, t0, Z, E, Zd) -> (s', b', Z')``: the segment map and its tangents
    :math:`Z' = A Z + B_\lambda E + B_d Z_d` (one row per hyperparameter direction)."""
    sizes = _inputs(st, p.layout)

    def kernel(*flat):
        s, b, h, d, others, (t0,), Z, E, Zd = split(flat, *sizes, 1, st.n_state, sizes[2])
        s, b, Z = primitives.steps_jvp(p, s, buffers_in(st.bkeys, b), h, d, others, t0, n, Z, E, Zd)
        return (*s, *buffers_out(st.bkeys, b), *Z)

    return kernel


def outer_vjp_kernel(p: Statics, st: Structure, outer_layout: Layout, with_h: bool) -> Kernel:
    """``(s, b, h, batch) -> (L_out, α[, ct_h])``: the outer loss and its gradients."""

    def kernel(*flat):
        s, b, h, batch = split(flat, st.n_state, st.n_buffers, len(st.hkeys))
        batch = outer_layout.rebuild((), batch)
        loss, alpha, ct_h = primitives.outer_vjp(p, s, buffers_in(st.bkeys, b), h, batch, with_h)
        return (loss, *alpha, *(ct_h or ()))

    return kernel


def segment_outer_vjp(p: Statics, st: Structure, outer_layout: Layout, n: int) -> Kernel:
    r"""``(s, b, h, d, others, t0, outer batch) -> (L_out, s', b', ct_s, ct_h, ct_d)``: the last segment, the
    outer loss after it and their VJP in one kernel, so the segment's forward runs once (a
    :func:`segment_map` then a :func:`segment_vjp` run it twice)."""
    sizes = _inputs(st, p.layout)

    def kernel(*flat):
        s, b, h, d, others, (t0,), batch = split(flat, *sizes, 1)
        batch = outer_layout.rebuild((), batch)
        loss, (s, b), *cts = primitives.steps_outer_vjp(p, s, buffers_in(st.bkeys, b), h, d, others, batch, t0, n)
        return (loss, *s, *buffers_out(st.bkeys, b), *(x for ct in cts for x in ct))

    return kernel


def prepare_kernel(loop: Any, hkeys: Keys, raw: Layout) -> Kernel:
    """``(h, batch leaves) -> (d, others)``: ``prepare``'s output as flat leaves (its floats ``d`` first)."""

    def kernel(*flat):
        h, leaves = split(flat, len(hkeys))
        d, others = primitives.prepare(loop, hkeys, h, raw.rebuild((), leaves), [])
        return (*d, *others)

    return kernel


def prepare_vjp_kernel(loop: Any, hkeys: Keys, raw: Layout, n_leaves: int) -> Kernel:
    """``(h, batch leaves, ct_d) -> ct_h``: the pullback of the prepared floats (the forward recomputed)."""

    def kernel(*flat):
        h, leaves, ct_d = split(flat, len(hkeys), n_leaves)
        pull = primitives.prepare_vjp(loop, hkeys, h, raw.rebuild((), leaves))[-1]
        return tuple(pull(ct_d)[0])

    return kernel


def piece_kernel(bound: Bound, fn: Callable, st: Structure, outer_layout: Layout, sizes: tuple) -> Kernel:
    """``fn(bound, b, *groups)`` on a bound problem rebuilt from the flat inputs, which runs eagerly."""
    loop, outer_loss, exact_init, layout = bound.loop, bound.outer_loss, bound.exact_init, bound.prep.layout
    n_groups = len(sizes) - 4  # per_task and shared

    def kernel(*flat):
        b, *groups = split(flat, *sizes)
        groups, (h, d, others, outer) = groups[:n_groups], groups[n_groups:]
        batches, b, outer = layout.rebuild(d, others), buffers_in(st.bkeys, b), outer_layout.rebuild((), outer)
        prepared = Prepared(d, others, layout, None)
        one = Bound(loop, outer_loss, st.hkeys, st.pkeys, h, None, batches, outer, b, exact_init, EAGER, prepared)
        return tuple(fn(one, b, *groups))

    return kernel


def _counts(s: Leaves, groups: tuple) -> tuple:
    """Groups of leaves with every Python int (a count, a step) as an int64 tensor: one kernel for every value."""
    return tuple(tuple(step_index(s, x) if isinstance(x, int) else x for x in group) for group in groups)


# -- the executor -----------------------------------------------------------------------------------
class Compiled:
    """The executor ``hf.compile`` hands a transform: every operation of the protocol on compiled kernels
    (``segments``: the segment length, the compiler and the kernels built so far)."""

    def __init__(self, segments: Segments):
        self.segments = segments

    def __repr__(self) -> str:
        return f"Compiled(segment={self.segments.size})"

    # -- whole calls ----------------------------------------------------------------------------
    def _traced(self, hg: Any) -> tuple[Callable, Callable]:
        """``(outcome, compile)`` of a call: with at most k inner steps the eager algorithm compiled as one
        kernel, else the algorithm on its kernels traced as a program."""
        if hg.loop.steps <= self.segments.size:
            return replace(hg, executor=EAGER).outcome, one_kernel
        return hg.outcome, program

    def _check_closures(self, loop: Any, outer_loss: Any, params0: Any) -> None:
        args = loop.optimizer.args.values()
        init = params0 if callable(params0) else None  # a TensorDict params0 is an input, not a closure
        fp = fingerprint(loop.inner_loss, outer_loss, loop.prepare, init, *(v for v in args if callable(v)))
        self.segments.check_closures(fp)

    def reverse_segment(self, bound: Bound, s: Leaves, b: Any, start: int, stop: int) -> None:
        """None: an exact reverse pass hands :meth:`run_outer_vjp` its whole range, which the kernels segment."""
        return None

    def call(self, hg: Any, args: tuple) -> tuple:
        self._check_closures(hg.loop, hg.outer_loss, args[1] if len(args) > 1 else None)
        return traced_call(*self._traced(hg), self.segments, args)

    def over_tasks(self, hg: Any, in_dims: Any, args: tuple) -> Any:
        """``torch.func.vmap(hg, in_dims)(*args)`` traced batched over the tasks and run without entering
        ``vmap`` (what ``hf.vmap`` runs); None when ``args`` or ``in_dims`` are not plain (leave them to
        ``vmap``, which also raises its errors)."""
        if not 4 <= len(args) <= 5:
            return None
        self._check_closures(hg.loop, hg.outer_loss, args[1])
        out = traced_call_over_tasks(*self._traced(hg), self.segments, args, in_dims)
        if out is None:
            return None
        result, aux = out
        return result if hg.output is None else hg.output(result, aux)

    # -- the problem's structure, once per call ------------------------------------------------------
    def structure(self, bound: Bound) -> Structure:
        def make() -> Structure:
            self._check_closures(bound.loop, bound.outer_loss, bound.params0)
            bkeys = keys_of(bound.buffers) if isinstance(bound.buffers, TensorDictBase) else None
            n_state = len(bound.pkeys) * (1 + len(bound.loop.optimizer.buffers))
            return Structure(bound.pkeys, bound.hkeys, bkeys, n_state)

        return bound.memo("structure", make)

    def layout_key(self, bound: Bound) -> tuple:
        return bound.memo("layout key", lambda: bound.prep.layout.key())

    def outer_layout(self, bound: Bound) -> tuple[Layout, Leaves, tuple]:
        """``(layout, tensor leaves, key)`` of the outer batch."""

        def make() -> tuple:
            layout, _, leaves = Layout.of(bound.outer_batch, False)
            return layout, leaves, layout.key()

        return bound.memo("outer", make)

    def chunks(self, start: int, stop: int) -> list[tuple[int, int]]:
        """``(first step, length)`` of the segments covering steps ``start..stop-1``."""
        size = self.segments.size
        return [(a, min(size, stop - a)) for a in range(start, stop, size)]

    def _segment_inputs(self, bound: Bound, s: Leaves, b: Any, a: int, n: int) -> tuple:
        """The inputs every segment kernel starts with (:func:`_inputs`' layout): the state, the buffers, λ,
        the prepared batches' window of steps ``a..a+n-1`` (all of them for a full batch), the index of step ``a``."""
        prep, full = bound.prep, bound.loop.full_batch
        window = tuple(x if full else x[a : a + n] for x in (*prep.d, *prep.others))
        return (*s, *buffers_out(self.structure(bound).bkeys, b), *bound.h, *window, step_index(s, a))

    # -- prepare --------------------------------------------------------------------------------
    def prepare(self, bound: Bound) -> Prepared:
        """``prepare`` and its pullback by two compiled kernels; the first call runs ``prepare`` once eagerly
        to learn its output's layout."""
        if bound.loop.prepare is None:
            return EAGER.prepare(bound)
        self.structure(bound)  # checks the closures before a kernel is looked up
        raw, _, leaves = Layout.of(bound.batches, False)
        key = (raw.key(), bound.hkeys)
        if key not in self.segments.prepared:
            learned: list = []
            primitives.prepare(bound.loop, bound.hkeys, bound.h, bound.batches, learned)
            self.segments.prepared[key] = learned[0]
        layout: Layout = self.segments.prepared[key]
        forward = self.segments.kernel(("prepare", *key), prepare_kernel(bound.loop, bound.hkeys, raw), ())
        out = forward(*bound.h, *leaves)
        n_d = sum(1 for f in layout.diff if f)
        h_and_leaves = len(bound.h) + len(leaves)
        pull = self.segments.kernel(
            ("prepare_vjp", *key),
            prepare_vjp_kernel(bound.loop, bound.hkeys, raw, len(leaves)),
            range(h_and_leaves, h_and_leaves + n_d),
        )
        return Prepared(out[:n_d], out[n_d:], layout, lambda ct_d: (pull(*bound.h, *leaves, *ct_d),))

    # -- the steps ------------------------------------------------------------------------------
    def segment(self, bound: Bound, a: int, n: int, s: Leaves, b: Any) -> tuple[Leaves, Any]:
        """Steps ``a..a+n-1`` by the compiled segment kernel; refuses a loss that draws random numbers."""
        st = self.structure(bound)
        kernel = self.segments.kernel(
            ("map", n, st, self.layout_key(bound)),
            segment_map(bound.statics(), st, n),
            range(st.n_state + st.n_buffers),
        )
        before = rng_state(s)
        out = kernel(*self._segment_inputs(bound, s, b, a, n))
        check_no_draws(before, s)
        return out[: st.n_state], buffers_in(st.bkeys, out[st.n_state :])

    def forward(self, bound: Bound, s: Leaves, b: Any, chunks: list) -> list:
        """The first state of every chunk and the state after the last, by segment kernels."""
        states = [(s, b)]
        for a, n in chunks:
            states.append(self.segment(bound, a, n, *states[-1]))
        return states

    def run(self, bound: Bound, s: Leaves, b: Any, start: int, stop: int) -> tuple[Leaves, Any]:
        return self.forward(bound, s, b, self.chunks(start, stop))[-1]

    def run_vjp(self, bound: Bound, s: Leaves, b: Any, start: int, stop: int):
        """The forward keeps each segment's first state, the pullback runs each segment's VJP kernel (its
        forward recomputed) from the last segment to the first."""
        chunks = self.chunks(start, stop)
        states = self.forward(bound, s, b, chunks)

        def pull(ct_s: Leaves) -> tuple[Leaves, HyperCotangent]:
            ct_d = bound.zeros_d() if bound.loop.full_batch else ()  # accumulated in the kernels
            return self.pull(bound, chunks, states, ct_s, bound.zeros_h(), ct_d, [], start, stop)

        return states[-1], pull

    def run_outer_vjp(self, bound: Bound, s: Leaves, b: Any, start: int, stop: int):
        """The forward of every segment but the last, the last one's fused kernel (:func:`segment_outer_vjp`),
        then the others' VJP kernels. With one-step segments the outer loss has its own kernel instead and
        the last step takes the VJP kernel of every other step: the fused kernel would save one step's
        forward per call, and costs a compile of the step's double backward once more (Conv-4 MAML, one
        task on 2 cores: the first call took 65 s without it against 88 s with it)."""
        chunks = self.chunks(start, stop)
        if not chunks or self.segments.size == 1:
            states = self.forward(bound, s, b, chunks)
            s_last, b_last = states[-1]
            loss, alpha, direct = self.outer_vjp(bound, s_last, b_last, True)
            if not chunks:
                return loss, states[-1], alpha, direct
            acc_d = direct.d if bound.loop.full_batch else ()
            ct_s, cot = self.pull(bound, chunks, states[:-1], alpha, direct.h, acc_d, [], start, stop)
            return loss, states[-1], ct_s, cot
        st, (a, n), (outer_layout, batch, outer_key) = self.structure(bound), chunks[-1], self.outer_layout(bound)
        states = self.forward(bound, s, b, chunks[:-1])
        kernel = self.segments.kernel(
            ("outer vjp", n, st, self.layout_key(bound), outer_key),
            segment_outer_vjp(bound.statics(), st, outer_layout, n),
            range(st.n_state + st.n_buffers),
        )
        s_last, b_last = states[-1]
        out = kernel(*self._segment_inputs(bound, s_last, b_last, a, n), *batch)
        (loss,), final, b_final, ct_s, ct_h, ct_d = split(out, 1, st.n_state, st.n_buffers, st.n_state, len(bound.h))
        acc_d, pieces = (ct_d, []) if bound.loop.full_batch else ((), [ct_d])
        ct_s, cot = self.pull(bound, chunks[:-1], states, ct_s, ct_h, acc_d, pieces, start, stop)
        return loss, (final, buffers_in(st.bkeys, b_final)), ct_s, cot

    def pull(self, bound: Bound, chunks, states, ct_s, ct_h, ct_d, pieces: list, start: int, stop: int):
        """``(ct_s, HyperCotangent)`` after the VJP kernels of ``chunks`` (first states ``states``), from the
        last chunk to the first, starting from ``ct_s`` and the accumulated ``ct_h`` and ``ct_d`` (full batch)
        or the later windows' cotangents ``pieces`` (per-step batches: assembled over ``start..stop-1``)."""
        st, prep, full = self.structure(bound), bound.prep, bound.loop.full_batch
        # per task: the state, buffers, cotangent and accumulators; h, the data and t0 stay as they come
        state_end = st.n_state + st.n_buffers
        data_end = state_end + len(bound.h) + len(prep.d) + len(prep.others) + 1
        n_acc_d = len(prep.d) if full else 0
        per_task = [*range(state_end), *range(data_end, data_end + st.n_state + len(bound.h) + n_acc_d)]
        key = ("vjp", st, self.layout_key(bound))
        for (a, n), (s_a, b_a) in reversed(list(zip(chunks, states))):
            kernel = self.segments.kernel((*key, n), segment_vjp(bound.statics(), st, n), per_task)
            out = kernel(*self._segment_inputs(bound, s_a, b_a, a, n), *ct_s, *ct_h, *ct_d)
            ct_s, ct_h, ct_d_a = split(out, st.n_state, len(bound.h))
            if full:
                ct_d = ct_d_a
            else:
                pieces.insert(0, ct_d_a)
        if not full:
            ct_d = self.assemble_d(bound, pieces, start, stop)
        return ct_s, HyperCotangent(ct_h, ct_d)

    def assemble_d(self, bound: Bound, pieces: list, start: int, stop: int) -> Leaves:
        """The cotangent on ``d`` from the segments' cotangents on their windows (zero outside them)."""
        d = bound.prep.d
        if not pieces or not d:
            return bound.zeros_d()
        parts = zip(*pieces)  # per d leaf, its windows in order
        return tuple(
            torch.cat([torch.zeros_like(x[:start]), *windows, torch.zeros_like(x[stop:])])
            for x, windows in zip(d, parts)
        )

    def run_jvp(self, bound: Bound, s: Leaves, b: Any, Z: Leaves, E: Leaves, Zd: Leaves, start: int, stop: int):
        st, prep = self.structure(bound), bound.prep
        state_end = st.n_state + st.n_buffers
        z_start = state_end + len(bound.h) + len(prep.d) + len(prep.others) + 1
        per_task = [*range(state_end), *range(z_start, z_start + st.n_state)]
        for a, n in self.chunks(start, stop):
            kernel = self.segments.kernel(
                ("jvp", n, st, self.layout_key(bound)), segment_jvp(bound.statics(), st, n), per_task
            )
            Zd_a = Zd if bound.loop.full_batch else tuple(x[:, a : a + n] for x in Zd)
            out = kernel(*self._segment_inputs(bound, s, b, a, n), *Z, *E, *Zd_a)
            s, b, Z = split(out, st.n_state, st.n_buffers)
            b = buffers_in(st.bkeys, b)
        return s, b, Z

    # -- the outer loss, scans and pieces ---------------------------------------------------------
    def outer_vjp(self, bound: Bound, s: Leaves, b: Any, with_h: bool):
        st, (layout, batch, outer_key) = self.structure(bound), self.outer_layout(bound)
        kernel = self.segments.kernel(
            ("outer", with_h, st, outer_key),
            outer_vjp_kernel(bound.statics(), st, layout, with_h),
            range(st.n_state + st.n_buffers),
        )
        loss, alpha, ct_h = split(kernel(*s, *buffers_out(st.bkeys, b), *bound.h, *batch), 1, st.n_state)
        return loss[0], alpha, (HyperCotangent(ct_h, bound.zeros_d()) if with_h else None)

    def scan_blocks(self, bound: Bound, name: str, block: Callable, b: Any, carry: tuple, start, stop, shared):
        """One :meth:`piece` per segment of k steps, ``i0`` a tensor (the piece makes it one, with the
        shared ints), one kernel per block length."""
        st, sizes = self.structure(bound), tuple(map(len, carry))
        for a, n in self.chunks(start, stop):

            def fn(one, b, *groups, n=n):
                b, *carry = block(one, b, groups[-1][0], n, *groups[:-1])
                return (*buffers_out(st.bkeys, b), *(x for group in carry for x in group))

            out = self.piece(bound, f"{name}/{n}", fn, b, carry, (*shared, (a,)))
            b_flat, *rest = split(out, st.n_buffers, *sizes[:-1])
            b, carry = buffers_in(st.bkeys, b_flat), tuple(rest)
        return b, carry

    def piece(self, bound: Bound, name: str, fn: Callable, b: Any, per_task: tuple, shared: tuple) -> Leaves:
        """One compiled kernel per ``name`` and input structure, which runs ``fn`` on a bound rebuilt from its
        flat inputs (with the prepared batches; ``prepare``'s pullback stays with :meth:`Bound.finish`).
        ``b`` and ``per_task`` are expanded over the tasks when they arrive unbatched; ``shared`` (indices,
        a step; Python ints become int64 tensors) are taken as they come."""
        shared = _counts(bound.h, shared)
        st, prep, (outer_layout, outer, outer_key) = self.structure(bound), bound.prep, self.outer_layout(bound)
        sizes = (st.n_buffers, *map(len, per_task), *map(len, shared), len(bound.h), len(prep.d), len(prep.others))
        key = ("piece", name, sizes, st, self.layout_key(bound), outer_key)
        per_task_positions = range(sum(sizes[: 1 + len(per_task)]))
        kernel = self.segments.kernel(key, piece_kernel(bound, fn, st, outer_layout, sizes), per_task_positions)
        groups = (buffers_out(st.bkeys, b), *per_task, *shared, bound.h, prep.d, prep.others, outer)
        return kernel(*(x for group in groups for x in group))
