"""Eigenspace low-rank approximation of a weight residual: pure math, no model code.

Given the residual ``ΔW = W_original − W_compressed`` (out × in) of one linear layer and the
second moment of its inputs ``H = Σ xᵀx`` (in × in), find ``B`` (out × r) and ``A`` (r × in)
minimising the activation-weighted error ``‖(ΔW − B·A)·Xᵀ‖_F``::

    >>> import torch
    >>> from peft_eora.decompose import eora_factors
    >>> x = torch.randn(256, 64)
    >>> delta = torch.randn(32, 64) * 0.01
    >>> f = eora_factors(delta, x.T @ x, rank=8)
    >>> f.B.shape, f.A.shape
    (torch.Size([32, 8]), torch.Size([8, 64]))

EoRA (arXiv 2410.21271): ``H = Q·diag(λ)·Qᵀ``; ``ΔW' = ΔW·Q·diag(√λ)``; truncated SVD
``ΔW' ≈ U_r S_r V_rᵀ``; ``B = U_r·√S_r``, ``A = √S_r·V_rᵀ·diag(1/√λ)·Qᵀ``. Because
``‖M·Xᵀ‖²_F = tr(M H Mᵀ) = ‖M·Q·diag(√λ)‖²_F``, the truncated SVD in the projected space is
the optimum of the weighted problem (Eckart–Young).

Numerics: the eigendecomposition and SVD run in float64. ``damping`` adds a ridge
``δ·mean(diag H)·I`` to H before decomposing: with δ = 0 (textbook EoRA) directions that the
calibration data never excited get zero weight, which over-fits the calibration domain; a
small δ blends towards plain SVD. Eigenvalues below ``eig_rtol·λ_max`` (including negative
ones from round-off) are treated as zero: their directions are dropped from the projection
(pseudo-inverse), so rank-deficient or dead-channel covariances never yield NaN or inf.
``method="svd"`` is the baseline: the same code path with ``H = I``.

``damping="auto"`` (:func:`select_damping`, :func:`eora_factors_auto`): fit the factors on part of
the calibration tokens for each δ in :data:`AUTO_DAMPING_GRID` (one eigendecomposition, shifted
eigenvalues), keep the δ with the smallest activation-weighted error on the held-out tokens,
refit on all tokens. Rank allocation (:func:`projected_spectrum`, :func:`allocate_ranks`): the
k-th rank of a layer removes ``s_k²`` (its k-th squared singular value of ``ΔW'``) from the
squared weighted error at a cost of ``in + out`` parameters; ranks are bought greedily by gain
per parameter under a total budget.
"""

from __future__ import annotations

import functools
import heapq
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import topeig

Method = Literal["eora", "svd"]
METHODS: tuple[str, ...] = ("eora", "svd")

#: Default relative eigenvalue cut-off (relative to the largest eigenvalue of the damped H).
DEFAULT_EIG_RTOL = 1e-10


#: Threads for CPU eigendecompositions. Multi-threaded LAPACK ``eigh`` collapses when another
#: process holds a core (measured on a 2-core machine, 1536×1536 float64: 0.55 s with 2 threads
#: idle, 14 s with the other core busy, 1.0–1.35 s with 1 thread either way), so the default is 1.
LAPACK_THREADS = int(os.environ.get("PEFT_EORA_LAPACK_THREADS", "1"))


#: Ridges ``damping="auto"`` scores at once on a CPU, each in its own thread with a single-threaded
#: LAPACK (see :func:`_score_ridges`), where torch has no more threads than that (a 2-core machine):
#: two independent single-threaded ``eigh`` calls use both cores (576² float64: 14 ms each, against
#: 26 ms one after the other), and share one core without a collapse when another process holds the
#: other. ``PEFT_EORA_DAMPING_WORKERS=1``: one at a time.
DAMPING_WORKERS = int(os.environ.get("PEFT_EORA_DAMPING_WORKERS", "2"))


