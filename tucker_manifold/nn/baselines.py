"""Baseline factorized layers, trained directly by a plain torch optimizer.

These are the fixed-rank baselines that TDLRT is compared against:

* :class:`CPConv2d`: CP-decomposed convolution (Lebedev et al., 2015),
  ``W[o, c, h, w] = sum_k A[o, k] B[c, k] H[h, k] V[w, k]``, evaluated as four cheap convolutions
  (1x1, depthwise ``k_h x 1``, depthwise ``1 x k_w``, 1x1).
* :class:`MatrixConv2d`: the kernel reshaped to ``C_out x (C_in k_h k_w)`` is ``A @ B^T``, evaluated as
  a ``k_h x k_w`` convolution into ``R`` channels followed by a 1x1 convolution.
* :class:`MatrixLinear` (and its alias :data:`CPLinear`): ``W = A @ B^T``.

:func:`factorize_model` swaps the dense layers of a model for these, and
:func:`rank_for_parameter_budget` picks a rank that matches a parameter budget (to compare methods at
equal compression).

Random initialisation
---------------------
PyTorch initialises a dense ``Conv2d``/``Linear`` weight with ``kaiming_uniform_(a=sqrt(5))``, i.e.
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, whose variance is ``1 / (3 fan_in)``. With ``n`` factors whose
entries are i.i.d. ``N(0, s^2)`` and ``R`` rank-one terms, each entry of the reconstructed weight has
variance ``R s^(2n)``; the factors are therefore drawn with ``s = (1 / (3 fan_in R))^(1 / (2n))``
(``n = 2`` for the matrix layers, ``n = 4`` for CP), so the reconstructed weight has the same variance
as the dense default. Biases use PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from tucker_manifold.tucker import tensorly_pytorch

__all__ = [
    "CPConv2d",
    "MatrixConv2d",
    "MatrixLinear",
    "CPLinear",
    "factorize_model",
    "rank_for_parameter_budget",
]

Method = Literal["cp", "matrix"]
Init = Literal["svd", "random"]
_IntOrPair = int | tuple[int, int]
_Padding = int | tuple[int, int] | str


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_rank(rank: object, name: str = "rank") -> int:
    # bool is an int subclass; True as a rank is almost certainly a bug.
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`{name}` must be a positive int, got {rank!r}")
    return rank


def _check_init(init: str) -> None:
    if init not in ("svd", "random"):
        raise ValueError(f"`init` must be 'svd' or 'random', got {init!r}")


def _check_method(method: str) -> None:
    if method not in ("cp", "matrix"):
        raise ValueError(f"`method` must be 'cp' or 'matrix', got {method!r}")


def _default_std(fan_in: int, rank: int, n_factors: int) -> float:
    """Std of i.i.d. normal factor entries giving ``Var(W) = 1 / (3 fan_in)`` (see module docstring)."""
    return (1.0 / (3.0 * fan_in * rank)) ** (1.0 / (2 * n_factors))


def _init_bias(bias: torch.Tensor | None, fan_in: int) -> None:
    if bias is not None:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


def _copy_bias(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    if dst is not None and src is not None:
        with torch.no_grad():
            dst.copy_(src.detach().to(dtype=dst.dtype, device=dst.device))


def _truncated_svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix (m, n) ~= A @ B^T`` with ``A = U sqrt(S)`` ``(m, rank)``, ``B = V sqrt(S)`` ``(n, rank)``."""
    # float64 so that the full-rank factorisation reproduces float32 weights to rounding.
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


