"""Adapter checkpoints: :func:`save_adapters` / :func:`load_adapters`.

A checkpoint is a folder with two files, neither of which can execute code when read:

* ``adapter_model.safetensors``: only the adapter tensors: ``<layer>.tucker_core`` and
  ``<layer>.tucker_factor_<i>`` for every adapter layer (the ranks are their shapes), and ``<module>.<key>``
  for the state dict of every trained copy of ``modules_to_save``;
* ``adapter_config.json``: format tag and version, the :class:`TuckerAdapterConfig`, and per layer its
  kind, weight shape and ranks.

``load_adapters`` into a freshly loaded base model adds the adapters from the stored config, then sets every
adapter to the stored point at the stored ranks (ranks chosen by a rank-adaptive optimizer are restored
exactly). Layer names are those of the unwrapped model, so a checkpoint written from a ``peft.PeftModel``
loads into a plain model and back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..outputs import write_json
from .config import TuckerAdapterConfig
from .model import _CONFIG_ATTR, TrainableCopy, _deltas, add_adapters, adapter_layers, unwrap_peft

__all__ = ["save_adapters", "load_adapters", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "tucker_manifold.adapters"
VERSION = 1

PathLike = Union[str, os.PathLike]


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - safetensors is a core dependency
        raise ImportError("adapter checkpoints need safetensors: pip install safetensors") from e
    return st


def _trained_copies(root: nn.Module) -> dict[str, nn.Module]:
    return {n: m.trained_module for n, m in root.named_modules() if isinstance(m, TrainableCopy)}


def save_adapters(model: nn.Module, path: PathLike) -> Path:
    """Write the adapters of ``model`` (and its trained ``modules_to_save``) to the folder ``path``
    (created if needed); returns it. Nothing of the base model is written, buffers included: BatchNorm
    running statistics that training in train mode changed are kept only if the BatchNorm layers are in
    ``modules_to_save`` (as with PEFT)."""
    root = unwrap_peft(model)
    config = getattr(root, _CONFIG_ATTR, None)
    deltas = _deltas(root)
    if config is None or not deltas:
        raise ValueError("model has no Tucker adapters (call add_adapters first)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, d in deltas.items():
        core, factors = d.core_and_factors(detach=True)
        tensors[f"{name}.tucker_core"] = core.contiguous().clone()
        for i, f in enumerate(factors):
            tensors[f"{name}.tucker_factor_{i}"] = f.contiguous().clone()
        layers[name] = {"kind": d.kind, "shape": list(d.weight_shape), "ranks": list(d.ranks), "scaling": d.scaling}
    saved = _trained_copies(root)
    for name, m in saved.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().clone()
    _safetensors().save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "tool": FORMAT})
    write_json(path / CONFIG_NAME, {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "layers": layers,
        "modules_to_save": sorted(saved),
    })
    return path


def _read_meta(path: Path) -> dict:
    f = path / CONFIG_NAME
    if not f.is_file():
        raise ValueError(f"path {str(path)!r} has no {CONFIG_NAME} (not an adapter checkpoint folder)")
    meta = json.loads(f.read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{f} is not a {FORMAT} checkpoint (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{f} has format version {meta.get('version')!r}; this code reads version {VERSION}")
    for key in ("config", "layers", "modules_to_save"):
        if key not in meta:
            raise ValueError(f"{f} lacks the {key!r} entry")
    return meta


def load_adapters(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a checkpoint of :func:`save_adapters` into ``model`` and return it.

    ``model`` is the base model (adapters are added from the stored config) or a model that already has the
    same adapter layers. Every adapter gets the stored core and factors, at the stored ranks; trained copies
    of ``modules_to_save`` get their stored state. Mismatched layer names or shapes are a ValueError.
    """
    path = Path(path)
    meta = _read_meta(path)
    root = unwrap_peft(model)
    if not adapter_layers(root):
        add_adapters(root, TuckerAdapterConfig.from_dict(meta["config"]))
    deltas = _deltas(root)
    stored = meta["layers"]
    if set(deltas) != set(stored):
        missing, extra = sorted(set(stored) - set(deltas)), sorted(set(deltas) - set(stored))
        raise ValueError(f"adapter layers differ from the checkpoint's: missing in model {missing[:5]}, not in checkpoint {extra[:5]}")
    tensors = _safetensors().load_file(str(path / WEIGHTS_NAME))
    for name, d in deltas.items():
        info = stored[name]
        if tuple(info["shape"]) != d.weight_shape:
            raise ValueError(f"layer {name!r}: checkpoint weight shape {tuple(info['shape'])} != model's {d.weight_shape}")
        try:
            core = tensors[f"{name}.tucker_core"]
            factors = [tensors[f"{name}.tucker_factor_{i}"] for i in range(len(d.weight_shape))]
        except KeyError as e:
            raise ValueError(f"checkpoint lacks tensor {e.args[0]!r}") from None
        ranks = tuple(int(r) for r in core.shape)
        if ranks != tuple(info["ranks"]) or any(tuple(f.shape) != (n, r) for f, n, r in zip(factors, d.weight_shape, ranks)):
            raise ValueError(f"layer {name!r}: tensors do not match the stored ranks {info['ranks']}")
        d.set_point(core, factors)
        d.dw.requires_grad_(True)
    copies = _trained_copies(root)
    if set(copies) != set(meta["modules_to_save"]):
        raise ValueError(f"modules_to_save differ: model {sorted(copies)}, checkpoint {meta['modules_to_save']}")
    for name, m in copies.items():
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        m.load_state_dict(sd, strict=True)
    return model
