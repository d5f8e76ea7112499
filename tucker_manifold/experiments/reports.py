"""What a run or a comparison leaves behind: metrics, history and results tables (JSON / CSV /
markdown) and the two plots, written through :mod:`tucker_manifold.outputs` (the helper shared with
proofs_checks)."""
from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Optional

from torch import nn

# nn.compression_rate, with pruned (masked) weights counted by their nonzeros: one accounting for all
from ..pruning import pruned_compression_rate as compression_rate
from ..outputs import new_figure, save_figure, write_csv
from .accounting import conv_parameter_counts, layer_ranks
from .config import TrainConfig
from .methods import get_method, method_names

__all__ = [
    "final_metrics",
    "write_history_csv",
    "RESULT_COLUMNS",
    "write_results",
    "summarize",
    "markdown_table",
    "plot_ranks",
    "plot_accuracy_vs_compression",
]

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "conv_compression",
                   "total_compression", "conv_params", "total_params", "epoch_time_s", "eval_time_s",
                   "skipped_steps", "lr", "mean_rank", "ranks"]
#: Columns of ``results.csv``, one row per run of a comparison.
RESULT_COLUMNS = ["method", "tau", "seed", "test_acc", "test_loss", "train_acc", "conv_compression",
                  "total_compression", "conv_params", "total_params", "time_per_epoch_s", "epochs", "wall_s",
                  "match", "ranks"]


def final_metrics(history: list[dict], cfg: TrainConfig, model: nn.Module, extra: Optional[dict] = None) -> dict:
    """The summary of a finished run (what metrics.json holds)."""
    last = history[-1]
    times = [r["epoch_time_s"] for r in history]
    comp = compression_rate(model)
    return {
        "test_acc": last["test_acc"],
        "test_loss": last["test_loss"],
        "train_acc": last["train_acc"],
        "train_loss": last["train_loss"],
        "best_test_acc": max(r["test_acc"] for r in history),
        "conv_compression": comp["conv"],
        "total_compression": comp["total"],
        "conv_params": comp["conv_params"],
        "conv_dense_params": comp["conv_dense_params"],
        "total_params": comp["total_params"],
        "total_dense_params": comp["total_dense_params"],
        "ranks": layer_ranks(model),
        "layer_conv_params": conv_parameter_counts(model),
        "epochs": last["epoch"],
        "time_per_epoch_s": statistics.fmean(times),
        "total_train_time_s": sum(times),
        "skipped_steps": last["skipped_steps"],
        "config": cfg.to_dict(),
        **(extra or {}),
    }


def write_history_csv(path: str | os.PathLike, history: list[dict]) -> Path:
    """One row per epoch, with the mean channel rank and the ranks as compact JSON."""
    rows = []
    for row in history:
        chans = [statistics.fmean(r[:2]) for r in (row.get("ranks") or {}).values()]
        rows.append({**row, "mean_rank": statistics.fmean(chans) if chans else "", "ranks": row.get("ranks") or {}})
    return write_csv(path, rows, HISTORY_COLUMNS)


