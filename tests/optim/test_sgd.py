"""hyperfunc/optim/sgd.py: sgd against torch.optim.SGD trained in place."""

import pytest
import torch
from problems import compare_with_torch_optim

import hyperfunc as hf


@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, dampening=0.3),
        dict(lr=0.05, momentum=0.9, nesterov=True),
        dict(lr=0.05, momentum=0.5, weight_decay=0.1),
        dict(lr=0.05, momentum=0.5, dampening=0.2, weight_decay=0.1),
    ],
)
def test_sgd_matches_torch(kw):
    compare_with_torch_optim(hf.optim.sgd(**kw), torch.optim.SGD, **kw)
