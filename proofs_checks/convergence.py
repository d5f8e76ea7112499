"""Theorem 3.2 (convergence to stationary points in expectation), checked on mini-batch runs.

Setting: the Tucker tensor regression of :class:`proofs_checks.common.TensorRegression` with label noise
(so mini-batch gradients have variance), a plain SGD base rule, Robbins-Monro steps
``h_t = h0 / (1 + t)^gamma`` and summable relative tolerances ``tau_t = tau0 / (1 + t)^2`` (absolute
``theta_t = tau_t ||C^_{t+1}||``), over several seeds. ``g_t = ||P(Y_t) grad L_full(Y_t)||^2`` is computed
densely from the *full-batch* gradient.

Checked form (reconstructed, docs/theorems.md §3; the paper's statement and constants are not
recoverable): with ``w_t = h_t (1 - L h_t / 2)`` and ``E`` the mean over seeds, for every horizon ``T``

    sum_{t<T} w_t E g_t / sum_{t<T} w_t
        <= [ E L(Y_0) - L* + (L sigma^2 / 2) sum_{t<T} h_t^2 + B sqrt(d) sum_{t<T} theta_t ] / sum_{t<T} w_t

(the left side bounds ``min_{t<T} E g_t``). ``L = lambda_max(X^T X / N)`` and ``L*`` (the least-squares
minimum) are exact. **``sigma^2`` and ``B`` are not taken from the run they check**: they come from an
independent estimation run (the library's TDLRT on other seeds, the same schedule). ``sigma^2`` is the
largest *exact* mini-batch variance ``E_I ||g_I - grad L_full||^2 = (mean_k ||x_k r_k||^2 - ||grad L||^2) / b``
(``b`` samples drawn with replacement) at its iterates, ``B`` its largest ``||grad L_full||``, ``d = 3``; in
``theta_t`` the tolerance is the one the schedule sets, with ``||C^||`` bounded by ``||Y_{t+1}|| + eta``
measured on the checked run (only the tolerance enters, not the truncation the integrator did).

Verdicts: ``bound`` (the inequality at every ``T``), ``decay`` (the tail mean of ``E g_t`` below
``1e-2 E g_0``), ``running_min`` (``min_{t<T} E g_t < 0.9 min_{t<T/2} E g_t``), ``contrast`` (a fixed
``tau`` makes the bound's truncation term grow like ``T`` and the theorem says nothing; what stalls in
practice is the loss, so the final loss gap of the fixed-tau run must exceed 5x the summable run's).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import geoopt
import numpy as np
import torch

from tucker_manifold import FixedRankTucker
from tucker_manifold.parameter import record_io

from .common import (
    DEFAULT_OPTIMIZERS,
    DTYPE,
    CheckResult,
    OptimizerFactory,
    TensorRegression,
    Verdict,
    base_parser,
    finish,
    new_figure,
    print_table,
    riemannian_grad,
    save_figure,
    set_schedule,
    single_thread,
    tdlrt,
    timed,
)

NAME = "convergence"
#: integrators checked by default (name -> factory); one line per integrator
OPTIMIZERS: dict[str, OptimizerFactory] = dict(DEFAULT_OPTIMIZERS)
SHAPE = (5, 4, 3)
START_RANKS = (3, 3, 2)
GAMMA = 0.6
TAU0 = 0.1
FIXED_TAU = 0.3
BATCH = 64
H0_L = 1.0  # h0 = H0_L / L
QUICK = dict(steps=150, seeds=2, est_seeds=2)
FULL = dict(steps=2000, seeds=10, est_seeds=10)
EST_SEED0 = 1000  # the estimation run's seeds: 1000, 1001, ... (the checked runs use 0, 1, ...)


def make_problem() -> TensorRegression:
    return TensorRegression(SHAPE, (2, 2, 2), n_samples=480, noise=0.3, seed=100, teacher_scale=3.0)


def exact_variance(prob: TensorRegression, w: torch.Tensor, batch: int) -> float:
    """``E_I ||g_I - grad L(W)||^2`` for ``batch`` samples drawn uniformly with replacement."""
    r = prob.X @ w.reshape(-1) - prob.y
    per = (prob.X * r.unsqueeze(1))  # per-sample gradients x_k r_k
    full = per.mean(0)
    return float(((per * per).sum(1).mean() - (full * full).sum()) / batch)


def run_sgd(prob: TensorRegression, factory: OptimizerFactory, seed: int, steps: int, h0: float, tau_of_t,
            batch: int = BATCH) -> dict:
    """One mini-batch run of ``factory``'s optimizer; per-step full-gradient diagnostics."""
    g = torch.Generator().manual_seed(seed)
    m = FixedRankTucker(SHAPE, START_RANKS)
    x0 = m.random(dtype=DTYPE, generator=g)
    core, factors = m.unpack(x0)
    x0 = m.pack(0.3 * core / core.norm(), factors)
    p = geoopt.ManifoldParameter(x0, manifold=m)
    opt = factory([p], lr=h0, tau=tau_of_t(0), momentum=0.0)
    keys = ("g", "loss", "var", "grad_norm", "theta", "h", "tau")
    rec = {k: np.full(steps, np.nan) for k in keys}
    ranks = []
    for t in range(steps):
        h, tau = h0 / (1.0 + t) ** GAMMA, tau_of_t(t)
        set_schedule(opt, lr=h, tau=tau)
        m = p.manifold
        x = p.detach()
        w = m.to_dense(x)
        if not torch.isfinite(w).all():
            break
        full = prob.grad(w)
        _, pgn = riemannian_grad(m, x, full)
        idx = torch.randint(0, prob.n, (batch,), generator=g)

        def closure():
            opt.zero_grad()
            val = prob.loss(record_io(p, None, None, p.manifold.to_dense(p)), idx)
            val.backward()
            return val

        rec["g"][t] = pgn**2
        rec["loss"][t] = float(prob.loss(w))
        rec["var"][t] = exact_variance(prob, w, batch)
        rec["grad_norm"][t] = float(full.norm())
        # the tolerance the schedule sets: theta_t = tau_t ||C^_{t+1}||, ||C^|| <= ||Y_t|| + h ||g_mini||
        mini = prob.grad(w, idx)
        rec["theta"][t] = tau * (float(w.norm()) + h * float(mini.norm()))
        rec["h"][t] = h
        rec["tau"][t] = tau
        opt.step(closure)
        ranks.append(tuple(p.manifold.ranks))
    w_end = p.manifold.to_dense(p.detach())
    rec["final_loss"] = float(prob.loss(w_end)) if torch.isfinite(w_end).all() else float("inf")
    rec["final_ranks"] = ranks[-1] if ranks else None
    return rec


