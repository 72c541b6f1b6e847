"""The contract every transform keeps, run table-driven on a Conv-BatchNorm net (float64) with a
learned initialization and module buffers: a transform that drops the w_0 term, mis-carries the
buffers or breaks vmap fails here."""

import pytest
import torch
from problems import DT, LANGEVIN_SEED, LANGEVIN_TAU, tree_close
from problems import TRANSFORMS as REGISTRY
from tensordict import TensorDict
from test_modules import conv_bn, data, losses

import hyperfunc as hf

T = 3
# every transform of the registry: those whose formula has a w_0 term alone, the others under hf.fomaml / hf.reptile
EXACT_INIT = {name: entry.make(T) for name, entry in REGISTRY.items() if entry.exact_init}
NO_INIT = {name: entry.make(T) for name, entry in REGISTRY.items() if not entry.exact_init}
TRANSFORMS = {
    **EXACT_INIT,
    **{f"fomaml({k})": hf.fomaml(v) for k, v in NO_INIT.items()},
    "reptile(distill)": hf.reptile(NO_INIT["distill"]),
}


def _setup(name, scaled=False):
    net = conv_bn()
    inner, outer = losses(net)
    momentum = REGISTRY[name].momentum if name in REGISTRY else 0.9
    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1, momentum=momentum), steps=T)
    params, buffers = hf.module_state(net)
    hparams = TensorDict({"log_l2": torch.tensor(-3.0, dtype=DT), "init": params}, [])
    if scaled:  # params0 = scale * init at scale = 1: the same point, one more hyperparameter
        hparams["scale"] = torch.tensor(1.0, dtype=DT)
        return loop, outer, hparams, buffers, lambda h: h["init"].apply(lambda x: h["scale"] * x)
    return loop, outer, hparams, buffers, lambda h: h["init"]


@pytest.mark.parametrize("name", list(NO_INIT))
def test_no_silent_zero_for_a_learned_init(name):
    loop, outer, hparams, buffers, params0 = _setup(name)
    with pytest.raises(ValueError, match="has no term through a learned initialization.*hf.fomaml"):
        NO_INIT[name](loop, outer)(hparams, params0, *data(steps=T), buffers=buffers)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_init_term_buffers_and_chain_rule(name):
    loop, outer, hparams, buffers, params0 = _setup(name)
    batches, val = data(steps=T)
    res = TRANSFORMS[name](loop, outer)(hparams, params0, batches, val, buffers=buffers)
    # the init term is there (no loss reads the init directly, so it all comes through w_0)
    init_grads = torch.cat([x.flatten() for x in res.grads["init"].values(True, True)])
    assert torch.isfinite(init_grads).all() and init_grads.abs().sum() > 1e-6
    # buffers: carried through the T inner steps exactly as plain training carries them
    plain = loop
    if name == "langevin":
        plain = hf.InnerLoop(
            loop.inner_loss, hf.optim.sgld(lr=0.1, temperature=LANGEVIN_TAU, seed=LANGEVIN_SEED), steps=T
        )
    w, b = plain.run(hparams, params0, batches, buffers)
    tree_close(res.params, w, rtol=1e-12, atol=1e-14)
    tree_close(res.buffers, b, rtol=1e-12, atol=1e-14)
    assert not any(x.requires_grad for x in res.buffers.values(True, True))
    # chain rule through params0: d/d(scale) = <d/d(init), init> at scale = 1
    loop, outer, hparams2, buffers, params0 = _setup(name, scaled=True)
    res2 = TRANSFORMS[name](loop, outer)(hparams2, params0, batches, val, buffers=buffers)
    tree_close(res2.grads["init"], res.grads["init"], rtol=1e-9, atol=1e-12)
    init = hparams["init"]
    inner_product = sum((res.grads["init"].get(k) * init.get(k)).sum() for k in init.keys(True, True))
    torch.testing.assert_close(res2.grads["scale"], inner_product, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_vmapped_and_chunked_equal_looped_with_learned_init_and_buffers(name):
    loop, outer, hparams, buffers, params0 = _setup(name)
    tasks = [data(seed, steps=T) for seed in range(3)]
    stack = lambda i, j: torch.stack([t[i][j] for t in tasks])
    args = (hparams, params0, (stack(0, 0), stack(0, 1)), (stack(1, 0), stack(1, 1)), torch.stack([buffers] * 3))
    hg = TRANSFORMS[name](loop, outer)
    in_dims = (None, None, 0, 0, 0)
    batched = torch.func.vmap(hg, in_dims=in_dims)(*args)
    chunked = torch.func.vmap(hg, in_dims=in_dims, chunk_size=2)(*args)  # the memory trade of docs/scale.md
    tree_close(chunked.grads, batched.grads, rtol=1e-12, atol=1e-14)
    tree_close(chunked.buffers, batched.buffers, rtol=1e-12, atol=1e-14)
    for i, (b, v) in enumerate(tasks):
        single = hg(hparams, params0, b, v, buffers=buffers)
        tree_close(batched.grads[i], single.grads, rtol=1e-9, atol=1e-11)
        tree_close(batched.buffers[i], single.buffers, rtol=1e-12, atol=1e-14)


ONLINE = {name: (entry.online(), entry.make(T)) for name, entry in REGISTRY.items() if entry.online}


@pytest.mark.parametrize("name", list(ONLINE))
def test_online_with_buffers_ends_at_the_offline_result(name):
    loop, outer, hparams, buffers, _ = _setup(name)
    params0 = hparams["init"]
    hparams = hparams.exclude("init")
    batches, val = data(steps=T)
    online, offline = ONLINE[name]
    opt = online(loop, outer)
    state = opt.init(hparams, params0, buffers)
    for t in range(T):
        res, state = opt.step(state, hparams, (batches[0][t], batches[1][t]), val, t)
    expected = offline(loop, outer)(hparams, params0, batches, val, buffers=buffers)
    tree_close(res.grads, expected.grads, rtol=1e-10, atol=1e-12)
    tree_close(state.buffers, expected.buffers, rtol=1e-12, atol=1e-14)
    tree_close(res.buffers, expected.buffers, rtol=1e-12, atol=1e-14)
