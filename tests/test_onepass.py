"""One backward pass per TDLRT step (issue 11): docs/one_pass.md checked numerically, the layer-local
augmented-core gradients against autograd, the capture API, and a single-pass prototype against the
two-pass TDLRT iterates. All float64 unless a test says otherwise."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_manifold import FixedRankTucker
from tucker_manifold.flow import augment_basis, enforce_multilinear_ranks, lift_core, truncate_core
from tucker_manifold.onepass import (
    augmented_core_gradient,
    conv2d_core_gradient,
    conv2d_core_gradient_costs,
    core_gradient_mismatch,
    dense_core_gradient,
    layer_core_gradient,
    linear_core_gradient,
    linear_core_gradient_costs,
    parallel_core_gradient,
)
from tucker_manifold.parameter import LayerIORecorder, is_tucker_parameter, record_io, record_layer_io
from tucker_manifold.tucker import fold, multi_mode_dot, reconstruct, unfold

SEEDS = [0, 1, 2]
# d = 2..4, none of which needs its augmented ranks trimmed to stay a valid multilinear rank
CASES = [
    ((5, 4), (2, 2)),
    ((7, 6), (3, 3)),
    ((6, 5, 4), (3, 2, 3)),
    ((5, 4, 6, 3), (2, 3, 2, 3)),
    ((8, 8, 3, 3), (3, 3, 3, 3)),
]
IDS = ["x".join(map(str, s)) for s, _ in CASES]
H = 0.3


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _loss_fn(a: torch.Tensor):
    """A non-quadratic loss of the dense tensor, so its gradient depends on the point."""
    return lambda w: (torch.sin(w) * a).sum() + 0.25 * (w**4).sum()


def _setup(shape, ranks, seed):
    """Point, dense gradient G at Y, autograd factor gradients, augmented bases (TDLRT's, untrimmed)."""
    torch.manual_seed(seed)
    m = FixedRankTucker(shape, ranks)
    x = m.random()
    core, factors = m.unpack(x)
    loss = _loss_fn(torch.randn(shape))
    xx = x.clone().requires_grad_(True)
    c, fs = m.unpack(xx)
    w = reconstruct(c, fs)
    w.retain_grad()
    loss(w).backward()
    gcore, gfactors = m.unpack(xx.grad)
    bases = [u if u.shape[1] >= u.shape[0] else augment_basis(u, g) for u, g in zip(factors, gfactors)]
    return dict(m=m, x=x, core=core, factors=factors, loss=loss, G=w.grad, gcore=gcore, gfactors=gfactors, bases=bases)


def _blocks(ranks, aug):
    """(S, slices) for every block: S = modes using the new columns."""
    d = len(ranks)
    out = []
    for mask in range(2**d):
        s = [i for i in range(d) if mask >> i & 1]
        if any(aug[i] == ranks[i] for i in s):
            continue
        out.append((s, tuple(slice(ranks[i], None) if i in s else slice(0, ranks[i]) for i in range(d))))
    return out


def _tangent_step(c):
    """Y - h P(Y) G as a dense tensor (FixedRankTucker.proj_dense)."""
    m, x = c["m"], c["x"]
    return m.to_dense(x) - H * m.tangent_to_dense(x, m.proj_dense(x, c["G"]))


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ============================================================================ docs/one_pass.md §3-4
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_augmented_core_gradient_is_autograd_at_lifted_point(shape, ranks, seed):
    """(a) dL/dC^ = dL/dW x_j U^_j^T equals autograd's core gradient at (C^, U^), and the lift is exact."""
    c = _setup(shape, ranks, seed)
    lifted = lift_core(c["core"], c["factors"], c["bases"])
    assert _rel(reconstruct(lifted, c["bases"]), c["m"].to_dense(c["x"])) < 1e-14
    ch = lifted.clone().requires_grad_(True)
    c["loss"](reconstruct(ch, c["bases"])).backward()
    local = dense_core_gradient(c["G"], c["bases"])
    assert _rel(local, ch.grad) < 1e-13
    # the all-old block is pass 1's core gradient (the old bases lead the augmented ones)
    assert core_gradient_mismatch(local, c["gcore"]) < 1e-13


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_parallel_masking_is_the_riemannian_step(shape, ranks, seed):
    """(b) C^ - h mask(dL/dC^) in the bases U^ equals Y - h P(Y) G, densely and block by block against
    the packed tangent vector of proj_dense (dC = old block, dU_i Mat_i(C) = U~_i Mat_i(B_{i}))."""
    c = _setup(shape, ranks, seed)
    core, bases = c["core"], c["bases"]
    g_aug = dense_core_gradient(c["G"], bases)
    masked = parallel_core_gradient(g_aug, core)
    lifted = lift_core(core, c["factors"], bases)
    assert _rel(reconstruct(lifted - H * masked, bases), _tangent_step(c)) < 1e-13

    dcore, dfactors = c["m"].unpack(c["m"].proj_dense(c["x"], c["G"]))
    aug = tuple(b.shape[1] for b in bases)
    for s, sl in _blocks(ranks, aug):
        blk = masked[sl]
        if not s:
            assert _rel(blk, dcore) < 1e-13
        elif len(s) == 1:
            i = s[0]
            new = bases[i][:, ranks[i]:]
            want = fold(new.transpose(0, 1) @ dfactors[i] @ unfold(core, i), i, blk.shape)
            assert _rel(blk, want) < 1e-12
        else:
            assert torch.count_nonzero(blk) == 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES[2:], ids=IDS[2:])
