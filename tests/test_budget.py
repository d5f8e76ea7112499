"""Rank allocation under a parameter budget (tucker_manifold.budget): error model against dense HOSVD
truncations, greedy + local search against brute-force optima, bounds, tau floor, schedule, bad input."""
import itertools
import math

import numpy as np
import pytest
import torch

from tucker_manifold import budget as B
from tucker_manifold.flow import truncate_core
from tucker_manifold.manifold import FixedRankTucker
from tucker_manifold.nn.layers import decaying_core
from tucker_manifold.parameter import RankBounds
from tucker_manifold.tucker import check_multilinear_ranks, reconstruct, truncated_hosvd

SEEDS = [0, 1, 2, 3, 4]
DT = torch.float64


def _embed(core, shape, gen):
    """``core x_i Q_i`` with random orthonormal ``Q_i (n_i, r_i)``: same spectra, shape ``shape``."""
    qs = [torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=DT)).Q for n, r in zip(shape, core.shape)]
    return reconstruct(core, qs)


def _norm_gap(err_sq, opt_sq, total):
    if opt_sq <= 1e-13 * total:
        return 0.0 if err_sq <= 1e-12 * total else math.inf
    return math.sqrt(err_sq / opt_sq) - 1.0


def _random_case(seed):
    """A tensor with known per-mode decays (d = 3 and 4 alternately) and a random budget."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    d = 3 + seed % 2
    shape = tuple(int(x) for x in (rng.integers(4, 9, size=3) if d == 3 else rng.integers(3, 6, size=4)))
    t = B.synthetic_tensor(shape, [float(q) for q in rng.uniform(0.2, 0.9, size=d)], float(rng.choice([0, 1e-2])), gen)
    item = B.budget_tensor(t)
    n = int(rng.integers(item.count(item.lower), item.count(item.upper) + 1))
    return t, item, n


def test_param_count_is_packed_size():
    for shape, ranks in [((5, 4, 3), (2, 3, 3)), ((6, 5, 3, 3), (4, 2, 3, 3)), ((7, 2), (2, 2))]:
        assert B.tucker_param_count(shape, ranks) == FixedRankTucker(shape, ranks).packed_size


@pytest.mark.parametrize("seed", SEEDS)
def test_error_model_matches_dense_hosvd(seed):
    """``exact`` = ||T - truncated HOSVD||^2 computed densely; ``bound`` = sum of tails >= exact."""
    gen = torch.Generator().manual_seed(seed)
    shape = (5, 4, 6) if seed % 2 == 0 else (4, 3, 5, 3)
    t = B.synthetic_tensor(shape, [0.7] * len(shape), 0.05, gen)
    item = B.budget_tensor(t)
    svals = truncated_hosvd(t, ranks=shape).singular_values
    n_checked = 0
    for r in itertools.product(*[range(1, n + 1) for n in shape]):
        if not all(x * x <= math.prod(r) for x in r):
            continue
        h = truncated_hosvd(t, ranks=r)
        dense = float(((t - reconstruct(h.core, h.factors)) ** 2).sum())
        assert item.error(r, "exact") == pytest.approx(dense, rel=1e-9, abs=1e-12 * item.total)
        bound = sum(float((s[k:] ** 2).sum()) for s, k in zip(svals, r))
        assert item.error(r, "bound") == pytest.approx(bound, rel=1e-9, abs=1e-12 * item.total)
        assert item.error(r, "exact") <= item.error(r, "bound") * (1 + 1e-9) + 1e-12 * item.total
        n_checked += 1
    assert n_checked > 20


def test_superdiagonal_known_spectrum():
    """Superdiagonal core, singular values q^k in every mode: the exact error at r is the tail past
    min(r), the bound counts it once per mode, and the allocation keeps balanced ranks."""
    gen = torch.Generator().manual_seed(5)
    q, k = 0.6, 5
    core = decaying_core((k, k, k), q, generator=gen, dtype=DT)
    t = _embed(core, (7, 8, 6), gen)
    item = B.budget_tensor(t)
    assert item.upper == (k, k, k)  # zero singular values are never kept
    s2 = np.array([q ** (2 * j) for j in range(k)])
    for r in [(3, 3, 3), (2, 4, 5), (5, 5, 1)]:
        assert item.error(r, "exact") == pytest.approx(s2[min(r):].sum(), rel=1e-9)
        assert item.error(r, "bound") == pytest.approx(sum(s2[x:].sum() for x in r), rel=1e-9)
    n = B.tucker_param_count((7, 8, 6), (3, 3, 3))
    a = B.allocate_ranks([item], n)
    assert a.ranks == [(3, 3, 3)]
    assert a.errors[0] == pytest.approx(s2[3:].sum(), rel=1e-9)


def test_bruteforce_against_naive_enumeration():
    """optimal_core_shape_bruteforce equals a loop over every shape with a dense truncated HOSVD."""
    gen = torch.Generator().manual_seed(7)
    t = B.synthetic_tensor((4, 5, 3), [0.5, 0.8, 0.6], 0.01, gen)
    item = B.budget_tensor(t)
    for n in (40, 60, 85):
        best = None
        for r in itertools.product(range(1, 5), range(1, 6), range(1, 4)):
            if not all(x * x <= math.prod(r) for x in r) or B.tucker_param_count(t.shape, r) > n:
                continue
            h = truncated_hosvd(t, ranks=r)
            e = float(((t - reconstruct(h.core, h.factors)) ** 2).sum())
            best = min(best, (e, r)) if best is not None else (e, r)
        opt = B.optimal_core_shape_bruteforce(item, n)
        assert opt.objective == pytest.approx(best[0], rel=1e-9)
        assert opt.count <= n


@pytest.mark.parametrize("seed", range(24))
def test_single_tensor_within_5pct_of_bruteforce(seed):
    t, item, n = _random_case(seed)
    opt = B.optimal_core_shape_bruteforce(item, n, "exact")
    a = B.allocate_ranks([item], n)
    assert a.count <= n and a.count == item.count(a.ranks[0])
    check_multilinear_ranks(t.shape, a.ranks[0])
    assert _norm_gap(item.error(a.ranks[0]), opt.objective, item.total) <= 0.05


def test_gap_check_detects_weaker_allocations():
    """The 5% check has teeth: the greedy alone (no local search) and the bound's own optimum fail it
    on some of the same cases."""
    greedy_fail = bound_fail = 0
    for seed in range(24):
        _, item, n = _random_case(seed)
        opt = B.optimal_core_shape_bruteforce(item, n, "exact")
        g = B.allocate_ranks([item], n, improve=False)
        greedy_fail += _norm_gap(item.error(g.ranks[0]), opt.objective, item.total) > 0.05
        b = B.optimal_core_shape_bruteforce(item, n, "bound")
        bound_fail += _norm_gap(item.error(b.ranks[0]), opt.objective, item.total) > 1e-9
    assert greedy_fail >= 1
    assert bound_fail >= 1


@pytest.mark.parametrize("improve", [False, True])
def test_greedy_ranks_by_error_per_parameter(improve):
    """Two superdiagonal tensors: cutting the wide one loses more (relative) energy per rank but saves
    8x the parameters per rank, so it is the cheaper cut per parameter, and enough on its own."""
    gen = torch.Generator().manual_seed(9)
    wide = B.budget_tensor(_embed(decaying_core((4, 4, 4), 0.5, generator=gen, dtype=DT), (40, 40, 40), gen))
    small = B.budget_tensor(_embed(decaying_core((4, 4, 4), 0.45, generator=gen, dtype=DT), (5, 5, 5), gen))
    full = wide.count((4, 4, 4)) + small.count((4, 4, 4))
    a = B.allocate_ranks([wide, small], full - 150, improve=improve)
    assert a.ranks == [(3, 3, 3), (4, 4, 4)]
    assert a.objective == pytest.approx(0.5**6 * (1 - 0.25) / (1 - 0.25**4), rel=1e-9)


def _multi_items(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    a = B.synthetic_tensor((6, 5, 4), [0.5, 0.8, 0.7], 0.01, gen)
    conv = B.synthetic_tensor((8, 6, 3, 3), [0.85, 0.6, 0.5, 0.5], 0.01, gen)
    c = 3.0 * B.synthetic_tensor((4, 4, 3, 5), [0.6, 0.9, 0.8, 0.7], 0.0, gen)
    return [
        B.budget_tensor(a),
        B.budget_tensor(conv, bounds=RankBounds((1, 1, 3, 3), (5, 6, 3, 3), (True, True, False, False))),
        B.budget_tensor(c, bounds=RankBounds((2, 2, 2, 2), (4, 4, 3, 5), (True,) * 4), weight=0.5),
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_tensor_budget_bounds_and_gap(seed):
    items = _multi_items(seed)
    lo, hi = B.min_param_count(items), sum(t.count(t.upper) for t in items)
    rng = np.random.default_rng(seed)
    for n in sorted(int(x) for x in rng.integers(lo, hi, size=3)) + [lo]:
        a = B.allocate_ranks(items, n)
        assert a.count <= n
        assert a.count == sum(t.count(r) for t, r in zip(items, a.ranks))
        for t, r in zip(items, a.ranks):
            check_multilinear_ranks(t.shape, r)
            assert all(lo_ <= x <= hi_ for lo_, x, hi_ in zip(t.lower, r, t.upper))
        assert a.ranks[1][:2][0] <= 5 and a.ranks[1][2:] == (3, 3)  # rmax, fixed spatial modes
        assert min(a.ranks[2]) >= 2  # rmin
        opt = B.optimal_allocation_bruteforce(items, n)
        total = sum(t.weight * t.total for t in items)
        assert a.objective >= opt.objective - 1e-12 * total  # the brute force is a true lower bound
        assert _norm_gap(a.objective, opt.objective, total) <= 0.05


def test_multi_bruteforce_against_product_enumeration():
    items = _multi_items(0)[:2]
    n = 200
    shapes = []
    for t in items:
        grid = itertools.product(*[range(lo, hi + 1) for lo, hi in zip(t.lower, t.upper)])
        shapes.append([r for r in grid if all(x * x <= math.prod(r) for x in r)])
    best = min(
        (sum(t.weight * t.error(r) for t, r in zip(items, rs)), rs)
        for rs in itertools.product(*shapes)
        if sum(t.count(r) for t, r in zip(items, rs)) <= n
    )
    opt = B.optimal_allocation_bruteforce(items, n)
    assert opt.objective == pytest.approx(best[0], rel=1e-12)
    assert opt.count <= n


def test_relative_weight_is_scale_invariant():
    """Scaling one tensor does not change the allocation under relative weights; it does under absolute."""
    gen = torch.Generator().manual_seed(3)
    a = B.synthetic_tensor((6, 6, 5), [0.6, 0.7, 0.8], 0.01, gen)
    b = B.synthetic_tensor((6, 5, 6), [0.8, 0.6, 0.7], 0.01, gen)
    n = 220
    base = B.allocate_ranks([B.budget_tensor(a), B.budget_tensor(b)], n).ranks
    assert B.allocate_ranks([B.budget_tensor(a), B.budget_tensor(100.0 * b)], n).ranks == base
    absolute = B.allocate_ranks([B.budget_tensor(a, weight="absolute"), B.budget_tensor(100.0 * b, weight="absolute")], n).ranks
    assert absolute != base
    assert math.prod(absolute[1]) > math.prod(base[1])  # the big tensor takes the rank


@pytest.mark.parametrize("tau", [0.05, 0.2])
def test_tau_is_a_floor(tau):
    """With tau, ranks never exceed truncate_core's tau ranks; with a large budget they equal them."""
    gen = torch.Generator().manual_seed(11)
    core = B.synthetic_tensor((8, 7, 6, 3), [0.6, 0.7, 0.5, 0.8], 0.0, gen)
    bounds = RankBounds((1, 1, 1, 3), (8, 7, 6, 3), (True, True, True, False))
    item = B.budget_tensor(core, shape=(20, 15, 6, 3), bounds=bounds, fixed_ranks=(4, 4, 3, 3), tau=tau)
    ref = truncate_core(core, tau, 1, [8, 7, 6, 3], bounds.adaptive, (4, 4, 3, 3)).ranks
    free = B.budget_tensor(core, shape=(20, 15, 6, 3), bounds=bounds, fixed_ranks=(4, 4, 3, 3))
    assert item.upper == ref and ref != free.upper
    big = B.allocate_ranks([item], 10**9)
    assert big.ranks == [ref]
    for n in (300, 500, 800):
        a = B.allocate_ranks([item], n)
        assert all(x <= y for x, y in zip(a.ranks[0], ref)) and a.count <= n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truncate_to_ranks_matches_truncate_core(seed):
    gen = torch.Generator().manual_seed(seed)
    core = B.synthetic_tensor((6, 5, 4, 3), [0.7, 0.6, 0.8, 0.9], 0.01, gen)
    bounds = RankBounds((2, 2, 1, 3), (6, 5, 4, 3), (True, True, True, False))
    item = B.budget_tensor(core, shape=(10, 9, 4, 3), bounds=bounds)
    assert item.singular_values[3] is None  # a fixed mode that is never cut needs no SVD
    # With rmin = 1 everywhere the multilinear constraint can force the fixed mode down: SVD needed.
    loose = B.budget_tensor(core, bounds=RankBounds((1, 1, 1, 3), (6, 5, 4, 3), bounds.adaptive))
    assert loose.singular_values[3] is not None
    a = B.allocate_ranks([item], 200)
    r = a.ranks[0]
    mine = B.truncate_to_ranks(item, r)
    ref = truncate_core(core, 0.0, list(r), list(r), bounds.adaptive)
    assert mine.ranks == ref.ranks == r
    dense = reconstruct(mine.core, mine.transforms)
    assert torch.allclose(dense, reconstruct(ref.core, ref.transforms), atol=1e-12)
    assert float(mine.error) == pytest.approx(float(ref.error), rel=1e-9)
    assert float(mine.error) ** 2 == pytest.approx(a.errors[0], rel=1e-8)
    with pytest.raises(ValueError, match="multilinear"):
        B.truncate_to_ranks(loose, (4, 1, 1, 3))
    with pytest.raises(ValueError, match="between"):
        B.truncate_to_ranks(item, (1, 1, 4, 3))


