"""The reparametrized Dirac-Frenkel flow of TDLRT, as pure functions.

Notation (docs/geometry.md §1; docs/tdlrt.md §2-4): ``W = C x_j U_j`` with orthonormal ``U_j``; ``Mat_i`` is the
mode-``i`` unfolding (tensorly convention, see :mod:`tucker_manifold.tucker`).

* Theorem 2.1 (reparametrization): ``Mat_i(C)^T = Q_i S_i``, ``V_i = (kron_{j!=i} U_j) Q_i``,
  ``K_i = U_i S_i^T``; then ``Mat_i(W) = K_i V_i^T`` and ``Mat_i(P(W) Z) V_i = Mat_i(Z) V_i``, so the
  K-step ``K_i' = -Mat_i(grad L) V_i`` needs no inverse of ``S_i``.
* Corollary 2.2: ``grad_{U_i} L = Mat_i(grad L) V_i S_i``, so ``span[U_i, grad_{U_i} L] = span[U_i, K_i(h)]``:
  one backward pass gives every augmented basis.
* The TDLRT step: augment ``U_i -> orth([U_i | G_i])``, lift the core exactly, take a Galerkin step
  on the lifted core, truncate by a relative tolerance.

All functions work on one Tucker tensor (core + factor list); the optimizer in
:mod:`tucker_manifold.optim` applies them to every layer.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .tucker import left_singular, lower_to_multilinear_ranks, multi_mode_dot, rank_by_tolerance, unfold

__all__ = [
    "Reparametrization",
    "reparametrize",
    "v_basis",
    "k_gradient",
    "k_step",
    "augment_basis",
    "augment_bases",
    "augment_tucker_bases",
    "Lift",
    "lift",
    "lift_core",
    "galerkin_gradient",
    "Truncation",
    "truncate_core",
    "enforce_multilinear_ranks",
]


class Reparametrization(NamedTuple):
    """The QR objects of Theorem 2.1 for one mode: ``Q (prod_{j!=i} r_j, r_i)``, ``S (r_i, r_i)``
    (``Mat_i(C)^T = Q S``) and ``K = U_i S^T (n_i, r_i)``, so that ``Mat_i(W) = K V^T``."""

    Q: torch.Tensor
    S: torch.Tensor
    K: torch.Tensor


def reparametrize(core: torch.Tensor, factors: Sequence[torch.Tensor], mode: int) -> Reparametrization:
    """QR objects of Theorem 2.1 for ``mode``: ``Mat_i(C)^T = Q S``, ``K = U_i S^T``."""
    q, s = torch.linalg.qr(unfold(core, mode).transpose(0, 1))
    return Reparametrization(q, s, factors[mode] @ s.transpose(0, 1))


def v_basis(factors: Sequence[torch.Tensor], q: torch.Tensor, mode: int) -> torch.Tensor:
    """``V_i = (kron_{j!=i} U_j) Q_i``, shape ``(prod_{j!=i} n_j, r_i)``, orthonormal columns.

    Forms a matrix with ``prod_{j!=i} n_j`` rows: meant for checks on small shapes. The optimizer
    never needs it (Corollary 2.2).
    """
    kron = None
    for j, u in enumerate(factors):
        if j == mode:
            continue
        kron = u if kron is None else torch.kron(kron, u)
    return kron @ q


def k_gradient(core: torch.Tensor, factors: Sequence[torch.Tensor], mode: int, dense_grad: torch.Tensor) -> torch.Tensor:
    """``Mat_i(grad L) V_i`` (``n_i x r_i``) computed in Tucker form, without forming ``V_i``:
    ``Mat_i(grad L x_{j!=i} U_j^T) Q_i``."""
    q, _ = torch.linalg.qr(unfold(core, mode).transpose(0, 1))
    others = [None if j == mode else u for j, u in enumerate(factors)]
    return unfold(multi_mode_dot(dense_grad, others, transpose=True), mode) @ q


def k_step(core: torch.Tensor, factors: Sequence[torch.Tensor], mode: int, dense_grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One explicit-Euler K-step ``K_i(h) = U_i S_i^T - h Mat_i(grad L) V_i`` (``n_i x r_i``): no inverse."""
    rep = reparametrize(core, factors, mode)
    others = [None if j == mode else u for j, u in enumerate(factors)]
    kgrad = unfold(multi_mode_dot(dense_grad, others, transpose=True), mode) @ rep.Q
    return rep.K - lr * kgrad


