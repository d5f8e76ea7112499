"""Tucker-format primitives on torch tensors.

Conventions (the same as tensorly's):

* ``unfold(T, i)`` is the mode-``i`` unfolding ``Mat_i(T)`` of shape ``(n_i, prod_{j != i} n_j)``:
  mode ``i`` is moved to the front and the rest is flattened in C order (last mode fastest).
* ``Mat_i(C x_1 U_1 ... x_d U_d) = U_i Mat_i(C) (U_1 kron ... U_{i-1} kron U_{i+1} ... kron U_d)^T``.
* ``mode_dot(T, A, i)`` is ``T x_i A``: ``Mat_i(T x_i A) = A Mat_i(T)``.

Batches: ``unfold``, ``fold``, ``mode_dot``, ``multi_mode_dot``, ``reconstruct``, ``left_singular``,
``truncated_hosvd`` (fixed ranks) and ``orthonormalize`` take ``batch_ndim=k``: the first ``k``
dimensions of every tensor are batch dimensions, modes are counted after them, and a matrix is
either one ``(m, n)`` matrix shared by the batch or a batch ``(*batch, m, n)``, one per tensor.
``batch_ndim=0`` (the default) is the unbatched behaviour, on the same code path as before.

Everything here is a pure function on ``torch.Tensor`` (any dtype, any device). tensorly is used with
its pytorch backend through :func:`tensorly_pytorch`, which never changes tensorly's global backend.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple, Sequence

import torch

__all__ = [
    "unfold",
    "fold",
    "mode_dot",
    "multi_mode_dot",
    "reconstruct",
    "left_singular",
    "hosvd",
    "truncated_hosvd",
    "rank_by_tolerance",
    "orthonormalize",
    "TuckerHOSVD",
    "tensorly_pytorch",
    "check_multilinear_ranks",
    "lower_to_multilinear_ranks",
]


@contextlib.contextmanager
def tensorly_pytorch() -> Iterator[object]:
    """Use tensorly with its pytorch backend inside a ``with`` block, for this thread only.

    tensorly's ``backend_context`` would restore the previous backend *globally*; here the backend
    is set thread-locally and restored thread-locally, so a user's numpy-backend code elsewhere is
    untouched.
    """
    import tensorly as tl

    old = tl.get_backend()
    tl.set_backend("pytorch", local_threadsafe=True)
    try:
        yield tl
    finally:
        tl.set_backend(old, local_threadsafe=True)


def unfold(tensor: torch.Tensor, mode: int, batch_ndim: int = 0) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``(*batch, n_1..n_d) -> (*batch, n_mode, prod_{j != mode} n_j)``."""
    if batch_ndim == 0:
        return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)
    batch = tensor.shape[:batch_ndim]
    return torch.movedim(tensor, batch_ndim + mode, batch_ndim).reshape(*batch, tensor.shape[batch_ndim + mode], -1)


def fold(matrix: torch.Tensor, mode: int, shape: Sequence[int], batch_ndim: int = 0) -> torch.Tensor:
    """Inverse of :func:`unfold`: ``(*batch, n_mode, prod_{j != mode} n_j) -> (*batch, *shape)``
    (``shape`` without the batch dimensions)."""
    shape = tuple(shape)
    rest = shape[:mode] + shape[mode + 1 :]
    batch = tuple(matrix.shape[:batch_ndim])
    return torch.movedim(matrix.reshape(batch + (shape[mode],) + rest), batch_ndim, batch_ndim + mode)


