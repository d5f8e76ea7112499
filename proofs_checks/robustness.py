"""Figure 2 of the paper: robustness of TDLRT to ill-conditioned, over-estimated-rank initializations.

Setup (docs/theorems.md §5, reproduction recipe; the paper's exact setup is unknown):

* LeNet5 on MNIST, 28x28 (``load_dataset("mnist", subset=4000)``: 4000 training / 1000 test images).
  Its two conv layers are factorized at a deliberately LARGE rank (FC layers and biases stay dense):

  ========  ==============  ===================  ========
  layer     dense shape     Tucker ranks         CP rank
  ========  ==============  ===================  ========
  conv1     (20, 1, 5, 5)   (16, 1, 5, 5)        16
  conv2     (50, 20, 5, 5)  (40, 16, 5, 5)       40
  ========  ==============  ===================  ========

  (80% of each channel dimension; spatial modes at full rank 5; conv1's input mode has size 1.)
* Ill-conditioned initialization with decay ``q`` in {0.5, 0.1, 0.01}:
  - Tucker (both TDLRT variants and vanilla: *identical* starting weights for a given seed and q):
    ``TuckerConv2d.reinit_decaying(q)``: every unfolding of the core has singular values ~ ``q**k``,
    Haar-random orthonormal factors, ``||W||_F`` = PyTorch's default-init norm.
  - CP: ``W = sum_k lam_k a_k o b_k o h_k o v_k`` with unit-norm Gaussian columns and
    ``lam_k = c q**k`` (``c`` sets ``||W||_F`` to the same default-init norm); ``lam_k**(1/4)`` goes into
    each of the four factors (balanced terms), so term ``k`` gets factor gradients ``~ lam_k**(3/4)``.
  FC layers, biases and the data order depend on the seed only: all methods and q of one seed share them.
* Methods, all with the SAME SGD rule: lr 0.02 with a cosine decay to 0 over the run, momentum 0.9,
  batch 64, no weight decay, 3 epochs, seeds 0, 1, 2:
  - ``tdlrt`` (checked): :class:`tucker_manifold.optim.TDLRT`, SGD base rule, ``tau = 0``,
    ``rank_max`` = the initial large rank. Each step augments the channel bases with the gradient
    (``r -> min(2r, n)``), steps the core, and truncates back to at most ``rank_max``; with ``tau = 0``
    the library still drops singular values at float32 rounding level (``max(n) eps ||C^||``): for
    q = 0.01 the first step leaves channel ranks 14 (conv1) and (40, 12) (conv2), and augmentation
    refills them: every rank is back at its cap after 7 steps (seed 0).
  - ``tdlrt-adaptive`` (reported, not checked): the same with ``tau = 0.01`` (relative). The first
    truncation cuts the decaying core to a q-DEPENDENT rank (``~ log(tau) / log(q)``: 7, 2-3, 1-2 for
    q = 0.5, 0.1, 0.01), and a discarded direction only comes back when one step gives it a singular
    value above ``tau ||C^||_F``, which does not happen at this lr: the ranks stay there.
  - ``vanilla``: the same Tucker layers, ``torch.optim.SGD`` on core and factors (geometry ignored).
  - ``cp``: :class:`tucker_manifold.nn.CPConv2d`, ``torch.optim.SGD``.
  - ``dense`` (reference): plain ``nn.Conv2d`` started from the reconstructed Tucker kernels (the same
    function as the Tucker runs at step 0), ``torch.optim.SGD``. It separates the effect of the
    initial function itself (a q = 0.01 kernel is nearly rank one) from the effect of the
    factorization and its optimizer.
* Curves, two points per epoch: training loss (mean of the mini-batch losses over the preceding half
  epoch, taken before each step; at step 0, the loss on ``eval_train`` training images) and test
  accuracy (all test images ``load_dataset`` returns). With the cosine schedule the last half epoch
  runs at < 7% of the peak lr, so the final training loss is that of (nearly) the final weights,
  averaged over about 2000 training images.

The check. ``spread(method) = (max - min) / mean`` of the final training losses over all ``q`` and
seeds. TDLRT (``tdlrt``) passes when

  (a) every TDLRT run ends with a finite loss,
  (b) ``spread(tdlrt) <= spread_max`` (0.5 in the full setting): its result depends little on the
      conditioning of the initialization and on the seed,
  (c) TDLRT's worst final loss (over q and seeds) is below the worst final loss over all baseline runs
      (vanilla Tucker, CP); whether it is below each baseline's worst is reported in the details, and
  (d) (when ``dense`` runs) TDLRT follows dense training from the same initial function: for every q
      and seed, ``|final(tdlrt) / final(dense) - 1| <= GAP_MAX`` (0.15). This is the paper's claim that
      the integrator approximates the unfactorized dynamics whatever the singular values.

Reported, not required: every method's ``spread``, ``q_spread`` (largest per-seed spread over q alone),
best / worst final loss and relative gap to dense.

``--quick`` (the test suite; about 20 s): sklearn digits upsampled to 16x16 (LeNet5 at ``image_size=16``;
28x28 did not fit the 60 s budget on 2 shared cores), q in {0.5, 0.01}, seeds 0 and 1, 5 epochs, methods
tdlrt / vanilla / cp / dense. That is only ~110 steps, before the runs have settled: the final losses
still depend on how fast each seed leaves the initial plateau (measured TDLRT spreads 0.1-1.2 over seed
pairs in such settings), so the quick ``spread_max`` is 1.5, which only catches breakage. (c) and (d)
are the same as in the full run.

Run ``python -m proofs_checks.robustness [--quick] [--out DIR] [--seeds N] [--epochs E] [--subset N]``
(``--subset`` selects 28x28 MNIST with that many training images, also with ``--quick``); writes
``robustness.json`` (settings, per-run finals, summary, spreads, verdicts), ``robustness.csv`` (every
curve point), ``robustness_summary.csv`` and ``robustness.png``. Exit 0 iff the check passes.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tucker_manifold.data import load_dataset
from tucker_manifold.models import LeNet5
from tucker_manifold.nn import CPConv2d, TuckerConv2d
from tucker_manifold.optim import TDLRT

from .common import Verdict, base_parser, finish, new_figure, output_dir, print_table, save_figure, write_csv

NAME = "robustness"
METHODS = ("tdlrt", "tdlrt-adaptive", "vanilla", "cp", "dense")
BASELINES = ("vanilla", "cp")
#: truncation tolerance of each TDLRT variant
TAUS = {"tdlrt": 0.0, "tdlrt-adaptive": 0.01}
LABELS = {"tdlrt": "TDLRT, tau=0 (rank cap = init rank)", "tdlrt-adaptive": "TDLRT, tau=0.01 (reported only)",
          "vanilla": "vanilla Tucker (SGD on C, U)", "cp": "CP (SGD on factors)",
          "dense": "dense from the same init (reference; no band)"}
STYLE = {"tdlrt": (2.4, "-"), "tdlrt-adaptive": (1.4, "--"), "vanilla": (1.4, "-"), "cp": (1.4, "-"),
         "dense": (1.3, ":")}
COLORS = {"tdlrt": "tab:blue", "tdlrt-adaptive": "tab:purple", "vanilla": "tab:orange", "cp": "tab:green",
          "dense": "black"}
QS = (0.5, 0.1, 0.01)
#: index of the conv in LeNet5.features -> (Tucker ranks, CP rank)
LAYER_RANKS = {0: ((16, 1, 5, 5), 16), 3: ((40, 16, 5, 5), 40)}
GAP_MAX = 0.15
BATCH = 64
LR = 0.02
MOMENTUM = 0.9

#: settings of the two modes (--seeds / --epochs / --subset override). ``spread_max``: threshold of
#: check (b); the quick one only catches breakage (see the module docstring).
FULL = dict(dataset="mnist", size=28, subset=4000, epochs=3, seeds=3, evals_per_epoch=2, eval_train=1000,
            qs=QS, methods=METHODS, spread_max=0.5)
QUICK = dict(dataset="digits", size=16, subset=None, epochs=5, seeds=2, evals_per_epoch=1, eval_train=500,
             qs=(0.5, 0.01), methods=("tdlrt", "vanilla", "cp", "dense"), spread_max=1.5)


# ----------------------------------------------------------------------------- models
def cp_decaying_(layer: CPConv2d, q: float, generator: torch.Generator) -> None:
    """Re-initialise ``layer``'s CP factors: unit-norm Gaussian columns, term ``k`` scaled by
    ``lam_k = c q**k`` (``lam_k**(1/4)`` per factor), ``c`` such that ``||W||_F`` equals the default-init
    norm ``sqrt(prod(n) / (3 fan_in))``. The bias is left as it is."""
    r = layer.rank
    cols = []
    for f in layer.factors:
        g = torch.randn(f.shape, generator=generator, dtype=torch.float64)
        cols.append(g / g.norm(dim=0, keepdim=True))
    lam = torch.tensor([q**k for k in range(r)], dtype=torch.float64)
    w = torch.einsum("k,ok,ck,hk,wk->ochw", lam, *cols)
    n = math.prod(w.shape)
    fan_in = n // w.shape[0]
    lam = lam * (math.sqrt(n / (3.0 * fan_in)) / w.norm())
    with torch.no_grad():
        for p, c in zip(layer.factors, cols):
            p.copy_((c * lam.pow(0.25)).to(p.dtype))


def build_model(method: str, q: float, seed: int, in_channels: int, image_size: int) -> nn.Module:
    """LeNet5 whose two convs are replaced by large-rank Tucker (``tdlrt*`` / ``vanilla``: the same
    weights) or CP layers with a ``q``-decaying initialization; ``dense``: plain ``nn.Conv2d`` holding the
    reconstructed Tucker kernels (same function at step 0). Dense parts depend on ``seed`` only.
    The global torch RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LeNet5's own init (FC layers, biases) from the global RNG
        model = LeNet5(in_channels=in_channels, num_classes=10, image_size=image_size)
        gen = torch.Generator().manual_seed(10_000 + seed)
        for idx, (tranks, cprank) in LAYER_RANKS.items():
            conv: nn.Conv2d = model.features[idx]
            if method == "cp":
                layer = CPConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, cprank)
                cp_decaying_(layer, q, gen)
            else:
                layer = TuckerConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, tranks,
                                     rank_max=tranks)
                layer.reinit_decaying(q, gen)
            with torch.no_grad():
                layer.bias.copy_(conv.bias)
                if method == "dense":
                    conv.weight.copy_(layer.weight)
                    layer = conv
            model.features[idx] = layer
    return model


