"""Per-step time and peak memory of dense, vanilla Tucker, geoopt fixed-rank, TDLRT (one pass, the default,
and the two-pass reference) and ParallelTDLRT training, side by side.

Cases (``--cases``, ``net:batch:rank_fraction``): VGG-MNIST at batch 32 and 128, LeNet5 at batch 128 (28x28
inputs) and a VGG-like 6-conv CIFAR-size net (32x32, batch 64), conv ranks at 10% of the channels (spatial
modes full rank; the first conv stays dense). Every case runs at each ``--threads`` count and in each
``--layouts`` memory layout (``default``, ``channels_last``: model and inputs converted), all in one run.
Timings are interleaved round-robin over the methods in one process (the machine is shared and noisy:
medians of rounds); peak memory is the peak resident-set growth (VmHWM after a reset) of a fresh
subprocess per method over a few steps, above its resident set once the model is built.

Methods: ``dense`` (torch SGD), ``vanilla`` (SGD on core and factors), ``riemannian`` (geoopt
RiemannianSGD), ``tdlrt`` (one pass), ``tdlrt-2pass`` (``single_pass=False``), ``parallel``
(ParallelTDLRT, masked records) and ``parallel-factors`` (ParallelTDLRT, ``core_gradient="factors"``).
TDLRT variants run with ``tau = 0`` and ``rmax`` at the initial ranks, so every step does the full
augment / lift / truncate work at a known size.

    tucker-manifold bench step_time [--rounds 7] [--steps 3] [--threads 1,2] [--layouts default,channels_last]
    python benchmarks/step_time.py ...           # the same, from a source checkout

Prints ms/step with ratios to vanilla and dense, peak memory against vanilla, the issue's targets against
the measured ratios (one-pass TDLRT <= 1.25x vanilla on every net, ParallelTDLRT <= 1.2x, both <= dense
on the CIFAR-size VGG, peak memory <= vanilla + 15%) and the channels_last / default ratio of every
method; writes step_time.json into --out (default ./runs/bench/step_time).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_manifold.outputs import output_dir, runs_dir, write_json

METHODS = ["dense", "vanilla", "riemannian", "tdlrt", "tdlrt-2pass", "parallel", "parallel-factors"]
DEFAULT_CASES = "vgg-mnist:32:0.1,vgg-mnist:128:0.1,lenet5:128:0.1,vgg:64:0.1"
LAYOUTS = ("default", "channels_last")
#: (method, limit of ms / vanilla ms) on every case
TIME_TARGETS = (("tdlrt", 1.25), ("parallel", 1.2))
#: methods that must not be slower than dense on the CIFAR-size VGG
DENSE_TARGET_NET, DENSE_TARGET_METHODS = "vgg", ("tdlrt", "parallel")
MEMORY_TARGET = 1.15  # peak memory <= vanilla + 15%
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


@dataclasses.dataclass(frozen=True)
class Case:
    net: str
    batch: int
    fraction: float

    @property
    def label(self) -> str:
        return f"{self.net} b{self.batch} r{self.fraction:g}"


def parse_cases(text: str) -> list[Case]:
    """``"net:batch:fraction,..."`` -> cases; nets ``vgg-mnist``, ``lenet5``, ``vgg``."""
    cases = []
    for item in text.split(","):
        try:
            net, batch, frac = item.strip().split(":")
            case = Case(net, int(batch), float(frac))
        except ValueError:
            raise ValueError(f"--cases entries are net:batch:fraction, got {item!r}") from None
        if net not in ("vgg-mnist", "lenet5", "vgg") or case.batch < 1 or not 0 < case.fraction <= 1:
            raise ValueError(f"--cases: unknown net or bad batch/fraction in {item!r} (nets: vgg-mnist, lenet5, vgg)")
        cases.append(case)
    return cases


def build(case: Case, method: str, layout: str = "default", seed: int = 0):
    """Model, optimizer and one batch for a case and method."""
    from tucker_manifold.models import LeNet5, VGGMnist
    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT, ParallelTDLRT
    from tucker_manifold.parameter import is_tucker_parameter

    import geoopt

    torch.manual_seed(seed)
    if case.net == "lenet5":
        model, shape = LeNet5(in_channels=1, num_classes=10, image_size=28), (1, 28, 28)
    elif case.net == "vgg-mnist":
        model, shape = VGGMnist(in_channels=1, num_classes=10, image_size=28), (1, 28, 28)
    else:
        model, shape = vgg_like(), (3, 32, 32)
    x = torch.randn(case.batch, *shape)
    y = torch.randint(0, 10, (case.batch,))
    if method != "dense":
        # The first conv (3 or 1 input channels) stays dense: there is nothing to compress.
        first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        tuckerize(model, rank_fraction=case.fraction, init="random", exclude=[first])
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if method in ("dense", "vanilla"):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    elif method == "riemannian":
        opt = geoopt.optim.RiemannianSGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        # tau = 0 with rmax at the initial rank: the ranks stay put, so every step does the full
        # augment / lift / truncate work at a known size.
        kw = dict(lr=0.01, momentum=0.9, tau=0.0)
        if method == "tdlrt":
            opt = TDLRT(model.parameters(), **kw)
        elif method == "tdlrt-2pass":
            opt = TDLRT(model.parameters(), single_pass=False, **kw)
        elif method == "parallel":
            opt = ParallelTDLRT(model.parameters(), **kw)
        elif method == "parallel-factors":
            opt = ParallelTDLRT(model.parameters(), core_gradient="factors", **kw)
        else:
            raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
        for p in model.parameters():
            if is_tucker_parameter(p):
                p.bounds = dataclasses.replace(p.bounds, rmax=tuple(p.manifold.ranks))
    return model, opt, x, y


def make_step(model, opt, x, y):
    from tucker_manifold.optim import TDLRT

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def step():
        if isinstance(opt, TDLRT):
            opt.step(closure)
        else:
            closure()
            opt.step()

    return step


def time_round_robin(case: Case, layout: str, methods: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Median ms/step of each method, measured in interleaved rounds (same process, same threads)."""
    runs = {m: make_step(*build(case, m, layout)) for m in methods}
    for step in runs.values():  # warm-up
        step()
        step()
    samples: dict[str, list[float]] = {m: [] for m in methods}
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


