"""hyperfunc/compile/__init__.py: hf.vmap equals torch.func.vmap, a vmap around it takes the general path,
and hf.compile refuses what it cannot serve with errors that name the fix."""

import pytest
import torch
import torch._dynamo.testing
from problems import anil, sinusoid_args, tree_close

import hyperfunc as hf
from hyperfunc.transforms.base import InitTerm, Outcome, make_transform

DT = torch.float64


T, K = 7, 3


IN_DIMS = (None, None, 0, 0)


def test_vmap_equals_torch_func_vmap():
    prob = anil(T)
    hg = hf.truncate(2)(prob.loop, prob.outer_loss)
    args = sinusoid_args(prob, 0)
    ref = torch.func.vmap(hg, in_dims=IN_DIMS)(*args)
    tree_close(hf.vmap(hg, in_dims=IN_DIMS)(*args).grads, ref.grads, rtol=0, atol=0)
    # chunk_size=1 is a loop over the tasks: unbatched kernels, rounding apart
    tree_close(hf.vmap(hg, in_dims=IN_DIMS, chunk_size=1)(*args).grads, ref.grads, rtol=1e-12, atol=1e-15)


def test_keyword_calls_map_by_position_in_hgs_signature_compiled_or_not():
    """fast(hparams=..., ...) gave torch's "got no inputs" before: in_dims entries name hg's arguments in order."""
    prob = anil(T)
    hg = hf.truncate(2)(prob.loop, prob.outer_loss)
    h, params0, batches, val = sinusoid_args(prob, 0)
    ref = torch.func.vmap(hg, in_dims=IN_DIMS)(h, params0, batches, val)
    for fn in (hf.vmap(hg, in_dims=IN_DIMS), hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K, backend="eager")):
        out = fn(hparams=h, params0=params0, inner_batches=batches, outer_batch=val)
        tree_close(out.grads, ref.grads, rtol=1e-12, atol=1e-14)
        tree_close(fn(h, params0, outer_batch=val, inner_batches=batches).grads, ref.grads, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda fn, a: fn(a[0], a[1], a[2], tuple(x[:-1] for x in a[3])), ValueError,
         r"disagree on the number of tasks: inner_batches \[\d+\], outer_batch \[\d+\]"),
        (lambda fn, a: fn(a[0], a[1], a[2]), TypeError, "missing 1 required positional argument: 'outer_batch'"),
        (lambda fn, a: fn(a[0], a[1], outer_batch=a[3]), TypeError, r"is missing \['inner_batches'\]"),
        (lambda fn, a: fn(*a, hparams=a[0]), TypeError, "unexpected arguments|both by position and by keyword"),
        (lambda fn, a: fn(a[0], a[1], a[2], a[3], inputs=1), TypeError, r"unexpected arguments: \['inputs'\]"),
    ],
)  # fmt: skip
def test_mismatched_calls_are_named(call, error, match):
    prob = anil(T)
    fn = hf.vmap(hf.truncate(2)(prob.loop, prob.outer_loss), in_dims=IN_DIMS)
    with pytest.raises(error, match=match):
        call(fn, sinusoid_args(prob, 0))


def test_nested_vmap_takes_the_general_path():
    """Inside a second vmap (over two hyperparameter settings) the kernels' inputs are batched at two
    levels: the direct unwrap declines and autograd.Function's vmap rule runs them; same answer."""
    prob = anil(5)
    hg = hf.vmap(hf.unroll(prob.loop, prob.outer_loss), in_dims=IN_DIMS)
    fast = hf.compile(hg, segment=2, backend=torch._dynamo.testing.CompileCounter())
    h, params0, batches, val = sinusoid_args(prob, 0)
    both = torch.stack([h, h.apply(lambda x: 1.1 * x)])
    outer = (0, None, None, None)
    res = torch.func.vmap(fast, in_dims=outer)(both, params0, batches, val)
    ref = torch.func.vmap(hg, in_dims=outer)(both, params0, batches, val)
    tree_close(res.grads, ref.grads, rtol=1e-10, atol=1e-12)


