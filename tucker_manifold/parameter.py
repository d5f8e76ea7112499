"""The Tucker-parameter contract shared by the optimizers (``optim``) and the layers (``nn``,
``adapters``): nothing else passes between them.

* :class:`TuckerParameter`: a ``geoopt.ManifoldParameter`` on a :class:`FixedRankTucker` whose packed
  data is ``[vec(C), vec(U_1), ..., vec(U_d)]``, with declared per-mode rank bounds (:class:`RankBounds`).
* :func:`set_point`: the one way to replace a point (same Parameter object, new data and manifold).
* :func:`core_grad_only`: a context in which layers need not compute factor gradients (TDLRT's core
  pass); layers ask :func:`factor_grads_wanted`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Iterable, Iterator, Optional, Sequence

import torch
from geoopt import ManifoldParameter

from .manifold import FixedRankTucker

__all__ = [
    "RankBounds",
    "TuckerParameter",
    "make_tucker_parameter",
    "is_tucker_parameter",
    "rank_bounds",
    "tucker_manifold",
    "set_point",
    "core_grad_only",
    "factor_grads_wanted",
]


@dataclasses.dataclass(frozen=True)
class RankBounds:
    """Per-mode rank bounds of a Tucker parameter: ``1 <= rmin[i] <= rmax[i] <= n_i``; a mode with
    ``adaptive[i] = False`` keeps its rank (it may still rotate)."""

    rmin: tuple[int, ...]
    rmax: tuple[int, ...]
    adaptive: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not (len(self.rmin) == len(self.rmax) == len(self.adaptive)):
            raise ValueError(f"rmin, rmax and adaptive must have one entry per mode, got {self}")
        for i, (lo, hi) in enumerate(zip(self.rmin, self.rmax)):
            if not 1 <= lo <= hi:
                raise ValueError(f"rank bounds of mode {i} must satisfy 1 <= rmin <= rmax, got rmin={lo}, rmax={hi}")

    @classmethod
    def full(cls, shape: Sequence[int], adaptive: Optional[Sequence[bool]] = None) -> "RankBounds":
        """``[1, n_i]`` in every mode; every mode adaptive unless ``adaptive`` says otherwise."""
        d = len(shape)
        return cls((1,) * d, tuple(int(n) for n in shape), tuple(bool(a) for a in (adaptive or (True,) * d)))

    def with_overrides(self, shape: Sequence[int], rmin: Optional[int] = None, rmax: Optional[int] = None) -> "RankBounds":
        """Bounds tightened by an optimizer group's int ``rmin`` / ``rmax`` on the adaptive modes, clamped to
        ``n_i`` (``rmin`` never above ``rmax``)."""
        lo, hi = list(self.rmin), list(self.rmax)
        for i, ad in enumerate(self.adaptive):
            if ad and rmin is not None:
                lo[i] = max(lo[i], rmin)
            if ad and rmax is not None:
                hi[i] = min(hi[i], rmax)
        hi = [min(h, int(n)) for h, n in zip(hi, shape)]
        lo = [min(a, b) for a, b in zip(lo, hi)]
        return RankBounds(tuple(lo), tuple(hi), self.adaptive)


class TuckerParameter(ManifoldParameter):
    """A ``ManifoldParameter`` on a :class:`FixedRankTucker` with declared :class:`RankBounds`
    (``p.bounds``). ``copy.deepcopy`` and pickling keep the manifold and the bounds (geoopt's own
    ``__deepcopy__`` / ``__reduce_ex__`` drop instance attributes).

    Construction does not run geoopt's point check: a HOSVD of a weight whose true rank is below the
    requested one gives a rank-deficient core, which a layer can still use (TDLRT truncates it).
    """

    bounds: RankBounds

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = make_tucker_parameter(
            self.data.clone(memory_format=torch.preserve_format), self.manifold, self.bounds, self.requires_grad
        )
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        return _rebuild, (self.data, self.manifold.shape, self.manifold.ranks, self.bounds, self.requires_grad)


def _rebuild(data, shape, ranks, bounds, requires_grad) -> TuckerParameter:
    return make_tucker_parameter(data, tucker_manifold(tuple(shape), tuple(ranks)), bounds, requires_grad)


@functools.lru_cache(maxsize=4096)
def tucker_manifold(shape: tuple[int, ...], ranks: tuple[int, ...]) -> FixedRankTucker:
    """A cached :class:`FixedRankTucker` (manifolds are immutable; points at equal ranks share one)."""
    return FixedRankTucker(shape, ranks)


def make_tucker_parameter(
    packed: torch.Tensor,
    manifold: FixedRankTucker,
    bounds: Optional[RankBounds] = None,
    requires_grad: bool = True,
) -> TuckerParameter:
    """A :class:`TuckerParameter` holding ``packed`` (1-D, ``manifold.packed_size``), not copied."""
    if not isinstance(manifold, FixedRankTucker):
        raise ValueError(f"manifold must be a FixedRankTucker, got {type(manifold).__name__}")
    if not isinstance(packed, torch.Tensor) or tuple(packed.shape) != (manifold.packed_size,):
        got = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a 1-D tensor of length {manifold.packed_size}, got {got}")
    bounds = bounds if bounds is not None else RankBounds.full(manifold.shape)
    if len(bounds.rmin) != manifold.order:
        raise ValueError(f"bounds must have {manifold.order} entries per field, got {bounds}")
    p = torch.Tensor._make_subclass(TuckerParameter, packed.detach(), requires_grad)
    p.manifold = manifold
    p.bounds = bounds
    return p


def is_tucker_parameter(p: object) -> bool:
    """True for a ``ManifoldParameter`` whose manifold is a :class:`FixedRankTucker` (a bare geoopt
    parameter qualifies too; it has full, all-adaptive bounds)."""
    return isinstance(p, ManifoldParameter) and isinstance(p.manifold, FixedRankTucker)


def rank_bounds(p: ManifoldParameter) -> RankBounds:
    """``p.bounds`` of a :class:`TuckerParameter`; ``RankBounds.full`` for a bare ``ManifoldParameter``."""
    b = getattr(p, "bounds", None) if isinstance(p, TuckerParameter) else None
    return b if b is not None else RankBounds.full(p.manifold.shape)


def set_point(p: ManifoldParameter, core: torch.Tensor, factors: Sequence[torch.Tensor]) -> None:
    """Replace a Tucker parameter's point in place (same Parameter object, so optimizer state keyed by
    it survives) with ``(core, factors)`` at the ranks of ``core``. Values are cast to ``p``'s dtype and
    device; the gradient is dropped (it belongs to the old coordinates)."""
    if not is_tucker_parameter(p):
        raise ValueError(f"p must be a Tucker ManifoldParameter, got {type(p).__name__}")
    shape = tuple(int(f.shape[0]) for f in factors)
    if shape != tuple(p.manifold.shape):
        raise ValueError(f"factors have shape {shape}, the parameter's tensor shape is {tuple(p.manifold.shape)}")
    m = tucker_manifold(shape, tuple(int(r) for r in core.shape))
    p.data = m.pack(core.to(device=p.device, dtype=p.dtype), [f.to(device=p.device, dtype=p.dtype) for f in factors])
    p.manifold = m
    p.grad = None


_CORE_ONLY: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("tucker_core_only", default=frozenset())


@contextlib.contextmanager
def core_grad_only(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within this context, the given Tucker parameters need only their core gradient: layers may
    detach the factors (skipping their weight-gradient kernels). Nests; restores on exit."""
    token = _CORE_ONLY.set(_CORE_ONLY.get() | frozenset(id(p) for p in params))
    try:
        yield
    finally:
        _CORE_ONLY.reset(token)


def factor_grads_wanted(p: torch.Tensor) -> bool:
    """False inside :func:`core_grad_only` for ``p``: the caller uses only the core gradient."""
    return id(p) not in _CORE_ONLY.get()
