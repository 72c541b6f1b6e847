"""hyperfunc/compile/__init__.py: hf.vmap equals torch.func.vmap, a vmap around it takes the general path,
and hf.compile refuses what it cannot serve with errors that name the fix."""

import pytest
import torch
import torch._dynamo.testing
from problems import anil, sinusoid_args, tree_close

import hyperfunc as hf
from hyperfunc.transforms.base import InitTerm, Outcome, make_transform

DT = torch.float64


T, K = 7, 3


IN_DIMS = (None, None, 0, 0)


def test_vmap_equals_torch_func_vmap():
    prob = anil(T)
    hg = hf.truncate(2)(prob.loop, prob.outer_loss)
    args = sinusoid_args(prob, 0)
    ref = torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
    for chunk in (None, 1):
        tree_close(hf.vmap(hg, in_dims=IN_DIMS, chunk_size=chunk)(*args).grads, ref.grads, rtol=0, atol=0)


def test_nested_vmap_takes_the_general_path():
    """Inside a second vmap (over two hyperparameter settings) the kernels' inputs are batched at two
    levels: the direct unwrap declines and autograd.Function's vmap rule runs them; same answer."""
    prob = anil(5)
    hg = hf.vmap(hf.unroll(prob.loop, prob.outer_loss), in_dims=IN_DIMS)
    fast = hf.compile(hg, segment=2, backend=torch._dynamo.testing.CompileCounter())
    h, params0, batches, val = sinusoid_args(prob, 0)
    both = torch.stack([h, h.apply(lambda x: 1.1 * x)])
    outer = (0, None, None, None)
    res = torch.func.vmap(fast, in_dims=outer)(both, params0, batches, val)
    ref = torch.func.vmap(hg, in_dims=outer)(both, params0, batches, val)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)


def test_undeclared_transform_is_refused():
    """A transform that does not declare segmented=True (its algorithm may differentiate the steps with
    torch.func itself, which the kernels have no derivative for) is refused, naming the whole-loop route."""
    prob = anil(T)

    def algorithm(bound):
        s, b = bound.run(bound.initial(), bound.buffers, bound.h, bound.prep.rebuild(bound.prep.d), 0, T)
        loss, _, direct = bound.outer_vjp(s, b)
        return Outcome(direct, loss, s, b, InitTerm.ABSENT)

    hg = make_transform(algorithm, "mine", prob.loop, prob.outer_loss)
    with pytest.raises(TypeError, match=r"does not support mine.*torch.compile\(torch.func.vmap"):
        hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K)


def test_bad_arguments():
    prob = anil(T)
    hg = hf.unroll(prob.loop, prob.outer_loss)
    with pytest.raises(ValueError, match="segment"):
        hf.compile(hg, segment=0)
    with pytest.raises(TypeError, match="hf.vmap"):
        hf.compile(torch.func.vmap(hg), segment=2)
    with pytest.raises(ValueError, match="chunk_size"):
        hf.vmap(hg, chunk_size=0)
    with pytest.raises(TypeError, match="'bakend'.*torch.compile's keyword arguments"):
        hf.compile(hg, segment=2, bakend="eager")
    with pytest.raises(ValueError, match="mode= or options="):
        hf.compile(hg, segment=2, mode="max-autotune", options={"cpp_wrapper": True})
