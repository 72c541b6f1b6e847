"""Peak memory of one vmapped MAML hypergradient: meta-batch size with and without chunking, and T with
the default reverse pass (every state kept, one step's graph at a time), checkpoints every √T steps,
and the whole graph (``checkpoint_every=T``).

MAML (``hf.unroll``) on the Conv-4 BatchNorm backbone of ``examples/maml_conv_bn.py`` (4-way 1-shot
digits, 10 queries per class, 32 channels, plain SGD). Every configuration runs in a fresh process
(``--one``), so one peak does not hide another: on CPU the peak is the growth of the resident set
(``ru_maxrss``) over the process's level just before the call; on CUDA it is
``torch.cuda.max_memory_allocated``. The time is the median of 3 calls after one warm-up.

    python benchmarks/memory.py                 # CPU, about 2 minutes on 2 cores
    python benchmarks/memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
from _measure import markdown  # noqa: E402

import hyperfunc as hf  # noqa: E402


def one(tasks: int, steps: int, chunk, checkpoint, device: str) -> dict:
    """Peak memory (MiB) and time (s) of one vmapped hypergradient call; run in its own process."""
    from fewshot_digits import digits_dataset
    from maml_conv_bn import TRAIN_CLASSES, conv4, method

    torch.set_num_threads(2)
    torch.manual_seed(0)
    net = conv4(32, 4).to(device)
    _, buffers = hf.module_state(net)
    _, loop, loss, hparams, params0, _ = method("MAML", net, steps, 0.4)
    hg = torch.func.vmap(
        hf.unroll(loop, loss, checkpoint_every=checkpoint), in_dims=(None, None, 0, 0, 0), chunk_size=chunk
    )
    data = digits_dataset()
    sample = hf.tasks.few_shot_tasks(
        data, 4, 1, 10, tasks, classes=TRAIN_CLASSES, generator=torch.Generator().manual_seed(0)
    )
    args = [sample.inner_batches, sample.outer_batch, torch.stack([buffers] * tasks)]
    args = torch.utils._pytree.tree_map(lambda x: x.to(device) if torch.is_tensor(x) else x, args)

    def call():
        res = hg(hparams, params0, *args)
        sum(x.sum() for x in res.grads.values(True, True))  # touch the result
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(3):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"peak": peak, "seconds": statistics.median(times)}


def measure(device: str, **config) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--device", device, "--one", json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(device=args.device, **json.loads(args.one))))
        return
    rows = []
    for tasks in (8, 16, 32, 64):
        for chunk in (None, 4):
            r = measure(args.device, tasks=tasks, steps=5, chunk=chunk, checkpoint=None)
            rows.append(
                {
                    "meta-batch": tasks,
                    "T": 5,
                    "vmap chunk_size": chunk or "-",
                    "checkpoint_every": "-",
                    "peak (MiB)": f"{r['peak']:.1f}",
                    "s / call": f"{r['seconds']:.3f}",
                }
            )
            print(rows[-1], flush=True)
    for steps in (10, 40, 160):
        for checkpoint in (None, round(steps**0.5), steps):  # default (one-step segments), √T, whole graph
            r = measure(args.device, tasks=8, steps=steps, chunk=None, checkpoint=checkpoint)
            rows.append(
                {
                    "meta-batch": 8,
                    "T": steps,
                    "vmap chunk_size": "-",
                    "checkpoint_every": checkpoint or "-",
                    "peak (MiB)": f"{r['peak']:.1f}",
                    "s / call": f"{r['seconds']:.3f}",
                }
            )
            print(rows[-1], flush=True)
    print(f"\nMAML hypergradient, Conv-4 BN (32 ch.), 4-way 1-shot digits, device {args.device}\n")
    print(markdown(rows, list(rows[0])))


if __name__ == "__main__":
    main()
