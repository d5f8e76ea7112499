"""Training to a parameter budget in the experiments and the CLI (experiments/budgets.py): what a budget
means (count or fraction of the dense conv weights), uniform ranks that fit it, the tau bisection, the
tdlrt-budget / tdlrt-fixed methods, ``train --budget`` and ``compare --budget`` end to end on digits."""
import csv
import json
import math

import pytest
import torch
from torch import nn

from tucker_manifold.experiments import TrainConfig, build_method
from tucker_manifold.experiments import budgets as EB
from tucker_manifold.experiments.accounting import conv_parameter_counts, tucker_conv_count
from tucker_manifold.models import build_model
from tucker_manifold.optim import TDLRT
from tucker_manifold.parameter import is_tucker_parameter, rank_bounds

VGG_DENSE_CONV = 9 * (32 * 1 + 32 * 32 + 64 * 32 + 64 * 64 + 128 * 64 + 128 * 128)  # 285984


def _vgg():
    return build_model("vgg-mnist", 1, 10, 28)


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def test_check_budget_value():
    for ok in (None, 1, 5000, 0.1, 1.0, 1e-3):
        EB.check_budget_value(ok)
    for bad, what in ((0, "int >= 1"), (-3, "int >= 1"), (0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"),
                      (float("nan"), r"\(0, 1\]"), (True, "int >= 1"), ("0.1", "int >= 1")):
        with pytest.raises(ValueError, match="budget"):
            EB.check_budget_value(bad)
    with pytest.raises(ValueError, match="budget"):
        TrainConfig(budget=1.5).validate()
    TrainConfig(budget=0.05).validate()


def test_budget_schedule_in_epochs():
    cfg = TrainConfig(budget=0.1, budget_schedule=(0, 1), batch_size=32)
    cfg.validate()
    assert EB.schedule_steps(cfg, 3000) == (0, 94)  # ceil(3000 / 32) steps per epoch
    assert EB.schedule_steps(TrainConfig(budget=0.1, budget_schedule=[0.5, 2.5], batch_size=100), 1000) == (5, 25)
    assert EB.schedule_steps(TrainConfig(budget=0.1, budget_schedule=(0, 0.001)), 100) == (0, 1)  # never empty
    assert EB.schedule_steps(TrainConfig(budget=0.1), 3000) is None
    for bad in ((1, 1), (2, 1), (-1, 1), (0,), "0,1", (0, float("inf"))):
        with pytest.raises(ValueError, match="budget_schedule must be"):
            TrainConfig(budget=0.1, budget_schedule=bad).validate()
    with pytest.raises(ValueError, match="budget_schedule needs budget"):
        TrainConfig(budget_schedule=(0, 1)).validate()
    model, opt = build_method(_small(), "tdlrt-budget", budget=0.3, budget_schedule=(2, 9))
    assert opt.budget_schedule == (2, 9)
    with pytest.raises(ValueError, match="budget_schedule needs budget"):
        build_method(_small(), "tdlrt", budget_schedule=(2, 9))


def test_resolve_budget_counts_the_dense_convs():
    dense = _vgg()
    assert EB.dense_conv_params(dense) == VGG_DENSE_CONV
    assert EB.resolve_budget(dense, 0.1) == math.floor(0.1 * VGG_DENSE_CONV) == 28598
    assert EB.resolve_budget(dense, 0.05) == 14299
    assert EB.resolve_budget(dense, 1.0) == VGG_DENSE_CONV
    assert EB.resolve_budget(dense, 5000) == 5000  # an int is a count, whatever the model
    with pytest.raises(ValueError, match="no groups=1 convolution"):
        EB.resolve_budget(nn.Sequential(nn.Linear(3, 3)), 0.1)


@pytest.mark.parametrize("frac", [0.02, 0.05, 0.1, 0.3])
def test_fit_rank_fraction_is_the_largest_uniform_fit(frac):
    dense = _vgg()
    n = EB.resolve_budget(dense, frac)
    f = EB.fit_rank_fraction(dense, n)
    shapes = [tuple(m.weight.shape) for m in dense.modules() if isinstance(m, nn.Conv2d)]
    count = sum(tucker_conv_count(s, f) for s in shapes)
    assert count <= n
    # maximal: the next fraction where some ceil(f n) changes is over the budget
    nxt = min(j / s[k] for s in shapes for k in (0, 1) for j in range(1, s[k] + 1) if j / s[k] > f)
    assert sum(tucker_conv_count(s, nxt) for s in shapes) > n
    # and the tuckerized model really has that count
    model, _ = build_method(_vgg(), "vanilla-tucker", rank_fraction=f)
    assert sum(conv_parameter_counts(model).values()) == count


def test_fit_rank_fraction_below_rank_one():
    with pytest.raises(ValueError, match="below the smallest uniform-rank Tucker model"):
        EB.fit_rank_fraction(_vgg(), 100)


def test_layer_shares_and_cp_fit():
    dense = _vgg()
    n = EB.resolve_budget(dense, 0.1)
    shares = EB.layer_shares(dense, n)
    assert sum(shares.values()) <= n and len(shares) == 6
    big, small = shares["features.17"], shares["features.3"]
    assert big / small == pytest.approx(16, rel=0.01)  # proportional to the dense layer sizes
    over, how = EB.fit_to_budget(dense, "matrix", n)
    model, _ = build_method(_vgg(), "matrix", init="random", **over)
    counts = conv_parameter_counts(model)
    assert "shares" in how and sum(counts.values()) <= n
    # every layer within its share, except where even rank 1 costs more (features.0: 28 < 32 + 9)
    assert [k for k in shares if counts[k] > shares[k]] == ["features.0"] and over["layer_ranks"]["features.0"] == 1


def test_fit_to_budget_errors():
    dense = _vgg()
    for method, what in (("dense", "no ranks to fit"), ("tdlrt", "takes the budget itself"),
                         ("tdlrt-budget", "takes the budget itself")):
        with pytest.raises(ValueError, match=what):
            EB.fit_to_budget(dense, method, 20000)
    with pytest.raises(ValueError, match="either budget or rank"):
        EB.fit_config(TrainConfig(method="vanilla-tucker", budget=0.1, rank_fraction=0.2), dense)
    cfg = TrainConfig(method="tdlrt-budget", budget=0.1)
    assert EB.fit_config(cfg, dense) is cfg
    fitted = EB.fit_config(TrainConfig(method="tdlrt-fixed", budget=0.1), dense)
    assert fitted.budget is None and fitted.rank_fraction == EB.fit_rank_fraction(dense, 28598)


def test_bisect_tau_on_a_known_curve():
    def count(tau):  # falls with tau, like a TDLRT run's final size
        return int(100000 * math.exp(-12 * tau))

    for n in (50000, 20000, 3000, 500):
        tau, trials = EB.bisect_tau(count, n, tau0=0.1, max_runs=12)
        c = count(tau)
        assert c <= n and c >= 0.97 * n, (n, tau, c)
        assert trials[-1][0] == tau and len(trials) <= 12
    # few runs: the best tried below N, never one above
    tau, trials = EB.bisect_tau(count, 20000, tau0=0.1, max_runs=2)
    assert [t for t, _ in trials] == [0.1, 0.2] and tau == 0.2 and count(tau) <= 20000
    # nothing fits: the smallest count, and the bisection says so through the count
    tau, trials = EB.bisect_tau(lambda t: 10**6, 10, tau0=0.1, max_runs=3)
    assert len(trials) == 3
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="tau0"):
            EB.bisect_tau(count, 10, tau0=bad)
    with pytest.raises(ValueError, match="max_runs"):
        EB.bisect_tau(count, 10, max_runs=0)


