"""FixedRankTucker: the geometry against dense references on small shapes, geoopt integration."""
import copy
import io
import math

import geoopt
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from tucker_manifold import FixedRankTucker
from tucker_manifold.tucker import reconstruct, unfold

from cases import CASE_IDS, CASES

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture
def manifold(case):
    return FixedRankTucker(*case)


def fro(a, b=None):
    return torch.linalg.vector_norm(a if b is None else a - b)


def dense_projector(m, x):
    """Orthonormal basis (N, dim) of T_x: the column space of the Jacobian of the parametrization
    (C, U_1..U_d) -> C x U at x, built by autograd (independent of the library's projection)."""
    jac = torch.autograd.functional.jacobian(lambda p: m.to_dense(p).reshape(-1), x)
    u, s, _ = torch.linalg.svd(jac, full_matrices=False)
    rank = int((s > s[0] * 1e-10).sum())
    return u[:, :rank], rank


def multilinear_rank(t, rtol=1e-9):
    out = []
    for i in range(t.ndim):
        s = torch.linalg.svdvals(unfold(t, i))
        out.append(int((s > rtol * s[0]).sum()))
    return tuple(out)


# ---------------------------------------------------------------- layout, points
def test_pack_unpack_roundtrip(manifold):
    m = manifold
    x = m.random()
    assert x.shape == (m.packed_size,)
    assert m.packed_size == math.prod(m.ranks) + sum(n * r for n, r in zip(m.shape, m.ranks))
    core, factors = m.unpack(x)
    assert core.shape == m.ranks
    assert [tuple(f.shape) for f in factors] == list(zip(m.shape, m.ranks))
    assert torch.equal(m.pack(core, factors), x)
    y = torch.randn(m.packed_size)
    assert torch.equal(m.pack(*m.unpack(y)), y)
    # unpack returns views: writing through them writes x
    core[(0,) * m.order] = 42.0
    assert x[0] == 42.0
    with pytest.raises(ValueError, match="core"):
        m.pack(core[..., :1], factors)
    with pytest.raises(ValueError, match="factors"):
        m.pack(core, factors[:-1])
    with pytest.raises(ValueError, match=r"factors\[0\]"):
        m.pack(core, [factors[0][:-1]] + factors[1:])


def test_from_dense_to_dense_roundtrip(manifold):
    m = manifold
    core = torch.randn(m.ranks)
    factors = [torch.randn(n, r) for n, r in zip(m.shape, m.ranks)]  # not orthonormal
    t = reconstruct(core, factors)
    x = m.from_dense(t)
    assert m.check_point_on_manifold(x)
    assert torch.allclose(m.to_dense(x), t, atol=1e-10 * fro(t))
    # and the other way around
    x2 = m.random()
    assert torch.allclose(m.to_dense(m.from_dense(m.to_dense(x2))), m.to_dense(x2), atol=1e-11)


def test_random_on_manifold(manifold):
    m = manifold
    x = m.random()
    ok, reason = m.check_point_on_manifold(x, explain=True)
    assert ok, reason
    assert multilinear_rank(m.to_dense(x)) == m.ranks
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(m.random(generator=g1), m.random(generator=g2))
    assert m.random(m.packed_size).shape == (m.packed_size,)
    # geoopt's random(*size): size is the output shape, leading dimensions are a batch
    assert m.random(3, m.packed_size).shape == (3, m.packed_size)
    assert m.random((2, 3, m.packed_size)).shape == (2, 3, m.packed_size)
    for bad in [(3,), (3, m.packed_size + 1), (m.packed_size, 3)]:
        with pytest.raises(ValueError, match="size"):
            m.random(*bad)
    assert m.random(dtype=torch.float32).dtype == torch.float32
    u = m.random_tangent(x)
    assert m.check_vector_on_tangent(x, u)


def test_dim_formula_and_jacobian_rank(manifold):
    m = manifold
    expected = math.prod(m.ranks) + sum(n * r - r * r for n, r in zip(m.shape, m.ranks))
    assert m.dim == expected
    _, rank = dense_projector(m, m.random())
    assert rank == m.dim


