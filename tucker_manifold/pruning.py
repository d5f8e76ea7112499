"""Unstructured pruning baselines of the paper's Table 1: SNIP, GraSP and IMP, at matched compression.

Compression of a pruned model is the fraction of its convolution weights held at exactly zero
(:func:`conv_sparsity`); :func:`pruned_compression_rate` gives the same dictionary as
:func:`tucker_manifold.nn.compression_rate` (biases counted as stored, so TDLRT's conv compression and a
pruned model's compare like for like), and :func:`sparsity_for_conv_compression` turns such a target
into the weight sparsity to ask for.

Masks are ``{qualified module name: bool tensor of the weight's shape}`` (``True`` = kept) and are put
on the model with ``torch.nn.utils.prune.custom_from_mask`` (:func:`apply_masks`): the module then holds
the parameter ``weight_orig`` and the buffer ``weight_mask``, and its forward uses ``weight_orig *
weight_mask``. The gradient of ``weight_orig`` is zero where the mask is zero, so pruned weights stay
exactly zero through SGD with momentum and weight decay (those entries of ``weight_orig`` may decay,
but they are multiplied by 0). The parameter object is kept (renamed), so an optimizer built before
:func:`apply_masks` still trains it.

Honest accounting: a pruned model saves memory only when stored sparsely (values plus indices; the
counts here are the nonzero values only), and a dense kernel runs the same FLOPs whatever the zeros:
:func:`dense_equivalent_flops` reports the dense cost (and, with ``skip_zeros=True``, the cost a sparse
kernel could reach).

Methods
-------
* **SNIP** (Lee, Ajanthan, Torr, ICLR 2019): connection sensitivity ``|g * w|`` (``g = dL/dw`` on one
  batch at initialization; equal to ``|dL/dc|`` for a multiplicative mask ``c = 1``), global over the
  pruned layers; the highest scores are kept, pruned once. (SNIP's normalization by the sum of scores
  does not change the ranking and is omitted.)
* **GraSP** (Wang, Zhang, Grosse, ICLR 2020): ``S(-w) = -w * (H g)``, ``H`` the Hessian of the loss and
  ``g`` its gradient at initialization (one batch; ``Hg`` by double backward). ``S(-w)`` estimates the
  change of the gradient norm ``g^T g`` when ``w`` is removed (``delta = -w``); the paper removes the
  weights with the **largest** scores (their removal reduces the gradient flow least, or even increases
  it) and keeps the lowest. As in the authors' code, the logits are divided by a temperature ``T``
  (default 200) before the loss, and the Hessian is taken with respect to the pruned weights only.
* **IMP** (Frankle & Carbin, ICLR 2019; rewinding: Frankle, Dziugaite, Roy, Carbin, ICML 2020):
  ``k`` rounds of train / prune globally by magnitude / rewind the surviving weights (and every other
  parameter and buffer) to their values at epoch ``e_r``; the per-round sparsity follows
  ``s_j = 1 - (1 - s)^(j/k)`` so each round removes the same fraction of the survivors. The total number
  of epochs over all rounds is fixed (:func:`imp_schedule`), so IMP costs the same training as the
  other methods; :func:`run_imp` drives it through a ``train_fn(model, start_epoch, n_epochs)`` callback.

Only ``nn.Conv2d`` weights are pruned by default (the paper's compression counts conv parameters);
``include_linear=True`` also prunes ``nn.Linear`` weights.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from .nn.base import FactorizedLayer, is_conv_layer

__all__ = [
    "prunable_modules",
    "snip_scores",
    "snip_masks",
    "hessian_gradient_product",
    "grasp_scores",
    "grasp_masks",
    "magnitude_masks",
    "global_masks_from_scores",
    "apply_masks",
    "get_masks",
    "is_pruned",
    "make_permanent",
    "conv_sparsity",
    "conv_weight_counts",
    "pruned_parameter_count",
    "pruned_compression_rate",
    "sparsity_for_conv_compression",
    "dense_equivalent_flops",
    "IMPSchedule",
    "IMPResult",
    "imp_schedule",
    "run_imp",
]

Masks = dict[str, torch.Tensor]
Batch = Sequence[Any]
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


# ------------------------------------------------------------------------------------ checks, access
def _check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not math.isfinite(sparsity) \
            or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1) (the fraction of weights set to zero), got {sparsity!r}")
    return float(sparsity)


def _check_int(v: object, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def is_pruned(module: nn.Module) -> bool:
    """True if ``module.weight`` is masked by ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``)."""
    return hasattr(module, "weight_orig") and hasattr(module, "weight_mask")


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight the module's forward uses (``weight_orig * weight_mask`` when pruned; fresh, not the
    copy cached at the last forward)."""
    if is_pruned(module):
        return module.weight_orig * module.weight_mask
    return module.weight