def test_broken_maskings_are_not_the_riemannian_step(shape, ranks, seed):
    """The check above fails on each broken masking: no row-space projection, multi-mode blocks kept,
    or a projection onto another space."""
    c = _setup(shape, ranks, seed)
    core, bases = c["core"], c["bases"]
    g_aug = dense_core_gradient(c["G"], bases)
    lifted = lift_core(core, c["factors"], bases)
    ref = _tangent_step(c)
    aug = tuple(b.shape[1] for b in bases)
    good = parallel_core_gradient(g_aug, core)
    no_proj, keep_multi, wrong_q = good.clone(), good.clone(), good.clone()
    for s, sl in _blocks(ranks, aug):
        if len(s) == 1:
            no_proj[sl] = g_aug[sl]
            i = s[0]
            q = torch.linalg.qr(torch.randn(unfold(core, i).shape[::-1])).Q
            wrong_q[sl] = fold(unfold(g_aug[sl], i) @ q @ q.T, i, g_aug[sl].shape)
        elif len(s) >= 2:
            keep_multi[sl] = g_aug[sl]
    for bad in (no_proj, keep_multi, wrong_q):
        assert _rel(reconstruct(lifted - H * bad, bases), ref) > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_mode_blocks_equal_the_triangular_solve_form(shape, ranks, seed):
    """docs/one_pass.md §3: the mode-i block is Fold_i(U~_i^T grad_{U_i} L R_i^{-1} Q_i^T)
    = Fold_i(U~_i^T Mat_i(G x_{j!=i} U_j^T) Q_i Q_i^T) (R_i^{-1} by a triangular solve)."""
    c = _setup(shape, ranks, seed)
    core, bases, factors = c["core"], c["bases"], c["factors"]
    masked = parallel_core_gradient(dense_core_gradient(c["G"], bases), core)
    for i in range(len(shape)):
        if bases[i].shape[1] == ranks[i]:
            continue
        q, r = torch.linalg.qr(unfold(core, i).T)
        new = bases[i][:, ranks[i]:]
        solved = torch.linalg.solve_triangular(r, new.T @ c["gfactors"][i], upper=True, left=False) @ q.T
        others = [None if j == i else u for j, u in enumerate(factors)]
        direct = new.T @ unfold(multi_mode_dot(c["G"], others, transpose=True), i) @ q @ q.T
        sl = tuple(slice(ranks[j], None) if j == i else slice(0, ranks[j]) for j in range(len(shape)))
        assert _rel(unfold(masked[sl], i), direct) < 1e-12
        assert _rel(solved, direct) < 1e-10


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_two_pass_tdlrt_step_is_not_the_tangent_step(shape, ranks, seed):
    """docs/one_pass.md §3: the TDLRT step (unmasked dL/dC^) also moves outside the tangent space."""
    c = _setup(shape, ranks, seed)
    lifted = lift_core(c["core"], c["factors"], c["bases"])
    y = c["m"].to_dense(c["x"])
    tdlrt = reconstruct(lifted - H * dense_core_gradient(c["G"], c["bases"]), c["bases"])
    ref = _tangent_step(c)
    assert float(torch.linalg.vector_norm(tdlrt - ref) / torch.linalg.vector_norm(ref - y)) > 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_matrix_case_is_geolora(seed):
    """d = 2 with an invertible S: Q_1 Q_1^T = I, so the mask keeps both one-mode blocks whole and zeroes
    the new-new block: GeoLoRA's core [[S - h U^T G V, -h U^T G V~], [-h U~^T G V, 0]]."""
    c = _setup((9, 7), (3, 3), seed)
    (u, v), (uh, vh) = c["factors"], c["bases"]
    ut, vt = uh[:, 3:], vh[:, 3:]
    masked = parallel_core_gradient(dense_core_gradient(c["G"], c["bases"]), c["core"])
    g = c["G"]
    want = torch.cat([torch.cat([u.T @ g @ v, u.T @ g @ vt], 1),
                      torch.cat([ut.T @ g @ v, torch.zeros(ut.shape[1], vt.shape[1])], 1)], 0)
    assert _rel(masked, want) < 1e-13


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", [((10, 3), (2, 2)), ((12, 5), (4, 4))])
def test_trimmed_augmentation_breaks_the_tangent_step(shape, ranks, seed):
    """docs/one_pass.md §4, correction 1: TDLRT trims the augmented sizes to a valid multilinear rank (here
    mode 1 loses new columns). Untrimmed, the masked step is Y - h P(Y) G; trimmed, it is not. The
    parallel step must therefore lift into UNtrimmed bases (its lifted core is never a point)."""
    c = _setup(shape, ranks, seed)
    sizes = enforce_multilinear_ranks([b.shape[1] for b in c["bases"]])
    trimmed = [b[:, :s] for b, s in zip(c["bases"], sizes)]
    assert [b.shape[1] for b in trimmed] != [b.shape[1] for b in c["bases"]]
    ref = _tangent_step(c)
    for bases, ok in ((c["bases"], True), (trimmed, False)):
        lifted = lift_core(c["core"], c["factors"], bases)
        step = reconstruct(lifted - H * parallel_core_gradient(dense_core_gradient(c["G"], bases), c["core"]), bases)
        assert (_rel(step, ref) < 1e-13) == ok


