r"""Compiled segment kernels: the protocol's primitives as vmapped, ``torch.compile``'d functions.

``hf.compile(hg, segment=k)`` attaches a :class:`Segments` to a transform. Its :class:`Bound` then
runs :meth:`~Bound.run`, :meth:`~Bound.run_vjp`, :meth:`~Bound.run_jvp`, :meth:`~Bound.outer_vjp`,
:meth:`~Bound.scan` and :meth:`~Bound.piece` through *kernels*: pure functions of flat tuples of
tensors, one per kind of piece (the k-step segment map, its VJP, its tangent map, a transform's
k-step recursion, the outer loss and its gradient, a transform's own piece) and per segment
length, compiled once and reused for every segment and every call. The step index enters a
kernel as a tensor, so no segment recompiles.

Under ``torch.func.vmap`` (what ``hf.vmap`` runs) a kernel call unwraps the vmap level and calls
the kernel vmapped over the task dimension and compiled, so the batching is inside the compiled
code; inside a second transform it goes through a ``torch.autograd.Function``'s ``vmap`` rule, and
outside vmap it calls the kernel compiled for one task. Kernels have no derivative: a transform that
differentiates through ``run`` with ``torch.func`` itself must put that work in a
:meth:`~Bound.piece`, or it is not declared ``segmented`` and ``hf.compile`` refuses it.

A whole call is traced too (:func:`traced_call`): with at most k inner steps the eager algorithm
is compiled as one kernel (:func:`one_kernel`); with more, the algorithm on its kernels is traced
into a *program* (:func:`program`) of kernel calls and the algorithm's own arithmetic between them
(cotangent sums, interpolations), replayed without the Python around the kernels.
"""

from __future__ import annotations

import itertools
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
import torch._C._functorch as _functorch
import torch._functorch.pyfunctorch as _pyfunctorch
import torch.utils._pytree as pytree
from tensordict import TensorDictBase
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from .._common_subexpressions import merge_common_subexpressions
from .._tree import Keys, Leaves, build
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

    def kernel(self, key: tuple, fn: Kernel, per_task: range, compile: Optional[Callable] = None) -> Callable:
        """The compiled kernel for ``key`` (built from ``fn`` on first use). The inputs at positions
        ``per_task`` (states, cotangents, accumulators) are per-task quantities: one that reaches the
        kernel unbatched (the shared w_0, a zero accumulator) is expanded over the tasks, so the first
        segment uses the same compiled kernel as the others."""
        if key not in self.kernels:
            self.kernels[key] = _batched_kernel(fn, self, frozenset(per_task), compile or _compiled)
        return self.kernels[key]


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object and name of its own: dynamo keeps its cache, recompile budget and
    automatic-dynamic shape memory per code object and name, so kernels sharing a Python function
    would count as recompiles of one another and make each other's shapes symbolic."""
    name = f"{fn.__name__}_{next(_KERNEL_IDS)}"
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _compiled(fn: Callable, args: tuple, segments: Segments) -> Callable:
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
    if _wrapped(args):
        return torch.compile(_own_code(fn), **segments.options)
    args = _distinct(args)
    return _backend(_trace(fn, args), args, segments)


def _wrapped(args: tuple) -> bool:
    """Whether another transform (a ``vmap`` around ``hf.vmap``) still wraps one of ``args``: dynamo's to
    trace through, not ``make_fx``'s."""
    return any(_functorch.is_functorch_wrapped_tensor(x) for x in args)


def _backend(graph: torch.fx.GraphModule, args: tuple, segments: Segments) -> Callable:
    """``graph`` (traced on inputs like ``args``) compiled by ``segments.backend``."""
    if segments.options.get("disable"):
        return graph
    # the example inputs as fake tensors of a mode with a shape environment, as dynamo hands them over:
    # without one, AOTAutograd's and inductor's caches are bypassed and every warm start compiles afresh
    fake = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with torch._guards.tracing(torch._guards.TracingContext(fake)):
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


