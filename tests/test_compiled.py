"""hf.vmap and hf.compile(segment=k): equal to eager, one kernel per piece and segment length, no
recompilation across segments and calls.

Compiled with dynamo's CompileCounter backend (the graphs inductor would receive, counted, without
inductor's C++ build) except one inductor test. T = 7 with k = 3 covers a remainder segment (3+3+1).
"""

import dataclasses

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from problems import sinusoid_args, tree_close
from tensordict import TensorDict
from test_modules import conv_bn, data, learned_init, problem

import hyperfunc as hf
from hyperfunc.transforms.base import InitTerm, Outcome, make_transform

DT = torch.float64
T, K = 7, 3
IN_DIMS = (None, None, 0, 0)


def _anil(steps, momentum=0.9, dtype=DT):
    return hf.tasks.anil_sinusoid(steps=steps, hidden=8, momentum=momentum, dtype=dtype)


SEGMENTED = {
    "unroll": (hf.unroll, 0.9),
    "truncate(4)": (hf.truncate(4), 0.9),
    "one_step": (hf.one_step, 0.9),
    "first_order": (hf.first_order, 0.9),
    "drmad": (hf.drmad, 0.9),
    "greedy_accumulate": (hf.greedy_accumulate(0.9), 0.9),
    "langevin": (hf.langevin(3, 4, 1e-5, seed=0), 0.0),
    "forward": (hf.forward, 0.9),
    "implicit(neumann)": (hf.implicit("neumann", 3), 0.9),
    "implicit(cg)": (hf.implicit("cg", 3, damping=1.0), 0.9),
    "distill(theta=1)": (hf.distill(0.9, theta=1.0), 0.9),
    "distill(fitted)": (hf.distill(0.9), 0.9),
}


def _counting(hg):
    """``(hg', runs)``: ``hg`` whose algorithm appends to ``runs`` each time its Python runs."""
    runs = []

    def algorithm(bound):
        runs.append(None)
        return hg.algorithm(bound)

    return dataclasses.replace(hg, algorithm=algorithm), runs


@pytest.mark.filterwarnings("ignore:implicit. w_T is not a stationary point")
@pytest.mark.parametrize("name", list(SEGMENTED))
def test_compiled_segments_equal_eager_without_recompiling(name):
    """T > k: equal to eager, returned as vmap returns it, nothing compiled after the first call, whose
    algorithm runs twice (once for real, compiling the kernels, once traced as a program); later calls
    replay the program without running the algorithm's Python."""
    transform, momentum = SEGMENTED[name]
    prob = _anil(T, momentum)
    hg = transform(prob.loop, prob.outer_loss)
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


def _within_one_segment(name):
    """SEGMENTED's transform ``name`` on ANIL with T = 3 (langevin: B = 1, M = 2), to compile with k = 4."""
    transform, momentum = SEGMENTED[name]
    if name == "langevin":
        transform = hf.langevin(1, 2, 1e-5, seed=0)
    prob = _anil(3, momentum)
    return prob, transform(prob.loop, prob.outer_loss)


@pytest.mark.filterwarnings("ignore:implicit. w_T is not a stationary point")
@pytest.mark.parametrize("name", list(SEGMENTED))
def test_a_horizon_within_one_segment_is_one_kernel(name):
    """T <= k: the whole call is one kernel traced from the eager algorithm, which hf.vmap calls on the
    tasks' tensors without entering vmap. Equal to eager, returned as vmap returns it (the result's type,
    the TensorDicts' batch sizes), and new values compile nothing."""
    prob, hg = _within_one_segment(name)
    counter = torch._dynamo.testing.CompileCounter()
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=4, backend=counter)
    for seed in range(2):
        args = sinusoid_args(prob, seed)
        res, ref = fast(*args), torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
        assert type(res) is type(ref)
        for got, want in ((res.grads, ref.grads), (res.params, ref.params)):
            assert [x.shape for x in got.values(True)] == [x.shape for x in want.values(True)]  # nested: batch sizes
            assert got.batch_size == want.batch_size == (2,)
            tree_close(got, want, rtol=1e-10, atol=1e-12)
        for got, want in zip(res[1:], ref[1:]):
            if torch.is_tensor(want):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1


