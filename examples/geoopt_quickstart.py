"""Tucker tensor completion with geoopt's RiemannianAdam on the FixedRankTucker manifold.

A random 4-way tensor A of multilinear rank (3, 3, 3, 3) and shape (20, 20, 20, 20) is observed on 20%
of its entries. We minimize

    f(X) = 0.5 * || mask * (X - A) ||_F^2      over tensors X of multilinear rank (3, 3, 3, 3)

with ``geoopt.optim.RiemannianAdam`` on a ``geoopt.ManifoldParameter`` whose manifold is
``FixedRankTucker``. The loss is written on the dense tensor ``M.to_dense(p)``; autograd returns the
gradient with respect to the packed point and geoopt turns it into a Riemannian step.

Start: the truncated HOSVD of the zero-filled observations divided by the observed fraction, the
standard spectral initialization for completion.

    python examples/geoopt_quickstart.py [--steps 300] [--seed 0] [--lr 0.15] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import geoopt
import torch

import tucker_manifold as tm


def make_problem(shape, ranks, fraction, seed, dtype=torch.float64):
    """Target A (unit RMS), boolean mask of observed entries, spectral start point (packed)."""
    g = torch.Generator().manual_seed(seed)
    m = tm.FixedRankTucker(shape, ranks)
    a = m.to_dense(m.random(generator=g, dtype=dtype))
    a = a / a.square().mean().sqrt()
    mask = torch.rand(shape, generator=g, dtype=dtype) < fraction
    x0 = m.from_dense(torch.where(mask, a, torch.zeros_like(a)) / fraction)
    return m, a, mask, x0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the target, the mask and the start")
    parser.add_argument(
        "--lr", type=float, default=0.15,
        help="RiemannianAdam learning rate, relative to the norm of the target estimated from the observations",
    )
    parser.add_argument("--fraction", type=float, default=0.2, help="fraction of observed entries")
    parser.add_argument("--print-every", type=int, default=25)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (the operations are small: one thread is fastest and immune to oversubscribed cores)",
    )
    args = parser.parse_args(argv)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(old_threads)


def _run(args) -> dict:

    shape, ranks = (20, 20, 20, 20), (3, 3, 3, 3)
    m, a, mask, x0 = make_problem(shape, ranks, args.fraction, args.seed)
    hidden = ~mask
    p = geoopt.ManifoldParameter(x0, manifold=m)
    # Adam's steps have a length of about lr (Frobenius norm of the tangent step), whatever the gradient's
    # scale: so the learning rate is set relative to ||A||, estimated from the observed entries alone.
    scale = (a[mask].norm() / args.fraction**0.5).item()
    opt = geoopt.optim.RiemannianAdam([p], lr=args.lr * scale)
    # A decaying step size: Adam's normalized steps would otherwise stall at an O(lr) error.
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1 / max(args.steps, 1)))

    def test_error() -> float:
        with torch.no_grad():
            x = m.to_dense(p)
            return ((x - a)[hidden].norm() / a[hidden].norm()).item()

    history = []
    print(f"{'step':>6} {'train loss':>12} {'test rel err':>13}")
    start = time.perf_counter()
    first_loss = None
    for step in range(args.steps + 1):
        opt.zero_grad()
        loss = 0.5 * ((m.to_dense(p) - a)[mask] ** 2).sum()
        if first_loss is None:
            first_loss = loss.item()
        if step % args.print_every == 0 or step == args.steps:
            err = test_error()
            history.append((step, loss.item(), err))
            print(f"{step:6d} {loss.item():12.4e} {err:13.4e}")
        if step == args.steps:
            break
        loss.backward()
        opt.step()
        sched.step()
    elapsed = time.perf_counter() - start
    final = {
        "steps": args.steps,
        "initial_loss": first_loss,
        "final_loss": history[-1][1],
        "initial_test_error": history[0][2],
        "final_test_error": history[-1][2],
        "seconds": elapsed,
        "on_manifold": bool(m.check_point_on_manifold(p.detach())),
        "history": history,
    }
    print(f"final relative test error {final['final_test_error']:.3e} after {args.steps} steps ({elapsed:.1f} s)")
    return final


if __name__ == "__main__":
    main()
