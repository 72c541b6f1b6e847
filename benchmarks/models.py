"""Model-scale MAML: hyperfunc against higher, TorchOpt and a hand-written ``torch.func`` unroll.

Workload (the few-shot setting of MAML, Finn et al. 2017): Conv-4 with 32 channels (four
Conv3x3-BatchNorm-ReLU-MaxPool blocks, BatchNorm in training mode with running statistics, a linear
head), 3x32x32 inputs, 5-way 5-shot with 15 queries per class, a meta-batch of 4 tasks, T plain SGD
inner steps (lr 0.01) and the meta-gradient of the mean query loss with respect to the
initialization (second order). The data are fixed random tensors (seed 0): the same tasks for every
route.

Routes (each returns the meta-batch mean of dF/dθ₀; ``routes_for`` lists them per T):
- hyperfunc: ``hf.vmap(hf.unroll(...))`` with its default reverse pass; one task at a time
  (``chunk_size=1``: a loop over the tasks, as the peers run); the whole graph (``checkpoint_every=T``);
  FOMAML (``hf.fomaml(hf.first_order)``, first order: its error column is its bias);
  ``hf.compile(..., segment=1, chunk_size=1)``, one task's one-step kernels (any ``segment=k``, with or
  without ``chunk_size=1``; on CUDA also ``mode=reduce-overhead``, CUDA graphs:
  ``--routes "hf.compile(segment=1, mode=reduce-overhead)"``);
- higher's ``innerloop_ctx`` and TorchOpt's functional SGD (``torch.autograd.grad(create_graph=True)``),
  a Python loop over tasks, as their documentation shows;
- a hand-written ``torch.func`` unroll: ``vmap`` over tasks of ``grad`` of the unrolled loop.
learn2learn 0.2.0 is not measured: its wheel does not build against this torch.

Columns:
- peak: growth of the resident set during one call, after two warm-up calls, in a fresh process per
  route and T (``_measure.rss_peak_growth``; on CUDA ``max_memory_allocated``). It counts what the heap
  keeps after frees; ``--tensor-peaks`` counts the tensors alive instead;
- first call: the first call's wall time in that fresh process (compiled: with an empty inductor cache);
- s / meta-it.: median of interleaved repetitions of all the routes of one T in one process
  (``_measure.median_seconds``, the compiled route with the cache its first call left), the steady state;
- error: relative L2 distance of the float32 meta-gradient to hyperfunc's float64 one (``unroll``
  in float64 on the same tasks and initialization). ``--accuracy`` shows what it measures: how far a
  1e-6 relative change of the inputs moves the float64 meta-gradient itself.

Run alone (two processes on 2 cores slow each other down)::

    python benchmarks/models.py                      # T in 1 5 20 50, about 50 minutes on 2 cores
    python benchmarks/models.py --steps 5 --routes "higher (loop over tasks)" hf.unroll
    python benchmarks/models.py --accuracy --steps 5 20  # float32 error, three networks, about 8 minutes
    python benchmarks/models.py --tensor-peaks --steps 5 20 50
    python benchmarks/models.py --step-products      # one step's VJP: reverse- against forward-over-reverse
    python benchmarks/models.py --step-costs         # one task's step: forward, gradient, second-order step
    python benchmarks/models.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _measure import markdown, median_seconds, peak_bytes, rss_peak_growth  # noqa: E402

import hyperfunc as hf  # noqa: E402

WAYS, SHOTS, QUERIES, TASKS, CHANNELS, SIZE, LR = 5, 5, 15, 4, 32, 32, 0.01


#: the network's pooling and activation: Conv-4's own (max-pool, ReLU), and two variants for the float32
#: accuracy table (a second-order meta-gradient jumps where a max-pool's argmax or a ReLU's sign flips)
POOLS = {
    "max-pool, ReLU": (nn.MaxPool2d, nn.ReLU),
    "avg-pool, ReLU": (nn.AvgPool2d, nn.ReLU),
    "avg-pool, GELU": (nn.AvgPool2d, nn.GELU),
}


def conv4(channels: int = CHANNELS, ways: int = WAYS, pool: str = "max-pool, ReLU") -> nn.Sequential:
    """Conv-4 (Vinyals et al. 2016; Finn et al. 2017): four Conv3x3-BN-ReLU-MaxPool2 blocks and a linear head
    (``pool`` names another pooling and activation, see :data:`POOLS`)."""
    pooling, activation = POOLS[pool]

    def block(c_in: int) -> nn.Sequential:
        conv = nn.Conv2d(c_in, channels, 3, padding=1)
        return nn.Sequential(conv, nn.BatchNorm2d(channels), activation(), pooling(2))

    return nn.Sequential(block(3), *(block(channels) for _ in range(3)), nn.Flatten(), nn.Linear(channels * 4, ways))


def tasks(dtype: torch.dtype, device: str, jitter: float = 0.0) -> tuple:
    """``(x_train, y_train, x_test, y_test)`` of ``TASKS`` random 5-way tasks, each with a leading task dimension
    (``jitter``: every input multiplied by ``1 + jitter·ε``, ε standard normal, to probe the meta-gradient's
    sensitivity)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS)

    def split(per_class: int) -> tuple:
        x = torch.randn(TASKS, WAYS * per_class, 3, SIZE, SIZE, generator=g, dtype=torch.float64)
        x = x * (1 + jitter * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype))
        return x.to(device, dtype), labels.repeat(per_class).expand(TASKS, -1).to(device)

    return (*split(SHOTS), *split(QUERIES))


