"""ParallelTDLRT: before truncation its step is the Riemannian gradient step ``Y - h P(Y) grad L``
(FixedRankTucker.proj_dense, float64, d = 2..4) whichever way the masked gradient is obtained; rank
bounds, bit-identical rollback, checkpoints, no explicit inverse, step rejection, Tucker layers."""
from __future__ import annotations

import copy

import geoopt
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_manifold import FixedRankTucker
from tucker_manifold.nn import TuckerConv2d, TuckerLinear
from tucker_manifold.onepass import parallel_core_gradient, parallel_core_gradient_from_factors, parallel_dropped_norm
from tucker_manifold.optim import TDLRT, ParallelTDLRT, SinglePassFallbackWarning
from tucker_manifold.parameter import RankBounds, is_tucker_parameter, make_tucker_parameter, record_io
from tucker_manifold.flow import augment_bases, lift_core
from tucker_manifold.tucker import reconstruct

SEEDS = [0, 1, 2]
# d = 2..4; (10, 3) rank (2, 2) augments to (4, 3), which TDLRT would trim to (3, 3)
CASES = [
    ((5, 4), (2, 2)),
    ((10, 3), (2, 2)),
    ((6, 5, 4), (3, 2, 3)),
    ((7, 3, 6), (2, 2, 2)),
    ((5, 4, 6, 3), (2, 3, 2, 3)),
    ((8, 8, 3, 3), (3, 3, 3, 3)),
]
IDS = ["x".join(map(str, s)) + "_r" + "".join(map(str, r)) for s, r in CASES]
H = 0.3


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class Capture(ParallelTDLRT):
    """Keeps every parameter's stepped tensor before truncation, in the augmented bases."""

    def _truncate(self, plans):
        self.before = [reconstruct(plan.stepped, plan.bases) for plan in plans]
        self.sources = [plan.source for plan in plans]
        super()._truncate(plans)


class CaptureTDLRT(TDLRT):
    def _truncate(self, plans):
        self.before = [reconstruct(plan.stepped, plan.bases) for plan in plans]
        super()._truncate(plans)


def _problem(shape, ranks, seed):
    g = torch.Generator().manual_seed(seed)
    m = FixedRankTucker(shape, ranks)
    p = geoopt.ManifoldParameter(m.random(generator=g), manifold=m)
    a = torch.randn(shape, generator=g)
    return p, a


def _loss(w, a):
    """Not quadratic: the gradient depends on the point."""
    return (torch.sin(w) * a).sum() + 0.25 * (w**4).sum()


def _closure(opt, p, a, record):
    def closure():
        opt.zero_grad()
        w = p.manifold.to_dense(p)
        loss = _loss(record_io(p, None, None, w) if record else w, a)
        loss.backward()
        return loss

    return closure


def _tangent_step(p, a):
    """Y - h P(Y) G, with G the dense gradient at Y."""
    m, x = p.manifold, p.detach().clone()
    w = m.to_dense(x).requires_grad_(True)
    _loss(w, a).backward()
    return m.to_dense(x) - H * m.tangent_to_dense(x, m.proj_dense(x, w.grad))


