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
from ._tree import Keys, Leaves, build, key_name, keys_of, leaves_of, tensor_leaves


def _nested(named: Any) -> TensorDict:
    return build(tuple(tuple(name.split(".")) for name, _ in named), [x.detach().clone() for _, x in named])


def module_state(module: nn.Module) -> tuple[TensorDict, TensorDict]:
    """Split a module into ``(params, buffers)``: copies of its trainable parameters (those with
    ``requires_grad=True``) and of everything else its forward reads: its buffers (running
    statistics, ``num_batches_tracked``: any dtype) and its frozen parameters (``requires_grad=False``),
    which the inner loop must neither train nor count in a penalty over ``params``.

    Keys are nested by submodule as in ``TensorDict.from_module``, so the flattened keys of ``params``
    and ``buffers`` together are the names of ``module.named_parameters()`` and ``named_buffers()``.
    The copies are detached: training them never touches the module.

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
    named = list(module.named_parameters())
    trained = [(name, p) for name, p in named if p.requires_grad]
    frozen = [(name, p) for name, p in named if not p.requires_grad]
    return _nested(trained), _nested(frozen + list(module.named_buffers()))


def functional_call(
    module: nn.Module, params: TensorDictBase, buffers: Optional[TensorDictBase], *args: Any, **kwargs: Any
) -> tuple[Any, Optional[TensorDictBase]]:
    r"""Run ``module`` with ``params`` and ``buffers`` in place of its own: ``(output, new_buffers)``.

    Pure: the module, ``params`` and ``buffers`` are never mutated; what the forward pass writes
    into its buffers, in place (BatchNorm in train mode updates the running statistics and
    ``num_batches_tracked``) or by reassignment (``self.seen = self.seen + 1``), comes back as
    ``new_buffers``, a new TensorDict with the keys of ``buffers`` (a reassigned buffer must keep its
    shape and dtype). A forward that sets a plain attribute (``self.last = x``) is refused with a
    ``ValueError`` naming it, after the module's attributes are restored: state that must survive a
    call belongs in a buffer. What cannot be seen: in-place changes inside a plain attribute's value
    (appending to a list). It works inside ``torch.func.grad``/``vjp``/``jvp`` and under ``vmap``, where each
    task keeps its own statistics (the returned buffers are batched like the inputs). The usual
    BatchNorm modes work: batch statistics in train mode, running statistics in eval mode
    (``module.eval()``), and ``track_running_stats=False`` (no buffers). ``buffers=None`` is for a
    module without buffers and returns ``None``. Under ``vmap`` batch normalization runs as elementary
    operations (``torch.nn.functional.batch_norm`` sent to ``hyperfunc._batch_norm`` by a
    ``TorchFunctionMode``): torch 2.14-2.15's native kernel fails in the double backward under ``vmap``
    that a hypergradient through BatchNorm needs. Outside ``vmap`` (one task, or
    ``hf.vmap(..., chunk_size=1)``) it runs torch's kernel.

    Cost: the module's forward, every torch function call passing the mode's Python hook, under ``vmap``
    with batch normalization as elementary operations (a small Conv-BN forward: 557 µs against 413 µs
    with torch's kernel, docs/modules.md), plus one copy of each buffer, plus the checks against the module
    (names, shapes, device) and the snapshot of its attributes: about 60 µs on a 9-module Conv-BN net
    (a forward of 1.1 ms on 1 thread, +9%).

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
        if any(True for _ in module.buffers()) or any(not p.requires_grad for p in module.parameters()):
            raise ValueError(
                "this module has buffers (e.g. BatchNorm running statistics) or frozen parameters: pass them, "
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
    state = {key_name(k): v for k, v in zip(pkeys, leaves_of(params, pkeys))}
    state.update({key_name(k): v for k, v in zip(bkeys, copies)})
    _check_against(module, state, {key_name(k) for k in bkeys})
    attributes = _attributes(module)
    try:
        with DecomposedBatchNorm():  # BatchNorm's double backward under vmap, on every torch (see _batch_norm)
            # torch writes what the forward reassigned (self.seen = self.seen + 1) back into ``state``
            out = torch.func.functional_call(module, state, args, kwargs, strict=True)
    except RuntimeError as err:
        cumulative = [name for name, m in module.named_modules() if _cumulative_batch_norm(m)]
        if cumulative and "vmap" in str(err):
            raise ValueError(
                f"BatchNorm with momentum=None (a cumulative average) in {cumulative} reads num_batches_tracked as a "
                "Python number, which per-task buffers under vmap cannot give: set momentum to a number (e.g. 0.1)"
            ) from err
        raise
    finally:
        changed = _restore(module, attributes)
    if changed:
        raise ValueError(
            f"functional_call is pure, but the module's forward set the attribute(s) {changed} (restored now): "
            "keep state that must survive a call in a buffer (self.register_buffer), which comes back in the "
            "new buffers, or compute it without storing it on the module"
        )
    if buffers is None:
        return out, None
    return out, build(bkeys, tuple(_written(k, old, state[key_name(k)]) for k, old in zip(bkeys, copies)))


def _check_against(module: nn.Module, state: dict, buffer_names: set) -> None:
    """Every parameter and buffer of ``module`` given once, with its shape (per task under ``vmap``), and the
    buffers on the params' device: a mismatch is named here, not in torch's ``functional_call``."""
    expected = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"params and buffers do not match the module: missing {missing[:5]}, unexpected {extra[:5]}; take both "
            "from hf.module_state(module) of this module (frozen parameters are in the buffers)"
        )
    for name, value in state.items():
        if value.shape != expected[name].shape:
            where = "buffers" if name in buffer_names else "params"
            raise ValueError(
                f"{where}[{name!r}] has shape {tuple(value.shape)} but the module's has {tuple(expected[name].shape)}"
                "; a leading task dimension is vmapped, not passed: stack one per task and give it in_dims=0, "
                "positionally (hg(hparams, params0, inner_batches, outer_batch, buffers))"
            )
    devices = {v.device for v in state.values()}
    if len(devices) > 1:
        raise ValueError(
            f"params and buffers are on several devices, {sorted(map(str, devices))}: move them to one "
            "(e.g. buffers.to(device))"
        )


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _cumulative_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, _BATCH_NORMS) and m.momentum is None and m.training and m.track_running_stats


