"""Online meta-training with HyperDistill (Lee et al. 2022, Algorithm 3) on ANIL sinusoids.

The body of a 1-100-100-100-1 ReLU MLP is the hyperparameter λ, the last layer is trained inside
each task by T = 30 SGD steps (momentum 0.9, lr 0.01). λ is updated by TorchOpt's Adam after
*every* inner step with the online hypergradient g_t of ``hf.online.distill``, averaged over a
vmapped meta-batch of 10 tasks (γ = 0.9); θ is refitted by LinearEstimation (Algorithm 4) every 50
inner optimizations (the paper's period) or on every meta-batch; the head's initialization φ is
meta-learned by Reptile (φ ← φ − (φ − mean w_T)).
The same loop runs with online one-step lookahead for comparison. The training loop itself is
``meta_train`` in ``sinusoid_anil.py``.

    python examples/online_distill.py            # 150 inner optimizations per method
    python examples/online_distill.py --quick    # seconds
"""

from __future__ import annotations

import argparse

import torch
from _common import figure, fmt_ci, results_dir, save, write_table
from sinusoid_anil import Method, meta_test, meta_train

import hyperfunc as hf


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=150, help="inner optimizations per method")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--estimate-every", type=int, default=50)
    parser.add_argument("--meta-batch", type=int, default=10)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--reptile-lr", type=float, default=1.0)
    parser.add_argument("--test-tasks", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/online_distill")
    parser.add_argument("--quick", action="store_true", help="a few episodes, for the tests")
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.estimate_every, args.test_tasks, args.meta_batch = 4, 2, 20, 3
    torch.manual_seed(args.seed)
    out = results_dir(args.out)
    problem = hf.tasks.anil_sinusoid(steps=30)
    before, sharp = meta_test(problem, problem.hparams, problem.params0, args.test_tasks)
    rows = [
        {
            "method": "no meta-training",
            "meta-test MSE (95% CI)": fmt_ci(before),
            "last θ": "",
            "sharpness": f"{sharp.max():.2f}",
        }
    ]
    fig, (ax, ax_theta) = figure(1, 2, figsize=(10, 3.5))
    methods = (
        ("online one-step (γ=0, θ=1)", Method("online", hf.online.one_step)),
        *(
            (f"HyperDistill (γ={args.gamma}, θ refit every {every})", Method("distill", args.gamma, refit=every))
            for every in (args.estimate_every, 1)
        ),
    )
    for method, how in methods:
        hparams, head, losses, thetas = meta_train(method, how, problem, args, args.seed)
        mse, sharp = meta_test(problem, hparams, head, args.test_tasks)
        last = f"{thetas[-1][1]:.3f}" if thetas else "1 (fixed)"
        rows.append(
            {"method": method, "meta-test MSE (95% CI)": fmt_ci(mse), "last θ": last, "sharpness": f"{sharp.max():.2f}"}
        )
        ax.plot(losses, label=method)
        if thetas:
            ax_theta.plot(*zip(*thetas), marker="o", label=method)
    ax.set(xlabel="inner optimization", ylabel="meta-train validation MSE", yscale="log")
    ax_theta.set(xlabel="inner optimization", ylabel="fitted θ (Algorithm 4)")
    ax.legend()
    save(fig, out, "online_distill")
    write_table(
        out,
        "online_distill",
        rows,
        f"Online ANIL sinusoid meta-training, {args.episodes} inner optimizations "
        "(sharpness: max over test tasks of μλ/(2(1+β)), see sinusoid_anil.meta_test)",
    )


if __name__ == "__main__":
    main()
