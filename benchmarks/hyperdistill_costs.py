"""HyperDistill's cost table (Lee et al. 2022, Appendix F, Table 3) at the paper's scale, beside the paper's ratios.

One inner optimization per method and model, for one task (Table 3 is per process; the paper runs
4 processes, one task each), on random data of the paper's shapes: T = 100 SGD steps (momentum 0.9;
lr 0.01, Meta-Weight-Net 0.1) on batches of 100 images drawn from 2500 training examples of 10
classes, validation batches of 100. Models, 32 channels:

- ANIL: Conv-4 (``examples/maml_conv_bn.conv4``, BatchNorm with batch statistics); the first three
  blocks are λ, the 4th block and the head are w. The body runs inside the loss, not in
  ``InnerLoop(prepare=...)``: an offline transform prepares all T batches at once and keeps their
  graph for one VJP (O(T) memory, 100 batches of 64x64 activations), where a step keeps one.
- WarpGrad: ``examples/warpgrad.py`` (3 task blocks = w, 2 warp layers each = λ).
- Meta-Weight-Net: ``examples/meta_weight_net.py`` (Conv-4 = w, the 1-200-1 weighting net = λ).

Columns: ANIL tinyImageNet (3x64x64), WarpGrad CIFAR100 (3x32x32), WarpGrad tinyImageNet (3x64x64),
Meta-Weight-Net CIFAR100 (3x32x32). Methods as the paper runs them; an online hypergradient updates λ
by SGD (momentum 0.9, lr 1e-3) right after its step (Algorithm 3):

- FO: a plain inner step, then ∂λ L_val(w_t) after every step (none for Meta-Weight-Net: g^FO = 0).
- 1-step: ``hf.online.one_step`` after every step.
- DrMAD: ``hf.drmad`` once per inner optimization (T steps, then 2T - 1 Jacobian products).
- N.IFT(5, 10): plain steps, then ``hf.online.implicit("neumann", 5)`` over the last 10 steps (its
  state is started at step 0, which computes the stationarity scale ‖∇L_in(w_0)‖ and one IFT).
- HyperDistill: ``hf.online.distill(0.99, θ)`` after every step, plus ``hf.linear_estimation`` once
  every 50 inner optimizations (the paper's period), its time divided by 50 (Meta-Weight-Net: θ = 1
  fixed, no estimation, as the paper's π* = 1).

Measured: seconds per inner optimization (one timed run after a 2-step warm-up), and the peak bytes of
live tensors during a ``--memory-steps`` run (``hyperfunc._memory.PeakBytes``; inputs excluded;
every method keeps O(1) state in T, so its peak does not grow with T). Ratios are to 1-step, the one
method every column has.

    python benchmarks/hyperdistill_costs.py               # the full table (about 50 min on 2 CPU cores)
    python benchmarks/hyperdistill_costs.py --quick       # seconds: small shapes, T = 4
    python benchmarks/hyperdistill_costs.py --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchopt

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from _measure import markdown, peak_bytes  # noqa: E402
from maml_conv_bn import conv4  # noqa: E402

import hyperfunc as hf  # noqa: E402

MiB = 2**20
CLASSES, BATCH, POOL, PERIOD, GAMMA, NIFT = 10, 100, 2500, 50, 0.99, (5, 10)
# Table 3 of the paper (RTX 2080 Ti): (MB, s per inner optimization); None: N/A
PAPER = {
    "FO": [(1430, 6.23), (1092, 5.24), (1840, 7.01), None],
    "1-step": [(1584, 6.80), (1650, 6.88), (3844, 18.81), (1214, 6.17)],
    "DrMAD": [(1442, 20.88), (1734, 19.83), (4148, 57.09), (1262, 17.57)],
    "N.IFT": [(1392, 7.98), (1578, 7.43), (3286, 21.49), (1262, 6.93)],
    "HyperDistill": [(1638, 6.92), (1714, 8.68), (4098, 22.15), (1206, 6.04)],
}
COLUMNS = [("ANIL", 64, "tinyImageNet"), ("WarpGrad", 32, "CIFAR100"), ("WarpGrad", 64, "tinyImageNet"),
           ("MetaWeightNet", 32, "CIFAR100")]  # fmt: skip


def anil(channels: int, image: int, steps: int, seed: int = 0) -> hf.tasks.MetaProblem:
    """ANIL as HyperDistill splits Conv-4: blocks 0-2 are the hyperparameter, block 3 and the head the weights."""
    torch.manual_seed(seed)
    net = conv4(channels, CLASSES, 3, image, running_stats=False)
    body, top = net[:3], net[3:]

    def features(h, x):
        return hf.functional_call(body, h, None, x)[0]

    def logits(p, f):
        return hf.functional_call(top, p, None, f)[0]

    def loss(p, h, batch):
        x, y = batch
        return F.cross_entropy(logits(p, features(h, x)), y)

    loop = hf.InnerLoop(loss, hf.optim.sgd(lr=0.01, momentum=0.9), steps=steps, full_batch=True)
    hparams, _ = hf.module_state(body)
    weights, _ = hf.module_state(top)
    return hf.tasks.MetaProblem(loop, loss, hparams, weights)


def model(name: str, channels: int, image: int, steps: int) -> hf.tasks.MetaProblem:
    if name == "ANIL":
        return anil(channels, image, steps)
    if name == "WarpGrad":
        from warpgrad import problem
    else:
        from meta_weight_net import problem
    return problem(channels, CLASSES, steps, in_channels=3, image=image)[0]


def data(image: int, steps: int, device: str, seed: int = 0) -> tuple:
    """Per-step training batches (``steps`` of ``BATCH`` images drawn from a pool of ``POOL``) and one
    validation batch, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, 3, image, image, generator=g)
    labels = torch.randint(CLASSES, (POOL,), generator=g)
    picks = torch.stack([torch.randperm(POOL, generator=g)[:BATCH] for _ in range(steps)])
    val = (torch.randn(BATCH, 3, image, image, generator=g), torch.randint(CLASSES, (BATCH,), generator=g))
    batches = [(pool[i].to(device), labels[i].to(device)) for i in picks]
    return batches, tuple(v.to(device) for v in val)


