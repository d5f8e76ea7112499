"""One training loop for every method, so that comparisons are fair.

* :func:`build_method` turns a freshly built dense model into the model + optimizer of one method
  (``dense``, ``tdlrt``, ``vanilla-tucker``, ``riemannian-fixed``, ``cp``, ``matrix``);
* :func:`train` / :func:`evaluate`: the loop. Every step goes through a closure, so TDLRT's two-pass
  step works and every other optimizer simply calls it once; the same data order, batch size, loss and
  evaluation are used by all methods;
* :func:`save_checkpoint` / :func:`load_checkpoint`: model, optimizer, scheduler and RNG states, so an
  interrupted run resumes bit-for-bit (the model is rebuilt from the saved config, Tucker layers resize to
  the saved ranks on load);
* :func:`run_experiment` (what ``tucker-manifold train`` runs) and :func:`compare_methods` (what
  ``tucker-manifold compare`` runs: TDLRT first, then every baseline at TDLRT's final conv compression).

Initial ranks of TDLRT: the layers start at ``rank_fraction=0.5`` of the channels (HOSVD of the dense
initialisation, spatial modes full rank) unless ``rank`` / ``rank_fraction`` is given. From there the
integrator both grows (the augmented basis doubles each channel rank before truncation) and shrinks the
ranks; ``tau`` sets where they settle. Starting at half rank keeps the first (most expensive, augmented)
steps cheaper than a full-rank start; on vgg-mnist / MNIST a 0.25 start reached the same accuracy and
compression within run-to-run noise and was not faster overall.

Fairness: every method sees the same data order (the loader's generator is seeded by the run's seed),
the same loss, learning rate, momentum, schedule and epochs; BatchNorm statistics are updated once per
step also for TDLRT (whose closure runs twice).
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "METHODS",
    "TUCKER_METHODS",
    "DEFAULT_TDLRT_RANK_FRACTION",
    "TrainConfig",
    "build_method",
    "train",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "layer_ranks",
    "conv_parameter_counts",
    "match_tucker_rank_fraction",
    "match_budget_ranks",
    "seed_everything",
    "setup_run",
    "run_experiment",
    "compare_methods",
    "summarize",
    "markdown_table",
    "plot_ranks",
    "plot_accuracy_vs_compression",
    "resolve_device",
]

METHODS = ("dense", "tdlrt", "vanilla-tucker", "riemannian-fixed", "cp", "matrix")
TUCKER_METHODS = ("tdlrt", "vanilla-tucker", "riemannian-fixed")
#: TDLRT's initial channel-rank fraction when neither ``rank`` nor ``rank_fraction`` is given.
DEFAULT_TDLRT_RANK_FRACTION = 0.5
#: Initial/fixed rank fraction of the fixed-rank baselines run on their own (``train`` without ranks).
DEFAULT_FIXED_RANK_FRACTION = 0.25


# ------------------------------------------------------------------------------------ argument checks
def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    return float(tau)


def _check_rank(rank) -> Optional[int]:
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    return rank


def _check_rank_fraction(f) -> Optional[float]:
    if f is None:
        return None
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 < f <= 1):
        raise ValueError(f"rank_fraction must be a number in (0, 1], got {f!r}")
    return float(f)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return method


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``; a CUDA device without CUDA is a ValueError."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available (torch "
                             f"{torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


# ------------------------------------------------------------------------------------ model inspection
def _conv_like(m: nn.Module) -> bool:
    from .nn.layers import TuckerConv2d

    return isinstance(m, (nn.Conv2d, TuckerConv2d)) or (
        callable(getattr(m, "dense_parameter_count", None)) and type(m).__name__.endswith("Conv2d")
    )


def layer_ranks(model: nn.Module) -> dict[str, list[int]]:
    """``{qualified name: ranks}`` of every factorized layer: Tucker ranks (one per mode) and the
    single rank of CP / matrix layers. Empty for a dense model."""
    from .nn.layers import TuckerLayer

    out: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, TuckerLayer):
            out[name] = [int(r) for r in m.ranks]
        elif callable(getattr(m, "dense_parameter_count", None)) and isinstance(getattr(m, "rank", None), int):
            out[name] = [int(m.rank)]
    return out


def conv_parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{qualified name: weight parameters}`` of every (factorized) convolution, biases excluded
    (what :func:`rank_for_parameter_budget` budgets)."""
    from .nn.layers import TuckerLayer

    out = {}
    for name, m in model.named_modules():
        if not _conv_like(m):
            continue
        if isinstance(m, TuckerLayer):
            out[name] = int(m.tucker_weight.manifold.packed_size)
        else:
            out[name] = sum(p.numel() for n, p in m.named_parameters() if n != "bias")
    return out


def _compression(model: nn.Module) -> dict[str, float]:
    from .nn.tuckerize import compression_rate

    return compression_rate(model)


