"""Adapter layers: ``y = base(x) + scaling * dW(dropout(x))`` with ``dW`` a Tucker tensor.

* :class:`TuckerDelta` holds one adapter: the packed Tucker parameter ``dw`` (a
  :class:`~tucker_manifold.parameter.TuckerParameter`: core ``C`` and orthonormal factors ``U_i``), the fixed
  ``scaling`` and the input dropout. It applies ``dW`` without ever forming it:

  - ``nn.Linear`` (order 2, ``dW (out, in) = U_out C U_in^T``): ``x -> x (C U_in^T)^T -> . U_out^T``, two thin
    matmuls (``C`` is folded into ``U_in``; cheaper than three kernels for the small ranks adapters use);
  - ``nn.Conv2d`` (order 4, ``dW (out, in, kh, kw) = C x_1 U_out x_2 U_in x_3 U_h x_4 U_w``): a 1x1 conv
    ``in -> r_in``, the small conv ``r_in -> r_out`` with kernel ``C x_3 U_h x_4 U_w`` in the base conv's
    geometry (stride, padding, padding mode, dilation), a 1x1 conv ``r_out -> out``. Channel mixing commutes
    with every padding mode, so this is exactly ``conv(x, dW)``. For 1x1 kernels (where the first 1x1 is
    wasted work) ``U_in`` is folded into the small kernel instead (two convs).

* :class:`TuckerAdapterLayer` (:class:`TuckerAdapterLinear`, :class:`TuckerAdapterConv2d`) wraps the frozen
  ``base_layer`` and a ``ModuleDict`` of named :class:`TuckerDelta` (PEFT's layout, so the same class serves the
  PEFT tuner); ``merge`` / ``unmerge`` add / subtract ``scaling dW`` in the base weight.

TDLRT-style optimizers replace ``dw``'s point (and ranks) through ``parameter.set_point``; every forward reads
the ranks from ``dw.manifold``. Inside ``parameter.core_grad_only`` the factors are detached (their gradient
is not used there), which skips their weight-gradient kernels. Each forward reports its input and output to
``parameter.record_io`` and :meth:`TuckerDelta.tucker_core_gradient` rebuilds the augmented-core gradient from
them, so the one-pass integrators (:mod:`tucker_manifold.onepass`) need no second pass.

Checkpoints: ``state_dict`` carries the ranks (``tucker_ranks``, int64) next to the packed data, and loading a
state dict at other ranks first resizes the parameter; so ``torch.save(model.state_dict())`` /
``load_state_dict`` and PEFT's ``save_pretrained`` / ``from_pretrained`` round-trip after ranks changed.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..parameter import (
    RankBounds,
    TuckerParameter,
    factor_grads_wanted,
    make_tucker_parameter,
    record_io,
    set_point,
    tucker_manifold,
)
from ..tucker import multi_mode_dot, reconstruct

__all__ = ["TuckerDelta", "TuckerAdapterLayer", "TuckerAdapterLinear", "TuckerAdapterConv2d", "SUPPORTED_TYPES"]

#: Base layer types an adapter can wrap.
SUPPORTED_TYPES = (nn.Linear, nn.Conv2d)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _haar(n: int, r: int, dtype: torch.dtype, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``(n, r)`` Haar-random orthonormal columns (sign-fixed QR of a Gaussian)."""
    a = torch.randn(n, r, dtype=dtype, device=device, generator=generator)
    q, rr = torch.linalg.qr(a)
    s = torch.sign(torch.diagonal(rr))
    return q * torch.where(s == 0, torch.ones_like(s), s)