@pytest.mark.parametrize("seed", SEEDS)
def test_truncated_core_is_not_all_orthogonal(seed):
    """docs/one_pass.md §4, correction 2: after a truncation that cuts two or more modes, Mat_i(C) Mat_i(C)^T is
    NOT diagonal for d >= 3 (a sub-block of an all-orthogonal core is not all-orthogonal), so R_i can
    not be taken diagonal. It is for d = 2, or when nothing is cut."""
    torch.manual_seed(seed)

    def off_diagonal(core):
        out = []
        for i in range(core.ndim):
            g = unfold(core, i) @ unfold(core, i).T
            out.append(float(torch.linalg.vector_norm(g - torch.diag(torch.diag(g))) / torch.linalg.vector_norm(g)))
        return max(out)

    c3 = torch.randn(6, 6, 6)
    assert off_diagonal(truncate_core(c3, 0.0).core) < 1e-13
    cut = truncate_core(c3, 0.45)
    assert sum(r < 6 for r in cut.ranks) >= 2
    assert off_diagonal(cut.core) > 1e-3
    cut2 = truncate_core(torch.randn(6, 6), 0.3)
    assert cut2.ranks[0] < 6 and off_diagonal(cut2.core) < 1e-13


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,ranks", CASES, ids=IDS)
def test_parallel_step_descends_on_a_quadratic(shape, ranks, seed):
    """docs/one_pass.md §4, item 2, on L = 0.5 ||W - A||^2 (1-smooth): before truncation the loss changes by exactly
    -h (1 - h/2) ||P G||^2, a decrease for every h < 2 (so for h <= 1/L)."""
    torch.manual_seed(seed)
    m = FixedRankTucker(shape, ranks)
    x = m.random()
    core, factors = m.unpack(x)
    a = torch.randn(shape)
    y = m.to_dense(x)
    g = y - a
    xx = x.clone().requires_grad_(True)
    cc, fs = m.unpack(xx)
    (0.5 * (reconstruct(cc, fs) - a).pow(2).sum()).backward()
    bases = [u if u.shape[1] >= u.shape[0] else augment_basis(u, gf) for u, gf in zip(factors, m.unpack(xx.grad)[1])]
    lifted = lift_core(core, factors, bases)
    pg2 = float(m.tangent_to_dense(x, m.proj_dense(x, g)).pow(2).sum())
    for h in (0.1, 0.5, 1.0):
        new = reconstruct(lifted - h * parallel_core_gradient(dense_core_gradient(g, bases), core), bases)
        change = 0.5 * float((new - a).pow(2).sum()) - 0.5 * float(g.pow(2).sum())
        assert change < 0
        assert abs(change + h * (1 - h / 2) * pg2) < 1e-10 * pg2


def test_parallel_core_gradient_uses_no_inverse(monkeypatch):
    """No inverse, pseudo-inverse or solve anywhere in the masking."""
    c = _setup((6, 5, 4), (3, 2, 3), 0)
    g_aug = dense_core_gradient(c["G"], c["bases"])

    def refuse(*a, **k):
        raise AssertionError("an inverse was used")

    for name in ("inv", "pinv", "solve", "solve_triangular", "lstsq", "inv_ex", "solve_ex"):
        monkeypatch.setattr(torch.linalg, name, refuse)
    monkeypatch.setattr(torch, "inverse", refuse)
    parallel_core_gradient(g_aug, c["core"])


@pytest.mark.parametrize("seed", SEEDS)
def test_parallel_core_gradient_is_bounded(seed):
    """Each block is an orthogonal projection: ||mask(g)|| <= ||g|| even for a rank-deficient core."""
    torch.manual_seed(seed)
    core = torch.randn(3, 3, 3)
    core[2] = core[0]  # Mat_1(C) has rank 2
    g = torch.randn(6, 5, 4) * 1e3
    out = parallel_core_gradient(g, core)
    assert torch.isfinite(out).all()
    assert float(torch.linalg.vector_norm(out)) <= float(torch.linalg.vector_norm(g)) * (1 + 1e-12)


def _diagonal_case(seed, dtype_ratio, r=4, shape=(11, 10, 9)):
    """Core D x_j Q_j with superdiagonal D_kkk = q^k (every unfolding has singular values q^k): the exact
    row-space projector of Mat_i(C) is known in float64 to rounding, whatever the conditioning."""
    g = torch.Generator().manual_seed(seed)
    q = dtype_ratio ** (1.0 / (r - 1))
    d = torch.zeros(r, r, r)
    for k in range(r):
        d[k, k, k] = q**k
    qs = [torch.linalg.qr(torch.randn(r, r, generator=g)).Q for _ in range(3)]
    core = multi_mode_dot(d, qs)
    factors = [torch.linalg.qr(torch.randn(n, r, generator=g)).Q for n in shape]
    grad = torch.randn(shape, generator=g)
    proj = []
    for i in range(3):
        o = [qs[j] for j in range(3) if j != i]
        kron = torch.kron(o[0], o[1])
        ind = torch.zeros(r * r)
        ind[torch.arange(r) * r + torch.arange(r)] = 1
        proj.append(kron @ torch.diag(ind) @ kron.T)
    return core, factors, grad, proj


def _parallel_step(core, factors, grad, proj=None):
    gfactors = []
    for i in range(core.ndim):
        others = [None if j == i else u for j, u in enumerate(factors)]
        gfactors.append(unfold(multi_mode_dot(grad, others, transpose=True), i) @ unfold(core, i).T)
    bases = [augment_basis(u, gf) for u, gf in zip(factors, gfactors)]
    g_aug = dense_core_gradient(grad, bases)
    if proj is None:
        masked = parallel_core_gradient(g_aug, core)
    else:  # the exact reference: known row-space projectors
        masked = torch.zeros_like(g_aug)
        r = core.shape
        old = tuple(slice(0, k) for k in r)
        masked[old] = g_aug[old]
        for i in range(core.ndim):
            sl = tuple(slice(r[j], None) if j == i else slice(0, r[j]) for j in range(core.ndim))
            masked[sl] = fold(unfold(g_aug[sl], i) @ proj[i], i, g_aug[sl].shape)
    return reconstruct(lift_core(core, factors, bases) - H * masked, bases)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype,smin,bound", [(torch.float64, 1e-8, 1e-7), (torch.float32, 1e-4, 2e-3)])
