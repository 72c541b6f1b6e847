"""Adam, as ``torch.optim.Adam``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._tree import Leaves
from ._base import Arg, Optimizer, Rule, at, check_arg, is_zero, safe_sqrt


def adam(
    lr: Arg = 1e-3,
    betas: tuple[Arg, Arg] = (0.9, 0.999),
    eps: Arg = 1e-8,
    weight_decay: Arg = 0.0,
) -> Optimizer:
    r"""Functional Adam with the update rule of ``torch.optim.Adam`` (Kingma & Ba, 2015).

    For step :math:`t = 0, 1, \dots` (bias corrections use :math:`k = t + 1`):

    .. math::
        g &\leftarrow g_t + \text{wd}\, w \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        w &\leftarrow w - \frac{\text{lr}}{1-\beta_1^k}\, \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^k} + \epsilon}

    The square root is taken with a zero derivative at :math:`v = 0` (its values are exact), so
    differentiating through a step with an exactly-zero gradient gives zeros instead of NaN.
    Arguments may be numbers, scalar tensors or callables of the hyperparameters.

    Cost per step: about ten elementwise operations per parameter leaf; state = params plus two
    moment buffers.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> opt = hf.optim.adam(lr=0.1)
        >>> state = opt.init(TensorDict({"w": torch.ones(2)}, []))
        >>> state = opt.update(state, TensorDict({"w": torch.tensor([1.0, -2.0])}, []))
        >>> state["params", "w"]
        tensor([0.9000, 1.1000])
    """
    args = adam_args(lr, betas, eps, weight_decay)
    if is_zero(args["weight_decay"]):
        return Optimizer("adam", ("exp_avg", "exp_avg_sq"), args, adam_rule(_no_decay), preconditioned=True)
    return Optimizer("adam", ("exp_avg", "exp_avg_sq"), args, adam_rule(_coupled_decay), preconditioned=True)


def adam_args(lr: Arg, betas: tuple[Arg, Arg], eps: Arg, weight_decay: Arg) -> dict[str, Arg]:
    """Adam's arguments, checked (shared by :func:`adam` and :func:`~hyperfunc.optim.adamw`)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return {
        "lr": check_arg("lr", lr),
        "beta1": check_arg("betas[0]", betas[0], high=1.0, closed_high=False),
        "beta2": check_arg("betas[1]", betas[1], high=1.0, closed_high=False),
        "eps": check_arg("eps", eps),
        "weight_decay": check_arg("weight_decay", weight_decay),
    }


#: ``decay(w, g, a, i) -> (w, g)``: how the weight decay enters before Adam's moments (parameter leaf ``i``)
Decay = Callable[[torch.Tensor, torch.Tensor, dict, int], tuple[torch.Tensor, torch.Tensor]]


def _no_decay(w: torch.Tensor, g: torch.Tensor, a: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return w, g


def _coupled_decay(w: torch.Tensor, g: torch.Tensor, a: dict, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return w, g + at(a["weight_decay"], i) * w


def adam_rule(decay: Decay) -> Rule:
    """Adam's step on the flat state, after ``decay`` has applied the weight decay to ``(w, g)``."""

    def rule(params: Leaves, buffers: tuple, grads: Leaves, a: dict, step) -> tuple:
        k = step + 1
        if torch.is_tensor(k):  # the public update() carries the step as an int64 tensor
            k = k.to(params[0].dtype)
        new_params, new_m, new_v = [], [], []
        for i, (w, g) in enumerate(zip(params, grads)):
            w, g = decay(w, g, a, i)
            b1, b2 = at(a["beta1"], i), at(a["beta2"], i)
            m = b1 * buffers[0][i] + (1 - b1) * g
            v = b2 * buffers[1][i] + (1 - b2) * g * g
            denom = safe_sqrt(v) / safe_sqrt(1 - b2**k) + at(a["eps"], i)
            new_params.append(w - at(a["lr"], i) / (1 - b1**k) * m / denom)
            new_m.append(m)
            new_v.append(v)
        return tuple(new_params), (tuple(new_m), tuple(new_v))

    return rule