def prunable_modules(model: nn.Module, include_linear: bool = False) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every ``nn.Conv2d`` (and ``nn.Linear`` if ``include_linear``) of
    ``model`` with a weight, in ``named_modules`` order (each shared module once)."""
    types: tuple[type, ...] = (nn.Conv2d, nn.Linear) if include_linear else (nn.Conv2d,)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)
            and (is_pruned(m) or isinstance(getattr(m, "weight", None), torch.Tensor))]


def _check_batch(batch: object) -> tuple[torch.Tensor, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], torch.Tensor):
        raise ValueError(f"batch must be an (inputs, targets) pair with a tensor of inputs, got {type(batch).__name__}")
    return batch[0], batch[1]


def _scoring_copy(model: nn.Module, include_linear: bool) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """A deep copy to score on (the forward must not touch the caller's BatchNorm statistics or grads)."""
    mods = prunable_modules(model, include_linear)
    if not mods:
        raise ValueError("model has no prunable layer (nn.Conv2d, or nn.Linear with include_linear=True)")
    if any(is_pruned(m) for _, m in mods):
        raise ValueError("model is already pruned; SNIP / GraSP score a dense model at initialization")
    work = copy.deepcopy(model)
    return work, [(n, work.get_submodule(n)) for n, _ in mods]


# ------------------------------------------------------------------------------------ masks from scores
def global_masks_from_scores(scores: Mapping[str, torch.Tensor], sparsity: float) -> Masks:
    """Keep the globally highest scores: ``round(sparsity * N)`` of the ``N`` entries become ``False``
    (ties broken by position, deterministically). ``-inf`` scores go first (already-pruned weights)."""
    sparsity = _check_sparsity(sparsity)
    if not scores:
        raise ValueError("scores is empty")
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64).cpu() for s in scores.values()])
    if torch.isnan(flat).any() or torch.isposinf(flat).any():
        raise ValueError("scores contain NaN or +inf (a non-finite gradient?)")
    n = flat.numel()
    n_keep = n - int(round(sparsity * n))
    keep = torch.zeros(n, dtype=torch.bool)
    # Stable descending sort: among equal scores the earlier entry is kept.
    order = torch.sort(flat, descending=True, stable=True).indices
    keep[order[:n_keep]] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start:start + s.numel()].reshape(s.shape).to(s.device)
        start += s.numel()
    return masks


