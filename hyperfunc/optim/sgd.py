"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``."""

from __future__ import annotations

import torch

from .._tree import Leaves
from ._base import Arg, Optimizer, at, check_arg, is_zero


def sgd(
    lr: Arg,
    momentum: Arg = 0.0,
    dampening: Arg = 0.0,
    weight_decay: Arg = 0.0,
    nesterov: bool = False,
) -> Optimizer:
    r"""Functional SGD with the update rule of ``torch.optim.SGD``.

    For step :math:`t = 0, 1, \dots` with gradient :math:`g_t`:

    .. math::
        g &\leftarrow g_t + \text{wd}\, w \\
        v &\leftarrow \mu v + (1 - d\,[t > 0])\, g \qquad (v = g \text{ at } t = 0) \\
        w &\leftarrow w - \text{lr}\,(g + \mu v \text{ if nesterov else } v)

    Without momentum (``momentum=0``, a number) the state holds no buffer and the step is
    :math:`w \leftarrow w - \text{lr}\, g`. Any argument may be a number, a scalar tensor or a
    callable of the hyperparameters (returning a scalar tensor, or a TensorDict shaped like the
    params for per-parameter values, as in Meta-SGD, Li et al. 2017).

    Cost per step: a handful of elementwise operations per parameter leaf; state = params plus
    one momentum buffer.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> opt = hf.optim.sgd(lr=lambda h: h["log_lr"].exp(), momentum=0.9)
        >>> state = opt.init(TensorDict({"w": torch.ones(2)}, []))
        >>> h = TensorDict({"log_lr": torch.tensor(-2.0)}, [])
        >>> state = opt.update(state, TensorDict({"w": torch.ones(2)}, []), h)
        >>> state["params", "w"]
        tensor([0.8647, 0.8647])
    """
    args = {
        "lr": check_arg("lr", lr),
        "momentum": check_arg("momentum", momentum),
        "dampening": check_arg("dampening", dampening, high=1.0),
        "weight_decay": check_arg("weight_decay", weight_decay),
    }
    has_momentum = not is_zero(args["momentum"])
    if nesterov and (not has_momentum or not is_zero(args["dampening"])):
        raise ValueError("nesterov=True needs a nonzero momentum and dampening=0 (as torch.optim.SGD)")
    decay = not is_zero(args["weight_decay"])

    def rule(params: Leaves, buffers: tuple, grads: Leaves, a: dict, step) -> tuple:
        new_params, new_bufs = [], []
        for i, (w, g) in enumerate(zip(params, grads)):
            if decay:
                g = g + at(a["weight_decay"], i) * w
            if has_momentum:
                mu = at(a["momentum"], i)
                damp = at(a["dampening"], i)
                # torch.optim.SGD starts the buffer at g (no dampening on the first step).
                started = (step > 0).to(g.dtype) if torch.is_tensor(step) else float(step > 0)
                v = mu * buffers[0][i] + (g if is_zero(damp) else (1 - damp * started) * g)
                new_bufs.append(v)
                g = g + mu * v if nesterov else v
            new_params.append(w - at(a["lr"], i) * g)
        return tuple(new_params), ((tuple(new_bufs),) if has_momentum else ())

    buffers = ("momentum_buffer",) if has_momentum else ()
    return Optimizer("sgd", buffers, args, rule, langevin=not has_momentum)
