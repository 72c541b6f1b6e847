"""Compiled hypergradients against hand-written floors and the peers, on one problem, in one process.

Problem (HyperDistill Appendix G, the problem of ``benchmarks/transforms.py``): ANIL sinusoids, MLP
1-100-100-100-1, the body is the hyperparameter (features through ``prepare``), the head is trained
by T SGD steps (momentum 0.9, lr 0.01), meta-batch 10, float32. Every route returns the meta-batch
mean of dF/d(body); the "max rel. err." column checks it against hyperfunc's eager ``unroll``.

Routes:
- floor: the inner loop alone, hand-written, batched over tasks (one ``bmm`` per op), no graph:
  eager (in place), and compiled (a ``torch.compile``'d k-step segment in a Python loop);
- lower bound: the compiled floor plus the body's work that every hypergradient in the body does
  whatever its method: the features of the inner and outer batches and one pullback through the
  body for each (a second compiled call, whose fixed cost a fused route does not pay). The floor
  leaves that work out; at T = 10 it outweighs the steps;
- hyperfunc eager: ``torch.func.vmap(hg)``; ``torch.compile(torch.func.vmap(hg))`` (whole loop traced,
  T = 10 only: its compile time grows with T); ``hf.compile(hf.vmap(hg), segment=k)``, and with
  ``--cpp-wrapper`` also with ``options={"cpp_wrapper": True}`` (inductor's C++ wrapper); for ``unroll``
  also ``hf.compile(..., backend="eager")``: the same traced graphs run op by op, without inductor's code
  generation (a first call of seconds, no C compiler);
- eager lower bound: the unrolled loop batched by hand (one ``bmm`` per product) and differentiated by
  plain autograd, without ``torch.func``: what any autograd-based eager hypergradient costs at least;
- peers (T <= 100): a hand-written ``torch.func`` vmap of the unrolled loop, TorchOpt's functional
  SGD with autograd (a loop over tasks) and ``higher``'s ``innerloop_ctx`` (a loop over tasks).

Times are medians of 5 repetitions, the routes interleaved; each repetition times enough back-to-back
calls of a route to last about 20 ms and reports seconds per call (``_measure.median_seconds``): the
steady state of a training loop, not the caches the previous route left cold. The column
"x lower bound" divides by the lower bound's time.

Compile times are measured in fresh processes: "cold" with an empty inductor cache, "warm" with the
cache the cold process left (what a user sees on the second run of a script). ``--memory`` prints
the peak memory of one call per transform and route instead (a fresh process each, after two warm-up
calls: the growth of the resident set, see ``_measure.rss_peak_growth``).

Run alone (two processes on 2 cores slow each other down):  python benchmarks/compiled.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tensordict import TensorDict

sys.path.insert(0, str(Path(__file__).parent))
from _measure import markdown, median_seconds, rss_peak_growth  # noqa: E402

import hyperfunc as hf  # noqa: E402

LR, MOMENTUM, TASKS, SEGMENT = 0.01, 0.9, 10, 10
IN_DIMS = (None, 0, 0, 0)
CPP_WRAPPER = {"options": {"cpp_wrapper": True}}  # hf.compile's torch.compile arguments for inductor's C++ wrapper
LOWER_BOUND, ERROR = "lower bound: compiled floor + body fwd/bwd", "max rel. err. vs eager unroll"


def transforms() -> dict:
    """name -> (transform, momentum of the inner SGD); langevin (HPO-SGLD) needs plain SGD."""
    return {
        "unroll": (hf.unroll, MOMENTUM),
        "truncate(10)": (hf.truncate(10), MOMENTUM),
        "one_step": (hf.one_step, MOMENTUM),
        "first_order": (hf.first_order, MOMENTUM),
        "drmad": (hf.drmad, MOMENTUM),
        "greedy_accumulate(0.9)": (hf.greedy_accumulate(0.9), MOMENTUM),
        "langevin(T/2, T/2, 1e-5)": (None, 0.0),
        "distill(0.9, θ=1)": (hf.distill(0.9, theta=1.0), MOMENTUM),
        "implicit(cg, 10, damping=1)": (hf.implicit("cg", 10, damping=1.0), MOMENTUM),
        "forward (H = 1: the lr)": (hf.forward, MOMENTUM),
    }


def make(name: str, steps: int):
    transform, momentum = transforms()[name]
    if transform is None:
        transform = hf.langevin(steps // 2, steps - steps // 2, 1e-5, seed=0)
    problem = hf.tasks.anil_sinusoid(steps=steps, momentum=momentum)
    if transform is hf.forward:
        problem = learning_rate_problem(problem)
    tasks = hf.tasks.sinusoid_tasks(TASKS, generator=torch.Generator().manual_seed(0))
    heads = problem.params0.expand(TASKS).clone()
    args = (problem.hparams, heads, tasks.inner_batches, tasks.outer_batch)
    return problem, transform(problem.loop, problem.outer_loss), args


def learning_rate_problem(problem):
    """The same inner loop with its learning rate as the one hyperparameter and the body fixed: forward
    mode carries one tangent per scalar hyperparameter, so it is measured where it is meant to be used
    (H = 1, not the body's 20k scalars). The inner loop's cost is unchanged."""
    body = TensorDict({"body": problem.hparams["body"]}, [])
    loop = dataclasses.replace(
        problem.loop,
        optimizer=hf.optim.sgd(lr=lambda h: h["lr"], momentum=MOMENTUM),
        prepare=lambda h, batch: problem.loop.prepare(body, batch),
    )
    hparams = TensorDict({"lr": torch.tensor(LR)}, [])
    return problem._replace(loop=loop, outer_loss=lambda p, h, b: problem.outer_loss(p, body, b), hparams=hparams)


def flat(keys, tensors) -> torch.Tensor:
    """One vector, the leaves in sorted key order (TensorDicts may list their keys in any order)."""
    by_key = dict(zip(keys, tensors))
    return torch.cat([by_key[k].flatten() for k in sorted(by_key)])


def mean_grads(res) -> torch.Tensor:
    grads = res.grads
    return flat(grads.keys(True, True), [g.mean(0) for g in grads.values(True, True)])


# -- the floors: the inner loop alone, hand-written --------------------------------------------------
def floor_inputs(problem, args):
    """Features (computed once, no graph) and the batched head state."""
    hparams, heads, (x, y), _ = args
    with torch.no_grad():
        f = problem.loop.prepare(hparams, (x, y))[0]
    w, b = heads["weight"].clone(), heads["bias"].clone()  # (B, 1, H), (B, 1)
    return f, y, w, b


def floor_eager(f, y, w, b, steps: int):
    """T heavy-ball steps on mean((f wᵀ + b − y)²), in place, one bmm per product."""
    w, b = w.clone(), b.clone()
    mw, mb, scale = torch.zeros_like(w), torch.zeros_like(b), 2.0 / f.shape[1]
    for _ in range(steps):
        r = torch.baddbmm(b.unsqueeze(1), f, w.transpose(1, 2)).sub_(y)
        mw.mul_(MOMENTUM).add_(torch.bmm(r.transpose(1, 2), f), alpha=scale)
        mb.mul_(MOMENTUM).add_(r.sum(1), alpha=scale)
        w.sub_(mw, alpha=LR)
        b.sub_(mb, alpha=LR)
    return w, b


def floor_segment(f, y, w, b, mw, mb, n: int):
    scale = 2.0 / f.shape[1]
    for _ in range(n):
        r = torch.baddbmm(b.unsqueeze(1), f, w.transpose(1, 2)) - y
        mw = MOMENTUM * mw + scale * torch.bmm(r.transpose(1, 2), f)
        mb = MOMENTUM * mb + scale * r.sum(1)
        w, b = w - LR * mw, b - LR * mb
    return w, b, mw, mb


def floor_compiled(steps: int):
    kernels = {}

    def run(f, y, w, b):
        mw, mb = torch.zeros_like(w), torch.zeros_like(b)
        for start in range(0, steps, SEGMENT):
            n = min(SEGMENT, steps - start)
            if n not in kernels:
                kernels[n] = torch.compile(lambda *a, n=n: floor_segment(*a, n))
            w, b, mw, mb = kernels[n](f, y, w, b, mw, mb)
        return w, b

    return run


def body_work(problem, args):
    """The body's part of any hypergradient in the body, compiled: the features of the inner and the
    outer batch and one VJP through the body for each (the inner features' cotangent a fixed tensor,
    the outer one from the outer loss at the initial heads). No inner step."""
    hparams, heads, inner, outer = args
    features = problem.loop.prepare(hparams, inner)[0]
    cotangent = torch.randn(features.shape, generator=torch.Generator().manual_seed(0))

    def work(h):
        f = problem.loop.prepare(h, inner)[0]
        outer_losses = torch.func.vmap(problem.outer_loss, in_dims=(0, None, 0))(heads, h, outer)
        return outer_losses.sum() + (f * cotangent).sum()

    grad = torch.compile(torch.func.grad(work), fullgraph=True)
    return lambda: grad(hparams)


# -- the peers --------------------------------------------------------------------------------------
def functorch_unroll(problem, steps: int):
    """The unrolled loop written by hand with torch.func: grad of the outer loss in the body, vmapped."""
    relu_mlp = hf.tasks.relu_mlp

    def per_task(body, w, b, x, y, xv, yv):
        f = relu_mlp(body, x, final_relu=True)
        mw, mb = torch.zeros_like(w), torch.zeros_like(b)
        for _ in range(steps):
            gw, gb = torch.func.grad(lambda w, b: ((f @ w.T + b - y) ** 2).mean(), argnums=(0, 1))(w, b)
            mw, mb = MOMENTUM * mw + gw, MOMENTUM * mb + gb
            w, b = w - LR * mw, b - LR * mb
        return ((relu_mlp(body, xv, final_relu=True) @ w.T + b - yv) ** 2).mean()

    grad = torch.func.vmap(torch.func.grad(per_task), in_dims=(None, 0, 0, 0, 0, 0, 0))

    def run(args):
        hparams, heads, (x, y), (xv, yv) = args
        g = grad(hparams["body"], heads["weight"], heads["bias"], x, y, xv, yv)
        return flat(g.keys(True, True), [v.mean(0) for v in g.values(True, True)])

    return run


def autograd_unroll(problem, steps: int):
    """The unrolled loop batched by hand (one ``bmm`` per product, as the floor) and differentiated by plain
    autograd (``create_graph=True`` inner gradients), no ``torch.func``: the least an autograd-based
    eager hypergradient costs on this problem, with none of ``vmap``'s batching."""
    relu_mlp = hf.tasks.relu_mlp

    def loss(f, w, b, y):  # the per-task mean squared errors, summed over tasks
        return ((torch.baddbmm(b.unsqueeze(1), f, w.transpose(1, 2)) - y) ** 2).mean((1, 2)).sum()

    def run(args):
        hparams, heads, (x, y), (xv, yv) = args
        body, keys, leaves = _body(hparams)
        f = relu_mlp(body, x, final_relu=True)
        w, b = (heads[k].detach().requires_grad_() for k in ("weight", "bias"))
        mw, mb = torch.zeros_like(w), torch.zeros_like(b)
        for _ in range(steps):
            gw, gb = torch.autograd.grad(loss(f, w, b, y), (w, b), create_graph=True)
            mw, mb = MOMENTUM * mw + gw, MOMENTUM * mb + gb
            w, b = w - LR * mw, b - LR * mb
        outer = loss(relu_mlp(body, xv, final_relu=True), w, b, yv) / x.shape[0]
        return flat(keys, torch.autograd.grad(outer, leaves))

    return run


def _body(hparams):
    """The body as a TensorDict of fresh leaves that require grad, and those leaves (in hparams' order)."""
    body = hparams["body"].detach().clone().requires_grad_()
    return body, list(body.keys(True, True)), list(body.values(True, True))


def torchopt_unroll(steps: int):
    """TorchOpt's functional SGD (momentum) with autograd through the inner updates, a loop over tasks."""
    import torchopt

    relu_mlp = hf.tasks.relu_mlp
    opt = torchopt.sgd(LR, momentum=MOMENTUM)

    def run(args):
        hparams, heads, (x, y), (xv, yv) = args
        body, keys, leaves = _body(hparams)
        total = 0.0
        for i in range(x.shape[0]):
            f = relu_mlp(body, x[i], final_relu=True)
            params = tuple(heads[k][i].detach().requires_grad_() for k in ("weight", "bias"))
            state = opt.init(params)
            for _ in range(steps):
                loss = ((f @ params[0].T + params[1] - y[i]) ** 2).mean()
                grads = torch.autograd.grad(loss, params, create_graph=True)
                updates, state = opt.update(grads, state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            total = total + ((relu_mlp(body, xv[i], final_relu=True) @ params[0].T + params[1] - yv[i]) ** 2).mean()
        return flat(keys, torch.autograd.grad(total / x.shape[0], leaves))

    return run


def higher_unroll(steps: int):
    """``higher.innerloop_ctx`` around an ``nn.Linear`` head and ``torch.optim.SGD``, a loop over tasks."""
    import higher

    relu_mlp = hf.tasks.relu_mlp

    def run(args):
        hparams, heads, (x, y), (xv, yv) = args
        body, keys, leaves = _body(hparams)
        total = 0.0
        for i in range(x.shape[0]):
            head = torch.nn.Linear(heads["weight"].shape[-1], 1)
            with torch.no_grad():
                head.weight.copy_(heads["weight"][i])
                head.bias.copy_(heads["bias"][i])
            opt = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM)
            f = relu_mlp(body, x[i], final_relu=True)
            with higher.innerloop_ctx(head, opt, copy_initial_weights=True) as (fhead, diffopt):
                for _ in range(steps):
                    diffopt.step(((fhead(f) - y[i]) ** 2).mean())
                total = total + ((fhead(relu_mlp(body, xv[i], final_relu=True)) - yv[i]) ** 2).mean()
        return flat(keys, torch.autograd.grad(total / x.shape[0], leaves))

    return run


# -- compile times, in fresh processes ----------------------------------------------------------------
def first_call(name: str, steps: int, segment: int, cpp_wrapper: bool = False) -> float:
    """Seconds of the first call of hf.compile(hf.vmap(hg), segment=k): dynamo + inductor + one run."""
    _, hg, args = make(name, steps)
    fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=segment, **(CPP_WRAPPER if cpp_wrapper else {}))
    start = time.perf_counter()
    fast(*args)
    return time.perf_counter() - start