def make_optimizer(method: str, model: nn.Module, lr: float, momentum: float) -> torch.optim.Optimizer:
    """TDLRT (SGD base rule, the method's ``tau``) or ``torch.optim.SGD``, with the same lr and momentum."""
    if method in TAUS:
        return TDLRT(model.parameters(), lr=lr, tau=TAUS[method], momentum=momentum)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


def conv_ranks(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(model.features[i].ranks) for i in LAYER_RANKS if isinstance(model.features[i], TuckerConv2d)]


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``(x, y)``."""
    total, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i:i + chunk])
        total += float(F.cross_entropy(out, y[i:i + chunk], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + chunk]).sum())
    return total / len(y), correct / len(y)


def train_run(method: str, q: float, seed: int, data, cfg: dict) -> dict:
    """Train one (method, q, seed) with SGD-momentum (or TDLRT) and a cosine learning-rate decay to 0.

    Returns the curve: ``step``, ``epoch``, ``train_loss`` (mean mini-batch loss over the preceding
    evaluation interval; at step 0 the loss on ``cfg["eval_train"]`` training images), ``test_acc`` and,
    for Tucker layers, ``ranks``; plus ``train_seconds`` and ``skipped_steps``.
    """
    model = build_model(method, q, seed, data.in_channels, data.image_size)
    opt = make_optimizer(method, model, cfg["lr"], cfg["momentum"])
    n = len(data.y_train)
    steps_per_epoch = n // cfg["batch"]  # drop the last partial batch: every step has the same size
    eval_every = max(1, steps_per_epoch // cfg["evals_per_epoch"])
    order_gen = torch.Generator().manual_seed(20_000 + seed)  # same data order for every method and q
    curve: dict[str, list] = {"step": [], "epoch": [], "train_loss": [], "test_acc": [], "ranks": []}
    window: list[float] = []

    def record(step: int, train_loss: float) -> None:
        _, acc = _evaluate(model, data.x_test, data.y_test)
        curve["step"].append(step)
        curve["epoch"].append(step / steps_per_epoch)
        curve["train_loss"].append(train_loss if math.isfinite(train_loss) else float("inf"))
        curve["test_acc"].append(acc)
        curve["ranks"].append(conv_ranks(model))

    k = cfg["eval_train"]
    record(0, _evaluate(model, data.x_train[:k], data.y_train[:k])[0])
    total = steps_per_epoch * cfg["epochs"]
    step = 0
    t0 = time.perf_counter()
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(n, generator=order_gen)
        for b in range(steps_per_epoch):
            idx = perm[b * cfg["batch"]:(b + 1) * cfg["batch"]]
            xb, yb = data.x_train[idx], data.y_train[idx]
            # Cosine decay to 0, the same for every method: the last interval runs at < 7% of the peak
            # lr, so the final training loss is that of (nearly) the final weights, not one noisy iterate.
            for group in opt.param_groups:
                group["lr"] = cfg["lr"] * 0.5 * (1.0 + math.cos(math.pi * step / total))

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            loss = opt.step(closure)  # the loss before the step (TDLRT: its first pass)
            window.append(float(loss.detach()))
            step += 1
            if step % eval_every == 0 or b == steps_per_epoch - 1:
                if curve["step"][-1] != step:
                    record(step, statistics.fmean(window))
                    window = []
    curve["train_seconds"] = time.perf_counter() - t0
    curve["skipped_steps"] = getattr(opt, "skipped_steps", 0)
    return curve


# ----------------------------------------------------------------------------- summary
def spread(values: list[float]) -> float:
    """``(max - min) / mean``; ``inf`` if a value is not finite (a diverged run) or the list is empty."""
    if not values or not all(math.isfinite(v) for v in values):
        return float("inf")
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / mean if mean > 0 else float("inf")


def _mean_std(vals: list[float]) -> tuple[float, float]:
    if not all(math.isfinite(v) for v in vals):
        return float("inf"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def q_spread(runs: dict, method: str, qs, seeds) -> float:
    """Largest over seeds of the per-seed ``spread`` over ``q``: the effect of ``q`` alone (a seed fixes
    the FC layers, the biases and the data order for every q)."""
    return max(spread([runs[(method, q, s)]["train_loss"][-1] for q in qs]) for s in seeds)


def summarize(runs: dict, methods, qs, seeds) -> tuple[list[dict], dict]:
    """Per (method, q) rows (final loss / test accuracy mean and std over seeds) and per method
    ``spread`` (over all q and seeds), ``q_spread``, worst and best final loss."""
    rows, per_method = [], {}
    for method in methods:
        finals = []
        for q in qs:
            fl = [runs[(method, q, s)]["train_loss"][-1] for s in seeds]
            fa = [runs[(method, q, s)]["test_acc"][-1] for s in seeds]
            finals += fl
            lm, ls = _mean_std(fl)
            am, as_ = _mean_std(fa)
            row = dict(method=method, q=q, final_loss=f"{lm:.4f}±{ls:.4f}", final_test_acc=f"{am:.4f}±{as_:.4f}",
                       loss_mean=lm, loss_std=ls, loss_min=min(fl), loss_max=max(fl), acc_mean=am, acc_std=as_)
            if method in TAUS:
                fr = {tuple(tuple(r) for r in runs[(method, q, s)]["ranks"][-1]) for s in seeds}
                row["final_ranks"] = " / ".join(",".join("x".join(map(str, r)) for r in rr) for rr in sorted(fr))
            rows.append(row)
        per_method[method] = dict(spread=spread(finals), q_spread=q_spread(runs, method, qs, seeds),
                                  worst_final_loss=max(finals), best_final_loss=min(finals), n_runs=len(finals))
        if "dense" in methods:
            # how far from dense training started at the same function (same q, same seed)
            gaps = [abs(runs[(method, q, s)]["train_loss"][-1] / runs[("dense", q, s)]["train_loss"][-1] - 1.0)
                    for q in qs for s in seeds]
            per_method[method]["rel_gap_to_dense"] = max(gaps) if all(map(math.isfinite, gaps)) else float("inf")
    for r in rows:
        r["spread"] = per_method[r["method"]]["spread"]
    return rows, per_method


def plot(runs: dict, methods, qs, seeds, path, title: str) -> None:
    """2 x len(qs) panels: training loss (log) and test accuracy vs epoch; mean line, min-max band."""
    fig, axes = new_figure(2, len(qs), width=3.4, height=2.6)
    for j, q in enumerate(qs):
        for method in methods:
            curves = [runs[(method, q, s)] for s in seeds]
            x = np.asarray(curves[0]["epoch"])
            for row, key in ((0, "train_loss"), (1, "test_acc")):
                ys = np.asarray([c[key] for c in curves], dtype=float)
                ys = np.where(np.isfinite(ys), ys, np.nan)
                ax = axes[row, j]
                # dense is drawn thin and dotted on top: TDLRT's line lies under it
                ax.plot(x, np.nanmean(ys, 0), color=COLORS[method], lw=STYLE[method][0], ls=STYLE[method][1],
                        zorder=3 if method == "dense" else 2, label=LABELS[method] if j == 0 and row == 0 else None)
                if method != "dense":
                    ax.fill_between(x, np.nanmin(ys, 0), np.nanmax(ys, 0), color=COLORS[method], alpha=0.18, lw=0)
        axes[0, j].set_title(f"q = {q}  (init singular values ~ q^k)", fontsize=9)
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("epoch", fontsize=8)
        axes[1, j].set_ylim(0.0, 1.0)
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("training loss", fontsize=8)
    axes[1, 0].set_ylabel("test accuracy", fontsize=8)
    fig.legend(loc="outside lower center", ncol=2, fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------- main
def _settings(args, parser) -> dict:
    mode = dict(QUICK if args.quick else FULL)
    if args.subset is not None:
        if args.subset < BATCH:
            parser.error(f"--subset must be >= {BATCH}")
        mode.update(dataset="mnist", size=28, subset=args.subset)
    for key in ("seeds", "epochs"):
        v = getattr(args, key)
        if v is not None:
            if v < 1:
                parser.error(f"--{key} must be >= 1")
            mode[key] = v
    return dict(mode, qs=list(mode["qs"]), methods=list(mode["methods"]), batch=BATCH, lr=LR, momentum=MOMENTUM,
                taus={m: t for m, t in TAUS.items() if m in mode["methods"]},
                tucker_ranks={f"features.{i}": t for i, (t, _) in LAYER_RANKS.items()},
                cp_ranks={f"features.{i}": c for i, (_, c) in LAYER_RANKS.items()}, mode="quick" if args.quick else "full")


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("Figure 2: robustness of TDLRT vs vanilla Tucker and CP to q-decaying, large-rank inits")
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds (full {FULL['seeds']}, "
                        f"quick {QUICK['seeds']})")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs (full {FULL['epochs']}, "
                        f"quick {QUICK['epochs']})")
    parser.add_argument("--subset", type=int, default=None,
                        help=f"MNIST training images (full {FULL['subset']}); with --quick it switches to 28x28 MNIST")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads during the run (default 1: on the shared 2-core machine 2 threads "
                             "made TDLRT steps up to 8x slower)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    started = time.perf_counter()
    cfg: dict[str, Any] = _settings(args, parser)
    out = output_dir(args.out)
    seeds, qs, methods = list(range(cfg["seeds"])), cfg["qs"], cfg["methods"]
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        data = load_dataset(cfg["dataset"], subset=cfg["subset"], size=cfg["size"], seed=0)
        cfg.update(n_train=len(data.y_train), n_test=len(data.y_test),
                   eval_train=min(cfg["eval_train"], len(data.y_train)))
        print(f"{NAME} ({cfg['mode']}): {data.name} {cfg['size']}x{cfg['size']}, {cfg['n_train']} train / "
              f"{cfg['n_test']} test images, {cfg['epochs']} epoch(s), {len(seeds)} seeds, q in {qs}; "
              f"SGD lr={LR} momentum={MOMENTUM} batch={BATCH}; TDLRT tau {cfg['taus']}", flush=True)
        runs = {}
        for q in qs:
            for seed in seeds:
                for method in methods:
                    c = train_run(method, q, seed, data, cfg)
                    runs[(method, q, seed)] = c
                    print(f"  {method:14s} q={q:<5} seed={seed}: loss {c['train_loss'][0]:.3f} -> "
                          f"{c['train_loss'][-1]:.4f}, test acc {c['test_acc'][-1]:.4f}"
                          + (f", ranks {c['ranks'][-1]}" if method in TAUS else "")
                          + f" ({c['train_seconds']:.1f}s)", flush=True)
    finally:
        torch.set_num_threads(old_threads)

    rows, per_method = summarize(runs, methods, qs, seeds)
    print_table(rows, ["method", "q", "final_loss", "final_test_acc", "spread", "final_ranks"],
                title=f"\n{NAME}: final training loss / test accuracy (mean±std over {len(seeds)} seeds); "
                      "spread = (max-min)/mean of a method's final losses over all q and seeds", floatfmt=".3f")
    print_table([dict(method=m, spread=pm["spread"], q_spread=pm["q_spread"], best=pm["best_final_loss"],
                      worst=pm["worst_final_loss"], rel_gap_to_dense=pm.get("rel_gap_to_dense", "-"))
                 for m, pm in per_method.items()],
                title="per method. q_spread: largest per-seed spread over q alone; rel_gap_to_dense: largest "
                      "|final / final(dense, same q and seed) - 1|", floatfmt=".3f")

    curve_rows = []
    for (method, q, seed), c in runs.items():
        for i in range(len(c["step"])):
            curve_rows.append(dict(method=method, q=q, seed=seed, step=c["step"][i], epoch=c["epoch"][i],
                                   train_loss=c["train_loss"][i], test_acc=c["test_acc"][i],
                                   ranks=";".join("x".join(map(str, r)) for r in c["ranks"][i])))
    write_csv(out / f"{NAME}.csv", curve_rows)
    write_csv(out / f"{NAME}_summary.csv", rows, ["method", "q", "loss_mean", "loss_std", "loss_min", "loss_max",
                                                   "acc_mean", "acc_std", "spread", "final_ranks"])
    plot(runs, methods, qs, seeds, out / f"{NAME}.png",
         f"LeNet5, {data.name} {cfg['size']}x{cfg['size']} ({cfg['n_train']} train images), convs at large "
         f"Tucker/CP rank, init decay q^k; SGD lr={LR}, momentum={MOMENTUM}; mean, min-max over {len(seeds)} seeds")

    td = per_method["tdlrt"]
    smax = cfg["spread_max"]
    finite = all(math.isfinite(runs[("tdlrt", q, s)]["train_loss"][-1]) for q in qs for s in seeds)
    baseline_worst = {m: per_method[m]["worst_final_loss"] for m in BASELINES if m in per_method}
    worst_of_baselines = max(baseline_worst.values())
    verdicts = [
        Verdict("tdlrt_finite", finite, None,
                {"skipped_steps": sum(runs[("tdlrt", q, s)]["skipped_steps"] for q in qs for s in seeds)}),
        Verdict("tdlrt_spread", td["spread"] <= smax, td["spread"] - smax,
                {"spread": td["spread"], "threshold": smax, "slack": "spread - threshold (<= 0 passes)"}),
        Verdict("tdlrt_worst_below_baselines", td["worst_final_loss"] < worst_of_baselines,
                td["worst_final_loss"] - worst_of_baselines,
                {"tdlrt_worst": td["worst_final_loss"], "baseline_worst": baseline_worst,
                 "below_each_baseline_worst": {m: td["worst_final_loss"] < w for m, w in baseline_worst.items()},
                 "slack": "TDLRT worst - worst baseline run (< 0 passes)"}),
    ]
    if "dense" in per_method:
        gap = td["rel_gap_to_dense"]
        verdicts.append(Verdict("tdlrt_tracks_dense", gap <= GAP_MAX, gap - GAP_MAX,
                                {"max_rel_gap": gap, "threshold": GAP_MAX,
                                 "slack": "max over q and seeds of |final(tdlrt)/final(dense) - 1| - threshold"}))
    cfg["gap_max"] = GAP_MAX
    extra = {
        "settings": cfg,
        "spreads": {m: per_method[m]["spread"] for m in methods},
        "q_spreads": {m: per_method[m]["q_spread"] for m in methods},
        "per_method": per_method,
        "summary": rows,
        "finals": [dict(method=m, q=q, seed=s, final_train_loss=c["train_loss"][-1], final_test_acc=c["test_acc"][-1],
                        final_ranks=c["ranks"][-1], train_seconds=c["train_seconds"])
                   for (m, q, s), c in runs.items()],
    }
    return finish(NAME, verdicts, out, extra=extra, started=started)


if __name__ == "__main__":
    raise SystemExit(main())
