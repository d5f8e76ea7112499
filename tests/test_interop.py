"""tensorly / tltorch interop (tucker_manifold.nn.interop): layer.to_tensorly(), Layer.from_tensorly(...)
(exact round trip; the tensor of a non-orthonormal TuckerTensor kept to 1e-12 in float64), and
tuckerize on tltorch FactorizedConv / FactorizedLinear layers (Tucker), checked against tltorch's own
reconstruction to 1e-6 in float32. tensorly's global backend is never changed by the package."""
import sys

import numpy as np
import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.tucker_tensor import TuckerTensor
from torch import nn

from tucker_manifold.nn import TuckerConv1d, TuckerConv2d, TuckerConv3d, TuckerLinear, tuckerize
from tucker_manifold.nn.interop import orthonormal_tucker
from tucker_manifold.optim import TDLRT
from tucker_manifold.tucker import check_multilinear_ranks, reconstruct, tensorly_pytorch

_BACKEND = tl.get_backend()
try:  # tltorch sets tensorly's GLOBAL backend to pytorch when imported: put it back for everyone else
    import tltorch
except ImportError:  # pragma: no cover - the [tltorch] extra is optional
    tltorch = None
finally:
    tl.set_backend(_BACKEND)

DT = torch.float64


def _layers(seed=0):
    torch.manual_seed(seed)
    return [
        (TuckerConv2d(4, 6, 3, ranks=3, stride=2, padding=1, dtype=DT), dict(stride=2, padding=1), (2, 4, 9, 9)),
        (TuckerLinear(7, 5, ranks=3, dtype=DT), {}, (3, 7)),
        (TuckerConv1d(3, 5, 4, ranks=2, padding="same", dtype=DT), dict(padding="same"), (2, 3, 11)),
        (TuckerConv3d(2, 4, 3, ranks=(3, 2, 2, 3, 2), dilation=(1, 2, 1), dtype=DT), dict(dilation=(1, 2, 1)), (2, 2, 5, 7, 5)),
    ]


def _rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize("i", range(4), ids=["conv2d", "linear", "conv1d", "conv3d"])
def test_to_tensorly_and_back_is_exact(i):
    layer, geometry, x_shape = _layers()[i]
    tt = layer.to_tensorly()
    assert isinstance(tt, TuckerTensor) and tl.get_backend() == _BACKEND
    core, factors = tt
    want_core, want_factors = layer.manifold.unpack(layer.tucker_weight.detach())
    assert torch.equal(core, want_core) and all(torch.equal(a, b) for a, b in zip(factors, want_factors))
    assert tuple(tt.shape) == layer.shape and tuple(tt.rank) == layer.ranks
    core.add_(1.0)  # copies: the layer is untouched
    assert not torch.equal(core, layer.manifold.unpack(layer.tucker_weight.detach())[0])

    back = type(layer).from_tensorly(layer.to_tensorly(), bias=layer.bias, **geometry)
    assert type(back) is type(layer) and back.ranks == layer.ranks
    assert torch.equal(back.tucker_weight, layer.tucker_weight) and torch.equal(back.bias, layer.bias)
    x = torch.randn(x_shape, dtype=DT)
    assert torch.equal(back(x), layer(x))
    assert tl.get_backend() == _BACKEND


