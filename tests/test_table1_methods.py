"""The rest of the paper's Table 1 in the method registry: ``tt`` (tensor train), ``snip``, ``grasp``
and ``imp`` (pruning), matched to TDLRT's conv compression, and the registry hooks they use
(``prepare`` for scoring on a batch, ``drive`` for IMP's own training).

The runner-level test runs a tiny ``compare`` (scikit-learn digits, 8x8) and checks after EVERY
optimizer step that the pruned weights are exactly zero and that masks never revive a weight.
"""
import copy
import json
import math

import pytest
import torch
from torch import nn

import tucker_manifold.experiments.runner as runner
from tucker_manifold.experiments import (
    DEFAULT_SPARSITY,
    TrainConfig,
    build_method,
    compare_methods,
    conv_parameter_counts,
    get_method,
    match_sparsity,
    match_tt_budgets,
    prepare_batch,
    run_experiment,
)
from tucker_manifold.experiments.methods import imp_plan
from tucker_manifold.nn import TTConv2d, compression_rate, tuckerize
from tucker_manifold.pruning import conv_sparsity, conv_weight_counts, is_pruned, pruned_compression_rate

NEW = ("tt", "snip", "grasp", "imp")


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_net():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 3),
    )


def tiny_batch(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 10, 10, generator=g)
    return x, (x[:, 0, :5].mean((1, 2)) > 0).long() + (x[:, 0, 5:].mean((1, 2)) > 0).long()


# ------------------------------------------------------------------------------------ building
def test_new_methods_are_registered_with_their_hooks():
    for m in NEW:
        spec = get_method(m)
        assert spec.match is not None and not spec.adaptive
    assert get_method("snip").prepare and get_method("grasp").prepare and get_method("imp").drive
    assert get_method("tt").prepare is None and get_method("tt").drive is None
    desc = get_method("imp").description
    assert "k=2" in desc and "epoch budget" in desc  # k and the budget are stated


def test_tt_builds_tt_layers_and_sgd():
    torch.manual_seed(0)
    model, opt = build_method(tiny_net(), "tt", lr=0.05)
    assert all(isinstance(model[i], TTConv2d) for i in (0, 2)) and nn.Conv2d not in {type(m) for m in model.modules()}
    assert type(opt) is torch.optim.SGD
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    model, _ = build_method(tiny_net(), "tt", layer_ranks={"2": 2}, lr=0.05)
    assert isinstance(model[2], TTConv2d) and type(model[0]) is nn.Conv2d and max(model[2].ranks) <= 2


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_prune_at_init_needs_a_batch_and_hits_the_sparsity(method):
    with pytest.raises(ValueError, match="batch"):
        build_method(tiny_net(), method, lr=0.05)
    with pytest.raises(ValueError, match="sparsity"):
        build_method(tiny_net(), method, lr=0.05, sparsity=1.0, batch=tiny_batch())
    for s in (0.5, 0.9, None):
        torch.manual_seed(0)
        model, opt = build_method(tiny_net(), method, lr=0.05, sparsity=s, batch=tiny_batch())
        _, total = conv_weight_counts(model)
        want = round((DEFAULT_SPARSITY if s is None else s) * total)
        zeros = sum(int((m.weight_mask == 0).sum()) for m in model.modules() if is_pruned(m))
        assert zeros == want and abs(conv_sparsity(model) - want / total) < 1e-12
        # the optimizer trains the surviving weights (weight_orig is the Parameter it was built with)
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    # the scores depend on the method: SNIP and GraSP keep different weights
    snip, _ = build_method(tiny_net(), "snip", lr=0.05, sparsity=0.5, batch=tiny_batch())
    torch.manual_seed(0)
    a, _ = build_method(tiny_net(), "snip", lr=0.05, sparsity=0.5, batch=tiny_batch())
    torch.manual_seed(0)
    b, _ = build_method(tiny_net(), "grasp", lr=0.05, sparsity=0.5, batch=tiny_batch())
    assert not torch.equal(a[2].weight_mask, b[2].weight_mask)