def _written(key: Any, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A buffer after the forward: ``old`` updated in place, or the value the forward reassigned."""
    if new.shape != old.shape or new.dtype != old.dtype:
        raise ValueError(
            f"the module's forward reassigned buffer {key_name(key)!r} from {old.dtype} of shape {tuple(old.shape)} "
            f"to {new.dtype} of shape {tuple(new.shape)}: a carried buffer keeps its shape and dtype (use copy_ or "
            "cast the new value)"
        )
    return new


_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")
_MISSING = object()


def _attributes(module: nn.Module) -> list:
    """Each submodule with a shallow copy of its attributes (``vars``: one C-level dict copy per module)."""
    return [(m, dict(vars(m))) for m in module.modules()]


def _restore(module: nn.Module, attributes: list) -> list[str]:
    """Put back every plain attribute the forward set, added or deleted; returns their names (parameters,
    buffers and children are ``functional_call``'s to restore)."""
    changed = []
    for m, before in attributes:
        now = vars(m)
        if len(now) == len(before) and all(now.get(k, _MISSING) is v for k, v in before.items()):
            continue  # the common case: nothing set
        for key in (set(before) | set(now)) - set(_MODULE_SLOTS):
            if now.get(key, _MISSING) is not before.get(key, _MISSING):
                changed.append((m, key))
                if key in before:
                    now[key] = before[key]
                else:
                    del now[key]
    if not changed:
        return []
    names = {id(m): name for name, m in module.named_modules()}
    return sorted(f"{names.get(id(m)) or 'module'}.{key}" for m, key in changed)


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
