"""hf.module_state / hf.functional_call, and a Conv-BatchNorm net through the transforms (float64).

The reference for a functional inner loop is the same nn.Module trained in place with torch.optim.SGD.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from problems import DT, tree_close
from tensordict import TensorDict
from torch import nn

import hyperfunc as hf

T, N, CLASSES = 4, 6, 3
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


def conv_bn(track_running_stats=True):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, CLASSES),
    )
    return net.to(DT)


def data(seed=0, steps=T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, N, 1, 5, 5, generator=g, dtype=DT)
    y = torch.randint(0, CLASSES, (steps, N), generator=g)
    xv = torch.randn(8, 1, 5, 5, generator=g, dtype=DT)
    return (x, y), (xv, torch.randint(0, CLASSES, (8,), generator=g))


def l2(params):
    return sum((p**2).sum() for p in params.values(True, True))


def losses(net):
    def inner(p, h, batch, buffers):
        out, buffers = hf.functional_call(net, p, buffers, batch[0])
        return F.cross_entropy(out, batch[1]) + h["log_l2"].exp() * l2(p), buffers

    def outer(p, h, batch, buffers):
        out, buffers = hf.functional_call(net, p, buffers, batch[0])
        return F.cross_entropy(out, batch[1]), buffers

    return inner, outer


def problem(net, steps=T):
    inner, outer = losses(net)
    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=LR, momentum=MOMENTUM, weight_decay=WD), steps=steps)
    params, buffers = hf.module_state(net)
    hparams = TensorDict({"log_l2": torch.tensor(-3.0, dtype=DT), "init": params}, [])
    return loop, outer, hparams, buffers


def learned_init(h):
    return h["init"]


def train_in_place(net, hparams, batches):
    """The reference: the module trained by torch.optim.SGD on the same losses and batches."""
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in zip(*batches):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y) + hparams["log_l2"].exp() * sum((p**2).sum() for p in net.parameters())
        loss.backward()
        opt.step()
    return net


def test_module_state_splits_params_and_buffers():
    net = conv_bn()
    params, buffers = hf.module_state(net)
    assert sorted(params.flatten_keys(".").keys()) == sorted(n for n, _ in net.named_parameters())
    assert sorted(buffers.flatten_keys(".").keys()) == sorted(n for n, _ in net.named_buffers())
    assert buffers["1", "num_batches_tracked"].dtype == torch.int64
    params["0", "weight"].add_(1.0)  # copies: the module is untouched
    assert not torch.equal(params["0", "weight"], net[0].weight)


def test_functional_call_is_pure_and_matches_the_module():
    net = conv_bn()
    params, buffers = hf.module_state(net)
    before = buffers.clone()
    x = data()[0][0][0]
    out, new = hf.functional_call(net, params, buffers, x)
    tree_close(buffers, before, rtol=0, atol=0)  # inputs never mutated
    reference = copy.deepcopy(net)
    torch.testing.assert_close(out, reference(x))
    # hyperfunc's batch statistics sum the n = N * 5 * 5 values of a channel in another order than torch's
    # kernel (hyperfunc/_batch_norm.py): equal to n * eps relatively, for values of order one
    bound = N * 5 * 5 * torch.finfo(DT).eps
    tree_close(new, TensorDict.from_module(reference).select(*buffers.keys(True, True)), rtol=bound, atol=bound)
    assert net[1].num_batches_tracked == 0


def test_functional_call_errors():
    net = conv_bn()
    params, buffers = hf.module_state(net)
    with pytest.raises(ValueError, match="this module has buffers"):
        hf.functional_call(net, params, None, torch.ones(2, 1, 5, 5, dtype=DT))
    with pytest.raises(TypeError, match="params must be a TensorDict"):
        hf.functional_call(net, dict(net.named_parameters()), buffers, torch.ones(2, 1, 5, 5, dtype=DT))
    with pytest.raises(TypeError, match="hf.module_state"):
        hf.unroll(*problem(net)[:2])(problem(net)[2], TensorDict.from_module(net), *data())


def test_functional_call_vmaps_with_per_task_statistics():
    net = conv_bn()
    params, buffers = hf.module_state(net)
    xs = data()[0][0]
    _, batched = torch.func.vmap(lambda x: hf.functional_call(net, params, buffers, x))(xs)
    for t in range(T):
        tree_close(batched[t], hf.functional_call(net, params, buffers, xs[t])[1])


def test_unroll_matches_torch_optim_sgd_in_place():
    net = conv_bn()
    loop, outer, hparams, buffers = problem(net)
    batches, val = data()
    res = hf.unroll(loop, outer)(hparams, learned_init, batches, val, buffers=buffers)
    reference = train_in_place(net, hparams, batches)
    ref_params, ref_buffers = hf.module_state(reference)
    tree_close(res.params, ref_params, rtol=1e-10, atol=1e-12)
    tree_close(res.buffers, ref_buffers, rtol=1e-12, atol=1e-14)
    # meta-test in eval mode: the carried running statistics normalize, as in the trained module
    evaluated = copy.deepcopy(net).eval()
    out, _ = hf.functional_call(evaluated, res.params, res.buffers, val[0])
    torch.testing.assert_close(out, reference.eval()(val[0]))


def test_unroll_equals_central_finite_differences():
    net = conv_bn()
    loop, outer, hparams, buffers = problem(net)
    batches, val = data()
    hg = hf.unroll(loop, outer)
    res = hg(hparams, learned_init, batches, val, buffers=buffers)
    direction = hparams.apply(lambda x: torch.randn_like(x))
    eps = 1e-5

    def F_at(sign):
        shifted = hparams.apply(lambda x, v: x + sign * eps * v, direction)
        return hg(shifted, learned_init, batches, val, buffers=buffers).loss

    fd = (F_at(1) - F_at(-1)) / (2 * eps)
    analytic = sum((res.grads.get(k) * direction.get(k)).sum() for k in res.grads.keys(True, True))
    torch.testing.assert_close(analytic, fd, rtol=1e-7, atol=1e-9)


def test_identities_hold_with_buffers():
    net = conv_bn()
    loop, outer, hparams, buffers = problem(net)
    args = (hparams, learned_init, *data())
    unrolled = hf.unroll(loop, outer)(*args, buffers=buffers)
    for other in (hf.truncate(T), hf.forward, lambda lp, o: hf.unroll(lp, o, checkpoint_every=3)):
        res = other(loop, outer)(*args, buffers=buffers)
        tree_close(res.grads, unrolled.grads, rtol=1e-9, atol=1e-11)
        tree_close(res.buffers, unrolled.buffers, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("track", [True, False], ids=["running-stats", "no-running-stats"])
def test_vmapped_equals_looped_with_buffers(track):
    net = conv_bn(track)
    loop, outer, hparams, buffers = problem(net)
    tasks = [data(seed) for seed in range(3)]
    stack = lambda i, j: torch.stack([t[i][j] for t in tasks])
    batches, val = (stack(0, 0), stack(0, 1)), (stack(1, 0), stack(1, 1))
    hg = hf.unroll(loop, outer)
    many = torch.stack([buffers] * 3)
    batched = torch.func.vmap(hg, in_dims=(None, None, 0, 0, 0))(hparams, learned_init, batches, val, many)
    for i, (b, v) in enumerate(tasks):
        single = hg(hparams, learned_init, b, v, buffers=buffers)
        tree_close(batched.grads[i], single.grads, rtol=1e-10, atol=1e-12)
        if track:
            tree_close(batched.buffers[i], single.buffers, rtol=1e-12, atol=1e-14)


class EMA(nn.Module):
    """A module whose buffer is written from its parameter and read by its output: ``out = w x + ema``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=DT))
        self.register_buffer("ema", torch.zeros(3, dtype=DT))

    def forward(self, x):
        if self.training:
            self.ema.mul_(0.5).add_(0.5 * self.w)
        return self.w * x + self.ema