def summarize(rows: list[dict]) -> list[dict]:
    """Group runs by (method, tau): mean and std (over seeds) of test accuracy and compression."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["tau"]), []).append(r)

    def ms(vals):
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not vals:
            return float("nan"), float("nan")
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    out = []
    for (method, tau), rs in groups.items():
        acc, acc_sd = ms([r["test_acc"] for r in rs])
        cc, cc_sd = ms([r["conv_compression"] for r in rs])
        tc, tc_sd = ms([r["total_compression"] for r in rs])
        tpe, _ = ms([r["time_per_epoch_s"] for r in rs])
        out.append(dict(method=method, tau=tau, n=len(rs), acc_mean=acc, acc_std=acc_sd, conv_mean=cc,
                        conv_std=cc_sd, total_mean=tc, total_std=tc_sd, time_per_epoch_s=tpe))
    order = {m: i for i, m in enumerate(method_names())}
    out.sort(key=lambda s: (-1 if s["tau"] is None else s["tau"], order.get(s["method"], len(order))))
    return out


def markdown_table(summary: list[dict], cfg: Optional[TrainConfig] = None) -> str:
    """The comparison as a markdown table (one row per method and tau), with a line on the setting."""
    lines = []
    if cfg is not None:
        lines.append(f"{cfg.model} on {cfg.data}" + (f" (subset {cfg.subset})" if cfg.subset else "")
                     + f", {cfg.epochs} epoch(s), batch {cfg.batch_size}, lr {cfg.lr}, momentum {cfg.momentum}")
        lines.append("")
    lines.append("| method | tau | seeds | test accuracy (%) | conv compression (%) | total compression (%) | time/epoch (s) |")
    lines.append("|---|---|---|---|---|---|---|")
    for s in summary:
        tau = "-" if s["tau"] is None else f"{s['tau']:g}"
        lines.append(
            f"| {s['method']} | {tau} | {s['n']} | {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f} | "
            f"{100 * s['conv_mean']:.1f} ± {100 * s['conv_std']:.1f} | {100 * s['total_mean']:.1f} | "
            f"{s['time_per_epoch_s']:.1f} |"
        )
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, rows: list[dict], base: TrainConfig, n_seeds: int) -> str:
    """``results.csv``, ``results.md`` and ``accuracy_vs_compression.png`` of a comparison into
    ``out_dir``; returns the markdown table."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    table = markdown_table(summary, base)
    write_csv(out_dir / "results.csv", rows, RESULT_COLUMNS)
    (out_dir / "results.md").write_text(table + "\n")
    plot_accuracy_vs_compression(summary, out_dir / "accuracy_vs_compression.png",
                                 title=f"{base.model} on {base.data} ({n_seeds} seed(s), {base.epochs} epoch(s))")
    return table


def plot_ranks(rank_trace: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Per-layer ranks over training (one line per layer and channel mode) to the PNG ``path``."""
    from matplotlib import colormaps
    from matplotlib.ticker import ScalarFormatter

    fig, axes = new_figure(width=7, height=4.2)
    ax = axes[0, 0]
    layers = list(rank_trace[-1]["ranks"]) if rank_trace else []
    if not layers:
        ax.text(0.5, 0.5, "no factorized layers (dense model)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        cmap = colormaps["tab10" if len(layers) <= 10 else "tab20"]
        x = [t["epoch"] for t in rank_trace]
        for li, name in enumerate(layers):
            nmodes = len(rank_trace[-1]["ranks"][name])
            for mode, style in zip(range(min(nmodes, 2)), ("-", "--")):
                y = [t["ranks"].get(name, [float("nan")] * nmodes)[mode] for t in rank_trace]
                label = f"{name} " + (("out", "in")[mode] if nmodes > 1 else "rank")
                ax.plot(x, y, style, color=cmap(li % cmap.N), label=label, linewidth=1.4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("rank")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ScalarFormatter())  # 4, 8, 16 rather than 2^2, 2^3, 2^4
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(layers) > 4 else 1, loc="best")
    ax.set_title(title or "ranks during training")
    save_figure(fig, path, dpi=120)


def plot_accuracy_vs_compression(summary: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Mean test accuracy vs mean conv compression with std error bars, one series per method (the
    paper's Figure 1 style); dense is a horizontal reference line."""
    fig, axes = new_figure(width=6.5, height=4.2)
    ax = axes[0, 0]
    markers = "*osD^vPXh<>p"
    marker_of = {m: markers[i % len(markers)] for i, m in enumerate(method_names())}
    adaptive = {m for m in method_names() if get_method(m).adaptive}
    for method in dict.fromkeys(s["method"] for s in summary):
        pts = sorted((s for s in summary if s["method"] == method), key=lambda s: s["conv_mean"])
        xs = [100 * s["conv_mean"] for s in pts]
        ys = [100 * s["acc_mean"] for s in pts]
        if method == "dense":
            ax.axhline(ys[0], color="k", linestyle=":", linewidth=1, label=f"dense ({ys[0]:.1f}%)")
            if pts[0]["acc_std"] > 0:
                ax.axhspan(ys[0] - 100 * pts[0]["acc_std"], ys[0] + 100 * pts[0]["acc_std"], color="k", alpha=0.06)
            continue
        ax.errorbar(xs, ys, yerr=[100 * s["acc_std"] for s in pts], xerr=[100 * s["conv_std"] for s in pts],
                    marker=marker_of.get(method, "o"), capsize=3, linestyle="-", label=method)
        if method in adaptive:  # a series along tau: label its points
            for s, x_, y_ in zip(pts, xs, ys):
                ax.annotate(f"τ={s['tau']:g}", (x_, y_), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("conv compression (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "accuracy vs compression")
    save_figure(fig, path, dpi=120)