def test_one_segment_follows_vmaps_in_dims():
    """The direct route reads in_dims as vmap does: an int for every argument, a batch dimension other than
    0, a mismatch of batch sizes (vmap's own error), and vmap around it (the kernel under two levels)."""
    prob, hg = _within_one_segment("unroll")
    h, w0, batches, val = sinusoid_args(prob, 0)
    ref = torch.func.vmap(hg, in_dims=IN_DIMS)(h, w0, batches, val)
    moved = tuple(x.movedim(0, 1) for x in batches)
    fast = hf.compile(hf.vmap(hg, in_dims=(None, None, 1, 0)), segment=4, backend="eager")
    tree_close(fast(h, w0, moved, val).grads, ref.grads, rtol=1e-10, atol=1e-12)
    per_task = (torch.stack([h, h]), torch.stack([w0, w0]), batches, val)
    fast = hf.compile(hf.vmap(hg, in_dims=0), segment=4, backend="eager")
    tree_close(fast(*per_task).grads, ref.grads, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="same size in the mapped dimension"):
        fast(*per_task[:3], tuple(x[:1] for x in val))
    both = torch.stack([h, h.apply(lambda x: 1.1 * x)])
    outer = (0, None, None, None)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=4, backend="eager")
    got = torch.func.vmap(fast, in_dims=outer)(both, w0, batches, val)
    want = torch.func.vmap(hf.vmap(hg, in_dims=IN_DIMS), in_dims=outer)(both, w0, batches, val)
    tree_close(got.grads, want.grads, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:implicit. w_T is not a stationary point")
@pytest.mark.parametrize("name", list(SEGMENTED))
def test_per_task_hyperparameters_and_initial_params(name):
    """in_dims = 0 for every argument: each task its own λ and w_0, by segments. (distill's running
    average starts as the state itself, one tensor in two kernel inputs: traced on one fake tensor, the
    two were one graph input, and a batched w_0 gave a wrong answer.)"""
    transform, momentum = SEGMENTED[name]
    prob = _anil(T, momentum)
    hg = transform(prob.loop, prob.outer_loss)
    h, w0, batches, val = sinusoid_args(prob, 0)
    args = (torch.stack([h, h.apply(lambda x: 1.1 * x)]), torch.stack([w0, 0.5 * w0]), batches, val)
    res = hf.compile(hf.vmap(hg, in_dims=0), segment=K, backend=torch._dynamo.testing.CompileCounter())(*args)
    ref = torch.func.vmap(hg, in_dims=0)(*args)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
    tree_close(res.params, ref.params, rtol=1e-10, atol=1e-12)


def test_forward_with_per_task_hyperparameters_within_one_segment():
    """forward pushes prepare forward with torch.func.jvp, which make_fx's fake tensors refuse under a
    vmap over per-task λ (torch 2.13): the call is not traced but run, as eager returns it (it raised)."""
    prob = _anil(3)
    hg = hf.forward(prob.loop, prob.outer_loss)
    h, w0, batches, val = sinusoid_args(prob, 0)
    args = (torch.stack([h, h.apply(lambda x: 1.1 * x)]), torch.stack([w0, 0.5 * w0]), batches, val)
    fast = hf.compile(hf.vmap(hg, in_dims=0), segment=4, backend="eager")
    for _ in range(2):
        tree_close(fast(*args).grads, torch.func.vmap(hg, in_dims=0)(*args).grads, rtol=1e-10, atol=1e-12)


def test_one_segment_tells_a_none_from_a_tensor_in_the_same_place():
    """Two calls whose inputs differ only by which of two places holds the tensor and which None have the
    same tree structure and shapes; the kernel key keeps them apart (each place's kind is in it)."""
    loop = hf.InnerLoop(lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum(),
                        hf.optim.sgd(lr=0.1), steps=2, full_batch=True)  # fmt: skip

    def outer(p, h, batch):
        a, b = batch
        return ((p["w"] - (a if a is not None else 2 * b)) ** 2).sum()

    hg = hf.unroll(loop, outer)
    fast = hf.compile(hg, segment=4, backend="eager")
    h, w0 = TensorDict({"l2": torch.tensor(0.5, dtype=DT)}, []), TensorDict({"w": torch.zeros(3, dtype=DT)}, [])
    x, y = torch.ones(3, dtype=DT), torch.full((3,), 3.0, dtype=DT)
    for val in ((y, None), (None, y), (y, None)):
        tree_close(fast(h, w0, x, val).grads, hg(h, w0, x, val).grads, rtol=1e-12, atol=1e-14)


def test_losses_closing_over_tensors_compile_and_follow_their_updates():
    """A tensor a loss closes over (a fixed target, a mask) becomes a constant of the traced kernel
    graph, held by reference, so an in-place update of it reaches the next call."""
    prob = _anil(T)
    weight = torch.tensor(2.0, dtype=DT)

    def outer(p, h, batch):
        return weight * prob.outer_loss(p, h, batch)

    hg = hf.greedy_accumulate(0.9)(prob.loop, outer)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K, backend="aot_eager")
    args = sinusoid_args(prob, 0)
    for value in (2.0, 3.0):
        weight.fill_(value)
        tree_close(fast(*args).grads, torch.func.vmap(hg, in_dims=IN_DIMS)(*args).grads, rtol=1e-10, atol=1e-12)