def peak_memory(name: str, route: str, steps: int) -> int:
    """Peak RSS growth (bytes) of one call of ``route`` (eager or hf.compile) after two warm-up calls."""
    _, hg, args = make(name, steps)
    vmapped = hf.vmap(hg, in_dims=IN_DIMS)
    fn = vmapped if route == "eager" else hf.compile(vmapped, segment=SEGMENT)
    fn(*args)
    fn(*args)
    return rss_peak_growth(lambda: fn(*args))


def memory_table(names, steps: int, threads: int) -> list[dict]:
    """Peak memory of the eager and the hf.compile route per transform, each in a fresh process."""
    rows = []
    for name in names:
        row = {"transform": name}
        for route in ("eager", "hf.compile"):
            cmd = [sys.executable, __file__, "--memory-of", name, route, "--steps", str(steps)]
            cmd += ["--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row[f"{route} (MiB)"] = f"{json.loads(out) / 2**20:.1f}"
        rows.append(row)
        print(row, flush=True)
    return rows


def compile_times(names, steps: int, threads: int, segments=(SEGMENT,), cpp_wrapper: bool = False) -> dict:
    """``"name (k = ...)" -> (cold, warm)`` first-call seconds, each in a fresh process (cold: empty inductor
    cache); ``unroll`` with every segment length, the others with the first; with ``cpp_wrapper`` also
    ``"name (k = ...), cpp_wrapper"`` for the C++ wrapper."""
    out = {}
    wrappers = [[], ["--cpp-wrapper"]] if cpp_wrapper else [[]]
    for name in names:
        for k, flags in ((k, f) for k in (segments if name == "unroll" else segments[:1]) for f in wrappers):
            label = f"{name} (k = {k})" + (", cpp_wrapper" if flags else "")
            out[label] = _cold_and_warm(name, steps, threads, [*flags, "--segments", str(k)])
            print(f"{label}: cold {out[label][0]:.1f} s, warm {out[label][1]:.1f} s (T = {steps})", flush=True)
    return out


def _cold_and_warm(name: str, steps: int, threads: int, flags: list) -> tuple[float, float]:
    """The first call's seconds in two fresh processes sharing one new inductor cache: (cold, warm)."""
    cmd = [sys.executable, __file__, "--first-call", name, "--steps", str(steps), "--threads", str(threads), *flags]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)

        def seconds() -> float:
            return json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)

        cold = seconds()  # fills the empty cache
        return cold, seconds()


