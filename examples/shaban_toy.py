"""The toy problem of Shaban et al. 2019 (Sec. 4.1, Figs. 1, 3 and 4): K-step truncated back-propagation.

    min_λ f(ŵ) = ‖ŵ‖² + 10‖sin ŵ‖²,   ŵ = T = 100 GD steps (γ = 0.1, w_0 = (2, 2)) on g(w, λ) = ½ (w − λ)ᵀ G (w − λ)

with G = diag(1, 1/2). g is 1-smooth and α = 1/2 strongly convex and B_t = γG, so Prop. 3.1 bounds
the truncation error by (1 − γα)^K / (γα) ‖∇f(ŵ)‖ M_B with M_B = γ. The exact hypergradient is
closed-form: ŵ = C w_0 + (I − C) λ with C = (I − γG)^T, so d_λ f = (I − C)ᵀ ∇f(ŵ).

Outputs: the error of truncate(K) against that closed form for K = 0..T next to the bound
(Fig. 1, at λ = (1, 1)); the trajectories of λ for several K with η_τ = η_0/√τ, η_0 set so that
the first step has norm 0.6 (Fig. 4), for f and for f̃ = f + 5‖λ − (1, 0)‖² (Fig. 3, biased
convergence of short truncations).

    python examples/shaban_toy.py           # 300 hyperiterations per K
    python examples/shaban_toy.py --quick   # seconds (tests)
"""

from __future__ import annotations

import argparse

import torch
from _common import figure, results_dir, save, write_table
from tensordict import TensorDict
from tqdm import tqdm

import hyperfunc as hf

DT = torch.float64
G = torch.diag(torch.tensor([1.0, 0.5], dtype=DT))
W0, LR = torch.tensor([2.0, 2.0], dtype=DT), 0.1


def inner(p, h, _):
    d = p["w"] - h["lam"]
    return 0.5 * d @ G @ d


def f(w):
    return (w**2).sum() + 10 * (torch.sin(w) ** 2).sum()


def outer_f(p, h, _):
    return f(p["w"])


def outer_f_tilde(p, h, _):
    return f(p["w"]) + 5 * ((h["lam"] - torch.tensor([1.0, 0.0], dtype=DT)) ** 2).sum()


def closed_form(lam: torch.Tensor, steps: int, tilde: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ŵ and the exact d_λ F from ŵ = C w_0 + (I − C) λ, C = (I − γG)^T."""
    C = torch.linalg.matrix_power(torch.eye(2, dtype=DT) - LR * G, steps)
    w = C @ W0 + (torch.eye(2, dtype=DT) - C) @ lam
    grad = (torch.eye(2, dtype=DT) - C).T @ torch.func.grad(f)(w)
    if tilde:
        grad = grad + 10 * (lam - torch.tensor([1.0, 0.0], dtype=DT))
    return w, grad


def truncation_error(args, out) -> list[dict]:
    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=LR), steps=args.steps, full_batch=True)
    lam = torch.tensor([1.0, 1.0], dtype=DT)
    w, exact = closed_form(lam, args.steps, False)
    alpha = 0.5
    rows, ks, errs, bounds = [], list(range(0, args.steps + 1)), [], []
    for K in tqdm(ks, desc="truncation error"):
        h = hf.truncate(K)(loop, outer_f)(TensorDict({"lam": lam}, []), TensorDict({"w": W0}, []), torch.zeros(1), None)
        errs.append(float((h.grads["lam"] - exact).norm()))
        bounds.append(float((1 - LR * alpha) ** K / (LR * alpha) * torch.func.grad(f)(w).norm() * LR))
        if K in (0, 1, 2, 5, 10, 25, 50, args.steps):
            rows.append({"K": K, "error ‖h_K − d_λf‖": f"{errs[-1]:.3e}", "Prop. 3.1 bound": f"{bounds[-1]:.3e}"})
    fig, ax = figure(figsize=(5, 3.5))
    ax.semilogy(ks, [max(e, 1e-16) for e in errs], label="truncate(K) error")
    ax.semilogy(ks, bounds, "--", label="bound (1−γα)^K/(γα)·‖∇f‖·M_B")
    ax.set(xlabel="K", ylabel="‖h_K − d_λ f‖", title="λ = (1, 1)")
    ax.legend()
    save(fig, out, "truncation_error")
    write_table(out, "truncation_error", rows, "Shaban toy: truncation error against Prop. 3.1 (λ = (1, 1))")
    return rows


def trajectory(K: int, tilde: bool, args) -> list[torch.Tensor]:
    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=LR), steps=args.steps, full_batch=True)
    hg = hf.truncate(K)(loop, outer_f_tilde if tilde else outer_f)
    lam, path, eta0 = torch.tensor(args.start, dtype=DT), [], None
    for tau in range(1, args.hyperiters + 1):
        g = hg(TensorDict({"lam": lam}, []), TensorDict({"w": W0}, []), torch.zeros(1), None).grads["lam"]
        eta0 = 0.6 / float(g.norm()) if eta0 is None else eta0
        path.append(lam)
        lam = lam - eta0 / tau**0.5 * g
    path.append(lam)
    return path


def trajectories(args, out) -> list[dict]:
    rows = []
    fig, axes = figure(1, 2, figsize=(10, 4.5))
    grid = torch.linspace(-3.5, 3.5, 141, dtype=DT)
    L1, L2 = torch.meshgrid(grid, grid, indexing="xy")
    for ax, tilde in zip(axes, (False, True)):
        values = torch.tensor([[_objective(torch.stack([a, b]), args.steps, tilde) for a in grid] for b in grid])
        ax.contour(L1, L2, values, levels=30, linewidths=0.5, cmap="Greys")
        for K in tqdm(args.ks, desc=f"trajectories {'f~' if tilde else 'f'}"):
            path = torch.stack(trajectory(K, tilde, args))
            ax.plot(path[:, 0], path[:, 1], marker=".", markersize=2, label=f"K = {K}")
            final = path[-1]
            exact = closed_form(final, args.steps, tilde)[1]
            rows.append(
                {
                    "objective": "f̃" if tilde else "f",
                    "K": K,
                    "final λ": f"({final[0]:.3f}, {final[1]:.3f})",
                    "F(λ)": f"{_objective(final, args.steps, tilde):.4f}",
                    "‖d_λF‖ at final λ": f"{float(exact.norm()):.2e}",
                }
            )
        ax.set(xlabel="λ₁", ylabel="λ₂", title="f̃ = f + 5‖λ − (1,0)‖²" if tilde else "f")
        ax.legend(fontsize=7)
    save(fig, out, "trajectories")
    write_table(out, "trajectories", rows, f"Shaban toy: λ after {args.hyperiters} hyperiterations of truncate(K)")
    return rows


def _objective(lam: torch.Tensor, steps: int, tilde: bool) -> float:
    w = closed_form(lam, steps, False)[0]
    extra = 5 * float(((lam - torch.tensor([1.0, 0.0], dtype=DT)) ** 2).sum()) if tilde else 0.0
    return float(f(w)) + extra


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hyperiters", type=int, default=300)
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 5, 25, 100])
    parser.add_argument("--start", type=float, nargs=2, default=[2.0, 1.5])
    parser.add_argument("--out", default="results/shaban_toy")
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.hyperiters, args.ks = 12, 4, [1, 12]
    out = results_dir(args.out)
    return truncation_error(args, out), trajectories(args, out)


if __name__ == "__main__":
    main()
