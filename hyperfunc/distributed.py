r"""Data parallelism over tasks with ``torch.distributed``: small pieces, no trainer class.

A hypergradient function is pure, so a meta-batch spreads over processes (ranks) like a data
batch: every rank runs the vmapped hypergradient on its own tasks, :func:`mean` averages the
results over all tasks of all ranks in one all-reduce, and every rank applies the same
meta-update to the same hyperparameters (:func:`broadcast` makes them identical at the start).
Any process group works: gloo on CPU, NCCL on GPU, launched by ``torchrun``. Without an
initialized process group every function acts on a world of one process, so the same script
runs unchanged with ``python``.

Example (one process; under ``torchrun --nproc_per_node N`` each rank gets its slice):
    >>> import torch, hyperfunc as hf
    >>> from hyperfunc import distributed
    >>> distributed.world()
    (0, 1)
    >>> distributed.shard(torch.arange(5))
    tensor([0, 1, 2, 3, 4])
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ._checks import check_int, check_seed
from ._torch import tree_flatten, tree_leaves, tree_map, tree_structure, tree_unflatten

__all__ = ["broadcast", "mean", "rank_seed", "shard", "shard_range", "world"]


def world(group: Optional[Any] = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``group`` (default: the default process group);
    ``(0, 1)`` when ``torch.distributed`` is not initialized.

    Examples:
        >>> from hyperfunc import distributed
        >>> distributed.world()
        (0, 1)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(n_tasks: int, group: Optional[Any] = None) -> range:
    r"""The indices of this rank's tasks in a meta-batch of ``n_tasks``: contiguous slices, the
    first ``n_tasks mod world_size`` ranks take one task more (rank :math:`r` of :math:`R` starts at
    :math:`r \lfloor n/R \rfloor + \min(r, n \bmod R)`). Every rank needs at least one task.

    Examples:
        >>> from hyperfunc import distributed
        >>> distributed.shard_range(3)
        range(0, 3)
    """
    n_tasks = check_int(n_tasks, "n_tasks", 1)
    rank, size = world(group)
    if n_tasks < size:
        raise ValueError(
            f"n_tasks ({n_tasks}) is smaller than the world size ({size}): every rank needs at least one task; "
            "use a larger meta-batch or fewer processes"
        )
    base, extra = divmod(n_tasks, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def shard(tree: Any, group: Optional[Any] = None) -> Any:
    """This rank's slice (:func:`shard_range`) along the leading (task) dimension of every tensor
    in ``tree`` (tensors, TensorDicts, tuples such as :class:`hyperfunc.tasks.Tasks`). Every rank
    draws the same full meta-batch (same generator seed) and keeps its own tasks, so N processes
    see exactly the tasks of one process.

    Examples:
        >>> import torch
        >>> from hyperfunc import distributed
        >>> distributed.shard((torch.zeros(4, 2), torch.arange(4)))[1]
        tensor([0, 1, 2, 3])
    """
    leaves = [x for x in tree_leaves(tree) if torch.is_tensor(x)]
    if not leaves:
        raise ValueError(f"shard(tree): tree holds no tensor ({type(tree).__name__}); pass the meta-batch to split")
    if any(x.ndim == 0 for x in leaves):
        raise ValueError("shard(tree): every tensor in tree needs a leading task dimension")
    sizes = {x.shape[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"shard(tree): the tensors of tree disagree on the number of tasks: {sorted(sizes)}")
    part = shard_range(sizes.pop(), group)
    return tree_map(lambda x: x[part.start : part.stop] if torch.is_tensor(x) else x, tree)


def rank_seed(seed: int, group: Optional[Any] = None) -> int:
    """A seed of its own for this rank, ``seed * world_size + rank``: distinct across ranks and
    across seeds for a fixed world size. Use it when each rank draws its own tasks
    (``torch.Generator().manual_seed(rank_seed(seed))``); the tasks then depend on the world
    size, unlike :func:`shard` of a common meta-batch.

    Examples:
        >>> from hyperfunc import distributed
        >>> distributed.rank_seed(7)
        7
    """
    seed = check_seed(seed, "seed")
    if torch.is_tensor(seed):
        raise TypeError("rank_seed(seed): seed must be a Python int")
    rank, size = world(group)
    value = seed * size + rank
    if value >= 2**63:
        raise ValueError(f"seed * world_size + rank = {value} does not fit in 63 bits; use a smaller seed")
    return value


def mean(result: Any, group: Optional[Any] = None) -> Any:
    r"""Average a vmapped :class:`~hyperfunc.HyperGrad` over all tasks of all ranks.

    .. math:: \bar g = \frac{\sum_r \sum_{i \in \text{rank } r} g_i}{\sum_r n_r}

    ``result`` is what ``torch.func.vmap(hg)`` returned on this rank's :math:`n_r` tasks (``grads``
    and ``loss`` with a leading task dimension). The local sums and the task count travel in one
    flattened all-reduce per dtype, so uneven shards are weighted correctly. Returns ``result``
    with ``grads`` and ``loss`` replaced by the means (the same on every rank); the per-task fields
    (``params``, ``buffers``, diagnostics) stay local.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> res = hf.HyperGrad(TensorDict({"a": torch.tensor([1.0, 3.0])}, [2]), torch.tensor([0.5, 1.5]), None)
        >>> avg = hf.distributed.mean(res)
        >>> avg.grads["a"], avg.loss
        (tensor(2.), tensor(1.))
    """
    if not hasattr(result, "_replace") or not hasattr(result, "grads") or not hasattr(result, "loss"):
        raise TypeError(f"mean(result): result must be a HyperGrad, got {type(result).__name__}")
    if not torch.is_tensor(result.loss) or result.loss.ndim != 1:
        raise ValueError(
            "mean(result): result.loss must have one entry per task; pass the output of "
            "torch.func.vmap(hg, ...) on this rank's tasks, not an already averaged HyperGrad"
        )
    if result.loss.shape[0] == 0:
        raise ValueError(
            "mean(result): result has no tasks; every rank needs at least one (a meta-batch of at least world_size "
            "tasks, split by hf.distributed.shard)"
        )
    leaves = tree_leaves((result.grads, result.loss))
    spec = tree_structure((result.grads[0], result.loss[0]))  # one task's structure (batch_size [])
    n = result.loss.shape[0]
    sums = [x.sum(0) for x in leaves]
    count = torch.tensor(float(n), dtype=result.loss.dtype, device=result.loss.device)
    totals = _all_reduce_sum([*sums, count], group)
    total_count = totals[-1]
    means = [s / total_count.to(s.dtype) for s in totals[:-1]]  # exact: the count is a small integer
    grads, loss = tree_unflatten(means, spec)
    return result._replace(grads=grads, loss=loss)


def broadcast(tree: Any, src: int = 0, group: Optional[Any] = None) -> Any:
    """A copy of ``tree`` whose tensors hold rank ``src``'s values on every rank (hyperparameters and
    the meta-optimizer state at the start, so every rank starts identical); one broadcast per dtype
    and device. The input is not modified; non-tensor leaves are returned as they are.

    Examples:
        >>> import torch
        >>> from hyperfunc import distributed
        >>> distributed.broadcast({"lr": torch.tensor(0.1)})
        {'lr': tensor(0.1000)}
    """
    src = check_int(src, "src", 0)
    leaves, spec = tree_flatten(tree)
    _, size = world(group)
    if src >= size:
        raise ValueError(f"src must be a rank in [0, {size}), got {src}")
    tensors = [i for i, x in enumerate(leaves) if torch.is_tensor(x)]
    out = list(leaves)
    if size == 1:
        for i in tensors:
            out[i] = leaves[i].detach().clone()
        return tree_unflatten(out, spec)
    for idx, flat in _flat_groups([leaves[i] for i in tensors]):
        dist.broadcast(flat, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
        for j, piece in zip(idx, _split(flat, [leaves[tensors[j]] for j in idx])):
            out[tensors[j]] = piece
    return tree_unflatten(out, spec)


def _all_reduce_sum(tensors: list[torch.Tensor], group: Optional[Any]) -> list[torch.Tensor]:
    """Sums over ranks of new tensors, one all-reduce per (dtype, device) of ``tensors``."""
    if world(group)[1] == 1:
        return tensors
    out = list(tensors)
    for idx, flat in _flat_groups(tensors):
        dist.all_reduce(flat, group=group)
        for j, piece in zip(idx, _split(flat, [tensors[j] for j in idx])):
            out[j] = piece
    return out


def _flat_groups(tensors: list[torch.Tensor]):
    """``(indices, one new flat buffer)`` per (dtype, device) of ``tensors``."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(tensors):
        groups.setdefault((x.dtype, x.device), []).append(i)
    for idx in groups.values():
        yield idx, torch.cat([tensors[i].detach().reshape(-1) for i in idx])


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors shaped like ``like`` with storage of their own (TorchOpt's foreach in-place updates
    refuse views of one shared buffer)."""
    pieces = torch.split(flat, [x.numel() for x in like])
    return [p.view(x.shape).clone() for p, x in zip(pieces, like)]