class Runner:
    """One inner optimization of each method on one problem and its data."""

    def __init__(self, problem: hf.tasks.MetaProblem, batches: list, val: tuple, device: str):
        self.problem, self.batches, self.val = problem, batches, val
        self.hparams = problem.hparams.to(device)
        self.params0 = problem.params0.to(device)
        self.meta = torchopt.sgd(1e-3, momentum=0.9)
        self.grad_outer = torch.func.grad(problem.outer_loss, argnums=1)
        self.grad_inner = torch.func.grad(problem.loop.inner_loss)

    def apply(self, h, state, grads):
        updates, state = self.meta.update(grads, state, params=h)
        return torchopt.apply_updates(h, updates, inplace=False), state

    def plain_step(self, inner, h, batch):
        """One inner step without a hypergradient: the optimizer's update on the (prepared) batch's gradient."""
        loop = self.problem.loop
        batch = loop.prepare(h, batch) if loop.prepare is not None else batch
        return loop.optimizer.update(inner, self.grad_inner(inner["params"], h, batch), h)

    def fo(self, steps: int):
        h = self.hparams
        meta, inner = self.meta.init(h), self.problem.loop.optimizer.init(self.params0)
        for t in range(steps):
            inner = self.plain_step(inner, h, self.batches[t])
            h, meta = self.apply(h, meta, self.grad_outer(inner["params"], h, self.val))
        return h

    def online(self, factory, steps: int, start: int = 0):
        """The online method's step after every inner step from ``start`` on (plain steps before it, after the
        method's state is started by its step 0)."""
        h = self.hparams
        opt = factory(self.problem.loop, self.problem.outer_loss)
        meta, state = self.meta.init(h), opt.init(h, self.params0)
        for t in range(steps):
            if 0 < t < start:
                state = state._replace(inner=self.plain_step(state.inner, h, self.batches[t]))
                continue
            res, state = opt.step(state, h, self.batches[t], self.val, t)
            if t >= start:
                h, meta = self.apply(h, meta, res.grads)
        return h

    def drmad(self, steps: int):
        res = hf.drmad(*self.offline(steps))(self.hparams, self.params0, self.stacked(steps), self.val)
        return self.apply(self.hparams, self.meta.init(self.hparams), res.grads)[0]

    def estimation(self, steps: int):
        fit = hf.linear_estimation(GAMMA)(*self.offline(steps))
        return fit(self.hparams, self.params0, self.stacked(steps), self.val)

    def offline(self, steps: int) -> tuple:
        """The loop over ``steps`` per-step batches, and the outer loss, for an offline transform."""
        return dataclasses.replace(self.problem.loop, steps=steps, full_batch=False), self.problem.outer_loss

    def stacked(self, steps: int) -> tuple:
        return tuple(torch.stack(parts) for parts in zip(*self.batches[:steps]))

    def methods(self, weighting: bool) -> dict:
        """name -> (call(steps), Jacobian-vector products per inner optimization of T steps, as a function of T)."""
        n, k = NIFT
        out = {} if weighting else {"FO": (self.fo, lambda T: 0)}
        out["1-step"] = (lambda T: self.online(hf.online.one_step, T), lambda T: T)
        out["DrMAD"] = (self.drmad, lambda T: 2 * T - 1)
        out["N.IFT"] = (lambda T: self.online(hf.online.implicit("neumann", iters=n), T, start=T - k),
                        lambda T: (n + 1) * (k + 1))  # fmt: skip
        # θ = 1: the value of the fitted θ does not change the cost; Algorithm 4's is added in measure()
        out["HyperDistill"] = (lambda T: self.online(hf.online.distill(GAMMA, theta=1.0), T),
                               lambda T: T + (0 if weighting else (2 * T - 1) / PERIOD))  # fmt: skip
        return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(name: str, image: int, args) -> dict:
    """``method -> (MiB, s, JVPs)`` for one column."""
    problem = model(name, args.channels, image, args.steps)
    batches, val = data(image, args.steps, args.device)
    runner = Runner(problem, batches, val, args.device)
    out = {}
    for method, (call, jvps) in runner.methods(name == "MetaWeightNet").items():
        call(2)  # warm-up: kernels, allocator
        sync(args.device)
        start = time.perf_counter()
        call(args.steps)
        sync(args.device)
        seconds = time.perf_counter() - start
        memory = peak_bytes(lambda: call(args.memory_steps))
        if method == "HyperDistill" and name != "MetaWeightNet":  # + Algorithm 4 every PERIOD inner optimizations
            start = time.perf_counter()
            runner.estimation(args.steps)
            sync(args.device)
            seconds += (time.perf_counter() - start) / PERIOD
            memory = max(memory, peak_bytes(lambda: runner.estimation(args.memory_steps)))
        out[method] = (memory / MiB, seconds, jvps(args.steps))
        print(f"  {name} {image}x{image} {method}: {memory / MiB:.0f} MiB, {seconds:.2f} s", flush=True)
    return out


