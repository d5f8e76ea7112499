"""Orchestration: one run end to end (:func:`run_experiment`, what ``tucker-manifold train`` runs) and
a comparison of methods at equal compression (:func:`compare_methods`, what ``tucker-manifold compare``
runs).

Determinism: a run is a function of its config, the torch version and the number of CPU threads.
Every run seeds python, numpy and torch with ``cfg.seed`` after the data are loaded; the training
loader's shuffling generator is seeded with it too; progress bars and logging draw no random numbers.
So the same config on the same thread count gives bit-identical metrics and weights, alone or inside a
comparison, with or without a bar, and a resumed run continues bit-identically.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..amp import MixedPrecision
from ..distributed import check_replicas_identical
from ..outputs import write_json
from ..pruning import conv_sparsity, dense_equivalent_flops, is_pruned
from .checkpoints import CHECKPOINT_NAME, Checkpoint, read_checkpoint, save_checkpoint
from .config import DEFAULT_COMPARE_METHODS, DEFAULT_COMPARE_TAUS, REFERENCE_METHOD, TrainConfig, check_tau
from .launch import convert_sync_bn, current, distributed_loaders, replica_tensors
from .loop import train
from .methods import build_method, get_method
from .reports import final_metrics, plot_ranks, write_history_csv, write_results

__all__ = ["RunResult", "seed_everything", "load_data", "build_dense", "prepare_batch", "setup_run",
           "run_experiment", "compare_methods", "reference_method"]

logger = logging.getLogger("tucker_manifold.experiments")


@dataclass
class RunResult:
    """What :func:`run_experiment` returns: the metrics (as in metrics.json), the trained model, the
    per-epoch history and the rank trace."""

    metrics: dict
    model: nn.Module = field(repr=False)
    history: list = field(default_factory=list, repr=False)
    rank_trace: list = field(default_factory=list, repr=False)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: TrainConfig):
    """``load_dataset`` for the config's data settings (the subset drawn with seed 0: every run and
    method sees the same images)."""
    from ..data import load_dataset

    kw: dict[str, Any] = dict(root=cfg.data_root, subset=cfg.subset, seed=0)
    if cfg.image_size is not None:
        kw["size"] = cfg.image_size
    return load_dataset(cfg.data, **kw)


def build_dense(cfg: TrainConfig, bundle) -> nn.Module:
    """The config's dense network for the data of ``bundle``."""
    from ..models import build_model

    return build_model(cfg.model, in_channels=bundle.in_channels, num_classes=bundle.num_classes,
                       image_size=bundle.image_size)


def prepare_batch(bundle, seed: int, per_class: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch a method's ``prepare`` hook scores on: ``per_class x num_classes`` training images
    drawn with a generator seeded by ``seed`` (the loaders' generators are not touched)."""
    n = min(per_class * bundle.num_classes, len(bundle.y_train))
    idx = torch.randperm(len(bundle.y_train), generator=torch.Generator().manual_seed(seed))[:n]
    return bundle.x_train[idx], bundle.y_train[idx]


def setup_run(cfg: TrainConfig, bundle=None):
    """Data loaders, model, optimizer and scheduler of a config, seeded by ``cfg.seed``. ``bundle``: the
    already loaded data of the config (else loaded here).

    Returns ``(model, optimizer, scheduler, train_loader, test_loader, bundle)``.
    """
    from ..data import make_loaders

    cfg.validate()
    bundle = load_data(cfg) if bundle is None else bundle
    seed_everything(cfg.seed)
    batch = prepare_batch(bundle, cfg.seed) if get_method(cfg.method).prepare is not None else None
    dense = build_dense(cfg, bundle)
    if cfg.budget is not None:  # fixed-rank methods get ranks that fit it; TDLRT takes it (budgets.py)
        from .budgets import fit_config, schedule_steps

        cfg = fit_config(cfg, dense)
    model, opt = build_method(
        dense, cfg.method, tau=cfg.tau, rank=cfg.rank, rank_fraction=cfg.rank_fraction,
        layer_ranks=cfg.layer_ranks, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        init=cfg.init, device=cfg.device, sparsity=cfg.sparsity, batch=batch, budget=cfg.budget,
        budget_schedule=schedule_steps(cfg, len(bundle.y_train)) if cfg.budget is not None else None,
    )
    sched = _scheduler(cfg, opt)
    train_loader, test_loader = make_loaders(bundle, cfg.batch_size, seed=cfg.seed)
    ctx = current()
    if ctx.enabled:  # under torchrun: this rank's shares of the global batch and test set (launch.py)
        train_loader, test_loader = distributed_loaders(bundle, cfg.batch_size, cfg.seed, ctx)
        if cfg.sync_bn:
            model = convert_sync_bn(model, cfg.device, ctx.group)
        check_replicas_identical(replica_tensors(model), ctx.group)  # same seed, same model on every rank
    return model, opt, sched, train_loader, test_loader, bundle


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, offset: int = 0):
    """The config's per-epoch learning-rate schedule (``None`` for constant), its epoch 0 at position
    ``offset`` of the run's ``cfg.epochs``."""
    if cfg.schedule != "cosine":
        return None
    # Closed form (LambdaLR), not CosineAnnealingLR's recursive one: a run resumed with more epochs
    # follows the cosine of the new total instead of staying at the old end value (0).
    total = cfg.epochs
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1.0 + math.cos(math.pi * min(e + offset, total) / total)))


