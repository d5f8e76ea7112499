"""Combine the two 10% budget comparisons (no schedule / schedule) into one table and one ranks plot.

    python results/budget/combine.py --out results/budget      # what produced table_10pct.md / ranks_per_layer_10pct.png

Reads runs/budget/b10/results.csv and runs/budget/b10_sched/results.csv (see README.md for the commands);
writes to ./runs/budget/combined unless --out is given.
"""
import argparse
import csv
import json
from pathlib import Path

from tucker_manifold.experiments import TrainConfig
from tucker_manifold.experiments.budgets import budget_table, plot_budget_ranks
from tucker_manifold.models import build_model


def rows_of(path: Path, rename: dict) -> list:
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            r.update(ranks=json.loads(r["ranks"]), conv_params=int(r["conv_params"]), test_acc=float(r["test_acc"]),
                     time_per_epoch_s=float(r["time_per_epoch_s"]), within={"True": True, "False": False}.get(r["within"]),
                     method=rename.get(r["method"], r["method"]))
            rows.append(r)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/budget")
    ap.add_argument("--out", default="runs/budget/combined")
    a = ap.parse_args(argv)
    runs, out = Path(a.runs), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = (rows_of(runs / "b10_sched" / "results.csv", {"tdlrt-budget": "tdlrt-budget (schedule 0-1 ep)"})
            + rows_of(runs / "b10" / "results.csv", {"tdlrt-budget": "tdlrt-budget (no schedule)"}))
    meta = json.loads((runs / "b10" / "budget.json").read_text())
    n, dense_params = int(meta["budget"]), int(meta["dense_conv_params"])
    plot_budget_ranks(rows, out / "ranks_per_layer_10pct.png", n, build_model("vgg-mnist", 1, 10, 28))
    (out / "table_10pct.md").write_text(budget_table(rows, n, dense_params, TrainConfig(subset=3000)) + "\n")
    print((out / "table_10pct.md").read_text())


if __name__ == "__main__":
    main()
