"""The functional optimizers against torch.optim, and their argument handling."""

import pytest
import torch
from problems import DT, td, tree_close

import hyperfunc as hf


def _grad_fn(seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(5, 5, generator=g, dtype=DT)
    Q = Q @ Q.T / 5 + torch.eye(5, dtype=DT)
    b = torch.randn(5, generator=g, dtype=DT)
    return lambda w: Q @ w - b + 0.1 * torch.sin(3 * w)


def _compare(ours, theirs_cls, steps=25, **kw):
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


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.3),
        dict(lr=0.05, momentum=0.9, nesterov=True),
        dict(lr=0.05, momentum=0.5, weight_decay=0.1),
        dict(lr=0.05, momentum=0.5, dampening=0.2, weight_decay=0.1),
    ],
)
def test_sgd_matches_torch(kw):
    _compare(hf.optim.sgd(**kw), torch.optim.SGD, **kw)


@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.1), dict(lr=0.01, betas=(0.8, 0.99)), dict(lr=0.05, eps=1e-3, weight_decay=0.1)],
)
def test_adam_matches_torch(kw):
    _compare(hf.optim.adam(**kw), torch.optim.Adam, **kw)


def test_update_does_not_mutate_inputs():
    opt = hf.optim.adam(lr=0.1)
    state = opt.init(td(w=torch.ones(3, dtype=DT)))
    before = state.clone()
    grads = td(w=torch.ones(3, dtype=DT))
    new = opt.update(state, grads)
    tree_close(state, before, rtol=0, atol=0)
    assert not torch.equal(new["params", "w"], state["params", "w"])


def test_callable_and_per_parameter_args():
    h = td(
        log_lr=torch.tensor(-1.0, dtype=DT), lrs=td(a=torch.tensor([0.1, 0.2], dtype=DT), b=torch.tensor(0.3, dtype=DT))
    )
    params = td(a=torch.ones(2, dtype=DT), b=torch.ones((), dtype=DT))
    grads = td(a=torch.ones(2, dtype=DT), b=torch.ones((), dtype=DT))
    scalar = hf.optim.sgd(lr=lambda h: h["log_lr"].exp()).update(hf.optim.sgd(lr=1.0).init(params), grads, h)
    torch.testing.assert_close(scalar["params", "a"], 1 - torch.full((2,), torch.e**-1, dtype=DT))
    per = hf.optim.sgd(lr=lambda h: h["lrs"])
    out = per.update(per.init(params), grads, h)
    torch.testing.assert_close(out["params", "a"], torch.tensor([0.9, 0.8], dtype=DT))
    torch.testing.assert_close(out["params", "b"], torch.tensor(0.7, dtype=DT))


def test_callable_arg_wrong_shape_is_clear():
    opt = hf.optim.sgd(lr=lambda h: h["lr"])
    params = td(w=torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="lr\\(hparams\\) returned a tensor of shape"):
        opt.update(opt.init(params), params, td(lr=torch.ones(2, dtype=DT)))
    per = hf.optim.sgd(lr=lambda h: td(w=torch.ones(2, dtype=DT)))
    with pytest.raises(ValueError, match="expected a scalar or the shape of params"):
        per.update(per.init(params), params, td(lr=torch.ones(2, dtype=DT)))
    wrong_keys = hf.optim.sgd(lr=lambda h: td(v=torch.ones(3, dtype=DT)))
    with pytest.raises(ValueError, match="same keys as the params"):
        wrong_keys.update(wrong_keys.init(params), params, td(lr=torch.ones(2, dtype=DT)))
    with pytest.raises(ValueError, match="pass hparams"):
        opt.update(opt.init(params), params)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: hf.optim.sgd(lr=-0.1), "lr must lie in"),
        (lambda: hf.optim.sgd(lr=0.1, dampening=1.5), "dampening must lie in"),
        (lambda: hf.optim.sgd(lr=0.1, nesterov=True), "nesterov"),
        (lambda: hf.optim.adam(betas=(0.9, 1.0)), "betas\\[1\\] must lie in"),
        (lambda: hf.optim.adam(betas=0.9), "betas must be a pair"),
        (lambda: hf.optim.sgd(lr="fast"), "lr must be a number"),
        (lambda: hf.optim.sgd(lr=torch.ones(2)), "lr must be a floating-point scalar tensor"),
        (lambda: hf.optim.sgld(lr=0.1, seed=1.5), "seed must be an int"),
    ],
)
def test_bad_optimizer_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_sgld_noise_is_deterministic_and_gaussian():
    opt = hf.optim.sgld(lr=0.5, temperature=2.0, seed=3)
    params = td(w=torch.zeros(20000, dtype=DT))
    zero = td(w=torch.zeros(20000, dtype=DT))
    a = opt.update(opt.init(params), zero)
    b = opt.update(opt.init(params), zero)
    tree_close(a, b, rtol=0, atol=0)
    z = a["params", "w"] / (2 * 0.5 * 2.0) ** 0.5
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    c = opt.update(a, zero)  # the next step draws fresh noise
    assert abs(float(torch.corrcoef(torch.stack([c["params", "w"] - a["params", "w"], a["params", "w"]]))[0, 1])) < 0.05
    other = hf.optim.sgld(lr=0.5, temperature=2.0, seed=4).update(opt.init(params), zero)
    assert not torch.equal(other["params", "w"], a["params", "w"])