# -- the tables ---------------------------------------------------------------------------------------
def speed_table(
    steps: int, reps: int, names, peers: bool, whole: bool, segments=(SEGMENT,), cpp_wrapper: bool = False
) -> list[dict]:
    """One row per route at ``steps`` inner steps; ``unroll`` is compiled with every segment length, and
    with ``cpp_wrapper`` every compiled route also with inductor's C++ wrapper (``options={"cpp_wrapper": True}``)."""
    problem, hg, args = make("unroll", steps)
    reference = mean_grads(torch.func.vmap(hg, in_dims=IN_DIMS)(*args))
    fin = floor_inputs(problem, args)
    compiled_floor, body = floor_compiled(steps), body_work(problem, args)
    routes = {
        "floor, hand-written, eager": (lambda: floor_eager(*fin, steps), None),
        "floor, hand-written, compiled": (lambda: compiled_floor(*fin), None),
        LOWER_BOUND: (lambda: (compiled_floor(*fin), body()), None),
    }
    plain = autograd_unroll(problem, steps)
    routes["eager lower bound: plain autograd, batched by hand"] = ((lambda: plain(args)), True)
    if peers:
        peer_fns = {
            "torch.func vmap, hand-written": functorch_unroll(problem, steps),
            "TorchOpt functional (loop over tasks)": torchopt_unroll(steps),
            "higher (loop over tasks)": higher_unroll(steps),
        }
        for label, fn in peer_fns.items():
            routes[label] = ((lambda f=fn: f(args)), True)
    for name in names:
        _, hg, args_n = make(name, steps)
        eager = torch.func.vmap(hg, in_dims=IN_DIMS)
        check = name == "unroll" or None
        routes[f"hyperfunc {name}, eager"] = ((lambda e=eager, a=args_n: mean_grads(e(*a))), check)
        for k in segments if name == "unroll" else segments[:1]:
            for options in ({}, CPP_WRAPPER) if cpp_wrapper else ({},):
                fast = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=k, **options)
                label = f"hyperfunc {name}, hf.compile(segment={k}{', cpp_wrapper' if options else ''})"
                routes[label] = ((lambda c=fast, a=args_n: mean_grads(c(*a))), check)
        if name == "unroll":  # the traced graphs replayed by torch's eager backend: no code generation
            traced = hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=segments[0], backend="eager")
            start = time.perf_counter()
            traced(*args_n)
            print(f"hf.compile(backend='eager') first call at T = {steps}: {time.perf_counter() - start:.1f} s")
            label = f"hyperfunc unroll, hf.compile(segment={segments[0]}, backend='eager')"
            routes[label] = ((lambda c=traced, a=args_n: mean_grads(c(*a))), True)
        if whole and name == "unroll":
            whole_fn = torch.compile(torch.func.vmap(hg, in_dims=IN_DIMS))
            start = time.perf_counter()
            whole_fn(*args_n)
            print(f"torch.compile(vmap(unroll)) first call at T = {steps}: {time.perf_counter() - start:.1f} s")
            routes["hyperfunc unroll, torch.compile(vmap) whole"] = ((lambda a=args_n: mean_grads(whole_fn(*a))), True)
    errors = {}
    for label, (fn, check) in routes.items():  # warm-up, and the agreement with eager unroll
        out = fn()
        if check:
            errors[label] = float((out - reference).abs().max() / reference.abs().max())
    seconds = median_seconds(*(fn for fn, _ in routes.values()), reps=reps)
    times = dict(zip(routes, seconds))
    eager_floor, compiled_floor_s = times["floor, hand-written, eager"], times["floor, hand-written, compiled"]
    bound = times[LOWER_BOUND]
    rows = []
    for label, t in times.items():
        rows.append(
            {
                "T": steps,
                "route": label,
                "ms": f"{1e3 * t:.2f}" if t < 0.01 else f"{1e3 * t:.1f}",
                "x eager floor": f"{t / eager_floor:.2f}",
                "x compiled floor": f"{t / compiled_floor_s:.2f}",
                "x lower bound": f"{t / bound:.2f}",
                ERROR: f"{errors[label]:.1e}" if label in errors else "",
            }
        )
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--segments", type=int, nargs="+", default=[SEGMENT, 50], help="k for unroll (others: the first)"
    )
    parser.add_argument("--only", nargs="*", help="hyperfunc transforms to run (default: all)")
    parser.add_argument("--no-peers", action="store_true", help="skip TorchOpt, higher and the torch.func peer")
    parser.add_argument("--no-compile-times", action="store_true", help="skip the fresh-process compile times")
    parser.add_argument(
        "--cpp-wrapper", action="store_true", help="also compile with options={'cpp_wrapper': True} (a row each)"
    )
    parser.add_argument("--memory", action="store_true", help="only the peak-memory table, at the largest T")
    parser.add_argument("--first-call", help=argparse.SUPPRESS)  # internal: one fresh-process measurement
    parser.add_argument("--memory-of", nargs=2, help=argparse.SUPPRESS)  # internal: likewise
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.first_call:
        print(json.dumps(first_call(args.first_call, args.steps[0], args.segments[0], args.cpp_wrapper)))
        return
    if args.memory_of:
        print(json.dumps(peak_memory(*args.memory_of, args.steps[0])))
        return
    names = args.only or list(transforms())
    if args.memory:
        rows = memory_table(names, max(args.steps), args.threads)
        print(f"\n## Peak memory of one call at T = {max(args.steps)} (RSS growth, fresh process per route)\n")
        print(markdown(rows, ["transform", "eager (MiB)", "hf.compile (MiB)"]))
        return
    cache = tempfile.mkdtemp(prefix="hyperfunc-bench-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # this process compiles into its own cache
    times = {}
    if not args.no_compile_times:
        times = compile_times(names, max(args.steps), args.threads, args.segments, args.cpp_wrapper)
    rows = []
    for steps in args.steps:
        peers = not args.no_peers and steps <= 100  # TorchOpt and higher take seconds per call at T = 1000
        rows += speed_table(steps, args.reps, names, peers, steps <= 10, args.segments, args.cpp_wrapper)
    print(f"\n## ANIL sinusoid, meta-batch {TASKS}, float32, torch {torch.__version__}, {args.threads} thread(s)\n")
    print(markdown(rows, ["T", "route", "ms", "x eager floor", "x compiled floor", "x lower bound", ERROR]))
    if times:
        print(f"\n## hf.compile(hf.vmap(hg), segment=k): first call at T = {max(args.steps)}, fresh process\n")
        table = [{"transform": n, "cold (s)": f"{c:.1f}", "warm (s)": f"{w:.1f}"} for n, (c, w) in times.items()]
        print(markdown(table, ["transform", "cold (s)", "warm (s)"]))


if __name__ == "__main__":
    main()
