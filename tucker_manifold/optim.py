"""TDLRT and ParallelTDLRT: the rank-adaptive, geometry-aware integrators as ``torch.optim.Optimizer``s.

For every Tucker parameter (a ``geoopt.ManifoldParameter`` on :class:`FixedRankTucker`) one TDLRT step
does:

1. the gradient at ``(C, U)``: factor gradients ``G_i = dL/dU_i``;
2. augmented bases ``U^_i = orth([U_i | G_i])`` (``U_i`` leading; Corollary 2.2);
3. exact lift ``C^ = C x_i (U^_i^T U_i)`` (the loss does not change);
4. the gradient of the augmented core ``dL/dC^`` at ``(C^, U^)`` and a base-rule step
   (SGD/momentum/Nesterov or Adam/AdamW) on ``C^`` only;
5. truncation: per-mode SVD of ``C^``, rank by relative tolerance ``tau`` within ``[rmin, rmax]``,
   ``U_i <- U^_i P_i``, ``C <- C^ x_i P_i^T``.

Every other parameter (biases, BatchNorm, dense layers) gets the base rule.

**One pass (the default, ``single_pass=True``).** The lift is exact, so at ``(C^, U^)`` every layer
computes the same function as at ``(C, U)``: the second forward/backward would repeat the first one's
activations and output gradients. Tucker layers record their input ``x`` and output gradient ``dL/dy``
(:func:`tucker_manifold.parameter.record_io`), and step 4's ``dL/dC^ = dL/dW x_j U^_j^T`` is rebuilt
from them (:mod:`tucker_manifold.onepass`): ``step(closure)`` calls the closure ONCE, and ``step()``
without a closure works after the user's own ``loss.backward()``. The iterates equal the two-pass
ones to rounding (tests/test_single_pass.py). Differences: stochastic layers (dropout) draw one mask per
step instead of two, and BatchNorm statistics are updated by the one forward (the training loop's
two-pass closure already updated them once per step). A Tucker parameter whose use no layer recorded
(e.g. ``M.to_dense(p)`` in the loss), or whose records disagree with autograd's core gradient (a use
the records missed, e.g. a penalty on the dense weight), falls back to the second pass for that
parameter alone (the closure is called a second time, with only those parameters trainable; a warning
says so once per parameter); without a closure that is a RuntimeError. ``single_pass=False`` is the
two-pass reference (exactly two closure calls per step), which the equality tests and proofs_checks use.
Records live from a forward to the next ``step()`` or ``optimizer.zero_grad()`` (which clears them with the
gradients; ``model.zero_grad()`` does not), and are kept per thread: run the forward in the thread that
built the optimizer or that calls ``step(closure)``. Under ``torch.amp.GradScaler`` the records hold
scaled output gradients: TDLRT declares ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` passes
the scale in and the step divides ``.grad`` and the rebuilt ``dL/dC^`` by it (:mod:`tucker_manifold.amp`;
with a closure or a process group use :func:`tucker_manifold.amp.scaled_step`).

**ParallelTDLRT** (one pass always): the parallel BUG integrator (Ceruti-Kusch-Lubich-Sulz; GeoLoRA for
matrices). Same steps, with the augmented bases untrimmed and ``dL/dC^`` masked
(:func:`tucker_manifold.onepass.parallel_core_gradient`): before truncation the step is the Riemannian
gradient step ``Y - h P(Y) grad L`` written in the augmented bases.

**Data parallel (``process_group=``).** The gradients of every parameter are averaged over the group
after each gradient evaluation (one flattened all-reduce, :func:`tucker_manifold.distributed.average_gradients`),
so every rank builds identical bases, ranks and cores. In one-pass mode the records are per rank: the
bases come from the averaged gradients (all-reduce 1), then each rank rebuilds ``dL/dC^`` from its own
records and these small tensors are averaged (all-reduce 2, of the augmented cores' size). So a
one-pass step takes TWO all-reduces, as a two-pass step does (one per pass); one would need the
records themselves sent. ``ParallelTDLRT(core_gradient="factors")`` takes ONE (no records at all).
Loss and BatchNorm statistics stay the user's business (``nn.SyncBatchNorm``, or per-rank statistics).

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

A non-finite loss or gradient (in either pass, or in a rebuilt ``dL/dC^``) leaves every parameter and
every state bit-identical, emits a warning and counts it in ``skipped_steps``; with a process group a
non-finite value on one rank makes every rank skip.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import warnings
import weakref
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from geoopt import ManifoldParameter

from .amp import unscale_grads_, unscaled
from .distributed import average_gradients, check_replicas_identical, world_size
from .flow import Truncation, augment_bases, augment_tucker_bases, lift, truncate_core
from .budget import (
    allocate_ranks, budget_at_step, budget_tensor, check_budget, min_param_count, minimum_count,
    truncate_to_ranks,
)
from .manifold import FixedRankTucker
from .onepass import (
    augmented_core_gradient,
    parallel_core_gradient,
    parallel_core_gradient_from_factors,
    parallel_dropped_norm,
)
from .parameter import (
    _RECORDERS,
    LayerIORecorder,
    RankBounds,
    core_grad_only,
    is_tucker_parameter,
    rank_bounds,
    set_point,
)
from .tucker import multi_mode_dot

__all__ = ["TDLRT", "ParallelTDLRT", "TuckerPlan", "SinglePassFallbackWarning"]


class SinglePassFallbackWarning(UserWarning):
    """A Tucker parameter's augmented-core gradient could not be rebuilt from layer records; the step
    evaluates it with a second pass for that parameter (TDLRT) or from its factor gradients (ParallelTDLRT)."""


#: Largest relative difference between the all-old block of a rebuilt ``dL/dC^`` and autograd's core
#: gradient that still counts as rounding, by the records' dtype (16-bit dtypes: 1e-1). A use the
#: records missed typically differs by O(1); a false alarm only costs a second pass.
_MISMATCH_RTOL = {torch.float64: 1e-6, torch.float32: 1e-2}


class _StepRecorder(LayerIORecorder):
    """The one recorder the one-pass optimizers share: parameters are tracked weakly (a model dropped
    by the user is freed, and its records with it), and each optimizer clears only its own records.
    Started once per thread context, at the first one-pass optimizer's construction, so that a
    forward run before ``step()`` (no closure) is recorded."""

    def __init__(self) -> None:
        super().__init__(())

    def track(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            key = id(p)
            if key not in self._params:
                # record_io only asks `id(p) in _params`; a finalizer forgets the id with its records
                self._params[key] = weakref.ref(p)
                weakref.finalize(p, self._forget, key)

    def _forget(self, key: int) -> None:
        for d in (self._params, self._done, self._pending):
            d.pop(key, None)

    def clear_params(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            self._done.pop(id(p), None)
            self._pending.pop(id(p), None)

    def recorded_params(self) -> list[torch.Tensor]:  # the base class would return weak references
        return [r() for k, r in self._params.items() if self._done.get(k) and r() is not None]

    def active(self) -> bool:
        return self in _RECORDERS.get()


_SHARED_RECORDER: Optional[_StepRecorder] = None
_TORCH_DIR = os.path.dirname(torch.__file__)


def _stacklevel() -> int:
    """``stacklevel`` for a warning issued by the caller, pointing at the first frame outside this module
    and torch (the user's ``opt.step(...)`` line, however torch wraps ``step``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(_TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def _recorder() -> _StepRecorder:
    global _SHARED_RECORDER
    if _SHARED_RECORDER is None:
        _SHARED_RECORDER = _StepRecorder()
    return _SHARED_RECORDER


@contextlib.contextmanager
def _recording(active: bool) -> Iterator[None]:
    """Make sure the shared recorder records within the block (it may not be active in this thread)."""
    rec = _recorder()
    if active and not rec.active():
        with rec:
            yield
    else:
        yield

#: ``tau`` when none is given and there is no budget (the tolerance of the paper's experiments)
_DEFAULT_TAU = 0.1


def _check_budget_schedule(schedule: object) -> tuple[int, int]:
    """``(start_step, end_step)`` ints with ``0 <= start_step < end_step``, or ValueError naming ``budget_schedule``."""
    ok = isinstance(schedule, (tuple, list)) and len(schedule) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in schedule)
    if not ok or not 0 <= schedule[0] < schedule[1]:
        raise ValueError(f"budget_schedule must be (start_step, end_step), ints with 0 <= start_step < end_step, "
                         f"got {schedule!r}")
    return int(schedule[0]), int(schedule[1])


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
    #: gradient of the augmented core (pass 2, or rebuilt from the records), and the augmented core
    #: after the base-rule step
    core_grad: Optional[torch.Tensor] = None
    stepped: Optional[torch.Tensor] = None
    truncation: Optional[Truncation] = None
    #: where ``core_grad`` came from: "second pass", "records" or "factors" (ParallelTDLRT)
    source: str = "second pass"
    #: ParallelTDLRT with ``rejection``: the masked step was rejected and redone unmasked
    rejected: bool = False

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
        Default (``None``): 0.1, or with ``budget`` no tolerance at all (then ``tau`` is only a floor).
    method : {"sgd", "adam", "adamw"}
        Base rule for the core step and for all other parameters.
    momentum, dampening, nesterov, weight_decay : SGD options as in ``torch.optim.SGD``
        (``weight_decay`` is decoupled for ``adamw`` and L2 for ``sgd`` / ``adam``).
    betas, eps : Adam options.
    rmin, rmax : int, optional
        Rank bounds for adaptive modes, combined with each parameter's declared
        :class:`~tucker_manifold.parameter.RankBounds`.
    single_pass : bool, default True
        One gradient evaluation per step (see the module docstring): ``step(closure)`` calls the
        closure once, ``step()`` uses the gradients of the user's own backward. ``False``: the two-pass
        reference, ``step(closure)`` only, exactly two calls.
    process_group : torch.distributed group, optional
        Average every gradient over this group after each evaluation (data parallel; all ranks then
        take identical steps). ``torch.distributed`` must be initialized.
    check_replicas : bool, default False
        Debug: after every step, all-reduce checksums of all parameters and raise ``RuntimeError`` if
        the ranks disagree (:func:`tucker_manifold.distributed.check_replicas_identical`).
    budget : int, optional
        Global parameter budget ``N``: at every truncation all Tucker parameters' ranks are chosen jointly
        (:func:`tucker_manifold.budget.allocate_ranks`, least sum of squared *relative* truncation errors)
        so that their total size (cores + factors) is at most ``N``. ``tau`` (if given) is then a floor:
        no rank above what ``tau`` alone keeps. ``N`` below the smallest count (adaptive ranks at
        ``rmin``) is a ValueError.
    budget_schedule : (start_step, end_step), optional
        AdaLoRA's cubic schedule: the budget is the count at construction up to step ``start_step``,
        decays cubically, and is ``N`` from step ``end_step`` on (steps counted from 0, skipped steps
        not counted; the position is saved in ``state_dict``).

    The step is orchestration of :mod:`tucker_manifold.flow`; subclasses change one stage by
    overriding :meth:`_pass` (one gradient evaluation), :meth:`_augment`, :meth:`_core_gradients`
    (one-pass ``dL/dC^``), :meth:`_core_step`, :meth:`_truncate` (all parameters at once),
    :meth:`_dense_step` or :meth:`_rollback`.
    """

    #: torch's protocol for optimizers that unscale themselves: a GradScaler sets ``grad_scale`` for the
    #: step, and the gradients AND the core gradients rebuilt from (scaled) records are divided by it
    #: (:mod:`tucker_manifold.amp`); an overflow then takes the usual skip (rollback, state untouched).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable,
        lr: float,
        tau: Optional[float] = None,
        method: str = "sgd",
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rmin: Optional[int] = None,
        rmax: Optional[int] = None,
        *,
        single_pass: bool = True,
        process_group: Optional[object] = None,
        check_replicas: bool = False,
        budget: Optional[int] = None,
        budget_schedule: Optional[tuple[int, int]] = None,
    ):
        if budget is not None:
            budget = check_budget(budget)
        if budget_schedule is not None:
            if budget is None:
                raise ValueError("budget_schedule needs budget (the parameter count it decays to)")
            budget_schedule = _check_budget_schedule(budget_schedule)
        if tau is None:  # no floor under a budget; the paper's tolerance otherwise
            tau = 0.0 if budget is not None else _DEFAULT_TAU
        if not isinstance(single_pass, bool):
            raise ValueError(f"single_pass must be True or False, got {single_pass!r}")
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group was given but torch.distributed is not initialized "
                             "(call torch.distributed.init_process_group first, e.g. under torchrun)")
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
        self.single_pass = single_pass
        self.process_group = process_group
        self.check_replicas = bool(check_replicas)
        self.skipped_steps = 0
        #: per Tucker parameter, what the last step did: ranks, truncation error, core-gradient norm,
        #: where dL/dC^ came from ("records", "second pass", "factors")
        self.last_step_info: list[dict] = []
        self._fallback_warned: set[int] = set()
        #: global parameter budget (None: per-layer tau truncation); see :meth:`_truncate_to_budget`
        self.budget, self.budget_schedule = budget, budget_schedule
        #: completed budget truncations (the schedule's step; saved in state_dict)
        self.budget_step = 0
        #: the last budget truncation: step, scheduled budget, Tucker parameter count, objective
        self.last_allocation: Optional[dict] = None
        if budget is not None:
            self._check_budget_minimum()
            # the schedule starts at the count at construction (never below N: it only ever shrinks)
            self._budget_initial = max(sum(p.numel() for p in self._tucker_params()), budget)
        if self._uses_records():
            rec = _recorder()
            rec.track(self._tucker_params())
            if not rec.active():
                rec.start()  # for a forward + backward the user runs before step() (no closure)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if is_tucker_parameter(p) and p.dim() != 1:
                raise ValueError(
                    f"batched Tucker parameters are not supported by TDLRT; use geoopt's optimizers "
                    f"(got a parameter of shape {tuple(p.shape)}, TDLRT needs 1-D packed points)"
                )
        if hasattr(self, "single_pass") and self._uses_records():  # not set while Optimizer.__init__ runs
            _recorder().track(p for p in self.param_groups[-1]["params"] if is_tucker_parameter(p))
        if getattr(self, "budget", None) is not None:  # a group added after construction
            self._check_budget_minimum()

    def _uses_records(self) -> bool:
        """Whether the step reads layer records (one-pass mode)."""
        return self.single_pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; in one-pass mode also forgets the layer records of this
        optimizer's Tucker parameters (they belong to the gradients being cleared)."""
        super().zero_grad(set_to_none)
        if self._uses_records():
            _recorder().clear_params(self._tucker_params())

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> Optional[torch.Tensor]:  # type: ignore[override]
        """One step. ``closure`` must zero the gradients, run forward and backward and return the loss.

        One-pass mode: the closure is called once (twice for a step that falls back to a second pass),
        or, without a closure, the gradients (and layer records) of the backward the caller just ran
        are used. Two-pass mode: the closure is required and called exactly twice.
        Returns the loss of the (first) evaluation, averaged over the process group if any; ``None``
        without a closure."""
        try:
            if self.single_pass:
                return self._one_pass_step(closure)
            return self._two_pass_step(closure)
        finally:
            if self.check_replicas and self.process_group is not None:
                check_replicas_identical([p for _, p in self._all_params()], self.process_group)

    def _two_pass_step(self, closure: Optional[Callable]) -> torch.Tensor:
        if closure is None:
            raise ValueError("TDLRT.step needs a closure with single_pass=False (it evaluates the gradient twice)")
        # Pass 1: factor gradients at (C, U); the other parameters' gradients would be discarded.
        loss, ok = self._pass(closure, tucker_only=True)
        if not ok:
            self._skip("in pass 1")
            return loss
        plans = self._plan()
        self._augment(plans)
        for plan in plans:
            set_point(plan.p, plan.lifted, plan.bases)
        # Pass 2: core gradients at (C^, U^) and the gradients of every other parameter.
        _, ok = self._pass(closure, core_only=[plan.p for plan in plans])
        if not ok:
            self._rollback(plans)
            self._skip("in pass 2")
            return loss
        self._finish(plans)
        return loss

    def _one_pass_step(self, closure: Optional[Callable]) -> Optional[torch.Tensor]:
        rec, mine = _recorder(), self._tucker_params()
        try:
            if closure is not None:
                rec.clear_params(mine)  # records of earlier forwards belong to gradients the closure clears
                loss, ok = self._pass(closure, record=self._uses_records())
            else:
                loss, ok = None, self._sync_and_check(None, [p for _, p in self._all_params()])[1]
            if not ok:
                self._skip("in the gradient")
                return loss
            plans = self._plan()
            self._augment(plans)
            ok = self._core_gradients(plans, closure)
        finally:
            rec.clear_params(mine)
        if not ok:
            self._rollback(plans)
            self._skip("in an augmented-core gradient")
            return loss
        self._finish(plans)
        return loss

    def _finish(self, plans: Sequence["TuckerPlan"]) -> None:
        """Everything after the gradients: core steps, truncation, the other parameters."""
        for plan in plans:
            self._core_step(plan)
        self._truncate(plans)
        self._dense_step()

    # ------------------------------------------------------------------ stages
    def _pass(
        self,
        closure: Callable,
        tucker_only: bool = False,
        core_only: Sequence[torch.Tensor] = (),
        only: Optional[Sequence[torch.Tensor]] = None,
        record: bool = False,
    ) -> tuple[torch.Tensor, bool]:
        """One gradient evaluation: ``(detached loss, loss and every gradient finite)``; with a process
        group the gradients are averaged first (one all-reduce) and the loss is the mean over ranks.

        ``tucker_only``: autograd skips the gradients of non-Tucker parameters (e.g. the first layer's
        whole backward). ``core_only``: Tucker parameters whose factor gradients are not needed
        (:func:`~tucker_manifold.parameter.core_grad_only`). ``only``: the parameters that get a gradient
        (every other one is frozen for the pass). ``record``: layers record their inputs and output
        gradients (one-pass mode)."""
        everything = [p for _, p in self._all_params()]
        for p in everything:
            p.grad = None
        if only is not None:
            keep = {id(p) for p in only}
            frozen = [p for p in everything if p.requires_grad and id(p) not in keep]
        elif tucker_only:
            frozen = [p for p in everything if p.requires_grad and not is_tucker_parameter(p)]
        else:
            frozen = []
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad(), core_grad_only(core_only), _recording(record):
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
        return self._sync_and_check(loss, everything if only is None else list(only))

    def _sync_and_check(
        self, loss: Optional[torch.Tensor], params: Sequence[torch.Tensor]
    ) -> tuple[Optional[torch.Tensor], bool]:
        """Average the gradients of ``params`` over the process group (one all-reduce; nothing without a
        group) and say whether the loss and every gradient are finite (on every rank)."""
        unscale_grads_(self, params)  # under a GradScaler (fp16): once per gradient evaluation
        if self.process_group is not None:
            return average_gradients(list(params), self.process_group, loss)
        flags = [torch.isfinite(loss).all()] if loss is not None else []
        flags += [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        return loss, bool(torch.stack(flags).all()) if flags else True

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
        """Augment every basis with its factor gradient (trimmed to a valid multilinear rank) and lift the
        core exactly, into the plans (the two-pass step then sets ``(C^, U^)`` as the point: same loss)."""
        for plan in plans:
            plan.bases = augment_tucker_bases(plan.factors, plan.grads)
            plan.lifted, plan.maps = lift(plan.core, plan.factors, plan.bases)

    def _core_gradients(self, plans: Sequence[TuckerPlan], closure: Optional[Callable]) -> bool:
        """One-pass ``dL/dC^`` of every plan (``plan.core_grad``), rebuilt from its layers' records at the
        augmented bases; with a process group, averaged over it (the second all-reduce). Parameters whose
        records are missing, stale, unsupported or inconsistent with autograd's core gradient go to
        :meth:`_fallback_core_gradients`. False if any is non-finite (the step is then skipped)."""
        rec = _recorder()
        local: list[Optional[torch.Tensor]] = []
        reasons: list[Optional[str]] = []
        for plan in plans:
            recs, g, why = rec.records(plan.p), None, None
            if not recs:
                why = ("no layer recorded its use (layers call tucker_manifold.parameter.record_io in their forward; "
                       "M.to_dense(p) does not)")
            else:
                try:
                    g = unscaled(self, augmented_core_gradient(recs, plan.bases))  # records hold scaled dL/dy
                except (RuntimeError, ValueError) as e:
                    why = str(e)
            local.append(g)
            reasons.append(why)
        if self.process_group is not None:
            local, failed = self._average_core_gradients(plans, local, [w is not None for w in reasons])
            reasons = [w if w is not None else ("its use was not recorded on another rank" if f else None)
                       for w, f in zip(reasons, failed)]
        checked = [(k, plans[k], g) for k, (g, w) in enumerate(zip(local, reasons)) if w is None]
        if checked:
            # The all-old block of dL/dC^ is autograd's core gradient of this very pass: a difference beyond
            # rounding means a use the records did not see. One host transfer for all parameters.
            norms = torch.stack([
                torch.stack([
                    torch.linalg.vector_norm((g[tuple(slice(0, r) for r in plan.old_ranks)] - auto).double()),
                    torch.linalg.vector_norm(auto.double()),
                    torch.isfinite(g).all().double(),
                ])
                for _, plan, g in checked
                for auto in [plan.p.manifold.unpack(plan.p.grad, "grad")[0].to(g.dtype)]
            ]).tolist()
            for (k, plan, g), (diff, ref, finite) in zip(checked, norms):
                if not finite:
                    return False
                rel = diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
                if rel > self._mismatch_rtol(rec.records(plan.p)):
                    reasons[k] = (
                        f"its recorded uses give a core gradient {rel:.1e} (relative) away from autograd's: a use the "
                        "layers did not record (e.g. a penalty on the dense weight)")
                else:
                    plan.core_grad, plan.source = g.to(plan.la), "records"
        fallback = [(plan, w) for plan, w in zip(plans, reasons) if w is not None]
        if fallback:
            self._warn_fallback(fallback)
            if not self._fallback_core_gradients([plan for plan, _ in fallback], closure):
                return False
        return bool(torch.stack([torch.isfinite(plan.core_grad).all() for plan in plans]).all()) if plans else True

    @staticmethod
    def _mismatch_rtol(records: Sequence) -> float:
        """The loosest tolerance over the dtypes the records were computed in."""
        return max((_MISMATCH_RTOL.get(r.gy.dtype, 1e-1) for r in records if r.gy is not None),
                   default=_MISMATCH_RTOL[torch.float32])

    def _average_core_gradients(
        self, plans: Sequence[TuckerPlan], local: Sequence[Optional[torch.Tensor]], failed: Sequence[bool]
    ) -> tuple[list[torch.Tensor], list[bool]]:
        """Mean of the per-rank ``dL/dC^`` over the process group in ONE flattened all-reduce, with a flag
        per parameter (a rank that could not rebuild it makes every rank fall back)."""
        la = torch.float64 if any(plan.la == torch.float64 for plan in plans) else torch.float32
        device = plans[0].lifted.device
        pieces = [g.reshape(-1).to(la) if g is not None else torch.zeros(plan.lifted.numel(), dtype=la, device=device)
                  for plan, g in zip(plans, local)]
        flat = torch.cat(pieces + [torch.tensor([float(f) for f in failed], dtype=la, device=device)])
        n = world_size(self.process_group)
        if n > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        out, offset = [], 0
        for plan in plans:
            k = plan.lifted.numel()
            out.append(flat[offset:offset + k].div(n).view(plan.lifted.shape).to(plan.la))
            offset += k
        return out, [f > 0 for f in flat[offset:].tolist()]

    def _fallback_core_gradients(self, plans: Sequence[TuckerPlan], closure: Optional[Callable]) -> bool:
        """Two-pass ``dL/dC^`` for these plans: set their lifted points and evaluate the closure again with
        only them trainable (the other parameters keep this step's gradients). False if non-finite."""
        if closure is None:
            raise RuntimeError(
                "TDLRT(single_pass=True).step() without a closure cannot evaluate dL/dC^ of a Tucker parameter whose "
                f"use no layer recorded (shapes {[plan.old_manifold.shape for plan in plans]}): call step(closure), "
                "record the use with tucker_manifold.parameter.record_io, or use single_pass=False")
        kept = {id(p): p.grad for _, p in self._all_params()}
        for plan in plans:
            set_point(plan.p, plan.lifted, plan.bases)
        only = [plan.p for plan in plans]
        _, ok = self._pass(closure, core_only=only, only=only)
        for plan in plans:
            g = plan.p.grad
            plan.core_grad = (plan.p.manifold.unpack(g, "grad")[0].to(plan.la) if g is not None
                              else torch.zeros_like(plan.lifted))
            plan.source = "second pass"
        redo = {id(p) for p in only}
        for _, p in self._all_params():
            if id(p) not in redo:
                p.grad = kept[id(p)]
        return ok

    def _warn_fallback(self, fallback: Sequence[tuple[TuckerPlan, str]]) -> None:
        for plan, why in fallback:
            if id(plan.p) in self._fallback_warned:
                continue
            self._fallback_warned.add(id(plan.p))
            warnings.warn(
                f"{type(self).__name__}: the Tucker parameter of shape {plan.old_manifold.shape} takes "
                f"{self._FALLBACK_WHAT} in one-pass mode, because {why}. Said once per parameter.",
                SinglePassFallbackWarning, stacklevel=_stacklevel())

    _FALLBACK_WHAT = "a second pass (its dL/dC^ at the lifted point)"

    def _core_step(self, plan: TuckerPlan) -> None:
        """Base-rule step on the augmented core with its gradient (pass 2 or rebuilt); optimizer state is
        first carried into the augmented bases."""
        p = plan.p
        # the lifted core as the parameter holds it (in its dtype), as pass 2 saw it
        core = plan.lifted.to(p.dtype).to(plan.la)
        if plan.core_grad is None:  # two-pass: the gradient of pass 2
            plan.core_grad = (p.manifold.unpack(p.grad, "grad")[0].to(plan.la) if p.grad is not None
                              else torch.zeros_like(core))
        state = self.state[p]
        self._transform_state(state, plan.maps, plan.old_ranks, transpose=False)
        plan.stepped = self._base_update(plan.group, state, core, plan.core_grad)

    def _truncate(self, plans: Sequence[TuckerPlan]) -> None:
        """Truncate every stepped core by its group's ``tau`` within its bounds and set the new points.
        A global rank allocation overrides this (it sees all parameters at once) and calls
        :meth:`_apply_truncation`. With ``budget``: :meth:`_truncate_to_budget`."""
        self.last_step_info = []
        if self.budget is not None:
            self._truncate_to_budget(plans)
            return
        for plan in plans:
            b = plan.bounds
            tr = truncate_core(plan.stepped, plan.group["tau"], b.rmin, b.rmax, b.adaptive, plan.old_ranks)
            self._apply_truncation(plan, tr)

    # ------------------------------------------------------------------ parameter budget
    def budget_at(self, step: int) -> int:
        """The budget in force at truncation number ``step`` (0-based): ``budget``, or with
        ``budget_schedule=(start, end)`` AdaLoRA's cubic decay from the count at construction (held up to
        ``start``) to ``budget`` (reached at ``end``; :func:`tucker_manifold.budget.budget_at_step`)."""
        if self.budget is None:
            raise ValueError("budget_at: this optimizer has no budget")
        if self.budget_schedule is None:
            return self.budget
        start, end = self.budget_schedule
        return budget_at_step(int(step), start, end, self._budget_initial, self.budget)

    def _check_budget_minimum(self) -> None:
        """ValueError if ``budget`` is below the smallest count of all Tucker parameters (adaptive modes at
        ``rmin``, fixed modes at their current rank): no allocation could meet it."""
        minimum = 0
        for group, p in self._all_params():
            if is_tucker_parameter(p):
                m = p.manifold
                b = rank_bounds(p).with_overrides(m.shape, group["rmin"], group["rmax"])
                minimum += minimum_count(m.shape, b, fixed_ranks=m.ranks)
        if self.budget < minimum:
            raise ValueError(f"budget = {self.budget} is below the minimum Tucker parameter count {minimum} of this "
                             f"optimizer's parameters (every adaptive rank at its rmin, fixed modes at their rank)")

    def _truncate_to_budget(self, plans: Sequence[TuckerPlan]) -> None:
        """Choose every plan's ranks jointly (:func:`tucker_manifold.budget.allocate_ranks`: least sum of
        squared relative truncation errors, weight ``1/||C^||^2`` per parameter) so that all Tucker
        parameters of the optimizer total at most :meth:`budget_at` this step; a group's ``tau > 0`` is a
        floor (ranks never above what ``tau`` alone keeps). Parameters without a gradient this step keep
        their size and count against the budget."""
        step = self.budget_step
        target = self.budget_at(step)
        planned = {id(plan.p) for plan in plans}
        held = sum(p.numel() for p in self._tucker_params() if id(p) not in planned)
        items = [budget_tensor(plan.stepped, shape=plan.old_manifold.shape, bounds=plan.bounds,
                               fixed_ranks=plan.old_ranks, tau=plan.group["tau"] or None, weight="relative")
                 for plan in plans]
        if not items:
            return
        available, minimum = target - held, min_param_count(items)
        if available < minimum:
            # Only reachable when parameters without a gradient hold more than their minimum: the step is
            # finished at the smallest ranks (state stays consistent) and the excess is said.
            warnings.warn(
                f"{type(self).__name__}: budget {target} can not be met this step: Tucker parameters without a "
                f"gradient hold {held}, the others at their minimum {minimum}; total {held + minimum}",
                RuntimeWarning, stacklevel=5)
            available = minimum
        alloc = allocate_ranks(items, available)
        for plan, item, ranks in zip(plans, items, alloc.ranks):
            self._apply_truncation(plan, truncate_to_ranks(item, ranks))
        self.budget_step = step + 1
        self.last_allocation = dict(step=step, budget=target, count=alloc.count + held, objective=alloc.objective)

    def _apply_truncation(self, plan: TuckerPlan, tr: Truncation) -> None:
        """Set ``U_i <- U^_i P_i``, ``C <- C'``, carry the state along and record ``last_step_info``."""
        plan.truncation = tr
        self._transform_state(self.state[plan.p], tr.transforms, tr.ranks, transpose=True)
        set_point(plan.p, tr.core, [u @ t for u, t in zip(plan.bases, tr.transforms)])
        self.last_step_info.append(dict(
            ranks=tr.ranks, truncation_error=float(tr.error),
            core_grad_norm=float(torch.linalg.vector_norm(plan.core_grad)), augmented_ranks=tuple(plan.stepped.shape),
            core_gradient=plan.source, rejected=plan.rejected,
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

    def _tucker_params(self) -> list[torch.Tensor]:
        return [p for _, p in self._all_params() if is_tucker_parameter(p)]

    def _skip(self, where: str) -> None:
        self.skipped_steps += 1
        warnings.warn(
            f"{type(self).__name__}: non-finite loss or gradient {where}; step skipped, weights and state unchanged "
            f"(skipped so far: {self.skipped_steps})",
            RuntimeWarning,
            stacklevel=_stacklevel(),
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
        if self.budget is not None:  # the budget schedule's position and its starting count
            sd["tdlrt"]["budget_step"] = self.budget_step
            sd["tdlrt"]["budget_initial"] = self._budget_initial
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("tdlrt", {})
        super().load_state_dict(state_dict)
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.budget_step = int(extra.get("budget_step", 0))
        if self.budget is not None and "budget_initial" in extra:
            self._budget_initial = int(extra["budget_initial"])


class ParallelTDLRT(TDLRT):
    """The parallel (Riemannian) rank-adaptive integrator for Tucker parameters: one gradient evaluation
    per step, always (Ceruti-Kusch-Lubich-Sulz's parallel BUG; GeoLoRA for matrices).

    Same arguments, base rules, state transport, rank bounds, truncation, rollback, process groups and
    checkpoints as :class:`TDLRT` (``single_pass`` is always True), and per Tucker parameter:

    1. augmented bases ``U^_i = orth([U_i | dL/dU_i])``, NOT trimmed to a valid multilinear rank (with
       trimmed bases the masked step is not the tangent step); the lifted core is never set as a point;
    2. ``dL/dC^`` masked (:func:`tucker_manifold.onepass.parallel_core_gradient`): the all-old block kept,
       a block new in one mode ``i`` projected onto the row space of ``Mat_i(C)``, blocks new in two or
       more modes zeroed. With the SGD rule, ``C^ - h * mask(dL/dC^)`` in the bases ``U^`` is
       ``Y - h P(Y) grad L`` exactly; no inverse is formed;
    3. truncation back to a valid multilinear rank by ``tau``, as TDLRT.

    core_gradient : {"records", "factors"}
        Where the masked gradient comes from. ``"records"`` (default): ``dL/dC^`` rebuilt from the layers'
        records, then masked; two all-reduces per step with a process group. ``"factors"``: from the
        autograd core and factor gradients alone, ``B_{i} = Fold_i(U~_i^T dL/dU_i R_i^{-1} Q_i^T)``
        (:func:`~tucker_manifold.onepass.parallel_core_gradient_from_factors`, triangular solves): no
        records, no extra kernels, ONE all-reduce per step; equal in exact arithmetic, both lose about
        ``eps cond(Mat_i(C))``. A parameter without records uses ``"factors"`` too (warned once).
    rejection : float, optional
        Step rejection, off by default. With ``rejection=c``: the step of a parameter is rejected when
        ``lr * eta > c * theta``, where ``eta`` is the norm of the blocks of ``dL/dC^`` that the mask drops
        (new in two or more modes; :func:`~tucker_manifold.onepass.parallel_dropped_norm`; for matrices the
        paper's ``||U~^T grad L V~||``) and ``theta = tau ||C^||`` the truncation's absolute tolerance.
        The paper redoes a rejected step from the same point in the augmented bases; here the redo keeps
        those bases and takes the unmasked ``dL/dC^`` (the two-pass TDLRT step, whose all-old block in the
        redo's bases is exactly what the paper's redo sees; the further augmentation is left to the next
        step). Needs the records (``core_gradient="records"``). The paper's other trigger, a new rank that
        doubled below the cap, needs no redo under SGD (the next step starts from the doubled rank) and
        is not implemented. Rejected steps are counted in ``rejected_steps``.
    """

    _FALLBACK_WHAT = "the masked gradient from its factor gradients (core_gradient='factors')"

    def __init__(
        self,
        params: Iterable,
        lr: float,
        tau: Optional[float] = None,
        method: str = "sgd",
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rmin: Optional[int] = None,
        rmax: Optional[int] = None,
        *,
        single_pass: bool = True,
        process_group: Optional[object] = None,
        check_replicas: bool = False,
        core_gradient: str = "records",
        rejection: Optional[float] = None,
        budget: Optional[int] = None,
        budget_schedule: Optional[tuple[int, int]] = None,
    ):
        if rejection is not None and budget is not None and not tau:
            raise ValueError("rejection with a budget needs tau > 0 (the rejection test compares with tau ||C^||)")
        if single_pass is not True:
            raise ValueError("single_pass must be True for ParallelTDLRT (it takes one gradient evaluation per step)")
        if core_gradient not in ("records", "factors"):
            raise ValueError(f"core_gradient must be 'records' or 'factors', got {core_gradient!r}")
        if rejection is not None:
            if isinstance(rejection, bool) or not (isinstance(rejection, (int, float)) and rejection > 0):
                raise ValueError(f"rejection must be a number > 0 or None, got {rejection!r}")
            if core_gradient != "records":
                raise ValueError("rejection needs core_gradient='records' (eta is read from dL/dC^)")
        self.core_gradient = core_gradient
        self.rejection = None if rejection is None else float(rejection)
        self.rejected_steps = 0
        super().__init__(
            params, lr, tau, method, momentum, dampening, nesterov, weight_decay, betas, eps, rmin, rmax,
            single_pass=True, process_group=process_group, check_replicas=check_replicas,
            budget=budget, budget_schedule=budget_schedule,
        )

    def _uses_records(self) -> bool:
        return self.core_gradient == "records"

    def _augment(self, plans: Sequence[TuckerPlan]) -> None:
        """Untrimmed augmented bases (every mode below full rank gains its gradient's new directions) and
        the exact lift, into the plans only."""
        for plan in plans:
            plan.bases = augment_bases(plan.factors, plan.grads)
            plan.lifted, plan.maps = lift(plan.core, plan.factors, plan.bases)

    def _core_gradients(self, plans: Sequence[TuckerPlan], closure: Optional[Callable]) -> bool:
        if self.core_gradient == "factors":
            for plan in plans:
                self._factor_form(plan)
            return bool(torch.stack([torch.isfinite(plan.core_grad).all() for plan in plans]).all()) if plans else True
        return super()._core_gradients(plans, closure)

    def _fallback_core_gradients(self, plans: Sequence[TuckerPlan], closure: Optional[Callable]) -> bool:
        # No second pass: the lifted core of untrimmed bases is not a valid point to evaluate at, and the
        # factor gradients of this very pass give the masked gradient directly.
        for plan in plans:
            self._factor_form(plan)
        return True

    @staticmethod
    def _factor_form(plan: TuckerPlan) -> None:
        core_grad = plan.p.manifold.unpack(plan.p.grad, "grad")[0].to(plan.la)
        plan.core_grad = parallel_core_gradient_from_factors(core_grad, plan.grads, plan.core, plan.bases)
        plan.source = "factors"

    def _core_step(self, plan: TuckerPlan) -> None:
        """Mask ``dL/dC^`` (unless it already is, "factors"), optionally test for rejection, then TDLRT's
        base-rule step on the augmented core."""
        if plan.source != "factors":
            g_aug = plan.core_grad
            masked = parallel_core_gradient(g_aug, plan.core, plan.old_ranks)
            plan.core_grad = masked
            if self.rejection is not None:
                eta = float(parallel_dropped_norm(g_aug, plan.old_ranks))
                theta = plan.group["tau"] * float(torch.linalg.vector_norm(plan.lifted))
                if plan.group["lr"] * eta > self.rejection * theta:
                    plan.core_grad, plan.rejected = g_aug, True
                    self.rejected_steps += 1
        super()._core_step(plan)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["tdlrt"]["rejected_steps"] = self.rejected_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self.rejected_steps = int(state_dict.get("tdlrt", {}).get("rejected_steps", 0))
        super().load_state_dict(state_dict)