def _rank_summary(ranks: dict[str, list[int]], first: int = 3) -> str:
    """Compact progress-bar text: the channel ranks of the first layers and the mean channel rank."""
    if not ranks:
        return "-"
    items = list(ranks.values())
    head = " ".join("/".join(str(r) for r in rr[:2]) for rr in items[:first])
    mean = statistics.fmean(statistics.fmean(rr[:2]) for rr in items)
    more = " .." if len(items) > first else ""
    return f"{head}{more} (mean {mean:.1f})"


# ------------------------------------------------------------------------------------ build_method
def _tucker_rank_kwargs(rank, rank_fraction, default_fraction) -> dict:
    if rank is not None and rank_fraction is not None:
        raise ValueError("give at most one of rank and rank_fraction")
    if rank is not None:
        return {"ranks": rank}
    return {"rank_fraction": rank_fraction if rank_fraction is not None else default_fraction}


def _per_layer(model: nn.Module, layer_ranks_: dict[str, Any], apply: Callable[[str, Any, list[str]], None]) -> None:
    """Call ``apply(name, rank, other_names)`` for every layer of ``layer_ranks_`` (validated names)."""
    names = {n for n, _ in model.named_modules()}
    unknown = sorted(set(layer_ranks_) - names)
    if unknown:
        raise ValueError(f"layer_ranks names not found in the model: {unknown}")
    for name, r in layer_ranks_.items():
        apply(name, r, [n for n in layer_ranks_ if n != name])


