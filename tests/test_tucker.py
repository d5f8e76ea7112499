"""Tucker primitives (tucker_manifold.tucker) against dense definitions and tensorly."""
import itertools
import math
import subprocess
import sys

import pytest
import torch

from tucker_manifold.tucker import (
    check_multilinear_ranks,
    fold,
    hosvd,
    mode_dot,
    multi_mode_dot,
    orthonormalize,
    rank_by_tolerance,
    reconstruct,
    tensorly_pytorch,
    truncated_hosvd,
    unfold,
)

pytestmark = pytest.mark.usefixtures("float64")


def random_tucker(shape, ranks):
    """Core and orthonormal factors of a random Tucker tensor of multilinear rank ``ranks``."""
    core = torch.randn(ranks)
    factors = [torch.linalg.qr(torch.randn(n, r)).Q for n, r in zip(shape, ranks)]
    return core, factors


def kron_all(mats):
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


def tails(s):
    """tails[k] = ||s[k:]||_2 for k = 0..len(s)."""
    return torch.stack([torch.linalg.vector_norm(s[k:]) for k in range(len(s) + 1)])


# ---------------------------------------------------------------- unfold / fold
def test_unfold_fold_roundtrip_and_tensorly(case):
    shape, _ = case
    t = torch.randn(shape)
    with tensorly_pytorch() as tl:
        for i in range(len(shape)):
            m = unfold(t, i)
            assert m.shape == (shape[i], math.prod(shape) // shape[i])
            assert torch.equal(fold(m, i, shape), t)
            assert torch.equal(m, tl.unfold(t, i))
            assert torch.equal(fold(m, i, shape), tl.fold(m, i, shape))
            # C order of the remaining modes: entry (k, flat index of the other indices)
            idx = tuple(torch.randint(n, ()).item() for n in shape)
            rest = [j for j in range(len(shape)) if j != i]
            col = 0
            for j in rest:
                col = col * shape[j] + idx[j]
            assert m[idx[i], col] == t[idx]


def test_mode_dot_matches_unfolding_definition(case):
    shape, _ = case
    t = torch.randn(shape)
    for i in range(len(shape)):
        a = torch.randn(7, shape[i])
        out = mode_dot(t, a, i)
        expected_shape = list(shape)
        expected_shape[i] = 7
        assert list(out.shape) == expected_shape
        assert torch.allclose(unfold(out, i), a @ unfold(t, i), atol=1e-12)
        with tensorly_pytorch() as tl:
            assert torch.allclose(out, tl.tenalg.mode_dot(t, a, i), atol=1e-12)


def test_multi_mode_dot_sequential_and_transpose(case):
    shape, ranks = case
    t = torch.randn(shape)
    mats = [torch.randn(r, n) for n, r in zip(shape, ranks)]
    ref = t
    for i, a in enumerate(mats):
        ref = mode_dot(ref, a, i)
    assert torch.allclose(multi_mode_dot(t, mats), ref, atol=1e-12)
    assert torch.allclose(multi_mode_dot(t, [a.T for a in mats], transpose=True), ref, atol=1e-12)
    # None skips a mode; explicit modes subset
    skip = [None if i == 0 else a for i, a in enumerate(mats)]
    ref_skip = t
    for i, a in enumerate(mats[1:], start=1):
        ref_skip = mode_dot(ref_skip, a, i)
    assert torch.allclose(multi_mode_dot(t, skip), ref_skip, atol=1e-12)
    assert torch.allclose(multi_mode_dot(t, mats[1:], modes=range(1, len(shape))), ref_skip, atol=1e-12)


def test_reconstruct_kronecker_identity_and_tensorly(case):
    shape, ranks = case
    core = torch.randn(ranks)
    factors = [torch.randn(n, r) for n, r in zip(shape, ranks)]  # identity holds for any factors
    w = reconstruct(core, factors)
    assert w.shape == shape
    for i in range(len(shape)):
        others = [factors[j] for j in range(len(shape)) if j != i]
        expected = factors[i] @ unfold(core, i) @ kron_all(others).T
        assert torch.allclose(unfold(w, i), expected, atol=1e-11)
    with tensorly_pytorch() as tl:
        assert torch.allclose(w, tl.tucker_to_tensor((core, factors)), atol=1e-11)
    # Entrywise definition at a random index
    idx = tuple(torch.randint(n, ()).item() for n in shape)
    val = 0.0
    for ridx in itertools.product(*[range(r) for r in ranks]):
        val += core[ridx] * math.prod(factors[k][idx[k], ridx[k]] for k in range(len(shape)))
    assert torch.allclose(w[idx], torch.as_tensor(val), atol=1e-11)


# ---------------------------------------------------------------- HOSVD
def test_hosvd_exact_reconstruction(case):
    shape, _ = case
    t = torch.randn(shape)
    core, factors, svals = hosvd(t)
    assert torch.allclose(reconstruct(core, factors), t, atol=1e-11)
    for i, (u, s) in enumerate(zip(factors, svals)):
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-12)
        assert torch.allclose(s, torch.linalg.svdvals(unfold(t, i)), atol=1e-11)