def _nanfill(a: np.ndarray, value: float) -> np.ndarray:
    return np.where(np.isfinite(a), a, value)


def estimate_constants(prob: TensorRegression, steps: int, seeds: int) -> dict:
    """``sigma^2`` and ``B`` from the library's TDLRT on seeds ``EST_SEED0 + k`` (never the checked runs)."""
    recs = [run_sgd(prob, tdlrt, EST_SEED0 + k, steps, H0_L / prob.L, _summable) for k in range(seeds)]
    return dict(sigma2=float(max(np.nanmax(r["var"]) for r in recs)),
                B=float(max(np.nanmax(r["grad_norm"]) for r in recs)),
                sigma2_mean=float(np.nanmean([r["var"] for r in recs])), seeds=[EST_SEED0 + k for k in range(seeds)])


def _summable(t: int) -> float:
    return TAU0 / (1.0 + t) ** 2


def _fixed(t: int) -> float:
    return FIXED_TAU


@np.errstate(invalid="ignore", over="ignore", divide="ignore")  # a diverged run's inf/nan are handled
def aggregate(prob: TensorRegression, recs: list[dict], const: dict, h0: float) -> dict:
    """Means over seeds and the bound's two sides at every horizon. A diverged run (non-finite from some
    step on) counts as infinite ``g`` and loss from then on."""
    L, d = prob.L, len(SHAPE)
    steps = len(recs[0]["g"])
    h = h0_schedule(steps, h0)  # the schedule the check sets (not what an integrator did with it)
    w = h * (1 - L * h / 2)
    g = np.mean([_nanfill(r["g"], np.inf) for r in recs], axis=0)
    theta = np.mean([_nanfill(r["theta"], np.inf) for r in recs], axis=0)
    var = np.mean([_nanfill(r["var"], np.inf) for r in recs], axis=0)
    loss0 = float(np.mean([r["loss"][0] for r in recs]))
    cw = np.cumsum(w)
    wavg = np.cumsum(w * g) / cw
    trunc = const["B"] * math.sqrt(d) * np.cumsum(theta)
    rhs = (loss0 - prob.loss_min + L * const["sigma2"] / 2 * np.cumsum(h**2) + trunc) / cw
    # the same with the checked run's own per-step variance (tighter; reported only)
    rhs_tight = (loss0 - prob.loss_min + L / 2 * np.cumsum(var * h**2) + trunc) / cw
    gap = np.mean([_nanfill(r["loss"], np.inf) for r in recs], axis=0) - prob.loss_min
    fin = np.isfinite(var)
    return dict(g=g, h=h, w=w, wavg=wavg, rhs=rhs, rhs_tight=rhs_tight, runmin=np.minimum.accumulate(g),
                theta=theta, gap=gap, var_mean=float(np.mean(var[fin])) if fin.any() else float("inf"),
                var_max=float(np.max(var)), final_gap=float(np.mean([r["final_loss"] for r in recs]) - prob.loss_min),
                grad_max=float(max(np.nanmax(r["grad_norm"]) for r in recs)), ranks=[r["final_ranks"] for r in recs])


