"""Shared helpers of the theorem checks: output folder, table printer, JSON/CSV, plots, ``Verdict``,
and the small test problems (dense quadratics, Tucker tensor regression).

Everything runs in float64 with explicit dtypes; nothing here changes global state at import
(matplotlib is used through its object-oriented ``Figure`` API, no pyplot, no backend switch).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from tucker_manifold import FixedRankTucker
from tucker_manifold.tucker import multi_mode_dot, unfold

DTYPE = torch.float64
DEFAULT_OUT = Path(__file__).resolve().parent / "results"

__all__ = [
    "DTYPE",
    "DEFAULT_OUT",
    "Verdict",
    "base_parser",
    "output_dir",
    "print_table",
    "write_json",
    "write_csv",
    "new_figure",
    "save_figure",
    "single_thread",
    "Timer",
    "loglog_slope",
    "random_orthonormal",
    "tucker_tensor",
    "superdiagonal_core",
    "TensorRegression",
    "riemannian_grad",
    "finish",
    "augmented_projectors",
]


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass
class Verdict:
    """Outcome of one checked statement.

    ``worst_slack``: for an inequality ``lhs <= rhs`` the largest ``lhs - rhs`` seen (``<= 0`` passes);
    for other checks a number whose sign convention ``details`` explains (``None`` if not meaningful).
    """

    name: str
    passed: bool
    worst_slack: float | None
    details: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "passed": bool(self.passed), "worst_slack": _jsonable(self.worst_slack),
                "details": _jsonable(self.details)}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else str(v)  # JSON has no inf/nan
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


# ----------------------------------------------------------------------------- CLI / files
def base_parser(description: str) -> argparse.ArgumentParser:
    """Parser with the options every check has: ``--quick`` and ``--out DIR``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="reduced setting (seconds; used by the test suite)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    return p


def output_dir(path: str | Path) -> Path:
    """Create (if needed) and return the output folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fmt(v: Any, floatfmt: str) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (float, np.floating)):
        return format(float(v), floatfmt) if math.isfinite(float(v)) else str(float(v))
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_fmt(x, floatfmt) for x in v) + ")"
    return str(v)


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None,
                floatfmt: str = ".3g") -> str:
    """Print ``rows`` (dicts) as an aligned text table; returns the text."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, ""), floatfmt) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    return path


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    path = Path(path)
    columns = list(columns or (rows[0].keys() if rows else []))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _jsonable(r.get(c, "")) for c in columns})
    return path


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 4.0, height: float = 3.2):
    """A matplotlib ``Figure`` (Agg, no pyplot) and its axes array (always 2-D)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Save a small PNG (100 dpi). Falls back to a lower dpi if the file would exceed 150 KB."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    while path.stat().st_size > 150_000 and dpi > 50:
        dpi = int(dpi * 0.8)
        fig.savefig(path, dpi=dpi)
    return path


def finish(name: str, verdicts: Sequence[Verdict], out: Path, extra: dict | None = None,
           started: float | None = None) -> int:
    """Print the verdict table, write ``<name>.json``; return the exit code (0 iff all passed)."""
    rows = [{"check": v.name, "passed": v.passed,
             "worst_slack": v.worst_slack if v.worst_slack is not None else "-"} for v in verdicts]
    print_table(rows, title=f"\n== {name}: verdicts ==", floatfmt=".3e")
    ok = all(v.passed for v in verdicts)
    record = {"check": name, "passed": ok, "verdicts": [v.to_dict() for v in verdicts]}
    if started is not None:
        record["runtime_s"] = time.perf_counter() - started
    if extra:
        record.update(extra)
    write_json(out / f"{name}.json", record)
    print(f"{name}: {'PASS' if ok else 'FAIL'} -> {out / (name + '.json')}", flush=True)
    return 0 if ok else 1


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread (the problems are tiny; threads only add overhead), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self.t0


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx, ly = np.log(np.asarray(list(x), float)), np.log(np.asarray(list(y), float))
    return float(np.polyfit(lx, ly, 1)[0])


# ----------------------------------------------------------------------------- problems
def random_orthonormal(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    """``(n, r)`` with orthonormal columns (QR of a Gaussian matrix, sign-fixed)."""
    q, rr = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(rr))


def superdiagonal_core(values: Sequence[float], order: int, g: torch.Generator | None = None) -> torch.Tensor:
    """``r x ... x r`` core with ``values`` on the superdiagonal, optionally rotated by random orthogonal
    matrices in every mode: every unfolding then has exactly ``values`` as singular values."""
    r = len(values)
    core = torch.zeros((r,) * order, dtype=DTYPE)
    for k, v in enumerate(values):
        core[(k,) * order] = float(v)
    if g is not None:
        core = multi_mode_dot(core, [random_orthonormal(r, r, g) for _ in range(order)])
    return core


def tucker_tensor(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    return multi_mode_dot(core, factors)


def riemannian_grad(m: FixedRankTucker, x: torch.Tensor, dense_grad: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``P(Y) grad L`` as a dense tensor (via ``proj_dense`` + ``tangent_to_dense``) and its norm."""
    u = m.proj_dense(x, dense_grad)
    pg = m.tangent_to_dense(x, u)
    return pg, float(torch.linalg.vector_norm(pg))