def build_method(
    model: nn.Module,
    method: str,
    *,
    tau: float = 0.1,
    rank: Optional[int] = None,
    rank_fraction: Optional[float] = None,
    layer_ranks: Optional[dict[str, Any]] = None,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    init: str = "hosvd",
    linear: bool = False,
    rank_max: Optional[int] = None,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Factorize a freshly built dense ``model`` for ``method`` and build its optimizer.

    Methods:
      * ``"dense"``: the model unchanged, ``torch.optim.SGD``;
      * ``"tdlrt"``: ``tuckerize`` (initial channel ranks ``rank`` / ``rank_fraction``, default
        ``rank_fraction=0.5``), then :class:`~tucker_manifold.optim.TDLRT` with ``tau`` and SGD-momentum;
      * ``"vanilla-tucker"``: ``tuckerize`` at fixed ranks (default ``rank_fraction=0.25``), plain
        ``torch.optim.SGD`` on core and factors (the packed parameter, geometry ignored);
      * ``"riemannian-fixed"``: same layers, ``geoopt.optim.RiemannianSGD`` (fixed ranks);
      * ``"cp"`` / ``"matrix"``: ``factorize_model`` (default ``rank_fraction=0.25``), ``torch.optim.SGD``.

    ``layer_ranks`` (``{qualified conv name: rank}``) overrides the global rank per layer: an int for
    CP / matrix layers, an int or a 4-tuple for Tucker layers; the layers not named stay dense.
    ``init``: ``"hosvd"`` decomposes the dense initialisation (``"svd"`` for CP / matrix), ``"random"``
    draws the factorized layer afresh. ``linear``: also factorize ``nn.Linear`` layers.
    ``device``: where the model is moved before the optimizer is built. Returns ``(model, optimizer)``.
    """
    _check_method(method)
    _check_tau(tau)
    _check_rank(rank)
    _check_rank_fraction(rank_fraction)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if init not in ("hosvd", "random"):
        raise ValueError(f"init must be 'hosvd' or 'random', got {init!r}")
    dev = resolve_device(device) if device is not None else None

    if method in TUCKER_METHODS:
        from .nn.tuckerize import tuckerize

        opts = dict(init=init, linear=linear, rank_max=rank_max)
        if layer_ranks is not None:
            def apply(name, r, others):
                nonlocal model
                model = tuckerize(model, ranks=r, include=[name], **opts)

            _per_layer(model, layer_ranks, apply)
        else:
            default = DEFAULT_TDLRT_RANK_FRACTION if method == "tdlrt" else DEFAULT_FIXED_RANK_FRACTION
            model = tuckerize(model, **_tucker_rank_kwargs(rank, rank_fraction, default), **opts)
    elif method in ("cp", "matrix"):
        from .nn.baselines import factorize_model

        finit = "svd" if init == "hosvd" else "random"
        if layer_ranks is not None:
            def apply(name, r, others):
                nonlocal model
                # exclude every other named layer: they get their own rank in their own call
                model = factorize_model(model, method, rank=int(r), include_linear=linear,
                                        exclude=[n for n, _ in model.named_modules() if n != name and n != ""],
                                        init=finit)

            _per_layer(model, layer_ranks, apply)
        else:
            kw = _tucker_rank_kwargs(rank, rank_fraction, DEFAULT_FIXED_RANK_FRACTION)
            model = factorize_model(model, method, rank=kw.get("ranks"), rank_fraction=kw.get("rank_fraction"),
                                    include_linear=linear, init=finit)

    if dev is not None:
        model = model.to(dev)
    params = list(model.parameters())
    if method == "tdlrt":
        from .optim import TDLRT

        opt: torch.optim.Optimizer = TDLRT(params, lr=lr, tau=tau, momentum=momentum, weight_decay=weight_decay)
    elif method == "riemannian-fixed":
        import geoopt

        opt = geoopt.optim.RiemannianSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return model, opt


# ------------------------------------------------------------------------------------ loop
@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (eval mode; restores the mode)."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    if total == 0:
        return float("nan"), float("nan")
    return loss_sum / total, correct / total


def _now_ranks(model: nn.Module) -> dict[str, list[int]]:
    return layer_ranks(model)


class _frozen_bn_stats:
    """Context manager: BatchNorm layers in training mode normalize with the batch statistics, and their
    running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) are put back
    exactly as they were afterwards."""

    _BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, layers: Sequence[nn.Module]):
        self.layers = layers

    def __enter__(self):
        self.saved = [{k: getattr(m, k).clone() for k in self._BUFFERS if getattr(m, k, None) is not None}
                      for m in self.layers]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, saved in zip(self.layers, self.saved):
                for k, v in saved.items():
                    getattr(m, k).copy_(v)
        return False


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    test_loader: Optional[Iterable],
    epochs: int,
    device: str | torch.device = "cpu",
    *,
    progress: bool = True,
    callback: Optional[Callable[[dict], Any]] = None,
    start_epoch: int = 0,
    history: Optional[list[dict]] = None,
    scheduler: Any = None,
    rank_trace: Optional[list[dict]] = None,
    rank_every: int = 10,
    loss_fn: Callable = F.cross_entropy,
) -> list[dict]:
    """Train for epochs ``start_epoch + 1 .. epochs`` (``epochs`` is the total, so a resumed run passes
    the epochs already done as ``start_epoch``) and return ``history`` with one row per epoch appended:

    ``epoch, train_loss, train_acc, test_loss, test_acc, conv_compression, total_compression, ranks
    (dict name -> list), epoch_time_s (training only), eval_time_s, skipped_steps, lr``.

    Each step calls ``optimizer.step(closure)``; the closure zeroes the gradients, runs forward and
    backward and returns the loss (TDLRT calls it twice, other optimizers once). Train loss/accuracy
    are those of the first forward of each step (before the update). ``rank_trace``, if a list,
    receives ``{"step", "epoch", "ranks"}`` every ``rank_every`` steps and at each epoch end.
    ``callback(row)`` runs after each epoch (e.g. to save a checkpoint); ``scheduler.step()`` too.

    BatchNorm running statistics are updated once per step whatever the optimizer: TDLRT's second
    forward evaluates the same network (the lift is exact) on the same batch, and letting it update the
    statistics again would double their momentum for TDLRT only.
    """
    history = [] if history is None else history
    device = torch.device(device)
    model.to(device)
    try:
        n_batches = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    global_step = start_epoch * (n_batches or 0)
    if rank_trace is not None and not rank_trace:
        rank_trace.append({"step": global_step, "epoch": float(start_epoch), "ranks": _now_ranks(model)})

    bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tqdm = None
    if progress:
        from tqdm.auto import tqdm

    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, total = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True) if tqdm else None
        it = bar if bar is not None else train_loader
        for i, (x, y) in enumerate(it):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            first: dict = {}

            def closure():
                optimizer.zero_grad(set_to_none=True)
                # a second evaluation in the same step (TDLRT's pass 2) leaves BatchNorm's statistics alone
                with _frozen_bn_stats(bn_layers if first else ()):
                    out = model(x)
                    loss = loss_fn(out, y)
                    loss.backward()  # before the restore: autograd saved the statistics' versions
                if not first:  # statistics of the pre-update forward (TDLRT's pass 1)
                    first["loss"] = loss.detach()
                    first["correct"] = (out.detach().argmax(1) == y).sum()
                return loss

            optimizer.step(closure)
            global_step += 1
            bs = y.numel()
            loss_v = float(first["loss"])
            if math.isfinite(loss_v):
                loss_sum += loss_v * bs
            correct += int(first["correct"])
            total += bs
            if rank_trace is not None and rank_every > 0 and global_step % rank_every == 0:
                rank_trace.append({"step": global_step, "epoch": (epoch - 1) + (i + 1) / (n_batches or (i + 1)),
                                   "ranks": _now_ranks(model)})
            if bar is not None and (i % 10 == 0 or (n_batches and i == n_batches - 1)):
                cr = _compression(model)["conv"]
                bar.set_postfix_str(
                    f"loss={loss_sum / max(total, 1):.3f} acc={correct / max(total, 1):.3f} "
                    f"cr={cr:.1%} r={_rank_summary(_now_ranks(model))}", refresh=False)
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0
        lr = float(optimizer.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step()
        t1 = time.perf_counter()
        test_loss, test_acc = evaluate(model, test_loader, device) if test_loader is not None else (float("nan"),) * 2
        eval_time = time.perf_counter() - t1
        comp = _compression(model)
        ranks_now = _now_ranks(model)
        row = dict(
            epoch=epoch,
            train_loss=loss_sum / max(total, 1),
            train_acc=correct / max(total, 1),
            test_loss=test_loss,
            test_acc=test_acc,
            conv_compression=comp["conv"],
            total_compression=comp["total"],
            conv_params=comp["conv_params"],
            total_params=comp["total_params"],
            ranks=ranks_now,
            epoch_time_s=epoch_time,
            eval_time_s=eval_time,
            skipped_steps=int(getattr(optimizer, "skipped_steps", 0)),
            lr=lr,
        )
        history.append(row)
        if rank_trace is not None and (not rank_trace or rank_trace[-1]["step"] != global_step):
            rank_trace.append({"step": global_step, "epoch": float(epoch), "ranks": ranks_now})
        if progress:
            print(
                f"epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                f"test loss {test_loss:.4f} acc {test_acc:.4f} | conv compression {comp['conv']:.1%} | "
                f"ranks {_rank_summary(ranks_now)} | {epoch_time:.1f}s",
                flush=True,
            )
        if callback is not None:
            callback(row)
    return history


# ------------------------------------------------------------------------------------ checkpoints
def _rng_state(generator: Optional[torch.Generator] = None) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _set_rng_state(state: dict, generator: Optional[torch.Generator] = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


def _loader_generator(loader) -> Optional[torch.Generator]:
    """The generator that shuffles ``loader`` (DataLoader's ``generator`` or its sampler's)."""
    if loader is None:
        return None
    g = getattr(loader, "generator", None)
    if isinstance(g, torch.Generator):
        return g
    g = getattr(getattr(loader, "sampler", None), "generator", None)
    return g if isinstance(g, torch.Generator) else None


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict],
    config: dict,
    *,
    scheduler: Any = None,
    loader: Any = None,
    extra: Optional[dict] = None,
) -> None:
    """Write model and optimizer ``state_dict``, scheduler state, RNG states (torch, CUDA, numpy, python,
    and the shuffling generator of ``loader`` when it has one), ``epoch`` (epochs done), ``history``,
    ``config`` and ``extra`` to ``path`` (atomically: a temporary file, then a rename)."""
    path = Path(path)
    payload = {
        "format": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(_loader_generator(loader)),
        "epoch": int(epoch),
        "history": history,
        "config": config,
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    scheduler: Any = None,
    loader: Any = None,
    restore_rng: bool = True,
    map_location: str | torch.device | None = None,
) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into a model rebuilt from the same config
    (Tucker layers resize to the saved ranks), its optimizer and scheduler, and restore the RNG states.
    Returns ``{"epoch", "history", "config", "extra"}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # On the CPU first: RNG states must stay CPU tensors; load_state_dict copies weights and optimizer
    # state to wherever the model's parameters live. Our own file: numpy / python RNG states need full
    # unpickling (weights_only=False); only load checkpoints you trust.
    payload = torch.load(path, map_location=map_location or "cpu", weights_only=False)
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        rng = dict(payload["rng"])
        rng["torch"] = rng["torch"].cpu()
        _set_rng_state(rng, _loader_generator(loader))
    return {k: payload.get(k) for k in ("epoch", "history", "config", "extra")}


# ------------------------------------------------------------------------------------ rank matching
def _tucker_conv_count(shape: Sequence[int], fraction: float) -> int:
    """Weight parameters of a Tucker conv at ``rank_fraction`` (as :func:`tuckerize` picks the ranks)."""
    from .nn.layers import valid_multilinear_ranks

    r = [max(1, math.ceil(round(fraction * n, 9))) for n in shape[:2]] + list(shape[2:])
    r = valid_multilinear_ranks(shape, r)
    return math.prod(r) + sum(n * k for n, k in zip(shape, r))


def _dense_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1}


def match_tucker_rank_fraction(dense_model: nn.Module, target_params: int) -> float:
    """The ``rank_fraction`` whose Tucker conv weight-parameter count (all ``groups=1`` convs of
    ``dense_model``, spatial modes full rank) is closest to ``target_params``."""
    convs = _dense_convs(dense_model)
    if not convs:
        raise ValueError("the model has no convolution to factorize")
    shapes = [tuple(m.weight.shape) for m in convs.values()]
    # The count only changes where ceil(f * n) does: at f = j / n.
    cands = sorted({j / s[k] for s in shapes for k in (0, 1) for j in range(1, s[k] + 1)})
    best = min(cands, key=lambda f: (abs(sum(_tucker_conv_count(s, f) for s in shapes) - target_params), f))
    return float(best)


def match_budget_ranks(dense_model: nn.Module, method: str, budgets: dict[str, int]) -> dict[str, int]:
    """Per-layer CP / matrix ranks from ``rank_for_parameter_budget`` with the given per-layer weight
    budgets (at least rank 1)."""
    from .nn.baselines import rank_for_parameter_budget

    convs = _dense_convs(dense_model)
    out = {}
    for name, params in budgets.items():
        if name not in convs:
            raise ValueError(f"layer {name!r} is not a dense groups=1 convolution of the model")
        try:
            out[name] = rank_for_parameter_budget(convs[name], method, int(params))
        except ValueError:
            out[name] = 1  # budget below the cost of rank 1: the smallest layer there is
    return out


# ------------------------------------------------------------------------------------ experiments
@dataclass
class TrainConfig:
    """Everything that defines one run (saved in checkpoints and metrics.json)."""

    model: str = "vgg-mnist"
    data: str = "mnist"
    method: str = "tdlrt"
    tau: float = 0.15
    rank: Optional[int] = None
    rank_fraction: Optional[float] = None
    layer_ranks: Optional[dict] = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    init: str = "hosvd"
    epochs: int = 3
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    subset: Optional[int] = None
    data_root: Optional[str] = None
    image_size: Optional[int] = None
    schedule: str = "cosine"
    rank_every: int = 10

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> "TrainConfig":
        _check_method(self.method)
        _check_tau(self.tau)
        _check_rank(self.rank)
        _check_rank_fraction(self.rank_fraction)
        if self.rank is not None and self.rank_fraction is not None:
            raise ValueError("give at most one of rank and rank_fraction")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.subset is not None and (not isinstance(self.subset, int) or self.subset < 1):
            raise ValueError(f"subset must be an int >= 1, got {self.subset!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        resolve_device(self.device)
        return self


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_DATA_CACHE: dict = {}


def _load_data(cfg: TrainConfig):
    """``load_dataset`` for the config (cached per process: ``compare`` reuses it for every run)."""
    from .data import load_dataset

    key = (cfg.data, cfg.data_root, cfg.subset, cfg.image_size)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        kw = dict(root=cfg.data_root, subset=cfg.subset, seed=0)
        if cfg.image_size is not None:
            kw["size"] = cfg.image_size
        _DATA_CACHE[key] = load_dataset(cfg.data, **kw)
    return _DATA_CACHE[key]


def _build_dense(cfg: TrainConfig, bundle) -> nn.Module:
    from .models import build_model

    return build_model(cfg.model, in_channels=bundle.in_channels, num_classes=bundle.num_classes,
                       image_size=bundle.image_size)


def setup_run(cfg: TrainConfig):
    """Data loaders, model and optimizer (and scheduler) of a config, seeded by ``cfg.seed``.

    Returns ``(model, optimizer, scheduler, train_loader, test_loader, bundle)``.
    """
    from .data import make_loaders

    cfg.validate()
    bundle = _load_data(cfg)
    seed_everything(cfg.seed)
    dense = _build_dense(cfg, bundle)
    layer_ranks_ = cfg.layer_ranks
    if layer_ranks_ is not None and cfg.method in TUCKER_METHODS:
        layer_ranks_ = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in layer_ranks_.items()}
    model, opt = build_method(
        dense, cfg.method, tau=cfg.tau, rank=cfg.rank, rank_fraction=cfg.rank_fraction, layer_ranks=layer_ranks_,
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, init=cfg.init, device=cfg.device,
    )
    sched = None
    if cfg.schedule == "cosine":
        # Closed form (LambdaLR), not CosineAnnealingLR's recursive one: a run resumed with more epochs
        # follows the cosine of the new total instead of staying at the old end value (0).
        total = cfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1.0 + math.cos(math.pi * min(e, total) / total)))
    train_loader, test_loader = make_loaders(bundle, cfg.batch_size, seed=cfg.seed)
    return model, opt, sched, train_loader, test_loader, bundle


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _write_history_csv(path: Path, history: list[dict]) -> None:
    cols = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "conv_compression", "total_compression",
            "conv_params", "total_params", "epoch_time_s", "eval_time_s", "skipped_steps", "lr", "mean_rank", "ranks"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for row in history:
            ranks = row.get("ranks") or {}
            chans = [statistics.fmean(r[:2]) for r in ranks.values()]
            w.writerow({**row, "mean_rank": statistics.fmean(chans) if chans else "",
                        "ranks": json.dumps(ranks, separators=(",", ":"))})


def final_metrics(history: list[dict], cfg: TrainConfig, model: nn.Module, extra: Optional[dict] = None) -> dict:
    """The summary written to metrics.json."""
    last = history[-1]
    times = [r["epoch_time_s"] for r in history]
    comp = _compression(model)
    return {
        "test_acc": last["test_acc"],
        "test_loss": last["test_loss"],
        "train_acc": last["train_acc"],
        "train_loss": last["train_loss"],
        "best_test_acc": max(r["test_acc"] for r in history),
        "conv_compression": comp["conv"],
        "total_compression": comp["total"],
        "conv_params": comp["conv_params"],
        "conv_dense_params": comp["conv_dense_params"],
        "total_params": comp["total_params"],
        "total_dense_params": comp["total_dense_params"],
        "ranks": layer_ranks(model),
        "layer_conv_params": conv_parameter_counts(model),
        "epochs": last["epoch"],
        "time_per_epoch_s": statistics.fmean(times),
        "total_train_time_s": sum(times),
        "skipped_steps": last["skipped_steps"],
        "config": asdict(cfg),
        **(extra or {}),
    }


def run_experiment(
    cfg: TrainConfig | dict,
    out: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    plot: bool = True,
) -> dict:
    """Train one config end to end; returns the metrics dict (and, with ``out``, writes ``metrics.json``,
    ``history.csv``, ``checkpoint.pt`` (after every epoch), ``ranks.json`` and ``ranks.png`` there).

    ``resume=True`` continues from ``out/checkpoint.pt``: the model is rebuilt from the saved config
    (only ``epochs``, ``device`` and ``rank_every`` are taken from ``cfg``), its state loaded, and training goes on to ``cfg.epochs``
    total epochs, appending to the history. The returned dict also holds the trained model under
    ``"model_object"`` (not written to metrics.json).
    """
    cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else copy.deepcopy(cfg)
    cfg.validate()
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} exists and is not a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.pt" if out_dir is not None else None

    history: list[dict] = []
    rank_trace: list[dict] = []
    start_epoch = 0
    if resume:
        if ckpt is None or not ckpt.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)["config"]
        new = dict(epochs=cfg.epochs, device=cfg.device, rank_every=cfg.rank_every)
        cfg = TrainConfig.from_dict({**saved, **new})
    model, opt, sched, train_loader, test_loader, bundle = setup_run(cfg)
    if resume:
        state = load_checkpoint(ckpt, model, opt, scheduler=sched, loader=train_loader)
        start_epoch = int(state["epoch"])
        history = list(state["history"] or [])
        rank_trace = list((state["extra"] or {}).get("rank_trace", []))
        if start_epoch >= cfg.epochs:
            raise ValueError(f"--resume: the checkpoint already has {start_epoch} epoch(s); "
                             f"pass --epochs > {start_epoch} to train further")
    if resume and sched is not None:
        # the saved learning rate belongs to the old total; recompute it for the current one
        for g, base, lam in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
            g["lr"] = base * lam(sched.last_epoch)

    def save(row: dict) -> None:
        if ckpt is not None:
            save_checkpoint(ckpt, model, opt, row["epoch"], history, asdict(cfg), scheduler=sched,
                            loader=train_loader, extra={"rank_trace": rank_trace})

    train(model, opt, train_loader, test_loader, cfg.epochs, cfg.device, progress=progress, callback=save,
          start_epoch=start_epoch, history=history, scheduler=sched, rank_trace=rank_trace,
          rank_every=cfg.rank_every)
    metrics = final_metrics(history, cfg, model, extra={"dataset": bundle.name, "n_train": len(bundle.y_train),
                                                       "n_test": len(bundle.y_test)})
    if out_dir is not None:
        with open(out_dir / "metrics.json", "w") as fh:
            json.dump(metrics, fh, indent=2, default=_json_default)
        _write_history_csv(out_dir / "history.csv", history)
        with open(out_dir / "ranks.json", "w") as fh:
            json.dump(rank_trace, fh, default=_json_default)
        if plot:
            plot_ranks(rank_trace, out_dir / "ranks.png", title=f"{cfg.model} / {cfg.method}"
                       + (f" (tau={cfg.tau})" if cfg.method == "tdlrt" else ""))
    metrics["model_object"] = model
    return metrics


# ------------------------------------------------------------------------------------ compare
def compare_methods(
    base: TrainConfig | dict,
    methods: Sequence[str] = ("dense", "tdlrt", "vanilla-tucker", "cp", "matrix"),
    taus: Sequence[float] = (0.1,),
    seeds: int | Sequence[int] = 1,
    out: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> list[dict]:
    """Run TDLRT for every ``tau`` and seed first, then every other method at TDLRT's final conv
    compression (per tau and seed):

    * ``vanilla-tucker`` / ``riemannian-fixed``: the single ``rank_fraction`` whose Tucker conv weight
      count is closest to TDLRT's final conv weight count;
    * ``cp`` / ``matrix``: per layer, ``rank_for_parameter_budget`` of TDLRT's final per-layer count;
    * ``dense``: once per seed (no tau).

    Without ``tdlrt`` in ``methods`` the baselines run once per seed at their own ranks
    (``base.rank`` / ``base.rank_fraction``, default ``rank_fraction=0.25``), with an empty tau. Returns one row per run (``method, tau, seed, test_acc, ..., match``); with ``out`` writes
    ``results.csv``, ``results.md`` and ``accuracy_vs_compression.png`` (and each run's files under
    ``out/runs/``).
    """
    if log is None:
        def log(msg: str) -> None:
            print(msg, flush=True)
    base = TrainConfig.from_dict(base) if isinstance(base, dict) else copy.deepcopy(base)
    methods = list(dict.fromkeys(methods))
    for m in methods:
        _check_method(m)
    if not methods:
        raise ValueError("methods must name at least one method")
    taus = [_check_tau(t) for t in taus]
    if not taus:
        raise ValueError("tau must list at least one value")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("seeds must be >= 1")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} exists and is not a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
    base.validate()

    rows: list[dict] = []
    tdlrt_final: dict[tuple[float, int], dict] = {}
    t_start = time.perf_counter()

    def run(cfg: TrainConfig, tag: str, match: str, tau: Optional[float] = None) -> dict:
        run_out = out_dir / "runs" / tag if out_dir is not None else None
        t0 = time.perf_counter()
        m = run_experiment(cfg, run_out, progress=progress, plot=cfg.method == "tdlrt")
        model = m.pop("model_object")
        row = dict(
            method=cfg.method, tau=tau, seed=cfg.seed,
            test_acc=m["test_acc"], test_loss=m["test_loss"], train_acc=m["train_acc"],
            conv_compression=m["conv_compression"], total_compression=m["total_compression"],
            conv_params=m["conv_params"], total_params=m["total_params"],
            time_per_epoch_s=m["time_per_epoch_s"], epochs=m["epochs"], wall_s=time.perf_counter() - t0,
            match=match, ranks=json.dumps(m["ranks"], separators=(",", ":")),
        )
        rows.append(row)
        log(f"[{time.perf_counter() - t_start:6.0f}s] {tag}: test acc {row['test_acc']:.4f}, conv compression "
            f"{row['conv_compression']:.1%}, {row['time_per_epoch_s']:.1f}s/epoch ({match})")
        return {"metrics": m, "model": model}

    # 1. TDLRT for every tau and seed.
    if "tdlrt" in methods:
        for tau in taus:
            for seed in seed_list:
                cfg = copy.deepcopy(base)
                cfg.method, cfg.tau, cfg.seed, cfg.rank, cfg.layer_ranks = "tdlrt", tau, seed, None, None
                res = run(cfg, f"tdlrt_tau{tau:g}_seed{seed}", "adaptive", tau=tau)
                tdlrt_final[(tau, seed)] = {
                    "conv_params": conv_parameter_counts(res["model"]),
                }
    # 2. dense once per seed.
    if "dense" in methods:
        for seed in seed_list:
            cfg = copy.deepcopy(base)
            cfg.method, cfg.seed, cfg.rank, cfg.rank_fraction, cfg.layer_ranks = "dense", seed, None, None, None
            run(cfg, f"dense_seed{seed}", "none")
    # 3. the fixed-rank baselines at TDLRT's compression.
    dense_ref = None
    # Without TDLRT there is nothing to match: each baseline runs once per seed at its own ranks.
    base_taus = taus if "tdlrt" in methods else [None]
    for method in methods:
        if method in ("dense", "tdlrt"):
            continue
        for tau in base_taus:
            for seed in seed_list:
                cfg = copy.deepcopy(base)
                cfg.method, cfg.seed, cfg.layer_ranks = method, seed, None
                match = "own ranks"
                if (tau, seed) in tdlrt_final:
                    if dense_ref is None:
                        dense_ref = _build_dense(base, _load_data(base))
                    counts = tdlrt_final[(tau, seed)]["conv_params"]
                    cfg.rank = None
                    if method in ("vanilla-tucker", "riemannian-fixed"):
                        cfg.rank_fraction = match_tucker_rank_fraction(dense_ref, sum(counts.values()))
                        match = f"rank_fraction={cfg.rank_fraction:.3f} matched to tdlrt tau={tau:g}"
                    else:
                        cfg.rank_fraction = None
                        cfg.layer_ranks = match_budget_ranks(dense_ref, method, counts)
                        match = f"per-layer ranks matched to tdlrt tau={tau:g}"
                tag = f"{method}_tau{tau:g}_seed{seed}" if tau is not None else f"{method}_seed{seed}"
                run(cfg, tag, match, tau=tau)

    summary = summarize(rows)
    table = markdown_table(summary, base)
    if out_dir is not None:
        cols = ["method", "tau", "seed", "test_acc", "test_loss", "train_acc", "conv_compression",
                "total_compression", "conv_params", "total_params", "time_per_epoch_s", "epochs", "wall_s",
                "match", "ranks"]
        with open(out_dir / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        (out_dir / "results.md").write_text(table + "\n")
        plot_accuracy_vs_compression(summary, out_dir / "accuracy_vs_compression.png",
                                     title=f"{base.model} on {base.data} ({len(seed_list)} seed(s), "
                                           f"{base.epochs} epoch(s))")
    log(table)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Group runs by (method, tau): mean and std (over seeds) of test accuracy and compression."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["tau"]), []).append(r)

    def ms(vals):
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if not vals:
            return float("nan"), float("nan")
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    out = []
    for (method, tau), rs in groups.items():
        acc, acc_sd = ms([r["test_acc"] for r in rs])
        cc, cc_sd = ms([r["conv_compression"] for r in rs])
        tc, tc_sd = ms([r["total_compression"] for r in rs])
        tpe, _ = ms([r["time_per_epoch_s"] for r in rs])
        out.append(dict(method=method, tau=tau, n=len(rs), acc_mean=acc, acc_std=acc_sd, conv_mean=cc,
                        conv_std=cc_sd, total_mean=tc, total_std=tc_sd, time_per_epoch_s=tpe))
    order = {m: i for i, m in enumerate(METHODS)}
    out.sort(key=lambda s: (-1 if s["tau"] is None else s["tau"], order.get(s["method"], 99)))
    return out


def markdown_table(summary: list[dict], cfg: Optional[TrainConfig] = None) -> str:
    """The comparison as a markdown table (one row per method and tau)."""
    lines = []
    if cfg is not None:
        lines.append(f"{cfg.model} on {cfg.data}" + (f" (subset {cfg.subset})" if cfg.subset else "")
                     + f", {cfg.epochs} epoch(s), batch {cfg.batch_size}, lr {cfg.lr}, momentum {cfg.momentum}")
        lines.append("")
    lines.append("| method | tau | seeds | test accuracy (%) | conv compression (%) | total compression (%) | time/epoch (s) |")
    lines.append("|---|---|---|---|---|---|---|")
    for s in summary:
        tau = "-" if s["tau"] is None else f"{s['tau']:g}"
        lines.append(
            f"| {s['method']} | {tau} | {s['n']} | {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f} | "
            f"{100 * s['conv_mean']:.1f} ± {100 * s['conv_std']:.1f} | {100 * s['total_mean']:.1f} | "
            f"{s['time_per_epoch_s']:.1f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plots
def _figure(figsize):
    """A matplotlib Figure with the Agg canvas, without pyplot (no global backend change)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is in the plot/test extras
        raise ImportError('plots need matplotlib: pip install "tucker-manifold[plot]"') from e
    return Figure(figsize=figsize)


