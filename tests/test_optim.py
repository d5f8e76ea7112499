"""TDLRT optimizer: the step against dense formulas, state transport, rank control, robustness."""
import math

import geoopt
import numpy as np
import pytest
import torch

from tucker_manifold import FixedRankTucker
from tucker_manifold.optim import TDLRT as _TDLRT
from tucker_manifold.flow import truncate_core
from tucker_manifold.parameter import RankBounds, TuckerParameter, factor_grads_wanted, make_tucker_parameter, set_point
from tucker_manifold.tucker import multi_mode_dot, truncated_hosvd

SEEDS = [0, 1, 2]


class TDLRT(_TDLRT):
    """The two-pass reference (``single_pass=False``): these tests check its formulas on bare parameters
    used through ``M.to_dense``; tests/test_single_pass.py checks the one-pass default against it."""

    def __init__(self, *args, single_pass: bool = False, **kwargs):
        super().__init__(*args, single_pass=single_pass, **kwargs)


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_problem(seed, shape=(7, 6, 5), ranks=(2, 2, 2), target_ranks=(3, 3, 3)):
    g = torch.Generator().manual_seed(seed)
    target = FixedRankTucker(shape, target_ranks)
    a = target.to_dense(target.random(generator=g)) + 0.05 * torch.randn(shape, generator=g)
    m = FixedRankTucker(shape, ranks)
    p = geoopt.ManifoldParameter(m.random(generator=g), manifold=m)
    return p, a


def quad_closure(p, a, record=None):
    def closure():
        loss = 0.5 * ((p.manifold.to_dense(p) - a) ** 2).sum()
        loss.backward()
        if record is not None:
            record.append(loss.item())
        return loss

    return closure