def test_buffers_are_never_differentiated():
    """Buffers carried from one step to the next are constants of the hypergradient (inside one
    forward the module is differentiated as written): a hand-written autograd loop that detaches the
    buffer between steps is the reference."""
    net = EMA()
    params, buffers = hf.module_state(net)

    def inner(p, h, x, b):
        out, b = hf.functional_call(net, p, b, x)
        return ((out - 1.0) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum(), b

    def outer(p, h, x, b):
        return ((p["w"] * x - 2.0) ** 2).sum(), b

    x = torch.linspace(0.5, 1.5, 3, dtype=DT)
    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1), steps=5, full_batch=True)
    hparams = TensorDict({"l2": torch.tensor(0.3, dtype=DT)}, [])
    res = hf.unroll(loop, outer)(hparams, params, x, x, buffers=buffers)

    l2_ = torch.tensor(0.3, dtype=DT, requires_grad=True)
    w, ema = params["w"].clone(), buffers["ema"].clone()
    for _ in range(5):
        w_ = w if w.requires_grad else w.requires_grad_()
        ema_ = 0.5 * ema + 0.5 * w_
        loss = ((w_ * x + ema_ - 1.0) ** 2).sum() + l2_ * (w_**2).sum()
        (g,) = torch.autograd.grad(loss, w_, create_graph=True)
        w, ema = w_ - 0.1 * g, ema_.detach()
    (expected,) = torch.autograd.grad(((w * x - 2.0) ** 2).sum(), l2_)
    torch.testing.assert_close(res.grads["l2"], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.buffers["ema"], ema)
    assert not res.buffers["ema"].requires_grad