@pytest.mark.parametrize("source", ["records", "unrecorded", "factors"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_step_before_truncation_is_the_riemannian_gradient_step(shape, ranks, seed, source):
    """SGD, no momentum, three steps (tau = 0.1, so the later steps start from truncated points):
    the stepped tensor equals Y - h P(Y) grad L to 1e-12 relative each time. ``records``: the dense
    reconstruction recorded; ``unrecorded``: no records, the factor-gradient form as fallback;
    ``factors``: core_gradient="factors"."""
    p, a = _problem(shape, ranks, seed)
    kw = dict(core_gradient="factors") if source == "factors" else {}
    opt = Capture([p], lr=H, tau=0.1, **kw)
    for _ in range(3):
        expected = _tangent_step(p, a)
        if source == "unrecorded":
            with pytest.warns(SinglePassFallbackWarning) if not opt._fallback_warned else _nothing():
                opt.step(_closure(opt, p, a, record=False))
        else:
            opt.step(_closure(opt, p, a, record=source == "records"))
        assert opt.sources == ["records" if source == "records" else "factors"]
        assert _rel(opt.before[0], expected) < 1e-12
        assert p.manifold.check_point_on_manifold(p.detach())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES[2:], ids=IDS[2:])
def test_two_pass_tdlrt_is_not_the_tangent_step(shape, ranks, seed):
    """The check above is not vacuous: TDLRT's step also moves in the augmented directions outside the
    tangent space, so it differs from Y - h P(Y) grad L."""
    p, a = _problem(shape, ranks, seed)
    opt = CaptureTDLRT([p], lr=H, tau=0.1, single_pass=False)
    expected = _tangent_step(p, a)
    opt.step(_closure(opt, p, a, record=False))
    assert _rel(opt.before[0], expected) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_factor_form_equals_the_masking(shape, ranks, seed):
    """onepass.parallel_core_gradient_from_factors (triangular solves on autograd's factor gradients)
    equals the masking of dL/dC^, and eta is the norm of what the masking drops."""
    p, a = _problem(shape, ranks, seed)
    m = p.manifold
    x = p.detach().clone().requires_grad_(True)
    w = m.to_dense(x)
    w.retain_grad()
    _loss(w, a).backward()
    core, factors = m.unpack(x.detach())
    gcore, gfac = m.unpack(x.grad)
    bases = augment_bases(factors, gfac)
    from tucker_manifold.onepass import dense_core_gradient

    g_aug = dense_core_gradient(w.grad, bases)
    masked = parallel_core_gradient(g_aug, core)
    from_factors = parallel_core_gradient_from_factors(gcore, gfac, core, bases)
    assert _rel(from_factors, masked) < 1e-11
    dropped = float(torch.linalg.vector_norm(g_aug - masked))
    # g - mask(g) = (blocks new in >= 2 modes) + (the parts of single-new blocks outside the row spaces)
    assert float(parallel_dropped_norm(g_aug, core.shape)) <= dropped + 1e-12


def test_no_explicit_inverse(monkeypatch):
    """The records path forms no inverse and solves nothing; the factor path only triangular solves."""
    p, a = _problem((6, 5, 4), (3, 2, 3), 0)
    q = geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold)

    def refuse(*args, **kwargs):
        raise AssertionError("an inverse or a general solve was called")

    for name in ("inv", "inv_ex", "pinv", "solve", "solve_ex", "lstsq", "tensorinv", "tensorsolve"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    monkeypatch.setattr(torch, "inverse", refuse)
    opt = ParallelTDLRT([p], lr=0.1, tau=0.1)
    opt_f = ParallelTDLRT([q], lr=0.1, tau=0.1, core_gradient="factors")
    for _ in range(3):
        opt.step(_closure(opt, p, a, record=True))
        opt_f.step(_closure(opt_f, q, a, record=False))
    monkeypatch.setattr(torch.linalg, "solve_triangular", refuse)
    opt.step(_closure(opt, p, a, record=True))
    with pytest.raises(AssertionError, match="inverse"):
        opt_f.step(_closure(opt_f, q, a, record=False))


def test_rank_bounds_and_fixed_modes():
    g = torch.Generator().manual_seed(1)
    m = FixedRankTucker((8, 7, 3, 3), (2, 2, 3, 2))
    p = make_tucker_parameter(m.random(generator=g), m, RankBounds((1, 1, 3, 2), (3, 6, 3, 3), (True, True, False, False)))
    a = torch.randn(m.shape, generator=g)
    opt = ParallelTDLRT([p], lr=0.2, tau=0.0, rmin=2)
    for _ in range(6):
        opt.step(_closure(opt, p, a, record=True))
        r = p.manifold.ranks
        assert 2 <= r[0] <= 3 and 2 <= r[1] <= 6 and r[2] == 3 and r[3] == 2
        assert p.manifold.check_point_on_manifold(p.detach())
    assert r[0] == 3  # grew to the declared cap


@pytest.mark.parametrize("where", ["loss", "records"])
def test_nonfinite_step_is_rolled_back_bit_identically(where):
    p, a = _problem((6, 5, 4), (2, 2, 2), 3)
    bias = nn.Parameter(torch.randn(4))
    opt = ParallelTDLRT([p, bias], lr=0.05, tau=0.1, momentum=0.9)

    def closure(poison=False):
        opt.zero_grad()
        w = record_io(p, None, None, p.manifold.to_dense(p))
        loss = _loss(w + bias, a) * (float("nan") if poison else 1.0)
        loss.backward()
        return loss

    opt.step(closure)
    before = (p.detach().clone(), p.manifold, bias.detach().clone(),
              {k: v.clone() for k, v in opt.state[p].items()}, opt.state[bias]["momentum_buffer"].clone())
    if where == "loss":
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step(lambda: closure(poison=True))
    else:
        from tucker_manifold.optim import _recorder

        opt.zero_grad()
        _loss(record_io(p, None, None, p.manifold.to_dense(p)) + bias, a).backward()
        rec = _recorder().records(p)[0]
        rec.gy = torch.full_like(rec.gy, float("inf"))  # only the recorded path is non-finite
        assert torch.isfinite(p.grad).all() and torch.isfinite(bias.grad).all()
        with pytest.warns(RuntimeWarning, match="augmented-core"):
            opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(p.detach(), before[0]) and p.manifold is before[1]
    assert torch.equal(bias.detach(), before[2])
    for k, v in before[3].items():
        assert torch.equal(opt.state[p][k], v)
    assert torch.equal(opt.state[bias]["momentum_buffer"], before[4])
    opt.step(closure)
    assert opt.skipped_steps == 1


def _cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        TuckerConv2d(3, 8, 3, ranks=(4, 3, 3, 3), padding=1),
        nn.ReLU(),
        TuckerConv2d(8, 12, 3, ranks=(6, 4, 3, 3), stride=2, padding=1, forward_mode="reconstructed"),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        TuckerLinear(48, 10, ranks=4),
    )


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _step(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return float(opt.step(closure))


@pytest.mark.parametrize("method", ["sgd", "adam"])
def test_tucker_layers_records_and_factor_forms_agree(method):
    """On a CNN of Tucker layers (both conv forwards and a linear), the records path and the factor
    path give the same iterates (equal in exact arithmetic) over 10 steps with rank changes, and train."""
    kw = dict(lr=0.05, momentum=0.9) if method == "sgd" else dict(method="adam", lr=5e-3)
    a = _cnn(4)
    b = copy.deepcopy(a)
    oa = ParallelTDLRT(a.parameters(), tau=0.15, **kw)
    ob = ParallelTDLRT(b.parameters(), tau=0.15, core_gradient="factors", **kw)
    start = [p.manifold.ranks for p in a.parameters() if is_tucker_parameter(p)]
    losses = []
    x, y = _batches(1)[0]
    for _ in range(10):
        losses.append(_step(oa, a, x, y))
        _step(ob, b, x, y)
        assert [i["core_gradient"] for i in oa.last_step_info] == ["records"] * 3
        assert [i["core_gradient"] for i in ob.last_step_info] == ["factors"] * 3
        for pa, pb in zip(a.parameters(), b.parameters()):
            if is_tucker_parameter(pa):
                assert pa.manifold.ranks == pb.manifold.ranks
                assert _rel(pb.manifold.to_dense(pb.detach()), pa.manifold.to_dense(pa.detach())) < 1e-9
            else:
                assert _rel(pb.detach(), pa.detach()) < 1e-9
    assert [p.manifold.ranks for p in a.parameters() if is_tucker_parameter(p)] != start
    assert losses[-1] < 0.92 * losses[0] and all(b < a for a, b in zip(losses, losses[1:]))


def test_checkpoint_round_trip():
    model = _cnn(5)
    opt = ParallelTDLRT(model.parameters(), lr=0.05, tau=0.15, momentum=0.9, rejection=1.0)
    batches = _batches(6, seed=2)
    for x, y in batches[:3]:
        _step(opt, model, x, y)
    twin = _cnn(0)
    twin.load_state_dict(model.state_dict())
    opt2 = ParallelTDLRT(twin.parameters(), lr=0.05, tau=0.15, momentum=0.9, rejection=1.0)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.rejected_steps == opt.rejected_steps and opt2.skipped_steps == opt.skipped_steps
    for x, y in batches[3:]:
        _step(opt, model, x, y)
        _step(opt2, twin, x, y)
    for u, v in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(u, v)


@pytest.mark.parametrize("seed", SEEDS)
def test_step_rejection(seed):
    """rejection=c rejects when lr * eta > c * tau ||C^||. A tiny c rejects every step, whose redo is
    the unmasked (two-pass TDLRT) step: the iterates are TDLRT's where no trimming happens. A huge c
    rejects nothing: plain ParallelTDLRT."""
    shape, ranks = (9, 8, 7), (2, 2, 2)
    p, a = _problem(shape, ranks, seed)
    q, r, s = (geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold) for _ in range(3))
    # rmax = 3: every mode keeps new directions to add, so there are blocks new in two modes (eta > 0)
    kw = dict(lr=0.1, tau=0.1, rmax=3)
    always = ParallelTDLRT([p], rejection=1e-12, **kw)
    never = ParallelTDLRT([q], rejection=1e12, **kw)
    plain = ParallelTDLRT([r], **kw)
    ref = TDLRT([s], single_pass=False, **kw)
    for k in range(3):
        always.step(_closure(always, p, a, record=True))
        never.step(_closure(never, q, a, record=True))
        plain.step(_closure(plain, r, a, record=True))
        ref.step(_closure(ref, s, a, record=False))
        assert always.rejected_steps == k + 1 and never.rejected_steps == 0
        assert always.last_step_info[0]["rejected"] and not never.last_step_info[0]["rejected"]
        assert _rel(p.manifold.to_dense(p.detach()), s.manifold.to_dense(s.detach())) < 1e-11
        assert torch.equal(q.detach(), r.detach())
    assert always.state_dict()["tdlrt"]["rejected_steps"] == 3


def test_bad_arguments():
    p, _ = _problem((5, 4, 3), (2, 2, 2), 0)
    with pytest.raises(ValueError, match="single_pass"):
        ParallelTDLRT([p], lr=0.1, single_pass=False)
    with pytest.raises(ValueError, match="core_gradient"):
        ParallelTDLRT([p], lr=0.1, core_gradient="dense")
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="rejection"):
            ParallelTDLRT([p], lr=0.1, rejection=bad)
    with pytest.raises(ValueError, match="rejection needs"):
        ParallelTDLRT([p], lr=0.1, rejection=1.0, core_gradient="factors")
    with pytest.raises(ValueError, match="lr"):
        ParallelTDLRT([p], lr=-1)
