"""tucker_manifold.experiments: the method registry, train/evaluate, safe checkpoints, rank matching,
reports, and progress that never changes a result.

Everything runs on a tiny synthetic conv problem (a few hundred 10x10 images) so the whole file takes
a few seconds; the CLI end-to-end runs on real data are in test_cli.py.
"""
import copy
import math

import geoopt
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tucker_manifold.nn import TuckerConv2d
from tucker_manifold.nn.baselines import CPConv2d, MatrixConv2d
from tucker_manifold.optim import TDLRT
from tucker_manifold.experiments import (
    CheckpointError,
    build_method,
    conv_parameter_counts,
    evaluate,
    layer_ranks,
    load_checkpoint,
    markdown_table,
    match_budget_ranks,
    match_tucker_rank_fraction,
    method_names,
    plot_accuracy_vs_compression,
    plot_ranks,
    read_checkpoint,
    save_checkpoint,
    summarize,
    train,
    tucker_conv_count,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets: intra-op threads only add overhead (and thrash on a shared machine)."""
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


def tiny_data(seed=0, n=240):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 10, 10, generator=g)
    # three classes from the sign pattern of two image halves: learnable by a small conv net
    y = (x[:, 0, :5].mean((1, 2)) > 0).long() + (x[:, 0, 5:].mean((1, 2)) > 0).long()
    return x, y


def loaders(seed=0, batch=32):
    x, y = tiny_data()
    gen = torch.Generator().manual_seed(seed)
    tr = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=batch, shuffle=True, generator=gen)
    te = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64)
    return tr, te


def _results(row):
    """An epoch's row without its wall-clock timings."""
    return {k: v for k, v in row.items() if not k.endswith("_time_s")}


# ------------------------------------------------------------------------------------ build_method
BUILT_IN = ("dense", "tdlrt", "vanilla-tucker", "riemannian-fixed", "cp", "matrix")


def test_built_in_methods_are_registered():
    assert set(BUILT_IN) <= set(method_names())  # later methods (tt, pruning, ...) test themselves


@pytest.mark.parametrize("method", BUILT_IN)
def test_build_method_layers_and_optimizer(method):
    torch.manual_seed(0)
    model, opt = build_method(tiny_net(), method, tau=0.1, lr=0.05)
    kinds = {type(m) for m in model.modules()}
    expected_layer = {"dense": nn.Conv2d, "tdlrt": TuckerConv2d, "vanilla-tucker": TuckerConv2d,
                      "riemannian-fixed": TuckerConv2d, "cp": CPConv2d, "matrix": MatrixConv2d}[method]
    assert expected_layer in kinds
    if method != "dense":
        assert nn.Conv2d not in kinds
    expected_opt = {"tdlrt": TDLRT, "riemannian-fixed": geoopt.optim.RiemannianSGD}.get(method, torch.optim.SGD)
    assert type(opt) is expected_opt
    # every parameter of the model is optimized
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}


def test_build_method_default_ranks():
    model, _ = build_method(tiny_net(), "tdlrt", lr=0.1)
    assert layer_ranks(model)["2"][:2] == [8, 4]  # half of (16, 8): the documented TDLRT start
    model, _ = build_method(tiny_net(), "vanilla-tucker", rank=3, lr=0.1)
    assert layer_ranks(model)["2"] == [3, 3, 3, 3]
    model, _ = build_method(tiny_net(), "cp", layer_ranks={"0": 2, "2": 5}, lr=0.1)
    assert layer_ranks(model) == {"0": [2], "2": [5]}


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(method="sgd-but-wrong"), "vanilla-tucker"),  # lists the valid methods
        (dict(method="tdlrt", tau=-0.1), "tau"),
        (dict(method="tdlrt", tau=float("nan")), "tau"),
        (dict(method="vanilla-tucker", rank=0), "rank"),
        (dict(method="cp", rank_fraction=0.0), "rank_fraction"),
        (dict(method="cp", rank_fraction=1.5), "rank_fraction"),
        (dict(method="tdlrt", lr=0.0), "lr"),
    ],
)
def test_build_method_errors(kwargs, word):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=word):
        build_method(tiny_net(), method, **kwargs)