def snip_scores(model: nn.Module, batch: Batch, loss_fn: LossFn, include_linear: bool = False) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity ``|dL/dw * w|`` per prunable weight (same shapes), on one batch.

    ``batch = (inputs, targets)``, ``loss = loss_fn(model(inputs), targets)``. Computed on a copy of
    ``model`` in its current train/eval mode; ``model`` itself (grads, BatchNorm statistics) is untouched.
    """
    x, y = _check_batch(batch)
    work, mods = _scoring_copy(model, include_linear)
    weights = [m.weight for _, m in mods]
    loss = loss_fn(work(x), y)
    grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return {n: (torch.zeros_like(w) if g is None else (g * w).abs()).detach()
            for (n, _), w, g in zip(mods, weights, grads)}


def snip_masks(model: nn.Module, batch: Batch, loss_fn: LossFn, sparsity: float, include_linear: bool = False) -> Masks:
    """SNIP masks: keep the ``1 - sparsity`` fraction of prunable weights with the largest ``|g * w|``."""
    sparsity = _check_sparsity(sparsity)
    return global_masks_from_scores(snip_scores(model, batch, loss_fn, include_linear), sparsity)


def hessian_gradient_product(
    model: nn.Module, batch: Batch, loss_fn: LossFn, include_linear: bool = False, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """``H g`` restricted to the prunable weights ``w``: ``g = dL/dw``, ``H = d^2 L / dw^2``, with
    ``L = loss_fn(model(inputs) / temperature, targets)`` (double backward of ``g_detached . g``).
    Computed on a copy of ``model``."""
    x, y = _check_batch(batch)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    work, mods = _scoring_copy(model, include_linear)
    weights = [m.weight for _, m in mods]
    loss = loss_fn(work(x) / temperature, y)
    grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
    pairs = [(g.detach(), g) for g in grads if g is not None]
    if not pairs:
        raise ValueError("the loss does not depend on any prunable weight")
    z = sum((gd * g).sum() for gd, g in pairs)
    hg = torch.autograd.grad(z, weights, allow_unused=True)
    return {n: (torch.zeros_like(w) if h is None else h).detach() for (n, _), w, h in zip(mods, weights, hg)}


def grasp_scores(
    model: nn.Module, batch: Batch, loss_fn: LossFn, include_linear: bool = False, temperature: float = 200.0
) -> dict[str, torch.Tensor]:
    """GraSP scores ``S(-w) = -w * (H g)`` per prunable weight; the **highest** are removed."""
    hg = hessian_gradient_product(model, batch, loss_fn, include_linear, temperature)
    mods = dict(prunable_modules(model, include_linear))
    return {n: (-mods[n].weight.detach() * h) for n, h in hg.items()}


def grasp_masks(
    model: nn.Module, batch: Batch, loss_fn: LossFn, sparsity: float, include_linear: bool = False,
    temperature: float = 200.0,
) -> Masks:
    """GraSP masks: remove the ``sparsity`` fraction of prunable weights with the largest ``-w * Hg``."""
    sparsity = _check_sparsity(sparsity)
    scores = grasp_scores(model, batch, loss_fn, include_linear, temperature)
    # Keeping the highest of -S is removing the highest of S.
    return global_masks_from_scores({n: -s for n, s in scores.items()}, sparsity)


def magnitude_masks(model: nn.Module, sparsity: float, include_linear: bool = False) -> Masks:
    """Global magnitude masks (IMP's pruning step): keep the largest ``|w|`` among the prunable weights;
    weights already pruned stay pruned (their score is ``-inf``), so ``sparsity`` is cumulative."""
    sparsity = _check_sparsity(sparsity)
    scores = {}
    for n, m in prunable_modules(model, include_linear):
        s = _weight(m).detach().abs()
        if is_pruned(m):
            s = torch.where(m.weight_mask.bool(), s, torch.full_like(s, -math.inf))
        scores[n] = s
    if not scores:
        raise ValueError("model has no prunable layer (nn.Conv2d, or nn.Linear with include_linear=True)")
    return global_masks_from_scores(scores, sparsity)


# ------------------------------------------------------------------------------------ applying masks
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Mask ``model``'s weights in place with ``torch.nn.utils.prune.custom_from_mask``; a module already
    pruned gets its ``weight_mask`` overwritten (so the same ``weight_orig`` Parameter keeps training).

    ``masks[name]``: bool (or 0/1) tensor of the module's weight shape. Returns ``model``.
    """
    if not masks:
        raise ValueError("masks is empty")
    names = dict(model.named_modules())
    checked = []
    for name, mask in masks.items():
        if name not in names:
            raise ValueError(f"masks: no module named {name!r} in the model")
        m = names[name]
        w = m.weight_orig if is_pruned(m) else getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"masks: module {name!r} has no weight")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"masks[{name!r}] must be a tensor of shape {tuple(w.shape)}, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"masks[{name!r}] must hold only 0 / 1 (or bools)")
        checked.append((m, mask.to(device=w.device, dtype=w.dtype)))
    for m, mask in checked:
        if is_pruned(m):
            with torch.no_grad():
                m.weight_mask.copy_(mask)
        else:
            prune.custom_from_mask(m, "weight", mask)
        if _detach_masked_weight not in m._forward_hooks.values():
            m.register_forward_hook(_detach_masked_weight)
        # prune refreshes `weight` in its forward pre-hook; refresh it now too, for readers before a forward.
        _detach_masked_weight(m, (), None)
    return model


