"""The TDLRT flow functions: Theorem 2.1, Corollary 2.2, augmentation, lift and truncation,
against dense computations on small shapes."""
import math

import pytest
import torch

from tucker_manifold import FixedRankTucker
from tucker_manifold.flow import (
    augment_basis,
    augment_bases,
    augment_tucker_bases,
    enforce_multilinear_ranks,
    galerkin_gradient,
    k_gradient,
    k_step,
    lift,
    lift_core,
    reparametrize,
    truncate_core,
    v_basis,
)
from tucker_manifold.tucker import mode_dot, multi_mode_dot, reconstruct, unfold

pytestmark = pytest.mark.usefixtures("float64")


def point(case):
    m = FixedRankTucker(*case)
    x = m.random()
    core, factors = m.unpack(x)
    return m, x, core, factors


def fro(a, b=None):
    return torch.linalg.vector_norm(a if b is None else a - b)


def orth_projector(a):
    """Orthogonal projector onto the column space of ``a`` (numerical rank by SVD)."""
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    k = int((s > s[0] * 1e-10).sum())
    return u[:, :k] @ u[:, :k].T


def loss_and_grad(z):
    """L(W) = <W, Z> + 0.5||W||^2 + sum(W^3)/3 and its dense gradient."""

    def loss(w):
        return (w * z).sum() + 0.5 * (w**2).sum() + (w**3).sum() / 3

    def grad(w):
        return z + w + w**2

    return loss, grad


def tails(s):
    return torch.stack([torch.linalg.vector_norm(s[k:]) for k in range(len(s) + 1)])


