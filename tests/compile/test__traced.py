"""hyperfunc/compile/_traced.py: a horizon within one segment is one kernel, a longer one a program; both
follow vmap's in_dims, and a call that cannot be traced still runs, right, on its kernels."""

import dataclasses

import pytest
import torch
import torch._dynamo.testing
from problems import TRANSFORMS, anil, sinusoid_args, tree_close
from tensordict import TensorDict

import hyperfunc as hf

DT = torch.float64


T, K = 7, 3


IN_DIMS = (None, None, 0, 0)


def _within_one_segment(name):
    """The registry's transform ``name`` on ANIL with T = 3, to compile with k = 4."""
    entry = TRANSFORMS[name]
    prob = anil(3, entry.momentum)
    return prob, entry.make(3)(prob.loop, prob.outer_loss)


@pytest.mark.filterwarnings("ignore:implicit. w_T is not a stationary point")
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_horizon_within_one_segment_is_one_kernel(name):
    """T <= k: the whole call is one kernel traced from the eager algorithm, which hf.vmap calls on the
    tasks' tensors without entering vmap. Equal to eager, returned as vmap returns it (the result's type,
    the TensorDicts' batch sizes), and new values compile nothing."""
    prob, hg = _within_one_segment(name)
    counter = torch._dynamo.testing.CompileCounter()
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=4, backend=counter)
    for seed in range(2):
        args = sinusoid_args(prob, seed)
        res, ref = fast(*args), torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
        assert type(res) is type(ref)
        for got, want in ((res.grads, ref.grads), (res.params, ref.params)):
            assert [x.shape for x in got.values(True)] == [x.shape for x in want.values(True)]  # nested: batch sizes
            assert got.batch_size == want.batch_size == (2,)
            tree_close(got, want, rtol=1e-10, atol=1e-12)
        for got, want in zip(res[1:], ref[1:]):
            if torch.is_tensor(want):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1


def test_a_new_params0_function_with_the_same_code_reuses_the_kernel():
    """MAML written as ``hg(h, lambda h: h["init"], ...)`` in a training loop passes a new function at every
    call: it keys by its code (its closures are guarded apart), so the one kernel is traced once (every call
    re-traced it before: 12 s per Conv-4 meta-iteration against 1.9 s eager). A closure that changes still
    compiles again."""
    prob, _ = _within_one_segment("unroll")
    hg = hf.unroll(prob.loop, prob.outer_loss)
    counter = torch._dynamo.testing.CompileCounter()
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=4, backend=counter)
    hparams, heads, inner, outer = sinusoid_args(prob, 0)
    hparams = TensorDict({"body": hparams["body"], "head": heads}, [])
    ref = torch.func.vmap(hg, in_dims=IN_DIMS)(hparams, lambda h: h["head"], inner, outer)
    for _ in range(3):
        tree_close(fast(hparams, lambda h: h["head"], inner, outer).grads, ref.grads, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1
    scale = 2.0
    with pytest.warns(RuntimeWarning, match="changed"):
        res = fast(hparams, lambda h: h["head"] * scale, inner, outer)
    tree_close(
        res.grads, torch.func.vmap(hg, in_dims=IN_DIMS)(hparams, lambda h: h["head"] * scale, inner, outer).grads
    )
    assert counter.frame_count == 2


def test_one_segment_follows_vmaps_in_dims():
    """The direct route reads in_dims as vmap does: an int for every argument, a batch dimension other than
    0, a mismatch of batch sizes (named by hf.vmap), and vmap around it (the kernel under two levels)."""
    prob, hg = _within_one_segment("unroll")
    h, w0, batches, val = sinusoid_args(prob, 0)
    ref = torch.func.vmap(hg, in_dims=IN_DIMS)(h, w0, batches, val)
    moved = tuple(x.movedim(0, 1) for x in batches)
    fast = hf.compile(hf.vmap(hg, in_dims=(None, None, 1, 0)), segment=4, backend="eager")
    tree_close(fast(h, w0, moved, val).grads, ref.grads, rtol=1e-10, atol=1e-12)
    per_task = (torch.stack([h, h]), torch.stack([w0, w0]), batches, val)
    fast = hf.compile(hf.vmap(hg, in_dims=0), segment=4, backend="eager")
    tree_close(fast(*per_task).grads, ref.grads, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"disagree on the number of tasks: .*outer_batch \[1\]"):
        fast(*per_task[:3], tuple(x[:1] for x in val))
    both = torch.stack([h, h.apply(lambda x: 1.1 * x)])
    outer = (0, None, None, None)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=4, backend="eager")
    got = torch.func.vmap(fast, in_dims=outer)(both, w0, batches, val)
    want = torch.func.vmap(hf.vmap(hg, in_dims=IN_DIMS), in_dims=outer)(both, w0, batches, val)
    tree_close(got.grads, want.grads, rtol=1e-10, atol=1e-12)


