"""Hypergradients of a small nonlinear network against central finite differences (float64)."""

import pytest
import torch
from problems import DT, mlp, mlp_params, td
from tensordict import TensorDict

import hyperfunc as hf

T = 8


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 6, 2, generator=g, dtype=DT)
    y = torch.sin(x.sum(-1, keepdim=True))
    xv = torch.randn(10, 2, generator=g, dtype=DT)
    return (x, y), (xv, torch.sin(xv.sum(-1, keepdim=True)))


def _problem(opt):
    def inner(p, h, batch):
        x, y = batch
        return ((mlp(p, x) - y) ** 2).mean()

    def outer(p, h, batch):
        x, y = batch
        return ((mlp(p, x) - y) ** 2).mean()

    loop = hf.InnerLoop(inner, opt, steps=T)
    hparams = TensorDict(
        {"log_lr": torch.tensor(-1.5, dtype=DT), "log_wd": torch.tensor(-3.0, dtype=DT), "init": mlp_params([2, 5, 1])},
        batch_size=[],
    )
    return loop, outer, hparams, (lambda h: h["init"])


def _fd_check(hg, outer, loop, hparams, params0, batches, val, eps=1e-5):
    res = hg(hparams, params0, batches, val)

    def F(h):
        return hf.unroll(loop, outer)(h, params0, batches, val).loss

    # direction derivative along a random direction, and each scalar hyperparameter alone
    g = torch.Generator().manual_seed(1)
    v = hparams.apply(lambda x: torch.randn(x.shape, generator=g, dtype=DT))
    for direction in [
        v,
        v.apply(torch.zeros_like).set("log_lr", torch.ones((), dtype=DT)),
        v.apply(torch.zeros_like).set("log_wd", torch.ones((), dtype=DT)),
    ]:
        fd = (F(hparams + eps * direction) - F(hparams - eps * direction)) / (2 * eps)
        analytic = sum((res.grads.get(k) * direction.get(k)).sum() for k in hparams.keys(True, True))
        torch.testing.assert_close(analytic, fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["unroll", "forward", "checkpointed"])
def test_sgd_lr_wd_init_against_fd(name):
    opt = hf.optim.sgd(lr=lambda h: h["log_lr"].exp(), momentum=0.9, weight_decay=lambda h: h["log_wd"].exp())
    loop, outer, hparams, params0 = _problem(opt)
    hg = {
        "unroll": hf.unroll(loop, outer),
        "forward": hf.forward(loop, outer),
        "checkpointed": hf.unroll(loop, outer, checkpoint_every=3),
    }[name]
    batches, val = _data()
    _fd_check(hg, outer, loop, hparams, params0, batches, val)


def test_adam_lr_wd_init_against_fd():
    opt = hf.optim.adam(lr=lambda h: h["log_lr"].exp(), weight_decay=lambda h: h["log_wd"].exp())
    loop, outer, hparams, params0 = _problem(opt)
    batches, val = _data()
    _fd_check(hf.unroll(loop, outer), outer, loop, hparams, params0, batches, val)


@pytest.mark.parametrize(
    "make",
    [
        lambda lr, wd: hf.optim.adamw(lr=lr, weight_decay=wd),
        lambda lr, wd: hf.optim.rmsprop(lr=lr, weight_decay=wd, momentum=0.5, centered=True),
    ],
    ids=["adamw", "rmsprop"],
)
@pytest.mark.parametrize("name", ["unroll", "forward"])
def test_adamw_rmsprop_lr_wd_init_against_fd(make, name):
    opt = make(lambda h: h["log_lr"].exp() * 0.1, lambda h: h["log_wd"].exp())
    loop, outer, hparams, params0 = _problem(opt)
    batches, val = _data()
    hg = hf.unroll(loop, outer) if name == "unroll" else hf.forward(loop, outer)
    _fd_check(hg, outer, loop, hparams, params0, batches, val)


def test_per_parameter_learning_rates_against_fd():
    # Meta-SGD: one learning rate per parameter entry, a TensorDict shaped like the params.
    def inner(p, h, batch):
        x, y = batch
        return ((mlp(p, x) - y) ** 2).mean()

    params0 = mlp_params([2, 4, 1], seed=3)
    hparams = td(lrs=params0.apply(lambda x: torch.full_like(x, 0.2)))
    opt = hf.optim.sgd(lr=lambda h: h["lrs"], momentum=0.5)
    loop = hf.InnerLoop(inner, opt, steps=T)
    batches, val = _data(2)
    hg = hf.unroll(loop, inner)
    res = hg(hparams, params0, batches, val)
    assert res.grads["lrs"].shape == hparams["lrs"].shape
    key = ("lrs", "0", "weight")
    eps = 1e-5
    bump = hparams.apply(torch.zeros_like)
    bump.get(key)[1, 0] = 1.0
    fd = (
        hg(hparams + eps * bump, params0, batches, val).loss - hg(hparams - eps * bump, params0, batches, val).loss
    ) / (2 * eps)
    torch.testing.assert_close(res.grads.get(key)[1, 0], fd, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(
        res.grads, hf.forward(loop, inner)(hparams, params0, batches, val).grads, rtol=1e-9, atol=1e-12
    )
