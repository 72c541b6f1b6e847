"""How many aten operations one eager inner step costs: hyperfunc's eager ``unroll`` against the floor.

The problem of ``benchmarks/compiled.py`` (ANIL sinusoids, meta-batch 10, float32). A
``TorchDispatchMode`` counts the operations that reach the kernels (below ``vmap`` and the
gradient transforms) in one call at T and at 2T; their difference over T is the cost of one step,
without the fixed cost of the call. The floor (``floor_eager``, in place, one ``bmm`` per product)
is counted the same way. Counting, not timing: it can run beside other work.

    python benchmarks/eager_ops.py --steps 10
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import compiled  # noqa: E402
from _measure import markdown  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def ops_of(fn) -> collections.Counter:
    with _Count() as count:
        fn()
    return count.ops


def per_step(run, steps: int) -> dict:
    """``op -> count`` per step: the counts of ``run(2T)`` minus those of ``run(T)``, over T."""
    short, long = ops_of(lambda: run(steps)), ops_of(lambda: run(2 * steps))
    return {op: (long[op] - short[op]) / steps for op in long if long[op] != short[op]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    def unroll(steps):
        _, hg, inputs = compiled.make("unroll", steps)
        eager = torch.func.vmap(hg, in_dims=compiled.IN_DIMS)
        return lambda: eager(*inputs)

    def floor(steps):
        problem, _, inputs = compiled.make("unroll", steps)
        fin = compiled.floor_inputs(problem, inputs)
        return lambda: compiled.floor_eager(*fin, steps)

    runs = {"hyperfunc unroll, eager": unroll, "floor, hand-written, eager": floor}
    counts = {label: per_step(lambda n, make=make: make(n)(), args.steps) for label, make in runs.items()}
    rows = [{"route": label, "aten ops per step": f"{sum(c.values()):.0f}"} for label, c in counts.items()]
    print(markdown(rows, ["route", "aten ops per step"]))
    top = sorted(counts["hyperfunc unroll, eager"].items(), key=lambda kv: -kv[1])[:8]
    print("\n" + markdown([{"op": op, "per step": f"{n:.0f}"} for op, n in top], ["op", "per step"]))


if __name__ == "__main__":
    main()
