"""Shared helpers of the theorem checks: the ``Verdict`` and ``CheckResult`` records, the option parser,
the table printer, optimizer factories, and the small test problems (dense quadratics, Tucker tensor
regression).

Files (JSON, CSV, figures) and the default output folder come from :mod:`tucker_manifold.outputs`, the one
helper shared with the experiments code. Everything runs in float64 with explicit dtypes; nothing here
changes global state at import.

**Optimizer factories.** Every check takes the integrator it checks as a factory
``factory(params, *, lr, tau, momentum=0.0, rmax=None) -> torch.optim.Optimizer`` whose ``step(closure)``
does one step (the closure zeroes the gradients, runs forward and backward and returns the loss; it may be
called more than once). The checks change ``lr`` and ``tau`` between steps through ``param_groups`` and
read nothing else from the optimizer: every checked quantity is computed from the parameters before and
after the step. That is what lets ``proofs_checks.mutants`` (deliberately broken integrators) be run
through the same checks.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from tucker_manifold import FixedRankTucker
from tucker_manifold.optim import TDLRT, ParallelTDLRT
from tucker_manifold.outputs import new_figure, output_dir, runs_dir, save_figure, to_jsonable, write_csv, write_json
from tucker_manifold.tucker import multi_mode_dot, unfold

DTYPE = torch.float64

#: ``factory(params, *, lr, tau, momentum=0.0, rmax=None) -> torch.optim.Optimizer``
OptimizerFactory = Callable[..., torch.optim.Optimizer]

__all__ = [
    "DTYPE",
    "OptimizerFactory",
    "tdlrt",
    "tdlrt_parallel",
    "DEFAULT_OPTIMIZERS",
    "Verdict",
    "CheckResult",
    "default_out",
    "base_parser",
    "output_dir",
    "print_table",
    "write_json",
    "write_csv",
    "new_figure",
    "save_figure",
    "single_thread",
    "loglog_slope",
    "random_orthonormal",
    "tucker_tensor",
    "superdiagonal_core",
    "TensorRegression",
    "riemannian_grad",
    "finish",
    "augmented_projectors",
    "set_schedule",
    "pre_truncation",
    "timed",
    "slope_verdict",
]


# ----------------------------------------------------------------------------- optimizers
def tdlrt(params, *, lr: float, tau: float, momentum: float = 0.0, rmax: int | None = None) -> torch.optim.Optimizer:
    """The library's TDLRT with an SGD base rule, as users get it (its default one-pass step: the checks'
    closures declare the use of the parameter with ``record_io``, so ``dL/dC^`` is rebuilt from the
    records): what the checks check by default."""
    return TDLRT(params, lr=lr, tau=tau, momentum=momentum, rmax=rmax, method="sgd")


def tdlrt_parallel(params, *, lr: float, tau: float, momentum: float = 0.0,
                   rmax: int | None = None) -> torch.optim.Optimizer:
    """The library's ParallelTDLRT with an SGD base rule: the Riemannian step ``Y - h P(Y) grad L``
    (the masked augmented-core gradient, one gradient evaluation per step), then the same truncation as
    TDLRT."""
    return ParallelTDLRT(params, lr=lr, tau=tau, momentum=momentum, rmax=rmax, method="sgd")


#: what a factory's step is before its truncation, for the checks that recompute it (descent.py):
#: ``"galerkin"`` (default, TDLRT and the mutants) ``Y - h grad L x_i U^_i U^_i^T``; ``"tangent"``
#: ``Y - h P(Y) grad L``. Both decrease ``L`` by at least ``h(1 - Lh/2)||P grad L||^2``.
tdlrt_parallel.pre_truncation = "tangent"  # type: ignore[attr-defined]


def pre_truncation(factory: OptimizerFactory) -> str:
    """The step ``factory``'s optimizer takes before truncating (see :func:`tdlrt_parallel`)."""
    return getattr(factory, "pre_truncation", "galerkin")


#: optimizer name -> factory, checked by every check unless the caller passes its own. Adding an
#: integrator to the checks is one line here (or in a check's own dict: descent.py and robustness.py
#: also check ``tdlrt-parallel``).
DEFAULT_OPTIMIZERS: dict[str, OptimizerFactory] = {"tdlrt": tdlrt}


def set_schedule(opt: torch.optim.Optimizer, lr: float | None = None, tau: float | None = None) -> None:
    """Set ``lr`` and/or ``tau`` in every parameter group (an optimizer without ``tau`` ignores it)."""
    for group in opt.param_groups:
        if lr is not None:
            group["lr"] = lr
        if tau is not None:
            group["tau"] = tau


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass
class Verdict:
    """Outcome of one checked statement.

    ``name``: a short stable key (``"quadratic.bound"``); ``claim``: what it computes, in words;
    ``optimizer``: the integrator it was run on. ``worst_slack``: for an inequality ``lhs <= rhs`` the
    largest ``lhs - rhs`` seen (``<= 0`` passes); for other checks a number whose sign convention
    ``details["slack"]`` explains (``None`` if not meaningful). ``counted``: False for a verdict that is
    reported but does not count (e.g. a bound that is vacuous on most steps); it then always passes.
    """

    name: str
    passed: bool
    worst_slack: float | None
    details: dict = dataclasses.field(default_factory=dict)
    claim: str = ""
    optimizer: str = "tdlrt"
    counted: bool = True

    def to_dict(self) -> dict:
        return {"name": self.name, "optimizer": self.optimizer, "claim": self.claim, "passed": bool(self.passed),
                "counted": bool(self.counted), "worst_slack": to_jsonable(self.worst_slack),
                "details": to_jsonable(self.details)}