class _Counter(nn.Module):
    """A linear layer with a frozen bias and a buffer updated by reassignment (not in place)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 1).double()
        self.lin.bias.requires_grad_(False)
        self.register_buffer("seen", torch.zeros((), dtype=DT))

    def forward(self, x):
        self.seen = self.seen + len(x)
        return self.lin(x)


def test_frozen_parameters_are_carried_as_buffers_and_never_trained():
    net = _Counter()
    params, buffers = hf.module_state(net)
    assert sorted(params.flatten_keys(".").keys()) == ["lin.weight"]
    assert sorted(buffers.flatten_keys(".").keys()) == ["lin.bias", "seen"]

    def loss(p, h, batch, b):
        out, b = hf.functional_call(net, p, b, batch[0])
        return ((out - batch[1]) ** 2).mean() + h["wd"] * (p["lin", "weight"] ** 2).sum(), b

    loop = hf.InnerLoop(loss, hf.optim.sgd(lr=LR), steps=T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, 5, 2, generator=g, dtype=DT)
    y = torch.randn(T, 5, 1, generator=g, dtype=DT)
    hparams = TensorDict({"wd": torch.tensor(0.1, dtype=DT)}, [])
    res = hf.unroll(loop, loss)(hparams, params, (x, y), (x[0], y[0]), buffers=buffers)
    reference = copy.deepcopy(net)
    opt = torch.optim.SGD([reference.lin.weight], lr=LR)
    for t in range(T):  # the reference: the module trained in place, its bias frozen
        opt.zero_grad()
        (((reference(x[t]) - y[t]) ** 2).mean() + 0.1 * (reference.lin.weight**2).sum()).backward()
        opt.step()
    torch.testing.assert_close(res.params["lin", "weight"], reference.lin.weight.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.buffers["lin", "bias"], net.lin.bias.detach(), rtol=0, atol=0)
    # the buffers after the T inner steps (the outer loss's update is dropped): each forward counted its batch
    assert res.buffers["seen"].item() == reference.seen.item() == 5 * T


def test_a_buffer_reassigned_by_the_forward_comes_back_eagerly_and_under_vmap():
    net = _Counter()
    params, buffers = hf.module_state(net)
    x = torch.ones(3, 2, dtype=DT)
    assert hf.functional_call(net, params, buffers, x)[1]["seen"].item() == 3
    _, batched = torch.func.vmap(lambda x: hf.functional_call(net, params, buffers, x))(torch.ones(4, 3, 2, dtype=DT))
    assert batched["seen"].tolist() == [3.0] * 4
    assert net.seen.item() == 0 and buffers["seen"].item() == 0


class _Misbehaving(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.lin, self.how = nn.Linear(2, 1).double(), how
        self.register_buffer("seen", torch.zeros((), dtype=DT))

    def forward(self, x):
        if self.how == "attribute":
            self.last = self.lin(x)
        elif self.how == "rebind":
            self.how = "rebind again"
        elif self.how == "shape":
            self.seen = torch.zeros(2, dtype=DT)
        elif self.how == "dtype":
            self.seen = torch.zeros((), dtype=torch.float32)
        return self.lin(x)


@pytest.mark.parametrize(
    "how, match",
    [
        ("attribute", r"set the attribute\(s\) \['module.last'\] \(restored now\).*register_buffer"),
        ("rebind", r"set the attribute\(s\) \['module.how'\]"),
        ("shape", r"reassigned buffer 'seen' from torch.float64 of shape \(\) to torch.float64 of shape \(2,\)"),
        ("dtype", r"reassigned buffer 'seen' from torch.float64 .* to torch.float32"),
    ],
)
def test_a_forward_with_side_effects_is_refused_and_the_module_restored(how, match):
    net = _Misbehaving(how)
    params, buffers = hf.module_state(net)
    with pytest.raises(ValueError, match=match):
        hf.functional_call(net, params, buffers, torch.ones(3, 2, dtype=DT))
    assert not hasattr(net, "last") and net.how == how and net.seen.shape == ()


def test_frozen_parameters_need_the_buffers_argument():
    net = nn.Linear(2, 1)
    net.bias.requires_grad_(False)
    params, _ = hf.module_state(net)
    with pytest.raises(ValueError, match="buffers .* or frozen parameters: pass them"):
        hf.functional_call(net, params, None, torch.ones(3, 2))


def _stacked(tree, n=2):
    return tuple(torch.stack([x] * n) for x in tree)


def _buffer_mistakes():
    """(name, call, error, match): each mistake with buffers, as a user makes it, and the error it must get."""
    net = conv_bn()
    loop, outer, hparams, buffers = problem(net)
    hg = hf.unroll(loop, outer)
    batches, val = data()
    other, _ = hf.module_state(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).double())
    other_buffers = hf.module_state(nn.Sequential(nn.BatchNorm1d(2)).double())[1]
    three = hf.InnerLoop(lambda p, h, batch: F.cross_entropy(hf.functional_call(net, p, None, batch[0])[0], batch[1]),
                         hf.optim.sgd(lr=LR), steps=T)  # fmt: skip
    vmapped = torch.func.vmap(hg, in_dims=(None, None, 0, 0, None))
    stacked = torch.stack([buffers] * 2)
    return [
        ("another model's buffers", lambda: hg(hparams, learned_init, batches, val, other_buffers),
         ValueError, r"do not match the module: missing \[.*running_mean.*unexpected"),
        ("a missing key", lambda: hg(hparams, learned_init, batches, val, buffers.exclude(("1", "running_var"))),
         ValueError, r"missing \['1.running_var'\]"),
        ("stacked buffers, in_dims None", lambda: vmapped(hparams, learned_init, _stacked(batches), _stacked(val),
                                                          stacked),
         ValueError, r"buffers\['1\.\w+'\] has shape \(2,.*but the module's has .*in_dims=0"),
        ("stacked buffers by keyword", lambda: torch.func.vmap(hg, in_dims=(None, None, 0, 0))(
            hparams, learned_init, _stacked(batches), _stacked(val), buffers=stacked),
         ValueError, r"has shape \(2,.*but the module's has .*positionally"),
        ("buffers on another device", lambda: hg(hparams, learned_init, batches, val, buffers.to("meta")),
         ValueError, r"several devices"),
        ("a 3-argument loss with buffers", lambda: hf.unroll(three, outer)(hparams, learned_init, batches, val,
                                                                          buffers),
         TypeError, r"buffers were given, so inner_loss is called as inner_loss\(params, hparams, batch, buffers\)"),
        ("another model's params", lambda: hf.functional_call(net, other, buffers, batches[0][0]),
         ValueError, r"do not match the module"),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(7), ids=lambda i: _buffer_mistakes()[i][0])
def test_buffer_mistakes_are_named(index):
    _, call, error, match = _buffer_mistakes()[index]
    with pytest.raises(error, match=match):
        call()


def test_cumulative_batch_norm_under_vmap_is_named():
    """BatchNorm(momentum=None) calls float(num_batches_tracked): per-task buffers under vmap cannot give one."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3, momentum=None)).double()
    params, buffers = hf.module_state(net)
    x = torch.randn(2, 5, 2, dtype=DT)
    hf.functional_call(net, params, buffers, x[0])  # one task, eagerly: torch's own path
    with pytest.raises(ValueError, match=r"momentum=None .* in \['1'\] .* set momentum to a number"):
        torch.func.vmap(lambda x, b: hf.functional_call(net, params, b, x))(x, torch.stack([buffers] * 2))


