r"""The step, outer-loss and ``prepare`` math on the flat layout, written once.

Every executor calls these functions: the eager one (:mod:`hyperfunc.transforms._executor`) on the
bound problem's tensors, the compiled one (:mod:`hyperfunc.compile`) inside its kernels, on the
kernels' flat inputs. A *flat* problem is its static part :class:`Statics` (the loop, the outer
loss, the keys and the layout of the prepared batches) and its tensors: the optimizer state ``s``
(params first), the module buffers ``b`` (a TensorDict, or ``()`` for none), the hyperparameter
leaves ``h``, and the prepared batches as their floating leaves ``d`` (differentiated) and their
other tensors ``others``.

``t0`` is the optimizer's index of the first step (an int, or a 0-d tensor in a kernel: one kernel
serves every segment) and ``first`` the index of its batch in the batch leaves (``t0`` eagerly, 0
in a kernel, whose batches are the window of its steps).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .._torch import tree_flatten, tree_unflatten
from .._tree import Keys, Leaves, build
from ..loop import call_loss, module_buffers


class Layout(NamedTuple):
    """A batch pytree as flat tensors: ``spec`` and the non-tensor leaves are static (in a kernel's key),
    ``diff`` marks the leaves that are prepared floats (``d``, whose cotangent is returned)."""

    spec: Any
    fixed: tuple  # the non-tensor leaves, None where a tensor goes
    diff: tuple  # per leaf: True for a d leaf, False for another tensor, None for a non-tensor

    @classmethod
    def of(cls, tree: Any, prepared: bool) -> tuple[Layout, Leaves, Leaves]:
        """``(layout, d_leaves, other_tensor_leaves)`` of ``tree`` (``prepared``: its floats are ``d``)."""
        leaves, spec = tree_flatten(tree)
        diff = tuple(None if not torch.is_tensor(x) else (prepared and x.is_floating_point()) for x in leaves)
        fixed = tuple(None if torch.is_tensor(x) else x for x in leaves)
        d = tuple(x for x, f in zip(leaves, diff) if f)
        others = tuple(x for x, f in zip(leaves, diff) if f is False)
        return cls(spec, fixed, diff), d, others

    def key(self) -> tuple:
        try:
            hash(self.fixed)
        except TypeError as err:
            raise TypeError(
                "hf.compile needs the non-tensor leaves of the batches to be hashable (ints, floats, None, "
                f"strings): {err}"
            ) from err
        return (str(self.spec), self.fixed, self.diff)

    def rebuild(self, d: Leaves, others: Leaves) -> Any:
        floats, rest = iter(d), iter(others)
        leaves = [x if f is None else next(floats) if f else next(rest) for x, f in zip(self.fixed, self.diff)]
        return tree_unflatten(leaves, self.spec)


class Statics(NamedTuple):
    """The static part of a flat problem: what a primitive needs beyond its tensors."""

    loop: Any
    outer_loss: Any
    pkeys: Keys
    hkeys: Keys
    layout: Layout  # of the prepared inner batches


def split(flat: Leaves, *sizes: int) -> list:
    """``flat`` cut into consecutive groups of ``sizes``, the rest as a last group."""
    out, i = [], 0
    for n in sizes:
        out.append(tuple(flat[i : i + n]))
        i += n
    out.append(tuple(flat[i:]))
    return out


def steps(p: Statics, s: Leaves, b: Any, h: Leaves, d: Leaves, others: Leaves, t0: Any, n: int, first: Any = 0):
    r"""``(s', b')`` after ``n`` inner steps :math:`s_{t+1} = \Phi(s_t, \lambda; D_t)` from step ``t0``."""
    loop, hparams, batches = p.loop, build(p.hkeys, h), p.layout.rebuild(d, others)
    for i in range(n):
        s, b = loop._step(p.pkeys, s, b, hparams, loop._batch_at(batches, first + i), t0 + i)
    return s, b


def steps_vjp(p: Statics, s: Leaves, b: Any, h: Leaves, d: Leaves, others: Leaves, t0: Any, n: int, first: Any = 0):
    r"""``((s', b'), pull)``: :func:`steps` and ``pull(ct_s') -> (ct_s, ct_h, ct_d)``, the products
    :math:`\bar s A` and :math:`\bar s B` on λ and ``d``."""
    s_new, pull, b_new = torch.func.vjp(
        lambda s, h, d: steps(p, s, b, h, d, others, t0, n, first), s, h, d, has_aux=True
    )
    return (s_new, b_new), pull


def push_forward(fn: Any, primals: tuple, tangents: tuple) -> tuple:
    r"""``(fn(*primals), J·t for every row t of tangents, aux)`` for ``fn(*primals) -> (out, aux)``.

    The products are the transpose of ``fn``'s VJP: :math:`u \mapsto J^\top u` is linear, so its VJP
    at any :math:`u` with cotangent :math:`t` is :math:`J t`. One VJP of ``fn`` serves every row of
    ``tangents`` (a tuple over ``primals``, each a tuple of leaves with a leading direction dimension).
    Reverse-over-reverse, because ``torch.func.jvp`` of a step holding a ``torch.func.grad`` fails in
    dynamo's fake-tensor pass when a ``vmap`` over tasks encloses the ``vmap`` over directions (torch
    2.13), which both compiled routes need; this form compiles there."""
    out, pull, aux = torch.func.vjp(fn, *primals, has_aux=True)
    transpose = torch.func.vjp(pull, tuple(torch.zeros_like(x) for x in out))[1]
    return out, torch.func.vmap(lambda *t: transpose(t)[0])(*tangents), aux


def steps_jvp(p: Statics, s, b, h, d, others, t0: Any, n: int, Z: Leaves, E: Leaves, Zd: Leaves, first: Any = 0):
    r"""``(s', b', Z')``: :func:`steps` and the tangents :math:`Z' = A Z + B_\lambda E + B_d Z_d`, one row per
    hyperparameter direction (``Zd``: the tangents of ``d``, per direction)."""
    s, Z, b = push_forward(lambda s, h, d: steps(p, s, b, h, d, others, t0, n, first), (s, h, d), (Z, E, Zd))
    return s, b, Z


def outer(p: Statics, s: Leaves, b: Any, h: Leaves, batch: Any) -> torch.Tensor:
    r""":math:`L_{out}(w, \lambda; D_{val})` for the params held in the state ``s`` (its buffer update is dropped)."""
    params = build(p.pkeys, s[: len(p.pkeys)])
    return call_loss(p.outer_loss, "outer_loss", params, build(p.hkeys, h), batch, module_buffers(b))[0]


def outer_vjp(p: Statics, s: Leaves, b: Any, h: Leaves, batch: Any, with_h: bool = True):
    r"""``(L_out, α, ct_h)``: the outer loss, :math:`\alpha = \partial L_{out}/\partial s` and, when ``with_h``,
    the direct term :math:`\partial_\lambda L_{out}` (else None: no backward through λ)."""
    if with_h:
        loss, pull = torch.func.vjp(lambda s, h: outer(p, s, b, h, batch), s, h)
        alpha, ct_h = pull(torch.ones_like(loss))
        return loss, alpha, ct_h
    loss, pull = torch.func.vjp(lambda s: outer(p, s, b, h, batch), s)
    return loss, pull(torch.ones_like(loss))[0], None


def steps_outer_vjp(p: Statics, s, b, h, d, others, batch: Any, t0: Any, n: int, first: Any = 0):
    r"""``(L_out, (s', b'), ct_s, ct_h, ct_d)``: ``n`` steps, the outer loss after them and their VJP in one
    pass, so the steps' forward runs once. ``ct_h`` holds the direct term :math:`\partial_\lambda L_{out}`
    plus :math:`\alpha A \cdots B`; the outer loss reads the buffers after the steps without
    differentiating them."""

    def fn(s, h, d):
        s_new, b_new = steps(p, s, b, h, d, others, t0, n, first)
        b_new = b_new.detach() if not isinstance(b_new, tuple) else b_new
        return outer(p, s_new, b_new, h, batch), (s_new, b_new)

    loss, pull, final = torch.func.vjp(fn, s, h, d, has_aux=True)
    return (loss, final, *pull(torch.ones_like(loss)))


def prepare(loop: Any, hkeys: Keys, h: Leaves, batches: Any, layout: list) -> tuple[Leaves, Leaves]:
    """``(d, others)``: ``prepare``'s output as its floating leaves ``d`` and its other tensors, with its
    layout written to ``layout[0]`` (``layout[0].rebuild(d, others)`` reassembles it): the layout is no
    tensor, and ``vmap`` (forward mode pushes ``prepare`` forward over every direction) returns tensors only."""
    spec, d, others = Layout.of(loop._prepared(build(hkeys, h), batches), True)
    layout[:] = [spec]
    return d, others


def prepare_vjp(loop: Any, hkeys: Keys, h: Leaves, batches: Any) -> tuple:
    """``(d, others, layout, pull)``: :func:`prepare` and ``pull(ct_d) -> (ct_h,)``."""
    layout: list = []
    d, pull, others = torch.func.vjp(lambda h: prepare(loop, hkeys, h, batches, layout), h, has_aux=True)
    return d, others, layout[0], pull
