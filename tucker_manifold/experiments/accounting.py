"""What a model holds: ranks and conv weight counts per factorized layer, and the rank choices that
make a fixed-rank baseline match a reference's conv parameter count (what ``compare`` uses)."""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch
from torch import nn

from ..nn import is_conv_layer, is_factorized_layer
from ..nn.baselines import rank_for_parameter_budget
from ..nn.layers import valid_multilinear_ranks

__all__ = [
    "layer_ranks",
    "conv_parameter_counts",
    "rank_summary",
    "tucker_conv_count",
    "match_tucker_rank_fraction",
    "match_budget_ranks",
]


def layer_ranks(model: nn.Module) -> dict[str, list[int]]:
    """``{qualified name: ranks}`` of every factorized layer: Tucker ranks (one per mode), the single
    rank of CP / matrix layers. Empty for a dense model."""
    return {name: [int(r) for r in m.ranks] for name, m in model.named_modules() if is_factorized_layer(m)}


def conv_parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{qualified name: weight parameters}`` of every (factorized) convolution, biases excluded
    (what :func:`match_budget_ranks` budgets); a pruned weight counts its nonzero entries."""
    from ..pruning import is_pruned

    def count(m: nn.Module) -> int:
        if is_pruned(m):
            return int(torch.count_nonzero(m.weight_orig.detach() * m.weight_mask))
        return sum(p.numel() for n, p in m.named_parameters() if n != "bias")

    return {name: count(m) for name, m in model.named_modules() if is_conv_layer(m)}


def rank_summary(ranks: dict[str, list[int]], first: int = 3) -> str:
    """Compact text: the channel ranks of the first layers and the mean channel rank."""
    if not ranks:
        return "-"
    items = list(ranks.values())
    head = " ".join("/".join(str(r) for r in rr[:2]) for rr in items[:first])
    mean = statistics.fmean(statistics.fmean(rr[:2]) for rr in items)
    more = " .." if len(items) > first else ""
    return f"{head}{more} (mean {mean:.1f})"


def tucker_conv_count(shape: Sequence[int], fraction: float) -> int:
    """Weight parameters of a Tucker conv of dense ``shape`` at ``rank_fraction`` (as ``tuckerize``
    picks the ranks: channel modes ``ceil(f n)``, spatial modes full)."""
    r = [max(1, math.ceil(round(fraction * n, 9))) for n in shape[:2]] + list(shape[2:])
    r = valid_multilinear_ranks(shape, r)
    return math.prod(r) + sum(n * k for n, k in zip(shape, r))


def _dense_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1}


def match_tucker_rank_fraction(dense_model: nn.Module, target_params: int) -> float:
    """The ``rank_fraction`` whose Tucker conv weight count (all ``groups=1`` convs of ``dense_model``,
    spatial modes full rank) is closest to ``target_params`` (the smaller fraction on a tie)."""
    convs = _dense_convs(dense_model)
    if not convs:
        raise ValueError("dense_model has no convolution to factorize")
    shapes = [tuple(m.weight.shape) for m in convs.values()]
    # The count only changes where ceil(f * n) does: at f = j / n.
    cands = sorted({j / s[k] for s in shapes for k in (0, 1) for j in range(1, s[k] + 1)})
    best = min(cands, key=lambda f: (abs(sum(tucker_conv_count(s, f) for s in shapes) - target_params), f))
    return float(best)


def match_budget_ranks(dense_model: nn.Module, method: str, budgets: dict[str, int]) -> dict[str, int]:
    """Per-layer CP / matrix (``method``) ranks from ``rank_for_parameter_budget`` of the per-layer
    weight ``budgets`` (at least rank 1)."""
    convs = _dense_convs(dense_model)
    out = {}
    for name, params in budgets.items():
        if name not in convs:
            raise ValueError(f"budgets: layer {name!r} is not a dense groups=1 convolution of dense_model")
        try:
            out[name] = rank_for_parameter_budget(convs[name], method, int(params))
        except ValueError:
            out[name] = 1  # budget below the cost of rank 1: the smallest layer there is
    return out
