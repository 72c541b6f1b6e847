"""Meta-Weight-Net under label noise, meta-learned online (HyperDistill, Lee et al. 2022, Sec. 5 and App. E).

Meta-Weight-Net (Shu et al., NeurIPS 2019) learns a function V(ℓ) that weights each training
example's loss ℓ; trained against a clean validation loss, it learns to down-weight the large
losses of mislabelled examples. HyperDistill's setup: a 1-200(ReLU)-1 weighting network whose output
is bounded below by 0.1, labels corrupted to a random class with probability 0.4, the weighting
network meta-learned over a task distribution, not for a single task.

- Weights w (adapted inside each task by T SGD steps, momentum 0.9, lr 0.1; initialization φ
  meta-learned by Reptile, rate 1): a Conv-4 classifier (``maml_conv_bn.conv4``, BatchNorm with batch
  statistics).
- Hyperparameter λ: the weighting network, ``V(ℓ) = 0.1 + 0.9 σ(MLP(ℓ))`` (a smooth form of the
  paper's lower bound; the paper does not give its formula). The inner loss is ``mean_i V(ℓ_i) ℓ_i``
  with ``V`` fed the loss value without its gradient, as Meta-Weight-Net's code does; the outer loss
  is the clean query cross-entropy, which does not read λ (``g^FO = 0``: FO has nothing to learn).
- Methods: one-step lookahead (Meta-Weight-Net's own), HyperDistill with θ fixed to 1, N.IFT(5, 10)
  and DrMAD, updated by TorchOpt's Adam (``meta_train`` of ``sinusoid_anil.py``; online methods
  after every inner step). The paper sets π* = 1 for this model, since with g^FO = 0 the size of the
  distilled term only rescales the hyper-step; θ = 1 keeps the size ``(1-γ^t)/(1-γ)`` of Eq. (15)
  instead, which Adam's normalization absorbs up to its change over t.
- Tasks: 4-way digits (scikit-learn's 8x8 images, meta-training classes 0-5, meta-test classes
  6-9), noisy support labels, clean queries.

Meta-test: on unseen-class tasks with noisy labels, adapt from the learned φ with the learned V; the
table gives the query accuracy and the mean weight V gives the clean and the corrupted examples at
the end of the inner optimization (a working V gives the corrupted ones less).
``benchmarks/hyperdistill_costs.py`` runs the same model at the paper's shapes for its cost table.

    python examples/meta_weight_net.py            # 2 runs x 10 inner optimizations x 4 methods (4.2 min alone, 2 cores)
    python examples/meta_weight_net.py --quick    # seconds (tests)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _common import figure, fmt_ci, results_dir, save, write_table
from maml_conv_bn import conv4
from sinusoid_anil import Method, methods
from tensordict import TensorDict
from warpgrad import compare, digits_parser, digits_tasks, parse

import hyperfunc as hf

TRAIN_CLASSES, TEST_CLASSES = range(0, 6), range(6, 10)
NOISE = 0.4  # the paper's corruption probability
FLOOR = 0.1  # the paper's lower bound on V
METHODS = ("one_step", "HyperDistill(γ=0.99), θ = 1", "N.IFT(5,10)", "drmad")


def weight(h, losses: torch.Tensor) -> torch.Tensor:
    """``V(ℓ) = 0.1 + 0.9 σ(MLP_λ(ℓ))`` per example, fed the loss values without their gradient."""
    logits = hf.tasks.relu_mlp(h["weighting"], losses.detach()[:, None])[:, 0]
    return FLOOR + (1 - FLOOR) * torch.sigmoid(logits)


def problem(
    channels: int, n_way: int, steps: int, in_channels: int = 1, image: int = 8, lr: float = 0.1, seed: int = 0
):
    """``(MetaProblem, predict)``: hparams ``{"weighting"}`` (1-200-1), params0 the classifier's; ``predict(p, x)``
    gives the logits."""
    torch.manual_seed(seed)
    net = conv4(channels, n_way, in_channels, image, running_stats=False)
    params0, _ = hf.module_state(net)
    hparams = hf.tasks.init_mlp([1, 200, 1], generator=torch.Generator().manual_seed(seed))

    def predict(p, x):
        return hf.functional_call(net, p, None, x)[0]

    def inner(p, h, batch):
        x, y = batch
        losses = F.cross_entropy(predict(p, x), y, reduction="none")
        return (weight(h, losses) * losses).mean()

    def outer(p, h, batch):
        x, y = batch
        return F.cross_entropy(predict(p, x), y)

    loop = hf.InnerLoop(inner, hf.optim.sgd(lr=lr, momentum=0.9), steps=steps, full_batch=True)
    problem = hf.tasks.MetaProblem(loop, outer, TensorDict({"weighting": hparams}, []), params0)
    return problem, predict


def noisy(tasks: hf.tasks.Tasks, n_way: int, generator: torch.Generator) -> tuple[hf.tasks.Tasks, torch.Tensor]:
    """The tasks with each support label replaced by a uniformly random class with probability 0.4 (it may
    draw the true one), and the mask of the labels that changed."""
    y = tasks.y_train
    flip = torch.rand(y.shape, generator=generator) < NOISE
    y_noisy = torch.where(flip, torch.randint(n_way, y.shape, generator=generator), y)
    return tasks._replace(y_train=y_noisy), y_noisy != y


def meta_test(problem, predict, hparams, head, tasks, corrupted) -> dict:
    """Query accuracy (%) per task and the mean weight of the clean and the corrupted support examples at w_T
    (after the inner optimization, where the losses of the two kinds differ; at w_0 they hardly do)."""
    n = tasks.x_train.shape[0]
    final = torch.func.vmap(problem.loop.run, in_dims=(None, 0, 0))(
        hparams, head.expand(n).clone(), tasks.inner_batches
    )
    hits = torch.func.vmap(lambda p, x, y: (predict(p, x).argmax(-1) == y).double().mean())(
        final, tasks.x_val, tasks.y_val
    )
    losses = torch.func.vmap(lambda p, x, y: F.cross_entropy(predict(p, x), y, reduction="none"))(
        final, *tasks.inner_batches
    )
    v = weight(hparams, losses.flatten()).reshape(losses.shape)
    return {"acc": 100 * hits, "clean": v[~corrupted].mean(), "corrupted": v[corrupted].mean()}


def main(argv=None):
    args = parse(digits_parser(__doc__, "meta_weight_net", shots=10, meta_lr=1e-2, methods=METHODS), argv)
    torch.manual_seed(0)
    out = results_dir(args.out)
    few_shot = digits_tasks(args)
    test_gen = torch.Generator().manual_seed(10_000)
    test_tasks, corrupted = noisy(few_shot(args.test_tasks, TEST_CLASSES, generator=test_gen), args.n_way, test_gen)

    def sample(n_tasks: int, generator: torch.Generator) -> hf.tasks.Tasks:
        return noisy(few_shot(n_tasks, TRAIN_CLASSES, generator=generator), args.n_way, generator)[0]

    table = {**methods(args.steps), "HyperDistill(γ=0.99), θ = 1": Method("online", hf.online.distill(0.99, theta=1.0))}
    fig, ax = figure(figsize=(6, 4))
    runs = compare(
        args,
        table,
        lambda run: problem(args.channels, args.n_way, args.steps, seed=run),
        sample,
        lambda base, predict, hparams, head: meta_test(base, predict, hparams, head, test_tasks, corrupted),
        ax,
    )
    rows = [
        {
            "method": name,
            "meta-test acc. (%)": fmt_ci([r["acc"].mean() for r in results]),
            "mean V: clean / corrupted": " / ".join(fmt_ci([r[k] for r in results], 2) for k in ("clean", "corrupted")),
            "last meta-train loss": "" if curve is None else f"{curve[-1]:.3f}",
        }
        for name, (results, curve) in runs.items()
    ]
    ax.set(xlabel="inner optimization", ylabel=f"clean query loss at w_T (mean of {args.runs} runs)")
    ax.legend(fontsize=7)
    save(fig, out, "meta_weight_net")
    title = (
        f"Meta-Weight-Net, {args.n_way}-way digits with {NOISE:.0%} label noise (meta-test classes 6-9), T = "
        f"{args.steps}, {args.episodes} inner optimizations; accuracy over {args.test_tasks} tasks, mean ± 95% CI "
        f"over {args.runs} runs"
    )
    write_table(out, "meta_weight_net", rows, title)
    return rows


if __name__ == "__main__":
    main()
