"""Tucker layers (tucker_manifold.nn.layers) and model conversion (tucker_manifold.nn.tuckerize)."""
import copy
import io
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from geoopt import ManifoldParameter
from torch import nn

import tucker_manifold as tm
from tucker_manifold import FixedRankTucker
from tucker_manifold.nn import (
    TuckerConv2d,
    TuckerLinear,
    compression_rate,
    decaying_core,
    ranks,
    tucker_layers,
    tucker_parameters,
    tuckerize,
)
from tucker_manifold.nn.layers import valid_multilinear_ranks
from tucker_manifold.parameter import RankBounds, set_point
from tucker_manifold.tucker import unfold

DT = torch.float64
ATOL = 1e-10

# (C_in, C_out, kernel, stride, padding, dilation, bias)
CONV_CASES = [
    (3, 5, 3, 1, 0, 1, True),
    (4, 6, (3, 2), (2, 1), (1, 0), 1, False),
    (5, 4, (1, 3), 2, 2, (2, 1), True),
    (6, 6, 3, 1, "same", 2, True),
    (4, 3, 5, 3, "valid", 1, False),
    (2, 7, (2, 3), (1, 2), (0, 2), (1, 2), True),
]


def _small_ranks(c_out, c_in, kernel):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return valid_multilinear_ranks((c_out, c_in, kh, kw), (max(1, c_out - 2), max(1, c_in - 1), kh, max(1, kw - 1)))


def _conv_layer(case, mode, seed=0):
    c_in, c_out, k, s, p, d, b = case
    torch.manual_seed(seed)
    return TuckerConv2d(
        c_in, c_out, k, _small_ranks(c_out, c_in, k), stride=s, padding=p, dilation=d, bias=b,
        forward_mode=mode, dtype=DT,
    )


