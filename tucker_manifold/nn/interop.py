"""tensorly and tltorch (tensorly-torch) interop for the Tucker layers.

* :func:`to_tensorly`: a layer's weight as a ``tensorly.tucker_tensor.TuckerTensor`` ``(core, factors)``
  (detached copies, torch tensors: tensorly's backend is never changed; to compute with it use
  tensorly's pytorch backend, e.g. :func:`tucker_manifold.tucker.tensorly_pytorch`).
* :func:`from_tensorly`: a Tucker layer from a ``TuckerTensor`` (or ``(core, factors)``; torch tensors or
  numpy arrays). Factors that are not orthonormal are orthonormalized by QR with the ``R`` absorbed into
  the core, and ranks that are not a valid multilinear rank (``r_i <= n_i``, ``r_i <= prod_{j != i} r_j``)
  are lowered by an exact HOSVD of the core: the tensor is kept (to rounding).
* tltorch: :func:`tltorch_targets` gives :func:`~tucker_manifold.nn.tuckerize` the converters of
  tltorch's ``FactorizedConv`` (order 1, 2, 3) and ``FactorizedLinear`` with a Tucker factorization, so
  that a tltorch model continues training with TDLRT. tltorch is never imported here (importing it sets
  tensorly's global backend); its classes are looked up only if the user has imported it.

These functions back :meth:`TuckerLayer.to_tensorly` and :meth:`TuckerLayer.from_tensorly`.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..tucker import lower_to_multilinear_ranks, truncated_hosvd
from .base import UnsupportedModuleError
from .layers import TuckerLayer

__all__ = ["to_tensorly", "from_tensorly", "orthonormal_tucker", "tltorch_targets", "TltorchTuckerConv",
           "TltorchTuckerLinear"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_tensorly(layer: nn.Module):
    """The weight of a Tucker ``layer`` as a ``tensorly.tucker_tensor.TuckerTensor``: core
    ``(r_1..r_d)`` and orthonormal factors ``[(n_i, r_i)]``, detached torch copies in the layer's dtype."""
    from tensorly.tucker_tensor import TuckerTensor

    core, factors = layer.manifold.unpack(layer.tucker_weight.detach())
    return TuckerTensor((core.clone(), [f.clone() for f in factors]))


def _as_tensor(a: Any, name: str, dtype, device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            t = torch.as_tensor(a)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} must be a tensor or an array, got {type(a).__name__}") from e
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t.to(dtype=dtype or t.dtype, device=device if device is not None else t.device)


