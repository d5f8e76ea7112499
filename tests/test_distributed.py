"""torch.distributed helpers on gloo, 2 processes spawned inside the test (float64)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tucker_manifold.distributed import average_gradients, check_replicas_identical, world_size

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _worker_average(rank: int, world: int, init_file: str, out: str, nan_on: int) -> None:
    _init(rank, world, init_file)
    try:
        g = torch.Generator().manual_seed(100 + rank)
        a = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        c = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # a grad on rank 0 only
        never = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        a.grad = torch.randn(3, 4, generator=g, dtype=torch.float64)
        b.grad = torch.randn(5, generator=g, dtype=torch.float64)
        if rank == 0:
            c.grad = torch.ones(2, dtype=torch.float64)
        if rank == nan_on:
            b.grad[1] = float("nan")
        loss = torch.tensor(1.0 + rank, dtype=torch.float64)
        mean_loss, ok = average_gradients([a, b, c, never], None if world == 1 else dist.group.WORLD, loss)
        torch.save({"a": a.grad, "b": b.grad, "c": c.grad, "never_none": torch.tensor(never.grad is None),
                    "loss": mean_loss, "ok": torch.tensor(ok)}, f"{out}.{rank}")
        same = torch.zeros(4, dtype=torch.float64)
        check_replicas_identical([same], dist.group.WORLD)
        differ = torch.full((4,), float(rank), dtype=torch.float64)
        try:
            check_replicas_identical([same, differ], dist.group.WORLD)
            raised = False
        except RuntimeError as e:
            raised = "parameter #1" in str(e)
        torch.save(torch.tensor(raised), f"{out}.raised.{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(fn, tmp_path, *args):
    init_file = str(tmp_path / "init")
    out = str(tmp_path / "out")
    mp.start_processes(fn, args=(2, init_file, out, *args), nprocs=2, join=True, start_method="spawn")
    return out


def test_world_size_without_group_is_one():
    assert world_size(None) == 1


def test_average_gradients_one_allreduce_matches_manual_mean(tmp_path):
    out = _spawn(_worker_average, tmp_path, -1)
    r = [torch.load(f"{out}.{k}", weights_only=True) for k in range(2)]
    ga = [torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + k), dtype=torch.float64) for k in range(2)]
    gens = [torch.Generator().manual_seed(100 + k) for k in range(2)]
    for gk in gens:
        torch.randn(3, 4, generator=gk, dtype=torch.float64)
    gb = [torch.randn(5, generator=gk, dtype=torch.float64) for gk in gens]
    for k in range(2):
        torch.testing.assert_close(r[k]["a"], (ga[0] + ga[1]) / 2, rtol=0, atol=1e-15)
        torch.testing.assert_close(r[k]["b"], (gb[0] + gb[1]) / 2, rtol=0, atol=1e-15)
        torch.testing.assert_close(r[k]["c"], torch.full((2,), 0.5, dtype=torch.float64))  # missing = zero
        assert bool(r[k]["never_none"])  # no rank had one: stays None
        assert float(r[k]["loss"]) == 1.5 and bool(r[k]["ok"])
        assert bool(torch.load(f"{out}.raised.{k}", weights_only=True))
    assert torch.equal(r[0]["a"], r[1]["a"]) and torch.equal(r[0]["b"], r[1]["b"])


def test_nan_on_one_rank_is_seen_by_every_rank(tmp_path):
    out = _spawn(_worker_average, tmp_path, 1)
    for k in range(2):
        assert not bool(torch.load(f"{out}.{k}", weights_only=True)["ok"])
