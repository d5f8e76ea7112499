"""FixedRankTucker through geoopt's generic manifold suite (the style of geoopt's
tests/test_manifold_basic.py), plus what that suite does not check: batches against the per-slice
loop, torch.vmap, egrad2rgrad against a dense projection, and geoopt's optimizers on a bank of
Tucker tensors held in one batched ManifoldParameter.

As in geoopt: float64, seeds 1-5, each case plain and wrapped in ``geoopt.Scaled(manifold, 2)``, and
a case is ``UnaryCase(shape, x, ex, v, ev, manifold)``: a point ``x``, a pre-image ``ex`` that
``projx`` maps onto ``x``, a tangent vector ``v`` and a pre-image ``ev`` that ``proju`` maps onto
``v``. Points are compared through ``to_dense``: packed coordinates are unique only up to the gauge
``O(r_1) x ... x O(r_d)`` (tangent coordinates at a fixed point are unique, so those are compared
packed as well).
"""
import collections
import math

import geoopt
import pytest
import torch

from tucker_manifold import FixedRankTucker
from tucker_manifold.tucker import mode_dot

SPECS = [((5, 4), (2, 2)), ((6, 5, 4), (3, 2, 2)), ((4, 3, 3, 2), (2, 2, 2, 1))]
UnaryCase = collections.namedtuple("UnaryCase", "shape,x,ex,v,ev,manifold")


@pytest.fixture(autouse=True, params=[1, 2, 3, 4, 5])
def seed(request):
    torch.manual_seed(request.param)
    return request.param


@pytest.fixture(autouse=True)
def use_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def base_of(manifold):
    return manifold.base if isinstance(manifold, geoopt.Scaled) else manifold


def well_conditioned(r):
    """A random invertible ``r x r`` matrix with singular values in [0.5, 2] (not triangular, so
    it moves the packed coordinates off the QR gauge)."""
    q1 = torch.linalg.qr(torch.randn(r, r)).Q
    q2 = torch.linalg.qr(torch.randn(r, r)).Q
    return q1 @ torch.diag(0.5 + 1.5 * torch.rand(r)) @ q2


def pre_image(m, x):
    """Same tensor as ``x`` with non-orthonormal factors: ``C x_i R_i^{-1}``, ``U_i R_i``."""
    core, factors = m.unpack(x)
    rs = [well_conditioned(r) for r in m.ranks]
    for i, r in enumerate(rs):
        core = mode_dot(core, torch.linalg.inv(r), i)
    return m.pack(core, [f @ r for f, r in zip(factors, rs)])


def tucker_case(shape, ranks, scaled):
    m = FixedRankTucker(shape, ranks)
    x = m.random()
    ex = pre_image(m, x)
    ev = torch.randn(m.packed_size)  # factor coordinates, gauge not fixed
    # v: the gauge coordinates of the same ambient tangent tensor, by the dense projection route
    # (independent of proju's formula: the projection of a tangent tensor is the tensor itself).
    v = m.proj_dense(x, m.tangent_to_dense(x, ev))
    manifold = geoopt.Scaled(m, 2) if scaled else m
    x = geoopt.ManifoldTensor(x, manifold=manifold)
    return UnaryCase((m.packed_size,), x, ex, v, ev, manifold)


CASE_PARAMS = [(s, r, sc) for s, r in SPECS for sc in (False, True)]
CASE_IDS = ["x".join(map(str, s)) + ("-Scaled" if sc else "-NotScaled") for s, _, sc in CASE_PARAMS]


@pytest.fixture(params=CASE_PARAMS, ids=CASE_IDS)
def unary_case(request, seed):
    return tucker_case(*request.param)