# ------------------------------------------------------------------------------------ forward equivalence
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("mode", ["factorized", "reconstructed"])
def test_conv_matches_dense(case, mode):
    layer = _conv_layer(case, mode)
    c_in, c_out, k, s, p, d, b = case
    x = torch.randn(2, c_in, 11, 9, dtype=DT)
    w = layer.weight.detach()
    assert w.shape == layer.shape == (c_out, c_in) + tuple(layer.kernel_size)
    ref = F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation)
    torch.testing.assert_close(layer(x), ref, atol=ATOL, rtol=0)
    dense = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=b, dtype=DT)
    with torch.no_grad():
        dense.weight.copy_(w)
        if b:
            dense.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), dense(x), atol=ATOL, rtol=0)
    # unbatched input, as nn.Conv2d accepts
    torch.testing.assert_close(layer(x[0]), dense(x[0]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["factorized", "reconstructed"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense(mode, bias):
    torch.manual_seed(0)
    layer = TuckerLinear(7, 5, 3, bias=bias, forward_mode=mode, dtype=DT)
    assert layer.ranks == (3, 3)
    w = layer.weight.detach()
    core, (u_out, u_in) = layer.core_and_factors()
    torch.testing.assert_close(w, u_out @ core @ u_in.T, atol=ATOL, rtol=0)
    for shape in [(4, 7), (2, 3, 7), (7,)]:
        x = torch.randn(*shape, dtype=DT)
        torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), atol=ATOL, rtol=0)


def test_from_dense_full_rank_reproduces_module():
    torch.manual_seed(1)
    for conv in [
        nn.Conv2d(4, 6, 3, padding=1, dtype=DT),
        nn.Conv2d(2, 32, 3, stride=2, dtype=DT),  # r_out clamps to C_in k_h k_w = 18, still exact
        nn.Conv2d(5, 3, (1, 3), bias=False, dtype=DT),
    ]:
        layer = TuckerConv2d.from_dense(conv)
        assert layer.ranks == valid_multilinear_ranks(conv.weight.shape, conv.weight.shape)
        x = torch.randn(2, conv.in_channels, 8, 8, dtype=DT)
        for mode in ["factorized", "reconstructed"]:
            layer.forward_mode = mode
            torch.testing.assert_close(layer(x), conv(x), atol=ATOL, rtol=0)
    lin = nn.Linear(6, 4, dtype=DT)
    layer = TuckerLinear.from_dense(lin)
    assert layer.ranks == (4, 4)
    x = torch.randn(3, 2, 6, dtype=DT)
    torch.testing.assert_close(layer(x), lin(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.bias, lin.bias, atol=0, rtol=0)


def test_from_dense_ranks_and_tau():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 10, 3, dtype=DT)
    layer = TuckerConv2d.from_dense(conv, ranks=(4, 3, 3, 2))
    assert layer.ranks == (4, 3, 3, 2)
    assert TuckerConv2d.from_dense(conv, ranks=5).ranks == (5, 5, 3, 3)  # int: channel modes
    r_small = TuckerConv2d.from_dense(conv, tau=0.5).ranks
    r_big = TuckerConv2d.from_dense(conv, tau=0.05).ranks
    assert r_small[2:] == (3, 3) and r_big[2:] == (3, 3)  # spatial modes are not adaptive: full rank
    assert all(a <= b for a, b in zip(r_small, r_big))
    assert TuckerConv2d.from_dense(conv, tau=0.0).ranks == (10, 8, 3, 3)
    assert TuckerConv2d.from_dense(conv, tau=0.9, rank_min=3).ranks[:2] == (3, 3)
    with pytest.raises(ValueError, match="tau"):
        TuckerConv2d.from_dense(conv, tau=-1.0)
    with pytest.raises(ValueError, match="ranks"):
        TuckerConv2d.from_dense(conv, ranks=(4, 3, 3))


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("mode", ["factorized", "reconstructed"])
def test_gradient_matches_dense_reconstruction(mode):
    torch.manual_seed(3)
    layer = TuckerConv2d(4, 5, (3, 2), (3, 3, 3, 2), stride=(2, 1), padding=1, forward_mode=mode, dtype=DT)
    p = layer.tucker_weight
    x = torch.randn(2, 4, 7, 6, dtype=DT)
    target = torch.randn_like(layer(x))
    g_layer = torch.autograd.grad(((layer(x) - target) ** 2).sum(), p)[0]
    dense = F.conv2d(x, p.manifold.to_dense(p), layer.bias, layer.stride, layer.padding, layer.dilation)
    g_dense = torch.autograd.grad(((dense - target) ** 2).sum(), p)[0]
    torch.testing.assert_close(g_layer, g_dense, atol=1e-10, rtol=1e-10)

    lin = TuckerLinear(6, 4, 3, forward_mode=mode, dtype=DT)
    q = lin.tucker_weight
    x = torch.randn(5, 6, dtype=DT)
    g1 = torch.autograd.grad(lin(x).pow(2).sum(), q)[0]
    g2 = torch.autograd.grad(F.linear(x, q.manifold.to_dense(q), lin.bias).pow(2).sum(), q)[0]
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------ rank changes
def test_set_point_changes_ranks_in_place():
    torch.manual_seed(4)
    layer = TuckerConv2d(6, 8, 3, (4, 4, 3, 3), padding=1, dtype=DT)
    p = layer.tucker_weight
    m2 = FixedRankTucker(layer.shape, (2, 5, 2, 3))
    x2 = m2.random(dtype=DT)
    layer.set_point(x2, m2)
    assert layer.tucker_weight is p and p.manifold is m2 and layer.ranks == (2, 5, 2, 3)
    assert layer.tucker_ranks.tolist() == [2, 5, 2, 3]
    x = torch.randn(2, 6, 7, 7, dtype=DT)
    ref = F.conv2d(x, m2.to_dense(x2), layer.bias, padding=1)
    for mode in ["factorized", "reconstructed"]:
        layer.forward_mode = mode
        torch.testing.assert_close(layer(x), ref, atol=ATOL, rtol=0)
    x2.zero_()  # set_point copies its input
    assert p.abs().sum() > 0
    with pytest.raises(ValueError, match="shape"):
        layer.set_point(FixedRankTucker((8, 6, 3, 2), (2, 2, 2, 2)).random(dtype=DT), FixedRankTucker((8, 6, 3, 2), (2, 2, 2, 2)))
    with pytest.raises(ValueError, match="packed"):
        layer.set_point(torch.zeros(3, dtype=DT), m2)


def test_contract_set_point_is_recorded_in_the_state_dict():
    layer = TuckerConv2d(6, 8, 3, (4, 4, 3, 3), dtype=DT)
    m2 = FixedRankTucker(layer.shape, (3, 2, 3, 3))
    core, factors = m2.unpack(m2.random(dtype=DT))
    set_point(layer.tucker_weight, core, factors)  # what an optimizer does: no callback into the layer
    assert layer.ranks == (3, 2, 3, 3)
    assert layer.state_dict()["tucker_ranks"].tolist() == [3, 2, 3, 3]
    assert layer.tucker_ranks.tolist() == [3, 2, 3, 3]  # the pre-hook wrote the buffer itself


def test_state_dict_with_changed_ranks_loads_into_fresh_model():
    def build():
        torch.manual_seed(5)
        return nn.Sequential(
            TuckerConv2d(3, 8, 3, (4, 3, 3, 3), padding=1, dtype=DT),
            nn.ReLU(),
            nn.Flatten(),
            TuckerLinear(8 * 5 * 5, 4, 3, dtype=DT),
        )

    model = build()
    for layer, new_ranks in [(model[0], (6, 2, 3, 2)), (model[3], (2, 2))]:
        m = FixedRankTucker(layer.shape, new_ranks)
        layer.set_point(m.random(dtype=DT), m)
    # A change made behind the layer's back (no set_point) is still saved correctly.
    m = FixedRankTucker(model[3].shape, (4, 4))
    model[3].tucker_weight.data = m.random(dtype=DT)
    model[3].tucker_weight.manifold = m
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)

    fresh = build()
    params_before = [id(p) for p in fresh.parameters()]
    fresh.load_state_dict(torch.load(buf))
    assert [id(p) for p in fresh.parameters()] == params_before  # resized in place
    assert tm.nn.ranks(fresh) == {"0": (6, 2, 3, 2), "3": (4, 4)}
    x = torch.randn(2, 3, 5, 5, dtype=DT)
    assert torch.equal(fresh(x), model(x))
    for (_, a), (_, b) in zip(tucker_layers(fresh), tucker_layers(model)):
        assert torch.equal(a.tucker_weight, b.tucker_weight)
        assert a.tucker_weight.bounds == b.tucker_weight.bounds


