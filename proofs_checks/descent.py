"""Theorem 3.1 (local descent), checked step by step on full-batch TDLRT with a plain SGD base rule.

Checked form (the reconstructed bound of docs/theorems.md §2; the paper's constants are not
recoverable): for a step size ``h <= 1/L``

    L(Y_{t+1}) - L(Y_t) <= -h (1 - L h / 2) ||P(Y_t) grad L(Y_t)||^2 + B eta_t          (P form)
    L(Y_{t+1}) - L(Y_t) <= -h (1 - L h / 2) ||grad_{C^} L(Y_t)||^2   + B eta_t          (core form, tighter)
    ||grad_{C^} L(Y_t)|| >= ||P(Y_t) grad L(Y_t)||                                      (paper §3.2)

plus, with ``tau = 0``, monotone decrease. ``eta_t = ||Y_{t+1} - Y^_{t+1}||_F`` and ``||grad_{C^} L||`` are
the optimizer's ``last_step_info``; ``P(Y_t) grad L(Y_t)`` is computed independently *before* the step from
the dense gradient (``proj_dense`` + ``tangent_to_dense``). ``L`` is the smoothness constant of the loss *as
defined* (a mean over samples, so ``L`` is the top eigenvalue of the Hessian of that mean), ``B`` the largest
``||grad L||`` over the run (at the iterates and at the pre-truncation points ``Y^_{t+1}``). Every inequality
gets an absolute slack of ``1e-12`` for rounding.

The same loop also recomputes ``Y^_{t+1} = Y_t - h grad L(Y_t) x_i U^_i U^_i^T`` densely with its own
augmented bases (an SVD of ``[U_i | G_i]``) and reports how far the optimizer's ``eta_t`` and core-gradient
norm are from those independent values (a cross-check of the library, not part of the theorem).

Problems: (a) ``0.5||W - A||^2`` (``L = 1``), (b) a Tucker tensor regression with a known teacher
(``L = lambda_max(X^T X / N)``, exact), (c) a Tucker-factorized conv layer on a fixed batch of sklearn's
digits (``L``: Hessian power iteration along a pilot run, times 1.1).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import geoopt
import numpy as np
import torch
import torch.nn.functional as F

from tucker_manifold import FixedRankTucker
from tucker_manifold.optim import TDLRT
from tucker_manifold.tucker import multi_mode_dot

from .common import (
    DTYPE,
    TensorRegression,
    Verdict,
    augmented_projectors,
    base_parser,
    finish,
    new_figure,
    output_dir,
    print_table,
    riemannian_grad,
    save_figure,
    single_thread,
    write_csv,
)

ATOL = 1e-12
NAME = "descent"


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
                   f"1/(2N) sum (<X_k,W> - y_k)^2, N={n_samples}, teacher rank (2,2,2); "
                   f"L = lambda_max(X^T X/N) = {reg.L:.4f} (exact)")


class DigitsConv:
    """Fixed batch of sklearn digits -> frozen random 3x3 stem (1 -> 4 channels, relu) -> Tucker conv
    (4 -> 16, 3x3) -> relu -> spatial mean -> frozen linear head (16 -> 10) -> mean cross-entropy.

    Only the Tucker kernel is trained: the loss is a function of one layer's weight with the other
    layers fixed, the setting of the theorem.
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
        z = F.relu(F.conv2d(self.feats, kernel, padding=1)).mean(dim=(2, 3))
        return F.cross_entropy(z @ self.head.T, self.y)


