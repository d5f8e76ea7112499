"""Memory the one-pass TDLRT step holds on top of a plain forward/backward (issue 11).

The single pass keeps, per Tucker layer, its input ``x`` and its output gradient ``gy`` from the
backward until the step rebuilds the augmented-core gradients. This prints, for the CIFAR-size 6-conv
VGG of ``benchmarks/step_time.py`` (the network of the issue's targets) and for VGG16Cifar, at batch
64 and 10% conv rank, float32:

* held: bytes the records hold after the backward (x and gy, storages counted once);
* activations: bytes autograd saves for the backward (``saved_tensors_hooks``), the usual peak;
* the peak and end-of-backward growth of malloc's bytes in use over one forward/backward, with and
  without recording, each in a fresh subprocess (sampled after every aten op; glibc only).

    python benchmarks/onepass_memory.py [--batch 64] [--fraction 0.1] [--nets vgg,vgg16]
    tucker-manifold bench onepass_memory [same options]
"""
from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


def build(net: str, fraction: float, batch: int, seed: int = 0):
    from tucker_manifold.benchmarks.step_time import vgg_like
    from tucker_manifold.models import VGG16Cifar
    from tucker_manifold.nn import tuckerize

    torch.manual_seed(seed)
    model = vgg_like() if net == "vgg" else VGG16Cifar()
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    tuckerize(model, rank_fraction=fraction, init="random", exclude=[first])
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return model, x, y


def hook_layers(model: nn.Module) -> list:
    """The one line each Tucker layer's forward will carry, as a forward hook."""
    from tucker_manifold.nn import TuckerConv2d, TuckerLinear
    from tucker_manifold.parameter import record_io

    return [
        m.register_forward_hook(lambda mod, inp, out: record_io(mod.tucker_weight, mod, inp[0], out))
        for m in model.modules()
        if isinstance(m, (TuckerConv2d, TuckerLinear))
    ]


def held_and_saved(net: str, fraction: float, batch: int) -> tuple[int, int]:
    from tucker_manifold.parameter import is_tucker_parameter, record_layer_io

    model, x, y = build(net, fraction, batch)
    hook_layers(model)
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    params = [p for p in model.parameters() if is_tucker_parameter(p)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), record_layer_io(params) as rec:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return rec.nbytes(), sum(saved.values())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out (heap + mmapped chunks); torch's CPU allocator uses malloc."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return m.uordblks + m.hblkhd


class _PeakAfterEachOp(TorchDispatchMode):
    """Samples malloc's bytes in use after every aten op (forward and backward): the peak of live tensors
    at op granularity, deterministic (unlike the resident set, which the allocator's caching blurs)."""

    def __init__(self):
        super().__init__()
        self.peak = _malloc_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _malloc_in_use())
        return out


def child(net: str, fraction: float, batch: int, record: bool) -> None:
    """One forward/backward after a warm-up one; prints peak and end-of-backward growth (MiB)."""
    from tucker_manifold.parameter import is_tucker_parameter, record_layer_io

    torch.set_num_threads(1)
    model, x, y = build(net, fraction, batch)
    hook_layers(model)
    params = [p for p in model.parameters() if is_tucker_parameter(p)]
    F.cross_entropy(model(x), y).backward()  # warm-up: gradients exist, as in training
    base = _malloc_in_use()
    with _PeakAfterEachOp() as mode:
        if record:
            with record_layer_io(params) as rec:
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        del loss
    end = _malloc_in_use()
    print((mode.peak - base) / 2**20, (end - base) / 2**20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--nets", default="vgg,vgg16")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], args.fraction, args.batch, args.child[1] == "1")
        return 0
    for net in args.nets.split(","):
        held, saved = held_and_saved(net, args.fraction, args.batch)
        peaks = {}
        for rec in ("0", "1"):
            out = subprocess.run(
                [sys.executable, "-m", "tucker_manifold.benchmarks.onepass_memory", "--batch", str(args.batch), "--fraction", str(args.fraction), "--child", net, rec],
                check=True, capture_output=True, text=True,
            ).stdout.split()
            peaks[rec] = (float(out[-2]), float(out[-1]))
        print(
            f"{net}: batch {args.batch}, rank fraction {args.fraction}: held by the records {held / 2**20:.1f} MiB; "
            f"saved activations {saved / 2**20:.1f} MiB; forward+backward peak / end-of-backward growth "
            f"{peaks['0'][0]:.1f} / {peaks['0'][1]:.1f} MiB plain, {peaks['1'][0]:.1f} / {peaks['1'][1]:.1f} MiB recording"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