def test_deepcopy_and_pickle_keep_parameter_attributes():
    layer = TuckerConv2d(4, 6, 3, 2, rank_max=5, dtype=DT)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for other in [copy.deepcopy(layer), torch.load(buf, weights_only=False)]:
        p = other.tucker_weight
        assert isinstance(p, ManifoldParameter) and p is not layer.tucker_weight
        assert p.bounds == RankBounds((1, 1, 1, 1), (5, 4, 3, 3), (True, True, False, False))
        m = FixedRankTucker(other.shape, (3, 3, 3, 3))
        core, factors = m.unpack(m.random(dtype=DT))
        set_point(p, core, factors)  # the copy's hooks act on the copy, not on the original
        assert other.state_dict()["tucker_ranks"].tolist() == [3, 3, 3, 3]
        assert layer.state_dict()["tucker_ranks"].tolist() == [2, 2, 3, 3] and layer.ranks == (2, 2, 3, 3)


# ------------------------------------------------------------------------------------ construction
def test_parameter_carries_rank_attributes():
    conv = TuckerConv2d(8, 16, 3, 4)
    p = conv.tucker_weight
    assert isinstance(p, ManifoldParameter) and isinstance(p.manifold, FixedRankTucker)
    assert [n for n, _ in conv.named_parameters()] == ["tucker_weight", "bias"]
    assert p.manifold.ranks == conv.ranks == (4, 4, 3, 3) and p.shape == (p.manifold.packed_size,)
    assert p.bounds == RankBounds((1, 1, 1, 1), (16, 8, 3, 3), (True, True, False, False))
    conv = TuckerConv2d(8, 16, 3, 4, rank_min=2, rank_max=(10, 6, 3, 3), adaptive_modes=(True, True, True, False))
    p = conv.tucker_weight
    assert p.bounds == RankBounds((2, 2, 2, 1), (10, 6, 3, 3), (True, True, True, False))
    lin = TuckerLinear(10, 6, 4, rank_max=5)
    q = lin.tucker_weight
    assert q.bounds == RankBounds((1, 1), (5, 5), (True, True))
    with pytest.raises(ValueError, match="rank"):
        TuckerConv2d(8, 16, 3, 4, rank_min=(5, 1, 1, 1), rank_max=(4, 8, 3, 3))
    with pytest.raises(ValueError, match="adaptive_modes"):
        TuckerConv2d(8, 16, 3, 4, adaptive_modes=(True, True))


def test_invalid_layer_arguments():
    with pytest.raises(ValueError, match="groups.*not supported"):
        TuckerConv2d(4, 4, 3, 2, groups=2)
    with pytest.raises(ValueError, match="padding_mode"):
        TuckerConv2d(4, 4, 3, 2, padding_mode="reflect")
    with pytest.raises(ValueError, match="same"):
        TuckerConv2d(4, 4, 3, 2, padding="same", stride=2)
    with pytest.raises(ValueError, match="forward_mode"):
        TuckerConv2d(4, 4, 3, 2, forward_mode="fast")
    with pytest.raises(ValueError, match="ranks"):
        TuckerConv2d(4, 8, 3, (8, 1, 2, 2))  # r_out = 8 > r_in r_h r_w = 4
    with pytest.raises(ValueError, match="ranks"):
        TuckerLinear(4, 8, (3, 2))
    with pytest.raises(ValueError, match="groups"):
        TuckerConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))


