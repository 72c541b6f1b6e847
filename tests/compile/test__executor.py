"""hyperfunc/compile/_executor.py: every transform on compiled kernels equals eager, one kernel per piece
and segment length, no recompilation across segments, calls and horizons; per-task hyperparameters,
buffers and learned initializations.

Compiled with dynamo's CompileCounter backend (the graphs inductor would receive, counted, without
inductor's C++ build). T = 7 with k = 3 covers a remainder segment (3+3+1).
"""

import dataclasses

import pytest
import torch
import torch._dynamo.testing
from problems import TRANSFORMS, anil, sinusoid_args, tree_close
from tensordict import TensorDict
from test_modules import conv_bn, data, learned_init, problem

import hyperfunc as hf

DT = torch.float64


T, K = 7, 3


IN_DIMS = (None, None, 0, 0)


def _counting(hg):
    """``(hg', runs)``: ``hg`` whose algorithm appends to ``runs`` each time its Python runs."""
    runs = []

    def algorithm(bound):
        runs.append(None)
        return hg.algorithm(bound)

    return dataclasses.replace(hg, algorithm=algorithm), runs


@pytest.mark.filterwarnings("ignore:implicit. w_T is not a stationary point")
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_compiled_segments_equal_eager_without_recompiling(name):
    """T > k: equal to eager, returned as vmap returns it, nothing compiled after the first call, whose
    algorithm runs twice (once for real, compiling the kernels, once traced as a program); later calls
    replay the program without running the algorithm's Python."""
    entry = TRANSFORMS[name]
    prob = anil(T, entry.momentum)
    hg = entry.make(T)(prob.loop, prob.outer_loss)
    counted, runs = _counting(hg)
    counter = torch._dynamo.testing.CompileCounter()
    fast = hf.compile(hf.vmap(counted, in_dims=IN_DIMS), segment=K, backend=counter, fullgraph=True)
    frames = []
    for seed in range(3):
        args = sinusoid_args(prob, seed)
        res, ref = fast(*args), torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
        assert type(res) is type(ref) and res.grads.batch_size == ref.grads.batch_size == (2,)
        tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
        tree_close(res.params, ref.params, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.loss, ref.loss, rtol=1e-10, atol=1e-12)
        frames.append(counter.frame_count)
    assert len(runs) == 2
    # one frame per kernel, a handful whatever T: unroll has the map and the VJP for k and the fused last
    # segment with the outer gradient, for the remainder (the shared w_0 of the first segment is expanded over
    # the tasks, so it uses the same kernels); distill with a fitted θ has the most, 7: its scan for k and the
    # remainder, the map for k and the remainder, DrMAD's one-step scan, the outer gradient and the distilled
    # VJP; plus prepare's map and VJP (forward mode pushes prepare forward itself). The first call compiles them
    # all (one eager run of prepare learns its output's layout); later calls compile nothing
    assert frames[0] <= 9 and frames[2] == frames[1] == frames[0], frames


@pytest.mark.filterwarnings("ignore:implicit. w_T is not a stationary point")
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_per_task_hyperparameters_and_initial_params(name):
    """in_dims = 0 for every argument: each task its own λ and w_0, by segments. (distill's running
    average starts as the state itself, one tensor in two kernel inputs: traced on one fake tensor, the
    two were one graph input, and a batched w_0 gave a wrong answer.)"""
    entry = TRANSFORMS[name]
    prob = anil(T, entry.momentum)
    hg = entry.make(T)(prob.loop, prob.outer_loss)
    h, w0, batches, val = sinusoid_args(prob, 0)
    args = (torch.stack([h, h.apply(lambda x: 1.1 * x)]), torch.stack([w0, 0.5 * w0]), batches, val)
    res = hf.compile(hf.vmap(hg, in_dims=0), segment=K, backend=torch._dynamo.testing.CompileCounter())(*args)
    ref = torch.func.vmap(hg, in_dims=0)(*args)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
    tree_close(res.params, ref.params, rtol=1e-10, atol=1e-12)


def test_compile_time_is_flat_in_T():
    """The kernels depend on k, not on T: T = 7 and T = 13 compile the same number of frames."""
    frames = []
    for steps in (7, 13):  # 13 = 4 * 3 + 1: the same two segment lengths
        prob = anil(steps)
        counter = torch._dynamo.testing.CompileCounter()
        fast = hf.compile(hf.vmap(hf.unroll(prob.loop, prob.outer_loss), in_dims=IN_DIMS), segment=K, backend=counter)
        fast(*sinusoid_args(prob, 0))
        frames.append(counter.frame_count)
    assert frames[0] == frames[1], frames