def mode_dot(tensor: torch.Tensor, matrix: torch.Tensor, mode: int, batch_ndim: int = 0) -> torch.Tensor:
    """``tensor x_mode matrix``: ``(*batch, .., n_mode, ..) x (m, n_mode) -> (*batch, .., m, ..)``.

    ``matrix`` is one ``(m, n_mode)`` matrix for the whole batch, or ``(*batch, m, n_mode)``: one
    matrix per tensor of the batch (``matrix.ndim == batch_ndim + 2``; the two batch shapes
    broadcast).
    """
    axis = batch_ndim + mode
    if matrix.ndim == 2:
        if matrix.dtype != tensor.dtype and torch.is_autocast_enabled(tensor.device.type):
            # Under autocast an earlier product came back in the autocast dtype: tensordot wants equal
            # dtypes (its inner matmul is autocast to the low precision either way).
            matrix = matrix.to(tensor.dtype)
        # tensordot puts the new index last; move it back into place.
        out = torch.tensordot(tensor, matrix, dims=([axis], [1]))
        return torch.movedim(out, -1, axis)
    if matrix.ndim != batch_ndim + 2:
        raise ValueError(
            f"matrix must have shape (m, n) or (*batch, m, n) with {batch_ndim} batch dimensions, "
            f"got shape {tuple(matrix.shape)}"
        )
    if axis == tensor.ndim - 1:
        # Last mode: (*batch, rest, n) @ (*batch, n, m) needs no transposed copy of the tensor.
        shape = tensor.shape
        out = tensor.reshape(*shape[:batch_ndim], -1, shape[-1]) @ matrix.transpose(-1, -2)
        return out.reshape(*out.shape[:batch_ndim], *shape[batch_ndim:-1], matrix.shape[-2])
    # Other modes: one batched matmul on the mode unfoldings, (*batch, m, n) @ (*batch, n, rest).
    # (A (*batch, before, n, after) view would skip the copy but makes batch*before tiny matmuls:
    # measured 1.5-6x slower for middle modes.)
    t = torch.movedim(tensor, axis, batch_ndim)
    rest = t.shape[batch_ndim + 1 :]
    out = matrix @ t.reshape(*t.shape[: batch_ndim + 1], -1)
    return torch.movedim(out.reshape(*out.shape[:-1], *rest), batch_ndim, axis)


def multi_mode_dot(
    tensor: torch.Tensor,
    matrices: Sequence[torch.Tensor | None],
    modes: Sequence[int] | None = None,
    transpose: bool = False,
    batch_ndim: int = 0,
) -> torch.Tensor:
    """Apply ``tensor x_m A_m`` for each matrix (``None`` skips a mode).

    With ``transpose=True`` each ``A_m^T`` is used instead. The products are ordered so that the
    modes that shrink the tensor most come first, which keeps intermediates small. With
    ``batch_ndim``, see :func:`mode_dot`.
    """
    if modes is None:
        modes = range(len(matrices))
    pairs = [(m, A.transpose(-1, -2) if transpose else A) for m, A in zip(modes, matrices) if A is not None]
    # Shrinking modes first: smallest ratio out/in.
    pairs.sort(key=lambda p: p[1].shape[-2] / max(p[1].shape[-1], 1))
    for m, A in pairs:
        tensor = mode_dot(tensor, A, m, batch_ndim)
    return tensor


def reconstruct(core: torch.Tensor, factors: Sequence[torch.Tensor], batch_ndim: int = 0) -> torch.Tensor:
    """Full tensor ``core x_1 U_1 ... x_d U_d``: ``(*batch, r_1..r_d), [(*batch, n_i, r_i)] -> (*batch, n_1..n_d)``."""
    return multi_mode_dot(core, factors, batch_ndim=batch_ndim)


