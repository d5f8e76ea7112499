"""Training to a parameter budget in the experiments (issue 14): what ``budget`` means, the two TDLRT
methods it adds, the ranks that make a fixed-rank method fit a budget, and ``compare`` at a budget.

**What the budget counts.** ``N`` is the number of Tucker parameters (cores + factors) of all Tucker
parameters of the optimizer (:class:`tucker_manifold.optim.TDLRT`'s ``budget``). The experiments factorize
the convolutions only (``build_method(linear=False)``, what ``train`` / ``compare`` do), so ``N`` is the
factorized conv weight count, biases excluded: ``conv_params`` in ``metrics.json``. A fraction
``0 < budget < 1`` (a float; ``1.0`` too) means ``floor(budget * D)`` with ``D`` the weight count of
the dense model's ``groups=1`` ``nn.Conv2d`` layers (biases excluded; ``conv_dense_params`` in
``metrics.json``, the denominator of ``conv_compression``): ``budget=0.1`` is a model whose convs hold
10% of the dense conv weights. An int is an absolute count. (With Tucker linear layers in the optimizer
through the Python API, they count against ``N`` too, and the fraction still refers to the dense convs.)

**Methods.**

* ``tdlrt-budget``: tuckerize (initial ``rank_fraction`` 0.5, as ``tdlrt``), ``TDLRT(budget=N)`` without
  a tolerance: every step chooses all layers' ranks jointly (least sum of squared relative truncation
  errors; :mod:`tucker_manifold.budget`). Needs a budget. Use a schedule (``budget_schedule=(0, 1)``
  epochs): cut to ``N`` at the first step, the allocation sees the flat spectra of the initialisation,
  starves the largest layers (vgg-mnist's last conv at rank 3) and the ranks stay there, because a rank
  freed later only comes back through one step's gradient directions (89.3% vs 96.6% test accuracy
  at 10%, results/budget).
* ``tdlrt``: with a budget, ``TDLRT(tau=tau, budget=N)``: ``tau`` is a floor (ranks never above what
  ``tau`` keeps) and ``N`` a ceiling.
* ``tdlrt-fixed``: tuckerize at fixed ranks (default ``rank_fraction`` 0.25, or fitted to a budget) and
  TDLRT with every mode non-adaptive (``rmin = rmax`` = the initial ranks): the geometry-aware step
  (augment, lift, step on the core, truncate back) at constant ranks.
* fixed-rank methods (``vanilla-tucker``, ``riemannian-fixed``, ``tdlrt-fixed``) given a budget get the
  largest uniform ``rank_fraction`` whose conv count is ``<= N`` (:func:`fit_rank_fraction`); other
  matched methods (``cp``, ``matrix``, ...) get their matcher applied to per-layer shares of ``N``
  proportional to the dense layer sizes (:func:`layer_shares`); a layer whose share is below the cost of
  rank 1 takes rank 1, so their total can exceed ``N`` by that much (the table says ``<= N`` or not).

**compare at a budget** (:func:`compare_at_budget`): every method at the same ``N``; adaptive (tau)
methods at the tau whose final size matches, found by :func:`bisect_tau`: full-length runs of the first
seed, geometric bisection on tau (start at the given tau, doubled or halved until ``N`` is bracketed),
at most ``max_bisect_runs`` runs, stopping at a count within ``rel_tol`` below ``N``; the tried tau with
the largest count ``<= N`` is kept (its run is the first seed's result) and the other seeds run at it.
Their counts can differ a little from the first seed's (tau fixes a tolerance, not a size): the table
says whether each is ``<= N``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from .accounting import _dense_convs, tucker_conv_count
from .methods import (
    DEFAULT_FIXED_RANK_FRACTION,
    DEFAULT_TDLRT_RANK_FRACTION,
    _tuckerized,
    get_method,
    match_rank_fraction,
    register_method,
)

__all__ = [
    "BUDGET_METHODS",
    "check_budget_value",
    "check_budget_schedule_value",
    "schedule_steps",
    "dense_conv_params",
    "resolve_budget",
    "fit_rank_fraction",
    "layer_shares",
    "fit_to_budget",
    "fit_config",
    "takes_budget",
    "bisect_tau",
    "compare_at_budget",
    "budget_table",
    "plot_budget_ranks",
]

logger = logging.getLogger("tucker_manifold.experiments")

#: Methods whose optimizer takes ``budget=N`` itself (the others get ranks fitted to it).
BUDGET_METHODS: tuple[str, ...] = ("tdlrt", "tdlrt-budget")


def check_budget_value(budget: Any, name: str = "budget") -> None:
    """``None``, an int >= 1 (a count) or a float in (0, 1] (a fraction of the dense conv weights)."""
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"{name} must be an int >= 1 (a parameter count) or a float in (0, 1] (a fraction of "
                         f"the dense conv weights), got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"{name} must be an int >= 1 (a parameter count), got {budget!r}")
    elif not (0 < float(budget) <= 1):
        raise ValueError(f"{name} as a float is a fraction of the dense conv weights and must be in (0, 1], "
                         f"got {budget!r} (an absolute count is an int)")


def check_budget_schedule_value(schedule: Any, budget: Any = None, name: str = "budget_schedule") -> None:
    """``None`` or ``(start_epoch, end_epoch)`` numbers with ``0 <= start < end`` (needs a budget)."""
    if schedule is None:
        return
    ok = (isinstance(schedule, (tuple, list)) and len(schedule) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in schedule))
    if not ok or not 0 <= schedule[0] < schedule[1]:
        raise ValueError(f"{name} must be (start_epoch, end_epoch) with 0 <= start_epoch < end_epoch, got {schedule!r}")
    if budget is None:
        raise ValueError(f"{name} needs budget (the count it decays to)")


def schedule_steps(cfg, n_train: int) -> Optional[tuple[int, int]]:
    """``cfg.budget_schedule`` (epochs) as optimizer steps of a run on ``n_train`` images with
    ``cfg.batch_size`` (``ceil(n_train / batch_size)`` steps per epoch); ``None`` without a schedule."""
    if cfg.budget_schedule is None:
        return None
    per_epoch = math.ceil(n_train / cfg.batch_size)
    start = round(float(cfg.budget_schedule[0]) * per_epoch)
    return start, max(start + 1, round(float(cfg.budget_schedule[1]) * per_epoch))


def takes_budget(method: str) -> bool:
    """Whether ``method``'s optimizer takes the budget itself (:data:`BUDGET_METHODS`)."""
    return method in BUDGET_METHODS