def _trace_or_none(fn: Callable, args: tuple) -> Optional[torch.fx.GraphModule]:
    """:func:`_trace` of a whole call that has run for real on ``args`` (already :func:`_distinct`, none
    :func:`_wrapped`; the run raised the call's own errors), or None where the trace fails: Python that
    reads a tensor's value, a kernel signature the real run did not compile, an operation the fake
    tensors refuse (``torch.func.jvp`` of ``forward``'s ``prepare`` with per-task hyperparameters,
    torch 2.13)."""
    try:
        return _trace(fn, args)
    except Exception:  # noqa: BLE001 (the call itself went through: what failed is its trace)
        return None


def one_kernel(fn: Callable, args: tuple, segments: Segments) -> Callable:
    """``fn``, a call with at most k inner steps whose algorithm runs eagerly, compiled as one kernel
    (:func:`_compiled`): its graph grows with T only up to k. It runs once for real first, so that a
    mistake in the call raises its own error rather than one from the trace; a call that cannot be
    traced (:func:`_trace_or_none`) stays ``fn``, eager. Inputs that another transform wraps are
    dynamo's to trace (:func:`_compiled`)."""
    if _wrapped(args):
        return _compiled(fn, args, segments)
    args = _distinct(args)
    fn(*args)
    graph = _trace_or_none(fn, args)
    return fn if graph is None else _backend(graph, args, segments)


def program(fn: Callable, args: tuple, segments: Segments) -> Callable:
    """``fn``, a call whose algorithm runs on its kernels (T > k), as a *program*: run once for real,
    which compiles every kernel it reaches, then traced by ``make_fx`` on fake tensors with each kernel
    call one opaque ``hyperfunc::kernel_call`` node, turned into a direct call of the compiled kernel.

    The replay is the algorithm's own arithmetic (cotangent sums, CG's scalars) as aten operations
    between the kernel calls: the Python that ran around them, which cost more than the kernels at
    T = 100 (binding the problem, the algorithm's bookkeeping, ``vmap``'s entry and exit around every
    kernel, each kernel's lookup by signature), is gone. Its graph has O(T/k) nodes (about 1,900 for
    ``unroll`` at T = 1000, k = 10; traced in about a second). Values read in Python at trace time
    (a step count, a shape) are fixed in it, as in every kernel; the caller keys it by what fixes them.

    A call that cannot be traced (:func:`_trace_or_none`) stays ``fn``: the algorithm calling its
    kernels from Python, as right and slower; so does one whose inputs another transform wraps
    (without a real run first: its kernels compile at the call)."""
    if _wrapped(args):
        return fn
    fn(*args)
    graph = _trace_or_none(fn, _distinct(args))
    if graph is None:
        return fn
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target is _kernel_call:
            kernel, inputs = node.args
            node.target, node.args = _direct(_COMPILED[kernel].run), tuple(inputs)
    graph.recompile()
    return graph.forward


def _direct(run: Callable) -> Callable:
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
        self.run, self.outputs, self.id = run, None, next(_KERNEL_IDS)
        _COMPILED[self.id] = self

    def __call__(self, args: tuple) -> tuple:
        if get_proxy_mode() is not None:
            if self.outputs is None:
                raise _Untraceable
            return tuple(_kernel_call(self.id, list(args)))
        out = self.run(*args)
        if self.outputs is None:
            self.outputs = tuple((x.shape, x.stride(), x.dtype, x.device) for x in out)
        return out


_COMPILED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> _Compiled, for kernel_call
_LIB = torch.library.Library("hyperfunc", "FRAGMENT")
_LIB.define("kernel_call(int kernel, Tensor[] args) -> Tensor[]")
_LIB.impl("kernel_call", lambda kernel, args: list(_COMPILED[kernel].run(*args)), "CompositeExplicitAutograd")
_kernel_call = torch.ops.hyperfunc.kernel_call.default