def _measure_in_child(net: str, batch: int, fraction: float, method: str, layout: str, steps: int) -> float:
    """Run inside the child: peak RSS growth (MB) over `steps` steps after the model is built.

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark (VmHWM), so import-time
    peaks do not hide the training peak."""
    step = make_step(*build(Case(net, batch, fraction), method, layout))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    for _ in range(steps):
        step()
    return (_status_kb("VmHWM") - base) / 1024


def peak_memory_mb(case: Case, method: str, layout: str, threads: int, steps: int = 3) -> float:
    """Peak RSS growth (MB) of a fresh process over `steps` training steps after building the model."""
    code = (
        "import sys, torch; torch.set_num_threads(%d); sys.path.insert(0, %r);"
        "from tucker_manifold.benchmarks import step_time as st;"
        "print(st._measure_in_child(%r, %d, %r, %r, %r, %d))"
    ) % (threads, _PACKAGE_PARENT, case.net, case.batch, case.fraction, method, layout, steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _find(rows: list[dict], **key) -> Optional[dict]:
    return next((r for r in rows if all(r[k] == v for k, v in key.items())), None)


def target_rows(rows: list[dict]) -> list[dict]:
    """The issue's targets against the measured ratios, per case, thread count and layout."""
    out = []
    for r in rows:
        if r["method"] != "vanilla":
            continue
        key = dict(case=r["case"], threads=r["threads"], layout=r["layout"])
        for method, limit in TIME_TARGETS:
            m = _find(rows, method=method, **key)
            if m is not None:
                out.append(dict(key, target=f"{method} <= {limit:g}x vanilla", measured=m["vs_vanilla"],
                                met=m["vs_vanilla"] <= limit))
        if r["net"] == DENSE_TARGET_NET:
            for method in DENSE_TARGET_METHODS:
                m = _find(rows, method=method, **key)
                if m is not None and m["vs_dense"] is not None:
                    out.append(dict(key, target=f"{method} <= dense", measured=m["vs_dense"], met=m["vs_dense"] <= 1.0))
        if r["peak_mem_mb"] is not None:
            for method, _ in TIME_TARGETS:
                m = _find(rows, method=method, **key)
                if m is not None and m["peak_mem_mb"] is not None and r["peak_mem_mb"] > 0:
                    ratio = m["peak_mem_mb"] / r["peak_mem_mb"]
                    out.append(dict(key, target=f"{method} peak memory <= vanilla + 15%", measured=ratio,
                                    met=ratio <= MEMORY_TARGET))
    return out


def layout_rows(rows: list[dict]) -> list[dict]:
    """channels_last ms / default ms for every case, thread count and method measured in both."""
    out = []
    for r in rows:
        if r["layout"] != "default":
            continue
        cl = _find(rows, case=r["case"], threads=r["threads"], method=r["method"], layout="channels_last")
        if cl is not None:
            out.append(dict(case=r["case"], threads=r["threads"], method=r["method"], default_ms=r["ms_per_step"],
                            channels_last_ms=cl["ms_per_step"], ratio=cl["ms_per_step"] / r["ms_per_step"]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median; default 7)")
    ap.add_argument("--steps", type=int, default=3, help="steps per method and round (default 3)")
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"net:batch:rank_fraction,... (default {DEFAULT_CASES})")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, each measured in turn (default 1,2)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="default and/or channels_last (default: both)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--memory-steps", type=int, default=3, help="steps per peak-memory subprocess (default 3)")
    ap.add_argument("--out", default=str(runs_dir("bench", "step_time")),
                    help="output folder for step_time.json (default: ./runs/bench/step_time)")
    args = ap.parse_args(argv)
    cases = parse_cases(args.cases)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or "vanilla" not in methods:
        ap.error(f"--methods: unknown {bad}; valid: {METHODS} (vanilla is needed for the ratios)")
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if not layouts or any(s not in LAYOUTS for s in layouts):
        ap.error(f"--layouts: choose from {LAYOUTS}")
    threads = [int(t) for t in args.threads.split(",") if t.strip()]

    rows = []
    for case in cases:
        for layout in layouts:
            mem = {}
            if not args.no_memory:
                mem = {m: peak_memory_mb(case, m, layout, threads[0], args.memory_steps) for m in methods}
            for t in threads:
                torch.set_num_threads(t)
                ms = time_round_robin(case, layout, methods, args.rounds, args.steps)
                for m in methods:
                    rows.append(dict(case=case.label, net=case.net, batch=case.batch, rank_fraction=case.fraction,
                                     layout=layout, threads=t, method=m, ms_per_step=ms[m],
                                     vs_vanilla=ms[m] / ms["vanilla"],
                                     vs_dense=ms[m] / ms["dense"] if "dense" in ms else None,
                                     peak_mem_mb=mem.get(m),
                                     mem_vs_vanilla=(mem[m] / mem["vanilla"]) if mem and mem["vanilla"] > 0 else None))
    targets, layouts_cmp = target_rows(rows), layout_rows(rows)

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"torch {torch.__version__}; threads {threads}; layouts {layouts}; rounds {args.rounds} x {args.steps} steps")
    print("| case | layout | threads | method | ms/step | x vanilla | x dense | peak MB | mem x vanilla |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['layout']} | {r['threads']} | {r['method']} | {r['ms_per_step']:.1f} | "
              f"{r['vs_vanilla']:.2f} | {f(r['vs_dense'], '.2f')} | {f(r['peak_mem_mb'], '.0f')} | "
              f"{f(r['mem_vs_vanilla'], '.2f')} |")
    print("\nTargets (issue 11; ratios from this run):")
    print("| case | layout | threads | target | measured | met |")
    print("|---|---|---|---|---|---|")
    for r in targets:
        print(f"| {r['case']} | {r['layout']} | {r['threads']} | {r['target']} | {r['measured']:.2f} | "
              f"{'yes' if r['met'] else 'NO'} |")
    if targets:
        print(f"met {sum(r['met'] for r in targets)} of {len(targets)}")
    if layouts_cmp:
        print("\nchannels_last vs default (ms ratio < 1: channels_last faster):")
        print("| case | threads | method | default ms | channels_last ms | ratio |")
        print("|---|---|---|---|---|---|")
        for r in layouts_cmp:
            print(f"| {r['case']} | {r['threads']} | {r['method']} | {r['default_ms']:.1f} | "
                  f"{r['channels_last_ms']:.1f} | {r['ratio']:.2f} |")
    out = dict(torch=torch.__version__, rounds=args.rounds, steps=args.steps, rows=rows, targets=targets,
               channels_last=layouts_cmp)
    print("wrote", write_json(output_dir(args.out) / "step_time.json", out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