# ---------------------------------------------------------------- Theorem 2.1
def test_theorem_2_1_identities(case):
    m, x, core, factors = point(case)
    w = m.to_dense(x)
    z = torch.randn(m.shape)
    pz = m.tangent_to_dense(x, m.proj_dense(x, z))
    h = 0.37
    for i in range(m.order):
        rep = reparametrize(core, factors, i)
        q, s, k = rep
        assert torch.allclose(unfold(core, i).T, q @ s, atol=1e-12)
        assert torch.allclose(torch.triu(s), s)
        v = v_basis(factors, q, i)
        assert v.shape == (math.prod(m.shape) // m.shape[i], m.ranks[i])
        assert torch.allclose(v.T @ v, torch.eye(m.ranks[i]), atol=1e-12)
        assert torch.allclose(k, factors[i] @ s.T, atol=1e-12)
        assert torch.allclose(unfold(w, i), k @ v.T, atol=1e-11)
        ref = unfold(z, i) @ v
        assert torch.allclose(unfold(pz, i) @ v, ref, atol=1e-10)
        assert torch.allclose(k_gradient(core, factors, i, z), ref, atol=1e-11)
        assert torch.allclose(k_step(core, factors, i, z, h), k - h * ref, atol=1e-11)


# ---------------------------------------------------------------- Corollary 2.2
def factor_grads(core, factors, loss):
    c = core.detach().clone().requires_grad_(True)
    us = [u.detach().clone().requires_grad_(True) for u in factors]
    grads = torch.autograd.grad(loss(reconstruct(c, us)), [c] + us)
    return grads[0], list(grads[1:])


def test_corollary_2_2_factor_gradient(case):
    m, x, core, factors = point(case)
    loss, grad = loss_and_grad(torch.randn(m.shape))
    w = m.to_dense(x)
    g = grad(w)
    gcore, gfactors = factor_grads(core, factors, loss)
    assert torch.allclose(gcore, galerkin_gradient(g, factors), atol=1e-10)
    for i in range(m.order):
        q, s, k = reparametrize(core, factors, i)
        v = v_basis(factors, q, i)
        assert torch.allclose(gfactors[i], unfold(g, i) @ v @ s, atol=1e-10)
        for h in (0.1, 1.0):
            kh = k - h * (unfold(g, i) @ v)
            p1 = orth_projector(torch.cat([factors[i], gfactors[i]], 1))
            p2 = orth_projector(torch.cat([factors[i], kh], 1))
            assert torch.allclose(p1, p2, atol=1e-9)
            # augment_basis gives the same space
            aug = augment_basis(factors[i], gfactors[i])
            assert torch.allclose(aug @ aug.T, p2, atol=1e-9)


def test_augmented_space_contains_projected_gradient(case):
    m, x, core, factors = point(case)
    loss, grad = loss_and_grad(torch.randn(m.shape))
    g = grad(m.to_dense(x))
    pg = m.tangent_to_dense(x, m.proj_dense(x, g))
    _, gfactors = factor_grads(core, factors, loss)
    new = augment_bases(factors, gfactors)
    projs = [u @ u.T for u in new]
    for i in range(m.order):
        assert fro(mode_dot(g, projs[i], i)) >= fro(pg) - 1e-10
        assert torch.allclose(mode_dot(pg, projs[i], i), pg, atol=1e-10)
    # every mode at once: P(Y) grad L lives in the augmented Tucker space
    assert torch.allclose(multi_mode_dot(pg, projs), pg, atol=1e-10)
    assert fro(multi_mode_dot(g, projs)) >= fro(pg) - 1e-10


# ---------------------------------------------------------------- augment_basis
def check_orthonormal(q, atol=1e-12):
    assert torch.allclose(q.T @ q, torch.eye(q.shape[1]), atol=atol), (q.T @ q - torch.eye(q.shape[1])).abs().max()


@pytest.mark.parametrize("n, r, k", [(10, 3, 3), (10, 3, 5), (6, 2, 8), (7, 4, 3)])
def test_augment_basis_generic(seed, n, r, k):
    u = torch.linalg.qr(torch.randn(n, r)).Q
    g = torch.randn(n, k)
    a = augment_basis(u, g)
    assert torch.equal(a[:, :r], u)
    assert a.shape == (n, min(n, r + k))
    check_orthonormal(a)
    assert fro(g - a @ (a.T @ g)) <= 1e-12 * fro(g)
    assert torch.isfinite(a).all()


def test_augment_basis_degenerate(seed):
    n, r = 9, 3
    u = torch.linalg.qr(torch.randn(n, r)).Q
    # inside span(U): nothing to add
    assert torch.equal(augment_basis(u, u @ torch.randn(r, 4)), u)
    # zero gradient: nothing to add, no NaN
    assert torch.equal(augment_basis(u, torch.zeros(n, 3)), u)
    # empty gradient
    assert torch.equal(augment_basis(u, torch.zeros(n, 0)), u)
    # rank one with three columns: exactly one new column
    g = torch.randn(n, 1) @ torch.randn(1, 3)
    a = augment_basis(u, g)
    assert a.shape == (n, r + 1) and torch.equal(a[:, :r], u)
    check_orthonormal(a)
    assert fro(g - a @ (a.T @ g)) <= 1e-12 * fro(g)
    # rank one plus a component inside span(U)
    g2 = g + u @ torch.randn(r, 3)
    a2 = augment_basis(u, g2)
    assert a2.shape == (n, r + 1) and torch.isfinite(a2).all()
    check_orthonormal(a2)
    # tiny out-of-span part (below rtol relative to ||G||): ignored
    g3 = u @ torch.randn(r, 3) + 1e-18 * torch.randn(n, 3)
    assert torch.equal(augment_basis(u, g3), u)
    # max_rank caps
    a4 = augment_basis(u, torch.randn(n, 5), max_rank=5)
    assert a4.shape == (n, 5) and torch.equal(a4[:, :r], u)
    check_orthonormal(a4)
    assert torch.equal(augment_basis(u, torch.randn(n, 5), max_rank=r), u)
    # r = n: nothing can be added
    full = torch.linalg.qr(torch.randn(n, n)).Q
    assert torch.equal(augment_basis(full, torch.randn(n, 3)), full)
    # non-finite gradient: clear error
    with pytest.raises(ValueError, match="non-finite"):
        augment_basis(u, torch.full((n, 2), float("nan")))


def test_augment_basis_nearly_dependent(seed):
    # G almost in span(U): the classical Gram-Schmidt fix keeps [U | W] orthonormal
    n, r = 12, 4
    u = torch.linalg.qr(torch.randn(n, r)).Q
    g = u @ torch.randn(r, 3) + 1e-9 * torch.randn(n, 3)
    a = augment_basis(u, g)
    assert torch.equal(a[:, :r], u)
    assert a.shape[1] == r + 3
    check_orthonormal(a, atol=1e-12)


def test_augment_bases_modes_flag(case):
    m, x, core, factors = point(case)
    grads = [torch.randn(n, r) for n, r in zip(m.shape, m.ranks)]
    modes = [i % 2 == 0 for i in range(m.order)]
    out = augment_bases(factors, grads, modes=modes)
    for i, (u, a) in enumerate(zip(factors, out)):
        if modes[i]:
            assert torch.equal(a, augment_basis(u, grads[i]))
        else:
            assert a is u


# ---------------------------------------------------------------- augment_tucker_bases (what TDLRT runs)
def test_augment_tucker_bases(case):
    m, x, core, factors = point(case)
    loss, _ = loss_and_grad(torch.randn(m.shape))
    _, gfactors = factor_grads(core, factors, loss)
    new = augment_tucker_bases(factors, gfactors)
    sizes = [u.shape[1] for u in new]
    assert sizes == enforce_multilinear_ranks(sizes)  # a valid multilinear rank
    for u, a, n, r in zip(factors, new, m.shape, m.ranks):
        assert r <= a.shape[1] <= min(n, 2 * r)
        assert torch.equal(a[:, :r], u)  # U_i kept as the leading columns
        assert torch.allclose(a.T @ a, torch.eye(a.shape[1]), atol=1e-12)
        if r == n:
            assert a is u  # full-rank modes are kept as they are
    assert all(torch.equal(a, b[:, : a.shape[1]]) for a, b in zip(new, augment_bases(factors, gfactors)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augment_tucker_bases_trims_new_columns_only(seed):
    g = torch.Generator().manual_seed(seed)
    m = FixedRankTucker((9, 2, 2), (4, 2, 2))  # modes 1, 2 full rank: mode 0 may not exceed 2 * 2
    core, factors = m.unpack(m.random(generator=g))
    grads = [torch.randn(n, r, generator=g) for n, r in zip(m.shape, m.ranks)]
    assert augment_bases(factors, grads)[0].shape[1] == 8
    new = augment_tucker_bases(factors, grads)
    assert [u.shape[1] for u in new] == [4, 2, 2] and torch.equal(new[0], factors[0])
    m2 = FixedRankTucker((9, 3, 2), (4, 2, 2))  # now mode 0 can grow to 3 * 2 = 6
    core, factors = m2.unpack(m2.random(generator=g))
    grads = [torch.randn(n, r, generator=g) for n, r in zip(m2.shape, m2.ranks)]
    new = augment_tucker_bases(factors, grads)
    assert [u.shape[1] for u in new] == [6, 3, 2] and torch.equal(new[0][:, :4], factors[0])


# ---------------------------------------------------------------- lift_core
def test_lift_core_exact(case):
    m, x, core, factors = point(case)
    loss, _ = loss_and_grad(torch.randn(m.shape))
    _, gfactors = factor_grads(core, factors, loss)
    new = augment_bases(factors, gfactors)
    lifted = lift_core(core, factors, new)
    lifted2, maps = lift(core, factors, new)
    assert torch.equal(lifted, lifted2)
    for mp, nu, u in zip(maps, new, factors):
        assert torch.equal(mp, nu.T @ u)
    assert tuple(lifted.shape) == tuple(u.shape[1] for u in new)
    assert tuple(lifted.shape) == tuple(min(n, 2 * r) for n, r in m_shape_ranks(m))
    assert torch.allclose(reconstruct(lifted, new), m.to_dense(x), atol=1e-12 * max(1.0, fro(core).item()))
    # the old core sits in the leading block, zeros elsewhere (U kept as leading columns)
    lead = tuple(slice(0, r) for r in m.ranks)
    assert torch.allclose(lifted[lead], core, atol=1e-12)
    rest = lifted.clone()
    rest[lead] = 0
    assert fro(rest) < 1e-12


def m_shape_ranks(m):
    return list(zip(m.shape, m.ranks))


# ---------------------------------------------------------------- truncate_core
def graded_core(shape):
    """A core with decaying per-mode spectra: a low-rank part plus smaller and smaller noise."""
    low = tuple(max(1, n // 2) for n in shape)
    c = reconstruct(torch.randn(low), [torch.randn(n, r) for n, r in zip(shape, low)])
    return c + 0.05 * torch.randn(shape) * fro(c) / math.sqrt(c.numel())


AUG_SHAPES = [(4, 4), (6, 4, 6), (4, 6, 4, 6), (4, 4, 3, 4, 4), (6, 6, 3, 3)]


@pytest.mark.parametrize("shape", AUG_SHAPES, ids=["x".join(map(str, s)) for s in AUG_SHAPES])
def test_truncate_core_tau_zero_keeps_tensor(seed, shape):
    c = torch.randn(shape)
    tr = truncate_core(c, 0.0)
    back = multi_mode_dot(tr.core, tr.transforms)
    assert torch.allclose(back, c, atol=1e-12 * fro(c))
    assert tr.error <= 1e-12 * fro(c)
    # a core of lower multilinear rank padded with exact zeros: tau = 0 finds that rank
    low = torch.zeros(shape)
    sub = tuple(slice(0, max(1, n - 1)) for n in shape)
    low[sub] = torch.randn([max(1, n - 1) for n in shape])
    tr = truncate_core(low, 0.0)
    assert tr.ranks == tuple(max(1, n - 1) for n in shape)
    assert torch.allclose(multi_mode_dot(tr.core, tr.transforms), low, atol=1e-12 * fro(low))


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.2, 0.5])
@pytest.mark.parametrize("shape", AUG_SHAPES, ids=["x".join(map(str, s)) for s in AUG_SHAPES])
def test_truncate_core_rule(seed, shape, tau):
    d = len(shape)
    c = graded_core(shape)
    tr = truncate_core(c, tau)
    norm = fro(c)
    rule = []
    for i in range(d):
        s = torch.linalg.svdvals(unfold(c, i))
        assert torch.allclose(tr.singular_values[i], s, atol=1e-12)
        t = tails(s)
        rule.append(max(1, min(k for k in range(len(s) + 1) if t[k] <= tau * norm)))
    expected = enforce_multilinear_ranks(rule)
    assert tr.ranks == tuple(expected)
    assert tuple(tr.core.shape) == tr.ranks
    tail_sq = 0.0
    for i in range(d):
        s = tr.singular_values[i]
        t = tails(s)
        if expected[i] == rule[i]:
            assert t[tr.ranks[i]] <= tau * norm + 1e-12
            if tr.ranks[i] > 1:
                assert t[tr.ranks[i] - 1] > tau * norm
        tail_sq += float(t[tr.ranks[i]]) ** 2
        p = tr.transforms[i]
        assert p.shape == (shape[i], tr.ranks[i])
        assert torch.allclose(p.T @ p, torch.eye(tr.ranks[i]), atol=1e-12)
    back = multi_mode_dot(tr.core, tr.transforms)
    err = fro(c, back)
    assert torch.allclose(tr.error, err, atol=1e-12)
    assert err <= math.sqrt(tail_sq) + 1e-12
    if expected == rule:
        assert math.sqrt(tail_sq) <= math.sqrt(d) * tau * norm + 1e-12
    # the truncated core is the projection of c: C' = C x_i P_i^T
    assert torch.allclose(tr.core, multi_mode_dot(c, tr.transforms, transpose=True), atol=1e-12)


def test_truncate_core_bounds_and_fixed_modes(seed):
    c = graded_core((6, 6, 3, 3))
    # huge tau: rmin
    tr = truncate_core(c, 10.0, rmin=[3, 2, 2, 1])
    assert tr.ranks == (3, 2, 2, 1)
    # tau = 0: rmax
    tr = truncate_core(c, 0.0, rmax=[4, 5, None, 2])
    assert tr.ranks == (4, 5, 3, 2)
    tr = truncate_core(c, 0.0, rmax=2)
    assert tr.ranks == (2, 2, 2, 2)
    # non-adaptive spatial modes: keep fixed_ranks whatever tau; adaptive modes follow the rule
    tr = truncate_core(c, 0.1, adaptive=[True, True, False, False], fixed_ranks=[0, 0, 3, 2])
    assert tr.ranks[2:] == (3, 2)
    assert tr.transforms[2].shape == (3, 3) and torch.allclose(tr.transforms[2], torch.eye(3))
    assert tr.transforms[3].shape == (3, 2)
    assert torch.allclose(tr.transforms[3].T @ tr.transforms[3], torch.eye(2), atol=1e-12)
    assert tr.singular_values[2] is None  # nothing cut in mode 2: SVD skipped
    ref = truncate_core(c, 0.1)
    assert tr.ranks[:2] == ref.ranks[:2]
    assert torch.allclose(multi_mode_dot(tr.core, tr.transforms), multi_mode_dot(c, [t @ t.T for t in tr.transforms]))
    # when the adaptive modes fall to rank 1, the fixed modes must give way (multilinear constraint)
    tr = truncate_core(c, 10.0, adaptive=[True, True, False, False], fixed_ranks=[0, 0, 3, 2])
    assert tr.ranks == (1, 1, 2, 2)
    # non-adaptive without fixed_ranks keeps the augmented size
    tr = truncate_core(c, 0.05, adaptive=[False, True, True, False])
    assert tr.ranks[0] == 6 and tr.ranks[3] == 3
    assert tr.ranks[1:3] == truncate_core(c, 0.05).ranks[1:3]
    with pytest.raises(ValueError, match="tau"):
        truncate_core(c, -0.1)


def test_truncate_core_multilinear_constraint_wins_over_rmin(seed):
    # a core of multilinear rank (1, 1, 1) padded: rmin = 3 on mode 0 cannot be honoured
    c = torch.zeros(4, 3, 3)
    c[0, 0, 0] = 2.0
    c = c + 1e-3 * torch.randn(4, 3, 3)
    tr = truncate_core(c, 0.5, rmin=[3, 1, 1])
    assert tr.ranks == (1, 1, 1)
    assert torch.isfinite(tr.core).all()


def test_enforce_multilinear_ranks():
    assert enforce_multilinear_ranks([5, 1, 1]) == [1, 1, 1]
    assert enforce_multilinear_ranks([4, 2, 3]) == [4, 2, 3]
    assert enforce_multilinear_ranks([4, 2, 1]) == [2, 2, 1]
    assert enforce_multilinear_ranks([3, 2]) == [2, 2]
    assert enforce_multilinear_ranks([7, 2, 3, 1]) == [6, 2, 3, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        d = int(torch.randint(2, 6, (1,), generator=g))
        r = torch.randint(1, 9, (d,), generator=g).tolist()
        out = enforce_multilinear_ranks(r)
        assert all(o <= ri for o, ri in zip(out, r))
        assert all(o >= 1 for o in out)
        assert all(o <= math.prod(out[:i] + out[i + 1 :]) for i, o in enumerate(out))
        assert enforce_multilinear_ranks(out) == out