def test_parallel_step_with_small_singular_values(seed, dtype, smin, bound):
    """docs/one_pass.md §4, item 5: core spectra down to 1e-8 (float64) / 1e-4 (float32): the step is finite and
    within ~ eps cond(Mat_i C) of the exact one (measured 1e-9..5e-9 and 1e-4..2e-4, relative to the
    step; the triangular-solve form of §3 measures the same, so the masking is not more accurate)."""
    core, factors, grad, proj = _diagonal_case(seed, smin)
    y = reconstruct(core, factors)
    ref = _parallel_step(core, factors, grad, proj)
    out = _parallel_step(core.to(dtype), [u.to(dtype) for u in factors], grad.to(dtype)).double()
    assert torch.isfinite(out).all()
    assert float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref - y)) < bound


def test_parallel_core_gradient_rejects_bad_input():
    core = torch.randn(2, 3)
    with pytest.raises(ValueError, match="g_aug"):
        parallel_core_gradient(torch.randn(1, 3), core)
    with pytest.raises(ValueError, match="g_aug"):
        parallel_core_gradient(torch.randn(4, 3, 2), core)
    with pytest.raises(ValueError, match="old_ranks"):
        parallel_core_gradient(torch.randn(4, 6), core, old_ranks=(3, 3))


# ============================================================================ layer-local gradients
def _orth(n, r):
    return torch.linalg.qr(torch.randn(n, r)).Q


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("lead", [(7,), (3, 5), ()])
@pytest.mark.parametrize("formula", ["auto", "factorized", "dense"])
def test_linear_core_gradient_matches_autograd(seed, lead, formula):
    torch.manual_seed(seed)
    n_out, n_in, r_out, r_in = 6, 9, 4, 5
    u_out, u_in = _orth(n_out, r_out), _orth(n_in, r_in)
    core = torch.randn(r_out, r_in, requires_grad=True)
    x, gy = torch.randn(*lead, n_in), torch.randn(*lead, n_out)
    y = F.linear(x, u_out @ core @ u_in.T, torch.randn(n_out))
    (y * gy).sum().backward()
    got = linear_core_gradient(x, gy, u_out, u_in, formula=formula)
    assert _rel(got, core.grad) < 1e-12
    # a wrong input breaks it
    assert _rel(linear_core_gradient(x.flip(-1), gy, u_out, u_in, formula=formula), core.grad) > 1e-3


def test_linear_core_gradient_costs_and_choice():
    c = linear_core_gradient_costs(100, 6, 9, 4, 5)
    assert c["factorized"] == 100 * (6 * 4 + 9 * 5 + 4 * 5)
    assert linear_core_gradient_costs(1, 512, 512, 4, 4)["dense"] > linear_core_gradient_costs(1, 512, 512, 4, 4)["factorized"]
    with pytest.raises(ValueError, match="formula"):
        linear_core_gradient(torch.randn(2, 3), torch.randn(2, 4), _orth(4, 2), _orth(3, 2), formula="fast")
    with pytest.raises(ValueError, match="gy"):
        linear_core_gradient(torch.randn(2, 3), torch.randn(3, 4), _orth(4, 2), _orth(3, 2))