# ------------------------------------------------------------------------------------ train / evaluate
def _two_pass(model, opt):
    """The same TDLRT, evaluating the closure twice per step (the two-pass reference)."""
    return TDLRT(model.parameters(), lr=opt.defaults["lr"], tau=opt.defaults["tau"],
                 momentum=opt.defaults["momentum"], single_pass=False)


def test_closure_calls_per_step():
    """One closure call per step for every method (TDLRT's default single pass), two for two-pass
    TDLRT; the same data for every method."""
    counts = {}
    for method in ("tdlrt", "tdlrt-2pass", "vanilla-tucker", "dense"):
        torch.manual_seed(0)
        model, opt = build_method(tiny_net(), method.replace("-2pass", ""), lr=0.05)
        if method == "tdlrt":
            assert opt.single_pass
        if method == "tdlrt-2pass":
            opt = _two_pass(model, opt)
        calls = []
        model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]) if m.training else None)
        tr, te = loaders()
        train(model, opt, tr, None, 1, progress=False)
        counts[method] = len(calls)
    n = len(loaders()[0])
    assert counts["tdlrt"] == counts["dense"] == counts["vanilla-tucker"] == n
    assert counts["tdlrt-2pass"] == 2 * n


def test_train_history_and_learning():
    torch.manual_seed(0)
    model, opt = build_method(tiny_net(), "tdlrt", tau=0.2, lr=0.1)
    tr, te = loaders()
    trace = []
    hist = train(model, opt, tr, te, 4, "cpu", progress=True, rank_trace=trace, rank_every=3)
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4]
    keys = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "conv_compression", "total_compression",
            "ranks", "epoch_time_s", "skipped_steps"}
    assert keys <= set(hist[0])
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["test_acc"] > 0.5  # 3 classes: chance is ~1/3
    for r in hist:
        assert 0 < r["conv_compression"] < 1 and 0 < r["total_compression"] < 1
        assert r["epoch_time_s"] > 0 and r["skipped_steps"] == 0
        for name, rr in r["ranks"].items():
            shape = dict(model.named_modules())[name].shape
            assert all(1 <= a <= n for a, n in zip(rr, shape))
    # rank trace: start + every 3 steps + epoch ends, monotone in step
    steps = [t["step"] for t in trace]
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == 4 * len(tr)
    loss, acc = evaluate(model, te)
    assert acc == pytest.approx(hist[-1]["test_acc"]) and math.isfinite(loss)


def test_callback_and_scheduler():
    model, opt = build_method(tiny_net(), "dense", lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    seen = []
    tr, te = loaders()
    hist = train(model, opt, tr, te, 2, progress=False, callback=seen.append, scheduler=sched)
    assert seen == hist
    assert [r["lr"] for r in hist] == [0.1, 0.05]


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("method", ["tdlrt", "riemannian-fixed", "matrix"])
def test_checkpoint_resume_is_exact(tmp_path, method):
    """2 epochs + save + rebuild + load + 1 epoch == 3 epochs straight (weights, ranks, history)."""
    kw = dict(tau=0.3, lr=0.1)  # tau large enough that TDLRT's ranks change, so loading must resize

    torch.manual_seed(0)
    tr, te = loaders()
    model, opt = build_method(tiny_net(), method, **kw)
    straight = train(model, opt, tr, te, 3, progress=False)
    ref = copy.deepcopy(model.state_dict())

    torch.manual_seed(0)
    tr, te = loaders()
    model, opt = build_method(tiny_net(), method, **kw)
    hist = train(model, opt, tr, te, 2, progress=False)
    if method == "tdlrt":
        assert layer_ranks(model) != layer_ranks(build_method(tiny_net(), method, **kw)[0])
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, opt, 2, hist, {"method": method}, loader=tr)

    torch.manual_seed(123)  # a different RNG state: load must restore it
    tr, te = loaders(seed=99)
    model, opt = build_method(tiny_net(), method, **kw)
    state = load_checkpoint(path, model, opt, loader=tr)
    assert state["epoch"] == 2 and state["config"] == {"method": method}
    resumed = train(model, opt, tr, te, 3, progress=False, start_epoch=state["epoch"], history=state["history"])
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):  # bit-identical, not merely close
        assert _results(a) == _results(b)
    sd = model.state_dict()
    assert sd.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k