def dense_conv_params(dense_model: nn.Module) -> int:
    """Weight count of the ``groups=1`` ``nn.Conv2d`` layers of a dense model, biases excluded (the
    ``conv_dense_params`` of ``metrics.json``, what a fraction budget refers to)."""
    convs = _dense_convs(dense_model)
    if not convs:
        raise ValueError("dense_model has no groups=1 convolution: a fractional budget refers to the dense conv weights")
    return sum(m.weight.numel() for m in convs.values())


def resolve_budget(dense_model: nn.Module, budget: Any) -> int:
    """``budget`` as a parameter count: an int as is, a float ``f`` in (0, 1] as
    ``floor(f * dense_conv_params(dense_model))``."""
    check_budget_value(budget)
    if budget is None:
        raise ValueError("budget must be given (an int count or a float fraction)")
    if isinstance(budget, numbers.Integral):
        return int(budget)
    return max(1, math.floor(round(float(budget) * dense_conv_params(dense_model), 6)))


def fit_rank_fraction(dense_model: nn.Module, budget: int) -> float:
    """The largest uniform ``rank_fraction`` (channel ranks ``ceil(f n)``, spatial modes full, as
    ``tuckerize``) whose Tucker conv weight count is ``<= budget``; ValueError if even rank 1 does not fit."""
    convs = _dense_convs(dense_model)
    if not convs:
        raise ValueError("dense_model has no convolution to factorize")
    shapes = [tuple(m.weight.shape) for m in convs.values()]
    # The count only changes where ceil(f * n) does: at f = j / n.
    cands = sorted({j / s[k] for s in shapes for k in (0, 1) for j in range(1, s[k] + 1)})
    fits = [f for f in cands if sum(tucker_conv_count(s, f) for s in shapes) <= budget]
    if not fits:
        smallest = sum(tucker_conv_count(s, cands[0]) for s in shapes)
        raise ValueError(f"budget = {budget} is below the smallest uniform-rank Tucker model ({smallest} conv "
                         f"weights at channel rank 1)")
    return float(max(fits))