@torch.library.register_fake("hyperfunc::kernel_call", lib=_LIB)
def _(kernel: int, args: list) -> list:
    return [
        torch.empty_strided(shape, stride, dtype=dtype, device=device)
        for shape, stride, dtype, device in _COMPILED[kernel].outputs
    ]


def _distinct(args: tuple) -> tuple:
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
    if backend == "inductor":
        return torch._TorchCompileInductorWrapper(mode, dict(settings or {}), options.get("dynamic"))
    return torch._TorchCompileWrapper(backend, mode, settings, options.get("dynamic"))


def _signature(args: tuple) -> tuple:
    return tuple((x.shape, x.stride(), x.dtype, x.device, x.requires_grad) for x in args)


def _batched_kernel(fn: Kernel, segments: Segments, per_task: frozenset, compile: Callable) -> Callable:
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
                return torch.func.vmap(fn, in_dims=in_dims)(*args)

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
        interpreter = _functorch.peek_interpreter_stack()
        if interpreter is None or interpreter.key() == _functorch.TransformType.Functionalize:
            return one_task(args)  # no transform to go through (functionalize: a program's trace for one task)
        out = _under_vmap(over_tasks, args, interpreter)
        return _Kernel.apply(*args) if out is None else out

    call.over_tasks = over_tasks  # for a caller that holds the tasks' physical tensors itself (traced_call_over_tasks)
    return call


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
    if interpreter.key() != _functorch.TransformType.Vmap:
        return None
    vmap_level = _pyfunctorch.coerce_cinterpreter(interpreter)
    level = vmap_level.level()
    unwrapped, in_dims = [], []
    for x in args:
        x, d = _functorch._unwrap_batched(x, level)
        if _functorch.is_functorch_wrapped_tensor(x):  # another transform's tensor: take the general path
            return None
        unwrapped.append(x)
        in_dims.append(d)
    if all(d is None for d in in_dims):
        return None
    with vmap_level.lower():
        out = over_tasks(vmap_level.batch_size(), tuple(in_dims), tuple(unwrapped))
    return tuple(_functorch._add_batch_dim(x, 0, level) for x in out)


class Layout(NamedTuple):
    """A batch pytree as flat tensors: ``spec`` and the non-tensor leaves are static (in the kernel key),
    ``diff`` marks the leaves that are prepared floats (``d``, whose cotangent is returned)."""

    spec: Any
    fixed: tuple  # the non-tensor leaves, None where a tensor goes
    diff: tuple  # per leaf: True for a d leaf, False for another tensor, None for a non-tensor

    @classmethod
    def of(cls, tree: Any, prepared: bool) -> tuple[Layout, Leaves, Leaves]:
        """``(layout, d_leaves, other_tensor_leaves)`` of ``tree``."""
        leaves, spec = pytree.tree_flatten(tree)
        diff = tuple(None if not torch.is_tensor(x) else (prepared and x.is_floating_point()) for x in leaves)
        fixed = tuple(None if torch.is_tensor(x) else x for x in leaves)
        d = tuple(x for x, f in zip(leaves, diff) if f)
        others = tuple(x for x, f in zip(leaves, diff) if f is False)
        return cls(spec, fixed, diff), d, others

    def key(self) -> tuple:
        try:
            hash(self.fixed)
        except TypeError as err:
            raise TypeError(
                "hf.compile needs the non-tensor leaves of the batches to be hashable (ints, floats, None, "
                f"strings): {err}"
            ) from err
        return (str(self.spec), self.fixed, self.diff)

    def rebuild(self, d: Leaves, others: Leaves) -> Any:
        floats, rest = iter(d), iter(others)
        leaves = [x if f is None else next(floats) if f else next(rest) for x, f in zip(self.fixed, self.diff)]
        return pytree.tree_unflatten(leaves, self.spec)


class Structure(NamedTuple):
    """What a kernel needs to know about one call beyond its tensors (all of it static)."""

    pkeys: Keys
    hkeys: Keys
    bkeys: Any  # the buffer keys, or None for no buffers
    n_state: int

    @property
    def n_buffers(self) -> int:
        return 0 if self.bkeys is None else len(self.bkeys)