def _detach_masked_weight(module: nn.Module, inputs: Any, output: Any) -> None:
    """Forward hook: after the forward, keep ``module.weight`` (= ``weight_orig * weight_mask``) as a
    detached tensor. prune's pre-hook leaves a non-leaf tensor there, which makes ``copy.deepcopy`` of
    the model fail; the autograd graph of the forward already holds the original. Module-level so that
    pruned models stay picklable."""
    module.weight = (module.weight_orig * module.weight_mask).detach()


def get_masks(model: nn.Module) -> Masks:
    """The current masks (bool) of the pruned modules of ``model``."""
    return {n: m.weight_mask.detach().bool().clone() for n, m in model.named_modules() if is_pruned(m)}


def make_permanent(model: nn.Module) -> nn.Module:
    """``prune.remove`` on every pruned module: ``weight`` becomes a plain Parameter holding the zeros
    (masks are then no longer enforced by training). Returns ``model``."""
    for _, m in model.named_modules():
        if is_pruned(m):
            for key in [k for k, h in m._forward_hooks.items() if h is _detach_masked_weight]:
                del m._forward_hooks[key]
            prune.remove(m, "weight")
    return model


# ------------------------------------------------------------------------------------ accounting
def conv_weight_counts(model: nn.Module) -> tuple[int, int]:
    """``(nonzero, total)`` entries of the weights of every ``nn.Conv2d`` of ``model`` (each shared
    module once)."""
    nnz = total = 0
    for _, m in prunable_modules(model, include_linear=False):
        w = _weight(m).detach()
        nnz += int(torch.count_nonzero(w))
        total += w.numel()
    return nnz, total


def conv_sparsity(model: nn.Module) -> float:
    """Fraction of conv weights that are exactly zero (0.0 for a model without ``nn.Conv2d``)."""
    nnz, total = conv_weight_counts(model)
    return 1.0 - nnz / total if total else 0.0


def _counts(model: nn.Module) -> dict[str, int]:
    """Stored (nonzero, for masked weights) and dense counts, in :func:`nn.compression_rate`'s keys."""
    seen: set[int] = set()
    c = {"conv_params": 0, "conv_dense_params": 0, "total_params": 0, "total_dense_params": 0}

    def visit(m: nn.Module) -> None:
        if isinstance(m, FactorizedLayer):
            own = [p for p in m.parameters() if id(p) not in seen]
            seen.update(map(id, own))
            stored = sum(p.numel() for p in own)
            dense = int(m.dense_parameter_count()) if own else 0
        else:
            stored = dense = 0
            for name, p in m._parameters.items():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                dense += p.numel()
                if name == "weight_orig" and is_pruned(m):
                    stored += int(torch.count_nonzero(_weight(m).detach()))
                else:
                    stored += p.numel()
        c["total_params"] += stored
        c["total_dense_params"] += dense
        if is_conv_layer(m):
            c["conv_params"] += stored
            c["conv_dense_params"] += dense
        if not isinstance(m, FactorizedLayer):
            for child in m.children():
                visit(child)

    visit(model)
    return c


def pruned_parameter_count(model: nn.Module) -> int:
    """Parameters a sparse format would store: nonzero entries of the masked weights, every other
    parameter in full (index overhead not counted). Equals ``sum(numel)`` for an unpruned model."""
    return _counts(model)["total_params"]


def pruned_compression_rate(model: nn.Module) -> dict[str, float]:
    """:func:`tucker_manifold.nn.compression_rate` for pruned models: the same keys
    ``{"conv", "total", "conv_params", "conv_dense_params", "total_params", "total_dense_params"}``, with
    masked weights counted by their nonzero entries (biases and other parameters in full)."""
    c = _counts(model)

    def rate(a: int, b: int) -> float:
        return 1.0 - a / b if b else 0.0

    return {"conv": rate(c["conv_params"], c["conv_dense_params"]),
            "total": rate(c["total_params"], c["total_dense_params"]), **c}


