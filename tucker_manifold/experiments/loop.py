"""The one training loop every method goes through, so that comparisons are fair: same data order,
loss, evaluation and bookkeeping; each step calls ``optimizer.step(closure)`` (TDLRT evaluates the
closure twice, every other optimizer once).

Progress: a tqdm bar on a terminal (``progress=None`` decides by whether the bar's stream is a TTY;
``True`` forces it, ``False`` turns it off), and one log line per epoch on the
``tucker_manifold.experiments`` logger in every case. Showing the bar never changes a result: the loop
makes the one ``iter(loader)`` of the epoch itself and the bar only wraps that iterator (tqdm.auto's
bar calls ``iter(loader)`` a second time when it is created, which draws once more from the loader's
shuffling generator and changed every later epoch's order).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# nn.compression_rate, with pruned (masked) weights counted by their nonzeros: one accounting for all
from ..pruning import pruned_compression_rate as compression_rate
from ..amp import MixedPrecision
from ..layout import to_layout
from ..distributed import average_gradients, check_replicas_identical
from .accounting import layer_ranks, rank_summary
from .launch import all_reduce_sums, attach_process_group, average_bn_statistics, replica_tensors

__all__ = ["train", "evaluate", "show_progress", "frozen_bn_stats"]

logger = logging.getLogger("tucker_manifold.experiments")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", *,
             process_group: Any = None, precision: Optional[MixedPrecision] = None,
             memory_format: Optional[str] = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (eval mode; the mode is restored).
    ``(nan, nan)`` for an empty loader. ``process_group``: ``loader`` is this rank's share and the sums
    are all-reduced (every rank gets the whole set's numbers). ``precision``: its autocast.
    ``memory_format``: layout of the 4-D inputs (:mod:`tucker_manifold.layout`; None: as loaded)."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    try:
        for x, y in loader:
            x, y = to_layout(x.to(device), memory_format), y.to(device)
            with precision.autocast() if precision is not None else contextlib.nullcontext():
                out = model(x)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
    finally:
        model.train(was_training)
    if process_group is not None:
        loss_sum, correct, total = all_reduce_sums([loss_sum, correct, total], process_group, device)
    if total == 0:
        return float("nan"), float("nan")
    return loss_sum / total, correct / total


class frozen_bn_stats:
    """Context manager: BatchNorm layers in training mode normalize with the batch statistics, and their
    running statistics are put back exactly as they were afterwards."""

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


def show_progress(progress: Optional[bool], stream: Any = None) -> bool:
    """Whether to draw a bar: ``progress`` if given, else whether ``stream`` (default ``sys.stderr``,
    where tqdm writes) is a terminal."""
    if progress is not None:
        return bool(progress)
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def _bar(iterator, total: Optional[int], desc: str):
    # tqdm.std, not tqdm.auto: tqdm.auto's class calls iter() on its argument in __init__.
    from tqdm.std import tqdm

    return tqdm(iterator, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable,
    test_loader: Optional[Iterable],
    epochs: int,
    device: str | torch.device = "cpu",
    *,
    progress: Optional[bool] = None,
    callback: Optional[Callable[[dict], Any]] = None,
    start_epoch: int = 0,
    history: Optional[list[dict]] = None,
    scheduler: Any = None,
    rank_trace: Optional[list[dict]] = None,
    rank_every: int = 10,
    loss_fn: Callable = F.cross_entropy,
    precision: Optional[MixedPrecision] = None,
    process_group: Any = None,
    memory_format: Optional[str] = None,
) -> list[dict]:
    """Train for epochs ``start_epoch + 1 .. epochs`` (``epochs`` is the total, so a resumed run passes
    the epochs already done as ``start_epoch``) and return ``history`` with one row per epoch appended:

    ``epoch, train_loss, train_acc, test_loss, test_acc, conv_compression, total_compression,
    conv_params, total_params, ranks (name -> list), epoch_time_s (training only), eval_time_s,
    skipped_steps, lr``.

    Train loss/accuracy are those of the first forward of each step (before the update).
    ``rank_trace``, if a list, receives ``{"step", "epoch", "ranks"}`` every ``rank_every`` steps and at
    each epoch end. ``callback(row)`` runs after each epoch (e.g. to save a checkpoint), after
    ``scheduler.step()``. ``progress``: see the module docstring.

    BatchNorm running statistics are updated once per step whatever the optimizer: TDLRT's second
    forward evaluates the same network (the lift is exact) on the same batch, and letting it update the
    statistics again would double their momentum for TDLRT only.

    ``precision``: a :class:`~tucker_manifold.amp.MixedPrecision` (autocast forward and evaluation,
    scaled backward and step for fp16; default fp32). ``process_group``: data parallel over the group
    (:mod:`.launch`): ``train_loader`` / ``test_loader`` are this rank's shares (a sampler with
    ``set_epoch`` is re-seeded every epoch), TDLRT-family optimizers get the group and average their own
    gradients, every other optimizer's are averaged here after each backward (one all-reduce), and at
    each epoch end the train metrics are summed and the BatchNorm running statistics averaged over
    the ranks. ``memory_format``: ``"channels_last"`` or ``"contiguous"`` (:mod:`tucker_manifold.layout`):
    the model's 4-D weights and every 4-D input batch are put in it; ``None`` leaves both as they are.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
        raise ValueError(f"start_epoch must be an int >= 0, got {start_epoch!r}")
    history = [] if history is None else history
    device = torch.device(device)
    model.to(device)
    to_layout(model, memory_format)
    try:
        n_batches: Optional[int] = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        n_batches = None
    global_step = start_epoch * (n_batches or 0)
    if rank_trace is not None and not rank_trace:
        rank_trace.append({"step": global_step, "epoch": float(start_epoch), "ranks": layer_ranks(model)})
    bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    draw_bar = show_progress(progress)
    amp = precision if precision is not None else MixedPrecision("fp32", device)
    # TDLRT averages its own gradients (in every pass, and its one-pass core gradients); others here
    loop_averages = process_group is not None and not attach_process_group(optimizer, process_group)
    all_params = [p for g in optimizer.param_groups for p in g["params"]]
    sampler = getattr(train_loader, "sampler", None)

    for epoch in range(start_epoch + 1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, total = 0.0, 0, 0
        if callable(getattr(sampler, "set_epoch", None)):  # DistributedSampler: the epoch's permutation
            sampler.set_epoch(epoch - 1)
        batches = iter(train_loader)  # the epoch's only iter(): it draws the shuffle from the loader's generator
        bar = _bar(batches, n_batches, f"epoch {epoch}/{epochs}") if draw_bar else None
        for i, (x, y) in enumerate(bar if bar is not None else batches):
            x, y = to_layout(x.to(device, non_blocking=True), memory_format), y.to(device, non_blocking=True)
            first: dict = {}

            def closure():
                optimizer.zero_grad(set_to_none=True)
                # a second evaluation in the same step (TDLRT's pass 2) leaves BatchNorm's statistics alone
                with frozen_bn_stats(bn_layers if first else ()):
                    with amp.autocast():
                        out = model(x)
                        loss = loss_fn(out, y)
                    amp.backward(loss)  # before the restore: autograd saved the statistics' versions
                if loop_averages:
                    average_gradients(all_params, process_group)
                if not first:  # statistics of the pre-update forward (TDLRT's pass 1)
                    first["loss"] = loss.detach()
                    first["correct"] = (out.detach().argmax(1) == y).sum()
                return loss

            amp.step(optimizer, closure)
            global_step += 1
            bs = y.numel()
            loss_v = float(first["loss"])
            if math.isfinite(loss_v):
                loss_sum += loss_v * bs
            correct += int(first["correct"])
            total += bs
            if rank_trace is not None and rank_every > 0 and global_step % rank_every == 0:
                rank_trace.append({"step": global_step, "epoch": (epoch - 1) + (i + 1) / (n_batches or (i + 1)),
                                   "ranks": layer_ranks(model)})
            if bar is not None and (i % 10 == 0 or (n_batches and i == n_batches - 1)):
                bar.set_postfix_str(
                    f"loss={loss_sum / max(total, 1):.3f} acc={correct / max(total, 1):.3f} "
                    f"cr={compression_rate(model)['conv']:.1%} r={rank_summary(layer_ranks(model))}", refresh=False)
        if bar is not None:
            bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0
        lr = float(optimizer.param_groups[0]["lr"])
        if scheduler is not None:
            scheduler.step()
        if process_group is not None:  # one model and one history on every rank
            loss_sum, correct, total = all_reduce_sums([loss_sum, correct, total], process_group, device)
            average_bn_statistics(model, process_group)
            check_replicas_identical(replica_tensors(model), process_group)  # raises if they drifted
        t1 = time.perf_counter()
        test_loss, test_acc = (evaluate(model, test_loader, device, process_group=process_group, precision=amp,
                                        memory_format=memory_format)
                               if test_loader is not None else (float("nan"),) * 2)
        eval_time = time.perf_counter() - t1
        comp = compression_rate(model)
        ranks_now = layer_ranks(model)
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
            skipped_steps=int(getattr(optimizer, "skipped_steps", 0)) + amp.skipped_steps,
            lr=lr,
        )
        history.append(row)
        if rank_trace is not None and (not rank_trace or rank_trace[-1]["step"] != global_step):
            rank_trace.append({"step": global_step, "epoch": float(epoch), "ranks": ranks_now})
        logger.info(
            "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | conv compression %.1f%% | "
            "ranks %s | %.1fs", epoch, epochs, row["train_loss"], row["train_acc"], test_loss, test_acc,
            100 * comp["conv"], rank_summary(ranks_now), epoch_time,
        )
        if callback is not None:
            callback(row)
    return history
