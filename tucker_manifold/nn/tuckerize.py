"""Convert a model's ``nn.Conv2d`` / ``nn.Linear`` layers to Tucker layers, and account for the result.

* :func:`tuckerize` replaces layers in place (qualified names are kept, so optimizers, hooks on other
  modules and ``state_dict`` keys of the rest of the model are unchanged);
* :func:`compression_rate`, :func:`ranks`, :func:`tucker_parameters`, :func:`tucker_layers` inspect a model.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .base import FactorizedLayer, is_conv_layer
from .conv_nd import TuckerConv1d, TuckerConv3d
from .interop import tltorch_hints, tltorch_targets
from .layers import TuckerConv2d, TuckerLayer, TuckerLinear, valid_multilinear_ranks
from .replace import ConversionSummary, Selection, replace_modules

__all__ = ["tuckerize", "compression_rate", "ranks", "tucker_parameters", "tucker_layers"]

IntOrTuple = Union[int, Sequence[int]]
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ argument checks
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_int_or_tuple(v, name: str, allow_none: bool = False) -> Optional[Union[int, tuple[int, ...]]]:
    if v is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be given")
    if _is_int(v):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
        return v
    try:
        t = tuple(v)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of ints, got {v!r}") from None
    if len(t) not in (2, 3, 4, 5) or not all(_is_int(a) and a >= 1 for a in t):
        raise ValueError(f"{name} must be an int >= 1 or a tuple of 2 (linear, or a conv's channels) / 3, 4, 5 "
                         f"(Conv1d, Conv2d, Conv3d) ints >= 1, got {v!r}")
    return t


def _expand(v: Optional[IntOrTuple], shape: tuple[int, ...], adaptive: Sequence[bool], default: Sequence[int]) -> list[int]:
    """Per-mode values from an int (adaptive modes; others keep ``default``) or a tuple, clamped to ``n_i``.

    A 4-tuple used on a linear layer gives its channel entries ``(out, in)``; a 2-tuple used on a conv
    gives the channel modes (spatial modes keep ``default``).
    """
    order = len(shape)
    if v is None:
        vals = list(default)
    elif _is_int(v):
        vals = [v if ad else dflt for ad, dflt in zip(adaptive, default)]
    else:
        v = tuple(v)
        vals = list(v[:2]) + list(default[2:]) if len(v) == 2 else list(v[:order])
    return [min(a, n) for a, n in zip(vals, shape)]


# ------------------------------------------------------------------------------------ tuckerize
def tuckerize(
    model: nn.Module,
    ranks: Optional[IntOrTuple] = None,
    rank_fraction: Optional[float] = None,
    tau: Optional[float] = None,
    init: str = "hosvd",
    include: Selection = None,
    exclude: Selection = None,
    linear: bool = False,
    adapt: str = "channels",
    rank_min: IntOrTuple = 1,
    rank_max: Optional[IntOrTuple] = None,
    forward_mode: str = "auto",
    return_summary: bool = False,
) -> Union[nn.Module, tuple[nn.Module, ConversionSummary]]:
    """Replace ``nn.Conv2d`` (and ``nn.Conv1d`` / ``nn.Conv3d``; ``groups == 1``, zero padding) and, with
    ``linear=True``, ``nn.Linear`` modules by :class:`TuckerConv2d` (:class:`~.conv_nd.TuckerConv1d` /
    :class:`~.conv_nd.TuckerConv3d`) / :class:`TuckerLinear`, in place and recursively; returns ``model`` (or the new
    layer if ``model`` itself is converted), or ``(model, summary)`` with ``return_summary=True``.

    Ranks: at most one of
      * ``ranks``: an int (both channel modes; spatial modes full rank) or a tuple ``(r_out, r_in, r_h, r_w)``
        (linear layers use ``(r_out, r_in)``, the first two entries; a pair gives a conv's channel ranks;
        Conv1d / Conv3d take the first 3 / all 5 entries);
      * ``rank_fraction`` in ``(0, 1]``: ``ceil(f n_i)`` for channel modes (all modes with ``adapt="all"``);
      * ``tau >= 0`` (``init="hosvd"`` only): truncated HOSVD by relative tolerance, per adaptive mode the
        smallest rank with ``||sigma_{r+1:}||_2 <= tau ||W||_F``, non-adaptive modes full rank.
      None given: ``rank_fraction=0.5``. Initial ranks are then clamped to ``[rank_min, rank_max]`` on adaptive
      modes and to a valid multilinear rank (``r_i <= n_i``, ``r_i <= prod_{j != i} r_j``), never an error.

    init: ``"hosvd"`` decomposes the existing weights (bias copied); ``"random"`` draws a fresh layer
    (PyTorch-default variance, see :mod:`.layers`). adapt: ``"channels"`` (only the two channel modes of a
    conv adapt) or ``"all"``; both modes of a linear layer always adapt. rank_min / rank_max: an int
    (applied to adaptive modes) or a per-mode tuple (clamped to ``n_i``); rank_max defaults to ``n_i``.

    include / exclude: qualified module names (a name also selects everything below it), compiled regular
    expressions (full match on a qualified name) or module classes; exclude wins (see
    :mod:`tucker_manifold.nn.replace`, shared with ``factorize_model``). An include name that selects no
    convertible module, or an exclude name that names no module at all, is a ValueError (it is almost
    always a typo). Only exact ``nn.Conv2d`` / ``nn.Linear`` are converted (not subclasses); ``Linear``
    children of ``nn.MultiheadAttention`` never (it reads their weight directly).

    tltorch (tensorly-torch): if the user has imported ``tltorch``, its ``FactorizedConv`` (1-D to 3-D) and,
    with ``linear=True``, ``FactorizedLinear`` layers with a Tucker factorization are converted with
    their weights as they are (:mod:`.interop`: factors orthonormalized, the tensor kept; ``ranks`` /
    ``rank_fraction`` / ``tau`` do not apply to them, the rank bounds and ``forward_mode`` do).

    What was converted and what was skipped, with the reason (unsupported type such as ``ConvTranspose2d``,
    ``groups != 1``, padding mode, ``nn.Linear`` without ``linear=True``, not included, excluded): the
    :class:`~tucker_manifold.nn.replace.ConversionSummary`, returned with ``return_summary=True`` and
    logged at INFO level on the ``tucker_manifold.nn.tuckerize`` logger.
    """
    given = [n for n, v in (("ranks", ranks), ("rank_fraction", rank_fraction), ("tau", tau)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of ranks, rank_fraction, tau; got {' and '.join(given)}")
    if not given:
        rank_fraction = 0.5
    if init not in ("hosvd", "random"):
        raise ValueError(f"init must be 'hosvd' or 'random', got {init!r}")
    if adapt not in ("channels", "all"):
        raise ValueError(f"adapt must be 'channels' or 'all', got {adapt!r}")
    if forward_mode not in ("auto", "factorized", "reconstructed"):
        raise ValueError(f"forward_mode must be 'auto', 'factorized' or 'reconstructed', got {forward_mode!r}")
    ranks = _check_int_or_tuple(ranks, "ranks", allow_none=True)
    if rank_fraction is not None and (not _is_real(rank_fraction) or not 0 < rank_fraction <= 1):
        raise ValueError(f"rank_fraction must be a number in (0, 1], got {rank_fraction!r}")
    if tau is not None:
        if not _is_real(tau) or not 0 <= tau < math.inf:
            raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
        if init != "hosvd":
            raise ValueError("tau selects ranks from the HOSVD of the existing weights: it needs init='hosvd', not init='random'")
    rank_min = _check_int_or_tuple(rank_min, "rank_min")
    rank_max = _check_int_or_tuple(rank_max, "rank_max", allow_none=True)
    if _is_int(rank_min) and _is_int(rank_max) and rank_min > rank_max:
        raise ValueError(f"rank_min ({rank_min}) must be <= rank_max ({rank_max})")
    opts = dict(
        ranks=ranks, rank_fraction=rank_fraction, tau=tau, init=init, adapt=adapt,
        rank_min=rank_min, rank_max=rank_max, forward_mode=forward_mode,
    )
    targets: dict[type, type] = {nn.Conv2d: TuckerConv2d, nn.Conv1d: TuckerConv1d, nn.Conv3d: TuckerConv3d}
    hints = {}
    if linear:
        targets[nn.Linear] = TuckerLinear
    else:
        hints[nn.Linear] = "nn.Linear is converted only with linear=True"
        hints.update(tltorch_hints())
    targets.update(tltorch_targets(linear))  # empty unless the user has imported tltorch
    root, summary = replace_modules(
        model, targets, lambda cls, m: _convert(m, cls, **opts), include=include, exclude=exclude, hints=hints
    )
    logger.info("tuckerize: %s", summary)
    return (root, summary) if return_summary else root


def _convert(
    m: nn.Module, cls: type, *, ranks, rank_fraction, tau, init, adapt, rank_min, rank_max, forward_mode
) -> TuckerLayer:
    shape = tuple(m.weight.shape)
    order = len(shape)
    adaptive = cls.default_adaptive(order) if adapt == "channels" else (True,) * order
    # Bounds: ints apply to adaptive modes; tuples are per mode; everything clamped to n_i.
    rmax = _expand(rank_max, shape, adaptive, shape)
    rmin = [min(a, b) for a, b in zip(_expand(rank_min, shape, adaptive, [1] * order), rmax)]
    bounds = dict(rank_min=tuple(rmin), rank_max=tuple(rmax), adaptive_modes=adaptive, forward_mode=forward_mode)
    if hasattr(cls, "convert"):  # an already factorized layer (tltorch): its weight as it is
        return cls.convert(m, **bounds)

    if tau is not None:
        return cls.from_dense(m, tau=tau, **bounds)

    if ranks is not None:
        if _is_int(ranks):
            r = [ranks, ranks] + list(shape[2:])
        else:
            if order > 2 and len(ranks) == 2:  # a conv's channel ranks; spatial modes full
                r = list(ranks) + list(shape[2:])
            elif len(ranks) >= order:
                r = list(ranks[:order])
            else:
                raise ValueError(f"ranks {tuple(ranks)} has fewer entries than the {order}-way weight of a "
                                 f"{type(m).__name__}: give an int, 2 channel ranks or {order} ranks")
    else:
        fractional = [True, True] + [adapt == "all"] * (order - 2)
        # round() guards against 0.1 * 30 = 3.0000000000000004 -> 4.
        r = [max(1, math.ceil(round(rank_fraction * n, 9))) if f else n for f, n in zip(fractional, shape)]
    r = [min(max(a, lo_), hi_) if ad else a for a, lo_, hi_, ad in zip(r, rmin, rmax, adaptive)]
    r = valid_multilinear_ranks(shape, r)

    if init == "hosvd":
        return cls.from_dense(m, ranks=r, **bounds)
    layer = cls(ranks=r, **cls.dense_kwargs(m), **bounds)
    layer.train(m.training)
    return layer


# ------------------------------------------------------------------------------------ inspection
def tucker_layers(model: nn.Module) -> list[tuple[str, TuckerLayer]]:
    """``[(qualified name, layer)]`` for every Tucker layer of ``model`` (including ``model`` itself)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TuckerLayer)]


