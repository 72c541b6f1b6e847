"""WarpGrad's warp layers meta-learned online (HyperDistill, Lee et al. 2022, Sec. 5; Flennerhag et al. 2020).

WarpGrad (Flennerhag et al., *Meta-Learning with Warped Gradient Descent*, ICLR 2020) interleaves the
task learner's layers with *warp layers* that never adapt inside a task: they precondition its
gradient descent, and they are what meta-learning learns. HyperDistill's setup (Sec. 5): a 3-layer
convolutional task learner with 32 channels, every task layer followed by two warp layers.

- Weights w (adapted inside each task by T SGD steps, momentum 0.9, lr 0.01; initialization φ
  meta-learned by Reptile, rate 1): three task blocks (conv 3x3, BatchNorm with batch statistics) and
  the linear head.
- Hyperparameter λ: the warp layers (two conv 3x3 + ReLU after each task block, before its 2x2
  max-pool), updated online after every inner step by TorchOpt's Adam with the hypergradient of the
  method, averaged over a vmapped meta-batch (``meta_train`` of ``sinusoid_anil.py``, Algorithm 3).
- Tasks: 4-way digits (scikit-learn's 8x8 images, meta-training classes 0-5, meta-test classes 6-9),
  25 shots, so every inner step sees the paper's batch of 100 images, and 25 queries per class.

Meta-test: adapt from the learned φ with the learned warps on unseen-class tasks; query accuracy.
``benchmarks/hyperdistill_costs.py`` runs the same model at the paper's shapes (3x32x32 and
3x64x64, 10-way, T = 100) for the cost table (HyperDistill, Table 3).

    python examples/warpgrad.py            # 2 runs x 10 inner optimizations x 5 methods (4.7 min alone, 2 cores)
    python examples/warpgrad.py --quick    # seconds (tests)
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from _common import figure, fmt_ci, results_dir, save, write_table
from fewshot_digits import digits_dataset
from maml_conv_bn import merged
from sinusoid_anil import meta_train, methods
from torch import nn

import hyperfunc as hf

TRAIN_CLASSES, TEST_CLASSES = range(0, 6), range(6, 10)
METHODS = ("FO", "one_step", "HyperDistill(γ=0.99), θ refit every 50", "N.IFT(5,10)", "drmad")


class WarpGradNet(nn.Module):
    """Three task blocks (conv 3x3, BatchNorm with batch statistics, ReLU), each followed by two warp
    layers (conv 3x3, ReLU) and a 2x2 max-pool while the map is larger than 1x1, then a linear head
    (``task``, ``warp`` and ``head`` in :func:`hyperfunc.module_state`)."""

    def __init__(self, channels: int, n_way: int, in_channels: int = 1, image: int = 8):
        super().__init__()
        task, warp, size = [], [], image
        for c_in in (in_channels, channels, channels):
            task.append(
                nn.Sequential(
                    nn.Conv2d(c_in, channels, 3, padding=1), nn.BatchNorm2d(channels, track_running_stats=False)
                )
            )
            warp.append(
                nn.Sequential(*[m for _ in range(2) for m in (nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())])
            )
            size = size // 2 if size > 1 else size
        self.task, self.warp = nn.ModuleList(task), nn.ModuleList(warp)
        self.head = nn.Linear(channels * size * size, n_way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for task, warp in zip(self.task, self.warp):
            x = warp(F.relu(task(x)))
            x = F.max_pool2d(x, 2) if x.shape[-1] > 1 else x
        return self.head(x.flatten(1))


def problem(
    channels: int, n_way: int, steps: int, in_channels: int = 1, image: int = 8, lr: float = 0.01, seed: int = 0
):
    """``(MetaProblem, predict)``: hparams ``{"warp"}``, params0 the task blocks and the head; ``predict(p, h, x)``
    gives the logits. Inner and outer losses are the cross-entropy of the same network (λ enters both)."""
    torch.manual_seed(seed)
    net = WarpGradNet(channels, n_way, in_channels, image)
    params, _ = hf.module_state(net)

    def predict(p, h, x):
        return hf.functional_call(net, merged(p, h), None, x)[0]

    def loss(p, h, batch):
        x, y = batch
        return F.cross_entropy(predict(p, h, x), y)

    loop = hf.InnerLoop(loss, hf.optim.sgd(lr=lr, momentum=0.9), steps=steps, full_batch=True)
    hparams = params.select("warp")
    return hf.tasks.MetaProblem(loop, loss, hparams, params.exclude("warp")), predict


def accuracy(problem, predict, hparams, head, tasks) -> torch.Tensor:
    """Per-task query accuracy (%) after the inner optimization from ``head`` with warps ``hparams``."""
    n = tasks.x_train.shape[0]
    final = torch.func.vmap(problem.loop.run, in_dims=(None, 0, 0))(
        hparams, head.expand(n).clone(), tasks.inner_batches
    )
    hits = torch.func.vmap(lambda p, x, y: (predict(p, hparams, x).argmax(-1) == y).double().mean())
    return 100 * hits(final, tasks.x_val, tasks.y_val)


def digits_parser(doc: str, name: str, shots: int, meta_lr: float, methods: tuple) -> argparse.ArgumentParser:
    """The command line shared by the online digits examples (this one and ``meta_weight_net.py``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=10, help="inner optimizations per run")
    parser.add_argument("--steps", type=int, default=20, help="inner steps T (the paper: 100)")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--n-way", type=int, default=4)
    parser.add_argument("--shots", type=int, default=shots, help="per class: n_way * shots is the inner batch")
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=4, help="the paper's 4")
    parser.add_argument("--meta-lr", type=float, default=meta_lr, help="Adam's learning rate for λ")
    parser.add_argument("--reptile-lr", type=float, default=1.0)
    parser.add_argument("--test-tasks", type=int, default=200)
    parser.add_argument("--methods", nargs="*", default=list(methods))
    parser.add_argument("--out", default=f"results/{name}")
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests")
    return parser


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.episodes, args.steps, args.channels, args.meta_batch = 1, 2, 3, 4, 2
        args.shots, args.queries, args.test_tasks = 3, 3, 6
    return args