# ---------------------------------------------------------------- projections
def test_proj_dense_matches_jacobian_projector(manifold):
    """The key independent check: P(X) Z from the library equals Q Q^T vec(Z), Q an orthonormal basis
    of the range of the Jacobian of the Tucker parametrization."""
    m = manifold
    x = m.random()
    q, rank = dense_projector(m, x)
    assert rank == m.dim
    for _ in range(2):
        z = torch.randn(m.shape)
        pz = m.tangent_to_dense(x, m.proj_dense(x, z))
        ref = (q @ (q.T @ z.reshape(-1))).reshape(m.shape)
        assert torch.allclose(pz, ref, atol=1e-10 * fro(z)), fro(pz, ref)


def test_proj_dense_is_orthogonal_projection(manifold):
    m = manifold
    x = m.random()
    z = torch.randn(m.shape)
    u = m.proj_dense(x, z)
    assert m.check_vector_on_tangent(x, u)
    pz = m.tangent_to_dense(x, u)
    # idempotent
    u2 = m.proj_dense(x, pz)
    assert torch.allclose(u2, u, atol=1e-10)
    assert torch.allclose(m.tangent_to_dense(x, u2), pz, atol=1e-10)
    # residual orthogonal to tangent vectors
    for _ in range(3):
        xi = m.tangent_to_dense(x, m.random_tangent(x))
        assert abs(((z - pz) * xi).sum()) < 1e-10 * fro(z) * fro(xi)
        # closest point of the tangent space
        assert fro(z, pz) <= fro(z, xi) + 1e-12
        assert fro(z, pz) <= fro(z, pz + 0.01 * xi) + 1e-12
    # projection of a tangent tensor is itself
    xi = m.tangent_to_dense(x, m.random_tangent(x))
    assert torch.allclose(m.tangent_to_dense(x, m.proj_dense(x, xi)), xi, atol=1e-10)
    # linear
    z2 = torch.randn(m.shape)
    assert torch.allclose(m.proj_dense(x, 2 * z - 3 * z2), 2 * u - 3 * m.proj_dense(x, z2), atol=1e-10)


def test_proju(manifold):
    m = manifold
    x = m.random()
    core, factors = m.unpack(x)
    u = m.random_tangent(x)
    assert torch.allclose(m.proju(x, u), u, atol=1e-12)
    w = torch.randn(m.packed_size)  # arbitrary factor coordinates, gauge violated
    assert not m.check_vector_on_tangent(x, w)
    pw = m.proju(x, w)
    assert torch.allclose(m.tangent_to_dense(x, pw), m.tangent_to_dense(x, w), atol=1e-10)
    _, dfactors = m.unpack(pw)
    for f, df in zip(factors, dfactors):
        assert torch.allclose(f.T @ df, torch.zeros(f.shape[1], f.shape[1]), atol=1e-12)
    assert m.check_vector_on_tangent(x, pw)
    assert torch.allclose(m.proju(x, pw), pw, atol=1e-12)


def test_inner_and_norm(manifold):
    m = manifold
    x = m.random()
    u, v = m.random_tangent(x), m.random_tangent(x)
    du, dv = m.tangent_to_dense(x, u), m.tangent_to_dense(x, v)
    assert torch.allclose(m.inner(x, u, v), (du * dv).sum(), atol=1e-10)
    assert torch.allclose(m.inner(x, u), (du * du).sum(), atol=1e-10)
    assert m.inner(x, u, v, keepdim=True).shape == (1,)
    assert torch.allclose(m.component_inner(x, u, v), (du * dv).sum().reshape(1), atol=1e-10)
    assert torch.allclose(m.norm(x, u), fro(du), atol=1e-10)
    assert torch.allclose(m.inner(x, u, v), m.inner(x, v, u), atol=1e-12)