def test_load_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors", tiny_net())


# ------------------------------------------------------------------------------------ rank matching
def test_match_tucker_rank_fraction_is_closest():
    dense = tiny_net()
    shapes = [tuple(m.weight.shape) for m in dense if isinstance(m, nn.Conv2d)]
    model, _ = build_method(tiny_net(), "vanilla-tucker", rank_fraction=0.375, lr=0.1)
    target = sum(conv_parameter_counts(model).values())
    f = match_tucker_rank_fraction(dense, target)
    got = sum(tucker_conv_count(s, f) for s in shapes)
    assert got == target
    # and the count formula agrees with the layers tuckerize builds
    model, _ = build_method(tiny_net(), "vanilla-tucker", rank_fraction=f, lr=0.1)
    assert sum(conv_parameter_counts(model).values()) == got
    # a target between grid points picks the nearest one
    f2 = match_tucker_rank_fraction(dense, target + 7)
    cands = [j / n for s in shapes for n in s[:2] for j in range(1, n + 1)]
    best = min(abs(sum(tucker_conv_count(s, c) for s in shapes) - target - 7) for c in cands)
    assert abs(sum(tucker_conv_count(s, f2) for s in shapes) - target - 7) == best


@pytest.mark.parametrize("method", ["cp", "matrix"])
def test_match_budget_ranks(method):
    dense = tiny_net()
    budgets = {"0": 40, "2": 500}
    ranks = match_budget_ranks(dense, method, budgets)
    model, _ = build_method(tiny_net(), method, layer_ranks=ranks, lr=0.1, init="random")
    counts = conv_parameter_counts(model)
    for name, budget in budgets.items():
        assert counts[name] <= budget or ranks[name] == 1
    # the next rank would exceed the budget (or hit the matrix cap)
    over = match_budget_ranks(dense, method, {"2": 10 ** 6})["2"]
    assert ranks["2"] < over