def test_truncated_hosvd_exact_for_exact_rank(case):
    shape, ranks = case
    core, factors = random_tucker(shape, ranks)
    t = reconstruct(core, factors)
    c2, f2, _ = truncated_hosvd(t, ranks=ranks)
    assert c2.shape == ranks
    assert torch.allclose(reconstruct(c2, f2), t, atol=1e-11)
    # tau = 0 finds the exact multilinear rank
    c3, f3, _ = truncated_hosvd(t, tau=1e-10)
    assert tuple(c3.shape) == ranks
    assert torch.allclose(reconstruct(c3, f3), t, atol=1e-10)


def test_truncated_hosvd_quasi_optimality(case):
    shape, ranks = case
    d = len(shape)
    core, factors = random_tucker(shape, ranks)
    t = reconstruct(core, factors) + 0.1 * torch.randn(shape)
    c, f, svals = truncated_hosvd(t, ranks=ranks)
    assert tuple(c.shape) == ranks
    for u in f:
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-12)
    err = torch.linalg.vector_norm(t - reconstruct(c, f))
    tail = torch.stack([torch.linalg.vector_norm(svals[i][ranks[i]:]) for i in range(d)])
    best_lower = tail.max()  # any rank-r tensor is at least this far (Eckart-Young on each unfolding)
    assert err >= best_lower - 1e-10
    assert err <= torch.linalg.vector_norm(tail) + 1e-10
    assert err <= math.sqrt(d) * best_lower + 1e-10
    # Another rank-r point (the noise-free tensor) is not closer than sqrt(d) * HOSVD allows
    other = torch.linalg.vector_norm(t - reconstruct(core, factors))
    assert err <= math.sqrt(d) * other + 1e-10


def test_truncated_hosvd_singular_values_are_full(case):
    shape, ranks = case
    t = torch.randn(shape)
    _, _, svals = truncated_hosvd(t, ranks=ranks)
    for i, s in enumerate(svals):
        ref = torch.linalg.svdvals(unfold(t, i))
        assert s.shape == ref.shape
        assert torch.allclose(s, ref, atol=1e-11)


@pytest.mark.parametrize("tau", [0.0, 0.01, 0.1, 0.3, 0.9])
def test_truncated_hosvd_by_tau_brute_force(case, tau):
    shape, ranks = case
    core, factors = random_tucker(shape, ranks)
    # Graded spectrum: exact-rank part plus a small perturbation.
    t = reconstruct(core, factors) + 0.05 * torch.randn(shape)
    c, f, svals = truncated_hosvd(t, tau=tau)
    norm = torch.linalg.vector_norm(t)
    for i in range(len(shape)):
        s = torch.linalg.svdvals(unfold(t, i))
        tl_ = tails(s)
        expected = min(k for k in range(len(s) + 1) if tl_[k] <= tau * norm)
        expected = max(expected, 1)
        assert f[i].shape == (shape[i], expected)
        assert c.shape[i] == expected
        assert tl_[expected] <= tau * norm + 1e-12
        if expected > 1:
            assert tl_[expected - 1] > tau * norm
    err = torch.linalg.vector_norm(t - reconstruct(c, f))
    assert err <= math.sqrt(len(shape)) * tau * norm + 1e-10


def test_truncated_hosvd_by_tau_clamps(case):
    shape, _ = case
    t = torch.randn(shape)
    # huge tau: rmin per mode
    c, f, _ = truncated_hosvd(t, tau=10.0, rmin=2)
    assert tuple(c.shape) == tuple(min(2, n) for n in shape)
    # tau = 0: full rank of each unfolding, clamped by rmax
    c, f, _ = truncated_hosvd(t, tau=0.0, rmax=2)
    assert tuple(c.shape) == tuple(min(2, n) for n in shape)
    rmax = [1 + i for i in range(len(shape))]
    c, _, svals = truncated_hosvd(t, tau=0.0, rmax=rmax)
    assert list(c.shape) == [min(r, len(s)) for r, s in zip(rmax, svals)]
    rmin = [n for n in shape]
    c, _, svals = truncated_hosvd(t, tau=10.0, rmin=rmin)
    assert list(c.shape) == [len(s) for s in svals]


