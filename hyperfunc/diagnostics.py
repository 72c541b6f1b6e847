r"""How close an approximate hypergradient is to the exact one (HyperDistill Fig. 3).

Short-horizon and distilled hypergradients are judged by their direction (cosine similarity
with the exact hypergradient) and their size (norm ratio).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from tensordict import TensorDictBase

from ._tree import check_same_keys, check_tensordict, dot, keys_of, leaves_of
from .loop import InnerLoop, Loss
from .transforms import Transform, unroll

__all__ = ["Agreement", "agreement", "compare"]


class Agreement(NamedTuple):
    """Cosine similarity and norm ratio of a hypergradient against a reference.

    Attributes:
        cosine: :math:`\\langle g, g^* \\rangle / (\\|g\\| \\|g^*\\|)` (0 when either is zero).
        norm_ratio: :math:`\\|g\\| / \\|g^*\\|` (inf when the reference is zero and ``g`` is not).
        grads: the hypergradient ``g`` being judged.
        reference: the reference hypergradient ``g*``.
    """

    cosine: torch.Tensor
    norm_ratio: torch.Tensor
    grads: TensorDictBase
    reference: TensorDictBase


def agreement(grads: TensorDictBase, reference: TensorDictBase) -> Agreement:
    r"""Cosine similarity and norm ratio of ``grads`` against ``reference`` over all leaves.

    .. math:: \cos = \frac{\langle g, g^*\rangle}{\|g\|\,\|g^*\|}, \qquad r = \frac{\|g\|}{\|g^*\|}

    Edge cases stay readable: two zero vectors agree (cosine 1, ratio 1); one zero vector against a
    nonzero one has cosine 0 and ratio 0 (``grads`` zero) or infinity (``reference`` zero); a NaN or
    infinity in either input gives NaN in both fields, never a number that looks measured.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> g, ref = TensorDict({"x": torch.tensor([1.0, 1.0])}, []), TensorDict({"x": torch.tensor([2.0, 0.0])}, [])
        >>> a = hf.agreement(g, ref)
        >>> round(float(a.cosine), 4), round(float(a.norm_ratio), 4)
        (0.7071, 0.7071)
    """
    check_tensordict(grads, "grads")
    check_tensordict(reference, "reference")
    keys = keys_of(reference)
    check_same_keys(grads, keys, "grads", "reference")
    g, r = leaves_of(grads, keys), leaves_of(reference, keys)
    gg, rr, gr = dot(g, g), dot(r, r), dot(g, r)
    both_zero, one_zero = (gg == 0) & (rr == 0), (gg == 0) ^ (rr == 0)
    measured = torch.where(one_zero, torch.zeros_like(gg), gr / (gg * rr).sqrt())
    cosine = torch.where(both_zero, torch.ones_like(gg), measured)
    ratio = torch.where(both_zero, torch.ones_like(gg), (gg / rr).sqrt())
    broken = ~(torch.isfinite(gg) & torch.isfinite(rr))
    nan = torch.full_like(gg, float("nan"))
    return Agreement(torch.where(broken, nan, cosine), torch.where(broken, nan, ratio), grads, reference)


def compare(transform: Transform, reference: Transform = unroll) -> Callable[[InnerLoop, Loss], Callable]:
    r"""Judge ``transform`` against the exact hypergradient on the same inputs.

    ``compare(transform)(loop, outer_loss)`` has the signature of a hypergradient function and
    returns an :class:`Agreement` of ``transform``'s hypergradient against ``reference``'s
    (:func:`hyperfunc.unroll` by default; pass :func:`hyperfunc.forward` or
    ``lambda l, o: hf.unroll(l, o, checkpoint_every=k)`` for long horizons). It is vmappable, so
    one call over a meta-batch reproduces the per-task statistics of HyperDistill Fig. 3.

    Cost: one call of each transform.

    Examples:
        >>> import torch, hyperfunc as hf
        >>> from tensordict import TensorDict
        >>> inner = lambda p, h, x: ((p["w"] - x) ** 2).sum() + h["l2"] * (p["w"] ** 2).sum()
        >>> loop = hf.InnerLoop(inner, hf.optim.sgd(lr=0.1), steps=30, full_batch=True)
        >>> check = hf.compare(hf.truncate(5))(loop, lambda p, h, y: ((p["w"] - y) ** 2).sum())
        >>> a = check(TensorDict({"l2": torch.tensor(1.0)}, []), TensorDict({"w": torch.zeros(2)}, []),
        ...           torch.ones(2), torch.zeros(2))
        >>> float(a.cosine), float(a.norm_ratio) < 1  # same sign, shorter: the short-horizon bias
        (1.0, True)
    """
    if not callable(transform) or not callable(reference):
        raise TypeError("transform and reference must be transforms: functions (loop, outer_loss) -> hg")

    def bound(loop: InnerLoop, outer_loss: Loss) -> Callable[[Any, Any, Any, Any], Agreement]:
        try:
            approx, exact = transform(loop, outer_loss), reference(loop, outer_loss)
        except TypeError as err:
            raise TypeError(
                f"compare takes transforms, functions (loop, outer_loss) -> hg such as hf.unroll or hf.truncate(5); "
                f"calling one on (loop, outer_loss) failed: {err}. A factory takes its own arguments first: "
                "hf.compare(hf.truncate(K)), not hf.compare(hf.truncate)"
            ) from err

        def judge(hparams, params0, inner_batches, outer_batch) -> Agreement:
            args = (hparams, params0, inner_batches, outer_batch)
            return agreement(approx(*args).grads, exact(*args).grads)

        return judge

    return bound
