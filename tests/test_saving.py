"""hyperfunc.saving: meta-training state through torch.save / torch.load(weights_only=True)."""

import numpy as np
import pytest
import torch
import torchopt
from tensordict import TensorDict

import hyperfunc as hf


def _state(value: float = 1.0):
    hparams = TensorDict({"body": {"w": torch.full((2, 3), value)}, "log_lr": torch.tensor(value)}, [])
    meta_opt = torchopt.adam(1e-3)
    meta_state = meta_opt.init(hparams)
    grads = hparams.apply(lambda x: x * 0 + value)
    _, meta_state = meta_opt.update(grads, meta_state, params=hparams)
    stream = torch.Generator().manual_seed(int(value))
    return {"hparams": hparams, "meta_state": meta_state, "iteration": 7, "stream": stream.get_state()}


def test_round_trip_through_weights_only_load(tmp_path):
    state = _state(2.0)
    torch.save(hf.to_state_dict(state), tmp_path / "ckpt.pt")
    loaded = hf.from_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True), like=_state(0.0))
    assert loaded["iteration"] == 7 and isinstance(loaded["iteration"], int)
    assert (loaded["hparams"] == state["hparams"]).all()
    for a, b in zip(
        torch.utils._pytree.tree_leaves(loaded["meta_state"]), torch.utils._pytree.tree_leaves(state["meta_state"])
    ):
        assert torch.equal(a, b) and a.dtype == b.dtype
    g = torch.Generator()
    g.set_state(loaded["stream"])
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(2)))


def test_to_state_dict_copies_and_does_not_alias():
    hparams = TensorDict({"w": torch.ones(2, requires_grad=True)}, [])
    saved = hf.to_state_dict(hparams)
    assert not saved["['w']"].requires_grad
    saved["['w']"].add_(1.0)
    assert torch.equal(hparams["w"].detach(), torch.ones(2))


@pytest.mark.parametrize(
    "state, like, match",
    [
        ({"['w']": torch.ones(2)}, {"w": torch.ones(2), "v": torch.ones(1)}, "missing"),
        ({"['w']": torch.ones(2), "['x']": torch.ones(1)}, {"w": torch.ones(2)}, "unexpected"),
        ({"['w']": torch.ones(3)}, {"w": torch.ones(2)}, r"saved as torch.float32 \(3,\)"),
        ({"['w']": torch.ones(2, dtype=torch.float64)}, {"w": torch.ones(2)}, "torch.float64"),
        ({"['w']": [1.0, 1.0]}, {"w": torch.ones(2)}, r"\['w'\] holds a list, not a tensor"),
    ],
)
def test_mismatches_are_named(state, like, match):
    with pytest.raises(ValueError, match=match):
        hf.from_state_dict(state, like)


def test_unsupported_leaves_are_refused():
    with pytest.raises(TypeError, match="only tensors and numbers"):
        hf.to_state_dict({"f": "text"})
    # a TensorDict's string entry is no pytree leaf: it was dropped on save and like's came back on load
    tagged = TensorDict({"w": torch.ones(2), "meta": {"name": "run 7"}}, [])
    for call in (lambda: hf.to_state_dict({"h": tagged}), lambda: hf.from_state_dict({}, like={"h": tagged})):
        with pytest.raises(TypeError, match=r"at \['h'\] holds a non-tensor entry \('meta', 'name'\)"):
            call()
    with pytest.raises(TypeError, match="state must be a dict"):
        hf.from_state_dict([torch.ones(1)], like=[torch.ones(1)])


@pytest.mark.parametrize(
    "value",
    [0.1, 1 / 3, 1e-300, 2**62 + 1, -7, True, np.float64(0.1), np.int64(5), np.float32(0.25)],
    ids=lambda v: f"{type(v).__name__}({v})",
)
def test_numbers_round_trip_exactly(value):
    """A float saved as float32 came back as 0.10000000149011612: resume is bit for bit only if it is exact."""
    like = {"x": type(value)(0)}
    back = hf.from_state_dict(hf.to_state_dict({"x": value}), like=like)["x"]
    assert type(back) is type(value) and back == value


@pytest.mark.parametrize(
    "saved, like",
    [({"x": torch.tensor(2.7, dtype=torch.float64)}, {"x": 0}), ({"x": torch.tensor(3)}, {"x": 0.0})],
)
def test_a_number_saved_with_another_type_is_refused(saved, like):
    """An int leaf saved as 2.7 loaded as 2 before."""
    key = "['x']"
    with pytest.raises(ValueError, match=r"\['x'\] is a Python .* saved as"):
        hf.from_state_dict({key: saved["x"]}, like=like)


def test_an_online_distill_state_round_trips_into_the_state_after_one_step():
    """online.init's state has no distilled batch yet; the state after one step on a batch of the same shape
    has the saved structure (docs/scale.md), and the resumed run continues bit for bit."""
    loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - h["c"] * x) ** 2).sum(), hf.optim.sgd(lr=0.1), steps=5)
    online = hf.online.distill(0.9, theta=1.0)(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
    hparams = TensorDict({"c": torch.tensor(0.7, dtype=torch.float64)}, [])
    params0 = TensorDict({"w": torch.zeros(2, dtype=torch.float64)}, [])
    xs, y = torch.randn(5, 4, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    state = online.init(hparams, params0)
    for t in range(3):
        _, state = online.step(state, hparams, xs[t], y, t)
    saved = hf.to_state_dict(state)
    with pytest.raises(ValueError, match="online distill holds its distilled batch"):
        hf.from_state_dict(saved, like=online.init(hparams, params0))
    like = online.step(online.init(hparams, params0), hparams, torch.zeros(4, 2, dtype=torch.float64), y, 0)[1]
    resumed = hf.from_state_dict(saved, like=like)
    for t in range(3, 5):
        a, state = online.step(state, hparams, xs[t], y, t)
        b, resumed = online.step(resumed, hparams, xs[t], y, t)
        assert torch.equal(a.grads["c"], b.grads["c"])