def test_truncated_hosvd_argument_errors():
    t = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="exactly one"):
        truncated_hosvd(t)
    with pytest.raises(ValueError, match="exactly one"):
        truncated_hosvd(t, ranks=(2, 2, 2), tau=0.1)
    with pytest.raises(ValueError, match="tau"):
        truncated_hosvd(t, tau=-0.1)
    bad = t.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        truncated_hosvd(bad, ranks=(2, 2, 2))
    with pytest.raises(ValueError, match="ranks"):
        truncated_hosvd(t, ranks=(5, 2, 2))


# ---------------------------------------------------------------- rank_by_tolerance
def test_rank_by_tolerance_edge_cases():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0])
    assert rank_by_tolerance(s, 0.0) == 3  # keeps all nonzero
    assert rank_by_tolerance(s, 1e9) == 1  # rmin
    assert rank_by_tolerance(s, 1e9, rmin=2) == 2
    assert rank_by_tolerance(s, 0.0, rmax=2) == 2
    assert rank_by_tolerance(s, 1.0) == 2  # tail ||[1,0,0]|| = 1 <= 1
    assert rank_by_tolerance(s, 0.999) == 3
    assert rank_by_tolerance(s, math.sqrt(5.0) + 1e-12) == 1  # ||[2,1]|| = sqrt 5
    assert rank_by_tolerance(s, 1e9, rmin=10) == 5  # rmin above length is clamped to length
    assert rank_by_tolerance(torch.zeros(4), 0.0) == 1  # all zero -> rmin
    assert rank_by_tolerance(torch.zeros(4), 0.0, rmin=0) == 0
    full = torch.tensor([4.0, 3.0, 2.0])
    assert rank_by_tolerance(full, 0.0) == 3


def test_rank_by_tolerance_random_brute_force(seed):
    s = torch.sort(torch.rand(12), descending=True).values
    tl_ = tails(s)
    for tol in torch.linspace(0, float(tl_[0]) * 1.1, 40).tolist():
        ref = min(k for k in range(13) if tl_[k] <= tol)
        for rmin, rmax in [(1, None), (3, None), (1, 5), (2, 8)]:
            expect = max(min(ref, rmax if rmax is not None else 12), rmin)
            assert rank_by_tolerance(s, tol, rmin, rmax) == expect


# ---------------------------------------------------------------- orthonormalize
def test_orthonormalize(case):
    shape, ranks = case
    core = torch.randn(ranks)
    factors = [torch.randn(n, r) for n, r in zip(shape, ranks)]
    t = reconstruct(core, factors)
    c1, f1 = orthonormalize(core, factors)
    assert torch.allclose(reconstruct(c1, f1), t, atol=1e-10)
    for u in f1:
        assert torch.allclose(u.T @ u, torch.eye(u.shape[1]), atol=1e-12)
    c2, f2 = orthonormalize(c1, f1)
    assert torch.allclose(c2, c1, atol=1e-11)
    for a, b in zip(f1, f2):
        assert torch.allclose(a, b, atol=1e-12)
    # span of each factor is unchanged
    for u, q in zip(factors, f1):
        assert torch.allclose(q @ (q.T @ u), u, atol=1e-10)


# ---------------------------------------------------------------- batch_ndim
def flat_batch(t, bn):
    return t.reshape(-1, *t.shape[bn:])


