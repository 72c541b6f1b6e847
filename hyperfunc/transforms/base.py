r"""The one protocol every transform is written against.

A hypergradient call ``hg(hparams, params0, inner_batches, outer_batch, buffers=None)`` is bound
once into a :class:`Bound` problem that exposes the mathematical objects of DESIGN.md as pure
functions of flat tuples of tensors:

- ``h``: the hyperparameter leaves :math:`\lambda`; ``d``: the floating leaves of the prepared
  inner batches (the output of ``prepare``); ``s``: the optimizer state :math:`s_t` (params first,
  then the optimizer's buffers; :meth:`Bound.params` reads the params); ``b``: the module buffers
  (a TensorDict, or ``()``), carried beside ``s`` and never differentiated.
- :meth:`Bound.initial` :math:`s_0(\lambda)`, :meth:`Bound.run` the step map :math:`\Phi`,
  :meth:`Bound.run_vjp` its VJP on :math:`(s, \lambda, d)`, :meth:`Bound.run_jvp` its tangents,
  :meth:`Bound.outer_vjp` the outer loss and its gradient :math:`\alpha`. The bound delegates
  them to its *executor* (:mod:`._executor`: eager, or the compiled one of ``hf.compile``), which
  computes with the primitives of :mod:`._primitives`.

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
from typing import Any, NamedTuple, Optional, Union

import torch
from tensordict import TensorDictBase

from .._checks import requires_fewer
from .._torch import tree_map
from .._tree import Keys, Leaves, add, build, check_tensordict, key_name, keys_of, leaves_of
from ..loop import InnerLoop, Loss
from ._executor import EAGER, HyperCotangent, Prepared, cotangent_pull
from ._primitives import Statics, outer, steps_vjp


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
    return tree_map(lambda x: x.detach() if torch.is_tensor(x) else x, tree)


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


class Inputs(NamedTuple):
    """A call's hyperparameters, initial params and buffers, validated, detached and flat: ``h`` the
    hyperparameter leaves (keys ``hkeys``), ``params0`` a TensorDict or a function of the hparams, ``p0``
    the initial params (keys ``pkeys``), ``buffers`` a TensorDict or ``()`` for none, ``init_pull`` the VJP
    of the one evaluation of a ``params0`` function (``ct_p0 -> ct_h``; None for a TensorDict): the
    trajectory and the initialization's term see the same evaluation, with the same random draws."""

    hkeys: Keys
    h: Leaves
    params0: Any
    p0: TensorDictBase
    pkeys: Keys
    buffers: Any
    init_pull: Optional[Callable[[Leaves], Leaves]] = None

    @classmethod
    def of(cls, hparams: Any, params0: Any, buffers: Any) -> Inputs:
        check_tensordict(hparams, "hparams")
        hparams, init_pull = hparams.detach(), None
        hkeys = keys_of(hparams)
        if not hkeys:
            raise ValueError("hparams is empty: give at least one hyperparameter (a TensorDict with a tensor leaf)")
        h = leaves_of(hparams, hkeys)
        if isinstance(params0, TensorDictBase):
            check_tensordict(params0, "params0")
            params0 = p0 = params0.detach()
        elif callable(params0):
            p0, init_pull = _evaluate_init(params0, hkeys, h)
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
        pkeys = keys_of(p0)
        if not pkeys:
            raise ValueError("params0 is empty: give the initial params, a TensorDict with at least one tensor leaf")
        for key, x in zip(hkeys, h):
            if x.numel() == 0:
                raise ValueError(
                    f"hparams[{key_name(key)!r}] has no elements (shape "
                    f"{tuple(x.shape)}): a hyperparameter must hold at least one value; drop the entry"
                )
        check_one_device(h, "hparams", leaves_of(p0, pkeys), "params0")
        return cls(hkeys, h, params0, p0, pkeys, buffers, init_pull)