def _unpack_tucker(tucker_tensor: Any, dtype=None, device=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(core, factors)`` of a tensorly ``TuckerTensor`` / ``(core, factors)`` pair, as torch tensors;
    ValueError naming ``tucker_tensor`` for anything else or mismatched shapes."""
    try:
        core, factors = tucker_tensor
        factors = list(factors)
    except (TypeError, ValueError) as e:
        raise ValueError(f"tucker_tensor must be a tensorly TuckerTensor or a (core, factors) pair, got "
                         f"{type(tucker_tensor).__name__}") from e
    core = _as_tensor(core, "tucker_tensor core", dtype, device)
    factors = [_as_tensor(f, f"tucker_tensor factor {i}", core.dtype, core.device) for i, f in enumerate(factors)]
    if core.dim() != len(factors) or any(f.dim() != 2 for f in factors):
        raise ValueError(f"tucker_tensor must have one 2-D factor per core mode, got a {core.dim()}-way core and "
                         f"factors of shapes {[tuple(f.shape) for f in factors]}")
    for i, (f, r) in enumerate(zip(factors, core.shape)):
        if f.shape[1] != r:
            raise ValueError(f"tucker_tensor factor {i} has {f.shape[1]} columns but the core has {r} in mode {i}")
    if not torch.isfinite(core).all() or not all(torch.isfinite(f).all() for f in factors):
        raise ValueError("tucker_tensor has non-finite entries")
    return core, factors


def _is_orthonormal(f: torch.Tensor) -> bool:
    eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    tol = 32 * torch.finfo(f.dtype).eps * max(1, f.shape[1])
    return f.shape[1] <= f.shape[0] and bool((f.transpose(0, 1) @ f - eye).abs().max() <= tol)


def orthonormal_tucker(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same tensor ``core x_i U_i`` with orthonormal factors and a valid multilinear rank.

    Already orthonormal factors are kept as they are (so a layer's own point round-trips exactly);
    others are replaced by ``Q_i`` from a reduced QR ``U_i = Q_i R_i`` and ``core <- core x_i R_i``
    (QR in float32 / float64). Ranks above ``n_i`` or above ``prod_{j != i} r_j`` are then lowered by an
    HOSVD of the (small) core, exact because the mode-``i`` unfolding has rank at most both.
    Returns ``(core, factors)`` in the input dtype.
    """
    dtype = core.dtype
    work = _work_dtype(dtype)
    c, fs, changed = core, list(factors), False
    for i, f in enumerate(fs):
        if _is_orthonormal(f):
            continue
        q, r = torch.linalg.qr(f.to(work))
        c = torch.tensordot(c.to(work), r, dims=([i], [1])).movedim(-1, i)  # core x_i R
        fs[i] = q
        changed = True
    ranks = tuple(c.shape)
    valid = tuple(lower_to_multilinear_ranks(list(ranks)))
    if valid != ranks:
        c = c.to(work)
        small_core, ps, _ = truncated_hosvd(c, ranks=valid)
        c = small_core
        fs = [f.to(work) @ p for f, p in zip(fs, ps)]
        changed = True
    if not changed:
        return core, list(factors)
    return c.to(dtype), [f.to(dtype) for f in fs]


def from_tensorly(cls: type, tucker_tensor: Any, bias: Union[bool, torch.Tensor, None] = True, **kwargs):
    """A layer of Tucker class ``cls`` holding the tensor of ``tucker_tensor`` (see the module docstring).

    The geometry comes from the tensor's shape (conv: ``(C_out, C_in, *kernel)``; linear: ``(out, in)``);
    ``kwargs`` are the rest of ``cls``'s constructor arguments (stride, padding, dilation, forward_mode,
    rank bounds, dtype, device; channel / feature counts and ``kernel_size`` may be repeated if they
    match). ``bias``: ``True`` (PyTorch's default init), ``False`` / ``None`` (no bias) or a tensor to copy.
    dtype / device default to the tensor's.
    """
    dtype, device = kwargs.pop("dtype", None), kwargs.pop("device", None)
    core, factors = _unpack_tucker(tucker_tensor, dtype, device)
    shape = tuple(f.shape[0] for f in factors)
    if cls.is_conv:
        if len(shape) < 3:
            raise ValueError(f"tucker_tensor has shape {shape}: {cls.__name__} needs (C_out, C_in, *kernel)")
        geometry = dict(out_channels=shape[0], in_channels=shape[1], kernel_size=shape[2:])
    else:
        if len(shape) != 2:
            raise ValueError(f"tucker_tensor has shape {shape}: {cls.__name__} needs (out_features, in_features)")
        geometry = dict(out_features=shape[0], in_features=shape[1])
    for k, v in geometry.items():
        if k in kwargs:
            given = kwargs.pop(k)
            if (tuple(given) if isinstance(given, (tuple, list)) else given) != v and not (
                    k == "kernel_size" and isinstance(given, int) and all(s == given for s in v)):
                raise ValueError(f"{k}={given!r} does not match the tucker_tensor's shape {shape}")
    core, factors = orthonormal_tucker(core, factors)
    bias_tensor = bias if isinstance(bias, torch.Tensor) else None
    if bias_tensor is not None and tuple(bias_tensor.shape) != (shape[0],):
        raise ValueError(f"bias must have shape ({shape[0]},), got {tuple(bias_tensor.shape)}")
    layer = cls(**geometry, ranks=tuple(core.shape), bias=bias is not None and bias is not False,
                dtype=core.dtype, device=core.device, **kwargs)
    m = layer.manifold
    layer.set_point(m.pack(core, factors), m)
    if bias_tensor is not None:
        with torch.no_grad():
            layer.bias.copy_(bias_tensor.detach().to(dtype=layer.bias.dtype, device=layer.bias.device))
    return layer


# ------------------------------------------------------------------------------------ tltorch
def _tltorch():
    """The tltorch module if the user has imported it, else None (never imported here)."""
    return sys.modules.get("tltorch")


def _tltorch_tucker(module: nn.Module):
    """``(core, factors)`` of a tltorch layer's Tucker weight; UnsupportedModuleError otherwise."""
    tlt = _tltorch()
    tucker_cls = getattr(getattr(tlt, "factorized_tensors", None), "TuckerTensor", None) if tlt else None
    w = getattr(module, "weight", None)
    if tucker_cls is None or not isinstance(w, tucker_cls):
        kind = type(w).__name__ if w is not None else "none"
        raise UnsupportedModuleError(f"only Tucker-factorized tltorch layers are converted (this one's weight is {kind})")
    n_layers = getattr(module, "n_layers", 1)
    if n_layers != 1:
        raise UnsupportedModuleError(f"n_layers={n_layers}: a jointly factorized tltorch layer is not converted")
    return w.core.detach().contiguous(), [f.detach().contiguous() for f in w.factors]


class TltorchTuckerConv:
    """Converter of a tltorch ``FactorizedConv`` (Tucker, order 1 / 2 / 3, ``n_layers = 1``) to
    :class:`TuckerConv1d` / :class:`TuckerConv2d` / :class:`TuckerConv3d` with the same weight, bias,
    stride, padding and dilation (the entries of :func:`tltorch_targets`)."""

    default_adaptive = staticmethod(TuckerLayer.default_adaptive)  # what tuckerize's rank bounds read

    @staticmethod
    def _check_dense(module: nn.Module) -> nn.Module:
        core, _ = _tltorch_tucker(module)
        if core.dim() not in (3, 4, 5):
            raise UnsupportedModuleError(f"a {core.dim() - 2}-D tltorch convolution is not supported (1-D to 3-D are)")
        return module

    @staticmethod
    def convert(module: nn.Module, **layer_kwargs) -> nn.Module:
        from .conv_nd import TuckerConv1d, TuckerConv3d
        from .layers import TuckerConv2d

        core, factors = _tltorch_tucker(module)
        cls = {3: TuckerConv1d, 4: TuckerConv2d, 5: TuckerConv3d}[core.dim()]

        def geo(v) -> tuple[int, ...]:
            return tuple(int(a) for a in (v.tolist() if hasattr(v, "tolist") else v))

        layer = cls.from_tensorly((core, factors), bias=None if module.bias is None else module.bias.detach(),
                                  stride=geo(module.stride), padding=geo(module.padding),
                                  dilation=geo(module.dilation), **layer_kwargs)
        layer.train(module.training)
        return layer


class TltorchTuckerLinear:
    """Converter of a tltorch ``FactorizedLinear`` whose weight is a Tucker factorization of the
    tensorized matrix (``TuckerTensorized``, ``n_layers = 1``) to :class:`TuckerLinear`, exactly: the
    weight matrix is ``(U_o1 kron .. U_om) Mat(C) (U_i1 kron .. U_in)^T``, an order-2 Tucker tensor."""

    default_adaptive = staticmethod(TuckerLayer.default_adaptive)

    @staticmethod
    def _check_dense(module: nn.Module) -> nn.Module:
        _tltorch_tucker(module)
        w = module.weight
        shape = getattr(w, "tensorized_shape", None)
        if shape is None or len(shape) != 2:
            raise UnsupportedModuleError("a tltorch FactorizedLinear's weight must be a tensorized (out, in) matrix")
        return module

    @staticmethod
    def convert(module: nn.Module, **layer_kwargs) -> nn.Module:
        from .layers import TuckerLinear

        core, factors = _tltorch_tucker(module)
        out_shape, in_shape = ((s,) if isinstance(s, int) else tuple(s) for s in module.weight.tensorized_shape)
        m = len(out_shape)
        if tuple(f.shape[0] for f in factors) != out_shape + in_shape:
            raise UnsupportedModuleError(f"tltorch weight factors {[tuple(f.shape) for f in factors]} do not match "
                                         f"its tensorized shape {(out_shape, in_shape)}")

        def kron(fs: Sequence[torch.Tensor]) -> torch.Tensor:
            out = fs[0]
            for f in fs[1:]:  # (a kron b)[i p + k, j q + l] = a[i, j] b[k, l] (torch.kron fails on some strides)
                out = (out[:, None, :, None] * f[None, :, None, :]).reshape(out.shape[0] * f.shape[0], -1)
            return out

        # Row-major reshape of the (out_1..out_m, in_1..in_n) tensor: mode 1 is the most significant digit.
        r_out, r_in = math.prod(core.shape[:m]), math.prod(core.shape[m:])
        matrix_core = core.reshape(r_out, r_in)
        layer = TuckerLinear.from_tensorly((matrix_core, [kron(factors[:m]), kron(factors[m:])]),
                                           bias=None if module.bias is None else module.bias.detach(), **layer_kwargs)
        layer.train(module.training)
        return layer


def tltorch_targets(linear: bool = True) -> dict[type, type]:
    """``{tltorch class: converter}`` for :func:`~tucker_manifold.nn.replace.replace_modules`; empty
    unless the user has imported tltorch."""
    tlt = _tltorch()
    if tlt is None:
        return {}
    out: dict[type, type] = {}
    conv = getattr(tlt, "FactorizedConv", None)
    if isinstance(conv, type):
        out[conv] = TltorchTuckerConv
    lin = getattr(tlt, "FactorizedLinear", None)
    if linear and isinstance(lin, type):
        out[lin] = TltorchTuckerLinear
    return out


def tltorch_hints() -> dict[type, str]:
    """The skip reason of tltorch's ``FactorizedLinear`` without ``linear=True``."""
    tlt = _tltorch()
    lin = getattr(tlt, "FactorizedLinear", None) if tlt is not None else None
    return {lin: "tltorch FactorizedLinear is converted only with linear=True"} if isinstance(lin, type) else {}
