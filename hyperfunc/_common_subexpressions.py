"""Common-subexpression elimination on the traced graphs of :func:`hyperfunc.compile`'s kernels.

A k-step segment kernel evaluates the outer loss once per step, and every evaluation recomputes the
parts that depend on the hyperparameters alone (an ANIL body's features of the outer batch: two
100x100 matmuls per step on the benchmark problem). AOTAutograd deduplicates only the graphs it
partitions for training, and inductor does not merge matmuls, so a k-step kernel ran k copies.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ._torch import OpOverload, is_mutable_op


def pure_call(node: torch.fx.Node) -> bool:
    """A call whose result is a function of its arguments alone: an operator that mutates nothing and
    draws no random numbers, or an item of such a call's result."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, OpOverload) or _mutates(node):
        return False
    return torch.Tag.nondeterministic_seeded not in node.target.tags


def _mutates(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and is_mutable_op(node.target)


def _key(x: Any) -> Any:
    """A hashable stand-in for a node's arguments (nodes, numbers, dtypes and nested lists of them)."""
    if isinstance(x, (list, tuple)):
        return tuple(_key(a) for a in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _key(v)) for k, v in x.items()))
    hash(x)  # a TypeError for anything unhashable: that node is left alone
    return type(x), x


def merge_common_subexpressions(graph: torch.fx.Graph) -> None:
    r"""Merge, in place, every call of a pure operator whose operator and arguments equal an earlier
    call's: :math:`f(a) \ldots f(a) \to f(a)`, the first occurrence kept (graph order is topological,
    so a merged node's users already refer to the kept copies of its arguments). Random draws are never
    merged, and a graph with an in-place operator is left unchanged (two equal calls around a mutation
    of their input differ): trace it functionalized (``torch.func.functionalize``).

    Examples:
        >>> import torch
        >>> from torch.fx.experimental.proxy_tensor import make_fx
        >>> gm = make_fx(lambda x: torch.sin(x) + torch.sin(x))(torch.ones(2))
        >>> merge_common_subexpressions(gm.graph)
        >>> sum(node.target is torch.ops.aten.sin.default for node in gm.graph.nodes)
        1
    """
    if any(_mutates(node) for node in graph.nodes):
        return
    seen: dict = {}
    for node in list(graph.nodes):
        if not pure_call(node):
            continue
        try:
            key = (node.target, _key(node.args), _key(node.kwargs))
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node