def test_default_init_variance():
    torch.manual_seed(6)
    conv = TuckerConv2d(64, 64, 3, 16)
    dense = nn.Conv2d(64, 64, 3)
    fan_in = 64 * 9
    w = conv.weight.detach()
    assert abs(w.var().item() * 3 * fan_in - 1) < 0.15
    assert abs(dense.weight.var().item() * 3 * fan_in - 1) < 0.15
    assert conv.bias.abs().max() <= 1 / math.sqrt(fan_in)
    lin = TuckerLinear(256, 128, 32)
    assert abs(lin.weight.detach().var().item() * 3 * 256 - 1) < 0.15
    for layer in (conv, lin):
        _, factors = layer.core_and_factors()
        for u in factors:
            torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)


def test_chosen_forward():
    big = TuckerConv2d(256, 256, 3, (16, 16, 3, 3))
    assert big.chosen_forward() == "factorized"
    assert big.chosen_forward((8, 256, 16, 16)) == "factorized"
    small = TuckerConv2d(3, 8, 3, (8, 3, 3, 3))
    assert small.chosen_forward() == "reconstructed"
    assert small.chosen_forward((8, 3, 32, 32)) == "reconstructed"
    small.forward_mode = "factorized"
    assert small.chosen_forward() == "factorized"
    assert "forward_mode=auto:factorized" in repr(big) and "ranks=(16, 16, 3, 3)" in repr(big)
    assert TuckerLinear(512, 512, 16).chosen_forward() == "factorized"
    assert TuckerLinear(4, 4, 4).chosen_forward() == "reconstructed"


def test_parameter_counts():
    conv = TuckerConv2d(8, 16, 3, (4, 5, 3, 2))
    assert conv.compressed_parameter_count() == 4 * 5 * 3 * 2 + 16 * 4 + 8 * 5 + 3 * 3 + 3 * 2 + 16
    assert conv.compressed_parameter_count() == sum(p.numel() for p in conv.parameters())
    assert conv.dense_parameter_count() == 16 * 8 * 9 + 16
    lin = TuckerLinear(10, 6, 3, bias=False)
    assert lin.compressed_parameter_count() == 9 + 30 + 18
    assert lin.dense_parameter_count() == 60


def test_decaying_core_spectra():
    g = torch.Generator().manual_seed(0)
    q = 0.5
    for rk in [(4, 4, 4, 4), (16, 16, 3, 3), (8, 3, 3, 3), (6, 4, 3, 2), (5, 5)]:
        core = decaying_core(rk, q, scale=2.0, generator=g, dtype=DT)
        assert core.shape == rk
        for i, r in enumerate(rk):
            s = torch.linalg.svdvals(unfold(core, i))
            assert s.shape[0] == r and s[-1] > 0
            assert s[-1] / s[0] == pytest.approx(q ** (r - 1), rel=0.05)
            if len(set(rk)) == 1:  # equal ranks: exactly scale * q**k
                torch.testing.assert_close(s, 2.0 * q ** torch.arange(r, dtype=DT), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="q"):
        decaying_core((2, 2), 0.0)


def test_reinit_decaying():
    layer = TuckerConv2d(16, 16, 3, (8, 8, 3, 3), dtype=DT)
    p = layer.tucker_weight
    layer.reinit_decaying(0.5, generator=torch.Generator().manual_seed(1))
    assert layer.tucker_weight is p and layer.ranks == (8, 8, 3, 3)
    w = layer.weight.detach()
    assert torch.linalg.vector_norm(w).item() == pytest.approx(math.sqrt(16 * 16 * 9 / (3 * 16 * 9)), rel=1e-10)
    s = torch.linalg.svdvals(unfold(w, 0))
    assert (s[7] / s[0]).item() == pytest.approx(0.5**7, rel=0.05)
    assert p.manifold.check_point_on_manifold(p.detach())


# ------------------------------------------------------------------------------------ tuckerize
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2),
            nn.Conv2d(16, 16, 3, groups=4),  # grouped: left alone
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def _model():
    torch.manual_seed(7)
    return SmallCNN().double()


