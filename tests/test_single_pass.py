"""TDLRT's one-pass mode (the default) against the two-pass reference (``single_pass=False``), float64:
same ranks and parameters within 1e-10 relative over 20 steps on a CNN and on a bare ManifoldParameter,
the fallback to a second pass, the step without a closure, the bit-identical rollback and checkpoints."""
from __future__ import annotations

import copy
import gc
import warnings

import geoopt
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_manifold import FixedRankTucker
from tucker_manifold.experiments.loop import frozen_bn_stats
from tucker_manifold.nn import TuckerConv2d, TuckerLinear
from tucker_manifold.optim import TDLRT, SinglePassFallbackWarning, _recorder
from tucker_manifold.parameter import is_tucker_parameter, record_io

OPTS = {
    "momentum": dict(method="sgd", momentum=0.9, lr=0.05, tau=0.2),
    "nesterov-wd": dict(method="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3, lr=0.05, tau=0.2),
    "adam": dict(method="adam", lr=3e-3, tau=0.2),
}


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _cnn(seed: int) -> nn.Module:
    """Tucker conv (reconstructed forward) - BN - ReLU - Tucker conv (factorized, stride 2, bias) -
    ReLU(inplace) - max-pool - Tucker linear (bias) - ReLU - nn.Linear. No bias right before the
    BatchNorm: its exact gradient is zero and Adam would turn the rounding noise into O(lr) steps."""
    torch.manual_seed(seed)
    return nn.Sequential(
        TuckerConv2d(3, 8, 3, ranks=(6, 3, 3, 3), padding=1, bias=False, forward_mode="reconstructed"),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        TuckerConv2d(8, 12, 3, ranks=(8, 6, 3, 3), stride=2, padding=1, forward_mode="factorized"),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        TuckerLinear(12 * 2 * 2, 16, ranks=6),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def _tucker(model):
    return [p for p in model.parameters() if is_tucker_parameter(p)]


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(n)]


def _closure(opt, model, x, y, calls):
    """The training loop's closure: BatchNorm statistics updated by the first evaluation of a step only."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    first: dict = {}

    def closure():
        calls.append(1)
        opt.zero_grad(set_to_none=True)
        with frozen_bn_stats(bns if first else ()):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        first.setdefault("loss", loss.detach())
        return loss

    return closure


def _rel(a, b):
    nb = torch.linalg.vector_norm(b)
    return float(torch.linalg.vector_norm(a - b) / nb) if nb > 0 else float(torch.linalg.vector_norm(a))


def _sign_aligned(m: FixedRankTucker, ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with each factor column's sign (and the matching core slice) flipped to agree with ``ref``:
    the truncation's SVDs fix singular vectors up to sign only, a gauge the tensor does not see."""
    core, factors = m.unpack(x.clone())
    _, rfactors = m.unpack(ref)
    for i, (f, rf) in enumerate(zip(factors, rfactors)):
        s = torch.sign((f * rf).sum(0))
        s[s == 0] = 1
        f.mul_(s)
        shape = [1] * core.ndim
        shape[i] = -1
        core.mul_(s.reshape(shape))
    return m.pack(core, factors)


def _worst_difference(ref: nn.Module, one: nn.Module) -> float:
    """Largest relative difference over every state entry (Tucker points sign-aligned, and as dense
    tensors); asserts the integer entries (ranks, BN counters) are equal."""
    worst = 0.0
    s_ref, s_one = ref.state_dict(), one.state_dict()
    for (name, mod_ref), mod_one in zip(ref.named_modules(), one.modules()):
        if hasattr(mod_ref, "tucker_weight"):
            a, b = mod_ref.tucker_weight, mod_one.tucker_weight
            assert a.manifold.ranks == b.manifold.ranks, name
            key = f"{name}.tucker_weight"
            s_one[key] = _sign_aligned(a.manifold, s_ref[key], s_one[key])
            worst = max(worst, _rel(b.manifold.to_dense(b.detach()), a.manifold.to_dense(a.detach())))
    for k, v in s_ref.items():
        if v.is_floating_point():
            worst = max(worst, _rel(s_one[k], v))
        else:
            assert torch.equal(s_one[k], v), k
    return worst


def test_single_pass_is_the_default():
    model = _cnn(0)
    assert TDLRT(model.parameters(), lr=0.1).single_pass is True
    assert TDLRT(model.parameters(), lr=0.1, single_pass=False).single_pass is False
    with pytest.raises(ValueError, match="single_pass"):
        TDLRT(model.parameters(), lr=0.1, single_pass="yes")


@pytest.mark.parametrize("with_closure", [True, False], ids=["closure", "own-backward"])
@pytest.mark.parametrize("name", list(OPTS))
def test_single_pass_equals_two_pass_on_a_cnn(name, with_closure):
    """20 steps, tau > 0 (ranks change): the same ranks, every parameter and buffer (BN statistics
    included) within 1e-10 relative; one closure call per step against two; every Tucker layer's
    dL/dC^ rebuilt from its records (no fallback)."""
    opts = OPTS[name]
    ref = _cnn(7)
    one = copy.deepcopy(ref)
    opt_ref = TDLRT(ref.parameters(), single_pass=False, **opts)
    opt_one = TDLRT(one.parameters(), **opts)
    start = [p.manifold.ranks for p in _tucker(ref)]
    changed, worst = False, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinglePassFallbackWarning)
        for step, (x, y) in enumerate(_batches(20)):
            calls_ref, calls_one = [], []
            l_ref = opt_ref.step(_closure(opt_ref, ref, x, y, calls_ref))
            if with_closure:
                l_one = opt_one.step(_closure(opt_one, one, x, y, calls_one))
                assert abs(float(l_one) - float(l_ref)) <= 1e-12 * abs(float(l_ref))
            else:
                opt_one.zero_grad()
                F.cross_entropy(one(x), y).backward()
                assert opt_one.step() is None
            assert len(calls_ref) == 2 and len(calls_one) == (1 if with_closure else 0)
            assert [i["core_gradient"] for i in opt_one.last_step_info] == ["records"] * 3
            worst = max(worst, _worst_difference(ref, one))
            changed |= [p.manifold.ranks for p in _tucker(ref)] != start
    assert worst < 1e-10, worst
    assert changed  # tau > 0 moved the ranks
    assert opt_one.skipped_steps == opt_ref.skipped_steps == 0