def dense_orth_augment(u, g):
    """Reference orth([U | G]) with U leading, by numpy's QR on the projected G (full rank here)."""
    gp = g - u @ (u.T @ g)
    q, _ = np.linalg.qr(gp - u @ (u.T @ gp))
    return np.concatenate([u, q], axis=1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tau", [0.0, 0.05, 0.3])
def test_step_matches_dense_formulas(seed, tau):
    p, a = make_problem(seed)
    m = p.manifold
    h = 0.3
    x0 = p.detach().clone()
    core, factors = m.unpack(x0)
    # Reference: factor gradients from autograd, augmented bases, exact lift, Galerkin step from the
    # dense gradient at the lifted point, truncated HOSVD by relative tau.
    xr = x0.clone().requires_grad_(True)
    (0.5 * ((m.to_dense(xr) - a) ** 2).sum()).backward()
    gfactors = m.unpack(xr.grad)[1]
    new_u = [torch.from_numpy(dense_orth_augment(u.numpy(), g.numpy())) for u, g in zip(factors, gfactors)]
    lifted = multi_mode_dot(core, [nu.T @ u for nu, u in zip(new_u, factors)])
    y_hat = multi_mode_dot(lifted, new_u)
    assert torch.allclose(y_hat, m.to_dense(x0), atol=1e-12)
    core_grad = multi_mode_dot(y_hat - a, new_u, transpose=True)
    stepped = lifted - h * core_grad
    ref_core, ref_p, _ = truncated_hosvd(stepped, tau=tau)
    reference = multi_mode_dot(ref_core, [nu @ pp for nu, pp in zip(new_u, ref_p)])

    opt = TDLRT([p], lr=h, tau=tau)
    opt.step(quad_closure(p, a))
    assert p.manifold.ranks == tuple(c.shape[1] for c in ref_p)
    assert torch.allclose(p.manifold.to_dense(p), reference, atol=1e-11)
    assert p.manifold.check_point_on_manifold(p)


@pytest.mark.parametrize("seed", SEEDS)
def test_exact_lift_leaves_loss_unchanged_and_closure_called_twice(seed):
    p, a = make_problem(seed)
    losses = []
    opt = TDLRT([p], lr=0.1, tau=0.1)
    for _ in range(3):
        before = len(losses)
        opt.step(quad_closure(p, a, losses))
        assert len(losses) == before + 2
        assert math.isclose(losses[-1], losses[-2], rel_tol=1e-12, abs_tol=1e-12)
        assert opt.last_step_info[0]["augmented_ranks"] >= p.manifold.ranks


@pytest.mark.parametrize("seed", SEEDS)
def test_ranks_fall_as_tau_grows_and_respect_bounds(seed):
    final = []
    for tau in [0.01, 0.1, 0.4]:
        p, a = make_problem(seed, shape=(8, 8, 6), ranks=(3, 3, 3), target_ranks=(4, 4, 3))
        opt = TDLRT([p], lr=0.3, tau=tau, rmin=2, rmax=5)
        for _ in range(15):
            opt.step(quad_closure(p, a))
            r = p.manifold.ranks
            assert all(2 <= ri <= 5 for ri in r)
            assert all(ri <= math.prod(r[:i] + r[i + 1 :]) for i, ri in enumerate(r))
            assert p.manifold.check_point_on_manifold(p)
        final.append(sum(p.manifold.ranks))
    assert final[0] >= final[1] >= final[2]
    assert final[0] > final[2]


def test_parameter_rank_attributes_and_fixed_modes():
    p, a = make_problem(0, shape=(8, 7, 3, 3), ranks=(2, 2, 3, 2), target_ranks=(4, 4, 3, 3))
    p = make_tucker_parameter(p.detach(), p.manifold, RankBounds((1, 1, 3, 2), (3, 6, 3, 3), (True, True, False, False)))
    opt = TDLRT([p], lr=0.3, tau=0.0)
    for _ in range(6):
        opt.step(quad_closure(p, a))
        r = p.manifold.ranks
        assert r[0] <= 3 and r[1] <= 6
        assert r[2] == 3 and r[3] == 2  # fixed modes keep their rank (mode 3 still rotates)


@pytest.mark.parametrize("seed", SEEDS)
def test_quadratic_converges_to_target_rank(seed):
    g = torch.Generator().manual_seed(seed)
    target = FixedRankTucker((9, 8, 7), (3, 2, 3))
    a = target.to_dense(target.random(generator=g))
    m = FixedRankTucker((9, 8, 7), (2, 2, 2))
    for kw in [dict(method="sgd", lr=0.5), dict(method="sgd", lr=0.3, momentum=0.5, nesterov=True),
               dict(method="adam", lr=0.05)]:
        p = geoopt.ManifoldParameter(m.random(generator=g), manifold=m)
        opt = TDLRT([p], tau=1e-4, **kw)
        for _ in range(300 if kw["method"] == "adam" else 80):
            opt.step(quad_closure(p, a))
        err = (p.manifold.to_dense(p) - a).norm() / a.norm()
        assert err < (2e-3 if kw["method"] == "adam" else 1e-8), kw
        assert p.manifold.ranks == (3, 2, 3)


@pytest.mark.parametrize("key", ["momentum", "adam"])
def test_state_transport_keeps_ambient_moment(key):
    p, a = make_problem(3)
    kw = dict(momentum=0.9) if key == "momentum" else dict(method="adam")
    opt = TDLRT([p], lr=0.05, tau=0.05, **kw)
    opt.step(quad_closure(p, a))
    name = "momentum_buffer" if key == "momentum" else "exp_avg"
    state = opt.state[p]
    m = p.manifold
    core, factors = m.unpack(p.detach())
    ambient = multi_mode_dot(state[name], factors)
    # Lift into a bigger basis: ambient tensor unchanged.
    g = torch.Generator().manual_seed(5)
    new_factors = [torch.linalg.qr(torch.cat([u, torch.randn(u.shape[0], 2, generator=g)], 1)).Q for u in factors]
    # keep U as leading columns exactly (QR may flip signs)
    new_factors = [torch.cat([u, nu[:, u.shape[1]:]], 1) for u, nu in zip(factors, new_factors)]
    maps = [nu.T @ u for nu, u in zip(new_factors, factors)]
    st = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    TDLRT._transform_state(st, maps, m.ranks, transpose=False)
    assert torch.allclose(multi_mode_dot(st[name], new_factors), ambient, atol=1e-12)
    if key == "adam":
        v = st["exp_avg_sq"]
        assert (v > 0).all()  # new directions start at the mean, never at zero
    # Truncation to a subspace: ambient tensor is projected.
    trans = [nu[:, :r] for nu, r in zip([torch.eye(f.shape[1]) for f in new_factors], m.ranks)]
    TDLRT._transform_state(st, trans, m.ranks, transpose=True)
    assert torch.allclose(multi_mode_dot(st[name], [nu @ t for nu, t in zip(new_factors, trans)]), ambient, atol=1e-12)


def test_momentum_state_follows_rank_changes_through_steps():
    p, a = make_problem(4)
    opt = TDLRT([p], lr=0.1, tau=0.05, momentum=0.9)
    for _ in range(5):
        opt.step(quad_closure(p, a))
        assert opt.state[p]["momentum_buffer"].shape == p.manifold.ranks


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_nonfinite_step_is_skipped_bit_identically(bad_pass):
    p, a = make_problem(1)
    bias = torch.nn.Parameter(torch.randn(3))
    opt = TDLRT([p, bias], lr=0.1, tau=0.1, momentum=0.9)
    def full():
        loss = 0.5 * ((p.manifold.to_dense(p) - a) ** 2).sum() + (bias**2).sum()
        loss.backward()
        return loss

    opt.step(full)
    before = (p.detach().clone(), p.manifold, bias.detach().clone(),
              {k: v.clone() for k, v in opt.state[p].items()}, opt.state[bias]["momentum_buffer"].clone())
    calls = []

    def poisoned():
        calls.append(1)
        loss = 0.5 * ((p.manifold.to_dense(p) - a) ** 2).sum() + (bias**2).sum()
        if len(calls) == bad_pass:
            loss = loss * float("nan")
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(poisoned)
    assert opt.skipped_steps == 1
    assert torch.equal(p.detach(), before[0]) and p.manifold is before[1]
    assert torch.equal(bias.detach(), before[2])
    for k, v in before[3].items():
        assert torch.equal(opt.state[p][k], v)
    assert torch.equal(opt.state[bias]["momentum_buffer"], before[4])
    # Training goes on normally afterwards.
    opt.step(full)
    assert opt.state_dict()["tdlrt"]["skipped_steps"] == 1


def test_rollback_on_the_first_step_restores_the_very_manifold_object():
    p, a = make_problem(3)
    m0, x0 = p.manifold, p.detach().clone()
    opt = TDLRT([p], lr=0.1, tau=0.1)
    calls = []

    def poisoned():
        calls.append(1)
        loss = 0.5 * ((p.manifold.to_dense(p) - a) ** 2).sum() * (float("inf") if len(calls) == 2 else 1.0)
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="pass 2"):
        opt.step(poisoned)
    assert p.manifold is m0 and torch.equal(p.detach(), x0) and p.grad is None