def model(dtype: torch.dtype, device: str, pool: str) -> nn.Sequential:
    torch.manual_seed(0)
    return conv4(pool=pool).to(device, dtype)


def hf_route(name: str, steps: int, dtype: torch.dtype, device: str, pool: str = "max-pool, ReLU", jitter: float = 0.0):
    """A hyperfunc route: ``call() -> {name: meta-gradient}``."""
    net = model(dtype, device, pool)
    params, buffers = hf.module_state(net)
    xs, ys, xq, yq = tasks(dtype, device, jitter)

    def loss(p, h, batch, b):
        x, y = batch
        logits, b = hf.functional_call(net, p, b, x)
        return F.cross_entropy(logits, y), b

    loop = hf.InnerLoop(loss, hf.optim.sgd(lr=LR), steps=steps, full_batch=True)
    options = dict(part.split("=") for part in name[name.find("(") + 1 : -1].split(", ") if "=" in part)
    if name.startswith("hf.fomaml"):
        hg = hf.fomaml(hf.first_order)(loop, loss)
    elif "checkpoint_every" in options:
        hg = hf.unroll(loop, loss, checkpoint_every=int(options["checkpoint_every"]))
    else:
        hg = hf.unroll(loop, loss)
    hparams = TensorDict({"init": params}, [])
    chunk = int(options["chunk_size"]) if "chunk_size" in options else None
    vmapped = hf.vmap(hg, in_dims=(None, None, 0, 0, 0), chunk_size=chunk)
    if name.startswith("hf.compile"):
        mode = {"mode": options["mode"]} if "mode" in options else {}  # "reduce-overhead": CUDA graphs
        vmapped = hf.compile(vmapped, segment=int(options["segment"]), **mode)
    many = torch.stack([buffers] * TASKS)

    def call() -> dict:
        res = vmapped(hparams, lambda h: h["init"], (xs, ys), (xq, yq), many)
        return {".".join(k): v.mean(0) for k, v in res.grads["init"].items(True, True)}

    return call


def higher_route(steps: int, dtype: torch.dtype, device: str, pool: str = "max-pool, ReLU"):
    """higher's ``innerloop_ctx`` over ``torch.optim.SGD``, a loop over tasks, second order."""
    import higher

    net = model(dtype, device, pool)
    xs, ys, xq, yq = tasks(dtype, device)
    inner_opt = torch.optim.SGD(net.parameters(), lr=LR)
    names = [n for n, _ in net.named_parameters()]

    def call() -> dict:
        net.zero_grad()
        for i in range(TASKS):
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fnet(xs[i]), ys[i]))
                (F.cross_entropy(fnet(xq[i]), yq[i]) / TASKS).backward()
        return {n: p.grad.clone() for n, p in zip(names, net.parameters())}

    return call


