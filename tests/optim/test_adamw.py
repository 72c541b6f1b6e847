"""hyperfunc/optim/adamw.py: adamw against torch.optim.AdamW trained in place (50 steps, float64), a
hyperparameter-dependent learning rate, and its declared capabilities."""

import pytest
import torch
from problems import DT, compare_with_torch_optim, td

import hyperfunc as hf


@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.1), dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.3), dict(lr=0.05, eps=1e-3, weight_decay=0.0)],
)
def test_adamw_matches_torch(kw):
    compare_with_torch_optim(hf.optim.adamw(**kw), torch.optim.AdamW, steps=50, **kw)


def test_adamw_lr_as_a_function_of_hparams_is_differentiable():
    """d w_1 / d lr of one step, by hand: w (1 - lr wd) - lr sign(g) (the first step's m/sqrt(v) is sign(g))."""
    opt = hf.optim.adamw(lr=lambda h: h["lr"], weight_decay=0.5, eps=0.0)
    state = opt.init(td(w=torch.tensor([1.0, 2.0], dtype=DT)))
    g = td(w=torch.tensor([3.0, -1.0], dtype=DT))
    grad = torch.func.grad(lambda lr: opt.update(state, g, td(lr=lr))["params", "w"].sum())(torch.tensor(0.1, dtype=DT))
    torch.testing.assert_close(grad, torch.tensor(-0.5 * 3.0 - (1.0 - 1.0), dtype=DT), rtol=1e-12, atol=1e-12)


def test_adamw_declares_a_non_stationary_preconditioned_step():
    """Decoupled decay: fixed points are not stationary points of L + wd/2 |w|^2, so implicit refuses it."""
    opt = hf.optim.adamw()
    assert not opt.stationary and opt.preconditioned
    loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum(), opt, steps=3, full_batch=True)
    with pytest.raises(ValueError, match="stationary"):
        hf.implicit("cg", 5)(loop, lambda p, h, x: (p["w"] ** 2).sum())
