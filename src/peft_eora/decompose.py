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
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["eora", "svd"]
METHODS: tuple[str, ...] = ("eora", "svd")

#: Default relative eigenvalue cut-off (relative to the largest eigenvalue of the damped H).
DEFAULT_EIG_RTOL = 1e-10


#: Threads for CPU eigendecompositions. Multi-threaded LAPACK ``eigh`` collapses when another
#: process holds a core (measured on a 2-core machine, 1536×1536 float64: 0.55 s with 2 threads
#: idle, 14 s with the other core busy, 1.0–1.35 s with 1 thread either way), so the default is 1.
LAPACK_THREADS = int(os.environ.get("PEFT_EORA_LAPACK_THREADS", "1"))


@contextmanager
def _lapack_threads(t: torch.Tensor) -> Iterator[None]:
    if t.device.type != "cpu" or LAPACK_THREADS <= 0 or torch.get_num_threads() <= LAPACK_THREADS:
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


@dataclass(frozen=True)
class Factors:
    """Low-rank factors with ``B @ A ≈ ΔW`` (float32, on the input's device).

    ``singular_values`` is the full spectrum of the (projected) residual, useful for rank
    allocation; ``kept_eigen`` counts the eigen-directions of H that survived the cut-off.
    """

    A: torch.Tensor
    B: torch.Tensor
    singular_values: torch.Tensor
    kept_eigen: int

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def energy_retained(self) -> float:
        """Share of the projected residual's energy captured by the kept rank (0..1)."""
        s2 = self.singular_values.double() ** 2
        total = float(s2.sum())
        return 1.0 if total == 0.0 else float(s2[: self.rank].sum()) / total


def check_rank(rank: int, out_features: int, in_features: int, name: str = "layer") -> None:
    """Raise ``ValueError`` unless ``0 < rank < min(out_features, in_features)``."""
    limit = min(out_features, in_features)
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"EoRA rank must be a positive integer, got {rank!r} for {name}.")
    if rank >= limit:
        raise ValueError(
            f"EoRA rank r={rank} is too large for {name} ({out_features}×{in_features}): it must be "
            f"smaller than min(out, in) = {limit}. Lower `r`, or set a smaller rank for this module "
            f"with `rank_pattern={{'{name.split('.')[-1]}': <r>}}`."
        )


def damped(H: torch.Tensor, damping: float) -> torch.Tensor:
    """Return ``H + damping·mean(diag H)·I`` in float64 (symmetrised)."""
    H = H.double()
    H = 0.5 * (H + H.T)
    if damping > 0:
        mean_diag = float(torch.diagonal(H).mean())
        if mean_diag > 0:
            H = H + damping * mean_diag * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
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
    if not torch.isfinite(Hd).all():
        raise ValueError("The activation covariance contains NaN or inf; check the calibration inputs.")
    lam, Q = _eigh(Hd)
    lam_max = float(lam.max()) if n else 0.0
    if lam_max <= 0.0:
        eye = torch.eye(n, dtype=torch.float64, device=Hd.device)
        return eye, eye, n
    keep = lam > eig_rtol * lam_max
    sqrt_lam = torch.where(keep, lam.clamp_min(0).sqrt(), torch.zeros_like(lam))
    inv_sqrt = torch.where(keep, 1.0 / torch.where(keep, sqrt_lam, torch.ones_like(lam)), torch.zeros_like(lam))
    S = Q * sqrt_lam  # Q @ diag(√λ)
    S_pinv = inv_sqrt[:, None] * Q.T  # diag(1/√λ) @ Qᵀ
    return S, S_pinv, int(keep.sum())


def eora_factors(
    delta: torch.Tensor,
    H: torch.Tensor | None,
    rank: int,
    method: Method = "eora",
    damping: float = 0.0,
    eig_rtol: float = DEFAULT_EIG_RTOL,
    name: str = "layer",
    projection: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> Factors:
    """Factor the residual ``delta`` (out × in) into ``B @ A`` of rank ``rank``.

    ``H`` is the (unnormalised or normalised, the scale does not matter) input second moment
    ``Σ xᵀx``; it is ignored for ``method="svd"``. Layers sharing one input (q/k/v) can share
    the eigendecomposition: pass ``projection=eigen_projection(H, damping, eig_rtol)``.
    Returns float32 factors.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown EoRA method {method!r}; choose one of {METHODS}.")
    if delta.ndim != 2:
        raise ValueError(f"{name}: the residual must be a 2-D matrix, got shape {tuple(delta.shape)}.")
    out_f, in_f = delta.shape
    check_rank(rank, out_f, in_f, name)
    if damping < 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number ≥ 0, got {damping!r}.")
    D = delta.double()
    if not torch.isfinite(D).all():
        raise ValueError(f"{name}: the weight residual contains NaN or inf; check both models' weights.")

    if method == "svd" or H is None:
        if method == "eora":
            raise ValueError(f"{name}: method 'eora' needs the activation covariance H.")
        S = S_pinv = None
        kept = in_f
        Dp = D
    else:
        if H.shape != (in_f, in_f):
            raise ValueError(
                f"{name}: covariance shape {tuple(H.shape)} does not match the layer's input size {in_f}."
            )
        S, S_pinv, kept = projection if projection is not None else eigen_projection(H.to(D.device), damping, eig_rtol)
        Dp = D @ S

    U, sv, Vh = truncated_svd(Dp, rank)
    root = sv[:rank].sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    if S_pinv is not None:
        A = A @ S_pinv
    return Factors(A=A.float(), B=B.float(), singular_values=sv.float(), kept_eigen=kept)


def truncated_svd(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of a float64 matrix and its full spectrum, via the Gram matrix.

    ``eigh`` of the smaller Gram matrix (``D·Dᵀ`` or ``Dᵀ·D``) is 10–50× faster on a CPU than a
    full SVD of a rectangular matrix, and in float64 its squared condition number costs nothing
    that matters here (singular values below ~1e-8·σ₁ come out as zero). Returns
    ``(U_r, σ, V_rᵀ)`` with σ the whole spectrum (descending).
    """
    m, n = D.shape
    wide = m <= n
    G = D @ D.T if wide else D.T @ D
    lam, vecs = _eigh(0.5 * (G + G.T))
    lam, vecs = lam.flip(0), vecs.flip(1)
    sv = lam.clamp_min(0).sqrt()
    top = vecs[:, :rank]
    s = sv[:rank]
    tol = max(float(sv[0]) if sv.numel() else 0.0, 0.0) * 1e-7
    inv = torch.where(s > tol, 1.0 / torch.where(s > tol, s, torch.ones_like(s)), torch.zeros_like(s))
    if wide:  # top = U_r; V_rᵀ = diag(1/σ)·U_rᵀ·D
        U, Vh = top, inv[:, None] * (top.T @ D)
    else:  # top = V_r; U_r = D·V_r·diag(1/σ)
        U, Vh = (D @ top) * inv, top.T
    return U, sv, Vh


def weighted_error(delta: torch.Tensor, H: torch.Tensor, approx: torch.Tensor | None = None) -> float:
    """Activation-weighted error ``‖(delta − approx)·Xᵀ‖_F = sqrt(tr(E H Eᵀ))`` via H = Σ xᵀx."""
    E = delta.detach().double() if approx is None else delta.detach().double() - approx.detach().double()
    val = float(((E @ H.detach().double()) * E).sum())
    return math.sqrt(max(val, 0.0))
