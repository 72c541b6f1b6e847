"""Data hyper-cleaning (Shaban et al. 2019, Sec. 4.2.1, Table 2) on scikit-learn's handwritten digits.

As in the paper (App. G.1), every training label is replaced, with probability 1/2, by a uniformly
random class (which can be the true one: an example counts as corrupted when its label changed).
Every training example i gets a weight σ(λ_i); a linear classifier (W, b) is trained inside by
T = 100 gradient-descent steps (lr 1) on the paper's objective divided by N,

    g(W, b, λ) = (1/N) [Σ_i σ(λ_i) CE(W x_i + b, y_i) + 0.001 (‖W‖²_F + ‖b‖²)]

(the paper's W ∈ R^{10×785} holds the bias, so the bias is regularized; the 1/N makes lr 1 stable:
on the plain sum, GD with lr 1 diverges here),

and λ (one per training example) minimizes the cross-entropy on a clean validation set, updated by
TorchOpt's Adam. An example is flagged as corrupted when σ(λ_i) < σ(−3) (the paper's threshold);
F1 scores that detection. MNIST is replaced by the 8x8 digits shipped inside scikit-learn
(1000 training, 300 validation, 497 test images), so nothing is downloaded.

    python examples/hypercleaning.py           # 300 hyperiterations per method (the paper: 1000)
    python examples/hypercleaning.py --quick   # seconds (tests)
"""

from __future__ import annotations

import argparse

import torch
import torchopt
from _common import figure, results_dir, save, write_table
from tensordict import TensorDict
from tqdm import tqdm

import hyperfunc as hf

PAPER = {"truncate(1)": "87.50 / 0.413 / 0.85", "truncate(5)": "88.05 / 0.383 / 0.89",
         "truncate(25)": "88.12 / 0.382 / 0.89", "truncate(100) = unroll": "88.33 / 0.380 / 0.88"}  # fmt: skip


def digits_data(seed: int, n_train: int = 1000, n_val: int = 300):
    """Shuffled digits, each training label replaced with probability 1/2 by a uniformly random class;
    returns the splits and the mask of labels that changed."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x = torch.as_tensor(x, dtype=torch.float32)[perm] / 16.0
    y = torch.as_tensor(y)[perm]
    train, val, test = (
        (x[:n_train], y[:n_train]),
        (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        (
            x[n_train + n_val :],
            y[n_train + n_val :],
        ),
    )
    replaced = torch.rand(n_train, generator=g) < 0.5
    noisy = torch.where(replaced, torch.randint(0, 10, (n_train,), generator=g), train[1])
    return (train[0], noisy), val, test, noisy != train[1]


def logits(p, x):
    return x @ p["W"].T + p["b"]


def inner(p, h, batch):
    x, y = batch
    ce = torch.nn.functional.cross_entropy(logits(p, x), y, reduction="none")
    return ((torch.sigmoid(h["lam"]) * ce).sum() + 1e-3 * ((p["W"] ** 2).sum() + (p["b"] ** 2).sum())) / len(y)


def outer(p, h, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(logits(p, x), y)


def methods() -> dict:
    return {
        "truncate(1)": hf.truncate(1),
        "truncate(5)": hf.truncate(5),
        "truncate(25)": hf.truncate(25),
        "truncate(100) = unroll": hf.unroll,
        "drmad": hf.drmad,
        "greedy_accumulate(0.9)": hf.greedy_accumulate(0.9),
        "distill(0.9)": hf.distill(0.9),
        "implicit('cg', 20)": hf.implicit("cg", iters=20),
    }


def f1(flagged: torch.Tensor, corrupted: torch.Tensor) -> float:
    tp = (flagged & corrupted).sum().item()
    precision = tp / max(flagged.sum().item(), 1)
    recall = tp / max(corrupted.sum().item(), 1)
    return 2 * precision * recall / max(precision + recall, 1e-12)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hyperiters", type=int, default=300, help="the paper: 1000")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--inner-lr", type=float, default=1.0)
    parser.add_argument("--meta-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--out", default="results/hypercleaning")
    parser.add_argument("--quick", action="store_true", help="tiny run for the tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.hyperiters, args.steps = 3, 5
        args.methods = args.methods or ["truncate(1)", "truncate(5)", "distill(0.9)"]
    torch.manual_seed(args.seed)
    out = results_dir(args.out)
    train, val, test, corrupted = digits_data(args.seed)
    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=args.inner_lr), steps=args.steps, full_batch=True)
    params0 = TensorDict({"W": torch.zeros(10, 64), "b": torch.zeros(10)}, [])
    table = methods()
    rows, weights = [], {}
    for name in args.methods or list(table):
        hg = table[name](loop, outer)
        hparams = TensorDict({"lam": torch.zeros(len(corrupted))}, [])
        meta = torchopt.adam(args.meta_lr)
        state = meta.init(hparams)
        for _ in tqdm(range(args.hyperiters), desc=name):
            res = hg(hparams, params0, train, val)
            updates, state = meta.update(res.grads, state, params=hparams)
            hparams = torchopt.apply_updates(hparams, updates, inplace=False)
        w = loop.run(hparams, params0, train)
        accuracy = lambda split: (logits(w, split[0]).argmax(-1) == split[1]).float().mean().item() * 100
        flagged = torch.sigmoid(hparams["lam"]) < torch.sigmoid(torch.tensor(-3.0))
        weights[name] = torch.sigmoid(hparams["lam"])
        rows.append(
            {
                "method": name,
                "test acc.": f"{accuracy(test):.2f}",
                "val. acc.": f"{accuracy(val):.2f}",
                "val. loss": f"{outer(w, hparams, val).item():.3f}",
                "F1": f"{f1(flagged, corrupted):.2f}",
                "paper (MNIST) test acc. / val. loss / F1": PAPER.get(name, ""),
            }
        )
    w = loop.run(TensorDict({"lam": torch.full((len(corrupted),), 20.0)}, []), params0, train)
    no_cleaning = (logits(w, test[0]).argmax(-1) == test[1]).float().mean().item() * 100
    rows.append({"method": "no cleaning (all weights 1)", "test acc.": f"{no_cleaning:.2f}"})
    fig, axes = figure(1, len(weights), figsize=(3 * len(weights), 3), squeeze=False)
    for ax, (name, wt) in zip(axes[0], weights.items()):
        ax.hist([wt[~corrupted].numpy(), wt[corrupted].numpy()], bins=20, range=(0, 1), label=["clean", "corrupted"])
        ax.set(title=name, xlabel="σ(λ_i)")
    axes[0][0].legend()
    save(fig, out, "weights")
    title = f"Data hyper-cleaning on digits, T = {args.steps}, {args.hyperiters} hyperiterations"
    write_table(out, "hypercleaning", rows, title)
    return rows


if __name__ == "__main__":
    main()
