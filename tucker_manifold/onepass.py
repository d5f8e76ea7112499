"""One backward pass per TDLRT step: layer-local augmented-core gradients and the parallel masking.

TDLRT's second pass runs at the lifted point ``(C^, U^)``, where (the lift being exact) every layer
computes the same function as at ``(C, U)``: every activation and every gradient with respect to a
layer's output is the same in both passes. Only a Tucker layer's own parameter gradient differs, and
it is local to the layer (docs/one_pass.md §1-2):

    dL/dC^ = dL/dW x_j U^_j^T,

formed here from the layer's saved input ``x`` and its output gradient ``gy`` (captured in the first
and only pass by :func:`tucker_manifold.parameter.record_layer_io`) and the augmented bases ``U^``.
With it, one forward and one backward give the two-pass TDLRT iterates to rounding.

The parallel (Riemannian) step of the same group (Ceruti-Kusch-Lubich-Sulz) masks that gradient
(:func:`parallel_core_gradient`); before truncation it equals ``Y - h P(Y) grad L`` written in the
augmented bases, provided the augmented bases are NOT trimmed to a valid multilinear rank (the
lifted core is only a tensor here; :func:`tucker_manifold.flow.truncate_core` restores validity).

Shapes: ``W (n_1..n_d)``, core ``(r_1..r_d)``, augmented factors ``U^_i (n_i, r^_i)`` with the old
``U_i`` as leading columns. Linear: ``W (out, in)``, ``x (*, in)``, ``gy (*, out)``. Conv2d:
``W (C_out, C_in, k_h, k_w)``, ``x (B, C_in, H, W)`` or ``(C_in, H, W)``, ``gy (B, C_out, H_o, W_o)``.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .tucker import fold, multi_mode_dot, unfold

__all__ = [
    "parallel_core_gradient",
    "dense_core_gradient",
    "linear_core_gradient",
    "linear_core_gradient_costs",
    "conv2d_core_gradient",
    "conv2d_core_gradient_costs",
    "layer_core_gradient",
    "augmented_core_gradient",
    "core_gradient_mismatch",
]

Padding = Union[int, Sequence[int], str]
_FORMULAS = ("auto", "factorized", "dense")


# ----------------------------------------------------------------------------------- parallel step
def parallel_core_gradient(
    g_aug: torch.Tensor, core: torch.Tensor, old_ranks: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """The parallel BUG masking of an augmented-core gradient.

    ``g_aug (r^_1..r^_d)`` is ``dL/dC^`` at the lifted point, ``core (r_1..r_d)`` the old core
    (``old_ranks`` defaults to ``core.shape``; ``r_i <= r^_i``, old directions leading). Block ``B_S``
    uses the new columns in the modes of ``S`` and the old ones elsewhere. Returned, same shape:

    * ``B_{}`` kept (it is ``grad_C L``, the Galerkin gradient);
    * ``B_{i}``: ``Mat_i(B_{i}) Q_i Q_i^T``, ``Q_i`` from ``Mat_i(C)^T = Q_i R_i``: the projection onto
      the row space of ``Mat_i(C)``;
    * ``B_S``, ``|S| >= 2``: zero.

    Then ``C^ - h * out`` in the bases ``U^`` is ``Y - h P(Y) grad L`` (no inverse anywhere). Each
    block is an orthogonal projection of the matching block of ``g_aug``, so ``||out|| <= ||g_aug||``
    whatever the conditioning of ``C``. For a rank-deficient ``Mat_i(C)``, ``Q_i`` spans the row space
    plus arbitrary directions (the tangent space is not defined there). QR runs in float32 / float64.
    """
    if not isinstance(g_aug, torch.Tensor) or not isinstance(core, torch.Tensor):
        raise ValueError("g_aug and core must be tensors")
    d = core.ndim
    ranks = tuple(core.shape) if old_ranks is None else tuple(int(r) for r in old_ranks)
    if ranks != tuple(core.shape):
        raise ValueError(f"old_ranks {ranks} must equal core.shape {tuple(core.shape)}")
    if g_aug.ndim != d or any(a < r for a, r in zip(g_aug.shape, ranks)):
        raise ValueError(f"g_aug must have {d} modes of sizes >= {ranks}, got shape {tuple(g_aug.shape)}")
    la = torch.float64 if g_aug.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(g_aug)
    old = tuple(slice(0, r) for r in ranks)
    out[old] = g_aug[old]
    for i in range(d):
        if g_aug.shape[i] == ranks[i]:
            continue
        sl = list(old)
        sl[i] = slice(ranks[i], None)
        sl = tuple(sl)
        block = g_aug[sl]
        q = torch.linalg.qr(unfold(core.to(la), i).transpose(0, 1)).Q  # (prod_{j!=i} r_j, r_i)
        b = unfold(block.to(la), i)
        out[sl] = fold((b @ q) @ q.transpose(0, 1), i, block.shape).to(g_aug.dtype)
    return out


# ----------------------------------------------------------------------------------- local gradients
def dense_core_gradient(dense_grad: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``dL/dW x_j U^_j^T`` from a dense gradient ``(n_1..n_d)``: ``(r^_1..r^_d)``. The fallback for a
    parameter whose reconstruction ``W`` was recorded (``layer=None``)."""
    return multi_mode_dot(dense_grad, list(factors), transpose=True)


