"""The one base of every factorized layer (Tucker, CP, matrix, TT) and the one conv-argument parser.

* :class:`FactorizedLayer`: ``weight`` (dense, differentiable), ``shape``, ``ranks``,
  ``dense_parameter_count()``, ``compressed_parameter_count()``, ``from_dense(module, ...)``, ``is_conv``.
* :class:`FactorizedConv2d`: a :class:`FactorizedLayer` with ``nn.Conv2d``'s geometry, parsed once by
  :func:`parse_conv_args` (one set of ValueErrors for every factorized conv);
  :class:`FactorizedLinear`: one with ``nn.Linear``'s.
* :func:`is_conv_layer`: a convolution, dense or factorized (no class-name sniffing).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FactorizedLayer",
    "FactorizedConv2d",
    "FactorizedLinear",
    "ConvArgs",
    "UnsupportedModuleError",
    "parse_conv_args",
    "pair",
    "is_conv_layer",
    "is_factorized_layer",
]

IntOrPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class UnsupportedModuleError(ValueError, TypeError):
    """``from_dense`` got a module it cannot convert (wrong type). A ValueError, as every bad argument
    here; also a TypeError, which is what a wrong type conventionally raises."""


def pair(v: IntOrPair, name: str) -> tuple[int, int]:
    """``v`` as a pair of ints (an int ``k`` gives ``(k, k)``); ValueError naming ``name`` otherwise."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    try:
        t = tuple(v)
    except TypeError as e:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from e
    if len(t) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in t):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