def test_no_tucker_parameter_says_what_to_do():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"no Tucker parameter.*tuckerize\(model, linear=True\)"):
        TDLRT(model.parameters(), lr=0.1)


def test_batched_tucker_parameter_is_refused():
    m = FixedRankTucker((5, 4, 3), (2, 2, 2))
    batched = torch.Tensor._make_subclass(TuckerParameter, torch.stack([m.random(), m.random()]), True)
    batched.manifold, batched.bounds = m, RankBounds.full(m.shape)
    p, _ = make_problem(0)
    with pytest.raises(ValueError, match="batched Tucker parameters are not supported by TDLRT; use geoopt's optimizers"):
        TDLRT([p, batched], lr=0.1)
    opt = TDLRT([p], lr=0.1)
    with pytest.raises(ValueError, match="batched"):
        opt.add_param_group({"params": [batched]})


def test_pass_two_asks_for_core_gradients_only():
    p, a = make_problem(0)
    other, _ = make_problem(1)
    seen = []
    opt = TDLRT([p], lr=0.1, tau=0.1)

    def closure():
        seen.append((factor_grads_wanted(p), factor_grads_wanted(other)))
        return quad_closure(p, a)()

    opt.step(closure)
    assert seen == [(True, True), (False, True)]
    assert factor_grads_wanted(p)