def _maml_conv_bn(dtype):
    """A two-block Conv-BN net (average pooling: the meta-gradient is smooth in the inputs) and 3 tasks."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, CLASSES),
    ).to(dtype)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 15, 1, 8, 8, generator=g, dtype=torch.float64).to(dtype)  # (tasks, train/query, ...)
    y = torch.randint(0, CLASSES, (3, 2, 15), generator=g)
    return net, x, y


def _maml_by_autograd(dtype, steps, lr):
    """Second-order MAML's meta-gradient, mean over tasks, by plain autograd in a loop over tasks."""
    net, x, y = _maml_conv_bn(dtype)
    init = dict(net.named_parameters())
    total = 0
    for i in range(x.shape[0]):
        params, buffers = dict(init), {n: b.clone() for n, b in net.named_buffers()}
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(net, (params, buffers), (x[i, 0],)), y[i, 0])
            grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        total = total + F.cross_entropy(torch.func.functional_call(net, (params, buffers), (x[i, 1],)), y[i, 1])
    return dict(zip(init, torch.autograd.grad(total / x.shape[0], tuple(init.values()))))


def _maml_by_hyperfunc(dtype, steps, lr):
    net, x, y = _maml_conv_bn(dtype)
    params, buffers = hf.module_state(net)

    def loss(p, h, batch, b):
        out, b = hf.functional_call(net, p, b, batch[0])
        return F.cross_entropy(out, batch[1]), b

    hg = hf.vmap(
        hf.unroll(hf.InnerLoop(loss, hf.optim.sgd(lr=lr), steps, full_batch=True), loss), (None, None, 0, 0, 0)
    )
    res = hg(TensorDict({"init": params}, []), learned_init, (x[:, 0], y[:, 0]), (x[:, 1], y[:, 1]),
             torch.stack([buffers] * x.shape[0]))  # fmt: skip
    return {".".join(k): g.mean(0) for k, g in res.grads["init"].items(True, True)}


def test_float32_maml_meta_gradient_is_as_accurate_as_plain_autograd():
    """Conv-BN MAML in float32 against float64: hyperfunc's error within 10x of plain autograd's (the arithmetic
    of higher and TorchOpt). With max pooling no route compares: a float32 rounding moves near-tied maxima, and
    a 1e-6 relative change of the inputs moves the float64 meta-gradient itself by a few percent
    (``python benchmarks/models.py --accuracy``)."""
    steps, lr = 5, 0.1

    def error(grads, reference):
        diff = sum(((grads[n].double() - reference[n]) ** 2).sum() for n in reference)
        return float(diff.sqrt() / sum((reference[n] ** 2).sum() for n in reference).sqrt())

    reference = _maml_by_autograd(torch.float64, steps, lr)
    assert error(_maml_by_hyperfunc(torch.float64, steps, lr), reference) < 1e-12
    ours, theirs = (error(f(torch.float32, steps, lr), reference) for f in (_maml_by_hyperfunc, _maml_by_autograd))
    assert ours < 10 * theirs, (ours, theirs)
    assert ours < 1e-5
