"""prepare() stays exact; vmapped hypergradients equal a Python loop over tasks."""

import pytest
import torch
from problems import DT, Quadratic, mlp, mlp_params, td, tree_close
from tensordict import TensorDict

import hyperfunc as hf

T = 6
TRANSFORMS = {
    "unroll": hf.unroll,
    "checkpointed": lambda loop, outer: hf.unroll(loop, outer, checkpoint_every=2),
    "truncate3": hf.truncate(3),
    "forward": hf.forward,
    "one_step": hf.one_step,
    "first_order": hf.first_order,
    "drmad": hf.drmad,
    "greedy": hf.greedy_accumulate(0.7),
    "implicit_cg": hf.implicit("cg", iters=5),
    "implicit_neumann": hf.implicit("neumann", iters=5),
    "distill": hf.distill(0.8),
    "distill_fixed_theta": hf.distill(0.5, theta=0.7, seed=2),
    "langevin": hf.langevin(3, 3, tau=0.01, seed=1),
}
# IFT cannot differentiate a learning rate: those transforms get a loop with a constant one.
CONSTANT_LR = {"implicit_cg", "implicit_neumann"}
# HPO-SGLD needs plain SGD, and B + M = 6 steps.
PLAIN = {"langevin"}


def _anil(prepare: bool, full_batch: bool, constant_lr: bool = False, momentum: float = 0.9):
    """Body (hparams) -> features; linear head (params) trained inside; labels as an int tensor too."""

    def head(p, f):
        return f @ p["w"] + p["b"]

    def inner(p, h, batch):
        x, y, idx = batch
        feats = x if prepare else mlp(h["body"], x)
        return ((head(p, feats) - y) ** 2).mean() + 1e-3 * idx.sum() * 0 + 0.01 * (p["w"] ** 2).sum()

    def outer(p, h, batch):
        x, y = batch
        return ((head(p, mlp(h["body"], x)) - y) ** 2).mean()

    prep = (lambda h, batch: (mlp(h["body"], batch[0]), batch[1], batch[2])) if prepare else None
    opt = hf.optim.sgd(lr=0.1 if constant_lr else (lambda h: h["lr"]), momentum=momentum)
    return hf.InnerLoop(inner, opt, steps=T, full_batch=full_batch, prepare=prep), outer


def _anil_data(full_batch: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (5,) if full_batch else (T, 5)
    x = torch.randn(*shape, 1, generator=g, dtype=DT)
    batches = (x, torch.sin(3 * x), torch.arange(5).expand(*shape))
    xv = torch.randn(7, 1, generator=g, dtype=DT)
    hparams = TensorDict({"body": mlp_params([1, 8, 4], seed=seed), "lr": torch.tensor(0.1, dtype=DT)}, [])
    params0 = td(w=0.1 * torch.ones(4, 1, dtype=DT), b=torch.zeros(1, dtype=DT))
    return hparams, params0, batches, (xv, torch.sin(3 * xv))


@pytest.mark.parametrize("full_batch", [False, True])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_prepare_equals_recomputing_features(name, full_batch):
    args = _anil_data(full_batch)
    momentum = 0.0 if name in PLAIN else 0.9
    plain = TRANSFORMS[name](*_anil(False, full_batch, name in CONSTANT_LR, momentum))(*args)
    cached = TRANSFORMS[name](*_anil(True, full_batch, name in CONSTANT_LR, momentum))(*args)
    tree_close(cached.grads, plain.grads, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cached.loss, plain.loss)
    assert plain.grads["body", "0", "weight"].abs().sum() > 0


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_vmap_equals_loop(name):
    kw = dict(momentum=0.0, steps=6) if name in PLAIN else {}
    quads = [Quadratic(seed=s, learned_init=False, **kw) for s in range(3)]
    loop, outer = quads[0].loop(), quads[0].outer  # same Q, C, P across tasks; tasks differ in data
    hg = TRANSFORMS[name](loop, outer)
    hparams = quads[0].hparams()
    params0 = torch.stack([td(w=q.w0) for q in quads])
    batches = torch.stack([q.b for q in quads])
    ys = torch.stack([q.y for q in quads])
    batched = torch.func.vmap(hg, in_dims=(None, 0, 0, 0))(hparams, params0, batches, ys)
    for i in range(3):
        single = hg(hparams, params0[i], batches[i], ys[i])
        tree_close(batched.grads[i], single.grads, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(batched.loss[i], single.loss, rtol=1e-12, atol=1e-13)
        tree_close(batched.params[i], single.params, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["unroll", "forward", "truncate3", "drmad", "greedy", "implicit_cg", "distill"])
def test_vmap_equals_loop_with_prepare(name):
    hg = TRANSFORMS[name](*_anil(True, True, name in CONSTANT_LR))
    tasks = [_anil_data(True, seed=s) for s in range(3)]
    hparams = tasks[0][0]
    stack = lambda i: torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *[t[i] for t in tasks])
    params0 = torch.stack([t[1] for t in tasks])
    batched = torch.func.vmap(hg, in_dims=(None, 0, 0, 0))(hparams, params0, stack(2), stack(3))
    for i, (_, p0, b, v) in enumerate(tasks):
        # CG divides by curvatures that vanish once it has converged: batched rounding shows at 1e-11
        tol = dict(rtol=1e-8, atol=1e-10) if name in CONSTANT_LR else dict(rtol=1e-10, atol=1e-12)
        tree_close(batched.grads[i], hg(hparams, p0, b, v).grads, **tol)
