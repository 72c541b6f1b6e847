r"""``hf.vmap`` and ``hf.compile``: compiled hypergradients with compile time flat in T.

``torch.compile(torch.func.vmap(hg, in_dims))`` traces the whole unrolled inner loop, so its compile
time grows with the number of inner steps T (DESIGN.md, "Compilation"). ``hf.compile(hf.vmap(hg,
in_dims), segment=k)`` compiles the protocol's pieces instead: the k-step segment map, its VJP and
the outer loss with its gradient, each vmapped over the task dimension and compiled once, then
reused by every segment and every call. A T that is not a multiple of k adds one kernel for the
remainder. The call itself is traced once: as one kernel for T <= k, as a program of kernel calls
for T > k.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from .._checks import check_int
from ..transforms.base import HyperGradFunction
from ._executor import Compiled
from ._kernels import Segments, compiler
from ._task_loop import mapped, one_task_at_a_time

__all__ = ["Vmapped", "compile", "vmap"]

_TORCH_COMPILE_KEYWORDS = frozenset(inspect.signature(torch.compile).parameters) - {"model"}


@dataclass(frozen=True)
class Vmapped:
    """``hf.vmap(hg, in_dims)``: calls ``torch.func.vmap(hg, in_dims, chunk_size=chunk_size,
    randomness=randomness)``; kept as a value so that :func:`compile` can compile ``hg``'s kernels batched
    over the task dimension. A compiled ``hg`` (its call traced as one kernel or one program) is called
    on the tasks' tensors directly, its result rebuilt as ``vmap`` returns it."""

    fn: Any
    in_dims: Any = 0
    chunk_size: Optional[int] = None
    randomness: str = "error"

    def __call__(self, *args, **kwargs):
        in_dims, is_hg = self.in_dims, isinstance(self.fn, HyperGradFunction)
        if is_hg:
            args, in_dims = _positional(args, kwargs, in_dims)
            kwargs = {}
            _check_task_counts(args, in_dims)
        if is_hg and self.chunk_size == 1:
            return one_task_at_a_time(self.fn, args, in_dims, self.randomness)
        if is_hg and isinstance(self.fn.executor, Compiled) and self.chunk_size is None:
            result = self.fn.executor.over_tasks(self.fn, in_dims, args)  # the traced call, no vmap
            if result is not None:
                return result
        vmapped = torch.func.vmap(self.fn, in_dims=in_dims, chunk_size=self.chunk_size, randomness=self.randomness)
        return vmapped(*args, **kwargs)


_HG_ARGUMENTS = ("hparams", "params0", "inner_batches", "outer_batch", "buffers")


def _positional(args: tuple, kwargs: dict, in_dims: Any) -> tuple[tuple, tuple]:
    """``hg``'s arguments all positional and ``in_dims`` one entry per argument. An ``in_dims`` entry belongs
    to the argument at its position in ``hg(hparams, params0, inner_batches, outer_batch, buffers)``, passed
    by position or by keyword; an argument beyond ``in_dims`` is shared (``None``)."""
    n = len(_HG_ARGUMENTS)
    unknown = sorted(set(kwargs) - set(_HG_ARGUMENTS))
    if unknown or len(args) > n:
        raise TypeError(f"hg{_HG_ARGUMENTS} got unexpected arguments: {unknown or f'{len(args)} positional'}")
    dims = tuple(in_dims) if isinstance(in_dims, (tuple, list)) else (in_dims,) * (len(args) + len(kwargs))
    if len(dims) < len(args) or len(dims) > n:
        raise ValueError(
            f"in_dims has {len(dims)} entries for {len(args)} positional arguments; give one per argument of "
            f"hg{_HG_ARGUMENTS} in order, up to the last one passed positionally (None for what the tasks share)"
        )
    missing = object()
    values = list(args) + [missing] * (n - len(args))
    for name, value in kwargs.items():
        index = _HG_ARGUMENTS.index(name)
        if values[index] is not missing:
            raise TypeError(f"hg got {name} both by position and by keyword")
        values[index] = value
    while values and values[-1] is missing:
        values.pop()
    absent = [name for name, value in zip(_HG_ARGUMENTS, values) if value is missing]
    if absent:
        raise TypeError(f"hg{_HG_ARGUMENTS} is missing {absent}")
    dims = dims + (None,) * (len(values) - len(dims))
    return tuple(values), dims[: len(values)]


