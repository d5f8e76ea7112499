"""Model-level adapter functions: :func:`add_adapters`, :func:`merge_and_unload`, :func:`merge`,
:func:`unmerge`, :func:`unload`, :func:`trainable_parameters`, :func:`param_groups`, :func:`adapter_ranks`.

``add_adapters`` works in place, like ``peft.get_peft_model`` without the wrapper object: every parameter
of the model is frozen, each matched ``nn.Linear`` / ``nn.Conv2d`` is replaced by a
:class:`~tucker_manifold.adapters.layer.TuckerAdapterLayer` around it, and each of ``modules_to_save`` by a
:class:`TrainableCopy` (frozen original + trainable deep copy). The config is kept on the model as
``model.tucker_adapter_config``.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from ..parameter import RankBounds, TuckerParameter, is_tucker_parameter
from .config import TuckerAdapterConfig
from .layer import SUPPORTED_TYPES, TuckerAdapterConv2d, TuckerAdapterLayer, TuckerAdapterLinear, TuckerDelta

__all__ = [
    "TrainableCopy",
    "ParameterCount",
    "add_adapters",
    "make_delta",
    "adapter_layers",
    "adapter_parameters",
    "adapter_ranks",
    "param_groups",
    "trainable_parameters",
    "merge",
    "unmerge",
    "merge_and_unload",
    "unload",
    "disabled_adapters",
    "unwrap_peft",
]

_CONFIG_ATTR = "tucker_adapter_config"
_GRAD_ATTR = "_tucker_adapter_requires_grad"


class TrainableCopy(nn.Module):
    """A module of ``modules_to_save``: the frozen ``original_module`` and a trainable deep copy
    ``trained_module`` that the forward uses (the original while adapters are disabled)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.trained_module.parameters():
            p.requires_grad_(True)
        self._disable_adapters = False

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def forward(self, *args, **kwargs):
        m = self.original_module if self._disable_adapters else self.trained_module
        return m(*args, **kwargs)


class ParameterCount(NamedTuple):
    """Parameter counts; ``str()`` gives PEFT's ``print_trainable_parameters`` line."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


# ------------------------------------------------------------------------------------ helpers
def unwrap_peft(model: nn.Module) -> nn.Module:
    """The user's model inside a ``peft.PeftModel`` / PEFT tuner (``model.base_model.model``); ``model``
    itself otherwise. (transformers models have a ``base_model`` attribute too: only PEFT's classes are
    unwrapped, and peft is never imported here unless it already is.)"""
    if "peft" not in sys.modules:
        return model
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _layer_limit(kind: str, shape: tuple[int, ...]) -> int:
    """Largest rank every adaptive channel mode can take: ``min(out, in)``."""
    return min(shape[0], shape[1])


def make_delta(base: nn.Module, config: TuckerAdapterConfig, name: str) -> TuckerDelta:
    """The :class:`TuckerDelta` for the base layer named ``name`` (rank checks, bounds, init)."""
    if not isinstance(base, SUPPORTED_TYPES):
        raise ValueError(
            f"target_modules matched {name!r}, a {type(base).__name__}; Tucker adapters support nn.Linear and "
            "nn.Conv2d only (narrow target_modules or add it to exclude_modules)"
        )
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        raise ValueError(f"target_modules matched {name!r}, an nn.Conv2d with groups={base.groups}; only groups=1 is supported")
    shape = tuple(int(n) for n in base.weight.shape)
    kind = "linear" if isinstance(base, nn.Linear) else "conv2d"
    limit = _layer_limit(kind, shape)
    rmax = config.rank_max_for(name)
    if rmax is not None and rmax > limit:
        src = "rank_pattern" if rmax != config.rank_max else "rank_max"
        raise ValueError(
            f"{src}={rmax} is larger than layer {name!r} ({type(base).__name__} with weight shape {shape}) allows "
            f"(at most {limit}); lower it, exclude the layer, or set a per-layer rank_pattern"
        )
    r0 = config.init_rank if rmax is None else min(config.init_rank, rmax)  # a rank_pattern lowers init_rank
    if r0 > limit:
        raise ValueError(
            f"init_rank={config.init_rank} is larger than layer {name!r} (weight shape {shape}) allows (at most {limit})"
        )
    rmax = limit if rmax is None else rmax
    rmin = min(config.rank_min, r0)
    if kind == "linear":
        ranks = (r0, r0)
        bounds = RankBounds((rmin, rmin), (rmax, rmax), (True, True))
    else:
        kh, kw = shape[2], shape[3]
        spatial_adaptive = config.conv_spatial == "adaptive"
        ranks = (r0, r0, kh, kw)
        bounds = RankBounds((rmin, rmin, 1 if spatial_adaptive else kh, 1 if spatial_adaptive else kw),
                            (rmax, rmax, kh, kw), (True, True, spatial_adaptive, spatial_adaptive))
    return TuckerDelta(base, ranks, bounds, config.scaling, config.dropout, config.init_scale)


def _named_modules_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ------------------------------------------------------------------------------------ add
def add_adapters(model: nn.Module, config: TuckerAdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add Tucker adapters to ``model`` in place and return it.

    Every parameter is frozen; each module matched by ``config.target_modules`` (``nn.Linear`` / ``nn.Conv2d``)
    gets a :class:`TuckerDelta` with a zero core (so the outputs are unchanged, exactly) and random orthonormal
    factors; each of ``config.modules_to_save`` becomes a :class:`TrainableCopy`. Raises ValueError (naming the
    argument) when nothing matches, a match is of an unsupported type, or a rank bound does not fit a layer.
    """
    if not isinstance(config, TuckerAdapterConfig):
        raise ValueError(f"config must be a TuckerAdapterConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if adapter_layers(model):
        raise ValueError("model already has Tucker adapters (load_adapters resizes them; unload() to start over)")
    modules = _named_modules_list(model)
    saved = [n for n, _ in modules if config.is_saved_module(n)]
    # Keep only the outermost match of modules_to_save (a match inside another is already copied).
    saved = [n for n in saved if not any(n != o and n.startswith(o + ".") for o in saved)]
    if config.modules_to_save and not saved:
        raise ValueError(f"modules_to_save={config.modules_to_save} matched no module of the model")
    targets = []
    for n, m in modules:
        if _under(n, saved):
            continue  # PEFT's rule: adapters never go inside modules_to_save
        if config.is_target(n, isinstance(m, nn.Linear)):
            targets.append((n, m))
    if not targets:
        hint = [n for n, m in modules if isinstance(m, SUPPORTED_TYPES)][:8]
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of the model "
            f"(nn.Linear / nn.Conv2d modules include: {hint})"
        )
    nested = [n for n, _ in targets if any(n != o and n.startswith(o + ".") for o, _ in targets)]
    if nested:
        raise ValueError(f"target_modules matched modules nested in other matches: {nested[:4]}")
    # Build everything first (all checks), then modify the model.
    deltas = {n: make_delta(m, config, n) for n, m in targets}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in targets:
        cls = TuckerAdapterLinear if isinstance(m, nn.Linear) else TuckerAdapterConv2d
        _set_submodule(model, n, cls(m, adapter_name, deltas[n]))
    for n in saved:
        _set_submodule(model, n, TrainableCopy(model.get_submodule(n)))
    setattr(model, _CONFIG_ATTR, config)
    setattr(model, _GRAD_ATTR, flags)
    return model


