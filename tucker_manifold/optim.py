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

import dataclasses
import math
import warnings
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from geoopt import ManifoldParameter

from .flow import Truncation, augment_tucker_bases, lift, truncate_core
from .manifold import FixedRankTucker
from .parameter import RankBounds, core_grad_only, is_tucker_parameter, rank_bounds, set_point
from .tucker import multi_mode_dot

__all__ = ["TDLRT", "TuckerPlan"]

_NO_TUCKER = (
    "TDLRT: no Tucker parameter among params. Convert the model first, e.g. "
    "model = tucker_manifold.nn.tuckerize(model, linear=True) (nn.Linear layers are converted only with "
    "linear=True; tuckerize(..., return_summary=True) says which modules were skipped and why), and pass "
    "model.parameters(); for a model without Tucker layers use a torch.optim optimizer"
)


def _lift_second_moment(v: torch.Tensor, maps: Sequence[torch.Tensor], old_ranks: Sequence[int]) -> torch.Tensor:
    """Lift ``v`` with the entrywise-squared maps; fill the new directions with the mean of ``v``."""
    out = multi_mode_dot(v, [mp * mp for mp in maps])
    if tuple(out.shape) != tuple(old_ranks):
        fresh = torch.ones_like(v)
        fresh = 1.0 - multi_mode_dot(fresh, [mp * mp for mp in maps])  # ~0 on old, ~1 on new entries
        out = out + fresh.clamp_(0.0, 1.0) * v.mean()
    return out


@dataclasses.dataclass(eq=False)
class TuckerPlan:
    """What one :meth:`TDLRT.step` does to one Tucker parameter, and what undoes it.

    Filled in order: :meth:`TDLRT._plan` (``p`` .. ``grads``), :meth:`TDLRT._augment` (``bases``,
    ``maps``, ``lifted``), :meth:`TDLRT._core_step` (``core_grad``, ``stepped``), :meth:`TDLRT._truncate`
    (``truncation``). Tensors other than ``old_data`` are in the linear-algebra dtype ``la``.
    """

    p: ManifoldParameter
    group: dict
    #: the parameter's rank bounds tightened by the group's ``rmin`` / ``rmax``
    bounds: RankBounds
    #: the point before the step (rollback restores it)
    old_data: torch.Tensor
    old_manifold: FixedRankTucker
    #: float32 or float64: QR / SVD never run in half precision
    la: torch.dtype
    #: core ``(r_1..r_d)`` and factors ``[(n_i, r_i)]`` at the start of the step
    core: torch.Tensor
    factors: list[torch.Tensor]
    #: pass-1 factor gradients ``[(n_i, r_i)]``
    grads: list[torch.Tensor]
    #: augmented bases ``[(n_i, r^_i)]`` (``U_i`` leading), maps ``U^_i^T U_i`` and the lifted core
    bases: Optional[list[torch.Tensor]] = None
    maps: Optional[list[torch.Tensor]] = None
    lifted: Optional[torch.Tensor] = None
    #: pass-2 gradient of the augmented core, and the augmented core after the base-rule step
    core_grad: Optional[torch.Tensor] = None
    stepped: Optional[torch.Tensor] = None
    truncation: Optional[Truncation] = None

    @property
    def old_ranks(self) -> tuple[int, ...]:
        return self.old_manifold.ranks


