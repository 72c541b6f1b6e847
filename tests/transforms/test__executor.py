"""hyperfunc/transforms/_executor.py: the executor interface is every operation an algorithm needs; a
transform runs on any executor that implements it, and on EAGER gives the closed form."""

import dataclasses

import pytest
import torch
from problems import Quadratic, tree_close

import hyperfunc as hf
from hyperfunc.transforms._executor import EAGER, Eager

INTERFACE = {"prepare", "run", "run_vjp", "run_outer_vjp", "run_jvp", "outer_vjp", "scan_blocks", "piece", "call"}


class Recording(Eager):
    """EAGER, recording the name of every operation called on it."""

    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        if name in INTERFACE:
            object.__getattribute__(self, "calls").append(name)
        return object.__getattribute__(self, name)


TRANSFORMS = {
    "unroll": hf.unroll,
    "truncate(3)": hf.truncate(3),
    "forward": hf.forward,
    "drmad": hf.drmad,
    "greedy_accumulate": hf.greedy_accumulate(0.5),
    "implicit": hf.implicit("cg", iters=4),
    "distill": hf.distill(0.9, theta=1.0),
}


@pytest.mark.filterwarnings("ignore:implicit. w_T is not a stationary point")
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_transform_reaches_the_steps_only_through_its_executor(name):
    q = Quadratic()
    hg = TRANSFORMS[name](q.loop(), q.outer)
    recording = Recording()
    res = dataclasses.replace(hg, executor=recording)(*q.args())
    tree_close(res.grads, hg(*q.args()).grads, rtol=0, atol=0)  # the same operations, in the same order
    assert recording.calls[0] == "call" and set(recording.calls) <= INTERFACE
    assert {"run", "run_vjp", "run_outer_vjp", "run_jvp", "scan_blocks"} & set(recording.calls), recording.calls


def test_eager_unroll_is_the_closed_form():
    q = Quadratic()
    hg = hf.unroll(q.loop(), q.outer)
    assert hg.executor is EAGER
    torch.testing.assert_close(hg(*q.args()).grads["lam"], q.exact(), rtol=1e-9, atol=1e-11)


def test_one_step_graph_is_measured_once_per_input_structure(monkeypatch):
    """The default segment's measurement runs on a structure's first call only: again for another vmap
    batch size, never for a repeated one; the hypergradient does not depend on it."""
    measured = []

    class Counting(hf.transforms._executor.PeakBytes):
        def __enter__(self):
            measured.append(1)
            return super().__enter__()

    monkeypatch.setattr(hf.transforms._executor, "PeakBytes", Counting)
    q = Quadratic()
    hg = hf.unroll(q.loop(), q.outer)
    h, p0, batches, y = q.args()
    first = hg(h, p0, batches, y)
    assert len(measured) == 1 and len(hg.step_bytes) == 1
    tree_close(hg(h, p0, batches, y).grads, first.grads, rtol=0, atol=0)
    assert len(measured) == 1
    for tasks in (2, 3, 2):  # a vmap batch size is part of the structure
        out = torch.func.vmap(hg, in_dims=(None, None, 0, 0))(h, p0, batches.expand(tasks, -1, -1), y.expand(tasks, -1))
        tree_close(out.grads[1], first.grads, rtol=1e-12, atol=1e-14)
    assert len(measured) == 3 and len(hg.step_bytes) == 3
    monkeypatch.setattr(hf.transforms._executor, "MEASURED_STRUCTURES", 3)
    torch.func.vmap(hg, in_dims=(None, None, 0, 0))(h, p0, batches.expand(4, -1, -1), y.expand(4, -1))
    assert len(measured) == 4 and len(hg.step_bytes) == 3  # the oldest structure (no vmap) was dropped
    hg(h, p0, batches, y)
    assert len(measured) == 5
