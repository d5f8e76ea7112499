"""A bank of 8 Tucker tensors in ONE geoopt ManifoldParameter, fitted jointly with RiemannianAdam.

FixedRankTucker follows geoopt's batch convention: a tensor of shape ``(8, M.packed_size)`` is 8
points of the manifold (leading dimensions are batch dimensions), so a bank of Tucker tensors (the
heads of an attention layer, the groups of a grouped convolution, an ensemble) is one parameter and
every geometric operation of a step runs batched. Here 8 targets A_k of shape (16, 16, 3, 3) and
multilinear rank (4, 4, 3, 3) are fitted from random starts by minimizing

    f(X_1..X_8) = 0.5 * sum_k || X_k - A_k ||_F^2      over 8 tensors of multilinear rank (4, 4, 3, 3)

with ``geoopt.optim.RiemannianAdam``. Adam's second moment comes from ``M.component_inner``, one scalar
per point, so each tensor of the bank gets its own step size: the iterates equal 8 separate
parameters (tests/test_manifold_geoopt_suite.py checks it). Prints the relative errors
``||X_k - A_k|| / ||A_k||`` of all 8 tensors; writes nothing to disk.

TDLRT and the Tucker layers take single points: a batched Tucker parameter is for geoopt's optimizers.

    python examples/geoopt_batched.py [--steps 120] [--seed 0] [--lr 0.1] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import geoopt
import torch

import tucker_manifold as tm

SHAPE, RANKS, BANK = (16, 16, 3, 3), (4, 4, 3, 3), 8


def unit_points(m: tm.FixedRankTucker, x: torch.Tensor) -> torch.Tensor:
    """Rescale each core of a batch ``(..., packed_size)`` so that every tensor has norm 1."""
    core, factors = m.unpack(x)
    norms = core.flatten(x.ndim - 1).norm(dim=-1)
    return m.pack(core / norms.view(*norms.shape, *[1] * m.order), factors)


def relative_errors(m: tm.FixedRankTucker, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``(bank,)``: ``||to_dense(x_k) - A_k|| / ||A_k||``."""
    with torch.no_grad():
        return (m.to_dense(x) - a).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the targets and the starts")
    parser.add_argument("--lr", type=float, default=0.1, help="RiemannianAdam learning rate (targets have norm 1)")
    parser.add_argument("--print-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small operations: one is fastest)")
    args = parser.parse_args(argv)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(old_threads)


def _run(args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    m = tm.FixedRankTucker(SHAPE, RANKS)
    # random(*size) as in geoopt: the full output shape, here a bank of BANK packed points
    a = m.to_dense(unit_points(m, m.random(BANK, m.packed_size, generator=g, dtype=torch.float64)))
    x0 = unit_points(m, m.random(BANK, m.packed_size, generator=g, dtype=torch.float64))
    initial = relative_errors(m, x0, a)
    p = geoopt.ManifoldParameter(x0, manifold=m)  # shape (8, packed_size): one parameter, 8 points
    # beta1 = 0.5: near the solution momentum sets the linear rate (about sqrt(beta1) per step)
    opt = geoopt.optim.RiemannianAdam([p], lr=args.lr, betas=(0.5, 0.999))

    history = []
    print(f"bank of {BANK} tensors {SHAPE}, multilinear rank {RANKS}: parameter shape {tuple(p.shape)}")
    print(f"{'step':>6} {'loss':>11} {'max rel err':>12} {'median rel err':>15}")
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.print_every == 0 or step == args.steps:
            rel = relative_errors(m, p, a)
            loss = 0.5 * (m.to_dense(p.detach()) - a).square().sum().item()
            history.append((step, loss, rel.max().item(), rel.median().item()))
            print(f"{step:6d} {loss:11.3e} {rel.max().item():12.3e} {rel.median().item():15.3e}")
        if step == args.steps:
            break
        opt.zero_grad()
        loss = 0.5 * (m.to_dense(p) - a).square().sum()  # one loss for the bank: the sum of the 8 losses
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    rel = relative_errors(m, p, a)
    print("relative errors per tensor: " + " ".join(f"{e:.1e}" for e in rel.tolist()))
    print(f"{args.steps} steps in {elapsed:.1f} s")
    return {
        "steps": args.steps,
        "initial_rel_errors": initial.tolist(),
        "final_rel_errors": rel.tolist(),
        "on_manifold": bool(m.check_point_on_manifold(p.detach())),
        "seconds": elapsed,
        "history": history,
    }


if __name__ == "__main__":
    main()