def augment_basis(u: torch.Tensor, g: torch.Tensor, rtol: float | None = None, max_rank: int | None = None) -> torch.Tensor:
    """Orthonormal basis of ``span[U | G]`` with ``U`` kept as its leading columns.

    ``u (n, r)`` orthonormal, ``g (n, k)`` -> ``(n, r + k')`` with ``k' <= min(k, n - r)`` the numerical rank
    of ``(I - U U^T) G``. The new directions come from an SVD of the projected ``G`` (projected twice,
    the classical Gram-Schmidt fix), so a rank-deficient or zero ``G`` adds fewer or no columns instead
    of NaNs or arbitrary directions. ``rtol`` (default ``max(n, k) * eps``) is relative to ``||G||_F``;
    ``max_rank`` caps the total number of columns.
    """
    n, r = u.shape
    cap = n if max_rank is None else min(n, max_rank)
    if r >= cap or g.shape[1] == 0:
        return u
    if not torch.isfinite(g).all():
        raise ValueError("g has non-finite entries")
    gp = g - u @ (u.transpose(0, 1) @ g)
    gp = gp - u @ (u.transpose(0, 1) @ gp)
    w, s, _ = torch.linalg.svd(gp, full_matrices=False)
    # Frobenius norm as the scale: as good a reference as ||G||_2 here, and no SVD.
    scale = torch.linalg.vector_norm(g)
    if rtol is None:
        rtol = max(n, g.shape[1]) * torch.finfo(g.dtype).eps
    keep = int((s > rtol * scale).sum()) if scale > 0 else 0
    keep = min(keep, cap - r)
    if keep == 0:
        return u
    w = w[:, :keep]
    # One more projection keeps [U | W] orthonormal to working precision.
    w = w - u @ (u.transpose(0, 1) @ w)
    w = torch.linalg.qr(w).Q
    return torch.cat([u, w], dim=1)


def augment_bases(
    factors: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    modes: Sequence[bool] | None = None,
    max_ranks: Sequence[int | None] | None = None,
) -> list[torch.Tensor]:
    """:func:`augment_basis` for every mode (``modes[i] = False`` keeps ``U_i`` as it is)."""
    d = len(factors)
    modes = [True] * d if modes is None else modes
    max_ranks = [None] * d if max_ranks is None else max_ranks
    return [augment_basis(u, g, max_rank=m) if a else u for u, g, a, m in zip(factors, grads, modes, max_ranks)]


