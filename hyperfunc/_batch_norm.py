r"""Batch normalization as elementary operations under ``vmap``, for :func:`hyperfunc.functional_call`.

A hypergradient differentiates the inner step, which already holds a gradient: BatchNorm's
backward is differentiated again, under ``vmap`` over tasks. torch 2.14 and 2.15 fail there in
training mode ("accessing `data` under vmap transform is not allowed", in the double backward of
``native_batch_norm``; torch 2.13 and 2.8 pass): the native kernel's backward-of-backward reads
``.data``. Written as means and elementwise operations, batch normalization has no such kernel:
its every derivative is one of those operations', on every torch version, eagerly, under
``vmap``, and traced by ``make_fx`` or dynamo. ``functional_call`` runs a module's forward under
:class:`DecomposedBatchNorm`, which sends ``torch.nn.functional.batch_norm`` here while a ``vmap``
is active or dynamo traces (a ``TorchFunctionMode``, torch's public hook for this: the module is not
patched), and to torch's kernel otherwise: outside ``vmap`` the kernel has no such failure and is faster (a
second-order MAML meta-gradient of one Conv-4 task at T = 5: 0.22 s against 0.27 s, docs/modules.md),
and one task's compiled kernels get torch's batch norm.

.. math::
    y = \frac{x - \mu_B}{\sqrt{\sigma^2_B + \epsilon}}\,\gamma + \beta, \qquad
    \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B, \qquad
    \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\tfrac{n}{n-1}\sigma^2_B

(Ioffe & Szegedy 2015), with the batch statistics over every dimension but the channels (dim 1)
in training mode, and the running ones :math:`\hat\mu, \hat\sigma^2` otherwise.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import _torch


def batch_norm(
    input: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` as elementary operations (same arguments, same results, the
    running statistics updated in place in training mode).

    Examples:
        >>> import torch
        >>> from hyperfunc._batch_norm import batch_norm
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
        >>> mean, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
        >>> batch_norm(x, mean, var, training=True, momentum=0.5, eps=0.0)
        tensor([[-1., -1.],
                [ 1.,  1.]], dtype=torch.float64)
        >>> mean, var  # halfway to the batch mean (2, 4) and unbiased variance (2, 8)
        (tensor([1., 2.], dtype=torch.float64), tensor([1.5000, 4.5000], dtype=torch.float64))
    """
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if training:
        dims = [0, *range(2, input.dim())]
        count = input.numel() // input.shape[1] if input.dim() > 1 else input.numel()
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
        mean = input.mean(dims)
        centered = input - mean.reshape(shape)
        var = (centered * centered).mean(dims)
        if running_mean is not None or running_var is not None:
            with torch.no_grad():  # as the native kernel: the running statistics record no graph
                if running_mean is not None:
                    running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                if running_var is not None:
                    running_var.mul_(1 - momentum).add_(momentum * count / (count - 1) * var.detach())
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm in eval mode needs running_mean and running_var")
        mean, var = running_mean, running_var
        centered = input - mean.reshape(shape)
    out = centered * torch.rsqrt(var + eps).reshape(shape)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


class DecomposedBatchNorm(TorchFunctionMode):
    """While active, ``torch.nn.functional.batch_norm`` runs as :func:`batch_norm` under ``vmap`` (any
    enclosing vmap level) and while dynamo traces; every other function, and batch norm outside both, as
    itself."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        # dynamo cannot read the transform stack: its traces keep the elementary form, which runs everywhere
        if func is F.batch_norm and (torch.compiler.is_compiling() or _torch.under_vmap()):
            return batch_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
