"""Seconds, ratio to the no-graph floor, and peak memory of every transform on ANIL sinusoids.

Problem (HyperDistill Appendix G): MLP 1-100-100-100-1, the three hidden layers are the
hyperparameters (features computed once through ``prepare``), the last layer is the inner
parameter, 10-shot, SGD momentum 0.9, lr 0.01. ``forward`` is meant for few hyperparameters, so it
runs the same problem with the log learning rate and log weight decay as the hyperparameters.

Run alone (two processes on 2 cores slow each other down):  python benchmarks/transforms.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).parent))
from _measure import markdown, median_seconds, peak_bytes  # noqa: E402

import hyperfunc as hf  # noqa: E402


def lr_wd_problem(steps: int, **anil) -> hf.tasks.MetaProblem:
    """The ANIL problem with a frozen body and hparams = {log_lr, log_wd} (for ``forward``); ``anil`` goes
    to :func:`hyperfunc.tasks.anil_sinusoid` (hidden, dtype)."""
    base = hf.tasks.anil_sinusoid(steps=steps, **anil)
    dtype = base.params0["weight"].dtype
    opt = hf.optim.sgd(lr=lambda h: h["log_lr"].exp(), momentum=0.9, weight_decay=lambda h: h["log_wd"].exp())
    loop = hf.InnerLoop(base.loop.inner_loss, opt, steps=steps, full_batch=True, prepare=_frozen(base))
    hparams = TensorDict(
        {"log_lr": torch.tensor(0.01, dtype=dtype).log(), "log_wd": torch.tensor(1e-4, dtype=dtype).log()}, []
    )

    def outer(p, h, batch):
        return base.outer_loss(p, base.hparams, batch)

    return hf.tasks.MetaProblem(loop, outer, hparams, base.params0)


def _frozen(base):
    return lambda h, batch: base.loop.prepare(base.hparams, batch)


def plain_sgd_problem(steps: int, **anil) -> hf.tasks.MetaProblem:
    """The ANIL problem with plain SGD inside (HPO-SGLD's sampler has no momentum)."""
    return hf.tasks.anil_sinusoid(steps=steps, momentum=0.0, **anil)


def transforms(steps: int, only=None):
    every, burn_in = max(1, round(steps**0.5)), steps // 2
    table = {
        "unroll": (hf.unroll, hf.tasks.anil_sinusoid),
        f"unroll(checkpoint_every={every})": (
            lambda loop, outer: hf.unroll(loop, outer, checkpoint_every=every),
            hf.tasks.anil_sinusoid,
        ),
        "truncate(10)": (hf.truncate(10), hf.tasks.anil_sinusoid),
        "one_step": (hf.one_step, hf.tasks.anil_sinusoid),
        "first_order": (hf.first_order, hf.tasks.anil_sinusoid),
        "drmad": (hf.drmad, hf.tasks.anil_sinusoid),
        "greedy_accumulate(0.9)": (hf.greedy_accumulate(0.9), hf.tasks.anil_sinusoid),
        "implicit('neumann', 10)": (hf.implicit("neumann", iters=10), hf.tasks.anil_sinusoid),
        # damping 1 is iMAML's proximal term: this head's Hessian has rank <= 11 of 101 (10 shots), and undamped
        # CG's hypergradients drive the inner SGD unstable after ~600 meta-iterations (docs/benchmarks.md)
        "implicit('cg', 10, damping=1)": (hf.implicit("cg", iters=10, damping=1.0), hf.tasks.anil_sinusoid),
        "distill(0.99, theta=1)": (hf.distill(0.99, theta=1.0), hf.tasks.anil_sinusoid),
        "distill(0.99) + LinearEstimation": (hf.distill(0.99), hf.tasks.anil_sinusoid),
        f"langevin({burn_in}, {steps - burn_in}, 1e-5) [plain SGD]": (
            hf.langevin(burn_in, steps - burn_in, tau=1e-5, seed=0),
            plain_sgd_problem,
        ),
        "forward (lr, wd)": (hf.forward, lr_wd_problem),
    }
    return {k: v for k, v in table.items() if not only or any(o in k for o in only)}


def task_args(problem, n_tasks=None, seed=0):
    tasks = hf.tasks.sinusoid_tasks(n_tasks or 1, generator=torch.Generator().manual_seed(seed))
    pick = (lambda x: x) if n_tasks else (lambda x: x[0])
    inner = tuple(pick(x) for x in tasks.inner_batches)
    outer = tuple(pick(x) for x in tasks.outer_batch)
    params0 = torch.stack([problem.params0] * n_tasks) if n_tasks else problem.params0
    return problem.hparams, params0, inner, outer


def single_task_table(step_counts, reps, only=None):
    rows = []
    for steps in step_counts:
        for name, (transform, make) in transforms(steps, only).items():
            problem = make(steps)
            args = task_args(problem)
            hg = transform(problem.loop, problem.outer_loss)
            seconds, floor = median_seconds(lambda: hg(*args), lambda: problem.loop.run(*args[:3]), reps=reps)
            rows.append(
                {
                    "transform": name,
                    "T": steps,
                    "seconds": f"{seconds:.4f}",
                    "floor (s)": f"{floor:.4f}",
                    "x floor": f"{seconds / floor:.2f}",
                    "peak memory (KiB)": f"{peak_bytes(lambda: hg(*args)) / 1024:.0f}",
                }
            )
            print(rows[-1], flush=True)
    return rows


def meta_batch_table(steps, n_tasks, reps, only=None):
    rows = []
    for name, (transform, make) in transforms(steps, only).items():
        if make is lr_wd_problem:
            continue
        problem = make(steps)
        args = task_args(problem, n_tasks)
        batched_floor = torch.func.vmap(problem.loop.run, in_dims=(None, 0, 0))
        hg = transform(problem.loop, problem.outer_loss)
        vmapped = torch.func.vmap(hg, in_dims=(None, 0, 0, 0))
        split = [torch.utils._pytree.tree_map(lambda x, i=i: x[i], a) for i in range(n_tasks) for a in [args[1:]]]
        t_vmap, t_loop, floor = median_seconds(
            lambda: vmapped(*args),
            lambda: [hg(args[0], *s) for s in split],
            lambda: batched_floor(*args[:3]),
            reps=reps,
        )
        rows.append(
            {
                "transform": name,
                "vmap (s)": f"{t_vmap:.4f}",
                "loop (s)": f"{t_loop:.4f}",
                "loop / vmap": f"{t_loop / t_vmap:.1f}",
                "batched floor (s)": f"{floor:.4f}",
                "vmap x batched floor": f"{t_vmap / floor:.2f}",
            }
        )
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="run only the transforms whose name contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    single = single_task_table(args.steps, args.reps, args.only)
    batch = meta_batch_table(100, args.tasks, args.reps, args.only)
    print(f"\n## One task (torch {torch.__version__}, {args.threads} thread(s), median of {args.reps})\n")
    print(markdown(single, ["transform", "T", "seconds", "floor (s)", "x floor", "peak memory (KiB)"]))
    print(f"\n## Meta-batch of {args.tasks} tasks, T = 100\n")
    print(
        markdown(
            batch, ["transform", "vmap (s)", "loop (s)", "loop / vmap", "batched floor (s)", "vmap x batched floor"]
        )
    )


if __name__ == "__main__":
    main()
