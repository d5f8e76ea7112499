"""Theorem 3.1 (local descent), checked step by step on full-batch runs with a plain SGD base rule.

Checked form (the reconstructed bound of docs/theorems.md §2; the paper's constants are not
recoverable): for a step size ``h <= 1/L``, at every step

    L(Y_{t+1}) - L(Y_t) <= -h (1 - L h / 2) ||P(Y_t) grad L(Y_t)||^2 + B_t eta_t            (bound)
    eta_t = min(||Y_{t+1} - Y^_{t+1}||, sqrt(d) tau ||C^_{t+1}||),   B_t = ||grad L(Y^_{t+1})|| + L eta_t / 2

``Y^_{t+1} = Y_t - h grad L(Y_t) x_i U^_i U^_i^T`` is the augmented Galerkin step (before truncation),
recomputed here from the dense gradient with this module's own augmented bases (an SVD of ``[U_i | G_i]``);
``||C^|| = ||Y^_{t+1}||``. ``P(Y_t) grad L(Y_t)`` is computed independently before the step
(``proj_dense`` + ``tangent_to_dense``). Nothing is read from the optimizer: the check sees only the
points before and after each step, so broken integrators (``proofs_checks.mutants``) run through it too.

Why this form: ``L(Y^) - L(Y) <= -h(1 - Lh/2)||grad L x_i U^_i U^_i^T||^2`` for an ``L``-smooth loss, the
augmented space contains ``P(Y) grad L`` (Corollary 2.2), and ``L(Y+) - L(Y^) <= ||grad L(Y^)|| eta +
L eta^2 / 2`` with ``eta = ||Y+ - Y^||``. The truncation rule (per-mode tail ``<= tau ||C^||``) keeps
``eta <= sqrt(d) tau ||C^||``, which caps the allowance an integrator gets. ``B_t`` is the local, exact
form of the paper's constant ``B`` (a bound on ``||grad L||``): smaller than the run's maximum, so the
bound is harder to pass.

Verdicts per problem (and per optimizer in :data:`OPTIMIZERS`):

* ``<problem>.bound@tau=0``: the bound on every step of the ``tau = 0`` runs (``eta_t = 0``: a strict
  decrease by ``h(1 - Lh/2)||P grad L||^2``).
* ``<problem>.bound@tau>0``: the bound on the ``tau > 0`` runs in which the bound is *non-vacuous*
  (``h(1 - Lh/2)||P grad L||^2 > B_t eta_t + 1e-9``) on at least half of the steps; not counted when no
  run qualifies. The fraction of non-vacuous steps is reported for every run.
* ``<problem>.truncation``: ``||Y_{t+1} - Y^_{t+1}|| <= sqrt(d) tau ||C^_{t+1}||`` (+ rounding): the step
  is the augmented Galerkin step, truncated within the tolerance.

Reported, not verdicts: ``||grad_{C^} L|| >= ||P grad L||`` (a property of the augmented space, the same
for every integrator), the optimizer's own ``last_step_info`` (truncation error and core-gradient norm)
against the independent values when it has one, and (full runs) Hessian probes along the CNN runs
against the ``L`` used.

Problems: (a) ``0.5||W - A||^2`` (``L = 1``); (b) a Tucker tensor regression with a known teacher and no
noise (``L = lambda_max(X^T X / N)``, exact); (c) a Tucker-factorized conv layer on a fixed batch of
sklearn's digits (``L``: 1.1 x the largest Hessian power-iteration estimate along a pilot run from a
*different* start point); (d) the "tensor-Lyapunov" quadratic of ``approximation.py``, whose gradient is
tangent up to ``eps``: there truncation removes little and the ``tau > 0`` bound has something to say.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Mapping

import geoopt
import numpy as np
import torch
import torch.nn.functional as F

from tucker_manifold import FixedRankTucker
from tucker_manifold.parameter import record_io
from tucker_manifold.tucker import multi_mode_dot

from .common import (
    DEFAULT_OPTIMIZERS,
    DTYPE,
    CheckResult,
    OptimizerFactory,
    TensorRegression,
    Verdict,
    augmented_projectors,
    base_parser,
    finish,
    new_figure,
    pre_truncation,
    print_table,
    riemannian_grad,
    save_figure,
    set_schedule,
    single_thread,
    tdlrt_parallel,
    timed,
)

ATOL = 1e-12
NAME = "descent"
#: integrators checked by default: name -> factory (see proofs_checks.common). One line per integrator.
#: ``tdlrt-parallel`` is checked against its own pre-truncation step, ``Y - h P(Y) grad L``.
OPTIMIZERS: dict[str, OptimizerFactory] = dict(DEFAULT_OPTIMIZERS, **{"tdlrt-parallel": tdlrt_parallel})
#: a run's tau > 0 bound counts when it is non-vacuous on at least this fraction of its steps
MIN_NONVACUOUS = 0.5

QUICK = dict(steps={"quadratic": 12, "regression": 30, "cnn_digits": 15, "lyapunov": 15},
             taus={"quadratic": [0.0, 0.003], "regression": [0.0, 0.003], "cnn_digits": [0.0, 0.003],
                   "lyapunov": [0.0, 0.003]},
             hfacs=[1.0], n_images=96, pilot_steps=12, power_iters=12, hess_probes=0)
FULL = dict(steps={"quadratic": 100, "regression": 300, "cnn_digits": 200, "lyapunov": 100},
            taus={name: [0.0, 0.003, 0.01, 0.05, 0.2] for name in ("quadratic", "regression", "cnn_digits", "lyapunov")},
            hfacs=[1.0, 0.5], n_images=256, pilot_steps=80, power_iters=40, hess_probes=4)


@dataclasses.dataclass
class Problem:
    """A loss of one dense tensor, its smoothness constant and a starting point on a Tucker manifold."""

    name: str
    loss: Callable[[torch.Tensor], torch.Tensor]  # dense W -> scalar (autograd-able)
    L: float
    x0: torch.Tensor  # packed start point
    manifold: FixedRankTucker
    note: str = ""
    hessian_norm: Callable[[torch.Tensor], float] | None = None  # for a posteriori checks of L


def dense_grad(loss: Callable, w: torch.Tensor) -> tuple[float, torch.Tensor]:
    w = w.detach().clone().requires_grad_(True)
    val = loss(w)
    (g,) = torch.autograd.grad(val, w)
    return float(val.detach()), g


def hessian_power_norm(loss: Callable, w: torch.Tensor, iters: int = 40, seed: int = 0) -> float:
    """Largest |eigenvalue| of the Hessian of ``loss`` at dense ``w`` (power iteration on HVPs)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(w.shape, generator=g, dtype=w.dtype)
    v /= v.norm()
    w = w.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(w), w, create_graph=True)
    lam = 0.0
    for _ in range(iters):
        (hv,) = torch.autograd.grad(grad, w, grad_outputs=v, retain_graph=True)
        lam = float(hv.norm())
        if lam == 0.0:
            break
        v = hv / lam
    return lam


