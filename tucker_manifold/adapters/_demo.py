"""What the two adapter demos share: the per-method summary (mean +- std over seeds), the markdown table,
the accuracy-vs-trainable-parameters plot, the files written (through :mod:`tucker_manifold.outputs`), the
progress bar / log line conventions of ``tucker-manifold train``, and the optimizer step with an RNG replay
(so TDLRT's two closure evaluations see the same dropout masks)."""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from ..outputs import new_figure, output_dir, save_figure, write_csv, write_json

__all__ = ["summarize", "markdown_table", "plot_accuracy_vs_params", "write_outputs", "rank_summary",
           "show_bar", "progress_bar", "log_to_stdout", "replayed_step", "optimizer_class"]

RUN_COLUMNS = ["method", "seed", "test_acc", "test_loss", "train_loss", "trainable_params", "effective_params",
               "time_per_epoch_s", "cpu_per_epoch_s", "epochs", "wall_s", "ranks"]


def _ms(vals: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def rank_summary(ranks: dict) -> str:
    """Compact ``min-max (mean)`` of the first rank of every layer (``-`` when no layer has ranks)."""
    first = [int(r[0]) if isinstance(r, (list, tuple)) else int(r) for r in ranks.values()] if ranks else []
    if not first:
        return "-"
    lo, hi = min(first), max(first)
    return f"{lo}" if lo == hi else f"{lo}-{hi} (mean {statistics.fmean(first):.1f})"


def summarize(rows: list[dict]) -> list[dict]:
    """One row per method (first-seen order): mean/std of accuracy, mean parameters and time."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        acc, acc_sd = _ms([r["test_acc"] for r in rs])
        t, t_sd = _ms([r["time_per_epoch_s"] for r in rs])
        c, _ = _ms([r.get("cpu_per_epoch_s") for r in rs])
        out.append(dict(
            method=method, seeds=len(rs), test_acc_mean=acc, test_acc_std=acc_sd,
            trainable_params=statistics.fmean(r["trainable_params"] for r in rs),
            effective_params=statistics.fmean(r.get("effective_params", r["trainable_params"]) for r in rs),
            time_per_epoch_s=t, time_per_epoch_std=t_sd, cpu_per_epoch_s=c,
            ranks=rank_summary(rs[0].get("ranks") or {}),
            note=rs[0].get("note", ""),
        ))
    return out


def markdown_table(summary: list[dict], reference: Optional[str] = None) -> str:
    """Markdown table of :func:`summarize`'s rows; with ``reference`` a method name, wall and CPU time
    (this process's, one thread: less sensitive to other jobs) are also given relative to it."""
    ref = next((s for s in summary if s["method"] == reference), None)

    def fmt(s: dict, key: str) -> str:
        v = s.get(key, float("nan"))
        if v is None or math.isnan(v):
            return "-"
        r = ref.get(key) if ref is not None else None
        return f"{v:.2f}" + (f" ({v / r:.2f}x)" if r and s is not ref and not math.isnan(r) else "")

    head = ("| method | test acc (mean ± std) | trainable params | effective params | final ranks (seed 1st) | s/epoch "
            "| CPU s/epoch |")
    lines = [head, "|" + "---|" * 7]
    for s in summary:
        lines.append(
            f"| {s['method']} | {100 * s['test_acc_mean']:.2f} ± {100 * s['test_acc_std']:.2f} | "
            f"{s['trainable_params']:,.0f} | {s['effective_params']:,.0f} | {s['ranks']} | "
            f"{fmt(s, 'time_per_epoch_s')} | {fmt(s, 'cpu_per_epoch_s')} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_params(summary: list[dict], path, title: str = "", key: str = "effective_params") -> None:
    """Test accuracy (mean +- std over seeds) against trainable parameters (log scale)."""
    fig, axes = new_figure(1, 1, width=5.2, height=3.6)
    ax = axes[0][0]
    for s in summary:
        x = max(float(s[key]), 1.0)
        ax.errorbar([x], [100 * s["test_acc_mean"]], yerr=[100 * s["test_acc_std"]], fmt="o", capsize=3, label=s["method"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters" + (" (effective)" if key == "effective_params" else ""))
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def write_outputs(out: Path | str, rows: list[dict], setting: dict, title: str, reference: Optional[str]) -> dict:
    """``results.json`` (setting + every run), ``runs.csv``, ``summary.csv``, ``table.md`` and
    ``accuracy_vs_params.png`` in ``out``; returns the paths."""
    out = output_dir(out)
    summary = summarize(rows)
    table = markdown_table(summary, reference)
    paths = {
        "results": write_json(out / "results.json", {"setting": setting, "runs": rows, "summary": summary}),
        "runs": write_csv(out / "runs.csv", rows, RUN_COLUMNS),
        "summary": write_csv(out / "summary.csv", summary),
    }
    (out / "table.md").write_text(f"{title}\n\n{table}")
    paths["table"] = out / "table.md"
    try:
        plot_accuracy_vs_params(summary, out / "accuracy_vs_params.png", title)
        paths["plot"] = out / "accuracy_vs_params.png"
    except ImportError as e:  # matplotlib is optional
        logging.getLogger(__name__).info("no plot: %s", e)
    return {"paths": paths, "summary": summary, "table": table}


def show_bar(progress: Optional[bool]) -> bool:
    """``progress`` if given, else whether stderr (where the bar goes) is a terminal."""
    if progress is not None:
        return bool(progress)
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Iterable, total: int, desc: str, show: bool):
    """A tqdm bar (stderr) only when ``show``; the iterable itself otherwise."""
    if not show:
        return iterable
    from tqdm.std import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


@contextlib.contextmanager
def log_to_stdout(name: str = "tucker_manifold") -> Iterator[None]:
    """Show the library's INFO lines on stdout unless someone (the CLI) already handles them."""
    log = logging.getLogger(name)
    if log.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


def replayed_step(optimizer, loss_fn: Callable[[bool], torch.Tensor]) -> torch.Tensor:
    """``optimizer.step(closure)`` where every closure call replays the same RNG state (dropout masks), so
    TDLRT's second evaluation differentiates the same function as its first. ``loss_fn(first_call)``
    returns the loss (and may record statistics when ``first_call``)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    calls = [0]

    def closure():
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(calls[0] == 0)
        loss.backward()
        calls[0] += 1
        return loss

    return optimizer.step(closure)


def optimizer_class(name: str):
    """``tucker_manifold.optim.<name>`` or None when it does not exist (yet)."""
    try:
        from .. import optim
    except ImportError:  # pragma: no cover
        return None
    return getattr(optim, name, None)