def _cmap(name):
    import matplotlib

    return matplotlib.colormaps[name]


def plot_ranks(rank_trace: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Per-layer ranks over training (one line per layer and adaptive/channel mode) to ``path``."""
    fig = _figure((7, 4.2))
    ax = fig.subplots()
    layers = list(rank_trace[-1]["ranks"]) if rank_trace else []
    if not layers:
        ax.text(0.5, 0.5, "no factorized layers (dense model)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        cmap = _cmap("tab10" if len(layers) <= 10 else "tab20")
        x = [t["epoch"] for t in rank_trace]
        for li, name in enumerate(layers):
            nmodes = len(rank_trace[-1]["ranks"][name])
            for mode, style in zip(range(min(nmodes, 2)), ("-", "--")):
                y = [t["ranks"].get(name, [float("nan")] * nmodes)[mode] for t in rank_trace]
                label = f"{name} " + (("out", "in")[mode] if nmodes > 1 else "rank")
                ax.plot(x, y, style, color=cmap(li % cmap.N), label=label, linewidth=1.4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("rank")
        ax.set_yscale("log", base=2)
        from matplotlib.ticker import ScalarFormatter

        ax.yaxis.set_major_formatter(ScalarFormatter())  # 4, 8, 16 rather than 2^2, 2^3, 2^4
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(layers) > 4 else 1, loc="best")
    ax.set_title(title or "ranks during training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_accuracy_vs_compression(summary: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Mean test accuracy vs mean conv compression with std error bars, one series per method
    (the paper's Figure 1 style); dense is a horizontal reference line."""
    fig = _figure((6.5, 4.2))
    ax = fig.subplots()
    markers = dict(zip(METHODS, "*osD^v"))
    for method in dict.fromkeys(s["method"] for s in summary):
        pts = sorted((s for s in summary if s["method"] == method), key=lambda s: s["conv_mean"])
        xs = [100 * s["conv_mean"] for s in pts]
        ys = [100 * s["acc_mean"] for s in pts]
        if method == "dense":
            ax.axhline(ys[0], color="k", linestyle=":", linewidth=1, label=f"dense ({ys[0]:.1f}%)")
            if pts[0]["acc_std"] > 0:
                ax.axhspan(ys[0] - 100 * pts[0]["acc_std"], ys[0] + 100 * pts[0]["acc_std"], color="k", alpha=0.06)
            continue
        ax.errorbar(xs, ys, yerr=[100 * s["acc_std"] for s in pts], xerr=[100 * s["conv_std"] for s in pts],
                    marker=markers.get(method, "o"), capsize=3, linestyle="-", label=method)
        if method == "tdlrt":
            for s, x_, y_ in zip(pts, xs, ys):
                ax.annotate(f"τ={s['tau']:g}", (x_, y_), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("conv compression (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "accuracy vs compression")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
