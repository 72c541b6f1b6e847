"""Bad or edge-case inputs to a hypergradient call: named errors, or the correct result."""

import pytest
import torch
from problems import DT, Quadratic, td, tree_close
from tensordict import TensorDict

import hyperfunc as hf

Q = Quadratic()


def _call(transform=hf.unroll, loop=None, args=None):
    return transform(loop or Q.loop(), Q.outer)(*(args or Q.args()))


def _with(**changes):
    h, p0, b, y = Q.args()
    values = {"h": h, "p0": p0, "b": b, "y": y, **changes}
    return values["h"], values["p0"], values["b"], values["y"]


BAD = [
    (
        "empty hparams, forward",
        lambda: _call(hf.forward, args=_with(h=TensorDict({}, []))),
        ValueError,
        "hparams is empty",
    ),
    (
        "empty hparams, distill",
        lambda: _call(hf.distill(0.5, theta=1.0), args=_with(h=TensorDict({}, []))),
        ValueError,
        "hparams is empty",
    ),
    (
        "lr callable reads a missing key",
        lambda: _call(loop=hf.InnerLoop(Q.inner, hf.optim.sgd(lr=lambda h: h["lr"]), steps=Q.steps)),
        ValueError,
        r"optimizer argument 'lr' read a key that hparams lacks: .*lr.*hparams has keys \['lam'\]",
    ),
    (
        "prepare reads a missing key",
        lambda: _call(loop=hf.InnerLoop(Q.inner, hf.optim.sgd(lr=0.1), steps=Q.steps, prepare=lambda h, b: b * h["s"])),
        ValueError,
        "prepare read a key that hparams lacks",
    ),
    (
        "integer loss",
        lambda: _call(loop=hf.InnerLoop(lambda p, h, b: (p["w"] > 0).sum(), hf.optim.sgd(lr=0.1), steps=Q.steps)),
        ValueError,
        "inner_loss must return a floating-point scalar",
    ),
    (
        "from_module output as params0",
        lambda: _call(args=_with(p0=TensorDict({"w": torch.zeros(4, dtype=DT), "n": torch.tensor(0)}, []))),
        TypeError,
        r"hf.module_state\(net\)",
    ),
    (
        "buffers that are not a TensorDict",
        lambda: hf.unroll(Q.loop(), Q.outer)(*Q.args(), buffers={"a": 1}),
        TypeError,
        "buffers must be None or a TensorDict",
    ),
    (
        "loss ignores the buffers contract",
        lambda: hf.unroll(Q.loop(), Q.outer)(*Q.args(), buffers=td(a=torch.zeros(1, dtype=DT))),
        TypeError,
        r"buffers were given, so inner_loss is called as inner_loss\(params, hparams, batch, buffers\)",
    ),
    ("empty params0", lambda: _call(args=_with(p0=TensorDict({}, []))), ValueError, "params0 is empty"),
    (
        "zero-element hyperparameter, forward",
        lambda: _call(hf.forward, args=_with(h=td(lam=torch.ones(3, dtype=DT), z=torch.zeros(0, dtype=DT)))),
        ValueError,
        r"hparams\['z'\] has no elements \(shape \(0,\)\)",
    ),
    (
        "params0 reads a missing key",
        lambda: _call(args=_with(p0=lambda h: td(w=h["init"]))),
        ValueError,
        r"params0\(hparams\) read a key that hparams lacks: .*init.*hparams has keys \['lam'\]",
    ),
    (
        "a transform factory given to fomaml",
        lambda: hf.fomaml(hf.truncate),
        TypeError,
        r"fomaml takes a transform, .* truncate takes its options: .* hf.fomaml\(hf.truncate\(...\)\)",
    ),
    (
        "a transform factory given to reptile",
        lambda: hf.reptile(hf.distill),
        TypeError,
        r"hf.reptile\(hf.distill\(...\)\)",
    ),
]


@pytest.mark.parametrize("name, make, error, match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_hparams_and_params_on_different_devices():
    meta = TensorDict({"lam": torch.zeros(3, dtype=DT, device="meta")}, [])
    with pytest.raises(ValueError, match="hparams and params0 must be on one device"):
        _call(args=_with(h=meta))


@pytest.mark.parametrize("transform", [hf.unroll, hf.truncate(3), hf.forward, hf.greedy_accumulate(0.5), hf.drmad])
def test_batches_that_require_grad_leave_no_graph(transform):
    """Inputs are detached: nothing returned carries a graph into the user's tensors."""
    h, p0, b, y = Q.args()
    b, y = b.clone().requires_grad_(), y.clone().requires_grad_()
    res = transform(Q.loop(), Q.outer)(h, p0, b, y)
    for x in [res.loss, *res.grads.values(True, True), *res.params.values(True, True)]:
        assert x.grad_fn is None and not x.requires_grad


def test_tensor_optimizer_argument_that_requires_grad_leaves_no_graph():
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    res = _call(loop=hf.InnerLoop(Q.inner, hf.optim.sgd(lr=lr, momentum=0.7, weight_decay=0.05), steps=Q.steps))
    assert res.params["w"].grad_fn is None
    tree_close(res.grads, _call().grads)


@pytest.mark.filterwarnings("ignore:implicit. w_T is not a stationary point")
@pytest.mark.parametrize(
    "transform", [hf.unroll, hf.forward, hf.one_step, hf.greedy_accumulate(0.5), hf.drmad, hf.implicit("cg", 3)]
)
def test_grads_have_the_dtype_of_hparams(transform):
    """Mixed precision losses do not leak their dtype into the hypergradient (forward returned float64 before)."""
    h = TensorDict({"lam": Q.lam.float()}, [])
    p0 = td(w=Q.w0.float())

    def outer(p, hp, y):  # evaluated in float64
        return 0.5 * ((Q.P @ p["w"].double() - y) ** 2).sum()

    loop = hf.InnerLoop(
        lambda p, hp, b: 0.5 * p["w"] @ Q.Q.float() @ p["w"] - p["w"] @ (b.float() + Q.C.float() @ hp["lam"]),
        hf.optim.sgd(lr=0.1),
        steps=4,
    )
    res = transform(loop, outer)(h, p0, Q.b[:4], Q.y)
    assert res.grads["lam"].dtype == torch.float32
    assert res.params["w"].dtype == torch.float32


def test_float64_per_parameter_lr_keeps_float32_params():
    lr = lambda hp: TensorDict({"w": torch.full((4,), 0.1, dtype=DT)}, [])
    opt = hf.optim.sgd(lr=lr)
    state = opt.update(opt.init(td(w=torch.ones(4))), td(w=torch.ones(4)), TensorDict({}, []))
    assert state["params", "w"].dtype == torch.float32
    torch.testing.assert_close(state["params", "w"], torch.full((4,), 0.9))


def test_passing_empty_buffers_back_means_no_buffers():
    res = _call()
    again = hf.unroll(Q.loop(), Q.outer)(*Q.args(), buffers=res.buffers)
    assert res.buffers == () and again.buffers == ()
    tree_close(again.grads, res.grads, rtol=0, atol=0)
