"""AdamW, as ``torch.optim.AdamW``."""

from __future__ import annotations

import torch

from ._base import Arg, Optimizer, at
from .adam import adam_args, adam_rule


def adamw(
    lr: Arg = 1e-3,
    betas: tuple[Arg, Arg] = (0.9, 0.999),
    eps: Arg = 1e-8,
    weight_decay: Arg = 1e-2,
) -> Optimizer:
    r"""Functional AdamW: Adam with decoupled weight decay, the update rule of ``torch.optim.AdamW``
    (Loshchilov & Hutter, 2019).

    For step :math:`t = 0, 1, \dots` (bias corrections use :math:`k = t + 1`):

    .. math::
        w &\leftarrow w\,(1 - \text{lr}\cdot\text{wd}) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g_t, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g_t^2 \\
        w &\leftarrow w - \frac{\text{lr}}{1-\beta_1^k}\, \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^k} + \epsilon}

    The decay shrinks the weights outside the adaptive step, so its fixed points are not stationary
    points of :math:`L_{in} + \tfrac{wd}{2}\|w\|^2` (``stationary=False``: ``implicit`` refuses it;
    Adam with ``weight_decay``, the coupled form, is stationary). The square root has a zero
    derivative at :math:`v = 0`, as in :func:`~hyperfunc.optim.adam`. Arguments may be numbers,
    scalar tensors or callables of the hyperparameters.

    Cost per step: about a dozen elementwise operations per parameter leaf; state = params plus two
    moment buffers.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> opt = hf.optim.adamw(lr=0.1, weight_decay=0.5)
        >>> state = opt.init(TensorDict({"w": torch.ones(2)}, []))
        >>> state = opt.update(state, TensorDict({"w": torch.tensor([1.0, -2.0])}, []))
        >>> state["params", "w"]  # 1 * (1 - 0.05) -+ 0.1
        tensor([0.8500, 1.0500])
    """
    args = adam_args(lr, betas, eps, weight_decay)
    return Optimizer(
        "adamw", ("exp_avg", "exp_avg_sq"), args, adam_rule(_decoupled_decay), stationary=False, preconditioned=True
    )


def _decoupled_decay(w: torch.Tensor, g: torch.Tensor, a: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return w * (1 - at(a["lr"], i) * at(a["weight_decay"], i)), g
