r"""``nn.Module`` parameters and buffers as TensorDicts, and a pure functional call.

Real models carry state that their forward pass updates: BatchNorm's running statistics and
``num_batches_tracked``. hyperfunc keeps that state as a third TensorDict, ``buffers``, carried
through the inner loop beside the optimizer state and never differentiated (DESIGN.md, section 2).
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Optional

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from ._batch_norm import DecomposedBatchNorm
from ._tree import Keys, Leaves, build, keys_of, leaves_of, tensor_leaves


def _nested(named: Any) -> TensorDict:
    return build(tuple(tuple(name.split(".")) for name, _ in named), [x.detach().clone() for _, x in named])


def module_state(module: nn.Module) -> tuple[TensorDict, TensorDict]:
    """Split a module into ``(params, buffers)``: copies of its trainable parameters (floating) and of
    everything else it registers (running statistics, ``num_batches_tracked``: any dtype).

    Keys are nested by submodule as in ``TensorDict.from_module``, so ``params.flatten_keys(".")``
    has the names of ``module.named_parameters()``. The copies are detached: training them never
    touches the module.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> params, buffers = hf.module_state(net)
        >>> sorted(params.flatten_keys(".").keys())
        ['0.bias', '0.weight', '1.bias', '1.weight']
        >>> sorted(buffers.flatten_keys(".").keys())
        ['1.num_batches_tracked', '1.running_mean', '1.running_var']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module_state takes an nn.Module, got {type(module).__name__}")
    return _nested(list(module.named_parameters())), _nested(list(module.named_buffers()))


def functional_call(
    module: nn.Module, params: TensorDictBase, buffers: Optional[TensorDictBase], *args: Any, **kwargs: Any
) -> tuple[Any, Optional[TensorDictBase]]:
    r"""Run ``module`` with ``params`` and ``buffers`` in place of its own: ``(output, new_buffers)``.

    Pure: the module, ``params`` and ``buffers`` are never mutated; what the forward pass writes
    into its buffers (BatchNorm in train mode updates the running statistics and
    ``num_batches_tracked``) comes back as ``new_buffers``, a new TensorDict with the keys of
    ``buffers``. It works inside ``torch.func.grad``/``vjp``/``jvp`` and under ``vmap``, where each
    task keeps its own statistics (the returned buffers are batched like the inputs). The usual
    BatchNorm modes work: batch statistics in train mode, running statistics in eval mode
    (``module.eval()``), and ``track_running_stats=False`` (no buffers). ``buffers=None`` is for a
    module without buffers and returns ``None``. Batch normalization runs as elementary operations
    (``torch.nn.functional.batch_norm`` sent to ``hyperfunc._batch_norm`` by a ``TorchFunctionMode``):
    torch 2.14-2.15's native kernel fails in the double backward under ``vmap`` that a
    hypergradient through BatchNorm needs.

    Cost: the module's forward, with batch normalization as elementary operations and every torch
    function call passing the mode's Python hook (a small Conv-BN forward: 557 µs against 413 µs with
    torch's kernel, docs/modules.md), plus one copy of each buffer.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3)).double()
        >>> params, buffers = hf.module_state(net)
        >>> out, new = hf.functional_call(net, params, buffers, torch.ones(4, 2, dtype=torch.float64))
        >>> new["1", "num_batches_tracked"], buffers["1", "num_batches_tracked"]
        (tensor(1), tensor(0))
        >>> net[1].num_batches_tracked  # the module is untouched
        tensor(0)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"functional_call takes an nn.Module first, got {type(module).__name__}")
    if not isinstance(params, TensorDictBase):
        raise TypeError(
            f"params must be a TensorDict (the first output of hf.module_state), got {type(params).__name__}"
        )
    if buffers is None:
        if any(True for _ in module.buffers()):
            raise ValueError(
                "this module has buffers (e.g. BatchNorm running statistics): pass them, "
                "params, buffers = hf.module_state(module), and carry the new buffers it returns"
            )
        bkeys: Keys = ()
        copies: Leaves = ()
    elif isinstance(buffers, TensorDictBase):
        bkeys = keys_of(buffers)
        copies = _writable_copies(leaves_of(buffers, bkeys), params, args, kwargs)
    else:
        raise TypeError(f"buffers must be None or a TensorDict from hf.module_state, got {type(buffers).__name__}")
    pkeys = keys_of(params)
    state = {_name(k): v for k, v in zip(pkeys, leaves_of(params, pkeys))}
    state.update({_name(k): v for k, v in zip(bkeys, copies)})
    with DecomposedBatchNorm():  # BatchNorm's double backward under vmap, on every torch (see _batch_norm)
        out = torch.func.functional_call(module, state, args, kwargs, strict=True)
    return out, (None if buffers is None else build(bkeys, copies))


def _name(key: Any) -> str:
    return ".".join(key) if isinstance(key, tuple) else key


def _writable_copies(buffers: tuple, params: TensorDictBase, args: Any, kwargs: Any) -> tuple:
    """Copies of the buffers that the forward pass may update in place.

    A copy must live at the same ``torch.func`` levels as the values written into it (the batch
    statistics, which depend on the params and the inputs): under ``grad`` an in-place write
    into a tensor from outside the transform is refused, and under ``vmap`` one into an unbatched
    tensor. Adding a zero built from every param and input puts the copy at all their levels;
    the zero carries no gradient.
    """
    sources = [x for x in tensor_leaves((params, args, kwargs)) if x.is_floating_point()]
    if not sources:
        return tuple(b.clone() for b in buffers)
    zero = functools.reduce(operator.add, (torch.zeros_like(x).sum() for x in sources))
    return tuple(b + zero.to(b.dtype) if b.is_floating_point() else b.clone() for b in buffers)
