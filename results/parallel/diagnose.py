"""Why ParallelTDLRT and TDLRT differ in accuracy: per-step measurements along each method's own run.

Trains VGG-MNIST at the main command's setting (3000 MNIST images, 3 epochs, batch 32, lr 0.05,
momentum 0.9, cosine) exactly as ``tucker-manifold compare`` does (same TrainConfig, same runner, so
the same iterates for a seed and thread count), with the optimizer instrumented (monkeypatched in this
process only) to record, per Tucker conv layer and step:

* the augmented-core gradient ``g = dL/dC^`` split into blocks: all-old (``g_old``, the Galerkin
  gradient), new in exactly one mode (``g_one``) and new in two or more modes (``g_two``);
* what the parallel mask keeps of it (``mask_one``: the one-new blocks projected onto the row space of
  ``Mat_i(C)``; the all-old block is kept whole, two-new blocks are dropped) -- for TDLRT this is what
  the mask *would* keep of TDLRT's own gradient;
* the gradient the optimizer actually used (``g_used``: ``g`` for TDLRT, ``mask(g)`` for parallel);
* the base-rule step in the augmented core, ``||C^_stepped - C^||`` (lr and momentum included);
* the truncation error ``||C^_stepped - trunc(C^_stepped)||`` and the step after truncation
  ``||W_new - W_old||`` (in the orthonormal augmented bases, so Frobenius norms of the kernels);
* old, augmented and new ranks.

Usage (one process at a time on the shared machine)::

    python results/parallel/diagnose.py --methods tdlrt,tdlrt-parallel,tdlrt-parallel-factors \
        --tau 0.1 --seed 0 --threads 1 --out runs/parallel_diag

Writes ``<out>/<method>_tau<tau>_seed<seed>/`` (the runner's metrics.json, history.csv, ranks.json)
and ``<out>/steps.csv`` (one row per method, step and layer). ``summarize.py`` reads them.
``tdlrt-parallel-factors`` is ParallelTDLRT(core_gradient="factors") and ``tdlrt-parallel-reject``
ParallelTDLRT(rejection=1.0) (the parallel BUG paper's step rejection), both registered here only.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

import tucker_manifold.optim as optim_mod
from tucker_manifold.experiments import methods as methods_mod
from tucker_manifold.experiments.config import TrainConfig
from tucker_manifold.experiments.runner import run_experiment
from tucker_manifold.onepass import parallel_core_gradient
from tucker_manifold.outputs import output_dir, write_csv
from tucker_manifold.tucker import multi_mode_dot

TDLRT = optim_mod.TDLRT
ParallelTDLRT = optim_mod.ParallelTDLRT

#: kernel shape -> layer name in vgg-mnist (widths 32-64-128; the shapes are unique)
VGG_MNIST_LAYERS = {
    (32, 1, 3, 3): "features.0", (32, 32, 3, 3): "features.3", (64, 32, 3, 3): "features.7",
    (64, 64, 3, 3): "features.10", (128, 64, 3, 3): "features.14", (128, 128, 3, 3): "features.17",
}

#: the step-rejection constant c of tdlrt-parallel-reject (reject when lr * eta > c * tau ||C^||)
REJECTION = 1.0

ROWS: list[dict] = []
_STATE = {"method": None, "step": 0}


def _register_factors_variant() -> None:
    def build(model, o):
        model = methods_mod._tuckerized(model, o, methods_mod.DEFAULT_TDLRT_RANK_FRACTION)
        return model, ParallelTDLRT(model.parameters(), lr=o.lr, tau=o.tau, momentum=o.momentum,
                                    weight_decay=o.weight_decay, core_gradient="factors")

    methods_mod.register_method("tdlrt-parallel-factors", build, adaptive=True, replace_existing=True,
                                description="ParallelTDLRT(core_gradient='factors') (diagnose.py only)")

    def build_reject(model, o):
        model = methods_mod._tuckerized(model, o, methods_mod.DEFAULT_TDLRT_RANK_FRACTION)
        return model, ParallelTDLRT(model.parameters(), lr=o.lr, tau=o.tau, momentum=o.momentum,
                                    weight_decay=o.weight_decay, rejection=REJECTION)

    methods_mod.register_method("tdlrt-parallel-reject", build_reject, adaptive=True, replace_existing=True,
                                description="ParallelTDLRT(rejection=1.0) (diagnose.py only)")


def _block_norms(g: torch.Tensor, old_ranks) -> tuple[float, float, float]:
    """``(||all-old||, ||new in one mode||, ||new in >= 2 modes||)`` of ``g`` split by ``old_ranks``."""
    count = torch.zeros(g.shape, dtype=torch.int64)
    for i, r in enumerate(old_ranks):
        shape = [1] * g.ndim
        shape[i] = -1
        count = count + (torch.arange(g.shape[i]) >= int(r)).reshape(shape)
    g2 = g.double() ** 2
    return tuple(math.sqrt(float(g2[count == k].sum()) if k < 2 else float(g2[count >= 2].sum()))
                 for k in (0, 1, 2))


def _install() -> None:
    orig_par_core = ParallelTDLRT._core_step
    orig_core = TDLRT._core_step
    orig_trunc = TDLRT._apply_truncation
    orig_step = TDLRT.step

    def par_core(self, plan):
        # the unmasked dL/dC^ before ParallelTDLRT masks it ("factors" gives only the masked one)
        plan._diag_full = plan.core_grad.detach().clone() if plan.source != "factors" else None
        return orig_par_core(self, plan)

    def core(self, plan):
        orig_core(self, plan)
        used = plan.core_grad.detach()
        full = getattr(plan, "_diag_full", used)
        old = plan.old_ranks
        row = dict(method=_STATE["method"], step=_STATE["step"],
                   layer=VGG_MNIST_LAYERS.get(tuple(plan.old_manifold.shape), str(tuple(plan.old_manifold.shape))),
                   lr=plan.group["lr"],
                   old_ranks="x".join(map(str, old)), aug_ranks="x".join(map(str, plan.lifted.shape)))
        if full is not None:
            g_old, g_one, g_two = _block_norms(full, old)
            masked = parallel_core_gradient(full, plan.core.to(full.dtype), old)
            m_old, m_one, m_two = _block_norms(masked, old)
            row.update(g_norm=float(torch.linalg.vector_norm(full)), g_old=g_old, g_one=g_one, g_two=g_two,
                       mask_one=m_one, mask_norm=float(torch.linalg.vector_norm(masked)))
        row.update(g_used=float(torch.linalg.vector_norm(used)),
                   core_norm=float(torch.linalg.vector_norm(plan.lifted)),
                   step_norm=float(torch.linalg.vector_norm(plan.stepped - plan.lifted)))
        plan._diag_row = row

    def trunc(self, plan, tr):
        row = getattr(plan, "_diag_row", None)
        if row is not None:
            back = multi_mode_dot(tr.core, list(tr.transforms))  # trunc(C^_stepped) in the augmented bases
            row.update(trunc_error=float(tr.error), rejected=int(bool(getattr(plan, "rejected", False))),
                       dw_norm=float(torch.linalg.vector_norm(back - plan.lifted)),
                       new_ranks="x".join(map(str, tr.ranks)))
            ROWS.append(row)
        return orig_trunc(self, plan, tr)

    def step(self, closure=None):
        out = orig_step(self, closure)
        _STATE["step"] += 1
        return out

    ParallelTDLRT._core_step = par_core
    TDLRT._core_step = core
    TDLRT._apply_truncation = trunc
    TDLRT.step = step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="tdlrt,tdlrt-parallel")
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank-fraction", type=float, default=None, help="initial rank fraction (default 0.5)")
    ap.add_argument("--subset", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-format", default="contiguous",
                    help="layout of the runs (default contiguous: the layout the committed figures were made in)")
    ap.add_argument("--out", default="runs/parallel_diag")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    _register_factors_variant()
    _install()
    out = output_dir(a.out)
    for method in a.methods.split(","):
        _STATE.update(method=method, step=0)
        cfg = TrainConfig(method=method, tau=a.tau, seed=a.seed, subset=a.subset, epochs=a.epochs,
                          rank_fraction=a.rank_fraction,
                          batch_size=a.batch_size, memory_format=a.memory_format)
        res = run_experiment(cfg, out / f"{method}_tau{a.tau:g}_seed{a.seed}", progress=False, plot=False)
        m = res.metrics
        print(f"{method}: test acc {m['test_acc']:.4f}, conv compression {100 * m['conv_compression']:.1f}%, "
              f"{m['time_per_epoch_s']:.1f} s/epoch", flush=True)
        write_csv(out / "steps.csv", ROWS)  # after every method, so a killed run keeps what it has
    return 0


if __name__ == "__main__":
    sys.exit(main())