def test_negative_control_a_wrong_core_gradient_is_caught():
    """The comparison above fails when the one-pass gradient is wrong: a subclass that drops the
    blocks of dL/dC^ in the new directions (a Galerkin step with the old gradient only)."""

    class Broken(TDLRT):
        def _core_gradients(self, plans, closure):
            ok = super()._core_gradients(plans, closure)
            for plan in plans:
                old = tuple(slice(0, r) for r in plan.old_ranks)
                keep = plan.core_grad[old].clone()
                plan.core_grad.zero_()
                plan.core_grad[old] = keep
            return ok

    ref = _cnn(7)
    one = copy.deepcopy(ref)
    opt_ref = TDLRT(ref.parameters(), single_pass=False, **OPTS["momentum"])
    opt_one = Broken(one.parameters(), **OPTS["momentum"])
    for x, y in _batches(3):
        opt_ref.step(_closure(opt_ref, ref, x, y, []))
        opt_one.step(_closure(opt_one, one, x, y, []))
    worst = max(_rel(b.manifold.to_dense(b.detach()), a.manifold.to_dense(a.detach()))
                for a, b in zip(_tucker(ref), _tucker(one)) if a.manifold.ranks == b.manifold.ranks)
    assert worst > 1e-6


def _bare_problem(seed: int):
    torch.manual_seed(seed)
    m = FixedRankTucker((8, 7, 6), (3, 3, 3))
    target = torch.randn(8, 7, 6)
    p = geoopt.ManifoldParameter(m.random(), manifold=m)
    bias = nn.Parameter(torch.zeros(6))
    return p, bias, target


