"""Data-parallel runs: ``torchrun --nproc-per-node N -m tucker_manifold.cli train ...`` (or
``tucker-manifold train --nproc N``, which starts torchrun itself), and what the runner and the loop
need under it.

How a run with ``N`` processes works (every choice is one the single-process run makes too):

* **Init** (:func:`init_from_env`): from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR/PORT``); gloo on CPU, NCCL on CUDA (each process on ``cuda:LOCAL_RANK``).
* **Data** (:func:`distributed_loaders`): ``batch_size`` is the GLOBAL batch; each rank takes
  ``batch_size / N`` (a ValueError unless it divides) from a ``DistributedSampler`` seeded with the
  run's seed on every rank, re-shuffled by ``set_epoch`` each epoch. Step ``k`` then sees exactly the
  images of the global batch ``k`` of one permutation, split across the ranks. The order is a
  function of (seed, epoch) alone, so a resumed run needs no loader state; it differs from the
  single-process loader's order (another generator), so N = 1 and N = 2 runs see different batches.
  The sampler pads the data to a multiple of N by repeating its first images.
* **Gradients**: TDLRT and ParallelTDLRT average their own (they must: ranks change shapes, and the
  one-pass core gradients come from per-rank records): the loop hands them the group
  (:func:`attach_process_group`). Every other optimizer (dense, vanilla-tucker, cp, ...) gets its
  gradients averaged by the loop with the same :func:`tucker_manifold.distributed.average_gradients`
  (one flattened all-reduce per closure call) rather than torch DDP: one code path for every method,
  parameters that may change shape, and a communication time that is easy to measure. DDP would
  overlap the all-reduce with the backward; on these small nets the gain is small.
* **BatchNorm**: by default each rank normalizes with its own batch's statistics (per-rank
  statistics, as DDP does) and the running statistics are averaged over the ranks at every epoch end
  (:func:`average_bn_statistics`), so evaluation, checkpoints and resumes see one model.
  ``sync_bn=True`` (``--sync-bn``) converts the BatchNorm layers to ``nn.SyncBatchNorm`` (statistics
  of the global batch in every forward: equal to one process, one more all-reduce per BN layer);
  torch supports it on GPUs only.
* **Metrics**: train loss/accuracy are summed over ranks at each epoch end; the test set is split
  across the ranks (rank ``r`` takes images ``r, r + N, ...``) and the sums are all-reduced, so the
  test accuracy is that of the whole test set, the same number one process computes for these
  weights. Every rank gets the same history.
* **Outputs**: only rank 0 writes (checkpoints, metrics, plots) and logs; all ranks hold identical
  weights (checked after set-up and after every epoch, :func:`check_replicas_identical`), so a
  checkpoint written by N processes is the model, and loads in any number of processes, 1 included.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistContext",
    "env_world_size",
    "init_from_env",
    "current",
    "shutdown",
    "distributed_loaders",
    "check_global_batch",
    "attach_process_group",
    "all_reduce_sums",
    "average_bn_statistics",
    "replica_tensors",
    "convert_sync_bn",
    "launch",
]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``; ``group`` is ``None`` for one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    group: Any = None
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes and logs."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def current() -> DistContext:
    """The context of the initialized default group (``DistContext()`` for one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return DistContext()
    rank = dist.get_rank()
    return DistContext(rank=rank, world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", rank)), group=dist.group.WORLD,
                       backend=str(dist.get_backend()))


def init_from_env(device: str | torch.device | None = "cpu") -> DistContext:
    """Initialize the default process group from torchrun's environment when ``WORLD_SIZE > 1`` (gloo
    for a CPU ``device``, NCCL for CUDA, after ``torch.cuda.set_device(LOCAL_RANK)`` so that ``"cuda"``
    means this process's GPU); already initialized or one process: nothing to do."""
    if env_world_size() > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        dev = torch.device(device if device is not None else "cpu")
        if dev.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local}: only {torch.cuda.device_count()} CUDA device(s); start at "
                                 "most one process per GPU (--nproc-per-node)")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return current()