# ------------------------------------------------------------------------------------ inspect
def adapter_layers(model: nn.Module) -> dict[str, TuckerAdapterLayer]:
    """``{qualified name: adapter layer}`` (names as in the unwrapped model)."""
    root = unwrap_peft(model)
    return {n: m for n, m in root.named_modules() if isinstance(m, TuckerAdapterLayer)}


def _deltas(model: nn.Module) -> dict[str, TuckerDelta]:
    out = {}
    for n, layer in adapter_layers(model).items():
        for a, d in layer.tucker_delta.items():
            out[n if a == "default" else f"{n}[{a}]"] = d
    return out


def adapter_parameters(model: nn.Module) -> list[TuckerParameter]:
    """The Tucker parameters of all adapters."""
    return [d.dw for d in _deltas(model).values()]


def adapter_ranks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{layer name: current multilinear ranks}``."""
    return {n: d.ranks for n, d in _deltas(model).items()}


def param_groups(model: nn.Module, tau: Optional[float] = None, **adapter_options) -> list[dict]:
    """Optimizer parameter groups: the adapters' Tucker parameters with ``tau`` (default: the config's),
    then every other trainable parameter (``modules_to_save`` copies, ...). Frozen parameters are left out.

    ``adapter_options`` go into the adapter group (e.g. ``lr=``). TDLRT reads a group's ``tau``; geoopt's and
    torch's optimizers keep the extra key and ignore it."""
    cfg = getattr(unwrap_peft(model), _CONFIG_ATTR, None)
    if tau is None:
        tau = cfg.tau if cfg is not None else None
    tucker = [p for p in adapter_parameters(model) if p.requires_grad]
    ids = {id(p) for p in tucker}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids and not is_tucker_parameter(p)]
    groups = []
    if tucker:
        g = {"params": tucker, **adapter_options}
        if tau is not None:
            g["tau"] = tau
        groups.append(g)
    if others:
        groups.append({"params": others})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """``(trainable, total)`` over the unique parameters (a Tucker parameter counts its stored numbers);
    ``str()`` of the result is PEFT's ``trainable params: X || all params: Y || trainable%: Z``."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return ParameterCount(trainable, total)


# ------------------------------------------------------------------------------------ merge / unload
def merge(model: nn.Module) -> nn.Module:
    """Add every adapter's ``scaling dW`` into its base weight (the adapters stay, inactive)."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (base weights back up to rounding; the adapters are active again)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def _restore_flags(root: nn.Module) -> None:
    flags = getattr(root, _GRAD_ATTR, None)
    if flags is None:
        return
    for n, p in root.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    for attr in (_GRAD_ATTR, _CONFIG_ATTR):
        if hasattr(root, attr):
            delattr(root, attr)


def _unload(model: nn.Module, do_merge: bool) -> nn.Module:
    root = unwrap_peft(model)
    for n, layer in list(adapter_layers(root).items()):
        if do_merge:
            layer.merge(adapter_names=list(layer.tucker_delta.keys()))
        else:
            layer.unmerge()
        _set_submodule(root, n, layer.get_base_layer())
    for n, m in [(n, m) for n, m in root.named_modules() if isinstance(m, TrainableCopy)]:
        _set_submodule(root, n, m.trained_module if do_merge else m.original_module)
    _restore_flags(root)
    return root


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base layer and put the plain ``nn.Linear`` / ``nn.Conv2d`` back (and the
    trained copies of ``modules_to_save``). The parameters' ``requires_grad`` flags are restored to what they
    were before :func:`add_adapters`. Returns the (unwrapped) model."""
    return _unload(model, do_merge=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters without merging (the base model as it was, original ``modules_to_save``)."""
    return _unload(model, do_merge=False)


@contextlib.contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context the model computes the base model (adapters and trained copies off)."""
    mods = [m for m in unwrap_peft(model).modules() if isinstance(m, (TuckerAdapterLayer, TrainableCopy))]
    old = [m._disable_adapters for m in mods]
    try:
        for m in mods:
            m.enable_adapters(False)
        yield model
    finally:
        for m, o in zip(mods, old):
            m.enable_adapters(not o)
