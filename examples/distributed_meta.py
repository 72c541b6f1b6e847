"""Meta-training with the meta-batch spread over processes (torch.distributed, data parallel over tasks).

MAML on the Conv-4 BatchNorm backbone of ``maml_conv_bn.py`` (4-way 1-shot digits; ``--quick``:
ANIL sinusoids, HyperDistill Appendix G). Every rank draws the same meta-batch from one seeded
task stream and keeps its slice (``hf.distributed.shard``); the vmapped hypergradients of all
ranks are averaged over all tasks in one all-reduce (``hf.distributed.mean``), and every rank
applies the same TorchOpt Adam step to the same hyperparameters (``hf.distributed.broadcast`` at the
start). N processes therefore follow the single-process run up to summation order; the last line
prints the meta-validation loss and a checksum (sum of every hyperparameter entry) to compare runs.

    torchrun --nproc_per_node 2 examples/distributed_meta.py --quick    # gloo on CPU, seconds
    python examples/distributed_meta.py --quick                         # the same run in one process
    torchrun --nproc_per_node 8 examples/distributed_meta.py            # NCCL when CUDA is available

Resume: ``--save ckpt`` writes one ``ckpt.rank<r>.pt`` per rank (hyperparameters, Adam state,
iteration, task-stream and torch RNG states; readable with ``torch.load(weights_only=True)``),
``--resume ckpt`` continues from it: 3 + 3 iterations equal 6, bit for bit on CPU.
Memory: ``--chunk c`` vmaps the local tasks c at a time; ``--bf16`` evaluates the losses in
bfloat16 (``hf.mixed_precision``). ``--quick`` runs in float64, so the last lines of 1 and N
processes agree to the 12 digits printed; in float32 they agree to about 6 significant digits
(the summation order differs), and the line prints 6. Comparisons need the same ``--threads``
per process (default 1): on the Conv-BN model the thread count alone changes the result (max-pool
ties on the digits break differently with the rounding of the convolutions; docs/scale.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch
import torch.distributed as dist
import torchopt
from tqdm import tqdm

import hyperfunc as hf
from hyperfunc import distributed


def conv_bn_problem(args, dtype):
    """MAML on Conv-4 with BatchNorm: ``(loop, outer, hparams, params0, buffers, sample)``."""
    from fewshot_digits import digits_dataset
    from maml_conv_bn import TRAIN_CLASSES, conv4, method

    torch.manual_seed(args.seed)
    net = conv4(args.channels, 4).to(dtype)
    _, buffers = hf.module_state(net)
    _, loop, loss, hparams, params0, _ = method("MAML", net, args.steps, 0.4)
    data = [(x.to(dtype), y) for x, y in digits_dataset()]
    labels = [c for _, c in data]

    def sample(n, generator):
        tasks = hf.tasks.few_shot_tasks(data, 4, 1, 10, n, classes=TRAIN_CLASSES, labels=labels, generator=generator)
        return tasks.inner_batches, tasks.outer_batch

    return loop, loss, hparams, params0, buffers, sample


def sinusoid_problem(args, dtype):
    """ANIL on sinusoids: ``(loop, outer, hparams, params0, buffers, sample)`` (no buffers)."""
    problem = hf.tasks.anil_sinusoid(steps=args.steps, hidden=args.hidden, seed=args.seed, dtype=dtype)

    def sample(n, generator):
        tasks = hf.tasks.sinusoid_tasks(n, generator=generator, dtype=dtype)
        return tasks.inner_batches, tasks.outer_batch

    return problem.loop, problem.outer_loss, problem.hparams, problem.params0, None, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ANIL sinusoids, a few iterations (tests)")
    parser.add_argument("--iterations", type=int, default=None, help="meta-iterations (default 300, quick 5)")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-iteration over all ranks")
    parser.add_argument("--steps", type=int, default=5, help="inner steps T")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=40, help="width of the sinusoid MLP (--quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=None, help="vmap chunk size (memory)")
    parser.add_argument("--bf16", action="store_true", help="losses under bfloat16 autocast")
    parser.add_argument(
        "--dtype", choices=["float32", "float64"], default=None, help="default: float64 with --quick, else float32"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (equal counts keep runs comparable)"
    )
    parser.add_argument("--save", default=None, help="write <save>.rank<r>.pt at the end")
    parser.add_argument("--resume", default=None, help="start from <resume>.rank<r>.pt")
    args = parser.parse_args()
    iterations = args.iterations or (5 if args.quick else 300)
    meta_batch = args.meta_batch or (4 if args.quick else 32)

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, size = distributed.world()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # every source of randomness is seeded: the global RNG too
    dtype = getattr(torch, args.dtype or ("float64" if args.quick else "float32"))

    loop, outer, hparams, params0, buffers, sample = (sinusoid_problem if args.quick else conv_bn_problem)(args, dtype)
    if args.bf16:
        prepare = loop.prepare and hf.mixed_precision(loop.prepare)
        loop = dataclasses.replace(loop, inner_loss=hf.mixed_precision(loop.inner_loss), prepare=prepare)
        outer = hf.mixed_precision(outer)
    hparams, params0, buffers = to_device((hparams, params0, buffers), device)  # a callable params0 is a leaf
    hg = torch.func.vmap(hf.unroll(loop, outer), in_dims=(None, None, 0, 0, 0), chunk_size=args.chunk)
    meta_opt = torchopt.adam(1e-3)
    meta_state = meta_opt.init(hparams)
    stream = torch.Generator().manual_seed(args.seed)  # the same task stream on every rank
    many = per_task(buffers, len(distributed.shard_range(meta_batch)))
    start = 0
    if args.resume:
        saved = torch.load(f"{args.resume}.rank{rank}.pt", weights_only=True)
        state = hf.from_state_dict(saved, like=training_state(hparams, meta_state, 0, stream))
        hparams, meta_state, start = state["hparams"], state["meta_state"], state["iteration"]
        stream.set_state(state["stream"])
        torch.set_rng_state(state["torch_rng"])
    else:
        hparams, meta_state = distributed.broadcast((hparams, meta_state))

    clock = time.perf_counter()
    for _ in tqdm(range(start, iterations), desc=f"{size} process(es)", disable=rank != 0 or args.quick):
        inner, outer_batch = distributed.shard(to_device(sample(meta_batch, stream), device))
        res = distributed.mean(hg(hparams, params0, inner, outer_batch, many))
        updates, meta_state = meta_opt.update(res.grads, meta_state, params=hparams)
        hparams = torchopt.apply_updates(hparams, updates, inplace=False)
    seconds = (time.perf_counter() - clock) / max(1, iterations - start)

    if args.save:
        state = training_state(hparams, meta_state, iterations, stream)
        torch.save(hf.to_state_dict(state), f"{args.save}.rank{rank}.pt")
    # meta-validation: 64 held-out tasks from their own stream, sharded like the training tasks
    held_out = to_device(sample(64, torch.Generator().manual_seed(10_000 + args.seed)), device)
    inner, outer_batch = distributed.shard(held_out)
    many = per_task(buffers, inner[0].shape[0])
    val = distributed.mean(hg(hparams, params0, inner, outer_batch, many)).loss.item()
    checksum = sum(x.double().sum() for x in hparams.values(include_nested=True, leaves_only=True)).item()
    if rank == 0:
        print(f"{size} process(es) on {device.type}, {seconds:.3f} s / meta-iteration ({meta_batch} tasks)")
        # digits the dtype carries once the summation order differs between world sizes
        digits = 12 if dtype == torch.float64 else 5
        print(f"final meta-validation loss {val:.{digits}e} checksum {checksum:.{digits}e}")
    if dist.is_initialized():
        dist.destroy_process_group()


def training_state(hparams, meta_state, iteration: int, stream: torch.Generator) -> dict:
    """Everything a run needs to continue exactly: hyperparameters, Adam state, iteration, RNG states."""
    return {
        "hparams": hparams,
        "meta_state": meta_state,
        "iteration": iteration,
        "stream": stream.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def per_task(buffers, n: int):
    """The module buffers stacked once per task (``()``: no buffers)."""
    return () if buffers is None else torch.stack([buffers] * n)


def to_device(tree, device):
    return torch.utils._pytree.tree_map(lambda x: x.to(device) if torch.is_tensor(x) else x, tree)


if __name__ == "__main__":
    main()
