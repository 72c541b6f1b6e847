"""hyperfunc/transforms/_primitives.py: the flat layout, and the step, outer and prepare math written once,
against torch.func applied to the same functions and against the Quadratic's closed form (float64)."""

import torch
from problems import DT, Quadratic

from hyperfunc.transforms._primitives import (
    Layout,
    Statics,
    outer_vjp,
    prepare,
    prepare_vjp,
    split,
    steps,
    steps_jvp,
    steps_outer_vjp,
    steps_vjp,
)

Q = Quadratic()


def _flat(quad=Q):
    """The Quadratic as a flat problem: (statics, s0, h, d, others, outer batch)."""
    loop = quad.loop()
    layout, d, others = Layout.of(quad.b.clone(), False)
    statics = Statics(loop, quad.outer, ("w",), ("lam",), layout)
    s0 = loop.optimizer._init_leaves((quad.w0.clone(),))
    return statics, s0, (quad.lam.clone(),), d, others, quad.y.clone()


def test_layout_round_trip_marks_prepared_floats():
    tree = {"x": torch.ones(2, dtype=DT), "labels": torch.arange(3), "name": "batch", "k": 4}
    layout, d, others = Layout.of(tree, True)
    assert [x.dtype for x in d] == [DT] and [x.dtype for x in others] == [torch.int64]
    assert layout.rebuild(d, others)["name"] == "batch" and layout.rebuild(d, others)["k"] == 4
    assert Layout.of(tree, False)[1] == ()  # unprepared batches have no d: nothing in them is differentiated
    assert layout.key() == Layout.of(tree, True)[0].key()


def test_split_cuts_groups_and_keeps_the_rest():
    assert split(tuple(range(6)), 2, 1) == [(0, 1), (2,), (3, 4, 5)]


def test_steps_follow_the_closed_form_from_any_first_step():
    p, s0, h, d, others, _ = _flat()
    states = Q.states()
    s, _ = steps(p, s0, (), h, d, others, 0, 5, 0)
    torch.testing.assert_close(torch.cat(s), states[5], rtol=1e-12, atol=1e-12)
    s, _ = steps(p, s, (), h, d, others, 5, Q.steps - 5, 5)  # batches 5.. read from the full batches
    torch.testing.assert_close(torch.cat(s), states[-1], rtol=1e-12, atol=1e-12)


def test_steps_vjp_is_the_transpose_of_the_affine_dynamics():
    p, s0, h, d, others, _ = _flat()
    A, B = Q.matrices()
    ct = torch.randn(2 * Q.n, generator=torch.Generator().manual_seed(3), dtype=DT)
    _, pull = steps_vjp(p, s0, (), h, d, others, 0, 1, 0)
    ct_s, ct_h, _ = pull((ct[: Q.n], ct[Q.n :]))
    torch.testing.assert_close(torch.cat(ct_s), A.T @ ct, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ct_h[0], B.T @ ct, rtol=1e-12, atol=1e-12)


def test_steps_jvp_rows_equal_torch_func_jvp():
    p, s0, h, d, others, _ = _flat()
    E = (torch.eye(Q.m, dtype=DT),)
    Z = tuple(torch.zeros(Q.m, *x.shape, dtype=DT) for x in s0)
    _, _, Zt = steps_jvp(p, s0, (), h, d, others, 0, 3, Z, E, (), 0)
    for i in range(Q.m):
        tangent = torch.func.jvp(lambda h: steps(p, s0, (), h, d, others, 0, 3, 0)[0], (h,), ((E[0][i],),))[1]
        for z, t in zip(Zt, tangent):
            torch.testing.assert_close(z[i], t, rtol=1e-12, atol=1e-12)


def test_fused_steps_and_outer_vjp_equal_the_two_apart():
    p, s0, h, d, others, y = _flat()
    loss, (sT, _), ct_s, ct_h, _ = steps_outer_vjp(p, s0, (), h, d, others, y, 0, Q.steps, 0)
    (sT2, _), pull = steps_vjp(p, s0, (), h, d, others, 0, Q.steps, 0)
    loss2, alpha, direct = outer_vjp(p, sT2, (), h, y)
    ct_s2, ct_h2, _ = pull(alpha)
    torch.testing.assert_close(loss, loss2, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.cat(ct_s), torch.cat(ct_s2), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ct_h[0], direct[0] + ct_h2[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ct_h[0], Q.exact(), rtol=1e-9, atol=1e-11)  # the closed form


def test_prepare_vjp_pulls_back_through_prepare():
    class Loop:
        @staticmethod
        def _prepared(hparams, batches):
            return (hparams["lam"][0] * batches[0], batches[1])

    h, batches = (torch.tensor([2.0, 0.0, 0.0], dtype=DT),), (torch.ones(3, dtype=DT), torch.arange(3))
    layout: list = []
    d, others = prepare(Loop, ("lam",), h, batches, layout)
    torch.testing.assert_close(d[0], 2 * torch.ones(3, dtype=DT))
    assert torch.equal(others[0], torch.arange(3)) and layout[0].rebuild(d, others)[1] is others[0]
    pull = prepare_vjp(Loop, ("lam",), h, batches)[-1]
    torch.testing.assert_close(pull((torch.ones(3, dtype=DT),))[0][0], torch.tensor([3.0, 0.0, 0.0], dtype=DT))