def test_spectra_only_matches_core_for_bound():
    gen = torch.Generator().manual_seed(2)
    core = B.synthetic_tensor((6, 5, 4), [0.5, 0.7, 0.9], 0.01, gen)
    full = B.budget_tensor(core, shape=(9, 9, 9))
    spec = B.budget_tensor_from_spectra((9, 9, 9), full.singular_values, core.shape)
    assert spec.upper == full.upper and spec.lower == full.lower
    assert spec.weight == pytest.approx(full.weight, rel=1e-12)
    for n in (120, 200):
        assert B.allocate_ranks([spec], n, "bound").ranks == B.allocate_ranks([full], n, "bound").ranks
    with pytest.raises(ValueError, match="exact"):
        B.allocate_ranks([spec], 200, "exact")
    with pytest.raises(ValueError, match="sizes"):
        B.budget_tensor_from_spectra((4, 9, 9), full.singular_values, core.shape)


def test_low_precision_and_zero_core():
    gen = torch.Generator().manual_seed(4)
    t = B.synthetic_tensor((5, 4, 3), [0.6, 0.7, 0.8], 0.01, gen)
    a64 = B.allocate_ranks([B.budget_tensor(t)], 40).ranks
    item16 = B.budget_tensor(t.half())
    assert item16.hosvd_core.dtype == torch.float32  # never SVD in half
    assert B.allocate_ranks([item16], 40).ranks == a64
    zero = B.budget_tensor(torch.zeros(4, 4, 4, dtype=DT))
    assert zero.weight == 0.0 and zero.upper == (1, 1, 1)
    assert B.allocate_ranks([zero, B.budget_tensor(t)], 60).count <= 60


