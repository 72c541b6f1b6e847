r"""Meta-training state as flat dicts of tensors, for ``torch.save``/``torch.load(weights_only=True)``.

Hyperparameters (TensorDicts), TorchOpt states (named tuples), online states, RNG states: any
pytree of tensors becomes ``{key path: tensor}``, which ``torch.load(..., weights_only=True)``
reads back without trusting pickled classes. Loading fills the same structure built afresh (as
``nn.Module.load_state_dict`` does), checking every key, shape and dtype.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase

from ._torch import keystr, tree_flatten_with_path, tree_unflatten

__all__ = ["from_state_dict", "to_state_dict"]


def to_state_dict(tree: Any) -> dict[str, torch.Tensor]:
    """``{key path: tensor}`` for every leaf of ``tree`` (detached copies; Python numbers become
    0-d tensors).

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> state = {"hparams": TensorDict({"w": torch.ones(2)}, []), "step": 3}
        >>> hf.to_state_dict(state)
        {"['hparams']['w']": tensor([1., 1.]), "['step']": tensor(3)}
    """
    _refuse_non_tensor_entries(tree)
    out = {}
    for path, leaf in tree_flatten_with_path(tree)[0]:
        key = keystr(path)
        if torch.is_tensor(leaf):
            out[key] = leaf.detach().clone()
        elif isinstance(leaf, (bool, numbers.Integral, numbers.Real)):
            out[key] = _number_tensor(leaf)
        elif leaf is not None:
            raise TypeError(f"to_state_dict: the leaf at {key} is a {type(leaf).__name__}; only tensors and numbers")
    return out


def from_state_dict(state: dict[str, torch.Tensor], like: Any) -> Any:
    """``like`` with every leaf replaced by the saved one (same key paths, shapes and dtypes;
    Python numbers come back as the type of ``like``'s leaf). ``like`` is the structure built
    afresh, e.g. the hyperparameters and ``meta_opt.init(hparams)`` of a new run; it is not
    modified. Tensors land on ``like``'s devices.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> saved = hf.to_state_dict({"w": torch.ones(2), "step": 3})
        >>> hf.from_state_dict(saved, like={"w": torch.zeros(2), "step": 0})
        {'w': tensor([1., 1.]), 'step': 3}
    """
    if not isinstance(state, dict):
        raise TypeError(f"from_state_dict(state, like): state must be a dict, got {type(state).__name__}")
    _refuse_non_tensor_entries(like)
    flat, spec = tree_flatten_with_path(like)
    keys = [keystr(path) for path, _ in flat]
    missing = [k for k, (_, leaf) in zip(keys, flat) if leaf is not None and k not in state]
    extra = sorted(set(state) - set(keys))
    if missing or extra:
        raise ValueError(
            f"from_state_dict: the saved state does not match like: missing {missing[:5]}, unexpected {extra[:5]}; "
            "build like exactly as the saved run did (same hyperparameters, optimizer and options; an online "
            "state after as many steps: online distill holds its distilled batch from the first step on)"
        )
    leaves: list[Any] = []
    for key, (_, leaf) in zip(keys, flat):
        if leaf is None:
            leaves.append(None)
            continue
        saved = state[key]
        if torch.is_tensor(leaf):
            if not torch.is_tensor(saved):
                raise ValueError(
                    f"from_state_dict: {key} holds a {type(saved).__name__}, not a tensor: the state was not made by "
                    "to_state_dict, or was edited"
                )
            if saved.shape != leaf.shape or saved.dtype != leaf.dtype:
                raise ValueError(
                    f"from_state_dict: {key} was saved as {saved.dtype} {tuple(saved.shape)} but like has "
                    f"{leaf.dtype} {tuple(leaf.shape)}"
                )
            leaves.append(saved.to(leaf.device, copy=True))
        else:
            expected = _number_tensor(leaf)
            if not torch.is_tensor(saved) or saved.shape != () or saved.dtype != expected.dtype:
                got = f"{saved.dtype} {tuple(saved.shape)}" if torch.is_tensor(saved) else type(saved).__name__
                raise ValueError(
                    f"from_state_dict: {key} is a Python {type(leaf).__name__} in like, saved as {got}; expected a "
                    f"{expected.dtype} scalar (to_state_dict saves bools, ints and floats exactly, as bool, int64 "
                    "and float64)"
                )
            leaves.append(type(leaf)(saved.item()))
    return tree_unflatten(leaves, spec)


def _number_tensor(x: Any) -> torch.Tensor:
    """A Python or numpy number as the 0-d tensor that holds it exactly: bool, int64 or float64 (a float
    saved as float32 would come back rounded, 0.1 as 0.10000000149011612)."""
    if isinstance(x, (bool, np.bool_)):
        return torch.tensor(bool(x))
    if isinstance(x, numbers.Integral):
        return torch.tensor(int(x), dtype=torch.int64)
    return torch.tensor(float(x), dtype=torch.float64)


def _refuse_non_tensor_entries(tree: Any) -> None:
    """A TensorDict's non-tensor entries (strings, objects: ``NonTensorData``) are no pytree leaves, so they
    would be neither saved nor loaded: the loaded state would silently keep ``like``'s."""
    nodes = tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, TensorDictBase))[0]
    for path, node in nodes:
        if not isinstance(node, TensorDictBase):
            continue
        for key in node.keys(include_nested=True):
            value = node.get(key)
            if not (torch.is_tensor(value) or isinstance(value, TensorDictBase)):
                raise TypeError(
                    f"the TensorDict at {keystr(path) or 'the root'} holds a non-tensor entry {key!r} "
                    f"({type(value).__name__}), which a state dict of tensors cannot hold: keep it outside the saved "
                    "tree (or store it as a tensor)"
                )
