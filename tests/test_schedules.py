"""Per-step optimizer arguments, ``lr=lambda h, t: h["lrs"][t]``, through every transform (table-driven):

- the identity of a constant schedule: with every entry equal to c, the hypergradient's entries summed
  equal the hypergradient of the scalar ``lr=lambda h: h["lr"]`` at c, for every transform whose formula
  is a sum of pullbacks through the step's dependence on λ (all of them; ``distill(fitted)`` fits θ
  from inner products in λ-space, which differ between the two parametrisations);
- central finite differences on a non-constant schedule (unroll, forward, truncate(T));
- online forms: step t's emission has zeros on the entries of later steps;
- ``implicit`` refuses a step-dependent argument; both compiled routes equal eager.
"""

import pytest
import torch
from problems import DT, LANGEVIN_SEED, LANGEVIN_TAU, mlp, mlp_params, tree_close
from problems import TRANSFORMS as REGISTRY
from tensordict import TensorDict

import hyperfunc as hf

T = 4
REFUSING = {"implicit_cg", "implicit_neumann"}
EXCLUDED = {"distill(fitted)"}  # its θ fit is not linear in the parametrisation of λ (module docstring)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, 6, 2, generator=g, dtype=DT)
    xv = torch.randn(10, 2, generator=g, dtype=DT)
    return (x, torch.sin(x.sum(-1, keepdim=True))), (xv, torch.sin(xv.sum(-1, keepdim=True)))


def _loss(p, h, batch):
    x, y = batch
    return ((mlp(p, x) - y) ** 2).mean()


def _loop(name, lr, momentum=None):
    momentum = REGISTRY[name].momentum if momentum is None else momentum
    return hf.InnerLoop(_loss, hf.optim.sgd(lr=lr, momentum=momentum), steps=T)


def _hparams(lrs):
    return TensorDict({"lrs": lrs, "init": mlp_params([2, 5, 1])}, [])


def _schedule(h, t):  # t: an int in Python loops, a tensor in hf.compile's kernels
    return hf.optim.pick(h["lrs"], t)


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - REFUSING - EXCLUDED))
def test_constant_schedule_sums_to_the_scalar_hypergradient(name):
    transform, (batches, val) = REGISTRY[name].make(T), _data()
    params0 = (lambda h: h["init"]) if REGISTRY[name].exact_init else mlp_params([2, 5, 1])
    c = torch.tensor(0.3, dtype=DT)
    scheduled = transform(_loop(name, _schedule), _loss)(_hparams(c.repeat(T)), params0, batches, val)
    scalar = TensorDict({"lr": c, "init": mlp_params([2, 5, 1])}, [])
    reference = transform(_loop(name, lambda h: h["lr"]), _loss)(scalar, params0, batches, val)
    torch.testing.assert_close(scheduled.grads["lrs"].sum(), reference.grads["lr"], rtol=1e-10, atol=1e-12)
    tree_close(scheduled.grads["init"], reference.grads["init"], rtol=1e-10, atol=1e-12)
    assert scheduled.grads["lrs"].shape == (T,)
    touched = (scheduled.grads["lrs"] != 0).tolist()
    if name == "first_order":  # no term through the steps
        assert touched == [False] * T
    elif name in ("one_step", "distill"):  # their step terms are the last step's (distill: its distilled step)
        assert touched == [False] * (T - 1) + [True]
    elif name == "truncate(T-1)":  # the last T - 1 steps
        assert touched == [False] + [True] * (T - 1)
    else:
        assert all(touched)


@pytest.mark.parametrize("name", ["unroll", "forward", "truncate(T)", "checkpointed"])
def test_schedule_against_finite_differences(name):
    lrs = torch.tensor([0.5, 0.2, 0.35, 0.1], dtype=DT)
    hparams, (batches, val) = _hparams(lrs), _data(1)
    loop, params0 = _loop(name, _schedule), (lambda h: h["init"])
    res = REGISTRY[name].make(T)(loop, _loss)(hparams, params0, batches, val)
    eps = 1e-6
    for t in range(T):
        bump = torch.zeros(T, dtype=DT)
        bump[t] = eps

        def loss_at(delta):
            return hf.unroll(loop, _loss)(_hparams(lrs + delta), params0, batches, val).loss

        fd = (loss_at(bump) - loss_at(-bump)) / (2 * eps)
        torch.testing.assert_close(res.grads["lrs"][t], fd, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.online and n not in REFUSING))
def test_online_emission_at_step_t_leaves_later_entries_zero(name):
    online = REGISTRY[name].online()(_loop(name, _schedule), _loss)
    hparams, (batches, val), params0 = _hparams(torch.full((T,), 0.3, dtype=DT)), _data(), mlp_params([2, 5, 1])
    state = online.init(hparams, params0)
    for t in range(T):
        res, state = online.step(state, hparams, (batches[0][t], batches[1][t]), val, t)
        assert torch.equal(res.grads["lrs"][t + 1 :], torch.zeros(T - t - 1, dtype=DT))
        if name != "one_step" or t == 0:
            assert res.grads["lrs"][t] != 0


@pytest.mark.parametrize("name", sorted(REFUSING))
def test_implicit_refuses_a_step_dependent_argument(name):
    with pytest.raises(ValueError, match=r"\['lr'\] depend on the inner step.*fixed point has no step"):
        REGISTRY[name].make(T)(_loop(name, _schedule), _loss)