def test_tuckerize_replaces_the_right_modules():
    model = _model()
    x = torch.randn(2, 3, 12, 12, dtype=DT)
    model = tuckerize(model, rank_fraction=1.0)
    assert isinstance(model.features[0], TuckerConv2d) and isinstance(model.features[2], TuckerConv2d)
    assert type(model.features[3]) is nn.Conv2d and type(model.fc) is nn.Linear
    assert set(ranks(model)) == {"features.0", "features.2"}
    assert model.features[0].tucker_weight.bounds.adaptive == (True, True, False, False)
    assert len(tucker_parameters(model)) == 2 and [n for n, _ in tucker_layers(model)] == ["features.0", "features.2"]
    # full rank (clamped to valid: 8 <= 3*3*3) reproduces the dense model
    ref = _model()
    torch.testing.assert_close(model(x), ref(x), atol=1e-10, rtol=0)

    model = tuckerize(_model(), rank_fraction=0.5, linear=True)
    assert isinstance(model.fc, TuckerLinear)
    assert ranks(model) == {"features.0": (4, 2, 3, 3), "features.2": (8, 4, 3, 3), "fc": (5, 5)}
    assert model.fc.tucker_weight.dtype == DT


def test_tuckerize_include_exclude():
    m = tuckerize(_model(), ranks=2, include=["features.2"])
    assert set(ranks(m)) == {"features.2"}
    m = tuckerize(_model(), ranks=2, include=["features"], exclude=["features.0"])
    assert set(ranks(m)) == {"features.2"}
    m = tuckerize(_model(), ranks=2, linear=True, include=[nn.Linear])
    assert set(ranks(m)) == {"fc"}
    m = tuckerize(_model(), ranks=2, linear=True, exclude=[nn.Conv2d])
    assert set(ranks(m)) == {"fc"}
    m = tuckerize(_model(), ranks=2, linear=True, include=["fc", "features.0"], exclude=["fc"])
    assert set(ranks(m)) == {"features.0"}
    with pytest.raises(ValueError, match="include"):
        tuckerize(_model(), ranks=2, include=["features.9"])
    with pytest.raises(ValueError, match="include"):
        tuckerize(_model(), ranks=2, include=["fc"])  # linear=False
    with pytest.raises(ValueError, match="exclude"):
        tuckerize(_model(), ranks=2, exclude=["nope"])


def test_tuckerize_rank_rules():
    m = tuckerize(_model(), ranks=(6, 3, 2, 3))
    assert ranks(m) == {"features.0": (6, 3, 2, 3), "features.2": (6, 3, 2, 3)}
    m = tuckerize(_model(), ranks=20)  # clamped to n_i and to a valid multilinear rank
    assert ranks(m) == {"features.0": (8, 3, 3, 3), "features.2": (16, 8, 3, 3)}
    m = tuckerize(_model(), rank_fraction=0.5, adapt="all")
    assert ranks(m) == {"features.0": (4, 2, 2, 2), "features.2": (8, 4, 2, 2)}
    m = tuckerize(_model(), rank_fraction=0.3, adapt="all")  # (3,1,1,1), (5,3,1,1) lowered to valid ranks
    assert ranks(m) == {"features.0": (1, 1, 1, 1), "features.2": (3, 3, 1, 1)}
    assert m.features[2].tucker_weight.bounds.adaptive == (True,) * 4
    m = tuckerize(_model(), rank_fraction=0.5, rank_min=3, rank_max=6)
    assert ranks(m) == {"features.0": (4, 3, 3, 3), "features.2": (6, 4, 3, 3)}
    assert m.features[2].tucker_weight.bounds.rmin == (3, 3, 1, 1)
    assert m.features[2].tucker_weight.bounds.rmax == (6, 6, 3, 3)
    m = tuckerize(_model())  # default rank_fraction=0.5
    assert ranks(m) == {"features.0": (4, 2, 3, 3), "features.2": (8, 4, 3, 3)}
    m = tuckerize(_model(), rank_fraction=0.5, init="random")
    assert ranks(m) == {"features.0": (4, 2, 3, 3), "features.2": (8, 4, 3, 3)}
    prev = None
    for tau in [0.0, 0.05, 0.2, 0.5, 0.9]:
        r = ranks(tuckerize(_model(), tau=tau, linear=True))
        assert all(v[2:] == (3, 3) for k, v in r.items() if k != "fc")
        if prev is not None:
            assert all(a <= b for k in r for a, b in zip(r[k], prev[k]))
        prev = r
    assert prev["features.2"][0] < 16


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(ranks=2, tau=0.1), "tau"),
        (dict(ranks=2, rank_fraction=0.5), "rank_fraction"),
        (dict(ranks=-1), "ranks"),
        (dict(ranks=(2, 2, 2)), "ranks"),
        (dict(rank_fraction=1.5), "rank_fraction"),
        (dict(rank_fraction=0.0), "rank_fraction"),
        (dict(tau=-0.1), "tau"),
        (dict(tau=0.1, init="random"), "init"),
        (dict(init="svd"), "init"),
        (dict(adapt="spatial"), "adapt"),
        (dict(rank_min=0), "rank_min"),
        (dict(rank_min=5, rank_max=3), "rank_min"),
        (dict(forward_mode="x"), "forward_mode"),
        (dict(include=[3]), "include"),
    ],
)
def test_tuckerize_invalid_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        tuckerize(_model(), **kwargs)