def assert_close(a, b, atol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= atol, err


def dense(manifold, x):
    return base_of(manifold).to_dense(x)


def dense_tangent(manifold, x, u):
    return base_of(manifold).tangent_to_dense(x, u)


# ---------------------------------------------------------------- geoopt's generic axioms
def test_projection_identity(unary_case):
    M, x = unary_case.manifold, unary_case.x
    px = M.projx(x)
    M.assert_check_point_on_manifold(px)
    assert_close(dense(M, px), dense(M, x), 1e-12)


def test_projection_via_assert(unary_case):
    M, ex = unary_case.manifold, unary_case.ex
    # the pre-image is not a point (factors not orthonormal) and the check says so ...
    with pytest.raises(ValueError, match="not orthonormal"):
        M.assert_check_point_on_manifold(ex)
    px = M.projx(ex)
    M.assert_check_point_on_manifold(px)
    # ... and projx maps it onto x: the same tensor, in other packed coordinates
    assert_close(dense(M, px), dense(M, unary_case.x), 1e-11)
    assert (px - unary_case.x).abs().max() > 1e-3


def test_vector_projection_via_assert(unary_case):
    M, x, ev, v = unary_case.manifold, unary_case.x, unary_case.ev, unary_case.v
    with pytest.raises(ValueError, match="gauge"):
        M.assert_check_vector_on_tangent(x, ev)
    pv = M.proju(x, ev)
    M.assert_check_vector_on_tangent(x, pv)
    assert_close(pv, v, 1e-11)
    assert_close(dense_tangent(M, x, pv), dense_tangent(M, x, ev), 1e-11)


def test_broadcast_projx(unary_case):
    M = unary_case.manifold
    m = base_of(M)
    X = torch.stack([unary_case.ex] + [pre_image(m, unary_case.x) for _ in range(3)])
    pX = M.projx(X)
    assert pX.shape == X.shape
    M.assert_check_point_on_manifold(pX)
    for x, px in zip(X, pX):
        M.assert_check_point_on_manifold(px)
        pxx = M.projx(x)
        assert_close(px, pxx, 1e-12)
        assert_close(dense(M, px), dense(M, unary_case.x), 1e-11)


def test_broadcast_proju(unary_case):
    M = unary_case.manifold
    pX = torch.stack([unary_case.x] * 4)
    U = torch.stack([unary_case.ev] + [torch.randn(unary_case.shape) for _ in range(3)])
    pU = M.proju(pX, U)
    M.assert_check_vector_on_tangent(pX, pU)
    for px, u, pu in zip(pX, U, pU):
        M.assert_check_vector_on_tangent(px, pu)
        assert_close(pu, M.proju(px, u), 1e-12)
    assert_close(pU[0], unary_case.v, 1e-11)


def test_broadcast_retr(unary_case):
    M = unary_case.manifold
    pX = torch.stack([unary_case.x] * 4)
    U = torch.stack([unary_case.v] + [torch.randn(unary_case.shape) for _ in range(3)])
    pU = M.proju(pX, U)
    Y = M.retr(pX, pU)
    M.assert_check_point_on_manifold(Y)
    for px, pu, y in zip(pX, pU, Y):
        M.assert_check_point_on_manifold(y)
        yy = M.retr(px, pu)
        assert_close(dense(M, y), dense(M, yy), 1e-11)


def test_broadcast_transp(unary_case):
    M = unary_case.manifold
    pX = torch.stack([unary_case.x] * 4)
    U = torch.stack([unary_case.v] * 4)
    V = torch.randn(4, *unary_case.shape)
    pU = M.proju(pX, U)
    pV = M.proju(pX, V)
    Y = M.retr(pX, pU)
    Q = M.transp_follow_retr(pX, pU, pV)
    M.assert_check_vector_on_tangent(Y, Q)
    for px, pu, pv, y, q in zip(pX, pU, pV, Y, Q):
        M.assert_check_vector_on_tangent(y, q)
        qq = M.transp_follow_retr(px, pu, pv)
        yy = M.retr(px, pu)
        assert_close(dense_tangent(M, y, q), dense_tangent(M, yy, qq), 1e-10)


def test_broadcast_mixed_batch_shapes(unary_case):
    """Batch dimensions broadcast between arguments, as numpy does (geoopt's test_logmap relies on
    a batch of points with one tangent vector)."""
    M, x, v = unary_case.manifold, unary_case.x, unary_case.v
    U = M.proju(x, torch.randn(3, *unary_case.shape))  # one point, three vectors
    assert U.shape == (3,) + unary_case.shape
    X = torch.stack([x, M.projx(M.retr(x, 0.1 * v))]).unsqueeze(1)  # (2, 1, P)
    Y = M.retr(X, U)  # (2, 1, P) with (3, P) -> (2, 3, P)
    assert Y.shape == (2, 3) + unary_case.shape
    for i in range(2):
        for j in range(3):
            assert_close(dense(M, Y[i, j]), dense(M, M.retr(X[i, 0], U[j])), 1e-11)
    ip = M.inner(X, M.proju(X, U), keepdim=True)
    assert ip.shape == (2, 3, 1)
    with pytest.raises(ValueError, match="broadcast"):
        M.proju(torch.stack([x] * 2), torch.stack([v] * 3))


def test_reversibility_flag(unary_case):
    # geoopt's test_reversibility only applies to reversible manifolds; the HOSVD retraction is not one
    assert unary_case.manifold.reversible is False


def test_logmap_and_dist_not_implemented(unary_case):
    """The decision (class docstring): no closed-form geodesics, so logmap / dist / dist2 raise
    NotImplementedError with the reason, which is geoopt's convention (its suite skips them)."""
    M = unary_case.manifold
    pX = torch.stack([unary_case.x] * 4)
    U = M.proju(pX, torch.randn(*unary_case.shape))
    Y = M.expmap(pX, U)
    with pytest.raises(NotImplementedError, match="no closed-form geodesics"):
        M.logmap(pX, Y)
    with pytest.raises(NotImplementedError, match="geodesic distance"):
        M.dist(pX, Y)
    with pytest.raises(NotImplementedError, match="geodesic distance"):
        M.dist2(pX, Y)
    # expmap is the retraction (documented), batched like it
    assert_close(dense(M, Y), dense(M, M.retr(pX, U)), 1e-12)


# ---------------------------------------------------------------- beyond geoopt's suite
def dense_tangent_projector(m, x):
    """Orthogonal projector (N, N) onto T_x from the Jacobian of (C, U) -> C x U at x (autograd,
    independent of the library's projection formulas)."""
    jac = torch.autograd.functional.jacobian(lambda p: m.to_dense(p).reshape(-1), x)
    u, s, _ = torch.linalg.svd(jac, full_matrices=False)
    q = u[:, : int((s > s[0] * 1e-10).sum())]
    assert q.shape[1] == m.dim
    return q @ q.T


def test_egrad2rgrad_against_dense_projection(unary_case):
    """egrad2rgrad of the packed autograd gradient of L(to_dense(x)) is the orthogonal projection
    of the dense gradient dL/dW onto T_x, for a batch of points (geoopt's suite never checks it)."""
    M = unary_case.manifold
    m = base_of(M)
    X = torch.stack([unary_case.x, M.retr(unary_case.x, unary_case.v), m.random()])
    A = torch.randn(3, *m.shape)
    Xr = X.clone().requires_grad_(True)
    W = m.to_dense(Xr)
    loss = (A * W).sum() + 0.25 * (W**4).sum()  # not quadratic: dL/dW depends on W
    loss.backward()
    dL_dW = (A + W**3).detach()
    R = M.egrad2rgrad(X, Xr.grad)
    assert R.shape == X.shape
    M.assert_check_vector_on_tangent(X, R)
    projs = []
    for x, r, g in zip(X, R, dL_dW):
        proj = (dense_tangent_projector(m, x) @ g.reshape(-1)).reshape(m.shape)
        assert_close(m.tangent_to_dense(x, r), proj, 1e-9 * proj.abs().max().item())
        projs.append(proj)
    # the check catches a wrong rgrad: proju of the packed gradient (no inverse core Gram) is off
    wrong = m.tangent_to_dense(X[0], m.proju(X[0], Xr.grad[0]))
    assert (wrong - projs[0]).abs().max() > 1e-3 * projs[0].abs().max()


def loop2(f, *args):
    """Apply ``f`` to each (i, j) slice of (2, 3, ...) arguments and stack the results."""
    return torch.stack([torch.stack([f(*(a[i, j] for a in args)) for j in range(3)]) for i in range(2)])


def test_every_batched_method_equals_the_loop(unary_case):
    M = unary_case.manifold
    m = base_of(M)
    P = m.packed_size
    X = m.random(2, 3, P)
    assert X.shape == (2, 3, P) and m.check_point_on_manifold(X)
    assert all(m.check_point_on_manifold(X[i, j]) for i in range(2) for j in range(3))
    E = torch.randn(2, 3, P)
    U = M.proju(X, E)
    V = M.proju(X, torch.randn(2, 3, P))
    Y = M.retr(X, 0.3 * U)
    Z = torch.randn(2, 3, *m.shape)
    exact_or_tangent = [
        ("proju", M.proju, (X, E)),
        ("egrad2rgrad", M.egrad2rgrad, (X, E)),
        ("inner", M.inner, (X, U, V)),
        ("norm", M.norm, (X, U)),
        ("component_inner", M.component_inner, (X, U)),
        ("transp", M.transp, (X, Y, V)),
        ("projx", M.projx, (X,)),
        ("to_dense", m.to_dense, (X,)),
        ("tangent_to_dense", m.tangent_to_dense, (X, U)),
        ("proj_dense", m.proj_dense, (X, Z)),
    ]
    for name, f, args in exact_or_tangent:
        out = f(*args)
        ref = loop2(f, *args)
        assert_close(out, ref, 1e-11 * max(1.0, ref.abs().max().item()))
    points = [
        ("retr", M.retr, (X, U)),
        ("expmap", M.expmap, (X, U)),
        ("from_dense", m.from_dense, (Z,)),
    ]
    for name, f, args in points:
        out = f(*args)
        assert_close(m.to_dense(out), loop2(lambda *a: m.to_dense(f(*a)), *args), 1e-11)
    # transports whose base point is computed inside: compare the ambient tangent tensors
    Q = M.transp_follow_retr(X, U, V)
    Y2, Q2 = M.retr_transp(X, U, V)
    ref = loop2(lambda x, u, v: m.tangent_to_dense(M.retr(x, u), M.transp_follow_retr(x, u, v)), X, U, V)
    assert_close(m.tangent_to_dense(M.retr(X, U), Q), ref, 1e-10)
    assert_close(m.tangent_to_dense(Y2, Q2), ref, 1e-10)
    # pack / unpack: views of the batch, inverse of each other
    core, factors = m.unpack(X)
    assert core.shape == (2, 3) + m.ranks
    assert [tuple(f.shape) for f in factors] == [(2, 3, n, r) for n, r in zip(m.shape, m.ranks)]
    assert torch.equal(m.pack(core, factors), X)
    c11, f11 = m.unpack(X[1, 1])
    assert torch.equal(core[1, 1], c11) and all(torch.equal(a[1, 1], b) for a, b in zip(factors, f11))
    with pytest.raises(ValueError, match=r"factors\[1\]"):
        m.pack(core, [factors[0], factors[1][0]] + factors[2:])


def test_batched_checks_name_the_failing_slice(unary_case):
    M = unary_case.manifold
    m = base_of(M)
    X = m.random(2, 3, m.packed_size)
    U = m.proju(X, torch.randn(X.shape))
    assert M.check_point_on_manifold(X) and M.check_vector_on_tangent(X, U)
    bad = X.clone()
    core, factors = m.unpack(bad)
    factors[-1][1, 2] *= 2  # one slice of the batch breaks orthonormality
    ok, reason = M.check_point_on_manifold(bad, explain=True)
    assert not ok and "batch index (1, 2)" in reason and "not orthonormal" in reason
    core[0, 1] = 0  # rank-deficient core in another slice, caught after factors are fixed
    ok, reason = M.check_point_on_manifold(m.projx(bad), explain=True)
    assert not ok and "batch index (0, 1)" in reason and "rank deficient" in reason
    badu = U.clone()
    badu[1, 0] = torch.randn(m.packed_size)
    ok, reason = M.check_vector_on_tangent(X, badu, explain=True)
    assert not ok and "batch index (1, 0)" in reason and "gauge" in reason


def test_random_follows_geoopt_size_convention(unary_case):
    M = unary_case.manifold
    P = base_of(M).packed_size
    assert M.random().shape == (P,)
    assert M.random(P).shape == (P,)
    assert M.random(4, P).shape == (4, P)
    assert M.random((2, 3, P)).shape == (2, 3, P)
    X = M.random(4, P)
    M.assert_check_point_on_manifold(X)
    assert not torch.allclose(X[0], X[1])
    assert M.origin(4, P).shape == (4, P)
    with pytest.raises(ValueError, match="size"):
        M.random(4)


VMAP_METHODS = [
    ("proju", lambda M, X, U, V, Y, Z: (M.proju, (X, U))),
    ("egrad2rgrad", lambda M, X, U, V, Y, Z: (M.egrad2rgrad, (X, U))),
    ("inner", lambda M, X, U, V, Y, Z: (M.inner, (X, U, V))),
    ("norm", lambda M, X, U, V, Y, Z: (M.norm, (X, U))),
    ("retr", lambda M, X, U, V, Y, Z: (M.retr, (X, U))),
    ("expmap", lambda M, X, U, V, Y, Z: (M.expmap, (X, U))),
    ("transp", lambda M, X, U, V, Y, Z: (M.transp, (X, Y, V))),
    ("transp_follow_retr", lambda M, X, U, V, Y, Z: (M.transp_follow_retr, (X, U, V))),
    ("projx", lambda M, X, U, V, Y, Z: (M.projx, (X,))),
    ("to_dense", lambda M, X, U, V, Y, Z: (base_of(M).to_dense, (X,))),
    ("tangent_to_dense", lambda M, X, U, V, Y, Z: (base_of(M).tangent_to_dense, (X, U))),
    ("proj_dense", lambda M, X, U, V, Y, Z: (base_of(M).proj_dense, (X, Z))),
    ("pack_unpack", lambda M, X, U, V, Y, Z: (lambda x: base_of(M).pack(*base_of(M).unpack(x)), (X,))),
]


def test_vmap_over_points(unary_case):
    """torch.vmap over a batch of points gives the batched results; the methods the class
    docstring names as not vmappable fail under vmap (data-dependent branches)."""
    M = unary_case.manifold
    m = base_of(M)
    X = m.random(4, m.packed_size)
    U = m.proju(X, torch.randn(X.shape))
    V = m.proju(X, torch.randn(X.shape))
    Y = M.retr(X, 0.2 * U)
    Z = torch.randn(4, *m.shape)
    for name, make in VMAP_METHODS:
        f, args = make(M, X, U, V, Y, Z)
        out = torch.vmap(f)(*args)
        ref = f(*args)
        assert_close(out, ref, 1e-12 * max(1.0, ref.abs().max().item()))
    # one point shared by the batch (in_dims=None) against a batch of vectors
    assert_close(torch.vmap(M.proju, in_dims=(None, 0))(X[0], U), M.proju(X[0], U), 1e-12)
    with pytest.raises(RuntimeError, match="data-dependent"):
        torch.vmap(m.from_dense)(Z)
    with pytest.raises(RuntimeError, match="data-dependent"):
        torch.vmap(m.check_point_on_manifold)(X)


# ---------------------------------------------------------------- geoopt optimizers on a bank
# (optimizer, start noise (None: a random start), step cap, target relative error of every tensor).
# Near the solution momentum sets the linear rate (about sqrt(beta1) per step, whatever lr): with
# Adam's default beta1 = 0.9 one decade takes ~45 steps, with beta1 = 0.5 about 6.
BANK_OPTIMIZERS = {
    "rsgd": (lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.5, momentum=0.5), None, 150, 1e-8),
    "radam": (lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.1, betas=(0.5, 0.999)), 0.3, 200, 1e-8),
}