def _evaluate_init(params0: Callable, hkeys: Keys, h: Leaves) -> tuple[TensorDictBase, Callable]:
    """``params0(hparams)`` evaluated once, with its VJP kept: ``(p0, pull)``, ``pull(ct_p0) -> ct_h``."""
    found: dict = {}

    def leaves(h: Leaves) -> Leaves:
        try:
            p0 = params0(build(hkeys, h))
        except KeyError as err:
            names = [key_name(k) for k in hkeys]
            raise ValueError(
                f"params0(hparams) read a key that hparams lacks: {err}; hparams has keys {names}"
            ) from err
        check_tensordict(p0, "params0(hparams)")
        found["keys"] = keys_of(p0)
        return leaves_of(p0, found["keys"])

    values, pull = torch.func.vjp(leaves, h)
    return build(found["keys"], values), lambda ct: pull(tuple(ct))[0]


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
    #: how the operations run: :data:`~._executor.EAGER`, or the executor ``hf.compile`` hands the transform
    executor: Any = EAGER
    #: the prepared inner batches when the caller evaluated them (forward mode pushes ``prepare`` forward)
    prepared: Optional[Prepared] = None
    #: the initial params' leaves and, for a learned initialization, the VJP of its one evaluation
    p0: Leaves = ()
    init_pull: Optional[Callable[[Leaves], Leaves]] = None
    #: one step's graph bytes measured per input structure, shared by the calls of one hypergradient function
    #: (:meth:`~._executor.Eager.reverse_segment`); a problem bound on its own measures afresh
    step_bytes: dict = field(default_factory=dict, compare=False, repr=False)
    # per problem, never passed in: a derived problem (dataclasses.replace: on, with_prepared) starts empty
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

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
        executor: Any = EAGER,
        step_bytes: Optional[dict] = None,
    ) -> Bound:
        """Validate the inputs of a hypergradient call and flatten them (inputs are detached, never mutated)."""
        check_tensordict(hparams, "hparams")
        loop._check_batches(inner_batches)
        # inputs are detached: a batch that requires grad must not record the trajectory
        inner_batches, outer_batch = detached(inner_batches), detached(outer_batch)
        x = Inputs.of(hparams, params0, buffers)
        return cls(
            loop,
            outer_loss,
            x.hkeys,
            x.pkeys,
            x.h,
            x.params0,
            inner_batches,
            outer_batch,
            x.buffers,
            exact_init,
            executor,
            p0=leaves_of(x.p0, x.pkeys),
            init_pull=x.init_pull,
            step_bytes={} if step_bytes is None else step_bytes,
        )

    def on(self, batches: Any) -> Bound:
        """This problem on other inner ``batches`` (already checked; ``prepare`` runs on them afresh): online
        ``distill``'s distilled batch."""
        return replace(self, batches=detached(batches), prepared=None)

    def with_prepared(self, prepared: Prepared) -> Bound:
        """This problem with its prepared batches evaluated by the caller (no VJP kept): forward mode
        pushes ``prepare`` forward itself, and every later operation reuses its result."""
        return replace(self, prepared=prepared)

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

    def initial(self) -> Leaves:
        r""":math:`s_0` at the bound hyperparameters, from the call's one evaluation of ``params0``."""
        return self.loop.optimizer._init_leaves(self.p0)

    @property
    def prep(self) -> Prepared:
        """``prepare`` evaluated once by the executor, with its VJP kept (the raw batches when the loop has
        no ``prepare``). Cached in a plain dict: ``functools.cached_property`` takes a lock that
        ``torch.compile`` cannot trace."""
        if self.prepared is not None:
            return self.prepared
        return self.memo("prep", lambda: self.executor.prepare(self))

    def memo(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` evaluated once per call (per bound problem) under ``name``: the prepared batches, and
        what an executor derives from the problem's structure (its kernels' keys)."""
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def statics(self) -> Statics:
        """The static part of the flat problem, for the primitives (:mod:`._primitives`)."""
        return self.memo(
            "statics", lambda: Statics(self.loop, self.outer_loss, self.pkeys, self.hkeys, self.prep.layout)
        )

    # -- the operations, run by the executor ----------------------------------------------------
    def run(self, s: Leaves, b: Any, start: int, stop: int) -> tuple[Leaves, Any]:
        """Inner steps ``start..stop-1`` from ``(s, b)``: ``(s, b)`` after them."""
        return self.executor.run(self, s, b, start, stop)

    def run_vjp(self, s: Leaves, b: Any, start: int, stop: int):
        r"""Steps ``start..stop-1`` and their VJP: ``((s', b'), pull)`` with
        ``pull(ct_s') -> (ct_s, HyperCotangent)``, the products :math:`\bar s A` and :math:`\bar s B`."""
        return self.executor.run_vjp(self, s, b, start, stop)

    def run_outer_vjp(self, s: Leaves, b: Any, start: int, stop: int):
        r"""Steps ``start..stop-1``, the outer loss after them and its VJP through them, in one pass:
        ``(loss, (s', b'), ct_s, cot)`` with ``ct_s`` the cotangent on ``s`` and ``cot`` the direct term
        :math:`\partial_\lambda L_{out}` plus the steps' products :math:`\alpha A \cdots B` (a
        :class:`HyperCotangent`)."""
        return self.executor.run_outer_vjp(self, s, b, start, stop)

    def run_jvp(self, s: Leaves, b: Any, Z: Leaves, E: Leaves, Zd: Leaves, start: int, stop: int):
        r"""Steps ``start..stop-1`` pushed forward: ``(s', b', Z')`` with :math:`Z' = A Z + B_\lambda E + B_d Z_d`
        for every row of ``Z`` (forward mode: ``E`` the directions in λ, ``Zd`` the tangents of the
        prepared floats ``d``)."""
        return self.executor.run_jvp(self, s, b, Z, E, Zd, start, stop)

    def outer_vjp(self, s: Leaves, b: Any, with_h: bool = True):
        r"""``(loss, α, direct)``: :math:`L_{out}`, :math:`\alpha = \partial L_{out}/\partial s` and, when
        ``with_h``, the direct term :math:`\partial_\lambda L_{out}` as a :class:`HyperCotangent` (else None,
        which skips the backward through λ)."""
        return self.executor.outer_vjp(self, s, b, with_h)

    def scan(self, name: str, body: Callable, b: Any, carry: tuple, start: int, stop: int, shared: tuple = ()):
        """``(b, carry)`` after ``body(bound, b, i, *carry, *shared) -> (b, *carry)`` for ``i = start..stop-1``
        (``carry``, ``shared``: tuples of leaf tuples): a transform's per-step recursion (DrMAD's backward
        travel, greedy accumulation). ``i`` is an int eagerly and may be a tensor (a compiled executor runs
        several iterations per kernel), so ``body`` must not branch on ``i`` in Python (:func:`where_step`,
        :func:`step_number`); ``name`` names every static choice ``body`` closes over. A ``shared`` leaf may
        be a Python int (a count such as T)."""

        def block(bound, b, i0, n, *groups):
            state, rest = groups[: len(carry)], groups[len(carry) :]
            for j in range(n):
                b, *state = body(bound, b, i0 + j, *state, *rest)
            return (b, *state)

        return self.scan_blocks(name, block, b, carry, start, stop, shared)

    def scan_blocks(self, name: str, block: Callable, b: Any, carry: tuple, start: int, stop: int, shared: tuple = ()):
        """:meth:`scan` for a recursion that works on several steps at once (HPO-SGLD's direct term, one
        VJP per block of samples): ``block(bound, b, i0, n, *carry, *shared) -> (b, *carry)`` runs steps
        ``i0..i0+n-1``, ``n`` a Python int."""
        return self.executor.scan_blocks(self, name, block, b, carry, start, stop, shared)

    def piece(self, name: str, fn: Callable, b: Any, per_task: tuple = (), shared: tuple = ()) -> Leaves:
        """``fn(bound, b, *per_task, *shared) -> tuple of tensors``: a piece of an algorithm that
        differentiates the step or the outer loss itself (implicit's solve, distill's distilled VJP);
        ``per_task`` and ``shared`` are tuples of leaf tuples. ``fn`` receives a bound that runs eagerly
        (a compiled executor runs the piece as one kernel); ``name`` names every static choice."""
        return self.executor.piece(self, name, fn, b, per_task, shared)

    # -- eager pieces, for use inside scans and pieces ------------------------------------------
    def step_on(self, s: Leaves, b: Any, h: Leaves, batch: Any, t: int) -> tuple[Leaves, Any]:
        """One inner step (optimizer step index ``t``) on an explicit ``batch``."""
        return self.loop._step(self.pkeys, s, b, self.hparams(h), batch, t)

    def step_vjp(self, s: Leaves, b: Any, t: Any):
        """One step (index ``t``: an int, or a tensor inside a scan) and its VJP, as :meth:`run_vjp`."""
        prep = self.prep
        out, pull = steps_vjp(self.statics(), s, b, self.h, prep.d, prep.others, t, 1, t)
        return out, cotangent_pull(pull)

    def outer(self, s: Leaves, b: Any, h: Leaves) -> torch.Tensor:
        r""":math:`L_{out}(w, \lambda; D_{val})` for the params held in state ``s`` (its buffer update is dropped)."""
        return outer(self.statics(), s, b, h, self.outer_batch)

    def outer_grad_h(self, samples: list, weights: list) -> Leaves:
        r""":math:`\partial_\lambda \sum_j w_j L_{out}(s_j, \lambda)` over ``samples = [(s_j, b_j), ...]`` by one
        VJP: the outer loss is vmapped over the samples with λ unbatched, so whatever depends on λ and the
        batch alone (ANIL's features) is computed once and pulled back once, with the summed cotangent.
        Memory: the outer loss's activations for every sample."""
        states = tuple(torch.stack(x) for x in zip(*(s for s, _ in samples)))
        first_b = samples[0][1]
        bufs = torch.stack([b for _, b in samples]) if isinstance(first_b, TensorDictBase) else ()

        def total(h: Leaves) -> torch.Tensor:
            # randomness='different': an outer loss with dropout draws a mask per sample, as one call per sample did
            losses = torch.func.vmap(lambda s, b: self.outer(s, b, h), randomness="different")(states, bufs)
            return sum(w * loss for w, loss in zip(weights, losses.unbind(0)))

        return torch.func.grad(total)(self.h)

    def zeros_h(self) -> Leaves:
        return tuple(torch.zeros_like(x) for x in self.h)

    def zeros_d(self) -> Leaves:
        return tuple(torch.zeros_like(x) for x in self.prep.d)

    def zero_cotangent(self) -> HyperCotangent:
        return HyperCotangent(self.zeros_h(), self.zeros_d())

    # -- the single pullback ---------------------------------------------------------------------
    def to_hparams(self, cot: HyperCotangent) -> Leaves:
        """A cotangent on ``(h, d)`` as one on ``h``: ``d`` pulled back through ``prepare`` (one VJP)."""
        if not cot.d or self.loop.prepare is None:
            return cot.h
        pull = self.prep.vjp
        if pull is None:  # an executor's kernel binds its problem without the pullback it never needs
            raise RuntimeError("hyperfunc internal error: prepare's pullback was not kept for this binding")
        return add(cot.h, pull(cot.d)[0])

    def init_vjp(self, ct_s0: Leaves) -> Leaves:
        r"""The learned-initialization term :math:`\bar s_0\, ds_0/d\lambda`: the optimizer's buffers start at
        zero, so only the params' cotangent is pulled back through the call's evaluation of ``params0``."""
        if self.init_pull is None:
            raise RuntimeError("hyperfunc internal error: a learned initialization without its pullback")
        return self.init_pull(ct_s0[: len(self.pkeys)])

    def init_jvp(self, e: Leaves) -> Leaves:
        r"""The tangent :math:`ds_0/d\lambda\, e` of the initial state, from the same evaluation of ``params0``
        as :meth:`init_vjp`: the VJP's pullback is linear in its cotangent, so its own VJP is the JVP
        (forward mode needs no second evaluation, whose random draws would differ)."""
        if self.init_pull is None:
            raise RuntimeError("hyperfunc internal error: a learned initialization without its pullback")
        zeros = tuple(torch.zeros_like(p) for p in self.p0)
        (tangent,) = torch.func.vjp(self.init_pull, zeros)[1](tuple(e))
        return self.loop.optimizer._init_leaves(tangent)

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


@dataclass(frozen=True, repr=False)
class HyperGradFunction:
    """``hg(hparams, params0, inner_batches, outer_batch, buffers=None) -> HyperGrad``: an algorithm bound
    to a loop and an outer loss. Every transform returns one; it is a pure function of its inputs.

    ``init_rule`` (set by :func:`fomaml` and :func:`reptile`) replaces the algorithm's term through a
    learned ``params0``; ``output(result, aux)`` adds an algorithm's diagnostics to the
    :class:`HyperGrad` (``implicit``'s residual); ``loop`` and ``outer_loss`` are the transform's.
    ``segmented`` declares the one capability a compiled executor needs: the algorithm reaches the
    inner steps and the outer loss only through the bound's operations (``run``, ``run_vjp``,
    ``run_outer_vjp``, ``run_jvp``, ``outer_vjp``, ``scan``, ``scan_blocks``, ``piece``). ``executor``
    runs them (:data:`~._executor.EAGER`; ``hf.compile`` sets its own).
    """

    loop: InnerLoop
    outer_loss: Loss
    algorithm: Algorithm
    name: str
    output: Optional[Callable[[HyperGrad, Any], Any]] = None
    init_rule: Optional[InitRule] = field(default=None)
    segmented: bool = False
    executor: Any = EAGER
    #: what its eager reverse pass measured of one step, per input structure (see :attr:`Bound.step_bytes`)
    step_bytes: dict = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:  # dataclasses' repr guards recursion with a thread id torch.compile cannot trace
        return f"HyperGradFunction({self.name})"

    def __call__(self, hparams, params0, inner_batches, outer_batch, buffers=None):
        result, aux = self.executor.call(self, (hparams, params0, inner_batches, outer_batch, buffers))
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
            self.executor,
            self.step_bytes,
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
    if requires_fewer(transform, 2):  # hf.truncate, hf.distill, ...: a factory of transforms
        name = getattr(transform, "__name__", "it")
        raise TypeError(
            f"{wrapper} takes a transform, transform(loop, outer_loss), but {name} takes its options: it makes "
            f"transforms, so give it its argument first, e.g. hf.{wrapper}(hf.{name}(...))"
        )

    def wrapped(loop: InnerLoop, outer_loss: Loss) -> HyperGradFunction:
        hg = transform(loop, outer_loss)
        if not isinstance(hg, HyperGradFunction):
            raise TypeError(f"{wrapper} needs a hyperfunc transform, got one returning {type(hg).__name__}")
        if hg.init_rule is not None:  # one rule replaces the init term: nesting would silently drop the inner one
            raise ValueError(
                f"{wrapper}({hg.name}): {hg.name} already replaces the learned-initialization term; wrap the bare "
                f"transform in one of hf.fomaml or hf.reptile, e.g. hf.{wrapper}(hf.first_order)"
            )
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

    Examples:
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

    Examples:
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
