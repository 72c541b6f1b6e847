"""Randomness: recomputation replays it, seeds use all their bits, langevin honours the loop's sampler."""

import pytest
import torch
import torch.nn.functional as F
from problems import DT, Quadratic, td, tree_close
from tensordict import TensorDict

import hyperfunc as hf


def _dropout_problem():
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(8, 16, 5, generator=g, dtype=DT), torch.randn(20, 5, generator=g, dtype=DT)
    y, yv = x.sum(-1, keepdim=True), xv.sum(-1, keepdim=True)

    def inner(p, h, b):
        hidden = F.dropout(torch.tanh(b[0] @ p["w1"]), p=0.3, training=True)  # global RNG, as nn.Dropout
        return ((hidden @ p["w2"] - b[1]) ** 2).mean() + h["l2"] * (p["w1"] ** 2).sum()

    outer = lambda p, h, b: ((torch.tanh(b[0] @ p["w1"]) @ p["w2"] - b[1]) ** 2).mean()
    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1, momentum=0.5), steps=8)
    p0 = td(w1=0.3 * torch.randn(5, 6, generator=g, dtype=DT), w2=0.3 * torch.randn(6, 1, generator=g, dtype=DT))
    return loop, outer, (TensorDict({"l2": torch.tensor(0.01, dtype=DT)}, []), p0, (x, y), (xv, yv))


@pytest.mark.parametrize("every", [1, 3, 5])
def test_checkpoint_recomputation_replays_dropout(every):
    loop, outer, args = _dropout_problem()
    torch.manual_seed(7)
    full = hf.unroll(loop, outer)(*args)
    after_full = torch.rand(3)
    torch.manual_seed(7)
    ckpt = hf.unroll(loop, outer, checkpoint_every=every)(*args)
    tree_close(ckpt.params, full.params, rtol=1e-12, atol=1e-14)
    tree_close(ckpt.grads, full.grads, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.rand(3), after_full)  # the global stream continues as without checkpoints


def _sgld_chain(seed):
    loop = hf.InnerLoop(
        lambda p, h, x: ((p["w"] - x) ** 2).sum(),
        hf.optim.sgld(lr=0.1, temperature=1.0, seed=seed),
        steps=3,
        full_batch=True,
    )
    return loop.run(TensorDict({}, []), td(w=torch.zeros(4, dtype=DT)), torch.ones(4, dtype=DT))["w"]


def test_seeds_use_all_their_bits():
    assert not torch.equal(_sgld_chain(1), _sgld_chain(1 + 2**32))
    assert not torch.equal(_sgld_chain(2**62), _sgld_chain(0))
    torch.testing.assert_close(_sgld_chain(5), _sgld_chain(5))  # a seed is a seed: reproducible


def _langevin_loop(opt):
    q = Quadratic(momentum=0.0, wd=0.0)
    return hf.InnerLoop(q.inner, opt, steps=1), q


def test_langevin_outer_loss_with_dropout():
    """langevin vmaps the outer loss over blocks of samples for their direct terms: an outer loss that draws
    (dropout) gets a mask per sample, as one call per sample did, instead of vmap's randomness error."""
    inner = lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum()
    outer = lambda p, h, y: ((F.dropout(p["w"] * h["c"], 0.5) - y) ** 2).sum()
    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1), steps=1, full_batch=True)
    hg = hf.langevin(2, 12, 1e-3, seed=0)(loop, outer)
    args = (
        td(c=torch.tensor(1.0, dtype=DT)),
        td(w=torch.zeros(4, dtype=DT)),
        torch.ones(4, dtype=DT),
        torch.zeros(4, dtype=DT),
    )
    torch.manual_seed(0)
    first = hg(*args).grads["c"]
    torch.manual_seed(0)
    assert torch.isfinite(first) and torch.equal(hg(*args).grads["c"], first)  # the global RNG, as nn.Dropout


def test_langevin_uses_the_loops_sgld_seed():
    loop, q = _langevin_loop(hf.optim.sgld(lr=0.1, temperature=0.01, seed=11))
    args = (q.hparams(), td(w=q.w0), q.b[0], q.y)
    plain, _ = _langevin_loop(hf.optim.sgd(lr=0.1))
    from_loop = hf.langevin(2, 3, tau=0.01)(hf.InnerLoop(q.inner, loop.optimizer, steps=1, full_batch=True), q.outer)
    explicit = hf.langevin(2, 3, tau=0.01, seed=11)(
        hf.InnerLoop(q.inner, plain.optimizer, steps=1, full_batch=True), q.outer
    )
    tree_close(from_loop(*args).grads, explicit(*args).grads, rtol=0, atol=0)


def test_langevin_refuses_a_different_loop_temperature():
    loop, q = _langevin_loop(hf.optim.sgld(lr=0.1, temperature=1.0, seed=11))
    with pytest.raises(ValueError, match="the loop's sgld temperature .* differs from langevin's tau"):
        hf.langevin(2, 3, tau=0.01)(loop, q.outer)


@pytest.mark.parametrize(
    "make",
    [lambda seed: hf.langevin(3, 3, tau=0.1, seed=seed), lambda seed: hf.distill(0.5, theta=1.0, seed=seed)],
    ids=["langevin", "distill"],
)
def test_per_task_seeds_under_vmap(make):
    """An int64 seed tensor built into the transform inside the vmapped function gives every task its own
    draws, each equal to the call with that task's int seed."""
    q = Quadratic(momentum=0.0, steps=6)

    def inner(p, h, b):  # ∂Φ/∂λ depends on the batch, so distill's subsample matters
        return q.inner(p, h, b) - (p["w"] * b).sum() * h["lam"].sum()

    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1), steps=6)

    def per_task(seed, b, y):
        return make(seed)(loop, q.outer)(q.hparams(), td(w=q.w0), b, y).grads

    seeds = torch.tensor([3, 2**40 + 3])
    same_data = torch.stack([q.b, q.b]), torch.stack([q.y, q.y])
    batched = torch.func.vmap(per_task)(seeds, *same_data)
    for i, seed in enumerate(seeds.tolist()):
        tree_close(batched[i], per_task(seed, q.b, q.y), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(batched["lam"][0], batched["lam"][1])
