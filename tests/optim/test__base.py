"""hyperfunc/optim/_base.py: the optimizer protocol: pure updates, callable and per-parameter arguments,
argument checks."""

import pytest
import torch
from problems import DT, td, tree_close

import hyperfunc as hf


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


def test_update_refuses_a_gradient_that_would_broadcast():
    opt = hf.optim.sgd(lr=0.1)
    state = opt.init(td(w=torch.zeros(3)))
    with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(1,\) but state\['params'\]\['w'\] has \(3,\)"):
        opt.update(state, td(w=torch.ones(1)))