def cnn_problem(seed: int = 0, ranks=(4, 2, 2, 2), n_images: int = 256, pilot_steps: int = 60,
                power_iters: int = 30) -> Problem:
    """L from Hessian power iteration at points along a pilot TDLRT run (tau = 0, h = 1/L0), max x 1.1."""
    net = DigitsConv(n_images, seed)
    g = torch.Generator().manual_seed(seed + 1)
    m = FixedRankTucker((16, 4, 3, 3), ranks)
    x0 = m.random(dtype=DTYPE, generator=g)
    core, factors = m.unpack(x0)
    x0 = m.pack(4.0 * core / core.norm(), factors)
    estimates = [hessian_power_norm(net.loss, m.to_dense(x0), power_iters)]
    p = geoopt.ManifoldParameter(x0.clone(), manifold=m)
    opt = TDLRT([p], lr=1.0 / estimates[0], tau=0.0)
    probe_every = max(1, pilot_steps // 5)
    for t in range(pilot_steps):
        opt.step(_closure(opt, p, net.loss))
        if (t + 1) % probe_every == 0:
            estimates.append(hessian_power_norm(net.loss, p.manifold.to_dense(p.detach()), power_iters))
    L = 1.1 * max(estimates)
    return Problem("cnn_digits", net.loss, L, x0, m,
                   f"Tucker conv (16,4,3,3) on {n_images} digits, mean CE; L = 1.1 x max Hessian-norm estimate "
                   f"over {len(estimates)} points of a pilot run = {L:.4f}",
                   hessian_norm=lambda w: hessian_power_norm(net.loss, w, power_iters))


def _closure(opt, p, loss):
    def closure():
        opt.zero_grad()
        val = loss(p.manifold.to_dense(p))
        val.backward()
        return val

    return closure


# ----------------------------------------------------------------------------- one run
def run_descent(prob: Problem, tau: float, h: float, steps: int, hess_probes: int = 0) -> dict:
    """TDLRT (SGD base rule, momentum 0) from ``prob.x0``; per-step records for the descent bound."""
    p = geoopt.ManifoldParameter(prob.x0.clone(), manifold=prob.manifold)
    opt = TDLRT([p], lr=h, tau=tau, method="sgd", momentum=0.0)
    rec = {k: [] for k in ("loss", "loss_next", "pg_norm", "core_grad_norm", "core_grad_indep", "eta", "eta_indep",
                           "grad_norm", "grad_norm_hat", "ranks")}
    hess = []
    probe_at = set(np.linspace(0, steps - 1, hess_probes).round().astype(int).tolist()) if hess_probes else set()
    for t in range(steps):
        m = p.manifold
        x = p.detach().clone()
        core, factors = m.unpack(x)
        w = m.to_dense(x)
        loss_t, g = dense_grad(prob.loss, w)
        _, pgn = riemannian_grad(m, x, g)
        projs = augmented_projectors(core, factors, g)
        gc = multi_mode_dot(g, projs)  # = grad_{C^} L x_i U^_i (same norm)
        y_hat = w - h * gc
        if t in probe_at and prob.hessian_norm is not None:
            hess.append(prob.hessian_norm(w))
        opt.step(_closure(opt, p, prob.loss))
        info = opt.last_step_info[0]
        w_next = p.manifold.to_dense(p.detach())
        loss_next = float(prob.loss(w_next))
        _, g_hat = dense_grad(prob.loss, y_hat)
        rec["loss"].append(loss_t)
        rec["loss_next"].append(loss_next)
        rec["pg_norm"].append(pgn)
        rec["core_grad_norm"].append(info["core_grad_norm"])
        rec["core_grad_indep"].append(float(gc.norm()))
        rec["eta"].append(info["truncation_error"])
        rec["eta_indep"].append(float((w_next - y_hat).norm()))
        rec["grad_norm"].append(float(g.norm()))
        rec["grad_norm_hat"].append(float(g_hat.norm()))
        rec["ranks"].append(tuple(info["ranks"]))
    out = {k: (np.asarray(v) if k != "ranks" else v) for k, v in rec.items()}
    out["hessian_probes"] = hess
    return out


def evaluate(rec: dict, L: float, h: float, tau: float) -> dict:
    """Slacks (lhs - rhs, <= 0 passes) of every checked inequality, per step and worst."""
    B = float(max(rec["grad_norm"].max(), rec["grad_norm_hat"].max()))
    c = h * (1.0 - L * h / 2.0)
    dl = rec["loss_next"] - rec["loss"]
    slack_p = dl - (-c * rec["pg_norm"] ** 2 + B * rec["eta"]) - ATOL
    slack_c = dl - (-c * rec["core_grad_norm"] ** 2 + B * rec["eta"]) - ATOL
    slack_cp = rec["pg_norm"] - rec["core_grad_norm"] - 1e-10 * (1.0 + rec["core_grad_norm"])
    slack_mono = dl - ATOL if tau == 0 else np.full_like(dl, -np.inf)
    guaranteed = c * rec["pg_norm"] ** 2 - B * rec["eta"]
    pos = guaranteed > 1e-9
    # actual / guaranteed decrease where the bound guarantees one (>= 1 iff the bound holds; 1 = tight)
    min_ratio = float(np.min(-dl[pos] / guaranteed[pos])) if pos.any() else float("nan")
    eta_dev = np.abs(rec["eta"] - rec["eta_indep"])
    cg_dev = np.abs(rec["core_grad_norm"] - rec["core_grad_indep"])
    scale = 1.0 + np.abs(np.asarray(rec["loss"])).max() ** 0.5
    return dict(
        B=B, c=c, slack_p=slack_p, slack_c=slack_c, slack_cp=slack_cp, slack_mono=slack_mono,
        worst_p=float(slack_p.max()), worst_c=float(slack_c.max()), worst_cp=float(slack_cp.max()),
        worst_mono=float(slack_mono.max()), min_ratio=min_ratio,
        eta_dev=float(eta_dev.max()), core_grad_dev=float(cg_dev.max()),
        libcheck_ok=bool(eta_dev.max() <= 1e-8 * scale and cg_dev.max() <= 1e-8 * (1 + rec["core_grad_norm"].max())),
        # how much of the descent the truncation term ate, for the report
        max_B_eta=float((B * rec["eta"]).max()),
        final_ranks=rec["ranks"][-1],
        loss_drop=float(rec["loss"][0] - rec["loss_next"][-1]),
    )


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = base_parser("Theorem 3.1 (local descent) per step, on three problems")
    args = parser.parse_args(argv)
    out = output_dir(args.out)
    started = time.perf_counter()
    quick = args.quick
    steps = {"quadratic": 25, "regression": 40, "cnn_digits": 30} if quick else \
        {"quadratic": 100, "regression": 300, "cnn_digits": 200}
    taus = [0.0, 0.1] if quick else [0.0, 0.02, 0.1, 0.3]
    hfacs = [1.0, 0.5]
    with single_thread():
        problems = [quadratic_problem(), regression_problem(),
                    cnn_problem(n_images=128 if quick else 256, pilot_steps=20 if quick else 80,
                                power_iters=15 if quick else 40)]
        rows, runs = [], {}
        for prob in problems:
            for tau in taus:
                for hf in hfacs:
                    h = hf / prob.L
                    probes = 0 if (quick or prob.hessian_norm is None) else 4
                    rec = run_descent(prob, tau, h, steps[prob.name], hess_probes=probes)
                    ev = evaluate(rec, prob.L, h, tau)
                    runs[(prob.name, tau, hf)] = (rec, ev)
                    hess_ratio = max(rec["hessian_probes"]) / prob.L if rec["hessian_probes"] else float("nan")
                    rows.append(dict(problem=prob.name, tau=tau, h_L=hf, h=h, L=prob.L, B=ev["B"],
                                     steps=steps[prob.name], worst_slack_P=ev["worst_p"],
                                     worst_slack_core=ev["worst_c"], worst_core_ge_P=ev["worst_cp"],
                                     worst_monotone=ev["worst_mono"] if tau == 0 else float("nan"),
                                     min_decrease_ratio=ev["min_ratio"],
                                     max_B_eta=ev["max_B_eta"], loss_0=float(rec["loss"][0]),
                                     loss_T=float(rec["loss_next"][-1]), final_ranks=ev["final_ranks"],
                                     eta_dev=ev["eta_dev"], core_grad_dev=ev["core_grad_dev"],
                                     hess_max_over_L=hess_ratio))
    cols = ["problem", "tau", "h_L", "L", "B", "worst_slack_P", "worst_slack_core", "worst_core_ge_P",
            "worst_monotone", "min_decrease_ratio", "max_B_eta", "loss_0", "loss_T", "final_ranks", "eta_dev", "hess_max_over_L"]
    print_table(rows, cols, title="Theorem 3.1: worst slack (max over steps of lhs - rhs; <= 0 holds)", floatfmt=".3g")
    write_csv(out / f"{NAME}.csv", rows)

    verdicts = []
    for prob in problems:
        sub = [r for r in rows if r["problem"] == prob.name]
        wp = max(r["worst_slack_P"] for r in sub)
        wc = max(r["worst_slack_core"] for r in sub)
        wcp = max(r["worst_core_ge_P"] for r in sub)
        wm = max(r["worst_monotone"] for r in sub if r["tau"] == 0)
        verdicts += [
            Verdict(f"{prob.name}: descent bound with ||P grad L||^2", wp <= 0, wp,
                    {"L": prob.L, "problem": prob.note, "per_run": {f"tau={r['tau']},h={r['h_L']}/L": r["worst_slack_P"]
                                                                     for r in sub}}),
            Verdict(f"{prob.name}: descent bound with ||grad_C^ L||^2", wc <= 0, wc, {}),
            Verdict(f"{prob.name}: ||grad_C^ L|| >= ||P grad L||", wcp <= 0, wcp, {}),
            Verdict(f"{prob.name}: monotone decrease at tau=0", wm <= 0, wm, {}),
        ]
        libok = all(r["eta_dev"] <= 1e-8 * (1 + math.sqrt(abs(r["loss_0"]))) for r in sub)
        verdicts.append(Verdict(f"{prob.name}: optimizer's eta and ||grad_C^ L|| match an independent recomputation",
                                libok, max(r["eta_dev"] for r in sub),
                                {"max_core_grad_dev": max(r["core_grad_dev"] for r in sub)}))
        if not quick and prob.hessian_norm is not None:
            hr = max(r["hess_max_over_L"] for r in sub)
            verdicts.append(Verdict(f"{prob.name}: Hessian-norm probes along the runs stay below the L used",
                                    hr <= 1.0, hr - 1.0, {"max_probe_over_L": hr}))

    _plot(problems, runs, taus, out)
    return finish(NAME, verdicts, out, extra={"rows": rows, "quick": quick,
                                              "form": "L(Y+)-L(Y) <= -h(1-Lh/2)||P grad L||^2 + B eta (+1e-12)"},
                  started=started)


def _plot(problems, runs, taus, out):
    """Top: loss along the h = 1/L runs. Bottom: actual / guaranteed decrease per step (>= 1: bound holds)."""
    fig, axes = new_figure(2, len(problems), width=3.6, height=2.7)
    for j, prob in enumerate(problems):
        ax, ax2 = axes[0, j], axes[1, j]
        for tau in taus:
            rec, ev = runs[(prob.name, tau, 1.0)]
            loss = np.append(rec["loss"], rec["loss_next"][-1])
            (line,) = ax.semilogy(np.maximum(loss, 1e-30), label=f"tau={tau}")
            for hf, marker in ((1.0, "o"), (0.5, "x")):
                rec, ev = runs[(prob.name, tau, hf)]
                guaranteed = ev["c"] * rec["pg_norm"] ** 2 - ev["B"] * rec["eta"]
                pos = np.nonzero(guaranteed > 1e-9)[0]
                ratio = (rec["loss"] - rec["loss_next"])[pos] / guaranteed[pos]
                ax2.semilogy(pos, ratio, marker, ms=2.5, color=line.get_color(), alpha=0.7,
                             label=f"tau={tau}, h={hf}/L" if j == 0 else None)
        ax.set_title(f"{prob.name}: loss, h = 1/L", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=6)
        ax2.axhline(1.0, color="k", lw=0.8)
        ax2.set_xlabel("step", fontsize=8)
        ax2.set_ylabel("actual / guaranteed decrease", fontsize=7)
        ax2.set_title("bound holds iff >= 1", fontsize=8)
        if j == 0:
            ax2.legend(fontsize=5, ncol=2)
    save_figure(fig, out / f"{NAME}.png")


if __name__ == "__main__":
    raise SystemExit(main())