def _bare_closure(opt, p, bias, target, calls, record=False, poison_call=None):
    def closure():
        calls.append(1)
        opt.zero_grad()
        w = p.manifold.to_dense(p)
        if record:
            w = record_io(p, None, None, w)  # the dense reconstruction, recorded (layer=None)
        loss = (torch.tanh(w + bias) - target).pow(2).sum()
        if poison_call == len(calls):
            loss = loss * float("nan")
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("record", [False, True], ids=["fallback", "recorded"])
@pytest.mark.parametrize("name", list(OPTS))
def test_bare_manifold_parameter_through_to_dense(name, record):
    """A bare ManifoldParameter used through M.to_dense: unrecorded, it falls back to a second pass
    (warned once, two closure calls per step); recorded as its dense reconstruction, one call. Either
    way the iterates are the two-pass ones (ranks equal, relative difference < 1e-10)."""
    opts = dict(OPTS[name], tau=0.02, **({"lr": 0.05} if name == "adam" else {}))  # Adam: large enough to move ranks
    p_ref, b_ref, target = _bare_problem(11)
    p_one, b_one = geoopt.ManifoldParameter(p_ref.data.clone(), manifold=p_ref.manifold), nn.Parameter(b_ref.data.clone())
    opt_ref = TDLRT([p_ref, b_ref], single_pass=False, **opts)
    opt_one = TDLRT([p_one, b_one], **opts)
    ranks_seen = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(20):
            c_ref, c_one = [], []
            opt_ref.step(_bare_closure(opt_ref, p_ref, b_ref, target, c_ref))
            opt_one.step(_bare_closure(opt_one, p_one, b_one, target, c_one, record=record))
            assert len(c_ref) == 2 and len(c_one) == (1 if record else 2)
            assert opt_one.last_step_info[0]["core_gradient"] == ("records" if record else "second pass")
            assert p_ref.manifold.ranks == p_one.manifold.ranks
            ranks_seen.add(p_ref.manifold.ranks)
            assert _rel(p_one.manifold.to_dense(p_one.detach()), p_ref.manifold.to_dense(p_ref.detach())) < 1e-10
            assert _rel(b_one.detach(), b_ref.detach()) < 1e-10
    fallbacks = [w for w in caught if issubclass(w.category, SinglePassFallbackWarning)]
    assert len(fallbacks) == (0 if record else 1)
    if not record:
        assert "no layer recorded its use" in str(fallbacks[0].message)
    assert len(ranks_seen) > 1


def test_an_unrecorded_use_is_detected_and_falls_back():
    """A penalty on one layer's dense weight is a use the records do not see: that parameter (only)
    takes the second pass, and the iterates stay the two-pass ones."""
    ref = _cnn(3)
    one = copy.deepcopy(ref)

    def closure_for(opt, model, x, y, calls):
        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y) + 0.1 * model[3].weight.pow(2).sum()
            loss.backward()
            return loss
        return closure

    opt_ref = TDLRT(ref.parameters(), single_pass=False, **OPTS["momentum"])
    opt_one = TDLRT(one.parameters(), **OPTS["momentum"])
    with pytest.warns(SinglePassFallbackWarning, match=r"\(12, 8, 3, 3\).*a use the layers did not record"):
        for x, y in _batches(5, seed=1):
            calls = []
            opt_ref.step(closure_for(opt_ref, ref, x, y, []))
            opt_one.step(closure_for(opt_one, one, x, y, calls))
            assert len(calls) == 2
            assert [i["core_gradient"] for i in opt_one.last_step_info] == ["records", "second pass", "records"]
    # no BatchNorm freezing in this closure: both runs update the statistics twice per step alike
    assert _worst_difference(ref, one) < 1e-10


def test_without_a_closure_an_unrecorded_parameter_is_an_error():
    p, bias, target = _bare_problem(2)
    opt = TDLRT([p, bias], lr=0.1, tau=0.1)
    x0, m0 = p.detach().clone(), p.manifold
    opt.zero_grad()
    (torch.tanh(p.manifold.to_dense(p) + bias) - target).pow(2).sum().backward()
    with pytest.warns(SinglePassFallbackWarning), pytest.raises(RuntimeError, match="without a closure"):
        opt.step()
    assert torch.equal(p.detach(), x0) and p.manifold is m0 and not opt.state[p]


def _snapshot(model, opt):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [p.manifold for p in _tucker(model)],
            {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for p, st in opt.state.items()})


def _assert_unchanged(model, opt, snap):
    params, manifolds, state = snap
    for k, v in model.state_dict().items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):  # BN: the forward ran
            assert torch.equal(v, params[k]), k
    assert all(p.manifold is m for p, m in zip(_tucker(model), manifolds))
    assert {id(p) for p in opt.state} == set(state)
    for p, st in opt.state.items():
        for k, v in st.items():
            assert (torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k]), k


