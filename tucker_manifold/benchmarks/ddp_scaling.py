"""Data-parallel throughput on CPU (gloo): training images per second with 1 and N processes, and the
share of the step time spent inside all-reduce calls.

Each setting runs the experiments' own loop (:func:`tucker_manifold.experiments.train`, the code of
``tucker-manifold train --nproc N``) in N spawned processes on synthetic 28x28 images: the same global
batch (``--global-batch``, split across the processes), ``--images`` training images per epoch, and
``--epochs`` epochs of which only the last is timed (the first warms up). The loop's epoch time is the
step time (no evaluation in it). Communication: ``torch.distributed.all_reduce`` is wrapped with a
timer in every process; the share counts the calls of a training step (the gradient averaging: TDLRT
one flattened all-reduce of the gradients and one of the rebuilt core gradients per step, other
methods one per step; not the epoch-end reductions), including the time a rank waits there for the
slower one.

    tucker-manifold bench ddp_scaling [--nprocs 1,2] [--methods tdlrt,dense] [--net vgg-mnist]
        [--global-batch 64] [--images 640] [--epochs 2] [--threads 1]
    python benchmarks/ddp_scaling.py ...        # the same, from a source checkout

Prints images/s, the speed-up over 1 process and the communication share per method and process
count; writes ddp_scaling.json into --out (default ./runs/bench/ddp_scaling). On a machine with fewer
free cores than processes the processes share cores: expect no speed-up there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from tucker_manifold.outputs import output_dir, runs_dir, write_json

METHODS = ("tdlrt", "dense", "vanilla-tucker")
#: the functions whose all-reduces belong to a training step (gradients; TDLRT's core gradients)
_STEP_CALLERS = ("average_gradients", "_average_core_gradients")


def _worker(rank: int, world: int, root: str, spec: dict) -> None:
    import torch.distributed as dist
    from types import SimpleNamespace

    from tucker_manifold.experiments import build_method, train
    from tucker_manifold.experiments.launch import current, distributed_loaders
    from tucker_manifold.models import build_model

    torch.set_num_threads(spec["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=world)
    comm = {"s": 0.0, "calls": 0}
    real = dist.all_reduce

    def timed(*a, **k):  # every all-reduce of the run goes through torch.distributed.all_reduce
        if sys._getframe(1).f_code.co_name not in _STEP_CALLERS:  # the epoch-end reductions: not timed
            return real(*a, **k)
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            comm["s"] += time.perf_counter() - t0
            comm["calls"] += 1

    dist.all_reduce = timed
    try:
        g = torch.Generator().manual_seed(0)
        n = spec["images"]
        bundle = SimpleNamespace(x_train=torch.randn(n, 1, 28, 28, generator=g),
                                 y_train=torch.randint(0, 10, (n,), generator=g),
                                 x_test=torch.randn(0, 1, 28, 28), y_test=torch.zeros(0, dtype=torch.int64))
        torch.manual_seed(0)
        model, opt = build_method(build_model(spec["net"], in_channels=1, num_classes=10, image_size=28),
                                  spec["method"], tau=0.1, lr=0.01, momentum=0.9)
        ctx = current()
        if ctx.enabled:
            loader, _ = distributed_loaders(bundle, spec["global_batch"], 0, ctx)
        else:
            from torch.utils.data import DataLoader, TensorDataset

            loader = DataLoader(TensorDataset(bundle.x_train, bundle.y_train), batch_size=spec["global_batch"],
                                shuffle=True, generator=torch.Generator().manual_seed(0))
        marks = []

        def mark(row):
            marks.append((comm["s"], comm["calls"]))

        hist = train(model, opt, loader, None, spec["epochs"], progress=False, callback=mark,
                     process_group=ctx.group)
        (s0, c0), (s1, c1) = (marks[-2] if len(marks) > 1 else (0.0, 0)), marks[-1]
        last = hist[-1]
        out = dict(epoch_s=last["epoch_time_s"], comm_s=s1 - s0, allreduce_calls=c1 - c0, steps=len(loader),
                   images=len(loader) * spec["global_batch"])
        Path(root, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.all_reduce = real
        if world > 1:
            dist.destroy_process_group()


def measure(method: str, nproc: int, net: str, global_batch: int, images: int, epochs: int, threads: int) -> dict:
    """Spawn ``nproc`` processes for one setting; returns images/s and the communication share (the
    slowest rank's epoch time; comm share averaged over ranks)."""
    import torch.multiprocessing as mp

    spec = dict(method=method, net=net, global_batch=global_batch, images=images, epochs=epochs, threads=threads)
    with tempfile.TemporaryDirectory(prefix="ddp_scaling_") as root:
        mp.start_processes(_worker, args=(nproc, root, spec), nprocs=nproc, join=True, start_method="spawn")
        ranks = [json.loads(Path(root, f"rank{r}.json").read_text()) for r in range(nproc)]
    epoch_s = max(r["epoch_s"] for r in ranks)
    share = sum(r["comm_s"] / r["epoch_s"] for r in ranks) / nproc
    return dict(method=method, nproc=nproc, images_per_s=ranks[0]["images"] / epoch_s, epoch_s=epoch_s,
                step_ms=1e3 * epoch_s / ranks[0]["steps"], comm_share=share,
                comm_ms_per_step=1e3 * sum(r["comm_s"] for r in ranks) / nproc / ranks[0]["steps"],
                allreduce_per_step=ranks[0]["allreduce_calls"] / ranks[0]["steps"], steps=ranks[0]["steps"])


def _ints(s: str) -> list[int]:
    try:
        v = [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {s!r}") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected ints >= 1, got {s!r}")
    return v


def _methods(s: str) -> list[str]:
    v = [t.strip() for t in s.split(",") if t.strip()]
    bad = [m for m in v if m not in METHODS]
    if bad or not v:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
    return v


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="ddp_scaling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=_ints, default=[1, 2], help="process counts (default 1,2)")
    p.add_argument("--methods", type=_methods, default=["tdlrt", "dense"], help=f"of {', '.join(METHODS)}")
    p.add_argument("--net", default="vgg-mnist", choices=("vgg-mnist", "lenet5"))
    p.add_argument("--global-batch", type=int, default=64, help="global batch (divisible by every N)")
    p.add_argument("--images", type=int, default=640, help="training images per epoch (default 640)")
    p.add_argument("--epochs", type=int, default=2, help="epochs; the last is timed (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--out", default=str(runs_dir("bench", "ddp_scaling")))
    args = p.parse_args(argv)
    for n in args.nprocs:
        if args.global_batch % n:
            p.error(f"--global-batch {args.global_batch} must be divisible by every --nprocs value ({n})")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        print("ddp_scaling: this torch has no gloo backend; nothing measured")
        return 0
    rows = []
    for method in args.methods:
        for n in args.nprocs:
            r = measure(method, n, args.net, args.global_batch, args.images, args.epochs, args.threads)
            rows.append(r)
            print(f"{method:>14} N={n}: {r['images_per_s']:7.1f} img/s, {r['step_ms']:7.1f} ms/step, comm "
                  f"{100 * r['comm_share']:4.1f}% ({r['comm_ms_per_step']:.1f} ms/step, "
                  f"{r['allreduce_per_step']:.2f} all-reduces/step)", flush=True)
    print("\n| method | processes | images/s | speed-up | ms/step | comm share | all-reduces/step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((b for b in rows if b["method"] == r["method"] and b["nproc"] == 1), None)
        speed = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        print(f"| {r['method']} | {r['nproc']} | {r['images_per_s']:.1f} | {speed} | {r['step_ms']:.1f} | "
              f"{100 * r['comm_share']:.1f}% | {r['allreduce_per_step']:.2f} |")
    out = output_dir(args.out)
    write_json(out / "ddp_scaling.json", dict(
        settings=dict(net=args.net, global_batch=args.global_batch, images=args.images, epochs=args.epochs,
                      threads=args.threads, cpus=os.cpu_count(), torch=torch.__version__, backend="gloo"),
        rows=rows))
    print(f"\nwrote {out / 'ddp_scaling.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