@contextmanager
def _lapack_threads(t: torch.Tensor | torch.device) -> Iterator[None]:
    if (t if isinstance(t, torch.device) else t.device).type != "cpu" or LAPACK_THREADS <= 0 or torch.get_num_threads() <= LAPACK_THREADS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(LAPACK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _eigh(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _lapack_threads(A):
        return torch.linalg.eigh(A)


def _eigh_(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` of a symmetric row-major ``A`` with the eigenvectors written over it: ``Q`` is
    returned as the column-major view ``A.mT`` (LAPACK/cuSOLVER work on column-major storage,
    so torch then needs no copy of the input: at 14336² float64 that is 1.5 GiB saved)."""
    if not (A.is_contiguous() and A.dtype in (torch.float32, torch.float64)):
        return _eigh(A)
    lam, At = A.new_empty(A.shape[0]), A.mT
    with _lapack_threads(A):
        try:
            torch.linalg.eigh(At, out=(lam, At))
        except RuntimeError:  # a build refusing the aliased output: the out-of-place decomposition
            return torch.linalg.eigh(A)
    return lam, At


#: Scratch of the row-block loops that avoid a second large matrix (:meth:`Projection.project_`,
#: :func:`_sandwich`, :func:`_residual_sq`, the float64 sum of the fit and held-out covariances).
_PROJECT_BLOCK_BYTES = 64 << 20


def _block_len(width: int, element_size: int) -> int:
    """Rows (or columns) per block of those loops, at least one: a block ``width`` long the other way."""
    return max(1, _PROJECT_BLOCK_BYTES // (element_size * max(1, width)))


def _block_rows(t: torch.Tensor, element_size: int | None = None) -> int:
    """Rows of ``t`` per block of those loops (at least one); ``element_size``: of the block's
    working dtype when it differs from ``t``'s."""
    return _block_len(t.shape[1], element_size or t.element_size())


#: An input covariance ``Σ xᵀx``, or the parts it is the sum of (``damping="auto"`` keeps the fit
#: and held-out tokens' apart). The consumers that take one (:func:`damped`, :func:`weighted_error`)
#: never add the parts up in their own precision: at 14336² that sum is another 784 MiB in float32.
Covariance = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CovarianceRoot:
    """A covariance kept as ``H = S·Sᵀ − shift·I``: what the statistics after a refit need of ``H``
    once the matrices it was summed from are dropped (:func:`refit_auto`: ``S`` is the Cholesky
    factor of ``H + δ·m·I``, ``shift = δ·m``; or the eigenvectors ``Q`` with ``scale = √λ``, the root
    being ``S·diag(scale)``). ``tr(E·H·Eᵀ) = ‖E·S‖² − shift·‖E‖²``::

        weighted_error(delta, CovarianceRoot(L, shift=d * m), approx)
    """

    S: torch.Tensor
    shift: float = 0.0
    scale: torch.Tensor | None = None

    def row_blocks(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, rows)``: ``S·Sᵀ`` (``H`` before the shift) in float64, a block of rows at
        a time; no ``n × n`` matrix is made besides ``S`` (in float64, as it is kept)."""
        S = self.S.to(torch.float64)
        w = None if self.scale is None else self.scale.to(S).square()
        n = S.shape[0]
        step = _block_len(n, 8)
        for i in range(0, n, step):
            block = S[i:i + step] if w is None else S[i:i + step] * w
            yield i, min(i + step, n), block @ S.T

    def matrix(self) -> torch.Tensor:
        """``H`` as a new float64 matrix (symmetrised), made a block of rows at a time."""
        n = self.S.shape[0]
        H = torch.empty((n, n), dtype=torch.float64, device=self.S.device)
        for i, j, rows in self.row_blocks():
            H[i:j] = rows
        _symmetrize_(H)
        if self.shift:
            H.diagonal().sub_(self.shift)
        return H


def covariance_parts(H: Covariance) -> tuple[torch.Tensor, ...]:
    """The parts of ``H`` (a tensor is its own single part)."""
    return (H,) if isinstance(H, torch.Tensor) else tuple(H)


def covariance64(H: Covariance, device: torch.device | None = None) -> torch.Tensor:
    """``H`` (the sum of its parts) as a new float64 matrix on ``device`` (default: the first
    part's), each further part added a block of rows at a time: an in-place ``add_`` of a float32
    matrix into a float64 one converts all of it first (a second ``n × n`` float64 matrix)."""
    first, *rest = covariance_parts(H)
    out = first.detach().to(device if device is not None else first.device, torch.float64, copy=True)
    step = _block_rows(out)
    for part in rest:
        for i in range(0, out.shape[0], step):
            out[i:i + step].add_(part[i:i + step].to(out))
    return out


@dataclass(frozen=True)
class Projection:
    """A square root ``S`` of the damped covariance (``S·Sᵀ = H_δ``) and how to undo it.

    ``project(ΔW) = ΔW·S``; ``unproject(M) = M·S⁺``. From the eigendecomposition
    (:func:`eigen_projection`) ``S = Q·diag(√λ)`` and ``S⁺ = diag(1/√λ)·Qᵀ`` (small eigenvalues
    cut); from a Cholesky factorisation (:func:`cholesky_projection`) ``S = L`` and ``S⁺ = L⁻¹``,
    applied by a triangular solve. Any square root gives the same rank-r optimum of
    ``‖(ΔW − BA)·Xᵀ‖_F``, so the two give the same factors up to round-off.
    """

    S: torch.Tensor
    kept: int
    S_pinv: torch.Tensor | None = None
    lower: bool = False  # S is a Cholesky factor
    #: ``S`` holds the eigenvectors ``Q`` and the root is ``Q·diag(scale)``; ``S⁺ = diag(inv_scale)·Qᵀ``
    #: (:meth:`Eigen.root`: neither ``n × n`` product is made)
    scale: torch.Tensor | None = None
    inv_scale: torch.Tensor | None = None

    def project(self, D: torch.Tensor) -> torch.Tensor:
        P = D @ self.S.to(D.device)
        return P if self.scale is None else P * self.scale.to(P)

    def project_(self, D: torch.Tensor) -> torch.Tensor:
        """``D·S`` written over ``D`` (returned), a block of rows at a time: the only scratch is one
        block (~64 MiB), not a second ``out × in`` matrix (0.44 GiB in float64 for an 8B ``down_proj``)."""
        S = self.S.to(D.device)
        scale = None if self.scale is None else self.scale.to(D)
        step = _block_rows(D)
        for i in range(0, D.shape[0], step):
            P = D[i:i + step] @ S
            D[i:i + step] = P if scale is None else P * scale
        return D

    def unproject(self, M: torch.Tensor) -> torch.Tensor:
        if self.lower:
            L = self.S.to(M.device)
            return torch.linalg.solve_triangular(L.T, M.T, upper=True).T
        if self.scale is not None:
            return (M * self.inv_scale.to(M)) @ self.S.to(M.device).T
        return M @ self.S_pinv.to(M.device)


@dataclass(frozen=True)
class Factors:
    """Low-rank factors with ``B @ A ≈ ΔW`` (float32, on the input's device).

    ``singular_values`` is the spectrum of the (projected) residual: all of it, or its top ``rank``
    values where the truncated SVD iterated (wide layers, see :data:`ITERATIVE_MIN_DIM`; then
    ``total_energy`` is the sum of all squared singular values, ``‖ΔW'‖²_F``); ``kept_eigen`` counts
    the eigen-directions of H that survived the cut-off.
    """

    A: torch.Tensor
    B: torch.Tensor
    singular_values: torch.Tensor
    kept_eigen: int
    total_energy: float | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def energy_retained(self) -> float:
        """Share of the projected residual's energy captured by the kept rank (0..1)."""
        s2 = self.singular_values.double() ** 2
        total = float(s2.sum()) if self.total_energy is None else self.total_energy
        return 1.0 if total == 0.0 else min(float(s2[: self.rank].sum()) / total, 1.0)


def check_rank(rank: int, out_features: int, in_features: int, name: str = "layer") -> None:
    """Raise ``ValueError`` unless ``0 < rank < min(out_features, in_features)``."""
    limit = min(out_features, in_features)
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"EoRA rank must be a positive integer, got {rank!r} for {name}.")
    if rank >= limit:
        raise ValueError(
            f"EoRA rank r={rank} is too large for {name} ({out_features}×{in_features}): it must be "
            f"smaller than min(out, in) = {limit}. Lower `r`, give this module a smaller rank with "
            f"`rank_pattern={{'{name.split('.')[-1]}': <r>}}`, or leave it out with "
            f"`exclude_modules=['{name.split('.')[-1]}']`."
        )


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """``torch.isfinite(t).all()``, row slices of about ``chunk`` elements at a time: ``isfinite``
    of a float64 matrix allocates ~1.4× the matrix in temporaries (2 GiB at 14336²), a slice ~10 MiB."""
    if t.dim() < 2:
        return bool(torch.isfinite(t).all())
    rows = max(1, chunk // max(1, t[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in t.split(rows))


#: Tile edge of the in-place symmetrisation in :func:`damped` (its only scratch: two tiles).
_SYM_TILE = 1024


def _symmetrize_(H: torch.Tensor) -> torch.Tensor:
    """``H ← 0.5·(H + Hᵀ)`` in place, tile by tile (bit for bit the out-of-place values; scratch: two tiles)."""
    n = H.shape[0]
    for i in range(0, n, _SYM_TILE):
        for j in range(i, n, _SYM_TILE):
            upper, lower = H[i:i + _SYM_TILE, j:j + _SYM_TILE], H[j:j + _SYM_TILE, i:i + _SYM_TILE]
            sym = 0.5 * (upper + lower.T)
            upper.copy_(sym)
            lower.copy_(sym.T)
    return H


def damped(H: Covariance | CovarianceRoot, damping: float) -> torch.Tensor:
    """Return ``H + damping·mean(diag H)·I`` in float64 (symmetrised), a new tensor (``H`` may be
    given as its parts, summed in float64).

    Memory: the float64 copy is the only ``n × n`` allocation (symmetrised tile by tile, the ridge
    added to its diagonal); the values are bit for bit those of ``0.5·(H + Hᵀ) + δ·m·I``. At
    14336² each avoided temporary is 1.5 GiB of GPU memory.
    """
    H = H.matrix() if isinstance(H, CovarianceRoot) else _symmetrize_(covariance64(H))
    if damping > 0:
        mean_diag = float(torch.diagonal(H).mean())
        if mean_diag > 0:
            H.diagonal().add_(damping * mean_diag)
    return H


def eigen_projection(
    H: torch.Tensor, damping: float = 0.0, eig_rtol: float = DEFAULT_EIG_RTOL
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return ``(S, S_pinv, kept)`` with ``S = Q·diag(√λ)`` and ``S_pinv = diag(1/√λ)·Qᵀ``.

    Eigenvalues below ``eig_rtol·λ_max`` are set to zero in both (pseudo-inverse). An all-zero
    H (no signal at all) falls back to the identity, i.e. plain SVD.
    """
    Hd = damped(H, damping)
    n = Hd.shape[0]
    if not _all_finite(Hd):
        raise ValueError("The activation covariance contains NaN or inf; check the calibration inputs.")
    lam, Q = _eigh(Hd)
    scales = _root_scales(lam, eig_rtol)
    if scales is None:
        eye = torch.eye(n, dtype=torch.float64, device=Hd.device)
        return eye, eye, n
    sqrt_lam, inv_sqrt, kept = scales
    S = Q * sqrt_lam  # Q @ diag(√λ)
    S_pinv = inv_sqrt[:, None] * Q.T  # diag(1/√λ) @ Qᵀ
    return S, S_pinv, kept


def _ridge_clears_cutoff(damping: float, n: int, eig_rtol: float) -> bool:
    """Whether the ridge ``δ·mean(diag H)·I`` alone keeps every eigenvalue of an ``n × n`` ``H_δ``
    above the ``eig_rtol`` cut-off (``δ > eig_rtol·n``): then no direction is cut, and any square root
    of ``H_δ`` (a Cholesky factor, the scoring's Gram matrices) gives the eigenbasis route's factors."""
    return damping > eig_rtol * max(n, 1)


def cholesky_projection(H: torch.Tensor, damping: float, eig_rtol: float = DEFAULT_EIG_RTOL,
                        overwrite: bool = False) -> Projection | None:
    """``H_δ = L·Lᵀ`` as a :class:`Projection`, or None where the eigendecomposition must be used.

    ``overwrite=True`` lets a float64 ``H`` be damped and factorised in place (no second ``n × n``
    matrix); it then holds ``L`` — or, where None is returned, no longer ``H``.

    Used when the ridge alone keeps every eigenvalue of ``H_δ`` above the ``eig_rtol`` cut-off
    (``δ > eig_rtol·n``: then no direction would be cut and both square roots give the same
    factors); a Cholesky is 10–75× cheaper than ``eigh`` (see ``benchmarks/linalg.py``).
    """
    n = H.shape[0]
    if not _ridge_clears_cutoff(damping, n, eig_rtol):
        return None
    # one float64 copy, damped and factorised in place (Cholesky reads its lower triangle only)
    Hd = H if (overwrite and H.dtype == torch.float64) else H.to(torch.float64, copy=True)
    if not _all_finite(Hd):
        raise ValueError("The activation covariance contains NaN or inf; check the calibration inputs.")
    mean_diag = float(torch.diagonal(Hd).mean())
    if mean_diag <= 0.0:  # no signal: the eigen path's identity fallback
        return None
    Hd.diagonal().add_(damping * mean_diag)
    if not _cholesky_(Hd):  # round-off: not positive definite after all
        return None
    return Projection(S=Hd.tril_(), kept=n, lower=True)


def projection_for(H: torch.Tensor, damping: float = 0.0, eig_rtol: float = DEFAULT_EIG_RTOL) -> Projection:
    """The cheapest exact :class:`Projection` of ``H + δ·mean(diag H)·I``: Cholesky when the ridge
    allows it (:func:`cholesky_projection`), else the eigendecomposition, applied as ``Q`` and its
    scales (:meth:`Eigen.root`: one ``n × n`` matrix where :func:`eigen_projection` makes three)."""
    return projection_and_root(H, damping, eig_rtol)[0]


def projection_and_root(H: Covariance, damping: float = 0.0,
                        eig_rtol: float = DEFAULT_EIG_RTOL) -> tuple[Projection, CovarianceRoot]:
    """:func:`projection_for` and ``H`` as a :class:`CovarianceRoot` sharing its matrix, for the
    statistics once ``H`` itself is dropped::

        projection, root = projection_and_root(H, 0.01)
        f = eora_factors(delta, None, 8, projection=projection)
        weighted_error(delta, root, f.B @ f.A)          # ‖(ΔW − BA)·Xᵀ‖ without H

    Cholesky route: ``root = (L, shift=δ·mean(diag H))``; eigen route: ``Q·diag(√λ)`` (λ of ``H``).
    """
    if isinstance(H, torch.Tensor):
        proj = cholesky_projection(H, damping, eig_rtol)
        if proj is not None:
            mean_diag = float(torch.diagonal(H).to(torch.float64).mean())
            return proj, CovarianceRoot(S=proj.S, shift=damping * mean_diag)
    e = eigen(H)
    return e.root(damping, eig_rtol), CovarianceRoot(S=e.Q, scale=e.lam.clamp_min(0).sqrt())


def _root_scales(lam: torch.Tensor, eig_rtol: float) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(√λ, 1/√λ, kept)`` with eigenvalues below ``eig_rtol·λ_max`` zeroed in both; None if λ_max ≤ 0."""
    lam_max = float(lam.max()) if lam.numel() else 0.0
    if lam_max <= 0.0:
        return None
    keep = lam > eig_rtol * lam_max
    sqrt_lam = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv_sqrt = torch.where(keep, 1.0 / torch.where(keep, sqrt_lam, torch.ones_like(lam)), torch.zeros_like(lam))
    return sqrt_lam, inv_sqrt, int(keep.sum())


def eora_factors(
    delta: torch.Tensor,
    H: torch.Tensor | None,
    rank: int,
    method: Method = "eora",
    damping: float = 0.0,
    eig_rtol: float = DEFAULT_EIG_RTOL,
    name: str = "layer",
    projection: Projection | tuple[torch.Tensor, torch.Tensor, int] | None = None,
    start: torch.Tensor | None = None,
) -> Factors:
    """Factor the residual ``delta`` (out × in) into ``B @ A`` of rank ``rank``.

    ``H`` is the (unnormalised or normalised, the scale does not matter) input second moment
    ``Σ xᵀx``; it is ignored for ``method="svd"``. Layers sharing one input (q/k/v) can share
    the decomposition: pass ``projection=projection_for(H, damping, eig_rtol)`` (or the tuple
    of :func:`eigen_projection`; ``H`` may then be None). ``start``: a first block for the truncated
    SVD's iteration (see :func:`truncated_svd`; ``DampingChoice.basis``). Returns float32 factors.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown EoRA method {method!r}; choose one of {METHODS}.")
    if delta.ndim != 2:
        raise ValueError(f"{name}: the residual must be a 2-D matrix, got shape {tuple(delta.shape)}.")
    out_f, in_f = delta.shape
    check_rank(rank, out_f, in_f, name)
    if not damping >= 0:
        raise ValueError(f"damping must be a number ≥ 0, got {damping!r}.")
    if damping == math.inf and projection is None:  # the limit δ → ∞ of the weighting: plain SVD
        method, H = "svd", None
    D = delta.to(torch.float64, memory_format=torch.contiguous_format)  # delta itself if already so
    if not _all_finite(D):
        raise ValueError(f"{name}: the weight residual contains NaN or inf; check both models' weights.")

    if method == "svd" or (H is None and projection is None):
        if method == "eora":
            raise ValueError(f"{name}: method 'eora' needs the activation covariance H.")
        kept = in_f
        Dp = D
    else:
        if H is not None and H.shape != (in_f, in_f):
            raise ValueError(
                f"{name}: covariance shape {tuple(H.shape)} does not match the layer's input size {in_f}."
            )
        if projection is None:
            projection = projection_for(H.to(D.device), damping, eig_rtol)
        elif not isinstance(projection, Projection):
            S_, S_pinv_, kept_ = projection
            projection = Projection(S=S_, kept=kept_, S_pinv=S_pinv_)
        kept = projection.kept
        if D is delta:  # a row-major float64 residual passed in: projected in our own copy
            D = D.clone()
        Dp = projection.project_(D)
        del D

    U, sv, Vh = truncated_svd(Dp, rank, start=start)
    # the iterative route gives the top of the spectrum only: the whole spectrum's energy is ‖Dp‖²
    total = float(torch.linalg.vector_norm(Dp)) ** 2 if sv.numel() < min(out_f, in_f) else None
    root = sv[:rank].sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    if method != "svd" and projection is not None:
        A = projection.unproject(A)
    return Factors(A=A.float(), B=B.float(), singular_values=sv.float(), kept_eigen=kept, total_energy=total)


#: Gram matrices at least this wide have their top eigenvectors found by Chebyshev-filtered
#: subspace iteration (:func:`peft_eora.topeig.top_eigh`: matrix products, stopped on an error
#: bound of 1e-10 of the kept energy) instead of a full ``eigh``, where the block it iterates is
#: at most half the width. 4096² float64 on an H200: ``eigh`` 0.11 s. Below it (every layer of
#: SmolLM2-135M) ``eigh`` is cheap and exact. ``PEFT_EORA_ITERATIVE_MIN_DIM=0``: always iterate
#: where the block allows; a huge value: never.
ITERATIVE_MIN_DIM = int(os.environ.get("PEFT_EORA_ITERATIVE_MIN_DIM", "2048"))


def _score_tol() -> float:
    text = os.environ.get("PEFT_EORA_SCORE_TOL", "1e-6")
    try:
        tol = float(text)
    except ValueError:
        tol = math.nan
    if not 0.0 < tol < 1.0:
        raise ValueError(f"PEFT_EORA_SCORE_TOL must be a number in (0, 1), e.g. 1e-6; got {text!r}.")
    return tol


#: Stopping bound of the iterative route (:func:`peft_eora.topeig.top_eigh`'s ``tol``) for the
#: truncated SVDs that only score a ridge candidate of ``damping="auto"``; the final factors keep
#: :data:`peft_eora.topeig.DEFAULT_TOL`. A held-out error scored this way is good to about this
#: much (relative; ~1.2e-6 at 1e-6 on flat spectra, ~2e-6 seen with a dead channel), so candidates closer than that are told
#: apart by the iteration rather than by :data:`AUTO_DAMPING_TIE_RTOL` (their errors then differ by
#: less than it). Only Gram matrices of :data:`ITERATIVE_MIN_DIM` and wider are iterated; below,
#: ``eigh`` scores exactly. ``PEFT_EORA_SCORE_TOL`` overrides it.
SCORE_TOL = _score_tol()


def _gram_top(G: torch.Tensor, rank: int, owned: bool = False, start: torch.Tensor | None = None,
              tol: float = topeig.DEFAULT_TOL,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-``rank`` eigenvectors of a Gram matrix ``G = M·Mᵀ``, the singular values ``σ`` of ``M``
    (descending: all of them from ``eigh``, the top ``rank`` from the iterative route, see
    :data:`ITERATIVE_MIN_DIM`), which of the top ``rank`` are above ``1e-7·σ₁`` (the rest count
    as zero) and the iterative route's Ritz block (a ``start`` for a nearby Gram matrix; None from
    ``eigh``). ``owned``: ``G`` is the caller's scratch and is symmetrised in place (no two temporaries);
    ``tol``: the iteration's stopping bound (:func:`peft_eora.topeig.top_eigh`)."""
    Gs = _symmetrize_(G) if owned else 0.5 * (G + G.T)
    n = Gs.shape[0]
    found = basis = None
    if n >= ITERATIVE_MIN_DIM and 2 * topeig.block_size(n, rank) <= n:
        info: dict = {}
        found = topeig.top_eigh(Gs, rank, tol=tol, info=info, start=start)  # products: every thread (no _lapack_threads)
        basis = info.get("basis")
    if found is not None:
        lam, vecs = found
    else:
        lam, vecs = _eigh(Gs)
        lam, vecs = lam.flip(0), vecs[:, n - min(rank, n):].flip(1)  # flip only the kept columns
    sv = lam.clamp_min(0).sqrt()
    floor = max(float(sv[0]) if sv.numel() else 0.0, 0.0) * 1e-7
    return vecs[:, :rank], sv, sv[:rank] > floor, basis


def truncated_svd(D: torch.Tensor, rank: int, col_scale: torch.Tensor | None = None,
                  gram: torch.Tensor | None = None, start: torch.Tensor | None = None,
                  on_basis: Callable[[torch.Tensor], None] | None = None, tol: float = topeig.DEFAULT_TOL,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of a float64 matrix and its spectrum, via the Gram matrix.

    ``eigh`` of the smaller Gram matrix (``D·Dᵀ`` or ``Dᵀ·D``) is 10–50× faster on a CPU than a
    full SVD of a rectangular matrix, and in float64 its squared condition number costs nothing
    that matters here (singular values below ~1e-8·σ₁ come out as zero). Returns
    ``(U_r, σ, V_rᵀ)`` with σ the whole spectrum (descending; its top ``rank`` values only where
    the Gram matrix is wide enough to iterate, see :data:`ITERATIVE_MIN_DIM`); columns of ``U_r`` with σ below
    ``1e-7·σ₁`` are zero, so ``U_r·U_rᵀ·D`` is the rank-``rank`` approximation in every case.

    ``col_scale`` (``s``): the triplets of ``D·diag(s)`` without forming it when ``D`` is tall
    (``out > in``), whose Gram matrix is ``diag(s)·DᵀD·diag(s)``; ``gram``: that ``DᵀD``, when the
    caller scores several scalings of one ``D``. ``start``: the iterative route's first block (the
    Gram matrix's rows: ``out`` for a wide ``D``, ``in`` for a tall one), e.g. what ``on_basis``
    received for a nearby matrix; ``on_basis`` is called with the iterative route's Ritz block;
    ``tol``: the iterative route's stopping bound (:data:`SCORE_TOL` where a result is only scored).
    """
    m, n = D.shape
    wide = m <= n
    if wide and col_scale is None:
        G = D @ D.T
    elif wide:  # (D·diag(s))·(D·diag(s))ᵀ a block of columns at a time: no scaled copy of D
        G = D.new_zeros((m, m))
        step = _block_len(m, D.element_size())
        for j in range(0, n, step):
            Ds = D[:, j:j + step] * col_scale[j:j + step]
            G.addmm_(Ds, Ds.T)
    elif col_scale is None:
        G = D.T @ D if gram is None else gram.clone()
    else:
        G = (D.T @ D if gram is None else gram) * col_scale[:, None]
        G.mul_(col_scale[None, :])
    top, sv, live, basis = _gram_top(G, rank, owned=True, start=start, tol=tol)
    if basis is not None and on_basis is not None:
        on_basis(basis)
    s = sv[:rank]
    inv = torch.where(live, 1.0 / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(s))
    if wide:  # top = U_r; V_rᵀ = diag(1/σ)·U_rᵀ·D·diag(s) (directions with σ ≈ 0 dropped from both)
        U, Vh = top * live, inv[:, None] * (top.T @ D)
        if col_scale is not None:
            Vh.mul_(col_scale)
    else:  # top = V_r; U_r = D·diag(s)·V_r·diag(1/σ)
        U, Vh = (D @ (top if col_scale is None else col_scale[:, None] * top)) * inv, top.T
    return U, sv, Vh


def weighted_error(delta: torch.Tensor, H: Covariance | CovarianceRoot, approx: torch.Tensor | None = None) -> float:
    """Activation-weighted error ``‖(delta − approx)·Xᵀ‖_F = sqrt(tr(E H Eᵀ))`` via H = Σ xᵀx
    (or its parts: the traces add up; or a :class:`CovarianceRoot`: ``‖E·S‖² − shift·‖E‖²``, ``E`` a
    block of rows at a time, in float64).

    float64 on the CPU; on a GPU the products run in H's own precision (float32: no n² float64
    copy of H) and are summed in float64 — a statistic, not an input of the factors. Only ``E`` is
    whole: ``H`` is read a block of rows at a time (``tr(E·H·Eᵀ) = Σ_j tr(E·H[j]ᵀ·E[:, j]ᵀ)``), so
    neither a float64 copy of ``H`` nor the ``out × in`` product ``E·H`` is ever made.
    """
    if isinstance(H, CovarianceRoot):
        return _root_error(delta, H, approx)
    parts = covariance_parts(H)
    E = delta.detach().to(_stats_dtype(parts[0]), copy=True)
    if approx is not None:
        E.sub_(approx.detach().to(E))
    return math.sqrt(max(float(_trace_sq(E, parts)), 0.0))


def _stats_dtype(H: torch.Tensor) -> torch.dtype:
    """The precision of the statistics' products with a covariance ``H``: float64, but float32 for a
    float32 ``H`` on a GPU (no ``n²`` float64 copy of ``H``; the sums stay float64)."""
    return torch.float32 if H.is_cuda and H.dtype == torch.float32 else torch.float64


def _trace_sq(E: torch.Tensor, H: Covariance) -> torch.Tensor:
    """``tr(E·H·Eᵀ)`` as a float64 scalar on ``E``'s device (no sync), ``H`` (or each of its parts)
    read a block of rows at a time in ``E``'s dtype: ``Σ_j tr(E·H[j]ᵀ·E[:, j]ᵀ)``."""
    val = torch.zeros((), dtype=torch.float64, device=E.device)
    for part in covariance_parts(H):  # blocks of H's rows and of E·H[j]ᵀ (out × step) both ~64 MiB
        step = _block_len(max(part.shape[1], E.shape[0]), E.element_size())
        for j in range(0, part.shape[0], step):
            rows = part[j:j + step].detach().to(E)
            val += ((E @ rows.T) * E[:, j:j + step]).sum(dtype=torch.float64)
            del rows  # before the next block is made
    return val


def _root_error(delta: torch.Tensor, H: CovarianceRoot, approx: torch.Tensor | None) -> float:
    S = H.S.to(torch.float64)
    val = torch.zeros((), dtype=torch.float64, device=S.device)
    step = _block_rows(S)
    for i in range(0, delta.shape[0], step):
        E = delta[i:i + step].detach().to(S.device, torch.float64, copy=True)  # a float64 delta is not written over
        if approx is not None:
            E.sub_(approx[i:i + step].detach().to(E))
        ES = E @ S if H.scale is None else (E @ S) * H.scale.to(E)
        val += (ES * ES).sum()
        if H.shift:
            val -= H.shift * (E * E).sum()
    return math.sqrt(max(float(val), 0.0))


def weighted_errors(delta: torch.Tensor, H: Covariance | CovarianceRoot, B: torch.Tensor,
                    A: torch.Tensor) -> tuple[float, float]:
    """``(weighted_error(delta, H), weighted_error(delta, H, B @ A))`` — the error before and after
    the factors — in one pass over ``H``::

        before, after = weighted_errors(delta, root, f.B, f.A)

    The ``out × in × in`` product (``ΔW·S``, or ``ΔW·H`` a block of ``H``'s rows at a time) is made
    once and the factors' share taken off it through ``A`` (``B·(A·S)``, ``r × in × in``): half the
    work of two calls, and the dense ``B·A`` (``out × in``) is never made (only blocks of its rows or
    columns). Same precisions as :func:`weighted_error`.
    """
    if isinstance(H, CovarianceRoot):
        S = H.S.to(torch.float64)
        Ad, Bd = A.detach().to(S), B.detach().to(S)
        As = Ad @ S  # r × in
        if H.scale is not None:
            As.mul_(H.scale.to(As))
        sums = torch.zeros(2, dtype=torch.float64, device=S.device)
        step = _block_rows(S)
        for i in range(0, delta.shape[0], step):
            D = delta[i:i + step].detach().to(S.device, torch.float64)
            DS = D @ S if H.scale is None else (D @ S) * H.scale.to(D)
            sums[0] += (DS * DS).sum()
            DS.sub_(Bd[i:i + step] @ As)  # (D − B·A)·S
            sums[1] += (DS * DS).sum()
            del DS
            if H.shift:
                E = D - Bd[i:i + step] @ Ad
                sums[0] -= H.shift * (D * D).sum()
                sums[1] -= H.shift * (E * E).sum()
        before, after = sums.tolist()
        return math.sqrt(max(before, 0.0)), math.sqrt(max(after, 0.0))
    parts = covariance_parts(H)
    D = delta.detach().to(_stats_dtype(parts[0]))
    Bd, Ad = B.detach().to(D), A.detach().to(D)
    sums = torch.zeros(2, dtype=torch.float64, device=D.device)
    for part in parts:  # blocks of H's rows and of D·H[j]ᵀ (out × step) both ~64 MiB
        step = _block_len(max(part.shape[1], D.shape[0]), D.element_size())
        for j in range(0, part.shape[0], step):
            rows = part[j:j + step].detach().to(D)
            DR = D @ rows.T  # out × step
            Dj = D[:, j:j + step]
            sums[0] += (DR * Dj).sum(dtype=torch.float64)
            DR.sub_(Bd @ (Ad @ rows.T))  # (D − B·A)·H[j]ᵀ
            sums[1] += (DR * (Dj - Bd @ Ad[:, j:j + step])).sum(dtype=torch.float64)
            del rows, DR
    before, after = sums.tolist()
    return math.sqrt(max(before, 0.0)), math.sqrt(max(after, 0.0))


def _cov_times(H: Covariance, M: torch.Tensor) -> torch.Tensor:
    """``H·M`` (``in × k``, float64, on ``M``'s device) for a float64 ``M``, ``H`` (or each of its parts)
    read a block of rows at a time: no float64 copy of ``H``."""
    out = M.new_zeros((M.shape[0], M.shape[1]))
    for part in covariance_parts(H):
        step = _block_rows(part, 8)
        for j in range(0, part.shape[0], step):
            out[j:j + step].addmm_(part[j:j + step].detach().to(M), M)
    return out


def _rows_times(D: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``D·M`` in float64 (``out × k``) for a residual ``D`` of any dtype, a block of its rows converted
    at a time: no float64 copy of ``D`` (448 MiB for an 8B ``down_proj``)."""
    out = M.new_empty((D.shape[0], M.shape[1]))
    step = _block_rows(D, 8)
    for i in range(0, D.shape[0], step):
        torch.mm(D[i:i + step].detach().to(M), M, out=out[i:i + step])
    return out


def weighted_errors_known(delta: torch.Tensor, H: Covariance, B: torch.Tensor, A: torch.Tensor,
                          before_sq: float) -> tuple[float, float]:
    """:func:`weighted_errors` where ``before_sq = tr(ΔW·H·ΔWᵀ)`` is known (:meth:`GramPencil.before_sq`)::

        before, after = weighted_errors_known(delta, (H_fit, H_val), f.B, f.A, choice.gram.before_sq())

    ``tr(E·H·Eᵀ) = tr(ΔW·H·ΔWᵀ) − 2·tr(Bᵀ·ΔW·(H·Aᵀ)) + tr(BᵀB·A·(H·Aᵀ))`` for ``E = ΔW − B·A``: the
    only product with ``H`` is ``H·Aᵀ`` (``in × in × r``, ``H`` read a block of rows at a time) instead
    of :func:`weighted_errors`' ``out × in × in``. In float64; the three terms cancel down to
    about 1e-16 of the error before, i.e. an error after of ~1e-8 of it where the factors are exact
    (as precise as ``before_sq``: from a residual rounded to float32, ~1e-4 of it).
    """
    device = covariance_parts(H)[0].device
    Ad, Bd = A.detach().to(device, torch.float64), B.detach().to(device, torch.float64)
    HA = _cov_times(H, Ad.T)  # in × r
    cross = float((Bd * _rows_times(delta, HA)).sum())
    quad = float(((Bd.T @ Bd) * (Ad @ HA)).sum())
    return math.sqrt(max(before_sq, 0.0)), math.sqrt(max(before_sq - 2.0 * cross + quad, 0.0))


# --------------------------------------------------------------------------------------------
# damping="auto": the ridge strength chosen on held-out calibration tokens
# --------------------------------------------------------------------------------------------

#: ``(A, B) → (Â, B̂)``: how the factors will be stored (e.g. rounded to int4), for ``damping="auto"``.
RoundFactors = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: Ridge strengths (relative to ``mean(diag H)``) that ``damping="auto"`` chooses from. ``inf`` is
#: plain SVD of the residual (the limit δ → ∞), so a per-layer choice on held-out windows never
#: picks factors that do worse there than the SVD baseline.
AUTO_DAMPING_GRID: tuple[float, ...] = (0.0, 1e-2, 1e-1, 0.3, 1.0, 3.0, math.inf)

#: ``damping="auto"`` holds out calibration window ``i`` (counted over all batches) when
#: ``i % AUTO_HOLDOUT_EVERY == AUTO_HOLDOUT_EVERY − 1``: every second window, a deterministic half.
#: Half rather than a quarter (4): lower WikiText-2 perplexity in all six rows measured on
#: SmolLM2-135M at the same compute (benchmarks/results/README.md, "Measured").
AUTO_HOLDOUT_EVERY = 2

#: Held-out errors within this relative distance of the best count as a tie, won by the larger δ
#: (closer to plain SVD, i.e. less fitted to the calibration domain, at no measurable cost).
AUTO_DAMPING_TIE_RTOL = 1e-9


@dataclass(frozen=True)
class Eigen:
    """``H = Q·diag(lam)·Qᵀ`` of a symmetrised covariance (float64) and ``mean(diag H)``.

    A ridge only shifts the eigenvalues (``H + c·I`` has the eigenvectors of ``H``), so one
    decomposition serves every damping::

        e = eigen(H)
        S, S_pinv, kept = e.projection(0.01)     # same as eigen_projection(H, 0.01)
    """

    lam: torch.Tensor
    Q: torch.Tensor
    mean_diag: float

    def scales(self, damping: float, eig_rtol: float = DEFAULT_EIG_RTOL) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(√λ_δ, 1/√λ_δ, kept)`` of ``H + δ·mean(diag H)·I`` (cut-off as in :func:`eigen_projection`).

        An H without signal (λ_max ≤ 0), or ``damping=inf``, gives ones: the projection is a
        rotation, i.e. plain SVD.
        """
        if damping == math.inf:
            ones = torch.ones_like(self.lam)
            return ones, ones, ones.numel()
        _check_damping(damping)
        lam = self.lam + damping * self.mean_diag if damping > 0 and self.mean_diag > 0 else self.lam
        scales = _root_scales(lam, eig_rtol)
        if scales is None:
            ones = torch.ones_like(self.lam)
            return ones, ones, ones.numel()
        return scales

    def projection(self, damping: float, eig_rtol: float = DEFAULT_EIG_RTOL) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(S, S_pinv, kept)`` for ``eora_factors(..., projection=...)`` at ridge ``damping``."""
        sqrt_lam, inv_sqrt, kept = self.scales(damping, eig_rtol)
        return self.Q * sqrt_lam, inv_sqrt[:, None] * self.Q.T, kept

    def root(self, damping: float, eig_rtol: float = DEFAULT_EIG_RTOL) -> Projection:
        """The same projection as :meth:`projection` without making ``S`` or ``S⁺`` (two more
        ``n × n`` matrices): ``Q`` and the scales, applied as they are."""
        sqrt_lam, inv_sqrt, kept = self.scales(damping, eig_rtol)
        return Projection(S=self.Q, kept=kept, scale=sqrt_lam, inv_scale=inv_sqrt)


def eigen(H: Covariance, overwrite: bool = False) -> Eigen:
    """Eigendecompose the symmetrised ``H`` once in float64 (see :class:`Eigen`).

    The eigenvectors are written over a float64 copy of ``H`` (``Q`` is a column-major view of
    it); ``overwrite=True`` lets a float64 ``H`` be that copy (the caller's matrix then holds ``Qᵀ``).
    """
    own = overwrite and isinstance(H, torch.Tensor) and H.dtype == torch.float64 and H.is_contiguous()
    Hd = _symmetrize_(H) if own else damped(H, 0.0)
    if not _all_finite(Hd):
        raise ValueError("The activation covariance contains NaN or inf; check the calibration inputs.")
    mean_diag = float(torch.diagonal(Hd).mean()) if Hd.shape[0] else 0.0
    lam, Q = _eigh_(Hd)
    return Eigen(lam=lam, Q=Q, mean_diag=mean_diag)


@dataclass(frozen=True)
class DampingChoice:
    """The ridge ``damping`` chosen on held-out tokens and the held-out error of every candidate.

    ``errors[δ]`` is ``‖(ΔW − B_δ·A_δ)·X_valᵀ‖_F`` with ``B_δ, A_δ`` fitted on the other tokens, for
    every candidate scored (``select_damping(..., early_stop=True)`` skips ridges past the first rise).
    ``basis``: for a wide residual (``out ≤ in``) scored by the iterative route, the chosen
    candidate's Ritz block (``out × q``), a start for the refit on all tokens
    (``refit_auto(..., start=choice.basis)``); else None.
    """

    damping: float
    errors: dict[float, float]
    basis: torch.Tensor | None = field(default=None, compare=False, repr=False)
    #: a residual scored from Gram matrices (:func:`_gram_scores`): those matrices, for :func:`gram_refit`
    gram: GramPencil | None = field(default=None, compare=False, repr=False)


class GramPencil:
    """What a residual's ridge scoring made from Gram matrices (:func:`_gram_scores`), kept for its
    refit (:func:`gram_refit`): ``G0 = M·H_fit·Mᵀ``, ``K = M·H_val·Mᵀ`` and ``G1 = M·Mᵀ`` (float64) with
    ``M = ΔW`` for a wide residual and ``M = R`` (``in × in``, ``RᵀR = ΔWᵀΔW``: :func:`_gram_root`) for a
    tall one, and ``trace = tr(H_fit + H_val)``. On all tokens the ridge-δ Gram matrix of ``M·S``
    (``S·Sᵀ = H_fit + H_val + δ·m·I``, ``m = trace / in``) is ``G0 + K + δ·m·G1``: the refit needs
    neither ``H_fit + H_val`` in float64 nor its factorisation nor an ``out × in × in`` product (for an
    8B ``down_proj``: 1.5 GiB, 14336³/3 and 4096·14336² multiply-adds). :meth:`take` hands the
    matrices over once (the refit writes over them)."""

    def __init__(self, G0: torch.Tensor, K: torch.Tensor, G1: torch.Tensor, trace: float,
                 root: torch.Tensor | None = None) -> None:
        self._mats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (G0, K, G1)
        self.trace = trace
        self.root = root  # R of a tall residual (handed over by take); None: M = ΔW
        self.tall = root is not None
        #: the chosen candidate's Ritz block where it lives in ``M``'s space (a tall residual's)
        self.start: torch.Tensor | None = None
        #: ``diag(M·(H_fit + H_val)·Mᵀ)``: for a wide residual, each output row's error before the factors
        self._rows = torch.diagonal(G0) + torch.diagonal(K)

    def before_sq(self, row_weight: torch.Tensor | None = None) -> float | None:
        """``tr(ΔW·(H_fit + H_val)·ΔWᵀ)`` (the squared error before the factors, for
        :func:`weighted_errors_known`) of the residual ``diag(√w)·ΔW`` scored here, for
        ``row_weight = w``: the ``ΔW`` of ``diag(√w)·ΔW`` (None where a tall one's rows are unknown)."""
        if row_weight is None:
            return float(self._rows.sum())
        if self.tall:  # the rows are R's, not ΔW's
            return None
        return float((self._rows / row_weight.to(self._rows)).sum())

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(G0, K, G1, R, start)``, once: the pencil keeps none of them after."""
        if self._mats is None:
            raise RuntimeError("the Gram matrices of this choice were already used by a refit")
        taken = (*self._mats, self.root, self.start)
        self._mats = self.root = self.start = None
        return taken


class _RidgeStarts:
    """Start blocks for one layer's ridge candidates (:func:`peft_eora.topeig.top_eigh`'s ``start``).

    A wide residual's candidates have the Gram matrices ``G₀ + δ·m·G₁`` (``G₁``: plain SVD's, δ → ∞),
    whose top eigenvectors lie mostly in the span of ``G₀``'s and ``G₁``'s, and a tall one's move as
    smoothly with δ: every finite ridge after the smallest starts from the span of the Ritz blocks
    of the smallest ridge and of plain SVD (the *anchors*). :func:`_score_ridges` scores the anchors
    first and a candidate only once its anchors are done, so each candidate's start, hence its
    result, is the same whether ridges are scored one at a time or in threads."""

    def __init__(self, grid: tuple[float, ...]) -> None:
        self.anchors = tuple(_finite_ridges(grid)[:1]) + ((math.inf,) if math.inf in grid else ())
        self.bases: dict[float, torch.Tensor] = {}

    def needs(self, d: float) -> tuple[float, ...]:
        """The ridges whose results ``d``'s start is made of."""
        return () if d in self.anchors else self.anchors

    def start(self, d: float) -> torch.Tensor | None:
        blocks = [self.bases[a] for a in self.needs(d) if a in self.bases]  # an anchor by eigh: none
        return torch.cat(blocks, dim=1) if blocks else None

    def record(self, d: float, basis: torch.Tensor | None) -> None:
        """Keep ``d``'s Ritz block (None, from ``eigh``: nothing to keep)."""
        if basis is not None:
            self.bases[d] = basis


def _finite_ridges(grid: tuple[float, ...]) -> list[float]:
    """The finite ridges of ``grid``, ascending: the order they are scored in."""
    return sorted({float(d) for d in grid if d != math.inf})


def _check_damping(damping: float) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number ≥ 0, got {damping!r}.")


def _check_residual(delta: torch.Tensor, rank: int, name: str) -> torch.Tensor:
    if delta.ndim != 2:
        raise ValueError(f"{name}: the residual must be a 2-D matrix, got shape {tuple(delta.shape)}.")
    check_rank(rank, *delta.shape, name)
    D = delta.double()
    if not _all_finite(D):
        raise ValueError(f"{name}: the weight residual contains NaN or inf; check both models' weights.")
    return D


def _check_cov(H: torch.Tensor, in_f: int, name: str, label: str = "covariance") -> None:
    if H.shape != (in_f, in_f):
        raise ValueError(f"{name}: {label} shape {tuple(H.shape)} does not match the layer's input size {in_f}.")


def select_damping(
    delta: torch.Tensor,
    H_fit: torch.Tensor,
    H_val: torch.Tensor,
    rank: int,
    grid: tuple[float, ...] = AUTO_DAMPING_GRID,
    eig_rtol: float = DEFAULT_EIG_RTOL,
    name: str = "layer",
    fit: Eigen | Callable[[], Eigen] | None = None,
    round_factors: RoundFactors | None = None,
    early_stop: bool = True,
    cut_free: bool | Callable[[], bool] | None = None,
) -> DampingChoice:
    """Choose the ridge δ in ``grid`` whose rank-``rank`` factors, fitted on ``H_fit``, have the
    smallest activation-weighted error on held-out tokens (``H_val = Σ x_valᵀx_val``)::

        choice = select_damping(delta, X_fit.T @ X_fit, X_val.T @ X_val, rank=8)
        choice.damping, choice.errors          # e.g. 0.01, {0.0: 3.1, 0.001: 2.9, ...}

    ``H_fit`` is decomposed once (pass ``fit=eigen(H_fit)``, or a function returning it, to share it
    across layers with one input); a residual whose ``H_fit`` has no eigenvalue under the cut-off
    needs no decomposition of ``H_fit`` at all (see :func:`_gram_scores`; a tall one is scored
    through its ``in × in`` Gram root, :func:`_gram_root`, unless it is short of full rank). That
    test is one Cholesky factorisation per ``H_fit``: pass ``cut_free`` (:func:`is_cut_free`'s
    answer, or a function returning it) to share it likewise. Each
    candidate costs one truncated SVD (an ``eigh`` of the smaller Gram matrix, or from 2048 wide an
    iteration started from the smallest ridge's and plain SVD's results, see :class:`_RidgeStarts`)
    and one ``k × k × r`` product (``k``: the smaller side). With ``early_stop`` (default) the finite ridges are scored in ascending
    order until the held-out error first rises, and plain SVD (``inf``) is always scored: on
    SmolLM2-135M (GPTQ 3-bit r=64, 4-bit r=128) that picked the full grid's choice for every layer
    while scoring ~4.4 of 7 candidates. Ties (within
    ``AUTO_DAMPING_TIE_RTOL``) go to the larger δ. With ``round_factors`` (``(A, B) → (Â, B̂)``,
    e.g. int4 rounding of the adapter), each candidate is scored as it will be stored: small ridges
    give ``A`` columns scaled by large ``1/√λ`` that coarse grids round badly, so the choice differs.
    """
    D = _check_residual(delta, rank, name)
    out_f, in_f = D.shape
    _check_cov(H_fit, in_f, name, "fit covariance")
    _check_cov(H_val, in_f, name, "held-out covariance")
    if not grid:
        raise ValueError("The damping grid is empty.")
    for d in grid:
        if d != math.inf:
            _check_damping(d)
    if not _all_finite(H_val):
        raise ValueError(f"{name}: the held-out covariance contains NaN or inf; check the calibration inputs.")
    if float(torch.diagonal(H_val).sum(dtype=torch.float64)) <= 0.0:
        raise ValueError(f"{name}: the held-out covariance is zero (no held-out token): cannot choose the damping.")
    starts = _RidgeStarts(grid)
    if round_factors is None:
        del D  # made again once H_fit is tested: its float64 copy is the largest matrix alive then
        gram = _gram_scores(delta, H_fit, H_val, rank, grid, eig_rtol, early_stop, name, starts, cut_free)
        if gram is not None:  # a tall residual's Ritz blocks live in its Gram root's space: not refit_auto's start
            errors, pencil = gram
            choice = _choose(errors, starts.bases if out_f <= in_f else {}, pencil)
            if pencil.tall:  # R's space: a start for gram_refit only
                pencil.start = starts.bases.get(choice.damping)
            return choice
        D = _check_residual(delta, rank, name)
    # Where no eigenvalue is cut, B·A = U_r·U_rᵀ·ΔW (U_r: the candidate's top left singular vectors),
    # so its held-out error is tr(K) − tr(U_rᵀ·K·U_r) with K = ΔW·H_val·ΔWᵀ, shared by every candidate.
    outside = _outside_errors(D, H_val) if round_factors is None else None
    fit = fit() if callable(fit) else fit
    fit = eigen(H_fit.to(D.device)) if fit is None else fit
    Q = fit.Q.to(D.device)
    DQ = D @ Q  # the residual in H_fit's eigenbasis, shared by every candidate
    # a tall residual's candidates all have the Gram matrix diag(s)·(DQᵀ·DQ)·diag(s): made once
    gram = DQ.T @ DQ if out_f > in_f else None

    def score(d: float) -> float:
        sqrt_lam, inv_sqrt, kept = fit.scales(d, eig_rtol)
        U, sv, Vh = truncated_svd(DQ, rank, col_scale=sqrt_lam, gram=gram, start=starts.start(d),
                                  on_basis=functools.partial(starts.record, d), tol=SCORE_TOL)
        if outside is not None and kept == in_f:
            return outside(U[:, :rank])
        root = sv[:rank].sqrt()
        B = U[:, :rank] * root
        A = ((root[:, None] * Vh[:rank]) * inv_sqrt) @ Q.T  # r × in: back in the input basis
        if round_factors is not None:  # scored as it will be stored
            A, B = (t.to(D) for t in round_factors(A, B))
        return math.sqrt(_residual_sq(D, B, A, H_val))

    # a wide residual's Gram matrices are out × out, as the refit's: the chosen one's block starts it
    errors = _score_ridges(grid, score, early_stop, D.device, starts.needs)
    return _choose(errors, starts.bases if out_f <= in_f else {})


def _choose(errors: dict[float, float], bases: dict[float, torch.Tensor],
            gram: GramPencil | None = None) -> DampingChoice:
    best = min(errors.values())
    chosen = max(d for d, e in errors.items() if e <= best * (1 + AUTO_DAMPING_TIE_RTOL))
    return DampingChoice(damping=chosen, errors=errors, basis=bases.get(chosen), gram=gram)


def _ridge_workers(device: torch.device) -> int:
    """Ridges to score at once on ``device``: one on accelerators (their kernels fill the device)
    and on CPUs with more threads than the workers' LAPACK calls use (there each ridge's products
    use every thread; in a worker they would run on one)."""
    if device.type != "cpu" or DAMPING_WORKERS <= 1:
        return 1
    return DAMPING_WORKERS if torch.get_num_threads() <= DAMPING_WORKERS * max(LAPACK_THREADS, 1) else 1


def _score_ridges(grid: tuple[float, ...], score: Callable[[float], float], early_stop: bool,
                  device: torch.device,
                  needs: Callable[[float], tuple[float, ...]] | None = None) -> dict[float, float]:
    """Held-out errors ``{δ: score(δ)}`` of the ridges of ``grid`` to score: the finite ones
    ascending — with ``early_stop`` until the error first rose between the last two — and plain SVD
    (``inf``) always.

    On a small CPU, :data:`DAMPING_WORKERS` ridges are scored at once (threads, single-threaded
    LAPACK): the next ridges the rule may need are scored speculatively beside the one it needs; any
    scored past the stop are dropped (and their errors, if they raised, ignored), so the errors
    returned — and the choice — are those of scoring one at a time. ``needs(δ)``: ridges that must
    be scored before δ starts (:class:`_RidgeStarts`' anchors, whose results start δ's iteration).
    """
    finite = _finite_ridges(grid)
    want_svd = math.inf in grid
    workers = _ridge_workers(device)
    errors: dict[float, float] = {}
    failed: dict[float, BaseException] = {}

    def value(d: float) -> float:
        if d in failed:  # a ridge scored speculatively, now needed: its error stands
            raise failed[d]
        return errors[d]

    def prefix() -> tuple[list[float], bool]:  # the finite ridges scored one at a time would score; done?
        scored: list[float] = []
        for d in finite:
            if early_stop and len(scored) >= 2 and value(scored[-1]) > value(scored[-2]) * (1 + AUTO_DAMPING_TIE_RTOL):
                return scored, True
            if d not in errors and d not in failed:
                return scored, False
            value(d)
            scored.append(d)
        return scored, True

    def attempt(d: float) -> tuple[float, float | None, BaseException | None]:
        try:
            return d, score(d), None
        except Exception as exc:  # noqa: BLE001 - raised again only if the ridge is needed
            return d, None, exc

    def ready(d: float) -> bool:
        return d not in errors and d not in failed and all(
            a in errors or a in failed for a in (needs(d) if needs is not None else ()))

    def run(pool: ThreadPoolExecutor | None) -> list[float]:
        while True:
            scored, done = prefix()
            batch = [] if done else finite[len(scored):]
            if want_svd and math.inf not in errors and math.inf not in failed:
                batch.insert(min(1, len(batch)), math.inf)  # beside the first finite ridge needed
            batch = [d for d in batch if ready(d)][:workers]  # an anchor has no needs: never empty
            if not batch:
                return scored
            for d, e, exc in (pool.map(attempt, batch) if pool is not None else map(attempt, batch)):
                if exc is not None:
                    failed[d] = exc
                else:
                    errors[d] = e

    if workers <= 1:
        scored = run(None)
    else:
        with _lapack_threads(device), ThreadPoolExecutor(max_workers=workers) as pool:
            scored = run(pool)
    return {d: value(d) for d in scored + ([math.inf] if want_svd else [])}


def _residual_sq(D: torch.Tensor, B: torch.Tensor, A: torch.Tensor, H: Covariance) -> float:
    """``tr(E·H·Eᵀ)`` (≥ 0) for ``E = D − B·A`` (float64), a block of rows of ``E`` at a time and
    ``H`` (or its parts) a block of rows at a time in its own dtype: neither ``E`` (``out × in``: 0.44 GiB
    for an 8B ``gate_proj``) nor a float64 copy of ``H`` (1.5 GiB at 14336²) is ever whole."""
    val = torch.zeros((), dtype=torch.float64, device=D.device)  # summed on the device: no sync per block
    step = _block_rows(D)
    for i in range(0, D.shape[0], step):
        val += _trace_sq(torch.addmm(D[i:i + step], B[i:i + step], A, alpha=-1), H)
    return max(float(val), 0.0)


def _outside_error(K: torch.Tensor, Ur: torch.Tensor) -> float:
    """``sqrt(tr(K) − tr(U_rᵀ·K·U_r))``: the held-out error of ``U_r·U_rᵀ·ΔW`` for ``K = ΔW·H_val·ΔWᵀ``."""
    return math.sqrt(max(float(K.trace() - ((K @ Ur) * Ur).sum()), 0.0))


def _outside_errors(D: torch.Tensor, H: Covariance) -> Callable[[torch.Tensor], float]:
    """``U_r ↦`` the held-out error of ``U_r·U_rᵀ·ΔW`` (:func:`_outside_error`) for ``D = ΔW`` and
    ``H = H_val``. A wide ``D`` keeps ``K = D·H·Dᵀ`` (``out × out``); a tall one would make ``K``
    larger than ``H`` (14336² float64 for an 8B ``gate_proj``: 1.5 GiB), so it keeps ``tr(K)`` and
    forms ``tr(U_rᵀ·K·U_r) = tr(M·H·Mᵀ)``, ``M = U_rᵀ·D`` (``r × in``), per candidate."""
    if D.shape[0] <= D.shape[1]:
        K = _sandwich(D, H)
        return lambda Ur: _outside_error(K, Ur)
    total = _trace_sq(D, H)
    return lambda Ur: math.sqrt(max(float(total - _trace_sq(Ur.T @ D, H)), 0.0))


def _sandwich(D: torch.Tensor, H: Covariance) -> torch.Tensor:
    """``D·H·Dᵀ`` (``out × out``, in ``D``'s dtype, symmetrised: the quadratic form of ``H``'s
    symmetric part) with ``H`` (or each of its parts) read a block of rows at a time in its own
    dtype, ``D·H·Dᵀ = Σ_j D[:, j]·(H[j]·Dᵀ)``: neither a float64 copy of ``H`` (1.5 GiB at 14336²)
    nor the ``out × in`` product ``D·H`` is ever made."""
    out = D.new_zeros((D.shape[0], D.shape[0]))
    for part in covariance_parts(H):  # blocks of H's rows and of H[j]·Dᵀ (step × out) both ~64 MiB
        step = _block_len(max(part.shape[1], D.shape[0]), D.element_size())
        for j in range(0, part.shape[0], step):
            out.addmm_(D[:, j:j + step], part[j:j + step].to(D) @ D.T)
    return _symmetrize_(out)


def _cholesky_(A: torch.Tensor) -> bool:
    """Whether ``A`` is numerically positive definite (a Cholesky factorisation succeeds); the
    factor ``L`` is written over ``A``'s lower triangle (LAPACK factorises in place: no second
    ``n × n`` matrix; 1.5 GiB at 14336² float64). ``A`` no longer holds its input either way: torch
    zeroes the strict upper triangle, and a failed factorisation leaves a partial one."""
    info = torch.empty((), dtype=torch.int32, device=A.device)
    # LAPACK/cuSOLVER work on column-major storage: for a row-major A torch would factorise a
    # column-major copy (one more n × n matrix), so factorise its transposed view instead (upper
    # Cholesky of Aᵀ: reads A's lower triangle, writes L = Uᵀ into it) — truly in place.
    At = A.mT
    with _lapack_threads(A):
        try:
            torch.linalg.cholesky_ex(At, upper=True, out=(At, info))
        except RuntimeError:  # a build refusing the aliased output: the out-of-place factorisation
            L, info = torch.linalg.cholesky_ex(A)
            A.copy_(L)
    return int(info) == 0


def _nothing_cut_(H: torch.Tensor, trace: float, eig_rtol: float) -> bool:
    """Whether no eigenvalue of the float64 ``H`` (trace ``trace``) falls under the ``eig_rtol``
    cut-off: a Cholesky factorisation of ``H − eig_rtol·tr(H)·I`` proves ``λ_min > eig_rtol·tr(H) ≥
    eig_rtol·λ_max``. ``H`` is shifted and factorised in place (it no longer holds ``H`` after)."""
    H.diagonal().sub_(eig_rtol * trace)
    return _cholesky_(H)


def is_cut_free(H_fit: torch.Tensor, eig_rtol: float = DEFAULT_EIG_RTOL, device: torch.device | None = None) -> bool:
    """Whether no eigenvalue of the covariance ``H_fit`` falls under the ``eig_rtol`` cut-off
    (``λ_min > eig_rtol·tr(H_fit)``, proved by one Cholesky factorisation of a float64 copy on
    ``device``): then :func:`select_damping` scores its ridges without decomposing ``H_fit``.
    Layers that share an input share the answer::

        free = is_cut_free(H_fit)                    # once per group (q/k/v, gate/up)
        select_damping(delta_q, H_fit, H_val, 64, cut_free=free)

    False for a zero covariance; NaN or inf raise."""
    if not _all_finite(H_fit):
        raise ValueError("The activation covariance contains NaN or inf; check the calibration inputs.")
    trace = float(torch.diagonal(H_fit).sum(dtype=torch.float64))
    if trace <= 0.0:
        return False
    Hf = damped(H_fit.to(device if device is not None else H_fit.device), 0.0)  # our own float64 copy
    return _nothing_cut_(Hf, trace, eig_rtol)


def _gram_scores(delta: torch.Tensor, H_fit: torch.Tensor, H_val: torch.Tensor, rank: int,
                 grid: tuple[float, ...], eig_rtol: float, early_stop: bool,
                 name: str, starts: _RidgeStarts, cut_free: bool | Callable[[], bool] | None = None,
                 ) -> tuple[dict[float, float], GramPencil | None] | None:
    """Held-out errors of every ridge without decomposing ``H_fit``: for a wide residual (``out ≤ in``)
    from ``ΔW`` itself, for a tall one from its Gram root ``R`` (:func:`_gram_root`: ``in × in``; None
    where ``ΔW`` is short of full column rank).

    ``U_r`` of ``ΔW·S_δ`` (any square root ``S_δ·S_δᵀ = H_fit + δ·m·I``) is the top eigenvectors of
    ``ΔW·H_fit·ΔWᵀ + δ·m·ΔW·ΔWᵀ`` (``out × out``; ``R``'s, ``in × in``, for a tall one), so the ``in × in``
    ``eigh`` of ``H_fit`` is not needed.
    That equals the eigenbasis route only where no eigenvalue of ``H_fit`` is cut; a Cholesky
    factorisation of ``H_fit − eig_rtol·tr(H_fit)·I`` proves that (``λ_min > eig_rtol·λ_max``), else
    None and the caller decomposes ``H_fit``. ``K = ΔW·H_val·ΔWᵀ`` scores the held-out tokens.
    ``cut_free``: that test's answer (:func:`is_cut_free`), or a function giving it, where layers
    share ``H_fit``. Memory: the test runs first, with nothing of ``ΔW`` made yet; the Gram-sized
    products after it.
    Scores from the iterative route are good to about :data:`SCORE_TOL` (relative), not to round-off.
    Returns the held-out errors and the :class:`GramPencil` (for :func:`gram_refit`).
    """
    free = cut_free() if callable(cut_free) else cut_free
    if not (is_cut_free(H_fit, eig_rtol, delta.device) if free is None else free):
        return None  # some eigenvalue may fall under the cut-off (or H_fit is zero)
    trace = float(torch.diagonal(H_fit).sum(dtype=torch.float64))
    mean_diag = trace / H_fit.shape[0]
    D = _check_residual(delta, rank, name)
    wide = D.shape[0] <= D.shape[1]
    if not wide:  # tall: scored through its Gram root, which every score depends on alone
        G = D.T @ D
        del D  # the float64 out × in copy (448 MiB for an 8B gate_proj) goes before the root is made
        D = R = _gram_root(G)
        del G
        if D is None:
            return None  # rank-deficient: the eigenbasis route
    K, G0, G1 = _sandwich(D, H_val), _sandwich(D, H_fit), D @ D.T
    del D

    def score(d: float) -> float:
        G = G1 if d == math.inf else G0 + (d * mean_diag) * G1 if d > 0 else G0
        # G0 and G1 are shared by the threads
        top, _, live, basis = _gram_top(G, rank, owned=0 < d < math.inf, start=starts.start(d), tol=SCORE_TOL)
        starts.record(d, basis)
        return _outside_error(K, top * live)  # as truncated_svd: directions with σ ≈ 0 dropped

    errors = _score_ridges(grid, score, early_stop, delta.device, starts.needs)
    trace_all = trace + float(torch.diagonal(H_val).sum(dtype=torch.float64))
    return errors, GramPencil(G0, K, G1, trace_all, root=None if wide else R)


def _gram_root(G: torch.Tensor) -> torch.Tensor | None:
    """``R`` (``in × in``, upper triangular) with ``RᵀR = DᵀD`` from ``G = DᵀD`` (float64, the caller's
    scratch: factorised in place) for a tall ``D``, or None where ``G`` is not numerically positive
    definite (``D`` short of full column rank).

    Every held-out score of a ridge depends on ``D`` through ``DᵀD`` alone: with ``D = Q_D·R`` (``Q_D``
    orthonormal columns) the left singular vectors of ``D·S`` are ``Q_D·W`` (``W``: those of ``R·S``),
    and ``U_rᵀ·D = W_rᵀ·R``, so ``tr(ΔW·H·ΔWᵀ) − tr(U_rᵀ·ΔW·H·ΔWᵀ·U_r)`` is ``R``'s. Scoring ``R``
    as a wide residual needs no ``eigh`` of ``H_fit`` (one 4096² ``eigh`` per 8B block: gate/up)."""
    if not _cholesky_(G):  # G's lower triangle: L with L·Lᵀ = DᵀD (the rest zeroed), so R = Lᵀ
        return None
    return G.tril_().mT  # a view: no second in × in matrix


def gram_refit(delta: torch.Tensor, choice: DampingChoice, rank: int, eig_rtol: float = DEFAULT_EIG_RTOL,
               name: str = "layer", H: Covariance | None = None) -> Factors | None:
    """The factors of ``damping="auto"`` on all tokens from the Gram matrices its scoring made
    (``choice.gram``, a :class:`GramPencil`), or None where there are none, or the chosen ridge is too
    small to prove that nothing is cut (δ = 0: :func:`refit_auto` tests it), or a tall residual comes
    without ``H`` (``(H_fit, H_val)``)::

        choice = select_damping(delta, H_fit, H_val, rank=8)
        factors = gram_refit(delta, choice, 8, H=(H_fit, H_val))   # = refit_auto(delta, (H_fit, H_val), ...)[0]

    ``U_r, σ``: the top eigenpairs of ``G = G0 + K + δ·m·G1`` (plain SVD: ``G1``), which is
    ``ΔW·S·(ΔW·S)ᵀ`` for any root ``S`` of the damped ``H_fit + H_val``; then ``B = U_r·√σ`` and
    ``A = √σ·V_rᵀ·S⁻¹ = diag(1/√σ)·U_rᵀ·ΔW`` (``V_rᵀ = diag(1/σ)·U_rᵀ·ΔW·S``): EoRA's factors without
    ``S``. A tall residual's pencil is its root ``R``'s (``ΔW = Q·R``, ``U_r = Q·W_r``): ``A =
    diag(1/√σ)·W_rᵀ·R`` and ``B = ΔW·Ĥ·Aᵀ·diag(1/σ)`` (``Ĥ``: the damped ``H``; the least-squares ``B``
    for that ``A``, which is ``U_r·√σ``), one ``in × in × r`` product with ``H``. ``delta`` is the
    residual ``choice`` was scored on; the pencil is used up (or dropped).
    """
    pencil = choice.gram
    if pencil is None:
        return None
    out_f, in_f = delta.shape
    damping = choice.damping
    G0, K, G1, R, start = pencil.take()  # used up (or dropped) here either way: refit_auto needs the memory
    start = choice.basis if R is None else start
    if damping != math.inf and not (_ridge_clears_cutoff(damping, in_f, eig_rtol) and pencil.trace > 0):
        return None  # δ = 0: whether nothing is cut is refit_auto's test
    if R is not None and H is None:
        return None
    ridge = 0.0 if damping == math.inf else damping * pencil.trace / in_f
    G = G1 if damping == math.inf else G0.add_(K).add_(G1, alpha=ridge)
    del G0, K, G1
    total = float(torch.diagonal(G).sum())  # ‖ΔW·S‖²_F: the whole spectrum's energy
    top, sv, live, _ = _gram_top(G, rank, owned=True, start=start)
    del G
    s = sv[:rank]
    inv = torch.where(live, 1.0 / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(s))
    root = s.sqrt()  # directions with σ ≈ 0 dropped from both factors, as truncated_svd does
    if R is None:  # (ΔW residual checked finite by the scoring; blocks of its rows in float64, no copy)
        B = (top * live) * root
        UtD = top.new_zeros((top.shape[1], in_f))  # U_rᵀ·ΔW, a block of ΔW's rows at a time
        step = _block_rows(delta, 8)
        for i in range(0, out_f, step):
            UtD.addmm_(top[i:i + step].T, delta[i:i + step].detach().to(top))
        A = (root * inv)[:, None] * UtD
    else:
        A = (root * inv)[:, None] * (top.T @ R)
        HA = A.T.clone() if damping == math.inf else _cov_times(H, A.T.contiguous()).add_(A.T, alpha=ridge)
        B = _rows_times(delta, HA) * inv
    return Factors(A=A.float(), B=B.float(), singular_values=sv.float(), kept_eigen=in_f,
                   total_energy=total if sv.numel() < min(out_f, in_f) else None)


def refit_auto(
    delta: torch.Tensor,
    H: Covariance,
    damping: float,
    rank: int,
    eig_rtol: float = DEFAULT_EIG_RTOL,
    name: str = "layer",
    full: Eigen | None = None,
    release: Callable[[], None] | None = None,
    start: torch.Tensor | None = None,
) -> tuple[Factors, CovarianceRoot]:
    """The factors of ``damping="auto"`` once a finite δ is chosen: :func:`eora_factors` on all
    tokens (``H``: the fit and held-out covariances, as parts), and ``H`` as a
    :class:`CovarianceRoot` for the statistics::

        factors, root = refit_auto(delta, (H_fit, H_val), 0.1, rank=8)
        weighted_error(delta, root, factors.B @ factors.A)

    One float64 ``n × n`` matrix is made, ``H_fit + H_val``, and factorised in place: by Cholesky
    where the ridge keeps every eigenvalue above the ``eig_rtol`` cut-off (at δ = 0 where a
    Cholesky factorisation of ``H − eig_rtol·tr(H)·I`` proves it), else by ``eigh`` (or ``full``,
    ``eigen(H_fit + H_val)``, when given). ``release()`` is called once the parts are no longer
    read: a caller holding no other reference to them frees them before the factors are computed
    (the float32 pair of an 8B ``down_proj`` is 1.5 GiB). ``start``: the truncated SVD's first block
    (``select_damping``'s ``choice.basis``: the chosen candidate's, fitted on part of the tokens).
    """
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"refit_auto needs a finite damping ≥ 0, got {damping!r}.")
    n = delta.shape[1]
    for part in covariance_parts(H):
        _check_cov(part, n, name)
    H_all = covariance64(H, delta.device)
    if not _all_finite(H_all):
        raise ValueError(f"{name}: the activation covariance contains NaN or inf; check the calibration inputs.")
    mean_diag = float(torch.diagonal(H_all).mean()) if n else 0.0
    shift: float | None = None  # the Cholesky route: H_all holds the factor of H + shift·I
    if mean_diag > 0 and _ridge_clears_cutoff(damping, n, eig_rtol):
        H_all.diagonal().add_(damping * mean_diag)
        shift = damping * mean_diag
    elif mean_diag > 0 and damping == 0:  # no ridge: Cholesky only where eigh would cut nothing
        shift = 0.0 if _nothing_cut_(H_all, mean_diag * n, eig_rtol) else None
        del H_all  # the test wrote over it: H itself is factorised below
        H_all = covariance64(H, delta.device)
    if shift is not None and not _cholesky_(H_all):  # round-off: not positive definite after all
        shift = None
        del H_all
        H_all = covariance64(H, delta.device)
    del H
    if release is not None:
        release()
    if shift is not None:
        root = CovarianceRoot(S=H_all.tril_(), shift=shift)
        projection = Projection(S=root.S, kept=n, lower=True)
        factors = eora_factors(delta, None, rank, damping=damping, eig_rtol=eig_rtol, name=name,
                               projection=projection, start=start)
        return factors, root
    e = eigen(H_all, overwrite=True) if full is None else full
    del H_all  # held by e.Q when decomposed here
    factors = eora_factors(delta, None, rank, damping=damping, eig_rtol=eig_rtol, name=name,
                           projection=e.root(damping, eig_rtol), start=start)
    return factors, CovarianceRoot(S=e.Q, scale=e.lam.clamp_min(0).sqrt())


def eora_factors_auto(
    delta: torch.Tensor,
    H_fit: torch.Tensor,
    H_val: torch.Tensor,
    rank: int,
    grid: tuple[float, ...] = AUTO_DAMPING_GRID,
    eig_rtol: float = DEFAULT_EIG_RTOL,
    name: str = "layer",
    fit: Eigen | Callable[[], Eigen] | None = None,
    full: Eigen | None = None,
    round_factors: RoundFactors | None = None,
) -> tuple[Factors, DampingChoice]:
    """``damping="auto"``: choose δ on held-out tokens, then refit on all of them::

        factors, choice = eora_factors_auto(delta, H_fit, H_val, rank=8)

    The final factors are ``eora_factors(delta, H_fit + H_val, rank, damping=choice.damping)``: from
    the scoring's Gram matrices where it made them (:func:`gram_refit`), else plain SVD for ``inf`` or
    :func:`refit_auto` (a Cholesky factorisation where the ridge allows it, else the eigendecomposition
    ``full=eigen(H_fit + H_val)``, computed there when not given).
    """
    choice = select_damping(delta, H_fit, H_val, rank, grid, eig_rtol, name, fit, round_factors)
    factors = gram_refit(delta, choice, rank, eig_rtol, name, H=(H_fit, H_val))
    if factors is not None:
        return factors, choice
    if choice.damping == math.inf:
        return eora_factors(delta, None, rank, method="svd", name=name, start=choice.basis), choice
    factors, _ = refit_auto(delta, (H_fit, H_val), choice.damping, rank, eig_rtol, name, full=full,
                            start=choice.basis)
    return factors, choice


# --------------------------------------------------------------------------------------------
# rank allocation under a parameter budget
# --------------------------------------------------------------------------------------------


def projected_spectrum(
    delta: torch.Tensor,
    H: torch.Tensor | None,
    method: Method = "eora",
    damping: float = 0.0,
    eig_rtol: float = DEFAULT_EIG_RTOL,
    projection: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Singular values (float64, descending, ``min(out, in)`` of them) of ``ΔW' = ΔW·Q·diag(√λ)``.

    ``s_k²`` is exactly what the k-th rank removes from the squared activation-weighted error
    ``‖(ΔW − BA)·Xᵀ‖²_F`` (``method="svd"``: from ``‖ΔW − BA‖²_F``, H ignored)::

        s = projected_spectrum(delta, X.T @ X, damping=0.01)

    Without ``projection`` no eigendecomposition of H is needed: ``s²`` are the eigenvalues of
    ``ΔW·H_δ·ΔWᵀ`` (out ≤ in) or of ``Lᵀ·ΔWᵀΔW·L`` with ``H_δ = L·Lᵀ`` (Cholesky; out > in),
    ``H_δ = H + δ·mean(diag H)·I``. This ignores the ``eig_rtol`` cut-off, whose directions carry
    at most ``eig_rtol·λ_max·‖ΔW‖²`` of energy; an H that is not positive definite (δ = 0,
    rank-deficient) falls back to the eigendecomposition.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown EoRA method {method!r}; choose one of {METHODS}.")
    if delta.ndim != 2:
        raise ValueError(f"The residual must be a 2-D matrix, got shape {tuple(delta.shape)}.")
    D = delta.double()
    m, n = D.shape
    G: torch.Tensor | None = None
    if method == "eora":
        if H is None and projection is None:
            raise ValueError("method 'eora' needs the activation covariance H.")
        if projection is None:
            _check_damping(damping)
            if not _all_finite(H):
                raise ValueError("The activation covariance contains NaN or inf; check the calibration inputs.")
            diag = torch.diagonal(H).to(torch.float64)
            if float(diag.max()) <= 0.0:  # no signal: plain SVD, as eigen_projection does
                projection = (torch.eye(n, dtype=torch.float64, device=D.device),)  # type: ignore[assignment]
            elif m <= n:  # D·H_δ·Dᵀ with H read a row block at a time: no float64 copy of H, no D·H
                G = _sandwich(D, H)
                if damping > 0:
                    G.add_(D @ D.T, alpha=damping * float(diag.mean()))
            else:
                Hd = damped(H.to(D.device), damping)
                if _cholesky_(Hd):  # H_δ = L·Lᵀ over Hd itself; D·L over (a copy of) D, a row block at a time
                    M = Projection(S=Hd.tril_(), kept=n, lower=True).project_(D.clone() if D is delta else D)
                    del Hd, D
                    G = M.T @ M
                else:
                    projection = eigen_projection(damped(H.to(D.device), damping), 0.0, eig_rtol)
        if G is None:
            D = D @ projection[0].to(D.device)
    if G is None:
        G = D @ D.T if m <= n else D.T @ D
    with _lapack_threads(G):
        lam = torch.linalg.eigvalsh(0.5 * (G + G.T))
    return lam.flip(0).clamp_min(0).sqrt()


def allocate_ranks(
    spectra: dict[str, torch.Tensor],
    costs: dict[str, int],
    budget: int,
    min_rank: int = 1,
    max_rank: int | dict[str, int] | None = None,
) -> dict[str, int]:
    """Per-layer ranks maximising the captured energy ``Σ_l Σ_{k<r_l} s_{l,k}²`` under
    ``Σ_l r_l·costs[l] ≤ budget`` (``costs[l] = in + out``: parameters per rank)::

        >>> allocate_ranks({"q": torch.tensor([3., 1., .5]), "v": torch.tensor([2., 2., 1.])},
        ...                {"q": 1, "v": 1}, budget=3, max_rank=2)
        {'q': 1, 'v': 2}

    Every layer starts at ``min_rank``; then ranks are added greedily by gain per parameter
    ``s_{l,k}² / costs[l]``. Each layer's gains decrease with k, so as long as nothing was skipped
    the greedy set is optimal for the parameters it spends (equal costs: optimal for the budget);
    once a layer's next rank does not fit, smaller layers fill the rest. Ranks that capture
    nothing (s = 0, e.g. past the data rank) are never bought, so the budget may be under-spent.
    ``max_rank`` (an int or per layer) defaults to ``len(spectrum) − 1``, the package's limit.
    """
    names = list(spectra)
    if set(costs) != set(names):
        raise ValueError("spectra and costs must name the same layers.")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an integer ≥ 1, got {min_rank!r}.")
    caps: dict[str, int] = {}
    for name in names:
        limit = int(spectra[name].numel()) - 1
        cap = max_rank.get(name, limit) if isinstance(max_rank, dict) else (limit if max_rank is None else max_rank)
        caps[name] = min(int(cap), limit)
        if int(costs[name]) <= 0:
            raise ValueError(f"{name}: the cost per rank must be positive, got {costs[name]!r}.")
        if caps[name] < min_rank:
            raise ValueError(
                f"{name}: min_rank={min_rank} exceeds its largest allowed rank {caps[name]} "
                f"(rank < min(out, in) = {limit + 1}); lower the minimum rank."
            )
    ranks = {name: min_rank for name in names}
    spent = sum(min_rank * int(costs[n]) for n in names)
    if spent > budget:
        raise ValueError(
            f"The rank budget of {budget:,} parameters cannot give every one of the {len(names)} layers its "
            f"minimum rank {min_rank} ({spent:,} parameters); raise the budget or lower the minimum rank."
        )
    sq = {name: spectra[name].double().cpu() ** 2 for name in names}
    heap: list[tuple[float, int, str]] = []

    def push(i: int, name: str) -> None:
        k = ranks[name]
        if k < caps[name]:
            gain = float(sq[name][k])
            if gain > 0.0:
                heapq.heappush(heap, (-gain / int(costs[name]), i, name))

    for i, name in enumerate(names):
        push(i, name)
    while heap:
        _, i, name = heapq.heappop(heap)
        c = int(costs[name])
        if spent + c > budget:
            continue  # its further ranks cost the same: none fits any more
        ranks[name] += 1
        spent += c
        push(i, name)
    return ranks


def captured_energy(spectra: dict[str, torch.Tensor], ranks: dict[str, int]) -> float:
    """``Σ_l Σ_{k<r_l} s_{l,k}²``: the squared weighted error removed by ``ranks``."""
    return float(sum(float((spectra[n].double()[: ranks[n]] ** 2).sum()) for n in ranks))
