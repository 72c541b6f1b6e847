"""DrMAD: exact on affine dynamics, and equal to a hand-written reverse pass over interpolated states; the
exact reverse pass keeps one step's graph at a time by default."""

import sys
from pathlib import Path

import pytest
import torch
from problems import DT, Quadratic, mlp, mlp_params, td, tree_close
from tensordict import TensorDict

import hyperfunc as hf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _measure import peak_bytes  # noqa: E402


@pytest.mark.parametrize("learned_init", [False, True])
def test_drmad_equals_unroll_on_quadratic(learned_init):
    # A quadratic inner loss with (momentum) gradient descent has constant step Jacobians.
    quad = Quadratic(learned_init=learned_init)
    quad.b = quad.b[:1].expand(quad.steps, -1).clone()  # same batch every step: B_t constant too
    args = quad.args()
    tree_close(hf.drmad(quad.loop(), quad.outer)(*args).grads, hf.unroll(quad.loop(), quad.outer)(*args).grads)
    torch.testing.assert_close(hf.drmad(quad.loop(), quad.outer)(*args).grads["lam"], quad.exact())


def test_drmad_equals_reverse_pass_over_interpolated_states():
    T, lr = 6, 0.3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 5, 2, generator=g, dtype=DT)
    y = torch.cos(x.sum(-1, keepdim=True))
    xv = torch.randn(8, 2, generator=g, dtype=DT)
    yv = torch.cos(xv.sum(-1, keepdim=True))
    params0 = mlp_params([2, 4, 1], seed=1)
    keys = list(params0.keys(True, True))
    lam = torch.tensor(0.05, dtype=DT)

    def inner(p, h, batch):
        return ((mlp(p, batch[0]) - batch[1]) ** 2).mean() + h["l2"] * sum((p.get(k) ** 2).sum() for k in keys)

    def outer(p, h, batch):
        return ((mlp(p, batch[0]) - batch[1]) ** 2).mean()

    res = hf.drmad(hf.InnerLoop(inner, hf.optim.sgd(lr=lr), steps=T), outer)(td(l2=lam), params0, (x, y), (xv, yv))

    # reference: plain autograd on a hand-written SGD step Φ(w, λ) = w − lr ∇_w L_in(w, λ)
    def unflat(ws):
        return TensorDict(dict(zip(keys, ws)), batch_size=[])

    def phi(t, l2, *ws):
        loss = inner(unflat(ws), td(l2=l2), (x[t], y[t]))
        grads = torch.autograd.grad(loss, ws, create_graph=True)
        return tuple(w - lr * gr for w, gr in zip(ws, grads))

    w0 = [params0.get(k).clone() for k in keys]
    w = [t.clone().requires_grad_() for t in w0]
    for t in range(T):
        w = list(phi(t, lam, *w))
    wT = [t.detach() for t in w]
    wT_req = [t.clone().requires_grad_() for t in wT]
    alpha = torch.autograd.grad(outer(unflat(wT_req), None, (xv, yv)), wT_req)
    total = torch.zeros((), dtype=DT)
    for t in range(T, 0, -1):
        c = (t - 1) / T
        w_hat = [((1 - c) * a + c * b).requires_grad_() for a, b in zip(w0, wT)]
        l2 = lam.clone().requires_grad_()
        out = phi(t - 1, l2, *w_hat)
        grads = torch.autograd.grad(out, [l2, *w_hat], grad_outputs=alpha)
        total, alpha = total + grads[0], grads[1:]
    torch.testing.assert_close(res.grads["l2"], total, rtol=1e-10, atol=1e-13)
    # and it is an approximation: not the exact hypergradient on this nonlinear problem
    exact = hf.unroll(hf.InnerLoop(inner, hf.optim.sgd(lr=lr), steps=T), outer)(td(l2=lam), params0, (x, y), (xv, yv))
    assert not torch.allclose(exact.grads["l2"], res.grads["l2"], rtol=1e-3)


def _mlp_problem(T):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g, dtype=DT)
    y = torch.sin(x.sum(-1, keepdim=True))
    params0 = mlp_params([8, 64, 64, 1], seed=1)

    def inner(p, h, batch):
        return ((mlp(p, batch[0]) - batch[1]) ** 2).mean() + h["l2"] * (p["0", "weight"] ** 2).sum()

    def outer(p, h, batch):
        return ((mlp(p, batch[0]) - batch[1]) ** 2).mean()

    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1, momentum=0.9), steps=T, full_batch=True)
    return loop, outer, (td(l2=torch.tensor(0.01, dtype=DT)), params0, (x, y), (x, y))


def _peaks_and_grads(make):
    """Peak bytes and hypergradient of the default and the whole-graph unroll at T = 4 and 16."""
    out = {}
    for T in (4, 16):
        loop, outer, args = make(T)
        for name, hg in {
            "default": hf.unroll(loop, outer),
            "whole": hf.unroll(loop, outer, checkpoint_every=T),
        }.items():
            res = []
            out[name, T] = peak_bytes(lambda: res.append(hg(*args)))
            out[name, T, "grads"] = res[0].grads
    return out, 2 * sum(x.numel() * x.element_size() for x in args[1].values(True, True))  # state: params, momentum


def test_a_step_graph_over_the_budget_is_recomputed_one_step_at_a_time(monkeypatch):
    """Storing every state and recomputing one step at a time: the peak stays flat in T (the whole graph's
    grows with it), the hypergradient is the same."""
    monkeypatch.setattr(hf.transforms._executor, "GRAPH_BUDGET", 1)  # every step's graph is over it
    peaks, state = _peaks_and_grads(_mlp_problem)
    for T in (4, 16):
        tree_close(peaks["default", T, "grads"], peaks["whole", T, "grads"], rtol=1e-12, atol=1e-14)
    assert peaks["default", 16] - peaks["default", 4] < 1.2 * 12 * state  # 12 more states, nothing else
    assert peaks["whole", 16] - peaks["whole", 4] > 5 * 12 * state  # 12 more steps' graphs


def test_a_graph_within_the_budget_is_kept_whole():
    """A 64-unit MLP's 16 steps fit the 64 MiB budget: the default keeps the whole graph and recomputes nothing."""
    peaks, _ = _peaks_and_grads(_mlp_problem)
    for T in (4, 16):
        assert peaks["default", T] == pytest.approx(peaks["whole", T], rel=0.05)
        tree_close(peaks["default", T, "grads"], peaks["whole", T, "grads"], rtol=0, atol=0)