HORIZONS = {  # two horizons with the same segment lengths for K = 3 (7 = 3 + 3 + 1, 10 = 3 + 3 + 3 + 1)
    "unroll": (lambda steps: hf.unroll, 0.9),
    "drmad": (lambda steps: hf.drmad, 0.9),
    # burn-in and sampling are scanned apart: B = 3, 6 and M = 4 keep both scans' segment lengths
    "langevin": (lambda steps: hf.langevin(3 * (steps // 3) - 3, steps + 3 - 3 * (steps // 3), 1e-3, seed=0), 0.0),
    "distill": (lambda steps: hf.distill(0.9, theta=1.0), 0.9),
    "greedy": (lambda steps: hf.greedy_accumulate(0.9), 0.9),
    "forward": (lambda steps: hf.forward, 0.9),
}


@pytest.mark.parametrize("name", list(HORIZONS))
def test_kernels_do_not_depend_on_the_horizon(name):
    """Counts such as T (DrMAD's interpolation) or B and M (HPO-SGLD) enter the kernels as tensors: two
    horizons trace the same graphs, so another T hits the compile cache instead of compiling afresh."""
    make, momentum = HORIZONS[name]
    codes = []
    for steps in (7, 10):
        prob = anil(steps, momentum=momentum)
        graphs = []

        def backend(gm, inputs, graphs=graphs):
            graphs.append(gm.code)
            return gm.forward

        hg = make(steps)(prob.loop, prob.outer_loss)
        hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K, backend=backend)(*sinusoid_args(prob, 0))
        codes.append(sorted(graphs))
    assert len(codes[0]) >= 3 and codes[0] == codes[1]


LEARNED_INIT = {
    "unroll": (hf.unroll, True),
    "forward": (hf.forward, True),
    "drmad": (hf.drmad, True),
    "greedy_accumulate": (hf.greedy_accumulate(0.9), True),
    "langevin": (hf.langevin(1, 2, 1e-5, seed=0), False),  # HPO-SGLD: plain SGD
}


@pytest.mark.parametrize("name", list(LEARNED_INIT))
def test_compile_one_task_and_learned_init_with_buffers(name):
    """Without hf.vmap the kernels are compiled for one task; BatchNorm buffers and a learned w_0 go through
    (langevin's w_0 term holds a Hessian-vector product of the outer loss inside its scan kernel)."""
    transform, momentum = LEARNED_INIT[name]
    net = conv_bn()
    loop, outer, hparams, buffers = problem(net, steps=3)
    if not momentum:
        loop = dataclasses.replace(loop, optimizer=hf.optim.sgd(lr=0.05))
    batches, val = data(steps=3)
    hg = transform(loop, outer)
    counted, runs = _counting(hg)
    fast = hf.compile(counted, segment=2, backend=torch._dynamo.testing.CompileCounter(), fullgraph=True)
    ref = hg(hparams, learned_init, batches, val, buffers)
    for _ in range(2):  # the second call replays the program traced by the first
        res = fast(hparams, learned_init, batches, val, buffers)
        tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
        tree_close(res.buffers, ref.buffers, rtol=1e-12, atol=0)
    assert len(runs) == 2
    whole = hf.compile(hg, segment=3, backend="eager")  # T = 3 <= k: one kernel
    tree_close(whole(hparams, learned_init, batches, val, buffers).grads, ref.grads, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("segment", [1, 2, 4])  # T = 3: one-step segments, 2 + 1, or one whole-call kernel
@pytest.mark.parametrize("name", list(LEARNED_INIT))
def test_module_buffers_per_task_under_hf_vmap(name, segment):
    """BatchNorm's running statistics, one set per task, come out of the batched kernels as eager vmap
    returns them. (Traced with views replaced by copies they came back unchanged: batch norm's batching
    rule writes the statistics through a view.)"""
    transform, momentum = LEARNED_INIT[name]
    loop, outer, hparams, buffers = problem(conv_bn(), steps=3)
    if not momentum:
        loop = dataclasses.replace(loop, optimizer=hf.optim.sgd(lr=0.05))
    (x, y), (xv, yv) = data(steps=3)
    batches, val = (torch.stack([x, 1.1 * x]), torch.stack([y, y])), (torch.stack([xv, xv]), torch.stack([yv, yv]))
    args, in_dims = (hparams, learned_init, batches, val, torch.stack([buffers, buffers])), (None, None, 0, 0, 0)
    hg = transform(loop, outer)
    res = hf.compile(hf.vmap(hg, in_dims=in_dims), segment=segment, backend="eager")(*args)
    ref = torch.func.vmap(hg, in_dims=in_dims)(*args)
    assert not torch.equal(ref.buffers["1", "running_mean"], args[-1]["1", "running_mean"])
    tree_close(res.buffers, ref.buffers, rtol=1e-12, atol=1e-14)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("segment", [1, K])  # one-step segments: the outer loss by its own kernel
def test_per_step_batches_through_prepare(segment):
    """Per-step batches (not full-batch) whose floats come from ``prepare``: the segments' cotangents
    on their windows of the prepared batches are assembled and pulled back through ``prepare``."""

    def inner(p, h, batch):
        x, y = batch
        return ((x @ p["w"] - y) ** 2).mean() + h["l2"] * (p["w"] ** 2).sum()

    def prepare(h, batches):
        x, y = batches
        return torch.tanh(x * h["scale"]), y

    loop = hf.InnerLoop(inner, hf.optim.adam(lr=0.05), steps=T, prepare=prepare)
    hg = hf.truncate(5)(loop, lambda p, h, batch: ((batch[0] @ p["w"] - batch[1]) ** 2).mean())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, T, 4, 3, generator=g, dtype=DT), torch.randn(2, T, 4, generator=g, dtype=DT)
    val = (torch.randn(2, 6, 3, generator=g, dtype=DT), torch.randn(2, 6, generator=g, dtype=DT))
    h = TensorDict({"l2": torch.tensor(0.1, dtype=DT), "scale": torch.ones(3, dtype=DT)}, [])
    w0 = TensorDict({"w": torch.zeros(3, dtype=DT)}, [])
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=segment, backend="eager")
    res, ref = fast(h, w0, (x, y), val), torch.func.vmap(hg, in_dims=IN_DIMS)(h, w0, (x, y), val)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
