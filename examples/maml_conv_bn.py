"""MAML, first-order MAML and ANIL on the standard 4-block Conv-BN-ReLU backbone (nn.Module).

The few-shot backbone of MAML (Finn et al. 2017) and ANIL (Raghu et al. 2020): four blocks of
3x3 conv, BatchNorm2d, ReLU (max-pool after the first three), then a linear head, written as a
plain ``nn.Module`` and run functionally with ``hf.module_state`` / ``hf.functional_call``.
Tasks are N-way K-shot problems on scikit-learn's 8x8 digits built by ``hf.tasks.few_shot_tasks``
(meta-training classes 0-5, meta-test classes 6-9). Each task adapts by T plain SGD steps
(MAML's inner loop) on its support set; TorchOpt's Adam updates the hyperparameters with the
hypergradient averaged over a vmapped meta-batch.

- MAML: the hyperparameters are the whole initialization, exact hypergradient (``hf.unroll``).
- FOMAML: ``hf.fomaml(hf.first_order)``, i.e. dw_T/dw_0 ≈ I.
- ANIL: the hyperparameters are the body and the head's initialization; only the head adapts
  (``hf.unroll``, exact).
- MAML++ LSLR (``--lslr``; Antoniou et al. 2019): MAML whose inner learning rate is learned per step
  and per layer (one value per parameter tensor and inner step, starting at ``--inner-lr``), jointly
  with the initialization: ``hf.optim.sgd(lr=lambda h, t: hf.optim.pick(h["lslr"], t))``, exact
  hypergradient (``hf.unroll``). The learned rates are written to ``lslr.md``.

BatchNorm: in train mode, as in MAML, every forward normalizes with the statistics of its own
batch (support set in the inner loop, query set in the outer loss). The running statistics are
module buffers: every task starts from the module's initial buffers, ``hg(..., buffers=)`` carries
them through the T inner steps (per task under vmap) without differentiating them, and
``res.buffers`` returns them. Meta-test reports both modes: train-mode BN (the MAML protocol) and
eval-mode BN, which normalizes the query set with the running statistics carried by the adapted
task (T inner steps give them little time to warm up from their initial values).

    python examples/maml_conv_bn.py            # 1000 meta-iterations per method (about 7 min on 2 cores)
    python examples/maml_conv_bn.py --lslr     # and MAML++ LSLR in the same table
    python examples/maml_conv_bn.py --quick    # seconds (tests; with --lslr)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
import torchopt
from _common import figure, fmt_ci, results_dir, save, write_table
from fewshot_digits import digits_dataset
from tensordict import TensorDict
from torch import nn
from tqdm import tqdm

import hyperfunc as hf

TRAIN_CLASSES, TEST_CLASSES = range(0, 6), range(6, 10)


def conv4(channels: int, n_way: int, in_channels: int = 1, image: int = 8, running_stats: bool = True) -> nn.Sequential:
    """Four Conv-BN-ReLU blocks and a linear head; each block halves the feature map by a 2x2 max-pool
    while it is larger than 1x1 (8x8 digits: the first three blocks; 32x32 and 64x64 images: all four,
    as in Finn et al. 2017). ``running_stats=False`` gives BatchNorm no buffers: batch statistics only."""
    blocks, size = [], image
    for c_in in (in_channels, channels, channels, channels):
        layers = [nn.Conv2d(c_in, channels, 3, padding=1), nn.BatchNorm2d(channels, track_running_stats=running_stats)]
        layers.append(nn.ReLU())
        if size > 1:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        blocks.append(nn.Sequential(*layers))
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * size * size, n_way))


HEAD = "5"  # the key of the linear head in module_state(conv4(...))


def merged(*parts: TensorDict) -> TensorDict:
    """One params TensorDict from disjoint parts (the body from the hyperparameters, the head adapted)."""
    out = TensorDict({}, [])
    for part in parts:
        out.update(part)
    return out


def method(name: str, net: nn.Module, steps: int, lr: float):
    """``(transform, loop, loss, hparams, params0, full)`` of one method; ``full(p, h)`` is the params of the
    whole net (the body from the hyperparameters for ANIL). Inner and outer loss are the same cross-entropy."""
    params, _ = hf.module_state(net)
    opt = hf.optim.sgd(lr=lr)
    if name == "MAML++ LSLR":  # one learned rate per parameter tensor and inner step
        opt = hf.optim.sgd(lr=lambda h, t: hf.optim.pick(h["lslr"], t))

    if name == "ANIL":

        def full(p, h):
            return merged(h["body"], p)

        hparams = TensorDict({"body": params.exclude(HEAD), "head": params.select(HEAD)}, [])
        params0, transform = (lambda h: h["head"]), hf.unroll
    else:

        def full(p, h):
            return p

        hparams = TensorDict({"init": params}, [])
        if name == "MAML++ LSLR":
            hparams["lslr"] = params.apply(lambda p: torch.full((steps,), lr), batch_size=[])
        params0 = lambda h: h["init"]
        transform = hf.fomaml(hf.first_order) if name == "FOMAML" else hf.unroll

    def loss(p, h, batch, buffers):
        x, y = batch
        logits, buffers = hf.functional_call(net, full(p, h), buffers, x)
        return F.cross_entropy(logits, y), buffers

    loop = hf.InnerLoop(loss, opt, steps=steps, full_batch=True)
    return transform, loop, loss, hparams, params0, full


def meta_test(net, loop, hparams, params0, full, buffers, tasks) -> dict:
    """Adapt to each task, then classify its query set with train-mode and eval-mode BatchNorm."""
    n = tasks.x_train.shape[0]
    many = torch.stack([buffers] * n)
    run = torch.func.vmap(loop.run, in_dims=(None, None, 0, 0))
    adapted, carried = run(hparams, params0, tasks.inner_batches, many)
    evaluated = copy.deepcopy(net).eval()

    def accuracy(module, p, b, x, y):
        logits, _ = hf.functional_call(module, full(p, hparams), b, x)
        return (logits.argmax(-1) == y).double().mean()

    inputs = (adapted, carried, tasks.x_val, tasks.y_val)
    train_mode = torch.func.vmap(lambda p, b, x, y: accuracy(net, p, b, x, y))(*inputs)
    eval_mode = torch.func.vmap(lambda p, b, x, y: accuracy(evaluated, p, b, x, y))(*inputs)
    return {"train": 100 * train_mode, "eval": 100 * eval_mode}


def write_lslr(out, lslr: TensorDict, args) -> None:
    """The learned learning rate of every parameter tensor (rows) at every inner step (columns)."""
    rows = [
        {"parameter": ".".join(key), **{f"step {t}": f"{lrs[t].item():.3f}" for t in range(args.steps)}}
        for key, lrs in lslr.items(include_nested=True, leaves_only=True)
    ]
    write_table(out, "lslr", rows, f"MAML++ LSLR: learned inner learning rates (all start at {args.inner_lr})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few meta-iterations on a narrow net (tests)")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--way", type=int, default=4)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="inner SGD steps T")
    parser.add_argument("--inner-lr", type=float, default=0.4)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--test-tasks", type=int, default=500)
    parser.add_argument("--lslr", action="store_true", help="add MAML++ per-step per-layer learning rates")
    parser.add_argument("--out", default="results/maml_conv_bn")
    args = parser.parse_args()
    if args.quick:
        args.iterations, args.meta_batch, args.channels, args.test_tasks, args.steps = 3, 2, 4, 8, 2
        args.lslr = True
    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = results_dir(args.out)
    data = digits_dataset()
    labels = [c for _, c in data]

    def sample(n, classes, generator):
        return hf.tasks.few_shot_tasks(
            data, args.way, args.shots, args.queries, n, classes=classes, labels=labels, generator=generator
        )

    test_tasks = sample(args.test_tasks, TEST_CLASSES, torch.Generator().manual_seed(1234))
    # new tasks drawn from the meta-training classes: how much of the result is specialization to them
    seen_tasks = sample(args.test_tasks, TRAIN_CLASSES, torch.Generator().manual_seed(4321))
    rows, curves = [], {}
    untrained = untrained_seen = None
    for name in ("MAML", "FOMAML", "ANIL", "MAML++ LSLR")[: 4 if args.lslr else 3]:
        torch.manual_seed(0)
        net = conv4(args.channels, args.way)
        _, buffers = hf.module_state(net)
        transform, loop, loss, hparams, params0, full = method(name, net, args.steps, args.inner_lr)
        if untrained is None:
            untrained = meta_test(net, loop, hparams, params0, full, buffers, test_tasks)
            untrained_seen = meta_test(net, loop, hparams, params0, full, buffers, seen_tasks)
        hg = torch.func.vmap(transform(loop, loss), in_dims=(None, None, 0, 0, 0))
        meta_opt = torchopt.adam(1e-3)
        meta_state = meta_opt.init(hparams)
        many = torch.stack([buffers] * args.meta_batch)
        generator = torch.Generator().manual_seed(0)
        losses, start = [], time.perf_counter()
        for _ in tqdm(range(args.iterations), desc=name, disable=args.quick):
            tasks = sample(args.meta_batch, TRAIN_CLASSES, generator)
            res = hg(hparams, params0, tasks.inner_batches, tasks.outer_batch, many)
            updates, meta_state = meta_opt.update(res.grads.mean(0), meta_state, params=hparams)
            hparams = torchopt.apply_updates(hparams, updates, inplace=False)
            losses.append(res.loss.mean().item())
        seconds = (time.perf_counter() - start) / args.iterations
        curves[name] = losses
        if name == "MAML++ LSLR":
            write_lslr(out, hparams["lslr"], args)
        acc = meta_test(net, loop, hparams, params0, full, buffers, test_tasks)
        seen = meta_test(net, loop, hparams, params0, full, buffers, seen_tasks)
        rows.append(
            {
                "method": name,
                "hypergradient": "hf.fomaml(hf.first_order)" if name == "FOMAML" else "hf.unroll",
                "meta-test acc. % (train-mode BN)": fmt_ci(acc["train"], 1),
                "meta-test acc. % (eval-mode BN)": fmt_ci(acc["eval"], 1),
                "new tasks of the training classes % (train-mode BN)": fmt_ci(seen["train"], 1),
                "s / meta-iteration": f"{seconds:.3f}",
            }
        )
    rows.insert(
        0,
        {
            "method": "no meta-training",
            "hypergradient": "-",
            "meta-test acc. % (train-mode BN)": fmt_ci(untrained["train"], 1),
            "meta-test acc. % (eval-mode BN)": fmt_ci(untrained["eval"], 1),
            "new tasks of the training classes % (train-mode BN)": fmt_ci(untrained_seen["train"], 1),
            "s / meta-iteration": "-",
        },
    )
    title = (
        f"{args.way}-way {args.shots}-shot digits, Conv-4 ({args.channels} ch.) with BatchNorm, T = {args.steps}, "
        f"{args.iterations} meta-iterations x {args.meta_batch} tasks; mean ± 95% interval over {args.test_tasks} "
        "meta-test tasks"
    )
    write_table(out, "maml_conv_bn", rows, title)
    fig, ax = figure(figsize=(6, 4))
    window = max(1, args.iterations // 20)
    for name, values in curves.items():
        smooth = torch.tensor(values).unfold(0, window, 1).mean(-1) if len(values) >= window else torch.tensor(values)
        ax.plot(range(window, window + len(smooth)), smooth, label=name)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"query cross-entropy after adaptation (moving mean of {window})")
    ax.set_title(f"Conv-4 + BatchNorm on {args.way}-way {args.shots}-shot digits")
    ax.legend()
    save(fig, out, "maml_conv_bn")


if __name__ == "__main__":
    main()
