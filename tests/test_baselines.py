"""Tests for the baseline factorized layers (CP / matrix conv and linear) and factorize_model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tucker_manifold.nn.baselines import (
    CPConv2d,
    CPLinear,
    MatrixConv2d,
    MatrixLinear,
    factorize_model,
    rank_for_parameter_budget,
)

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # These tensors are tiny; intra-op threads only add contention on a loaded 2-core machine
    # (observed 5-10x slowdowns), so run this module single-threaded and restore afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

# (kernel_size, stride, padding, dilation)
GEOMETRIES = [
    (3, 1, 0, 1),
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    ((3, 5), (2, 1), (1, 2), 1),
    ((1, 3), 1, (0, 1), (1, 2)),
    ((5, 2), 3, (2, 0), (2, 1)),
    ((2, 4), 1, "same", (1, 2)),  # even kernel -> asymmetric 'same' padding
    (3, 1, "valid", 1),
    (1, 1, 0, 1),
]


def _dense_ref(layer, x: torch.Tensor) -> torch.Tensor:
    """Dense conv with the layer's reconstructed kernel, via nn.Conv2d for exact padding semantics."""
    ref = nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
        dilation=layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode,
    ).to(DT)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref(x)


@pytest.mark.parametrize("cls", [CPConv2d, MatrixConv2d])
@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")  # from the dense reference only
def test_conv_forward_equals_dense_reconstruction(cls, geom):
    torch.manual_seed(0)
    k, s, p, d = geom
    layer = cls(3, 5, k, rank=3, stride=s, padding=p, dilation=d, dtype=DT)
    x = torch.randn(2, 3, 11, 12, dtype=DT)
    y = layer(x)
    if p not in ("same", "valid"):
        ref = F.conv2d(x, layer.weight, layer.bias, stride=s, padding=p, dilation=d)
    else:
        ref = _dense_ref(layer, x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=0)
    assert layer.weight.shape == (5, 3, *((k, k) if isinstance(k, int) else k))


@pytest.mark.parametrize("cls", [CPConv2d, MatrixConv2d])
@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_conv_padding_modes_and_no_bias(cls, padding_mode):
    torch.manual_seed(1)
    layer = cls(4, 6, (3, 2), rank=2, stride=(1, 2), padding=(1, 1), bias=False,
                padding_mode=padding_mode, dtype=DT)
    x = torch.randn(2, 4, 9, 8, dtype=DT)
    torch.testing.assert_close(layer(x), _dense_ref(layer, x), atol=1e-10, rtol=0)
    # Unbatched input works too.
    torch.testing.assert_close(layer(x[0]), layer(x)[0], atol=1e-12, rtol=0)


def test_linear_forward_and_alias():
    torch.manual_seed(0)
    assert CPLinear is MatrixLinear
    layer = MatrixLinear(7, 5, rank=3, dtype=DT)
    x = torch.randn(4, 2, 7, dtype=DT)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-12, rtol=0)
    assert layer.weight.shape == (5, 7)


# ---------------------------------------------------------------------------------------------
# from_dense
# ---------------------------------------------------------------------------------------------


def test_matrix_conv_from_dense_full_rank_is_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, (3, 2), stride=2, padding=1).to(DT)
    full = min(8, 3 * 3 * 2)
    layer = MatrixConv2d.from_dense(conv, full)
    x = torch.randn(2, 3, 10, 9, dtype=DT)
    torch.testing.assert_close(layer(x), conv(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.bias, conv.bias)
    # Truncated: error equals the tail of the singular values (Eckart-Young).
    s = torch.linalg.svdvals(conv.weight.detach().reshape(8, -1))
    low = MatrixConv2d.from_dense(conv, 3)
    err = (low.weight - conv.weight).norm()
    torch.testing.assert_close(err, s[3:].norm(), atol=1e-10, rtol=0)
    # Singular values are split evenly between the factors.
    torch.testing.assert_close(low.A.norm(dim=0), low.B.norm(dim=0), atol=1e-10, rtol=0)


def test_matrix_linear_from_dense_full_rank_is_exact_float32():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    layer = MatrixLinear.from_dense(lin, 4)
    assert layer.A.dtype == torch.float32
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), lin(x), atol=1e-5, rtol=1e-5)
    no_bias = MatrixLinear.from_dense(nn.Linear(6, 4, bias=False), 2)
    assert no_bias.bias is None