def test_tuckerize_shared_module_and_root():
    conv = nn.Conv2d(4, 4, 3)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    model = tuckerize(model, ranks=2)
    assert model[0] is model[2] and isinstance(model[0], TuckerConv2d)
    root = tuckerize(nn.Conv2d(4, 6, 3), ranks=2)
    assert isinstance(root, TuckerConv2d)


def test_tuckerize_summary_says_what_was_skipped_and_why(caplog):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, padding_mode="reflect"),
        nn.Conv2d(8, 4, 1), nn.Linear(4, 4), nn.MultiheadAttention(4, 2), nn.BatchNorm2d(4),
    ).double()
    with caplog.at_level("INFO", logger="tucker_manifold.nn.tuckerize"):
        out, summary = tuckerize(model, ranks=2, exclude=["4"], return_summary=True)
    assert out is model and isinstance(model[0], TuckerConv2d)
    assert summary.converted == {"0": "Conv2d -> TuckerConv2d"}
    assert set(summary.skipped) == {"1", "2", "3", "4", "5", "6.out_proj"}  # no BatchNorm, no container
    assert "unsupported type ConvTranspose2d" in summary.skipped["1"]
    assert "groups=2" in summary.skipped["2"] and "padding_mode" in summary.skipped["3"]
    assert summary.skipped["4"] == "excluded"
    assert "linear=True" in summary.skipped["5"]
    assert "MultiheadAttention" in summary.skipped["6.out_proj"]
    assert "converted 1 module(s), skipped 6" in caplog.text and "unsupported type ConvTranspose2d" in caplog.text
    # the default return value is the model alone; an already converted layer is reported as such
    again, summary = tuckerize(model, ranks=2, linear=True, return_summary=True)
    assert again is model and "already a factorized layer" in summary.skipped["0"] and "5" in summary.converted
    assert tuckerize(nn.Sequential(nn.Conv2d(2, 2, 1)), ranks=1).__class__ is nn.Sequential


def test_tuckerize_selects_by_regex_and_type_like_factorize_model():
    import re

    m, summary = tuckerize(_model(), ranks=2, linear=True, include=[re.compile(r"features\.\d")], return_summary=True)
    assert set(ranks(m)) == {"features.0", "features.2"} and summary.skipped["fc"] == "not selected by include"
    m = tuckerize(_model(), ranks=2, linear=True, exclude=re.compile(r".*\.2|fc"))
    assert set(ranks(m)) == {"features.0"}
    with pytest.raises(ValueError, match="include"):
        tuckerize(_model(), ranks=2, include=[re.compile("nothing.*")])
    with pytest.raises(ValueError, match="exclude"):
        tuckerize(_model(), ranks=2, exclude=[re.compile("nothing.*")])
    # the baselines' conversion selects modules with the same engine and the same rules
    f, fsum = tm.nn.factorize_model(
        _model(), "matrix", rank=2, include_linear=True, include=[re.compile(r"features\.\d")], return_summary=True
    )
    assert set(fsum.converted) == set(summary.converted) == {"features.0", "features.2"}
    assert fsum.skipped.keys() == summary.skipped.keys()


def test_subclasses_of_dense_layers_are_not_converted():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyConv(3, 4, 3))
    _, summary = tuckerize(model, ranks=2, return_summary=True)
    assert type(model[0]) is MyConv and "subclass" in summary.skipped["0"]


