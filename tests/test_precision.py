"""hf.mixed_precision: losses in bfloat16, optimizer state and hypergradients in float32.

Tolerances measured on ANIL sinusoids (T = 30, hidden 100, 8 tasks; docs/scale.md): per-task cosine
>= 0.991 and relative error <= 13% for every transform below; the meta-batch mean (what the
meta-optimizer sees) cosine >= 0.9955, relative error <= 9.5%.
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import hyperfunc as hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from transforms import lr_wd_problem  # noqa: E402

TRANSFORMS = {
    "unroll": (hf.unroll, hf.tasks.anil_sinusoid),
    "truncate(5)": (hf.truncate(5), hf.tasks.anil_sinusoid),
    "implicit_cg": (hf.implicit("cg", 10, damping=0.1), hf.tasks.anil_sinusoid),
    "drmad": (hf.drmad, hf.tasks.anil_sinusoid),
    "forward": (hf.forward, lr_wd_problem),
}


def _flat(td):
    return torch.cat([x.flatten().double() for x in td.values(True, True)])


def _agreement(a, b):
    a, b = _flat(a), _flat(b)
    return (a @ b / (a.norm() * b.norm())).item(), ((a - b).norm() / b.norm()).item()


def _low(loop, outer):
    prepare = loop.prepare and hf.mixed_precision(loop.prepare)
    return dataclasses.replace(loop, inner_loss=hf.mixed_precision(loop.inner_loss), prepare=prepare), (
        hf.mixed_precision(outer)
    )


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_bf16_losses_agree_with_float32_within_the_measured_tolerance(name):
    transform, make = TRANSFORMS[name]
    problem = make(30)
    tasks = hf.tasks.sinusoid_tasks(8, generator=torch.Generator().manual_seed(0))
    args = (problem.hparams, problem.params0, tasks.inner_batches, tasks.outer_batch)
    in_dims = (None, None, 0, 0)
    f32 = torch.func.vmap(transform(problem.loop, problem.outer_loss), in_dims=in_dims)(*args)
    b16 = torch.func.vmap(transform(*_low(problem.loop, problem.outer_loss)), in_dims=in_dims)(*args)
    # everything but the loss evaluations stays float32
    assert all(x.dtype == torch.float32 for x in b16.grads.values(True, True))
    assert all(x.dtype == torch.float32 for x in b16.params.values(True, True))
    assert b16.loss.dtype == torch.float32
    cosine, error = _agreement(b16.grads.mean(0), f32.grads.mean(0))
    assert cosine >= 0.99 and error <= 0.12, (cosine, error)
    for i in range(8):
        cosine, error = _agreement(b16.grads[i], f32.grads[i])
        assert cosine >= 0.985 and error <= 0.17, (i, cosine, error)
    assert error > 1e-4  # bfloat16 did run: float32 would agree to ~1e-6


def test_conv_bn_buffers_come_back_in_float32():
    from tensordict import TensorDict
    from test_modules import conv_bn, data, losses

    net = conv_bn().float()
    inner, outer = losses(net)
    params, buffers = hf.module_state(net)
    hparams = TensorDict({"log_l2": torch.tensor(-3.0), "init": params}, [])
    batches, val = torch.utils._pytree.tree_map(lambda x: x.float() if x.is_floating_point() else x, data(steps=3))

    def hypergradient(inner, outer):
        loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1, momentum=0.9), steps=3)
        return hf.unroll(loop, outer)(hparams, lambda h: h["init"], batches, val, buffers=buffers)

    res = hypergradient(hf.mixed_precision(inner), hf.mixed_precision(outer))
    ref = hypergradient(inner, outer)
    for key, value in res.buffers.items(True, True):
        assert value.dtype == buffers.get(key).dtype
    assert all(x.dtype == torch.float32 for x in res.grads.values(True, True))
    cosine, error = _agreement(res.grads, ref.grads)
    assert cosine > 0.99 and 1e-4 < error < 0.15, (cosine, error)


def test_mixed_precision_errors():
    with pytest.raises(TypeError, match="fn must be callable"):
        hf.mixed_precision(3)
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        hf.mixed_precision(lambda p: p, dtype=torch.float64)
    with pytest.raises(TypeError, match="no floating-point tensor"):
        hf.mixed_precision(lambda p: p)(torch.ones(2, dtype=torch.int64))


def test_float64_masters_are_refused_instead_of_silently_ignored():
    """autocast skips float64: the wrapped loss would run in float64 and report nothing."""
    loss = hf.mixed_precision(lambda p, h, x: (p["w"] * x).sum())
    with pytest.raises(ValueError, match="master precision .* is float64"):
        loss({"w": torch.ones(2, dtype=torch.float64)}, {}, torch.ones(2, dtype=torch.float64))
