"""Shared test problems with closed-form hypergradients (float64)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch
from tensordict import TensorDict

import hyperfunc as hf

DT = torch.float64


def sinusoid_args(problem, seed, dtype=DT):
    """``(hparams, params0, inner_batches, outer_batch)`` for 2 sinusoid tasks; each ``seed`` gives new tasks
    and new hyperparameter values of the same shapes (what must not trigger a recompile)."""
    tasks = hf.tasks.sinusoid_tasks(2, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    hparams = problem.hparams.apply(lambda x: x * (1 + 0.1 * seed))
    return hparams, problem.params0, tasks.inner_batches, tasks.outer_batch


def td(**leaves) -> TensorDict:
    return TensorDict(leaves, batch_size=[])


@dataclass
class Quadratic:
    r"""A quadratic bilevel problem trained by SGD with momentum, with affine dynamics.

    inner:  L_in(w, λ; b_t) = ½ wᵀQw − wᵀ(b_t + Cλ)          (b_t: the step-t batch)
    outer:  L_out(w, λ)     = ½‖Pw − y‖² + ½ρ‖λ‖²
    SGD:    v_t = μ v + g + wd·w,  w_t = w − lr·v_t  (torch.optim.SGD, dampening 0)

    The state s = (w, v) evolves as s_t = A s_{t−1} + Bλ + c_t, so every hypergradient is matrix
    algebra on A and B. With ``learned_init``, w_0 = Eλ.
    """

    n: int = 4
    m: int = 3
    steps: int = 12
    lr: float = 0.1
    momentum: float = 0.7
    wd: float = 0.05
    rho: float = 0.3
    learned_init: bool = False
    seed: int = 0

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=DT)
        M = r(self.n, self.n)
        self.Q = M @ M.T / self.n + 0.5 * torch.eye(self.n, dtype=DT)
        self.C, self.P, self.E = r(self.n, self.m), r(2, self.n), r(self.n, self.m)
        self.y, self.lam, self.w0 = r(2), r(self.m), r(self.n)
        self.b = r(self.steps, self.n)

    # hyperfunc side --------------------------------------------------------------------------
    def inner(self, p, h, b):
        w = p["w"]
        return 0.5 * w @ self.Q @ w - w @ (b + self.C @ h["lam"])

    def outer(self, p, h, y):
        return 0.5 * ((self.P @ p["w"] - y) ** 2).sum() + 0.5 * self.rho * (h["lam"] ** 2).sum()

    def loop(self, **kw):
        opt = hf.optim.sgd(lr=self.lr, momentum=self.momentum, weight_decay=self.wd)
        return hf.InnerLoop(self.inner, opt, steps=self.steps, **kw)

    def hparams(self):
        return td(lam=self.lam.clone())

    def params0(self):
        if self.learned_init:
            return lambda h: td(w=self.E @ h["lam"])
        return td(w=self.w0.clone())

    def args(self):
        return self.hparams(), self.params0(), self.b.clone(), self.y.clone()

    # closed form ------------------------------------------------------------------------------
    def matrices(self):
        n, I = self.n, torch.eye(self.n, dtype=DT)
        Qe = self.Q + self.wd * I
        A = torch.zeros(2 * n, 2 * n, dtype=DT)
        A[:n, :n], A[:n, n:] = I - self.lr * Qe, -self.lr * self.momentum * I
        A[n:, :n], A[n:, n:] = Qe, self.momentum * I
        B = torch.cat([self.lr * self.C, -self.C])
        return A, B

    def states(self):
        """s_0, s_1, ..., s_T."""
        A, B = self.matrices()
        w0 = self.E @ self.lam if self.learned_init else self.w0
        out = [torch.cat([w0, torch.zeros(self.n, dtype=DT)])]
        for t in range(self.steps):
            c = torch.cat([self.lr * self.b[t], -self.b[t]])
            out.append(A @ out[-1] + B @ self.lam + c)
        return out

    def trajectory(self):
        return self.states()[-1]

    def alpha_at(self, s):
        """∂L_out/∂s at state s (zero on the momentum buffer)."""
        return torch.cat([self.P.T @ (self.P @ s[: self.n] - self.y), torch.zeros(self.n, dtype=DT)])

    def alpha(self):
        return self.alpha_at(self.trajectory())

    def truncated(self, K):
        """ρλ + Σ_{t=T−K+1..T} (A^{T−t} B)ᵀ α, plus the w_0 term when K >= T."""
        A, B = self.matrices()
        a = self.alpha()
        g = self.rho * self.lam.clone()
        Ak = torch.eye(2 * self.n, dtype=DT)
        for _ in range(min(K, self.steps)):
            g = g + (Ak @ B).T @ a
            Ak = Ak @ A
        if K >= self.steps and self.learned_init:
            g = g + (Ak @ torch.cat([self.E, torch.zeros(self.n, self.m, dtype=DT)])).T @ a
        return g

    def exact(self):
        return self.truncated(self.steps)

    def loss(self):
        w = self.trajectory()[: self.n]
        return 0.5 * ((self.P @ w - self.y) ** 2).sum() + 0.5 * self.rho * (self.lam**2).sum()


def mlp_params(sizes, seed=0, dtype=DT):
    """Params of a tanh MLP as a nested TensorDict {"0": {"weight","bias"}, "1": ...}."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers[str(i)] = td(
            weight=torch.randn(b, a, generator=g, dtype=dtype) / a**0.5,
            bias=0.1 * torch.randn(b, generator=g, dtype=dtype),
        )
    return TensorDict(layers, batch_size=[])