@pytest.mark.parametrize("where", ["loss", "records", "fallback pass"])
def test_nonfinite_step_is_rolled_back_bit_identically(where):
    """A NaN in the loss, in a rebuilt dL/dC^ only (a poisoned record) or in the fallback's second
    pass: the step is skipped, every parameter, manifold object and optimizer state bit-identical, and
    training goes on."""
    if where == "fallback pass":
        p, bias, target = _bare_problem(4)
        opt = TDLRT([p, bias], lr=0.05, tau=0.1, momentum=0.9)
        model = nn.ParameterList([p, bias])
        with pytest.warns(SinglePassFallbackWarning):
            opt.step(_bare_closure(opt, p, bias, target, []))
        snap = _snapshot(model, opt)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step(_bare_closure(opt, p, bias, target, [], poison_call=2))
        _assert_unchanged(model, opt, snap)
        opt.step(_bare_closure(opt, p, bias, target, []))
        assert opt.skipped_steps == 1
        return
    model = _cnn(5)
    opt = TDLRT(model.parameters(), method="adam", lr=1e-2, tau=0.1)
    (x, y), (x2, y2) = _batches(2)
    opt.step(_closure(opt, model, x, y, []))
    snap = _snapshot(model, opt)
    opt.zero_grad()
    loss = F.cross_entropy(model(x2), y2)
    if where == "loss":
        loss = loss * float("nan")
    loss.backward()
    if where == "records":
        rec = _recorder().records(_tucker(model)[1])[0]
        rec.gy = rec.gy.clone().fill_(float("nan"))  # autograd's gradients stay finite
        assert all(torch.isfinite(q.grad).all() for q in model.parameters())
    with pytest.warns(RuntimeWarning, match="augmented-core" if where == "records" else "in the gradient"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1
    assert _recorder().nbytes() == 0 or not any(_recorder().records(q) for q in _tucker(model))
    opt.step(_closure(opt, model, x2, y2, []))
    assert opt.skipped_steps == 1


def test_checkpoint_round_trip_after_rank_changes():
    """Model and optimizer state dicts written after rank changes load into a fresh copy, and both
    continue bit-identically."""
    model = _cnn(9)
    opt = TDLRT(model.parameters(), lr=0.05, tau=0.2, momentum=0.9)
    start = [p.manifold.ranks for p in _tucker(model)]
    batches = _batches(6, seed=3)
    for x, y in batches[:3]:
        opt.step(_closure(opt, model, x, y, []))
    assert [p.manifold.ranks for p in _tucker(model)] != start
    twin = _cnn(1)  # other ranks and values: loading resizes
    twin.load_state_dict(model.state_dict())
    opt2 = TDLRT(twin.parameters(), lr=0.05, tau=0.2, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a file would: no tensor shared with opt
    for x, y in batches[3:]:
        opt.step(_closure(opt, model, x, y, []))
        opt2.step(_closure(opt2, twin, x, y, []))
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_records_are_released_and_cost_nothing_when_not_recording():
    model = _cnn(2)
    x, y = _batches(1)[0]
    # no optimizer tracks this model: a forward registers no hook on the layers' outputs
    out = model[0](x)
    assert out._backward_hooks is None
    opt = TDLRT(model.parameters(), lr=0.05, tau=0.1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    rec = _recorder()
    assert all(len(rec.records(p)) == 1 for p in _tucker(model))
    opt.zero_grad()  # the records belong to the gradients being cleared
    assert not any(rec.records(p) for p in _tucker(model))
    opt.step(_closure(opt, model, x, y, []))
    assert not any(rec.records(p) for p in _tucker(model))  # released after the step
    with torch.no_grad():
        model(x)
    assert not any(rec.records(p) or rec.pending(p) for p in _tucker(model))
    keys = [id(p) for p in _tucker(model)]
    del opt, model, out
    gc.collect()
    assert not any(k in rec._params for k in keys)  # a dropped model is not kept alive by the recorder


def test_dropout_sees_one_mask_per_step():
    """The documented difference: one forward per step, so stochastic layers draw once (the two-pass
    reference draws twice and the closure's second forward sees a different mask)."""
    torch.manual_seed(0)
    model = nn.Sequential(TuckerLinear(6, 6, ranks=3), nn.Dropout(0.5), TuckerLinear(6, 3, ranks=2))
    masks = []
    model[1].register_forward_hook(lambda m, i, o: masks.append((o != 0).clone()))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for single in (True, False):
        masks.clear()
        opt = TDLRT(model.parameters(), lr=0.1, tau=0.1, single_pass=single)
        opt.step(_closure(opt, model, x, y, []))
        assert len(masks) == (1 if single else 2)