def test_cp_conv_from_dense_error_decreases_with_rank():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).to(DT)
    w = conv.weight.detach()
    errs = []
    for r in (1, 4, 12, 36):
        layer = CPConv2d.from_dense(conv, r)
        errs.append(((layer.weight - w).norm() / w.norm()).item())
        torch.testing.assert_close(layer.bias, conv.bias)
        # Balanced absorption of the CP weights: equal column norms across the four factors.
        norms = torch.stack([f.norm(dim=0) for f in layer.factors])
        torch.testing.assert_close(norms, norms[:1].expand_as(norms), atol=1e-8, rtol=1e-8)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.2, errs
    # The forward still matches its own reconstruction.
    x = torch.randn(2, 4, 7, 7, dtype=DT)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, padding=1), atol=1e-10, rtol=0)


def test_cp_conv_from_dense_exact_cp_kernel_is_recovered():
    torch.manual_seed(3)
    src = CPConv2d(3, 4, 3, rank=2, dtype=DT)
    conv = nn.Conv2d(3, 4, 3).to(DT)
    with torch.no_grad():
        conv.weight.copy_(src.weight)
    layer = CPConv2d.from_dense(conv, 2, n_iter_max=500)
    rel = (layer.weight - conv.weight).norm() / conv.weight.norm()
    assert rel < 1e-4


def test_cp_from_dense_does_not_touch_global_tensorly_backend():
    import tensorly as tl

    before = tl.get_backend()
    CPConv2d.from_dense(nn.Conv2d(2, 3, 3), 2)
    assert tl.get_backend() == before


def test_cp_from_dense_nan_kernel_raises_runtime_error():
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="CP decomposition"):
        CPConv2d.from_dense(conv, 2)


@pytest.mark.parametrize("cls", [CPConv2d, MatrixConv2d])
def test_from_dense_random_init_copies_bias_and_geometry(cls):
    conv = nn.Conv2d(3, 5, (3, 1), stride=(2, 1), padding=(1, 0), dilation=2)
    layer = cls.from_dense(conv, 2, init="random")
    assert (layer.stride, layer.padding, layer.dilation, layer.kernel_size) == (
        conv.stride, conv.padding, conv.dilation, conv.kernel_size)
    torch.testing.assert_close(layer.bias, conv.bias)
    x = torch.randn(1, 3, 8, 8)
    assert layer(x).shape == conv(x).shape


@pytest.mark.parametrize("make", [
    lambda r: CPConv2d(32, 64, 3, rank=r),
    lambda r: MatrixConv2d(32, 64, 3, rank=r),
    lambda r: MatrixLinear(288, 64, rank=r),
])
def test_random_init_variance_matches_pytorch_default(make):
    torch.manual_seed(0)
    fan_in = 288
    ratios = [make(16).weight.detach().var().item() * 3 * fan_in for _ in range(5)]
    ratio = sum(ratios) / len(ratios)
    assert 0.5 < ratio < 2.0, ratios


def test_from_dense_type_and_group_errors():
    with pytest.raises(TypeError):
        MatrixConv2d.from_dense(nn.Linear(3, 3), 1)
    with pytest.raises(TypeError):
        MatrixLinear.from_dense(nn.Conv2d(3, 3, 1), 1)
    with pytest.raises(ValueError, match="groups"):
        CPConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2), 2)
    with pytest.raises(ValueError, match="init"):
        MatrixConv2d.from_dense(nn.Conv2d(4, 4, 3), 2, init="bogus")


# ---------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_counts(bias):
    o, c, kh, kw, r = 7, 5, 3, 2, 4
    cp = CPConv2d(c, o, (kh, kw), r, bias=bias)
    mat = MatrixConv2d(c, o, (kh, kw), r, bias=bias)
    lin = MatrixLinear(c, o, r, bias=bias)
    b = o if bias else 0
    assert _nparams(cp) == r * (o + c + kh + kw) + b
    assert _nparams(mat) == r * (o + c * kh * kw) + b
    assert _nparams(lin) == r * (o + c) + b
    dense_conv = o * c * kh * kw + b
    assert cp.dense_parameter_count() == mat.dense_parameter_count() == dense_conv
    assert _nparams(nn.Conv2d(c, o, (kh, kw), bias=bias)) == dense_conv
    assert lin.dense_parameter_count() == o * c + b == _nparams(nn.Linear(c, o, bias=bias))


