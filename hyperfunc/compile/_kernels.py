r"""Compiled kernels: pure functions of flat tuples of tensors, traced and compiled once per signature.

A *kernel* is one of the protocol's operations on the flat layout (the k-step segment map, its VJP,
its tangent map, a transform's k-step recursion, the outer loss and its gradient, a transform's own
piece, a whole call), built by :mod:`._executor` from the primitives of
:mod:`hyperfunc.transforms._primitives`. Here it is compiled: traced by ``make_fx`` into aten
operations (functionalized, repeated subexpressions merged) and handed to the backend that
``torch.compile(**options)`` would use, without dynamo.

Under ``torch.func.vmap`` (what ``hf.vmap`` runs) a kernel call unwraps the vmap level and calls
the kernel vmapped over the task dimension and compiled, so the batching is inside the compiled
code; inside a second transform it goes through a ``torch.autograd.Function``'s ``vmap`` rule, and
outside vmap it calls the kernel compiled for one task. Kernels have no derivative.
"""

from __future__ import annotations

import itertools
import types
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .. import _torch
from .._common_subexpressions import merge_common_subexpressions
from .._rng import rng_state, same_rng_state
from .._torch import FakeTensorMode, ShapeEnv, get_proxy_mode, make_fx
from .._tree import Leaves
from ..optim._noise import batch_draws

_KERNEL_IDS = itertools.count()

#: ``kernel(*tensors) -> tuple of tensors`` for one task.
Kernel = Callable[..., tuple]


@dataclass(frozen=True)
class Segments:
    """How a compiled transform runs: ``size`` steps per segment kernel, ``options`` for ``torch.compile``,
    ``backend`` the compiler those options select (:func:`compiler`), and the kernels built so far (kept
    across calls; keyed by the structure of the problem)."""

    size: int
    options: dict
    backend: Callable
    kernels: dict = field(default_factory=dict, compare=False, repr=False)
    #: the layout of ``prepare``'s output per input structure, learned by one eager run in the first call
    prepared: dict = field(default_factory=dict, compare=False, repr=False)
    #: the layout of a traced call's result per input structure (:func:`traced_call`), learned by its trace,
    #: and with ``(key, n)`` that of ``hf.vmap``'s result over ``n`` tasks (:func:`traced_call_over_tasks`)
    results: dict = field(default_factory=dict, compare=False, repr=False)
    #: ``(spec, Layout.key())`` of the traced calls' inputs seen so far
    structures: list = field(default_factory=list, compare=False, repr=False)
    #: the fingerprint (``_closures.fingerprint``) of the functions the kernels above were traced with
    closures: list = field(default_factory=list, compare=False, repr=False)

    def check_closures(self, fp: tuple) -> None:
        """Forget every kernel when the values the problem's functions read from outside their arguments
        changed (``fp``): they were traced with the old values baked in."""
        if self.closures and self.closures[0] != fp:
            warnings.warn(
                "hf.compile: a value that the losses, prepare, params0 or an optimizer argument read from outside "
                "their arguments (a closed-over or global number, a rebound tensor) changed since the kernels were "
                "traced, which baked it in; compiling them again. Pass a value that changes as a hyperparameter or "
                "in a batch to avoid the recompile",
                RuntimeWarning,
                stacklevel=2,
            )
            for cache in (self.kernels, self.prepared, self.results):
                cache.clear()
            self.structures.clear()
        self.closures[:] = [fp]

    def kernel(self, key: tuple, fn: Kernel, per_task: Iterable[int], compile: Optional[Callable] = None) -> TaskKernel:
        """The compiled kernel for ``key`` (built from ``fn`` on first use). The inputs at positions
        ``per_task`` (states, cotangents, accumulators) are per-task quantities: one that reaches the
        kernel unbatched (the shared w_0, a zero accumulator) is expanded over the tasks, so the first
        segment uses the same compiled kernel as the others."""
        if key not in self.kernels:
            self.kernels[key] = _batched_kernel(fn, self, frozenset(per_task), compile or compile_kernel)
        return self.kernels[key]


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object and name of its own: dynamo keeps its cache, recompile budget and
    automatic-dynamic shape memory per code object and name, so kernels sharing a Python function
    would count as recompiles of one another and make each other's shapes symbolic."""
    name = f"{fn.__name__}_{next(_KERNEL_IDS)}"
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)