def split(flat: Leaves, *sizes: int) -> list:
    out, i = [], 0
    for n in sizes:
        out.append(tuple(flat[i : i + n]))
        i += n
    out.append(tuple(flat[i:]))
    return out


def buffers_in(bkeys: Any, b: Leaves) -> Any:
    return () if bkeys is None else build(bkeys, b)


def buffers_out(bkeys: Any, b: Any) -> Leaves:
    return () if bkeys is None else tuple(b[k] for k in bkeys)


def _inputs(st: Structure, layout: Layout) -> tuple:
    """The group sizes of a segment kernel's flat inputs: state, buffers, hparams, d, other batch leaves."""
    n_d = sum(1 for f in layout.diff if f)
    n_o = sum(1 for f in layout.diff if f is False)
    return st.n_state, st.n_buffers, len(st.hkeys), n_d, n_o


def _steps(loop: Any, st: Structure, layout: Layout, n: int, s, b, h, d, others, t0) -> tuple:
    """``n`` inner steps from ``(s, b)``: the flat state followed by the flat buffers."""
    hparams, batches, buffers = build(st.hkeys, h), layout.rebuild(d, others), buffers_in(st.bkeys, b)
    for i in range(n):
        s, buffers = loop._step(st.pkeys, s, buffers, hparams, loop._batch_at(batches, i), t0 + i)
    return tuple(s) + buffers_out(st.bkeys, buffers)


def segment_map(loop: Any, st: Structure, layout: Layout, n: int) -> Kernel:
    """``(s, b, h, d, others, t0) -> (s', b')``: ``n`` steps from step index ``t0`` (a tensor)."""
    sizes = _inputs(st, layout)

    def kernel(*flat):
        s, b, h, d, others, (t0,) = split(flat, *sizes)
        return _steps(loop, st, layout, n, s, b, h, d, others, t0)

    return kernel


def segment_vjp(loop: Any, st: Structure, layout: Layout, n: int) -> Kernel:
    """``(s, b, h, d, others, t0, ct_s', acc_h, acc_d) -> (ct_s, acc_h + ct_h, acc_d + ct_d)``: the segment's VJP
    (its forward recomputed), the cotangents on λ and d accumulated inside the kernel. ``acc_d`` is
    empty unless the loop is full-batch; otherwise ``ct_d`` (the window's cotangent) is returned as is."""
    sizes = _inputs(st, layout)
    n_d = sizes[3]

    def kernel(*flat):
        s, b, h, d, others, (t0,), ct, acc_h, acc_d = split(flat, *sizes, 1, st.n_state, len(st.hkeys))

        def fn(s, h, d):
            return _steps(loop, st, layout, n, s, b, h, d, others, t0)[: st.n_state]

        _, pull = torch.func.vjp(fn, s, h, d)
        ct_s, ct_h, ct_d = pull(ct)
        if len(acc_d) == n_d:
            ct_d = tuple(a + x for a, x in zip(acc_d, ct_d))
        return tuple(ct_s) + tuple(a + x for a, x in zip(acc_h, ct_h)) + tuple(ct_d)

    return kernel


def push_forward(fn: Callable, primals: tuple, tangents: tuple) -> tuple:
    r"""``(fn(*primals), J·t for every row t of tangents, aux)`` for ``fn(*primals) -> (out, aux)``.

    The products are the transpose of ``fn``'s VJP: :math:`u \mapsto J^\top u` is linear, so its VJP
    at any :math:`u` with cotangent :math:`t` is :math:`J t`. One VJP of ``fn`` serves every row of
    ``tangents`` (a tuple over ``primals``, each a tuple of leaves with a leading direction dimension).
    Reverse-over-reverse, because ``torch.func.jvp`` of a step holding a ``torch.func.grad`` fails in
    dynamo's fake-tensor pass when a ``vmap`` over tasks encloses the ``vmap`` over directions (torch
    2.13), which both compiled routes need; this form compiles there."""
    out, pull, aux = torch.func.vjp(fn, *primals, has_aux=True)
    transpose = torch.func.vjp(pull, tuple(torch.zeros_like(x) for x in out))[1]
    return out, torch.func.vmap(lambda *t: transpose(t)[0])(*tangents), aux


