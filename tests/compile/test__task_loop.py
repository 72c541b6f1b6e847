"""hyperfunc/compile/_task_loop.py: hf.vmap(chunk_size=1) is a loop over the tasks that returns what
torch.func.vmap returns, keeps vmap's randomness modes, and serves a compiled hg with one task's kernels."""

import pytest
import torch
from problems import tree_close
from tensordict import TensorDict

import hyperfunc as hf

DT = torch.float64
IN_DIMS = (None, None, 0, 0, 0)  # hparams and the init function shared, data and buffers per task


def _maml(dropout: float = 0.0, tasks: int = 3, same_data: bool = False):
    """MAML, second order, on a Conv-BatchNorm(-Dropout) net with per-task running statistics."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU()]
    layers += [torch.nn.Dropout(dropout)] if dropout else []
    net = torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 3, 2)).double()
    params, buffers = hf.module_state(net)

    def loss(p, h, batch, b):
        out, b = hf.functional_call(net, p, b, batch[0])
        return torch.nn.functional.cross_entropy(out, batch[1]), b

    loop = hf.InnerLoop(loss, hf.optim.sgd(lr=0.1), steps=3, full_batch=True)
    x, y = torch.randn(tasks, 6, 1, 5, 5, dtype=DT), torch.randint(0, 2, (tasks, 6))
    if same_data:
        x, y = x[:1].expand_as(x), y[:1].expand_as(y)
    args = (TensorDict({"init": params}, []), lambda h: h["init"], (x, y), (x, y), torch.stack([buffers] * tasks))
    return hf.unroll(loop, loss), args


def test_a_loop_returns_what_vmap_returns():
    hg, args = _maml()
    ref = torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
    out = hf.vmap(hg, in_dims=IN_DIMS, chunk_size=1)(*args)
    for name in ("grads", "params", "buffers"):  # batch sizes too: a TensorDict gains the task dimension
        assert getattr(out, name).batch_size == getattr(ref, name).batch_size
    # batch norm runs torch's kernel in the loop, the elementary form under vmap: rounding apart
    for a, b in ((out.grads, ref.grads), (out.params, ref.params), (out.buffers, ref.buffers)):
        tree_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=0)
    assert out.buffers["1", "num_batches_tracked"].tolist() == [3, 3, 3]


def test_nested_in_dims_map_a_batch_by_its_parts():
    hg, (h, init, (x, y), val, buffers) = _maml()
    ref = hf.vmap(hg, in_dims=IN_DIMS, chunk_size=1)(h, init, (x, y[0].expand_as(y)), val, buffers)
    shared_labels = (None, None, (0, None), 0, 0)
    out = hf.vmap(hg, in_dims=shared_labels, chunk_size=1)(h, init, (x, y[0]), val, buffers)
    tree_close(out.grads, ref.grads, rtol=0, atol=0)


def test_randomness_keeps_vmaps_meaning():
    hg, args = _maml(dropout=0.3, same_data=True)
    with pytest.raises(ValueError, match="randomness='error'.*'different'"):
        hf.vmap(hg, in_dims=IN_DIMS, chunk_size=1)(*args)
    torch.manual_seed(1)
    different = hf.vmap(hg, in_dims=IN_DIMS, chunk_size=1, randomness="different")(*args)
    torch.manual_seed(1)
    looped = [hg(args[0], args[1], (args[2][0][i], args[2][1][i]), (args[3][0][i], args[3][1][i]), args[4][i])
              for i in range(3)]  # fmt: skip
    key = ("init", "0", "weight")
    for i, one in enumerate(looped):
        torch.testing.assert_close(different.grads[key][i], one.grads[key], rtol=0, atol=0)
    assert not torch.equal(different.grads[key][0], different.grads[key][1])
    same = hf.vmap(hg, in_dims=IN_DIMS, chunk_size=1, randomness="same")(*args)  # one mask: equal tasks agree
    torch.testing.assert_close(same.grads[key][0], same.grads[key][2], rtol=0, atol=0)


@pytest.mark.parametrize("segment", [1, 2, 5])  # T = 3: one-step segments, 2 + 1, or the call as one kernel
def test_compiled_hg_runs_one_tasks_kernels(segment):
    hg, args = _maml()
    ref = hf.vmap(hg, in_dims=IN_DIMS)(*args)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS, chunk_size=1), segment=segment, backend="eager")
    for _ in range(2):  # the second call reuses the kernels of the first
        out = fast(*args)
        tree_close(out.grads, ref.grads, rtol=1e-10, atol=1e-12)
        tree_close(out.buffers, ref.buffers, rtol=1e-10, atol=1e-12)


def test_an_unmapped_or_empty_call_is_refused():
    hg, (h, init, (x, y), val, buffers) = _maml()
    with pytest.raises(ValueError, match="at least one argument mapped"):
        hf.vmap(hg, in_dims=(None,) * 5, chunk_size=1)(h, init, (x, y), val, buffers)
    with pytest.raises(ValueError, match="0 tasks"):
        hf.vmap(hg, in_dims=IN_DIMS, chunk_size=1)(h, init, (x[:0], y[:0]), (val[0][:0], val[1][:0]), buffers[:0])
