"""Tucker-factorized layers: :class:`TuckerConv2d` and :class:`TuckerLinear`.

Each layer holds ONE ``geoopt.ManifoldParameter`` named ``tucker_weight``: its data is the packed point
``[vec(C), vec(U_1), ..., vec(U_d)]`` and its ``manifold`` a :class:`FixedRankTucker`. The same layer
then trains with plain ``torch.optim`` (vanilla factor-SGD), with geoopt's Riemannian optimizers, or
with the rank-adaptive ``TDLRT``, which swaps the parameter's data and manifold when ranks change (the
Parameter object stays the same). The forward therefore reads the ranks from
``self.tucker_weight.manifold`` every call.

Rank bounds are declared on the parameter (``tucker_weight.bounds``, a
:class:`~tucker_manifold.parameter.RankBounds`), so that an optimizer that only sees parameters reads
them; everything that passes between the layers and the optimizers is in :mod:`tucker_manifold.parameter`.

Checkpoints: a persistent int64 buffer ``tucker_ranks`` records the ranks in the state dict. It is written
by a state-dict pre-hook (and by :meth:`TuckerLayer.set_point`): an optimizer that replaces the point
through :func:`tucker_manifold.parameter.set_point` needs no callback into the layer. Loading a state dict
whose ranks differ first resizes the layer (same Parameter object, a load pre-hook), then loads;
``load_state_dict(assign=True)`` gets its Tucker parameter back from a load post-hook. Read
:attr:`TuckerLayer.ranks` for the current ranks.

Random initialisation matches PyTorch's default ``kaiming_uniform_(a=sqrt(5))`` in variance
(``Var W = 1 / (3 fan_in)``): the factors are orthonormal, so ``||W||_F = ||C||_F`` and the core entries
are ``N(0, prod(n) / (3 fan_in prod(r)))``. Biases are ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..manifold import FixedRankTucker
from ..parameter import (
    RankBounds,
    TuckerParameter,
    factor_grads_wanted,
    make_tucker_parameter,
    record_io,
    set_point,
    tucker_manifold,
)
from ..tucker import check_multilinear_ranks, lower_to_multilinear_ranks, multi_mode_dot, reconstruct, truncated_hosvd
from .base import FactorizedConv2d, FactorizedLayer, FactorizedLinear, IntOrPair, Padding

__all__ = [
    "TuckerLayer",
    "TuckerConv2d",
    "TuckerLinear",
    "decaying_core",
    "valid_multilinear_ranks",
]

_FORWARD_MODES = ("auto", "factorized", "reconstructed")


# ------------------------------------------------------------------------------------ helpers
def _work_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """QR / SVD run in float32 or float64 even for half-precision layers."""
    dtype = dtype or torch.get_default_dtype()
    return torch.float64 if dtype == torch.float64 else torch.float32


def _random_orthonormal(n: int, r: int, dtype, device, generator=None) -> torch.Tensor:
    """Haar-distributed ``(n, r)`` matrix with orthonormal columns (QR of a Gaussian, sign-fixed)."""
    a = torch.randn(n, r, dtype=dtype, device=device, generator=generator)
    q, rr = torch.linalg.qr(a)
    sign = torch.sign(torch.diagonal(rr))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign


def valid_multilinear_ranks(shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """Clamp ``ranks`` to ``[1, n_i]`` and lower entries until ``r_i <= prod_{j != i} r_j`` (only ever
    decreases), e.g. ``(64, 3, 3, 3) -> (27, 3, 3, 3)`` for a ``3 -> 64`` 3x3 conv."""
    r = lower_to_multilinear_ranks([max(1, min(int(a), int(n))) for a, n in zip(ranks, shape)])
    return tuple(r)


def _resolve_bounds(
    shape: Sequence[int],
    default_adaptive: Sequence[bool],
    rank_min: Optional[IntOrPair],
    rank_max: Optional[IntOrPair],
    adaptive_modes: Optional[Sequence[bool]],
) -> RankBounds:
    """Per-mode bounds from a layer's ``rank_min``, ``rank_max`` and ``adaptive_modes`` arguments.

    An int bound applies to the adaptive modes (clamped to ``n_i``); non-adaptive modes keep
    ``[1, n_i]``. A sequence gives one bound per mode and must satisfy ``1 <= min <= max <= n_i``.
    """
    d = len(shape)
    if adaptive_modes is None:
        adaptive = tuple(bool(a) for a in default_adaptive)
    else:
        adaptive = tuple(bool(a) for a in adaptive_modes)
        if len(adaptive) != d:
            raise ValueError(f"adaptive_modes must have {d} entries (one per mode), got {adaptive_modes!r}")

    def per_mode(v, name, default):
        if v is None:
            return tuple(default)
        if isinstance(v, bool):
            raise ValueError(f"{name} must be an int or a sequence of ints, got {v!r}")
        if isinstance(v, int):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
            return tuple(min(v, n) if a else dflt for a, n, dflt in zip(adaptive, shape, default))
        t = tuple(int(a) for a in v)
        if len(t) != d:
            raise ValueError(f"{name} must have {d} entries (one per mode), got {v!r}")
        return t

    rmin = per_mode(rank_min, "rank_min", [1] * d)
    rmax = per_mode(rank_max, "rank_max", list(shape))
    for i, (lo, hi, n) in enumerate(zip(rmin, rmax, shape)):
        if not 1 <= lo <= hi <= n:
            raise ValueError(
                f"rank bounds for mode {i} must satisfy 1 <= rank_min <= rank_max <= n_{i} = {n}, "
                f"got rank_min={lo}, rank_max={hi}"
            )
    return RankBounds(rmin, rmax, adaptive)


def _product_macs(ranks: Sequence[int], factors_shape: Sequence[Optional[tuple[int, int]]]) -> int:
    """Multiply-adds of ``core x_m U_m`` done in :func:`multi_mode_dot`'s order (``None``: skip mode)."""
    pairs = [(m, s) for m, s in enumerate(factors_shape) if s is not None]
    pairs.sort(key=lambda p: p[1][0] / max(p[1][1], 1))
    cur = list(ranks)
    macs = 0
    for m, (n, r) in pairs:
        cur[m] = n
        macs += math.prod(cur) * r
    return macs


