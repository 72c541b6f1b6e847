"""Stress run of the compiled route with module state: Conv-BN MAML through ``hf.compile(hf.vmap(...))``.

MAML (``unroll``, the initialization learned) on the Conv-4 BatchNorm backbone of
``benchmarks/compile_payoff.py`` (``--channels`` wide), 4-way 1-shot tasks of scikit-learn's digits
with 10 queries per class, T inner SGD steps, a meta-batch of per-task BatchNorm buffers, float32,
TorchOpt Adam. Every iteration changes the hyperparameters (the Adam step) and draws new tasks; the
outer loss closes over a Python float (a label-smoothing factor) that changes every
``--closure-every`` iterations. Measured:

- resident memory (RSS) every 50 iterations: after the warm-up it must stay flat;
- every ``--check-every`` (100) iterations, the compiled call against the eager ``hf.vmap`` call on the same inputs:
  the relative L2 difference of the meta-gradient over all leaves (per leaf it is meaningless here: the
  convolutions' biases feed BatchNorm, which cancels them, so their exact gradient is 0 and both routes
  return float32 rounding);
- compilations after the warm-up: dynamo's frame count (one per kernel), and hf.compile's closure
  guard, which compiles again (with a ``RuntimeWarning``) when a closed-over value changed and
  never otherwise.

Run alone (two processes on 2 cores slow each other down):  python benchmarks/stress_compiled.py
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch._dynamo.testing
import torch.nn.functional as F
import torchopt
from _measure import markdown
from compile_payoff import conv4
from stress import rss_mib

import hyperfunc as hf

IN_DIMS = (None, None, 0, 0, 0)  # the init (shared), params0 (a function of it), support, query, buffers


def digits_sampler(way: int, queries: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    data = [(torch.as_tensor(img, dtype=torch.float32).reshape(1, 8, 8) / 16.0, int(c)) for img, c in zip(x, y)]
    labels = [c for _, c in data]

    def sample(n: int, generator: torch.Generator):
        return hf.tasks.few_shot_tasks(data, way, 1, queries, n, labels=labels, generator=generator)

    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2, help="T inner steps (one kernel: segment = T)")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--closure-every", type=int, default=250, help="iterations between closure changes")
    parser.add_argument("--check-every", type=int, default=100, help="iterations between checks against eager")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    way, queries = 4, 10
    net = conv4(args.channels, way)
    init, buffers = hf.module_state(net)
    smoothing = 0.0  # read by the outer loss from its closure

    def inner(p, h, batch, b):
        logits, b = hf.functional_call(net, p, b, batch[0])
        return F.cross_entropy(logits, batch[1]), b

    def outer(p, h, batch, b):
        logits, b = hf.functional_call(net, p, b, batch[0])
        return F.cross_entropy(logits, batch[1], label_smoothing=smoothing), b

    def from_init(h):
        return h

    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.4), steps=args.steps, full_batch=True)
    hg = hf.unroll(loop, outer)
    eager = hf.vmap(hg, in_dims=IN_DIMS)
    counter = torch._dynamo.testing.CompileCounterWithBackend(args.backend)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=args.steps, backend=counter)
    sample = digits_sampler(way, queries)
    generator = torch.Generator().manual_seed(0)
    meta_opt = torchopt.adam(1e-3)
    hparams, state = init, meta_opt.init(init)
    many = torch.stack([buffers] * args.tasks)
    rss, checks, guard_warnings, frames_at_warmup = [], [], 0, None
    start = time.perf_counter()
    first_call = None
    for it in range(1, args.iterations + 1):
        if it % args.closure_every == 0:
            smoothing = 0.05 * (it // args.closure_every)
        tasks = sample(args.tasks, generator)
        call = (hparams, from_init, tasks.inner_batches, tasks.outer_batch, many)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            res = fast(*call)
            if first_call is None:
                first_call = time.perf_counter() - t0
        guard_warnings += sum(str(w.message).startswith("hf.compile: a value") for w in caught)
        if it % args.check_every == 0:
            reference = eager(*call).grads.mean(0)
            got = res.grads.mean(0)
            diff = torch.cat([(a - b).flatten() for a, b in zip(got.values(True, True), reference.values(True, True))])
            ref = torch.cat([b.flatten() for b in reference.values(True, True)])
            checks.append((it, (diff.norm() / ref.norm()).item(), smoothing, rss_mib()))
        updates, state = meta_opt.update(res.grads.mean(0), state, params=hparams)
        hparams = torchopt.apply_updates(hparams, updates, inplace=False)
        if it == min(100, args.iterations):
            frames_at_warmup = counter.frame_count
        if it % 50 == 0 or it == args.iterations:
            rss.append((it, rss_mib()))
    seconds = time.perf_counter() - start
    after = [m for it, m in rss if it >= 100] or [m for _, m in rss]
    changes = args.iterations // args.closure_every
    rows = [
        {
            "iterations": args.iterations,
            "first call (s)": f"{first_call:.1f}",
            "s / iteration (incl. recompiles and checks)": f"{seconds / args.iterations:.3f}",
            "RSS after warm-up / at end (MiB)": f"{after[0]:.0f} / {after[-1]:.0f}",
            "RSS max - min after warm-up (MiB)": f"{max(after) - min(after):.1f}",
            "closure changes": changes,
            "guard warnings": guard_warnings,
            "kernels compiled at warm-up / at end": f"{frames_at_warmup} / {counter.frame_count}",
            "largest ‖compiled − eager‖ / ‖eager‖": f"{max(r for _, r, _, _ in checks):.1e}",
        }
    ]
    print(
        f"\nConv-4 ({args.channels} ch.) BatchNorm MAML, T = {args.steps}, {args.tasks} tasks, {args.backend}, "
        f"{args.threads} threads; a closed-over float changes every {args.closure_every} iterations\n"
    )
    print(markdown(rows, list(rows[0])))
    print("\nchecks against eager: the meta-gradient's relative L2 difference, the closed-over value, RSS")
    checked = [
        {"iteration": i, "‖compiled − eager‖ / ‖eager‖": f"{r:.1e}", "smoothing": f"{s:.2f}", "RSS (MiB)": f"{m:.0f}"}
        for i, r, s, m in checks
    ]
    print(markdown(checked, list(checked[0])))


if __name__ == "__main__":
    main()
