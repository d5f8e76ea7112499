"""Memory layout of the 4-D activations (and dense conv weights) during training.

``channels_last`` (NHWC strides) is the default of ``train`` / ``compare`` (the conv-adapter demo keeps
its own loop and the default layout): on CPU
oneDNN's convolutions and max-pooling run in it without reordering. Measured by
``tucker-manifold bench step_time --layouts default,channels_last`` (one process, side by side), it made
every method's step faster on every net measured (ratios in benchmarks/results/step_time.md). It changes
rounding, not the function: a run in one layout gives different low-order digits from the other, so
each committed result states the layout it was run in (``--memory-format contiguous`` reproduces the
runs made before the default changed).

Tucker parameters are packed 1-D points and are not affected; only 4-D tensors are converted. A
convolution whose input has one channel (MNIST's first layer) cannot tell the two layouts apart and
returns a contiguous output, which would keep the whole net in the default layout: :func:`to_layout`
therefore also puts the output of every 2-D convolution (dense or factorized) in the chosen layout, with
a forward hook that is a no-op when the output already is.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from .nn.base import FactorizedConv2d

__all__ = ["MEMORY_FORMATS", "check_memory_format", "torch_memory_format", "to_layout"]

MEMORY_FORMATS: tuple[str, ...] = ("channels_last", "contiguous")
_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def check_memory_format(memory_format: Any, name: str = "memory_format") -> str:
    """``memory_format`` if it is one of :data:`MEMORY_FORMATS`; ValueError naming ``name`` otherwise."""
    if not isinstance(memory_format, str) or memory_format not in _FORMATS:
        raise ValueError(f"{name} must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
    return memory_format


def torch_memory_format(memory_format: str) -> torch.memory_format:
    """The ``torch.memory_format`` of a name in :data:`MEMORY_FORMATS`."""
    return _FORMATS[check_memory_format(memory_format)]


# conv module -> its layout hook's handle; weak, so a dropped model is not kept alive
_HOOKS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _is_conv2d(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, FactorizedConv2d))


def _output_hook(fmt: torch.memory_format):
    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and not output.is_contiguous(memory_format=fmt):
            return output.contiguous(memory_format=fmt)
        return None

    return hook


def to_layout(obj: Any, memory_format: str | None) -> Any:
    """A module or a tensor in ``memory_format``; ``None`` leaves ``obj`` alone.

    A module: its 4-D parameters and buffers are converted in place, and the output of each of its 2-D
    convolutions is put in the layout (a forward hook; calling again with another layout replaces it,
    ``"contiguous"`` removes it). A tensor: a 4-D one is returned converted, others as they are."""
    if memory_format is None:
        return obj
    fmt = torch_memory_format(memory_format)
    if isinstance(obj, nn.Module):
        obj.to(memory_format=fmt)
        for m in obj.modules():
            if not _is_conv2d(m):
                continue
            old = _HOOKS.pop(m, None)
            if old is not None:
                old.remove()
            if memory_format != "contiguous":
                _HOOKS[m] = m.register_forward_hook(_output_hook(fmt))
        return obj
    if isinstance(obj, torch.Tensor) and obj.dim() == 4:
        return obj.contiguous(memory_format=fmt)
    return obj