def test_a_function_of_three_arguments_is_a_type_error():
    with pytest.raises(TypeError, match=r"lr as a function takes.*\(h, t\) -> value.*3 positional"):
        hf.optim.sgd(lr=lambda h, t, x: 0.1)


def test_langevin_keeps_the_schedule():
    """langevin rebuilds the loop's optimizer as SGLD: the schedule must survive, and a zero temperature
    (tau -> 0 is not allowed; a tiny one) makes its hypergradient close to plain unroll's on the same loop."""
    lrs = torch.tensor([0.3, 0.2, 0.1, 0.05], dtype=DT)
    loop = hf.InnerLoop(_loss, hf.optim.sgd(lr=_schedule), steps=T)
    (batches, val), params0 = _data(), (lambda h: h["init"])
    res = hf.langevin(1, T - 1, tau=LANGEVIN_TAU * 1e-9, seed=LANGEVIN_SEED)(loop, _loss)(
        _hparams(lrs), params0, batches, val
    )
    assert res.grads["lrs"].shape == (T,) and torch.isfinite(res.grads["lrs"]).all()
    assert (res.grads["lrs"] != 0).sum() >= T - 1


def test_indexing_by_the_steps_value_under_hf_compile_is_right_or_names_pick():
    """h["lrs"][t] with t a tensor: torch 2.13's tracer needs t's value (hyperfunc's ValueError names pick),
    torch 2.14 traces it as an index; either way never a kernel specialised to one step's value."""
    hg = hf.unroll(_loop("unroll", lambda h, t: h["lrs"][t]), _loss)
    (batches, val), hparams = _data(), _hparams(torch.tensor([0.5, 0.2, 0.35, 0.1], dtype=DT))
    fast = hf.compile(hf.vmap(hg, in_dims=(None, None, 0, 0)), segment=2, backend="eager")
    stacked = lambda pair: tuple(x.unsqueeze(0) for x in pair)  # noqa: E731
    args = (hparams, lambda h: h["init"], stacked(batches), stacked(val))
    try:
        out = fast(*args)
    except ValueError as err:
        assert "'lr' used the step t as a Python number" in str(err) and "hf.optim.pick" in str(err)
    else:
        tree_close(out.grads, torch.func.vmap(hg, in_dims=(None, None, 0, 0))(*args).grads)
    # eagerly and under the whole-loop compile, t is an int there and plain indexing works
    res = hg(hparams, lambda h: h["init"], batches, val)
    assert torch.isfinite(res.grads["lrs"]).all()


def test_compiled_routes_equal_eager():
    lrs = torch.tensor([0.5, 0.2, 0.35, 0.1], dtype=DT)
    n = 2
    hparams = _hparams(lrs)
    tasks = [_data(seed) for seed in range(n)]
    batches = tuple(torch.stack([t[0][i] for t in tasks]) for i in range(2))
    val = tuple(torch.stack([t[1][i] for t in tasks]) for i in range(2))
    hg = hf.unroll(_loop("unroll", _schedule), _loss)
    in_dims = (None, None, 0, 0)
    params0 = lambda h: h["init"]  # noqa: E731
    eager = torch.func.vmap(hg, in_dims=in_dims)(hparams, params0, batches, val)
    whole = torch.compile(torch.func.vmap(hg, in_dims=in_dims), fullgraph=True, backend="eager")
    tree_close(whole(hparams, params0, batches, val).grads, eager.grads)
    segmented = hf.compile(hf.vmap(hg, in_dims=in_dims), segment=2, backend="eager")
    tree_close(segmented(hparams, params0, batches, val).grads, eager.grads)


def test_per_step_per_layer_rates_against_finite_differences_and_the_shared_schedule():
    """MAML++ LSLR's form: one rate per parameter tensor and step, ``pick`` over a TensorDict of (T,) leaves.
    Every entry against central differences; with every layer at the same schedule, the layers' entries sum
    to the shared schedule's hypergradient."""
    lrs = torch.tensor([0.5, 0.2, 0.35, 0.1], dtype=DT)
    init = mlp_params([2, 5, 1])
    hparams = TensorDict({"lslr": init.apply(lambda p: lrs.clone(), batch_size=[]), "init": init}, [])
    loop = _loop("unroll", lambda h, t: hf.optim.pick(h["lslr"], t))
    (batches, val), params0 = _data(2), (lambda h: h["init"])
    hg = hf.unroll(loop, _loss)
    res = hg(hparams, params0, batches, val)
    shared = hf.unroll(_loop("unroll", _schedule), _loss)(_hparams(lrs), params0, batches, val)
    summed = sum(res.grads["lslr"].values(include_nested=True, leaves_only=True))
    torch.testing.assert_close(summed, shared.grads["lrs"], rtol=1e-10, atol=1e-12)
    eps = 1e-6
    for key in res.grads["lslr"].keys(include_nested=True, leaves_only=True):
        for t in (0, T - 1):

            def loss_at(delta):
                bumped = hparams.clone()
                bumped[("lslr", *key)][t] += delta
                return hg(bumped, params0, batches, val).loss

            fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
            torch.testing.assert_close(res.grads["lslr"][key][t], fd, rtol=1e-6, atol=1e-10)
