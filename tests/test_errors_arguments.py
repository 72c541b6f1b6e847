"""Bad arguments to the factories and optimizers: each a ValueError/TypeError naming the argument and the fix."""

import numpy as np
import pytest
import torch
from problems import Quadratic

import hyperfunc as hf

Q = Quadratic()
LOOP = Q.loop()


def _plain_lr(lr):
    return hf.InnerLoop(Q.inner, hf.optim.sgd(lr=lr), steps=3)


BAD = [
    # tensor-valued optimizer arguments get the range checks that numbers get
    (lambda: hf.optim.sgd(lr=torch.tensor(-0.1)), ValueError, r"lr must lie in \[0.0, inf\], got -0.1"),
    (lambda: hf.optim.adam(betas=(torch.tensor(1.0), 0.999)), ValueError, r"betas\[0\] must lie in \[0.0, 1.0\)"),
    (lambda: hf.optim.sgd(lr=torch.tensor(float("nan"))), ValueError, "lr must lie in"),
    (lambda: hf.optim.sgd(lr=torch.tensor(1)), ValueError, "lr must be a floating-point scalar tensor"),
    # non-finite or out-of-range transform arguments
    (lambda: hf.distill(0.5, theta=float("nan")), ValueError, "theta must be a finite number"),
    (lambda: hf.distill(0.5, theta=torch.tensor(float("inf"))), ValueError, "theta must be finite"),
    (lambda: hf.online.distill(0.5, theta=None), TypeError, "theta must be a finite number or a scalar tensor here"),
    (lambda: hf.implicit("cg", 5, damping=float("nan")), ValueError, "damping must be a finite number >= 0"),
    (lambda: hf.implicit("neumann", 5, alpha=float("inf")), ValueError, "alpha must be a finite number > 0"),
    (lambda: hf.implicit("neumann", 5, alpha=0.0), ValueError, "alpha must be a finite number > 0"),
    (lambda: hf.implicit("neumann", 5)(_plain_lr(0.0), Q.outer), ValueError, "a zero step gives an all-zero"),
    (lambda: hf.langevin(2, 2, tau=float("inf")), ValueError, "tau must be a finite number >= 0"),
    (lambda: hf.linalg.cg(lambda v: v, torch.ones(2), iters=-1), ValueError, "iters must be >= 1"),
    (lambda: hf.linalg.neumann(lambda v: v, torch.ones(2), iters=3, alpha=-1.0), ValueError, "alpha must be"),
    (lambda: hf.InnerLoop(Q.inner, hf.optim.sgd(lr=0.1), steps=3, full_batch="no"), TypeError, "full_batch must be"),
    # seeds: every bit counts, so out-of-range seeds are refused instead of wrapped
    (lambda: hf.optim.sgld(lr=0.1, seed=2**64), ValueError, r"seed must lie in \[0, 2\*\*63\)"),
    (lambda: hf.optim.sgld(lr=0.1, seed=-1), ValueError, r"seed must lie in \[0, 2\*\*63\)"),
    (lambda: hf.distill(0.5, seed=2**63), ValueError, "seed must lie in"),
    # a factory used as a transform names the call form
    (lambda: hf.truncate(LOOP, Q.outer), TypeError, None),
    (lambda: hf.truncate(LOOP), TypeError, r"call it as hf.truncate\(K\)\(loop, outer_loss\)"),
    (lambda: hf.greedy_accumulate(LOOP), TypeError, r"hf.greedy_accumulate\(gamma\)\(loop, outer_loss\)"),
    (lambda: hf.distill(LOOP), TypeError, r"hf.distill\(gamma\)\(loop, outer_loss\)"),
    (lambda: hf.compare(hf.truncate)(LOOP, Q.outer), TypeError, r"hf.compare\(hf.truncate\(K\)\)"),
    (lambda: hf.fomaml(3), TypeError, "fomaml takes a transform"),
    (lambda: hf.fomaml(hf.compare(hf.one_step))(LOOP, Q.outer), TypeError, "fomaml needs a hyperfunc transform"),
]


@pytest.mark.parametrize("make, error, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


GOOD = [
    # numpy scalars are numbers
    lambda: hf.langevin(2, 2, tau=np.float32(0.1)),
    lambda: hf.implicit("cg", 5, damping=np.float64(0.1)),
    lambda: hf.distill(0.5, theta=np.float32(1.5)),
    lambda: hf.optim.sgld(lr=0.1, seed=2**63 - 1),
]


@pytest.mark.parametrize("make", GOOD, ids=[str(i) for i in range(len(GOOD))])
def test_accepted_edge_case(make):
    make()


@pytest.mark.parametrize("kw", [dict(n_tasks=2.5), dict(n_tasks=3, shots=0), dict(n_tasks=3, val_shots=True)])
def test_sinusoid_tasks_names_a_bad_count(kw):
    """2.5 failed inside torch.rand."""
    with pytest.raises((TypeError, ValueError), match=r"(n_tasks|shots|val_shots) must be"):
        hf.tasks.sinusoid_tasks(**kw)
