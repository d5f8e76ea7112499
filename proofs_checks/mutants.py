"""Deliberately broken integrators, to show that every verdict of the checks can fail.

Each mutant is a small optimizer class with the factory signature of the checks
(``Mutant(params, *, lr, tau, momentum=0.0, rmax=None)``; see :mod:`proofs_checks.common`). None of them
is a switch inside the library: the ones built on :class:`~tucker_manifold.optim.TDLRT` only change what
its public ``step`` is given (step size, tolerance, optimizer state); the others are written here from the
public pieces (:mod:`tucker_manifold.flow`, :func:`tucker_manifold.parameter.set_point`).

``tests/test_proofs_mutations.py`` runs every check's quick setting against them and asserts the cells of
:data:`EXPECTED_CAUGHT`; :mod:`proofs_checks.report` prints the whole verdict-by-mutant table.
"""
from __future__ import annotations

from typing import Callable, Optional

import geoopt
import torch

from tucker_manifold.flow import enforce_multilinear_ranks, truncate_core
from tucker_manifold.optim import TDLRT
from tucker_manifold.parameter import is_tucker_parameter, rank_bounds, set_point
from tucker_manifold.tucker import orthonormalize

__all__ = ["Frozen", "FixedBasis", "TooLong", "IgnoresTau", "WrongSign", "MomentumReset", "BrokenLift",
           "FactorEuler", "vanilla", "riemannian_sgd", "MUTANTS", "EXPECTED_CAUGHT"]


def _closure_loss(closure: Callable) -> torch.Tensor:
    with torch.enable_grad():
        loss = closure()
    return loss.detach()