def test_compile_time_is_flat_in_T():
    """The kernels depend on k, not on T: T = 7 and T = 13 compile the same number of frames."""
    frames = []
    for steps in (7, 13):  # 13 = 4 * 3 + 1: the same two segment lengths
        prob = _anil(steps)
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
        prob = _anil(steps, momentum=momentum)
        graphs = []

        def backend(gm, inputs, graphs=graphs):
            graphs.append(gm.code)
            return gm.forward

        hg = make(steps)(prob.loop, prob.outer_loss)
        hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K, backend=backend)(*sinusoid_args(prob, 0))
        codes.append(sorted(graphs))
    assert len(codes[0]) >= 3 and codes[0] == codes[1]


def test_vmap_equals_torch_func_vmap():
    prob = _anil(T)
    hg = hf.truncate(2)(prob.loop, prob.outer_loss)
    args = sinusoid_args(prob, 0)
    ref = torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
    for chunk in (None, 1):
        tree_close(hf.vmap(hg, in_dims=IN_DIMS, chunk_size=chunk)(*args).grads, ref.grads, rtol=0, atol=0)


def test_nested_vmap_takes_the_general_path():
    """Inside a second vmap (over two hyperparameter settings) the kernels' inputs are batched at two
    levels: the direct unwrap declines and autograd.Function's vmap rule runs them; same answer."""
    prob = _anil(5)
    hg = hf.vmap(hf.unroll(prob.loop, prob.outer_loss), in_dims=IN_DIMS)
    fast = hf.compile(hg, segment=2, backend=torch._dynamo.testing.CompileCounter())
    h, params0, batches, val = sinusoid_args(prob, 0)
    both = torch.stack([h, h.apply(lambda x: 1.1 * x)])
    outer = (0, None, None, None)
    res = torch.func.vmap(fast, in_dims=outer)(both, params0, batches, val)
    ref = torch.func.vmap(hg, in_dims=outer)(both, params0, batches, val)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)


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


@pytest.mark.parametrize("segment", [2, 4])  # T = 3: segments of 2 + 1, or one whole-call kernel
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


@pytest.mark.parametrize("segment", [2, 5])  # inductor: 2 + 2 + 1, and the whole call as one kernel
def test_inductor_segments_equal_eager_float32(segment):
    prob = _anil(5, dtype=torch.float32)
    hg = hf.unroll(prob.loop, prob.outer_loss)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=segment)
    args = sinusoid_args(prob, 0, torch.float32)
    res, ref = fast(*args), torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
    tree_close(res.grads, ref.grads, rtol=1e-5, atol=1e-6)


def test_undeclared_transform_is_refused():
    """A transform that does not declare segmented=True (its algorithm may differentiate the steps with
    torch.func itself, which the kernels have no derivative for) is refused, naming the whole-loop route."""
    prob = _anil(T)

    def algorithm(bound):
        s, b = bound.run(bound.initial(), bound.buffers, bound.h, bound.prep.rebuild(bound.prep.d), 0, T)
        loss, _, direct = bound.outer_vjp(s, b)
        return Outcome(direct, loss, s, b, InitTerm.ABSENT)

    hg = make_transform(algorithm, "mine", prob.loop, prob.outer_loss)
    with pytest.raises(TypeError, match=r"does not support mine.*torch.compile\(torch.func.vmap"):
        hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K)


