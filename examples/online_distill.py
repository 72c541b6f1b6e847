"""Online meta-training with HyperDistill (Lee et al. 2022, Algorithm 3) on ANIL sinusoids.

The body of a 1-100-100-100-1 ReLU MLP is the hyperparameter λ, the last layer is trained inside
each task by T = 30 SGD steps (momentum 0.9, lr 0.01). λ is updated by TorchOpt's Adam after
*every* inner step with the online hypergradient g_t of ``hf.online.distill``, averaged over a
vmapped meta-batch of 10 tasks (γ = 0.9); θ is refitted by LinearEstimation (Algorithm 4) every 50
inner optimizations (the paper's period) or on every meta-batch; the head's initialization φ is
meta-learned by Reptile (φ ← φ − (φ − mean w_T)).
The same loop runs with online one-step lookahead for comparison. The training loop itself is
``meta_train`` in ``sinusoid_anil.py``. Each of ``--runs`` runs (seed = run) has its own
initialization and task stream; the table gives the mean and 95% interval over runs.

    python examples/online_distill.py            # 3 runs of 150 inner optimizations per method
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
    parser.add_argument("--runs", type=int, default=3, help="meta-training runs (seeds 0..runs-1)")
    parser.add_argument("--out", default="results/online_distill")
    parser.add_argument("--quick", action="store_true", help="a few episodes, for the tests")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.episodes, args.estimate_every, args.test_tasks, args.meta_batch = 2, 4, 2, 20, 3
    torch.manual_seed(0)
    out = results_dir(args.out)
    problems = [hf.tasks.anil_sinusoid(steps=30, seed=run) for run in range(args.runs)]
    untrained = [meta_test(p, p.hparams, p.params0, args.test_tasks) for p in problems]
    rows = [
        {
            "method": "no meta-training",
            "meta-test MSE": fmt_ci(torch.stack([mse.mean() for mse, _ in untrained])),
            "last θ per run": "",
            "sharpness": f"{max(float(sharp.max()) for _, sharp in untrained):.2f}",
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
        scores, sharpness, lasts = [], [], []
        for run, problem in enumerate(problems):
            hparams, head, losses, thetas = meta_train(method, how, problem, args, run)
            mse, sharp = meta_test(problem, hparams, head, args.test_tasks)
            scores.append(mse.mean())
            sharpness.append(float(sharp.max()))
            lasts.append(f"{thetas[-1][1]:.3f}" if thetas else "1 (fixed)")
            if run == 0:  # the plot shows the first run
                ax.plot(losses, label=method)
                if thetas:
                    ax_theta.plot(*zip(*thetas), marker="o", label=method)
        rows.append(
            {
                "method": method,
                "meta-test MSE": fmt_ci(torch.stack(scores)),
                "last θ per run": "1 (fixed)" if lasts[0] == "1 (fixed)" else ", ".join(lasts),
                "sharpness": f"{max(sharpness):.2f}",
            }
        )
    ax.set(xlabel="inner optimization (run 0)", ylabel="meta-train validation MSE", yscale="log")
    ax_theta.set(xlabel="inner optimization", ylabel="fitted θ (Algorithm 4)")
    ax.legend()
    save(fig, out, "online_distill")
    write_table(
        out,
        "online_distill",
        rows,
        f"Online ANIL sinusoid meta-training, {args.episodes} inner optimizations, meta-test MSE over "
        f"{args.test_tasks} tasks, mean ± 95% interval over {args.runs} runs "
        "(sharpness: max over runs and test tasks of μλ/(2(1+β)), see sinusoid_anil.meta_test)",
    )


if __name__ == "__main__":
    main()