def decaying_core(
    ranks: Sequence[int],
    q: float,
    scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """A core ``(r_1..r_d)`` whose every mode unfolding has singular values ~ ``scale * q**k``, ``k < r_i``.

    Construction: a sparse tensor ``D`` with ``R = max(r)`` entries ``D[p(k)] = scale * q**k``,
    ``p(k)_i = k mod r_i`` (for equal ranks this is the superdiagonal ``D[k, .., k]``), then
    ``C = D x_1 Q_1 ... x_d Q_d`` with Haar-random orthogonal ``Q_i`` (which keeps every spectrum).

    Why this gives the spectrum: if, in the mode-``i`` unfolding, no two entries share a column, its
    rows are orthogonal and row ``j`` has norm ``sqrt(sum_{p(k)_i = j} q^{2k})``. Columns are distinct
    for every mode except possibly a unique largest-rank mode ``i*``; there, entries whose other
    coordinates would collide are moved to the unused position with the smallest coordinates (small
    rows carry large terms, so the move perturbs them least). Row ``j`` always holds ``q**j`` (``j < r_i``,
    hence full rank ``r_i``) plus terms ``q**k`` with ``k >= r_i``: equal ranks give exactly ``q**k``,
    otherwise ``sigma_j = q**j (1 + O(q**2))`` and ``sigma_min / sigma_max ~ q**(r_i - 1)``.
    """
    ranks = check_multilinear_ranks(ranks, ranks, "ranks")
    if not (isinstance(q, (int, float)) and 0 < q <= 1):
        raise ValueError(f"q must be in (0, 1], got {q!r}")
    d = len(ranks)
    big = max(ranks)
    positions = [tuple(k % r for r in ranks) for k in range(big)]
    tops = [i for i, r in enumerate(ranks) if r == big]
    if len(tops) == 1:
        i_star = tops[0]
        others = [j for j in range(d) if j != i_star]
        used: set[tuple[int, ...]] = set()
        candidates = None
        for k, pos in enumerate(positions):
            key = tuple(pos[j] for j in others)
            if key in used:
                if candidates is None:
                    candidates = sorted(itertools.product(*[range(ranks[j]) for j in others]), key=lambda t: (sum(t), t))
                key = next(c for c in candidates if c not in used)  # exists: r_i* <= prod of the others
                new = list(pos)
                for j, c in zip(others, key):
                    new[j] = c
                positions[k] = tuple(new)
            used.add(key)
    work = torch.float64
    core = torch.zeros(ranks, dtype=work)
    for k, pos in enumerate(positions):
        core[pos] = scale * q**k
    qs = [_random_orthonormal(r, r, work, None, generator) for r in ranks]
    core = multi_mode_dot(core, qs)
    return core.to(dtype or torch.get_default_dtype())


# ------------------------------------------------------------------------------------ state-dict hooks
# Module-level functions (not closures or bound methods), so that layers stay picklable and deepcopy-able.
def _record_ranks(module: "TuckerLayer", prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: the point may have been replaced since the buffer was last written."""
    module._write_ranks()


def _resize_to_saved_ranks(module: "TuckerLayer", state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Load pre-hook: resize ``tucker_weight`` (same Parameter object) to the saved ranks."""
    key = prefix + "tucker_ranks"
    p = module.tucker_weight
    saved = state_dict.get(key)
    if isinstance(saved, torch.Tensor):
        ranks = tuple(int(v) for v in saved.reshape(-1).tolist())
        if ranks != module.ranks:
            try:
                m = tucker_manifold(module.shape, ranks)
            except ValueError as e:
                error_msgs.append(f"{key}: cannot resize to the saved ranks {ranks}: {e}")
            else:
                set_point(p, *m.unpack(torch.zeros(m.packed_size, dtype=p.dtype, device=p.device)), manifold=m)
    # For the post-hook: load_state_dict(assign=True) replaces the parameter by a plain one.
    module.__dict__["_tucker_loading"] = (p.manifold, p.bounds)


def _keep_tucker_parameter(module: "TuckerLayer", incompatible_keys) -> None:
    """Load post-hook: give an assigned plain Parameter back its manifold and bounds; rewrite the buffer."""
    manifold, bounds = module.__dict__.pop("_tucker_loading")
    p = module._parameters["tucker_weight"]
    if not isinstance(p, TuckerParameter):
        module.tucker_weight = make_tucker_parameter(p.data, manifold, bounds, p.requires_grad)
    module._write_ranks()


# ------------------------------------------------------------------------------------ base layer
class TuckerLayer(FactorizedLayer):
    """Common machinery of the Tucker layers (one packed ``tucker_weight`` + optional ``bias``)."""

    tucker_weight: TuckerParameter

    # -- construction helpers
    def _init_tucker(self, ranks, rank_min, rank_max, adaptive_modes, forward_mode: str, bias: bool, dtype, device) -> None:
        """After the geometry is set: the parameter at a random point (:meth:`_default_point`) with its
        declared bounds, the ranks buffer, the state-dict hooks, the bias (PyTorch's default init)."""
        _check_forward_mode(forward_mode)
        self.forward_mode = forward_mode
        shape = self.shape
        bounds = _resolve_bounds(shape, self.default_adaptive(len(shape)), rank_min, rank_max, adaptive_modes)
        manifold = tucker_manifold(shape, self._resolve_ranks(shape, ranks))
        packed = self._default_point(manifold, dtype, device)
        self.tucker_weight = make_tucker_parameter(packed, manifold, bounds)
        self.register_buffer("tucker_ranks", torch.tensor(manifold.ranks, dtype=torch.int64, device=packed.device))
        self.register_state_dict_pre_hook(_record_ranks)
        self.register_load_state_dict_pre_hook(_resize_to_saved_ranks)
        self.register_load_state_dict_post_hook(_keep_tucker_parameter)
        self._make_bias(bias, dtype or torch.get_default_dtype(), device)
        self._reset_bias()

    def _default_point(self, manifold: FixedRankTucker, dtype, device, generator=None) -> torch.Tensor:
        """Orthonormal factors, Gaussian core with ``E||C||_F^2 = prod(n) / (3 fan_in)`` (PyTorch's default)."""
        work = _work_dtype(dtype)
        std = math.sqrt(math.prod(manifold.shape) / (3.0 * self.fan_in * math.prod(manifold.ranks)))
        core = torch.randn(manifold.ranks, dtype=work, device=device, generator=generator) * std
        factors = [_random_orthonormal(n, r, work, device, generator) for n, r in zip(manifold.shape, manifold.ranks)]
        return manifold.pack(core, factors).to(dtype or torch.get_default_dtype())

    @staticmethod
    def _resolve_ranks(shape: tuple[int, ...], ranks: IntOrPair) -> tuple[int, ...]:
        """An int ``r``: ``(r, r, n_3, .., n_d)`` lowered to a valid multilinear rank; a sequence must be valid."""
        if isinstance(ranks, bool):
            raise ValueError(f"ranks must be an int or {len(shape)} ints, got {ranks!r}")
        if isinstance(ranks, int):
            if ranks < 1:
                raise ValueError(f"ranks must be >= 1, got {ranks}")
            return valid_multilinear_ranks(shape, (ranks, ranks) + tuple(shape[2:]))
        return check_multilinear_ranks(shape, tuple(ranks), "ranks")

    @staticmethod
    def default_adaptive(order: int) -> tuple[bool, ...]:
        """The two channel modes adapt; spatial modes keep their rank."""
        return (True, True) + (False,) * (order - 2)

    # -- state
    @property
    def ranks(self) -> tuple[int, ...]:
        """Current multilinear ranks (read from the parameter's manifold)."""
        return self.tucker_weight.manifold.ranks

    @property
    def manifold(self) -> FixedRankTucker:
        return self.tucker_weight.manifold

    def core_and_factors(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``core (r_1..r_d)`` and ``factors [(n_i, r_i)]`` as views of the parameter (autograd flows)."""
        p = self.tucker_weight
        core, factors = p.manifold.unpack(p)
        if not factor_grads_wanted(p):
            # TDLRT's core pass needs only the core gradient: detaching the factors skips their
            # weight-gradient kernels in the backward pass.
            factors = [f.detach() for f in factors]
        return core, factors

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``C x_1 U_1 ... x_d U_d`` (``shape``), differentiable."""
        core, factors = self.core_and_factors()
        return reconstruct(core, factors)

    def set_point(self, packed: torch.Tensor, manifold: FixedRankTucker) -> None:
        """Replace the point and manifold in place (same Parameter object) through
        :func:`tucker_manifold.parameter.set_point`; ``packed`` is copied and cast to the parameter's
        dtype/device. The gradient is dropped (it belongs to the old coordinates)."""
        if not isinstance(manifold, FixedRankTucker):
            raise ValueError(f"manifold must be a FixedRankTucker, got {type(manifold).__name__}")
        if tuple(manifold.shape) != self.shape:
            raise ValueError(f"manifold shape {manifold.shape} does not match the layer's weight shape {self.shape}")
        if not isinstance(packed, torch.Tensor) or tuple(packed.shape) != (manifold.packed_size,):
            got = tuple(packed.shape) if isinstance(packed, torch.Tensor) else type(packed).__name__
            raise ValueError(f"packed must be a 1-D tensor of length {manifold.packed_size}, got {got}")
        set_point(self.tucker_weight, *manifold.unpack(packed.detach()), manifold=manifold)
        self._write_ranks()

    def _write_ranks(self) -> None:
        self.tucker_ranks.copy_(torch.tensor(self.ranks, dtype=torch.int64))

    # -- forward choice
    def forward_costs(self, input_shape: Optional[Sequence[int]] = None) -> dict[str, float]:
        raise NotImplementedError

    def chosen_forward(self, input_shape: Optional[Sequence[int]] = None) -> str:
        """``"factorized"`` or ``"reconstructed"``: ``forward_mode`` unless it is ``"auto"``, in which case
        the path with strictly fewer multiply-adds (:meth:`forward_costs`; ties go to the single dense
        product, which has less launch overhead). ``forward`` passes the input shape."""
        if self.forward_mode != "auto":
            return self.forward_mode
        c = self.forward_costs(input_shape)
        return "factorized" if c["factorized"] < c["reconstructed"] else "reconstructed"

    def _tucker_repr(self) -> str:
        mode = self.forward_mode if self.forward_mode != "auto" else f"auto:{self.chosen_forward()}"
        return f"shape={self.shape}, ranks={self.ranks}, forward_mode={mode}"

    # -- tensorly interop (tucker_manifold.nn.interop)
    def to_tensorly(self):
        """The weight as a ``tensorly.tucker_tensor.TuckerTensor`` ``(core, factors)``: detached torch
        copies, orthonormal factors; tensorly's backend is not touched."""
        from .interop import to_tensorly

        return to_tensorly(self)

    @classmethod
    def from_tensorly(cls, tucker_tensor, bias=True, **kwargs) -> "TuckerLayer":
        """A layer holding the tensor of a tensorly ``TuckerTensor`` (or ``(core, factors)``), its geometry
        from the tensor's shape; non-orthonormal factors are orthonormalized (QR, ``R`` absorbed into the
        core) and invalid ranks lowered exactly. ``kwargs``: the other constructor arguments (stride,
        padding, ...); ``bias``: True, False or a tensor. See :func:`tucker_manifold.nn.interop.from_tensorly`."""
        from .interop import from_tensorly

        return from_tensorly(cls, tucker_tensor, bias=bias, **kwargs)

    # -- initialisation
    def reinit_decaying(self, q: float, generator: Optional[torch.Generator] = None) -> None:
        """Re-initialise at the current ranks with a core from :func:`decaying_core` (singular values
        ~ ``q**k`` in every mode) scaled to the default-init norm ``sqrt(prod(n) / (3 fan_in))``, and
        Haar-random orthonormal factors. The bias is left as it is."""
        m = self.tucker_weight.manifold
        p = self.tucker_weight
        work = _work_dtype(p.dtype)
        core = decaying_core(m.ranks, q, generator=generator, dtype=work).to(p.device)
        target = math.sqrt(math.prod(m.shape) / (3.0 * self.fan_in))
        core = core * (target / torch.linalg.vector_norm(core))
        factors = [_random_orthonormal(n, r, work, None, generator).to(p.device) for n, r in zip(m.shape, m.ranks)]
        self.set_point(m.pack(core, factors), m)

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        ranks: Optional[IntOrPair] = None,
        tau: Optional[float] = None,
        rank_min: Optional[IntOrPair] = None,
        rank_max: Optional[IntOrPair] = None,
        adaptive_modes: Optional[Sequence[bool]] = None,
        forward_mode: str = "auto",
    ) -> "TuckerLayer":
        """Truncated HOSVD of ``module.weight`` to ``ranks`` (int: the channel modes) or by relative
        tolerance ``tau`` (``||sigma_{r+1:}|| <= tau ||W||_F`` per adaptive mode, non-adaptive modes full
        rank); neither given: the full (exact) multilinear rank. The bias (and ``requires_grad``) and the
        training mode are copied; dtype/device follow the module."""
        module = cls._check_dense(module)
        if ranks is not None and tau is not None:
            raise ValueError("give at most one of ranks= and tau=")
        _check_tau(tau)
        w = module.weight
        shape = tuple(w.shape)
        bounds = _resolve_bounds(shape, cls.default_adaptive(len(shape)), rank_min, rank_max, adaptive_modes)
        if tau is None:
            r = valid_multilinear_ranks(shape, shape) if ranks is None else cls._resolve_ranks(shape, ranks)
        else:
            r = None
        manifold, packed = cls._hosvd_point(w, r, tau, bounds)
        layer = cls(
            ranks=manifold.ranks, forward_mode=forward_mode, rank_min=bounds.rmin, rank_max=bounds.rmax,
            adaptive_modes=bounds.adaptive, **cls.dense_kwargs(module),
        )
        layer.set_point(packed, manifold)
        layer._copy_bias_from(module)
        layer.tucker_weight.requires_grad_(module.weight.requires_grad)
        return layer

    @staticmethod
    def _hosvd_point(
        weight: torch.Tensor, ranks: Optional[Sequence[int]], tau: Optional[float], bounds: RankBounds
    ) -> tuple[FixedRankTucker, torch.Tensor]:
        """Truncated HOSVD of a dense weight to ``ranks`` or by relative tolerance ``tau`` (non-adaptive
        modes keep full rank ``n_i``; adaptive ones stay in their bounds; then made a valid multilinear rank)."""
        shape = tuple(weight.shape)
        w = weight.detach().to(_work_dtype(weight.dtype))
        if tau is not None:
            lo = [a if ad else n for a, ad, n in zip(bounds.rmin, bounds.adaptive, shape)]
            hi = [b if ad else n for b, ad, n in zip(bounds.rmax, bounds.adaptive, shape)]
            core, factors, _ = truncated_hosvd(w, tau=tau, rmin=lo, rmax=hi)
            r = valid_multilinear_ranks(shape, [f.shape[1] for f in factors])
            if r != tuple(f.shape[1] for f in factors):
                factors = [f[:, :k] for f, k in zip(factors, r)]
                core = multi_mode_dot(w, factors, transpose=True)
        else:
            core, factors, _ = truncated_hosvd(w, ranks=ranks)
        m = tucker_manifold(shape, tuple(core.shape))
        return m, m.pack(core, factors).to(weight.dtype)


def _check_forward_mode(mode: str) -> None:
    if mode not in _FORWARD_MODES:
        raise ValueError(f"forward_mode must be one of {_FORWARD_MODES}, got {mode!r}")


def _check_tau(tau: Optional[float]) -> None:
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 <= tau < math.inf):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")


# ------------------------------------------------------------------------------------ conv
class TuckerConv2d(TuckerLayer, FactorizedConv2d):
    """2-D convolution whose kernel ``W (C_out, C_in, k_h, k_w)`` is kept in Tucker format
    ``C x_1 U_out x_2 U_in x_3 U_h x_4 U_w`` with ranks ``(r_out, r_in, r_h, r_w)``.

    Parameters
    ----------
    ranks : int or 4 ints
        An int ``r`` means ``(r, r, k_h, k_w)`` clamped to a valid multilinear rank; a 4-tuple must be valid
        (``r_i <= n_i``, ``r_i <= prod_{j != i} r_j``).
    padding : int, pair, ``"same"`` or ``"valid"`` (as ``nn.Conv2d``; ``"same"`` needs stride 1).
    groups, padding_mode : only ``1`` and ``"zeros"``.
    forward_mode : ``"auto"``, ``"factorized"`` or ``"reconstructed"``; see :meth:`chosen_forward`.
    rank_min, rank_max, adaptive_modes : rank bounds declared on ``tucker_weight.bounds`` (defaults: ``1``,
        ``n_i``, channel modes adaptive and spatial modes fixed). Int bounds apply to the adaptive modes.

    Input ``(B, C_in, H, W)`` or ``(C_in, H, W)``; output ``(B, C_out, H_out, W_out)`` as ``nn.Conv2d``.
    """

    padding_modes = ("zeros",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        ranks: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        bias: bool = True,
        groups: int = 1,
        padding_mode: str = "zeros",
        forward_mode: str = "auto",
        rank_min: Optional[IntOrPair] = None,
        rank_max: Optional[IntOrPair] = None,
        adaptive_modes: Optional[Sequence[bool]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._setup_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        self._init_tucker(ranks, rank_min, rank_max, adaptive_modes, forward_mode, bias, dtype, device)

    # -- forward
    def forward_costs(self, input_shape: Optional[Sequence[int]] = None) -> dict[str, float]:
        """Multiply-adds per output pixel of the two forward paths.

        factorized: ``C_in r_in s_h s_w + r_in r_out k_h k_w + r_out C_out`` (the first 1x1 conv runs on
        the input pixels, ``s_h s_w`` per output pixel); reconstructed: ``C_in C_out k_h k_w``. With an
        ``input_shape`` the cost of building each path's kernel (``core x_m U_m`` products) is added,
        amortised over the ``B H_out W_out`` output pixels; without one it is ignored.
        """
        c_out, c_in, kh, kw = self.shape
        r_out, r_in, r_h, r_w = self.ranks
        sh, sw = self.stride
        fact = c_in * r_in * sh * sw + r_in * r_out * kh * kw + r_out * c_out
        recon = c_in * c_out * kh * kw
        if input_shape is not None:
            input_shape = tuple(input_shape)
            batch = input_shape[0] if len(input_shape) == 4 else 1
            ho, wo = self.conv_args.output_hw(input_shape[-2], input_shape[-1])
            pixels = max(batch * ho * wo, 1)
            fact += _product_macs(self.ranks, [None, None, (kh, r_h), (kw, r_w)]) / pixels
            recon += _product_macs(self.ranks, [(c_out, r_out), (c_in, r_in), (kh, r_h), (kw, r_w)]) / pixels
        return {"factorized": fact, "reconstructed": recon}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One-pass TDLRT: records (x, dL/dy) when an optimizer asks for it; otherwise one context read.
        return record_io(self.tucker_weight, self, x, self._forward(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        core, (u_out, u_in, u_h, u_w) = self.core_and_factors()
        if self.chosen_forward(x.shape) == "reconstructed":
            kernel = reconstruct(core, [u_out, u_in, u_h, u_w])
            return F.conv2d(x, kernel, self.bias, self.stride, self.padding, self.dilation)
        # 1x1 (C_in -> r_in), small conv (r_in -> r_out) with the layer's geometry, 1x1 (r_out -> C_out).
        # Zero padding commutes with a bias-free 1x1 conv, so this equals the dense conv exactly.
        small = multi_mode_dot(core, [None, None, u_h, u_w])
        h = F.conv2d(x, u_in.transpose(0, 1)[:, :, None, None])
        h = F.conv2d(h, small, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, u_out[:, :, None, None], self.bias)

    def extra_repr(self) -> str:
        return f"{self._conv_repr()}, {self._tucker_repr()}"


# ------------------------------------------------------------------------------------ linear
class TuckerLinear(TuckerLayer, FactorizedLinear):
    """Linear layer with ``W (out, in) = U_out C U_in^T`` (the order-2 Tucker case: an SVD-like
    factorization; a valid multilinear rank has ``r_out = r_in``).

    ``ranks``: an int ``r`` (clamped to ``min(r, in, out)``) or a pair ``(r_out, r_in)``. Both modes adapt by
    default. Input ``(*, in)``, output ``(*, out)`` as ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: IntOrPair,
        bias: bool = True,
        forward_mode: str = "auto",
        rank_min: Optional[IntOrPair] = None,
        rank_max: Optional[IntOrPair] = None,
        adaptive_modes: Optional[Sequence[bool]] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._setup_linear(in_features, out_features)
        self._init_tucker(ranks, rank_min, rank_max, adaptive_modes, forward_mode, bias, dtype, device)

    def forward_costs(self, input_shape: Optional[Sequence[int]] = None) -> dict[str, float]:
        """Multiply-adds per input row: factorized ``in r_in + r_in r_out + r_out out``, reconstructed
        ``in out``; with an ``input_shape`` the cost of building ``W`` (``out r_out r_in + out r_in in``) is
        added to the latter, amortised over the ``prod(input_shape[:-1])`` rows."""
        n_out, n_in = self.shape
        r_out, r_in = self.ranks
        fact = n_in * r_in + r_in * r_out + r_out * n_out
        recon = n_in * n_out
        if input_shape is not None:
            rows = max(math.prod(tuple(input_shape)[:-1]), 1)
            recon += (n_out * r_out * r_in + n_out * r_in * n_in) / rows
        return {"factorized": fact, "reconstructed": recon}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return record_io(self.tucker_weight, self, x, self._forward(x))  # see TuckerConv2d.forward

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        core, (u_out, u_in) = self.core_and_factors()
        if self.chosen_forward(x.shape) == "reconstructed":
            return F.linear(x, u_out @ core @ u_in.transpose(0, 1), self.bias)
        h = F.linear(x, u_in.transpose(0, 1))  # x U_in
        h = F.linear(h, core)  # x U_in C^T
        return F.linear(h, u_out, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self._tucker_repr()}"
