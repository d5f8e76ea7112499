"""Data-parallel helpers for the optimizers: every process must see the same averaged gradients, so
that each builds bit-identical bases, ranks and cores (TDLRT changes parameter shapes, which rules out
DDP's fixed gradient buckets; the optimizer synchronizes instead).

* :func:`average_gradients`: ONE flattened all-reduce per gradient evaluation, carrying the gradients,
  which parameters have one, the loss and a non-finite flag, so that a NaN on one rank makes every
  rank skip the step.
* :func:`check_replicas_identical`: a debug check that all-reduces checksums of parameters and ranks.

The loss and batch-norm statistics stay the user's business: average the loss over the *global* batch
(each rank's mean loss on an equal share, as DDP does) and use ``nn.SyncBatchNorm`` or accept
per-rank statistics.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["world_size", "average_gradients", "check_replicas_identical"]


def world_size(group: Optional[object]) -> int:
    """Number of processes in ``group`` (1 when ``group`` is None or torch.distributed is not initialized)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _buffer_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    # Reduce in the widest floating dtype present (never in half: sums of many half values overflow).
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def average_gradients(
    params: Sequence[torch.Tensor], group: object, loss: Optional[torch.Tensor] = None
) -> tuple[Optional[torch.Tensor], bool]:
    """Average ``p.grad`` over ``group`` in place, for every ``p`` in ``params``, in one all-reduce.

    A parameter whose gradient is ``None`` on every rank keeps ``None``; one that has a gradient on some
    ranks only gets the sum over those ranks divided by the world size (missing = zero, as DDP does).
    Returns ``(mean loss over ranks or None, every rank's loss and gradients finite)``; all ranks get the
    same answer.
    """
    n = world_size(group)
    grads = [p.grad for p in params]
    ref = [g for g in grads if g is not None] + ([loss.detach()] if loss is not None else [])
    device = ref[0].device if ref else (params[0].device if params else torch.device("cpu"))
    dtype = _buffer_dtype(ref) if ref else torch.float32
    local_bad = any(not bool(torch.isfinite(t).all()) for t in ref)
    # Every parameter takes its slot (zeros where this rank has no gradient), so that the buffer has the
    # same layout on every rank whatever each one's autograd produced.
    pieces = [
        g.reshape(-1).to(dtype) if g is not None else torch.zeros(p.numel(), dtype=dtype, device=device)
        for p, g in zip(params, grads)
    ]
    tail = torch.tensor(
        [float(g is not None) for g in grads]
        + [float(loss.detach()) if loss is not None else 0.0, float(local_bad)],
        dtype=dtype, device=device,
    )
    flat = torch.cat(pieces + [tail])
    if n > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    counts = flat[flat.numel() - tail.numel():][: len(params)].tolist()
    for p, c in zip(params, counts):
        k = p.numel()
        if c > 0:
            avg = flat[offset:offset + k].view(p.shape).div(n)
            if p.grad is None:
                p.grad = avg.to(p.dtype).clone()
            else:
                p.grad.copy_(avg)
        offset += k
    tail = flat[offset:]
    mean_loss = (tail[len(params)] / n).to(loss.dtype) if loss is not None else None
    ok = bool(tail[len(params) + 1] == 0) and bool(torch.isfinite(flat).all())
    return mean_loss, ok


def _checksum(p: torch.Tensor) -> list[float]:
    x = p.detach().reshape(-1).to(torch.float64)
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
    return [float(x.numel()), float(x.sum()), float((x * x).sum()), float((x * w).sum())]


def check_replicas_identical(params: Sequence[torch.Tensor], group: object) -> None:
    """Raise ``RuntimeError`` unless every rank holds identical ``params`` (sizes and values, through
    float64 checksums; Tucker parameters' ranks are in their sizes). One MAX and one MIN all-reduce."""
    if world_size(group) == 1:
        return
    rows = [_checksum(p) for p in params]
    dev = params[0].device if params else torch.device("cpu")
    v = torch.tensor(rows, dtype=torch.float64, device=dev).reshape(-1)
    hi, lo = v.clone(), v.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    diff = (hi - lo).reshape(-1, 4)
    bad = torch.nonzero(diff.abs().amax(dim=1) > 0).reshape(-1)
    if bad.numel():
        i = int(bad[0])
        raise RuntimeError(
            f"replicas disagree after the step: parameter #{i} (size on this rank {int(rows[i][0])}) differs "
            f"between ranks ({bad.numel()} parameter(s) in all); bases or ranks drifted apart"
        )
