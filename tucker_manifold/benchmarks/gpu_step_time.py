"""Per-step time and peak GPU memory of dense, vanilla Tucker (SGD on core and factors), TDLRT (one
pass, the default) and ParallelTDLRT training on a CUDA device, in fp32 and under autocast.

Cases (``--cases``, ``net:batch:rank_fraction``): a VGG-like 6-conv CIFAR-size net (3x32x32) and
VGG-MNIST (1x28x28), convs at the given fraction of the channels (spatial modes full rank; the first
conv stays dense). TDLRT variants run with ``tau = 0`` and ``rmax`` at the initial ranks, so every step
does the full augment / lift / truncate work at a known size. Timings: after ``--warmup`` steps,
``--rounds`` interleaved rounds of ``--steps`` steps per method (``torch.cuda.synchronize`` around
each), median ms/step. Memory: ``torch.cuda.max_memory_allocated`` over one round of that method,
above what was allocated before it (the step's transient memory: activations, gradients, TDLRT's
augmented bases), and the method's resident size (model + optimizer state) once warm.

    tucker-manifold bench gpu_step_time [--cases vgg:64:0.1,vgg-mnist:128:0.1] [--precisions fp32,bf16]
    python benchmarks/gpu_step_time.py ...      # the same, from a source checkout

Without a CUDA device it says so and exits with status 0 (CI never needs a GPU). Writes
gpu_step_time.json (device name, torch and CUDA versions, every figure) into --out (default
./runs/bench/gpu_step_time).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tucker_manifold.outputs import output_dir, runs_dir, write_json

METHODS = ("dense", "vanilla", "tdlrt", "parallel")
DEFAULT_CASES = "vgg:64:0.1,vgg:256:0.1,vgg-mnist:128:0.1"


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
    """``"net:batch:fraction,..."`` -> cases; nets ``vgg`` (CIFAR size) and ``vgg-mnist``."""
    cases = []
    for item in text.split(","):
        try:
            net, batch, frac = item.strip().split(":")
            case = Case(net, int(batch), float(frac))
        except ValueError:
            raise ValueError(f"--cases entries are net:batch:fraction, got {item!r}") from None
        if net not in ("vgg", "vgg-mnist") or case.batch < 1 or not 0 < case.fraction <= 1:
            raise ValueError(f"--cases: unknown net or bad batch/fraction in {item!r} (nets: vgg, vgg-mnist)")
        cases.append(case)
    return cases


def build(case: Case, method: str, device: torch.device, seed: int = 0):
    """Model, optimizer and one batch of a case and method, on ``device``."""
    from tucker_manifold.models import VGGMnist
    from tucker_manifold.nn import tuckerize
    from tucker_manifold.optim import TDLRT, ParallelTDLRT
    from tucker_manifold.parameter import is_tucker_parameter

    torch.manual_seed(seed)
    if case.net == "vgg":
        model, shape = vgg_like(), (3, 32, 32)
    else:
        model, shape = VGGMnist(in_channels=1, num_classes=10, image_size=28), (1, 28, 28)
    if method != "dense":
        first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        tuckerize(model, rank_fraction=case.fraction, init="random", exclude=[first])
    model = model.to(device)
    x = torch.randn(case.batch, *shape, device=device)
    y = torch.randint(0, 10, (case.batch,), device=device)
    if method in ("dense", "vanilla"):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        cls = TDLRT if method == "tdlrt" else ParallelTDLRT
        opt = cls(model.parameters(), lr=0.01, momentum=0.9, tau=0.0)
        for p in model.parameters():
            if is_tucker_parameter(p):
                p.bounds = dataclasses.replace(p.bounds, rmax=tuple(p.manifold.ranks))
    return model, opt, x, y


def make_step(model, opt, x, y, precision: str):
    """One training step through :class:`tucker_manifold.amp.MixedPrecision` (the training loop's path)."""
    from tucker_manifold.amp import MixedPrecision

    mp = MixedPrecision(precision, x.device)

    def closure():
        opt.zero_grad(set_to_none=True)
        with mp.autocast():
            loss = F.cross_entropy(model(x), y)
        mp.backward(loss)
        return loss

    return lambda: mp.step(opt, closure)


def measure_case(case: Case, precision: str, methods: Sequence[str], device: torch.device, warmup: int,
                 rounds: int, steps: int) -> dict[str, dict]:
    """``{method: {ms, peak_mb, resident_mb}}`` of one case and precision (interleaved rounds)."""
    runs, resident = {}, {}
    for m in methods:
        before = torch.cuda.memory_allocated(device)
        step = make_step(*build(case, m, device), precision)
        for _ in range(warmup):
            step()
        torch.cuda.synchronize(device)
        runs[m], resident[m] = step, (torch.cuda.memory_allocated(device) - before) / 2**20
    samples: dict[str, list[float]] = {m: [] for m in methods}
    peak: dict[str, float] = {m: 0.0 for m in methods}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for m, step in runs.items():
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize(device)
            samples[m].append(start.elapsed_time(end) / steps)
            peak[m] = max(peak[m], (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return {m: dict(ms=statistics.median(samples[m]), peak_mb=peak[m], resident_mb=resident[m]) for m in methods}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_step_time", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=DEFAULT_CASES, help=f"net:batch:fraction,... (default {DEFAULT_CASES})")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated of fp32, bf16, fp16 (default fp32,bf16)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {', '.join(METHODS)}")
    p.add_argument("--device", default="cuda", help="a CUDA device (default cuda)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=str(runs_dir("bench", "gpu_step_time")))
    args = p.parse_args(argv)
    from tucker_manifold.amp import PRECISIONS

    try:
        cases = parse_cases(args.cases)
    except ValueError as e:
        p.error(str(e))
    precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    if not precisions or any(s not in PRECISIONS for s in precisions):
        p.error(f"--precisions: each of {', '.join(PRECISIONS)}, got {args.precisions!r}")
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods: each of {', '.join(METHODS)}, got {args.methods!r}")
    if not torch.cuda.is_available():
        print(f"gpu_step_time: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
              "nothing measured")
        return 0
    device = torch.device(args.device)
    if device.type != "cuda":
        p.error(f"--device must be a CUDA device, got {args.device!r}")
    name = torch.cuda.get_device_name(device)
    if "bf16" in precisions and not torch.cuda.is_bf16_supported():
        print(f"gpu_step_time: {name} has no bfloat16; bf16 skipped")
        precisions = [s for s in precisions if s != "bf16"]
    print(f"device: {name} (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)
    rows = []
    for case in cases:
        for precision in precisions:
            res = measure_case(case, precision, methods, device, args.warmup, args.rounds, args.steps)
            for m in methods:
                r = res[m]
                rows.append(dict(case=case.label, precision=precision, method=m, **r,
                                 vs_dense=r["ms"] / res["dense"]["ms"] if "dense" in res else None,
                                 vs_vanilla=r["ms"] / res["vanilla"]["ms"] if "vanilla" in res else None))
                print(f"{case.label:>20} {precision:>4} {m:>8}: {r['ms']:8.2f} ms/step  peak +{r['peak_mb']:7.1f} MB  "
                      f"resident {r['resident_mb']:6.1f} MB", flush=True)
    print("\n| case | precision | method | ms/step | x dense | x vanilla | peak MB (step) | resident MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
        print(f"| {r['case']} | {r['precision']} | {r['method']} | {r['ms']:.2f} | {fmt(r['vs_dense'])} | "
              f"{fmt(r['vs_vanilla'])} | {r['peak_mb']:.1f} | {r['resident_mb']:.1f} |")
    out = output_dir(args.out)
    write_json(out / "gpu_step_time.json", dict(
        device=name, torch=torch.__version__, cuda=torch.version.cuda, warmup=args.warmup, rounds=args.rounds,
        steps=args.steps, rows=rows))
    print(f"\nwrote {out / 'gpu_step_time.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