def bank_problem(shape, ranks, noise, bank=8):
    m = FixedRankTucker(shape, ranks)
    A = m.to_dense(m.random(bank, m.packed_size))
    if noise is None:
        x0 = m.random(bank, m.packed_size)
    else:
        scale = noise * A.flatten(1).norm(dim=1) / math.sqrt(math.prod(shape))
        x0 = m.from_dense(A + scale.view(-1, *[1] * len(shape)) * torch.randn(A.shape))
    return m, A, x0


def bank_step(opt, p, A):
    opt.zero_grad()
    loss = 0.5 * ((p.manifold.to_dense(p) - A) ** 2).sum()
    loss.backward()
    opt.step()
    return loss.item()


def rel_errors(m, p, A):
    return ((m.to_dense(p.detach()) - A).flatten(1).norm(dim=1) / A.flatten(1).norm(dim=1))


@pytest.mark.parametrize("name", list(BANK_OPTIMIZERS))
@pytest.mark.parametrize("shape, ranks", SPECS[1:], ids=["6x5x4", "4x3x3x2"])
def test_geoopt_optimizers_fit_a_bank_of_8(name, shape, ranks, seed):
    make, noise, steps, target = BANK_OPTIMIZERS[name]
    m, A, x0 = bank_problem(shape, ranks, noise)
    p = geoopt.ManifoldParameter(x0.clone(), manifold=m)
    opt = make([p])
    first = bank_step(opt, p, A)
    for _ in range(steps):
        last = bank_step(opt, p, A)
        if rel_errors(m, p, A).max() < target:
            break
    rel = rel_errors(m, p, A)
    assert rel.shape == (8,)
    assert rel.max() < target, (name, rel)
    assert last < first
    assert m.check_point_on_manifold(p.detach())