# ------------------------------------------------------------------------------------ non-orthonormal input
CASES = [  # (class, shape, core ranks, geometry, input shape)
    (TuckerConv2d, (6, 4, 3, 3), (3, 2, 3, 2), dict(padding=1), (2, 4, 8, 8)),
    (TuckerConv2d, (6, 4, 3, 3), (7, 2, 1, 1), {}, (2, 4, 6, 6)),      # r_out > n_out and > prod of the others
    (TuckerConv2d, (5, 5, 1, 1), (4, 4, 2, 1), {}, (2, 5, 4, 4)),      # a spatial rank above n = 1
    (TuckerLinear, (6, 9), (4, 2), {}, (3, 9)),                         # order 2: r_out != r_in
    (TuckerConv1d, (5, 3, 3), (2, 3, 3), dict(padding=1), (2, 3, 10)),
    (TuckerConv3d, (4, 3, 3, 2, 2), (3, 3, 2, 2, 2), {}, (2, 3, 5, 4, 4)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0].__name__}-{c[2]}" for c in CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_non_orthonormal_tucker_tensor_keeps_the_tensor(case, seed):
    cls, shape, ranks, geometry, x_shape = case
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks, generator=g, dtype=DT)
    factors = [torch.randn(n, r, generator=g, dtype=DT) * 3 + 1 for n, r in zip(shape, ranks)]
    tt = TuckerTensor((core, factors))
    with tensorly_pytorch():
        full = tl.tucker_to_tensor(tt)
    assert tl.get_backend() == _BACKEND
    layer = cls.from_tensorly(tt, bias=False, **geometry)
    assert _rel(layer.weight, full) < 1e-12
    got_core, got_factors = layer.manifold.unpack(layer.tucker_weight.detach())
    for f in got_factors:  # orthonormal
        assert (f.T @ f - torch.eye(f.shape[1], dtype=DT)).abs().max() < 1e-12
    check_multilinear_ranks(shape, layer.ranks)
    x = torch.randn(x_shape, dtype=DT, generator=g)
    if cls is TuckerLinear:
        ref = F.linear(x, full)
    else:
        ref = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(shape)](x, full, None, layer.stride, layer.padding, layer.dilation)
    assert _rel(layer(x), ref) < 1e-12
    # negative control: dropping R (Q alone, not absorbed into the core) changes the tensor a lot
    qs = [torch.linalg.qr(f)[0] for f in factors]
    if all(q.shape[1] == r for q, r in zip(qs, ranks)):
        assert _rel(reconstruct(core, qs), full) > 1e-3


def test_numpy_tucker_tensor_and_orthonormal_input_kept_as_is():
    rng = np.random.default_rng(0)
    core = rng.standard_normal((2, 3, 3, 3))
    factors = [np.linalg.qr(rng.standard_normal((n, r)))[0] for n, r in zip((4, 5, 3, 3), core.shape)]
    layer = TuckerConv2d.from_tensorly(TuckerTensor((core, factors)), bias=False)
    assert layer.tucker_weight.dtype == DT
    c, fs = layer.manifold.unpack(layer.tucker_weight.detach())
    assert torch.equal(c, torch.from_numpy(core)) and all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(fs, factors))
    # the helper alone: orthonormal input is returned unchanged, other input orthonormalized
    t_core, t_fs = torch.from_numpy(core), [torch.from_numpy(f) for f in factors]
    c2, f2 = orthonormal_tucker(t_core, t_fs)
    assert c2 is t_core and all(a is b for a, b in zip(f2, t_fs))
    c3, f3 = orthonormal_tucker(t_core, [2 * f for f in t_fs])
    assert _rel(reconstruct(c3, f3), 16 * reconstruct(t_core, t_fs)) < 1e-12


def test_from_tensorly_bad_input_names_the_argument():
    core = torch.randn(2, 2, 3, 3, dtype=DT)
    factors = [torch.randn(n, r, dtype=DT) for n, r in zip((4, 5, 3, 3), core.shape)]
    with pytest.raises(ValueError, match="tucker_tensor"):
        TuckerConv2d.from_tensorly(torch.randn(3, 3))
    with pytest.raises(ValueError, match="columns"):
        TuckerConv2d.from_tensorly((core, factors[:2] + [torch.randn(3, 2, dtype=DT), factors[3]]))
    with pytest.raises(ValueError, match="in_channels"):
        TuckerConv2d.from_tensorly((core, factors), in_channels=7)
    with pytest.raises(ValueError, match="bias"):
        TuckerConv2d.from_tensorly((core, factors), bias=torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="out_features"):
        TuckerLinear.from_tensorly((core, factors))
    with pytest.raises(ValueError, match="non-finite"):
        TuckerConv2d.from_tensorly((core * float("nan"), factors))
    layer = TuckerConv2d.from_tensorly((core, factors), in_channels=5, kernel_size=3, bias=torch.ones(4, dtype=DT))
    assert torch.equal(layer.bias, torch.ones(4, dtype=DT))