class _ConvGeometry(nn.Module):
    """Shared conv hyper-parameters, padding handling and bookkeeping of the factorized convs."""

    def _setup_geometry(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrPair,
        rank: int,
        stride: _IntOrPair,
        padding: _Padding,
        dilation: _IntOrPair,
        padding_mode: str,
    ) -> None:
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            _check_rank(value, name)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size: tuple[int, int] = _pair(kernel_size)
        self.stride: tuple[int, int] = _pair(stride)
        self.dilation: tuple[int, int] = _pair(dilation)
        self.rank = _check_rank(rank)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"`padding_mode` must be zeros/reflect/replicate/circular, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"`padding` must be 'same', 'valid', an int or a pair, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("`padding='same'` is not supported for strided convolutions")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair(padding)
        # Explicit (left_w, right_w, left_h, right_h) padding, as nn.Conv2d computes it; F.pad needs it
        # for the non-zero padding modes, and the separable CP path needs it split per direction.
        if self.padding == "valid":
            self._lrtb = (0, 0, 0, 0)
        elif self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            self._lrtb = tuple(pads)
        else:
            ph, pw = self.padding
            self._lrtb = (pw, pw, ph, ph)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Pad ``x`` up front when needed; return the padding that is left for the convs to do."""
        lw, rw, lh, rh = self._lrtb
        if self.padding_mode != "zeros":
            return F.pad(x, self._lrtb, mode=self.padding_mode), (0, 0, 0, 0)
        if lw != rw or lh != rh:
            # Asymmetric 'same' padding (even kernels): conv2d can only pad symmetrically.
            return F.pad(x, self._lrtb), (0, 0, 0, 0)
        return x, self._lrtb

    def dense_parameter_count(self) -> int:
        """Parameters of the equivalent dense ``nn.Conv2d`` (weight + bias)."""
        kh, kw = self.kernel_size
        return self.out_channels * self.in_channels * kh * kw + (self.out_channels if self.bias is not None else 0)

    @property
    def _fan_in(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.bias is None:
            s += ", bias=False"
        return s

    @staticmethod
    def _check_dense_conv(conv: nn.Module) -> nn.Conv2d:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"only groups=1 convolutions can be factorized, got groups={conv.groups}")
        return conv

    @staticmethod
    def _geometry_kwargs(conv: nn.Conv2d) -> dict:
        return dict(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )


# ----------------------------------------------------------------------------------------------
# CP convolution
# ----------------------------------------------------------------------------------------------


class CPConv2d(_ConvGeometry):
    """CP-factorized 2-D convolution (Lebedev et al., 2015).

    ``W[o, c, h, w] = sum_k A[o, k] B[c, k] H[h, k] V[w, k]`` with ``A (C_out, R)``, ``B (C_in, R)``,
    ``H (k_h, R)``, ``V (k_w, R)``. The forward pass never forms ``W``: it is a 1x1 conv with ``B^T``
    (``C_in -> R``), a depthwise ``k_h x 1`` conv with ``H`` (stride/padding/dilation along h), a
    depthwise ``1 x k_w`` conv with ``V`` (along w) and a 1x1 conv with ``A`` (``R -> C_out``) + bias.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode
        As for ``nn.Conv2d`` (``groups`` is always 1).
    rank
        CP rank ``R`` (may exceed any of the dimensions).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrPair,
        rank: int,
        stride: _IntOrPair = 1,
        padding: _Padding = 0,
        dilation: _IntOrPair = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup_geometry(in_channels, out_channels, kernel_size, rank, stride, padding, dilation, padding_mode)
        kh, kw = self.kernel_size
        fk = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(out_channels, rank, **fk))
        self.B = nn.Parameter(torch.empty(in_channels, rank, **fk))
        self.H = nn.Parameter(torch.empty(kh, rank, **fk))
        self.V = nn.Parameter(torch.empty(kw, rank, **fk))
        self.bias = nn.Parameter(torch.empty(out_channels, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init matching the variance of PyTorch's default conv init (see module docstring)."""
        std = _default_std(self._fan_in, self.rank, n_factors=4)
        for f in (self.A, self.B, self.H, self.V):
            nn.init.normal_(f, 0.0, std)
        _init_bias(self.bias, self._fan_in)

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B, H, V)`` with shapes ``(C_out, R), (C_in, R), (k_h, R), (k_w, R)``."""
        return self.A, self.B, self.H, self.V

    @property
    def weight(self) -> torch.Tensor:
        """Reconstructed dense kernel ``(C_out, C_in, k_h, k_w)`` (differentiable)."""
        return torch.einsum("ok,ck,hk,wk->ochw", self.A, self.B, self.H, self.V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H', W')`` (unbatched ``(C_in, H, W)`` also accepted)."""
        x, (lw, rw, lh, rh) = self._pad(x)
        (kh, kw), (sh, sw), (dh, dw), r = self.kernel_size, self.stride, self.dilation, self.rank
        x = F.conv2d(x, self.B.T.reshape(r, self.in_channels, 1, 1))
        x = F.conv2d(x, self.H.T.reshape(r, 1, kh, 1), stride=(sh, 1), padding=(lh, 0), dilation=(dh, 1), groups=r)
        x = F.conv2d(x, self.V.T.reshape(r, 1, 1, kw), stride=(1, sw), padding=(0, lw), dilation=(1, dw), groups=r)
        return F.conv2d(x, self.A.reshape(self.out_channels, r, 1, 1), self.bias)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        rank: int,
        init: Init = "svd",
        n_iter_max: int = 100,
        random_state: int = 0,
    ) -> "CPConv2d":
        """Build a rank-``rank`` CP conv from a dense ``nn.Conv2d`` (bias copied).

        ``init="svd"``: CP-ALS (tensorly ``parafac``, SVD init, ``n_iter_max`` iterations, seeded by
        ``random_state``) of the kernel in float64. The CP weights are absorbed into the factors, spread
        so that the four columns of each rank-one term have equal norms (same kernel, better-conditioned
        for gradient training than putting all the scale into ``A``). ``init="random"``: the default
        random init, only the bias is taken from ``conv``.

        Raises
        ------
        RuntimeError
            If the decomposition fails or produces non-finite factors.
        """
        conv = cls._check_dense_conv(conv)
        _check_rank(rank)
        _check_init(init)
        layer = cls(rank=rank, **cls._geometry_kwargs(conv))
        _copy_bias(layer.bias, conv.bias)
        if init == "random":
            return layer
        kernel = conv.weight.detach().to(torch.float64)
        try:
            # tensorly warns when R exceeds a mode size (e.g. k_h = 3) and pads the SVD init with
            # random columns; that is expected for CP ranks, so the warning is silenced.
            with tensorly_pytorch(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Trying to compute SVD")
                from tensorly.decomposition import parafac

                weights, factors = parafac(
                    kernel, rank, n_iter_max=n_iter_max, init="svd", random_state=random_state
                )
        except Exception as exc:  # tensorly raises assorted linalg errors on degenerate input
            raise RuntimeError(f"CP decomposition of the conv kernel (rank={rank}) failed: {exc}") from exc
        factors = [f * weights if i == 0 else f for i, f in enumerate(factors)]
        if not all(torch.isfinite(f).all() for f in factors):
            raise RuntimeError(
                f"CP decomposition of the conv kernel (rank={rank}) produced non-finite factors; "
                "try a smaller rank, init='random', or another random_state"
            )
        norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, R)
        scale = norms.prod(dim=0).pow(0.25)  # per-term geometric mean norm
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        with torch.no_grad():
            for p, f, n in zip(layer.factors, factors, safe):
                p.copy_((f / n * scale).to(p.dtype))
        return layer


