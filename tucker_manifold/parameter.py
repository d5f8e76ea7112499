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


def set_point(
    p: ManifoldParameter,
    core: torch.Tensor,
    factors: Sequence[torch.Tensor],
    manifold: Optional[FixedRankTucker] = None,
) -> None:
    """Replace a Tucker parameter's point in place (same Parameter object, so optimizer state keyed by
    it survives) with ``(core, factors)`` at the ranks of ``core``. Values are copied and cast to ``p``'s
    dtype and device; the gradient is dropped (it belongs to the old coordinates). ``manifold``: the
    manifold object to attach (its shape and ranks must match); default the cached
    :func:`tucker_manifold`."""
    if not is_tucker_parameter(p):
        raise ValueError(f"p must be a Tucker ManifoldParameter, got {type(p).__name__}")
    shape = tuple(int(f.shape[0]) for f in factors)
    if shape != tuple(p.manifold.shape):
        raise ValueError(f"factors have shape {shape}, the parameter's tensor shape is {tuple(p.manifold.shape)}")
    ranks = tuple(int(r) for r in core.shape)
    if manifold is None:
        manifold = tucker_manifold(shape, ranks)
    elif not isinstance(manifold, FixedRankTucker) or (manifold.shape, manifold.ranks) != (shape, ranks):
        raise ValueError(f"manifold must be a FixedRankTucker{(shape, ranks)} matching core and factors, got {manifold!r}")
    p.data = manifold.pack(core.to(device=p.device, dtype=p.dtype), [f.to(device=p.device, dtype=p.dtype) for f in factors])
    p.manifold = manifold
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


# =====================================================================================================
# One-pass capture (issue 11): what a Tucker layer saw in its forward and got back in its backward.
# Appended section; owned by the one-pass work. Layers call `record_io` once per forward; TDLRT's
# single pass (and ParallelTDLRT) rebuild each layer's augmented-core gradient from the records
# (tucker_manifold.onepass) instead of running a second forward/backward at the lifted point.
# =====================================================================================================
import weakref  # noqa: E402  (kept with the section it serves)


class LayerIO:
    """One recorded use of a Tucker parameter: the ``layer`` (``None`` when ``x`` is ``None`` and the
    recorded output is the dense reconstruction ``W`` itself), its input ``x`` (detached, same storage)
    and the gradient ``gy = dL/dy`` of its output, ``None`` until the backward pass reaches it (summed
    over backward passes through the same graph, as ``.grad`` is)."""

    __slots__ = ("layer", "x", "gy", "_x_version", "__weakref__")

    def __init__(self, layer: Optional[object], x: Optional[torch.Tensor]):
        self.layer = layer
        self.x = x
        self.gy: Optional[torch.Tensor] = None
        self._x_version = x._version if x is not None else 0

    def stale(self) -> bool:
        """True if ``x`` was modified in place after the forward (the record no longer holds the input)."""
        return self.x is not None and self.x._version != self._x_version

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.gy) if t is not None)


class LayerIORecorder:
    """Records, per Tucker parameter, every use made of it in forwards run while the recorder is active.

    A pending record (forward done, backward not yet) is held only by the gradient hook on the layer's
    output, so a graph that is dropped without a backward takes its records (and saved inputs) with it;
    once its output gradient arrives a record is kept here until :meth:`clear`. Activate it with
    ``with recorder:`` / :func:`record_layer_io`, or :meth:`start` / :meth:`stop` (one thread: contexts
    are per thread, like autograd's grad mode).
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        self._params: dict[int, torch.Tensor] = {id(p): p for p in params}
        self._done: dict[int, list[LayerIO]] = {}
        self._pending: dict[int, "weakref.WeakSet[LayerIO]"] = {}
        self._tokens: list = []

    # -- activation
    def start(self) -> "LayerIORecorder":
        self._tokens.append(_RECORDERS.set(_RECORDERS.get() + (self,)))
        return self

    def stop(self) -> None:
        if not self._tokens:
            raise RuntimeError("LayerIORecorder.stop() without a matching start()")
        _RECORDERS.reset(self._tokens.pop())

    def __enter__(self) -> "LayerIORecorder":
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    # -- what was recorded
    def tracks(self, p: torch.Tensor) -> bool:
        return id(p) in self._params

    def records(self, p: torch.Tensor) -> list[LayerIO]:
        """The completed records of ``p`` (output gradient received), in the order the gradients came."""
        return list(self._done.get(id(p), ()))

    def pending(self, p: torch.Tensor) -> int:
        """How many uses of ``p`` are still waiting for their output gradient."""
        return len(self._pending.get(id(p), ()))

    def recorded_params(self) -> list[torch.Tensor]:
        """Tracked parameters with at least one completed record."""
        return [self._params[k] for k in self._done if self._done[k]]

    def nbytes(self) -> int:
        """Bytes held by completed records (inputs and output gradients; storages counted once)."""
        seen, total = set(), 0
        for recs in self._done.values():
            for r in recs:
                for t in (r.x, r.gy):
                    if t is None:
                        continue
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
                    if key not in seen:
                        seen.add(key)
                        total += t.numel() * t.element_size()
        return total

    def clear(self) -> None:
        """Forget every record (completed and pending: a pending one no longer reports back)."""
        self._done.clear()
        self._pending.clear()

    # -- recording (called by record_io)
    def _record(self, p: torch.Tensor, layer: Optional[object], x: Optional[torch.Tensor], y: torch.Tensor) -> None:
        rec = LayerIO(layer, None if x is None else x.detach())
        key = id(p)
        self._pending.setdefault(key, weakref.WeakSet()).add(rec)
        me = weakref.ref(self)

        def hook(g: torch.Tensor, rec: LayerIO = rec) -> None:
            recorder = me()
            if recorder is None:
                return
            pend = recorder._pending.get(key)
            if rec.gy is None:
                if pend is None or rec not in pend:
                    return  # cleared since the forward
                pend.discard(rec)
                rec.gy = g.detach()
                recorder._done.setdefault(key, []).append(rec)
            else:  # another backward through the same graph (retain_graph=True)
                rec.gy = rec.gy + g.detach()

        y.register_hook(hook)


_RECORDERS: contextvars.ContextVar[tuple[LayerIORecorder, ...]] = contextvars.ContextVar("tucker_layer_io", default=())


@contextlib.contextmanager
def record_layer_io(params: Iterable[torch.Tensor]) -> Iterator[LayerIORecorder]:
    """Within this context, forwards of layers that call :func:`record_io` record their input and
    (through a hook on their output) their output gradient, for each of ``params``. Yields the
    :class:`LayerIORecorder`; the records stay readable after the context (the backward may run
    outside it). Nests."""
    rec = LayerIORecorder(params)
    with rec:
        yield rec


def record_io(p: torch.Tensor, layer: Optional[object], x: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Called by a Tucker layer's forward with its parameter ``p``, itself, its input ``x`` and its output
    ``y``; returns ``y`` unchanged. A no-op (one context-variable read) unless a recorder tracking ``p``
    is active and ``y`` requires grad. ``layer=None, x=None``: ``y`` is the dense reconstruction of ``p``
    (for code that uses ``M.to_dense(p)`` directly)."""
    recorders = _RECORDERS.get()
    if recorders and isinstance(y, torch.Tensor) and y.requires_grad:
        for r in recorders:
            if id(p) in r._params:
                r._record(p, layer, x, y)
    return y


__all__ += ["LayerIO", "LayerIORecorder", "record_layer_io", "record_io"]