def segment_jvp(loop: Any, st: Structure, layout: Layout, n: int) -> Kernel:
    r"""``(s, b, h, d, others, t0, Z, E, Zd) -> (s', b', Z')``: the segment map and its tangents
    :math:`Z' = A Z + B_\lambda E + B_d Z_d` (one row per hyperparameter direction)."""
    sizes = _inputs(st, layout)

    def kernel(*flat):
        s, b, h, d, others, (t0,), Z, E, Zd = split(flat, *sizes, 1, st.n_state, sizes[2])

        def fn(s, h, d):
            out = _steps(loop, st, layout, n, s, b, h, d, others, t0)
            return out[: st.n_state], out[st.n_state :]

        s, Z, b = push_forward(fn, (s, h, d), (Z, E, Zd))
        return tuple(s) + tuple(b) + tuple(Z)

    return kernel


def prepare(loop: Any, hkeys: Keys, raw: Layout) -> Kernel:
    """``(h, batch leaves) -> (d, others)``: ``prepare``'s output as flat leaves (its floats ``d`` first)."""

    def kernel(*flat):
        h, leaves = split(flat, len(hkeys))
        _, d, others = Layout.of(loop._prepared(build(hkeys, h), raw.rebuild((), leaves)), True)
        return (*d, *others)

    return kernel


def prepare_vjp(loop: Any, hkeys: Keys, raw: Layout, n_leaves: int) -> Kernel:
    """``(h, batch leaves, ct_d) -> ct_h``: the pullback of the prepared floats (the forward recomputed)."""

    def kernel(*flat):
        h, leaves, ct_d = split(flat, len(hkeys), n_leaves)
        batches = raw.rebuild((), leaves)

        def fn(h):
            return Layout.of(loop._prepared(build(hkeys, h), batches), True)[1]

        return tuple(torch.func.vjp(fn, h)[1](ct_d)[0])

    return kernel


def _outer(outer_loss: Any, st: Structure, layout: Layout, s: Leaves, b: Leaves, h: Leaves, batch: Leaves):
    """:math:`L_{out}` for the params held in the flat state ``s`` (buffers ``b``, outer batch leaves ``batch``)."""
    from ..loop import call_loss, module_buffers

    params, buffers = build(st.pkeys, s[: len(st.pkeys)]), module_buffers(buffers_in(st.bkeys, b))
    return call_loss(outer_loss, "outer_loss", params, build(st.hkeys, h), layout.rebuild((), batch), buffers)[0]


def outer_vjp(outer_loss: Any, st: Structure, layout: Layout, with_h: bool) -> Kernel:
    """``(s, b, h, batch) -> (L_out, α[, ct_h])``: the outer loss and its gradients."""

    def kernel(*flat):
        s, b, h, batch = split(flat, st.n_state, st.n_buffers, len(st.hkeys))

        def fn(s, h):
            return _outer(outer_loss, st, layout, s, b, h, batch)

        if with_h:
            loss, pull = torch.func.vjp(fn, s, h)
            alpha, ct_h = pull(torch.ones_like(loss))
            return (loss,) + tuple(alpha) + tuple(ct_h)
        loss, pull = torch.func.vjp(lambda s: fn(s, h), s)
        return (loss,) + tuple(pull(torch.ones_like(loss))[0])

    return kernel