def compile_kernel(fn: Callable, args: tuple, segments: Segments) -> Callable:
    """``fn`` compiled for inputs like ``args``: ``make_fx`` traces ``fn`` on fake tensors like ``args``
    into aten operations without mutations (vmap and the VJPs resolved, each repeated subexpression
    merged; views stay views: replaced by copies, the running statistics that batch norm's batching
    rule writes through a view were lost),
    and that straight-line graph goes to ``segments.backend``, the compiler ``torch.compile(**options)``
    would use (:func:`compiler`). Dynamo is not involved: interpreting hyperfunc's and torch.func's Python step by
    step was about 95% of a warm start, and its guards on every input, checked at every call, cost about
    0.1 ms per kernel call (``unroll`` at T = 100, k = 10: 8.3 ms through ``torch.compile``, 5.5 ms
    direct). The graph is specialised to the inputs' shapes, dtypes, devices, strides and
    ``requires_grad``, so the caller keys it by them (:func:`_signature`), which is what those guards
    checked. Tensors a loss closes over become constants of the graph, held by reference (fake tensors
    trace langevin's kernels in 2.2-2.4 s, the real inputs in 3.4-3.8 s). Inputs that another transform
    still wraps (a vmap around ``hf.vmap``) are dynamo's to trace through, with ``torch.compile``."""
    if wrapped(args):
        return torch.compile(_own_code(fn), **segments.options)
    args = distinct(args)
    return backend_compile(_trace(fn, args), args, segments)


def wrapped(args: tuple) -> bool:
    """Whether another transform (a ``vmap`` around ``hf.vmap``) still wraps one of ``args``: dynamo's to
    trace through, not ``make_fx``'s."""
    return any(_torch.is_wrapped(x) for x in args)


def backend_compile(graph: torch.fx.GraphModule, args: tuple, segments: Segments) -> Callable:
    """``graph`` (traced on inputs like ``args``) compiled by ``segments.backend``."""
    if segments.options.get("disable"):
        return graph
    # the example inputs as fake tensors of a mode with a shape environment, as dynamo hands them over:
    # without one, AOTAutograd's and inductor's caches are bypassed and every warm start compiles afresh
    fake = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with _torch.tracing(_torch.TracingContext(fake)):
        return segments.backend(graph, [fake.from_tensor(x, static_shapes=True) for x in args])


