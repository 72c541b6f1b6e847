"""A learned learning-rate schedule over T = 1000 SGD steps (Maclaurin et al. 2015; Franceschi et al.
2017), and the short-horizon bias of greedy hypergradients (Wu et al. 2018; the HyperDistill and
greedy-accumulation seeds).

A 64-32-10 tanh MLP is trained on scikit-learn's digits (1000 training images) by T = 1000 SGD
steps on mini-batches of 32. The schedule has one learnable log-learning-rate per block of 50 steps
(20 hyperparameters), the inner optimizer reads it per step,

    hf.optim.sgd(lr=lambda h, t: hf.optim.pick(h["log_lr"], t // block).exp())

and TorchOpt's Adam updates it to minimize the cross-entropy on 300 validation images after the T
steps. Every hyper-iteration draws fresh mini-batches. Each method starts from the constant
schedule lr = 0.1 and gets the same number of hyper-iterations. Two guards, as any long-horizon
schedule learner needs (exact hypergradients through 1000 steps explode once the rates approach
the stability edge, and the first run of this script diverged to NaN after about 40
hyper-iterations): the rates are projected onto lr <= ``--lr-max`` (2) after every Adam step, and
a hyper-iteration whose hypergradient is not finite is skipped (counted in the table).

- ``unroll(checkpoint_every=50)`` and ``forward``: the exact hypergradient (reverse mode with 20
  stored states; forward mode with one tangent per block);
- ``truncate(100)``: back-propagates through the last 100 steps, so only the last two blocks learn;
- ``one_step``: the last step only, so only the last block learns;
- ``online one_step``: the schedule is updated after every inner step by its one-step hypergradient
  (Luketina et al. 2016), with Adam's step divided by the block length so that a block moves as far
  per run as under an offline method: the greedy schedule;
- ``greedy_accumulate(0.99)`` (the greedy thesis, Eq. 6) and ``distill(0.99)`` (HyperDistill with
  θ = 1, the paper's π* = 1 case).

Rows "constant" are the starting schedule and the best constant rate of a grid chosen on the
validation loss. The learned schedules are then evaluated by training on fresh mini-batches
(``--eval-runs`` draws per meta-training run); the table gives the mean and 95% Student-t interval
over all of them. "cos to exact" is the cosine between a method's first hypergradient and the exact
one on the same draw.

    python examples/lr_schedule.py            # 3 meta-training runs of 60 hyper-iterations per method
    python examples/lr_schedule.py --quick    # seconds (tests)
"""

from __future__ import annotations

import argparse
import math

import torch
import torchopt
from _common import figure, fmt_ci, results_dir, save, write_table
from tensordict import TensorDict
from tqdm import tqdm

import hyperfunc as hf


