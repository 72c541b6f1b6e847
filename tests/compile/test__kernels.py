"""hyperfunc/compile/_kernels.py: kernels skip dynamo under hf.vmap, refuse random draws, follow the
tensors a loss closes over, and equal eager through inductor in float32."""

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from problems import anil, sinusoid_args, tree_close
from tensordict import TensorDict

import hyperfunc as hf

DT = torch.float64


T, K = 7, 3


IN_DIMS = (None, None, 0, 0)


def test_losses_closing_over_tensors_compile_and_follow_their_updates():
    """A tensor a loss closes over (a fixed target, a mask) becomes a constant of the traced kernel
    graph, held by reference, so an in-place update of it reaches the next call."""
    prob = anil(T)
    weight = torch.tensor(2.0, dtype=DT)

    def outer(p, h, batch):
        return weight * prob.outer_loss(p, h, batch)

    hg = hf.greedy_accumulate(0.9)(prob.loop, outer)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K, backend="aot_eager")
    args = sinusoid_args(prob, 0)
    for value in (2.0, 3.0):
        weight.fill_(value)
        tree_close(fast(*args).grads, torch.func.vmap(hg, in_dims=IN_DIMS)(*args).grads, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("segment", [2, 5])  # inductor: 2 + 2 + 1, and the whole call as one kernel
def test_inductor_segments_equal_eager_float32(segment):
    prob = anil(5, dtype=torch.float32)
    hg = hf.unroll(prob.loop, prob.outer_loss)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=segment)
    args = sinusoid_args(prob, 0, torch.float32)
    res, ref = fast(*args), torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
    tree_close(res.grads, ref.grads, rtol=1e-5, atol=1e-6)


def test_kernels_skip_dynamo_under_hf_vmap():
    """Under hf.vmap a kernel's traced graph goes straight to the backend: no frame for dynamo to trace
    (and no guards to check at every call); the backend gets each kernel's graph once."""
    prob = anil(T)
    hg = hf.vmap(hf.unroll(prob.loop, prob.outer_loss), in_dims=IN_DIMS)
    counter = torch._dynamo.testing.CompileCounter()
    fast = hf.compile(hg, segment=K, backend=counter)
    frames = torch._dynamo.utils.counters["frames"]["total"]
    for seed in (0, 1):
        tree_close(fast(*sinusoid_args(prob, seed)).grads, hg(*sinusoid_args(prob, seed)).grads, rtol=1e-10, atol=1e-12)
    assert torch._dynamo.utils.counters["frames"]["total"] == frames
    # map and VJP for k = 3, the fused last segment (1 step) with the outer gradient, prepare and its VJP
    assert counter.frame_count == 5


def test_random_draws_in_the_step_are_refused():
    """Dropout in the inner loss: the recomputed segment would draw other masks, so the call raises."""

    def inner(p, h, batch):
        x, y = batch
        return ((F.dropout(x, 0.5) @ p["w"] - y) ** 2).mean() + h["l2"] * (p["w"] ** 2).sum()

    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1), steps=4, full_batch=True)
    hg = hf.unroll(loop, lambda p, h, batch: ((batch[0] @ p["w"] - batch[1]) ** 2).mean())
    fast = hf.compile(hg, segment=2, backend="eager")
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, dtype=DT)
    h, w0 = TensorDict({"l2": torch.tensor(0.1, dtype=DT)}, []), TensorDict({"w": torch.zeros(3, dtype=DT)}, [])
    with pytest.raises(ValueError, match="random draws"):
        fast(h, w0, (x, y), (x, y))
    with pytest.raises(ValueError, match="random draws"):  # T <= k: one kernel, refused alike
        hf.compile(hg, segment=4, backend="eager")(h, w0, (x, y), (x, y))
    # over tasks the kernels' vmap lets the draw through to the same error (not vmap's randomness error)
    fast = hf.compile(hf.vmap(hg, in_dims=(None, None, 0, 0)), segment=2, backend="eager")
    xs, ys = torch.stack([x, x + 1]), torch.stack([y, y])
    with pytest.raises(ValueError, match="random draws.*randomness='different'"):
        fast(h, w0, (xs, ys), (xs, ys))
