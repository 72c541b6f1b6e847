"""Bad input gets a clear ValueError/TypeError naming the argument."""

import pytest
import torch
from problems import DT, Quadratic, td

import hyperfunc as hf


@pytest.fixture
def quad():
    return Quadratic()


def test_batch_with_wrong_leading_dimension(quad):
    h, p0, b, y = quad.args()
    with pytest.raises(ValueError, match="inner_batches must have leading dimension steps=12"):
        hf.unroll(quad.loop(), quad.outer)(h, p0, b[:5], y)


def test_prepare_output_with_wrong_leading_dimension(quad):
    loop = hf.InnerLoop(quad.inner, hf.optim.sgd(lr=0.1), steps=quad.steps, prepare=lambda h, b: b[0])
    with pytest.raises(ValueError, match="output of prepare"):
        hf.unroll(loop, quad.outer)(*quad.args())


def test_non_scalar_inner_loss(quad):
    loop = hf.InnerLoop(lambda p, h, b: p["w"] * b, hf.optim.sgd(lr=0.1), steps=quad.steps)
    with pytest.raises(ValueError, match="inner_loss must return a scalar tensor, got \\(4,\\)"):
        hf.unroll(loop, quad.outer)(*quad.args())


def test_non_scalar_outer_loss(quad):
    with pytest.raises(ValueError, match="outer_loss must return a scalar"):
        hf.unroll(quad.loop(), lambda p, h, y: p["w"])(*quad.args())


@pytest.mark.parametrize("which", ["hparams", "params0"])
def test_inputs_must_be_tensordicts_of_floats(quad, which):
    h, p0, b, y = quad.args()
    hg = hf.unroll(quad.loop(), quad.outer)
    with pytest.raises(TypeError, match=f"{which} must be a (tensordict.)?TensorDict"):
        hg(*((dict(h), p0) if which == "hparams" else (h, {"w": p0["w"]})), b, y)
    bad = td(lam=torch.arange(3)) if which == "hparams" else td(w=torch.arange(4))
    with pytest.raises(TypeError, match=f"{which}\\['(lam|w)'\\] must be a floating-point tensor"):
        hg(*((bad, p0) if which == "hparams" else (h, bad)), b, y)


def test_params0_missing_a_key_the_loss_uses(quad):
    h, _, b, y = quad.args()
    with pytest.raises(ValueError, match="inner_loss looked up a key that is missing"):
        hf.unroll(quad.loop(), quad.outer)(h, td(v=torch.zeros(4, dtype=DT)), b, y)


def test_callable_hyperparameter_with_wrong_shape(quad):
    loop = hf.InnerLoop(quad.inner, hf.optim.sgd(lr=lambda h: h["lam"]), steps=quad.steps)
    with pytest.raises(ValueError, match="lr\\(hparams\\) returned a tensor of shape \\(3,\\)"):
        hf.forward(loop, quad.outer)(*quad.args())


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda q: hf.truncate(-1), ValueError, "K must be >= 0"),
        (lambda q: hf.truncate(2.5), TypeError, "K must be an integer"),
        (lambda q: hf.unroll(q.loop(), q.outer, checkpoint_every=0), ValueError, "checkpoint_every must be >= 1"),
        (lambda q: hf.InnerLoop(q.inner, hf.optim.sgd(lr=0.1), steps=0), ValueError, "steps must be an integer >= 1"),
        (
            lambda q: hf.InnerLoop(q.inner, torch.optim.SGD, steps=3),
            TypeError,
            "optimizer must be a hyperfunc.optim.Optimizer",
        ),
        (lambda q: hf.InnerLoop("loss", hf.optim.sgd(lr=0.1), steps=3), TypeError, "inner_loss must be a function"),
        (lambda q: hf.unroll("loop", q.outer), TypeError, "loop must be a hyperfunc.InnerLoop"),
        (lambda q: hf.forward(q.loop(), None), TypeError, "outer_loss must be a function"),
    ],
)
def test_bad_arguments(quad, make, error, match):
    with pytest.raises(error, match=match):
        make(quad)