def test_schedule():
    init, final, s, e = 10_000, 1_234, 100, 600
    vals = [B.budget_at_step(k, s, e, init, final) for k in range(0, 800)]
    assert vals[0] == vals[s] == init
    assert vals[e] == final and vals[-1] == final
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone
    mid = (s + e) // 2
    assert vals[mid] == final + math.floor((init - final) * 0.5**3)
    assert all(isinstance(v, int) for v in vals)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(step=1.5), "step"),
        (dict(start_step=-1), "start_step"),
        (dict(end_step=5), "end_step"),
        (dict(initial="a"), "initial"),
        (dict(final=1.0), "final"),
    ],
)
def test_schedule_bad_input(kwargs, name):
    args = dict(step=1, start_step=10, end_step=20, initial=100, final=10) | kwargs
    with pytest.raises(ValueError, match=name):
        B.budget_at_step(**args)


def test_bad_input():
    gen = torch.Generator().manual_seed(0)
    item = B.budget_tensor(B.synthetic_tensor((5, 4, 3), [0.6, 0.7, 0.8], 0.0, gen))
    minimum = B.min_param_count([item])
    assert minimum == B.tucker_param_count((5, 4, 3), (1, 1, 1)) == B.minimum_count((5, 4, 3))
    conv = RankBounds((2, 1, 3, 3), (8, 8, 3, 3), (True, True, False, False))
    assert B.minimum_count((8, 8, 3, 3), conv) == B.tucker_param_count((8, 8, 3, 3), (2, 1, 3, 3))
    assert B.minimum_count((8, 8, 3), RankBounds((1, 1, 3), (8, 8, 3), (True, True, False))) == B.tucker_param_count(
        (8, 8, 3), (1, 1, 1))  # the fixed mode is lowered with the others
    with pytest.raises(ValueError, match="budget"):
        B.check_budget(2.5)
    for bad in (100.0, "100", True, None, 0):
        with pytest.raises(ValueError, match="budget"):
            B.allocate_ranks([item], bad)
    with pytest.raises(ValueError, match=f"minimum parameter count {minimum}"):
        B.allocate_ranks([item], minimum - 1)
    assert B.allocate_ranks([item], minimum).ranks == [(1, 1, 1)]
    assert B.allocate_ranks([item], np.int64(minimum)).count == minimum
    with pytest.raises(ValueError, match="objective"):
        B.allocate_ranks([item], 50, objective="l1")
    with pytest.raises(ValueError, match="radius"):
        B.allocate_ranks([item], 50, radius=-1)
    with pytest.raises(ValueError, match="tensors"):
        B.allocate_ranks([], 50)
    t = torch.ones(3, 3, 3, dtype=DT)
    for kwargs, name in [(dict(weight=-1.0), "weight"), (dict(weight="loss"), "weight"), (dict(tau=-0.1), "tau"),
                         (dict(shape=(2, 3, 3)), "shape"), (dict(fixed_ranks=(1, 1)), "fixed_ranks")]:
        with pytest.raises(ValueError, match=name):
            B.budget_tensor(t, **kwargs)
    with pytest.raises(ValueError, match="non-finite"):
        B.budget_tensor(torch.full((2, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="budget"):
        B.optimal_core_shape_bruteforce(item, 10.5)
