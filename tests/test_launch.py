"""Data-parallel runs (tucker_manifold.experiments.launch): 2 gloo processes spawned inside the test run
the experiments on the digits set. Replicas stay identical, only rank 0 writes, a 2-process resume
continues bit-identically, a checkpoint written by 2 processes loads (and trains on) in 1, and
``tucker-manifold train --nproc 2`` starts torchrun and finishes. Plus the helpers' bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("sklearn")  # the digits data set
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

from tucker_manifold.cli import _without_nproc, main  # noqa: E402
from tucker_manifold.experiments import TrainConfig, read_checkpoint, run_experiment, setup_run  # noqa: E402
from tucker_manifold.experiments.launch import (  # noqa: E402
    DistContext,
    attach_process_group,
    check_global_batch,
    convert_sync_bn,
    current,
    launch,
)

CFG = dict(data="digits", model="vgg-mnist", method="tdlrt", subset=128, batch_size=32, tau=0.15, seed=3)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _results(history):
    return [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in history]


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=world)
    try:
        if rank != 0:  # only rank 0 writes: any write from another rank fails the run
            import tucker_manifold.experiments.runner as runner

            def refuse(*a, **k):
                raise AssertionError(f"rank {rank} wrote an output")

            for name in ("save_checkpoint", "write_json", "write_history_csv", "plot_ranks", "write_results"):
                setattr(runner, name, refuse)
        out = {}
        r = run_experiment(dict(CFG, epochs=1), f"{root}/resumed", progress=False)
        out["epoch1"] = _state(r.model)
        if rank == 0:
            shutil.copy(f"{root}/resumed/checkpoint.safetensors", f"{root}/epoch1.safetensors")
        dist.barrier()
        r = run_experiment(dict(CFG, epochs=2), f"{root}/resumed", resume=True, progress=False)
        out["resumed"], out["resumed_history"] = _state(r.model), _results(r.history)
        r = run_experiment(dict(CFG, epochs=2), f"{root}/straight", progress=False)
        out["straight"], out["straight_history"] = _state(r.model), _results(r.history)
        out["world_size"] = r.metrics["world_size"]
        torch.save(out, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, str(root)), nprocs=2, join=True, start_method="spawn")
    return root, [torch.load(root / f"rank{k}.pt", weights_only=True) for k in range(2)]


def _assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def test_replicas_identical_and_history_global(two_process_runs):
    _, (r0, r1) = two_process_runs
    for key in ("epoch1", "resumed", "straight"):
        _assert_states_equal(r0[key], r1[key])
    assert r0["straight_history"] == r1["straight_history"]  # train sums and test accuracy all-reduced
    assert r0["world_size"] == 2


def test_two_process_resume_is_bit_identical(two_process_runs):
    """1 epoch, then a resume to 2 in 2 processes = 2 epochs straight (sampler order from seed and epoch)."""
    _, (r0, _) = two_process_runs
    _assert_states_equal(r0["resumed"], r0["straight"])
    assert r0["resumed_history"] == r0["straight_history"]


def test_checkpoint_of_two_processes_loads_in_one(two_process_runs):
    """The 2-process checkpoint restores the 2-process weights exactly in one process (ranks resize
    through load_state_dict), and training goes on from it."""
    root, (r0, _) = two_process_runs
    assert current().world_size == 1
    ckpt = read_checkpoint(root / "epoch1.safetensors")
    assert ckpt.epoch == 1 and ckpt.extra["world_size"] == 2
    model, opt, sched, loader, _, _ = setup_run(TrainConfig.from_dict(ckpt.config))
    ckpt.restore(model, opt, scheduler=sched, loader=loader)
    _assert_states_equal(_state(model), r0["epoch1"])
    one = root / "one"
    one.mkdir()
    shutil.copy(root / "epoch1.safetensors", one / "checkpoint.safetensors")
    r = run_experiment(dict(CFG, epochs=2), one, resume=True, progress=False, plot=False)
    assert len(r.history) == 2 and r.metrics["world_size"] == 1
    assert _results(r.history)[0] == r0["straight_history"][0]  # the 2-process epoch, kept
    assert all(torch.isfinite(p).all() for p in r.model.parameters())
    # the weights moved on from the loaded ones
    assert any(not torch.equal(v, r0["epoch1"][k]) for k, v in _state(r.model).items() if v.shape == r0["epoch1"][k].shape)


@pytest.mark.slow
def test_cli_nproc_starts_torchrun(tmp_path):
    """``tucker-manifold train --nproc 2``: torchrun runs 2 gloo processes; one summary line (rank 0),
    outputs written once, a non-Tucker method averaged by the loop (replicas checked every epoch)."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "tucker_manifold.cli", "train", "--nproc", "2", "--data", "digits", "--model",
           "vgg-mnist", "--method", "dense", "--subset", "64", "--batch-size", "32", "--epochs", "1",
           "--no-progress", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("dense on vgg-mnist/digits") == 1 and p.stdout.count("epoch 1/1") == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["config"]["batch_size"] == 32


# ------------------------------------------------------------------------------------ helpers, bad input
def test_without_nproc():
    assert _without_nproc(["train", "--nproc", "2", "--epochs", "1"]) == ["train", "--epochs", "1"]
    assert _without_nproc(["train", "--nproc=4", "--out", "x"]) == ["train", "--out", "x"]


def test_global_batch_must_divide():
    assert check_global_batch(64, 2) == 32
    with pytest.raises(ValueError, match="batch_size=33 is the global batch"):
        check_global_batch(33, 2)


def test_attach_process_group():
    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT

    model = tuckerize(torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3)), rank_fraction=0.5)
    opt = TDLRT(model.parameters(), lr=0.1)
    group = object()
    assert attach_process_group(opt, group) and opt.process_group is group
    with pytest.raises(ValueError, match="process_group"):
        attach_process_group(opt, object())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not attach_process_group(sgd, group) and not hasattr(sgd, "process_group")


def test_one_process_context_and_errors(tmp_path):
    assert current() == DistContext() and current().is_main and not current().enabled
    with pytest.raises(ValueError, match="sync_bn=True needs CUDA"):
        convert_sync_bn(torch.nn.BatchNorm2d(3), "cpu")
    with pytest.raises(ValueError, match="nproc"):
        launch(0, ["train"])
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8").validate()
    with pytest.raises(ValueError, match="sync_bn"):
        TrainConfig(sync_bn="yes").validate()
    rc = main(["train", "--data", "digits", "--precision", "fp8", "--out", str(tmp_path)])
    assert rc == 2


def test_cli_resume_refuses_another_precision(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", "digits", "--model", "vgg-mnist", "--subset", "64", "--batch-size", "32",
            "--no-progress", "--out", str(out)]
    assert main([*base, "--epochs", "1", "--precision", "bf16"]) == 0
    assert read_checkpoint(Path(out) / "checkpoint.safetensors").config["precision"] == "bf16"
    assert main([*base, "--epochs", "2", "--resume", "--precision", "fp32"]) == 2
    assert "--precision fp32 (the run has bf16)" in capsys.readouterr().err
    assert main([*base, "--epochs", "2", "--resume"]) == 0  # the saved precision goes on