@dataclasses.dataclass
class CheckResult:
    """What :func:`run` of a check returns: its verdicts, reported (not checked) figures, the JSON record's
    extra fields, CSV rows, and a plot callback ``plot(path)`` (``None`` when plots were not asked for)."""

    name: str
    verdicts: list[Verdict]
    reported: list[dict] = dataclasses.field(default_factory=list)
    record: dict = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)
    columns: list[str] | None = None
    extra_csv: dict[str, tuple[list[dict], list[str] | None]] = dataclasses.field(default_factory=dict)
    plot: Callable[[Path], Any] | None = None
    runtime_s: float = 0.0
    #: CPU time of this process (on a busy machine a better measure of the cost than the wall time)
    cpu_s: float = 0.0
    #: extra markdown for the report (tables of reported figures), placed after the reported list
    markdown: str = ""

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    def verdict(self, name: str, optimizer: str | None = None) -> Verdict:
        """The verdict called ``name`` (of ``optimizer``, when several were checked)."""
        hits = [v for v in self.verdicts if v.name == name and (optimizer is None or v.optimizer == optimizer)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} verdicts named {name!r} (optimizer {optimizer!r}) in {self.name}")
        return hits[0]


# ----------------------------------------------------------------------------- CLI / files
def default_out(name: str) -> Path:
    """``./runs/checks/<name>``: outputs never land in the package or the source tree by default (the
    committed reference results are regenerated only with an explicit ``--out proofs_checks/results``)."""
    return runs_dir("checks", name)


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """Parser with the options every check has: ``--quick`` and ``--out DIR``."""
    p = argparse.ArgumentParser(prog=f"python -m proofs_checks.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="reduced setting (seconds; used by the test suite)")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_out(name)})")
    return p


def _fmt(v: Any, floatfmt: str) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (float, np.floating)):
        return format(float(v), floatfmt) if math.isfinite(float(v)) else str(float(v))
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_fmt(x, floatfmt) for x in v) + ")"
    return str(v)


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None,
                floatfmt: str = ".3g", echo: bool = True) -> str:
    """Format ``rows`` (dicts) as an aligned text table, print it if ``echo``; returns the text."""
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
    if echo:
        print(text, flush=True)
    return text


def finish(result: CheckResult, out: str | Path | None, quick: bool) -> int:
    """Print the verdict table, write ``<name>.json`` / ``.csv`` / ``.png`` into ``out`` (default
    :func:`default_out`); return the exit code (0 iff every verdict passed)."""
    name = result.name
    out = output_dir(out if out is not None else default_out(name))
    rows = [{"optimizer": v.optimizer, "verdict": v.name, "passed": v.passed if v.counted else "(not counted)",
             "worst_slack": v.worst_slack if v.worst_slack is not None else "-"} for v in result.verdicts]
    print_table(rows, title=f"\n== {name}: verdicts ==", floatfmt=".3e")
    if result.reported:
        print_table([{k: r.get(k, "") for k in ("name", "value", "note")} for r in result.reported],
                    title=f"== {name}: reported figures (not verdicts) ==", floatfmt=".3e")
    record = {"check": name, "passed": result.passed, "quick": quick, "runtime_s": result.runtime_s,
              "cpu_s": result.cpu_s,
              "verdicts": [v.to_dict() for v in result.verdicts], "reported": result.reported}
    record.update(result.record)
    write_json(out / f"{name}.json", record)
    if result.rows:
        write_csv(out / f"{name}.csv", result.rows, result.columns)
    for fname, (rows_, cols) in result.extra_csv.items():
        write_csv(out / fname, rows_, cols)
    if result.plot is not None:
        result.plot(out / f"{name}.png")
    print(f"{name}: {'PASS' if result.passed else 'FAIL'} -> {out / (name + '.json')}", flush=True)
    return 0 if result.passed else 1


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread (the problems are tiny; threads only add overhead), then restore."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def timed(fn: Callable[[], CheckResult]) -> CheckResult:
    """Run ``fn`` and record its wall and CPU time in the result."""
    t0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    res.runtime_s, res.cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return res


def loglog_slope(x: Iterable[float], y: Iterable[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx, ly = np.log(np.asarray(list(x), float)), np.log(np.asarray(list(y), float))
    if len(lx) < 2 or not (np.all(np.isfinite(lx)) and np.all(np.isfinite(ly))):
        return float("nan")
    return float(np.polyfit(lx, ly, 1)[0])


def slope_verdict(name: str, claim: str, x, y, lo: float, hi: float, optimizer: str, **details) -> Verdict:
    """``lo <= slope(log y, log x) <= hi``; slack = distance outside the range (negative inside)."""
    s = loglog_slope(x, y)
    ok = math.isfinite(s) and lo <= s <= hi
    slack = max(lo - s, s - hi) if math.isfinite(s) else float("inf")
    return Verdict(name, ok, slack, dict(slope=s, range=[lo, hi], x=list(x), y=list(y), **details), claim, optimizer)


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