class TDLRT(torch.optim.Optimizer):
    """Rank-adaptive Tucker integrator (TDLRT) with an SGD or Adam base rule.

    Parameters
    ----------
    params : iterable of parameters or dicts
        All model parameters; Tucker parameters (:func:`tucker_manifold.parameter.is_tucker_parameter`,
        1-D packed points) are recognised by their manifold. At least one is required.
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
        Rank bounds for adaptive modes, combined with each parameter's declared
        :class:`~tucker_manifold.parameter.RankBounds`.

    The step is orchestration of :mod:`tucker_manifold.flow`; subclasses change one stage by
    overriding :meth:`_pass` (one gradient evaluation), :meth:`_augment`, :meth:`_core_step`,
    :meth:`_truncate` (all parameters at once), :meth:`_dense_step` or :meth:`_rollback`.
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
        if not any(is_tucker_parameter(p) for _, p in self._all_params()):
            raise ValueError(_NO_TUCKER)
        self.skipped_steps = 0
        #: per Tucker parameter, what the last step did: ranks, truncation error, core-gradient norm
        self.last_step_info: list[dict] = []

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if is_tucker_parameter(p) and p.dim() != 1:
                raise ValueError(
                    f"batched Tucker parameters are not supported by TDLRT; use geoopt's optimizers "
                    f"(got a parameter of shape {tuple(p.shape)}, TDLRT needs 1-D packed points)"
                )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> torch.Tensor:  # type: ignore[override]
        """One TDLRT step. ``closure`` must zero the gradients, run forward and backward and return
        the loss; it is called exactly twice. Returns the loss of pass 1."""
        if closure is None:
            raise ValueError("TDLRT.step needs a closure (it evaluates the gradient twice)")
        # Pass 1: factor gradients at (C, U); the other parameters' gradients would be discarded.
        loss, ok = self._pass(closure, tucker_only=True)
        if not ok:
            self._skip("1")
            return loss
        plans = self._plan()
        self._augment(plans)
        # Pass 2: core gradients at (C^, U^) and the gradients of every other parameter.
        _, ok = self._pass(closure, core_only=[plan.p for plan in plans])
        if not ok:
            self._rollback(plans)
            self._skip("2")
            return loss
        for plan in plans:
            self._core_step(plan)
        self._truncate(plans)
        self._dense_step()
        return loss

    # ------------------------------------------------------------------ stages
    def _pass(
        self, closure: Callable, tucker_only: bool = False, core_only: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, bool]:
        """One gradient evaluation: ``(detached loss, loss and every gradient finite)``.

        ``tucker_only``: autograd skips the gradients of non-Tucker parameters (e.g. the first layer's
        whole backward). ``core_only``: Tucker parameters whose factor gradients are not needed
        (:func:`~tucker_manifold.parameter.core_grad_only`)."""
        for _, p in self._all_params():
            p.grad = None
        frozen = [p for _, p in self._all_params() if p.requires_grad and not is_tucker_parameter(p)] if tucker_only else []
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad(), core_grad_only(core_only):
                loss = closure()
        except RuntimeError as e:
            if "invalid gradient" in str(e):
                raise RuntimeError(
                    "TDLRT changed a Tucker parameter's size, but an autograd graph built before this step "
                    "still references it (e.g. a loss tensor kept from an earlier loop): delete it (`del loss`) "
                    "or detach it before calling step()"
                ) from e
            raise
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if loss is None:
            raise ValueError("TDLRT.step needs a closure that returns the loss")
        # Drop the graph now: it pins autograd's gradient accumulators, which remember the old
        # (pre-augmentation) parameter shapes.
        loss = loss.detach() if isinstance(loss, torch.Tensor) else torch.as_tensor(loss)
        flags = [torch.isfinite(loss).all()]
        flags += [torch.isfinite(p.grad).all() for _, p in self._all_params() if p.grad is not None]
        return loss, bool(torch.stack(flags).all())

    def _plan(self) -> list[TuckerPlan]:
        """One :class:`TuckerPlan` per Tucker parameter that has a pass-1 gradient."""
        plans = []
        for group, p in self._all_params():
            if p.grad is None or not is_tucker_parameter(p):
                continue
            m: FixedRankTucker = p.manifold
            la = torch.float64 if p.dtype == torch.float64 else torch.float32
            core, factors = m.unpack(p.data)
            plans.append(TuckerPlan(
                p=p, group=group, bounds=rank_bounds(p).with_overrides(m.shape, group["rmin"], group["rmax"]),
                old_data=p.data, old_manifold=m, la=la, core=core.to(la), factors=[f.to(la) for f in factors],
                grads=[g.to(la) for g in m.unpack(p.grad, "grad")[1]],
            ))
        return plans

    def _augment(self, plans: Sequence[TuckerPlan]) -> None:
        """Augment every basis with its factor gradient and lift the core exactly; the parameters then
        hold ``(C^, U^)`` (same loss)."""
        for plan in plans:
            plan.bases = augment_tucker_bases(plan.factors, plan.grads)
            plan.lifted, plan.maps = lift(plan.core, plan.factors, plan.bases)
            set_point(plan.p, plan.lifted, plan.bases)

    def _core_step(self, plan: TuckerPlan) -> None:
        """Base-rule step on the augmented core with its pass-2 gradient; optimizer state is first
        carried into the augmented bases."""
        p = plan.p
        core = p.manifold.unpack(p.data)[0].to(plan.la)
        plan.core_grad = p.manifold.unpack(p.grad, "grad")[0].to(plan.la) if p.grad is not None else torch.zeros_like(core)
        state = self.state[p]
        self._transform_state(state, plan.maps, plan.old_ranks, transpose=False)
        plan.stepped = self._base_update(plan.group, state, core, plan.core_grad)

    def _truncate(self, plans: Sequence[TuckerPlan]) -> None:
        """Truncate every stepped core by its group's ``tau`` within its bounds and set the new points.
        A global rank allocation overrides this (it sees all parameters at once) and calls
        :meth:`_apply_truncation`."""
        self.last_step_info = []
        for plan in plans:
            b = plan.bounds
            tr = truncate_core(plan.stepped, plan.group["tau"], b.rmin, b.rmax, b.adaptive, plan.old_ranks)
            self._apply_truncation(plan, tr)

    def _apply_truncation(self, plan: TuckerPlan, tr: Truncation) -> None:
        """Set ``U_i <- U^_i P_i``, ``C <- C'``, carry the state along and record ``last_step_info``."""
        plan.truncation = tr
        self._transform_state(self.state[plan.p], tr.transforms, tr.ranks, transpose=True)
        set_point(plan.p, tr.core, [u @ t for u, t in zip(plan.bases, tr.transforms)])
        self.last_step_info.append(dict(
            ranks=tr.ranks, truncation_error=float(tr.error),
            core_grad_norm=float(torch.linalg.vector_norm(plan.core_grad)), augmented_ranks=tuple(plan.stepped.shape),
        ))

    def _dense_step(self) -> None:
        """Base-rule step on every non-Tucker parameter with its pass-2 gradient."""
        for group, p in self._all_params():
            if p.grad is None or is_tucker_parameter(p):
                continue
            p.copy_(self._base_update(group, self.state[p], p, p.grad))

    def _rollback(self, plans: Sequence[TuckerPlan]) -> None:
        """Put every parameter back at its point from before the step (bit-identical; state untouched)."""
        for plan in plans:
            core, factors = plan.old_manifold.unpack(plan.old_data)
            set_point(plan.p, core, factors, manifold=plan.old_manifold)

    # ------------------------------------------------------------------ helpers
    def _all_params(self) -> Iterator[tuple[dict, torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

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