def left_singular(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of a (typically wide) matrix, or a batch of them.

    ``(*batch, m, n) -> U (*batch, m, k), s (*batch, k)`` with ``k = min(m, n)``. For a wide matrix
    the SVD of the ``m x m`` triangular factor of ``matrix^T = Q R`` gives the same ``U`` and ``s``
    to working precision, and is far cheaper than a wide SVD (no Gram matrix, so no squared
    condition number).
    """
    m, n = matrix.shape[-2:]
    if n > 2 * m:
        r = torch.linalg.qr(matrix.transpose(-1, -2), mode="r").R  # (m, m), matrix = R^T Q^T
        u, s, _ = torch.linalg.svd(r.transpose(-1, -2), full_matrices=False)
    else:
        u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u, s


class TuckerHOSVD(NamedTuple):
    """Result of a (truncated) HOSVD: ``core (r_1..r_d)``, ``factors [(n_i, r_i)]`` and the full
    per-mode singular values ``singular_values[i]`` of ``Mat_i(T)`` (length ``min(n_i, prod_{j!=i} n_j)``)."""

    core: torch.Tensor
    factors: list[torch.Tensor]
    singular_values: list[torch.Tensor]


def rank_by_tolerance(singular_values: torch.Tensor, tol: float, rmin: int = 1, rmax: int | None = None) -> int:
    """Smallest ``k`` with ``||s[k:]||_2 <= tol``, clamped to ``[rmin, rmax]``.

    ``singular_values`` is sorted in decreasing order; ``tol`` is absolute (multiply a relative
    tau by ``||s||_2`` first).
    """
    s = singular_values.detach()
    n = s.shape[0]
    # tails[k] = ||s[k:]||_2 for k = 0..n (tails[n] = 0).
    sq = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])
    tails = torch.cat([sq, sq.new_zeros(1)]).sqrt()
    ok = (tails <= tol).nonzero()
    k = int(ok[0]) if ok.numel() else n
    hi = n if rmax is None else min(rmax, n)
    return max(min(k, hi), min(rmin, hi))


def check_multilinear_ranks(shape: Sequence[int], ranks: Sequence[int], name: str = "ranks") -> tuple[int, ...]:
    """Validate a multilinear rank for ``shape``; return it as a tuple of ints.

    Valid means ``1 <= r_i <= n_i`` and ``r_i <= prod_{j != i} r_j`` (a mode-``i`` unfolding of the
    core cannot have more rows of full rank than it has columns).
    """
    ranks = tuple(int(r) for r in ranks)
    shape = tuple(int(n) for n in shape)
    if len(ranks) != len(shape):
        raise ValueError(f"{name} must have one entry per mode: got {len(ranks)} for a shape of order {len(shape)}")
    for i, (r, n) in enumerate(zip(ranks, shape)):
        if not 1 <= r <= n:
            raise ValueError(f"{name}[{i}] = {r} must satisfy 1 <= r <= n_{i} = {n}")
    # Bounds first: a zero rank elsewhere would otherwise be reported as the wrong entry's fault.
    for i, r in enumerate(ranks):
        others = math.prod(ranks[:i] + ranks[i + 1 :])
        if r > others:
            raise ValueError(
                f"{name} = {ranks} is not a multilinear rank: {name}[{i}] = {r} exceeds the product "
                f"of the other ranks ({others})"
            )
    return ranks


def lower_to_multilinear_ranks(ranks: Sequence[int]) -> list[int]:
    """Lower entries until ``r_i <= prod_{j != i} r_j`` for every ``i`` (only ever decreases), e.g.
    ``[5, 1, 1] -> [1, 1, 1]``; a core truncated to such ranks can have full multilinear rank."""
    ranks = [int(r) for r in ranks]
    changed = True
    while changed:
        changed = False
        for i in range(len(ranks)):
            others = math.prod(ranks[:i] + ranks[i + 1 :])
            if ranks[i] > others:
                ranks[i] = others
                changed = True
    return ranks


def hosvd(tensor: torch.Tensor) -> TuckerHOSVD:
    """Full HOSVD: ``T = core x_i U_i`` with ``U_i`` the left singular vectors of ``Mat_i(T)``
    (``n_i x min(n_i, prod_{j!=i} n_j)``)."""
    factors, svals = [], []
    for i in range(tensor.ndim):
        u, s = left_singular(unfold(tensor, i))
        factors.append(u)
        svals.append(s)
    core = multi_mode_dot(tensor, factors, transpose=True)
    return TuckerHOSVD(core, factors, svals)


def truncated_hosvd(
    tensor: torch.Tensor,
    ranks: Sequence[int] | None = None,
    tau: float | None = None,
    rmin: int | Sequence[int] = 1,
    rmax: int | Sequence[int] | None = None,
    batch_ndim: int = 0,
) -> TuckerHOSVD:
    """Truncated HOSVD, to fixed ``ranks`` or by relative tolerance ``tau``.

    With ``tau``, mode ``i`` keeps the smallest ``r_i`` with ``||sigma^{(i)}_{r_i+1:}||_2 <= tau ||T||_F``,
    clamped to ``[rmin, rmax]`` (ints or per-mode sequences). Every mode is truncated from the
    same tensor (not sequentially), so ``||T - T_r|| <= sqrt(sum_i tail_i^2) <= sqrt(d) * best``.
    Returns the core ``(r_1..r_d)``, factors ``[(n_i, r_i)]`` and the full per-mode singular values.
    With ``batch_ndim=k`` (fixed ``ranks`` only: a tolerance would give each tensor its own ranks)
    every output gains the ``k`` leading batch dimensions of ``tensor``.
    """
    if (ranks is None) == (tau is None):
        raise ValueError("truncated_hosvd needs exactly one of ranks= or tau=")
    if batch_ndim:
        if ranks is None:
            raise ValueError("truncated_hosvd with batch_ndim > 0 needs ranks= (tau= would give each tensor its own ranks)")
        return _batched_truncated_hosvd(tensor, ranks, batch_ndim)
    if not torch.isfinite(tensor).all():
        raise ValueError("tensor has non-finite entries")
    d = tensor.ndim
    if ranks is not None:
        ranks = check_multilinear_ranks(tensor.shape, ranks)
    elif tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    rmins = [rmin] * d if isinstance(rmin, int) else list(rmin)
    rmaxs = [rmax] * d if rmax is None or isinstance(rmax, int) else list(rmax)
    norm = torch.linalg.vector_norm(tensor)
    factors, svals = [], []
    for i in range(d):
        u, s = left_singular(unfold(tensor, i))
        r = ranks[i] if ranks is not None else rank_by_tolerance(s, float(tau * norm), rmins[i], rmaxs[i])
        factors.append(u[:, :r])
        svals.append(s)
    core = multi_mode_dot(tensor, factors, transpose=True)
    return TuckerHOSVD(core, factors, svals)


def _batched_truncated_hosvd(tensor: torch.Tensor, ranks: Sequence[int], batch_ndim: int) -> TuckerHOSVD:
    """:func:`truncated_hosvd` to fixed ``ranks`` of a batch ``(*batch, n_1..n_d)``: batched SVDs."""
    if not torch.isfinite(tensor).all():
        raise ValueError("tensor has non-finite entries")
    shape = tensor.shape[batch_ndim:]
    ranks = check_multilinear_ranks(shape, ranks)
    factors, svals = [], []
    for i in range(len(shape)):
        u, s = left_singular(unfold(tensor, i, batch_ndim))
        factors.append(u[..., : ranks[i]])
        svals.append(s)
    core = multi_mode_dot(tensor, factors, transpose=True, batch_ndim=batch_ndim)
    return TuckerHOSVD(core, factors, svals)


def orthonormalize(
    core: torch.Tensor, factors: Sequence[torch.Tensor], batch_ndim: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Re-orthonormalize the factors without changing the tensor.

    ``U_i = Q_i R_i`` (QR with a positive diagonal of ``R_i``), ``core <- core x_i R_i``. A factor that
    is already orthonormal is returned unchanged up to rounding, which makes this idempotent.
    Shapes ``(*batch, r_1..r_d)``, ``[(*batch, n_i, r_i)]`` with ``batch_ndim`` batch dimensions.
    """
    new_factors, rs = [], []
    for u in factors:
        q, r = torch.linalg.qr(u)
        sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        new_factors.append(q * sign.unsqueeze(-2))
        rs.append(r * sign.unsqueeze(-1))
    return multi_mode_dot(core, rs, batch_ndim=batch_ndim), new_factors