def test_bisect_tau_step_brackets_by_its_factor():
    def count(tau):
        return int(100000 * math.exp(-12 * tau))

    # from a good guess, a small step brackets N in fewer runs than doubling
    n = count(0.13)
    tau, trials = EB.bisect_tau(count, n, tau0=0.125, max_runs=12, step=1.1)
    assert trials[1][0] == pytest.approx(0.125 * 1.1)
    assert count(tau) <= n and count(tau) >= 0.97 * n
    _, doubling = EB.bisect_tau(count, n, tau0=0.125, max_runs=12)
    assert len(trials) < len(doubling)
    # below N and outside the window: divided by the step
    _, trials = EB.bisect_tau(count, count(0.05), tau0=0.1, max_runs=2, step=1.25)
    assert [t for t, _ in trials] == [0.1, 0.08]
    for bad in (1.0, 0.5, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="step"):
            EB.bisect_tau(count, 10, step=bad)


def test_methods_take_or_refuse_a_budget():
    n = EB.resolve_budget(_small(), 0.3)
    model, opt = build_method(_small(), "tdlrt-budget", budget=0.3)
    assert isinstance(opt, TDLRT) and opt.budget == n and opt.defaults["tau"] == 0.0
    model, opt = build_method(_small(), "tdlrt", tau=0.2, budget=n)
    assert opt.budget == n and opt.defaults["tau"] == 0.2  # tau a floor, N a ceiling
    with pytest.raises(ValueError, match="needs a budget"):
        build_method(_small(), "tdlrt-budget")
    with pytest.raises(ValueError, match="does not take a budget"):
        build_method(_small(), "vanilla-tucker", budget=0.3)