def augment_tucker_bases(factors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Augmented bases of one Tucker point, as TDLRT's step takes them: every mode augmented with its
    factor gradient (:func:`augment_bases`; a mode at full rank ``r_i = n_i`` has nothing to gain and is
    kept; modes of fixed rank below ``n_i`` are augmented too, so that they can rotate), then trimmed to
    a valid multilinear rank (:func:`enforce_multilinear_ranks`). Trimming only drops trailing new
    columns: the bound is never below the old rank. ``[(n_i, r_i)] -> [(n_i, r^_i)]``, ``U_i`` leading."""
    new = augment_bases(factors, grads)
    sizes = enforce_multilinear_ranks([f.shape[1] for f in new])
    return [f if f.shape[1] == s else f[:, :s] for f, s in zip(new, sizes)]


class Lift(NamedTuple):
    """Result of :func:`lift`: the lifted ``core (r^_1..r^_d)`` and the maps ``maps[i] = U^_i^T U_i``
    ``(r^_i, r_i)`` (also what carries core-coordinate optimizer state into the new bases)."""

    core: torch.Tensor
    maps: list[torch.Tensor]


def lift(core: torch.Tensor, old_factors: Sequence[torch.Tensor], new_factors: Sequence[torch.Tensor]) -> Lift:
    """:func:`lift_core` together with its per-mode maps ``U^_i^T U_i``."""
    maps = [nu.transpose(0, 1) @ ou for nu, ou in zip(new_factors, old_factors)]
    return Lift(multi_mode_dot(core, maps), maps)


def lift_core(core: torch.Tensor, old_factors: Sequence[torch.Tensor], new_factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact core lift ``C^ = C x_i (U^_i^T U_i)``: ``C^ x_i U^_i = C x_i U_i`` whenever
    ``span U^_i ⊇ span U_i``, so the loss is unchanged. ``(r_1..r_d) -> (r^_1..r^_d)``."""
    return lift(core, old_factors, new_factors).core


def galerkin_gradient(dense_grad: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Core gradient of ``C -> L(C x_j U_j)``: ``grad L x_j U_j^T`` (what autograd gives in pass 2)."""
    return multi_mode_dot(dense_grad, factors, transpose=True)


def enforce_multilinear_ranks(ranks: Sequence[int]) -> list[int]:
    """Lower ranks until ``r_i <= prod_{j!=i} r_j`` for every ``i`` (otherwise the truncated core
    cannot have full multilinear rank). Only ever decreases entries."""
    return lower_to_multilinear_ranks(ranks)


class Truncation(NamedTuple):
    """Result of :func:`truncate_core`: the new ``core (r'_1..r'_d)``, the per-mode maps
    ``transforms[i] (r^_i, r'_i)`` (new factor = ``U^_i @ transforms[i]``), the new ``ranks``, the
    singular values of every unfolding of the augmented core and the truncation ``error``
    ``||C^ - C' x_i P_i||_F`` (= ``||Y^ - Y'||_F`` for orthonormal factors)."""

    core: torch.Tensor
    transforms: list[torch.Tensor]
    ranks: tuple[int, ...]
    singular_values: list[torch.Tensor | None]
    error: torch.Tensor


def truncate_core(
    core: torch.Tensor,
    tau: float,
    rmin: Sequence[int] | int = 1,
    rmax: Sequence[int | None] | int | None = None,
    adaptive: Sequence[bool] | None = None,
    fixed_ranks: Sequence[int] | None = None,
) -> Truncation:
    """Truncated HOSVD of an augmented core by relative tolerance ``tau``.

    For an adaptive mode ``i`` the new rank is the smallest ``k`` with
    ``||sigma^{(i)}_{k+1:}||_2 <= tau ||C^||_F``, clamped to ``[rmin_i, rmax_i]``; a non-adaptive mode
    goes back to ``fixed_ranks[i]`` (default: keeps its augmented size, and its SVD is skipped if
    nothing is cut). All modes use the same ``C^`` (not sequential). Ranks are then lowered where
    needed to stay a valid multilinear rank (this wins over ``rmin``).
    """
    d = core.ndim
    shape = tuple(core.shape)
    adaptive = [True] * d if adaptive is None else list(adaptive)
    rmins = [rmin] * d if isinstance(rmin, int) else list(rmin)
    rmaxs = [rmax] * d if rmax is None or isinstance(rmax, int) else list(rmax)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    norm = float(torch.linalg.vector_norm(core))
    # Singular values at rounding level are zeros: keeping them (e.g. tau = 0 once the exact rank is
    # reached) leaves an unfolding numerically rank deficient, i.e. a point off the manifold.
    tol = max(float(tau) * norm, max(shape) * torch.finfo(core.dtype).eps * norm)
    bases: list[torch.Tensor | None] = []
    svals: list[torch.Tensor | None] = []
    ranks = []
    for i in range(d):
        target = fixed_ranks[i] if (fixed_ranks is not None and not adaptive[i]) else None
        if not adaptive[i] and (target is None or target >= shape[i]):
            bases.append(None)  # identity: nothing to cut in this mode
            svals.append(None)
            ranks.append(shape[i])
            continue
        p, s = left_singular(unfold(core, i))
        bases.append(p)
        svals.append(s)
        if adaptive[i]:
            ranks.append(rank_by_tolerance(s, tol, rmins[i], rmaxs[i]))
        else:
            ranks.append(min(target, p.shape[1]))
    ranks = enforce_multilinear_ranks(ranks)
    transforms = []
    for i in range(d):
        if bases[i] is None and ranks[i] == shape[i]:
            transforms.append(torch.eye(shape[i], dtype=core.dtype, device=core.device))
        else:
            if bases[i] is None:  # lowered by the multilinear constraint
                bases[i], svals[i] = left_singular(unfold(core, i))
            transforms.append(bases[i][:, : ranks[i]])
    new_core = multi_mode_dot(core, transforms, transpose=True)
    error = torch.linalg.vector_norm(core - multi_mode_dot(new_core, transforms))
    return Truncation(new_core, transforms, tuple(ranks), svals, error)
