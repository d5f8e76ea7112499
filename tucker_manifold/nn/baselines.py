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

import logging
import warnings
from typing import ClassVar, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..tucker import tensorly_pytorch
from .base import FactorizedConv2d, FactorizedLayer, FactorizedLinear, IntOrPair, Padding, UnsupportedModuleError
from .replace import ConversionSummary, Selection, replace_modules

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
logger = logging.getLogger(__name__)


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


def _truncated_svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix (m, n) ~= A @ B^T`` with ``A = U sqrt(S)`` ``(m, rank)``, ``B = V sqrt(S)`` ``(n, rank)``."""
    # float64 so that the full-rank factorisation reproduces float32 weights to rounding.
    u, s, vh = torch.linalg.svd(matrix.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


class _RankR(FactorizedLayer):
    """Shared by the rank-``R`` baselines: factor matrices ``(rows, R)`` named by ``factor_names``,
    ``ranks = (R,)``, the default-variance init (module docstring)."""

    rank: int
    factor_names: ClassVar[tuple[str, ...]] = ()
    #: cap ``R`` at the full rank ``min(shape[0], fan_in)`` of the weight matrix (matrix layers)
    capped: ClassVar[bool] = True

    def _factor_rows(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _init_factors(self, rank: int, bias: bool, dtype, device) -> None:
        self.rank = _check_rank(rank)
        full = min(self.shape[0], self.fan_in)
        if self.capped and rank > full:
            # Extra rank-one terms beyond full rank add parameters but no expressiveness.
            raise ValueError(f"`rank` must be <= {full}, the full rank of the {self.shape[0]} x {self.fan_in} weight matrix, got {rank}")
        for name, rows in zip(self.factor_names, self._factor_rows()):
            setattr(self, name, nn.Parameter(torch.empty(rows, rank, device=device, dtype=dtype)))
        self._make_bias(bias, dtype, device)
        self.reset_parameters()

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.rank,)

    @property
    def factors(self) -> tuple[torch.Tensor, ...]:
        """The factor matrices, each ``(rows, R)``."""
        return tuple(getattr(self, n) for n in self.factor_names)

    def reset_parameters(self) -> None:
        """Random init matching the variance of PyTorch's default init (see module docstring)."""
        factors = self.factors
        std = _default_std(self.fan_in, self.rank, n_factors=len(factors))
        for f in factors:
            nn.init.normal_(f, 0.0, std)
        self._reset_bias()


class _RankRConv2d(_RankR, FactorizedConv2d):
    """A rank-``R`` conv (CP or matrix): ``nn.Conv2d``'s arguments (``groups`` must be 1) plus ``rank``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        rank: int,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self._setup_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_factors(rank, bias, dtype, device)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, rank={self.rank}"


def _randomly_like(cls, module: nn.Module, rank: int, init: str):
    """A rank-``rank`` layer of class ``cls`` with ``module``'s geometry, random factors and its bias."""
    module = cls._check_dense(module)
    _check_rank(rank)
    _check_init(init)
    layer = cls(rank=rank, **cls.dense_kwargs(module))
    layer._copy_bias_from(module)
    return layer


def _matrix_from_dense(cls, module: nn.Module, rank: int, init: str):
    """A matrix layer from ``module``: truncated SVD of ``weight.reshape(C_out, -1)`` (or random init)."""
    layer = _randomly_like(cls, module, rank, init)
    if init == "svd":
        a, b = _truncated_svd_factors(module.weight.reshape(module.weight.shape[0], -1), rank)
        with torch.no_grad():
            layer.A.copy_(a.to(layer.A.dtype))
            layer.B.copy_(b.to(layer.B.dtype))
    return layer


# ----------------------------------------------------------------------------------------------
# CP convolution
# ----------------------------------------------------------------------------------------------


class CPConv2d(_RankRConv2d):
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

    factor_names = ("A", "B", "H", "V")
    capped = False

    def _factor_rows(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels) + tuple(self.kernel_size)

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
        layer = _randomly_like(cls, conv, rank, init)
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


class MatrixConv2d(_RankRConv2d):
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

    factor_names = ("A", "B")

    def _factor_rows(self) -> tuple[int, ...]:
        return (self.out_channels, self.fan_in)

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
        return _matrix_from_dense(cls, conv, rank, init)


# ----------------------------------------------------------------------------------------------
# Linear
# ----------------------------------------------------------------------------------------------


class MatrixLinear(_RankR, FactorizedLinear):
    """Linear layer with a rank-``R`` weight ``W = A @ B^T``, ``A (out, R)``, ``B (in, R)``.

    ``forward``: ``(..., in) -> (..., out)`` as ``(x @ B) @ A^T + bias``. ``1 <= R <= min(out, in)``.
    """

    factor_names = ("A", "B")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self._setup_linear(in_features, out_features)
        self._init_factors(rank, bias, dtype, device)

    def _factor_rows(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """Reconstructed dense weight ``(out, in)`` (differentiable)."""
        return self.A @ self.B.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B.T), self.A, self.bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, rank: int, init: Init = "svd") -> "MatrixLinear":
        """Build from a dense ``nn.Linear`` (bias copied); ``init`` as in :meth:`MatrixConv2d.from_dense`."""
        return _matrix_from_dense(cls, linear, rank, init)

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
    raise UnsupportedModuleError(f"layer_dense must be an nn.Conv2d or nn.Linear, got {type(layer).__name__}")


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
    rank: Optional[int] = None,
    rank_fraction: Optional[float] = None,
    include_linear: bool = False,
    exclude: Selection = (),
    init: Init = "svd",
    include: Selection = None,
    return_summary: bool = False,
) -> Union[nn.Module, tuple[nn.Module, ConversionSummary]]:
    """Replace the dense layers of ``model`` by factorized ones, in place, keeping module names.

    Every module of exact type ``nn.Conv2d`` with ``groups == 1`` (and of exact type ``nn.Linear`` if
    ``include_linear``) is replaced by ``CPConv2d``/``MatrixConv2d`` (``CPLinear``/``MatrixLinear``)
    built with ``from_dense(layer, rank, init)``. Grouped/depthwise convs and subclasses (which may
    override ``forward``) are left dense. Modules are selected exactly as by ``tuckerize`` (the shared
    engine :mod:`tucker_manifold.nn.replace`).

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
    exclude, include
        Qualified module names (each also selects everything below it), compiled regular expressions or
        module classes to leave dense / to restrict the conversion to; exclude wins.
    init
        ``"svd"`` (decompose the current weights) or ``"random"`` (fresh init, biases copied).
    return_summary
        Also return the :class:`~tucker_manifold.nn.replace.ConversionSummary` (converted modules,
        skipped ones with the reason); it is logged at INFO level either way.

    Returns
    -------
    nn.Module
        ``model`` (or ``(model, summary)``).
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
    targets: dict[type, type] = {nn.Conv2d: CPConv2d if method == "cp" else MatrixConv2d}
    hints = {}
    if include_linear:
        targets[nn.Linear] = CPLinear if method == "cp" else MatrixLinear
    else:
        hints[nn.Linear] = "nn.Linear is factorized only with include_linear=True"

    def build(cls, module: nn.Module) -> nn.Module:
        return cls.from_dense(module, _resolve_rank(module, method, rank, rank_fraction), init=init)

    root, summary = replace_modules(model, targets, build, include=include, exclude=exclude or None, hints=hints)
    logger.info("factorize_model: %s", summary)
    return (root, summary) if return_summary else root
