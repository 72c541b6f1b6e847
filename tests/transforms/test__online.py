"""Online state is checked, not trusted: step index, method, hyperparameter keys."""

import pytest
import torch
from problems import DT, Quadratic, td
from tensordict import TensorDict

import hyperfunc as hf

Q = Quadratic()
METHODS = {
    "one_step": hf.online.one_step,
    "greedy": hf.online.greedy_accumulate(0.5),
    "forward": hf.online.forward,
    "distill": hf.online.distill(0.5, theta=1.0),
}


def _started(name, steps=2):
    opt = METHODS[name](Q.loop(), Q.outer)
    state = opt.init(Q.hparams(), td(w=Q.w0))
    for t in range(steps):
        _, state = opt.step(state, Q.hparams(), Q.b[t], Q.y, t)
    return opt, state


@pytest.mark.parametrize("name", list(METHODS))
def test_restarting_t_is_refused(name):
    opt, state = _started(name)
    with pytest.raises(ValueError, match="t=0, but this state has taken 2 inner steps"):
        opt.step(state, Q.hparams(), Q.b[2], Q.y, 0)


@pytest.mark.parametrize("giver, taker", [("forward", "greedy"), ("greedy", "forward"), ("forward", "distill")])
def test_another_methods_state_is_refused(giver, taker):
    _, state = _started(giver)
    with pytest.raises(TypeError, match="state.extra is not the running state of"):
        METHODS[taker](Q.loop(), Q.outer).step(state, Q.hparams(), Q.b[2], Q.y, 2)


def test_renamed_hyperparameter_is_refused_not_paired_by_position():
    opt, state = _started("greedy")
    renamed = TensorDict({"mu": Q.lam.clone()}, [])
    loop = hf.InnerLoop(lambda p, h, b: Q.inner(p, TensorDict({"lam": h["mu"]}, []), b), hf.optim.sgd(lr=0.1), 12)
    with pytest.raises(ValueError, match=r"state.extra \(the accumulator\) must have the same keys as hparams"):
        hf.online.greedy_accumulate(0.5)(loop, Q.outer).step(state, renamed, Q.b[2], Q.y, 2)


def test_online_with_buffers_vmaps():
    def inner(p, h, b, buffers):
        return Q.inner(p, h, b), buffers.apply(lambda x: x + 1)

    def outer(p, h, y, buffers):
        return Q.outer(p, h, y), buffers

    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1), steps=3)
    opt = hf.online.one_step(loop, outer)
    buffers = torch.stack([td(count=torch.zeros((), dtype=DT))] * 2)
    params0 = torch.stack([td(w=Q.w0)] * 2)
    state = torch.func.vmap(opt.init, in_dims=(None, 0, 0))(Q.hparams(), params0, buffers)
    for t in range(3):
        step = torch.func.vmap(lambda s, b: opt.step(s, Q.hparams(), b, Q.y, t), in_dims=(0, None))
        _, state = step(state, Q.b[t])
    torch.testing.assert_close(state.buffers["count"], torch.full((2,), 3.0, dtype=DT))