def mlp(params, x):
    n = len(params.keys())
    for i in range(n):
        x = x @ params[str(i), "weight"].T + params[str(i), "bias"]
        if i < n - 1:
            x = torch.tanh(x)
    return x


def tree_close(a, b, rtol=1e-10, atol=1e-12):
    """Assert two TensorDicts have the same keys and close values."""
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for k in a.keys(True, True):
        torch.testing.assert_close(a.get(k), b.get(k), rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def sgld_inner(p, h, b):
    """The inner loss of Kim & Hospedales Sec. 4.1's 1D problem (HPO-SGLD)."""
    th = p["theta"]
    return th**3 / 3 - (1 - h["lam"] ** 2) * th


def sgld_outer(p, h, b):
    """Its outer loss."""
    th = p["theta"]
    return (h["lam"] - th) ** 2 + (th - 0.5) ** 2


def _grad_fn(seed=0):
    """The gradient of a strongly convex quadratic plus a smooth wiggle, in 5 dimensions."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(5, 5, generator=g, dtype=DT)
    Q = Q @ Q.T / 5 + torch.eye(5, dtype=DT)
    b = torch.randn(5, generator=g, dtype=DT)
    return lambda w: Q @ w - b + 0.1 * torch.sin(3 * w)


def compare_with_torch_optim(ours, theirs_cls, steps=25, **kw):
    """``ours`` (a hyperfunc optimizer) against ``theirs_cls(**kw)`` trained in place on one smooth problem,
    step by step."""
    grad = _grad_fn()
    w0 = torch.linspace(-1, 1, 5, dtype=DT)
    ref = w0.clone().requires_grad_()
    torch_opt = theirs_cls([ref], **kw)
    state = ours.init(td(w=w0.clone()))
    for _ in range(steps):
        ref.grad = grad(ref.detach())
        torch_opt.step()
        state = ours.update(state, td(w=grad(state["params", "w"])))
        torch.testing.assert_close(state["params", "w"], ref.detach(), rtol=1e-12, atol=1e-13)
    assert int(state["step"]) == steps


def anil(steps, momentum=0.9, dtype=DT):
    """ANIL sinusoids with an 8-unit body (hf.tasks.anil_sinusoid): the small problem of the compiled routes' tests."""
    return hf.tasks.anil_sinusoid(steps=steps, hidden=8, momentum=momentum, dtype=dtype)


LANGEVIN_TAU, LANGEVIN_SEED = 1e-3, 4


class Entry(NamedTuple):
    """A built-in transform in the contract tables: ``make(T)`` builds it for a horizon of ``T`` inner steps,
    ``online()`` its online form (None: it has none, or one that does not end at the offline result);
    ``exact_init``: its formula has the term through a learned ``w_0``; ``momentum``: the inner SGD
    momentum its loop needs (Langevin dynamics has none)."""

    make: Callable[[int], Any]
    online: Optional[Callable[[], Any]] = None
    exact_init: bool = False
    momentum: float = 0.9


#: every built-in transform, once: the contract tables (test_contract, test_online, test_torch_compile,
#: tests/compile/) take their rows from here, so a transform added here is checked by all of them
TRANSFORMS = {
    "unroll": Entry(lambda T: hf.unroll, exact_init=True),
    "checkpointed": Entry(lambda T: functools.partial(hf.unroll, checkpoint_every=2), exact_init=True),
    "whole tape": Entry(lambda T: functools.partial(hf.unroll, checkpoint_every=T), exact_init=True),
    "truncate(T)": Entry(lambda T: hf.truncate(T), exact_init=True),
    "truncate(T-1)": Entry(lambda T: hf.truncate(max(T - 1, 1))),
    "one_step": Entry(lambda T: hf.one_step, online=lambda: hf.online.one_step),
    "first_order": Entry(lambda T: hf.first_order),
    "forward": Entry(lambda T: hf.forward, online=lambda: hf.online.forward, exact_init=True),
    "drmad": Entry(lambda T: hf.drmad, exact_init=True),
    "greedy_accumulate": Entry(
        lambda T: hf.greedy_accumulate(0.7), online=lambda: hf.online.greedy_accumulate(0.7), exact_init=True
    ),
    "implicit_cg": Entry(
        lambda T: hf.implicit("cg", 3, damping=0.1), online=lambda: hf.online.implicit("cg", 3, damping=0.1)
    ),
    "implicit_neumann": Entry(lambda T: hf.implicit("neumann", 3), online=lambda: hf.online.implicit("neumann", 3)),
    "distill": Entry(
        lambda T: hf.distill(0.8, theta=0.5, seed=3), online=lambda: hf.online.distill(0.8, theta=0.5, seed=3)
    ),
    "distill(fitted)": Entry(lambda T: hf.distill(0.9)),
    "langevin": Entry(
        lambda T: hf.langevin(1, T - 1, tau=LANGEVIN_TAU, seed=LANGEVIN_SEED), exact_init=True, momentum=0.0
    ),
}