def torchopt_route(steps: int, dtype: torch.dtype, device: str, pool: str = "max-pool, ReLU"):
    """TorchOpt's functional SGD with ``torch.autograd.grad(create_graph=True)``, a loop over tasks."""
    import torchopt

    net = model(dtype, device, pool)
    xs, ys, xq, yq = tasks(dtype, device)
    init = {n: p.detach().requires_grad_() for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    opt = torchopt.sgd(LR)

    def call() -> dict:
        total = 0
        for i in range(TASKS):
            params, state, b = dict(init), opt.init(init), {n: x.clone() for n, x in buffers.items()}
            for _ in range(steps):
                inner = F.cross_entropy(torch.func.functional_call(net, (params, b), (xs[i],)), ys[i])
                grads = dict(zip(params, torch.autograd.grad(inner, tuple(params.values()), create_graph=True)))
                updates, state = opt.update(grads, state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            total = total + F.cross_entropy(torch.func.functional_call(net, (params, b), (xq[i],)), yq[i]) / TASKS
        return dict(zip(init, torch.autograd.grad(total, tuple(init.values()))))

    return call


def torch_func_route(steps: int, dtype: torch.dtype, device: str, pool: str = "max-pool, ReLU"):
    """``vmap`` over tasks of ``grad`` of the unrolled loop, written with ``torch.func`` alone."""
    net = model(dtype, device, pool)
    xs, ys, xq, yq = tasks(dtype, device)
    init = {n: p.detach() for n, p in net.named_parameters()}
    buffers = {n: torch.stack([b] * TASKS) for n, b in net.named_buffers()}

    def inner(p, b, x, y):
        return F.cross_entropy(torch.func.functional_call(net, (p, b), (x,)), y)

    def meta_loss(p0, b, x, y, xv, yv):
        p = p0
        for _ in range(steps):
            g = torch.func.grad(inner)(p, b, x, y)
            p = {n: p[n] - LR * g[n] for n in p}
        return inner(p, b, xv, yv)

    meta_grad = torch.func.vmap(torch.func.grad(meta_loss), in_dims=(None, 0, 0, 0, 0, 0))

    def call() -> dict:
        b = {n: x.clone() for n, x in buffers.items()}
        return {n: g.mean(0) for n, g in meta_grad(init, b, xs, ys, xq, yq).items()}

    return call


PEERS = {"higher (loop over tasks)": higher_route, "TorchOpt (loop over tasks)": torchopt_route}
PEERS["torch.func by hand (vmapped)"] = torch_func_route


def route(name: str, steps: int, dtype: torch.dtype = torch.float32, device: str = "cpu", pool: str = "max-pool, ReLU"):
    if name in PEERS:
        return PEERS[name](steps, dtype, device, pool)
    return hf_route(name, steps, dtype, device, pool)


def routes_for(steps: int) -> list[str]:
    """The routes measured at ``steps``: hyperfunc's default, one task at a time, the whole graph
    (``checkpoint_every=T``, the default before per-step recomputation), FOMAML, one task's one-step
    kernels compiled (T > 1: a cold compile takes about 100 s on 2 cores, whatever T), the peers (the
    hand-written ``torch.func`` unroll not at T = 50, where it would need about 22 GB)."""
    names = ["hf.unroll", "hf.unroll(chunk_size=1)"]
    names += [f"hf.unroll(checkpoint_every={steps})"] if steps > 1 else []
    names += ["hf.fomaml"] + (["hf.compile(segment=1, chunk_size=1)"] if steps > 1 else [])
    return names + [name for name in PEERS if not (steps >= 50 and name.startswith("torch.func"))]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def one(name: str, steps: int, device: str, out: str) -> dict:
    """First-call time, peak memory and the float32 meta-gradient (saved to ``out``) of one route."""
    call = route(name, steps, device=device)
    start = time.perf_counter()
    grads = call()
    sync(device)
    first = time.perf_counter() - start
    call()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = rss_peak_growth(call) / 2**20
    torch.save({k: v.detach().cpu() for k, v in grads.items()}, out)
    return {"first": first, "peak": peak}


def error(grads: dict, reference: dict) -> float:
    """The relative L2 distance of ``grads`` to ``reference`` over all tensors."""
    diff = torch.cat([(grads[n].double() - reference[n]).flatten() for n in reference])
    return float(diff.norm() / torch.cat([x.flatten() for x in reference.values()]).norm())


def accuracy(steps: list[int], device: str) -> str:
    """The float32 error of every second-order route against float64, for each network of :data:`POOLS`, and
    how far a 1e-6 relative change of the inputs moves the float64 meta-gradient itself."""
    names = ["hf.unroll", *PEERS]
    rows = []
    for T in steps:
        row: dict = {"T": T}
        for pool in POOLS:
            reference = route("hf.unroll", T, torch.float64, device, pool)()
            for name in names:
                row[f"{name}, {pool}"] = f"{error(route(name, T, torch.float32, device, pool)(), reference):.1e}"
            moved = hf_route("hf.unroll", T, torch.float64, device, pool, jitter=1e-6)()
            row[f"float64 moved by a 1e-6 input change, {pool}"] = f"{error(moved, reference):.1e}"
        rows.append(row)
        print(row, flush=True)
    columns = list(rows[0])
    return markdown(
        [{"column": c, **{f"T = {r['T']}": r[c] for r in rows}} for c in columns[1:]],
        ["column", *(f"T = {r['T']}" for r in rows)],
    )


def step_product(kind: str, device: str) -> dict:
    """Peak memory and time of one SGD step's VJP, ct -> ct - lr·H·ct, for the vmapped tasks, by ``kind``:
    ``"reverse-over-reverse"`` (the VJP of the step, which holds a gradient: what hyperfunc runs),
    ``"forward-over-reverse"`` (a ``jvp`` of the gradient in the direction -lr·ct, MixFlow-MG's product), or
    ``"gradient"`` (the step's gradient alone)."""
    net = model(torch.float32, device, "max-pool, ReLU")
    params, buffers = hf.module_state(net)
    xs, ys, _, _ = tasks(torch.float32, device)

    def loss(w, b, x, y):
        return F.cross_entropy(hf.functional_call(net, w, b, x)[0], y)

    def step(w, b, x, y):
        return w - LR * torch.func.grad(loss)(w, b, x, y)

    def product(w, b, x, y, ct):
        if kind == "reverse-over-reverse":
            return torch.func.vjp(lambda w: step(w, b, x, y), w)[1](ct)[0]
        if kind == "forward-over-reverse":
            return ct + torch.func.jvp(lambda w: torch.func.grad(loss)(w, b, x, y), (w,), (-LR * ct,))[1]
        return torch.func.grad(loss)(w, b, x, y)

    many = torch.stack([params] * TASKS)
    ct = many.apply(torch.randn_like)
    call = torch.func.vmap(product)
    run = lambda: (call(many, torch.stack([buffers] * TASKS), xs, ys, ct), sync(device))  # noqa: E731
    run()
    peak = rss_peak_growth(run) / 2**20 if device == "cpu" else float("nan")
    return {"peak": peak, "seconds": median_seconds(run, reps=5, sample=0.0)[0]}


def step_costs(device: str) -> str:
    """What one inner step of one task costs in plain autograd: its forward alone, its gradient, and its
    gradient with a graph plus that graph's VJP (a step of a second-order reverse pass that keeps the
    graph, as higher and TorchOpt do). A reverse pass that does not keep a step's graph recomputes at
    least its forward, and in practice its gradient, on top of the last row: the bound on trading memory
    for time (docs/benchmarks.md, "Time")."""
    net = model(torch.float32, device, "max-pool, ReLU")
    params = list(net.parameters())
    xs, ys, _, _ = tasks(torch.float32, device)

    def forward():
        with torch.no_grad():
            F.cross_entropy(net(xs[0]), ys[0])

    def gradient():
        torch.autograd.grad(F.cross_entropy(net(xs[0]), ys[0]), params)

    def second_order_step():
        g = torch.autograd.grad(F.cross_entropy(net(xs[0]), ys[0]), params, create_graph=True)
        torch.autograd.grad(g, params, [torch.ones_like(x) for x in g])

    fns = {"forward": forward, "gradient": gradient, "gradient with graph + its VJP": second_order_step}
    for fn in fns.values():
        fn()
    seconds = median_seconds(*((lambda f=f: (f(), sync(device))) for f in fns.values()), reps=7)
    rows = [
        {"one task, one step": n, "ms": f"{1e3 * t:.1f}", "x last row": f"{t / seconds[-1]:.2f}"}
        for n, t in zip(fns, seconds)
    ]
    return markdown(rows, list(rows[0]))


def tensor_peaks(steps: list[int], device: str) -> str:
    """The peak bytes of tensors alive during one call (``_measure.peak_bytes``: what the operators allocate,
    seen under ``torch.func``'s wrappers), per eager route: what a caching allocator must hold, free of the
    heap's fragmentation that the resident set also counts. Compiled kernels allocate out of its sight."""
    rows = []
    for T in steps:
        for name in routes_for(T):
            if name.startswith("hf.compile"):
                continue
            call = route(name, T, device=device)
            call()
            rows.append({"T": T, "route": name, "peak tensor memory (MiB)": f"{peak_bytes(call) / 2**20:.0f}"})
            print(rows[-1], flush=True)
    return markdown(rows, list(rows[0]))


def in_fresh_process(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20, 50])
    parser.add_argument("--routes", nargs="+", default=None, help="route names (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--accuracy", action="store_true", help="the float32 error table instead")
    parser.add_argument("--tensor-peaks", action="store_true", help="the peak tensor memory table instead")
    parser.add_argument("--step-products", action="store_true", help="reverse- against forward-over-reverse")
    parser.add_argument("--step-costs", action="store_true", help="one step's forward, gradient and VJP")
    parser.add_argument("--product", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.accuracy:
        print(f"\nrelative L2 error of the float32 meta-gradient against float64 (Conv-4 BN MAML, {args.device})\n")
        print(accuracy(args.steps, args.device))
        return
    if args.tensor_peaks:
        print(f"\npeak tensor memory of one call (Conv-4 BN MAML, {args.device}, {args.threads} threads)\n")
        print(tensor_peaks(args.steps, args.device))
        return
    if args.step_costs:
        print(f"\nOne inner step of one task, plain autograd, Conv-4 BN, {args.device}, {args.threads} threads\n")
        print(step_costs(args.device))
        return
    if args.product:
        print(json.dumps(step_product(args.product, args.device)))
        return
    if args.step_products:
        rows = []
        for kind in ("gradient", "reverse-over-reverse", "forward-over-reverse"):
            r = in_fresh_process(["--device", args.device, "--threads", str(args.threads), "--product", kind])
            rows.append({"one step's": kind, "peak (MiB)": f"{r['peak']:.0f}", "s": f"{r['seconds']:.3f}"})
            print(rows[-1], flush=True)
        print(f"\nOne SGD step's VJP, Conv-4 BN, {TASKS} tasks vmapped, {args.device}, {args.threads} threads\n")
        print(markdown(rows, list(rows[0])))
        return
    if args.one:
        print(json.dumps(one(**json.loads(args.one), device=args.device)))
        return
    if args.reference:
        steps, out = json.loads(args.reference)
        grads = route("hf.unroll", steps, torch.float64, args.device)()
        torch.save({k: v.detach().cpu() for k, v in grads.items()}, out)
        print("{}")
        return
    if args.time:
        names, steps = json.loads(args.time)
        calls = [route(n, steps, device=args.device) for n in names]
        wrapped = [lambda c=c: (c(), sync(args.device)) for c in calls]
        print(json.dumps(median_seconds(*wrapped, reps=args.reps, sample=0.0)))
        return
    common = ["--device", args.device, "--threads", str(args.threads)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            names = args.routes or routes_for(steps)
            ref_path = f"{tmp}/reference-{steps}.pt"
            in_fresh_process([*common, "--reference", json.dumps([steps, ref_path])])
            reference = torch.load(ref_path)
            measured = {}
            cache = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}  # cold for the first call, warm for timing
            for name in names:
                out = f"{tmp}/{len(measured)}-{steps}.pt"
                measured[name] = in_fresh_process(
                    [*common, "--one", json.dumps({"name": name, "steps": steps, "out": out})], cache
                )
                measured[name]["error"] = error(torch.load(out), reference)
                print(name, steps, measured[name], flush=True)
            seconds = in_fresh_process([*common, "--reps", str(args.reps), "--time", json.dumps([names, steps])], cache)
            for name, s in zip(names, seconds):
                m = measured[name]
                rows.append(
                    {
                        "T": steps,
                        "route": name,
                        "peak (MiB)": f"{m['peak']:.0f}",
                        "s / meta-it.": f"{s:.3f}",
                        "first call (s)": f"{m['first']:.1f}",
                        "rel. L2 error vs float64": f"{m['error']:.1e}",
                    }
                )
                print(rows[-1], flush=True)
    print(
        f"\nMAML, Conv-4 (32 ch.) BN, 5-way 5-shot 15 queries, 3x32x32, meta-batch {TASKS}, SGD lr {LR}, "
        f"float32, {args.device}, {args.threads} threads\n"
    )
    print(markdown(rows, list(rows[0])))


if __name__ == "__main__":
    main()
