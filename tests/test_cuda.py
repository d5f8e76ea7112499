"""Every device-specific path on a CUDA device (marked ``cuda``; skipped without a GPU, so CI never
needs one): factorized layers, TDLRT and ParallelTDLRT (float64 against the CPU run), autocast and
the fp16 loss scale through the rollback, the experiments' run on ``device="cuda"`` with a checkpoint
that loads on CPU, the GPU benchmark, and data parallel with NCCL when 2 GPUs are present."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

#: The device under test. ``TM_CUDA_TESTS_ON=cpu`` runs this module's logic on the CPU (a dry run for
#: maintainers without a GPU; the NCCL and benchmark tests still need real GPUs).
DEV = os.environ.get("TM_CUDA_TESTS_ON", "cuda")
ON_GPU = DEV != "cpu"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs CUDA")]

TWO_GPUS = pytest.mark.skipif(not ON_GPU or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="dry run on CPU")


def bf16_ok() -> bool:
    return not ON_GPU or torch.cuda.is_bf16_supported()


def small_net(bn: bool = True) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    layers += [nn.BatchNorm2d(8)] if bn else []
    layers += [nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
               nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def data(n=32, seed=0, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return x.to(device), y.to(device)


def closure_of(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("kind", ["tucker", "tucker-linear", "cp", "matrix", "tt"])
def test_layers_match_cpu_float64(kind):
    """Forward and backward of every factorized layer kind on CUDA equal the CPU ones (float64)."""
    from tucker_manifold.nn import factorize_model, tt_factorize_model, tuckerize

    torch.manual_seed(0)
    net = small_net().double()
    if kind == "tucker":
        net = tuckerize(net, rank_fraction=0.5)
    elif kind == "tucker-linear":
        net = tuckerize(net, rank_fraction=0.5, linear=True)
    elif kind == "tt":
        net = tt_factorize_model(net, ranks=3)
    else:
        net = factorize_model(net, kind, rank_fraction=0.5)
    gpu = _copy_to(net, DEV)
    x, y = data()
    for m, dev in ((net, "cpu"), (gpu, DEV)):
        loss = nn.functional.cross_entropy(m(x.to(dev)), y.to(dev))
        loss.backward()
    for (n, p), (_, q) in zip(net.named_parameters(), gpu.named_parameters()):
        assert q.device.type == torch.device(DEV).type
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-9, atol=1e-11, msg=n)
    torch.testing.assert_close(gpu(x.to(DEV)).cpu(), net(x), rtol=1e-9, atol=1e-11)


def _copy_to(model, device):
    import copy

    return copy.deepcopy(model).to(device)


@pytest.mark.parametrize("name", ["tdlrt", "tdlrt-twopass", "tdlrt-adam", "parallel"])
def test_optimizers_match_cpu_float64(name):
    """Steps (ranks changing, tau > 0) on CUDA: the same ranks and weights as on CPU (float64)."""
    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT, ParallelTDLRT

    make = {
        "tdlrt": lambda ps: TDLRT(ps, lr=0.1, tau=0.1, momentum=0.9),
        "tdlrt-twopass": lambda ps: TDLRT(ps, lr=0.1, tau=0.1, momentum=0.9, single_pass=False),
        "tdlrt-adam": lambda ps: TDLRT(ps, lr=0.01, tau=0.1, method="adam"),
        "parallel": lambda ps: ParallelTDLRT(ps, lr=0.1, tau=0.1, momentum=0.9),
    }[name]
    torch.manual_seed(0)
    cpu = tuckerize(small_net().double(), rank_fraction=0.5)
    gpu = _copy_to(cpu, DEV)
    o1, o2 = make(cpu.parameters()), make(gpu.parameters())
    for k in range(6):
        x, y = data(seed=k)
        o1.step(closure_of(cpu, o1, x, y))
        o2.step(closure_of(gpu, o2, x.to(DEV), y.to(DEV)))
    from tucker_manifold.nn import ranks

    assert ranks(cpu) == ranks(gpu)
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert q.device.type == torch.device(DEV).type
        if getattr(p, "manifold", None) is not None and hasattr(p.manifold, "to_dense"):
            p, q = p.manifold.to_dense(p.detach()), q.manifold.to_dense(q.detach())
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-7, atol=1e-9)
    assert all(v.device.type == torch.device(DEV).type for st in o2.state.values() for v in st.values() if torch.is_tensor(v)
               and v.dim() > 0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_on_cuda(precision):
    """A training step under autocast on CUDA: float32 parameters and bases orthonormal to fp32
    accuracy (QR/SVD in fp32), finite loss; one-pass records used (no fallback)."""
    from tucker_manifold.amp import MixedPrecision
    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT, SinglePassFallbackWarning
    from tucker_manifold.parameter import is_tucker_parameter

    if precision == "bf16" and not bf16_ok():
        pytest.skip("this GPU has no bfloat16")
    torch.manual_seed(0)
    model = tuckerize(small_net(), rank_fraction=0.5).to(DEV)
    opt = TDLRT(model.parameters(), lr=0.05, tau=0.1, momentum=0.9)
    mp = MixedPrecision(precision, DEV)
    for k in range(4):
        x, y = data(seed=k, device=DEV, dtype=torch.float32)

        def closure(x=x, y=y):
            opt.zero_grad(set_to_none=True)
            with mp.autocast():
                out = model(x)
                assert out.dtype == mp.dtype
                loss = nn.functional.cross_entropy(out, y)
            mp.backward(loss)
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("error", SinglePassFallbackWarning)
            loss = mp.step(opt, closure)
        assert torch.isfinite(loss)
    assert opt.skipped_steps == 0
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
        if is_tucker_parameter(p):
            for u in p.manifold.unpack(p.detach())[1]:
                eye = torch.eye(u.shape[1], device=u.device)
                assert float((u.T @ u - eye).abs().max()) < 1e-5


def test_fp16_overflow_rolls_back_on_cuda():
    """A loss scale of 2^40 overflows fp16: skipped through the rollback, weights and state
    bit-identical, the scale halves, until steps proceed."""
    import copy

    from tucker_manifold.amp import MixedPrecision
    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT

    torch.manual_seed(0)
    model = tuckerize(small_net(bn=False), rank_fraction=0.5).to(DEV)
    opt = TDLRT(model.parameters(), lr=0.05, tau=0.1, momentum=0.9)
    mp = MixedPrecision("fp16", DEV, init_scale=2.0**40, growth_interval=10**6)
    x, y = data(device=DEV, dtype=torch.float32)
    skipped = 0
    for _ in range(40):
        before = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict()["state"])
        scale = mp.scaler.get_scale()
        n = opt.skipped_steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp.step(opt, closure_of_amp(model, opt, x, y, mp))
        if opt.skipped_steps == n:
            break
        skipped += 1
        assert mp.scaler.get_scale() == scale / 2
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert state.keys() == opt.state_dict()["state"].keys()
    assert 5 <= skipped < 40


def closure_of_amp(model, opt, x, y, mp):
    def closure():
        opt.zero_grad(set_to_none=True)
        with mp.autocast():
            loss = nn.functional.cross_entropy(model(x), y)
        mp.backward(loss)
        return loss
    return closure


def test_run_on_cuda_checkpoint_loads_on_cpu(tmp_path):
    """``run_experiment(device="cuda")`` end to end (bf16 when supported); its checkpoint restores on CPU."""
    pytest.importorskip("sklearn")
    from tucker_manifold.experiments import TrainConfig, read_checkpoint, run_experiment, setup_run

    precision = "bf16" if bf16_ok() else "fp16"
    cfg = dict(data="digits", model="vgg-mnist", method="tdlrt", subset=128, batch_size=32, epochs=1, device=DEV,
               precision=precision)
    r = run_experiment(cfg, tmp_path, progress=False, plot=False)
    assert next(r.model.parameters()).device.type == torch.device(DEV).type and r.history[-1]["test_acc"] == r.history[-1]["test_acc"]
    ckpt = read_checkpoint(tmp_path / "checkpoint.safetensors")
    model, opt, sched, loader, _, _ = setup_run(TrainConfig.from_dict({**ckpt.config, "device": "cpu"}))
    ckpt.restore(model, opt, scheduler=sched, loader=loader)
    for (k, v), (_, w) in zip(model.state_dict().items(), r.model.state_dict().items()):
        assert torch.equal(v, w.cpu()), k


@GPU_ONLY
def test_gpu_benchmark_runs(tmp_path):
    from tucker_manifold.benchmarks.gpu_step_time import main

    assert main(["--cases", "vgg-mnist:16:0.25", "--precisions", "fp32", "--warmup", "1", "--rounds", "1",
                 "--steps", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_step_time.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"dense", "vanilla", "tdlrt", "parallel"}
    assert all(r["ms"] > 0 and r["peak_mb"] >= 0 for r in rows)


# ------------------------------------------------------------------------------------ NCCL
def _nccl_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = tuckerize(small_net(bn=False).double(), rank_fraction=0.5).to("cuda")
        opt = TDLRT(model.parameters(), lr=0.1, tau=0.1, momentum=0.9, process_group=dist.group.WORLD,
                    check_replicas=True)
        for k in range(5):
            x, y = data(n=32, seed=k)
            half = slice(rank * 16, (rank + 1) * 16)
            opt.step(closure_of(model, opt, x[half].to("cuda"), y[half].to("cuda")))
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@TWO_GPUS
def test_nccl_two_processes_equal_one_process(tmp_path):
    """2 processes (NCCL, half of each global batch each) = 1 process on the global batch (float64)."""
    import torch.multiprocessing as mp

    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT

    out = str(tmp_path / "out")
    mp.start_processes(_nccl_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(f"{out}.{k}", weights_only=True) for k in range(2))
    torch.manual_seed(0)
    ref = tuckerize(small_net(bn=False).double(), rank_fraction=0.5).to("cuda")
    opt = TDLRT(ref.parameters(), lr=0.1, tau=0.1, momentum=0.9)
    for k in range(5):
        x, y = data(n=32, seed=k)
        opt.step(closure_of(ref, opt, x.to("cuda"), y.to("cuda")))
    for n, p in ref.named_parameters():
        assert torch.equal(r0[n], r1[n]), n
        assert r0[n].shape == p.shape
        torch.testing.assert_close(r0[n], p.detach().cpu(), rtol=0, atol=1e-10)


@TWO_GPUS
@pytest.mark.slow
def test_cli_nproc_on_two_gpus(tmp_path):
    """``tucker-manifold train --nproc 2 --device cuda``: torchrun, NCCL, one GPU per process."""
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tucker_manifold.cli", "train", "--nproc", "2", "--device", "cuda", "--data",
           "digits", "--model", "vgg-mnist", "--subset", "128", "--batch-size", "32", "--epochs", "1",
           "--no-progress", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