def test_package_never_imports_tltorch_or_changes_the_backend():
    import subprocess

    code = ("import tensorly as tl, sys, torch; import tucker_manifold as tm; "
            "l = tm.nn.TuckerConv2d(3, 4, 3, ranks=2); t = l.to_tensorly(); tm.nn.TuckerConv2d.from_tensorly(t); "
            "tm.nn.tuckerize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), ranks=2); "
            "print(tl.get_backend(), 'tltorch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["numpy", "False"]


# ------------------------------------------------------------------------------------ tltorch
needs_tltorch = pytest.mark.skipif(tltorch is None, reason="tensorly-torch (the [tltorch] extra) is not installed")


def _tltorch_forward(module, x):
    with tensorly_pytorch():  # tltorch computes with tensorly's pytorch backend
        return module(x)


def _tltorch_weight(module):
    with tensorly_pytorch():
        w = module.weight
        return w.to_matrix() if hasattr(w, "to_matrix") else w.to_tensor()


@needs_tltorch
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_tuckerize_converts_tltorch_factorized_conv(order, implementation):
    torch.manual_seed(order)
    dense = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[order](4, 6, 3, padding=1, stride=(2,) + (1,) * (order - 1))
    with tensorly_pytorch():
        fconv = tltorch.FactorizedConv.from_conv(dense, rank=0.5, factorization="tucker", implementation=implementation)
    model = nn.Sequential(fconv, nn.ReLU())
    x = torch.randn((2, 4) + (7, 6, 5)[:order])
    ref = _tltorch_forward(model, x).detach()
    ref_w = _tltorch_weight(fconv).detach()
    out, summary = tuckerize(model, return_summary=True)
    layer = out[0]
    assert isinstance(layer, {1: TuckerConv1d, 2: TuckerConv2d, 3: TuckerConv3d}[order])
    assert summary.converted == {"0": f"FactorizedConv -> {type(layer).__name__}"}
    assert layer.tucker_weight.dtype == torch.float32 and tl.get_backend() == _BACKEND
    assert float((layer.weight.detach() - ref_w).abs().max()) <= 1e-6 * max(1.0, float(ref_w.abs().max()))
    got = out(x).detach()
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-6 * max(1.0, float(ref.abs().max()))
    assert torch.equal(layer.bias, fconv.bias.detach())
    # tltorch's from_conv keeps stride[0] for every dimension; the conversion keeps what tltorch runs
    assert layer.stride == tuple(int(s) for s in fconv.stride.tolist()) == (2,) * order


@needs_tltorch
def test_tuckerize_converts_tltorch_factorized_linear_exactly_and_trains_with_tdlrt():
    torch.manual_seed(0)
    with tensorly_pytorch():
        flin = tltorch.FactorizedLinear.from_linear(nn.Linear(12, 10), auto_tensorize=False, in_tensorized_features=(3, 4),
                                                   out_tensorized_features=(2, 5), factorization="tucker", rank=0.5)
        fconv = tltorch.FactorizedConv.from_conv(nn.Conv2d(1, 4, 3), rank=0.5, factorization="tucker")
    model = nn.Sequential(fconv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 12), flin)
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 10, (16,))
    ref = _tltorch_forward(model, x).detach()
    ref_w = _tltorch_weight(flin).detach()
    # without linear=True the tltorch linear layer is left alone, with the reason
    _, summary = tuckerize(model, linear=False, return_summary=True, exclude=["0"])
    assert "linear=True" in summary.skipped["5"]
    out, summary = tuckerize(model, linear=True, exclude=["4"], return_summary=True)
    assert summary.converted == {"0": "FactorizedConv -> TuckerConv2d", "5": "FactorizedLinear -> TuckerLinear"}
    assert isinstance(out[5], TuckerLinear)
    assert float((out[5].weight.detach() - ref_w).abs().max()) <= 1e-6 * max(1.0, float(ref_w.abs().max()))
    got = out(x).detach()
    assert float((got - ref).abs().max()) <= 1e-6 * max(1.0, float(ref.abs().max()))
    # a tltorch user continues training with TDLRT
    opt = TDLRT(out.parameters(), lr=0.1, tau=0.1, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(out(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(15)]
    assert losses[-1] < 0.9 * losses[0]


@needs_tltorch
def test_non_tucker_tltorch_layers_are_skipped_with_the_reason():
    with tensorly_pytorch():
        cp = tltorch.FactorizedConv.from_conv(nn.Conv2d(3, 4, 3), rank=0.5, factorization="cp")
    out, summary = tuckerize(nn.Sequential(cp), return_summary=True)
    assert out[0] is cp and "only Tucker" in summary.skipped["0"]