def digits_tasks(args: argparse.Namespace):
    """``few_shot(n_tasks, classes, generator=...) -> Tasks``: few-shot tasks of scikit-learn's digits with
    the command line's ways, shots and queries (shared with ``meta_weight_net.py``)."""
    data = digits_dataset()
    labels = [c for _, c in data]
    return partial(hf.tasks.few_shot_tasks, data, args.n_way, args.shots, args.queries, labels=labels)


def compare(args, table: dict, build, sample, evaluate, ax) -> dict:
    """``name -> (results per run, mean meta-training curve)``: "no meta-training" first (curve None), then every
    method of ``args.methods`` meta-trained by ``meta_train`` on ``sample``'s tasks, its mean curve plotted on
    ``ax``. ``build(run) -> (problem, predict)``; ``evaluate(problem, predict, hparams, head)`` gives one run's
    result."""
    untrained = []
    for run in range(args.runs):
        base, predict = build(run)
        untrained.append(evaluate(base, predict, base.hparams, base.params0))
    out = {"no meta-training": (untrained, None)}
    for name in args.methods:
        results, curves = [], []
        for run in range(args.runs):
            base, predict = build(run)
            hparams, head, curve, _ = meta_train(name, table[name], base, args, run, sample=sample)
            results.append(evaluate(base, predict, hparams, head))
            curves.append(curve)
        curve = torch.tensor(curves).mean(0)
        ax.plot(range(1, len(curve) + 1), curve, label=name)
        out[name] = (results, curve)
    return out


def main(argv=None):
    args = parse(digits_parser(__doc__, "warpgrad", shots=5, meta_lr=1e-3, methods=METHODS), argv)
    torch.manual_seed(0)
    out = results_dir(args.out)
    few_shot = digits_tasks(args)
    test_tasks = few_shot(args.test_tasks, TEST_CLASSES, generator=torch.Generator().manual_seed(10_000))
    fig, ax = figure(figsize=(6, 4))
    runs = compare(
        args,
        methods(args.steps),
        lambda run: problem(args.channels, args.n_way, args.steps, seed=run),
        partial(few_shot, classes=TRAIN_CLASSES),
        lambda base, predict, hparams, head: accuracy(base, predict, hparams, head, test_tasks).mean(),
        ax,
    )
    rows = [
        {
            "method": name,
            "meta-test acc. (%)": fmt_ci(scores),
            "last meta-train loss": "" if curve is None else f"{curve[-1]:.3f}",
        }
        for name, (scores, curve) in runs.items()
    ]
    ax.set(xlabel="inner optimization", ylabel=f"query loss at w_T (mean of {args.runs} runs)")
    ax.legend(fontsize=7)
    save(fig, out, "warpgrad")
    title = (
        f"WarpGrad, {args.n_way}-way digits (meta-test classes 6-9), T = {args.steps}, {args.episodes} inner "
        f"optimizations; accuracy over {args.test_tasks} tasks, mean ± 95% CI over {args.runs} runs"
    )
    write_table(out, "warpgrad", rows, title)
    return rows


if __name__ == "__main__":
    main()