class Frozen(torch.optim.Optimizer):
    """``step`` evaluates the loss and changes nothing (an integrator that never moves)."""

    def __init__(self, params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
        super().__init__(params, dict(lr=lr, tau=tau))

    @torch.no_grad()
    def step(self, closure: Callable) -> torch.Tensor:  # type: ignore[override]
        return _closure_loss(closure)


class FixedBasis(torch.optim.Optimizer):
    """The core step only: SGD (with momentum) on the core of every Tucker parameter, bases never
    augmented nor rotated, rank fixed; plain SGD on the other parameters."""

    def __init__(self, params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
        super().__init__(params, dict(lr=lr, tau=tau, momentum=momentum))

    @torch.no_grad()
    def step(self, closure: Callable) -> torch.Tensor:  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if is_tucker_parameter(p):
                    core, factors = p.manifold.unpack(p.data)
                    g = p.manifold.unpack(p.grad, "grad")[0]
                    set_point(p, core - group["lr"] * self._velocity(p, g, group["momentum"]), factors)
                else:
                    p.sub_(group["lr"] * self._velocity(p, p.grad, group["momentum"]))
        return loss

    def _velocity(self, p, g, momentum):
        if momentum == 0:
            return g
        buf = self.state[p].get("buf")
        buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
        self.state[p]["buf"] = buf
        return buf


class TooLong(TDLRT):
    """TDLRT whose step is 3x the step it is told (``h > 1/L`` where the check uses ``h = 1/L``)."""

    FACTOR = 3.0

    def __init__(self, params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
        super().__init__(params, lr=lr, tau=tau, momentum=momentum, rmax=rmax, method="sgd")

    def step(self, closure):  # type: ignore[override]
        told = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = self.FACTOR * g["lr"]
        try:
            return super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, told):
                g["lr"] = lr


class WrongSign(TooLong):
    """TDLRT whose core step goes uphill (the sign of the step flipped)."""

    FACTOR = -1.0


class IgnoresTau(TDLRT):
    """TDLRT whose truncation ignores ``tau``: every step cuts to the smallest allowed rank (``rmin``)."""

    def __init__(self, params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
        super().__init__(params, lr=lr, tau=tau, momentum=momentum, rmax=rmax, method="sgd")

    def step(self, closure):  # type: ignore[override]
        told = [g["tau"] for g in self.param_groups]
        for g in self.param_groups:
            g["tau"] = 1.0  # no tail exceeds ||C^||: the rule keeps 0 directions, clamped to rmin
        try:
            return super().step(closure)
        finally:
            for g, tau in zip(self.param_groups, told):
                g["tau"] = tau


class MomentumReset(TDLRT):
    """TDLRT that drops its optimizer state at every step instead of carrying the momentum into the new
    bases (a careless fix of "the buffer has the wrong shape after a rank change")."""

    def __init__(self, params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
        super().__init__(params, lr=lr, tau=tau, momentum=momentum, rmax=rmax, method="sgd")

    def step(self, closure):  # type: ignore[override]
        self.state.clear()
        return super().step(closure)


class BrokenLift(torch.optim.Optimizer):
    """The two-pass TDLRT step (SGD, no momentum) with an inexact lift: the augmented basis is the QR of
    ``[G_i | U_i]`` (new directions first) while the core is lifted as if ``U_i`` were its leading
    columns (zero padding), so the lifted point is not the old one."""

    def __init__(self, params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
        super().__init__(params, dict(lr=lr, tau=tau, rmax=rmax))

    @torch.no_grad()
    def step(self, closure: Callable) -> torch.Tensor:  # type: ignore[override]
        loss = _closure_loss(closure)
        plans = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not is_tucker_parameter(p):
                    continue
                m = p.manifold
                core, factors = m.unpack(p.data)
                core, factors = core.clone(), [f.clone() for f in factors]
                grads = m.unpack(p.grad, "grad")[1]
                sizes = enforce_multilinear_ranks([min(2 * u.shape[1], u.shape[0]) for u in factors])
                bases = [torch.linalg.qr(torch.cat([g, u], dim=1)).Q[:, :s] for u, g, s in zip(factors, grads, sizes)]
                lifted = torch.zeros(sizes, dtype=core.dtype)
                lifted[tuple(slice(0, r) for r in core.shape)] = core
                set_point(p, lifted, bases)
                plans.append((group, p, bases, core.shape))
        _closure_loss(closure)  # pass 2: the gradient of the lifted core
        for group, p, bases, old_ranks in plans:
            m = p.manifold
            core = m.unpack(p.data)[0]
            g = m.unpack(p.grad, "grad")[0] if p.grad is not None else torch.zeros_like(core)
            b = rank_bounds(p).with_overrides(m.shape, None, group["rmax"])
            tr = truncate_core(core - group["lr"] * g, group["tau"], b.rmin, b.rmax, b.adaptive, old_ranks)
            set_point(p, tr.core, [u @ t for u, t in zip(bases, tr.transforms)])
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not is_tucker_parameter(p):
                    p.sub_(group["lr"] * p.grad)
        return loss


class FactorEuler(torch.optim.Optimizer):
    """The Riemannian gradient (with the inverse core Gram ``Mat_i(C)^+``) applied to the factors
    separately, ``U_i <- U_i - h dU_i``, ``C <- C - h dC``, then a QR re-orthonormalization: explicit Euler
    on the Koch-Lubich factor ODEs, i.e. a retraction replaced by a factor update. Stiff: its step is
    stable only for ``h <~ sigma_min``. Plain SGD on the other parameters."""

    def __init__(self, params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
        super().__init__(params, dict(lr=lr, tau=tau))

    @torch.no_grad()
    def step(self, closure: Callable) -> torch.Tensor:  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not is_tucker_parameter(p):
                    p.sub_(group["lr"] * p.grad)
                    continue
                m = p.manifold
                core, factors = m.unpack(p.data)
                dcore, dfactors = m.unpack(m.egrad2rgrad(p.data, p.grad), "u")
                core = core - group["lr"] * dcore
                factors = [f - group["lr"] * df for f, df in zip(factors, dfactors)]
                if torch.isfinite(core).all() and all(torch.isfinite(f).all() for f in factors):
                    core, factors = orthonormalize(core, factors)  # a gauge change: the tensor is kept
                set_point(p, core, factors)
        return loss


def vanilla(params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
    """Vanilla factor-SGD in place of TDLRT: ``torch.optim.SGD`` on the packed core and factors."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def riemannian_sgd(params, *, lr: float, tau: float = 0.0, momentum: float = 0.0, rmax: Optional[int] = None):
    """Fixed-rank Riemannian SGD (geoopt): the Riemannian gradient, then the HOSVD retraction of the
    tangent step (formed as a tensor, so it is not stiff). Sound, but it never changes the rank."""
    return geoopt.optim.RiemannianSGD(params, lr=lr, momentum=momentum)


#: mutant name -> (factory, what is broken)
MUTANTS: dict[str, tuple[Callable, str]] = {
    "frozen": (Frozen, "step does nothing"),
    "fixed-basis": (FixedBasis, "core step only: no augmentation, bases never rotate"),
    "too-long": (TooLong, "step 3x the step size it is told (h > 1/L)"),
    "ignores-tau": (IgnoresTau, "truncation ignores tau: always cut to rmin"),
    "wrong-sign": (WrongSign, "core step uphill"),
    "broken-lift": (BrokenLift, "lift not exact: basis [G|U] but core padded as if U led"),
    "momentum-reset": (MomentumReset, "momentum dropped at every step instead of transported"),
    "vanilla": (vanilla, "factor-SGD (torch.optim.SGD on C, U) in place of TDLRT"),
    "factor-euler": (FactorEuler, "retraction replaced by a factor update (Koch-Lubich explicit Euler, stiff)"),
    "fixed-rank": (riemannian_sgd, "no rank adaptation: fixed-rank Riemannian SGD (geoopt, HOSVD retraction)"),
}

#: check -> mutant -> verdicts that MUST fail on it (asserted by tests/test_proofs_mutations.py): the pairs
#: whose claim the mutant violates, each measured to fail. A pair not listed is reported in the table but
#: not asserted: the mutant does not violate that verdict's claim (e.g. ``too-long`` is still a convergent
#: SGD, so ``decay`` holds), or the failure is incidental (``frozen`` on ``robustness.q_drop``: its
#: untrained accuracies happen to differ by q). The measured table: proofs_checks/README.md.
_PROBLEMS = ("quadratic", "regression", "lyapunov", "cnn_digits")
#: every verdict of the descent check (per library integrator)
ALL_DESCENT = [f"{p}.{v}" for p in _PROBLEMS for v in ("bound@tau=0", "bound@tau>0", "truncation")]

EXPECTED_CAUGHT: dict[str, dict[str, list[str]]] = {
    # cnn_digits: the loss is smooth (softplus) but its curvature along the steps is well below L, so a 3x
    # step, the cut to rank 1 and the two fixed-rank retractions still decrease the loss by as much as the
    # bound asks: they break the step (caught by cnn_digits.truncation) or a hypothesis (h <= 1/L), not the
    # descent claim
    "descent": {
        "frozen": [*ALL_DESCENT],
        "fixed-basis": [*ALL_DESCENT],
        "too-long": ["quadratic.bound@tau=0", "quadratic.bound@tau>0", "quadratic.truncation",
                     "regression.bound@tau=0", "regression.bound@tau>0", "regression.truncation",
                     "lyapunov.bound@tau=0", "lyapunov.bound@tau>0", "lyapunov.truncation", "cnn_digits.truncation"],
        "ignores-tau": ["quadratic.bound@tau=0", "quadratic.bound@tau>0", "quadratic.truncation",
                        "regression.bound@tau=0", "regression.truncation", "lyapunov.truncation",
                        "cnn_digits.truncation"],
        "wrong-sign": [*ALL_DESCENT],
        "broken-lift": ["regression.bound@tau=0", "regression.bound@tau>0", "regression.truncation",
                        "lyapunov.bound@tau=0", "lyapunov.bound@tau>0", "lyapunov.truncation",
                        "cnn_digits.bound@tau=0", "cnn_digits.bound@tau>0", "cnn_digits.truncation"],
        "vanilla": [*ALL_DESCENT],
        "factor-euler": ["quadratic.bound@tau=0", "quadratic.bound@tau>0", "quadratic.truncation",
                         "regression.truncation", "lyapunov.truncation", "cnn_digits.truncation"],
        "fixed-rank": ["quadratic.bound@tau=0", "quadratic.bound@tau>0", "quadratic.truncation",
                       "regression.truncation", "lyapunov.truncation", "cnn_digits.truncation"],
    },
    "convergence": {
        "frozen": ["bound", "decay", "running_min", "contrast"],
        "fixed-basis": ["bound", "decay", "running_min", "contrast"],
        "too-long": ["bound"],
        "ignores-tau": ["contrast"],
        "wrong-sign": ["bound", "decay", "running_min", "contrast"],
        "broken-lift": ["bound", "decay", "running_min", "contrast"],
        "vanilla": ["bound", "decay", "running_min", "contrast"],
        "fixed-rank": ["contrast"],
    },
    "approximation": {
        "frozen": ["heldout_bound", "slope_h", "exponent_theta", "exponent_h", "robust.tracks_flow"],
        "fixed-basis": ["heldout_bound", "slope_h", "exponent_theta", "exponent_h", "robust.tracks_flow"],
        "too-long": ["heldout_bound", "slope_h", "robust.tracks_flow"],
        "ignores-tau": ["heldout_bound", "slope_h", "exponent_theta", "exponent_h", "robust.tracks_flow"],
        "wrong-sign": ["heldout_bound", "slope_h", "robust.tracks_flow"],
        "broken-lift": ["heldout_bound", "slope_h", "exponent_theta", "exponent_h", "robust.tracks_flow"],
        "vanilla": ["slope_h", "exponent_theta", "exponent_h", "robust.tracks_flow"],
        "factor-euler": ["exponent_theta", "exponent_h", "robust.no_growth", "robust.tracks_flow"],
        "fixed-rank": ["exponent_theta", "exponent_h"],
    },
    "robustness": {
        # q_drop is the one verdict (the comparison of training losses with vanilla is a reported figure:
        # TDLRT itself does not satisfy it). frozen and momentum-reset do not violate its claim: a frozen
        # network is not made worse by a small q, and the momentum is not a claim of the paper (the
        # library's own tests cover its transport). ignores-tau is not run here (a rank-1 network, n.a.
        # when measured; left out for the test's time)
        "frozen": [],
        "fixed-basis": ["q_drop"],
        "momentum-reset": [],
        "vanilla": ["q_drop"],
    },
}