def _check_task_counts(args: tuple, in_dims: tuple) -> None:
    """Every mapped argument has the same number of tasks along its ``in_dims`` entry, named if not."""
    counts = {}
    for name, value, dim in zip(_HG_ARGUMENTS, args, in_dims):
        sizes = {x.shape[d] for x, d in mapped(value, dim) if x.dim() > d}
        if sizes:
            counts[name] = sorted(sizes)
    if len({size for sizes in counts.values() for size in sizes}) > 1:
        found = ", ".join(f"{name} {sizes}" for name, sizes in counts.items())
        raise ValueError(
            f"the mapped arguments disagree on the number of tasks: {found} (along in_dims); give every argument "
            "with an in_dims entry one entry per task"
        )


_RANDOMNESS = ("error", "different", "same")


def vmap(hg: Any, in_dims: Any = 0, chunk_size: Optional[int] = None, randomness: str = "error") -> Vmapped:
    r"""``torch.func.vmap(hg, in_dims, chunk_size=chunk_size, randomness=randomness)`` over a meta-batch of
    tasks, as a value :func:`compile` can see through (same semantics and results as ``torch.func.vmap``).

    .. math:: \text{vmap}(hg)(\lambda, \{w_0^i\}, \{D^i\}, \{V^i\})_i = hg(\lambda, w_0^i, D^i, V^i)

    ``in_dims`` has one entry per argument of ``hg(hparams, params0, inner_batches, outer_batch,
    buffers)``, in that order: ``None`` for what the tasks share (``hparams``; ``params0`` when it is a
    function of ``hparams``, MAML), ``0`` for what each task has its own of (data, per-task buffers).
    An entry belongs to its argument whether that is passed by position or by keyword (here hf.vmap
    differs from ``torch.func.vmap``, which maps no keyword argument); an argument beyond ``in_dims``
    is shared. The mapped arguments must agree on the number of tasks (a ``ValueError`` names them).
    A model with dropout needs ``randomness="different"`` (a mask per task, as a loop over tasks draws) or ``"same"``;
    :func:`compile` refuses both (each segment's VJP recomputes its forward and would draw other masks).

    ``chunk_size=1`` runs the tasks one at a time as a Python loop, without ``vmap`` (``torch.func.vmap``
    would run its batching rules at a batch of one), and stacks the results as ``vmap`` does; the
    ``randomness`` modes keep their meaning. Memory: one task's graph at a time. Batch norm then runs
    torch's kernel, and under :func:`compile` each task calls kernels compiled for one task, whose graphs
    lack the task dimension's reshapes: on Conv-4 MAML on a 2-core CPU that is the faster route, eager and
    compiled, and the shorter compile (``benchmarks/models.py``; ``docs/benchmarks.md``). Where the tasks are
    small (an MLP head), batching them (the default) is faster.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum(),
        ...                     hf.optim.sgd(lr=0.1), steps=20, full_batch=True)
        >>> hg = hf.vmap(hf.unroll(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum()), in_dims=(None, 0, 0, 0))
        >>> h, w0 = TensorDict({"l2": torch.tensor(0.5)}, []), TensorDict({"w": torch.zeros(3, 1)}, [3])
        >>> hg(h, w0, torch.ones(3, 1), torch.zeros(3, 1)).grads["l2"]
        tensor([-0.5876, -0.5876, -0.5876])
    """
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", 1)
    if randomness not in _RANDOMNESS:
        raise ValueError(f"randomness must be one of {_RANDOMNESS} (torch.func.vmap's), got {randomness!r}")
    return Vmapped(hg, in_dims, chunk_size, randomness)


