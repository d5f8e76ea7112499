"""TDLRT / ParallelTDLRT with a global parameter budget (``budget=N``, ``budget_schedule``): the Tucker
parameter count is never above the (scheduled) budget on a small CNN with Tucker conv and linear layers,
the schedule decays from the initial count, tau is a floor, a huge budget is the tau run, bad input
fails with the argument's name, the schedule's step survives a state_dict / checkpoint round trip, and a
skipped step leaves everything (the step counter too) unchanged."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tucker_manifold.budget import budget_at_step, minimum_count
from tucker_manifold.nn import tuckerize
from tucker_manifold.optim import TDLRT, ParallelTDLRT
from tucker_manifold.parameter import is_tucker_parameter, rank_bounds
from tucker_manifold.tucker import rank_by_tolerance, unfold

DT = torch.float64
SEEDS = [0, 1, 2]


def _net(seed: int, dtype=DT) -> nn.Module:
    """Two Tucker convs (4-way, spatial modes fixed) and one Tucker linear layer (2-way), full rank."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(12 * 6 * 6, 6)).to(dtype)
    return tuckerize(m, rank_fraction=1.0, linear=True)


def _data(seed: int, dtype=DT):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(16, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 6, (16,), generator=g)


def _tucker(model):
    return [p for p in model.parameters() if is_tucker_parameter(p)]


def _count(model) -> int:
    return sum(p.numel() for p in _tucker(model))


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _ranks(model):
    return [p.manifold.ranks for p in _tucker(model)]


OPTIMIZERS = [
    pytest.param(lambda ps, **kw: TDLRT(ps, lr=0.1, momentum=0.9, **kw), id="tdlrt-one-pass"),
    pytest.param(lambda ps, **kw: TDLRT(ps, lr=0.1, momentum=0.9, single_pass=False, **kw), id="tdlrt-two-pass"),
    pytest.param(lambda ps, **kw: TDLRT(ps, lr=0.01, method="adam", **kw), id="tdlrt-adam"),
    pytest.param(lambda ps, **kw: ParallelTDLRT(ps, lr=0.1, momentum=0.9, **kw), id="parallel"),
]


@pytest.mark.parametrize("make", OPTIMIZERS)
@pytest.mark.parametrize("seed", SEEDS)
def test_count_never_above_scheduled_budget(make, seed):
    model = _net(seed)
    x, y = _data(seed)
    initial = _count(model)
    n = int(0.3 * initial)
    start, end, steps = 2, 7, 11
    opt = make(model.parameters(), budget=n, budget_schedule=(start, end))
    budgets = []
    for k in range(steps):
        opt.step(_closure(model, opt, x, y))
        target = budget_at_step(k, start, end, initial, n)
        budgets.append(opt.last_allocation["budget"])
        assert opt.last_allocation["budget"] == target == opt.budget_at(k)
        assert _count(model) == opt.last_allocation["count"] <= target
        if k >= end:
            assert _count(model) <= n
        for p in _tucker(model):  # a valid point of the new manifold (orthonormal factors)
            core, factors = p.manifold.unpack(p.data)
            for f in factors:
                torch.testing.assert_close(f.T @ f, torch.eye(f.shape[1], dtype=DT), atol=1e-10, rtol=0)
    assert opt.budget_step == steps
    assert budgets[0] == initial and budgets[-1] == n
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # decays, never grows
    # The budget is used, not undercut by far: the last move of the greedy saves at most one rank's worth.
    assert _count(model) >= 0.9 * n
    # Negative control: from the same start, per-layer tau truncation ends far above N, so the assertions
    # above are not vacuous (the budget binds).
    ref = _net(seed)
    ref_opt = make(ref.parameters(), tau=0.05)
    for _ in range(steps):
        ref_opt.step(_closure(ref, ref_opt, x, y))
    assert _count(ref) > n


class _LooseBudget(TDLRT):
    """Mutant: allocates to 1.5x the scheduled budget (what an off-by-something in the wiring would do)."""

    def budget_at(self, step):
        return int(1.5 * super().budget_at(step))


def _over_budget_steps(model, opt, x, y, steps, budget_of):
    return [k for k in range(steps) if (opt.step(_closure(model, opt, x, y)) is not None) and _count(model) > budget_of(k)]


