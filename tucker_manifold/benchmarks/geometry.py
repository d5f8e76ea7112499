"""Time of one Riemannian step's geometry (egrad2rgrad + retr + transp): FixedRankTucker in Tucker
form against the same operations done on dense tensors.

Problem: f(X) = 0.5 ||X - A||^2 on the manifold of multilinear rank r, A a random tensor of rank r.

* ours:  rgrad = M.egrad2rgrad(x, g) from the packed autograd gradient g; y = M.retr(x, -h rgrad)
         (QR of [U_i | dU_i] and truncated HOSVD of the 2r core); M.transp(x, y, rgrad).
* dense: the dense gradient G = X - A; rgrad = M.proj_dense(x, G) and its dense tensor Xi; the
         retraction is a truncated HOSVD of the dense X - h Xi; the transport is M.proj_dense(y, Xi).

Both sides get their gradient for free (packed or dense), so only the geometry is timed. The two are
interleaved round-robin in one process (the machine is shared and noisy): medians of ``--repeats``
rounds after a warm-up (the per-operation columns are medians of each operation, the total the median
of the per-round sums; the minimum is reported too, as the least noisy figure on a shared machine). Both compute the same point and the same transported vector; the script
checks that before timing. A second table times retr, egrad2rgrad and proju on a batch of 64 points
in one call against a Python loop over the points (the batch path uses batched QR/SVD/matmul).

    tucker-manifold bench geometry [--repeats 15] [--threads N]   # or python benchmarks/geometry.py

Prints a table (ms, ratio dense/ours) and writes geometry.json into --out (default
./runs/bench/geometry).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from tucker_manifold import FixedRankTucker
from tucker_manifold.outputs import output_dir, runs_dir, write_json
from tucker_manifold.tucker import truncated_hosvd

CASES = [((64, 64, 3, 3), (8, 8, 3, 3)), ((256, 256, 3, 3), (32, 32, 3, 3))]
# Batch row: one call on a (BATCH, packed_size) tensor of points against a Python loop over them.
BATCH, BATCH_CASES = 64, [((16, 16, 3, 3), (4, 4, 3, 3)), ((64, 64, 3, 3), (8, 8, 3, 3))]
STEP = 0.5


def setup(shape, ranks, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = FixedRankTucker(shape, ranks)
    x = m.random(generator=g, dtype=dtype)
    a = m.to_dense(m.random(generator=g, dtype=dtype))
    xr = x.clone().requires_grad_(True)
    (0.5 * (m.to_dense(xr) - a).square().sum()).backward()
    packed_grad = xr.grad.detach()
    dense_grad = m.to_dense(x) - a
    return m, x, packed_grad, dense_grad


def ours(m, x, g):
    rg = m.egrad2rgrad(x, g)
    y = m.retr(x, -STEP * rg)
    tv = m.transp(x, y, rg)
    return y, tv


def dense(m, x, dense_x, grad):
    rg = m.proj_dense(x, grad)
    xi = m.tangent_to_dense(x, rg)
    core, factors, _ = truncated_hosvd(dense_x - STEP * xi, ranks=m.ranks)
    y = m.pack(core, factors)
    tv = m.proj_dense(y, xi)
    return y, tv


def ours_parts(m, x, g):
    t0 = time.perf_counter()
    rg = m.egrad2rgrad(x, g)
    t1 = time.perf_counter()
    y = m.retr(x, -STEP * rg)
    t2 = time.perf_counter()
    m.transp(x, y, rg)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def dense_parts(m, x, dense_x, grad):
    t0 = time.perf_counter()
    rg = m.proj_dense(x, grad)
    xi = m.tangent_to_dense(x, rg)
    t1 = time.perf_counter()
    core, factors, _ = truncated_hosvd(dense_x - STEP * xi, ranks=m.ranks)
    y = m.pack(core, factors)
    t2 = time.perf_counter()
    m.proj_dense(y, xi)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def check_same(m, x, g, dense_x, grad):
    y1, tv1 = ours(m, x, g)
    y2, tv2 = dense(m, x, dense_x, grad)
    d1, d2 = m.to_dense(y1), m.to_dense(y2)
    err_y = ((d1 - d2).norm() / d2.norm()).item()
    t1, t2 = m.tangent_to_dense(y1, tv1), m.tangent_to_dense(y2, tv2)
    err_t = ((t1 - t2).norm() / t2.norm()).item()
    if err_y > 1e-8 or err_t > 1e-8:
        raise SystemExit(f"ours and dense disagree: point {err_y:.2e}, transported vector {err_t:.2e}")
    return err_y, err_t


def bench(shape, ranks, repeats, warmup=3):
    m, x, g, grad = setup(shape, ranks)
    dense_x = m.to_dense(x)
    err_y, err_t = check_same(m, x, g, dense_x, grad)
    for _ in range(warmup):
        ours_parts(m, x, g)
        dense_parts(m, x, dense_x, grad)
    times = {"ours": [], "dense": []}
    for _ in range(repeats):
        times["ours"].append(ours_parts(m, x, g))
        times["dense"].append(dense_parts(m, x, dense_x, grad))
    out = {"shape": list(shape), "ranks": list(ranks), "dense_numel": dense_x.numel(),
           "packed_size": m.packed_size, "check_rel_err_point": err_y, "check_rel_err_transport": err_t}
    for side, rows in times.items():
        parts = list(zip(*rows))
        out[side] = {
            "egrad2rgrad_ms": 1e3 * statistics.median(parts[0]),
            "retr_ms": 1e3 * statistics.median(parts[1]),
            "transp_ms": 1e3 * statistics.median(parts[2]),
            "total_ms": 1e3 * statistics.median([sum(r) for r in rows]),
            "total_min_ms": 1e3 * min(sum(r) for r in rows),
        }
    out["ratio_dense_over_ours"] = out["dense"]["total_ms"] / out["ours"]["total_ms"]
    out["ratio_dense_over_ours_min"] = out["dense"]["total_min_ms"] / out["ours"]["total_min_ms"]
    return out


def bench_batch(shape, ranks, repeats, batch=BATCH):
    """retr, egrad2rgrad and proju on ``batch`` points in one batched call vs a loop, interleaved."""
    g = torch.Generator().manual_seed(0)
    m = FixedRankTucker(shape, ranks)
    x = m.random(batch, m.packed_size, generator=g, dtype=torch.float64)
    e = torch.randn(x.shape, generator=g, dtype=torch.float64)
    u = m.proju(x, e)
    ops = {"retr": (m.retr, (x, 0.5 * u)), "egrad2rgrad": (m.egrad2rgrad, (x, e)), "proju": (m.proju, (x, e))}
    out = {"shape": list(shape), "ranks": list(ranks), "batch": batch}
    for name, (f, args) in ops.items():
        batched, looped = f(*args), torch.stack([f(*(a[i] for a in args)) for i in range(batch)])
        if name == "retr":
            batched, looped = m.to_dense(batched), m.to_dense(looped)
        if not torch.allclose(batched, looped, atol=1e-10 * looped.abs().max().item()):
            raise SystemExit(f"batched {name} disagrees with the loop")
        tb, tl = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(*args)
            t1 = time.perf_counter()
            for i in range(batch):
                f(*(a[i] for a in args))
            tb.append(t1 - t0)
            tl.append(time.perf_counter() - t1)
        out[name] = {"batched_ms": 1e3 * statistics.median(tb), "loop_ms": 1e3 * statistics.median(tl),
                     "loop_over_batched": statistics.median(tl) / statistics.median(tb),
                     "loop_over_batched_min": min(tl) / min(tb)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per case (median reported)")
    parser.add_argument("--out", type=Path, default=runs_dir("bench", "geometry"),
                        help="output folder for geometry.json (default: ./runs/bench/geometry)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default, untouched)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = [bench(s, r, args.repeats) for s, r in CASES]
    head = f"{'shape':>16} {'ranks':>14} {'side':>6} {'rgrad ms':>9} {'retr ms':>9} {'transp ms':>9} {'total ms':>9} {'min ms':>8} {'dense/ours':>10}"
    print(head)
    print("-" * len(head))
    for res in results:
        for side in ("ours", "dense"):
            t = res[side]
            ratio = (f"{res['ratio_dense_over_ours']:9.1f}x (min {res['ratio_dense_over_ours_min']:.1f}x)"
                     if side == "dense" else "")
            print(f"{str(tuple(res['shape'])):>16} {str(tuple(res['ranks'])):>14} {side:>6} "
                  f"{t['egrad2rgrad_ms']:9.2f} {t['retr_ms']:9.2f} {t['transp_ms']:9.2f} {t['total_ms']:9.2f} {t['total_min_ms']:8.2f} {ratio}")
    batch_results = [bench_batch(s, r, args.repeats) for s, r in BATCH_CASES]
    print(f"\nbatch of {BATCH} points in one call vs a Python loop over them (ms, median; loop/batched)")
    for res in batch_results:
        cells = "  ".join(f"{op} {res[op]['batched_ms']:.2f} vs {res[op]['loop_ms']:.2f} = {res[op]['loop_over_batched']:.1f}x"
                          for op in ("retr", "egrad2rgrad", "proju"))
        print(f"{str(tuple(res['shape'])):>16} {str(tuple(res['ranks'])):>14}  {cells}")
    payload = {
        "benchmark": "egrad2rgrad + retr + transp, float64, median of interleaved rounds",
        "batch_vs_loop": batch_results,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "results": results,
    }
    print("wrote", write_json(output_dir(args.out) / "geometry.json", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
