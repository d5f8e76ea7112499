"""Every verdict of proofs_checks can fail: each check's quick setting is run against deliberately broken
integrators (proofs_checks/mutants.py) and must fail exactly where the mutant violates the verdict's claim,
while the library's TDLRT passes every verdict (and so does ParallelTDLRT, in the checks that run it:
descent and robustness).

The table of (verdict, mutant) outcomes is proofs_checks/README.md's; the asserted cells are
``proofs_checks.mutants.EXPECTED_CAUGHT``. One run of each check per integrator, shared by the tests of
that check (module-scoped fixtures; the checks cache what does not depend on the integrator).
"""
import math

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")
pytest.importorskip("sklearn")

import geoopt  # noqa: E402

from proofs_checks import CHECKS, mutants, report  # noqa: E402
from tucker_manifold import FixedRankTucker  # noqa: E402
from tucker_manifold.optim import TDLRT  # noqa: E402
from tucker_manifold.parameter import record_io  # noqa: E402

pytestmark = pytest.mark.slow

#: the checks that run ParallelTDLRT next to TDLRT (as ``tdlrt-parallel``)
PARALLEL_CHECKS = ("descent", "robustness")


@pytest.fixture(scope="module")
def cache():
    return {}


@pytest.fixture(scope="module", params=list(CHECKS))
def outcome(request, cache):
    check = request.param
    return check, report.run_mutations([check], cache=cache)[check]


def test_library_integrator_passes_every_verdict(outcome):
    check, table = outcome
    failed = [v["name"] for v in table["tdlrt"] if not v["passed"]]
    assert not failed, f"{check}: TDLRT fails {failed}"


def test_parallel_tdlrt_passes_every_verdict(outcome):
    """Where a check runs ParallelTDLRT it passes the same verdicts as TDLRT; elsewhere it is absent (the
    table claims nothing for it)."""
    check, table = outcome
    if check not in PARALLEL_CHECKS:
        assert "tdlrt-parallel" not in table
        return
    names = [v["name"] for v in table["tdlrt-parallel"]]
    assert names == [v["name"] for v in table["tdlrt"]]  # the same verdicts
    failed = [v["name"] for v in table["tdlrt-parallel"] if not v["passed"]]
    assert not failed, f"{check}: ParallelTDLRT fails {failed}"


def test_expected_catches(outcome):
    check, table = outcome
    missed = []
    for mutant, names in mutants.EXPECTED_CAUGHT[check].items():
        got = {v["name"]: v for v in table[mutant]}
        missed += [f"{mutant}: {n}" for n in names if got[n]["passed"]]
    assert not missed, f"{check}: verdicts that pass on a mutant that violates their claim: {missed}"


def test_every_verdict_is_caught_by_some_mutant(outcome):
    """Every verdict fails on at least one mutant (otherwise it cannot fail)."""
    check, table = outcome
    names = [v["name"] for v in table["tdlrt"]]
    uncaught = [n for n in names if not any(not v["passed"] for m, vs in table.items() if m in mutants.MUTANTS
                                            for v in vs if v["name"] == n)]
    assert not uncaught, f"{check}: verdicts no mutant makes fail: {uncaught}"


def test_expectations_cover_exactly_the_mutants_run():
    for check in CHECKS:
        assert set(mutants.EXPECTED_CAUGHT[check]) == set(report.MUTANT_CHECKS[check]), check