CONV_GEOMETRY = [
    dict(kernel=(3, 3), stride=1, padding=1, dilation=1),
    dict(kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=1),
    dict(kernel=(3, 3), stride=2, padding=0, dilation=(1, 2)),
    dict(kernel=(2, 4), stride=1, padding="same", dilation=(2, 1)),  # asymmetric 'same'
    dict(kernel=(3, 3), stride=1, padding="valid", dilation=1),
    dict(kernel=(1, 1), stride=2, padding=0, dilation=1),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("geo", CONV_GEOMETRY, ids=lambda g: f"k{g['kernel']}s{g['stride']}p{g['padding']}d{g['dilation']}")
@pytest.mark.parametrize("formula", ["auto", "factorized", "dense"])
def test_conv2d_core_gradient_matches_autograd(seed, geo, formula):
    """dL/dC^ of the conv at augmented bases (spatial factors not square: r_h < k_h) vs autograd."""
    torch.manual_seed(seed)
    c_out, c_in = 7, 5
    kh, kw = geo["kernel"]
    ranks = (4, 3, max(kh - 1, 1), kw)
    factors = [_orth(n, r) for n, r in zip((c_out, c_in, kh, kw), ranks)]
    core = torch.randn(*ranks, requires_grad=True)
    x = torch.randn(2, c_in, 9, 8)
    w = reconstruct(core, factors)
    y = F.conv2d(x, w, torch.randn(c_out), geo["stride"], geo["padding"], geo["dilation"])
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    got = conv2d_core_gradient(x, gy, factors, geo["stride"], geo["padding"], geo["dilation"], formula=formula)
    assert _rel(got, core.grad) < 1e-12
    # unbatched input
    got1 = conv2d_core_gradient(x[0], gy[0], factors, geo["stride"], geo["padding"], geo["dilation"], formula=formula)
    ref1 = torch.autograd.grad((F.conv2d(x[:1], reconstruct(core, factors), None, geo["stride"], geo["padding"],
                                         geo["dilation"]) * gy[:1]).sum(), core)[0]
    assert _rel(got1, ref1) < 1e-12


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("formula", ["factorized", "dense"])
def test_conv2d_core_gradient_padding_modes(padding_mode, formula):
    """Non-zero padding modes (as nn.Conv2d pads them; the adapters pass theirs): they commute with the
    1x1 projection too."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 1), padding_mode=padding_mode, bias=False)
    factors = [_orth(n, r) for n, r in zip((6, 4, 3, 2), (3, 3, 2, 2))]
    core = torch.randn(3, 3, 2, 2, requires_grad=True)
    x = torch.randn(2, 4, 7, 6)
    y = conv._conv_forward(x, reconstruct(core, factors), None)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    got = conv2d_core_gradient(x, gy, factors, conv.stride, conv.padding, conv.dilation, padding_mode, formula=formula)
    assert _rel(got, core.grad) < 1e-12
    assert _rel(conv2d_core_gradient(x, gy, factors, conv.stride, conv.padding, conv.dilation, formula=formula),
                core.grad) > 1e-3  # zero padding is not the same


@pytest.mark.parametrize("formula", ["factorized", "dense"])
def test_conv2d_core_gradient_fails_on_wrong_geometry(formula):
    torch.manual_seed(0)
    factors = [_orth(n, r) for n, r in zip((6, 4, 3, 3), (3, 2, 3, 3))]
    core = torch.randn(3, 2, 3, 3, requires_grad=True)
    x = torch.randn(2, 4, 8, 8)
    y = F.conv2d(x, reconstruct(core, factors), None, 1, 1)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    assert _rel(conv2d_core_gradient(x, gy, factors, 1, 1, formula=formula), core.grad) < 1e-12
    with pytest.raises(RuntimeError):  # padding 0 gives a gradient of another size: torch refuses
        conv2d_core_gradient(x, gy, factors, 1, 0, formula=formula)
    assert _rel(conv2d_core_gradient(x, gy, factors, 1, 1, dilation=1, formula=formula), core.grad) < 1e-12
    wrong = conv2d_core_gradient(x, gy.flip(-1), factors, 1, 1, formula=formula)
    assert _rel(wrong, core.grad) > 1e-3


def test_conv2d_core_gradient_costs_pick_the_cheaper_formula():
    # 64 -> 64 channels at rank 12: the projections are far cheaper than the dense weight gradient
    c = conv2d_core_gradient_costs((64, 64, 32, 32), (64, 64, 32, 32), (64, 64, 3, 3), (12, 12, 3, 3))
    assert c["factorized"] < c["dense"]
    b, hw = 64 * 32 * 32, 3 * 3
    assert c["factorized"] == b * 64 * 12 * 2 + b * 12 * 12 * hw + 12 * 12 * (3 * 3 * 3 + 3 * 3 * 3)
    # 3 -> 8 channels at full rank: the dense one
    c = conv2d_core_gradient_costs((2, 3, 8, 8), (2, 8, 8, 8), (8, 3, 3, 3), (8, 3, 3, 3))
    assert c["dense"] < c["factorized"]
    with pytest.raises(ValueError, match="factors"):
        conv2d_core_gradient(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4), [_orth(2, 1)] * 3)
    with pytest.raises(ValueError, match="channels"):
        conv2d_core_gradient(torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4), [_orth(2, 1), _orth(4, 1), _orth(1, 1), _orth(1, 1)])


# ============================================================================ capture API
def _hook_layers(model: nn.Module) -> list:
    """Nothing to do any more: TuckerConv2d / TuckerLinear call ``record_io(p, self, x, y)`` in their
    forward (this helper added that line as a forward hook before the layers had it). Kept so that the
    tests below read as before; a second hook would record every use twice."""
    return []


def _tucker_params(model):
    return [p for p in model.parameters() if is_tucker_parameter(p)]


def _small_cnn(seed: int, bn: bool = True) -> nn.Module:
    """TuckerConv2d - BN - ReLU - TuckerConv2d (stride 2, bias) - ReLU(inplace) - maxpool - TuckerLinear
    (bias). The in-place ReLU right after a Tucker conv checks that the output hook sees the gradient of
    the conv's own output. No bias right before the BatchNorm: its exact gradient is zero, so its computed
    gradient is rounding noise, which Adam normalizes into O(lr) steps (any two float64 evaluations of
    the same step would then differ there by far more than 1e-10)."""
    from tucker_manifold.nn import TuckerConv2d, TuckerLinear

    torch.manual_seed(seed)
    return nn.Sequential(
        TuckerConv2d(3, 8, 3, ranks=(6, 3, 3, 3), padding=1, bias=not bn),
        nn.BatchNorm2d(8) if bn else nn.Identity(),
        nn.ReLU(),
        TuckerConv2d(8, 12, 3, ranks=(8, 6, 3, 3), stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        TuckerLinear(12 * 2 * 2, 10, ranks=6),
    )


def test_record_io_is_a_no_op_outside_a_recorder():
    model = _small_cnn(0)
    _hook_layers(model)
    x = torch.randn(4, 3, 8, 8)
    rec = LayerIORecorder(_tucker_params(model))
    model(x).sum().backward()
    assert rec.recorded_params() == [] and rec.nbytes() == 0
    with rec:
        with torch.no_grad():
            model(x)  # nothing requires grad: nothing recorded
    assert all(rec.pending(p) == 0 for p in _tucker_params(model))
    # a parameter the recorder does not track is ignored
    other = LayerIORecorder([])
    with other:
        model(x).sum().backward()
    assert other.recorded_params() == []


def test_recorded_output_gradients_are_autograds():
    """gy of every layer equals the gradient of its output, also where an in-place ReLU overwrites that
    output (reference: the same model with an out-of-place ReLU and retained output gradients)."""
    model = _small_cnn(1, bn=False)
    plain = copy.deepcopy(model)
    plain[4] = nn.ReLU(inplace=False)
    outs = {}
    for i, mod in enumerate(plain):
        if hasattr(mod, "tucker_weight"):
            def keep(m, inp, out, i=i):
                out.retain_grad()
                outs[i] = out
            mod.register_forward_hook(keep)
    x = torch.randn(4, 3, 8, 8)
    plain(x).pow(2).sum().backward()
    _hook_layers(model)
    params = _tucker_params(model)
    with record_layer_io(params) as rec:
        loss = model(x).pow(2).sum()
        assert all(rec.pending(p) == 1 for p in params)
    loss.backward()  # outside the context: records still complete
    assert {id(q) for q in rec.recorded_params()} == {id(q) for q in params}
    index = {id(m): i for i, m in enumerate(model)}
    for p in params:
        (r,) = rec.records(p)
        assert r.x is not None and not r.stale()
        assert _rel(r.gy, outs[index[id(r.layer)]].grad) < 1e-14
    assert torch.equal(rec.records(params[0])[0].x, x)  # conv1's recorded input is the model input
    assert rec.nbytes() == sum(r.nbytes() for p in params for r in rec.records(p))
    rec.clear()
    assert rec.recorded_params() == [] and rec.nbytes() == 0


def test_a_parameter_used_twice_gets_two_records_whose_gradients_sum():
    from tucker_manifold.nn import TuckerLinear

    torch.manual_seed(3)
    lin = TuckerLinear(6, 6, ranks=3)
    _hook_layers(lin)
    p = lin.tucker_weight
    x = torch.randn(5, 6)
    with record_layer_io([p]) as rec:
        loss = torch.tanh(lin(torch.tanh(lin(x)))).sum()
        loss.backward()
    recs = rec.records(p)
    assert len(recs) == 2
    # at the current point the summed local gradient is autograd's core gradient
    core, factors = p.manifold.unpack(p.data)
    gcore = p.manifold.unpack(p.grad)[0]
    assert _rel(augmented_core_gradient(recs, factors), gcore) < 1e-13
    # and one record alone is not
    assert _rel(augmented_core_gradient(recs[:1], factors), gcore) > 1e-3


def test_retain_graph_backward_accumulates_like_grad():
    from tucker_manifold.nn import TuckerLinear

    torch.manual_seed(4)
    lin = TuckerLinear(5, 4, ranks=2)
    _hook_layers(lin)
    p = lin.tucker_weight
    with record_layer_io([p]) as rec:
        loss = lin(torch.randn(3, 5)).pow(2).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    core, factors = p.manifold.unpack(p.data)
    assert len(rec.records(p)) == 1
    assert _rel(augmented_core_gradient(rec.records(p), factors), p.manifold.unpack(p.grad)[0]) < 1e-13


def test_a_dropped_graph_drops_its_records():
    from tucker_manifold.nn import TuckerLinear

    lin = TuckerLinear(5, 4, ranks=2)
    _hook_layers(lin)
    p = lin.tucker_weight
    with record_layer_io([p]) as rec:
        out = lin(torch.randn(3, 5))
        assert rec.pending(p) == 1
        del out  # never backpropagated: the record (and its saved input) goes with the graph
        assert rec.pending(p) == 0
    assert rec.records(p) == []


def test_stale_input_is_detected():
    from tucker_manifold.nn import TuckerLinear

    lin = TuckerLinear(5, 4, ranks=2, forward_mode="reconstructed")
    _hook_layers(lin)
    p = lin.tucker_weight
    x = torch.randn(3, 5)
    with record_layer_io([p]) as rec:
        lin(x).sum().backward()
    x.add_(1.0)  # the caller reused its input buffer
    (r,) = rec.records(p)
    assert r.stale()
    with pytest.raises(RuntimeError, match="in place"):
        augmented_core_gradient(rec.records(p), p.manifold.unpack(p.data)[1])


def test_dense_reconstruction_record_and_unrecorded_use_detection():
    """A bare ManifoldParameter used through M.to_dense: record_io(p, None, None, W). An extra use the
    records do not see (a penalty on W) shows in core_gradient_mismatch."""
    torch.manual_seed(5)
    m = FixedRankTucker((6, 5, 4), (2, 2, 2))
    from geoopt import ManifoldParameter

    p = ManifoldParameter(m.random(), manifold=m)
    a = torch.randn(6, 5, 4)
    with record_layer_io([p]) as rec:
        w = record_io(p, None, None, m.to_dense(p))
        (torch.sin(w) * a).sum().backward()
    core, factors = m.unpack(p.data)
    g = augmented_core_gradient(rec.records(p), factors)
    assert core_gradient_mismatch(g, m.unpack(p.grad)[0]) < 1e-13
    p.grad = None
    with record_layer_io([p]) as rec:
        w = record_io(p, None, None, m.to_dense(p))
        ((torch.sin(w) * a).sum() + 0.1 * m.to_dense(p).pow(2).sum()).backward()
    g = augmented_core_gradient(rec.records(p), factors)
    assert core_gradient_mismatch(g, m.unpack(p.grad)[0]) > 1e-3


def test_records_in_another_dtype_than_the_bases():
    """float32 records, float64 bases: computed in float32, returned in float64."""
    from tucker_manifold.nn import TuckerConv2d

    torch.manual_seed(6)
    conv = TuckerConv2d(4, 6, 3, ranks=(3, 2, 3, 3), padding=1, dtype=torch.float32)
    _hook_layers(conv)
    p = conv.tucker_weight
    x = torch.randn(2, 4, 6, 6, dtype=torch.float32)
    with record_layer_io([p]) as rec:
        conv(x).pow(2).sum().backward()
    core, factors = p.manifold.unpack(p.data)
    g = augmented_core_gradient(rec.records(p), [f.double() for f in factors])
    assert g.dtype == torch.float64
    assert _rel(g, p.manifold.unpack(p.grad)[0].double()) < 1e-5


def test_layer_core_gradient_dispatch():
    from tucker_manifold.nn import TuckerConv2d, TuckerLinear

    class Custom:
        def tucker_core_gradient(self, x, gy, factors):
            return torch.full([f.shape[1] for f in factors], 7.0)

    fs = [_orth(4, 2), _orth(3, 2)]
    assert torch.equal(layer_core_gradient(Custom(), None, torch.randn(4, 3), fs), torch.full((2, 2), 7.0))
    with pytest.raises(ValueError, match="tucker_core_gradient"):
        layer_core_gradient(object(), torch.randn(1), torch.randn(1), fs + fs[:1])
    lin = TuckerLinear(3, 4, ranks=2)
    x, gy = torch.randn(5, 3), torch.randn(5, 4)
    assert torch.equal(layer_core_gradient(lin, x, gy, fs), linear_core_gradient(x, gy, *fs))
    conv = TuckerConv2d(3, 4, 3, ranks=2, stride=2, padding=1)
    cf = [_orth(4, 2), _orth(3, 2), _orth(3, 3), _orth(3, 3)]
    xc = torch.randn(2, 3, 7, 7)
    gyc = torch.randn(2, 4, 4, 4)
    assert _rel(layer_core_gradient(conv, xc, gyc, cf), conv2d_core_gradient(xc, gyc, cf, 2, 1)) < 1e-14


# ============================================================================ single-pass prototype
class SinglePass:
    """A closure for TDLRT.step(closure) that runs the model ONCE per step.

    Call 1 (TDLRT's pass 1, at (C, U)): forward + backward with every layer's input and output gradient
    recorded, and every parameter's gradient kept (TDLRT freezes the non-Tucker ones in pass 1; the one
    pass needs them, so this closure unfreezes them for its backward).
    Call 2 (TDLRT's pass 2, at the lifted point): no model evaluation; each Tucker parameter gets
    dL/dC^ rebuilt locally from the records at its augmented bases (read from the parameter, where
    TDLRT put them), the other parameters their pass-1 gradients.
    This was the wiring prototype of `TDLRT(single_pass=True)` (now the default; tests/test_single_pass.py): pass 1 with recording and no freezing, then
    `onepass.augmented_core_gradient(records, plan.bases)` in place of pass 2.
    """

    def __init__(self, model, loss_fn, x, y, broken: bool = False):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.tucker = _tucker_params(model)
        self.calls = 0
        self.broken = broken  # negative control: keep only the all-old block of dL/dC^

    def __call__(self):
        self.calls += 1
        others = [p for p in self.model.parameters() if not is_tucker_parameter(p)]
        if self.calls % 2 == 1:
            frozen = [p for p in others if not p.requires_grad]
            for p in frozen:
                p.requires_grad_(True)
            self.model.zero_grad(set_to_none=True)
            with record_layer_io(self.tucker) as self.rec:
                loss = self.loss_fn(self.model(self.x), self.y)
                loss.backward()
            self.other_grads = [p.grad for p in others]
            self.core_grads = [p.manifold.unpack(p.grad)[0].clone() for p in self.tucker]
            for p in frozen:
                p.requires_grad_(False)
                p.grad = None
            self.loss = loss.detach()
            return self.loss
        for p, g in zip(others, self.other_grads):
            p.grad = g
        for p, gc in zip(self.tucker, self.core_grads):
            core, bases = p.manifold.unpack(p.data)
            g_aug = augmented_core_gradient(self.rec.records(p), bases)
            assert core_gradient_mismatch(g_aug, gc) < 1e-10  # every use was recorded
            if self.broken:
                old = tuple(slice(0, r) for r in gc.shape)
                keep = g_aug[old].clone()
                g_aug.zero_()
                g_aug[old] = keep
            p.grad = p.manifold.pack(g_aug, [torch.zeros_like(b) for b in bases])
        self.rec.clear()
        return self.loss


class TwoPass:
    """The reference closure, as the training loop's (experiments.loop): BatchNorm statistics are updated by
    pass 1 only (a bare closure would update them twice per two-pass step)."""

    def __init__(self, model, loss_fn, x, y):
        from tucker_manifold.experiments.loop import frozen_bn_stats as _frozen_bn_stats

        self.model, self.loss_fn, self.x, self.y, self.calls = model, loss_fn, x, y, 0
        self.freeze = _frozen_bn_stats
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __call__(self):
        self.calls += 1
        self.model.zero_grad(set_to_none=True)
        with self.freeze(self.bns if self.calls % 2 == 0 else ()):
            loss = self.loss_fn(self.model(self.x), self.y)
            loss.backward()
        return loss


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sign_aligned(m: FixedRankTucker, ref: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` with each factor column's sign (and the matching core slice) flipped to agree with ``ref``.

    The truncation's SVDs fix singular vectors only up to sign, and a rounding-level change of their
    input can flip one (seen here: at one step of the Adam run, the same tensor to 4e-14 with one
    column of opposite sign). A sign is a gauge: the tensor, and TDLRT's later iterates as tensors,
    do not depend on it; the packed coordinates do."""
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


@pytest.mark.parametrize(
    "opts",
    [
        dict(method="sgd", momentum=0.9, lr=0.05, tau=0.2),
        dict(method="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3, lr=0.05, tau=0.2),
        dict(method="adam", lr=3e-3, tau=0.2),
    ],
    ids=["momentum", "nesterov-wd", "adam"],
)
def test_single_pass_reproduces_two_pass_tdlrt(opts):
    """20 steps on a CNN (Tucker conv + linear, bias, BatchNorm, ReLU, max-pool): same ranks, every
    parameter and buffer (BN running statistics included) within 1e-10 relative, packed Tucker points
    after aligning the signs of factor columns (:func:`_sign_aligned`), and their dense tensors."""
    from tucker_manifold.optim import TDLRT

    ref = _small_cnn(7)
    one = copy.deepcopy(ref)
    _hook_layers(one)
    # the prototype drives the two-pass interface (its second call is the rebuilt pass 2)
    opt_ref, opt_one = TDLRT(ref.parameters(), single_pass=False, **opts), TDLRT(one.parameters(), single_pass=False, **opts)
    g = torch.Generator().manual_seed(0)
    rank_changes = 0
    start = [p.manifold.ranks for p in _tucker_params(ref)]
    for step in range(20):
        x = torch.randn(6, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (6,), generator=g)
        cl_ref, cl_one = TwoPass(ref, F.cross_entropy, x, y), SinglePass(one, F.cross_entropy, x, y)
        l_ref, l_one = opt_ref.step(cl_ref), opt_one.step(cl_one)
        assert cl_ref.calls == 2 and cl_one.calls == 2  # the second call of cl_one runs no model
        assert abs(float(l_ref) - float(l_one)) <= 1e-12 * abs(float(l_ref))
        r_ref = [p.manifold.ranks for p in _tucker_params(ref)]
        assert r_ref == [p.manifold.ranks for p in _tucker_params(one)], f"step {step}"
        rank_changes += r_ref != start
        s_ref, s_one = _state(ref), _state(one)
        for (name, mod_ref), mod_one in zip(ref.named_modules(), one.modules()):
            if hasattr(mod_ref, "tucker_weight"):
                key = f"{name}.tucker_weight"
                s_one[key] = _sign_aligned(mod_ref.tucker_weight.manifold, s_ref[key], s_one[key])
        for k in s_ref:
            if s_ref[k].is_floating_point():
                assert _rel(s_one[k], s_ref[k]) < 1e-10 or torch.linalg.vector_norm(s_ref[k]) == 0, f"{k} at step {step}"
            else:
                assert torch.equal(s_one[k], s_ref[k]), k
        # the tensors themselves, with no gauge to align
        for a, b in zip(_tucker_params(ref), _tucker_params(one)):
            assert _rel(b.manifold.to_dense(b.data), a.manifold.to_dense(a.data)) < 1e-10
    assert rank_changes > 0  # tau > 0 actually moved the ranks


def test_single_pass_check_fails_on_a_broken_gradient():
    """Negative control for the equality test: dropping the new-direction blocks of dL/dC^ (a Galerkin
    step in the augmented bases with only the old gradient) no longer matches two-pass TDLRT."""
    from tucker_manifold.optim import TDLRT

    ref = _small_cnn(7)
    one = copy.deepcopy(ref)
    _hook_layers(one)
    opts = dict(method="sgd", momentum=0.9, lr=0.05, tau=0.2)
    # the prototype drives the two-pass interface (its second call is the rebuilt pass 2)
    opt_ref, opt_one = TDLRT(ref.parameters(), single_pass=False, **opts), TDLRT(one.parameters(), single_pass=False, **opts)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
        opt_ref.step(TwoPass(ref, F.cross_entropy, x, y))
        opt_one.step(SinglePass(one, F.cross_entropy, x, y, broken=True))
    worst = max(_rel(b.manifold.to_dense(b.data), a.manifold.to_dense(a.data))
                for a, b in zip(_tucker_params(ref), _tucker_params(one)))
    assert worst > 1e-6


def test_single_pass_bare_manifold_parameter_through_to_dense():
    """A bare geoopt ManifoldParameter used through M.to_dense (recorded as its dense reconstruction)."""
    from geoopt import ManifoldParameter
    from tucker_manifold.optim import TDLRT

    torch.manual_seed(11)
    m = FixedRankTucker((8, 7, 6), (3, 3, 3))
    target = torch.randn(8, 7, 6)
    p_ref = ManifoldParameter(m.random(), manifold=m)
    p_one = ManifoldParameter(p_ref.data.clone(), manifold=m)
    bias_ref = nn.Parameter(torch.zeros(6))
    bias_one = nn.Parameter(torch.zeros(6))
    opt_ref = TDLRT([p_ref, bias_ref], lr=0.05, tau=0.02, momentum=0.5, single_pass=False)
    opt_one = TDLRT([p_one, bias_one], lr=0.05, tau=0.02, momentum=0.5, single_pass=False)

    def loss_of(w, b):
        return (torch.tanh(w + b) - target).pow(2).sum()

    for step in range(20):
        def closure_ref():
            opt_ref.zero_grad()
            loss = loss_of(p_ref.manifold.to_dense(p_ref), bias_ref)
            loss.backward()
            return loss

        state = {}

        def closure_one():
            if not state:
                bias_one.requires_grad_(True)
                with record_layer_io([p_one]) as state["rec"]:
                    loss = loss_of(record_io(p_one, None, None, p_one.manifold.to_dense(p_one)), bias_one)
                    loss.backward()
                state["bias"], state["loss"] = bias_one.grad, loss.detach()
                return state["loss"]
            bias_one.grad = state["bias"]
            _, bases = p_one.manifold.unpack(p_one.data)
            g = augmented_core_gradient(state["rec"].records(p_one), bases)
            p_one.grad = p_one.manifold.pack(g, [torch.zeros_like(b) for b in bases])
            return state["loss"]

        opt_ref.step(closure_ref)
        opt_one.step(closure_one)
        assert p_ref.manifold.ranks == p_one.manifold.ranks
        assert _rel(p_one.data, p_ref.data) < 1e-10
        assert _rel(bias_one.data, bias_ref.data) < 1e-10 or bias_ref.abs().max() == 0