def _check_formula(formula: str) -> None:
    if formula not in _FORMULAS:
        raise ValueError(f"formula must be one of {_FORMULAS}, got {formula!r}")


def _dense_projection_macs(shape: Sequence[int], factors_shape: Sequence[Optional[tuple[int, int]]]) -> int:
    """Multiply-adds of ``T x_j U_j^T`` (``U_j (n_j, r_j)``, ``None``: mode skipped) in
    :func:`multi_mode_dot`'s order (shrinking modes first)."""
    modes = [m for m in range(len(shape)) if factors_shape[m] is not None]
    order = sorted(modes, key=lambda m: factors_shape[m][1] / max(factors_shape[m][0], 1))
    cur, macs = list(shape), 0
    for m in order:
        n, r = factors_shape[m]
        macs += math.prod(cur) * r  # (.., n, ..) -> (.., r, ..): prod(cur) / n * n * r
        cur[m] = r
    return macs


def linear_core_gradient_costs(rows: int, n_out: int, n_in: int, r_out: int, r_in: int) -> dict[str, int]:
    """Multiply-adds of the two formulas of :func:`linear_core_gradient` for ``rows`` input rows:
    factorized ``rows (out r_out + in r_in + r_out r_in)``; dense ``rows out in`` plus the projection
    of the ``(out, in)`` gradient."""
    fact = rows * (n_out * r_out + n_in * r_in + r_out * r_in)
    dense = rows * n_out * n_in + _dense_projection_macs((n_out, n_in), ((n_out, r_out), (n_in, r_in)))
    return {"factorized": fact, "dense": dense}


def linear_core_gradient(
    x: torch.Tensor, gy: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor, formula: str = "auto"
) -> torch.Tensor:
    """Core gradient ``U_out^T (gy^T x) U_in`` ``(r_out, r_in)`` of ``y = x W^T``, ``W = U_out C U_in^T``,
    at any bases ``u_out (out, r_out)``, ``u_in (in, r_in)``, summed over the rows of ``x (*, in)`` and
    ``gy (*, out)``. ``formula``: ``"factorized"`` ``(gy U_out)^T (x U_in)``, ``"dense"`` (form
    ``gy^T x``, then project) or ``"auto"`` (fewer multiply-adds, :func:`linear_core_gradient_costs`)."""
    _check_formula(formula)
    n_out, r_out = u_out.shape
    n_in, r_in = u_in.shape
    if x.shape[-1] != n_in or gy.shape[-1] != n_out or x.shape[:-1] != gy.shape[:-1]:
        raise ValueError(f"x (*, {n_in}) and gy (*, {n_out}) must share leading dims, got {tuple(x.shape)}, {tuple(gy.shape)}")
    x2, g2 = x.reshape(-1, n_in), gy.reshape(-1, n_out)
    if formula == "auto":
        c = linear_core_gradient_costs(x2.shape[0], n_out, n_in, r_out, r_in)
        formula = "factorized" if c["factorized"] <= c["dense"] else "dense"
    if formula == "factorized":
        return (g2 @ u_out).transpose(0, 1) @ (x2 @ u_in)
    return dense_core_gradient(g2.transpose(0, 1) @ x2, [u_out, u_in])


