"""Merge the output folders of several ``tucker-manifold compare`` runs (same setting, disjoint
(method, tau, seed) runs; a run without tau, such as dense, may come from every folder of a tau sweep,
and is kept once if its copies agree) into one table: results.csv, results.md, accuracy_vs_compression.png, plus
each run's metrics.json / history.csv (checkpoints are not copied) and flops.md (pruned runs).

A run is a function of its config and thread count, so runs made by separate compare commands are
the runs one command with all the seeds would have made.

    python results/table1/merge_results.py OUT COMPARE_DIR [COMPARE_DIR ...]
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

from tucker_manifold.experiments import TrainConfig
from tucker_manifold.experiments.reports import summarize, write_results

FLOATS = ("test_acc", "test_loss", "train_acc", "conv_compression", "total_compression", "time_per_epoch_s", "wall_s")
INTS = ("seed", "conv_params", "total_params", "epochs")
#: the config fields that define the setting (equal in every merged run)
SETTING = ("model", "data", "lr", "momentum", "weight_decay", "init", "epochs", "batch_size", "subset", "data_root",
           "image_size", "schedule", "device", "memory_format", "precision")


def read_rows(folder: Path) -> list[dict]:
    rows = []
    with open(folder / "results.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            r = dict(r)
            for k in FLOATS:
                r[k] = float(r[k])
            for k in INTS:
                r[k] = int(r[k])
            r["tau"] = float(r["tau"]) if r["tau"] else None
            r["ranks"] = json.loads(r["ranks"]) if r["ranks"] else {}
            r["_dir"] = folder
            rows.append(r)
    return rows


def tag(r: dict) -> str:
    return f"{r['method']}_tau{r['tau']:g}_seed{r['seed']}" if r["tau"] is not None else f"{r['method']}_seed{r['seed']}"


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, folders = Path(argv[0]), [Path(a) for a in argv[1:]]
    rows: list[dict] = []
    seen: set = set()
    for f in folders:
        for r in read_rows(f):
            key = (r["method"], r["tau"], r["seed"])
            if key in seen:
                twin = next(x for x in rows if (x["method"], x["tau"], x["seed"]) == key)
                # a run without tau (dense) is made by every compare command of a tau sweep: the same run
                if r["tau"] is None and twin["test_acc"] == r["test_acc"] and twin["test_loss"] == r["test_loss"]:
                    continue
                raise SystemExit(f"run {key} appears twice with different results")
            seen.add(key)
            rows.append(r)
    configs = []
    out.mkdir(parents=True, exist_ok=True)
    flops = []
    for r in rows:
        src = r["_dir"] / "runs" / tag(r)
        dst = out / "run_files" / tag(r)  # not "runs/": .gitignore keeps runs/ folders out of git
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.json", "history.csv"):
            shutil.copy2(src / name, dst / name)
        m = json.loads((src / "metrics.json").read_text())
        configs.append({k: m["config"].get(k) for k in SETTING})
        if "flops_dense_equivalent" in m:
            flops.append((r["method"], r["seed"], m["conv_sparsity"], m["flops_dense_equivalent"], m["flops_nonzero_weights"]))
    if any(c != configs[0] for c in configs):
        raise SystemExit("the runs were made in different settings")
    seeds = sorted({r["seed"] for r in rows})
    base = TrainConfig.from_dict(json.loads((rows[0]["_dir"] / "runs" / tag(rows[0]) / "metrics.json").read_text())["config"])
    for r in rows:
        r.pop("_dir")
    table = write_results(out, rows, base, len(seeds))
    lines = ["| method | seed | conv weight sparsity (%) | dense-equivalent FLOPs / image | FLOPs of nonzero weights / image |",
             "|---|---|---|---|---|"]
    for method, seed, s, fd, fz in sorted(flops):
        lines.append(f"| {method} | {seed} | {100 * s:.2f} | {fd / 1e6:.1f} M | {fz / 1e6:.1f} M |")
    (out / "flops.md").write_text("\n".join(lines) + "\n")
    print(table)
    print(f"{len(rows)} runs, seeds {seeds}; {len(summarize(rows))} (method, tau) groups")


if __name__ == "__main__":
    main(sys.argv[1:])