@pytest.mark.parametrize("loss_kind", ["linear_quadratic", "cubic"])
def test_egrad2rgrad_equals_projected_dense_gradient(manifold, loss_kind):
    m = manifold
    x = m.random().requires_grad_(True)
    z = torch.randn(m.shape)

    def loss(w):
        out = (w * z).sum() + 0.5 * (w**2).sum()
        if loss_kind == "cubic":
            out = out + (w**3).sum() / 3
        return out

    w = m.to_dense(x)
    (g,) = torch.autograd.grad(loss(w), x)
    wd = w.detach()
    dense_grad = z + wd + (wd**2 if loss_kind == "cubic" else 0)
    x = x.detach()
    rg = m.egrad2rgrad(x, g)
    ref = m.proj_dense(x, dense_grad)
    assert m.check_vector_on_tangent(x, rg)
    assert torch.allclose(rg, ref, atol=1e-9), fro(rg, ref)
    assert torch.allclose(m.tangent_to_dense(x, rg), m.tangent_to_dense(x, ref), atol=1e-9)
    # Riemannian gradient inner product = directional derivative
    xi = m.random_tangent(x)
    assert torch.allclose(m.inner(x, rg, xi), (dense_grad * m.tangent_to_dense(x, xi)).sum(), atol=1e-9)


# ---------------------------------------------------------------- retraction
def test_retr_zero_and_on_manifold(manifold):
    m = manifold
    x = m.random()
    y0 = m.retr(x, torch.zeros_like(x))
    assert torch.allclose(m.to_dense(y0), m.to_dense(x), atol=1e-11)
    u = m.random_tangent(x)
    y = m.retr(x, u)
    ok, reason = m.check_point_on_manifold(y, explain=True)
    assert ok, reason
    assert multilinear_rank(m.to_dense(y)) == m.ranks


def test_retr_second_order(manifold):
    m = manifold
    x = m.random()
    xd = m.to_dense(x)
    u = m.random_tangent(x)
    u = u / m.norm(x, u)
    xi = m.tangent_to_dense(x, u)
    ts = np.logspace(-1, -4, 7)
    errs = np.array([fro(m.to_dense(m.retr(x, t * u)), xd + t * xi).item() for t in ts])
    ratios = errs / ts**2
    assert errs[-1] < 1e-6
    slope = np.polyfit(np.log(ts), np.log(errs), 1)[0]
    assert abs(slope - 2) < 0.3, (slope, errs)
    # the ratio settles: last ratios agree
    assert np.isclose(ratios[-1], ratios[-2], rtol=0.1), ratios


def test_retr_of_non_gauge_vector(manifold):
    m = manifold
    x = m.random()
    w = 0.3 * torch.randn(m.packed_size)
    y1, y2 = m.retr(x, w), m.retr(x, m.proju(x, w))
    assert torch.allclose(m.to_dense(y1), m.to_dense(y2), atol=1e-10)
    assert m.check_point_on_manifold(y1)


def test_expmap_is_retr(manifold):
    m = manifold
    x = m.random()
    u = m.random_tangent(x)
    assert torch.allclose(m.to_dense(m.expmap(x, u)), m.to_dense(m.retr(x, u)), atol=1e-12)


# ---------------------------------------------------------------- transport
def test_transp(manifold):
    m = manifold
    x = m.random()
    y = m.retr(x, 0.5 * m.random_tangent(x))
    v = m.random_tangent(x)
    tv = m.transp(x, y, v)
    ok, reason = m.check_vector_on_tangent(y, tv, explain=True)
    assert ok, reason
    ref = m.proj_dense(y, m.tangent_to_dense(x, v))
    assert torch.allclose(tv, ref, atol=1e-10)
    # transport to the same point: identity
    assert torch.allclose(m.transp(x, x, v), v, atol=1e-10)
    # transport to an unrelated point
    z = m.random()
    assert torch.allclose(m.transp(x, z, v), m.proj_dense(z, m.tangent_to_dense(x, v)), atol=1e-10)


def test_retr_transp_consistent(manifold):
    m = manifold
    x = m.random()
    u, v = m.random_tangent(x), m.random_tangent(x)
    y, tv = m.retr_transp(x, u, v)
    y_ref = m.retr(x, u)
    assert torch.allclose(y, y_ref, atol=1e-12)
    assert torch.allclose(tv, m.transp(x, y_ref, v), atol=1e-12)
    # geoopt's default combinations
    y2, tv2 = m.expmap_transp(x, u, v)
    assert torch.allclose(m.to_dense(y2), m.to_dense(y), atol=1e-12)
    assert torch.allclose(tv2, tv, atol=1e-12)


