"""Meta-learning tasks and the reference ANIL sinusoid problem (HyperDistill, Appendix G).

Everything here is generated on the fly: no download, deterministic given a ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch
from tensordict import TensorDict, TensorDictBase

from ._checks import check_int
from .loop import InnerLoop
from .optim import sgd


class Tasks(NamedTuple):
    """A meta-batch of regression tasks; every tensor has a leading task dimension."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def inner_batches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def outer_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_val, self.y_val


def sinusoid_tasks(
    n_tasks: int,
    shots: int = 10,
    val_shots: int = 10,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> Tasks:
    r"""Sinusoid regression tasks :math:`y = A \sin(x - \varphi)` (Finn et al., 2017).

    :math:`A \sim U(0.1, 5)`, :math:`\varphi \sim U(0, \pi)`, :math:`x \sim U(-5, 5)`; ``shots``
    training and ``val_shots`` validation points per task, shapes ``(n_tasks, shots, 1)``.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> tasks = hf.tasks.sinusoid_tasks(4, generator=torch.Generator().manual_seed(0))
        >>> tasks.x_train.shape, tasks.y_val.shape
        (torch.Size([4, 10, 1]), torch.Size([4, 10, 1]))
    """
    n_tasks, shots, val_shots = (
        check_int(n_tasks, "n_tasks", 1),
        check_int(shots, "shots", 1),
        check_int(val_shots, "val_shots", 1),
    )
    u = lambda *shape: torch.rand(*shape, generator=generator, dtype=dtype)
    amplitude = 0.1 + 4.9 * u(n_tasks, 1, 1)
    phase = math.pi * u(n_tasks, 1, 1)
    x = 10 * u(n_tasks, shots + val_shots, 1) - 5
    y = amplitude * torch.sin(x - phase)
    return Tasks(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def few_shot_tasks(
    dataset: Any,
    n_way: int,
    shots: int,
    queries: int,
    n_tasks: int,
    classes: Optional[Sequence[int]] = None,
    labels: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
) -> Tasks:
    """N-way K-shot classification tasks drawn from any map-style dataset of ``(image, label)`` pairs.

    Each task picks ``n_way`` distinct classes from ``classes`` (all classes when None; pass
    disjoint lists for meta-training and meta-testing), then ``shots + queries`` distinct examples
    of each; labels are renumbered ``0..n_way-1`` in a random order. Images are stacked with
    ``torch.as_tensor`` (a torchvision dataset needs ``transform=ToTensor()``). ``labels`` (e.g.
    torchvision's ``dataset.targets``) avoids reading every item once to index the classes.

    Returns:
        :class:`Tasks` with ``x_train`` of shape ``(n_tasks, n_way * shots, *image)``, ``y_train``
        ``(n_tasks, n_way * shots)`` (int64), and ``x_val``/``y_val`` with ``n_way * queries``
        examples: stacked for ``vmap`` over tasks.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> data = [(torch.full((1, 4, 4), float(c)), c) for c in range(5) for _ in range(6)]
        >>> tasks = hf.tasks.few_shot_tasks(data, n_way=3, shots=2, queries=3, n_tasks=4)
        >>> tasks.x_train.shape, tasks.y_val.shape
        (torch.Size([4, 6, 1, 4, 4]), torch.Size([4, 9]))
    """
    for name, value in (("n_way", n_way), ("shots", shots), ("queries", queries), ("n_tasks", n_tasks)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    labels = [int(dataset[i][1]) for i in range(len(dataset))] if labels is None else [int(c) for c in labels]
    if len(labels) != len(dataset):
        raise ValueError(f"labels has {len(labels)} entries but the dataset has {len(dataset)} items")
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    pool = sorted(by_class) if classes is None else [int(c) for c in classes]
    missing = [c for c in pool if len(by_class.get(c, [])) < shots + queries]
    if len(pool) < n_way or missing:
        raise ValueError(
            f"need {n_way} classes with at least shots + queries = {shots + queries} examples each; "
            f"got {len(pool)} classes, too small: {missing[:10]}"
        )
    xs, ys = [], []
    for _ in range(n_tasks):
        chosen = [pool[i] for i in torch.randperm(len(pool), generator=generator)[:n_way].tolist()]
        picks = []
        for c in chosen:
            members = by_class[c]
            picks.append([members[i] for i in torch.randperm(len(members), generator=generator)[: shots + queries]])
        order = [(way, k) for k in range(shots + queries) for way in range(n_way)]
        xs.append(torch.stack([torch.as_tensor(dataset[picks[way][k]][0]) for way, k in order]))
        ys.append(torch.tensor([way for way, _ in order]))
    x, y = torch.stack(xs), torch.stack(ys)
    split = n_way * shots
    return Tasks(x[:, :split], y[:, :split], x[:, split:], y[:, split:])


def relu_mlp(params: TensorDictBase, x: torch.Tensor, final_relu: bool = False) -> torch.Tensor:
    """A fully connected ReLU network over params ``{"0": {"weight","bias"}, "1": ...}``."""
    n = len(params.keys())
    for i in range(n):
        x = torch.nn.functional.linear(x, params[str(i), "weight"], params[str(i), "bias"])
        if i < n - 1 or final_relu:
            x = torch.relu(x)
    return x


def init_mlp(sizes: list[int], generator: Optional[torch.Generator] = None, dtype=torch.float32) -> TensorDict:
    """PyTorch's default ``nn.Linear`` initialization, as a nested TensorDict."""
    layers = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1 / math.sqrt(fan_in)
        w = (2 * torch.rand(fan_out, fan_in, generator=generator, dtype=dtype) - 1) * bound
        b = (2 * torch.rand(fan_out, generator=generator, dtype=dtype) - 1) * bound
        layers[str(i)] = TensorDict({"weight": w, "bias": b}, batch_size=[])
    return TensorDict(layers, batch_size=[])


class MetaProblem(NamedTuple):
    """A ready-to-use bilevel problem: pass ``loop`` and ``outer_loss`` to any transform."""

    loop: InnerLoop
    outer_loss: Any
    hparams: TensorDict
    params0: TensorDict


def anil_sinusoid(
    steps: int = 30,
    lr: float = 0.01,
    momentum: float = 0.9,
    hidden: int = 100,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> MetaProblem:
    """ANIL on sinusoids (HyperDistill, Appendix G): a 1-hidden-hidden-hidden-1 ReLU MLP whose three
    hidden layers are the hyperparameters (``hparams["body"]``) and whose last layer is adapted by
    ``steps`` SGD steps (momentum 0.9, lr 0.01). The body's features are computed once per
    hypergradient call through ``InnerLoop(prepare=...)``; the loop is full-batch.

    Batches are ``(x, y)`` pairs: ``tasks.inner_batches`` and ``tasks.outer_batch`` of
    :func:`sinusoid_tasks`, one task at a time (``vmap`` over a meta-batch).

    Examples:
        >>> import hyperfunc as hf
        >>> problem = hf.tasks.anil_sinusoid(steps=5)
        >>> hg = hf.unroll(problem.loop, problem.outer_loss)
    """
    g = torch.Generator().manual_seed(seed)
    net = init_mlp([1, hidden, hidden, hidden, 1], generator=g, dtype=dtype)
    body = TensorDict({k: net[k] for k in ("0", "1", "2")}, batch_size=[])
    head = net["3"].clone()

    def features(h, x):
        return relu_mlp(h["body"], x, final_relu=True)

    def prepare(h, batch):
        x, y = batch
        return features(h, x), y

    def inner_loss(p, h, batch):
        f, y = batch
        return ((torch.nn.functional.linear(f, p["weight"], p["bias"]) - y) ** 2).mean()

    def outer_loss(p, h, batch):
        x, y = batch
        return ((torch.nn.functional.linear(features(h, x), p["weight"], p["bias"]) - y) ** 2).mean()

    loop = InnerLoop(inner_loss, sgd(lr=lr, momentum=momentum), steps=steps, full_batch=True, prepare=prepare)
    return MetaProblem(loop, outer_loss, TensorDict({"body": body}, batch_size=[]), head)