@dataclasses.dataclass(frozen=True)
class ConvArgs:
    """Validated ``nn.Conv2d`` geometry. ``padding`` is a pair or ``"same"`` / ``"valid"``."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: Union[tuple[int, int], str]
    dilation: tuple[int, int]
    groups: int
    padding_mode: str

    def explicit_padding(self) -> tuple[int, int, int, int]:
        """``(left_w, right_w, top_h, bottom_h)`` as ``nn.Conv2d`` pads (``F.pad`` order); ``"same"`` with an
        even effective kernel is asymmetric."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads: list[int] = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)  # type: ignore[return-value]
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        """Output spatial size for an ``(h, w)`` input (at least 1)."""
        lw, rw, lh, rh = self.explicit_padding()
        out = []
        for size, p, d, k, s in zip((h, w), (lh + rh, lw + rw), self.dilation, self.kernel_size, self.stride):
            out.append(max((size + p - d * (k - 1) - 1) // s + 1, 1))
        return out[0], out[1]


def parse_conv_args(
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    *,
    layer: str = "this layer",
    padding_modes: Sequence[str] = PADDING_MODES,
) -> ConvArgs:
    """Validate ``nn.Conv2d``-style arguments: ValueError naming the argument. ``layer`` names the class
    in messages; ``padding_modes`` are those the layer supports (a subset of ``nn.Conv2d``'s)."""
    for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    ks, st, dl = pair(kernel_size, "kernel_size"), pair(stride, "stride"), pair(dilation, "dilation")
    for name, v in (("kernel_size", ks), ("stride", st), ("dilation", dl)):
        if min(v) < 1:
            raise ValueError(f"{name} entries must be >= 1, got {v}")
    if groups != 1:
        raise ValueError(f"groups={groups} is not supported by {layer} (only groups=1)")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if padding_mode not in padding_modes:
        raise ValueError(f"padding_mode={padding_mode!r} is not supported by {layer} (supported: {tuple(padding_modes)})")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        if padding == "same" and st != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        pad: Union[tuple[int, int], str] = padding
    else:
        pad = pair(padding, "padding")
        if min(pad) < 0:
            raise ValueError(f"padding entries must be >= 0, got {pad}")
    return ConvArgs(in_channels, out_channels, ks, st, pad, dl, 1, padding_mode)


class FactorizedLayer(nn.Module):
    """Base of the factorized layers: a weight of dense ``shape`` stored in factors, plus an optional
    dense ``bias``.

    Subclasses provide ``weight`` (the dense weight, differentiable), ``shape``, ``ranks`` and the
    classmethod ``from_dense(module, ...)`` (same dtype / device / training mode as ``module``, bias
    copied; raises :class:`UnsupportedModuleError` for a module of the wrong type). ``is_conv`` says
    whether the layer is a convolution.
    """

    is_conv: ClassVar[bool] = False
    #: the dense module types ``from_dense`` accepts
    dense_types: ClassVar[tuple[type, ...]] = ()
    bias: Optional[nn.Parameter]

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (``shape``), differentiable."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense weight."""
        raise NotImplementedError

    @property
    def ranks(self) -> tuple[int, ...]:
        """The factorization's rank(s): one per mode for Tucker, ``(R,)`` for CP / matrix layers."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, *args, **kwargs) -> "FactorizedLayer":
        """A factorized layer approximating the dense ``module`` (see the subclass)."""
        raise NotImplementedError(f"{cls.__name__}.from_dense")

    @classmethod
    def _check_dense(cls, module: nn.Module) -> nn.Module:
        if not isinstance(module, cls.dense_types):
            want = " or ".join(f"nn.{t.__name__}" for t in cls.dense_types)
            raise UnsupportedModuleError(f"module must be an {want} for {cls.__name__}.from_dense, got {type(module).__name__}")
        return module

    @staticmethod
    def dense_kwargs(module: nn.Module) -> dict:
        """The constructor arguments shared with the dense ``module`` (geometry, ``bias``, dtype, device)."""
        raise NotImplementedError

    @property
    def fan_in(self) -> int:
        """``prod(shape[1:])``: inputs per output unit of the dense layer."""
        return math.prod(self.shape[1:])

    def _make_bias(self, bias: bool, dtype: Optional[torch.dtype], device) -> None:
        """An uninitialised ``bias`` of ``shape[0]`` entries, or ``bias = None``."""
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shape[0], dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def _reset_bias(self) -> None:
        """PyTorch's default bias init ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _bias_count(self) -> int:
        return self.bias.numel() if self.bias is not None else 0

    def dense_parameter_count(self) -> int:
        """Parameters of the equivalent dense layer: ``prod(shape)`` (+ bias)."""
        return math.prod(self.shape) + self._bias_count()

    def compressed_parameter_count(self) -> int:
        """Parameters the layer stores (each shared tensor once)."""
        return sum(p.numel() for p in self.parameters())

    def _copy_bias_from(self, module: nn.Module) -> None:
        """Copy ``module``'s bias (and its ``requires_grad``) and training mode."""
        src = getattr(module, "bias", None)
        if self.bias is not None and src is not None:
            with torch.no_grad():
                self.bias.copy_(src.detach().to(dtype=self.bias.dtype, device=self.bias.device))
            self.bias.requires_grad_(src.requires_grad)
        self.train(module.training)


class FactorizedConv2d(FactorizedLayer):
    """A factorized layer with ``nn.Conv2d``'s geometry: ``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation``, ``groups`` (always 1), ``padding_mode``, set by :meth:`_setup_conv`."""

    is_conv: ClassVar[bool] = True
    dense_types: ClassVar[tuple[type, ...]] = (nn.Conv2d,)
    #: padding modes this layer implements
    padding_modes: ClassVar[tuple[str, ...]] = PADDING_MODES

    def _setup_conv(self, *args, **kwargs) -> ConvArgs:
        """Parse ``nn.Conv2d``'s arguments (:func:`parse_conv_args`) and set them as attributes."""
        a = parse_conv_args(*args, layer=type(self).__name__, padding_modes=self.padding_modes, **kwargs)
        self.conv_args = a
        self.in_channels, self.out_channels = a.in_channels, a.out_channels
        self.kernel_size, self.stride, self.dilation = a.kernel_size, a.stride, a.dilation
        self.padding: Union[tuple[int, int], str] = a.padding
        self.groups, self.padding_mode = a.groups, a.padding_mode
        return a

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels) + tuple(self.kernel_size)

    @classmethod
    def _check_dense(cls, module: nn.Module) -> nn.Conv2d:
        module = super()._check_dense(module)
        parse_conv_args(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.padding_mode, layer=cls.__name__, padding_modes=cls.padding_modes,
        )
        return module

    @staticmethod
    def dense_kwargs(module: nn.Conv2d) -> dict:
        """``nn.Conv2d``'s constructor arguments of ``module`` (dtype / device included)."""
        return dict(
            in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
            groups=module.groups, padding_mode=module.padding_mode, device=module.weight.device, dtype=module.weight.dtype,
        )

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Pad ``x`` up front where the convs cannot (non-zero modes, asymmetric 'same'); return the
        ``(left_w, right_w, top_h, bottom_h)`` padding left for the convs to do."""
        lrtb = self.conv_args.explicit_padding()
        lw, rw, lh, rh = lrtb
        if self.padding_mode != "zeros":
            return F.pad(x, lrtb, mode=self.padding_mode), (0, 0, 0, 0)
        if lw != rw or lh != rh:
            return F.pad(x, lrtb), (0, 0, 0, 0)
        return x, lrtb

    def _conv_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.bias is None:
            s += ", bias=False"
        return s


class FactorizedLinear(FactorizedLayer):
    """A factorized layer with ``nn.Linear``'s geometry (``in_features``, ``out_features``), set by
    :meth:`_setup_linear`. Input ``(*, in)``, output ``(*, out)``."""

    dense_types: ClassVar[tuple[type, ...]] = (nn.Linear,)

    def _setup_linear(self, in_features: int, out_features: int) -> None:
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @staticmethod
    def dense_kwargs(module: nn.Linear) -> dict:
        """``nn.Linear``'s constructor arguments of ``module`` (dtype / device included)."""
        return dict(
            in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None,
            device=module.weight.device, dtype=module.weight.dtype,
        )


def is_factorized_layer(module: nn.Module) -> bool:
    """True for every :class:`FactorizedLayer` (Tucker, CP, matrix, TT)."""
    return isinstance(module, FactorizedLayer)


def is_conv_layer(module: nn.Module) -> bool:
    """True for a convolution: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` or a :class:`FactorizedLayer`
    with ``is_conv`` (the dense and the factorized form of a layer are accounted alike)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (isinstance(module, FactorizedLayer) and module.is_conv)