# ----------------------------------------------------------------------------------------------
# Matrix (SVD-style) convolution
# ----------------------------------------------------------------------------------------------


class MatrixConv2d(_ConvGeometry):
    """2-D convolution whose reshaped kernel is a rank-``R`` matrix.

    ``W.reshape(C_out, C_in k_h k_w) = A @ B^T`` with ``A (C_out, R)``, ``B (C_in k_h k_w, R)``. The
    forward pass is a ``k_h x k_w`` conv with ``B^T`` reshaped to ``(R, C_in, k_h, k_w)``
    (stride/padding/dilation) followed by a 1x1 conv with ``A`` + bias.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode
        As for ``nn.Conv2d`` (``groups`` is always 1).
    rank
        ``1 <= R <= min(C_out, C_in k_h k_w)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _IntOrPair,
        rank: int,
        stride: _IntOrPair = 1,
        padding: _Padding = 0,
        dilation: _IntOrPair = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup_geometry(in_channels, out_channels, kernel_size, rank, stride, padding, dilation, padding_mode)
        full = min(out_channels, self._fan_in)
        if rank > full:
            # Extra rank-one terms beyond full rank add parameters but no expressiveness.
            raise ValueError(f"`rank` must be <= min(C_out, C_in*k_h*k_w) = {full}, got {rank}")
        fk = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(out_channels, rank, **fk))
        self.B = nn.Parameter(torch.empty(self._fan_in, rank, **fk))
        self.bias = nn.Parameter(torch.empty(out_channels, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init matching the variance of PyTorch's default conv init (see module docstring)."""
        std = _default_std(self._fan_in, self.rank, n_factors=2)
        nn.init.normal_(self.A, 0.0, std)
        nn.init.normal_(self.B, 0.0, std)
        _init_bias(self.bias, self._fan_in)

    @property
    def weight(self) -> torch.Tensor:
        """Reconstructed dense kernel ``(C_out, C_in, k_h, k_w)`` (differentiable)."""
        return (self.A @ self.B.T).reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H', W')`` (unbatched ``(C_in, H, W)`` also accepted)."""
        x, (lw, _, lh, _) = self._pad(x)
        basis = self.B.T.reshape(self.rank, self.in_channels, *self.kernel_size)
        x = F.conv2d(x, basis, stride=self.stride, padding=(lh, lw), dilation=self.dilation)
        return F.conv2d(x, self.A.reshape(self.out_channels, self.rank, 1, 1), self.bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int, init: Init = "svd") -> "MatrixConv2d":
        """Build from a dense ``nn.Conv2d`` (bias copied).

        ``init="svd"``: truncated SVD of the reshaped kernel ``(C_out, C_in k_h k_w)``, singular values
        split evenly (``A = U sqrt(S)``, ``B = V sqrt(S)``); exact at full rank. ``init="random"``:
        default random init, only the bias is taken from ``conv``.
        """
        conv = cls._check_dense_conv(conv)
        _check_rank(rank)
        _check_init(init)
        layer = cls(rank=rank, **cls._geometry_kwargs(conv))
        _copy_bias(layer.bias, conv.bias)
        if init == "svd":
            a, b = _truncated_svd_factors(conv.weight.reshape(conv.out_channels, -1), rank)
            with torch.no_grad():
                layer.A.copy_(a.to(layer.A.dtype))
                layer.B.copy_(b.to(layer.B.dtype))
        return layer


# ----------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------


class MatrixLinear(nn.Module):
    """Linear layer with a rank-``R`` weight ``W = A @ B^T``, ``A (out, R)``, ``B (in, R)``.

    ``forward``: ``(..., in) -> (..., out)`` as ``(x @ B) @ A^T + bias``. ``1 <= R <= min(out, in)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(in_features, "in_features")
        _check_rank(out_features, "out_features")
        _check_rank(rank)
        if rank > min(in_features, out_features):
            raise ValueError(f"`rank` must be <= min(out_features, in_features) = "
                             f"{min(in_features, out_features)}, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        fk = dict(device=device, dtype=dtype)
        self.A = nn.Parameter(torch.empty(out_features, rank, **fk))
        self.B = nn.Parameter(torch.empty(in_features, rank, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init matching the variance of PyTorch's default linear init (see module docstring)."""
        std = _default_std(self.in_features, self.rank, n_factors=2)
        nn.init.normal_(self.A, 0.0, std)
        nn.init.normal_(self.B, 0.0, std)
        _init_bias(self.bias, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """Reconstructed dense weight ``(out, in)`` (differentiable)."""
        return self.A @ self.B.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B.T), self.A, self.bias)

    def dense_parameter_count(self) -> int:
        """Parameters of the equivalent dense ``nn.Linear`` (weight + bias)."""
        return self.out_features * self.in_features + (self.out_features if self.bias is not None else 0)

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int, init: Init = "svd") -> "MatrixLinear":
        """Build from a dense ``nn.Linear`` (bias copied); ``init`` as in :meth:`MatrixConv2d.from_dense`."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        _check_rank(rank)
        _check_init(init)
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        _copy_bias(layer.bias, linear.bias)
        if init == "svd":
            a, b = _truncated_svd_factors(linear.weight, rank)
            with torch.no_grad():
                layer.A.copy_(a.to(layer.A.dtype))
                layer.B.copy_(b.to(layer.B.dtype))
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


#: CP "linear" layer. The CP decomposition of a matrix (an order-2 tensor) *is* a rank-``R`` matrix
#: factorisation ``W = sum_k a_k b_k^T = A B^T``, so this is the same class as :class:`MatrixLinear`.
CPLinear = MatrixLinear


# ----------------------------------------------------------------------------------------------
# Model-level utilities
# ----------------------------------------------------------------------------------------------


def _dense_dims(layer: nn.Module) -> tuple[int, int, int, int]:
    """``(C_out, C_in, k_h, k_w)`` of a dense conv, ``(out, in, 1, 1)`` of a linear layer."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"only groups=1 convolutions can be factorized, got groups={layer.groups}")
        return (layer.out_channels, layer.in_channels, *layer.kernel_size)
    if isinstance(layer, nn.Linear):
        return (layer.out_features, layer.in_features, 1, 1)
    raise TypeError(f"expected an nn.Conv2d or nn.Linear, got {type(layer).__name__}")


def _cost_per_rank(layer: nn.Module, method: str) -> tuple[int, int | None]:
    """Weight parameters per unit of rank, and the largest allowed rank (None: unbounded)."""
    o, c, kh, kw = _dense_dims(layer)
    if method == "cp" and isinstance(layer, nn.Conv2d):
        return o + c + kh + kw, None
    # Matrix layers, and CPLinear (which is MatrixLinear).
    return o + c * kh * kw, min(o, c * kh * kw)


def rank_for_parameter_budget(layer_dense: nn.Conv2d | nn.Linear, method: Method, params: int) -> int:
    """Largest rank whose factorized version of ``layer_dense`` has at most ``params`` weight parameters.

    Weight parameters are ``R (C_out + C_in k_h k_w)`` for matrix convs and linear layers (either
    method) and ``R (C_out + C_in + k_h + k_w)`` for CP convs; biases are not counted. For the matrix
    layers the result is capped at full rank ``min(C_out, C_in k_h k_w)`` (higher ranks are not
    allowed there).

    Raises
    ------
    ValueError
        If ``method`` is unknown or ``params`` does not even allow rank 1.
    """
    _check_method(method)
    cost, cap = _cost_per_rank(layer_dense, method)
    if isinstance(params, bool) or not isinstance(params, int) or params < cost:
        raise ValueError(f"`params` must be an int >= {cost} (the cost of rank 1), got {params!r}")
    rank = params // cost
    return rank if cap is None else min(rank, cap)


def _resolve_rank(layer: nn.Module, method: str, rank: int | None, rank_fraction: float | None) -> int:
    o, c, kh, kw = _dense_dims(layer)
    _, cap = _cost_per_rank(layer, method)
    if rank is not None:
        return rank if cap is None else min(rank, cap)
    # Fraction of min(C_out, C_in k_h k_w) for matrix layers, of C_out for CP convs.
    ref = cap if cap is not None else o
    return max(1, round(rank_fraction * ref))


def factorize_model(
    model: nn.Module,
    method: Method,
    rank: int | None = None,
    rank_fraction: float | None = None,
    include_linear: bool = False,
    exclude: Iterable[str] = (),
    init: Init = "svd",
) -> nn.Module:
    """Replace the dense layers of ``model`` by factorized ones, in place, keeping module names.

    Every module of exact type ``nn.Conv2d`` with ``groups == 1`` (and of exact type ``nn.Linear`` if
    ``include_linear``) is replaced by ``CPConv2d``/``MatrixConv2d`` (``CPLinear``/``MatrixLinear``)
    built with ``from_dense(layer, rank, init)``. Grouped/depthwise convs and subclasses (which may
    override ``forward``) are left dense.

    Parameters
    ----------
    model
        The model; modified in place (if ``model`` itself is a dense layer, the replacement is returned).
    method
        ``"cp"`` or ``"matrix"``.
    rank, rank_fraction
        Exactly one. ``rank``: the same int for every layer (capped at full rank for matrix layers).
        ``rank_fraction`` in ``(0, 1]``: ``max(1, round(f * ref))`` per layer, with ``ref =
        min(C_out, C_in k_h k_w)`` for matrix layers (and all linear layers) and ``C_out`` for CP convs.
    include_linear
        Also factorize ``nn.Linear`` layers.
    exclude
        Qualified module names (as in ``model.named_modules()``) to leave dense.
    init
        ``"svd"`` (decompose the current weights) or ``"random"`` (fresh init, biases copied).

    Returns
    -------
    nn.Module
        ``model``.
    """
    _check_method(method)
    _check_init(init)
    if (rank is None) == (rank_fraction is None):
        raise ValueError("give exactly one of `rank` and `rank_fraction`")
    if rank is not None:
        _check_rank(rank)
    else:
        if isinstance(rank_fraction, bool) or not isinstance(rank_fraction, (int, float)) or not (
            0.0 < rank_fraction <= 1.0
        ):
            raise ValueError(f"`rank_fraction` must be a number in (0, 1], got {rank_fraction!r}")
    if isinstance(exclude, str):  # a single name would otherwise be iterated character by character
        exclude = (exclude,)
    exclude = set(exclude)
    names = {name for name, _ in model.named_modules()}
    unknown = sorted(exclude - names)
    if unknown:
        raise ValueError(f"`exclude` names not found in the model: {unknown}")

    conv_cls = CPConv2d if method == "cp" else MatrixConv2d
    linear_cls = CPLinear if method == "cp" else MatrixLinear
    # Snapshot first: replacing while iterating named_modules() would mutate the traversal.
    targets = []
    for name, module in model.named_modules():
        if name in exclude:
            continue
        if type(module) is nn.Conv2d and module.groups == 1:
            targets.append((name, module, conv_cls))
        elif include_linear and type(module) is nn.Linear:
            targets.append((name, module, linear_cls))

    for name, module, cls in targets:
        r = _resolve_rank(module, method, rank, rank_fraction)
        new = cls.from_dense(module, r, init=init)
        new.train(module.training)
        if name == "":
            return new
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model