def _out_dir(out: str | os.PathLike | None) -> Optional[Path]:
    if out is None:
        return None
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out={str(out_dir)!r} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _resume_checkpoint(resume: bool | Checkpoint, out_dir: Optional[Path]) -> Optional[Checkpoint]:
    if isinstance(resume, Checkpoint):
        return resume
    if not resume:
        return None
    if out_dir is None:
        raise ValueError("resume=True needs out (the folder holding the checkpoint) or a Checkpoint")
    path = out_dir / CHECKPOINT_NAME
    if not path.is_file():
        old = " (checkpoint.pt there is a pickle of an older version: it is not loaded, for safety)" \
            if (out_dir / "checkpoint.pt").is_file() else ""
        raise FileNotFoundError(f"resume: no checkpoint at {path}{old}")
    return read_checkpoint(path)


def run_experiment(
    cfg: TrainConfig | dict,
    out: str | os.PathLike | None = None,
    *,
    resume: bool | Checkpoint = False,
    progress: Optional[bool] = None,
    plot: bool = True,
    bundle=None,
) -> RunResult:
    """Train one config end to end. With ``out``, writes there ``metrics.json``, ``history.csv``,
    ``checkpoint.safetensors`` (after every epoch), ``ranks.json`` and (``plot``) ``ranks.png``.

    ``resume``: ``True`` continues from ``out``'s checkpoint, or pass a :class:`Checkpoint` already read
    (the file is read once either way). The model is rebuilt from the saved config (only ``epochs``,
    ``device`` and ``rank_every`` are taken from ``cfg``), its state loaded, and training goes on to
    ``cfg.epochs`` total epochs, appending to the history. ``progress``: see :func:`train`.
    ``bundle``: the config's data, already loaded (``compare_methods`` loads them once).
    """
    cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else copy.deepcopy(cfg)
    cfg.validate()
    ctx = current()  # data parallel under torchrun: every rank trains, rank 0 alone writes (launch.py)
    out_dir = _out_dir(out)
    ckpt = _resume_checkpoint(resume, out_dir)
    drive = get_method(cfg.method if ckpt is None else ckpt.config.get("method", cfg.method)).drive
    if ckpt is not None and drive is not None:
        raise ValueError(f"method {ckpt.config.get('method')!r} drives its own training (phases with rewinding): "
                         "its runs cannot be resumed; start it again")
    if ckpt is not None:
        cfg = TrainConfig.from_dict({**ckpt.config, "epochs": cfg.epochs, "device": cfg.device,
                                     "rank_every": cfg.rank_every})
        if ckpt.epoch >= cfg.epochs:
            raise ValueError(f"epochs={cfg.epochs}: the checkpoint already has {ckpt.epoch} epoch(s); "
                             f"pass epochs > {ckpt.epoch} to train further")
    model, opt, sched, train_loader, test_loader, bundle = setup_run(cfg, bundle)
    amp = MixedPrecision(cfg.precision, cfg.device)
    history: list[dict] = []
    rank_trace: list[dict] = []
    start_epoch = 0
    if ckpt is not None:
        ckpt.restore(model, opt, scheduler=sched, loader=train_loader)
        start_epoch, history = ckpt.epoch, list(ckpt.history or [])
        rank_trace = list((ckpt.extra or {}).get("rank_trace", []))
        if ((ckpt.extra or {}).get("amp") or {}).get("precision") == cfg.precision:
            amp.load_state_dict(ckpt.extra["amp"])  # the fp16 loss scale goes on where it was
        if sched is not None:
            # the saved learning rate belongs to the old total; recompute it for the current one
            for g, base, lam in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
                g["lr"] = base * lam(sched.last_epoch)

    def save(row: dict) -> None:
        if out_dir is not None and ctx.is_main:
            save_checkpoint(out_dir / CHECKPOINT_NAME, model, opt, row["epoch"], history, cfg.to_dict(),
                            scheduler=sched, loader=train_loader,
                            extra={"rank_trace": rank_trace, "amp": amp.state_dict(), "world_size": ctx.world_size})

    if drive is None:
        train(model, opt, train_loader, test_loader, cfg.epochs, cfg.device,
              progress=progress if ctx.is_main else False, callback=save, start_epoch=start_epoch, history=history,
              scheduler=sched, rank_trace=rank_trace, rank_every=cfg.rank_every, precision=amp,
              process_group=ctx.group, memory_format=cfg.memory_format)
    else:
        phase = {"opt": opt}

        def run_epochs(start: int, n: int) -> list[dict]:
            """``n`` more epochs at schedule positions ``[start, start + n)``, fresh optimizer state."""
            if n == 0:
                return []
            phase["opt"] = popt = type(opt)(model.parameters(), **opt.defaults)
            done = len(history)
            train(model, popt, train_loader, test_loader, done + n, cfg.device,
                  progress=progress if ctx.is_main else False, start_epoch=done, history=history,
                  scheduler=_scheduler(cfg, popt, start), rank_trace=rank_trace, rank_every=cfg.rank_every,
                  precision=amp, process_group=ctx.group, memory_format=cfg.memory_format)
            return history[done:]

        drive(model, run_epochs, cfg)
        if len(history) != cfg.epochs:
            raise RuntimeError(f"method {cfg.method!r} trained {len(history)} epochs, not epochs={cfg.epochs}")
        opt = phase["opt"]
        save(history[-1])
    extra = {"dataset": bundle.name, "n_train": len(bundle.y_train), "n_test": len(bundle.y_test),
             "torch": torch.__version__, "threads": torch.get_num_threads(), "world_size": ctx.world_size,
             # oneDNN picks its kernels by instruction set, and AVX2 / AVX-512 kernels round differently
             "cpu_capability": cpu_capability()}
    if any(is_pruned(m) for m in model.modules()):
        # Pruned weights save memory only in a sparse format; a dense kernel runs every multiply anyway.
        shape = (1, bundle.in_channels, bundle.image_size, bundle.image_size)
        extra.update(conv_sparsity=conv_sparsity(model), flops_dense_equivalent=dense_equivalent_flops(model, shape),
                     flops_nonzero_weights=dense_equivalent_flops(model, shape, skip_zeros=True))
    metrics = final_metrics(history, cfg, model, extra=extra)
    if out_dir is not None and ctx.is_main:
        write_json(out_dir / "metrics.json", metrics)
        write_history_csv(out_dir / "history.csv", history)
        write_json(out_dir / "ranks.json", rank_trace)
        if plot:
            title = f"{cfg.model} / {cfg.method}" + (f" (tau={cfg.tau:g})" if get_method(cfg.method).adaptive else "")
            plot_ranks(rank_trace, out_dir / "ranks.png", title=title)
    if ctx.enabled:  # every rank returns once rank 0's files are complete (a resume may read them next)
        torch.distributed.barrier(ctx.group)
    return RunResult(metrics, model, history, rank_trace)


