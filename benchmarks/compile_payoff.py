"""When compiling pays off on a small CNN: first-call and per-call seconds of the eager and the two
compiled routes, and the meta-iterations after which a compiled route has saved its compile time.

Problem: MAML (``unroll``, learned initialization) on the Conv-4 BatchNorm backbone of
``examples/maml_conv_bn.py`` (four Conv3x3-BN-ReLU blocks, max-pool after the first three, 8x8
single-channel images, a linear head), 4-way 1-shot tasks with 10 queries per class, T inner SGD
steps (lr 0.4), meta-batch 8, per-task BatchNorm buffers, float32. Routes:

- eager: ``hf.vmap(hg, in_dims)``;
- whole loop: ``torch.compile(torch.func.vmap(hg, in_dims), fullgraph=True)`` (inductor);
- segments: ``hf.compile(hf.vmap(hg, in_dims), segment=T)`` (inductor; T <= k: the call is one kernel).

Each route runs in a fresh process per thread count ("cold": an empty inductor cache; "warm": a
second process on the cache the first left, what the second run of a script sees). The first call
includes compilation; the per-call time is the median of 5 repetitions after it
(``_measure.median_seconds``). "pays off after" is (first call - per call) / (eager per call -
per call) meta-iterations: the compile time divided by the time each call saves.

Run alone (two processes on 2 cores slow each other down):  python benchmarks/compile_payoff.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from _measure import markdown, median_seconds
from torch import nn

import hyperfunc as hf

ROUTES = ("eager", "whole loop", "segments")
IN_DIMS = (None, None, 0, 0, 0)  # hparams (the init), params0 (a function of it), support, query, buffers


def conv4(channels: int, n_way: int) -> nn.Sequential:
    def block(c_in: int, pool: bool) -> nn.Sequential:
        layers = [nn.Conv2d(c_in, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()]
        return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

    blocks = [block(1, True), block(channels, True), block(channels, True), block(channels, False)]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels, n_way))


def make(route: str, steps: int, channels: int, tasks: int = 8, way: int = 4, queries: int = 10):
    """``(call, hparams)``: one meta-batch's hypergradient by ``route``, and the init it differentiates."""
    torch.manual_seed(0)
    net = conv4(channels, way)
    init, buffers = hf.module_state(net)

    def loss(p, h, batch, b):
        logits, b = hf.functional_call(net, p, b, batch[0])
        return F.cross_entropy(logits, batch[1]), b

    def from_init(h):
        return h

    loop = hf.InnerLoop(loss, hf.optim.sgd(lr=0.4), steps=steps, full_batch=True)
    hg = hf.unroll(loop, loss)
    support = torch.randn(tasks, way, 1, 8, 8), torch.arange(way).repeat(tasks, 1)
    query = torch.randn(tasks, way * queries, 1, 8, 8), torch.arange(way).repeat(tasks, queries)
    args = (init, from_init, support, query, torch.stack([buffers] * tasks))
    fn = {
        "eager": lambda: hf.vmap(hg, in_dims=IN_DIMS),
        "whole loop": lambda: torch.compile(torch.func.vmap(hg, in_dims=IN_DIMS), fullgraph=True),
        "segments": lambda: hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=steps),
    }[route]()
    return (lambda: fn(*args).grads.mean(0)), init


def child(route: str, steps: int, channels: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    call, _ = make(route, steps, channels)
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    (per_call,) = median_seconds(call, reps=5)
    return {"first": first, "per_call": per_call}


def measure(route: str, steps: int, channels: int, threads: int, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--child", route, "--steps", str(steps), "--channels", str(channels)]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run([*cmd, "--threads", str(threads)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="inner steps T")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--child", choices=ROUTES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.channels, args.threads[0])))
        return
    rows = []
    for threads in args.threads:
        eager = None
        for route in ROUTES:
            with tempfile.TemporaryDirectory() as cache:
                cold = measure(route, args.steps, args.channels, threads, cache)
                warm = measure(route, args.steps, args.channels, threads, cache) if route != "eager" else None
            eager = eager or cold
            saved = eager["per_call"] - cold["per_call"]
            row = {
                "threads": threads,
                "route": route,
                "first call, cold (s)": f"{cold['first']:.1f}",
                "first call, warm (s)": "" if warm is None else f"{warm['first']:.1f}",
                "per call (ms)": f"{1e3 * cold['per_call']:.1f}",
                "x eager": f"{eager['per_call'] / cold['per_call']:.2f}",
                "pays off after (cold / warm)": (
                    ""
                    if route == "eager"
                    else "never"
                    if saved <= 0
                    else f"{(cold['first'] - cold['per_call']) / saved:.0f} / "
                    f"{(warm['first'] - warm['per_call']) / saved:.0f} meta-iterations"
                ),
            }
            rows.append(row)
            print(row, flush=True)
    print(
        f"\n## MAML on Conv-4 BN ({args.channels} channels), T = {args.steps}, meta-batch 8, 4-way 1-shot, "
        f"torch {torch.__version__}\n"
    )
    print(markdown(rows, list(rows[0])))


if __name__ == "__main__":
    main()
