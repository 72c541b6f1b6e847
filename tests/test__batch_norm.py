"""hyperfunc/_batch_norm.py: batch normalization as elementary operations equals torch's kernel, and its
double backward runs under vmap (the derivative every hypergradient through BatchNorm takes)."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from hyperfunc._batch_norm import DecomposedBatchNorm, batch_norm

DT = torch.float64
CASES = {  # input shape, training, running statistics, affine
    "1d train": ((6, 3), True, True, True),
    "1d sequence train": ((4, 3, 5), True, True, False),
    "2d train": ((4, 3, 5, 5), True, True, True),
    "2d train, no running stats": ((4, 3, 5, 5), True, False, True),
    "3d train": ((2, 3, 2, 3, 4), True, True, True),
    "2d eval": ((4, 3, 5, 5), False, True, True),
}


def _args(shape, running, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=DT) * 3 + 1
    pair = (torch.randn(C, generator=g, dtype=DT), torch.rand(C, generator=g, dtype=DT) + 0.5)
    stats = pair if running else (None, None)
    w, b = (torch.randn(C, generator=g, dtype=DT), torch.randn(C, generator=g, dtype=DT)) if affine else (None, None)
    return x, stats, w, b


@pytest.mark.parametrize("case", list(CASES))
def test_equals_torch_kernel_with_its_running_statistics(case):
    shape, training, running, affine = CASES[case]
    x, (mean, var), w, b = _args(shape, running, affine)
    ours = tuple(None if t is None else t.clone() for t in (mean, var))
    theirs = tuple(None if t is None else t.clone() for t in (mean, var))
    out = batch_norm(x, *ours, w, b, training, 0.3, 1e-5)
    ref = F.batch_norm(x, *theirs, w, b, training, 0.3, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, r in zip(ours, theirs):
        if r is not None:
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_torch_kernel(case):
    shape, training, running, affine = CASES[case]
    x, (mean, var), w, b = _args(shape, running, affine)
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=DT)

    def loss(fn, x, w, b):
        stats = tuple(None if t is None else t.clone() for t in (mean, var))
        return (fn(x, *stats, w, b, training, 0.1, 1e-5) * probe).sum()

    argnums = (0, 1, 2) if affine else (0,)
    ours = torch.func.grad(lambda x, w, b: loss(batch_norm, x, w, b), argnums=argnums)(x, w, b)
    ref = torch.func.grad(lambda x, w, b: loss(F.batch_norm, x, w, b), argnums=argnums)(x, w, b)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_one_value_per_channel_is_refused_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.ones(1, 3, dtype=DT), None, None, training=True)


def _net(p, x):
    h = F.conv2d(x, p[0], p[1], padding=1)
    h = F.batch_norm(h, None, None, p[2], p[3], training=True)
    return F.linear(F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1), p[4], p[5])


_G = torch.Generator().manual_seed(0)
PARAMS = tuple(torch.randn(s, generator=_G, dtype=DT) for s in [(2, 1, 3, 3), (2,), (2,), (2,), (3, 2), (3,)])


def _pullback(x, y):
    """The VJP of one SGD step through conv -> batch norm (training) -> relu -> pool -> linear."""

    def step(p):
        g = torch.func.grad(lambda p: F.cross_entropy(_net(p, x), y))(p)
        return tuple(a - 0.1 * b for a, b in zip(p, g))

    out, pull = torch.func.vjp(step, PARAMS)
    return pull(tuple(torch.ones_like(o) for o in out))[0]


def test_double_backward_under_vmap_equals_a_loop_over_tasks():
    """vmap over tasks of a step's VJP: torch 2.14-2.15's kernel raises here; the elementary form runs, and
    equals the native kernel task by task (no vmap, which every version runs)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 6, 1, 5, 5, generator=g, dtype=DT), torch.randint(0, 3, (3, 6), generator=g)
    with DecomposedBatchNorm():
        batched = torch.func.vmap(_pullback)(x, y)
    looped = [_pullback(x[i], y[i]) for i in range(3)]
    for i, task in enumerate(looped):
        for a, r in zip(batched, task):
            torch.testing.assert_close(a[i], r, rtol=1e-10, atol=1e-12)


def test_the_mode_sends_batch_norm_to_torch_kernel_outside_vmap_only():
    """Outside vmap torch's kernel runs (faster, and it does not fail there); under vmap, at any depth, the
    elementary form."""
    x, _, w, b = _args((4, 3, 5, 5), True, True)

    def run(x):
        return F.batch_norm(x, None, None, w, b, True).pow(3).sum()

    with mock.patch("hyperfunc._batch_norm.batch_norm", wraps=batch_norm) as elementary, DecomposedBatchNorm():
        outside = torch.func.grad(run)(x)
        assert elementary.call_count == 0
        inside = torch.func.vmap(torch.func.grad(run))(x.unsqueeze(0))
        assert elementary.call_count == 1
    torch.testing.assert_close(inside[0], outside, rtol=1e-10, atol=1e-12)