def tucker_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``tucker_weight`` ManifoldParameters of every Tucker layer (each once)."""
    seen, out = set(), []
    for _, layer in tucker_layers(model):
        p = layer.tucker_weight
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def ranks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{qualified name: current ranks}`` of every Tucker layer."""
    return {n: m.ranks for n, m in tucker_layers(model)}


def compression_rate(model: nn.Module) -> dict[str, float]:
    """Parameter counts and compression ``1 - compressed / dense``.

    A :class:`~tucker_manifold.nn.base.FactorizedLayer` (Tucker, CP, matrix, TT) counts its own parameters
    as compressed and ``dense_parameter_count()`` as dense; its submodules are not visited. Every other
    parameter counts the same in both (each shared parameter once). ``"conv"`` restricts to convolutions
    (:func:`~tucker_manifold.nn.base.is_conv_layer`); a model without convolutions gets ``conv = 0.0``.

    Returns ``{"conv", "total", "conv_params", "conv_dense_params", "total_params", "total_dense_params"}``.
    """
    seen: set[int] = set()
    counts = {"conv_params": 0, "conv_dense_params": 0, "total_params": 0, "total_dense_params": 0}

    def fresh(params: Iterable[torch.Tensor]) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    def visit(m: nn.Module) -> None:
        if isinstance(m, FactorizedLayer):
            comp = fresh(m.parameters())
            dense = int(m.dense_parameter_count()) if comp else 0
            counts["total_params"] += comp
            counts["total_dense_params"] += dense
            if is_conv_layer(m):
                counts["conv_params"] += comp
                counts["conv_dense_params"] += dense
            return
        own = fresh(p for p in m._parameters.values() if p is not None)
        counts["total_params"] += own
        counts["total_dense_params"] += own
        if is_conv_layer(m):
            counts["conv_params"] += own
            counts["conv_dense_params"] += own
        for child in m.children():
            visit(child)

    visit(model)

    def rate(c: int, d: int) -> float:
        return 1.0 - c / d if d else 0.0

    return {
        "conv": rate(counts["conv_params"], counts["conv_dense_params"]),
        "total": rate(counts["total_params"], counts["total_dense_params"]),
        **counts,
    }