def test_tdlrt_fixed_keeps_its_ranks():
    model, opt = build_method(_small(), "tdlrt-fixed", rank_fraction=0.5, lr=0.1)
    tucker = [p for p in model.parameters() if is_tucker_parameter(p)]
    before = [p.manifold.ranks for p in tucker]
    assert all(not any(rank_bounds(p).adaptive) for p in tucker)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))
    w0 = [p.detach().clone() for p in tucker]
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert [p.manifold.ranks for p in tucker] == before
    assert any(not torch.equal(a, b.detach()) for a, b in zip(w0, tucker))  # it did train


# ------------------------------------------------------------------------------------ CLI, end to end
sklearn = pytest.importorskip("sklearn")  # the digits data set
from tucker_manifold.cli import _budget, main  # noqa: E402

TINY = ["--data", "digits", "--model", "vgg-mnist", "--subset", "200", "--batch-size", "64", "--epochs", "1",
        "--no-progress", "--threads", "1"]


def test_cli_budget_parsing():
    assert _budget("0.1") == 0.1 and isinstance(_budget("0.1"), float)
    assert _budget("5000") == 5000 and isinstance(_budget("5000"), int)
    assert _budget("1e-1") == 0.1
    import argparse

    for bad in ("1.5", "0", "-3", "abc", "0.0"):
        with pytest.raises(argparse.ArgumentTypeError, match="--budget"):
            _budget(bad)
    from tucker_manifold.cli import _budget_schedule

    assert _budget_schedule("0,1") == (0.0, 1.0) and _budget_schedule("0.5,2") == (0.5, 2.0)
    for bad in ("1,0", "1", "a,b", "0,1,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--budget-schedule"):
            _budget_schedule(bad)


def test_cli_train_budget(tmp_path, capsys):
    out = tmp_path / "tr"
    assert main(["train", *TINY, "--method", "tdlrt-budget", "--budget", "0.05", "--budget-schedule", "0,0.5",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["conv_params"] <= math.floor(0.05 * VGG_DENSE_CONV) and m["config"]["budget"] == 0.05
    assert m["config"]["budget_schedule"] == [0.0, 0.5]
    assert main(["train", *TINY, "--method", "vanilla-tucker", "--budget", "0.05", "--out", str(tmp_path / "v")]) == 0
    v = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert v["conv_params"] <= math.floor(0.05 * VGG_DENSE_CONV)
    assert main(["train", *TINY, "--method", "dense", "--budget", "0.05", "--out", str(tmp_path / "d")]) == 2
    assert "no ranks to fit" in capsys.readouterr().err


def test_cli_compare_budget(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", *TINY, "--budget", "0.08", "--methods", "tdlrt-budget,tdlrt,vanilla-tucker,tdlrt-fixed",
               "--tau", "0.2", "--seeds", "1", "--bisect-runs", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    n = math.floor(0.08 * VGG_DENSE_CONV)
    assert f"budget N = {n}" in printed and "| tdlrt-budget | 1 |" in printed
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    results = {r["method"]: r for r in rows if r["role"] == "result"}
    assert set(results) == {"tdlrt-budget", "tdlrt", "vanilla-tucker", "tdlrt-fixed"}
    for m in ("tdlrt-budget", "vanilla-tucker", "tdlrt-fixed"):
        assert int(results[m]["conv_params"]) <= n and results[m]["within"] == "True"
    assert int(results["tdlrt-budget"]["conv_params"]) == int(results["tdlrt-budget"]["tucker_params"])
    with open(out / "bisection.csv", newline="") as fh:
        trials = list(csv.DictReader(fh))
    assert 1 <= len(trials) <= 2 and sum(t["chosen"] == "True" for t in trials) == 1
    assert "bisection" in results["tdlrt"]["match"]
    assert (out / "ranks_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tdlrt-fixed |" in (out / "results.md").read_text()