def test_batched_helpers_equal_the_loop(case):
    """batch_ndim=2: unfold/fold, mode_dot (shared and per-tensor matrices), multi_mode_dot,
    reconstruct, left_singular, truncated_hosvd and orthonormalize equal the loop over the batch."""
    shape, ranks = case
    d, batch = len(shape), (2, 3)
    t = torch.randn(*batch, *shape)
    tf = flat_batch(t, 2)
    for i in range(d):
        m = unfold(t, i, batch_ndim=2)
        assert torch.equal(m, torch.stack([unfold(a, i) for a in tf]).reshape(*batch, *m.shape[2:]))
        assert torch.equal(fold(m, i, shape, batch_ndim=2), t)
        a = torch.randn(*batch, 4, shape[i])
        ref = torch.stack([mode_dot(x, y, i) for x, y in zip(tf, flat_batch(a, 2))])
        assert torch.allclose(flat_batch(mode_dot(t, a, i, batch_ndim=2), 2), ref, atol=1e-12)
        shared = a[0, 0]
        ref = torch.stack([mode_dot(x, shared, i) for x in tf])
        assert torch.allclose(flat_batch(mode_dot(t, shared, i, batch_ndim=2), 2), ref, atol=1e-12)
    with pytest.raises(ValueError, match="matrix"):
        mode_dot(t, torch.randn(3, 4, shape[0]), 0, batch_ndim=2)
    core = torch.randn(*batch, *ranks)
    factors = [torch.randn(*batch, n, r) for n, r in zip(shape, ranks)]
    full = reconstruct(core, factors, batch_ndim=2)
    ref = torch.stack([reconstruct(c, [f.reshape(-1, *f.shape[2:])[k] for f in factors]) for k, c in enumerate(flat_batch(core, 2))])
    assert torch.allclose(flat_batch(full, 2), ref, atol=1e-11)
    assert torch.allclose(multi_mode_dot(full, factors, transpose=True, batch_ndim=2).reshape(-1, *ranks),
                          torch.stack([multi_mode_dot(w, [f.reshape(-1, *f.shape[2:])[k] for f in factors], transpose=True)
                                       for k, w in enumerate(flat_batch(full, 2))]), atol=1e-10)
    c1, f1 = orthonormalize(core, factors, batch_ndim=2)
    assert torch.allclose(reconstruct(c1, f1, batch_ndim=2), full, atol=1e-10)
    for k in range(6):
        ck, fk = orthonormalize(flat_batch(core, 2)[k], [f.reshape(-1, *f.shape[2:])[k] for f in factors])
        assert torch.allclose(flat_batch(c1, 2)[k], ck, atol=1e-11)
        assert all(torch.allclose(a.reshape(-1, *a.shape[2:])[k], b, atol=1e-12) for a, b in zip(f1, fk))
    res = truncated_hosvd(full, ranks=ranks, batch_ndim=2)
    assert res.core.shape == (*batch, *ranks)
    assert torch.allclose(reconstruct(res.core, res.factors, batch_ndim=2), full, atol=1e-9 * full.abs().max())
    for k in range(6):
        one = truncated_hosvd(flat_batch(full, 2)[k], ranks=ranks)
        for s_b, s_1 in zip(res.singular_values, one.singular_values):
            assert torch.allclose(s_b.reshape(-1, s_b.shape[-1])[k], s_1, atol=1e-10)
    with pytest.raises(ValueError, match="ranks="):
        truncated_hosvd(full, tau=0.1, batch_ndim=2)
    bad = full.clone()
    bad[(1, 2) + (0,) * d] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        truncated_hosvd(bad, ranks=ranks, batch_ndim=2)


# ---------------------------------------------------------------- check_multilinear_ranks
def test_check_multilinear_ranks():
    assert check_multilinear_ranks((5, 4, 3), [2, 3, 3]) == (2, 3, 3)
    assert check_multilinear_ranks((5, 4), (2, 2)) == (2, 2)
    with pytest.raises(ValueError, match=r"ranks\[0\] = 6"):
        check_multilinear_ranks((5, 4, 3), (6, 2, 3))
    with pytest.raises(ValueError, match=r"ranks\[1\] = 0"):
        check_multilinear_ranks((5, 4, 3), (2, 0, 3))
    with pytest.raises(ValueError, match="product of the other ranks"):
        check_multilinear_ranks((5, 4, 3), (5, 2, 2))
    with pytest.raises(ValueError, match="one entry per mode"):
        check_multilinear_ranks((5, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="myranks"):
        check_multilinear_ranks((5, 4), (3, 2), name="myranks")  # matrix: r_0 must equal r_1


# ---------------------------------------------------------------- global state
def test_import_keeps_tensorly_backend():
    code = r"""
import numpy as np
import tensorly as tl
tl.set_backend('numpy')
import torch
import tucker_manifold
from tucker_manifold.tucker import tensorly_pytorch, unfold
assert tl.get_backend() == 'numpy', tl.get_backend()
t = torch.arange(24.0).reshape(2, 3, 4)
with tensorly_pytorch() as tlp:
    assert tlp.get_backend() == 'pytorch'
    u = tlp.unfold(t, 1)
    assert isinstance(u, torch.Tensor)
    assert torch.equal(u, unfold(t, 1))
assert tl.get_backend() == 'numpy', tl.get_backend()
a = np.arange(24.0).reshape(2, 3, 4)
out = tl.unfold(tl.tensor(a), 1)
assert isinstance(out, np.ndarray), type(out)
assert np.array_equal(out, np.moveaxis(a, 1, 0).reshape(3, -1))
core, factors = tl.decomposition.tucker(tl.tensor(a), rank=[2, 3, 4])
assert isinstance(core, np.ndarray)
assert np.allclose(tl.tucker_to_tensor((core, factors)), a)
print('OK')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("OK")