def h0_schedule(steps: int, h0: float) -> np.ndarray:
    return h0 / (1.0 + np.arange(steps)) ** GAMMA


# ----------------------------------------------------------------------------- the check
def run(quick: bool = True, optimizers: Mapping[str, OptimizerFactory] | None = None, cache: dict | None = None,
        plots: bool = True) -> CheckResult:
    """Run the check for every optimizer in ``optimizers`` (default :data:`OPTIMIZERS`); ``cache`` keeps
    the problem and the estimated constants between calls."""
    return timed(lambda: _run(quick, dict(optimizers or OPTIMIZERS), {} if cache is None else cache, plots))


@np.errstate(invalid="ignore", over="ignore", divide="ignore")
def _run(quick, optimizers, cache, plots) -> CheckResult:
    cfg = QUICK if quick else FULL
    steps, seeds = cfg["steps"], cfg["seeds"]
    prob = make_problem()
    h0 = H0_L / prob.L
    with single_thread():
        key = (NAME, "constants", quick)
        if key not in cache:
            cache[key] = estimate_constants(prob, steps, cfg["est_seeds"])
        const = cache[key]
        aggs = {}
        for oname, factory in optimizers.items():
            for sname, tau_of_t in (("summable", _summable), ("fixed", _fixed)):
                recs = [run_sgd(prob, factory, seed, steps, h0, tau_of_t) for seed in range(seeds)]
                aggs[(oname, sname)] = aggregate(prob, recs, const, h0)
    T = steps
    tail = slice(int(0.9 * T), T)
    rows, verdicts, reported = [], [], []
    for oname in optimizers:
        s, f = aggs[(oname, "summable")], aggs[(oname, "fixed")]
        for (on, sname), a in aggs.items():
            if on != oname:
                continue
            for t in sorted({0, 10, T // 8, T // 4, T // 2, T - 1}):
                rows.append(dict(optimizer=oname, run=sname, t=t, h_t=a["h"][t], E_g=a["g"][t],
                                 running_min=a["runmin"][t], weighted_avg=a["wavg"][t], bound_rhs=a["rhs"][t],
                                 rhs_tight=a["rhs_tight"][t], loss_gap=a["gap"][t]))
        slack = s["wavg"] - s["rhs"]
        slack_bound = float(np.max(np.where(np.isfinite(slack), slack, np.inf)))
        g0 = s["g"][0]
        tail_ratio = float(np.mean(s["g"][tail]) / g0)
        runmin_ratio = float(s["runmin"][-1] / s["runmin"][T // 2])
        # a diverged summable run has no finite gap to compare: the contrast then fails
        gap_ratio = f["final_gap"] / s["final_gap"] if math.isfinite(s["final_gap"]) and s["final_gap"] > 0 else 0.0
        gap_ratio = gap_ratio if math.isfinite(gap_ratio) else 0.0
        verdicts += [
            Verdict("bound", slack_bound <= 0, slack_bound,
                    {"L": prob.L, "L_star": prob.loss_min, "sigma2": const["sigma2"], "B": const["B"],
                     "constants_from_seeds": const["seeds"], "sigma2_mean_estimation": const["sigma2_mean"],
                     "variance_checked_run(mean,max)": [s["var_mean"], s["var_max"]],
                     "max_grad_norm_checked_run": s["grad_max"], "final_wavg": s["wavg"][-1], "final_rhs": s["rhs"][-1],
                     "final_rhs_tight": s["rhs_tight"][-1]},
                    "Thm 3.2: sum_t<T w_t E g_t / sum w_t <= [E L(Y0) - L* + L sigma^2/2 sum h_t^2 + B sqrt(d) "
                    "sum theta_t] / sum w_t at every T; sigma^2, B from an independent estimation run", oname),
            Verdict("decay", tail_ratio < 1e-2, tail_ratio - 1e-2, {"tail_mean": float(np.mean(s["g"][tail])), "g0": g0},
                    "E||P grad L||^2 decays: mean over the last 10% of steps < 1e-2 E g_0", oname),
            Verdict("running_min", runmin_ratio < 0.9, runmin_ratio - 0.9,
                    {"runmin_T": s["runmin"][-1], "runmin_T/2": s["runmin"][T // 2]},
                    "min_{t<T} E g_t keeps decreasing: < 0.9 min_{t<T/2} E g_t", oname),
            Verdict("contrast", gap_ratio > 5, 5 - gap_ratio,
                    {"gap_fixed": f["final_gap"], "gap_summable": s["final_gap"], "ratio": gap_ratio,
                     "E_g_final_fixed": f["g"][-1], "E_g_final_summable": s["g"][-1],
                     "rhs_final_fixed": f["rhs"][-1], "ranks_fixed": f["ranks"], "ranks_summable": s["ranks"]},
                    f"summable vs fixed tau={FIXED_TAU}: the fixed-tau run's final loss gap E L(Y_T) - L* is > 5x "
                    "the summable run's", oname),
        ]
        second = s["wavg"][T // 2:]
        reported += [
            dict(name=f"{oname}:wavg_rise_second_half", value=float(np.max(np.diff(second))) if len(second) > 1 else 0.0,
                 note="largest step-to-step rise of the weighted average over the second half (<= 0: non-increasing)"),
            dict(name=f"{oname}:share_of_sum_in_second_half",
                 value=float(np.sum((s["w"] * s["g"])[T // 2:]) / np.sum(s["w"] * s["g"])),
                 note="share of sum w_t E g_t accrued after T/2 (the sum converges)"),
        ]
    print_table(rows, title=f"Theorem 3.2: mean over {seeds} seeds, L={prob.L:.3f}, L*={prob.loss_min:.4f}, "
                            f"gamma={GAMMA}, tau_t={TAU0}/(1+t)^2 vs fixed tau={FIXED_TAU}; sigma^2={const['sigma2']:.3g}, "
                            f"B={const['B']:.3g} (estimation seeds)", floatfmt=".3e")
    keep = np.unique(np.concatenate([np.arange(min(T, 20)), np.geomspace(1, T, 200).astype(int) - 1]))
    first = next(iter(optimizers))
    curve_rows = [dict(t=int(t), h_t=float(aggs[(first, "summable")]["h"][t]),
                       **{f"{k}_{n}": float(f"{aggs[(first, n)][k][t]:.6g}") for n in ("summable", "fixed")
                          for k in ("g", "runmin", "wavg", "rhs", "rhs_tight", "gap", "theta")}) for t in keep]
    record = {"steps": steps, "seeds": seeds, "gamma": GAMMA, "tau0": TAU0, "fixed_tau": FIXED_TAU, "batch": BATCH,
              "shape": SHAPE, "start_ranks": START_RANKS, "h0": h0, "constants": const, "summary_rows": rows,
              "optimizers": list(optimizers)}
    plot = (lambda path: _plot({n: aggs[(first, n)] for n in ("summable", "fixed")}, path, first)) if plots else None
    return CheckResult(NAME, verdicts, reported, record, curve_rows, plot=plot)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, "Theorem 3.2: mini-batch runs, Robbins-Monro steps, summable tolerances")
    args = parser.parse_args(argv)
    return finish(run(quick=args.quick), args.out, args.quick)


def _plot(agg, path: Path, oname: str):
    fig, axes = new_figure(1, 2, width=4.6, height=3.4)
    ax, ax2 = axes[0]
    colors = {"summable": "C0", "fixed": "C3"}
    for name, a in agg.items():
        c = colors[name]
        t = np.arange(1, len(a["g"]) + 1)
        ax.loglog(t, a["g"], color=c, alpha=0.25, lw=0.6)
        ax.loglog(t, a["runmin"], color=c, ls=":", label=f"{name}: running min")
        ax.loglog(t, a["wavg"], color=c, label=f"{name}: h-weighted avg")
        ax.loglog(t, a["rhs"], color=c, ls="--", lw=0.8, label=f"{name}: bound RHS")
        ax2.loglog(t, np.maximum(a["gap"], 1e-12), color=c, label=f"{name}")
    ax.set_xlabel("step t")
    ax.set_ylabel("E ||P(Y_t) grad L_full||^2")
    ax.legend(fontsize=6)
    ax.set_title(f"Thm 3.2 ({oname}): summable tau_t vs fixed tau", fontsize=9)
    ax2.set_xlabel("step t")
    ax2.set_ylabel("E L(Y_t) - L*")
    ax2.legend(fontsize=7)
    ax2.set_title("loss gap (fixed tau stalls)", fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
