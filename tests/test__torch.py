"""hyperfunc/_torch.py: every private torch symbol resolves on this torch, and a missing one says which."""

import pytest
import torch

from hyperfunc import _torch


def test_every_private_symbol_resolves():
    assert not _torch.missing, "\n".join(m.message() for m in _torch.missing.values())


def test_a_missing_symbol_names_itself_and_its_use():
    gone = _torch._symbol("torch._C._functorch:no_such_symbol", "an example use")
    with pytest.raises(ImportError, match=r"torch\._C\._functorch:no_such_symbol \(an example use\)"):
        gone(torch.ones(1))
    with pytest.raises(ImportError, match="no_such_symbol"):
        getattr(gone, "Vmap")  # noqa: B009 (an attribute read raises too)


def test_tree_children_of_a_nested_spec():
    _, spec = _torch.tree_flatten(((torch.ones(1), 2), [3, 4, 5]))
    assert [child.num_leaves for child in _torch.tree_children(spec)] == [2, 3]


def test_is_mutable_op():
    assert _torch.is_mutable_op(torch.ops.aten.add_.Tensor)
    assert not _torch.is_mutable_op(torch.ops.aten.add.Tensor)
    assert not _torch.is_mutable_op(print)


def test_vmap_levels_at_any_depth():
    """under_vmap sees a vmap at any depth; vmap_sizes lists every vmap level's batch size, outermost first,
    and counts no grad level."""
    seen = []

    def probe(x):
        seen.append((_torch.under_vmap(), _torch.vmap_sizes()))
        return x.sum()

    probe(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.func.vmap(torch.func.vmap(probe))(torch.ones(3, 4, 2))
    torch.func.vmap(torch.func.grad(probe))(torch.ones(3, 2))  # vmap below a grad level
    torch.func.grad(probe)(torch.ones(2))
    assert seen == [(False, ()), (True, (3,)), (True, (3, 4)), (True, (3,)), (False, ())]
