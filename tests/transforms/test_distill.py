"""HyperDistill against references built by hand: Eq. 12 averages, Algorithm 4 by brute force."""

import pytest
import torch
from problems import DT, Quadratic, td, tree_close

import hyperfunc as hf
from hyperfunc.transforms.distill import keep_count, merge

T, LR = 8, 0.2
GAMMAS = [0.0, 0.5, 0.9, 1.0]


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)
    X, Y, Xv, Yv = r(6, 3), r(6), r(5, 3), r(5)

    def inner(p, h, batch):
        x, y = batch
        w = p["w"]
        return ((torch.tanh(x @ w) - y) ** 2).mean() + (h["a"] * w**2).sum() + 0.1 * (w**4).sum()

    def outer(p, h, batch):
        x, y = batch
        return ((torch.tanh(x @ p["w"]) - y) ** 2).mean()

    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=LR), steps=T, full_batch=True)
    hparams, params0 = td(a=0.3 + 0.1 * r(3).abs()), td(w=r(3))
    return loop, outer, hparams, params0, (X, Y), (Xv, Yv)


def _horizon(gamma, s):
    return sum(gamma**i for i in range(s))


class Reference:
    """Plain-SGD step map, its Jacobians and the distilled quantities, all by hand."""

    def __init__(self, seed=0):
        self.loop, self.outer, self.h, self.p0, self.D, self.V = _problem(seed)
        a = self.h["a"]
        self.phi = lambda w, a: w - LR * torch.func.grad(lambda w: self.loop.inner_loss(td(w=w), td(a=a), self.D))(w)
        self.A = lambda w: torch.func.jacrev(self.phi, 0)(w, a)
        self.B = lambda w: torch.func.jacrev(self.phi, 1)(w, a)
        self.w = [self.p0["w"]]
        for _ in range(T):
            self.w.append(self.phi(self.w[-1], a))
        self.alpha = torch.func.grad(lambda w: self.outer(td(w=w), self.h, self.V))(self.w[-1])

    def s_star(self, gamma, t):
        """Eq. (12): the weighted average of w_0..w_{t-1}, weight γ^{t-1-i} on w_i."""
        weights = [gamma ** (t - 1 - i) for i in range(t)]
        return sum(c * w for c, w in zip(weights, self.w[:t])) / sum(weights)

    def estimate(self, gamma):
        """Algorithm 4 by brute force: explicit DrMAD products and Eq. 17 averages."""
        w_hat = [(1 - i / T) * self.w[0] + (i / T) * self.w[-1] for i in range(T)]  # ŵ_0..ŵ_{T-1}
        xs, ys = [], []
        for s in range(1, T + 1):
            g_so = torch.zeros(3, dtype=DT)
            for i in range(T - s + 1, T + 1):  # α_T Â_T ⋯ Â_{i+1} B̂_i
                row = self.alpha
                for j in range(T, i, -1):
                    row = row @ self.A(w_hat[j - 1])
                g_so = g_so + row @ self.B(w_hat[i - 1])
            # Eq. (17) unrolled: weight γ^{k-1} on ŵ_{T-k}, k = 1..s
            w_star = sum(gamma ** (k - 1) * w_hat[T - k] for k in range(1, s + 1)) / _horizon(gamma, s)
            v = self.alpha @ self.B(w_star)
            xs.append(v.norm() * _horizon(gamma, s))
            ys.append(v @ g_so / v.norm())
        x, y = torch.stack(xs), torch.stack(ys)
        return x, y, (x @ y) / (x @ x)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_distilled_state_is_the_weighted_average_of_eq12(gamma):
    ref = Reference()
    theta = 0.7
    res = hf.distill(gamma, theta=theta)(ref.loop, ref.outer)(ref.h, ref.p0, ref.D, ref.V)
    v = ref.alpha @ ref.B(ref.s_star(gamma, T))
    torch.testing.assert_close(res.grads["a"], theta * _horizon(gamma, T) * v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.params["w"], ref.w[-1])


@pytest.mark.parametrize("gamma", GAMMAS)
def test_linear_estimation_equals_brute_force(gamma):
    ref = Reference(seed=1)
    x, y, theta = ref.estimate(gamma)
    est = hf.linear_estimation(gamma)(ref.loop, ref.outer)(ref.h, ref.p0, ref.D, ref.V)
    torch.testing.assert_close(est.x, x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est.y, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est.theta, theta, rtol=1e-10, atol=1e-12)
    fitted = hf.distill(gamma)(ref.loop, ref.outer)(ref.h, ref.p0, ref.D, ref.V)
    fixed = hf.distill(gamma, theta=float(theta))(ref.loop, ref.outer)(ref.h, ref.p0, ref.D, ref.V)
    tree_close(fitted.grads, fixed.grads, rtol=1e-10, atol=1e-12)