def test_budget_check_fails_on_a_broken_allocation():
    """Negative control for the count check: the mutant's counts exceed the true schedule."""
    x, y = _data(0)
    ok_model, bad_model = _net(0), _net(0)
    initial = _count(ok_model)
    n, sched = int(0.3 * initial), (2, 7)
    ok = TDLRT(ok_model.parameters(), lr=0.1, momentum=0.9, budget=n, budget_schedule=sched)
    bad = _LooseBudget(bad_model.parameters(), lr=0.1, momentum=0.9, budget=n, budget_schedule=sched)
    truth = lambda k: budget_at_step(k, *sched, initial, n)  # noqa: E731
    assert _over_budget_steps(ok_model, ok, x, y, 10, truth) == []
    assert len(_over_budget_steps(bad_model, bad, x, y, 10, truth)) >= 5


@pytest.mark.parametrize("seed", SEEDS)
def test_budget_without_schedule_holds_from_the_first_step(seed):
    model = _net(seed)
    x, y = _data(seed)
    n = int(0.2 * _count(model))
    opt = TDLRT(model.parameters(), lr=0.1, momentum=0.9, budget=n)
    for k in range(6):
        opt.step(_closure(model, opt, x, y))
        assert opt.last_allocation["budget"] == n and _count(model) <= n
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("seed", SEEDS)
def test_huge_budget_is_the_tau_run(seed):
    """A budget above every count leaves the tau ranks: same ranks and weights as per-layer tau truncation."""
    a, b = _net(seed), _net(seed)
    x, y = _data(seed)
    opt_a = TDLRT(a.parameters(), lr=0.1, momentum=0.9, tau=0.3)
    opt_b = TDLRT(b.parameters(), lr=0.1, momentum=0.9, tau=0.3, budget=10**9)
    for _ in range(6):
        opt_a.step(_closure(a, opt_a, x, y))
        opt_b.step(_closure(b, opt_b, x, y))
        assert _ranks(a) == _ranks(b)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa.data, pb.data, atol=1e-10, rtol=1e-10)
    assert _ranks(a) != _ranks(_net(seed))  # tau did truncate: the equality is not the trivial one


@pytest.mark.parametrize("seed", SEEDS)
def test_tau_is_a_floor(seed):
    """With tau, no mode keeps singular values whose tail is below tau ||C^||: at the same point, every
    budget rank is <= the tau rank, and the tau rank computed from the stepped core bounds it."""
    model = _net(seed)
    x, y = _data(seed)
    tau, n = 0.2, int(0.6 * _count(model))
    opt = TDLRT(model.parameters(), lr=0.1, momentum=0.9, tau=tau, budget=n)
    for _ in range(5):
        twin = copy.deepcopy(model)
        twin_opt = TDLRT(twin.parameters(), lr=0.1, momentum=0.9, tau=tau)
        twin_opt.load_state_dict(opt.state_dict())
        opt.step(_closure(model, opt, x, y))
        twin_opt.step(_closure(twin, twin_opt, x, y))
        for rb, rt in zip(_ranks(model), _ranks(twin)):
            assert all(a <= b for a, b in zip(rb, rt)), (rb, rt)
        assert _count(model) <= n
    # the floor binds somewhere (else this is the budget test again): a budget alone keeps more
    free = _net(seed)
    free_opt = TDLRT(free.parameters(), lr=0.1, momentum=0.9, budget=n)
    for _ in range(5):
        free_opt.step(_closure(free, free_opt, x, y))
    assert _count(free) > _count(model)


def test_tau_floor_against_singular_values():
    """Direct check on the stepped cores: kept rank <= smallest k with ||sigma_{k:}|| <= tau ||C^||."""
    model = _net(0)
    x, y = _data(0)
    tau = 0.25
    opt = TDLRT(model.parameters(), lr=0.1, momentum=0.9, tau=tau, budget=10**9)
    seen = []
    orig = TDLRT._truncate_to_budget

    def spy(self, plans):
        seen.append([(plan.stepped.clone(), plan.bounds) for plan in plans])
        orig(self, plans)

    opt._truncate_to_budget = spy.__get__(opt)
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
        for (core, bounds), info in zip(seen[-1], opt.last_step_info):
            norm = float(torch.linalg.vector_norm(core))
            for i, r in enumerate(info["ranks"]):
                if bounds.adaptive[i]:
                    s = torch.linalg.svdvals(unfold(core, i))
                    assert r <= max(rank_by_tolerance(s, tau * norm), bounds.rmin[i])