def test_undeclared_transform_is_refused():
    """A transform that does not declare segmented=True (its algorithm may differentiate the steps with
    torch.func itself, which the kernels have no derivative for) is refused, naming the whole-loop route."""
    prob = anil(T)

    def algorithm(bound):
        s, b = bound.run(bound.initial(), bound.buffers, bound.h, bound.prep.rebuild(bound.prep.d), 0, T)
        loss, _, direct = bound.outer_vjp(s, b)
        return Outcome(direct, loss, s, b, InitTerm.ABSENT)

    hg = make_transform(algorithm, "mine", prob.loop, prob.outer_loss)
    with pytest.raises(TypeError, match=r"does not support mine.*torch.compile\(torch.func.vmap"):
        hf.compile(hf.vmap(hg, in_dims=IN_DIMS), segment=K)


def test_bad_arguments():
    prob = anil(T)
    hg = hf.unroll(prob.loop, prob.outer_loss)
    with pytest.raises(ValueError, match="segment"):
        hf.compile(hg, segment=0)
    with pytest.raises(TypeError, match="hf.vmap"):
        hf.compile(torch.func.vmap(hg), segment=2)
    with pytest.raises(ValueError, match="chunk_size"):
        hf.vmap(hg, chunk_size=0)
    with pytest.raises(TypeError, match="'bakend'.*torch.compile's keyword arguments"):
        hf.compile(hg, segment=2, bakend="eager")
    with pytest.raises(ValueError, match="mode= or options="):
        hf.compile(hg, segment=2, mode="max-autotune", options={"cpp_wrapper": True})


def _dropout_maml():
    """MAML on a small Conv-BatchNorm-Dropout net: learned init, per-task buffers."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 3, 2),
    ).double()
    params, buffers = hf.module_state(net)

    def loss(p, h, batch, b):
        out, b = hf.functional_call(net, p, b, batch[0])
        return torch.nn.functional.cross_entropy(out, batch[1]), b

    loop = hf.InnerLoop(loss, hf.optim.sgd(lr=0.1), steps=2, full_batch=True)
    x, y = torch.randn(3, 6, 1, 5, 5, dtype=DT), torch.randint(0, 2, (3, 6))
    return hf.unroll(loop, loss), (params, lambda h: h, (x, y), (x, y), torch.stack([buffers] * 3))


MAML_IN_DIMS = (None, None, 0, 0, 0)  # hparams and the init function shared, data and buffers per task


def test_vmap_randomness_is_torch_func_vmaps():
    hg, args = _dropout_maml()
    with pytest.raises(RuntimeError, match="randomness"):  # torch's default, unchanged
        hf.vmap(hg, in_dims=MAML_IN_DIMS)(*args)
    torch.manual_seed(1)
    ours = hf.vmap(hg, in_dims=MAML_IN_DIMS, randomness="different")(*args)
    torch.manual_seed(1)
    ref = torch.func.vmap(hg, in_dims=MAML_IN_DIMS, randomness="different")(*args)
    tree_close(ours.grads, ref.grads, rtol=0, atol=0)
    torch.manual_seed(2)  # another seed draws other masks: the comparison above is not vacuous
    other = hf.vmap(hg, in_dims=MAML_IN_DIMS, randomness="different")(*args)
    assert not torch.equal(other.grads["0", "weight"], ours.grads["0", "weight"])
    with pytest.raises(ValueError, match="randomness must be one of"):
        hf.vmap(hg, in_dims=MAML_IN_DIMS, randomness="per_task")


def test_compile_refuses_vmap_randomness_and_names_the_whole_loop_route():
    hg, args = _dropout_maml()
    with pytest.raises(ValueError, match=r"randomness='different'.*torch.compile\(torch.func.vmap"):
        hf.compile(hf.vmap(hg, in_dims=MAML_IN_DIMS, randomness="different"), segment=2)


def test_whole_loop_compile_with_dropout_draws_the_eager_masks():
    """torch.compile(torch.func.vmap(hg, randomness='different'), fullgraph=True) with dropout: under the
    same seed it draws eager's masks (aot_eager runs torch's random kernels in eager's order), so the
    hypergradients agree to float64 rounding."""
    torch._dynamo.reset()  # after the suite's other compiles dynamo refused this vmap as traced from eager
    hg, args = _dropout_maml()
    vmapped = torch.func.vmap(hg, in_dims=MAML_IN_DIMS, randomness="different")
    torch.manual_seed(1)
    ref = vmapped(*args)
    torch.manual_seed(1)
    out = torch.compile(vmapped, fullgraph=True, backend="aot_eager")(*args)
    tree_close(out.grads, ref.grads, rtol=1e-12, atol=1e-12)