def sparsity_for_conv_compression(model: nn.Module, compression: float) -> float:
    """The conv weight sparsity at which ``pruned_compression_rate(model)["conv"]`` equals ``compression``
    (e.g. TDLRT's ``compression_rate(...)["conv"]``): conv biases cannot be pruned, so the weights carry
    ``compression * conv_dense_params`` zeros. ``model`` is the dense (unpruned) model.

    Raises ValueError if ``compression`` is not in ``[0, 1)`` or needs every conv weight removed.
    """
    compression = _check_sparsity(compression, "compression")
    c = _counts(model)
    _, weights = conv_weight_counts(model)
    if not weights:
        raise ValueError("model has no nn.Conv2d weight to prune")
    s = compression * c["conv_dense_params"] / weights
    if s >= 1.0:
        raise ValueError(f"compression={compression} would need every conv weight pruned (sparsity {s:.4f})")
    return s


def dense_equivalent_flops(model: nn.Module, input_shape: Sequence[int], skip_zeros: bool = False) -> int:
    """FLOPs (``2 x`` multiply-accumulates) of the conv and linear layers of one forward pass on an input
    of ``input_shape`` (batch dimension included: pass batch 1 for per-sample FLOPs), counted as if
    every weight were dense (what a dense kernel runs, zeros or not). ``skip_zeros=True``: only the
    nonzero weights' multiply-accumulates (what a sparse kernel could reach). Factorized layers count
    as their dense equivalent. Biases, norms, activations and pooling are not counted.

    The forward runs on zeros under ``torch.no_grad`` in eval mode (train/eval modes restored).
    """
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be non-empty with positive entries, got {input_shape!r}")
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
    device = first.device if first is not None else None
    total = [0]

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(module, FactorizedLayer):
            n_weights, nnz = math.prod(module.shape), None
            out_features = module.shape[0]
        else:
            w = _weight(module)
            n_weights, out_features = w.numel(), w.shape[0]
            nnz = int(torch.count_nonzero(w)) if skip_zeros else None
        # Every weight is used once per output position (conv: N H' W'; linear: all leading dims).
        uses = output.numel() // out_features
        total[0] += 2 * uses * (nnz if (skip_zeros and nnz is not None) else n_weights)

    handles, modes = [], {m: m.training for m in model.modules()}
    inside: set[int] = set()  # submodules of factorized layers: counted by their parent
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, FactorizedLayer):
            inside.update(id(c) for c in m.modules() if c is not m)
        if isinstance(m, (nn.Conv2d, nn.Linear, FactorizedLayer)):
            handles.append(m.register_forward_hook(hook))
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return total[0]


# ------------------------------------------------------------------------------------ IMP
@dataclasses.dataclass(frozen=True)
class IMPSchedule:
    """How IMP spends a fixed epoch budget (all counts in epochs).

    * ``rewind_epoch`` ``e_r``: training from initialization up to the rewind point (run once);
    * ``rounds`` ``k`` pruning rounds, each training ``round_epochs`` epochs from the rewind point
      (epochs ``[e_r, e_r + round_epochs)`` of the learning-rate schedule), then pruning to
      ``sparsities[j]``;
    * a final training of ``final_epochs`` epochs from the rewind point with the final mask.

    ``total_epochs = e_r + k * round_epochs + final_epochs``; the returned model has had
    ``e_r + final_epochs`` epochs of training.
    """

    total_epochs: int
    rounds: int
    rewind_epoch: int
    round_epochs: int
    final_epochs: int
    sparsities: tuple[float, ...]


