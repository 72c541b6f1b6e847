"""The online init/step API: equal to the offline transforms with fixed hparams, vmappable, and usable."""

import pytest
import torch
import torchopt
from problems import DT, Quadratic, sgld_inner, sgld_outer, td, tree_close
from problems import TRANSFORMS as REGISTRY
from test_prepare_vmap import T as ANIL_T
from test_prepare_vmap import _anil, _anil_data

import hyperfunc as hf

PAIRS = {name: (entry.online(), entry.make(Quadratic.steps)) for name, entry in REGISTRY.items() if entry.online}


def _run(online, hparams, params0, batches, outer_batch, steps):
    state = online.init(hparams, params0)
    emitted = []
    for t in range(steps):
        res, state = online.step(state, hparams, torch.utils._pytree.tree_map(lambda x: x[t], batches), outer_batch, t)
        emitted.append(res)
    return emitted, state


@pytest.mark.parametrize("name", list(PAIRS))
def test_last_emission_equals_offline(name):
    quad = Quadratic(learned_init=False)
    loop, args = quad.loop(), (quad.hparams(), td(w=quad.w0), quad.b, quad.y)
    online, offline = PAIRS[name]
    emitted, state = _run(online(loop, quad.outer), *args, quad.steps)
    expected = offline(loop, quad.outer)(*args)
    tree_close(emitted[-1].grads, expected.grads, rtol=1e-12, atol=1e-12)
    tree_close(emitted[-1].params, expected.params)
    torch.testing.assert_close(emitted[-1].loss, expected.loss)
    assert int(state.inner["step"]) == quad.steps
    assert not torch.equal(emitted[0].grads["lam"], emitted[-1].grads["lam"])


@pytest.mark.parametrize("name", list(PAIRS))
def test_online_with_prepare_equals_offline(name):
    """prepare runs on each step's batch and is pulled back at once; the total is unchanged."""
    ift = name.startswith("implicit")  # IFT cannot differentiate the learning rate: keep it constant
    loop, outer = _anil(True, False, constant_lr=ift)
    hparams, params0, batches, val = _anil_data(False)
    online, offline = PAIRS[name]
    emitted, _ = _run(online(loop, outer), hparams, params0, batches, val, ANIL_T)
    expected = offline(loop, outer)(hparams, params0, batches, val)
    tree_close(emitted[-1].grads, expected.grads, rtol=1e-10, atol=1e-12)
    if ift:  # the diagnostics too; stationarity's scale is the w_0 gradient on the first batch online
        torch.testing.assert_close(emitted[-1].residual, expected.residual, rtol=1e-8, atol=1e-14)
        loop, _ = _anil(True, True, constant_lr=True)
        hparams, params0, batch, val = _anil_data(True)
        repeated = torch.utils._pytree.tree_map(lambda x: torch.stack([x] * ANIL_T), batch)
        emitted, _ = _run(online(loop, outer), hparams, params0, repeated, val, ANIL_T)
        expected = offline(loop, outer)(hparams, params0, batch, val)
        torch.testing.assert_close(emitted[-1].stationarity, expected.stationarity, rtol=1e-10, atol=0)
        assert 0 < float(expected.stationarity) < 1


def test_online_langevin_averages_to_offline():
    B, M = 5, 7
    loop = hf.InnerLoop(sgld_inner, hf.optim.sgd(lr=0.05), steps=1, full_batch=True)
    h, p0 = td(lam=torch.tensor(0.4, dtype=DT)), td(theta=torch.tensor(0.5, dtype=DT))
    online = hf.online.langevin(tau=0.05, seed=2)(loop, sgld_outer)
    state, samples = online.init(h, p0), []
    for m in range(B + M):
        res, state = online.step(state, h, torch.zeros(1, dtype=DT), None, m)
        samples.append(res.grads["lam"])
    offline = hf.langevin(B, M, tau=0.05, seed=2)(loop, sgld_outer)(h, p0, torch.zeros(1, dtype=DT), None)
    torch.testing.assert_close(torch.stack(samples[B:]).mean(), offline.grads["lam"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.params["theta"], offline.params["theta"])


@pytest.mark.parametrize("name", list(PAIRS))
def test_vmapped_step_equals_loop(name):
    quads = [Quadratic(seed=s, learned_init=False) for s in range(3)]
    loop, outer, hparams = quads[0].loop(), quads[0].outer, quads[0].hparams()
    online = PAIRS[name][0](loop, outer)
    params0 = torch.stack([td(w=q.w0) for q in quads])
    batches, ys = torch.stack([q.b for q in quads]), torch.stack([q.y for q in quads])
    init = torch.func.vmap(online.init, in_dims=(None, 0))
    step = torch.func.vmap(online.step, in_dims=(0, None, 0, 0, None))
    state = init(hparams, params0)
    singles = [online.init(hparams, params0[i]) for i in range(3)]
    for t in range(4):
        res, state = step(state, hparams, batches[:, t], ys, t)
        for i in range(3):
            single, singles[i] = online.step(singles[i], hparams, batches[i, t], ys[i], t)
            tree_close(res.grads[i], single.grads, rtol=1e-12, atol=1e-13)


def test_online_hyperparameter_optimization_with_torchopt():
    """HyperDistill's Algorithm 3 loop on the quadratic: λ updated at every inner step lowers the outer loss."""
    quad = Quadratic(learned_init=False, steps=40)
    loop, hparams = quad.loop(), quad.hparams()
    online = hf.online.distill(0.9, theta=1.0)(loop, quad.outer)
    meta = torchopt.adam(0.05)
    before = hf.first_order(loop, quad.outer)(hparams, td(w=quad.w0), quad.b[:1].expand(40, -1), quad.y).loss
    for _ in range(5):  # five inner optimizations, λ carried across them
        state, meta_state = online.init(hparams, td(w=quad.w0)), meta.init(hparams)
        for t in range(40):
            res, state = online.step(state, hparams, quad.b[0], quad.y, t)
            updates, meta_state = meta.update(res.grads, meta_state, params=hparams)
            hparams = torchopt.apply_updates(hparams, updates, inplace=False)
    after = hf.first_order(loop, quad.outer)(hparams, td(w=quad.w0), quad.b[:1].expand(40, -1), quad.y).loss
    assert after < 0.5 * before


def test_online_errors():
    quad = Quadratic(learned_init=True)
    loop, hparams = quad.loop(), quad.hparams()
    online = hf.online.one_step(loop, quad.outer)
    with pytest.raises(TypeError, match="params0 as a TensorDict"):
        online.init(hparams, quad.params0())
    state = online.init(hparams, td(w=quad.w0))
    with pytest.raises(ValueError, match="t must be >= 0"):
        online.step(state, hparams, quad.b[0], quad.y, -1)
    with pytest.raises(TypeError, match="t must be an integer"):
        online.step(state, hparams, quad.b[0], quad.y, 0.5)
    with pytest.raises(TypeError, match="OnlineState"):
        online.step(state.inner, hparams, quad.b[0], quad.y, 0)
    with pytest.raises(ValueError, match="gamma"):
        hf.online.greedy_accumulate(2.0)
    with pytest.raises(TypeError, match="theta"):
        hf.online.distill(0.5, theta=None)
    with pytest.raises(ValueError, match="tau"):
        hf.online.langevin(tau=-1.0)
    with pytest.raises(ValueError, match="plain SGD"):
        hf.online.langevin(tau=0.1)(loop, quad.outer)