# ----------------------------------------------------------------------------- problems
def quadratic_problem(seed: int = 0, shape=(8, 7, 6), ranks=(2, 2, 2)) -> Problem:
    g = torch.Generator().manual_seed(seed)
    t = FixedRankTucker(shape, (3, 3, 3))
    a = t.to_dense(t.random(dtype=DTYPE, generator=g))
    a = 5.0 * a / a.norm() + 0.1 * torch.randn(shape, generator=g, dtype=DTYPE)
    m = FixedRankTucker(shape, ranks)
    return Problem("quadratic", lambda w: 0.5 * ((w - a) ** 2).sum(), 1.0, m.random(dtype=DTYPE, generator=g), m,
                   "0.5||W - A||^2, A = rank-(3,3,3) (norm 5) + 0.1 Gaussian noise; L = 1")


def regression_problem(seed: int = 0, shape=(6, 5, 4), ranks=(2, 2, 2), n_samples: int = 300) -> Problem:
    reg = TensorRegression(shape, (2, 2, 2), n_samples, noise=0.0, seed=seed, teacher_scale=3.0)
    g = torch.Generator().manual_seed(seed + 1)
    m = FixedRankTucker(shape, ranks)
    x0 = m.random(dtype=DTYPE, generator=g)
    core, factors = m.unpack(x0)
    x0 = m.pack(0.5 * core / core.norm(), factors)
    return Problem("regression", reg.loss, reg.L, x0, m,
                   f"1/(2N) sum (<X_k,W> - y_k)^2, N={n_samples}, teacher rank (2,2,2), no noise; "
                   f"L = lambda_max(X^T X/N) = {reg.L:.4f} (exact)")