# ---------------------------------------------------------------- projx
def test_projx(manifold):
    m = manifold
    x = m.random()
    px = m.projx(x)
    assert torch.allclose(m.to_dense(px), m.to_dense(x), atol=1e-11)
    assert torch.allclose(m.projx(px), px, atol=1e-12)
    core, factors = m.unpack(x)
    bad = m.pack(core, [f + 0.1 * torch.randn_like(f) for f in factors])
    ok, reason = m.check_point_on_manifold(bad, explain=True)
    assert not ok and "not orthonormal" in reason
    fixed = m.projx(bad)
    assert m.check_point_on_manifold(fixed)
    assert torch.allclose(m.to_dense(fixed), m.to_dense(bad), atol=1e-10)
    assert torch.allclose(m.projx(fixed), fixed, atol=1e-12)


# ---------------------------------------------------------------- checks and errors
def test_check_messages():
    m = FixedRankTucker((5, 4, 3), (2, 3, 2))
    x = m.random()
    core, factors = m.unpack(x)
    ok, reason = m.check_point_on_manifold(x, explain=True)
    assert ok and reason is None
    bad = m.pack(core, [factors[0], 2 * factors[1], factors[2]])
    ok, reason = m.check_point_on_manifold(bad, explain=True)
    assert not ok and "factor 1 is not orthonormal" in reason
    c2 = core.clone()
    c2[:, 2, :] = 0  # mode-1 unfolding loses rank
    ok, reason = m.check_point_on_manifold(m.pack(c2, factors), explain=True)
    assert not ok and "core unfolding 1 is rank deficient" in reason
    ok, reason = m.check_point_on_manifold(x[:-1], explain=True)
    assert not ok and "packed tensor of length" in reason and str(m.packed_size) in reason
    nan = x.clone()
    nan[0] = float("nan")
    ok, reason = m.check_point_on_manifold(nan, explain=True)
    assert not ok and "non-finite" in reason
    u = torch.randn(m.packed_size)
    ok, reason = m.check_vector_on_tangent(x, u, explain=True)
    assert not ok and "gauge violated" in reason
    ok, reason = m.check_vector_on_tangent(x, u[:-1], explain=True)
    assert not ok and "`u`" in reason
    with pytest.raises(ValueError, match="not orthonormal"):
        m.assert_check_point_on_manifold(bad)
    with pytest.raises(ValueError, match="gauge"):
        m.assert_check_vector_on_tangent(x, u)


@pytest.mark.parametrize(
    "shape, ranks, match",
    [
        ((5, 4, 3), (6, 2, 2), r"ranks\[0\] = 6"),
        ((5, 4, 3), (5, 2, 2), "product of the other ranks"),
        ((5, 4), (2, 3), "product of the other ranks"),
        ((5,), (2,), "at least 2 modes"),
        ((5, 4, 3), (2, 2), "one entry per mode"),
        ((5, 4, 3), (2, 0, 2), r"ranks\[1\] = 0"),
        ((5, 0, 3), (2, 1, 2), "shape"),
        (5, (2,), "shape"),
        ((5, 4, 3), 2, "ranks"),
        ((5.5, 4, 3), (2, 2, 2), "shape"),
        ((5, 4, 3), (2.0, 2, 2), "ranks"),
        (("a", 4), (2, 2), "shape"),
    ],
)
def test_constructor_errors(shape, ranks, match):
    with pytest.raises(ValueError, match=match):
        FixedRankTucker(shape, ranks)


def test_constructor_accepts_int_likes():
    m = FixedRankTucker(torch.Size([5, 4, 3]), [np.int64(2), torch.tensor(2), 2])
    assert m.shape == (5, 4, 3) and m.ranks == (2, 2, 2)
    assert all(type(v) is int for v in m.shape + m.ranks)


