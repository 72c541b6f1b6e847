r"""Whole calls traced: a horizon within one segment as one kernel, a longer one as a program.

For T <= k the segments' several kernels (``prepare``, the segment, its VJP, the outer gradient,
``prepare``'s VJP) and the Python between them cost more than the steps, so the eager algorithm is
compiled as one kernel (:func:`one_kernel`). For T > k the algorithm runs on its kernels, and the
Python around them is traced away (:func:`program`). :func:`traced_call` runs either under ``vmap``
(or for one task) like the other kernels; :func:`traced_call_over_tasks` is ``hf.vmap``'s direct route.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDictBase

from .._rng import rng_state
from .._torch import is_wrapped, tree_children, tree_map
from .._tree import Leaves
from ..transforms._primitives import Layout
from ._kernels import (
    COMPILED,
    Segments,
    TaskKernel,
    backend_compile,
    check_no_draws,
    compile_kernel,
    direct,
    distinct,
    kernel_call,
    trace_or_none,
    wrapped,
)


def one_kernel(fn: Callable, args: tuple, segments: Segments) -> Callable:
    """``fn``, a call with at most k inner steps whose algorithm runs eagerly, compiled as one kernel
    (:func:`compile_kernel`): its graph grows with T only up to k. It runs once for real first, so that a
    mistake in the call raises its own error rather than one from the trace; a call that cannot be
    traced (:func:`trace_or_none`) stays ``fn``, eager. Inputs that another transform wraps are
    dynamo's to trace (:func:`compile_kernel`)."""
    if wrapped(args):
        return compile_kernel(fn, args, segments)
    args = distinct(args)
    fn(*args)
    graph = trace_or_none(fn, args)
    return fn if graph is None else backend_compile(graph, args, segments)


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

    A call that cannot be traced (:func:`trace_or_none`) stays ``fn``: the algorithm calling its
    kernels from Python, as right and slower; so does one whose inputs another transform wraps
    (without a real run first: its kernels compile at the call)."""
    if wrapped(args):
        return fn
    fn(*args)
    graph = trace_or_none(fn, distinct(args))
    if graph is None:
        return fn
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target is kernel_call:
            kernel, inputs = node.args
            node.target, node.args = direct(COMPILED[kernel].run), tuple(inputs)
    graph.recompile()
    return graph.forward


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
    dims = [d for d, arg in zip(in_dims, tree_children(layout.spec)) for _ in range(arg.num_leaves)]
    tensor_dims: list = []
    sizes: set = set()
    shapes: list = []
    leaves = iter(tensors)
    for is_tensor, d in zip(layout.diff, dims):
        if is_tensor is None:  # a non-tensor leaf: vmap refuses a dimension for it
            if d is not None:
                return None
            continue
        x = next(leaves)
        if is_wrapped(x) or (d is not None and not -x.dim() <= d < x.dim()):
            return None
        if d is not None:
            d %= x.dim()
            sizes.add(x.shape[d])
        tensor_dims.append(d)
        shapes.append(x.shape if d is None else x.shape[:d] + x.shape[d + 1 :])
    if len(sizes) != 1:
        return None
    (n,), task_dims = sizes, tuple(tensor_dims)

    def call(kernel: TaskKernel, xs: Leaves) -> tuple:
        return kernel.over_tasks(n, task_dims, xs)

    key, out = _run_traced(outcome, compile, segments, layout, tensors, tuple(shapes), call)
    if (key, n) in segments.results:  # the layout with the task dimension in the batch sizes
        return segments.results[key, n].rebuild((), out)
    result = segments.results[key].rebuild((), out)
    result = tree_map(lambda x: _with_task_dim(x, n), result, is_leaf=lambda x: isinstance(x, TensorDictBase))
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
    rebuilt (its string takes tens of µs for nested TensorDicts). A function among the inputs (a learned
    ``params0``) keys by its code, so that ``hg(h, lambda h: h["init"], ...)`` in a loop, a new function
    object at every call, reuses the kernel: what it reads from outside is guarded by the executor's
    closure fingerprint, which compiles again when that changes."""
    fixed = tuple(("function", x.__code__) if isinstance(x, types.FunctionType) else x for x in layout.fixed)
    for spec, structure in segments.structures:
        if spec == layout.spec and structure[1:] == (fixed, layout.diff):
            break
    else:
        structure = layout._replace(fixed=fixed).key()
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
