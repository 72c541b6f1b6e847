"""hyperfunc/optim/sgld.py: sgld: reproducible Gaussian noise, and gradient descent at zero temperature."""

import torch
from problems import DT, td, tree_close

import hyperfunc as hf


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


def test_sgld_zero_temperature_is_gradient_descent():
    opt = hf.optim.sgld(lr=0.1, temperature=0.0)
    out = opt.update(opt.init(td(w=torch.ones(3, dtype=DT))), td(w=torch.ones(3, dtype=DT)))
    torch.testing.assert_close(out["params", "w"], torch.full((3,), 0.9, dtype=DT))