# ------------------------------------------------------------------------------------ compare
def reference_method(methods: Sequence[str]) -> Optional[str]:
    """The method the others are matched to: ``tdlrt`` when listed, else the first adaptive one."""
    if REFERENCE_METHOD in methods:
        return REFERENCE_METHOD
    return next((m for m in methods if get_method(m).adaptive), None)


@dataclass(frozen=True)
class _Run:
    method: str
    tau: Optional[float]
    seed: int

    @property
    def tag(self) -> str:
        return f"{self.method}_tau{self.tau:g}_seed{self.seed}" if self.tau is not None else f"{self.method}_seed{self.seed}"


def _plan(methods: Sequence[str], taus: Sequence[float], seeds: Sequence[int]) -> list[_Run]:
    """Adaptive methods (the reference first) for every tau and seed, then the unmatched ones once per
    seed, then the matched ones per tau and seed (once per seed without a reference)."""
    ref = reference_method(methods)
    adaptive = sorted((m for m in methods if get_method(m).adaptive), key=lambda m: m != ref)
    plain = [m for m in methods if not get_method(m).adaptive and get_method(m).match is None]
    matched = [m for m in methods if not get_method(m).adaptive and get_method(m).match is not None]
    match_taus: Sequence[Optional[float]] = taus if ref is not None else [None]
    return ([_Run(m, t, s) for m in adaptive for t in taus for s in seeds]
            + [_Run(m, None, s) for m in plain for s in seeds]
            + [_Run(m, t, s) for m in matched for t in match_taus for s in seeds])


