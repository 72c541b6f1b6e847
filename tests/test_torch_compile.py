"""torch.compile(vmap(hg), fullgraph=True): one graph per transform, equal to eager, no recompilation
when only tensor values change (new hyperparameters, new tasks); online steps compile twice in all,
not once per step index t.

Compiled with dynamo's CompileCounter backend: it traces exactly what inductor would receive (a
graph break fails ``fullgraph=True``) and counts the compiled frames, without inductor's slow C++
build. ANIL sinusoids in float64 with ``prepare`` (the body's features), 2 vmapped tasks, T = 3.

``unroll(checkpoint_every=k)`` cannot be compiled whole (its RNG replay reads ``torch.get_rng_state``,
which dynamo does not trace): it raises a ValueError that names ``hf.compile(segment=k)``, checked in
a subprocess, because a failed trace inside ``vmap``/``grad`` leaves functorch's transform stack
behind and breaks later eager calls in the same process.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo.testing
from problems import TRANSFORMS as REGISTRY
from problems import anil, sinusoid_args, tree_close
from test_modules import conv_bn, data, learned_init, problem

import hyperfunc as hf

DT = torch.float64
T = 3


# the registry's transforms but the checkpointed unroll, which cannot be compiled whole (its own test below)
TRANSFORMS = {name: entry for name, entry in REGISTRY.items() if name != "checkpointed"}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_fullgraph_compile_equals_eager_without_recompiling(name):
    entry = TRANSFORMS[name]
    problem = anil(T, entry.momentum)
    hg = torch.func.vmap(entry.make(T)(problem.loop, problem.outer_loss), in_dims=(None, None, 0, 0))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(hg, backend=counter, fullgraph=True)
    for seed in range(2):
        args = sinusoid_args(problem, seed)
        res, ref = compiled(*args), hg(*args)
        tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.loss, ref.loss, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


@pytest.mark.parametrize("transform", [hf.unroll, hf.forward, hf.drmad])
def test_fullgraph_compile_with_buffers_and_learned_init(transform):
    """A conv net with BatchNorm buffers and a learned w_0 (the MAML setting), one task, one graph."""
    net = conv_bn()
    loop, outer, hparams, buffers = problem(net, steps=2)
    batches, val = data(steps=2)
    hg = transform(loop, outer)
    counter = torch._dynamo.testing.CompileCounter()
    res = torch.compile(hg, backend=counter, fullgraph=True)(hparams, learned_init, batches, val, buffers)
    ref = hg(hparams, learned_init, batches, val, buffers)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
    tree_close(res.buffers, ref.buffers, rtol=1e-12, atol=0)
    assert counter.frame_count == 1


def test_fullgraph_compile_with_per_task_buffers():
    """Two tasks under vmap, each with its own BatchNorm statistics, through AOTAutograd's
    functionalization (aot_eager): the statistics the batching rule writes come back as eager's."""
    loop, outer, hparams, buffers = problem(conv_bn(), steps=2)
    (x, y), (xv, yv) = data(steps=2)
    batches, val = (torch.stack([x, 1.1 * x]), torch.stack([y, y])), (torch.stack([xv, xv]), torch.stack([yv, yv]))
    hg = torch.func.vmap(hf.unroll(loop, outer), in_dims=(None, None, 0, 0, 0))
    args = (hparams, learned_init, batches, val, torch.stack([buffers, buffers]))
    torch._dynamo.reset()  # shapes the earlier tests traced would be made dynamic ("automatic dynamic")
    res, ref = torch.compile(hg, backend="aot_eager", fullgraph=True, dynamic=False)(*args), hg(*args)
    tree_close(res.buffers, ref.buffers, rtol=1e-12, atol=1e-14)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)


def test_fullgraph_compile_float32_through_aot_autograd():
    """float32 through AOTAutograd's decompositions (what inductor receives): equal to eager to 1e-5."""
    problem32 = hf.tasks.anil_sinusoid(steps=T, hidden=8)
    hg = torch.func.vmap(hf.unroll(problem32.loop, problem32.outer_loss), in_dims=(None, None, 0, 0))
    args = sinusoid_args(problem32, 0, torch.float32)
    res = torch.compile(hg, backend="aot_eager", fullgraph=True)(*args)
    tree_close(res.grads, hg(*args).grads, rtol=1e-5, atol=1e-6)


# the registry's online forms, and langevin's (which emits per step, not the offline average)
ONLINE = {
    **{name: (entry.online(), entry.momentum) for name, entry in REGISTRY.items() if entry.online},
    "langevin": (hf.online.langevin(1e-5, seed=0), 0.0),
}


@pytest.mark.parametrize("name", list(ONLINE))
def test_online_step_compiles_once_for_every_t(name):
    """The step index t is a Python int: after the first step dynamo makes it symbolic, so six steps
    compile two frames (the first step, and the general one), not one per step."""
    factory, momentum = ONLINE[name]
    problem = hf.tasks.anil_sinusoid(steps=6, hidden=8, momentum=momentum, dtype=DT)
    online = factory(problem.loop, problem.outer_loss)
    step = torch.func.vmap(online.step, in_dims=(0, None, 0, 0, None))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    tasks = hf.tasks.sinusoid_tasks(2, generator=torch.Generator().manual_seed(0), dtype=DT)
    state = ref_state = torch.func.vmap(online.init, in_dims=(None, 0))(
        problem.hparams, problem.params0.expand(2).clone()
    )
    for t in range(6):
        res, state = compiled(state, problem.hparams, tasks.inner_batches, tasks.outer_batch, t)
        ref, ref_state = step(ref_state, problem.hparams, tasks.inner_batches, tasks.outer_batch, t)
        tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 2, f"{counter.frame_count} frames for 6 steps"


def test_checkpointed_unroll_compiled_whole_names_the_segment_route():
    code = textwrap.dedent(
        """
        import torch, hyperfunc as hf
        problem = hf.tasks.anil_sinusoid(steps=4, hidden=8)
        tasks = hf.tasks.sinusoid_tasks(2, generator=torch.Generator().manual_seed(0))
        hg = hf.unroll(problem.loop, problem.outer_loss, checkpoint_every=2)
        hg = torch.func.vmap(hg, in_dims=(None, None, 0, 0))
        torch.compile(hg, backend="eager", fullgraph=True)(
            problem.hparams, problem.params0, tasks.inner_batches, tasks.outer_batch
        )
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "cannot be compiled whole" in out.stderr and "hf.compile(hf.vmap(hf.unroll" in out.stderr, out.stderr[-2000:]