def lyapunov_problem(seed: int = 0, shape=(8, 7, 6), ranks=(3, 3, 3), eps: float = 0.05) -> Problem:
    """``1/2 <W, sum_i W x_i H_i> - eps <N, W>`` (approximation.py): the gradient's normal part is at
    most ``eps``, so truncation has little to remove. ``L`` = the operator's largest eigenvalue, exact."""
    from .approximation import LyapunovProblem

    prob = LyapunovProblem(shape, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    m = FixedRankTucker(shape, ranks)
    x0 = m.random(dtype=DTYPE, generator=g)
    core, factors = m.unpack(x0)
    x0 = m.pack(3.0 * core / core.norm(), factors)
    return Problem("lyapunov", lambda w: prob.loss(w, eps), prob.L, x0, m,
                   f"1/2 <W, sum_i W x_i H_i> - eps <N, W>, eps={eps}, spectra of H_i in [0.2, 1]; L = {prob.L:.3f} (exact)")


class DigitsConv:
    """Fixed batch of sklearn digits -> frozen random 3x3 stem (1 -> 4 channels, relu) -> Tucker conv
    (4 -> 16, 3x3) -> softplus -> spatial mean -> frozen linear head (16 -> 10) -> mean cross-entropy.

    Only the Tucker kernel is trained: the loss is a function of one layer's weight with the other
    layers fixed, the setting of the theorem. The activation after the Tucker conv is smooth (softplus):
    with a ReLU there the loss is not ``L``-smooth (hypothesis (A1) of the theorem fails), its gradient
    jumps across the ReLU kinks, which no Hessian probe sees (measured: a kink with a finite-difference
    curvature of 16 x the estimated ``L`` inside one step, on which the bound failed). The stem's ReLU
    acts on fixed inputs and does not matter.
    """

    def __init__(self, n_images: int = 256, seed: int = 0):
        from sklearn.datasets import load_digits

        digits = load_digits()
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(digits.target), generator=g)[:n_images]
        x = torch.as_tensor(digits.images, dtype=DTYPE)[idx].unsqueeze(1) / 16.0
        self.y = torch.as_tensor(digits.target, dtype=torch.long)[idx]
        stem = torch.randn(4, 1, 3, 3, generator=g, dtype=DTYPE) / 3.0
        self.feats = F.relu(F.conv2d(x, stem, padding=1))  # fixed input of the Tucker layer
        self.head = torch.randn(10, 16, generator=g, dtype=DTYPE)

    def loss(self, kernel: torch.Tensor) -> torch.Tensor:
        z = F.softplus(F.conv2d(self.feats, kernel, padding=1)).mean(dim=(2, 3))
        return F.cross_entropy(z @ self.head.T, self.y)