@pytest.mark.parametrize("layer,method", [
    (nn.Conv2d(16, 32, 3), "cp"),
    (nn.Conv2d(16, 32, (3, 5)), "matrix"),
    (nn.Linear(40, 30), "matrix"),
    (nn.Linear(40, 30), "cp"),
])
@pytest.mark.parametrize("params", [500, 1234, 3000])
def test_rank_for_parameter_budget_is_max_within_budget(layer, method, params):
    r = rank_for_parameter_budget(layer, method, params)
    assert r >= 1

    def weight_params(rank):
        if isinstance(layer, nn.Conv2d):
            f = factorize_model(nn.Sequential(layer), method, rank=rank, init="random")[0]
        else:
            f = MatrixLinear(layer.in_features, layer.out_features, rank)
        return sum(p.numel() for n, p in f.named_parameters() if n != "bias")

    assert weight_params(r) <= params
    o, c, kh, kw = ((layer.out_channels, layer.in_channels, *layer.kernel_size) if isinstance(layer, nn.Conv2d)
                    else (layer.out_features, layer.in_features, 1, 1))
    full = min(o, c * kh * kw)
    if method == "matrix" or isinstance(layer, nn.Linear):
        assert r <= full
        if r == full:  # capped: a higher rank is not allowed for matrix layers
            return
    assert weight_params(r + 1) > params


def test_rank_for_parameter_budget_caps_matrix_at_full_rank_and_validates():
    conv = nn.Conv2d(2, 4, 1)
    assert rank_for_parameter_budget(conv, "matrix", 10**6) == 2
    assert rank_for_parameter_budget(conv, "cp", 10**6) == 10**6 // (4 + 2 + 1 + 1)
    with pytest.raises(ValueError, match="params"):
        rank_for_parameter_budget(nn.Conv2d(16, 32, 3), "cp", 10)
    with pytest.raises(ValueError, match="method"):
        rank_for_parameter_budget(conv, "tucker", 100)
    with pytest.raises(ValueError, match="groups"):
        rank_for_parameter_budget(nn.Conv2d(4, 4, 3, groups=4), "cp", 100)