# ------------------------------------------------------------------------------------ reporting
def test_summary_table_and_plots(tmp_path):
    rows = [
        dict(method="dense", tau=None, seed=0, test_acc=0.9, conv_compression=0.0, total_compression=0.0, time_per_epoch_s=1.0),
        dict(method="tdlrt", tau=0.1, seed=0, test_acc=0.8, conv_compression=0.7, total_compression=0.5, time_per_epoch_s=2.0),
        dict(method="tdlrt", tau=0.1, seed=1, test_acc=0.9, conv_compression=0.8, total_compression=0.6, time_per_epoch_s=2.0),
        dict(method="cp", tau=0.1, seed=0, test_acc=0.7, conv_compression=0.75, total_compression=0.55, time_per_epoch_s=1.0),
    ]
    s = summarize(rows)
    td = next(r for r in s if r["method"] == "tdlrt")
    assert td["n"] == 2 and td["acc_mean"] == pytest.approx(0.85) and td["acc_std"] == pytest.approx(0.0707, abs=1e-3)
    table = markdown_table(s)
    assert "| tdlrt | 0.1 | 2 | 85.00 ± 7.07 |" in table and "| dense | - |" in table
    plot_accuracy_vs_compression(s, tmp_path / "a.png")
    trace = [{"step": 0, "epoch": 0.0, "ranks": {"0": [4, 1, 3, 3]}}, {"step": 5, "epoch": 1.0, "ranks": {"0": [3, 1, 3, 3]}}]
    plot_ranks(trace, tmp_path / "r.png")
    plot_ranks([], tmp_path / "empty.png")
    for name in ("a.png", "r.png", "empty.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batchnorm_statistics_updated_once_per_step():
    """TDLRT's second forward must not count the batch again in BatchNorm's running statistics."""
    def bn_net():
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    stats = {}
    for method in ("tdlrt", "vanilla-tucker"):
        torch.manual_seed(0)
        # same start, weights ~fixed (tiny lr, tau=0): both see the same activations
        model, opt = build_method(bn_net(), method, lr=1e-9, tau=0.0, rank_fraction=0.5)
        if method == "tdlrt":
            opt = _two_pass(model, opt)  # the loop's BatchNorm guard matters when the closure runs twice
        tr, _ = loaders()
        train(model, opt, tr, None, 1, progress=False)
        bn = model[1]
        stats[method] = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    assert stats["tdlrt"][2] == stats["vanilla-tucker"][2] == len(tr)
    torch.testing.assert_close(stats["tdlrt"][0], stats["vanilla-tucker"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats["tdlrt"][1], stats["vanilla-tucker"][1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ safe checkpoints
class _Payload:
    """Unpickling this creates ``path``: a stand-in for a hostile pickle's payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _saved(tmp_path, method="tdlrt"):
    torch.manual_seed(0)
    tr, te = loaders()
    model, opt = build_method(tiny_net(), method, tau=0.3, lr=0.1)
    hist = train(model, opt, tr, te, 1, progress=False)
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, 1, hist, {"method": method, "tau": 0.3},
                           loader=tr, extra={"rank_trace": [{"step": 0, "ranks": {}}]})
    return path, model, hist


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_hostile_pickle_is_refused_and_not_executed(tmp_path, writer):
    import pickle

    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    else:
        torch.save({"model": _Payload(marker), "epoch": 1}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a tucker_manifold checkpoint"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="nothing was loaded"):
        load_checkpoint(path, tiny_net())
    assert not marker.exists()
    # the payload is live: unpickling the same bytes would have run it
    if writer == "pickle":
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_files_that_are_not_checkpoints(tmp_path):
    from safetensors.torch import save_file

    cases = {
        "empty": b"",
        "json": b'{"format": "tucker_manifold.checkpoint"}',
        "text": b"hello, not a checkpoint at all\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign"), metadata={"format": "someone.else"})
    torch.save(tiny_net().state_dict(), tmp_path / "state_dict.pt")  # a plain (old-style) torch file
    for name in [*cases, "foreign", "state_dict.pt"]:
        with pytest.raises(CheckpointError, match="not a tucker_manifold checkpoint"):
            read_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing")


def test_checkpoint_format_is_safetensors_plus_json(tmp_path):
    import json

    from safetensors import safe_open

    path, model, hist = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "tucker_manifold.checkpoint" and meta["version"] == "1"
    assert json.loads(meta["config"]) == {"method": "tdlrt", "tau": 0.3}
    assert json.loads(meta["ranks"]) == layer_ranks(model)
    assert [r["epoch"] for r in json.loads(meta["history"])] == [1]
    assert json.loads(meta["epoch"]) == 1
    # every weight of the model is a tensor of the file; RNG states too
    assert {f"model/{k}" for k in model.state_dict()} <= keys
    assert {"rng/torch", "rng/loader"} <= keys
    ck = read_checkpoint(path)
    assert ck.epoch == 1 and ck.history[0]["ranks"] == hist[0]["ranks"]
    assert ck.extra == {"rank_trace": [{"step": 0, "ranks": {}}]}
    # the history's floats (NaN included) come back exactly
    assert ck.history == hist


def test_checkpoint_from_a_newer_version(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, _, _ = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata={**meta, "version": "99"})
    with pytest.raises(CheckpointError, match="newer"):
        read_checkpoint(tmp_path / "new.safetensors")


def test_tree_codec_round_trip():
    from tucker_manifold.experiments.checkpoints import _decode, _encode

    obj = {"state": {0: {"step": 3, "buf": torch.arange(4.0)}, 1: {"t": torch.tensor(True)}},
           "groups": [{"betas": (0.9, 0.99), "lr": float("inf"), "name": None}], "$odd": 1}
    tensors: dict = {}
    enc = _encode(obj, "x", tensors, set())
    import json

    dec = _decode(json.loads(json.dumps(enc)), tensors)
    assert dec["groups"] == obj["groups"] and dec["$odd"] == 1
    assert dec["state"][0]["step"] == 3 and torch.equal(dec["state"][0]["buf"], obj["state"][0]["buf"])
    assert dec["state"][1]["t"].item() is True
    with pytest.raises(TypeError, match="x/f"):
        _encode({"f": object()}, "x", {}, set())


# ------------------------------------------------------------------------------------ progress and determinism
def _short_run(progress, extra_iter=False, monkeypatch=None):
    torch.manual_seed(3)
    tr, te = loaders(seed=3, batch=8)
    model, opt = build_method(tiny_net(), "tdlrt", tau=0.2, lr=0.1)
    if extra_iter:  # the old bug: the bar's constructor called iter(loader) once more per epoch
        import tucker_manifold.experiments.loop as loop

        real = loop._bar

        def buggy(iterator, total, desc):
            iter(tr)
            return real(iterator, total, desc)

        monkeypatch.setattr(loop, "_bar", buggy)
    hist = train(model, opt, tr, te, 2, progress=progress)
    return [_results(r) for r in hist], model.state_dict()


def test_progress_bar_never_changes_results(monkeypatch, capsys):
    on_hist, on_sd = _short_run(True)
    assert "epoch 1/2" in capsys.readouterr().err  # the bar was drawn
    off_hist, off_sd = _short_run(False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    tty_hist, tty_sd = _short_run(None)  # auto: a terminal gets the bar
    assert "epoch 1/2" in capsys.readouterr().err
    assert on_hist == off_hist == tty_hist
    for k in on_sd:
        assert torch.equal(on_sd[k], off_sd[k]) and torch.equal(on_sd[k], tty_sd[k]), k
    # the comparison is sensitive to the old bug: one more draw from the loader's generator shows
    bug_hist, _ = _short_run(True, extra_iter=True, monkeypatch=monkeypatch)
    assert bug_hist[-1] != on_hist[-1]


def test_show_progress_auto():
    import io

    from tucker_manifold.experiments import show_progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert show_progress(None, Tty()) is True
    assert show_progress(None, io.StringIO()) is False
    assert show_progress(False, Tty()) is False and show_progress(True, io.StringIO()) is True


def test_one_log_line_per_epoch(caplog):
    import logging

    tr, te = loaders()
    model, opt = build_method(tiny_net(), "dense", lr=0.1)
    with caplog.at_level(logging.INFO, logger="tucker_manifold.experiments"):
        train(model, opt, tr, te, 2, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "tucker_manifold.experiments"]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: train loss") and "\r" not in "".join(lines)


# ------------------------------------------------------------------------------------ registry and compare plan
def test_register_a_method(monkeypatch):
    import tucker_manifold.experiments.methods as methods
    from tucker_manifold.experiments import get_method, register_method, sgd
    from tucker_manifold.experiments.runner import _plan

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    seen = {}

    @register_method("half-dense", description="test", match=methods.match_rank_fraction)
    def build(model, o):
        seen["options"] = o
        return model, sgd(model, o)

    assert "half-dense" in method_names() and get_method("half-dense").build is build
    model, opt = build_method(tiny_net(), "half-dense", lr=0.02, momentum=0.5, rank_fraction=0.5)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.5
    assert seen["options"].rank_kwargs(0.25) == {"rank_fraction": 0.5}
    with pytest.raises(ValueError, match="already registered"):
        register_method("half-dense", build)
    with pytest.raises(ValueError, match="name"):
        register_method("Bad,Name", build)
    # a matched method runs after the reference, once per tau and seed
    plan = [(r.method, r.tau, r.seed) for r in _plan(["half-dense", "dense", "tdlrt"], [0.1, 0.2], [0])]
    assert plan == [("tdlrt", 0.1, 0), ("tdlrt", 0.2, 0), ("dense", None, 0), ("half-dense", 0.1, 0),
                    ("half-dense", 0.2, 0)]
    # without a reference: once per seed at its own ranks
    assert [(r.method, r.tau) for r in _plan(["half-dense"], [0.1], [0, 1])] == [("half-dense", None)] * 2