def test_method_argument_errors():
    m = FixedRankTucker((5, 4, 3), (2, 3, 2))
    x = m.random()
    u = m.random_tangent(x)
    short = x[:-1]
    for call, name in [
        (lambda: m.proju(short, u), "`x`"),
        (lambda: m.proju(x, short), "`u`"),
        (lambda: m.egrad2rgrad(x, short), "`u`"),
        (lambda: m.egrad2rgrad(short, u), "`x`"),
        (lambda: m.inner(x, u, short), "`v`"),
        (lambda: m.inner(x, short), "`u`"),
        (lambda: m.retr(x, short), "`u`"),
        (lambda: m.retr(short, u), "`x`"),
        (lambda: m.transp(x, short, u), "`y`"),
        (lambda: m.transp(x, x, short), "`v`"),
        (lambda: m.tangent_to_dense(x, short), "`u`"),
        (lambda: m.to_dense(short), "`x`"),
        (lambda: m.projx(short), "`x`"),
        (lambda: m.unpack(x.reshape(-1, 1)), "`x`"),
        (lambda: m.unpack(x[0]), "`x`"),
        (lambda: m.proju(x.expand(2, -1), u.expand(3, -1)), "`x`.*`u`"),
        (lambda: m.proj_dense(x.expand(2, -1), torch.randn(3, 5, 4, 3)), "`x`.*`z`"),
        (lambda: m.proj_dense(x, torch.randn(5, 4)), "z"),
    ]:
        with pytest.raises(ValueError, match=name):
            call()


def test_from_dense_errors():
    m = FixedRankTucker((5, 4, 3), (2, 3, 2))
    t = torch.randn(5, 4, 3)
    with pytest.raises(ValueError, match="shape"):
        m.from_dense(t[:, :, :2])
    for bad_value in [float("nan"), float("inf")]:
        bad = t.clone()
        bad[1, 2, 0] = bad_value
        with pytest.raises(ValueError, match="non-finite"):
            m.from_dense(bad)


# ---------------------------------------------------------------- dtypes, wrappers, parameters
@pytest.mark.parametrize("case", CASES[1:4], ids=CASE_IDS[1:4])
def test_float32(case):
    m = FixedRankTucker(*case)
    x = m.random(dtype=torch.float32)
    assert x.dtype == torch.float32
    assert m.check_point_on_manifold(x)
    x64 = x.double()
    u = m.random_tangent(x)
    assert u.dtype == torch.float32 and m.check_vector_on_tangent(x, u)
    y = m.retr(x, u)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    ok, reason = m.check_point_on_manifold(y, explain=True)
    assert ok, reason
    ref_y = m.to_dense(m.retr(x64, u.double()))
    assert torch.allclose(m.to_dense(y).double(), ref_y, atol=1e-4 * fro(ref_y))
    g = torch.randn(m.packed_size, dtype=torch.float32)
    rg = m.egrad2rgrad(x, g)
    assert rg.dtype == torch.float32 and torch.isfinite(rg).all()
    assert m.check_vector_on_tangent(x, rg)
    ref = m.egrad2rgrad(x64, g.double())
    assert torch.allclose(rg.double(), ref, atol=1e-3 * ref.abs().max())
    tv = m.transp(x, y, u)
    assert tv.dtype == torch.float32 and torch.isfinite(tv).all()
    assert m.check_vector_on_tangent(y, tv)
    assert torch.allclose(tv.double(), m.transp(x64, y.double(), u.double()), atol=1e-4 * tv.abs().max())
    assert m.inner(x, u).dtype == torch.float32


def test_scaled_manifold(seed):
    m = FixedRankTucker((6, 5, 4), (3, 2, 3))
    sm = geoopt.Scaled(m, 2)
    x = m.random()
    u, v = m.random_tangent(x), m.random_tangent(x)
    # geoopt rescales the tangent argument of retr by 1/scale and leaves inner as the base's
    assert torch.allclose(m.to_dense(sm.retr(x, u)), m.to_dense(m.retr(x, u / 2)), atol=1e-12)
    assert torch.allclose(sm.inner(x, u, v), m.inner(x, u, v), atol=1e-12)
    y, tv = sm.retr_transp(x, u, v)
    assert sm.check_point_on_manifold(y) and sm.check_vector_on_tangent(y, tv)
    assert sm.egrad2rgrad(x, u).shape == x.shape