def test_truncation_stage_sees_every_parameter_at_once():
    """The stages are methods a subclass can replace: here a joint truncation that keeps every rank."""
    (p, a), (q, b) = make_problem(0), make_problem(1, shape=(6, 5, 4))
    seen = []

    class KeepRanks(TDLRT):
        def _truncate(self, plans):
            seen.append([(plan.p is x, plan.old_ranks, tuple(plan.stepped.shape)) for plan, x in zip(plans, (p, q))])
            self.last_step_info = []
            for plan in plans:
                tr = truncate_core(plan.stepped, 0.0, rmin=1, adaptive=[False] * 3, fixed_ranks=plan.old_ranks)
                self._apply_truncation(plan, tr)

    opt = KeepRanks([p, q], lr=0.1, tau=0.5)

    def closure():
        loss = 0.5 * ((p.manifold.to_dense(p) - a) ** 2).sum() + 0.5 * ((q.manifold.to_dense(q) - b) ** 2).sum()
        loss.backward()
        return loss

    r0 = (p.manifold.ranks, q.manifold.ranks)
    for _ in range(2):
        opt.step(closure)
    assert (p.manifold.ranks, q.manifold.ranks) == r0 and len(seen) == 2
    for (same_param, old, aug), r in zip(seen[0], r0):
        # one call with both parameters, each augmented (every mode at least, some strictly) before truncation
        assert same_param and old == r and all(s >= o for s, o in zip(aug, old)) and sum(aug) > sum(old)
    assert [info["ranks"] for info in opt.last_step_info] == list(r0)


def test_nan_gradient_only_is_skipped():
    p, a = make_problem(2)
    opt = TDLRT([p], lr=0.1, tau=0.1)
    x0 = p.detach().clone()

    def closure():
        loss = 0.5 * ((p.manifold.to_dense(p) - a) ** 2).sum()
        (loss * torch.sqrt(torch.tensor(-1.0) + 0 * loss)).backward()  # finite loss? no: NaN grad
        return torch.tensor(1.0)

    with pytest.warns(RuntimeWarning):
        opt.step(closure)
    assert torch.equal(p.detach(), x0)


def test_lr_scheduler_drives_the_step():
    p, a = make_problem(0)
    opt = TDLRT([p], lr=0.2, tau=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.0)
    opt.step(quad_closure(p, a))
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    before = p.manifold.to_dense(p).detach().clone()
    opt.step(quad_closure(p, a))
    # lr = 0: only the (exact) lift and a lossless truncation happen: same tensor
    assert torch.allclose(p.manifold.to_dense(p), before, atol=1e-12)


def test_optimizer_state_dict_round_trip_with_changed_ranks():
    p, a = make_problem(0)
    opt = TDLRT([p], lr=0.1, tau=0.05, momentum=0.9)
    for _ in range(3):
        opt.step(quad_closure(p, a))
    sd = opt.state_dict()
    m = p.manifold
    q = geoopt.ManifoldParameter(FixedRankTucker(m.shape, (2, 2, 2)).random(), manifold=FixedRankTucker(m.shape, (2, 2, 2)))
    core, factors = m.unpack(p.detach())
    set_point(q, core.clone(), [f.clone() for f in factors])
    opt2 = TDLRT([q], lr=0.1, tau=0.05, momentum=0.9)
    opt2.load_state_dict(sd)
    for _ in range(3):
        opt.step(quad_closure(p, a))
        opt2.step(quad_closure(q, a))
    assert torch.equal(p.detach(), q.detach())
    assert p.manifold.ranks == q.manifold.ranks


def test_bad_arguments():
    p, _ = make_problem(0)
    for kw, word in [(dict(lr=-1), "lr"), (dict(lr=0.1, tau=-0.1), "tau"), (dict(lr=0.1, method="rmsprop"), "method"),
                     (dict(lr=0.1, momentum=1.5), "momentum"), (dict(lr=0.1, rmin=0), "rmin"),
                     (dict(lr=0.1, rmin=5, rmax=2), "rmin")]:
        with pytest.raises(ValueError, match=word):
            TDLRT([p], **kw)
    with pytest.raises(ValueError, match="closure"):
        TDLRT([p], lr=0.1).step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu():
    p, a = make_problem(0)
    pc = geoopt.ManifoldParameter(p.detach().cuda(), manifold=p.manifold)
    ac = a.cuda()
    o1, o2 = TDLRT([p], lr=0.2, tau=0.05), TDLRT([pc], lr=0.2, tau=0.05)
    for _ in range(5):
        o1.step(quad_closure(p, a))
        o2.step(quad_closure(pc, ac))
    assert p.manifold.ranks == pc.manifold.ranks
    assert torch.allclose(p.manifold.to_dense(p), pc.manifold.to_dense(pc).cpu(), atol=1e-9)