def test_noise_keys_on_device_equal_host_keys_under_nested_vmap_and_compile():
    # traced steps and per-task seeds hash through the hyperfunc::counter_bits operator; it must draw the
    # very numbers the host-side hash of Python ints draws, batched at any vmap depth and compiled
    from hyperfunc.optim._noise import _draw, _draw_numpy, _draw_torch, _hash, _key, bits, normal

    # int64 tensors hash like Python ints (the multiplications wrap around in two's complement)
    x = torch.randint(0, 2**32, (1000,), generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, torch.tensor([2**32 - 1])])
    assert torch.equal(_hash(x), torch.tensor([_hash(v) for v in x.tolist()]))
    # the accelerator's path (torch ops on the device, a tensor of keys, streams on the last axis) draws the
    # CPU's (numpy) bits; so do Python-int keys on either path
    keys = torch.stack([_key(torch.tensor([[3], [2**40 + 1]]), torch.tensor([5, 6]), c) for c in (2, 0)], -1)
    assert torch.equal(_draw_torch(keys, (6, 2), "cpu"), _draw_numpy(keys, (6, 2)))
    assert torch.equal(_draw_torch(torch.tensor([_key(3, 5, 2)]), (4,), "cpu"), _draw([_key(3, 5, 2)], (4,), "cpu"))

    def draw(seed, step):
        return bits([(5,)], seed, step, [3], "cpu")[0]

    seeds, steps = torch.tensor([[1, 2**40 + 2], [3, 4], [5, 6]]), torch.tensor([7, 8, 9])
    out = torch.func.vmap(torch.func.vmap(draw, in_dims=(0, None)))(seeds, steps)
    ref = [[draw(int(seeds[i, j]), int(steps[i])) for j in range(2)] for i in range(3)]
    assert torch.equal(out, torch.stack([torch.stack(r) for r in ref]))
    out = torch.func.vmap(torch.func.vmap(draw, in_dims=(None, 0)), in_dims=(0, None))(seeds[:, 0], steps)
    ref = [[draw(int(seeds[i, 0]), int(steps[j])) for j in range(3)] for i in range(3)]
    assert torch.equal(out, torch.stack([torch.stack(r) for r in ref]))
    # one draw of several streams (every leaf of a step) equals a draw per stream, int or traced keys
    for step in (4, torch.tensor(4)):
        shapes, streams = [(2, 3), (), (4,)], [0, 5, 1]
        many = bits(shapes, 9, step, streams, "cpu")
        assert all(torch.equal(a, bits([shape], 9, 4, [c], "cpu")[0]) for a, shape, c in zip(many, shapes, streams))

    def noisy(w, v, t):
        z = normal([w.shape, v.shape], 11, t, [0, 1], [w.dtype, v.dtype], w.device)
        return w + z[0], v + z[1]

    w, v = torch.zeros(2, 3, dtype=DT), torch.zeros(4, dtype=torch.float32)
    torch._dynamo.reset()  # earlier tests' frames must not exhaust the recompile limit of vmap's wrapper
    compiled = torch.compile(torch.func.vmap(noisy, in_dims=(None, None, 0)), backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(w, v, torch.tensor([4, 5])), zip(noisy(w, v, 4), noisy(w, v, 5))):
        assert torch.equal(a, torch.stack(b))


def test_a_kernels_draws_become_one_call_with_the_same_bits():
    # batch_draws stacks the steps of the counter_bits calls that share a seed and sizes; the step counters are
    # computed late in the graph (next to each draw) and must be moved ahead of the merged call
    from torch.fx.experimental.proxy_tensor import make_fx

    from hyperfunc._common_subexpressions import merge_common_subexpressions
    from hyperfunc.optim._noise import _counter_bits, batch_draws, normal

    def segment(w, t0, random_step):
        for j in range(4):
            w = w + normal([w.shape], 7, t0 + j, [0], [w.dtype], w.device)[0]
        if random_step:  # a step that depends on a random draw cannot be moved: the group stays as it is
            w = w + normal([w.shape], 7, t0 + (torch.rand(()) > 2).long(), [0], [w.dtype], w.device)[0]
        return w

    w, t0 = torch.zeros(3, dtype=DT), torch.tensor(5)
    for random_step, merged in ((False, 1), (True, 5)):
        graph = make_fx(lambda w, t0: segment(w, t0, random_step))(w, t0)
        merge_common_subexpressions(graph.graph)  # as hf.compile's kernels: equal seeds become one node
        batch_draws(graph.graph)
        graph.graph.lint()  # still in topological order
        graph.recompile()
        assert sum(node.target is _counter_bits for node in graph.graph.nodes) == merged
        assert torch.equal(graph(w, t0), segment(w, t0, random_step))  # rand(()) > 2 never holds: fixed steps


def test_sgld_zero_temperature_is_gradient_descent():
    opt = hf.optim.sgld(lr=0.1, temperature=0.0)
    out = opt.update(opt.init(td(w=torch.ones(3, dtype=DT))), td(w=torch.ones(3, dtype=DT)))
    torch.testing.assert_close(out["params", "w"], torch.full((3,), 0.9, dtype=DT))


def test_adam_zero_gradient_has_finite_hypergradient():
    # sqrt at v = 0 has an infinite derivative; Adam's update must still be differentiable there.
    opt = hf.optim.adam(lr=lambda h: h["lr"])
    state = opt.init(td(w=torch.ones(2, dtype=DT)))

    def f(lr):
        new = opt.update(state, td(w=torch.tensor([0.0, 1.0], dtype=DT)), td(lr=lr))
        return new["params", "w"].sum()

    g = torch.func.grad(f)(torch.tensor(0.1, dtype=DT))
    assert torch.isfinite(g) and abs(float(g) + 1.0) < 1e-6
