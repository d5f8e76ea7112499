"""Tucker convolutions in 1-D and 3-D: :class:`TuckerConv1d` (3-way kernel) and :class:`TuckerConv3d`
(5-way kernel), for audio / sequence and video / volume models.

They are :class:`~tucker_manifold.nn.layers.TuckerLayer` s like :class:`TuckerConv2d` (one packed
``tucker_weight``, the same rank bounds, state-dict hooks, initialisation and optimizers: plain
``torch.optim``, geoopt's Riemannian optimizers, ``TDLRT``); only the geometry and the forward differ.
The kernel ``W (C_out, C_in, k_1, .., k_n)`` is ``C x_1 U_out x_2 U_in x_3 U_1 .. x_{n+2} U_n``; the two
channel modes adapt by default, the spatial ones keep full rank.

Arguments are checked by :func:`parse_conv_args_nd`, which runs the shared 2-D parser
(:func:`~tucker_manifold.nn.base.parse_conv_args`) once per spatial dimension, so every factorized
conv raises the same ValueErrors. One-pass TDLRT: the layers implement the
``tucker_core_gradient(x, gy, factors)`` protocol of :func:`tucker_manifold.onepass.layer_core_gradient`
(the dense weight gradient of ``F.conv{n}d`` projected onto the bases).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..parameter import record_io
from ..tucker import multi_mode_dot, reconstruct
from .base import PADDING_MODES, FactorizedLayer, parse_conv_args
from .layers import TuckerLayer, _product_macs

__all__ = ["ConvArgsNd", "parse_conv_args_nd", "FactorizedConvNd", "TuckerConvNd", "TuckerConv1d", "TuckerConv3d"]

IntOrTuple = Union[int, Sequence[int]]


def _ntuple(v: IntOrTuple, n: int, name: str) -> tuple[int, ...]:
    """``v`` as ``n`` ints (an int ``k`` gives ``(k,) * n``); ValueError naming ``name`` otherwise."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an int or {n} ints, got {v!r}")
    if isinstance(v, int):
        return (v,) * n
    try:
        t = tuple(v)
    except TypeError as e:
        raise ValueError(f"{name} must be an int or {n} ints, got {v!r}") from e
    if len(t) != n or not all(isinstance(a, int) and not isinstance(a, bool) for a in t):
        raise ValueError(f"{name} must be an int or {n} ints, got {v!r}")
    return t