def _cnn_start(m: FixedRankTucker, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = m.random(dtype=DTYPE, generator=g)
    core, factors = m.unpack(x0)
    return m.pack(4.0 * core / core.norm(), factors)


def cnn_problem(seed: int = 0, ranks=(4, 2, 2, 2), n_images: int = 256, pilot_steps: int = 60,
                power_iters: int = 30) -> Problem:
    """``L``: 1.1 x the largest Hessian-norm estimate at points of a pilot run (library TDLRT, tau = 0)
    that starts from a *different* random point than the checked runs (no probe sits on their start)."""
    from tucker_manifold.optim import TDLRT

    net = DigitsConv(n_images, seed)
    m = FixedRankTucker((16, 4, 3, 3), ranks)
    x0 = _cnn_start(m, seed + 1)
    pilot0 = _cnn_start(m, seed + 1000)
    estimates = [hessian_power_norm(net.loss, m.to_dense(pilot0), power_iters)]
    p = geoopt.ManifoldParameter(pilot0.clone(), manifold=m)
    opt = TDLRT([p], lr=1.0 / estimates[0], tau=0.0)
    probe_every = max(1, pilot_steps // 5)
    for t in range(pilot_steps):
        opt.step(_closure(opt, p, net.loss))
        if (t + 1) % probe_every == 0:
            estimates.append(hessian_power_norm(net.loss, p.manifold.to_dense(p.detach()), power_iters))
    L = 1.1 * max(estimates)
    return Problem("cnn_digits", net.loss, L, x0, m,
                   f"Tucker conv (16,4,3,3) on {n_images} digits, mean CE; L = 1.1 x max Hessian-norm estimate "
                   f"over {len(estimates)} points of a pilot run from another start = {L:.4f}",
                   hessian_norm=lambda w: hessian_power_norm(net.loss, w, power_iters))


def _closure(opt, p, loss):
    def closure():
        opt.zero_grad()
        val = loss(record_io(p, None, None, p.manifold.to_dense(p)))
        val.backward()
        return val

    return closure


def make_problems(cfg: dict) -> list[Problem]:
    return [quadratic_problem(), regression_problem(), lyapunov_problem(),
            cnn_problem(n_images=cfg["n_images"], pilot_steps=cfg["pilot_steps"], power_iters=cfg["power_iters"])]


# ----------------------------------------------------------------------------- one run
def run_descent(prob: Problem, factory: OptimizerFactory, tau: float, h: float, steps: int,
                hess_probes: int = 0) -> dict:
    """``factory``'s optimizer (SGD rule, momentum 0) from ``prob.x0``; per-step records for the bound.

    The reference step ``Y^`` (what the truncation must stay close to) is the factory's declared
    pre-truncation step (:func:`proofs_checks.common.pre_truncation`): the augmented Galerkin step
    ``Y - h grad L x_i U^_i U^_i^T`` (TDLRT, the mutants) or the tangent step ``Y - h P(Y) grad L``
    (ParallelTDLRT). Both are recomputed here from the dense gradient; ``eta_galerkin`` records the
    distance to the Galerkin step in either case."""
    p = geoopt.ManifoldParameter(prob.x0.clone(), manifold=prob.manifold)
    opt = factory([p], lr=h, tau=tau, momentum=0.0)
    tangent = pre_truncation(factory) == "tangent"
    keys = ("loss", "loss_next", "pg_norm", "core_grad_indep", "eta_ideal", "chat_norm", "grad_norm_hat",
            "lib_eta", "lib_core_grad", "eta_galerkin", "step_grad")
    rec = {k: [] for k in keys}
    rec["ranks"] = []
    hess = []
    probe_at = set(np.linspace(0, steps - 1, hess_probes).round().astype(int).tolist()) if hess_probes else set()
    d = prob.manifold.order
    for t in range(steps):
        set_schedule(opt, lr=h, tau=tau)
        m = p.manifold
        x = p.detach().clone()
        core, factors = m.unpack(x)
        w = m.to_dense(x)
        loss_t, g = dense_grad(prob.loss, w)
        pg, pgn = riemannian_grad(m, x, g)
        gc = multi_mode_dot(g, augmented_projectors(core, factors, g))  # = grad_{C^} L x_i U^_i (same norm)
        y_gal = w - h * gc
        step_dir = pg if tangent else gc
        y_hat = w - h * step_dir
        if t in probe_at and prob.hessian_norm is not None:
            hess.append(prob.hessian_norm(w))
        opt.step(_closure(opt, p, prob.loss))
        w_next = p.manifold.to_dense(p.detach()) if isinstance(p, geoopt.ManifoldParameter) else p.detach()
        rec["loss"].append(loss_t)
        rec["loss_next"].append(float(prob.loss(w_next)) if torch.isfinite(w_next).all() else float("inf"))
        rec["pg_norm"].append(pgn)
        rec["core_grad_indep"].append(float(gc.norm()))
        rec["step_grad"].append(float(step_dir.norm()))
        rec["eta_ideal"].append(float((w_next - y_hat).norm()))
        rec["eta_galerkin"].append(float((w_next - y_gal).norm()))
        rec["chat_norm"].append(float(y_hat.norm()))
        rec["grad_norm_hat"].append(float(dense_grad(prob.loss, y_hat)[1].norm()))
        info = getattr(opt, "last_step_info", None)
        if info:
            rec["lib_eta"].append(float(info[0]["truncation_error"]))
            rec["lib_core_grad"].append(float(info[0]["core_grad_norm"]))
        rec["ranks"].append(tuple(p.manifold.ranks))
        if not math.isfinite(rec["loss_next"][-1]):
            break
    out = {k: (np.asarray(v, dtype=float) if k != "ranks" else v) for k, v in rec.items()}
    out["hessian_probes"] = hess
    out["order"] = d
    out["max_n"] = max(prob.manifold.shape)
    return out


@np.errstate(invalid="ignore", over="ignore")  # a diverged run's inf/nan are handled below
def evaluate(rec: dict, L: float, h: float, tau: float) -> dict:
    """Per-step slacks (lhs - rhs, <= 0 passes) of the bound and of the truncation, and the vacuity."""
    d = rec["order"]
    c = h * (1.0 - L * h / 2.0)
    dl = rec["loss_next"] - rec["loss"]
    # the library counts singular values below max(n) eps ||C^|| as zeros: allow that much rounding
    rounding = math.sqrt(d) * rec["max_n"] * np.finfo(float).eps * rec["chat_norm"] + 1e-12
    tol = math.sqrt(d) * tau * rec["chat_norm"] + rounding
    eta = np.minimum(rec["eta_ideal"], tol)
    B = rec["grad_norm_hat"] + L * eta / 2.0
    guaranteed = c * rec["pg_norm"] ** 2 - B * eta
    slack = dl + guaranteed - ATOL
    slack = np.where(np.isfinite(slack), slack, np.inf)
    # a step where even eta = 0 guarantees no decrease (converged: ||P grad L|| ~ 0) says nothing
    # either way; the vacuity that counts is that of the steps with something to guarantee
    active = c * rec["pg_norm"] ** 2 > 1e-9
    nonvac = guaranteed > 1e-9
    slack_tr = rec["eta_ideal"] - tol - 1e-10 * (1.0 + rec["chat_norm"])
    slack_tr = np.where(np.isfinite(slack_tr), slack_tr, np.inf)
    pos = nonvac & np.isfinite(dl)
    min_ratio = float(np.min(-dl[pos] / guaranteed[pos])) if pos.any() else float("nan")
    ev = dict(
        c=c, slack=slack, guaranteed=guaranteed, nonvac=nonvac,
        worst=float(slack.max()) if len(slack) else float("inf"),
        worst_truncation=float(slack_tr.max()) if len(slack_tr) else float("inf"),
        frac_nonvacuous=float(nonvac.sum() / active.sum()) if active.any() else 0.0, min_ratio=min_ratio,
        active_steps=int(active.sum()),
        worst_core_ge_P=float(np.max(rec["pg_norm"] - rec["core_grad_indep"] - 1e-10 * (1 + rec["core_grad_indep"]))),
        B_max=float(B.max()) if len(B) else float("nan"), max_B_eta=float((B * eta).max()) if len(B) else float("nan"),
        final_ranks=rec["ranks"][-1] if rec["ranks"] else None,
        max_dist_galerkin=float(np.max(rec["eta_galerkin"])) if len(rec["eta_galerkin"]) else float("nan"),
        loss_0=float(rec["loss"][0]), loss_T=float(rec["loss_next"][-1]),
    )
    n = min(len(rec["lib_eta"]), len(rec["eta_ideal"]))
    if n:
        ev["lib_eta_dev"] = float(np.max(np.abs(rec["lib_eta"][:n] - rec["eta_ideal"][:n])))
        ev["lib_core_grad_dev"] = float(np.max(np.abs(rec["lib_core_grad"][:n] - rec["step_grad"][:n])))
    return ev


# ----------------------------------------------------------------------------- the check
def run(quick: bool = True, optimizers: Mapping[str, OptimizerFactory] | None = None, cache: dict | None = None,
        plots: bool = True) -> CheckResult:
    """Run the check for every optimizer in ``optimizers`` (default :data:`OPTIMIZERS`). ``cache``: a dict
    the caller keeps between calls (the problems and the CNN's pilot run are built once per setting)."""
    return timed(lambda: _run(quick, dict(optimizers or OPTIMIZERS), {} if cache is None else cache, plots))


def _run(quick, optimizers, cache, plots) -> CheckResult:
    cfg = QUICK if quick else FULL
    with single_thread():
        key = (NAME, "problems", quick)
        if key not in cache:
            cache[key] = make_problems(cfg)
        problems = cache[key]
        rows, runs, verdicts, reported = [], {}, [], []
        for oname, factory in optimizers.items():
            for prob in problems:
                sub = []
                for tau in cfg["taus"][prob.name]:
                    for hf in cfg["hfacs"]:
                        h = hf / prob.L
                        probes = cfg["hess_probes"] if prob.hessian_norm is not None else 0
                        rec = run_descent(prob, factory, tau, h, cfg["steps"][prob.name], hess_probes=probes)
                        ev = evaluate(rec, prob.L, h, tau)
                        runs[(oname, prob.name, tau, hf)] = (rec, ev)
                        row = dict(optimizer=oname, problem=prob.name, tau=tau, h_L=hf, h=h, L=prob.L,
                                   steps=len(rec["loss"]), worst_slack=ev["worst"],
                                   frac_nonvacuous=ev["frac_nonvacuous"], min_decrease_ratio=ev["min_ratio"],
                                   worst_truncation=ev["worst_truncation"], B_max=ev["B_max"],
                                   max_B_eta=ev["max_B_eta"], loss_0=ev["loss_0"], loss_T=ev["loss_T"],
                                   final_ranks=ev["final_ranks"], worst_core_ge_P=ev["worst_core_ge_P"],
                                   lib_eta_dev=ev.get("lib_eta_dev", float("nan")),
                                   lib_core_grad_dev=ev.get("lib_core_grad_dev", float("nan")),
                                   max_dist_galerkin=ev["max_dist_galerkin"],
                                   hess_max_over_L=(max(rec["hessian_probes"]) / prob.L if rec["hessian_probes"]
                                                    else float("nan")))
                        rows.append(row)
                        sub.append(row)
                verdicts += _verdicts(oname, prob, sub, pre_truncation(factory))
                reported += _reported(oname, prob, sub, pre_truncation(factory))
    cols = ["optimizer", "problem", "tau", "h_L", "L", "worst_slack", "frac_nonvacuous", "min_decrease_ratio",
            "worst_truncation", "B_max", "max_B_eta", "loss_0", "loss_T", "final_ranks", "lib_eta_dev",
            "hess_max_over_L", "max_dist_galerkin"]
    print_table(rows, cols, title="Theorem 3.1: worst slack (max over steps of lhs - rhs; <= 0 holds)", floatfmt=".3g")
    plot = (lambda path: _plot(problems, runs, cfg, optimizers, path)) if plots else None
    record = {"rows": rows, "settings": {k: v for k, v in cfg.items()}, "optimizers": list(optimizers),
              "problems": {p.name: p.note for p in problems},
              "form": "L(Y+)-L(Y) <= -h(1-Lh/2)||P grad L||^2 + B_t eta_t (+1e-12), "
                      "eta_t = min(||Y+ - Y^||, sqrt(d) tau ||C^||), B_t = ||grad L(Y^)|| + L eta_t/2"}
    return CheckResult(NAME, verdicts, reported, record, rows, cols, plot=plot)


STEP_LABEL = {"galerkin": "the augmented Galerkin step Y^ = Y - h grad L x_i U^_iU^_i^T",
              "tangent": "the tangent (Riemannian) step Y^ = Y - h P(Y) grad L"}


def _verdicts(oname: str, prob: Problem, sub: list[dict], ref: str = "galerkin") -> list[Verdict]:
    zero = [r for r in sub if r["tau"] == 0]
    pos = [r for r in sub if r["tau"] > 0]
    live = [r for r in pos if r["frac_nonvacuous"] >= MIN_NONVACUOUS]
    per_run = lambda rs: {f"tau={r['tau']},h={r['h_L']}/L": dict(worst_slack=r["worst_slack"],  # noqa: E731
                                                                  frac_nonvacuous=r["frac_nonvacuous"]) for r in rs}
    w0 = max(r["worst_slack"] for r in zero)
    out = [Verdict(f"{prob.name}.bound@tau=0", w0 <= 0, w0,
                   {"problem": prob.note, "L": prob.L, "per_run": per_run(zero)},
                   "Thm 3.1 at tau=0: L(Y+) - L(Y) <= -h(1-Lh/2)||P grad L||^2 on every step (strict descent)", oname)]
    wp = max((r["worst_slack"] for r in live), default=float("nan"))
    out.append(Verdict(f"{prob.name}.bound@tau>0", (not live) or wp <= 0, wp if live else None,
                       {"per_run": per_run(pos), "counted_runs": [f"tau={r['tau']},h={r['h_L']}/L" for r in live],
                        "min_nonvacuous": MIN_NONVACUOUS},
                       "Thm 3.1 at tau>0: L(Y+) - L(Y) <= -h(1-Lh/2)||P grad L||^2 + B_t eta_t on every step, "
                       f"over the runs where it is non-vacuous on >= {MIN_NONVACUOUS:.0%} of the steps",
                       oname, counted=bool(live)))
    wt = max(r["worst_truncation"] for r in sub)
    out.append(Verdict(f"{prob.name}.truncation", wt <= 0, wt,
                       {"per_run": {f"tau={r['tau']},h={r['h_L']}/L": r["worst_truncation"] for r in sub}},
                       f"||Y+ - Y^|| <= sqrt(d) tau ||C^|| (+ rounding): the step is {STEP_LABEL[ref]} "
                       "truncated within the tolerance", oname))
    return out


def _reported(oname: str, prob: Problem, sub: list[dict], ref: str = "galerkin") -> list[dict]:
    rep = [dict(name=f"{oname}:{prob.name}.core_ge_P", value=max(r["worst_core_ge_P"] for r in sub),
                note="max ||P grad L|| - ||grad_C^ L|| (<= 0: the augmented space contains P grad L, Cor. 2.2); "
                     "set-up sanity, the same for every integrator"),
           dict(name=f"{oname}:{prob.name}.frac_nonvacuous@tau>0",
                value=[r["frac_nonvacuous"] for r in sub if r["tau"] > 0],
                note="fraction of steps where the tau>0 bound guarantees a decrease, per tau>0 run")]
    if ref != "galerkin":
        rep.append(dict(name=f"{oname}:{prob.name}.dist_to_galerkin@tau=0",
                        value=max(r["max_dist_galerkin"] for r in sub if r["tau"] == 0),
                        note="max ||Y+ - (Y - h grad L x_i U^_iU^_i^T)|| at tau = 0: how far the step is from "
                             "TDLRT's Galerkin step (> 0: a different integrator, checked against its own step)"))
    devs = [r["lib_eta_dev"] for r in sub if math.isfinite(r["lib_eta_dev"])]
    if devs:
        rep.append(dict(name=f"{oname}:{prob.name}.last_step_info_dev",
                        value=[max(devs), max(r["lib_core_grad_dev"] for r in sub)],
                        note="max |optimizer's truncation_error - ||Y+ - Y^|||, max |optimizer's core_grad_norm - "
                             "||grad_C^ L|||: its own report against the independent recomputation"))
    hr = [r["hess_max_over_L"] for r in sub if math.isfinite(r["hess_max_over_L"])]
    if hr:
        rep.append(dict(name=f"{oname}:{prob.name}.hessian_probe_over_L", value=max(hr),
                        note="max Hessian-norm probe along the checked runs / L (< 1: the estimated L holds there)"))
    return rep


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, "Theorem 3.1 (local descent) per step, on four problems")
    args = parser.parse_args(argv)
    return finish(run(quick=args.quick), args.out, args.quick)


def _plot(problems, runs, cfg, optimizers, path: Path):
    """Top: loss along the h = 1/L runs. Bottom: actual / guaranteed decrease per step (>= 1: bound holds)."""
    oname = next(iter(optimizers))
    fig, axes = new_figure(2, len(problems), width=3.3, height=2.6)
    for j, prob in enumerate(problems):
        ax, ax2 = axes[0, j], axes[1, j]
        best = min(float(np.min(runs[(oname, prob.name, t, hf)][0]["loss_next"])) for t in cfg["taus"][prob.name]
                   for hf in cfg["hfacs"])
        for tau in cfg["taus"][prob.name]:
            rec, ev = runs[(oname, prob.name, tau, 1.0)]
            loss = np.append(rec["loss"], rec["loss_next"][-1])
            (line,) = ax.semilogy(np.maximum(loss - best, 1e-16), label=f"tau={tau}")
            for hf, marker in zip(cfg["hfacs"], ("o", "x")):
                rec, ev = runs[(oname, prob.name, tau, hf)]
                pos = np.nonzero(ev["nonvac"])[0]
                ratio = (rec["loss"] - rec["loss_next"])[pos] / ev["guaranteed"][pos]
                ax2.semilogy(pos, ratio, marker, ms=2.5, color=line.get_color(), alpha=0.7,
                             label=f"tau={tau}, h={hf}/L ({ev['frac_nonvacuous']:.0%})")
        ax.set_title(f"{prob.name}: L(Y_t) - best loss seen, h = 1/L", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=6)
        ax2.axhline(1.0, color="k", lw=0.8)
        ax2.set_xlabel("step", fontsize=8)
        ax2.set_ylabel("actual / guaranteed decrease", fontsize=7)
        ax2.set_title("non-vacuous steps; bound holds iff >= 1", fontsize=8)
        ax2.legend(fontsize=5, ncol=1)
    fig.suptitle(f"Theorem 3.1 ({oname}); legend: share of non-vacuous steps", fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