def shutdown() -> None:
    """Destroy the default process group if one is initialized."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------ data
def check_global_batch(batch_size: int, world_size: int) -> int:
    """The per-rank batch ``batch_size / world_size``; ValueError naming ``batch_size`` unless it divides."""
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} is the global batch and must be divisible by the number of "
                         f"processes ({world_size}); e.g. batch_size={world_size * max(1, batch_size // world_size)}")
    return batch_size // world_size


def distributed_loaders(bundle, batch_size: int, seed: int, ctx: DistContext):
    """``(train_loader, test_loader)`` of this rank: the training loader over a ``DistributedSampler``
    (shuffled with ``seed`` on every rank, per-rank batch ``batch_size / N``; call
    ``loader.sampler.set_epoch(e)`` each epoch) and the rank's strided share of the test set."""
    from torch.utils.data import DataLoader, Subset, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    per_rank = check_global_batch(batch_size, ctx.world_size)
    train_set = TensorDataset(bundle.x_train, bundle.y_train)
    sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                                 drop_last=False)
    train = DataLoader(train_set, batch_size=per_rank, sampler=sampler)
    test_set = TensorDataset(bundle.x_test, bundle.y_test)
    test = DataLoader(Subset(test_set, range(ctx.rank, len(test_set), ctx.world_size)), batch_size=batch_size,
                      shuffle=False)
    return train, test


# ------------------------------------------------------------------------------------ training
def attach_process_group(optimizer: torch.optim.Optimizer, group: Any) -> bool:
    """Give ``group`` to an optimizer that averages its own gradients (TDLRT, ParallelTDLRT: a
    ``process_group`` attribute, read at every step) and return True; False for any other optimizer
    (the loop then averages for it). An optimizer already holding another group is a ValueError."""
    if not hasattr(optimizer, "process_group"):
        return False
    held = optimizer.process_group
    if held is None:
        optimizer.process_group = group
    elif held is not group:
        raise ValueError("optimizer: its process_group is not the run's group")
    return True


def all_reduce_sums(values: Sequence[float], group: Any, device: torch.device | str = "cpu") -> list[float]:
    """Sums of ``values`` over ``group`` (float64, one all-reduce; ``values`` unchanged without a group)."""
    if group is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t.tolist()


def average_bn_statistics(model: nn.Module, group: Any) -> None:
    """Average the running mean and variance of every BatchNorm layer over ``group`` in place (one
    flattened all-reduce; a no-op without a group). Ranks that hold equal statistics keep them
    bit-identical ((a + a) / 2 = a)."""
    if group is None:
        return
    bufs = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]
    if not bufs:
        return
    dtype = torch.float64 if any(b.dtype == torch.float64 for b in bufs) else torch.float32
    flat = torch.cat([b.detach().reshape(-1).to(dtype) for b in bufs])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(dist.get_world_size(group))
    offset = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def replica_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What must be identical on every rank: the parameters (Tucker ranks are their sizes) and the
    BatchNorm running statistics (other buffers, e.g. the layers' ``tucker_ranks`` copies, are written
    lazily for ``state_dict`` and may lag on ranks that never save)."""
    bn = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
          for b in (m.running_mean, m.running_var) if b is not None]
    return [*model.parameters(), *bn]


def convert_sync_bn(model: nn.Module, device: torch.device | str, group: Any = None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` (the parameters stay the same objects, so an
    optimizer built before keeps them); ValueError on a non-CUDA device, where torch's SyncBatchNorm
    refuses to run."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"sync_bn=True needs CUDA devices (nn.SyncBatchNorm runs on GPUs only); got device "
                         f"{str(device)!r}. On CPU the BatchNorm statistics are per rank, averaged at every epoch end")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)


# ------------------------------------------------------------------------------------ launcher
def launch(nproc: int, argv: Sequence[str], module: str = "tucker_manifold.cli") -> int:
    """Run ``python -m module *argv`` in ``nproc`` processes through torchrun (``torch.distributed.run``,
    standalone rendezvous on a free local port); returns 0, or 1 if a process failed (its error went to
    stderr)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", module, *argv])
    try:
        run(args)
    except ChildFailedError:
        return 1
    return 0
