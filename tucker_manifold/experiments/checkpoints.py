"""Checkpoints that load without executing anything: one safetensors file.

Format (version 1), ``checkpoint.safetensors``:

* tensors: the model's ``state_dict`` under ``model/<key>``, every tensor of the optimizer and
  scheduler states under ``optimizer/...`` / ``scheduler/...``, the RNG states of torch (CPU, and CUDA
  when present) and of the data loader's shuffling generator under ``rng/...``;
* the safetensors header's metadata (strings of JSON): ``format`` (``"tucker_manifold.checkpoint"``),
  ``version``, ``epoch``, ``config``, ``history``, ``ranks`` (the layers' ranks), ``extra``, and the
  non-tensor parts of the model / optimizer / scheduler / RNG states, tensors replaced by
  ``{"$tensor": name}`` (tuples as ``{"$tuple": [...]}``, dicts with non-string keys as
  ``{"$items": [[key, value], ...]}``).

Reading never unpickles: a pickle (an old ``checkpoint.pt`` or a hostile file) is rejected by the
safetensors header check before any of its bytes is interpreted. Read the metadata without torch:
``safetensors.safe_open(path, "pt").metadata()``.
"""
from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .accounting import layer_ranks

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
]

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "tucker_manifold.checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """The file is not a readable checkpoint of this project."""


# ------------------------------------------------------------------------------------ tree codec
def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor], storages: set) -> Any:
    """``obj`` as JSON-able data; its tensors go into ``tensors`` under ``key``-derived names."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in storages:
            t = t.clone()  # safetensors refuses tensors that share memory
        elif ptr is not None:
            storages.add(ptr)
        tensors[key] = t
        return {"$tensor": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _encode(v, f"{key}/{k}", tensors, storages) for k, v in obj.items()}
        return {"$items": [[_encode(k, f"{key}/k{i}", tensors, storages), _encode(v, f"{key}/{i}", tensors, storages)]
                           for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, f"{key}/{i}", tensors, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors, storages) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {key!r} in a checkpoint (tensors, numbers, "
                    "strings, None, lists, tuples and dicts only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            name = obj["$tensor"]
            if name not in tensors:
                raise CheckpointError(f"the checkpoint refers to a tensor {name!r} it does not hold")
            return tensors[name]
        if set(obj) == {"$tuple"}:
            return tuple(_decode(v, tensors) for v in obj["$tuple"])
        if set(obj) == {"$items"}:
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["$items"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(k: Any) -> Any:
    if isinstance(k, (list, dict, torch.Tensor)):
        raise CheckpointError(f"the checkpoint has an unusable dict key {k!r}")
    return k


# ------------------------------------------------------------------------------------ RNG states
def _loader_generator(loader: Any) -> Optional[torch.Generator]:
    """The generator that shuffles ``loader`` (DataLoader's ``generator`` or its sampler's)."""
    if loader is None:
        return None
    for g in (getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(g, torch.Generator):
            return g
    return None


def _rng_state(generator: Optional[torch.Generator]) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _set_rng_state(state: dict, generator: Optional[torch.Generator]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"].cpu())


# ------------------------------------------------------------------------------------ save / read
@dataclass
class Checkpoint:
    """A checkpoint read into memory by :func:`read_checkpoint` (nothing restored yet)."""

    path: Path
    epoch: int
    config: dict
    history: list
    ranks: dict
    extra: dict
    model_state: dict
    optimizer_state: Optional[dict] = None
    scheduler_state: Optional[dict] = None
    rng: Optional[dict] = field(default=None, repr=False)

    def restore(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        scheduler: Any = None,
        loader: Any = None,
        restore_rng: bool = True,
    ) -> dict:
        """Load the states into a model rebuilt from the same config (Tucker layers resize to the saved
        ranks through ``model.load_state_dict``), its optimizer and scheduler, and restore the RNG
        states (with the shuffling generator of ``loader``). Returns ``{"epoch", "history", "config",
        "extra"}``."""
        model.load_state_dict(self.model_state)
        if optimizer is not None:
            if self.optimizer_state is None:
                raise CheckpointError(f"{self.path} holds no optimizer state")
            optimizer.load_state_dict(self.optimizer_state)
        if scheduler is not None and self.scheduler_state is not None:
            scheduler.load_state_dict(self.scheduler_state)
        if restore_rng and self.rng is not None:
            _set_rng_state(self.rng, _loader_generator(loader))
        return {"epoch": self.epoch, "history": self.history, "config": self.config, "extra": self.extra}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    epoch: int,
    history: list[dict],
    config: dict,
    *,
    scheduler: Any = None,
    loader: Any = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write model, optimizer and scheduler states, RNG states (torch, CUDA, numpy, python, and the
    shuffling generator of ``loader``), ``epoch`` (epochs done), ``history``, ``config`` and ``extra``
    to ``path`` (the format of the module docstring), atomically: a temporary file, then a rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    storages: set = set()
    model_state = model.state_dict()
    versions = getattr(model_state, "_metadata", None)  # per-module state versions (BatchNorm's, ...)

    def enc(obj, key):
        return json.dumps(_encode(obj, key, tensors, storages))

    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "epoch": json.dumps(int(epoch)),
        "config": enc(config, "config"),
        "history": enc(history, "history"),
        "ranks": json.dumps(layer_ranks(model)),
        "extra": enc(extra or {}, "extra"),
        "model": enc(dict(model_state), "model"),
        "model_versions": json.dumps(dict(versions) if versions is not None else None),
        "optimizer": enc(optimizer.state_dict() if optimizer is not None else None, "optimizer"),
        "scheduler": enc(scheduler.state_dict() if scheduler is not None else None, "scheduler"),
        "rng": enc(_rng_state(_loader_generator(loader)), "rng"),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _not_ours(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a tucker_manifold checkpoint ({why}); nothing was loaded")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (the file is opened once; nothing is
    unpickled or executed). FileNotFoundError if ``path`` does not exist; :class:`CheckpointError`
    (a ValueError) if it is not such a checkpoint."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise _not_ours(path, "a safetensors file without this project's metadata")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
        raise _not_ours(path, f"not a safetensors file: {e}") from None
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise _not_ours(path, f"unreadable version {meta.get('version')!r}") from None
    if version > VERSION:
        raise CheckpointError(f"{path} was written by a newer tucker_manifold (checkpoint format {version}; "
                              f"this version reads up to {VERSION})")
    try:
        parts = {k: json.loads(meta[k]) for k in ("epoch", "config", "history", "ranks", "extra", "model",
                                                   "model_versions", "optimizer", "scheduler", "rng")}
    except (KeyError, json.JSONDecodeError) as e:
        raise _not_ours(path, f"incomplete metadata: {e}") from None
    model_state = _decode(parts["model"], tensors)
    if parts["model_versions"] is not None:
        model_state = OrderedDict(model_state)
        model_state._metadata = parts["model_versions"]  # type: ignore[attr-defined]
    return Checkpoint(
        path=path,
        epoch=int(parts["epoch"]),
        config=_decode(parts["config"], tensors),
        history=_decode(parts["history"], tensors),
        ranks=parts["ranks"],
        extra=_decode(parts["extra"], tensors),
        model_state=model_state,
        optimizer_state=_decode(parts["optimizer"], tensors),
        scheduler_state=_decode(parts["scheduler"], tensors),
        rng=_decode(parts["rng"], tensors),
    )


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    **restore: Any) -> dict:
    """:func:`read_checkpoint` then :meth:`Checkpoint.restore` (``scheduler``, ``loader``, ``restore_rng``
    are passed on); returns ``{"epoch", "history", "config", "extra"}``."""
    return read_checkpoint(path).restore(model, optimizer, **restore)