def _trace(fn: Callable, args: tuple) -> torch.fx.GraphModule:
    """``fn`` on fake tensors like ``args`` as a graph of aten operations without mutations (views stay
    views), each repeated subexpression merged and a kernel's SGLD draws batched."""
    functional = torch.func.functionalize(fn, remove="mutations")
    graph = make_fx(functional, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
    merge_common_subexpressions(graph.graph)
    batch_draws(graph.graph)
    graph.recompile()
    return graph


def trace_or_none(fn: Callable, args: tuple) -> Optional[torch.fx.GraphModule]:
    """:func:`_trace` of a whole call that has run for real on ``args`` (already :func:`distinct`, none
    :func:`wrapped`; the run raised the call's own errors), or None where the trace fails: Python that
    reads a tensor's value, a kernel signature the real run did not compile, an operation the fake
    tensors refuse (``torch.func.jvp`` of ``forward``'s ``prepare`` with per-task hyperparameters,
    torch 2.13)."""
    try:
        return _trace(fn, args)
    except Exception:  # noqa: BLE001 (the call itself went through: what failed is its trace)
        return None


def direct(run: Callable) -> Callable:
    """``run`` as a function of this module, which a graph's code calls as a global (torch's own compiled
    functions are named by a path that does not import)."""

    def kernel(*args):
        return run(*args)

    return kernel


class _Untraceable(Exception):
    """A program's trace reached a kernel that has not been compiled for its inputs."""


class _Compiled:
    """A compiled kernel, called as ``kernel(args)``. Under ``make_fx`` (a program's trace) the call is one
    opaque ``hyperfunc::kernel_call`` node, whose fake outputs are shaped like those of the kernel's
    first real call."""

    __slots__ = ("run", "outputs", "id", "__weakref__")

    def __init__(self, run: Callable):
        self.run, self.id = run, next(_KERNEL_IDS)
        self.outputs: Optional[tuple] = None  # (shape, stride, dtype, device) per output, from the first call
        COMPILED[self.id] = self

    def __call__(self, args: tuple) -> tuple:
        if get_proxy_mode() is not None:
            if self.outputs is None:
                raise _Untraceable
            return tuple(kernel_call(self.id, list(args)))
        out = self.run(*args)
        if self.outputs is None:
            self.outputs = tuple((x.shape, x.stride(), x.dtype, x.device) for x in out)
        return out


COMPILED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> _Compiled, for kernel_call
_LIB = torch.library.Library("hyperfunc", "FRAGMENT")
_LIB.define("kernel_call(int kernel, Tensor[] args) -> Tensor[]")
_LIB.impl("kernel_call", lambda kernel, args: list(COMPILED[kernel].run(*args)), "CompositeExplicitAutograd")
kernel_call = torch.ops.hyperfunc.kernel_call.default


@torch.library.register_fake("hyperfunc::kernel_call", lib=_LIB)
def _(kernel: int, args: list) -> list:
    return [
        torch.empty_strided(shape, stride, dtype=dtype, device=device)
        for shape, stride, dtype, device in COMPILED[kernel].outputs
    ]


def distinct(args: tuple) -> tuple:
    """``args`` with a tensor passed more than once replaced, after its first place, by a view of itself
    (same metadata): traced on one fake tensor, the places would become one graph input, and a later
    call with different tensors there (``distill``'s running average starts as the state itself) would
    read the wrong one."""
    seen: set = set()
    out = []
    for x in args:
        if id(x) in seen:
            x = x.view(x.shape)
        seen.add(id(x))
        out.append(x)
    return tuple(out)


def compiler(options: dict) -> Callable:
    """``compile(graph, example_inputs) -> callable``: what ``torch.compile(**options)`` hands the graphs it
    captures to (torch's own wrappers: inductor with the settings of ``mode`` or ``options``, or the
    backend named, a registered name or a callable)."""
    backend, mode, settings = options.get("backend") or "inductor", options.get("mode"), options.get("options")
    if mode is not None and settings is not None:
        raise ValueError("hf.compile takes mode= or options=, not both (torch.compile refuses them together)")
    return _torch.compiler_wrapper(backend, mode, settings, options.get("dynamic"))


def _signature(args: tuple) -> tuple:
    return tuple((x.shape, x.stride(), x.dtype, x.device, x.requires_grad) for x in args)


class TaskKernel:
    """A compiled kernel: called on one task's tensors (or under ``vmap``, which reaches ``over_tasks``), and
    ``over_tasks(n, in_dims, args)`` for a caller that holds the tasks' physical tensors itself
    (:func:`~hyperfunc.compile._traced.traced_call_over_tasks`)."""

    __slots__ = ("call", "over_tasks")

    def __init__(self, call: Callable, over_tasks: Callable[[int, tuple, tuple], tuple]):
        self.call, self.over_tasks = call, over_tasks

    def __call__(self, *args: Any) -> Any:
        return self.call(*args)


def _batched_kernel(fn: Kernel, segments: Segments, per_task: frozenset, compile: Callable) -> TaskKernel:
    single: dict = {}
    batched: dict = {}

    def over_tasks(batch_size: int, in_dims: tuple, args: tuple) -> tuple:
        """The kernel on the tasks' physical tensors (task dimension ``in_dims``): outputs batched at dim 0."""
        if any(in_dims[i] is None for i in per_task):
            args = tuple(
                x.unsqueeze(0).expand(batch_size, *x.shape).contiguous() if i in per_task and d is None else x
                for i, (x, d) in enumerate(zip(args, in_dims))
            )
            in_dims = tuple(0 if i in per_task and d is None else d for i, d in enumerate(in_dims))
        key = (in_dims, _signature(args))
        if key not in batched:  # one compiled kernel per batching pattern (e.g. shared hparams) and signature

            def over(*args):
                # a draw (dropout) must reach check_no_draws' clear error, not vmap's randomness error
                return torch.func.vmap(fn, in_dims=in_dims, randomness="different")(*args)

            batched[key] = _new_kernel(compile, over, args, segments)
        # an output that only broadcasts an unbatched input over the tasks comes back with batch
        # stride 0; materialised, the next kernel call sees the strides it was compiled for
        return tuple(x.contiguous() if x.dim() and x.stride(0) == 0 else x for x in batched[key](args))

    def one_task(args: tuple) -> tuple:
        key = _signature(args)
        if key not in single:
            single[key] = _new_kernel(compile, fn, args, segments)
        return single[key](args)

    class _Kernel(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return one_task(args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def vmap(info, in_dims, *args):
            out = over_tasks(info.batch_size, in_dims, args)
            return out, tuple(0 for _ in out)

    def call(*args):
        interpreter = _torch.peek_interpreter_stack()
        if interpreter is None or interpreter.key() == _torch.TransformType.Functionalize:
            return one_task(args)  # no transform to go through (functionalize: a program's trace for one task)
        out = _under_vmap(over_tasks, args, interpreter)
        return _Kernel.apply(*args) if out is None else out

    return TaskKernel(call, over_tasks)


def _new_kernel(compile: Callable, fn: Callable, args: tuple, segments: Segments) -> _Compiled:
    if get_proxy_mode() is not None:  # a program's trace: every kernel it calls was compiled by its real run
        raise _Untraceable
    return _Compiled(compile(fn, args, segments))


def _under_vmap(over_tasks: Callable, args: tuple, interpreter: Any) -> Any:
    """``over_tasks`` called on the physical tensors when the innermost transform is a ``vmap`` whose
    level holds every batched input directly (the common case, ``hf.vmap``), else None.

    It is what ``autograd.Function``'s vmap rule does (unwrap the level, run below it, wrap the
    outputs at dim 0), without its per-call pytree handling, which cost more than the compiled
    kernels themselves (cProfile, unroll at T = 100, k = 10: 0.36 s of 0.65 s)."""
    if interpreter.key() != _torch.TransformType.Vmap:
        return None
    vmap_level = _torch.coerce_cinterpreter(interpreter)
    level = vmap_level.level()
    unwrapped, in_dims = [], []
    for x in args:
        x, d = _torch.unwrap_batched(x, level)
        if _torch.is_wrapped(x):  # another transform's tensor: take the general path
            return None
        unwrapped.append(x)
        in_dims.append(d)
    if all(d is None for d in in_dims):
        return None
    with vmap_level.lower():
        out = over_tasks(vmap_level.batch_size(), tuple(in_dims), tuple(unwrapped))
    return tuple(_torch.add_batch_dim(x, 0, level) for x in out)


def check_no_draws(before: tuple, leaves: Leaves) -> None:
    """Refuse a compiled call whose kernels drew from the global random state (``before``: its state
    before them, from :func:`rng_state`; ``leaves``: tensors on the devices drawn from)."""
    if not same_rng_state(before, rng_state(leaves)):
        raise ValueError(
            "hf.compile(segment=k) needs an inner step without random draws (dropout, torch.rand): the "
            "segment VJP recomputes the forward and would draw different numbers. Use the eager transform "
            "(hf.vmap(hg, in_dims, randomness='different'); unroll's checkpoint_every replays the random state) "
            "or compile the whole loop: torch.compile(torch.func.vmap(hg, in_dims, randomness='different'), "
            "fullgraph=True)"
        )