def table(results: list[dict], chosen: list[int], images: list[int]) -> list[dict]:
    """One row per model and method: ours and the paper's (memory, seconds), each with its ratio to 1-step."""
    rows = []
    for ours, i, image in zip(results, chosen, images):
        name, _, dataset = COLUMNS[i]
        base, paper_base = ours["1-step"], PAPER["1-step"][i]
        for method, paper in PAPER.items():
            row = {"model": f"{name} 3x{image}x{image} ({dataset})", "method": method}
            mine, theirs = ours.get(method), paper[i]
            if mine is None or theirs is None:
                rows.append({**row, "ours: MiB / s per inner opt. (ratio to 1-step)": "N/A (g^FO = 0)", "JVPs": "",
                             "paper: MB / s (ratio to 1-step)": "N/A"})  # fmt: skip
                continue
            ours_text = f"{mine[0]:.0f} MiB ({mine[0] / base[0]:.2f}x) / {mine[1]:.2f} s ({mine[1] / base[1]:.2f}x)"
            paper_text = (f"{theirs[0]} MB ({theirs[0] / paper_base[0]:.2f}x) / {theirs[1]} s "
                          f"({theirs[1] / paper_base[1]:.2f}x)")  # fmt: skip
            rows.append({**row, "ours: MiB / s per inner opt. (ratio to 1-step)": ours_text, "JVPs": f"{mine[2]:.0f}",
                         "paper: MB / s (ratio to 1-step)": paper_text})  # fmt: skip
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="inner steps T (the paper's 100)")
    parser.add_argument("--memory-steps", type=int, default=10, help="inner steps of the memory run")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--columns", type=int, nargs="*", default=list(range(len(COLUMNS))),
                        help=f"indices into {[f'{n} {i}x{i}' for n, i, _ in COLUMNS]}")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a quarter of the image size, 4 channels, T = 12 (tests)")
    args = parser.parse_args(argv)
    images = [COLUMNS[i][1] // (4 if args.quick else 1) for i in args.columns]
    if args.quick:
        args.steps, args.memory_steps, args.channels = 12, 12, 4
    torch.manual_seed(0)
    # N.IFT runs 10 of 100 SGD steps from a random start: far from stationary, as in the paper, and warned so
    warnings.filterwarnings("ignore", "implicit: w_T is not a stationary point", RuntimeWarning)
    results = [measure(COLUMNS[i][0], image, args) for i, image in zip(args.columns, images)]
    rows = table(results, args.columns, images)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"\n## One inner optimization (T = {args.steps}, batch {BATCH}, {args.channels} channels), {device}: "
          "peak live tensors / seconds, each with its ratio to 1-step, and Jacobian-vector products; "
          "the paper's Table 3 (RTX 2080 Ti) beside\n")  # fmt: skip
    print(markdown(rows, list(rows[0])))
    return rows


if __name__ == "__main__":
    main()
