"""hyperfunc.distributed: N gloo processes on CPU follow the single-process run (float64, ~1e-12)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchopt
from tensordict import TensorDict

import hyperfunc as hf
from hyperfunc import distributed

ITERATIONS = 5


def _problem(compiled: bool = False):
    problem = hf.tasks.anil_sinusoid(steps=3, hidden=8, dtype=torch.float64)
    hg = torch.func.vmap(hf.unroll(problem.loop, problem.outer_loss), in_dims=(None, None, 0, 0))
    return problem, torch.compile(hg, backend="aot_eager") if compiled else hg


def _train(n_tasks: int, hparams: TensorDict, compiled: bool = False) -> TensorDict:
    """ITERATIONS meta-iterations of Adam on the sharded meta-batch (one process: the whole batch)."""
    problem, hg = _problem(compiled)
    meta_opt = torchopt.adam(1e-2)
    hparams, state = distributed.broadcast((hparams, meta_opt.init(hparams)))
    stream = torch.Generator().manual_seed(0)
    for _ in range(ITERATIONS):
        tasks = hf.tasks.sinusoid_tasks(n_tasks, generator=stream, dtype=torch.float64)
        inner, outer = distributed.shard((tasks.inner_batches, tasks.outer_batch))
        res = distributed.mean(hg(hparams, problem.params0, inner, outer))
        updates, state = meta_opt.update(res.grads, state, params=hparams)
        hparams = torchopt.apply_updates(hparams, updates, inplace=False)
    return hparams, res.loss


def _worker(rank: int, size: int, store: str, n_tasks: int, compiled: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    torch.set_num_threads(1)
    try:
        hparams = _problem()[0].hparams
        if rank > 0:  # broadcast must replace whatever the other ranks start from
            hparams = hparams.apply(lambda x: x + 1.0)
        counts = torch.tensor([len(distributed.shard_range(n_tasks))])
        trained, loss = _train(n_tasks, hparams, compiled)
        torch.save({"hparams": hf.to_state_dict(trained), "loss": loss, "count": counts}, f"{out}.{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "n_tasks, compiled", [(4, False), (3, False), (4, True)], ids=["even", "uneven", "compiled_hg"]
)
def test_two_gloo_processes_equal_one_process(tmp_path, n_tasks, compiled):
    """Compiled: each rank runs torch.compile(vmap(hg)) (aot_eager: the traced graph, without inductor's
    slow C++ build) and reduces its outputs; the reference stays eager."""
    args = (2, str(tmp_path / "store"), n_tasks, compiled, str(tmp_path / "rank"))
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    reference, ref_loss = _train(n_tasks, _problem()[0].hparams)
    results = [torch.load(tmp_path / f"rank.{r}.pt", weights_only=True) for r in range(2)]
    assert [int(r["count"]) for r in results] == [n_tasks - n_tasks // 2, n_tasks // 2]
    start = hf.to_state_dict(_problem()[0].hparams)
    for result in results:
        for key, value in hf.to_state_dict(reference).items():
            torch.testing.assert_close(result["hparams"][key], value, rtol=1e-12, atol=1e-12)
            assert not torch.allclose(value, start[key])  # it did train
        torch.testing.assert_close(result["loss"], ref_loss, rtol=1e-12, atol=0)


def test_one_process_world():
    assert distributed.world() == (0, 1)
    assert distributed.shard_range(5) == range(0, 5)
    assert distributed.rank_seed(3) == 3
    x = torch.arange(6.0)
    y = distributed.broadcast({"x": x})["x"]
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


def test_mean_is_the_task_mean_and_keeps_per_task_fields():
    grads = TensorDict({"a": torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])}, [3])
    res = hf.HyperGrad(grads, torch.tensor([1.0, 2.0, 6.0]), TensorDict({"w": torch.zeros(3, 2)}, [3]))
    avg = distributed.mean(res)
    torch.testing.assert_close(avg.grads["a"], torch.tensor([3.0, 3.0]))
    assert avg.grads.batch_size == torch.Size([])
    torch.testing.assert_close(avg.loss, torch.tensor(3.0))
    assert avg.params is res.params


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: distributed.shard_range(0), ValueError, "n_tasks must be"),
        (lambda: distributed.shard(torch.tensor(1.0)), ValueError, "leading task dimension"),
        (lambda: distributed.shard(TensorDict({}, [4])), ValueError, r"tree holds no tensor \(TensorDict\)"),
        (
            lambda: distributed.mean(hf.HyperGrad(TensorDict({"a": torch.zeros(0)}, [0]), torch.zeros(0), None)),
            ValueError,
            "result has no tasks; every rank needs at least one",
        ),
        (lambda: distributed.shard((torch.zeros(3), torch.zeros(4))), ValueError, "disagree on the number of tasks"),
        (lambda: distributed.rank_seed(-1), ValueError, "seed"),
        (lambda: distributed.broadcast({"x": torch.zeros(1)}, src=1), ValueError, "src must be a rank"),
        (lambda: distributed.mean({"grads": 1}), TypeError, "must be a HyperGrad"),
        (
            lambda: distributed.mean(hf.HyperGrad(TensorDict({}, []), torch.tensor(1.0), None)),
            ValueError,
            "one entry per task",
        ),
    ],
)
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
