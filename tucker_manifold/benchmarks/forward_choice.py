"""Is TuckerConv2d's "auto" forward choice right? Time both paths per layer configuration.

For each (channels, spatial size, batch, rank fraction) the factorized path (1x1, small core conv,
1x1) and the reconstructed path (build the kernel, one conv) are timed forward + backward,
interleaved round-robin (medians), and compared with what ``forward_mode="auto"`` picks from the
multiply-add count. A pick counts as right when it is the faster path, or within 10% of it (a tie
on this noisy shared machine).

    tucker-manifold bench forward_choice [--rounds 7] [--threads 1]   # or python benchmarks/forward_choice.py

Writes forward_choice.json into --out (default ./runs/bench/forward_choice).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from tucker_manifold.nn import TuckerConv2d
from tucker_manifold.outputs import output_dir, runs_dir, write_json

# (C_in, C_out, spatial, batch, rank fraction of the channels)
CONFIGS = [
    (3, 8, 32, 64, 1.0), (3, 64, 32, 64, 1.0), (16, 16, 28, 64, 1.0), (16, 16, 28, 64, 0.5),
    (64, 64, 32, 64, 0.1), (64, 64, 32, 64, 0.5), (64, 64, 32, 64, 1.0), (128, 128, 16, 64, 0.1),
    (128, 128, 16, 64, 0.25), (128, 128, 16, 64, 1.0), (256, 256, 8, 64, 0.1), (256, 256, 8, 64, 0.5),
    (512, 512, 4, 64, 0.1), (512, 512, 4, 64, 1.0), (20, 50, 12, 128, 0.1), (20, 50, 12, 128, 1.0),
]


def time_paths(c_in, c_out, size, batch, frac, rounds):
    from tucker_manifold.nn.layers import valid_multilinear_ranks

    ranks = valid_multilinear_ranks((c_out, c_in, 3, 3), (max(1, round(frac * c_out)), max(1, round(frac * c_in)), 3, 3))
    layers = {}
    for mode in ("factorized", "reconstructed"):
        torch.manual_seed(0)
        layers[mode] = TuckerConv2d(c_in, c_out, 3, ranks=ranks, padding=1, forward_mode=mode)
    auto = TuckerConv2d(c_in, c_out, 3, ranks=ranks, padding=1)
    x = torch.randn(batch, c_in, size, size, requires_grad=True)
    chosen = auto.chosen_forward(x.shape)
    samples = {m: [] for m in layers}
    for _ in range(rounds + 1):
        for m, layer in layers.items():
            t0 = time.perf_counter()
            layer(x).sum().backward()
            samples[m].append(time.perf_counter() - t0)
    ms = {m: statistics.median(v[1:]) * 1e3 for m, v in samples.items()}
    faster = min(ms, key=ms.get)
    right = chosen == faster or ms[chosen] <= 1.1 * ms[faster]
    return dict(c_in=c_in, c_out=c_out, size=size, batch=batch, rank_fraction=frac, ranks=ranks,
                factorized_ms=ms["factorized"], reconstructed_ms=ms["reconstructed"], auto=chosen,
                faster=faster, right=right)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(runs_dir("bench", "forward_choice")),
                    help="output folder for forward_choice.json (default: ./runs/bench/forward_choice)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [time_paths(*cfg, rounds=args.rounds) for cfg in CONFIGS]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, forward + backward, medians")
    print("| C_in -> C_out | HxW | batch | ranks | factorized ms | reconstructed ms | auto picks | faster | right |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['c_in']} -> {r['c_out']} | {r['size']}x{r['size']} | {r['batch']} | {r['ranks']} | "
              f"{r['factorized_ms']:.1f} | {r['reconstructed_ms']:.1f} | {r['auto']} | {r['faster']} | "
              f"{'yes' if r['right'] else 'NO'} |")
    n_right = sum(r["right"] for r in rows)
    print(f"auto choice right (faster or within 10%) in {n_right}/{len(rows)} configurations")
    print("wrote", write_json(output_dir(args.out) / "forward_choice.json", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