def test_budget_ranks_minimize_relative_error_across_layers():
    """Relative weighting: scaling one layer's weights by 1000 does not change the allocation."""
    a, b = _net(1), _net(1)
    with torch.no_grad():
        p = _tucker(b)[1]
        core, factors = p.manifold.unpack(p.data)
        p.copy_(p.manifold.pack(core * 1000.0, factors))
    x, y = _data(1)
    n = int(0.3 * _count(a))
    # one step each from the same gradients (lr small enough that the step barely moves the cores)
    for model in (a, b):
        opt = TDLRT(model.parameters(), lr=1e-8, budget=n)
        opt.step(_closure(model, opt, x, y))
    assert _ranks(a) == _ranks(b)


# ------------------------------------------------------------------------------------ bad input
def test_bad_budgets():
    model = _net(0)
    ps = list(model.parameters())
    for bad in (1.5, 1000.0, "1000", True, None.__class__):
        with pytest.raises(ValueError, match="budget must be an int"):
            TDLRT(ps, lr=0.1, budget=bad)
    for bad in (0, -5):
        with pytest.raises(ValueError, match="budget must be >= 1"):
            TDLRT(ps, lr=0.1, budget=bad)
    minimum = sum(minimum_count(p.manifold.shape, rank_bounds(p), fixed_ranks=p.manifold.ranks) for p in _tucker(model))
    with pytest.raises(ValueError, match=f"budget = {minimum - 1} is below the minimum Tucker parameter count {minimum}"):
        TDLRT(ps, lr=0.1, budget=minimum - 1)
    with pytest.raises(ValueError, match="below the minimum"):
        ParallelTDLRT(ps, lr=0.1, budget=minimum - 1)
    TDLRT(ps, lr=0.1, budget=minimum)  # exactly the minimum is feasible
    # rmin raises the minimum
    with pytest.raises(ValueError, match="below the minimum"):
        TDLRT(ps, lr=0.1, budget=minimum, rmin=2)


def test_budget_at_the_minimum_trains_at_rmin():
    model = _net(2)
    x, y = _data(2)
    minimum = sum(minimum_count(p.manifold.shape, rank_bounds(p), fixed_ranks=p.manifold.ranks) for p in _tucker(model))
    opt = TDLRT(model.parameters(), lr=0.1, momentum=0.9, budget=minimum)
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
    assert _count(model) == minimum
    assert all(r[0] == 1 and r[1] == 1 for r in _ranks(model))


def test_bad_schedules():
    ps = list(_net(0).parameters())
    for bad in ((5, 5), (6, 2), (-1, 3), (1.0, 3), (1, 2, 3), (True, 4), "0,10", 10):
        with pytest.raises(ValueError, match="budget_schedule must be"):
            TDLRT(ps, lr=0.1, budget=10**6, budget_schedule=bad)
    with pytest.raises(ValueError, match="budget_schedule needs budget"):
        TDLRT(ps, lr=0.1, budget_schedule=(0, 10))
    with pytest.raises(ValueError, match="rejection with a budget needs tau"):
        ParallelTDLRT(ps, lr=0.1, budget=10**6, rejection=1.0)
    with pytest.raises(ValueError, match="no budget"):
        TDLRT(ps, lr=0.1).budget_at(0)


def _minimum(model) -> int:
    return sum(minimum_count(p.manifold.shape, rank_bounds(p), fixed_ranks=p.manifold.ranks) for p in _tucker(model))


def test_added_group_checked_against_budget():
    a, b = _net(0), _net(1)
    opt = TDLRT(a.parameters(), lr=0.1, budget=_minimum(a))
    with pytest.raises(ValueError, match="below the minimum"):
        opt.add_param_group({"params": list(b.parameters())})
    opt = TDLRT(a.parameters(), lr=0.1, budget=_minimum(a) + _minimum(b))
    opt.add_param_group({"params": list(b.parameters())})  # fits exactly


