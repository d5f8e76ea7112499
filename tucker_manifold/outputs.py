"""One place for what experiments and proofs_checks write: JSON, CSV, small PNG figures, and the
default output folder ``./runs`` (never inside the package or the source tree).

matplotlib is used through its object-oriented ``Figure`` API (no pyplot, no backend switch), so
importing or calling these functions changes no global state.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["RUNS_DIR", "runs_dir", "output_dir", "to_jsonable", "write_json", "write_csv", "new_figure", "save_figure"]

#: Relative to the current working directory: outputs go to ``./runs/<what>`` by default.
RUNS_DIR = Path("runs")


def runs_dir(*parts: str) -> Path:
    """``./runs/<parts...>`` (not created)."""
    return RUNS_DIR.joinpath(*parts)


def output_dir(path: str | Path) -> Path:
    """Create (if needed) and return the output folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def to_jsonable(obj: Any) -> Any:
    """Tensors, numpy values, tuples and non-finite floats made JSON-safe (inf/nan become strings)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)  # JSON has no inf/nan
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` (made JSON-safe) with indent 2; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
    return path


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write dict rows as CSV (columns: ``columns`` or the first row's keys; extra keys ignored)."""
    path = Path(path)
    columns = list(columns or (rows[0].keys() if rows else []))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _csv_cell(r.get(c, "")) for c in columns})
    return path


def _csv_cell(v: Any) -> Any:
    v = to_jsonable(v)
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else v


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 4.0, height: float = 3.2):
    """A matplotlib ``Figure`` (Agg, no pyplot) and its axes array (always 2-D)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is in the plot/test extras
        raise ImportError('plots need matplotlib: pip install "tucker-manifold[plot]"') from e
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a small PNG; lowers the dpi while the file would exceed 150 KB."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    while path.stat().st_size > 150_000 and dpi > 50:
        dpi = int(dpi * 0.8)
        fig.savefig(path, dpi=dpi)
    return path