def test_manifold_parameter_copy_and_pickle():
    m = FixedRankTucker((6, 5, 4), (3, 2, 3))
    p = geoopt.ManifoldParameter(m.random(), manifold=m)
    assert p.manifold is m
    q = copy.deepcopy(p)
    assert isinstance(q, geoopt.ManifoldParameter)
    assert torch.equal(q.data, p.data)
    assert q.manifold.shape == m.shape and q.manifold.ranks == m.ranks
    assert q.manifold.packed_size == m.packed_size
    buf = io.BytesIO()
    torch.save({"p": p, "m": m}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    lp = loaded["p"]
    assert isinstance(lp, geoopt.ManifoldParameter)
    assert torch.equal(lp.data, p.data)
    assert isinstance(lp.manifold, FixedRankTucker)
    assert lp.manifold.shape == m.shape and lp.manifold.ranks == m.ranks
    assert lp.manifold.check_point_on_manifold(lp)
    assert torch.allclose(lp.manifold.to_dense(lp), m.to_dense(p))
    assert loaded["m"].dim == m.dim


# ---------------------------------------------------------------- no dense tensor
class SizeGuard(TorchFunctionMode):
    """Raise if any torch op returns a tensor with ``numel >= limit``."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.calls = 0
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    raise AssertionError(f"{func} produced a tensor of {t.numel()} entries")
        return out


def test_no_dense_tensor_formed():
    shape, ranks = (300, 300, 3, 3), (8, 8, 3, 3)
    m = FixedRankTucker(shape, ranks)
    limit = math.prod(shape)
    x = m.random()
    y = m.random()
    g = torch.randn(m.packed_size)
    w = torch.randn(m.packed_size)
    guard = SizeGuard(limit)
    with guard:
        u = m.proju(x, w)
        rg = m.egrad2rgrad(x, g)
        ip = m.inner(x, u, rg)
        nrm = m.norm(x, u)
        z = m.retr(x, 0.1 * rg)
        tv = m.transp(x, y, u)
        z2, tv2 = m.retr_transp(x, 0.1 * rg, u)
        px = m.projx(x)
        ok = m.check_point_on_manifold(z)
        okv = m.check_vector_on_tangent(y, tv)
        rt = m.random_tangent(x)
    assert guard.calls > 50
    assert guard.largest < limit
    assert ok and okv and torch.isfinite(ip) and nrm > 0
    for t in (u, rg, z, tv, z2, tv2, px, rt):
        assert torch.isfinite(t).all()
    # the guard does catch the dense path
    with pytest.raises(AssertionError, match="entries"):
        with SizeGuard(limit):
            m.to_dense(x)


# ---------------------------------------------------------------- geoopt optimizers
def quadratic_problem(shape, ranks, seed, noise):
    g = torch.Generator().manual_seed(seed)
    m = FixedRankTucker(shape, ranks)
    a = m.to_dense(m.random(generator=g))
    if noise is None:
        x0 = m.random(generator=g)
    else:
        x0 = m.from_dense(a + noise * fro(a) / math.sqrt(a.numel()) * torch.randn(shape, generator=g))
    return m, a, geoopt.ManifoldParameter(x0, manifold=m)


def opt_step(opt, p, a):
    opt.zero_grad()
    loss = 0.5 * ((p.manifold.to_dense(p) - a) ** 2).sum()
    loss.backward()
    opt.step()
    return loss.item()


OPTIMIZERS = {
    "rsgd": (lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.5, momentum=0.5), None, 120),
    "rsgd_plain": (lambda ps: geoopt.optim.RiemannianSGD(ps, lr=1.0), None, 30),
    "radam": (lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.1), 0.3, 400),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("shape, ranks", [((6, 5, 4), (2, 3, 2)), ((5, 4, 6, 3), (2, 3, 2, 3))], ids=["3way", "4way"])
def test_geoopt_optimizers_converge(name, shape, ranks, seed):
    make, noise, steps = OPTIMIZERS[name]
    m, a, p = quadratic_problem(shape, ranks, seed, noise)
    opt = make([p])
    first = opt_step(opt, p, a)
    for _ in range(steps):
        last = opt_step(opt, p, a)
        rel = (fro(m.to_dense(p), a) / fro(a)).item()
        if rel < 1e-8:
            break
    assert rel < 1e-8, (name, rel)
    assert last < first
    assert m.check_point_on_manifold(p)


@pytest.mark.parametrize("name", ["rsgd", "radam"])
def test_geoopt_optimizer_state_dict_roundtrip(name):
    make, noise, _ = OPTIMIZERS[name]
    m, a, p = quadratic_problem((6, 5, 4), (2, 3, 2), 0, noise)
    opt = make([p])
    for _ in range(5):
        opt_step(opt, p, a)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "p": p.detach().clone()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    p2 = geoopt.ManifoldParameter(saved["p"], manifold=FixedRankTucker(m.shape, m.ranks))
    opt2 = make([p2])
    opt2.load_state_dict(saved["opt"])
    for _ in range(5):
        opt_step(opt, p, a)
        opt_step(opt2, p2, a)
    assert torch.equal(p.data, p2.data)
    for k, v in opt.state[p].items():
        v2 = opt2.state[p2][k]
        assert torch.equal(v, v2) if torch.is_tensor(v) else v == v2


# ---------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    m = FixedRankTucker((8, 7, 3, 3), (3, 3, 2, 3))
    g = torch.Generator().manual_seed(0)
    x = m.random(dtype=dtype, generator=g)
    u = m.random_tangent(x, generator=g)
    v = m.random_tangent(x, generator=g)
    egrad = torch.randn(m.packed_size, dtype=dtype, generator=g)
    xc, uc, vc, ec = (t.cuda() for t in (x, u, v, egrad))
    xr = m.random(dtype=dtype, device="cuda")
    assert xr.device.type == "cuda" and xr.dtype == dtype and m.check_point_on_manifold(xr)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    y, yc = m.retr(x, u), m.retr(xc, uc)
    assert yc.device.type == "cuda" and yc.dtype == dtype
    # compare tensors, not packed factors (SVD sign conventions may differ across devices)
    assert torch.allclose(m.to_dense(yc).cpu(), m.to_dense(y), atol=tol * fro(m.to_dense(y)))
    tv, tvc = m.transp(x, y, v), m.transp(xc, y.cuda(), vc)
    assert torch.allclose(tvc.cpu(), tv, atol=tol * tv.abs().max())
    rg, rgc = m.egrad2rgrad(x, egrad), m.egrad2rgrad(xc, ec)
    assert torch.allclose(rgc.cpu(), rg, atol=tol * rg.abs().max())
    assert torch.allclose(m.inner(xc, uc, vc).cpu(), m.inner(x, u, v), rtol=tol, atol=tol)
    assert torch.allclose(m.proju(xc, ec).cpu(), m.proju(x, egrad), atol=tol * egrad.abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape,ranks", [((6, 5, 4), (3, 2, 3)), ((5, 4, 6, 3), (2, 3, 2, 3))])
def test_transp_term_form_equals_block_form(seed, shape, ranks, monkeypatch):
    """Both code paths of transp (2r-core block form, per-term form for large cores) agree with the
    dense projection."""
    torch.manual_seed(seed)
    M = FixedRankTucker(shape, ranks)
    x = M.random(dtype=torch.float64)
    y = M.retr(x, 0.3 * M.random_tangent(x))
    v = M.random_tangent(x)
    block = M.transp(x, y, v)
    monkeypatch.setattr(FixedRankTucker, "_BLOCK_CORE_MAX", 0)
    terms = M.transp(x, y, v)
    dense = M.proj_dense(y, M.tangent_to_dense(x, v))
    assert torch.allclose(block, dense, atol=1e-12)
    assert torch.allclose(terms, dense, atol=1e-12)
