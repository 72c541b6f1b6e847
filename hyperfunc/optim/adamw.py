"""AdamW, as ``torch.optim.AdamW``."""

from __future__ import annotations

import torch

from .._tree import Leaves
from ._base import Arg, Optimizer, at, check_arg, safe_sqrt


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
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    args = {
        "lr": check_arg("lr", lr),
        "beta1": check_arg("betas[0]", betas[0], high=1.0, closed_high=False),
        "beta2": check_arg("betas[1]", betas[1], high=1.0, closed_high=False),
        "eps": check_arg("eps", eps),
        "weight_decay": check_arg("weight_decay", weight_decay),
    }

    def rule(params: Leaves, buffers: tuple, grads: Leaves, a: dict, step) -> tuple:
        k = step + 1
        if torch.is_tensor(k):  # the public update() carries the step as an int64 tensor
            k = k.to(params[0].dtype)
        new_params, new_m, new_v = [], [], []
        for i, (w, g) in enumerate(zip(params, grads)):
            lr, b1, b2 = at(a["lr"], i), at(a["beta1"], i), at(a["beta2"], i)
            w = w * (1 - lr * at(a["weight_decay"], i))
            m = b1 * buffers[0][i] + (1 - b1) * g
            v = b2 * buffers[1][i] + (1 - b2) * g * g
            denom = safe_sqrt(v) / safe_sqrt(1 - b2**k) + at(a["eps"], i)
            new_params.append(w - lr / (1 - b1**k) * m / denom)
            new_m.append(m)
            new_v.append(v)
        return tuple(new_params), (tuple(new_m), tuple(new_v))

    return Optimizer("adamw", ("exp_avg", "exp_avg_sq"), args, rule, stationary=False, preconditioned=True)
