"""Gap of the budget allocation (tucker_manifold.budget.allocate_ranks) to the exact optimum.

Single tensor: random tensors (d = 3 and 4, random shapes, per-mode spectral decays and noise), a random
budget N between the minimum and the full count; the exact optimum is the smallest true truncated-HOSVD
error over every core shape that fits N (brute force). Reported gap: ``||T - T_alloc||_F / ||T - T_opt||_F - 1``
(and the same for squared errors), for the greedy alone, greedy + local search (radius 1, 2), and for the
HOSVD-bound objective (greedy on the bound, and the bound's own brute-force optimum, both judged by their
true error).

Several tensors: 2-3 small tensors (some with fixed modes and rmin > 1, random weights), a random total
budget; the exact optimum of the weighted objective by Pareto merge of every tensor's shapes.

    python benchmarks/budget_gap.py [--trials 100] [--seed 0] [--max-tensors 3] [--out runs/bench/budget_gap]
    tucker-manifold bench budget_gap [same options]
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

from tucker_manifold import budget as B
from tucker_manifold.outputs import output_dir, runs_dir, write_json
from tucker_manifold.parameter import RankBounds

VARIANTS = {  # name: (objective, improve, radius)
    "greedy": ("exact", False, 0),
    "greedy+ls1": ("exact", True, 1),
    "greedy+ls2": ("exact", True, 2),
    "bound greedy+ls2": ("bound", True, 2),
}


def _gap(err: float, opt: float, total: float) -> float:
    """Relative gap in Frobenius norm (squared errors in); 0 when both are at rounding level."""
    floor = 1e-13 * total
    if opt <= floor:
        return 0.0 if err <= 10 * floor else math.inf
    return math.sqrt(max(err, 0.0) / opt) - 1.0


def _random_tensor(rng: np.random.Generator, gen: torch.Generator, d: int, size: str) -> torch.Tensor:
    lo, hi = {
        ("small", 3): (3, 9), ("small", 4): (2, 6), ("medium", 3): (8, 17), ("medium", 4): (4, 9),
        ("large", 3): (16, 25), ("large", 4): (8, 12),
    }[(size, d)]
    shape = tuple(int(x) for x in rng.integers(lo, hi + 1, size=d))
    decays = [float(x) for x in rng.uniform(0.15, 0.95, size=d)]
    noise = float(rng.choice([0.0, 1e-3, 1e-2, 1e-1]))
    return B.synthetic_tensor(shape, decays, noise, gen)


def single(trials: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for trial in range(trials):
        gen = torch.Generator().manual_seed(seed * 100003 + trial)
        d = 3 if trial % 2 == 0 else 4
        size = ("small", "medium", "large")[(trial // 2) % 3]
        tensor = _random_tensor(rng, gen, d, size)
        item = B.budget_tensor(tensor)
        lo, hi = item.count(item.lower), item.count(item.upper)
        n = int(rng.integers(lo, hi + 1))
        opt = B.optimal_core_shape_bruteforce(item, n, "exact")
        bound_opt = B.optimal_core_shape_bruteforce(item, n, "bound")
        row = dict(trial=trial, d=d, shape=list(tensor.shape), budget=n, opt_ranks=list(opt.ranks[0]),
                   opt_error=math.sqrt(opt.objective), rel_opt_error=math.sqrt(opt.objective / item.total),
                   gaps={}, excess={}, ranks={})
        for name, (obj, imp, rad) in VARIANTS.items():
            a = B.allocate_ranks([item], n, obj, improve=imp, radius=rad)
            if a.count > n:
                raise AssertionError(f"trial {trial}: count {a.count} > budget {n}")
            err = item.error(a.ranks[0], "exact")
            row["gaps"][name] = _gap(err, opt.objective, item.total)
            row["excess"][name] = (math.sqrt(err) - math.sqrt(opt.objective)) / math.sqrt(item.total)
            row["ranks"][name] = list(a.ranks[0])
        err = item.error(bound_opt.ranks[0], "exact")
        row["gaps"]["bound brute force"] = _gap(err, opt.objective, item.total)
        row["excess"]["bound brute force"] = (math.sqrt(err) - math.sqrt(opt.objective)) / math.sqrt(item.total)
        rows.append(row)
    return dict(rows=rows, summary=_summary(rows))


def _random_item(rng: np.random.Generator, gen: torch.Generator) -> B.BudgetTensor:
    kind = int(rng.integers(0, 3))
    if kind == 0:  # 3-way, all adaptive
        tensor = _random_tensor(rng, gen, 3, "small")
        bounds = None
    elif kind == 1:  # conv-like: two adaptive channel modes, two fixed spatial modes
        shape = tuple(int(x) for x in rng.integers(4, 17, size=2)) + (3, 3)
        tensor = B.synthetic_tensor(shape, [float(x) for x in rng.uniform(0.2, 0.95, size=4)], 1e-2, gen)
        bounds = RankBounds((1, 1, 3, 3), shape, (True, True, False, False))
    else:  # 4-way with rmin = 2
        tensor = _random_tensor(rng, gen, 4, "small")
        bounds = RankBounds.full(tensor.shape).with_overrides(tensor.shape, rmin=2)
    weight = "relative" if rng.random() < 0.7 else float(rng.uniform(0.1, 10.0)) / float(tensor.square().sum())
    return B.budget_tensor(tensor, bounds=bounds, weight=weight)


def multi(trials: int, seed: int, max_tensors: int = 3) -> dict:
    rng = np.random.default_rng(seed + 1)
    rows = []
    for trial in range(trials):
        gen = torch.Generator().manual_seed(seed * 100003 + 50000 + trial)
        items = [_random_item(rng, gen) for _ in range(int(rng.integers(2, max_tensors + 1)))]
        lo = B.min_param_count(items)
        hi = sum(t.count(t.upper) for t in items)
        n = int(rng.integers(lo, hi + 1))
        opt = B.optimal_allocation_bruteforce(items, n, "exact")
        row = dict(trial=trial, shapes=[list(t.shape) for t in items], budget=n, opt_ranks=opt.ranks,
                   opt_objective=opt.objective, gaps={}, excess={}, ranks={})
        total = sum(t.weight * t.total for t in items)
        for name, (obj, imp, rad) in VARIANTS.items():
            a = B.allocate_ranks(items, n, obj, improve=imp, radius=rad)
            if a.count > n:
                raise AssertionError(f"trial {trial}: count {a.count} > budget {n}")
            exact = sum(t.weight * t.error(r, "exact") for t, r in zip(items, a.ranks))
            row["gaps"][name] = _gap(exact, opt.objective, total)
            row["excess"][name] = (math.sqrt(exact) - math.sqrt(opt.objective)) / math.sqrt(total)
            row["ranks"][name] = [list(r) for r in a.ranks]
        rows.append(row)
    return dict(rows=rows, summary=_summary(rows))


def _summary(rows: list[dict]) -> dict:
    out = {}
    for name in rows[0]["gaps"]:
        g = np.array([r["gaps"][name] for r in rows])
        sq = (1 + g) ** 2 - 1
        ex = np.array([r["excess"][name] for r in rows])
        out[name] = dict(worst=float(g.max()), mean=float(g.mean()), median=float(np.median(g)),
                         frac_not_optimal=float((g > 1e-9).mean()), frac_over_5pct=float((g > 0.05).mean()),
                         worst_squared=float(sq.max()), mean_squared=float(sq.mean()), worst_excess=float(ex.max()))
    return out


def _table(title: str, summary: dict) -> str:
    lines = [
        f"{title}",
        "gap = ||T - T_alloc|| / ||T - T_opt|| - 1; excess = (||T - T_alloc|| - ||T - T_opt||) / ||T|| (weighted for several)",
        f"{'variant':<20} {'worst':>8} {'mean':>9} {'not opt':>8} {'>5%':>6} {'worst excess':>13}",
    ]
    for name, s in summary.items():
        lines.append(f"{name:<20} {s['worst']:8.4f} {s['mean']:9.5f} {s['frac_not_optimal']:8.2f} "
                     f"{s['frac_over_5pct']:6.2f} {s['worst_excess']:13.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100, help="random cases per experiment (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tensors", type=int, default=3, help="tensors per multi-tensor case: 2..this (default 3)")
    parser.add_argument("--out", default=str(runs_dir("bench", "budget_gap")), help="output folder")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    if args.max_tensors < 2:
        parser.error("--max-tensors must be >= 2")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = dict(single=single(args.trials, args.seed), multi=multi(args.trials, args.seed, args.max_tensors),
               trials=args.trials, seed=args.seed, max_tensors=args.max_tensors)
    res["seconds"] = time.perf_counter() - t0
    out = output_dir(args.out)
    write_json(out / "budget_gap.json", res)
    text = "\n\n".join([
        _table(f"single tensor, {args.trials} random tensors (d = 3, 4)", res["single"]["summary"]),
        _table(f"2-{args.max_tensors} tensors, {args.trials} random cases", res["multi"]["summary"]),
    ])
    (out / "budget_gap.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'budget_gap.json'} ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
