"""hyperfunc/optim/_noise.py: counter-based noise, the same bits on every device, under vmap and compiled,
batched per kernel."""

import torch
from problems import DT


def test_noise_keys_on_device_equal_host_keys_under_nested_vmap_and_compile():
    # traced steps and per-task seeds hash through the hyperfunc::counter_bits operator; it must draw the
    # very numbers the host-side hash of Python ints draws, batched at any vmap depth and compiled
    from hyperfunc.optim._noise import _draw, _draw_numpy, _draw_torch, _hash, _key, bits, normal

    # int64 tensors hash like Python ints (the multiplications wrap around in two's complement)
    x = torch.randint(0, 2**32, (1000,), generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, torch.tensor([2**32 - 1])])
    assert torch.equal(_hash(x), torch.tensor([_hash(v) for v in x.tolist()]))
    # the accelerator's path (torch ops on the device, a tensor of keys, streams on the last axis) draws the
    # CPU's (numpy) bits; so do Python-int keys on either path
    keys = torch.stack([_key(torch.tensor([[3], [2**40 + 1]]), torch.tensor([5, 6]), c) for c in (2, 0)], -1)
    assert torch.equal(_draw_torch(keys, (6, 2), "cpu"), _draw_numpy(keys, (6, 2)))
    assert torch.equal(_draw_torch(torch.tensor([_key(3, 5, 2)]), (4,), "cpu"), _draw([_key(3, 5, 2)], (4,), "cpu"))

    def draw(seed, step):
        return bits([(5,)], seed, step, [3], "cpu")[0]

    seeds, steps = torch.tensor([[1, 2**40 + 2], [3, 4], [5, 6]]), torch.tensor([7, 8, 9])
    out = torch.func.vmap(torch.func.vmap(draw, in_dims=(0, None)))(seeds, steps)
    ref = [[draw(int(seeds[i, j]), int(steps[i])) for j in range(2)] for i in range(3)]
    assert torch.equal(out, torch.stack([torch.stack(r) for r in ref]))
    out = torch.func.vmap(torch.func.vmap(draw, in_dims=(None, 0)), in_dims=(0, None))(seeds[:, 0], steps)
    ref = [[draw(int(seeds[i, 0]), int(steps[j])) for j in range(3)] for i in range(3)]
    assert torch.equal(out, torch.stack([torch.stack(r) for r in ref]))
    # one draw of several streams (every leaf of a step) equals a draw per stream, int or traced keys
    for step in (4, torch.tensor(4)):
        shapes, streams = [(2, 3), (), (4,)], [0, 5, 1]
        many = bits(shapes, 9, step, streams, "cpu")
        assert all(torch.equal(a, bits([shape], 9, 4, [c], "cpu")[0]) for a, shape, c in zip(many, shapes, streams))

    def noisy(w, v, t):
        z = normal([w.shape, v.shape], 11, t, [0, 1], [w.dtype, v.dtype], w.device)
        return w + z[0], v + z[1]

    w, v = torch.zeros(2, 3, dtype=DT), torch.zeros(4, dtype=torch.float32)
    torch._dynamo.reset()  # earlier tests' frames must not exhaust the recompile limit of vmap's wrapper
    compiled = torch.compile(torch.func.vmap(noisy, in_dims=(None, None, 0)), backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(w, v, torch.tensor([4, 5])), zip(noisy(w, v, 4), noisy(w, v, 5))):
        assert torch.equal(a, torch.stack(b))


def test_a_kernels_draws_become_one_call_with_the_same_bits():
    # batch_draws stacks the steps of the counter_bits calls that share a seed and sizes; the step counters are
    # computed late in the graph (next to each draw) and must be moved ahead of the merged call
    from torch.fx.experimental.proxy_tensor import make_fx

    from hyperfunc._common_subexpressions import merge_common_subexpressions
    from hyperfunc.optim._noise import _counter_bits, batch_draws, normal

    def segment(w, t0, random_step):
        for j in range(4):
            w = w + normal([w.shape], 7, t0 + j, [0], [w.dtype], w.device)[0]
        if random_step:  # a step that depends on a random draw cannot be moved: the group stays as it is
            w = w + normal([w.shape], 7, t0 + (torch.rand(()) > 2).long(), [0], [w.dtype], w.device)[0]
        return w

    w, t0 = torch.zeros(3, dtype=DT), torch.tensor(5)
    for random_step, merged in ((False, 1), (True, 5)):
        graph = make_fx(lambda w, t0: segment(w, t0, random_step))(w, t0)
        merge_common_subexpressions(graph.graph)  # as hf.compile's kernels: equal seeds become one node
        batch_draws(graph.graph)
        graph.graph.lint()  # still in topological order
        graph.recompile()
        assert sum(node.target is _counter_bits for node in graph.graph.nodes) == merged
        assert torch.equal(graph(w, t0), segment(w, t0, random_step))  # rand(()) > 2 never holds: fixed steps