# ----------------------------------------------------------------------------- the mutants are what they say
def _problem(seed=0, shape=(6, 5, 4), ranks=(2, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    target = FixedRankTucker(shape, (3, 3, 3))
    a = target.to_dense(target.random(dtype=torch.float64, generator=g))
    m = FixedRankTucker(shape, ranks)
    p = geoopt.ManifoldParameter(m.random(dtype=torch.float64, generator=g), manifold=m)

    def closure_for(opt):
        def closure():
            opt.zero_grad()
            loss = 0.5 * ((record_io(p, None, None, p.manifold.to_dense(p)) - a) ** 2).sum()
            loss.backward()
            return loss

        return closure

    return p, closure_for


def _dense(p):
    return p.manifold.to_dense(p.detach())


def test_frozen_changes_nothing():
    p, closure_for = _problem()
    before = p.detach().clone()
    opt = mutants.Frozen([p], lr=0.5, tau=0.0)
    for _ in range(3):
        opt.step(closure_for(opt))
    assert torch.equal(p.detach(), before)


def test_too_long_is_tdlrt_at_three_times_the_step():
    p, closure_for = _problem()
    q, closure_q = _problem()
    a, b = mutants.TooLong([p], lr=0.1, tau=0.0), TDLRT([q], lr=0.3, tau=0.0)
    for _ in range(3):
        a.step(closure_for(a))
        b.step(closure_q(b))
    assert torch.allclose(_dense(p), _dense(q), atol=1e-12)
    assert a.param_groups[0]["lr"] == 0.1  # what it was told is restored


def test_wrong_sign_goes_uphill():
    p, closure_for = _problem()
    opt = mutants.WrongSign([p], lr=0.1, tau=0.0)
    losses = [float(opt.step(closure_for(opt))) for _ in range(4)]
    assert losses[-1] > losses[0]


def test_ignores_tau_cuts_to_rmin():
    p, closure_for = _problem()
    opt = mutants.IgnoresTau([p], lr=0.1, tau=0.0)
    opt.step(closure_for(opt))
    assert p.manifold.ranks == (1, 1, 1)
    assert opt.param_groups[0]["tau"] == 0.0


def test_fixed_basis_keeps_the_factors_and_the_rank():
    p, closure_for = _problem()
    factors = [f.clone() for f in p.manifold.unpack(p.detach())[1]]
    opt = mutants.FixedBasis([p], lr=0.1, tau=0.0)
    loss0 = float(opt.step(closure_for(opt)))
    for f, g in zip(factors, p.manifold.unpack(p.detach())[1]):
        assert torch.equal(f, g)
    assert p.manifold.ranks == (2, 2, 2)
    assert float(opt.step(closure_for(opt))) < loss0


def test_broken_lift_changes_the_point_before_the_core_step():
    p, closure_for = _problem()
    opt = mutants.BrokenLift([p], lr=0.0, tau=0.0)  # lr 0: only the lift (and truncation) act
    before = _dense(p)
    opt.step(closure_for(opt))
    assert float((_dense(p) - before).norm()) > 1e-3 * float(before.norm())
    q, closure_q = _problem()
    ref = TDLRT([q], lr=1e-300, tau=0.0)
    ref.step(closure_q(ref))
    assert float((_dense(q) - before).norm()) < 1e-10 * float(before.norm())  # the exact lift keeps it


def test_momentum_reset_is_tdlrt_without_momentum():
    p, closure_for = _problem()
    q, closure_q = _problem()
    a = mutants.MomentumReset([p], lr=0.05, tau=0.0, momentum=0.9)
    b = TDLRT([q], lr=0.05, tau=0.0, momentum=0.0)
    for _ in range(3):
        a.step(closure_for(a))
        b.step(closure_q(b))
    assert torch.allclose(_dense(p), _dense(q), atol=1e-12)


def test_factor_euler_blows_up_where_tdlrt_does_not():
    """At a core with a singular value far below the step size, the factor update (inverse Gram) explodes."""
    from tucker_manifold.tucker import multi_mode_dot

    g = torch.Generator().manual_seed(3)
    shape, r = (8, 7, 6), 3
    m = FixedRankTucker(shape, (r,) * 3)
    core = torch.zeros(r, r, r, dtype=torch.float64)
    for k, s in enumerate((1.0, 1.0, 1e-8)):
        core[k, k, k] = s
    factors = [torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q for n in shape]
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    results = {}
    for name, cls in (("euler", mutants.FactorEuler), ("tdlrt", None)):
        p = geoopt.ManifoldParameter(m.pack(core, factors), manifold=m)
        opt = cls([p], lr=0.01, tau=0.0) if cls else TDLRT([p], lr=0.01, tau=0.0, rmax=r)

        def closure():
            opt.zero_grad()
            loss = 0.5 * ((record_io(p, None, None, p.manifold.to_dense(p)) - a) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        w = p.manifold.to_dense(p.detach())
        results[name] = float((w - multi_mode_dot(core, factors)).norm()) if torch.isfinite(w).all() else math.inf
    assert results["tdlrt"] < 1.0 < results["euler"]