def layer_shares(dense_model: nn.Module, budget: int) -> dict[str, int]:
    """``{conv name: floor(budget * its dense weights / all dense conv weights)}`` (uniform compression)."""
    convs = _dense_convs(dense_model)
    total = dense_conv_params(dense_model)
    return {name: int(budget * m.weight.numel() // total) for name, m in convs.items()}


def fit_to_budget(dense_model: nn.Module, method: str, budget: int) -> tuple[dict, str]:
    """Config overrides that fit a fixed-rank ``method`` into ``budget`` parameters, and how:
    ``match_rank_fraction`` methods get :func:`fit_rank_fraction`, other matched methods their matcher on
    :func:`layer_shares`. ValueError for a method without ranks to fit (``dense``) or an adaptive one."""
    spec = get_method(method)
    if takes_budget(method):
        raise ValueError(f"method {method!r} takes the budget itself (TDLRT(budget=N)); nothing to fit")
    if spec.adaptive:
        raise ValueError(f"method {method!r} follows tau: compare_at_budget finds the tau that matches a budget")
    if spec.match is None:
        raise ValueError(f"method {method!r} has no ranks to fit to a budget")
    if spec.match is match_rank_fraction:
        f = fit_rank_fraction(dense_model, budget)
        return {"rank": None, "rank_fraction": f, "layer_ranks": None}, f"uniform rank_fraction={f:.4f} within N"
    overrides, how = spec.match(dense_model, layer_shares(dense_model, budget), method)
    return overrides, f"{how} within per-layer shares of N"


def fit_config(cfg, dense_model: nn.Module):
    """The config a run with ``cfg.budget`` trains: unchanged for a method that takes the budget
    (:data:`BUDGET_METHODS`); otherwise ranks fitted by :func:`fit_to_budget` and ``budget=None``. Explicit
    ranks together with a budget on a fixed-rank method are a ValueError (which one would win?)."""
    if cfg.budget is None or takes_budget(cfg.method):
        return cfg
    if cfg.rank is not None or cfg.rank_fraction is not None or cfg.layer_ranks is not None:
        raise ValueError(f"method {cfg.method!r} has fixed ranks: give either budget or rank / rank_fraction / "
                         "layer_ranks, not both")
    overrides, how = fit_to_budget(dense_model, cfg.method, resolve_budget(dense_model, cfg.budget))
    logger.info("budget %s: %s %s", cfg.budget, cfg.method, how)
    return dataclasses.replace(cfg, budget=None, budget_schedule=None, **overrides)


# ------------------------------------------------------------------------------------ methods
def _freeze_ranks(model: nn.Module) -> nn.Module:
    """Every mode of every Tucker parameter non-adaptive (``rmin = rmax`` = its current rank)."""
    from ..parameter import RankBounds, is_tucker_parameter

    for p in model.parameters():
        if is_tucker_parameter(p):
            r = tuple(int(k) for k in p.manifold.ranks)
            p.bounds = RankBounds(r, r, (False,) * len(r))  # replaced, not merged: fixed means fixed
    return model


@register_method("tdlrt-budget",
                 description="tuckerize (initial rank_fraction 0.5), TDLRT(budget=N): all layers' ranks chosen "
                             "jointly each step, no tolerance; needs a budget")
def _build_tdlrt_budget(model, o):
    from ..optim import TDLRT

    if o.budget is None:
        raise ValueError("method 'tdlrt-budget' needs a budget (budget=N, or --budget on the command line)")
    model = _tuckerized(model, o, DEFAULT_TDLRT_RANK_FRACTION)
    return model, TDLRT(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                        budget=o.budget, budget_schedule=o.budget_schedule)


@register_method("tdlrt-fixed", match=match_rank_fraction,
                 description="tuckerize at fixed ranks, TDLRT with every mode non-adaptive (rmin = rmax)")
def _build_tdlrt_fixed(model, o):
    from ..optim import TDLRT

    model = _freeze_ranks(_tuckerized(model, o, DEFAULT_FIXED_RANK_FRACTION))
    return model, TDLRT(model.parameters(), lr=o.lr, tau=0.0, momentum=o.momentum, weight_decay=o.weight_decay)


# ------------------------------------------------------------------------------------ compare at a budget
def bisect_tau(
    run: Callable[[float], int],
    budget: int,
    tau0: float = 0.1,
    max_runs: int = 6,
    rel_tol: float = 0.03,
    step: float = 2.0,
) -> tuple[float, list[tuple[float, int]]]:
    """The tau whose run ends closest to ``budget`` from below: ``run(tau)`` trains and returns the final
    parameter count (assumed to fall as tau grows). Geometric bisection from ``tau0``: multiplied by
    ``step`` while the count is above ``budget``, divided by it while below and not within ``rel_tol``,
    then bisected geometrically once bracketed; at most ``max_runs`` runs. A ``step`` near 1 saves runs
    when ``tau0`` is already a good guess (e.g. the tau found on a smaller setting).
    Returns ``(tau, [(tau, count), ...] in the order tried)``; the chosen tau has the largest count
    ``<= budget`` (or the smallest count if none fits)."""
    if not (tau0 > 0 and math.isfinite(tau0)):
        raise ValueError(f"tau0 must be a finite number > 0 (the bisection is geometric), got {tau0!r}")
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
        raise ValueError(f"max_runs must be an int >= 1, got {max_runs!r}")
    if not (isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) and step > 1):
        raise ValueError(f"step must be a finite number > 1 (the bracketing factor), got {step!r}")
    trials: list[tuple[float, int]] = []
    lo = hi = None  # lo: largest tau seen above the budget, hi: smallest tau seen within it
    tau = float(tau0)
    for _ in range(max_runs):
        count = int(run(tau))
        trials.append((tau, count))
        if count <= budget:
            hi = tau if hi is None else min(hi, tau)
            if count >= (1 - rel_tol) * budget:
                break
        else:
            lo = tau if lo is None else max(lo, tau)
        tau = hi / step if lo is None else (lo * step if hi is None else math.sqrt(lo * hi))
    within = [t for t in trials if t[1] <= budget]
    best = max(within, key=lambda t: (t[1], -t[0])) if within else min(trials, key=lambda t: t[1])
    return best[0], trials


def _tucker_count(model: nn.Module) -> int:
    from ..parameter import is_tucker_parameter

    return sum(p.numel() for p in model.parameters() if is_tucker_parameter(p))


def compare_at_budget(
    base,
    methods: Sequence[str],
    budget: Any,
    seeds: int | Sequence[int] = 1,
    out: str | os.PathLike | None = None,
    *,
    progress: Optional[bool] = None,
    max_bisect_runs: int = 6,
    rel_tol: float = 0.03,
    bisect_step: float = 2.0,
) -> list[dict]:
    """Run every method of ``methods`` at the parameter budget ``budget`` (int count, or float fraction of
    the dense conv weights) on the setting of ``base`` (module docstring): ``tdlrt-budget`` with
    ``budget=N``; adaptive methods (``tdlrt``) at the tau from :func:`bisect_tau`; fixed-rank methods
    fitted by :func:`fit_to_budget`; ``dense`` as the uncompressed reference; any other method at its own
    settings. Returns one row per run (``budget``, ``conv_params``, ``tucker_params``, ``within`` added to
    the usual columns; bisection trials not chosen are rows with ``role="bisection"``). With ``out``:
    ``results.csv``, ``results.md``, ``bisection.csv``, ``ranks_per_layer.png`` and each run under
    ``out/runs/<tag>``."""
    from ..outputs import write_csv, write_json
    from .runner import _check_compare_args, _out_dir, build_dense, load_data, run_experiment

    base, methods, _, seed_list = _check_compare_args(base, methods, [0.1], seeds)
    check_budget_value(budget)
    out_dir = _out_dir(out)
    bundle = load_data(base)
    dense = build_dense(base, bundle)
    n = resolve_budget(dense, budget)
    logger.info("budget N = %d Tucker/conv parameters (%.2f%% of the %d dense conv weights)", n,
                100 * n / dense_conv_params(dense), dense_conv_params(dense))
    rows: list[dict] = []
    t_start = time.perf_counter()

    def one(method: str, seed: int, how: str, tag: str, role: str = "result", **over) -> dict:
        cfg = dataclasses.replace(base, **{"method": method, "seed": seed, "layer_ranks": None, "budget": None,
                                           "budget_schedule": None, **over})
        t0 = time.perf_counter()
        res = run_experiment(cfg, out_dir / "runs" / tag if out_dir is not None else None, progress=progress,
                             plot=get_method(method).adaptive or takes_budget(method), bundle=bundle)
        m = res.metrics
        row = {k: m[k] for k in ("test_acc", "test_loss", "train_acc", "conv_compression", "total_compression",
                                 "conv_params", "total_params", "time_per_epoch_s", "epochs")}
        tucker = _tucker_count(res.model)
        row.update(method=method, tau=cfg.tau if get_method(method).adaptive else None, seed=seed,
                   wall_s=time.perf_counter() - t0, match=how, ranks=m["ranks"], budget=n,
                   tucker_params=tucker, within=(m["conv_params"] <= n) if method != "dense" else None,
                   dense_conv_params=m["conv_dense_params"],
                   role=role, rank_fraction=cfg.rank_fraction)
        logger.info("[%6.0fs] %s: test acc %.4f, conv params %d (N = %d), %.1fs/epoch (%s)",
                    time.perf_counter() - t_start, tag, row["test_acc"], row["conv_params"], n,
                    row["time_per_epoch_s"], how)
        return row

    bisections: list[dict] = []
    for method in methods:
        spec = get_method(method)
        if method == "dense" or (not spec.adaptive and spec.match is None and not takes_budget(method)):
            how = "dense reference (not at the budget)" if method == "dense" else "own settings (no budget fit)"
            rows += [one(method, s, how, f"{method}_seed{s}") for s in seed_list]
        elif method == "tdlrt-budget" or (takes_budget(method) and not spec.adaptive):
            how = f"TDLRT(budget={n})" + (f", schedule over epochs {tuple(base.budget_schedule)}"
                                           if base.budget_schedule is not None else "")
            rows += [one(method, s, how, f"{method}_seed{s}", budget=n, budget_schedule=base.budget_schedule)
                     for s in seed_list]
        elif spec.adaptive:
            s0, found = seed_list[0], {}

            def run_tau(tau: float, method=method, s0=s0, found=found) -> int:
                found[tau] = one(method, s0, "bisection on tau", f"{method}_tau{tau:.4g}_seed{s0}",
                                 role="bisection", tau=tau, rank=None)
                return found[tau]["conv_params"]

            tau, trials = bisect_tau(run_tau, n, base.tau if base.tau > 0 else 0.1, max_bisect_runs, rel_tol,
                                      bisect_step)
            how = f"tau={tau:.4g} by bisection ({len(trials)} runs of seed {s0})"
            for t, c in trials:
                bisections.append(dict(method=method, tau=t, seed=s0, conv_params=c, budget=n, chosen=t == tau,
                                       test_acc=found[t]["test_acc"]))
                if t != tau:
                    rows.append(found[t])
            chosen = dict(found[tau], role="result", match=how)
            rows.append(chosen)
            rows += [one(method, s, how, f"{method}_tau{tau:.4g}_seed{s}", tau=tau, rank=None) for s in seed_list[1:]]
        else:
            overrides, how = fit_to_budget(dense, method, n)
            rows += [one(method, s, how, f"{method}_seed{s}", **overrides) for s in seed_list]
    if out_dir is not None:
        cols = ["method", "role", "tau", "seed", "test_acc", "test_loss", "train_acc", "conv_params", "tucker_params",
                "budget", "within", "dense_conv_params", "conv_compression", "total_compression", "total_params", "rank_fraction",
                "time_per_epoch_s", "epochs", "wall_s", "match", "ranks"]
        write_csv(out_dir / "results.csv", rows, cols)
        write_csv(out_dir / "bisection.csv", bisections,
                  ["method", "tau", "seed", "conv_params", "budget", "chosen", "test_acc"])
        table = budget_table(rows, n, dense_conv_params(dense), base)
        (out_dir / "results.md").write_text(table + "\n")
        write_json(out_dir / "budget.json", {"budget": n, "budget_arg": budget,
                                             "dense_conv_params": dense_conv_params(dense),
                                             "config": base.to_dict(), "bisection": bisections})
        plot_budget_ranks(rows, out_dir / "ranks_per_layer.png", n, dense)
    return rows


def _summary(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("role", "result") == "result":
            groups.setdefault(r["method"], []).append(r)
    out = []
    for method, rs in groups.items():
        accs = [r["test_acc"] for r in rs]
        params = [r["conv_params"] for r in rs]
        out.append(dict(method=method, n=len(rs), acc_mean=statistics.fmean(accs),
                        acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        params_mean=statistics.fmean(params), params_min=min(params), params_max=max(params),
                        within=[r["within"] for r in rs], how=rs[0]["match"],
                        time_per_epoch_s=statistics.fmean(r["time_per_epoch_s"] for r in rs)))
    return out


def budget_table(rows: list[dict], budget: int, dense_params: int, cfg=None) -> str:
    """Markdown table of a budget comparison: accuracy mean ± std over seeds, final conv parameters
    (mean, min-max), whether every seed is ``<= N``, and how each method met the budget."""
    lines = []
    if cfg is not None:
        lines += [f"{cfg.model} on {cfg.data}" + (f" (subset {cfg.subset})" if cfg.subset else "")
                  + f", {cfg.epochs} epoch(s), batch {cfg.batch_size}, lr {cfg.lr}, momentum {cfg.momentum}; "
                  f"budget N = {budget} ({100 * budget / dense_params:.2f}% of {dense_params} dense conv weights)", ""]
    lines.append("| method | seeds | test accuracy (%) | final conv params (mean; min-max) | % of dense | <= N | "
                 "how the budget is met | time/epoch (s) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for s in _summary(rows):
        within = "-" if s["within"][0] is None else ("yes" if all(s["within"]) else
                                                     f"no ({sum(not w for w in s['within'])}/{s['n']} over)")
        lines.append(
            f"| {s['method']} | {s['n']} | {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f} | "
            f"{s['params_mean']:.0f}; {s['params_min']}-{s['params_max']} | {100 * s['params_mean'] / dense_params:.2f} | "
            f"{within} | {s['how']} | {s['time_per_epoch_s']:.1f} |")
    return "\n".join(lines)


def plot_budget_ranks(rows: list[dict], path: str | os.PathLike, budget: int, dense_model: nn.Module) -> Path:
    """Final channel ranks per conv layer of each method (first seed's result), output- and input-channel
    modes side by side, to the PNG ``path``; layers without a factorization are left out."""
    from matplotlib.ticker import FuncFormatter

    from ..outputs import new_figure, save_figure

    firsts: dict[str, dict] = {}
    for r in rows:
        tucker = r.get("ranks") and all(len(v) >= 2 for v in r["ranks"].values())  # Tucker ranks only
        if r.get("role", "result") == "result" and r["method"] not in firsts and tucker:
            firsts[r["method"]] = r
    layers = list(_dense_convs(dense_model))
    fig, axes = new_figure(1, 2, width=5.2, height=4.0)
    width = 0.8 / max(1, len(firsts))
    for mode, ax in enumerate(axes[0]):
        for k, (method, r) in enumerate(firsts.items()):
            ys = [(r["ranks"].get(name) or [0, 0])[min(mode, len(r["ranks"].get(name) or [0]) - 1)] for name in layers]
            xs = [i + (k - (len(firsts) - 1) / 2) * width for i in range(len(layers))]
            ax.bar(xs, ys, width=width, label=f"{method} ({r['conv_params']})")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([f"{name}\n{tuple(dense_model.get_submodule(name).weight.shape[:2])}" for name in layers],
                           fontsize=6)
        ax.set_ylabel(("output", "input")[mode] + "-channel rank")
        ax.set_yscale("log", base=2)
        ax.set_ylim(bottom=0.7)  # rank-1 bars stay visible
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 2, 4 rather than 2^k
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(("mode 1 (out channels)", "mode 2 (in channels)")[mode], fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, max(1, len(labels))), fontsize=7,
               title=f"method (final conv params), N = {budget}", title_fontsize=7)
    fig.suptitle("final Tucker ranks per conv layer at one parameter budget (first seed)", fontsize=10)
    return save_figure(fig, path, dpi=120)