def test_bad_arguments():
    prob = _anil(T)
    hg = hf.unroll(prob.loop, prob.outer_loss)
    with pytest.raises(ValueError, match="segment"):
        hf.compile(hg, segment=0)
    with pytest.raises(TypeError, match="hf.vmap"):
        hf.compile(torch.func.vmap(hg), segment=2)
    with pytest.raises(ValueError, match="chunk_size"):
        hf.vmap(hg, chunk_size=0)
    with pytest.raises(TypeError, match="'bakend'.*torch.compile's keyword arguments"):
        hf.compile(hg, segment=2, bakend="eager")
    with pytest.raises(ValueError, match="mode= or options="):
        hf.compile(hg, segment=2, mode="max-autotune", options={"cpp_wrapper": True})


def test_kernels_skip_dynamo_under_hf_vmap():
    """Under hf.vmap a kernel's traced graph goes straight to the backend: no frame for dynamo to trace
    (and no guards to check at every call); the backend gets each kernel's graph once."""
    prob = _anil(T)
    hg = hf.vmap(hf.unroll(prob.loop, prob.outer_loss), in_dims=IN_DIMS)
    counter = torch._dynamo.testing.CompileCounter()
    fast = hf.compile(hg, segment=K, backend=counter)
    frames = torch._dynamo.utils.counters["frames"]["total"]
    for seed in (0, 1):
        tree_close(fast(*sinusoid_args(prob, seed)).grads, hg(*sinusoid_args(prob, seed)).grads, rtol=1e-10, atol=1e-12)
    assert torch._dynamo.utils.counters["frames"]["total"] == frames
    # map and VJP for k = 3, the fused last segment (1 step) with the outer gradient, prepare and its VJP
    assert counter.frame_count == 5


def test_a_call_that_cannot_be_traced_runs_its_algorithm_on_the_kernels():
    """An algorithm whose Python reads a tensor's value cannot be traced as a program: each call runs it,
    on the compiled kernels, and the result is still eager's."""
    prob = _anil(T)
    hg = hf.unroll(prob.loop, prob.outer_loss)
    reads = []

    def algorithm(bound):
        reads.append(float(bound.h[0].sum()))  # a value, read in Python: fails on the trace's fake tensors
        return hg.algorithm(bound)

    reading = dataclasses.replace(hg, algorithm=algorithm)
    fast = hf.compile(hf.vmap(reading, in_dims=IN_DIMS), segment=K, backend="eager")
    for seed in (0, 1):
        args = sinusoid_args(prob, seed)
        tree_close(fast(*args).grads, torch.func.vmap(hg, in_dims=IN_DIMS)(*args).grads, rtol=1e-10, atol=1e-12)
    assert len(reads) == 3  # the first call: the real run, then the untraced call; the second call: once


def test_random_draws_in_the_step_are_refused():
    """Dropout in the inner loss: the recomputed segment would draw other masks, so the call raises."""

    def inner(p, h, batch):
        x, y = batch
        return ((F.dropout(x, 0.5) @ p["w"] - y) ** 2).mean() + h["l2"] * (p["w"] ** 2).sum()

    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1), steps=4, full_batch=True)
    hg = hf.unroll(loop, lambda p, h, batch: ((batch[0] @ p["w"] - batch[1]) ** 2).mean())
    fast = hf.compile(hg, segment=2, backend="eager")
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, dtype=DT)
    h, w0 = TensorDict({"l2": torch.tensor(0.1, dtype=DT)}, []), TensorDict({"w": torch.zeros(3, dtype=DT)}, [])
    with pytest.raises(ValueError, match="random draws"):
        fast(h, w0, (x, y), (x, y))
    with pytest.raises(ValueError, match="random draws"):  # T <= k: one kernel, refused alike
        hf.compile(hg, segment=4, backend="eager")(h, w0, (x, y), (x, y))


def test_per_step_batches_through_prepare():
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
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K, backend="eager")
    res, ref = fast(h, w0, (x, y), val), torch.func.vmap(hg, in_dims=IN_DIMS)(h, w0, (x, y), val)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