def test_load_state_dict_assign_keeps_tucker_parameter():
    def build(seed):
        torch.manual_seed(seed)
        return nn.Sequential(TuckerConv2d(3, 8, 3, (4, 3, 3, 3), padding=1, rank_max=6, dtype=DT), nn.Flatten(),
                             TuckerLinear(8 * 4 * 4, 3, 2, dtype=DT))

    model = build(0)
    for layer, r in [(model[0], (6, 2, 3, 2)), (model[2], (3, 3))]:
        m = FixedRankTucker(layer.shape, r)
        set_point(layer.tucker_weight, *m.unpack(m.random(dtype=DT)))
    sd = model.state_dict()
    fresh = build(1)
    fresh.load_state_dict(sd, assign=True)
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    assert torch.equal(fresh(x), model(x))
    for a, b in zip(tm.nn.tucker_layers(fresh), tm.nn.tucker_layers(model)):
        p = a[1].tucker_weight
        assert isinstance(p, tm.parameter.TuckerParameter) and p.manifold.ranks == b[1].ranks
        assert p.bounds == b[1].tucker_weight.bounds
        assert p.data_ptr() == sd[a[0] + ".tucker_weight"].data_ptr()  # assigned, not copied
    assert tm.nn.ranks(fresh) == {"0": (6, 2, 3, 2), "2": (3, 3)}
    # ... and it still trains with TDLRT
    opt = tm.optim.TDLRT(fresh.parameters(), lr=0.1, tau=0.1)

    def closure():
        opt.zero_grad()
        loss = fresh(x).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert fresh.state_dict()["0.tucker_ranks"].tolist() == list(fresh[0].ranks)


def test_load_state_dict_with_invalid_ranks_reports_an_error():
    layer = TuckerConv2d(3, 8, 3, 2, dtype=DT)
    sd = layer.state_dict()
    sd["tucker_ranks"] = torch.tensor([8, 1, 1, 1])
    with pytest.raises(RuntimeError, match="cannot resize"):
        layer.load_state_dict(sd)
    sd = layer.state_dict()
    del sd["tucker_ranks"]
    other = TuckerConv2d(3, 8, 3, 2, dtype=DT)
    missing = other.load_state_dict(sd, strict=False).missing_keys
    assert missing == ["tucker_ranks"] and torch.equal(other.tucker_weight, layer.tucker_weight)


def test_deepcopy_and_pickle_of_a_model_after_rank_changes():
    def build():
        return nn.Sequential(TuckerConv2d(3, 6, 3, 2, dtype=DT), nn.Flatten(), TuckerLinear(6 * 2 * 3, 2, 2, dtype=DT))

    model = build()
    m = FixedRankTucker(model[0].shape, (5, 3, 2, 3))
    set_point(model[0].tucker_weight, *m.unpack(m.random(dtype=DT)))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    x = torch.randn(2, 3, 4, 5, dtype=DT)
    for other in [copy.deepcopy(model), torch.load(buf, weights_only=False)]:
        assert torch.equal(other(x), model(x)) and other[0].ranks == (5, 3, 2, 3)
        assert other.state_dict()["0.tucker_ranks"].tolist() == [5, 3, 2, 3]
        fresh = build()
        fresh.load_state_dict(other.state_dict())
        assert torch.equal(fresh(x), model(x))
        other.load_state_dict(build().state_dict())
        assert other[0].ranks == (2, 2, 3, 3) and model[0].ranks == (5, 3, 2, 3)  # the copy's hooks act on the copy


def test_factorized_layer_base_api():
    conv = nn.Conv2d(4, 6, 3, bias=True).double()
    lin = nn.Linear(5, 3).double()
    layers = [
        TuckerConv2d.from_dense(conv, ranks=2), tm.nn.CPConv2d.from_dense(conv, 3), tm.nn.MatrixConv2d.from_dense(conv, 2),
        TuckerLinear.from_dense(lin, ranks=2), tm.nn.MatrixLinear.from_dense(lin, 2),
    ]
    for layer in layers:
        assert isinstance(layer, tm.nn.FactorizedLayer)
        dense = conv if layer.is_conv else lin
        assert layer.shape == tuple(dense.weight.shape) and layer.weight.shape == dense.weight.shape
        assert layer.dense_parameter_count() == dense.weight.numel() + dense.bias.numel()
        assert layer.compressed_parameter_count() == sum(p.numel() for p in layer.parameters())
        assert tm.nn.is_conv_layer(layer) == layer.is_conv == isinstance(dense, nn.Conv2d)
        torch.testing.assert_close(layer.bias, dense.bias)
    assert [lay.ranks for lay in layers] == [(2, 2, 3, 3), (3,), (2,), (2, 2), (2,)]
    assert tm.nn.is_conv_layer(nn.Conv2d(1, 1, 1)) and tm.nn.is_conv_layer(nn.Conv1d(1, 1, 1))  # every ConvNd
    assert not tm.nn.is_conv_layer(nn.ConvTranspose2d(1, 1, 1))
    assert not tm.nn.is_conv_layer(nn.Linear(1, 1))


