"""hyperfunc/optim/adam.py: adam against torch.optim.Adam trained in place, and a finite hypergradient at a
zero gradient."""

import pytest
import torch
from problems import DT, compare_with_torch_optim, td

import hyperfunc as hf


@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.1), dict(lr=0.01, betas=(0.8, 0.99)), dict(lr=0.05, eps=1e-3, weight_decay=0.1)],
)
def test_adam_matches_torch(kw):
    compare_with_torch_optim(hf.optim.adam(**kw), torch.optim.Adam, **kw)


def test_adam_zero_gradient_has_finite_hypergradient():
    # sqrt at v = 0 has an infinite derivative; Adam's update must still be differentiable there.
    opt = hf.optim.adam(lr=lambda h: h["lr"])
    state = opt.init(td(w=torch.ones(2, dtype=DT)))

    def f(lr):
        new = opt.update(state, td(w=torch.tensor([0.0, 1.0], dtype=DT)), td(lr=lr))
        return new["params", "w"].sum()

    g = torch.func.grad(f)(torch.tensor(0.1, dtype=DT))
    assert torch.isfinite(g) and abs(float(g) + 1.0) < 1e-6
