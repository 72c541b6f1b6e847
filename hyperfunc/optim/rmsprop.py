"""RMSprop, as ``torch.optim.RMSprop``."""

from __future__ import annotations

from .._tree import Leaves
from ._base import Arg, Optimizer, at, check_arg, is_zero, safe_sqrt


def rmsprop(
    lr: Arg = 1e-2,
    alpha: Arg = 0.99,
    eps: Arg = 1e-8,
    weight_decay: Arg = 0.0,
    momentum: Arg = 0.0,
    centered: bool = False,
) -> Optimizer:
    r"""Functional RMSprop with the update rule of ``torch.optim.RMSprop`` (Hinton, Lecture 6e, 2012;
    the centered form of Graves, 2013).

    For step :math:`t = 0, 1, \dots`:

    .. math::
        g &\leftarrow g_t + \text{wd}\, w, \qquad v \leftarrow \alpha v + (1-\alpha) g^2 \\
        \tilde v &= v - \bar g^2 \text{ with } \bar g \leftarrow \alpha \bar g + (1-\alpha) g
            \text{ if centered, else } \tilde v = v \\
        b &\leftarrow \mu b + g / (\sqrt{\tilde v} + \epsilon), \qquad w \leftarrow w - \text{lr}\, b
            \qquad (\mu = 0: w \leftarrow w - \text{lr}\, g / (\sqrt{\tilde v} + \epsilon))

    Its fixed points are stationary points of :math:`L_{in} + \tfrac{wd}{2}\|w\|^2`; the step
    rescales the gradient (``preconditioned``: ``implicit("neumann")`` needs ``alpha=``). The square
    root has a zero derivative at 0, as in :func:`~hyperfunc.optim.adam`. Arguments may be numbers,
    scalar tensors or callables of the hyperparameters; ``momentum`` (a number 0 keeps no buffer) and
    ``centered`` choose the buffers.

    Cost per step: about eight elementwise operations per parameter leaf (more when centered);
    state = params plus ``square_avg``, and ``momentum_buffer`` and ``grad_avg`` when used.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> opt = hf.optim.rmsprop(lr=0.01, alpha=0.9)
        >>> state = opt.init(TensorDict({"w": torch.ones(2)}, []))
        >>> state = opt.update(state, TensorDict({"w": torch.tensor([1.0, -2.0])}, []))
        >>> state["params", "w"]  # 1 -+ 0.01 / sqrt(0.1)
        tensor([0.9684, 1.0316])
    """
    args = {
        "lr": check_arg("lr", lr),
        "alpha": check_arg("alpha", alpha, high=1.0),
        "eps": check_arg("eps", eps),
        "weight_decay": check_arg("weight_decay", weight_decay),
        "momentum": check_arg("momentum", momentum),
    }
    if not isinstance(centered, bool):
        raise TypeError(f"centered must be a bool, got {type(centered).__name__}")
    has_momentum = not is_zero(args["momentum"])
    decay = not is_zero(args["weight_decay"])
    names = ("square_avg",) + (("momentum_buffer",) if has_momentum else ()) + (("grad_avg",) if centered else ())

    def rule(params: Leaves, buffers: tuple, grads: Leaves, a: dict, step) -> tuple:
        new_params: list = []
        new_bufs: tuple[list, ...] = tuple([] for _ in names)
        for i, (w, g) in enumerate(zip(params, grads)):
            if decay:
                g = g + at(a["weight_decay"], i) * w
            rho = at(a["alpha"], i)
            v = rho * buffers[0][i] + (1 - rho) * g * g
            new_bufs[0].append(v)
            if centered:
                g_avg = rho * buffers[-1][i] + (1 - rho) * g
                new_bufs[-1].append(g_avg)
                v = v - g_avg * g_avg
            direction = g / (safe_sqrt(v) + at(a["eps"], i))
            if has_momentum:
                direction = at(a["momentum"], i) * buffers[1][i] + direction
                new_bufs[1].append(direction)
            new_params.append(w - at(a["lr"], i) * direction)
        return tuple(new_params), tuple(tuple(b) for b in new_bufs)

    return Optimizer("rmsprop", names, args, rule, preconditioned=True)