class TuckerDelta(nn.Module):
    """One Tucker adapter ``scaling * dW`` for a base ``nn.Linear`` / ``nn.Conv2d`` (see the module docstring).

    Args:
        base_layer: the layer adapted (its weight shape, geometry, dtype and device are used; it is not stored).
        ranks: initial multilinear ranks (``(r, r)`` or ``(r_out, r_in, r_h, r_w)``).
        bounds: the per-mode :class:`RankBounds` the optimizer keeps the ranks in.
        scaling: fixed output scale.
        dropout: input dropout probability.
        init_scale: ``0``: zero core (``dW = 0``); ``> 0``: ``||scaling dW||_F = init_scale ||W0||_F`` with a
            well-conditioned core.
        generator: for the random factors (``None``: torch's global generator).
    """

    dw: TuckerParameter

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: Sequence[int],
        bounds: RankBounds,
        scaling: float = 1.0,
        dropout: float = 0.0,
        init_scale: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, SUPPORTED_TYPES):
            raise ValueError(f"base_layer must be an nn.Linear or nn.Conv2d, got {type(base_layer).__name__}")
        w = base_layer.weight
        self.kind = "linear" if isinstance(base_layer, nn.Linear) else "conv2d"
        self.weight_shape = tuple(int(n) for n in w.shape)
        if self.kind == "conv2d":
            if base_layer.groups != 1:
                raise ValueError(f"Conv2d adapters need groups=1, got groups={base_layer.groups}")
            self.stride = tuple(base_layer.stride)
            self.padding = base_layer.padding if isinstance(base_layer.padding, str) else tuple(base_layer.padding)
            self.dilation = tuple(base_layer.dilation)
            self.padding_mode = base_layer.padding_mode
            self._reversed_padding = tuple(getattr(base_layer, "_reversed_padding_repeated_twice", (0, 0, 0, 0)))
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        ranks = tuple(int(r) for r in ranks)
        manifold = tucker_manifold(self.weight_shape, ranks)
        work = _work_dtype(w.dtype)
        factors = []
        for i, (n, r) in enumerate(zip(self.weight_shape, ranks)):
            if i >= 2 and r == n:
                # Full-rank kernel modes: the identity (any orthogonal matrix spans the same space).
                factors.append(torch.eye(n, dtype=work, device=w.device))
            else:
                factors.append(_haar(n, r, work, w.device, generator))
        if init_scale > 0:
            core = self._flat_core(ranks, work, w.device, generator)
            target = init_scale * float(torch.linalg.vector_norm(w.detach().to(work))) / self.scaling
            core = core * (target / float(torch.linalg.vector_norm(core)))
        else:
            core = torch.zeros(ranks, dtype=work, device=w.device)
        packed = manifold.pack(core, factors).to(w.dtype)
        self.dw = make_tucker_parameter(packed, manifold, bounds)
        self.register_buffer("tucker_ranks", torch.tensor(ranks, dtype=torch.int64, device=w.device))

    @staticmethod
    def _flat_core(ranks: tuple[int, ...], dtype, device, generator) -> torch.Tensor:
        """A core whose unfoldings are well conditioned: orthogonal for order 2, Gaussian (wide unfoldings) else."""
        if len(ranks) == 2:
            return _haar(ranks[0], ranks[1], dtype, device, generator)
        return torch.randn(ranks, dtype=dtype, device=device, generator=generator)

    # ------------------------------------------------------------------ state
    @property
    def ranks(self) -> tuple[int, ...]:
        """Current multilinear ranks."""
        return tuple(self.dw.manifold.ranks)

    @property
    def bounds(self) -> RankBounds:
        return self.dw.bounds

    def core_and_factors(self, detach: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Views ``core (r_1..r_d)``, ``factors [(n_i, r_i)]`` of the parameter (factors detached inside
        ``core_grad_only``, everything detached with ``detach=True``)."""
        p = self.dw
        core, factors = p.manifold.unpack(p.detach() if detach else p)
        if not detach and not factor_grads_wanted(p):
            factors = [f.detach() for f in factors]
        return core, list(factors)

    def set_point(self, core: torch.Tensor, factors: Sequence[torch.Tensor]) -> None:
        """Replace the point (and ranks) in place; see :func:`tucker_manifold.parameter.set_point`."""
        set_point(self.dw, core, factors)

    def parameter_count(self) -> int:
        """Stored numbers: ``prod(r) + sum_i n_i r_i``."""
        return int(self.dw.manifold.packed_size)

    # ------------------------------------------------------------------ maths
    def delta_weight(self) -> torch.Tensor:
        """Dense ``scaling * dW`` (the base weight's shape), differentiable."""
        core, factors = self.core_and_factors()
        if self.kind == "linear":
            u_out, u_in = factors
            return (u_out @ core @ u_in.transpose(0, 1)) * self.scaling
        return reconstruct(core, factors) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * dW`` applied to ``dropout(x)``: ``(*, in) -> (*, out)`` or ``(B, in, H, W) -> (B, out, H', W')``."""
        p = self.dw
        h = self.dropout(x)
        if h.dtype != p.dtype:
            h = h.to(p.dtype)
        core, factors = self.core_and_factors()
        if self.kind == "linear":
            u_out, u_in = factors
            y = F.linear(h, (core * self.scaling) @ u_in.transpose(0, 1))  # (*, r_out)
            y = F.linear(y, u_out)
        else:
            u_out, u_in, u_h, u_w = factors
            small = multi_mode_dot(core * self.scaling, [None, None, u_h, u_w])  # (r_out, r_in, kh, kw)
            if self.weight_shape[2:] == (1, 1):
                y = self._conv(h, torch.tensordot(small, u_in, dims=([1], [1])).movedim(-1, 1))  # (r_out, in, 1, 1)
            else:
                y = self._conv(F.conv2d(h, u_in.transpose(0, 1)[:, :, None, None]), small)
            y = F.conv2d(y, u_out[:, :, None, None])
        # One-pass TDLRT: input and output gradient are recorded (no-op unless a recorder tracks p).
        return record_io(p, self, h, y)

    def tucker_core_gradient(self, x: torch.Tensor, gy: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``dL/dC`` at the bases ``factors`` from a recorded adapter input ``x`` (after dropout) and output
        gradient ``gy`` (the one-pass protocol of :mod:`tucker_manifold.onepass`); includes ``scaling``."""
        from ..onepass import conv2d_core_gradient, linear_core_gradient

        if self.kind == "linear":
            g = linear_core_gradient(x, gy, factors[0], factors[1])
        else:
            g = conv2d_core_gradient(x, gy, factors, self.stride, self.padding, self.dilation, self.padding_mode)
        return g * self.scaling

    def _conv(self, h: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """``kernel`` applied with the base conv's geometry (as ``nn.Conv2d._conv_forward`` does)."""
        if self.padding_mode != "zeros":
            h = F.pad(h, self._reversed_padding, mode=self.padding_mode)
            return F.conv2d(h, kernel, None, self.stride, 0, self.dilation)
        return F.conv2d(h, kernel, None, self.stride, self.padding, self.dilation)

    # ------------------------------------------------------------------ checkpoints
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.tucker_ranks = torch.tensor(self.ranks, dtype=torch.int64, device=self.tucker_ranks.device)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "tucker_ranks"
        if key in state_dict:
            ranks = tuple(int(r) for r in torch.as_tensor(state_dict[key]).tolist())
            if len(ranks) != len(self.weight_shape) or any(not 1 <= r <= n for r, n in zip(ranks, self.weight_shape)):
                error_msgs.append(f"{key}: ranks {ranks} do not fit the weight shape {self.weight_shape}")
                return
            if ranks != self.ranks:
                p = self.dw
                zeros = [torch.zeros(n, r, dtype=p.dtype, device=p.device) for n, r in zip(self.weight_shape, ranks)]
                set_point(p, torch.zeros(ranks, dtype=p.dtype, device=p.device), zeros)
                self.tucker_ranks = torch.tensor(ranks, dtype=torch.int64, device=self.tucker_ranks.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.weight_shape}, ranks={self.ranks}, scaling={self.scaling:g}"


class TuckerAdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus named :class:`TuckerDelta` adapters (``tucker_delta[name]``).

    ``forward(x) = base_layer(x) + sum of the active adapters' outputs``; nothing is added while the adapters
    are merged into the base weight or disabled.
    """

    adapter_layer_names = ("tucker_delta",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, delta: TuckerDelta) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.tucker_delta = nn.ModuleDict({adapter_name: delta})
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    # -- PEFT-compatible state (the PEFT subclass inherits these before BaseTunerLayer's)
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    @property
    def active_adapter(self):
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        a = self._active_adapter
        return [a] if isinstance(a, str) else list(a)

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while hasattr(base, "base_layer"):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.get_base_layer().bias

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the adapters' contribution on or off (requires_grad is left alone)."""
        self._disable_adapters = not enabled

    def add_adapter(self, adapter_name: str, delta: TuckerDelta) -> None:
        if adapter_name in self.tucker_delta:
            raise ValueError(f"adapter_name {adapter_name!r} already exists on this layer")
        self.tucker_delta[adapter_name] = delta

    # -- maths
    def delta_weight(self, adapter_name: str = "default") -> torch.Tensor:
        return self.tucker_delta[adapter_name].delta_weight()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ``scaling dW`` of the (active) adapters to the base weight in place."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        base = self.get_base_layer()
        for name in names:
            if name in self.merged_adapters or name not in self.tucker_delta:
                continue
            with torch.no_grad():
                dw = self.tucker_delta[name].delta_weight().to(base.weight.dtype)
                if safe_merge and not torch.isfinite(dw).all():
                    raise ValueError(f"adapter {name!r} has non-finite weights; not merged")
                base.weight.add_(dw)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters again (exact up to rounding in the base weight's dtype)."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                base.weight.sub_(self.tucker_delta[name].delta_weight().to(base.weight.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters or self.merged:
            return y
        for name in self.active_adapters:
            delta = self.tucker_delta[name] if name in self.tucker_delta else None
            if delta is not None:
                y = y + delta(x).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"merged={self.merged}, disabled={self._disable_adapters}"


class TuckerAdapterLinear(TuckerAdapterLayer):
    """Tucker adapter around an ``nn.Linear`` (order-2 ``dW``)."""


class TuckerAdapterConv2d(TuckerAdapterLayer):
    """Tucker adapter around an ``nn.Conv2d`` (4-way ``dW (out, in, kh, kw)``)."""
