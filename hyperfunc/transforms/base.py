r"""The one protocol every transform is written against.

A hypergradient call ``hg(hparams, params0, inner_batches, outer_batch, buffers=None)`` is bound
once into a :class:`Bound` problem that exposes the mathematical objects of DESIGN.md as pure
functions of flat tuples of tensors:

- ``h``: the hyperparameter leaves :math:`\lambda`; ``d``: the floating leaves of the prepared
  inner batches (the output of ``prepare``); ``s``: the optimizer state :math:`s_t` (params first,
  then the optimizer's buffers; :meth:`Bound.params` reads the params); ``b``: the module buffers
  (a TensorDict, or None), carried beside ``s`` and never differentiated.
- :meth:`Bound.initial` :math:`s_0(\lambda)`, :meth:`Bound.run` the step map :math:`\Phi`,
  :meth:`Bound.run_vjp` its VJP on :math:`(s, \lambda, d)`, :meth:`Bound.outer_vjp` the outer loss
  and its gradient :math:`\alpha`; forward mode uses :meth:`Bound.run` inside ``torch.func.jvp``.

A transform is an *algorithm* ``algorithm(bound) -> Outcome``: its cotangent on ``(λ, d)`` as one
:class:`HyperCotangent`, and its cotangent on :math:`s_0` (or a statement that its formula has
none). :meth:`Bound.finish` is the single pullback that adds, for every transform, the term
through ``prepare`` (one VJP), the term through a learned initialization :math:`w_0(\lambda)`
(according to the :class:`HyperGradFunction`'s init rule), and returns the buffers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import torch
import torch.utils._pytree as pytree
from tensordict import TensorDictBase

from .._tree import Keys, Leaves, add, build, check_same_keys, check_tensordict, keys_of, leaves_of, scale
from ..loop import InnerLoop, Loss, call_loss, module_buffers
from . import _segments
from ._segments import (
    Layout,
    Segments,
    Structure,
    buffers_in,
    buffers_out,
    check_no_draws,
    rng_state,
    split,
)

if TYPE_CHECKING:
    from .forward import Tangents


class HyperGrad(NamedTuple):
    """What a hypergradient function returns.

    Attributes:
        grads: the hypergradient, a TensorDict with exactly the keys and shapes of ``hparams``.
        loss: the outer loss at the final inner params (scalar tensor).
        params: the final inner params :math:`w_T` (TensorDict).
        buffers: the module buffers after the ``T`` inner steps; ``()`` when ``hg`` got none (``vmap``
            cannot return None; passing ``()`` back as ``buffers=`` means "no buffers" too).
    """

    grads: TensorDictBase
    loss: torch.Tensor
    params: TensorDictBase
    buffers: Any = ()


def check_transform_args(loop: Any, outer_loss: Any) -> None:
    if not isinstance(loop, InnerLoop):
        raise TypeError(f"loop must be a hyperfunc.InnerLoop, got {type(loop).__name__}")
    if not callable(outer_loss):
        raise TypeError(f"outer_loss must be a function (params, hparams, batch) -> scalar, got {outer_loss!r}")


def check_one_device(a: Leaves, a_name: str, b: Leaves, b_name: str) -> None:
    """Raise unless every tensor of ``a`` and ``b`` lives on one device."""
    devices = {x.device for x in a} | {x.device for x in b}
    if len(devices) > 1:
        raise ValueError(
            f"{a_name} and {b_name} must be on one device, got {sorted(map(str, devices))}; move them with .to(device)"
        )


def refuse_loop(value: Any, call: str) -> None:
    """A factory called as a transform (``hf.truncate(loop, outer)``) gets the call form in its error."""
    if isinstance(value, InnerLoop):
        raise TypeError(f"got an InnerLoop where {call} takes its arguments: call it as {call}(loop, outer_loss)")


def detached(tree: Any) -> Any:
    """Every tensor of a pytree detached (no graph is recorded through a user's batch)."""
    return pytree.tree_map(lambda x: x.detach() if torch.is_tensor(x) else x, tree)


class HyperCotangent(NamedTuple):
    """A cotangent on the hyperparameters ``h`` and on the prepared batches ``d``, kept together so
    that no transform can drop the ``prepare`` term; :meth:`Bound.finish` pulls ``d`` back."""

    h: Leaves
    d: Leaves

    def plus(self, other: HyperCotangent) -> HyperCotangent:
        return HyperCotangent(add(self.h, other.h), add(self.d, other.d))

    def times(self, a: Any) -> HyperCotangent:
        return HyperCotangent(scale(a, self.h), scale(a, self.d))


class InitTerm(enum.Enum):
    """What an algorithm says about the term through :math:`s_0` instead of a cotangent."""

    ABSENT = "its formula has no w_0 term"
    INCLUDED = "already inside the cotangent on λ (forward mode)"


class Outcome(NamedTuple):
    """What an algorithm returns: the cotangent on ``(λ, d)``, the outer loss, the final optimizer
    state and buffers, ``ct_s0`` (the cotangent on :math:`s_0`, or an :class:`InitTerm`), and the
    algorithm's diagnostics (``aux``, handed to the transform's ``output``)."""

    cot: HyperCotangent
    loss: torch.Tensor
    s: Leaves
    b: Any
    ct_s0: Union[Leaves, InitTerm]
    aux: Any = None


class Prepared(NamedTuple):
    """The prepared inner batches: floating leaves ``d``, ``rebuild(d) -> batches``, and prepare's VJP."""

    d: Leaves
    rebuild: Callable[[Leaves], Any]
    vjp: Optional[Callable]


#: ``algorithm(bound) -> Outcome``: a transform's math over the protocol.
Algorithm = Callable[["Bound"], Outcome]
#: ``init_rule(bound, outcome) -> cotangent on s_0``, for an algorithm without an exact w_0 term.
InitRule = Callable[["Bound", Outcome], Leaves]


@dataclass(frozen=True)
class Bound:
    """One hypergradient call's problem in flat form (see the module docstring)."""

    loop: InnerLoop
    outer_loss: Loss
    hkeys: Keys
    pkeys: Keys
    h: Leaves
    params0: Any
    batches: Any
    outer_batch: Any
    buffers: Any  # a TensorDict, or () for none
    exact_init: bool = True
    segments: Optional[Segments] = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def bind(
        cls,
        loop: InnerLoop,
        outer_loss: Loss,
        hparams: Any,
        params0: Any,
        inner_batches: Any,
        outer_batch: Any,
        buffers: Any = None,
        exact_init: bool = True,
        segments: Optional[Segments] = None,
    ) -> Bound:
        """Validate the inputs of a hypergradient call and flatten them (inputs are detached, never mutated)."""
        check_tensordict(hparams, "hparams")
        hparams = hparams.detach()
        loop._check_batches(inner_batches)
        # inputs are detached: a batch that requires grad must not record the trajectory
        inner_batches, outer_batch = detached(inner_batches), detached(outer_batch)
        if isinstance(params0, TensorDictBase):
            check_tensordict(params0, "params0")
            params0 = p0 = params0.detach()
        elif callable(params0):
            p0 = params0(hparams)
            check_tensordict(p0, "params0(hparams)")
        else:
            raise TypeError(
                f"params0 must be a TensorDict or a function hparams -> TensorDict, got {type(params0).__name__}"
            )
        if buffers is None or (isinstance(buffers, tuple) and not buffers):
            buffers = ()  # "no buffers" (torch.func and vmap refuse None as an output)
        elif isinstance(buffers, TensorDictBase):
            buffers = buffers.detach()
        else:
            raise TypeError(
                f"buffers must be None or a TensorDict (the second output of hf.module_state), "
                f"got {type(buffers).__name__}"
            )
        hkeys = keys_of(hparams)
        if not hkeys:
            raise ValueError("hparams is empty: give at least one hyperparameter (a TensorDict with a tensor leaf)")
        h = leaves_of(hparams, hkeys)
        check_one_device(h, "hparams", leaves_of(p0, keys_of(p0)), "params0")
        return cls(
            loop, outer_loss, hkeys, keys_of(p0), h, params0, inner_batches, outer_batch, buffers, exact_init, segments
        )

    # -- the pieces, as pure functions of flat tuples -------------------------------------------
    def hparams(self, h: Leaves) -> TensorDictBase:
        return build(self.hkeys, h)

    def params(self, s: Leaves) -> Leaves:
        """The params :math:`w` held in an optimizer state :math:`s` (the rest are optimizer buffers)."""
        return s[: len(self.pkeys)]

    @property
    def learned_init(self) -> bool:
        """True when ``params0`` is a function of the hyperparameters."""
        return not isinstance(self.params0, TensorDictBase)

    def init_state(self, h: Leaves) -> Leaves:
        r"""The flat initial state :math:`s_0 = \text{opt.init}(w_0(\lambda))`."""
        if self.learned_init:
            p0 = self.params0(self.hparams(h))
            check_same_keys(p0, self.pkeys, "params0(hparams)", "its first evaluation")
        else:
            p0 = self.params0
        return self.loop.optimizer._init_leaves(leaves_of(p0, self.pkeys))

    def initial(self) -> Leaves:
        r""":math:`s_0` at the bound hyperparameters."""
        return self.init_state(self.h)

    def run(self, s: Leaves, b: Any, h: Leaves, batches: Any, start: int, stop: int) -> tuple[Leaves, Any]:
        """Inner steps ``start..stop-1`` from ``(s, b)`` on prepared ``batches``: ``(s, b)`` after them."""
        if self.segments is not None:
            layout, d, others = Layout.of(batches, self.loop.prepare is not None)
            for a, n in self.chunks(start, stop):
                s, b = self.segment(layout, a, n, s, b, h, d, others)
            return s, b
        hparams = self.hparams(h)
        for i in range(stop - start):  # not range(start, stop): a traced start (an online t) stays symbolic
            t = start + i
            s, b = self.loop._step(self.pkeys, s, b, hparams, self.loop._batch_at(batches, t), t)
        return s, b

    def step_on(self, s: Leaves, b: Any, h: Leaves, batch: Any, t: int) -> tuple[Leaves, Any]:
        """One inner step (optimizer step index ``t``) on an explicit ``batch``."""
        return self.loop._step(self.pkeys, s, b, self.hparams(h), batch, t)

    def run_vjp(self, s: Leaves, b: Any, start: int, stop: int):
        r"""Steps ``start..stop-1`` and their VJP: ``((s', b'), pull)`` with
        ``pull(ct_s') -> (ct_s, HyperCotangent)``, the products :math:`\bar s A` and :math:`\bar s B`."""
        if self.segments is not None:
            return self.segments_vjp(s, b, start, stop)
        return self._vjp(lambda s, h, d: self.run(s, b, h, self.prep.rebuild(d), start, stop), s)

    def run_outer_vjp(self, s: Leaves, b: Any, start: int, stop: int):
        r"""Steps ``start..stop-1``, the outer loss after them and its VJP through them:
        ``(loss, (s', b'), ct_s, cot)`` with ``ct_s`` the cotangent on ``s`` and ``cot`` the direct term
        :math:`\partial_\lambda L_{out}` plus the steps' products :math:`\alpha A \cdots B` (a
        :class:`HyperCotangent`). It is :meth:`run_vjp` followed by :meth:`outer_vjp` and the pullback
        of :math:`\alpha`; under ``hf.compile`` the last segment, the outer loss and their VJP are one
        kernel, so that segment's forward runs once instead of twice."""
        if self.segments is not None:
            return self.segments_run_outer_vjp(s, b, start, stop)
        (final, b_final), pull = self.run_vjp(s, b, start, stop)
        loss, alpha, direct = self.outer_vjp(final, b_final)
        ct_s, cot = pull(alpha)
        return loss, (final, b_final), ct_s, direct.plus(cot)

    def step_vjp(self, s: Leaves, b: Any, t: Any):
        """One step (index ``t``: an int, or a tensor inside a :meth:`scan` kernel) and its VJP, as
        :meth:`run_vjp`; always eager (under ``hf.compile`` it runs inside a scan's kernel)."""

        return self._vjp(lambda s, h, d: self.step_on(s, b, h, self.loop._batch_at(self.prep.rebuild(d), t), t), s)

    def _vjp(self, fn: Callable, s: Leaves):
        s_new, vjp_fn, b_new = torch.func.vjp(fn, s, self.h, self.prep.d, has_aux=True)

        def pull(ct_s: Leaves) -> tuple[Leaves, HyperCotangent]:
            ct_s, ct_h, ct_d = vjp_fn(ct_s)
            return ct_s, HyperCotangent(ct_h, ct_d)

        return (s_new, b_new), pull

    def scan(self, name: str, body: Callable, b: Any, carry: tuple, start: int, stop: int, shared: tuple = ()):
        """``(b, carry)`` after ``body(bound, b, i, *carry, *shared) -> (b, *carry)`` for ``i = start..stop-1``
        (``carry``, ``shared``: tuples of leaf tuples): a transform's per-step recursion (DrMAD's backward
        travel, greedy accumulation). Eager: a Python loop, ``i`` an int. Under ``hf.compile``: one
        :meth:`piece` per segment of k iterations, ``i`` a tensor, so ``body`` must not branch on ``i``
        in Python, and must close over static values only (``name`` must name every static choice).
        A ``shared`` leaf may be a Python int (a count such as T): an int eagerly, an int64 tensor in a
        kernel, so that one kernel serves every value."""

        def block(bound, b, i0, n, *groups):
            state, rest = groups[: len(carry)], groups[len(carry) :]
            for j in range(n):
                b, *state = body(bound, b, i0 + j, *state, *rest)
            return (b, *state)

        return self.scan_blocks(name, block, b, carry, start, stop, shared)

    def scan_blocks(self, name: str, block: Callable, b: Any, carry: tuple, start: int, stop: int, shared: tuple = ()):
        """:meth:`scan` for a recursion that works on several steps at once (HPO-SGLD's direct term, one
        VJP per block of samples): ``block(bound, b, i0, n, *carry, *shared) -> (b, *carry)`` runs steps
        ``i0..i0+n-1``, ``n`` a Python int. Eager: one block over ``start..stop-1``, ``i0`` an int. Under
        ``hf.compile``: one block per segment of k steps, ``i0`` a tensor, one kernel per block length."""
        if self.segments is None:
            b, *carry = block(self, b, start, stop - start, *carry, *shared)
            return b, tuple(carry)
        shared = tuple(tuple(step_index(self.h, x) if isinstance(x, int) else x for x in group) for group in shared)
        st, sizes = self.structure(), tuple(map(len, carry))
        for a, n in self.chunks(start, stop):

            def fn(bound, b, *groups, n=n):
                b, *carry = block(bound, b, groups[-1][0], n, *groups[:-1])
                return (*buffers_out(st.bkeys, b), *(x for group in carry for x in group))

            out = self.piece(f"{name}/{n}", fn, b, carry, (*shared, (step_index(self.h, a),)))
            b, *carry = split(out, st.n_buffers, *sizes[:-1])
            b = buffers_in(st.bkeys, b)
        return b, tuple(carry)

    def run_jvp(self, s: Leaves, b: Any, Z: Leaves, tangents: Tangents, start: int, stop: int):
        r"""Steps ``start..stop-1`` pushed forward: ``(s', b', Z')`` with :math:`Z' = A Z + B_\lambda E + B_d Z_d`
        for every row of ``Z`` (forward mode; ``tangents``: the directions :math:`E` in λ, the prepared
        floats ``d`` with their tangents :math:`Z_d`). Eager: one step at a time (memory O(H·|s|))."""
        if self.segments is not None:
            return self.segments_jvp(s, b, Z, tangents, start, stop)
        for i in range(stop - start):

            def fn(s, h, d, b=b, t=start + i):
                return self.run(s, b, h, tangents.rebuild(d), t, t + 1)

            s, Z, b = _segments.push_forward(fn, (s, self.h, tangents.d), (Z, tangents.E, tangents.Zd))
        return s, b, Z

    def outer(self, s: Leaves, b: Any, h: Leaves) -> torch.Tensor:
        r""":math:`L_{out}(w, \lambda; D_{val})` for the params held in state ``s`` (its buffer update is dropped)."""
        params = build(self.pkeys, self.params(s))
        return call_loss(self.outer_loss, "outer_loss", params, self.hparams(h), self.outer_batch, module_buffers(b))[0]

    def outer_vjp(self, s: Leaves, b: Any, with_h: bool = True):
        r"""``(loss, α, direct)``: :math:`L_{out}`, :math:`\alpha = \partial L_{out}/\partial s` and, when
        ``with_h``, the direct term :math:`\partial_\lambda L_{out}` as a :class:`HyperCotangent` (else None,
        which skips the backward through λ)."""
        if self.segments is not None:
            return self.segments_outer_vjp(s, b, with_h)
        if with_h:
            loss, fn = torch.func.vjp(lambda s, h: self.outer(s, b, h), s, self.h)
            alpha, ct_h = fn(torch.ones_like(loss))
            return loss, alpha, HyperCotangent(ct_h, self.zeros_d())
        loss, fn = torch.func.vjp(lambda s: self.outer(s, b, self.h), s)
        return loss, fn(torch.ones_like(loss))[0], None

    def outer_grad_h(self, samples: list, weights: list) -> Leaves:
        r""":math:`\partial_\lambda \sum_j w_j L_{out}(s_j, \lambda)` over ``samples = [(s_j, b_j), ...]`` by one
        VJP: the outer loss is vmapped over the samples with λ unbatched, so whatever depends on λ and the
        batch alone (ANIL's features) is computed once and pulled back once, with the summed cotangent.
        Memory: the outer loss's activations for every sample."""
        states = tuple(torch.stack(x) for x in zip(*(s for s, _ in samples)))
        bufs = [b for _, b in samples]
        bufs = torch.stack(bufs) if isinstance(bufs[0], TensorDictBase) else ()

        def total(h: Leaves) -> torch.Tensor:
            # randomness='different': an outer loss with dropout draws a mask per sample, as one call per sample did
            losses = torch.func.vmap(lambda s, b: self.outer(s, b, h), randomness="different")(states, bufs)
            return sum(w * loss for w, loss in zip(weights, losses.unbind(0)))

        return torch.func.grad(total)(self.h)

    # -- compiled segment kernels (hf.compile; see _segments) ---------------------------------------
    def structure(self) -> Structure:
        bkeys = keys_of(self.buffers) if isinstance(self.buffers, TensorDictBase) else None
        return Structure(self.pkeys, self.hkeys, bkeys, len(self.pkeys) * (1 + len(self.loop.optimizer.buffers)))

    def chunks(self, start: int, stop: int) -> list[tuple[int, int]]:
        """``(first step, length)`` of the segments covering steps ``start..stop-1``."""
        return [(a, min(self.segments.size, stop - a)) for a in range(start, stop, self.segments.size)]

    def window(self, leaves: Leaves, a: int, n: int) -> Leaves:
        """The batch leaves of steps ``a..a+n-1`` (all of them for a full batch)."""
        return tuple(leaves) if self.loop.full_batch else tuple(x[a : a + n] for x in leaves)

    def segment(self, layout: Layout, a: int, n: int, s: Leaves, b: Any, h: Leaves, d: Leaves, others: Leaves):
        """Steps ``a..a+n-1`` by the compiled segment kernel; refuses a loss that draws random numbers."""
        st = self.structure()
        per_task = range(st.n_state + st.n_buffers)
        kernel = self.segments.kernel(
            ("map", n, st, layout.key()), _segments.segment_map(self.loop, st, layout, n), per_task
        )
        before = rng_state(s)
        out = kernel(*self._segment_inputs(s, b, h, d, others, a, n))
        check_no_draws(before, s)
        return out[: st.n_state], buffers_in(st.bkeys, out[st.n_state :])

    def _segment_inputs(self, s: Leaves, b: Any, h: Leaves, d: Leaves, others: Leaves, a: int, n: int) -> tuple:
        """The inputs every segment kernel starts with (:func:`_segments._inputs`' layout): the state, the
        buffers, λ, the prepared batches' window of steps ``a..a+n-1`` and the index of step ``a``."""
        window = (*self.window(d, a, n), *self.window(others, a, n))
        return (*s, *buffers_out(self.structure().bkeys, b), *h, *window, step_index(s, a))

    def segments_vjp(self, s: Leaves, b: Any, start: int, stop: int):
        """:meth:`run_vjp` by segment kernels: the forward keeps each segment's first state, the pullback
        runs each segment's VJP kernel (its forward recomputed) from the last segment to the first."""
        chunks = self.chunks(start, stop)
        states = self.segments_forward(s, b, chunks)

        def pull(ct_s: Leaves) -> tuple[Leaves, HyperCotangent]:
            ct_d = self.zeros_d() if self.loop.full_batch else ()  # accumulated in the kernels
            return self.segments_pull(chunks, states, ct_s, self.zeros_h(), ct_d, [], start, stop)

        return states[-1], pull

    def segments_run_outer_vjp(self, s: Leaves, b: Any, start: int, stop: int):
        """:meth:`run_outer_vjp` by segment kernels: the forward of every segment but the last, the last
        one's fused kernel (:func:`_segments.segment_outer_vjp`), then the others' VJP kernels."""
        chunks = self.chunks(start, stop)
        if not chunks:
            loss, alpha, direct = self.segments_outer_vjp(s, b, True)
            return loss, (s, b), alpha, direct
        st, (a, n) = self.structure(), chunks[-1]
        (layout, d, others), (outer_layout, batch) = self.prepared_layout(), self.outer_layout()
        states = self.segments_forward(s, b, chunks[:-1])
        kernel = self.segments.kernel(
            ("outer vjp", n, st, layout.key(), self._cache["outer key"]),
            _segments.segment_outer_vjp(self.loop, self.outer_loss, st, layout, outer_layout, n),
            range(st.n_state + st.n_buffers),
        )
        s_a, b_a = states[-1]
        out = kernel(*self._segment_inputs(s_a, b_a, self.h, d, others, a, n), *batch)
        (loss,), final, b_final, ct_s, ct_h, ct_d = split(out, 1, st.n_state, st.n_buffers, st.n_state, len(self.h))
        acc_d, pieces = (ct_d, []) if self.loop.full_batch else ((), [ct_d])
        ct_s, cot = self.segments_pull(chunks[:-1], states, ct_s, ct_h, acc_d, pieces, start, stop)
        return loss, (final, buffers_in(st.bkeys, b_final)), ct_s, cot

    def segments_forward(self, s: Leaves, b: Any, chunks: list) -> list:
        """The first state of every chunk and the state after the last, by segment kernels."""
        layout, d, others = self.prepared_layout()
        states = [(s, b)]
        for a, n in chunks:
            states.append(self.segment(layout, a, n, *states[-1], self.h, d, others))
        return states

    def segments_pull(
        self, chunks: list, states: list, ct_s: Leaves, ct_h: Leaves, ct_d: Leaves, pieces: list, start: int, stop: int
    ):
        """``(ct_s, HyperCotangent)`` after the VJP kernels of ``chunks`` (first states ``states``), from the
        last chunk to the first, starting from ``ct_s`` and the accumulated ``ct_h`` and ``ct_d`` (full batch)
        or the later windows' cotangents ``pieces`` (per-step batches: assembled over ``start..stop-1``)."""
        st = self.structure()
        layout, d, others = self.prepared_layout()
        # per task: the state, buffers, cotangent and accumulators; h, the data and t0 stay as they come
        state_end = st.n_state + st.n_buffers
        data_end = state_end + len(self.h) + len(d) + len(others) + 1
        n_acc_d = len(d) if self.loop.full_batch else 0
        per_task = [*range(state_end), *range(data_end, data_end + st.n_state + len(self.h) + n_acc_d)]
        kernels = self.segments.kernel
        for (a, n), (s_a, b_a) in reversed(list(zip(chunks, states))):
            args = (*self._segment_inputs(s_a, b_a, self.h, d, others, a, n), *ct_s, *ct_h, *ct_d)
            kernel = kernels(("vjp", n, st, layout.key()), _segments.segment_vjp(self.loop, st, layout, n), per_task)
            ct_s, ct_h, ct_d_a = split(kernel(*args), st.n_state, len(self.h))
            if self.loop.full_batch:
                ct_d = ct_d_a
            else:
                pieces.insert(0, ct_d_a)
        if not self.loop.full_batch:
            ct_d = self.assemble_d(pieces, start, stop)
        return ct_s, HyperCotangent(ct_h, ct_d)

    def segments_jvp(self, s: Leaves, b: Any, Z: Leaves, tangents: Tangents, start: int, stop: int):
        """:meth:`run_jvp` by segment kernels."""
        st = self.structure()
        layout, d, others = Layout.of(tangents.rebuild(tangents.d), self.loop.prepare is not None)
        state_end = st.n_state + st.n_buffers
        z_start = state_end + len(self.h) + len(d) + len(others) + 1
        per_task = [*range(state_end), *range(z_start, z_start + st.n_state)]
        for a, n in self.chunks(start, stop):
            kernel = self.segments.kernel(
                ("jvp", n, st, layout.key()), _segments.segment_jvp(self.loop, st, layout, n), per_task
            )
            Zd = tangents.Zd if self.loop.full_batch else tuple(x[:, a : a + n] for x in tangents.Zd)
            out = kernel(*self._segment_inputs(s, b, self.h, d, others, a, n), *Z, *tangents.E, *Zd)
            s, b, Z = split(out, st.n_state, st.n_buffers)
            b = buffers_in(st.bkeys, b)
        return s, b, Z

    def piece(self, name: str, fn: Callable, b: Any, per_task: tuple = (), shared: tuple = ()) -> Leaves:
        """``fn(bound, b, *per_task, *shared) -> tuple of tensors``: a piece of an algorithm that
        differentiates the step or the outer loss itself (implicit's solve, distill's distilled VJP);
        ``per_task`` and ``shared`` are tuples of leaf tuples. Eager: ``fn`` on this bound. Under
        ``hf.compile``: one compiled kernel per ``name`` and input structure, which runs ``fn`` on a
        bound rebuilt from its flat inputs (with the prepared batches; ``prepare``'s pullback stays
        with :meth:`finish`). ``b`` and ``per_task`` are expanded over the tasks when they arrive
        unbatched; ``shared`` (indices, a step) are taken as they come."""
        if self.segments is None:
            return tuple(fn(self, b, *per_task, *shared))
        st = self.structure()
        (layout, d, others), (outer_layout, outer) = self.prepared_layout(), self.outer_layout()
        sizes = (st.n_buffers, *map(len, per_task), *map(len, shared), len(self.h), len(d), len(others))
        key = ("piece", name, sizes, st, self._cache["layout key"], self._cache["outer key"])
        per_task_positions = range(sum(sizes[: 1 + len(per_task)]))
        kernel = self.segments.kernel(key, _piece_kernel(self, fn, st, layout, outer_layout, sizes), per_task_positions)
        flat = (x for group in (buffers_out(st.bkeys, b), *per_task, *shared, self.h, d, others, outer) for x in group)
        return kernel(*flat)

    def prepared_layout(self) -> tuple[Layout, Leaves, Leaves]:
        """``(layout, d, others)`` of the prepared inner batches for the kernels, built once per call (its
        key is kept as ``_cache["layout key"]``): pieces and scans ask for it at every segment."""
        if "layout" not in self._cache:
            prep = self.prep
            self._cache["layout"] = Layout.of(prep.rebuild(prep.d), self.loop.prepare is not None)
            self._cache["layout key"] = self._cache["layout"][0].key()
        return self._cache["layout"]

    def outer_layout(self) -> tuple[Layout, Leaves]:
        """``(layout, tensor leaves)`` of the outer batch for the kernels, built once per call (key kept as
        ``_cache["outer key"]``)."""
        if "outer" not in self._cache:
            layout, _, leaves = Layout.of(self.outer_batch, False)
            self._cache["outer"], self._cache["outer key"] = (layout, leaves), layout.key()
        return self._cache["outer"]

    def assemble_d(self, pieces: list, start: int, stop: int) -> Leaves:
        """The cotangent on ``d`` from the segments' cotangents on their windows (zero outside them)."""
        if not pieces or not self.prep.d:
            return self.zeros_d()
        parts = zip(*pieces)  # per d leaf, its windows in order
        return tuple(
            torch.cat([torch.zeros_like(x[:start]), *windows, torch.zeros_like(x[stop:])])
            for x, windows in zip(self.prep.d, parts)
        )

    def segments_outer_vjp(self, s: Leaves, b: Any, with_h: bool):
        """:meth:`outer_vjp` by its compiled kernel."""
        st = self.structure()
        layout, batch = self.outer_layout()
        per_task = range(st.n_state + st.n_buffers)
        kernel = self.segments.kernel(
            ("outer", with_h, st, self._cache["outer key"]),
            _segments.outer_vjp(self.outer_loss, st, layout, with_h),
            per_task,
        )
        out = kernel(*s, *buffers_out(st.bkeys, b), *self.h, *batch)
        loss, alpha, ct_h = split(out, 1, st.n_state)
        return loss[0], alpha, (HyperCotangent(ct_h, self.zeros_d()) if with_h else None)

    def zeros_h(self) -> Leaves:
        return tuple(torch.zeros_like(x) for x in self.h)

    def zeros_d(self) -> Leaves:
        return tuple(torch.zeros_like(x) for x in self.prep.d)

    def zero_cotangent(self) -> HyperCotangent:
        return HyperCotangent(self.zeros_h(), self.zeros_d())

    # -- prepared batches ----------------------------------------------------------------------
    @property
    def prep(self) -> Prepared:
        """``prepare`` evaluated once, with its VJP kept (identity when the loop has no ``prepare``).
        Cached in a plain dict: ``functools.cached_property`` takes a lock that ``torch.compile`` cannot trace."""
        if "prep" not in self._cache:
            if self.loop.prepare is None:
                self._cache["prep"] = Prepared((), lambda d: self.batches, None)
                return self._cache["prep"]
            fn, rebuild_with = self.prepare_fn()
            if self.segments is None:
                d, vjp_fn, others = torch.func.vjp(fn, self.h, has_aux=True)
                self._cache["prep"] = Prepared(d, rebuild_with(others), vjp_fn)
                return self._cache["prep"]
            raw, _, leaves = Layout.of(self.batches, False)
            key = (raw.key(), self.hkeys)
            if key not in self.segments.prepared:  # hf.compile's first call: one eager run learns the output's layout
                d, others = fn(self.h)
                self.segments.prepared[key] = Layout.of(rebuild_with(others)(d), True)[0]
            self._cache["prep"] = self.segments_prep(raw, key, leaves, self.segments.prepared[key])
        return self._cache["prep"]

    def prepared_by(self, d: Leaves, rebuild: Callable[[Leaves], Any]) -> None:
        """Take ``d`` (with ``rebuild(d) -> batches``) as the prepared inner batches, evaluated by the
        caller: forward mode pushes ``prepare`` forward itself, and later pieces (the layout of the
        kernels, the zero cotangent on ``d``) reuse its result instead of evaluating ``prepare`` again.
        No VJP is kept."""
        self._cache["prep"] = Prepared(d, rebuild, None)

    def segments_prep(self, raw: Layout, key: tuple, leaves: Leaves, layout: Layout) -> Prepared:
        """``prepare`` and its pullback by two compiled kernels, for the batches ``raw`` (flat: ``leaves``;
        ``key``: raw's key and the hparams keys; ``layout``: prepare's output's, from the first call)."""
        forward = self.segments.kernel(("prepare", *key), _segments.prepare(self.loop, self.hkeys, raw), ())
        out = forward(*self.h, *leaves)
        n_d = sum(1 for f in layout.diff if f)
        d, others = out[:n_d], out[n_d:]
        pull = self.segments.kernel(
            ("prepare_vjp", *key),
            _segments.prepare_vjp(self.loop, self.hkeys, raw, len(leaves)),
            range(len(self.h) + len(leaves), len(self.h) + len(leaves) + n_d),
        )
        return Prepared(d, lambda d: layout.rebuild(d, others), lambda ct_d: (pull(*self.h, *leaves, *ct_d),))

    def prepare_fn(self) -> tuple[Callable, Callable]:
        """``fn(h) -> (d, others)``: the floating leaves of prepare's output and its other tensors
        (returned as ``aux`` of a VJP/JVP); ``rebuild_with(others)(d)`` reassembles the batches."""
        layout: list = []

        def fn(h: Leaves):
            out = self.loop._prepared(self.hparams(h), self.batches)
            leaves, spec = pytree.tree_flatten(out)
            diff = [torch.is_tensor(x) and x.is_floating_point() for x in leaves]
            layout[:] = [spec, diff, [None if f else x for x, f in zip(leaves, diff)]]
            others = tuple(x for x, f in zip(leaves, diff) if not f and torch.is_tensor(x))
            return tuple(x for x, f in zip(leaves, diff) if f), others

        def rebuild_with(others: Leaves) -> Callable[[Leaves], Any]:
            def rebuild(d: Leaves) -> Any:
                spec, diff, fixed = layout
                floats, rest = iter(d), iter(others)
                leaves = [next(floats) if f else next(rest) if torch.is_tensor(x) else x for x, f in zip(fixed, diff)]
                return pytree.tree_unflatten(leaves, spec)

            return rebuild

        return fn, rebuild_with

    # -- the single pullback ---------------------------------------------------------------------
    def to_hparams(self, cot: HyperCotangent) -> Leaves:
        """A cotangent on ``(h, d)`` as one on ``h``: ``d`` pulled back through ``prepare`` (one VJP)."""
        if not cot.d or self.loop.prepare is None:
            return cot.h
        return add(cot.h, self.prep.vjp(cot.d)[0])

    def init_vjp(self, ct_s0: Leaves) -> Leaves:
        r"""The learned-initialization term :math:`\bar s_0\, ds_0/d\lambda`."""
        return torch.func.vjp(self.init_state, self.h)[1](ct_s0)[0]

    def finish(self, out: Outcome, init_rule: Optional[InitRule] = None, name: str = "this transform") -> HyperGrad:
        """The hypergradient from an algorithm's outcome: ``cot`` pulled back through ``prepare``, plus
        the learned-initialization term (the algorithm's own, or ``init_rule``'s), plus the buffers."""
        grads = self.to_hparams(out.cot)
        if self.learned_init:
            ct_s0 = out.ct_s0
            if init_rule is not None:
                ct_s0 = init_rule(self, out)
            elif ct_s0 is InitTerm.ABSENT:
                raise ValueError(
                    f"{name} has no term through a learned initialization (params0 is a function of hparams), so "
                    "its gradient would be silently zero. Use a transform whose formula has it (hf.unroll, "
                    "hf.truncate(K >= steps), hf.forward, hf.drmad, hf.greedy_accumulate, hf.langevin), or name "
                    "an approximation: hf.fomaml(transform) (dw_T/dw_0 ≈ I) or hf.reptile(transform)"
                )
            if ct_s0 is not InitTerm.INCLUDED:
                grads = add(grads, self.init_vjp(ct_s0))
        params = build(self.pkeys, self.params(out.s))
        grads = tuple(g.to(x.dtype) for g, x in zip(grads, self.h))  # the dtypes of hparams, for every transform
        return HyperGrad(build(self.hkeys, grads), out.loss, params, out.b)


def step_number(i: Any, like: Leaves) -> Any:
    """A step index for arithmetic (an interpolation weight): the int itself eagerly, or the index
    traced in a :meth:`Bound.scan` kernel in the dtype of ``like`` (an int64 tensor would divide in
    the default dtype)."""
    return i if isinstance(i, int) else i.to(like[0].dtype)


def where_step(cond: Any, x: Leaves) -> Leaves:
    """``x`` where ``cond`` holds, else zeros: ``cond`` is a bool on a step index, a Python bool eagerly
    and a tensor inside a :meth:`Bound.scan` kernel (no Python branch on a traced index)."""
    if not torch.is_tensor(cond):
        return tuple(x) if cond else tuple(torch.zeros_like(v) for v in x)
    return tuple(torch.where(cond, v, torch.zeros_like(v)) for v in x)


def _piece_kernel(template: Bound, fn: Callable, st: Structure, layout: Layout, outer_layout: Layout, sizes: tuple):
    """The kernel of :meth:`Bound.piece`: ``fn`` on a bound rebuilt from the flat inputs."""
    loop, outer_loss, exact_init = template.loop, template.outer_loss, template.exact_init
    n_groups = len(sizes) - 4  # per_task and shared

    def kernel(*flat):
        b, *groups = split(flat, *sizes)
        groups, (h, d, others, outer) = groups[:n_groups], groups[n_groups:]
        batches, b = layout.rebuild(d, others), buffers_in(st.bkeys, b)
        outer = outer_layout.rebuild((), outer)
        bound = Bound(loop, outer_loss, st.hkeys, st.pkeys, h, None, batches, outer, b, exact_init)
        bound._cache["prep"] = Prepared(d, lambda d: layout.rebuild(d, others), None)
        return tuple(fn(bound, b, *groups))

    return kernel


def step_index(s: Leaves, a: int) -> torch.Tensor:
    """The step index ``a`` as a tensor on the state's device (a kernel input: no recompile per segment)."""
    return torch.full((), a, dtype=torch.int64, device=s[0].device)


@dataclass(frozen=True, repr=False)
class HyperGradFunction:
    """``hg(hparams, params0, inner_batches, outer_batch, buffers=None) -> HyperGrad``: an algorithm bound
    to a loop and an outer loss. Every transform returns one; it is a pure function of its inputs.

    ``init_rule`` (set by :func:`fomaml` and :func:`reptile`) replaces the algorithm's term through a
    learned ``params0``; ``output(result, aux)`` adds an algorithm's diagnostics to the
    :class:`HyperGrad` (``implicit``'s residual); ``loop`` and ``outer_loss`` are the transform's.
    ``segmented`` declares that the algorithm reaches the inner steps only through ``Bound.run``,
    ``run_vjp``, ``run_outer_vjp``, ``run_jvp``, ``outer_vjp``, ``scan`` and ``piece``, so ``hf.compile(segment=k)`` can
    run it on compiled kernels (``segments``, set by ``hf.compile``).
    """

    loop: InnerLoop
    outer_loss: Loss
    algorithm: Algorithm
    name: str
    output: Optional[Callable[[HyperGrad, Any], Any]] = None
    init_rule: Optional[InitRule] = field(default=None)
    segmented: bool = False
    segments: Optional[Segments] = None

    def __repr__(self) -> str:  # dataclasses' repr guards recursion with a thread id torch.compile cannot trace
        return f"HyperGradFunction({self.name})"

    def _traced(self) -> tuple[Callable, Callable]:
        """``(outcome, compile)`` of a call compiled by ``hf.compile``: with at most k inner steps the eager
        algorithm compiled as one kernel, else the algorithm on its kernels traced as a program
        (:func:`~hyperfunc.transforms._segments.program`)."""
        if self.loop.steps <= self.segments.size:
            return replace(self, segments=None).outcome, _segments.one_kernel
        return self.outcome, _segments.program

    def __call__(self, hparams, params0, inner_batches, outer_batch, buffers=None):
        args = (hparams, params0, inner_batches, outer_batch, buffers)
        if self.segments is not None:
            result, aux = _segments.traced_call(*self._traced(), self.segments, args)
        else:
            result, aux = self.outcome(*args)
        return result if self.output is None else self.output(result, aux)

    def over_tasks(self, in_dims: Any, args: tuple) -> Any:
        """``torch.func.vmap(self, in_dims)(*args)`` for a call compiled by ``hf.compile``, traced batched over
        the tasks and run without entering ``vmap`` (what ``hf.vmap`` runs); None when ``args`` or
        ``in_dims`` are not plain (leave them to ``vmap``, which also raises its errors)."""
        if not 4 <= len(args) <= 5:
            return None
        out = _segments.traced_call_over_tasks(*self._traced(), self.segments, args, in_dims)
        if out is None:
            return None
        result, aux = out
        return result if self.output is None else self.output(result, aux)

    def outcome(self, hparams, params0, inner_batches, outer_batch, buffers=None) -> tuple[HyperGrad, Any]:
        """``(HyperGrad, aux)``: the algorithm's result and its diagnostics, before ``output`` adds them."""
        bound = self.bind(hparams, params0, inner_batches, outer_batch, buffers)
        out = self.algorithm(bound)
        return bound.finish(out, self.init_rule, self.name), out.aux

    def bind(self, hparams, params0, inner_batches, outer_batch, buffers=None) -> Bound:
        """The bound problem of one call (what the algorithm receives)."""
        return Bound.bind(
            self.loop,
            self.outer_loss,
            hparams,
            params0,
            inner_batches,
            outer_batch,
            buffers,
            self.init_rule is None,
            self.segments,
        )


def make_transform(
    algorithm: Algorithm,
    name: str,
    loop: InnerLoop,
    outer_loss: Loss,
    output: Optional[Callable] = None,
    segmented: bool = False,
) -> HyperGradFunction:
    """Check a transform's arguments and bind ``algorithm`` to them (``segmented``: see :class:`HyperGradFunction`)."""
    check_transform_args(loop, outer_loss)
    return HyperGradFunction(loop, outer_loss, algorithm, name, output, segmented=segmented)


#: ``transform(loop, outer_loss) -> hg``, what ``truncate(K)`` and the other factories return.
Transform = Callable[[InnerLoop, Loss], HyperGradFunction]


def _with_init_rule(transform: Transform, rule: InitRule, wrapper: str) -> Transform:
    if not callable(transform):
        raise TypeError(f"{wrapper} takes a transform (e.g. hf.first_order or hf.truncate(5)), got {transform!r}")

    def wrapped(loop: InnerLoop, outer_loss: Loss) -> HyperGradFunction:
        hg = transform(loop, outer_loss)
        if not isinstance(hg, HyperGradFunction):
            raise TypeError(f"{wrapper} needs a hyperfunc transform, got one returning {type(hg).__name__}")
        return replace(hg, init_rule=rule, name=f"{wrapper}({hg.name})")

    return wrapped


def _fomaml_rule(bound: Bound, out: Outcome) -> Leaves:
    alpha = bound.outer_vjp(out.s, out.b, with_h=False)[1]
    return bound.params(alpha) + tuple(torch.zeros_like(x) for x in out.s[len(bound.pkeys) :])


def _reptile_rule(bound: Bound, out: Outcome) -> Leaves:
    s0 = bound.initial()
    return tuple(a - b for a, b in zip(bound.params(s0), bound.params(out.s))) + tuple(
        torch.zeros_like(x) for x in s0[len(bound.pkeys) :]
    )


def fomaml(transform: Transform) -> Transform:
    r"""First-order MAML (Finn et al. 2017, Sec. 5.2) for a learned initialization: ``transform``
    with its term through :math:`w_0(\lambda)` replaced by the approximation
    :math:`dw_T/dw_0 \approx I`,

    .. math::
        \frac{dF}{d\lambda} \approx (\text{transform's other terms})
        + \nabla_w L_{out}(w_T)\, \frac{dw_0}{d\lambda}.

    ``hf.fomaml(hf.first_order)`` is FOMAML proper (with ``params0 = lambda h: h["init"]`` the
    init's gradient is :math:`\nabla_w L_{out}(w_T)`); ``hf.fomaml(hf.one_step)`` adds the
    one-step term for the other hyperparameters (learning rates, a shared body). With a fixed
    ``params0`` it is the transform itself. Cost: one extra outer gradient in ``w``.

    Example:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=10,
        ...                     full_batch=True)
        >>> hg = hf.fomaml(hf.first_order)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
        >>> h = TensorDict({"init": torch.zeros(1)}, [])
        >>> res = hg(h, lambda h: TensorDict({"w": h["init"]}, []), torch.ones(1), torch.full((1,), 2.0))
        >>> res.grads["init"]  # 2 (w_T - y), w_T = 1 - 0.8^10
        tensor([-2.2147])
    """
    return _with_init_rule(transform, _fomaml_rule, "fomaml")


def reptile(transform: Transform) -> Transform:
    r"""Reptile (Nichol et al. 2018) for a learned initialization: ``transform`` with its term through
    :math:`w_0(\lambda)` replaced by the Reptile direction :math:`w_0 - w_T`,

    .. math:: \frac{dF}{d\lambda} \approx (\text{transform's other terms}) + (w_0 - w_T)\, \frac{dw_0}{d\lambda},

    so that a meta-step :math:`\lambda \leftarrow \lambda - \epsilon\, g` with ``params0 = lambda h: h["init"]``
    is Reptile's :math:`\lambda \leftarrow \lambda + \epsilon (w_T - \lambda)`. Not the gradient of any
    outer loss: the outer loss only enters through the other terms. Cost: nothing beyond ``transform``.

    Example:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=10,
        ...                     full_batch=True)
        >>> hg = hf.reptile(hf.first_order)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
        >>> h = TensorDict({"init": torch.zeros(1)}, [])
        >>> hg(h, lambda h: TensorDict({"w": h["init"]}, []), torch.ones(1), torch.zeros(1)).grads["init"]
        tensor([-0.8926])
    """
    return _with_init_rule(transform, _reptile_rule, "reptile")