def test_tau_default_unchanged_without_budget():
    ps = list(_net(0).parameters())
    assert TDLRT(ps, lr=0.1).defaults["tau"] == 0.1
    assert TDLRT(ps, lr=0.1, budget=10**6).defaults["tau"] == 0.0
    assert TDLRT(ps, lr=0.1, budget=10**6, tau=0.2).defaults["tau"] == 0.2


# ------------------------------------------------------------------------------------ checkpoints, rollback
def _run(model, opt, x, y, steps):
    out = []
    for _ in range(steps):
        opt.step(_closure(model, opt, x, y))
        out.append((opt.last_allocation["budget"], _count(model)))
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_state_dict_round_trip_keeps_the_schedule(seed):
    x, y = _data(seed)
    full = _net(seed)
    n = int(0.3 * _count(full))
    sched = (1, 6)
    opt = TDLRT(full.parameters(), lr=0.1, momentum=0.9, budget=n, budget_schedule=sched)
    whole = _run(full, opt, x, y, 8)

    part = _net(seed)
    opt1 = TDLRT(part.parameters(), lr=0.1, momentum=0.9, budget=n, budget_schedule=sched)
    first = _run(part, opt1, x, y, 3)
    sd_model, sd_opt = copy.deepcopy(part.state_dict()), copy.deepcopy(opt1.state_dict())
    assert sd_opt["tdlrt"]["budget_step"] == 3
    resumed = _net(seed)  # a fresh model and optimizer: the schedule restarts from the saved counter
    resumed.load_state_dict(sd_model)
    opt2 = TDLRT(resumed.parameters(), lr=0.1, momentum=0.9, budget=n, budget_schedule=sched)
    assert opt2._budget_initial != opt1._budget_initial  # built at the shrunk ranks...
    opt2.load_state_dict(sd_opt)
    assert opt2.budget_step == 3  # ...the saved counter and starting count put it back on the schedule
    assert [opt2.budget_at(k) for k in range(8)] == [opt1.budget_at(k) for k in range(8)]
    rest = _run(resumed, opt2, x, y, 5)
    assert first + rest == whole
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(pa.data, pb.data, atol=1e-10, rtol=1e-10)


def test_checkpoint_file_round_trip(tmp_path):
    """Through the experiments' safetensors + JSON checkpoint, as a resumed run does it."""
    from tucker_manifold.experiments.checkpoints import read_checkpoint, save_checkpoint

    x, y = _data(0)
    model = _net(0)
    n = int(0.3 * _count(model))
    opt = TDLRT(model.parameters(), lr=0.1, momentum=0.9, budget=n, budget_schedule=(0, 4))
    _run(model, opt, x, y, 2)
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, 1, [], {})
    fresh = _net(0)
    opt2 = TDLRT(fresh.parameters(), lr=0.1, momentum=0.9, budget=n, budget_schedule=(0, 4))
    read_checkpoint(path).restore(fresh, opt2)
    assert opt2.budget_step == 2
    assert [opt2.budget_at(k) for k in range(6)] == [opt.budget_at(k) for k in range(6)]
    assert _run(fresh, opt2, x, y, 3) == _run(model, opt, x, y, 3)


def test_skipped_step_changes_nothing():
    model = _net(0)
    x, y = _data(0)
    opt = TDLRT(model.parameters(), lr=0.1, momentum=0.9, budget=int(0.3 * _count(model)), budget_schedule=(0, 5))
    _run(model, opt, x, y, 2)
    before = [p.detach().clone() for p in model.parameters()]
    manifolds = [p.manifold for p in _tucker(model)]

    def bad():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(bad)
    assert opt.skipped_steps == 1 and opt.budget_step == 2
    assert [p.manifold for p in _tucker(model)] == manifolds
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_float32_model():
    model = _net(0, torch.float32)
    x, y = _data(0, torch.float32)
    n = int(0.25 * _count(model))
    opt = TDLRT(model.parameters(), lr=0.1, momentum=0.9, budget=n)
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
        assert _count(model) <= n
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert math.isfinite(float(F.cross_entropy(model(x), y).detach()))