def test_imp_plan_states_rounds_and_rewind_point():
    assert imp_plan(3) == (2, 0) and imp_plan(2) == (1, 0) and imp_plan(5) == (2, 0) and imp_plan(6) == (2, 1)
    with pytest.raises(ValueError, match="epochs"):
        imp_plan(1)


# ------------------------------------------------------------------------------------ matching
def test_matchers_reach_the_reference_compression():
    torch.manual_seed(0)
    dense = tiny_net()
    ref = tuckerize(copy.deepcopy(dense), ranks=3)
    counts = conv_parameter_counts(ref)
    ref_rate = compression_rate(ref)["conv"]
    over, how = match_sparsity(dense, counts, "snip")
    assert "sparsity" in how and set(over) == {"rank", "rank_fraction", "layer_ranks", "sparsity"}
    model, _ = build_method(copy.deepcopy(dense), "snip", lr=0.05, sparsity=over["sparsity"], batch=tiny_batch())
    _, total = conv_weight_counts(dense)
    rate = pruned_compression_rate(model)
    # same nonzero conv weights as the reference stores (within the one weight of rounding)
    assert abs(rate["conv_params"] - compression_rate(ref)["conv_params"]) <= 1
    assert abs(rate["conv"] - ref_rate) <= 1 / rate["conv_dense_params"]
    assert conv_parameter_counts(model) and sum(conv_parameter_counts(model).values()) == sum(counts.values())
    over, _ = match_tt_budgets(dense, counts, "tt")
    model, _ = build_method(copy.deepcopy(dense), "tt", lr=0.05, layer_ranks=over["layer_ranks"])
    got = conv_parameter_counts(model)
    assert all(got[k] <= max(counts[k], 0) or over["layer_ranks"][k] == 1 for k in counts)
    # the largest rank within the budget: one more TT-rank would exceed it (unless capped at full rank)
    for k, r in over["layer_ranks"].items():
        bigger, _ = build_method(copy.deepcopy(dense), "tt", lr=0.05, layer_ranks={k: r + 1})
        assert conv_parameter_counts(bigger)[k] > counts[k] or max(bigger.get_submodule(k).ranks) <= r
    with pytest.raises(ValueError, match="layer"):
        match_tt_budgets(dense, {"nope": 10}, "tt")


# ------------------------------------------------------------------------------------ the runner
BASE = dict(data="digits", model="vgg-mnist", subset=240, batch_size=48, epochs=3, lr=0.05, init="hosvd")


def _checking_train(real_train, seen):
    """The loop's train(), with a check after every optimizer step: masked weights exactly zero in
    the forward's weight, and no mask ever revives a weight."""

    def wrapped(model, optimizer, *args, **kwargs):
        step = optimizer.step
        last = seen.setdefault(id(model), {"model": model, "masks": {}, "steps": 0})

        def checked_step(closure=None):
            out = step(closure)
            for name, m in model.named_modules():
                if not is_pruned(m):
                    continue
                mask = m.weight_mask.bool()
                assert torch.count_nonzero((m.weight_orig * m.weight_mask)[~mask]) == 0
                assert torch.count_nonzero(m.weight.detach()[~mask]) == 0  # what the forward used
                prev = last["masks"].get(name)
                assert prev is None or not bool((mask & ~prev).any()), f"{name}: a pruned weight came back"
                last["masks"][name] = mask.clone()
            last["steps"] += 1
            return out

        optimizer.step = checked_step
        return real_train(model, optimizer, *args, **kwargs)

    return wrapped