def segment_outer_vjp(
    loop: Any, outer_loss: Any, st: Structure, layout: Layout, outer_layout: Layout, n: int
) -> Kernel:
    r"""``(s, b, h, d, others, t0, outer batch) -> (L_out, s', b', ct_s, ct_h, ct_d)``: the last segment, the
    outer loss after it and their VJP in one kernel, so the segment's forward runs once (a
    :func:`segment_map` then a :func:`segment_vjp` run it twice). ``ct_h`` holds the direct term
    :math:`\partial_\lambda L_{out}` and ``ct_d`` the cotangent on the segment's window of ``d``. As in
    :func:`outer_vjp`, the outer loss reads the buffers after the segment without differentiating them."""
    sizes = _inputs(st, layout)

    def kernel(*flat):
        s, b, h, d, others, (t0,), batch = split(flat, *sizes, 1)

        def fn(s, h, d):
            out = _steps(loop, st, layout, n, s, b, h, d, others, t0)
            s_new, b_new = out[: st.n_state], tuple(x.detach() for x in out[st.n_state :])
            return _outer(outer_loss, st, outer_layout, s_new, b_new, h, batch), (s_new, b_new)

        loss, pull, (s_new, b_new) = torch.func.vjp(fn, s, h, d, has_aux=True)
        ct_s, ct_h, ct_d = pull(torch.ones_like(loss))
        return (loss, *s_new, *b_new, *ct_s, *ct_h, *ct_d)

    return kernel


def rng_state(leaves: Leaves) -> tuple:
    """The global random states that a segment's steps may draw from: CPU, and the CUDA devices of ``leaves``."""
    cuda = sorted({x.device for x in leaves if x.device.type == "cuda"}, key=str)
    return torch.get_rng_state(), tuple((d, torch.cuda.get_rng_state(d)) for d in cuda)


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in cuda:
        torch.cuda.set_rng_state(value, device)


def check_no_draws(before: tuple, leaves: Leaves) -> None:
    """Refuse a compiled call whose kernels drew from the global random state (``before``: its state
    before them, from :func:`rng_state`; ``leaves``: tensors on the devices drawn from)."""
    after = rng_state(leaves)
    if not (torch.equal(before[0], after[0]) and all(torch.equal(x, y) for (_, x), (_, y) in zip(before[1], after[1]))):
        raise ValueError(
            "hf.compile(segment=k) needs an inner step without random draws (dropout, torch.rand): the "
            "segment VJP recomputes the forward and would draw different numbers; use the eager transform "
            "(with checkpoint_every, which replays the random state)"
        )


def traced_call(outcome: Callable, compile: Callable, segments: Segments, args: tuple) -> Any:
    r"""``outcome(*args)`` (a transform's call, ``(HyperGrad, aux)``) traced whole and compiled by
    ``compile``: :func:`one_kernel` for a horizon within one segment, :func:`program` for a longer one.

    For T <= k, the segments' several kernels (``prepare``, the segment, its VJP, the outer gradient,
    ``prepare``'s VJP) and the Python between them cost more than the steps (ANIL at T = 10: about
    0.7 of 1.8 ms), so the eager algorithm is compiled as one kernel. For T > k the algorithm runs on
    its kernels, and the Python around them is traced away. Called under ``vmap`` (or for one task)
    like the other kernels; see :func:`traced_call_over_tasks` for ``hf.vmap``'s direct route."""
    layout, _, tensors = Layout.of(args, False)
    shapes = tuple(x.shape for x in tensors)
    key, out = _run_traced(outcome, compile, segments, layout, tensors, shapes, lambda kernel, xs: kernel(*xs))
    return segments.results[key].rebuild((), out)