def digits(n_train: int = 1000, n_val: int = 300):
    """The digits in a fixed shuffled order: training, validation and test splits, pixels in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = torch.as_tensor(x, dtype=torch.float32)[perm] / 16.0, torch.as_tensor(y)[perm]
    cut = (0, n_train, n_train + n_val, len(y))
    return [(x[a:b], y[a:b]) for a, b in zip(cut, cut[1:])]


def logits(p, x):
    return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def cross_entropy(p, h, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(logits(p, x), y)


def initial_params(generator: torch.Generator, hidden: int = 32) -> TensorDict:
    return TensorDict(
        {
            "W1": torch.randn(64, hidden, generator=generator) / 8.0,
            "b1": torch.zeros(hidden),
            "W2": torch.randn(hidden, 10, generator=generator) / math.sqrt(hidden),
            "b2": torch.zeros(10),
        },
        [],
    )


def schedule_loop(steps: int, block: int) -> hf.InnerLoop:
    """SGD whose learning rate at step t is exp(log_lr[t // block])."""
    sgd = hf.optim.sgd(lr=lambda h, t: hf.optim.pick(h["log_lr"], t // block).exp())
    return hf.InnerLoop(cross_entropy, sgd, steps=steps)


def draw_batches(train, steps: int, size: int, generator: torch.Generator):
    idx = torch.randint(0, len(train[1]), (steps, size), generator=generator)
    return train[0][idx], train[1][idx]


def offline_methods(loop: hf.InnerLoop, block: int, gamma: float) -> dict:
    return {
        "unroll (exact)": hf.unroll(loop, cross_entropy, checkpoint_every=block),
        "forward (exact)": hf.forward(loop, cross_entropy),
        f"truncate({2 * block})": hf.truncate(2 * block)(loop, cross_entropy),
        "one_step": hf.one_step(loop, cross_entropy),
        f"greedy_accumulate({gamma})": hf.greedy_accumulate(gamma)(loop, cross_entropy),
        f"distill({gamma}, θ=1)": hf.distill(gamma, theta=1.0)(loop, cross_entropy),
    }


def meta_step(meta, meta_state, hparams, grads, lr_max: float):
    """``(hparams, meta_state, skipped)``: one Adam step on the log-learning-rates, projected onto
    lr <= lr_max. A non-finite hypergradient (the inner run diverged) is skipped, not applied: one NaN
    in Adam's moments would end meta-training."""
    if not all(torch.isfinite(g).all() for g in grads.values(True, True)):
        return hparams, meta_state, 1
    updates, meta_state = meta.update(grads, meta_state, params=hparams)
    hparams = torchopt.apply_updates(hparams, updates, inplace=False)
    return hparams.apply(lambda x: x.clamp(max=math.log(lr_max))), meta_state, 0


def online_run(online, meta, meta_state, hparams, params0, batches, val, steps: int, lr_max: float):
    """One training run of ``steps`` inner steps with the schedule updated after each of them."""
    state, skipped = online.init(hparams, params0), 0
    for t in range(steps):
        res, state = online.step(state, hparams, (batches[0][t], batches[1][t]), val, t)
        hparams, meta_state, skip = meta_step(meta, meta_state, hparams, res.grads, lr_max)
        skipped += skip
    return hparams, meta_state, res, skipped


def evaluate(loop, hparams, params0, train, val, test, draws: int, batch: int, generator) -> list[tuple]:
    """Validation loss and test accuracy (%) after training with ``hparams`` on ``draws`` fresh draws."""
    results = []
    for _ in range(draws):
        w = loop.run(hparams, params0, draw_batches(train, loop.steps, batch, generator))
        accuracy = (logits(w, test[0]).argmax(-1) == test[1]).double().mean().item() * 100
        results.append((cross_entropy(w, hparams, val).item(), accuracy))
    return results


def lrs_per_step(hparams, block: int) -> torch.Tensor:
    return hparams["log_lr"].exp().repeat_interleave(block)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="T, inner SGD steps")
    parser.add_argument("--block", type=int, default=50, help="steps per learnable learning rate")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hyperiters", type=int, default=60)
    parser.add_argument("--lr0", type=float, default=0.1, help="the starting (constant) schedule")
    parser.add_argument("--meta-lr", type=float, default=0.1, help="TorchOpt Adam on the log-learning-rates")
    parser.add_argument("--lr-max", type=float, default=2.0, help="learned rates are projected onto lr <= lr-max")
    parser.add_argument("--gamma", type=float, default=0.99)
    parser.add_argument("--runs", type=int, default=3, help="meta-training runs (seeds 0..runs-1)")
    parser.add_argument("--eval-runs", type=int, default=5, help="fresh training runs per learned schedule")
    parser.add_argument("--grid", type=float, nargs="*", default=[0.03, 0.1, 0.3, 1.0, 3.0])
    parser.add_argument("--out", default="results/lr_schedule")
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.block, args.hyperiters, args.runs, args.eval_runs = 20, 5, 2, 2, 2
        args.grid = [0.1, 1.0]
    if args.steps % args.block:
        parser.error(f"--steps ({args.steps}) must be a multiple of --block ({args.block})")
    out = results_dir(args.out)
    train, val, test = digits()
    loop = schedule_loop(args.steps, args.block)
    blocks = args.steps // args.block
    constant = lambda lr: TensorDict({"log_lr": torch.full((blocks,), math.log(lr))}, [])
    names = [*offline_methods(loop, args.block, args.gamma), "online one_step"]
    learned = {name: [] for name in names}
    curves = {name: [] for name in names}
    evals = {name: [] for name in ["constant lr0", "constant best", *names]}
    cosines = {name: [] for name in names}
    skipped = dict.fromkeys(names, 0)
    best = []
    for run in range(args.runs):
        generator = torch.Generator().manual_seed(run)
        params0 = initial_params(generator)
        draw = lambda: draw_batches(train, args.steps, args.batch, generator)
        scores = {lr: evaluate(loop, constant(lr), params0, train, val, test, args.eval_runs, args.batch, generator)
                  for lr in args.grid}  # fmt: skip
        best.append(min(scores, key=lambda lr: sum(v for v, _ in scores[lr])))
        evals["constant best"] += scores[best[-1]]
        evals["constant lr0"] += evaluate(
            loop, constant(args.lr0), params0, train, val, test, args.eval_runs, args.batch, generator
        )
        first = draw()
        methods = offline_methods(loop, args.block, args.gamma)
        exact = methods["unroll (exact)"](constant(args.lr0), params0, first, val).grads
        online = hf.online.one_step(loop, cross_entropy)
        for name in names:
            hparams = constant(args.lr0)
            if name == "online one_step":  # its emissions over one run, with λ held, sum to greedy_accumulate(1)
                meta = torchopt.adam(args.meta_lr / args.block)
                res = hf.greedy_accumulate(1.0)(loop, cross_entropy)(hparams, params0, first, val)
            else:
                meta = torchopt.adam(args.meta_lr)
                res = methods[name](hparams, params0, first, val)
            cosines[name].append(float(hf.agreement(res.grads, exact).cosine))
            meta_state, curve = meta.init(hparams), []
            for _ in tqdm(range(args.hyperiters), desc=f"run {run}: {name}", leave=False):
                if name == "online one_step":
                    hparams, meta_state, res, skip = online_run(
                        online, meta, meta_state, hparams, params0, draw(), val, args.steps, args.lr_max
                    )
                else:
                    res = methods[name](hparams, params0, draw(), val)
                    hparams, meta_state, skip = meta_step(meta, meta_state, hparams, res.grads, args.lr_max)
                skipped[name] += skip
                curve.append(res.loss.item())
            curves[name].append(curve)
            learned[name].append(lrs_per_step(hparams, args.block))
            evals[name] += evaluate(loop, hparams, params0, train, val, test, args.eval_runs, args.batch, generator)
    rows = []
    for name, results in evals.items():
        losses, accuracies = zip(*results)
        if name in learned:
            lrs = torch.stack(learned[name]).mean(0)
            shape = " / ".join(f"{lrs[i].item():.3g}" for i in (0, args.steps // 2, args.steps - 1))
        else:
            lr = args.lr0 if name == "constant lr0" else ", ".join(f"{b:g}" for b in best) + " (per run)"
            shape = f"{lr} at every step"
        rows.append(
            {
                "schedule": name.replace("constant lr0", f"constant {args.lr0}").replace(
                    "constant best", "best constant (grid, on val.)"
                ),
                "val. loss": fmt_ci(losses),
                "test acc. (%)": fmt_ci(accuracies, 2),
                "lr at first / middle / last step": shape,
                "cos to exact": fmt_ci(cosines[name], 2) if name in cosines else "",
                "skipped (non-finite)": skipped.get(name, ""),
            }
        )
    title = (
        f"Learned learning-rate schedules on digits, T = {args.steps}, {blocks} blocks of {args.block} steps, "
        f"{args.hyperiters} hyper-iterations, {args.runs} runs x {args.eval_runs} evaluations"
    )
    write_table(out, "lr_schedule", rows, title)
    fig, (ax_lr, ax_loss) = figure(1, 2, figsize=(12, 4.5))
    steps = torch.arange(args.steps)
    for name in names:
        ax_lr.plot(steps, torch.stack(learned[name]).mean(0), label=name)
        ax_loss.plot(torch.tensor(curves[name]).mean(0), label=name)
    ax_lr.axhline(args.lr0, color="gray", linestyle=":", label=f"start ({args.lr0})")
    ax_lr.set(yscale="log", xlabel="inner step t", ylabel="learning rate (mean over runs)", title="learned schedules")
    ax_loss.set(yscale="log", xlabel="hyper-iteration", ylabel="validation loss after T steps",
                title="meta-training (mean over runs)")  # fmt: skip
    ax_lr.legend(fontsize=7)
    save(fig, out, "lr_schedule")
    return rows


if __name__ == "__main__":
    main()
