"""The common-subexpression pass of hf.compile's kernels: merges pure repeats, never draws or mutations."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from hyperfunc._common_subexpressions import merge_common_subexpressions


def _count(gm, op):
    return sum(node.target is op for node in gm.graph.nodes)


def _merged(fn, *args):
    gm = make_fx(torch.func.functionalize(fn, remove="mutations_and_views"))(*args)
    ref = gm(*args)
    merge_common_subexpressions(gm.graph)
    gm.recompile()
    return gm, ref


def test_repeated_features_are_computed_once_and_the_result_is_unchanged():
    # a k-step kernel evaluates the outer loss k times: the features of the outer batch repeat verbatim
    def steps(W, x, w):
        for _ in range(3):
            w = w - 0.1 * (torch.relu(x @ W) @ w).sum() * w
        return w

    args = tuple(torch.randn(*shape, dtype=torch.float64) for shape in ((4, 4), (5, 4), (4, 1)))
    gm, ref = _merged(steps, *args)
    assert _count(gm, torch.ops.aten.relu.default) == 1
    assert _count(gm, torch.ops.aten.mm.default) == 1 + 3  # x @ W once, then one product with w per step
    torch.testing.assert_close(gm(*args), ref, rtol=0, atol=0)


def test_random_draws_are_not_merged():
    gm, _ = _merged(lambda x: torch.rand_like(x) + torch.rand_like(x), torch.ones(3))
    draws = [node for node in gm.graph.nodes if node.op == "call_function" and "rand" in str(node.target)]
    assert len(draws) == 2


def test_a_graph_with_a_mutation_is_left_unchanged():
    # x * 2 before and after x.add_(1) differ: merging them would be wrong, so nothing is merged
    def fn(x):
        a = x * 2
        x.add_(1)
        return a, x * 2

    gm = make_fx(fn)(torch.ones(2))
    before = len(gm.graph.nodes)
    merge_common_subexpressions(gm.graph)
    assert len(gm.graph.nodes) == before
    gm.recompile()
    a, b = gm(torch.ones(2))
    assert torch.equal(a, torch.full((2,), 2.0)) and torch.equal(b, torch.full((2,), 4.0))