class TensorRegression:
    """Tucker tensor regression with a known teacher.

    ``y_k = <X_k, W*> + noise * xi_k`` with Gaussian ``X_k`` (``N`` samples of shape ``shape``) and
    ``W*`` of Tucker rank ``teacher_ranks``; loss ``L(W) = 1/(2N) sum_k (<X_k, W> - y_k)^2`` (the mean over
    samples, halved). Its Hessian is ``(1/N) X^T X`` (``X`` the ``N x prod(n)`` design matrix), so the
    smoothness constant of *this* normalization is ``lambda_max((1/N) X^T X)``, computed exactly.
    """

    def __init__(self, shape: Sequence[int], teacher_ranks: Sequence[int], n_samples: int, noise: float = 0.0,
                 seed: int = 0, teacher_scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.shape = tuple(shape)
        self.p = math.prod(self.shape)
        self.n = n_samples
        teacher = FixedRankTucker(self.shape, teacher_ranks)
        w = teacher.to_dense(teacher.random(dtype=DTYPE, generator=g))
        self.w_star = teacher_scale * w / torch.linalg.vector_norm(w)  # ||W*||_F = teacher_scale
        self.X = torch.randn(n_samples, self.p, generator=g, dtype=DTYPE)
        self.y = self.X @ self.w_star.reshape(-1) + noise * torch.randn(n_samples, generator=g, dtype=DTYPE)
        self.gram = self.X.T @ self.X / n_samples
        eig = torch.linalg.eigvalsh(self.gram)
        self.L = float(eig[-1])
        self.mu = float(eig[0])
        sol = torch.linalg.lstsq(self.X, self.y.unsqueeze(1)).solution.squeeze(1)
        self.w_ls = sol.reshape(self.shape)
        self.loss_min = float(self.loss(self.w_ls))

    def loss(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        r = X @ w.reshape(-1) - y
        return 0.5 * (r * r).mean()

    def grad(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Dense gradient ``(1/|I|) X_I^T (X_I w - y_I)`` (closed form)."""
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        return (X.T @ (X @ w.reshape(-1) - y) / X.shape[0]).reshape(self.shape)


def augmented_projectors(core, factors, g_dense):
    """Independent ``U^_i U^_i^T`` (``n_i x n_i``): orthogonal projector onto ``span[U_i | G_i]``, with
    ``G_i = Mat_i(grad L x_{j!=i} U_j^T) Mat_i(C)^T`` the autograd factor gradient, computed here from the dense
    gradient with numpy's SVD (not the library's ``augment_basis``). Full-rank modes get the identity."""
    d = core.ndim
    projs = []
    for i in range(d):
        u = factors[i]
        if u.shape[1] >= u.shape[0]:
            projs.append(torch.eye(u.shape[0], dtype=u.dtype))
            continue
        others = [None if j == i else factors[j] for j in range(d)]
        gi = unfold(multi_mode_dot(g_dense, others, transpose=True), i) @ unfold(core, i).T
        gp = gi - u @ (u.T @ gi)
        gp = gp - u @ (u.T @ gp)
        w, s, _ = np.linalg.svd(gp.numpy(), full_matrices=False)
        scale = np.linalg.norm(gi.numpy(), 2)
        keep = int((s > 1e-12 * scale).sum()) if scale > 0 else 0
        w = torch.from_numpy(w[:, :keep])
        w = w - u @ (u.T @ w)
        q = torch.cat([u, torch.linalg.qr(w).Q], dim=1) if keep else u
        projs.append(q @ q.T)
    return projs
