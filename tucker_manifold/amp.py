"""Mixed precision: autocast forward and backward in bf16 / fp16, parameters and the TDLRT linear
algebra in fp32 (float64 stays float64), and loss scaling for fp16.

Two halves:

* **optimizer side** (what :class:`~tucker_manifold.optim.TDLRT` calls): torch's protocol for
  optimizers that unscale themselves. A class with ``_step_supports_amp_scaling = True`` gets
  ``optimizer.grad_scale`` (and ``found_inf``) set by ``GradScaler.step(optimizer)`` for the duration
  of its ``step``; it must divide its gradients by ``grad_scale``. TDLRT has to: in one-pass mode it
  rebuilds ``dL/dC^`` from the layers' recorded output gradients, which are scaled too, and
  ``GradScaler.unscale_`` only sees ``p.grad``. :func:`unscale_grads_` (every gradient evaluation)
  and :func:`unscaled` (every rebuilt core gradient) are those two divisions; both are no-ops when no
  scale is set. A non-finite gradient after unscaling goes through the optimizer's own skip: rollback,
  weights and state bit-identical.
* **loop side**: :class:`MixedPrecision` (``precision="fp32" | "bf16" | "fp16"``) gives the autocast
  context, the (scaled) backward and :meth:`MixedPrecision.step`. For fp16 it owns a
  ``torch.amp.GradScaler``; :func:`scaled_step` runs one step of any optimizer with it:

  - an optimizer that evaluates its closure itself and unscales itself (TDLRT, ParallelTDLRT: the
    flag above and a ``skipped_steps`` counter) gets ``grad_scale`` for its ``step(closure)``; its
    own verdict (did it skip?) is what the scaler backs off on. With a process group that verdict is
    the same on every rank (the optimizer's all-reduce carries the non-finite flag), so the scales
    stay identical across ranks, which the scaler's local inf check would not guarantee;
  - any other optimizer: the closure runs once, then ``scaler.step(optimizer)`` / ``scaler.update()``
    as torch documents (unscale, skip on inf/NaN).

  The plain torch recipe (``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``) also
  works with one-pass TDLRT in one process; with a process group use :func:`scaled_step`.

bf16 needs no scaler (its exponent range is fp32's). fp16 autocast runs on CPU too (torch >= 2.x
supports it, slowly); bf16 on CUDA needs a GPU that supports it (``torch.cuda.is_bf16_supported()``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch

__all__ = [
    "PRECISIONS",
    "check_precision",
    "autocast_dtype",
    "unscale_grads_",
    "unscaled",
    "scaled_step",
    "MixedPrecision",
]

#: The ``--precision`` choices.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
_DTYPES: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: Any, name: str = "precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; ValueError naming ``name`` otherwise."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (``None`` for fp32: no autocast)."""
    return _DTYPES[check_precision(precision)]


# ------------------------------------------------------------------------------------ optimizer side
def unscale_grads_(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
    """Divide ``p.grad`` of every ``p`` in ``params`` by ``optimizer.grad_scale`` in place (set by a
    ``GradScaler`` for the duration of ``step``); nothing when it is not set. Call it once per gradient
    evaluation, before the gradients are used or averaged. Division, not multiplication by the
    reciprocal: exact for the scaler's powers of two, correctly rounded otherwise."""
    scale = getattr(optimizer, "grad_scale", None)
    if scale is None:
        return
    for p in params:
        g = p.grad
        if g is not None:
            g.div_(torch.as_tensor(scale).to(device=g.device, dtype=g.dtype))


def unscaled(optimizer: torch.optim.Optimizer, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t / optimizer.grad_scale`` (a new tensor) when a scale is set, else ``t`` itself; ``None``
    passes through. For gradients the optimizer rebuilds from scaled records (one-pass ``dL/dC^``)."""
    scale = getattr(optimizer, "grad_scale", None)
    if scale is None or t is None:
        return t
    return t / torch.as_tensor(scale).to(device=t.device, dtype=t.dtype)


def _handles_closure_scaling(optimizer: torch.optim.Optimizer) -> bool:
    """TDLRT's protocol: it unscales itself and counts the steps it skipped."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and hasattr(optimizer, "skipped_steps")


def _record_found_inf(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer, found: bool) -> None:
    # The scaler backs off on what its per-optimizer state says was found. For an optimizer that checked
    # (and all-reduced) its own gradients, that is its verdict; torch has no public setter for it.
    from torch.amp.grad_scaler import OptState

    scale = scaler._scale  # created by the closure's scaler.scale(loss)
    if scale is None:
        raise RuntimeError("scaled_step: the closure never called scaler.scale(loss) (MixedPrecision.backward)")
    state = scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"] = {scale.device: torch.full((), float(found), dtype=torch.float32,
                                                              device=scale.device)}
    state["stage"] = OptState.STEPPED