# ---------------------------------------------------------------------------------------------
# factorize_model
# ---------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: left dense
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.block = nn.ModuleDict({"conv": nn.Conv2d(16, 16, 1)})
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.relu(self.block["conv"](x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("method,conv_cls", [("cp", CPConv2d), ("matrix", MatrixConv2d)])
def test_factorize_model_replaces_right_modules(method, conv_cls):
    torch.manual_seed(0)
    model = _Net()
    names_before = [n for n, _ in model.named_modules()]
    out = factorize_model(model, method, rank_fraction=0.5)
    assert out is model
    mods = dict(model.named_modules())
    assert isinstance(mods["features.0"], conv_cls)
    assert type(mods["features.2"]) is nn.Conv2d  # groups > 1 skipped
    assert isinstance(mods["features.3"], conv_cls)
    assert isinstance(mods["block.conv"], conv_cls)
    assert type(mods["head"]) is nn.Linear  # linear only if asked
    assert [n for n, _ in model.named_modules()] == names_before
    # Rank from the fraction: of min(C_out, C_in k k) for matrix, of C_out for CP.
    expected = {"matrix": (4, 8, 8), "cp": (4, 8, 8)}[method]
    assert (mods["features.0"].rank, mods["features.3"].rank, mods["block.conv"].rank) == expected

    x = torch.randn(2, 3, 8, 8)
    model(x).square().mean().backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_factorize_model_full_rank_matrix_preserves_outputs_and_linear_exclude():
    torch.manual_seed(0)
    model = _Net().to(DT).eval()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    ref = model(x)
    factorize_model(model, "matrix", rank_fraction=1.0, include_linear=True, exclude=["block.conv"])
    mods = dict(model.named_modules())
    assert isinstance(mods["head"], MatrixLinear)
    assert type(mods["block.conv"]) is nn.Conv2d
    assert not mods["features.0"].training  # train/eval flag carried over
    assert mods["features.0"].A.dtype == DT
    torch.testing.assert_close(model(x), ref, atol=1e-10, rtol=0)


def test_factorize_model_int_rank_capped_for_matrix_and_linear_cp():
    model = _Net()
    factorize_model(model, "matrix", rank=12, include_linear=True)
    mods = dict(model.named_modules())
    assert mods["features.0"].rank == 8  # min(8, 27) = 8 -> capped
    assert mods["features.3"].rank == 12 and mods["head"].rank == 10
    model = _Net()
    factorize_model(model, "cp", rank=12, include_linear=True)
    mods = dict(model.named_modules())
    assert mods["features.0"].rank == 12  # CP rank is not capped
    assert isinstance(mods["head"], CPLinear) and mods["head"].rank == 10


def test_factorize_model_on_a_bare_layer_returns_replacement():
    conv = nn.Conv2d(3, 4, 3)
    new = factorize_model(conv, "matrix", rank=2)
    assert isinstance(new, MatrixConv2d)


@pytest.mark.parametrize("kwargs,argname", [
    (dict(), "rank"),
    (dict(rank=2, rank_fraction=0.5), "rank"),
    (dict(rank=0), "rank"),
    (dict(rank=-3), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(rank_fraction=0.0), "rank_fraction"),
    (dict(rank_fraction=1.5), "rank_fraction"),
    (dict(rank_fraction=-0.1), "rank_fraction"),
    (dict(rank=2, method="svd"), "method"),
    (dict(rank=2, init="zeros"), "init"),
    (dict(rank=2, exclude=["nope"]), "exclude"),
])
def test_factorize_model_bad_args(kwargs, argname):
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "matrix")
    with pytest.raises(ValueError, match=argname):
        factorize_model(_Net(), method, **kwargs)


def test_constructor_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        CPConv2d(3, 4, 3, rank=0)
    with pytest.raises(ValueError, match="rank"):
        MatrixConv2d(3, 4, 3, rank=5)  # > min(4, 27)
    with pytest.raises(ValueError, match="rank"):
        MatrixLinear(3, 4, rank=4)


# ---------------------------------------------------------------------------------------------
# training sanity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cp", "matrix"])
def test_training_reduces_loss(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 4),
    )
    factorize_model(model, method, rank=4, init="random")
    assert sum(isinstance(m, (CPConv2d, MatrixConv2d)) for m in model.modules()) == 2
    x = torch.randn(16, 3, 6, 6)
    y = torch.randn(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_factorize_model_summary_and_shared_modules():
    model = _Net()
    _, summary = factorize_model(model, "cp", rank=2, exclude=["block"], return_summary=True)
    assert summary.converted == {"features.0": "Conv2d -> CPConv2d", "features.3": "Conv2d -> CPConv2d"}
    assert "groups=8" in summary.skipped["features.2"] and summary.skipped["block.conv"] == "excluded"
    assert "include_linear=True" in summary.skipped["head"]
    # a module shared by two parents is converted once and replaced at both places
    conv = nn.Conv2d(4, 4, 3, padding=1)
    shared = nn.Sequential(conv, nn.ReLU(), conv)
    factorize_model(shared, "matrix", rank=2)
    assert isinstance(shared[0], MatrixConv2d) and shared[0] is shared[2]


def test_baseline_layers_are_factorized_layers():
    from tucker_manifold.nn import FactorizedLayer, is_conv_layer

    for layer, conv, ranks in [(CPConv2d(3, 4, 3, 5), True, (5,)), (MatrixConv2d(3, 4, 3, 2), True, (2,)),
                               (MatrixLinear(6, 4, 3), False, (3,))]:
        assert isinstance(layer, FactorizedLayer) and is_conv_layer(layer) is conv and layer.ranks == ranks
        assert layer.compressed_parameter_count() == sum(p.numel() for p in layer.parameters())
    assert CPLinear is MatrixLinear
    with pytest.raises(ValueError, match="groups=2 is not supported by CPConv2d"):
        CPConv2d(4, 4, 3, 2, groups=2)