@dataclasses.dataclass(frozen=True)
class ConvArgsNd:
    """Validated ``nn.Conv{n}d`` geometry; ``padding`` is an ``n``-tuple or ``"same"`` / ``"valid"``."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Union[tuple[int, ...], str]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str

    def explicit_padding(self) -> tuple[tuple[int, int], ...]:
        """``((before, after), ...)`` per spatial dimension, as ``nn.Conv{n}d`` pads (``"same"`` with an
        even effective kernel puts the extra entry after)."""
        if self.padding == "valid":
            return tuple((0, 0) for _ in self.kernel_size)
        if self.padding == "same":
            return tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(self.dilation, self.kernel_size))
        return tuple((p, p) for p in self.padding)

    def output_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Output spatial size for an input of spatial size ``spatial`` (at least 1 each)."""
        return tuple(
            max((size + lo + hi - d * (k - 1) - 1) // s + 1, 1)
            for size, (lo, hi), d, k, s in zip(spatial, self.explicit_padding(), self.dilation, self.kernel_size, self.stride)
        )


def parse_conv_args_nd(
    ndim: int,
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: Union[IntOrTuple, str] = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    *,
    layer: str = "this layer",
    padding_modes: Sequence[str] = PADDING_MODES,
) -> ConvArgsNd:
    """Validate ``nn.Conv{ndim}d``-style arguments (ints or ``ndim``-tuples): ValueError naming the
    argument. The checks are :func:`~tucker_manifold.nn.base.parse_conv_args`'s, applied to each spatial
    dimension (so every factorized conv reports bad input alike)."""
    ks, st, dl = (_ntuple(v, ndim, n) for v, n in ((kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation")))
    pad: Union[tuple[int, ...], str] = padding if isinstance(padding, str) else _ntuple(padding, ndim, "padding")
    for i in range(ndim):
        p_i = pad if isinstance(pad, str) else (pad[i], pad[i])
        parse_conv_args(in_channels, out_channels, (ks[i],) * 2, (st[i],) * 2, p_i, (dl[i],) * 2, groups, padding_mode,
                        layer=layer, padding_modes=padding_modes)
    return ConvArgsNd(in_channels, out_channels, ks, st, pad, dl, 1, padding_mode)


class FactorizedConvNd(FactorizedLayer):
    """A factorized layer with ``nn.Conv{ndim}d``'s geometry (``in_channels``, ``out_channels``,
    ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups`` = 1, ``padding_mode``), set by
    :meth:`_setup_conv`. Subclasses set ``ndim`` and ``dense_types``."""

    is_conv: ClassVar[bool] = True
    ndim: ClassVar[int] = 0
    padding_modes: ClassVar[tuple[str, ...]] = PADDING_MODES

    def _setup_conv(self, *args, **kwargs) -> ConvArgsNd:
        a = parse_conv_args_nd(self.ndim, *args, layer=type(self).__name__, padding_modes=self.padding_modes, **kwargs)
        self.conv_args = a
        self.in_channels, self.out_channels = a.in_channels, a.out_channels
        self.kernel_size, self.stride, self.dilation = a.kernel_size, a.stride, a.dilation
        self.padding: Union[tuple[int, ...], str] = a.padding
        self.groups, self.padding_mode = a.groups, a.padding_mode
        return a

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels) + tuple(self.kernel_size)

    @classmethod
    def _check_dense(cls, module: nn.Module) -> nn.Module:
        module = super()._check_dense(module)
        parse_conv_args_nd(
            cls.ndim, module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.padding_mode, layer=cls.__name__, padding_modes=cls.padding_modes,
        )
        return module

    @staticmethod
    def dense_kwargs(module: nn.Module) -> dict:
        """``nn.Conv{n}d``'s constructor arguments of ``module`` (dtype / device included)."""
        return dict(
            in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
            groups=module.groups, padding_mode=module.padding_mode, device=module.weight.device, dtype=module.weight.dtype,
        )

    def _conv_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self.ndim:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self.ndim:
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        return s


class TuckerConvNd(TuckerLayer, FactorizedConvNd):
    """Base of :class:`TuckerConv1d` / :class:`TuckerConv3d`: an ``ndim``-D convolution whose kernel
    ``(C_out, C_in, k_1..k_ndim)`` is in Tucker format with ranks ``(r_out, r_in, r_1..r_ndim)``.

    Parameters as :class:`~tucker_manifold.nn.layers.TuckerConv2d`, with ``ndim``-tuples for the
    geometry: ``ranks`` an int (both channel modes; spatial modes full rank, then made a valid
    multilinear rank) or ``ndim + 2`` ints; ``padding`` ints, ``"same"`` (stride 1) or ``"valid"``;
    ``groups`` 1 and ``padding_mode`` ``"zeros"`` only. Input ``(B, C_in, *spatial)`` or
    ``(C_in, *spatial)``, output as ``nn.Conv{ndim}d``.
    """

    padding_modes = ("zeros",)
    _conv: ClassVar[Callable[..., torch.Tensor]]
    _conv_weight_grad: ClassVar[Callable[..., torch.Tensor]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        ranks: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Union[IntOrTuple, str] = 0,
        dilation: IntOrTuple = 1,
        bias: bool = True,
        groups: int = 1,
        padding_mode: str = "zeros",
        forward_mode: str = "auto",
        rank_min: Optional[IntOrTuple] = None,
        rank_max: Optional[IntOrTuple] = None,
        adaptive_modes: Optional[Sequence[bool]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._setup_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_tucker(ranks, rank_min, rank_max, adaptive_modes, forward_mode, bias, dtype, device)

    def _pointwise(self, w: torch.Tensor) -> torch.Tensor:
        """A ``(out, in)`` matrix as a 1x..x1 kernel."""
        return w.reshape(w.shape + (1,) * self.ndim)

    # -- forward
    def forward_costs(self, input_shape: Optional[Sequence[int]] = None) -> dict[str, float]:
        """Multiply-adds per output position of the two forward paths, as
        :meth:`TuckerConv2d.forward_costs <tucker_manifold.nn.layers.TuckerConv2d.forward_costs>`:
        factorized ``C_in r_in prod(s) + r_in r_out prod(k) + r_out C_out``, reconstructed
        ``C_in C_out prod(k)``; with an ``input_shape`` the kernel-building products are added, amortised
        over the ``B prod(out spatial)`` output positions."""
        c_out, c_in, *ks = self.shape
        r_out, r_in, *rs = self.ranks
        fact = c_in * r_in * math.prod(self.stride) + r_in * r_out * math.prod(ks) + r_out * c_out
        recon = c_in * c_out * math.prod(ks)
        if input_shape is not None:
            input_shape = tuple(input_shape)
            batch = input_shape[0] if len(input_shape) == self.ndim + 2 else 1
            positions = max(batch * math.prod(self.conv_args.output_size(input_shape[-self.ndim:])), 1)
            spatial = [(k, r) for k, r in zip(ks, rs)]
            fact += _product_macs(self.ranks, [None, None, *spatial]) / positions
            recon += _product_macs(self.ranks, [(c_out, r_out), (c_in, r_in), *spatial]) / positions
        return {"factorized": fact, "reconstructed": recon}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One-pass TDLRT: records (x, dL/dy) when an optimizer asks for it; otherwise one context read.
        return record_io(self.tucker_weight, self, x, self._forward(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        core, factors = self.core_and_factors()
        conv = type(self)._conv
        if self.chosen_forward(x.shape) == "reconstructed":
            return conv(x, reconstruct(core, factors), self.bias, self.stride, self.padding, self.dilation)
        u_out, u_in, *spatial = factors
        # 1x..x1 conv (C_in -> r_in), small conv (r_in -> r_out) with the layer's geometry, 1x..x1 conv
        # (r_out -> C_out). Zero padding commutes with a bias-free pointwise conv: this is the dense conv.
        small = multi_mode_dot(core, [None, None, *spatial])
        h = conv(x, self._pointwise(u_in.transpose(0, 1)))
        h = conv(h, small, None, self.stride, self.padding, self.dilation)
        return conv(h, self._pointwise(u_out), self.bias)

    def tucker_core_gradient(self, x: torch.Tensor, gy: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``dL/dC^ = dL/dW x_j U^_j^T`` at the bases ``factors`` from one recorded use: input ``x``
        and output gradient ``gy`` (the one-pass protocol of :mod:`tucker_manifold.onepass`)."""
        if x.dim() == self.ndim + 1:  # unbatched input
            x, gy = x.unsqueeze(0), gy.unsqueeze(0)
        pads = self.conv_args.explicit_padding()
        if any(lo != hi for lo, hi in pads):  # asymmetric "same": pad up front, as the conv does
            x = F.pad(x, [p for lo_hi in reversed(pads) for p in lo_hi])
            sym = (0,) * self.ndim
        else:
            sym = tuple(lo for lo, _ in pads)
        gw = type(self)._conv_weight_grad(x, self.shape, gy, self.stride, sym, self.dilation)
        return multi_mode_dot(gw, list(factors), transpose=True)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, {self._tucker_repr()}"


class TuckerConv1d(TuckerConvNd):
    """1-D convolution with a Tucker kernel ``(C_out, C_in, k)``, ranks ``(r_out, r_in, r_k)``; input
    ``(B, C_in, L)`` or ``(C_in, L)``. See :class:`TuckerConvNd`."""

    ndim = 1
    dense_types = (nn.Conv1d,)
    _conv = staticmethod(F.conv1d)
    _conv_weight_grad = staticmethod(torch.nn.grad.conv1d_weight)


class TuckerConv3d(TuckerConvNd):
    """3-D convolution with a Tucker kernel ``(C_out, C_in, k_d, k_h, k_w)``, ranks
    ``(r_out, r_in, r_d, r_h, r_w)``; input ``(B, C_in, D, H, W)`` or ``(C_in, D, H, W)``. See
    :class:`TuckerConvNd`."""

    ndim = 3
    dense_types = (nn.Conv3d,)
    _conv = staticmethod(F.conv3d)
    _conv_weight_grad = staticmethod(torch.nn.grad.conv3d_weight)