def _explicit_padding(padding: Padding, kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """``(left_w, right_w, top_h, bottom_h)`` as ``nn.Conv2d`` pads (``"same"`` puts the odd pixel at the end)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads: list[int] = []
        for d, k in zip(reversed(tuple(dilation)), reversed(tuple(kernel_size))):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return (pw, pw, ph, ph)


def _pair(v: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(int(a) for a in v)
    if len(t) != 2 or min(t) < 1:
        raise ValueError(f"{name} must be a positive int or pair, got {v!r}")
    return t  # type: ignore[return-value]


def conv2d_core_gradient_costs(
    x_shape: Sequence[int], gy_shape: Sequence[int], shape: Sequence[int], ranks: Sequence[int]
) -> dict[str, int]:
    """Multiply-adds of the two formulas of :func:`conv2d_core_gradient`, for ``x (B, C_in, H, W)``,
    ``gy (B, C_out, H_o, W_o)``, weight ``shape (C_out, C_in, k_h, k_w)`` and augmented ``ranks``:

    * factorized: ``B H W C_in r_in`` (project ``x``) + ``B H_o W_o C_out r_out`` (project ``gy``) +
      ``B H_o W_o r_out r_in k_h k_w`` (weight gradient of the small conv) + the spatial projection;
    * dense: ``B H_o W_o C_out C_in k_h k_w`` (weight gradient of the dense conv) + its projection.
    """
    b, c_in, h, w = x_shape
    _, c_out, ho, wo = gy_shape
    _, _, kh, kw = shape
    r_out, r_in, r_h, r_w = ranks
    pix_in, pix_out = b * h * w, b * ho * wo
    fact = pix_in * c_in * r_in + pix_out * c_out * r_out + pix_out * r_out * r_in * kh * kw
    fact += _dense_projection_macs((r_out, r_in, kh, kw), (None, None, (kh, r_h), (kw, r_w)))
    dense = pix_out * c_out * c_in * kh * kw
    dense += _dense_projection_macs(tuple(shape), tuple(zip(shape, ranks)))
    return {"factorized": int(fact), "dense": int(dense)}


def conv2d_core_gradient(
    x: torch.Tensor,
    gy: torch.Tensor,
    factors: Sequence[torch.Tensor],
    stride: Union[int, Sequence[int]] = 1,
    padding: Padding = 0,
    dilation: Union[int, Sequence[int]] = 1,
    padding_mode: str = "zeros",
    formula: str = "auto",
) -> torch.Tensor:
    """Core gradient ``dL/dW x_j U_j^T`` ``(r_out, r_in, r_h, r_w)`` of ``y = conv2d(x, W)`` at the bases
    ``factors = [U_out (C_out, r_out), U_in (C_in, r_in), U_h (k_h, r_h), U_w (k_w, r_w)]``, from
    ``x (B, C_in, H, W)`` and ``gy = dL/dy (B, C_out, H_o, W_o)`` (unbatched inputs are accepted).

    ``"factorized"``: ``h = x`` projected by ``U_in`` (1x1 conv), ``g = gy`` projected by ``U_out``, the
    weight gradient of the small ``r_in -> r_out`` conv with the layer's geometry, then the spatial modes
    projected by ``U_h^T, U_w^T``; padding of any ``padding_mode`` commutes with the 1x1 projection.
    ``"dense"``: the dense weight gradient, then projected. ``"auto"``: fewer multiply-adds
    (:func:`conv2d_core_gradient_costs`). ``groups`` must be 1.
    """
    _check_formula(formula)
    if len(factors) != 4:
        raise ValueError(f"factors must hold 4 matrices (out, in, k_h, k_w), got {len(factors)}")
    u_out, u_in, u_h, u_w = factors
    if x.ndim == 3:
        x, gy = x.unsqueeze(0), gy.unsqueeze(0)
    if x.ndim != 4 or gy.ndim != 4 or x.shape[0] != gy.shape[0]:
        raise ValueError(f"x and gy must be (B, C, H, W) with one batch size, got {tuple(x.shape)}, {tuple(gy.shape)}")
    shape = (u_out.shape[0], u_in.shape[0], u_h.shape[0], u_w.shape[0])
    if x.shape[1] != shape[1] or gy.shape[1] != shape[0]:
        raise ValueError(f"x has {x.shape[1]} channels and gy {gy.shape[1]}; the factors say C_in={shape[1]}, C_out={shape[0]}")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    lrtb = _explicit_padding(padding, shape[2:], dilation)
    symmetric = padding_mode == "zeros" and lrtb[0] == lrtb[1] and lrtb[2] == lrtb[3]
    conv_pad = (lrtb[2], lrtb[0]) if symmetric else (0, 0)
    ranks = tuple(f.shape[1] for f in factors)
    if formula == "auto":
        c = conv2d_core_gradient_costs(tuple(x.shape), tuple(gy.shape), shape, ranks)
        formula = "factorized" if c["factorized"] <= c["dense"] else "dense"

    def padded(t: torch.Tensor) -> torch.Tensor:
        if symmetric or not any(lrtb):
            return t
        return F.pad(t, lrtb, mode="constant" if padding_mode == "zeros" else padding_mode)

    if formula == "dense":
        gw = torch.nn.grad.conv2d_weight(padded(x), shape, gy, stride, conv_pad, dilation)
        return dense_core_gradient(gw, factors)
    h = padded(F.conv2d(x, u_in.transpose(0, 1)[:, :, None, None]))
    g = F.conv2d(gy, u_out.transpose(0, 1)[:, :, None, None])
    small = torch.nn.grad.conv2d_weight(h, (ranks[0], ranks[1]) + shape[2:], g, stride, conv_pad, dilation)
    return multi_mode_dot(small, [None, None, u_h, u_w], transpose=True)


def layer_core_gradient(
    layer: Optional[object], x: Optional[torch.Tensor], gy: torch.Tensor, factors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The core gradient at the bases ``factors`` of one recorded use of a Tucker parameter.

    * ``layer is None``: ``gy`` is the gradient of the dense reconstruction ``W`` (:func:`dense_core_gradient`);
    * a layer with a method ``tucker_core_gradient(x, gy, factors)``: that method (the protocol for new
      layers and adapters);
    * otherwise by the order of the weight: 2 modes, a linear layer (``y = x W^T + b``); 4 modes, a 2-D
      convolution with the layer's ``stride``, ``padding``, ``dilation`` (and ``padding_mode``,
      default ``"zeros"``), ``groups`` 1.
    """
    if layer is None:
        return dense_core_gradient(gy, factors)
    own = getattr(layer, "tucker_core_gradient", None)
    if callable(own):
        return own(x, gy, factors)
    if x is None:
        raise ValueError("x must be given for a recorded layer")
    if len(factors) == 2:
        return linear_core_gradient(x, gy, factors[0], factors[1])
    if len(factors) == 4 and all(hasattr(layer, a) for a in ("stride", "padding", "dilation")):
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(f"{type(layer).__name__} has groups={layer.groups}; only groups=1 is supported")
        return conv2d_core_gradient(
            x, gy, factors, layer.stride, layer.padding, layer.dilation, getattr(layer, "padding_mode", "zeros")
        )
    raise ValueError(
        f"no local core gradient for {type(layer).__name__} with a {len(factors)}-mode weight: give the layer a "
        "tucker_core_gradient(x, gy, factors) method, or record its dense weight (layer=None)"
    )


def augmented_core_gradient(records: Iterable, factors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """``dL/dC^`` at the bases ``factors`` summed over the recorded uses of one parameter (objects with
    ``layer``, ``x``, ``gy``, e.g. :class:`tucker_manifold.parameter.LayerIO`); ``None`` if there are none.
    Each record is computed in its ``gy``'s dtype (e.g. float32 records at float64 bases) and the sum is
    returned in the bases' dtype.
    Raises if an input was modified in place after it was recorded (the record no longer holds it)."""
    total = None
    for rec in records:
        if getattr(rec, "stale", None) is not None and rec.stale():
            raise RuntimeError(
                f"the input recorded for {type(rec.layer).__name__} was modified in place after its forward; "
                "its augmented-core gradient cannot be rebuilt (use the two-pass step)"
            )
        if rec.gy is None:
            continue
        # The heavy products run in the layer's dtype, as its forward does; the sum in the bases' dtype.
        fs = [f.to(rec.gy.dtype) for f in factors]
        # Under autocast a layer fed float32 (the first one) answers in the autocast dtype: its forward
        # ran on the input cast to that dtype, so the record is computed on that cast too.
        x = rec.x.to(rec.gy.dtype) if rec.x is not None and rec.x.is_floating_point() else rec.x
        g = layer_core_gradient(rec.layer, x, rec.gy, fs).to(factors[0].dtype)
        total = g if total is None else total + g
    return total


def core_gradient_mismatch(g_aug: torch.Tensor, core_grad: torch.Tensor) -> float:
    """Relative difference ``||B_{} - grad_C L|| / ||grad_C L||`` between the all-old block of a locally
    rebuilt ``g_aug`` and autograd's core gradient ``core_grad (r_1..r_d)`` from the same pass.

    The old bases are the leading columns of the augmented ones, so the two agree to rounding when the
    records saw every use of the parameter; a larger value means a use the records missed (e.g. a
    regularizer on the dense weight): fall back to the two-pass step for that parameter. A use that
    touches only the factors (contributing no core gradient) is not detected, and needs none.
    """
    old = tuple(slice(0, r) for r in core_grad.shape)
    diff = torch.linalg.vector_norm((g_aug[old] - core_grad).double())
    ref = torch.linalg.vector_norm(core_grad.double())
    if ref == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / ref)


# ----------------------------------------------------------------------------------- parallel step, extras
def parallel_core_gradient_from_factors(
    core_grad: torch.Tensor,
    factor_grads: Sequence[torch.Tensor],
    core: torch.Tensor,
    bases: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The masked gradient of :func:`parallel_core_gradient` from one backward's autograd gradients
    alone, with no layer records (docs/one_pass.md §3):

    * ``B_{}`` = ``core_grad`` ``(r_1..r_d)``;
    * ``B_{i}`` = ``Fold_i(U~_i^T G_i R_i^{-1} Q_i^T)`` with ``G_i = factor_grads[i] (n_i, r_i)``,
      ``Mat_i(C)^T = Q_i R_i`` and ``U~_i`` the new columns of ``bases[i] (n_i, r^_i)`` (old ``U_i``
      leading); ``R_i^{-1}`` is a triangular solve, never an inverse;
    * every other block zero.

    Equal to the masking in exact arithmetic; both lose about ``eps * cond(Mat_i(C))`` (checked in
    tests/test_parallel_tdlrt.py). A mode whose ``R_i`` is numerically singular
    (``min |diag R_i| <= r_i eps max |diag R_i|``) has no tangent space there: its block is left zero.
    """
    d = core.ndim
    ranks = tuple(core.shape)
    aug = tuple(int(b.shape[1]) for b in bases)
    if tuple(core_grad.shape) != ranks or len(factor_grads) != d or len(bases) != d:
        raise ValueError(f"core_grad must have the core's shape {ranks} and there must be {d} factor_grads and bases")
    if any(a < r for a, r in zip(aug, ranks)):
        raise ValueError(f"bases must have at least the core's ranks {ranks} columns, got {aug}")
    la = torch.float64 if core.dtype == torch.float64 else torch.float32
    out = torch.zeros(aug, dtype=core_grad.dtype, device=core_grad.device)
    old = tuple(slice(0, r) for r in ranks)
    out[old] = core_grad
    for i in range(d):
        if aug[i] == ranks[i]:
            continue
        q, r = torch.linalg.qr(unfold(core.to(la), i).transpose(0, 1))  # (prod_{j!=i} r_j, r_i), (r_i, r_i)
        diag = torch.diagonal(r).abs()
        if float(diag.min()) <= ranks[i] * torch.finfo(la).eps * float(diag.max()):
            continue
        a = bases[i][:, ranks[i]:].to(la).transpose(0, 1) @ factor_grads[i].to(la)  # (r~_i, r_i)
        x = torch.linalg.solve_triangular(r, a, upper=True, left=False)  # a R_i^{-1}
        shape = list(ranks)
        shape[i] = aug[i] - ranks[i]
        sl = list(old)
        sl[i] = slice(ranks[i], None)
        out[tuple(sl)] = fold(x @ q.transpose(0, 1), i, shape).to(out.dtype)
    return out


def parallel_dropped_norm(g_aug: torch.Tensor, old_ranks: Sequence[int]) -> torch.Tensor:
    """``eta = ||B_S||_F`` over the blocks of ``g_aug (r^_1..r^_d)`` new in two or more modes: the part of
    the augmented-core gradient the parallel step drops (for matrices, ``||U~^T grad L V~||``, the
    quantity of the parallel integrator's step-rejection test). A 0-d tensor."""
    count = torch.zeros((), dtype=torch.int64, device=g_aug.device)
    for i, r in enumerate(old_ranks):
        shape = [1] * g_aug.ndim
        shape[i] = -1
        count = count + (torch.arange(g_aug.shape[i], device=g_aug.device) >= int(r)).reshape(shape)
    return torch.linalg.vector_norm(torch.where(count >= 2, g_aug, torch.zeros_like(g_aug)))


__all__ += ["parallel_core_gradient_from_factors", "parallel_dropped_norm"]