@pytest.mark.parametrize("cls, extra", [(TuckerConv2d, dict(ranks=2)), (tm.nn.CPConv2d, dict(rank=2)), (tm.nn.MatrixConv2d, dict(rank=2))])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(groups=2), "groups=2 is not supported by {cls} (only groups=1)"),
        (dict(padding="same", stride=2), "padding='same' is not supported for strided convolutions"),
        (dict(padding=-1), "padding entries must be >= 0"),
        (dict(stride=0), "stride entries must be >= 1"),
        (dict(kernel_size=(3, 3, 3)), "kernel_size must be an int or a pair of ints"),
        (dict(in_channels=0), "in_channels must be a positive int"),
        (dict(padding_mode="mirror"), "padding_mode must be one of"),
    ],
)
def test_one_conv_argument_parser_for_every_factorized_conv(cls, extra, kwargs, message):
    args = dict(in_channels=4, out_channels=4, kernel_size=3, **extra)
    args.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message.format(cls=cls.__name__))):
        cls(**args)


def test_from_dense_rejects_the_wrong_module_type_the_same_way():
    for cls, wrong in [(TuckerConv2d, nn.Linear(3, 3)), (tm.nn.CPConv2d, nn.Linear(3, 3)),
                       (TuckerLinear, nn.Conv2d(3, 3, 1)), (tm.nn.MatrixLinear, nn.Conv2d(3, 3, 1))]:
        with pytest.raises(ValueError, match=f"module must be an nn.* for {cls.__name__}.from_dense") as e:
            cls.from_dense(wrong, 1)
        assert isinstance(e.value, TypeError)


# ------------------------------------------------------------------------------------ compression_rate
class FakeCPConv2d(tm.nn.FactorizedLayer):
    """Stands in for a baseline: a FactorizedLayer that says it is a convolution."""

    is_conv = True

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(10))
        self.inner = nn.Conv2d(2, 2, 1)  # not visited: the module accounts for itself

    def dense_parameter_count(self):
        return 100


def test_compression_rate_hand_computed():
    model = nn.Sequential(
        TuckerConv2d(4, 8, 3, (2, 3, 3, 2)),  # 0
        nn.BatchNorm2d(8),  # 1
        nn.Conv2d(8, 8, 1),  # 2
        FakeCPConv2d(),  # 3
        nn.Flatten(),
        TuckerLinear(8, 5, 2, bias=False),  # 5
        nn.Linear(5, 3),  # 6
    )
    t_comp = 2 * 3 * 3 * 2 + 8 * 2 + 4 * 3 + 3 * 3 + 3 * 2 + 8  # 69
    t_dense = 8 * 4 * 9 + 8  # 296
    conv_dense_1x1 = 8 * 8 + 8  # 72
    fake_comp = 10 + 2 * 2 + 2  # own parameters incl. those of its children
    conv_params = t_comp + conv_dense_1x1 + fake_comp
    conv_dense = t_dense + conv_dense_1x1 + 100
    lin_comp, lin_dense = 4 + 16 + 10, 40
    other = 16 + 5 * 3 + 3  # BatchNorm affine + dense Linear
    r = compression_rate(model)
    assert r["conv_params"] == conv_params and r["conv_dense_params"] == conv_dense
    assert r["total_params"] == conv_params + lin_comp + other
    assert r["total_params"] == sum(p.numel() for p in model.parameters())
    assert r["total_dense_params"] == conv_dense + lin_dense + other
    assert r["conv"] == pytest.approx(1 - conv_params / conv_dense)
    assert r["total"] == pytest.approx(1 - r["total_params"] / r["total_dense_params"])
    dense = compression_rate(_model())
    assert dense["conv"] == 0.0 and dense["total"] == 0.0


def test_compression_rate_with_baselines():
    baselines = pytest.importorskip("tucker_manifold.nn.baselines")
    layer = baselines.MatrixConv2d.from_dense(nn.Conv2d(8, 8, 3), rank=2)
    r = compression_rate(nn.Sequential(layer))
    assert r["conv_params"] == sum(p.numel() for p in layer.parameters())
    assert r["conv_dense_params"] == layer.dense_parameter_count() == 8 * 8 * 9 + 8


# ------------------------------------------------------------------------------------ global state
def test_import_does_not_change_tensorly_backend():
    code = (
        "import tensorly as tl; tl.set_backend('numpy');"
        "import torch, tucker_manifold, tucker_manifold.nn as tn;"
        "l = tn.TuckerConv2d(3, 4, 3, 2, forward_mode='reconstructed'); l(torch.randn(1, 3, 5, 5));"
        "assert tl.get_backend() == 'numpy', tl.get_backend()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
