"""Tests for the tensor-train layers (tucker_manifold/nn/tt.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tucker_manifold.nn import compression_rate
from tucker_manifold.nn.base import UnsupportedModuleError
from tucker_manifold.nn.tt import (
    TTConv2d,
    TTLinear,
    balanced_factorization,
    tt_factorize_model,
    tt_parameter_count,
    tt_rank_for_parameter_budget,
    tt_svd,
    tt_to_full,
)

DT = torch.float64
SEEDS = [0, 1, 2]


# ------------------------------------------------------------------------------------ factorization
@pytest.mark.parametrize("n,d,want", [(64, 3, (4, 4, 4)), (128, 3, (8, 4, 4)), (10, 3, (5, 2, 1)),
                                      (1, 3, (1, 1, 1)), (32, 2, (8, 4)), (7, 2, (7, 1)), (12, 1, (12,))])
def test_balanced_factorization_examples(n, d, want):
    assert balanced_factorization(n, d) == want


@pytest.mark.parametrize("n", [1, 2, 6, 30, 96, 100, 243, 256, 1000, 1024])
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_balanced_factorization_product_and_order(n, d):
    f = balanced_factorization(n, d)
    assert len(f) == d and math.prod(f) == n and list(f) == sorted(f, reverse=True)


def test_balanced_factorization_bad_input():
    with pytest.raises(ValueError, match="n must"):
        balanced_factorization(0, 2)
    with pytest.raises(ValueError, match="d must"):
        balanced_factorization(4, 0)


# ------------------------------------------------------------------------------------ TT-SVD
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(3, 4, 5), (9, 6, 4, 4), (2, 3, 2, 3, 2)])
def test_tt_svd_exact_at_full_rank(seed, shape):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, dtype=DT, generator=g)
    cores = tt_svd(t, [10**6] * (len(shape) - 1))
    assert torch.allclose(tt_to_full(cores), t, atol=1e-12, rtol=0)
    # Left-orthogonal cores: the SVD's U factors.
    for c in cores[:-1]:
        m = c.reshape(-1, c.shape[-1])
        assert torch.allclose(m.T @ m, torch.eye(m.shape[1], dtype=DT), atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_tt_svd_truncated_matches_tensorly(seed):
    # Independent implementation (tensorly, numpy backend): same ranks, same reconstruction.
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train

    g = torch.Generator().manual_seed(seed)
    t = torch.randn(6, 5, 4, 3, dtype=DT, generator=g)
    ranks = [3, 4, 2]
    ours = tt_to_full(tt_svd(t, ranks)).numpy()
    theirs = tl.tt_to_tensor(tensor_train(t.numpy(), rank=[1, *ranks, 1]))
    assert np.allclose(ours, theirs, atol=1e-10)
    assert np.linalg.norm(ours - t.numpy()) > 1e-3  # truly truncated


# ------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("seed", SEEDS)
def test_conv_weight_follows_documented_index_rule(seed):
    torch.manual_seed(seed)
    layer = TTConv2d(6, 4, (2, 3), ranks=(3, 2), n_factors=2, out_factors=(2, 2), in_factors=(3, 2)).to(DT)
    g0, g1, g2 = layer.cores  # (1, 6, r1), (r1, 2, 3, r2), (r2, 2, 2, 1)
    # W[(o1 o2), (i1 i2), h, w] = G0[0, h*kw + w, :] G1[:, o1, i1, :] G2[:, o2, i2, 0]
    s = g0[0].reshape(2, 3, -1)  # (h, w, r1)
    ref = torch.einsum("hwa,apib,bqj->pqijhw", s, g1, g2[..., 0]).reshape(4, 6, 2, 3)
    assert torch.allclose(layer.weight, ref, atol=1e-14)
    # The check is discriminating: pairing o_k with the other i-order gives another kernel.
    wrong = torch.einsum("hwa,apib,bqj->pqjihw", s, g1, g2[..., 0]).reshape(4, 6, 2, 3)
    assert not torch.allclose(layer.weight, wrong, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_linear_weight_follows_documented_index_rule(seed):
    torch.manual_seed(seed)
    layer = TTLinear(12, 6, ranks=(2, 3), n_factors=3, out_factors=(3, 2, 1), in_factors=(2, 3, 2)).to(DT)
    g1, g2, g3 = layer.cores
    ref = torch.einsum("pia,aqjb,brk->pqrijk", g1[0], g2, g3[..., 0]).reshape(6, 12)
    assert torch.allclose(layer.weight, ref, atol=1e-14)


# ------------------------------------------------------------------------------------ forward
GEOMETRIES = [
    (3, 1, 0, 1, "zeros"),
    (3, 1, 1, 1, "zeros"),
    (3, 2, 1, 1, "zeros"),
    ((3, 5), (2, 1), (1, 2), 1, "zeros"),
    ((1, 3), 1, (0, 1), (1, 2), "zeros"),
    ((2, 4), 1, "same", (1, 2), "zeros"),  # even kernel: asymmetric 'same' padding
    (3, 1, "valid", 1, "zeros"),
    (3, 1, 1, 1, "reflect"),
    (3, 1, 1, 1, "circular"),
    (1, 1, 0, 1, "zeros"),
]


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
def test_conv_forward_equals_conv2d_with_reconstructed_kernel(geom, bias):
    k, s, p, d, mode = geom
    torch.manual_seed(0)
    layer = TTConv2d(8, 6, k, ranks=3, stride=s, padding=p, dilation=d, padding_mode=mode, bias=bias, dtype=DT)
    ref = nn.Conv2d(8, 6, k, stride=s, padding=p, dilation=d, padding_mode=mode, bias=bias, dtype=DT)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        if bias:
            ref.bias.copy_(layer.bias)
    x = torch.randn(2, 8, 9, 10, dtype=DT)
    assert torch.allclose(layer(x), ref(x), atol=1e-12, rtol=0)
    assert torch.allclose(layer(x[0]), ref(x[0]), atol=1e-12, rtol=0)  # unbatched input


@pytest.mark.parametrize("mode", ["reconstructed", "contracted"])
@pytest.mark.parametrize("shape", [(24, 30, 3), (16, 9, 2), (7, 5, 2)])
def test_linear_forward_equals_f_linear(mode, shape):
    fin, fout, d = shape
    torch.manual_seed(1)
    layer = TTLinear(fin, fout, ranks=2, n_factors=d, forward_mode=mode, dtype=DT)
    for x in (torch.randn(5, fin, dtype=DT), torch.randn(2, 3, fin, dtype=DT)):
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-12, rtol=0)


def test_check_fails_on_a_perturbed_core():
    torch.manual_seed(0)
    layer = TTConv2d(4, 4, 3, ranks=2, padding=1, dtype=DT)
    x = torch.randn(1, 4, 5, 5, dtype=DT)
    w = layer.weight.detach().clone()
    with torch.no_grad():
        layer.cores[1][0, 0, 0, 0] += 1e-3
    assert (layer(x) - F.conv2d(x, w, layer.bias, padding=1)).abs().max() > 1e-7


# ------------------------------------------------------------------------------------ from_dense
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_factors", [1, 2, 3])
def test_conv_from_dense_full_rank_reproduces_dense(seed, n_factors):
    torch.manual_seed(seed)
    conv = nn.Conv2d(12, 8, 3, padding=1, stride=2, dtype=DT)
    layer = TTConv2d.from_dense(conv, ranks=10**6, n_factors=n_factors)
    x = torch.randn(3, 12, 7, 7, dtype=DT)
    assert torch.allclose(layer.weight, conv.weight, atol=1e-12, rtol=0)
    assert torch.allclose(layer(x), conv(x), atol=1e-12, rtol=0)
    assert layer.stride == (2, 2) and layer.padding == (1, 1) and layer.weight.dtype == DT


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["reconstructed", "contracted"])
def test_linear_from_dense_full_rank_reproduces_dense(seed, mode):
    torch.manual_seed(seed)
    lin = nn.Linear(24, 30, dtype=DT)
    layer = TTLinear.from_dense(lin, ranks=10**6, forward_mode=mode)
    x = torch.randn(4, 24, dtype=DT)
    assert torch.allclose(layer(x), lin(x), atol=1e-12, rtol=0)


def test_from_dense_truncated_is_the_tt_svd_and_float32_works():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3)
    layer = TTConv2d.from_dense(conv, ranks=4, n_factors=2)
    assert layer.cores[0].dtype == torch.float32 and layer.ranks == (4, 4)
    err = (layer.weight - conv.weight).norm() / conv.weight.norm()
    assert 0.0 < err.item() < 1.0
    full = TTConv2d.from_dense(conv, ranks=10**6, n_factors=2)
    assert torch.allclose(full.weight, conv.weight, atol=1e-6)


def test_from_dense_random_keeps_bias_and_mode():
    conv = nn.Conv2d(4, 6, 3, bias=True).eval()
    layer = TTConv2d.from_dense(conv, ranks=2, init="random")
    assert torch.equal(layer.bias, conv.bias) and not layer.training
    lin = nn.Linear(4, 6, bias=False)
    assert TTLinear.from_dense(lin, ranks=2, n_factors=2).bias is None


def test_random_init_variance_matches_pytorch_default():
    # Var W = 1 / (3 fan_in) in expectation; averaged over draws (single draws are heavy-tailed).
    torch.manual_seed(0)
    for make, fan_in in ((lambda: TTConv2d(16, 32, 3, ranks=4, dtype=DT), 16 * 9),
                         (lambda: TTLinear(64, 32, ranks=4, dtype=DT), 64)):
        v = np.mean([make().weight.detach().pow(2).mean().item() for _ in range(200)])
        assert abs(v * 3 * fan_in - 1.0) < 0.15


# ------------------------------------------------------------------------------------ counts, budget
def test_parameter_counts_and_rank_clamping():
    layer = TTConv2d(12, 8, 3, ranks=100, n_factors=3)  # factors out (2,2,2), in (3,2,2)
    assert layer.out_factors == (2, 2, 2) and layer.in_factors == (3, 2, 2)
    # Bonds of the merged sizes (9, 6, 4, 4): full ranks min(9, 96), min(54, 16), min(216, 4).
    assert layer.ranks == (9, 16, 4)
    sizes = (9, 6, 4, 4)
    assert layer.compressed_parameter_count() == tt_parameter_count(sizes, layer.ranks) + 8
    assert layer.dense_parameter_count() == 8 * 12 * 9 + 8
    lin = TTLinear(24, 30, ranks=(2, 3), bias=False)
    assert lin.compressed_parameter_count() == 1 * 20 * 2 + 2 * 9 * 3 + 3 * 4 * 1
    assert lin.dense_parameter_count() == 720


@pytest.mark.parametrize("layer", [nn.Conv2d(32, 64, 3), nn.Conv2d(1, 32, 3), nn.Conv2d(64, 128, 5), nn.Linear(128, 64)])
@pytest.mark.parametrize("frac", [0.02, 0.1, 0.3, 1.0])
def test_budget_rank_fits_and_is_largest(layer, frac):
    dense = layer.weight.numel()
    cost1 = TTConv2d.from_dense(layer, 1, init="random").compressed_parameter_count() if isinstance(layer, nn.Conv2d) \
        else TTLinear.from_dense(layer, 1, init="random").compressed_parameter_count()
    budget = max(int(frac * dense), cost1 - layer.bias.numel())
    r = tt_rank_for_parameter_budget(layer, budget)
    cls = TTConv2d if isinstance(layer, nn.Conv2d) else TTLinear
    weights = lambda rank: cls.from_dense(layer, rank, init="random").compressed_parameter_count() - layer.bias.numel()
    assert weights(r) <= budget
    bigger = cls.from_dense(layer, r + 1, init="random")
    if bigger.ranks != cls.from_dense(layer, r, init="random").ranks:  # not capped at full rank
        assert weights(r + 1) > budget


def test_budget_rank_bad_input():
    conv = nn.Conv2d(8, 8, 3)
    with pytest.raises(ValueError, match="params"):
        tt_rank_for_parameter_budget(conv, 3)
    with pytest.raises(ValueError, match="params"):
        tt_rank_for_parameter_budget(conv, 10.5)
    with pytest.raises(ValueError, match="layer_dense"):
        tt_rank_for_parameter_budget(nn.ReLU(), 1000)
    with pytest.raises(ValueError, match="layer_dense"):
        tt_rank_for_parameter_budget(nn.Conv2d(8, 8, 3, groups=2), 1000)
    with pytest.raises(ValueError, match="in_factors"):
        tt_rank_for_parameter_budget(conv, 1000, in_factors=(3, 3, 1))


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,name", [
    (dict(ranks=0), "ranks"),
    (dict(ranks=(2, 2)), "ranks"),  # 3 bonds for n_factors=3
    (dict(ranks=2.5), "ranks"),
    (dict(ranks=2, n_factors=0), "n_factors"),
    (dict(ranks=2, in_factors=(2, 2, 3)), "in_factors"),
    (dict(ranks=2, out_factors=(2, 4)), "out_factors"),
    (dict(ranks=2, groups=2), "groups"),
    (dict(ranks=2, padding="full"), "padding"),
    (dict(ranks=2, stride=0), "stride"),
])
def test_conv_bad_input_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TTConv2d(8, 8, 3, **kwargs)


def test_linear_and_from_dense_bad_input():
    with pytest.raises(ValueError, match="n_factors"):
        TTLinear(8, 8, ranks=2, n_factors=1)
    with pytest.raises(ValueError, match="forward_mode"):
        TTLinear(8, 8, ranks=2, forward_mode="fast")
    with pytest.raises(ValueError, match="in_features"):
        TTLinear(0, 8, ranks=2)
    with pytest.raises(ValueError, match="init"):
        TTConv2d.from_dense(nn.Conv2d(4, 4, 3), 2, init="hosvd")
    with pytest.raises(UnsupportedModuleError, match="module"):
        TTConv2d.from_dense(nn.Linear(4, 4), 2)
    with pytest.raises(UnsupportedModuleError, match="module"):
        TTLinear.from_dense(nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(ValueError, match="groups"):
        TTConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)


# ------------------------------------------------------------------------------------ training
def test_sgd_on_the_cores_reduces_a_loss():
    torch.manual_seed(0)
    model = nn.Sequential(TTConv2d(3, 8, 3, ranks=3, padding=1), nn.ReLU(), nn.Flatten(), TTLinear(8 * 36, 4, ranks=3))
    x, y = torch.randn(32, 3, 6, 6), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.7 * first


def test_tt_factorize_model_and_compression_rate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16, 4))
    model, summary = tt_factorize_model(model, ranks=10**6, return_summary=True)
    assert isinstance(model[0], TTConv2d) and isinstance(model[2], TTConv2d) and type(model[4]) is nn.Linear
    assert "4" in summary.skipped
    model2 = tt_factorize_model(nn.Sequential(nn.Linear(16, 8)), ranks=2, include_linear=True)
    assert isinstance(model2[0], TTLinear)
    small = tt_factorize_model(nn.Sequential(nn.Conv2d(16, 16, 3, bias=False)), ranks=2)
    rate = compression_rate(small)
    assert rate["conv_dense_params"] == 16 * 16 * 9
    assert rate["conv_params"] == small[0].compressed_parameter_count()
    assert 0 < rate["conv"] < 1
    with pytest.raises(ValueError, match="init"):
        tt_factorize_model(nn.Sequential(nn.Conv2d(3, 3, 3)), ranks=2, init="hosvd")
