"""Stress run: 1000 consecutive meta-iterations of the README quick start with every transform.

ANIL sinusoids (the problem of ``benchmarks/transforms.py``), T = 30 inner steps, a vmapped
meta-batch of 10 new tasks per iteration, TorchOpt Adam (1e-3) on the hyperparameters. The
resident memory (RSS) of the process is sampled every 50 iterations: after the first 100
iterations (allocator warm-up) it must not grow beyond noise, and no hypergradient, loss or
hyperparameter may become NaN or infinite.

Run alone (two processes on 2 cores slow each other down):  python benchmarks/stress.py
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torchopt

sys.path.insert(0, str(Path(__file__).parent))
from _measure import markdown  # noqa: E402
from transforms import transforms  # noqa: E402

import hyperfunc as hf  # noqa: E402


def rss_mib() -> float:
    """The resident set size now (Linux: /proc/self/statm), else the peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def finite(*trees) -> bool:
    """True when every tensor of the TensorDicts and tensors given is finite."""
    leaves = torch.utils._pytree.tree_leaves(trees)
    return all(bool(torch.isfinite(x).all()) for x in leaves if torch.is_tensor(x))


def stress(transform, make, steps: int, iterations: int, n_tasks: int, warmup: int, every: int) -> dict:
    problem = make(steps)
    hg = torch.func.vmap(transform(problem.loop, problem.outer_loss), in_dims=(None, 0, 0, 0))
    meta_opt = torchopt.adam(1e-3)
    hparams, state = problem.hparams, meta_opt.init(problem.hparams)
    heads = torch.stack([problem.params0] * n_tasks)
    generator = torch.Generator().manual_seed(0)
    samples, bad, start = [], 0, time.perf_counter()
    for it in range(1, iterations + 1):
        tasks = hf.tasks.sinusoid_tasks(n_tasks, generator=generator)
        res = hg(hparams, heads, tasks.inner_batches, tasks.outer_batch)
        updates, state = meta_opt.update(res.grads.mean(0), state, params=hparams)
        hparams = torchopt.apply_updates(hparams, updates, inplace=False)
        bad += not finite(res.grads, res.loss, hparams)
        if it % every == 0:
            samples.append((it, rss_mib()))
    seconds = (time.perf_counter() - start) / iterations
    after = [rss for it, rss in samples if it >= warmup]
    return {
        "RSS at warm-up (MiB)": f"{after[0]:.1f}",
        "RSS at end (MiB)": f"{after[-1]:.1f}",
        "growth after warm-up (MiB)": f"{after[-1] - after[0]:+.1f}",
        "max - min after warm-up (MiB)": f"{max(after) - min(after):.1f}",
        "non-finite iterations": bad,
        "final outer loss": f"{res.loss.mean().item():.3f}",
        "s / iteration": f"{seconds:.3f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run the transforms whose name contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warmup, every = min(100, args.iterations), max(1, min(50, args.iterations // 4))
    rows = []
    for name, (transform, make) in transforms(args.steps, args.only).items():
        row = {"transform": name, **stress(transform, make, args.steps, args.iterations, args.tasks, warmup, every)}
        rows.append(row)
        print(row, flush=True)
    print(
        f"\n{args.iterations} meta-iterations x {args.tasks} tasks, T = {args.steps}, {args.threads} threads; "
        f"RSS sampled every {every} iterations from iteration {warmup}\n"
    )
    print(markdown(rows, list(rows[0])))
    if any(row["non-finite iterations"] for row in rows) or not all(
        math.isfinite(float(r["final outer loss"])) for r in rows
    ):
        raise SystemExit("non-finite values in the stress run")


if __name__ == "__main__":
    main()
