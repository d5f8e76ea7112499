"""TDLRT: the rank-adaptive, geometry-aware integrator as a ``torch.optim.Optimizer``.

For every Tucker parameter (a ``geoopt.ManifoldParameter`` on :class:`FixedRankTucker`) one
``step(closure)`` does, with exactly two calls of ``closure``:

1. pass 1 at ``(C, U)``: factor gradients ``G_i = dL/dU_i``;
2. augmented bases ``U^_i = orth([U_i | G_i])`` (``U_i`` leading; Corollary 2.2);
3. exact lift ``C^ = C x_i (U^_i^T U_i)`` (the loss does not change);
4. pass 2 at ``(C^, U^)``: a base-rule step (SGD/momentum/Nesterov or Adam/AdamW) on ``C^`` only;
5. truncation: per-mode SVD of ``C^``, rank by relative tolerance ``tau`` within ``[rmin, rmax]``,
   ``U_i <- U^_i P_i``, ``C <- C^ x_i P_i^T``.

Every other parameter (biases, BatchNorm, dense layers) gets the base rule from pass 2.

Optimizer state lives in core coordinates and follows every basis change:

* momentum / Adam's first moment ``m`` is a tangent-like tensor ``m x_j U_j``: lifting maps it exactly
  (``m^ = m x_i U^_i^T U_i``, same ambient tensor), truncation projects it (``m' = m^ x_i P_i^T``);
* Adam's second moment ``v`` is elementwise and has no exact transformation. We transport it as the
  second moment of independent coordinates: ``v' = v x_i (P_i * P_i)^T`` (entrywise squares). The
  columns of ``P_i`` have unit norm, so each new entry is a convex combination of old ones: ``v`` stays
  positive and keeps its scale (rotating ``sqrt(v)`` as RobustDLRT does can cancel to zero and cause
  huge steps). Directions that are new after augmentation have no history; their ``v`` starts at the
  mean of the old ``v`` rather than 0, which would turn their first step into a ``1/sqrt(1-beta2)``
  sized jump.

A non-finite loss or gradient in either pass leaves every parameter and every state bit-identical,
emits a warning and counts it in ``skipped_steps``.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
from geoopt import ManifoldParameter

from .flow import augment_basis, enforce_multilinear_ranks, lift_core, truncate_core
from .manifold import FixedRankTucker
from .tucker import multi_mode_dot

__all__ = ["TDLRT", "is_tucker_parameter", "set_tucker_point"]


@functools.lru_cache(maxsize=4096)
def _manifold(shape: tuple[int, ...], ranks: tuple[int, ...]) -> FixedRankTucker:
    return FixedRankTucker(shape, ranks)


def is_tucker_parameter(p: torch.Tensor) -> bool:
    """True for a ``ManifoldParameter`` whose manifold is a :class:`FixedRankTucker`."""
    return isinstance(p, ManifoldParameter) and isinstance(p.manifold, FixedRankTucker)


def set_tucker_point(p: ManifoldParameter, core: torch.Tensor, factors: Sequence[torch.Tensor]) -> None:
    """Replace a Tucker parameter's data and manifold in place (same Parameter object), at the
    ranks of ``core``. Its gradient is dropped (its shape may have changed)."""
    shape = tuple(f.shape[0] for f in factors)
    ranks = tuple(core.shape)
    m = _manifold(shape, ranks)
    p.data = m.pack(core.to(p.dtype), [f.to(p.dtype) for f in factors])
    p.manifold = m
    p.grad = None
    # Layers mirror the ranks in a buffer for checkpoints; tell them (see nn.layers).
    hook = getattr(p, "_on_point_change", None)
    if hook is not None:
        hook()


def _bounds(p: ManifoldParameter, group: dict) -> tuple[list[int], list[int], list[bool]]:
    """Per-mode (rmin, rmax, adaptive) from the parameter's attributes and the group's overrides."""
    m: FixedRankTucker = p.manifold
    d = m.order
    adaptive = list(getattr(p, "adaptive_modes", None) or [True] * d)
    rmin = list(getattr(p, "rank_min", None) or [1] * d)
    rmax = list(getattr(p, "rank_max", None) or list(m.shape))
    if group["rmin"] is not None:
        rmin = [max(a, group["rmin"]) if ad else a for a, ad in zip(rmin, adaptive)]
    if group["rmax"] is not None:
        rmax = [min(a, group["rmax"]) if ad else a for a, ad in zip(rmax, adaptive)]
    rmax = [min(r, n) for r, n in zip(rmax, m.shape)]
    rmin = [min(a, b) for a, b in zip(rmin, rmax)]
    return rmin, rmax, adaptive


def _lift_second_moment(v: torch.Tensor, maps: Sequence[torch.Tensor], old_ranks: Sequence[int]) -> torch.Tensor:
    """Lift ``v`` with the entrywise-squared maps; fill the new directions with the mean of ``v``."""
    out = multi_mode_dot(v, [mp * mp for mp in maps])
    if tuple(out.shape) != tuple(old_ranks):
        fresh = torch.ones_like(v)
        fresh = 1.0 - multi_mode_dot(fresh, [mp * mp for mp in maps])  # ~0 on old, ~1 on new entries
        out = out + fresh.clamp_(0.0, 1.0) * v.mean()
    return out


class TDLRT(torch.optim.Optimizer):
    """Rank-adaptive Tucker integrator (TDLRT) with an SGD or Adam base rule.

    Parameters
    ----------
    params : iterable of parameters or dicts
        All model parameters; Tucker parameters are recognised by their manifold.
    lr : float
        Learning rate ``h``.
    tau : float
        Relative truncation tolerance: mode ``i`` keeps the smallest rank with
        ``||sigma^{(i)}_{r+1:}||_2 <= tau ||C^||_F``. ``0`` truncates nothing but exact zeros.
    method : {"sgd", "adam", "adamw"}
        Base rule for the core step and for all other parameters.
    momentum, dampening, nesterov, weight_decay : SGD options as in ``torch.optim.SGD``
        (``weight_decay`` is decoupled for ``adamw`` and L2 for ``sgd`` / ``adam``).
    betas, eps : Adam options.
    rmin, rmax : int, optional
        Rank bounds for adaptive modes, combined with each parameter's ``rank_min`` / ``rank_max``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        tau: float = 0.1,
        method: str = "sgd",
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rmin: Optional[int] = None,
        rmax: Optional[int] = None,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not tau >= 0 or not math.isfinite(tau):
            raise ValueError(f"tau must be a finite number >= 0, got {tau}")
        if method not in ("sgd", "adam", "adamw"):
            raise ValueError(f"method must be 'sgd', 'adam' or 'adamw', got {method!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        for name, val in (("rmin", rmin), ("rmax", rmax)):
            if val is not None and (not isinstance(val, int) or val < 1):
                raise ValueError(f"{name} must be a positive int or None, got {val!r}")
        if rmin is not None and rmax is not None and rmin > rmax:
            raise ValueError(f"rmin ({rmin}) must be <= rmax ({rmax})")
        defaults = dict(
            lr=lr, tau=tau, method=method, momentum=momentum, dampening=dampening, nesterov=nesterov,
            weight_decay=weight_decay, betas=betas, eps=eps, rmin=rmin, rmax=rmax,
        )
        super().__init__(params, defaults)
        self.skipped_steps = 0
        #: per Tucker parameter, what the last step did: ranks, truncation error, core-gradient norm
        self.last_step_info: list[dict] = []

    # ------------------------------------------------------------------ helpers
    def _all_params(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    def _zero_grads(self) -> None:
        for _, p in self._all_params():
            p.grad = None

    def _run_pass(self, closure: Callable) -> tuple[torch.Tensor, bool]:
        self._zero_grads()
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ValueError("TDLRT.step needs a closure that returns the loss")
        # Drop the graph now: it pins autograd's gradient accumulators, which remember the old
        # (pre-augmentation) parameter shapes.
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.as_tensor(loss)
        flags = [torch.isfinite(loss).all()]
        flags += [torch.isfinite(p.grad).all() for _, p in self._all_params() if p.grad is not None]
        return loss, bool(torch.stack(flags).all())

    def _skip(self, which: str) -> None:
        self.skipped_steps += 1
        warnings.warn(
            f"TDLRT: non-finite loss or gradient in pass {which}; step skipped, weights and state unchanged "
            f"(skipped so far: {self.skipped_steps})",
            RuntimeWarning,
            stacklevel=3,
        )

    def _base_update(self, group: dict, state: dict, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """One base-rule step on a plain tensor ``x`` with gradient ``g``; returns the new value.

        State tensors have ``x``'s shape and are updated in place.
        """
        lr, wd = group["lr"], group["weight_decay"]
        if group["method"] == "sgd":
            if wd:
                g = g.add(x, alpha=wd)
            mom = group["momentum"]
            if mom:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(mom).add_(g, alpha=1 - group["dampening"])
                g = g.add(buf, alpha=mom) if group["nesterov"] else buf
            return x.add(g, alpha=-lr)
        beta1, beta2 = group["betas"]
        if group["method"] == "adamw":
            x = x.mul(1 - lr * wd)
        elif wd:
            g = g.add(x, alpha=wd)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(x)
            state["exp_avg_sq"] = torch.zeros_like(x)
            state["step"] = 0
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(group["eps"])
        return x.addcdiv(m, denom, value=-lr / (1 - beta1**t))

    @staticmethod
    def _transform_state(state: dict, maps: Sequence[torch.Tensor], old_ranks, transpose: bool) -> None:
        """Carry core-coordinate state through a basis change ``core -> core x_i maps[i](^T)``."""
        ms = [mp.transpose(0, 1) for mp in maps] if transpose else list(maps)
        for key in ("momentum_buffer", "exp_avg"):
            if key in state:
                state[key] = multi_mode_dot(state[key], ms)
        if "exp_avg_sq" in state:
            v = state["exp_avg_sq"]
            if transpose:
                state["exp_avg_sq"] = multi_mode_dot(v, [mp * mp for mp in ms])
            else:
                state["exp_avg_sq"] = _lift_second_moment(v, ms, old_ranks)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> torch.Tensor:  # type: ignore[override]
        """One TDLRT step. ``closure`` must zero the gradients, run forward and backward and return
        the loss; it is called exactly twice. Returns the loss of pass 1."""
        if closure is None:
            raise ValueError("TDLRT.step needs a closure (it evaluates the gradient twice)")

        # Pass 1: factor gradients at (C, U). The other parameters' gradients would be discarded, so
        # autograd is told not to compute them (this skips e.g. the first layer's backward entirely).
        frozen = [p for _, p in self._all_params() if p.requires_grad and not is_tucker_parameter(p)]
        for p in frozen:
            p.requires_grad_(False)
        try:
            loss, ok = self._run_pass(closure)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if not ok:
            self._skip("1")
            return loss

        # Augment bases and lift cores; remember everything needed to roll back.
        plans = []
        for group, p in self._all_params():
            if not is_tucker_parameter(p):
                continue
            m: FixedRankTucker = p.manifold
            la = torch.float64 if p.dtype == torch.float64 else torch.float32  # QR/SVD never in half
            if p.grad is None:
                continue
            core, factors = m.unpack(p.data)
            core, factors = core.to(la), [f.to(la) for f in factors]
            gfactors = [g.to(la) for g in m.unpack(p.grad, "grad")[1]]
            rmin, rmax, adaptive = _bounds(p, group)
            new_factors = []
            for u, g in zip(factors, gfactors):
                # A mode at full rank has nothing to gain; fixed modes below full rank still rotate
                # (augment, then truncate back to their rank).
                if u.shape[1] >= u.shape[0]:
                    new_factors.append(u)
                else:
                    new_factors.append(augment_basis(u, g))
            # The augmented sizes must still form a valid multilinear rank; trimming only ever drops
            # trailing new columns (the bound is >= the old rank).
            sizes = enforce_multilinear_ranks([f.shape[1] for f in new_factors])
            new_factors = [f[:, :s] for f, s in zip(new_factors, sizes)]
            maps = [nu.transpose(0, 1) @ u for nu, u in zip(new_factors, factors)]
            lifted = multi_mode_dot(core, maps)
            plans.append(dict(group=group, p=p, old_data=p.data, old_manifold=m, la=la, maps=maps,
                              factors=new_factors, rmin=rmin, rmax=rmax, adaptive=adaptive,
                              old_ranks=m.ranks))
            set_tucker_point(p, lifted, new_factors)

        # Pass 2: core gradients at (C^, U^), gradients of all other parameters. Layers that honour
        # `core_grad_only` skip the (unused) factor gradients.
        for plan in plans:
            plan["p"].core_grad_only = True
        try:
            loss2, ok = self._run_pass(closure)
        except RuntimeError as e:
            if "invalid gradient" in str(e):
                raise RuntimeError(
                    "TDLRT changed a Tucker parameter's size, but an autograd graph built before this step "
                    "still references it (e.g. a loss tensor kept from an earlier loop): delete it (`del loss`) "
                    "or detach it before calling step()"
                ) from e
            raise
        finally:
            for plan in plans:
                plan["p"].core_grad_only = False
        if not ok:
            for plan in plans:
                p = plan["p"]
                p.data, p.manifold, p.grad = plan["old_data"], plan["old_manifold"], None
                hook = getattr(p, "_on_point_change", None)
                if hook is not None:
                    hook()
            self._skip("2")
            return loss

        self.last_step_info = []
        for plan in plans:
            p, group = plan["p"], plan["group"]
            m: FixedRankTucker = p.manifold
            la = plan["la"]
            core = m.unpack(p.data)[0].to(la)
            gcore = m.unpack(p.grad, "grad")[0].to(la) if p.grad is not None else torch.zeros_like(core)
            state = self.state[p]
            self._transform_state(state, plan["maps"], plan["old_ranks"], transpose=False)
            new_core = self._base_update(group, state, core, gcore)
            tr = truncate_core(new_core, group["tau"], plan["rmin"], plan["rmax"], plan["adaptive"], plan["old_ranks"])
            self._transform_state(state, tr.transforms, tr.ranks, transpose=True)
            factors = [u @ t for u, t in zip(plan["factors"], tr.transforms)]
            set_tucker_point(p, tr.core, factors)
            self.last_step_info.append(dict(
                ranks=tr.ranks, truncation_error=float(tr.error),
                core_grad_norm=float(torch.linalg.vector_norm(gcore)), augmented_ranks=tuple(core.shape),
            ))

        for group, p in self._all_params():
            if is_tucker_parameter(p) or p.grad is None:
                continue
            state = self.state[p]
            p.copy_(self._base_update(group, state, p, p.grad))
        return loss

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["tdlrt"] = {"skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("tdlrt", {})
        super().load_state_dict(state_dict)
        self.skipped_steps = int(extra.get("skipped_steps", 0))