def traced_call_over_tasks(outcome: Callable, compile: Callable, segments: Segments, args: tuple, in_dims: Any) -> Any:
    """``torch.func.vmap(outcome, in_dims)(*args)`` by :func:`traced_call`'s kernel, batched over the tasks and
    called on their tensors directly: ``vmap``'s own entry and exit (wrapping every input, and
    TensorDict's handling of batched inputs and outputs) cost about as much as the kernel at T = 10.
    The result is rebuilt as ``vmap`` returns it (tensors batched at dim 0, TensorDicts with the task
    dimension first in their batch size). None when ``in_dims`` do not give each argument one
    dimension (an int or None), the batch sizes differ, or an input is another transform's: ``vmap``
    then runs (and raises its errors)."""
    in_dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    if len(in_dims) != len(args) or any(d is not None and type(d) is not int for d in in_dims):
        return None
    layout, _, tensors = Layout.of(args, False)
    dims = [d for d, arg in zip(in_dims, layout.spec.children()) for _ in range(arg.num_leaves)]
    tensor_dims, sizes, shapes, leaves = [], set(), [], iter(tensors)
    for is_tensor, d in zip(layout.diff, dims):
        if is_tensor is None:  # a non-tensor leaf: vmap refuses a dimension for it
            if d is not None:
                return None
            continue
        x = next(leaves)
        if _functorch.is_functorch_wrapped_tensor(x) or (d is not None and not -x.dim() <= d < x.dim()):
            return None
        if d is not None:
            d %= x.dim()
            sizes.add(x.shape[d])
        tensor_dims.append(d)
        shapes.append(x.shape if d is None else x.shape[:d] + x.shape[d + 1 :])
    if len(sizes) != 1:
        return None
    (n,), tensor_dims = sizes, tuple(tensor_dims)

    def call(kernel: Callable, xs: Leaves) -> tuple:
        return kernel.over_tasks(n, tensor_dims, xs)

    key, out = _run_traced(outcome, compile, segments, layout, tensors, tuple(shapes), call)
    if (key, n) in segments.results:  # the layout with the task dimension in the batch sizes
        return segments.results[key, n].rebuild((), out)
    result = segments.results[key].rebuild((), out)
    result = pytree.tree_map(lambda x: _with_task_dim(x, n), result, is_leaf=lambda x: isinstance(x, TensorDictBase))
    segments.results[key, n] = Layout.of(result, False)[0]
    return result


def _run_traced(
    outcome: Callable, compile: Callable, segments: Segments, layout: Layout, tensors: Leaves, shapes: tuple, call
) -> tuple:
    """``(key, flat result)``: the traced call of ``outcome`` compiled by ``compile`` for inputs ``layout``
    (tensor leaves ``tensors``, per-task ``shapes``), run by ``call(kernel, detached tensors)``; refuses
    random draws."""
    tensors = tuple(x.detach() for x in tensors)  # Bound.bind detaches them too
    key = _traced_key(compile, segments, layout, shapes, tensors)
    before = rng_state(tensors)
    out = call(_traced_kernel(outcome, compile, segments, key, layout), tensors)
    check_no_draws(before, tensors)
    return key, out


def _traced_key(compile: Callable, segments: Segments, layout: Layout, shapes: tuple, tensors: Leaves) -> tuple:
    """The kernel key of a traced call: how it is compiled, the inputs' structure and their per-task shapes,
    dtypes and devices. The structure's key is looked up by the spec's equality (a few µs) rather than
    rebuilt (its string takes tens of µs for nested TensorDicts)."""
    for spec, structure in segments.structures:
        if spec == layout.spec and structure[1:] == (layout.fixed, layout.diff):
            break
    else:
        structure = layout.key()
        segments.structures.append((layout.spec, structure))
    return (compile.__name__, structure, shapes, tuple((x.dtype, x.device) for x in tensors))


def _traced_kernel(outcome: Callable, compile: Callable, segments: Segments, key: tuple, layout: Layout) -> Callable:
    def kernel(*flat):
        result_layout, _, out = Layout.of(outcome(*layout.rebuild((), flat)), False)
        segments.results[key] = result_layout  # learned when traced (the same for every signature of the key)
        return out

    return segments.kernel(key, kernel, (), compile)


def _with_task_dim(x: Any, n: int) -> Any:
    """A per-task result's TensorDict with the task dimension ``n`` prepended to its batch size, as
    ``vmap`` returns it (its leaves already carry the dimension)."""
    if isinstance(x, TensorDictBase):
        x.batch_size = torch.Size([n]) + x.batch_size
    return x