def scaled_step(
    scaler: Optional["torch.amp.GradScaler"], optimizer: torch.optim.Optimizer, closure: Callable[[], Any]
) -> tuple[Any, bool]:
    """One step of ``optimizer`` under ``scaler`` (``None`` or disabled: ``optimizer.step(closure)``).
    ``closure`` zeroes the gradients, runs forward and ``scaler.scale(loss).backward()`` and returns
    the (unscaled) loss. Returns ``(loss, skipped)``; the scaler is updated (backed off when skipped).
    See the module docstring for the two paths."""
    if scaler is None or not scaler.is_enabled():
        return optimizer.step(closure), False
    if _handles_closure_scaling(optimizer):
        device = torch.device(getattr(scaler, "_device", "cpu"))
        optimizer.grad_scale = torch.full((), scaler.get_scale(), dtype=torch.float32, device=device)
        optimizer.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        before = optimizer.skipped_steps
        try:
            loss = optimizer.step(closure)
        finally:
            del optimizer.grad_scale, optimizer.found_inf
        skipped = optimizer.skipped_steps > before
        _record_found_inf(scaler, optimizer, skipped)
        scaler.update()
        return loss, skipped
    if getattr(optimizer, "single_pass", None) is not None:  # a TDLRT without the protocol (older optim.py)
        raise NotImplementedError(
            f"{type(optimizer).__name__} does not unscale its own gradients (_step_supports_amp_scaling): its "
            "one-pass core gradients would keep the loss scale; use --precision bf16 or fp32")
    with torch.enable_grad():
        loss = closure()
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return loss, scaler.get_scale() < before  # the scale only shrinks on a skipped step


class MixedPrecision:
    """Autocast, backward and step for one precision on one device type.

    ``precision``: ``"fp32"`` (everything off: bit-identical to not using this class), ``"bf16"``
    (autocast), ``"fp16"`` (autocast and a ``GradScaler``: ``init_scale``, ``growth_interval`` as
    torch's). ``device``: where the model runs (its type picks the autocast backend). ValueError for
    a precision the device cannot run. ``skipped_steps`` counts the steps the scaler skipped.
    """

    def __init__(self, precision: str = "fp32", device: str | torch.device = "cpu", *,
                 init_scale: float = 2.0**16, growth_interval: int = 2000):
        self.precision = check_precision(precision)
        self.device_type = torch.device(device).type
        self.dtype = _DTYPES[self.precision]
        if self.dtype is not None and not torch.amp.is_autocast_available(self.device_type):
            raise ValueError(f"precision={precision!r}: torch {torch.__version__} has no autocast for device "
                             f"type {self.device_type!r}")
        if self.precision == "bf16" and self.device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16': this GPU does not support bfloat16; use fp16")
        self.scaler: Optional[torch.amp.GradScaler] = None
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device_type, init_scale=init_scale,
                                               growth_interval=growth_interval)
        self.skipped_steps = 0

    @property
    def enabled(self) -> bool:
        """Whether anything differs from plain fp32."""
        return self.dtype is not None

    def autocast(self) -> ContextManager:
        """The forward's context: ``torch.autocast(device_type, dtype)``, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, of the scaled loss for fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any]) -> Any:
        """``optimizer.step(closure)``, through :func:`scaled_step` for fp16; returns the loss."""
        if self.scaler is None:
            return optimizer.step(closure)
        loss, skipped = scaled_step(self.scaler, optimizer, closure)
        self.skipped_steps += int(skipped and not _handles_closure_scaling(optimizer))  # TDLRT counts its own
        return loss

    def state_dict(self) -> dict:
        """The scaler's state (scale, growth tracker, ...; JSON-able) and the skip count."""
        return {"precision": self.precision, "skipped_steps": self.skipped_steps,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (a state of another precision is a ValueError)."""
        if state.get("precision") != self.precision:
            raise ValueError(f"state is for precision {state.get('precision')!r}, this is {self.precision!r}")
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