@pytest.mark.parametrize("name", list(BANK_OPTIMIZERS))
def test_bank_steps_equal_separate_parameters(name, seed):
    """A batched parameter is 8 independent problems: the same iterates as 8 parameters of one
    point each (RiemannianAdam's second moment is per point: component_inner is (..., 1))."""
    make, noise, _, _ = BANK_OPTIMIZERS[name]
    m, A, x0 = bank_problem((6, 5, 4), (3, 2, 2), noise)
    bank = geoopt.ManifoldParameter(x0.clone(), manifold=m)
    singles = [geoopt.ManifoldParameter(x0[k].clone(), manifold=m) for k in range(8)]
    opt_bank, opt_singles = make([bank]), make(singles)
    for _ in range(6):
        bank_step(opt_bank, bank, A)
        opt_singles.zero_grad()
        sum(0.5 * ((m.to_dense(s) - a) ** 2).sum() for s, a in zip(singles, A)).backward()
        opt_singles.step()
    stacked = torch.stack([s.detach() for s in singles])
    assert_close(m.to_dense(bank.detach()), m.to_dense(stacked), 1e-10)


@pytest.mark.parametrize("seed", [1])  # one run: the example seeds itself
def test_example_geoopt_batched(seed, tmp_path, monkeypatch, capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "geoopt_batched.py"
    spec = importlib.util.spec_from_file_location("geoopt_batched", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    out = mod.main(["--steps", "80", "--print-every", "40"])
    # measured at 80 steps, seed 0: max relative error 4.5e-10 (from 1.45 at the random starts)
    assert len(out["final_rel_errors"]) == 8
    assert min(out["initial_rel_errors"]) > 0.5
    assert max(out["final_rel_errors"]) < 1e-8
    assert out["on_manifold"]
    assert "relative errors per tensor" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # writes nothing
    assert torch.get_num_threads() == threads
