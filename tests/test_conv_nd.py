"""TuckerConv1d (3-way kernel) and TuckerConv3d (5-way kernel), tucker_manifold.nn.conv_nd: the same
checks as TuckerConv2d (forward = reconstructed = F.conv1d / F.conv3d to 1e-12 in float64, from_dense,
state-dict round trips with changed ranks, tuckerize, TDLRT steps in both the two-pass and the
one-pass form) plus the one-pass core-gradient protocol against autograd."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tucker_manifold as tm
from tucker_manifold.nn import TuckerConv1d, TuckerConv3d, compression_rate, tuckerize
from tucker_manifold.nn.layers import valid_multilinear_ranks
from tucker_manifold.optim import TDLRT
from tucker_manifold.parameter import set_point, tucker_manifold

DT = torch.float64
TOL = 1e-12

# (C_in, C_out, kernel, stride, padding, dilation, bias), per dimension count
CASES = {
    1: [(3, 5, 3, 1, 0, 1, True), (4, 6, 4, 2, 1, 1, False), (5, 4, 3, 1, "same", 2, True), (2, 7, 2, 1, "same", 1, True),
        (4, 3, 5, 3, "valid", 1, False)],
    3: [(3, 5, 3, 1, 0, 1, True), (4, 6, (3, 2, 1), (2, 1, 1), (1, 0, 0), 1, False), (3, 4, 2, 1, "same", 1, True),
        (2, 3, (1, 3, 2), 1, (0, 2, 1), (1, 2, 1), True)],
}
LAYER = {1: TuckerConv1d, 3: TuckerConv3d}
DENSE = {1: nn.Conv1d, 3: nn.Conv3d}
FUNC = {1: F.conv1d, 3: F.conv3d}
SPATIAL = {1: (13,), 3: (6, 7, 5)}


def _kernel(k, n):
    return (k,) * n if isinstance(k, int) else tuple(k)


def _ranks(n, c_in, c_out, k):
    ks = _kernel(k, n)
    return valid_multilinear_ranks((c_out, c_in) + ks, (max(1, c_out - 2), max(1, c_in - 1)) + tuple(max(1, a - 1) for a in ks))


def _layer(n, case, mode="auto", seed=0):
    c_in, c_out, k, s, p, d, b = case
    torch.manual_seed(seed)
    return LAYER[n](c_in, c_out, k, _ranks(n, c_in, c_out, k), stride=s, padding=p, dilation=d, bias=b,
                    forward_mode=mode, dtype=DT)


def _input(n, c_in, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, c_in) + SPATIAL[n], generator=g, dtype=DT)


def _ids(n):
    return [f"{n}d-{i}" for i in range(len(CASES[n]))]


ALL = [(n, c) for n in (1, 3) for c in CASES[n]]
ALL_IDS = _ids(1) + _ids(3)


# ------------------------------------------------------------------------------------ forward equivalence
@pytest.mark.parametrize("n, case", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_factorized_equals_reconstructed_equals_dense_conv(n, case, seed):
    lay_f, lay_r = _layer(n, case, "factorized", seed), _layer(n, case, "reconstructed", seed)
    torch.testing.assert_close(lay_f.tucker_weight, lay_r.tucker_weight, rtol=0, atol=0)
    x = _input(n, case[0], seed=seed + 10)
    w = lay_f.weight
    assert w.shape == (case[1], case[0]) + _kernel(case[2], n) and w.dtype == DT
    ref = FUNC[n](x, w, lay_f.bias, lay_f.stride, lay_f.padding, lay_f.dilation)
    for lay in (lay_f, lay_r):
        y = lay(x)
        assert y.shape == ref.shape
        assert (y - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())
    # unbatched input, as nn.Conv{n}d accepts
    torch.testing.assert_close(lay_f(x[0]), ref[0], rtol=0, atol=TOL)
    # a negative control: a perturbed factor changes the output far beyond the tolerance
    bad = copy.deepcopy(lay_f)
    with torch.no_grad():
        bad.tucker_weight[-1] += 1e-3
    assert (bad(x) - ref).abs().max().item() > 1e-6


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("mode", ["factorized", "reconstructed"])
def test_gradient_matches_dense_reconstruction(n, mode):
    case = CASES[n][1]
    lay = _layer(n, case, mode)
    x = _input(n, case[0]).requires_grad_(True)
    (lay(x) ** 2).sum().backward()
    g_layer, gx = lay.tucker_weight.grad.clone(), x.grad.clone()
    lay.tucker_weight.grad, x.grad = None, None
    core, factors = lay.manifold.unpack(lay.tucker_weight)
    y = FUNC[n](x, tm.tucker.reconstruct(core, factors), lay.bias, lay.stride, lay.padding, lay.dilation)
    (y ** 2).sum().backward()
    torch.testing.assert_close(g_layer, lay.tucker_weight.grad, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gx, x.grad, rtol=1e-11, atol=1e-11)


def test_auto_forward_picks_the_cheaper_path():
    big = TuckerConv3d(64, 64, 3, ranks=4, dtype=DT)
    assert big.chosen_forward((2, 64, 8, 8, 8)) == "factorized"
    full = TuckerConv1d(4, 4, 3, ranks=(4, 4, 3), dtype=DT)
    assert full.chosen_forward((2, 4, 16)) == "reconstructed"
    c = big.forward_costs()
    assert c["factorized"] == 64 * 4 + 4 * 4 * 27 + 4 * 64 and c["reconstructed"] == 64 * 64 * 27


# ------------------------------------------------------------------------------------ from_dense
@pytest.mark.parametrize("n, case", ALL, ids=ALL_IDS)
def test_from_dense_full_rank_reproduces_the_module(n, case):
    c_in, c_out, k, s, p, d, b = case
    torch.manual_seed(3)
    dense = DENSE[n](c_in, c_out, k, stride=s, padding=p, dilation=d, bias=b).double()
    lay = LAYER[n].from_dense(dense)
    assert isinstance(lay, LAYER[n]) and lay.shape == tuple(dense.weight.shape)
    assert lay.ranks == valid_multilinear_ranks(lay.shape, lay.shape)
    x = _input(n, c_in)
    torch.testing.assert_close(lay(x), dense(x), rtol=0, atol=TOL)
    torch.testing.assert_close(lay.weight, dense.weight, rtol=0, atol=TOL)
    if b:
        assert torch.equal(lay.bias, dense.bias)


@pytest.mark.parametrize("n", [1, 3])
def test_from_dense_ranks_and_tau(n):
    torch.manual_seed(0)
    dense = DENSE[n](6, 8, 3).double()
    lay = LAYER[n].from_dense(dense, ranks=3)
    assert lay.ranks == (3, 3) + (3,) * n
    # truncated HOSVD: the reconstruction is the projection onto the leading singular subspaces
    core, factors = lay.manifold.unpack(lay.tucker_weight.detach())
    w = dense.weight.detach()
    proj = tm.tucker.multi_mode_dot(tm.tucker.multi_mode_dot(w, factors, transpose=True), factors)
    torch.testing.assert_close(lay.weight, proj, rtol=0, atol=TOL)
    loose = LAYER[n].from_dense(dense, tau=0.5)
    assert loose.ranks[0] < 8 and loose.ranks[2:] == (3,) * n
    err = torch.linalg.vector_norm(loose.weight - w) / torch.linalg.vector_norm(w)
    assert err <= 0.5 * (2 ** 0.5) + 1e-12  # two adaptive modes, each within tau
    with pytest.raises(ValueError, match="module"):
        LAYER[n].from_dense(nn.Conv2d(2, 2, 3))


# ------------------------------------------------------------------------------------ state dict
@pytest.mark.parametrize("n", [1, 3])
def test_state_dict_round_trip_with_changed_ranks(n):
    torch.manual_seed(0)
    model = nn.Sequential(LAYER[n](3, 6, 3, ranks=4, padding=1, dtype=DT), nn.ReLU(), LAYER[n](6, 5, 3, ranks=3, dtype=DT))
    # an optimizer changes the ranks through the parameter contract
    lay = model[0]
    m_new = tucker_manifold(lay.shape, (2, 3) + (3,) * n)
    set_point(lay.tucker_weight, *m_new.unpack(m_new.random(dtype=DT)), manifold=m_new)
    sd = model.state_dict()
    assert sd["0.tucker_ranks"].tolist() == [2, 3] + [3] * n
    fresh = nn.Sequential(LAYER[n](3, 6, 3, ranks=4, padding=1, dtype=DT), nn.ReLU(), LAYER[n](6, 5, 3, ranks=3, dtype=DT))
    p_before = fresh[0].tucker_weight
    fresh.load_state_dict(sd)
    assert fresh[0].tucker_weight is p_before and fresh[0].ranks == (2, 3) + (3,) * n
    x = _input(n, 3)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    # assign=True keeps a Tucker parameter with its manifold
    again = copy.deepcopy(fresh)
    again.load_state_dict(model.state_dict(), assign=True)
    assert tm.parameter.is_tucker_parameter(again[0].tucker_weight) and again[0].ranks == (2, 3) + (3,) * n
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(kernel_size=(3, 3, 3, 3)), "kernel_size"),
        (dict(stride=0), "stride"),
        (dict(padding=-1), "padding"),
        (dict(padding="same", stride=2), "same"),
        (dict(groups=2), "groups"),
        (dict(padding_mode="reflect"), "padding_mode"),
        (dict(in_channels=0), "in_channels"),
        (dict(ranks=0), "ranks"),
    ],
)
def test_invalid_arguments_name_the_argument(n, kwargs, word):
    args = dict(in_channels=4, out_channels=4, kernel_size=3, ranks=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        LAYER[n](**args)


# ------------------------------------------------------------------------------------ tuckerize
def _seq_model(n, seed=0):
    torch.manual_seed(seed)
    pool = nn.AdaptiveAvgPool1d(2) if n == 1 else nn.AdaptiveAvgPool3d(1)
    feats = 6 * 2 if n == 1 else 6
    return nn.Sequential(
        DENSE[n](2, 5, 3, padding=1), nn.ReLU(), DENSE[n](5, 6, 3, padding=1), nn.ReLU(), pool, nn.Flatten(),
        nn.Linear(feats, 3),
    ).double()


@pytest.mark.parametrize("n", [1, 3])
def test_tuckerize_converts_conv1d_and_conv3d(n):
    model = _seq_model(n)
    x = _input(n, 2)
    before = model(x)
    dense_rate = compression_rate(model)
    out, summary = tuckerize(model, rank_fraction=1.0, return_summary=True)
    assert summary.converted == {"0": f"Conv{n}d -> TuckerConv{n}d", "2": f"Conv{n}d -> TuckerConv{n}d"}
    assert isinstance(out[0], LAYER[n]) and isinstance(out[2], LAYER[n])
    torch.testing.assert_close(out(x), before, rtol=0, atol=1e-12)  # full rank: exact
    # the dense and the factorized convs are accounted alike
    assert dense_rate["conv_dense_params"] == compression_rate(out)["conv_dense_params"] > 0
    small = tuckerize(_seq_model(n), ranks=(2, 2))
    assert small[2].ranks == (2, 2) + (3,) * n
    r = compression_rate(small)
    assert 0 < r["conv"] < 1 and r["conv_params"] == sum(p.numel() for i in (0, 2) for p in small[i].parameters())
    if n == 3:
        with pytest.raises(ValueError, match="fewer entries"):
            tuckerize(_seq_model(n), ranks=(2, 2, 3, 3))


# ------------------------------------------------------------------------------------ TDLRT
@pytest.mark.parametrize("n", [1, 3])
def test_one_pass_core_gradient_protocol_matches_autograd(n):
    """tucker_core_gradient(x, gy, factors) at the layer's own bases is autograd's core gradient; at
    augmented bases it is dL/dW x_j U^_j^T (the dense gradient projected)."""
    for case in CASES[n]:
        lay = _layer(n, case, "factorized")
        x = _input(n, case[0])
        y = lay(x)
        gy = torch.randn_like(y)
        (y * gy).sum().backward()
        core, factors = lay.manifold.unpack(lay.tucker_weight.detach())
        g_core = lay.manifold.unpack(lay.tucker_weight.grad)[0]
        got = lay.tucker_core_gradient(x, gy, factors)
        torch.testing.assert_close(got, g_core, rtol=1e-10, atol=1e-11)
        w = lay.weight.detach().requires_grad_(True)
        FUNC[n](x, w, lay.bias, lay.stride, lay.padding, lay.dilation).mul(gy).sum().backward()
        aug = [torch.linalg.qr(torch.cat([f, torch.randn_like(f)], 1))[0] for f in factors]
        want = tm.tucker.multi_mode_dot(w.grad, aug, transpose=True)
        torch.testing.assert_close(lay.tucker_core_gradient(x, gy, aug), want, rtol=1e-10, atol=1e-11)
        # negative control: the wrong output gradient does not match
        assert (lay.tucker_core_gradient(x, 2 * gy, factors) - g_core).abs().max() > 1e-6


@pytest.mark.parametrize("n", [1, 3])
def test_tdlrt_steps_two_pass_and_one_pass_agree_and_descend(n):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((16, 2) + SPATIAL[n], generator=g, dtype=DT)
    with torch.no_grad():
        target = 3 * _seq_model(n, seed=9)(x)  # a teacher: a learnable regression problem
    runs = {}
    for single in (False, True):
        model = tuckerize(_seq_model(n, seed=4), rank_fraction=0.6)
        # tau large enough that the ranks change (the one-pass records must follow the resize)
        opt = TDLRT(model.parameters(), lr=0.1, tau=0.5, momentum=0.9, single_pass=single)
        calls = []

        def closure():
            calls.append(1)
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            return loss

        losses = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to a second pass
            for _ in range(12):
                losses.append(float(opt.step(closure)))
        runs[single] = (model, losses, len(calls))
    (m2, l2, c2), (m1, l1, c1) = runs[False], runs[True]
    assert c2 == 24 and c1 == 12
    assert l1[-1] < 0.5 * l1[0]
    for a, b in zip(l1, l2):
        assert abs(a - b) < 1e-10
    for lay2, lay1 in zip((m2[0], m2[2]), (m1[0], m1[2])):
        assert lay1.ranks == lay2.ranks
        torch.testing.assert_close(lay1.weight, lay2.weight, rtol=0, atol=1e-10)
    assert any(m1[i].ranks[:2] != tuckerize(_seq_model(n, seed=4), rank_fraction=0.6)[i].ranks[:2] for i in (0, 2))