def compile(fn: Any, segment: int, **options: Any) -> Any:
    r"""Compile a hypergradient function by segments: compile time independent of the number of steps T.

    ``hf.compile(hf.vmap(hg, in_dims), segment=k)`` returns ``hf.vmap(hg', in_dims)`` where ``hg'`` runs
    ``hg``'s algorithm over compiled kernels (``torch.func.vmap(kernel)``, traced and compiled with the
    compiler that ``torch.compile(**options)`` would use):
    the k-step segment map :math:`s_{a+k} = \Phi_{a+k} \circ \cdots \circ \Phi_{a+1}(s_a)`, its VJP
    :math:`\bar s_{a+k} \mapsto (\bar s_a, \bar\lambda, \bar D)`, :math:`(L_{out}, \alpha, \partial_\lambda
    L_{out})`, ``prepare`` and its VJP (the first call runs ``prepare`` once eagerly to learn its
    output's layout). Each kernel compiles once (per segment length: a T that is not a multiple of k adds
    one) and is reused for every segment and call; the step index is a tensor input, so no segment
    recompiles, and counts such as T (DrMAD) or B and M (``langevin``) are tensor inputs too, so
    another horizon traces the same graphs and hits inductor's cache. ``hf.compile(hg, segment=k)``
    compiles the kernels for one task.

    A horizon within one segment (T <= k, the few-step regime of MAML-style meta-learning) compiles
    the whole call instead: the eager algorithm traced as one kernel, whose graph grows with T only up
    to k, and which ``hf.vmap`` calls on the tasks' tensors without entering ``vmap`` (whose entry
    and exit, with TensorDict inputs, cost as much as the kernel's own wrapper at T = 10). On ANIL
    sinusoids at T = 10, ``python benchmarks/compiled.py --segments 10 50`` measured 0.6-1.4 ms per
    meta-batch of 10, 1.07x-1.35x the compiled inner loop plus the body's forward and backward (the
    benchmark's lower bound; ``unroll`` 1.15x, the whole-loop compile 1.10x), where segments took
    2.3-3.8 ms.

    A longer horizon (T > k) is traced as a *program*: the first call runs the algorithm on its kernels
    for real, which compiles them, then traces it once more with each kernel call one opaque operator;
    later calls replay the kernel calls and the algorithm's arithmetic between them without its
    Python (binding, bookkeeping, ``vmap``'s entry and exit around every kernel), which cost about as
    much as the kernels at T = 100. A call that cannot be traced (an algorithm that reads a tensor's
    value in Python) runs its algorithm on the kernels at every call, as right and slower.

    Forward mode adds the segment's tangent map :math:`Z_{a+k} = \partial s_{a+k}/\partial(s_a, \lambda, D)
    \cdot (Z_a, E, Z_D)`; a transform's per-step recursion (DrMAD's backward travel, the greedy
    accumulation, HPO-SGLD, HyperDistill's state average) runs k steps per kernel; the pieces that
    differentiate the step or the outer loss themselves (``implicit``'s solve at :math:`w_T`,
    ``distill``'s distilled VJP) are one kernel each. The segment length trades compile time
    (about linear in k: ``unroll`` at T = 1000 compiles in 38.5 s cold with k = 10, 150.2 s with k = 50)
    for per-call overhead.

    Each kernel is traced once per input signature by ``make_fx`` (functionalized) into
    aten operations; repeated subexpressions are merged (a k-step kernel evaluates the outer loss k
    times, and the parts that depend on λ alone, such as an ANIL body's features of the outer batch,
    are computed once), and that graph goes straight to ``torch.compile``'s backend (inductor by default):
    dynamo, whose guards cost about 0.1 ms per kernel call, only traces a kernel called inside a second
    transform (a ``vmap`` around ``hf.vmap``).

    The result equals the eager transform (float64 to 1e-10). Cost: each segment's VJP recomputes its
    forward (one extra forward pass, as ``checkpoint_every=k``); memory O((T/k + k)·|s|). Supported:
    every built-in transform (``unroll``, ``truncate``, ``one_step``, ``first_order``, ``forward``,
    ``drmad``, ``greedy_accumulate``, ``distill``, ``implicit``, ``langevin``) and any transform
    declared ``segmented`` (``make_transform(..., segmented=True)``); an undeclared one raises
    ``TypeError`` (use ``torch.compile(torch.func.vmap(hg))`` for it). The inner step must not draw
    random numbers (dropout): the recomputed forward would draw others, so a draw raises ``ValueError``.

    Args:
        fn: an :func:`vmap` of a hypergradient function, or a hypergradient function.
        segment: k, the number of inner steps per compiled segment.
        **options: ``torch.compile``'s keyword arguments (``backend``, ``mode``, ``options``, ``dynamic``,
            ``disable``; ``fullgraph`` and the recompile settings matter only under a second transform,
            where dynamo traces the kernels). ``dynamic`` defaults to False: a new meta-batch size or data
            shape compiles new kernels, whose code is specialised to the shapes (with symbolic shapes
            inductor's kernels ran 30x slower here). Another keyword is a ``TypeError``.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum(),
        ...                     hf.optim.sgd(lr=0.1), steps=20, full_batch=True)
        >>> hg = hf.vmap(hf.unroll(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum()), in_dims=(None, 0, 0, 0))
        >>> fast = hf.compile(hg, segment=8, backend="eager")  # 8 + 8 + 4 steps, two segment lengths
        >>> h, w0 = TensorDict({"l2": torch.tensor(0.5)}, []), TensorDict({"w": torch.zeros(3, 1)}, [3])
        >>> fast(h, w0, torch.ones(3, 1), torch.zeros(3, 1)).grads["l2"]
        tensor([-0.5876, -0.5876, -0.5876])
    """
    segment = check_int(segment, "segment", 1)
    unknown = sorted(set(options) - _TORCH_COMPILE_KEYWORDS)
    if unknown:
        raise TypeError(
            f"hf.compile(fn, segment=k, **options) got {', '.join(map(repr, unknown))}: options are torch.compile's "
            f"keyword arguments ({', '.join(sorted(_TORCH_COMPILE_KEYWORDS))})"
        )
    if isinstance(fn, Vmapped):
        if fn.randomness != "error":
            raise ValueError(
                f"hf.compile(segment=k) cannot honour hf.vmap(..., randomness={fn.randomness!r}): each segment's "
                "VJP recomputes its forward, which would draw other dropout masks than the forward did. Compile "
                f"the whole loop instead, torch.compile(torch.func.vmap(hg, in_dims, randomness={fn.randomness!r}), "
                "fullgraph=True), or run hf.vmap eagerly"
            )
        return replace(fn, fn=compile(fn.fn, segment, **options))
    if not isinstance(fn, HyperGradFunction):
        raise TypeError(
            "hf.compile takes hf.vmap(hg, in_dims) or a hypergradient function hg (from hf.unroll(loop, outer), "
            f"hf.truncate(K)(loop, outer), ...), got {type(fn).__name__}"
        )
    if not fn.segmented:
        raise TypeError(
            f"hf.compile(segment=k) does not support {fn.name}: it is not declared segmented (an algorithm that "
            "reaches the steps only through Bound.run, run_vjp, run_outer_vjp, run_jvp, outer_vjp, scan and piece "
            "declares make_transform(..., segmented=True)); compile it whole with "
            "torch.compile(torch.func.vmap(hg, in_dims))"
        )
    options.setdefault("dynamic", False)  # symbolic shapes made the generated kernels 30x slower here
    # built here, once: mode= with options=, an unknown backend or inductor setting fail now, not at the first call
    return replace(fn, executor=Compiled(Segments(segment, options, compiler(options))))