def test_forward_with_per_task_hyperparameters_within_one_segment():
    """forward pushes prepare forward with torch.func.jvp, which make_fx's fake tensors refuse under a
    vmap over per-task λ (torch 2.13): the call is not traced but run, as eager returns it (it raised)."""
    prob = anil(3)
    hg = hf.forward(prob.loop, prob.outer_loss)
    h, w0, batches, val = sinusoid_args(prob, 0)
    args = (torch.stack([h, h.apply(lambda x: 1.1 * x)]), torch.stack([w0, 0.5 * w0]), batches, val)
    fast = hf.compile(hf.vmap(hg, in_dims=0), segment=4, backend="eager")
    for _ in range(2):
        tree_close(fast(*args).grads, torch.func.vmap(hg, in_dims=0)(*args).grads, rtol=1e-10, atol=1e-12)


def test_one_segment_tells_a_none_from_a_tensor_in_the_same_place():
    """Two calls whose inputs differ only by which of two places holds the tensor and which None have the
    same tree structure and shapes; the kernel key keeps them apart (each place's kind is in it)."""
    loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum(),
                        hf.optim.sgd(lr=0.1), steps=2, full_batch=True)  # fmt: skip

    def outer(p, h, batch):
        a, b = batch
        return ((p["w"] - (a if a is not None else 2 * b)) ** 2).sum()

    hg = hf.unroll(loop, outer)
    fast = hf.compile(hg, segment=4, backend="eager")
    h, w0 = TensorDict({"l2": torch.tensor(0.5, dtype=DT)}, []), TensorDict({"w": torch.zeros(3, dtype=DT)}, [])
    x, y = torch.ones(3, dtype=DT), torch.full((3,), 3.0, dtype=DT)
    for val in ((y, None), (None, y), (y, None)):
        tree_close(fast(h, w0, x, val).grads, hg(h, w0, x, val).grads, rtol=1e-12, atol=1e-14)


def test_a_call_that_cannot_be_traced_runs_its_algorithm_on_the_kernels():
    """An algorithm whose Python reads a tensor's value cannot be traced as a program: each call runs it,
    on the compiled kernels, and the result is still eager's."""
    prob = anil(T)
    hg = hf.unroll(prob.loop, prob.outer_loss)
    reads = []

    def algorithm(bound):
        reads.append(float(bound.h[0].sum()))  # a value, read in Python: fails on the trace's fake tensors
        return hg.algorithm(bound)

    reading = dataclasses.replace(hg, algorithm=algorithm)
    fast = hf.compile(hf.vmap(reading, in_dims=IN_DIMS), segment=K, backend="eager")
    for seed in (0, 1):
        args = sinusoid_args(prob, seed)
        tree_close(fast(*args).grads, torch.func.vmap(hg, in_dims=IN_DIMS)(*args).grads, rtol=1e-10, atol=1e-12)
    assert len(reads) == 3  # the first call: the real run, then the untraced call; the second call: once