def test_theta_fits_the_drmad_size_on_a_quadratic():
    """γ near the true contraction of plain GD on a 1D quadratic makes the distilled term exact-sized:
    every sample satisfies y_s = θ x_s with the same θ (the linear estimator of Eq. 15 is exact)."""
    q = 2.0  # L_in = q/2 (w - a)^2, GD contracts by 1 - lr q
    loop = hf.InnerLoop(lambda p, h, x: 0.5 * q * ((p["w"] - h["a"]) ** 2).sum(), hf.optim.sgd(lr=LR), steps=T)
    outer = lambda p, h, y: 0.5 * ((p["w"] - y) ** 2).sum()
    args = (td(a=torch.tensor([0.5], dtype=DT)), td(w=torch.zeros(1, dtype=DT)), torch.zeros(T, 1, dtype=DT))
    est = hf.linear_estimation(1 - LR * q)(loop, outer)(*args, torch.ones(1, dtype=DT))
    torch.testing.assert_close(est.y, est.theta * est.x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est.theta, torch.tensor(1.0, dtype=DT))


@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0])
def test_distill_zero_and_fixed_theta_match_online(gamma):
    """distill(0, θ=1) is one-step lookahead; with fixed hparams the last online emission is the offline g_T."""
    quad = Quadratic(learned_init=False)
    loop, args = quad.loop(), (quad.hparams(), td(w=quad.w0), quad.b, quad.y)
    if gamma == 0.0:
        one = hf.one_step(loop, quad.outer)(*args).grads
        tree_close(hf.distill(0.0, theta=1.0)(loop, quad.outer)(*args).grads, one)
    online = hf.online.distill(gamma, theta=0.8, seed=3)(loop, quad.outer)
    state = online.init(args[0], args[1])
    for t in range(quad.steps):
        res, state = online.step(state, args[0], quad.b[t], quad.y, t)
    offline = hf.distill(gamma, theta=0.8, seed=3)(loop, quad.outer)(*args)
    tree_close(res.grads, offline.grads, rtol=1e-12, atol=1e-12)


def test_distill_zero_second_order_term_is_one_steps_scaled_by_theta():
    """γ = 0: the distilled term is θ times one-step lookahead's second-order term α_T B_T."""
    quad = Quadratic(learned_init=False)
    loop, args = quad.loop(), (quad.hparams(), td(w=quad.w0), quad.b, quad.y)
    first = hf.first_order(loop, quad.outer)(*args).grads["lam"]
    one = hf.one_step(loop, quad.outer)(*args).grads["lam"] - first
    for theta in (0.3, 2.5, -1.0):
        distilled = hf.distill(0.0, theta=theta)(loop, quad.outer)(*args).grads["lam"] - first
        torch.testing.assert_close(distilled, theta * one, rtol=1e-12, atol=1e-12)
        cosine = hf.agreement(td(lam=distilled), td(lam=one)).cosine
        torch.testing.assert_close(cosine, torch.tensor(1.0 if theta > 0 else -1.0, dtype=DT))


