"""Per-step time and peak memory of dense, vanilla Tucker, geoopt fixed-rank and TDLRT training.

Networks: LeNet5 on 28x28 inputs (batch 128) and a VGG-like 6-conv CIFAR-size net (32x32, batch 64),
conv ranks at about 10% and 25% of the channels (spatial modes full rank). Timings are interleaved
round-robin over the methods in one process (the machine is shared and noisy: medians of rounds);
peak memory is the peak resident-set growth (VmHWM after a reset) of a fresh subprocess per method
over a few steps, above its resident set once the model is built.

    tucker-manifold bench step_time [--rounds 7] [--steps 3] [--nets lenet5,vgg] [--fractions 0.1,0.25]
    python benchmarks/step_time.py ...           # the same, from a source checkout

Prints a table of ms/step and ratios (to vanilla and to dense) and writes step_time.json into --out
(default ./runs/bench/step_time; the committed reference is benchmarks/results/, written with
``--out benchmarks/results``).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_manifold.outputs import output_dir, runs_dir, write_json

METHODS = ["dense", "vanilla", "riemannian", "tdlrt"]
# The child process measuring memory imports this very copy of the package (source checkout or wheel).
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def vgg_like(num_classes: int = 10) -> nn.Module:
    """6 conv layers (64-64-128-128-256-256, 3x3), BatchNorm, ReLU, max-pool per block, linear head."""
    layers, c = [], 3
    for w in (64, 128, 256):
        for _ in range(2):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes))


def build(net: str, method: str, fraction: float, seed: int = 0):
    """Model, optimizer and one batch for a (net, method, rank fraction)."""
    from tucker_manifold.models import LeNet5
    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT
    from tucker_manifold.parameter import is_tucker_parameter
    import dataclasses

    import geoopt

    torch.manual_seed(seed)
    if net == "lenet5":
        model, shape, batch = LeNet5(in_channels=1, num_classes=10, image_size=28), (1, 28, 28), 128
    else:
        model, shape, batch = vgg_like(), (3, 32, 32), 64
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    if method != "dense":
        # The first conv (3 or 1 input channels) stays dense: there is nothing to compress.
        first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        tuckerize(model, rank_fraction=fraction, init="random", exclude=[first])
    if method in ("dense", "vanilla"):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    elif method == "riemannian":
        opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        # tau = 0 with rmax at the initial rank: the ranks stay put, so every step does the full
        # augment / two-pass / truncate work at a known size.
        opt = TDLRT(model.parameters(), lr=0.01, momentum=0.9, tau=0.0)
        for p in model.parameters():
            if is_tucker_parameter(p):
                p.bounds = dataclasses.replace(p.bounds, rmax=tuple(p.manifold.ranks))
    return model, opt, x, y


def make_step(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step():
        if isinstance(opt, torch.optim.Optimizer) and opt.__class__.__name__ == "TDLRT":
            opt.step(closure)
        else:
            closure()
            opt.step()

    return step


def time_round_robin(net: str, fraction: float, rounds: int, steps: int) -> dict[str, float]:
    runs = {m: make_step(*build(net, m, fraction)) for m in METHODS}
    for step in runs.values():  # warm-up
        step()
        step()
    samples = {m: [] for m in METHODS}
    for _ in range(rounds):
        for m, step in runs.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            samples[m].append((time.perf_counter() - t0) / steps * 1e3)
    return {m: statistics.median(v) for m, v in samples.items()}


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _measure_in_child(net: str, method: str, fraction: float, steps: int) -> float:
    """Run inside the child: peak RSS growth (MB) over `steps` steps after the model is built.

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so import-time
    peaks do not hide the training peak."""
    step = make_step(*build(net, method, fraction))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    for _ in range(steps):
        step()
    return (_status_kb("VmHWM") - base) / 1024


def peak_memory_mb(net: str, method: str, fraction: float, steps: int = 3) -> float:
    """Peak RSS growth (MB) of a fresh process over `steps` training steps after building the model."""
    code = (
        "import sys, torch; torch.set_num_threads(%d); sys.path.insert(0, %r);"
        "from tucker_manifold.benchmarks import step_time as st;"
        "print(st._measure_in_child(%r, %r, %r, %d))"
    ) % (torch.get_num_threads(), _PACKAGE_PARENT, net, method, fraction, steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--nets", default="lenet5,vgg")
    ap.add_argument("--fractions", default="0.1,0.25")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(runs_dir("bench", "step_time")),
                    help="output folder for step_time.json (default: ./runs/bench/step_time)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for net in args.nets.split(","):
        for frac in [float(f) for f in args.fractions.split(",")]:
            ms = time_round_robin(net, frac, args.rounds, args.steps)
            mem = {} if args.no_memory else {m: peak_memory_mb(net, m, frac) for m in METHODS}
            for m in METHODS:
                rows.append(dict(net=net, rank_fraction=frac, method=m, ms_per_step=ms[m],
                                 vs_vanilla=ms[m] / ms["vanilla"], vs_dense=ms[m] / ms["dense"],
                                 peak_mem_mb=mem.get(m)))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| net | rank | method | ms/step | x vanilla | x dense | peak MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        print(f"| {r['net']} | {r['rank_fraction']:.2f} | {r['method']} | {r['ms_per_step']:.1f} | "
              f"{r['vs_vanilla']:.2f} | {r['vs_dense']:.2f} | {mem} |")
    print("wrote", write_json(output_dir(args.out) / "step_time.json", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