def test_the_step_check_fails_on_broken_pruning():
    """Negative controls of the per-step check: a revived mask entry, an unmasked forward weight."""
    x, y = tiny_batch()

    def run(corrupt):
        torch.manual_seed(0)
        model, opt = build_method(tiny_net(), "snip", lr=0.05, sparsity=0.5, batch=(x, y))

        def fake_train(model, optimizer):
            for i in range(3):
                if i == 2:
                    corrupt(model[2])
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()

        _checking_train(fake_train, {})(model, opt)

    run(lambda m: None)  # intact: passes

    def revive(m):
        with torch.no_grad():
            m.weight_mask.view(-1)[torch.nonzero(m.weight_mask.view(-1) == 0)[0]] = 1

    with pytest.raises(AssertionError, match="came back"):
        run(revive)

    def unmask_forward(m):
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()  # prune's pre-hook: the forward would use weight as it is
        m.weight = m.weight_orig

    with pytest.raises(AssertionError):
        run(unmask_forward)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_compare_with_pruning_and_tt_matched_to_tdlrt(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")  # the digits data set
    seen: dict = {}
    monkeypatch.setattr(runner, "train", _checking_train(runner.train, seen))
    rows = compare_methods(BASE, methods=["tdlrt", "tt", "snip", "grasp", "imp"], taus=[0.2], seeds=1,
                           out=tmp_path, progress=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["tdlrt", "tt", "snip", "grasp", "imp"]
    td = by["tdlrt"]
    assert 0.3 < td["conv_compression"] < 1
    for m in ("snip", "grasp", "imp"):
        # the same number of nonzero conv weights (+ the same biases) as TDLRT stores
        assert abs(by[m]["conv_params"] - td["conv_params"]) <= 1, m
        assert "sparsity=" in by[m]["match"] and "matched to tdlrt" in by[m]["match"]
        assert by[m]["epochs"] == BASE["epochs"]
    # TT: the largest per-layer TT-ranks within TDLRT's counts
    assert by["tt"]["conv_params"] <= td["conv_params"] * 1.05 and by["tt"]["conv_compression"] > 0
    pruned = [v for v in seen.values() if any(is_pruned(m) for m in v["model"].modules())]
    assert len(pruned) == 3 and all(v["steps"] > 0 and v["masks"] for v in pruned)
    n_batches = math.ceil(BASE["subset"] / BASE["batch_size"])
    assert sorted(v["steps"] for v in pruned) == [BASE["epochs"] * n_batches] * 3  # IMP: the same budget
    for v in pruned:
        model = v["model"]
        assert abs(pruned_compression_rate(model)["conv_params"] - td["conv_params"]) <= 1
    # files: the table, the csv, the plot; pruned runs report the dense-equivalent FLOPs
    assert (tmp_path / "results.md").read_text().count("| imp |") == 1
    assert (tmp_path / "accuracy_vs_compression.png").stat().st_size > 0
    m = json.loads((tmp_path / "runs" / "snip_tau0.2_seed0" / "metrics.json").read_text())
    assert m["flops_dense_equivalent"] > m["flops_nonzero_weights"] > 0 and 0 < m["conv_sparsity"] < 1


def test_imp_run_phases_rewind_and_cannot_resume(tmp_path):
    pytest.importorskip("sklearn")
    cfg = TrainConfig.from_dict({**BASE, "method": "imp", "sparsity": 0.8, "epochs": 3})
    res = run_experiment(cfg, tmp_path / "imp", progress=False, plot=False)
    hist = res.history
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    # k=2 rounds of one epoch each, then the final epoch: sparsity 0, 1-(1-s)^(1/2), s during them
    s1 = 1 - (1 - 0.8) ** 0.5
    _, total = conv_weight_counts(res.model)
    spars = [1 - (r["conv_params"] - _conv_bias_count(res.model)) / total for r in hist]
    assert spars[0] == 0.0
    assert abs(spars[1] - s1) <= 1 / total and abs(spars[2] - 0.8) <= 1 / total
    # each phase restarts the cosine at the rewind point (epoch 0 here): every phase starts at the full lr
    assert [r["lr"] for r in hist] == [BASE["lr"]] * 3
    assert res.metrics["conv_sparsity"] == pytest.approx(0.8, abs=1 / total)
    with pytest.raises(ValueError, match="resume"):
        run_experiment({**cfg.to_dict(), "epochs": 4}, tmp_path / "imp", resume=True, progress=False)


def _conv_bias_count(model):
    return sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None)


def test_prepare_batch_is_seeded_and_balanced_in_size():
    pytest.importorskip("sklearn")
    bundle = runner.load_data(TrainConfig.from_dict(BASE))
    x0, y0 = prepare_batch(bundle, 0)
    x1, y1 = prepare_batch(bundle, 0)
    x2, _ = prepare_batch(bundle, 1)
    assert x0.shape[0] == 10 * bundle.num_classes and torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(x0, x2)