def test_distilled_batch_subsampling():
    n, T_ = 10, 6
    data = torch.arange(T_ * n).reshape(T_, n)  # example e of step t has value t*n + e
    old = data[0]
    for t in range(1, T_):
        p = (t) / (t + 1)  # γ = 1
        keep = keep_count(n, p)
        new = merge(old, data[t], keep, seed=0, step=t, stream=0)
        assert new.shape == (n,) and len(set(new.tolist())) == n  # no repeated example
        assert sum(int(v) // n == t for v in new.tolist()) == n - keep  # n - round(n p) from D_t
        assert set(new[:keep].tolist()) <= set(old.tolist())
        assert torch.equal(merge(old, data[t], keep, seed=0, step=t, stream=0), new)  # seeded
        old = new
    assert not torch.equal(merge(data[0], data[1], 5, seed=1, step=1, stream=0), merge(data[0], data[1], 5, 0, 1, 0))
    # γ = 0 keeps nothing of the past: D* is the last batch
    assert torch.equal(torch.sort(merge(data[0], data[1], keep_count(n, 0.0), 0, 1, 0)).values, data[1])


def test_distill_with_per_step_batches_keeps_examples_of_earlier_steps():
    """With γ = 1 the distilled batch mixes examples of earlier steps, so it differs from γ = 0's D_T."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(T, 8, 2, generator=g, dtype=DT), torch.randn(T, 8, generator=g, dtype=DT)
    loop = hf.InnerLoop(
        lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean() + h["l2"] * (p["w"] ** 2).sum(),
        hf.optim.sgd(lr=0.1),
        steps=T,
    )
    outer = lambda p, h, b: ((b[0] @ p["w"] - b[1]) ** 2).mean()
    args = (td(l2=torch.tensor(0.1, dtype=DT)), td(w=torch.ones(2, dtype=DT)), (x, y), (x[0], y[0]))
    # a loss that only reads step-0 examples' rows: D*_T at γ = 1 still holds some of them
    marked = (x, torch.zeros_like(y).index_fill(0, torch.tensor([0]), 1.0))
    probe = hf.InnerLoop(
        lambda p, h, b: h["l2"] * (b[1].sum() + 0 * p["w"].sum()) * (p["w"] ** 2).sum(), hf.optim.sgd(lr=0.1), steps=T
    )
    early = hf.distill(1.0, theta=1.0)(probe, outer)(args[0], args[1], marked, args[3]).grads["l2"]
    last = hf.distill(0.0, theta=1.0)(probe, outer)(args[0], args[1], marked, args[3]).grads["l2"]
    assert last == 0 and early != 0
    assert torch.isfinite(hf.distill(0.9)(loop, outer)(*args).grads["l2"])


def test_distill_errors():
    quad = Quadratic(learned_init=True)
    loop, args = quad.loop(), (quad.hparams(), quad.params0(), quad.b, quad.y)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            hf.distill(bad)
    with pytest.raises(TypeError, match="theta"):
        hf.distill(0.5, theta="one")
    with pytest.raises(ValueError, match="theta"):
        hf.distill(0.5, theta=torch.ones(2))
    with pytest.raises(TypeError, match="seed"):
        hf.distill(0.5, seed=1.5)
    with pytest.raises(ValueError, match=r"distill\(0.5\) has no term .* hf.reptile\(transform\)"):
        hf.distill(0.5, theta=1.0)(loop, quad.outer)(*args)
    # Reptile, as the paper meta-learns the initialization (Algorithm 3, line 14): w_0 - w_T on the init
    res = hf.reptile(hf.distill(0.5, theta=1.0))(loop, quad.outer)(*args)
    plain = hf.distill(0.5, theta=1.0)(loop, quad.outer)(quad.hparams(), td(w=quad.E @ quad.lam), quad.b, quad.y)
    w0 = quad.E @ quad.lam
    torch.testing.assert_close(res.grads["lam"], plain.grads["lam"] + quad.E.T @ (w0 - res.params["w"]))
    ragged = hf.InnerLoop(lambda p, h, b: (p["w"] * b[0].sum() + b[1].sum()).sum(), hf.optim.sgd(lr=0.1), steps=2)
    batches = (torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="leading example dimension"):
        hf.distill(0.5, theta=1.0)(ragged, quad.outer)(quad.hparams(), td(w=quad.w0), batches, quad.y)


def test_pooled_theta_is_least_squares_over_every_task_of_a_meta_batch():
    problem = hf.tasks.anil_sinusoid(steps=6, hidden=8, dtype=DT)
    tasks = hf.tasks.sinusoid_tasks(3, generator=torch.Generator().manual_seed(0), dtype=DT)
    fit = torch.func.vmap(hf.linear_estimation(0.9)(problem.loop, problem.outer_loss), in_dims=(None, None, 0, 0))
    est = fit(problem.hparams, problem.params0, tasks.inner_batches, tasks.outer_batch)
    assert est.x.shape == est.y.shape == (3, 6) and est.theta.shape == (3,)
    x, y = est.x.flatten(), est.y.flatten()
    solution = torch.linalg.lstsq(x[:, None], y[:, None]).solution.squeeze()
    torch.testing.assert_close(est.pooled(), solution, rtol=1e-12, atol=0)
    # one task: the pooled fit is that task's own fit
    torch.testing.assert_close(hf.Estimate(est.theta[0], est.x[0], est.y[0]).pooled(), est.theta[0])
    # not the mean of the per-task fits (unless they all agree)
    assert not torch.isclose(est.pooled(), est.theta.mean())