def imp_schedule(total_epochs: int, rounds: int, sparsity: float, rewind_epoch: int = 1) -> IMPSchedule:
    """Split ``total_epochs`` into IMP's phases (see :class:`IMPSchedule`): ``L = (E - e_r) // (k + 1)``
    epochs per round, the remainder to the final training; cumulative sparsities
    ``s_j = 1 - (1 - sparsity)^(j / k)``, ``j = 1..k`` (the last is exactly ``sparsity``).

    Raises ValueError (naming the argument) unless ``E >= e_r + k + 1`` and ``0 <= sparsity < 1``.
    """
    sparsity = _check_sparsity(sparsity)
    k = _check_int(rounds, "rounds", 1)
    e_r = _check_int(rewind_epoch, "rewind_epoch", 0)
    e = _check_int(total_epochs, "total_epochs", 1)
    if e < e_r + k + 1:
        raise ValueError(f"total_epochs must be >= rewind_epoch + rounds + 1 = {e_r + k + 1} "
                         f"(one epoch per round and for the final training), got {e}")
    per = (e - e_r) // (k + 1)
    final = e - e_r - k * per
    sps = tuple(1.0 - (1.0 - sparsity) ** (j / k) for j in range(1, k))
    return IMPSchedule(e, k, e_r, per, final, sps + (sparsity,))


@dataclasses.dataclass
class IMPResult:
    """What :func:`run_imp` did: the schedule, the final masks, and one entry per training phase
    (``phase``, ``start_epoch``, ``epochs``, ``sparsity`` during it, ``result`` of ``train_fn``)."""

    schedule: IMPSchedule
    masks: Masks
    phases: list[dict[str, Any]]


def _rewind(model: nn.Module, snapshot: Mapping[str, torch.Tensor]) -> None:
    """Load the dense-time ``snapshot`` into ``model`` (pruned or not): ``x.weight`` -> ``x.weight_orig``,
    masks left alone; every other parameter and buffer restored."""
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            if key.endswith("weight_mask"):
                continue
            src = key[: -len("_orig")] if key.endswith("weight_orig") else key
            if src not in snapshot:
                raise ValueError(f"rewind snapshot has no entry for {key!r}")
            t.copy_(snapshot[src])
    for _, m in model.named_modules():
        if is_pruned(m):
            _detach_masked_weight(m, (), None)


def run_imp(
    model: nn.Module,
    train_fn: Callable[[nn.Module, int, int], Any],
    sparsity: float,
    total_epochs: int,
    rounds: int = 3,
    rewind_epoch: int = 1,
    include_linear: bool = False,
) -> IMPResult:
    """Iterative magnitude pruning with weight rewinding, in place on ``model`` (see :func:`imp_schedule`).

    ``train_fn(model, start_epoch, n_epochs)`` trains ``model`` for ``n_epochs`` epochs, positions
    ``[start_epoch, start_epoch + n_epochs)`` of the learning-rate schedule; it should build its
    optimizer over ``model.parameters()`` each call (momentum restarts at each phase; the pruned weights'
    parameters are ``*.weight_orig`` then). Calls, in order: ``train_fn(model, 0, e_r)`` (skipped when
    ``e_r = 0``), then per round ``train_fn(model, e_r, L)``, global magnitude pruning to ``s_j`` and
    rewinding to the epoch-``e_r`` state, then ``train_fn(model, e_r, final_epochs)``.

    Returns an :class:`IMPResult`; ``model`` ends pruned (masks applied) and trained.
    """
    if not callable(train_fn):
        raise ValueError(f"train_fn must be callable, got {type(train_fn).__name__}")
    sched = imp_schedule(total_epochs, rounds, sparsity, rewind_epoch)
    mods = prunable_modules(model, include_linear)
    if not mods:
        raise ValueError("model has no prunable layer (nn.Conv2d, or nn.Linear with include_linear=True)")
    if any(is_pruned(m) for _, m in mods):
        raise ValueError("model is already pruned; run_imp starts from a dense model")
    phases: list[dict[str, Any]] = []

    def train(phase: str, start: int, n: int, s: float) -> None:
        phases.append({"phase": phase, "start_epoch": start, "epochs": n, "sparsity": s,
                       "result": train_fn(model, start, n)})

    e_r = sched.rewind_epoch
    if e_r:
        train("to_rewind_point", 0, e_r, 0.0)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    current = 0.0
    for j, s in enumerate(sched.sparsities):
        train(f"round_{j + 1}", e_r, sched.round_epochs, current)
        apply_masks(model, magnitude_masks(model, s, include_linear))
        current = s
        _rewind(model, snapshot)
    train("final", e_r, sched.final_epochs, current)
    return IMPResult(sched, get_masks(model), phases)
