"""Tables, per-run CSV and plots of results/parallel/ from the run folders of ``tucker-manifold compare``
and of ``diagnose.py`` (small files only; no checkpoints).

    python results/parallel/summarize.py --main runs/parallel_main \
        --full runs/parallel_full_probe,runs/parallel_full_par --growth runs/parallel_growth \
        --diag runs/parallel_diag,runs/parallel_diag_growth --out results/parallel

Reads every ``<run folder>/runs/*/metrics.json`` (+ history.csv, ranks.json) and ``<diag>/steps.csv``.
Writes ``<out>/<setting>/{runs.csv,summary.csv,summary.json,table.md,ranks_<name>.json,
core_size_vs_epoch.png}`` and ``<out>/diag/{per_epoch.csv,per_layer.csv,diag.md,diag.png}``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from tucker_manifold.outputs import new_figure, output_dir, save_figure, write_csv, write_json

METHOD_ORDER = ("tdlrt", "tdlrt-parallel", "tdlrt-parallel-factors", "tdlrt-parallel-reject", "tdlrt-twopass")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _pm(xs: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m, s = _mean_std([scale * x for x in xs])
    return f"{m:.{digits}f} ± {s:.{digits}f}" if not math.isnan(s) else f"{m:.{digits}f}"


def read_runs(folder: Path) -> list[dict]:
    rows = []
    for mj in sorted(folder.glob("runs/*/metrics.json")) + sorted(folder.glob("*/metrics.json")):
        m = json.loads(mj.read_text())
        c = m["config"]
        ranks_path = mj.parent / "ranks.json"
        trace = json.loads(ranks_path.read_text()) if ranks_path.is_file() else []
        up = down = 0  # mode-rank changes between consecutive records (every rank_every steps)
        for a, b in zip(trace, trace[1:]):
            for k in a["ranks"]:
                up += sum(y > x for x, y in zip(a["ranks"][k], b["ranks"][k]))
                down += sum(y < x for x, y in zip(a["ranks"][k], b["ranks"][k]))
        rows.append(dict(
            folder=str(folder), run=mj.parent.name, method=c["method"], tau=c["tau"], seed=c["seed"],
            test_acc=m["test_acc"], conv_compression=m["conv_compression"],
            total_compression=m["total_compression"], conv_params=m["conv_params"],
            time_per_epoch_s=m["time_per_epoch_s"], total_train_time_s=m["total_train_time_s"],
            epochs=m["epochs"], final_ranks=json.dumps(m["ranks"], separators=(",", ":")),
            initial_ranks=json.dumps(trace[0]["ranks"], separators=(",", ":")) if trace else "",
            rank_increases=up, rank_decreases=down, rank_trace=trace,
        ))
    return rows


def summarize_setting(folders: list[Path], out: Path) -> list[dict]:
    rows = [r for folder in folders for r in read_runs(folder)]
    folder = ", ".join(map(str, folders))
    if not rows:
        return []
    out = output_dir(out)
    cols = [k for k in rows[0] if k != "rank_trace"]
    write_csv(out / "runs.csv", rows, cols)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["tau"])].append(r)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    keys = sorted(groups, key=lambda k: (k[1], order.get(k[0], 99)))
    summary = []
    lines = ["| method | tau | seeds | test accuracy (%) | conv compression (%) | s/epoch (loaded machine) | "
             "mode-rank increases / decreases (all seeds) |",
             "|---|---|---|---|---|---|---|"]
    for k in keys:
        g = groups[k]
        acc = [r["test_acc"] for r in g]
        comp = [r["conv_compression"] for r in g]
        t = [r["time_per_epoch_s"] for r in g]
        ups = sum(r["rank_increases"] for r in g)
        summary.append(dict(method=k[0], tau=k[1], seeds=len(g), seed_list=[r["seed"] for r in g],
                            acc_mean=_mean_std(acc)[0], acc_std=_mean_std(acc)[1],
                            conv_compression_mean=_mean_std(comp)[0], conv_compression_std=_mean_std(comp)[1],
                            s_per_epoch_mean=statistics.fmean(t), s_per_epoch_min=min(t), s_per_epoch_max=max(t),
                            rank_increases=ups, rank_decreases=sum(r["rank_decreases"] for r in g)))
        lines.append(f"| {k[0]} | {k[1]:g} | {len(g)} | {_pm(acc)} | {_pm(comp, digits=1)} | "
                     f"{statistics.fmean(t):.1f} | {ups} / {sum(r['rank_decreases'] for r in g)} |")
    # paired by seed: the same seed gives both methods the same initial weights and batch order
    lines += ["", "Paired by seed (tdlrt-parallel minus tdlrt, same initialisation and batch order):", "",
              "| tau | seeds | accuracy difference (points) | conv compression difference (points) |",
              "|---|---|---|---|"]
    paired = []
    for tau in sorted({k[1] for k in keys}):
        a = {r["seed"]: r for r in groups.get(("tdlrt", tau), [])}
        b = {r["seed"]: r for r in groups.get(("tdlrt-parallel", tau), [])}
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        da = [b[s]["test_acc"] - a[s]["test_acc"] for s in seeds]
        dc = [b[s]["conv_compression"] - a[s]["conv_compression"] for s in seeds]
        paired.append(dict(tau=tau, seeds=seeds, acc_diff=da, conv_compression_diff=dc))
        lines.append(f"| {tau:g} | {len(seeds)} | {_pm(da)} | {_pm(dc, digits=1)} |")
    write_csv(out / "summary.csv", summary)
    write_json(out / "summary.json", dict(summary=summary, paired=paired))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print(f"## {folder}\n" + "\n".join(lines))
    # ranks over training: total conv parameter count of the Tucker layers per recorded step
    fig, axes = new_figure(1, len({k[1] for k in keys}), width=4.2, height=3.2)
    for j, tau in enumerate(sorted({k[1] for k in keys})):
        ax = axes[0, j]
        for k in keys:
            if k[1] != tau:
                continue
            for r in groups[k]:
                tr = r["rank_trace"]
                if not tr:
                    continue
                xs = [t["epoch"] for t in tr]
                ys = [sum(_tucker_count(v) for v in t["ranks"].values()) for t in tr]
                ax.plot(xs, ys, color=f"C{order.get(k[0], 9)}", lw=1,
                        label=f"{k[0]}" if r is groups[k][0] else None)
        ax.set_title(f"tau {tau:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("Tucker core entries (prod of ranks)")
        ax.legend(fontsize=7)
    save_figure(fig, out / "core_size_vs_epoch.png")
    for r in rows:  # the rank traces themselves, small
        write_json(out / f"ranks_{r['run']}.json", r["rank_trace"])
    return summary


def _tucker_count(ranks: list[int]) -> int:
    return math.prod(ranks)


def summarize_diag(folder: Path, out: Path) -> None:
    path = folder / "steps.csv"
    if not path.is_file():
        return
    out = output_dir(out)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    fl = lambda v: float(v) if v not in ("", None) else float("nan")  # noqa: E731
    steps_per_epoch = {}
    for r in rows:
        steps_per_epoch[r["method"]] = max(steps_per_epoch.get(r["method"], 0), int(r["step"]) + 1)
    # per method and epoch, summed over layers (squared norms add over layers)
    agg = defaultdict(lambda: defaultdict(float))
    layer_agg = defaultdict(lambda: defaultdict(float))
    n_epochs = 3
    for r in rows:
        spe = steps_per_epoch[r["method"]] / n_epochs
        ep = min(int(int(r["step"]) // spe) + 1, n_epochs)
        a = agg[(r["method"], ep)]
        la = layer_agg[(r["method"], r["layer"])]
        for name in ("g_norm", "g_old", "g_one", "g_two", "mask_one", "mask_norm", "g_used", "step_norm",
                     "dw_norm", "trunc_error", "core_norm"):
            v = fl(r.get(name))
            a[name + "_sq"] += v * v
            la[name + "_sq"] += v * v
        a["rows"] += 1
        la["rows"] += 1
        a["rejected"] += fl(r.get("rejected")) if r.get("rejected") not in ("", None) else 0.0
        if r["old_ranks"] == r["new_ranks"] and r["layer"] != "features.0":  # no rank cut at this step
            for name in ("step_norm", "dw_norm", "trunc_error"):
                v = fl(r.get(name))
                a["same_" + name + "_sq"] += v * v
            a["same_rows"] += 1
    per_epoch = []
    for (method, ep), a in sorted(agg.items(), key=lambda kv: (METHOD_ORDER.index(kv[0][0])
                                                               if kv[0][0] in METHOD_ORDER else 99, kv[0][1])):
        rt = lambda n: math.sqrt(a[n + "_sq"])  # noqa: E731
        per_epoch.append(dict(
            method=method, epoch=ep,
            masked_over_full=rt("mask_norm") / rt("g_norm"),
            one_new_kept=rt("mask_one") / rt("g_one") if rt("g_one") > 0 else float("nan"),
            share_old=(rt("g_old") / rt("g_norm")) ** 2, share_one=(rt("g_one") / rt("g_norm")) ** 2,
            share_two=(rt("g_two") / rt("g_norm")) ** 2,
            used_over_full=rt("g_used") / rt("g_norm"),
            rms_step=rt("step_norm") / math.sqrt(a["rows"]), rms_dw=rt("dw_norm") / math.sqrt(a["rows"]),
            rms_trunc_error=rt("trunc_error") / math.sqrt(a["rows"]),
            trunc_over_step=rt("trunc_error") / rt("step_norm"),
            same_rank_rows=int(a["same_rows"]), rejected_layer_steps=int(a["rejected"]),
            same_rms_step=rt("same_step_norm") / math.sqrt(max(a["same_rows"], 1)),
            same_rms_dw=rt("same_dw_norm") / math.sqrt(max(a["same_rows"], 1)),
            same_trunc_over_step=rt("same_trunc_error") / rt("same_step_norm") if a["same_rows"] else float("nan"),
        ))
    per_layer = []
    for (method, layer), a in sorted(layer_agg.items()):
        rt = lambda n: math.sqrt(a[n + "_sq"])  # noqa: E731
        per_layer.append(dict(method=method, layer=layer,
                              masked_over_full=rt("mask_norm") / rt("g_norm") if rt("g_norm") > 0 else float("nan"),
                              one_new_kept=rt("mask_one") / rt("g_one") if rt("g_one") > 0 else float("nan"),
                              share_two=(rt("g_two") / rt("g_norm")) ** 2 if rt("g_norm") > 0 else float("nan"),
                              rms_step=rt("step_norm") / math.sqrt(a["rows"]),
                              rms_dw=rt("dw_norm") / math.sqrt(a["rows"]),
                              trunc_over_step=rt("trunc_error") / rt("step_norm")))
    write_csv(out / "per_epoch.csv", per_epoch)
    write_csv(out / "per_layer.csv", per_layer)
    hdr = ("| method | epoch | ‖mask(g)‖/‖g‖ | one-new kept | energy old / one-new / two-new | "
           "‖g_used‖/‖g‖ | rms core step | rms ΔW | rms trunc. error | trunc. error / step |")
    lines = [hdr, "|" + "---|" * 10]
    for p in per_epoch:
        lines.append(f"| {p['method']} | {p['epoch']} | {p['masked_over_full']:.3f} | {p['one_new_kept']:.3f} | "
                     f"{p['share_old']:.2f} / {p['share_one']:.2f} / {p['share_two']:.2f} | "
                     f"{p['used_over_full']:.3f} | {p['rms_step']:.4f} | {p['rms_dw']:.4f} | "
                     f"{p['rms_trunc_error']:.4f} | {p['trunc_over_step']:.2f} |")
    lines += ["", "Steps at which a layer kept its ranks (no rank cut; layers features.3-17):", "",
              "| method | epoch | layer-steps | rms core step | rms ΔW | trunc. error / step | rejected layer-steps "
              "(all steps) |", "|" + "---|" * 7]
    for p in per_epoch:
        lines.append(f"| {p['method']} | {p['epoch']} | {p['same_rank_rows']} | {p['same_rms_step']:.4f} | "
                     f"{p['same_rms_dw']:.4f} | {p['same_trunc_over_step']:.2f} | {p['rejected_layer_steps']} |")
    lines += ["", "| method | layer | ‖mask(g)‖/‖g‖ | one-new kept | two-new energy share | rms core step | "
              "rms ΔW | trunc. error / step |", "|" + "---|" * 8]
    for p in per_layer:
        lines.append(f"| {p['method']} | {p['layer']} | {p['masked_over_full']:.3f} | {p['one_new_kept']:.3f} | "
                     f"{p['share_two']:.2f} | {p['rms_step']:.4f} | {p['rms_dw']:.4f} | {p['trunc_over_step']:.2f} |")
    (out / "diag.md").write_text("\n".join(lines) + "\n")
    print(f"## {folder}\n" + "\n".join(lines))
    # plot: per step, summed over layers: ||mask(g)||/||g|| and ||dW|| for each method
    fig, axes = new_figure(1, 3, width=4.0, height=3.2)
    by = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    for r in rows:
        s = by[r["method"]][int(r["step"])]
        for name in ("g_norm", "mask_norm", "dw_norm", "step_norm"):
            s[name] += fl(r.get(name)) ** 2
    for i, (method, st) in enumerate(by.items()):
        xs = sorted(st)
        c = f"C{i}"
        axes[0, 0].plot(xs, [math.sqrt(st[x]["mask_norm"] / st[x]["g_norm"]) for x in xs], c, lw=0.8, label=method)
        axes[0, 1].plot(xs, [math.sqrt(st[x]["step_norm"]) for x in xs], c, lw=0.8, label=method)
        axes[0, 2].plot(xs, [math.sqrt(st[x]["dw_norm"]) for x in xs], c, lw=0.8, label=method)
    axes[0, 0].set_title("‖mask(dL/dC^)‖ / ‖dL/dC^‖", fontsize=9)
    axes[0, 1].set_title("core step before truncation", fontsize=9)
    axes[0, 2].set_title("‖W_new − W_old‖ after truncation", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[0, 1].set_yscale("log")
    axes[0, 2].set_yscale("log")
    save_figure(fig, out / "diag.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--main", default="runs/parallel_main", help="run folders, comma-separated")
    ap.add_argument("--full", default="runs/parallel_full", help="run folders, comma-separated")
    ap.add_argument("--growth", default="runs/parallel_growth", help="run folders, comma-separated")
    ap.add_argument("--diag", default="runs/parallel_diag,runs/parallel_diag_growth",
                    help="diagnose.py folders, comma-separated")
    ap.add_argument("--out", default="runs/parallel_summary")
    a = ap.parse_args(argv)
    out = Path(a.out)
    for name, spec in (("main", a.main), ("full", a.full), ("growth", a.growth)):
        folders = [Path(f) for f in spec.split(",") if Path(f).is_dir()]
        if folders:
            summarize_setting(folders, out / name)
    for folder in [Path(f) for f in a.diag.split(",") if Path(f).is_dir()]:
        name = folder.name.replace("parallel_", "")
        summarize_diag(folder, out / name)
        summarize_setting([folder], out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