def _configure(base: TrainConfig, run: _Run, ref: Optional[str], ref_counts: dict, dense_ref) -> tuple[TrainConfig, str]:
    """The config of one planned run and how its ranks were chosen."""
    spec = get_method(run.method)
    cfg = dataclasses.replace(base, method=run.method, seed=run.seed, layer_ranks=None)
    if spec.adaptive:
        return dataclasses.replace(cfg, tau=run.tau, rank=None), "adaptive"
    if spec.match is None:
        return dataclasses.replace(cfg, rank=None, rank_fraction=None), "none"
    if run.tau is None:
        return cfg, "own ranks"
    overrides, how = spec.match(dense_ref(), ref_counts[(run.tau, run.seed)], run.method)
    return dataclasses.replace(cfg, tau=run.tau, **overrides), f"{how} matched to {ref} tau={run.tau:g}"


def cpu_capability() -> str:
    """The CPU instruction set torch's kernels use here (``"AVX2"``, ``"AVX512"``, ...): runs are
    bit-reproducible for a config, seed and thread count on CPUs of one capability, not across them."""
    return str(torch.backends.cpu.get_cpu_capability())


def reusable_metrics(run_dir: Path, cfg: TrainConfig, n_train: int) -> Optional[dict]:
    """``run_dir/metrics.json`` when it is a finished run of ``cfg`` (same config, training set size,
    torch thread count and CPU capability, one process); else ``None``. A run without a recorded
    capability (made before it was recorded) is not reused. Read as JSON: nothing loaded executes code."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    with open(path) as fh:
        m = json.load(fh)
    want = TrainConfig.from_dict(m.get("config", {})).to_dict() if isinstance(m.get("config"), dict) else None
    same = (want == cfg.to_dict() and m.get("n_train") == n_train and m.get("threads") == torch.get_num_threads()
            and m.get("world_size", 1) == 1 and m.get("epochs") == cfg.epochs
            and m.get("cpu_capability") == cpu_capability())
    if not same:
        logger.info("not reusing %s: made by another config, data size, thread count or CPU capability", path)
    return m if same else None


def _check_compare_args(base, methods, taus, seeds) -> tuple[TrainConfig, list[str], list[float], list[int]]:
    base = TrainConfig.from_dict(base) if isinstance(base, dict) else copy.deepcopy(base)
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("methods must name at least one method")
    for m in methods:
        get_method(m)
    taus = [check_tau(t, "taus") for t in taus]
    if not taus:
        raise ValueError("taus must list at least one value")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or not all(isinstance(s, int) and not isinstance(s, bool) for s in seed_list):
        raise ValueError(f"seeds must be an int >= 1 or a non-empty list of ints, got {seeds!r}")
    return base.validate(), methods, taus, seed_list


def compare_methods(
    base: TrainConfig | dict,
    methods: Sequence[str] = DEFAULT_COMPARE_METHODS,
    taus: Sequence[float] = DEFAULT_COMPARE_TAUS,
    seeds: int | Sequence[int] = 1,
    out: str | os.PathLike | None = None,
    *,
    progress: Optional[bool] = None,
    reuse: bool = False,
) -> list[dict]:
    """Run every method of ``methods`` on the setting of ``base`` (see :func:`_plan` for the order):
    adaptive methods (TDLRT) per tau and seed; every matched method per tau and seed at the reference's
    final conv compression (``vanilla-tucker`` / ``riemannian-fixed``: the single closest
    ``rank_fraction``; ``cp`` / ``matrix``: per-layer ranks within the reference's per-layer count);
    ``dense`` once per seed. Without a reference (no adaptive method) the matched methods run once per
    seed at their own ranks, with tau ``None``.

    Returns one row per run (the columns of ``reports.RESULT_COLUMNS``); with ``out`` writes
    ``results.csv``, ``results.md``, ``accuracy_vs_compression.png`` and each run's files under
    ``out/runs/<tag>``. Progress goes to the ``tucker_manifold.experiments`` logger.

    ``reuse``: a run whose ``out/runs/<tag>/metrics.json`` already holds the same config, data size,
    thread count and CPU capability (:func:`reusable_metrics`) is read back instead of trained, so an
    interrupted compare goes on where it stopped, and runs made by several compares (say, split over cores)
    are tabulated together. Runs are a function of those, so a reused run is the run that would be trained.
    """
    base, methods, taus, seed_list = _check_compare_args(base, methods, taus, seeds)
    out_dir = _out_dir(out)
    if reuse and out_dir is None:
        raise ValueError("reuse=True needs out (the folder whose runs/ are read back)")
    bundle = load_data(base)  # once: every run reads the same images
    ref = reference_method(methods)
    dense_cache: list[nn.Module] = []

    def dense_ref() -> nn.Module:
        if not dense_cache:
            dense_cache.append(build_dense(base, bundle))
        return dense_cache[0]

    rows: list[dict] = []
    ref_counts: dict[tuple[float, int], dict[str, int]] = {}
    t_start = time.perf_counter()
    for run in _plan(methods, taus, seed_list):
        cfg, how = _configure(base, run, ref, ref_counts, dense_ref)
        t0 = time.perf_counter()
        reused = reusable_metrics(out_dir / "runs" / run.tag, cfg, len(bundle.y_train)) if reuse else None
        if reused is not None:
            logger.info("reusing %s (its metrics.json is a finished run of this config)", run.tag)
            m = reused
        else:
            m = run_experiment(cfg, out_dir / "runs" / run.tag if out_dir is not None else None, progress=progress,
                               plot=get_method(run.method).adaptive, bundle=bundle).metrics
        if run.method == ref:
            ref_counts[(run.tau, run.seed)] = m["layer_conv_params"]
        row = {k: m[k] for k in ("test_acc", "test_loss", "train_acc", "conv_compression", "total_compression",
                                 "conv_params", "total_params", "time_per_epoch_s", "epochs")}
        wall = time.perf_counter() - t0 if reused is None else reused.get("total_train_time_s")
        row.update(method=run.method, tau=run.tau, seed=run.seed, wall_s=wall, match=how, ranks=m["ranks"])
        rows.append(row)
        logger.info("[%6.0fs] %s: test acc %.4f, conv compression %.1f%%, %.1fs/epoch (%s)",
                    time.perf_counter() - t_start, run.tag, row["test_acc"], 100 * row["conv_compression"],
                    row["time_per_epoch_s"], how)
    if out_dir is not None and current().is_main:
        write_results(out_dir, rows, base, len(seed_list))
    return rows
