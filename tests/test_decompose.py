"""Numerical tests of the EoRA decomposition (``peft_eora.decompose``): pure math, CPU, seconds.

Every test builds its data from a fixed seed in float64 and asserts actual numbers: the optimum of
the activation-weighted problem (Eckart–Young on ``ΔW·Xᵀ``), EoRA ≤ SVD at every rank, robustness
to rank-deficient / dead / slightly indefinite covariances, the damping limits, scale invariance and
the error messages.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from peft_eora import decompose
from peft_eora.decompose import (
    DEFAULT_EIG_RTOL,
    Factors,
    check_rank,
    damped,
    eigen_projection,
    eora_factors,
    weighted_error,
)

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------


def make_case(
    out_f: int = 24,
    in_f: int = 32,
    n: int = 256,
    seed: int = 0,
    decay: float = 3.0,
    corr: float = 0.3,
    delta_rank: int | None = None,
):
    """Return ``(delta, X, H)`` in float64 with anisotropic, correlated activations.

    Column scales of X decay over ``decay`` decades and features are mixed by ``I + corr·G`` so
    that H is far from a multiple of the identity (where EoRA would equal SVD).
    """
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -decay, in_f, dtype=F64)
    mix = torch.eye(in_f, dtype=F64) + corr * torch.randn(in_f, in_f, generator=g, dtype=F64)
    X = (torch.randn(n, in_f, generator=g, dtype=F64) * scales) @ mix
    if delta_rank is None:
        delta = torch.randn(out_f, in_f, generator=g, dtype=F64)
    else:
        delta = torch.randn(out_f, delta_rank, generator=g, dtype=F64) @ torch.randn(
            delta_rank, in_f, generator=g, dtype=F64
        )
    return delta, X, X.T @ X


def direct_error(delta: torch.Tensor, X: torch.Tensor, f: Factors) -> float:
    """‖(ΔW − B·A)·Xᵀ‖_F computed from the activations themselves, in float64."""
    approx = f.B.double() @ f.A.double()
    return float(torch.linalg.matrix_norm((delta.double() - approx) @ X.double().T))


def optimum(delta: torch.Tensor, X: torch.Tensor, rank: int) -> float:
    """Brute-force optimum: Eckart–Young on ΔW·Xᵀ directly."""
    sv = torch.linalg.svdvals(delta.double() @ X.double().T)
    return float(sv[rank:].pow(2).sum().sqrt())


def product(f: Factors) -> torch.Tensor:
    return f.B.double() @ f.A.double()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


# --------------------------------------------------------------------------------------------
# basic contract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eora", "svd"])
def test_shapes_dtypes_and_rank_property(method):
    delta, _, H = make_case(out_f=20, in_f=12)
    f = eora_factors(delta, H, rank=5, method=method)
    assert f.B.shape == (20, 5) and f.A.shape == (5, 12)
    assert f.B.dtype == f.A.dtype == f.singular_values.dtype == torch.float32
    assert f.rank == 5
    assert f.singular_values.shape == (12,)  # full spectrum, not just the kept rank
    assert bool((f.singular_values[:-1] >= f.singular_values[1:]).all())
    assert f.kept_eigen == 12


def test_docstring_example_runs():
    res = doctest.testmod(decompose, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.failed == 0 and res.attempted > 0


def test_singular_values_are_those_of_delta_times_xt():
    """‖M·Xᵀ‖ = ‖M·Q·√Λ‖ makes the projected spectrum exactly σ(ΔW·Xᵀ)."""
    delta, X, H = make_case()
    f = eora_factors(delta, H, rank=4)
    ref = torch.linalg.svdvals(delta @ X.T)
    torch.testing.assert_close(f.singular_values.double(), ref, rtol=1e-6, atol=1e-6 * float(ref[0]))
    # and for method="svd" the spectrum is the plain one of ΔW (H ignored)
    fs = eora_factors(delta, H, rank=4, method="svd")
    ref_s = torch.linalg.svdvals(delta)
    torch.testing.assert_close(fs.singular_values.double(), ref_s, rtol=1e-6, atol=1e-6 * float(ref_s[0]))


def test_svd_method_is_truncated_svd_and_ignores_h():
    delta, _, H = make_case(seed=3)
    U, s, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = 7
    ref = (U[:, :r] * s[:r]) @ Vh[:r]
    for h in (H, None, torch.eye(delta.shape[1], dtype=F64) * 123.0):
        f = eora_factors(delta, h, rank=r, method="svd")
        assert rel_diff(product(f), ref) < 1e-6
    # balanced split: B = U√S, A = √S Vᵀ  →  column norms of B equal row norms of A
    f = eora_factors(delta, None, rank=r, method="svd")
    torch.testing.assert_close(f.B.double().norm(dim=0), s[:r].sqrt(), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(f.A.double().norm(dim=1), s[:r].sqrt(), rtol=1e-6, atol=0.0)


# --------------------------------------------------------------------------------------------
# optimality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out_f,in_f,seed",
    [(24, 32, 0), (40, 16, 1), (16, 16, 2)],
    ids=["wide", "tall", "square"],
)
def test_eora_beats_svd_at_every_rank(out_f, in_f, seed):
    delta, X, H = make_case(out_f=out_f, in_f=in_f, n=4 * in_f, seed=seed)
    limit = min(out_f, in_f)
    strictly_better = 0
    for r in range(1, limit):
        e_eora = direct_error(delta, X, eora_factors(delta, H, r))
        e_svd = direct_error(delta, X, eora_factors(delta, H, r, method="svd"))
        assert e_eora <= e_svd * (1 + 1e-9), (r, e_eora, e_svd)
        if e_eora < 0.9 * e_svd:
            strictly_better += 1
    # with 3 decades of column-scale decay EoRA is at least 10 % better at (nearly) every rank
    assert strictly_better >= 0.8 * (limit - 1), strictly_better


def test_eora_gain_is_large_on_anisotropic_activations():
    """A concrete number: at r=8 on the default case, EoRA's weighted error is < 1/3 of SVD's."""
    delta, X, H = make_case()
    e_eora = direct_error(delta, X, eora_factors(delta, H, 8))
    e_svd = direct_error(delta, X, eora_factors(delta, H, 8, method="svd"))
    assert e_eora < e_svd / 3, (e_eora, e_svd)


@pytest.mark.parametrize("out_f,in_f,seed", [(24, 32, 0), (40, 16, 5)], ids=["wide", "tall"])
def test_eora_equals_eckart_young_optimum(out_f, in_f, seed):
    """damping=0, full-rank H: EoRA's error is the brute-force optimum sqrt(Σ_{i>r} σ_i(ΔW·Xᵀ)²).

    The factors are float32, but the error is stationary at the optimum, so the float32 rounding
    of B and A (a perturbation of size ~eps32·‖ΔW·Xᵀ‖) only enters at second order:
    err² = opt² + ‖perturbation‖², i.e. ~1e-8 relative accuracy still holds.
    """
    delta, X, H = make_case(out_f=out_f, in_f=in_f, n=8 * in_f, seed=seed)
    assert float(torch.linalg.eigvalsh(H)[0]) > 0  # genuinely full rank
    norm = float(torch.linalg.matrix_norm(delta @ X.T))
    for r in range(1, min(out_f, in_f)):
        f = eora_factors(delta, H, r, damping=0.0)
        opt = optimum(delta, X, r)
        err = direct_error(delta, X, f)
        assert err >= opt * (1 - 1e-12), (r, err, opt)
        assert err - opt <= 1e-7 * opt, (r, err, opt)
        assert math.sqrt(max(err**2 - opt**2, 0.0)) <= 1e-6 * norm, (r, err, opt, norm)
    # ...and no random rank-r competitor beats it
    g = torch.Generator().manual_seed(seed + 100)
    r = 3
    best = direct_error(delta, X, eora_factors(delta, H, r))
    for _ in range(20):
        Bc = torch.randn(out_f, r, generator=g, dtype=F64)
        # best A for a fixed B in the weighted norm is the least-squares fit of ΔW·Xᵀ
        Ac = torch.linalg.lstsq(Bc, delta @ X.T).solution @ torch.linalg.pinv(X.T)
        assert float(torch.linalg.matrix_norm((delta - Bc @ Ac) @ X.T)) >= best * (1 - 1e-9)


def test_optimum_with_normalised_h():
    """H = XᵀX / n (normalised) gives the same factors: the scale of H does not matter."""
    delta, X, H = make_case(seed=7)
    n = X.shape[0]
    f1 = eora_factors(delta, H, 6)
    f2 = eora_factors(delta, H / n, 6)
    assert rel_diff(product(f2), product(f1)) < 1e-5
    assert abs(direct_error(delta, X, f2) - optimum(delta, X, 6)) <= 1e-8 * optimum(delta, X, 6)


# --------------------------------------------------------------------------------------------
# weighted_error
# --------------------------------------------------------------------------------------------


def test_weighted_error_matches_direct_computation():
    delta, X, H = make_case(seed=11)
    g = torch.Generator().manual_seed(12)
    approx = torch.randn(*delta.shape, generator=g, dtype=F64)
    direct = float(torch.linalg.matrix_norm((delta - approx) @ X.T))
    assert weighted_error(delta, H, approx) == pytest.approx(direct, rel=1e-10)
    # approx=None is the error of the uncompensated residual
    assert weighted_error(delta, H) == pytest.approx(float(torch.linalg.matrix_norm(delta @ X.T)), rel=1e-10)
    # on EoRA factors (float32 inputs accepted; computed in float64)
    for r in (1, 5, 20):
        f = eora_factors(delta, H, r)
        ref = direct_error(delta, X, f)
        assert weighted_error(delta, H, product(f)) == pytest.approx(ref, rel=1e-9)
        assert weighted_error(delta.float(), H.float(), f.B @ f.A) == pytest.approx(ref, rel=1e-3)
    # exact approximation → 0, and never negative/NaN from round-off
    assert weighted_error(delta, H, delta) == 0.0
    assert weighted_error(delta, -1e-12 * torch.eye(H.shape[0], dtype=F64)) == 0.0


@pytest.mark.parametrize("damping,dead", [(0.01, 0), (0.0, 0), (0.0, 3)])
def test_weighted_errors_gives_both_errors_in_one_pass(damping, dead, monkeypatch):
    """``weighted_errors(delta, H, B, A)`` is ``(weighted_error(delta, H), weighted_error(delta, H, B@A))``
    for every form of ``H`` the statistics read (the matrix, its parts, a Cholesky root less its ridge,
    eigenvectors with scales), row blocks or not."""
    from peft_eora.decompose import projection_and_root, weighted_errors

    H_fit, H_val = _pair(dead=dead)
    H = H_fit.double() + H_val.double()
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(5)) * 0.01
    proj, root = projection_and_root(H, damping)
    f = eora_factors(delta, None, 5, projection=proj)
    ref = (weighted_error(delta, H), weighted_error(delta, H, f.B.double() @ f.A.double()))
    assert ref[1] < 0.99 * ref[0]
    for block_bytes in (None, 8 * 40 * 3):  # whole, and a few rows at a time
        if block_bytes is not None:
            monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", block_bytes)
        for form in (H, (H_fit, H_val), root):
            got = weighted_errors(delta, form, f.B, f.A)
            assert got == pytest.approx(ref, rel=1e-7), form if isinstance(form, torch.Tensor) else type(form)
    assert (root.scale is not None) == (damping == 0.0)  # both root routes covered (Cholesky, eigenvectors)
    # exact factors: nothing left
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    assert weighted_errors(delta.double(), H, U * S, Vh)[1] == pytest.approx(0.0, abs=1e-12 * ref[0])
    # a float32 covariance on a GPU: float32 products, float64 sums (forced here on the CPU)
    monkeypatch.setattr(decompose, "_stats_dtype", lambda H: torch.float32)
    assert weighted_errors(delta, (H_fit.float(), H_val.float()), f.B, f.A) == pytest.approx(ref, rel=1e-4)
    assert weighted_errors(delta, H.float(), f.B, f.A) == pytest.approx(ref, rel=1e-4)


# --------------------------------------------------------------------------------------------
# reconstruction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eora", "svd"])
def test_reconstructs_low_rank_residual_exactly(method):
    """ΔW of rank 5 < r: B·A == ΔW (to float32 precision) at r = 5 and r = min − 1."""
    delta, _, H = make_case(out_f=24, in_f=32, delta_rank=5, seed=4)
    assert int(torch.linalg.matrix_rank(delta)) == 5
    for r in (5, 23):
        f = eora_factors(delta, H, r, method=method)
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
        assert rel_diff(product(f), delta) < 1e-6, (r, rel_diff(product(f), delta))
        # the residual's energy is fully captured
        assert f.energy_retained == pytest.approx(1.0, abs=1e-9)
    # at r = 4 < rank ΔW, reconstruction is not exact
    f = eora_factors(delta, H, 4, method=method)
    assert rel_diff(product(f), delta) > 1e-3


def test_factors_are_finite_and_bounded_for_full_rank_residual_at_max_rank():
    delta, X, H = make_case(out_f=24, in_f=32, seed=9)
    f = eora_factors(delta, H, 23)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    # at r = min − 1 the weighted error is exactly the smallest singular value of ΔW·Xᵀ
    sv = torch.linalg.svdvals(delta @ X.T)
    assert direct_error(delta, X, f) == pytest.approx(float(sv[-1]), rel=1e-7)


# --------------------------------------------------------------------------------------------
# eigen projection (float64 core)
# --------------------------------------------------------------------------------------------


def test_eigen_projection_factorises_h_in_float64():
    _, _, H = make_case(in_f=20, n=200, seed=21)
    S, S_pinv, kept = eigen_projection(H)
    assert S.dtype == S_pinv.dtype == F64 and kept == 20
    torch.testing.assert_close(S @ S.T, H, rtol=1e-10, atol=1e-10 * float(H.abs().max()))
    torch.testing.assert_close(S_pinv @ S, torch.eye(20, dtype=F64), rtol=0, atol=1e-9)
    # with damping: S·Sᵀ = H + δ·mean(diag H)·I
    S, _, _ = eigen_projection(H, damping=0.05)
    ref = H + 0.05 * float(H.diagonal().mean()) * torch.eye(20, dtype=F64)
    torch.testing.assert_close(S @ S.T, ref, rtol=1e-10, atol=1e-10 * float(H.abs().max()))


def test_damped_symmetrises_and_adds_ridge():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=F64)
    H = M @ M.T
    H = 0.5 * (H + H.T)  # bitwise symmetric
    H_asym = H.clone()
    H_asym[0, 1] += 1e-3
    out = damped(H_asym.float(), 0.1)
    assert out.dtype == F64
    torch.testing.assert_close(out, out.T, rtol=0, atol=0)
    ref = 0.5 * (H_asym.float().double() + H_asym.float().double().T) + 0.1 * float(
        H_asym.float().double().diagonal().mean()
    ) * torch.eye(6, dtype=F64)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # zero damping and zero H: untouched
    torch.testing.assert_close(damped(H, 0.0), H, rtol=0, atol=0)
    assert torch.count_nonzero(damped(torch.zeros(4, 4), 1.0)) == 0


def test_eig_rtol_cuts_weak_directions():
    """Raising eig_rtol above the weakest eigenvalues drops exactly those directions."""
    delta, X, H = make_case(in_f=16, out_f=20, n=128, seed=13)
    lam = torch.linalg.eigvalsh(H)
    thr = float(lam[3] / lam[-1]) * 1.0001  # between λ_3 and λ_4 (relative)
    f = eora_factors(delta, H, 4, eig_rtol=thr)
    assert f.kept_eigen == 12
    assert f.singular_values.shape == (16,)
    assert float(f.singular_values[11]) > 1e-3 * float(f.singular_values[0])
    assert float(f.singular_values[-4:].abs().max()) < 1e-6 * float(f.singular_values[0])
    assert eora_factors(delta, H, 4).kept_eigen == 16
    assert DEFAULT_EIG_RTOL == pytest.approx(1e-10)


# --------------------------------------------------------------------------------------------
# degenerate covariances: never NaN / inf
# --------------------------------------------------------------------------------------------


def _degenerate_cases():
    delta, X, _ = make_case(out_f=24, in_f=32, n=256, seed=31)
    cases = {}
    # fewer samples than features: rank(H) = 10 < 32
    Xf = X[:10]
    cases["few_samples"] = (delta, Xf, Xf.T @ Xf)
    # dead channels: 8 input features never fire
    Xd = X.clone()
    dead = torch.tensor([0, 3, 4, 10, 17, 18, 25, 31])
    Xd[:, dead] = 0.0
    cases["dead_channels"] = (delta, Xd, Xd.T @ Xd)
    # tiny negative eigenvalues from round-off in a rank-deficient H
    g = torch.Generator().manual_seed(32)
    N = torch.randn(32, 32, generator=g, dtype=F64)
    cases["tiny_negative"] = (delta, Xf, Xf.T @ Xf - 1e-12 * (torch.eye(32, dtype=F64) + 0.1 * (N + N.T)))
    # accumulated in float32 (as calibration does on GPU): round-off eigenvalues ≈ 1e-7·λ_max
    cases["float32_rank_deficient"] = (delta, Xf, (Xf.float().T @ Xf.float()))
    return cases, dead


DEGENERATE, DEAD = _degenerate_cases()


@pytest.mark.parametrize("damping", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_h_never_gives_nan_and_stays_near_optimal(case, damping):
    delta, X, H = DEGENERATE[case]
    for r in (1, 5, 12, 23):
        f = eora_factors(delta, H, r, damping=damping)
        for t in (f.A, f.B, f.singular_values):
            assert torch.isfinite(t).all(), (case, damping, r)
        # factors stay of the residual's magnitude (no 1/√λ blow-up)
        assert float(product(f).abs().max()) < 10 * float(delta.abs().max())
        assert 0.0 <= f.energy_retained <= 1.0
        err = direct_error(delta, X, f)
        scale = float(torch.linalg.matrix_norm(delta @ X.T))
        e_svd = direct_error(delta, X, eora_factors(delta, H, r, method="svd"))
        assert err <= e_svd + 1e-6 * scale, (case, damping, r, err, e_svd)
        if damping == 0.0:
            # textbook EoRA still reaches the weighted optimum on the excited subspace
            assert err <= optimum(delta, X, r) + 1e-5 * scale, (case, r, err, optimum(delta, X, r))


def test_few_samples_kept_eigen_and_zero_error_past_data_rank():
    delta, X, H = DEGENERATE["few_samples"]
    f = eora_factors(delta, H, 10)
    assert f.kept_eigen == 10
    # rank(ΔW·Xᵀ) = 10: r = 10 already explains every calibration activation
    scale = float(torch.linalg.matrix_norm(delta @ X.T))
    assert direct_error(delta, X, f) < 1e-6 * scale
    assert f.energy_retained == pytest.approx(1.0, abs=1e-9)
    # with damping every direction is kept
    assert eora_factors(delta, H, 10, damping=0.01).kept_eigen == 32


def test_dead_channels_get_no_compensation_without_damping():
    delta, X, H = DEGENERATE["dead_channels"]
    f0 = eora_factors(delta, H, 8)
    assert f0.kept_eigen == 32 - len(DEAD)
    A0 = f0.A.double()
    assert float(A0[:, DEAD].abs().max()) < 1e-6 * float(A0.abs().max())
    # damping re-introduces them (blends toward SVD): A has real weight on dead inputs
    f1 = eora_factors(delta, H, 8, damping=0.1)
    assert f1.kept_eigen == 32
    A1 = f1.A.double()
    assert float(A1[:, DEAD].abs().max()) > 1e-2 * float(A1.abs().max())


@pytest.mark.parametrize("damping", [0.0, 0.5])
@pytest.mark.parametrize(
    "H_kind", ["zeros", "negative_tiny", "float32_zeros"], ids=["zeros", "neg_tiny", "f32_zeros"]
)
def test_no_signal_h_falls_back_to_plain_svd(H_kind, damping):
    delta, _, _ = make_case(seed=41)
    n = delta.shape[1]
    H = {
        "zeros": torch.zeros(n, n, dtype=F64),
        "negative_tiny": -1e-12 * torch.eye(n, dtype=F64),
        "float32_zeros": torch.zeros(n, n),
    }[H_kind]
    for r in (1, 6, 23):
        f = eora_factors(delta, H, r, damping=damping)
        fs = eora_factors(delta, None, r, method="svd")
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
        assert f.kept_eigen == n
        torch.testing.assert_close(f.B, fs.B, rtol=0, atol=0)
        torch.testing.assert_close(f.A, fs.A, rtol=0, atol=0)
        torch.testing.assert_close(f.singular_values, fs.singular_values, rtol=0, atol=0)


def test_zero_residual_gives_zero_factors():
    _, _, H = make_case()
    f = eora_factors(torch.zeros(24, 32, dtype=F64), H, 4)
    assert torch.count_nonzero(f.A) == 0 and torch.count_nonzero(f.B) == 0
    assert f.energy_retained == 1.0


# --------------------------------------------------------------------------------------------
# damping and scale
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [2, 8, 16])
def test_huge_damping_tends_to_svd(r):
    delta, _, H = make_case(seed=51)
    ref = product(eora_factors(delta, H, r, method="svd"))
    diffs = [rel_diff(product(eora_factors(delta, H, r, damping=d)), ref) for d in (1e-2, 1.0, 1e2, 1e8)]
    assert diffs[-1] < 1e-5, diffs
    # at δ = 1e-2 EoRA is still far from SVD on this anisotropic case, and it approaches SVD as δ grows
    assert diffs[0] > 0.1, diffs
    assert diffs[-1] < diffs[2] < diffs[0], diffs


def test_tiny_damping_tends_to_undamped():
    delta, X, H = make_case(seed=52)
    f0 = eora_factors(delta, H, 6)
    f1 = eora_factors(delta, H, 6, damping=1e-12)
    assert rel_diff(product(f1), product(f0)) < 1e-5
    # damping trades calibration-domain error for generality: never below the optimum
    for d in (1e-3, 1e-1, 10.0):
        assert direct_error(delta, X, eora_factors(delta, H, 6, damping=d)) >= optimum(delta, X, 6) * (1 - 1e-9)


@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("c", [1e-6, 3.7, 1e6])
def test_scale_invariance(c, damping):
    delta, _, H = make_case(seed=61)
    for r in (3, 12):
        ref = product(eora_factors(delta, H, r, damping=damping))
        got = product(eora_factors(delta, H * c, r, damping=damping))
        assert rel_diff(got, ref) < 1e-5, (c, damping, r)
    # also with a rank-deficient H: the eigenvalue cut-off is relative
    delta, _, Hd = DEGENERATE["few_samples"]
    f_ref = eora_factors(delta, Hd, 5, damping=damping)
    f_c = eora_factors(delta, Hd * c, 5, damping=damping)
    assert f_c.kept_eigen == f_ref.kept_eigen
    assert rel_diff(product(f_c), product(f_ref)) < 1e-5


def test_float32_and_float64_inputs_agree():
    delta, _, H = make_case(seed=71)
    f64 = eora_factors(delta, H, 6)
    f32 = eora_factors(delta.float(), H.float(), 6)
    assert rel_diff(product(f32), product(f64)) < 1e-4


# --------------------------------------------------------------------------------------------
# energy_retained
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eora", "svd"])
def test_energy_retained_bounded_and_monotone(method):
    delta, X, H = make_case(seed=81)
    energies = [eora_factors(delta, H, r, method=method).energy_retained for r in range(1, 24)]
    assert all(0.0 <= e <= 1.0 for e in energies)
    assert all(b > a for a, b in zip(energies, energies[1:])), energies
    # exact value: share of σ² captured
    f = eora_factors(delta, H, 5, method=method)
    s2 = f.singular_values.double() ** 2
    assert f.energy_retained == pytest.approx(float(s2[:5].sum() / s2.sum()), rel=1e-12)
    if method == "eora":
        # for EoRA it is 1 − (weighted error / weighted norm of ΔW)²
        rel = direct_error(delta, X, f) / float(torch.linalg.matrix_norm(delta @ X.T))
        assert f.energy_retained == pytest.approx(1 - rel**2, rel=1e-5)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def _bad_inputs():
    delta, _, H = make_case(out_f=12, in_f=16, n=64, seed=91)
    nan_delta = delta.clone()
    nan_delta[2, 3] = float("nan")
    inf_delta = delta.clone()
    inf_delta[0, 0] = float("inf")
    nan_H = H.clone()
    nan_H[4, 4] = float("nan")
    inf_H = H.clone()
    inf_H[1, 2] = float("inf")
    return [
        ("rank_eq_min", dict(delta=delta, H=H, rank=12), "too large"),
        ("rank_gt_min", dict(delta=delta, H=H, rank=40), "smaller than min(out, in) = 12"),
        ("rank_zero", dict(delta=delta, H=H, rank=0), "positive integer"),
        ("rank_negative", dict(delta=delta, H=H, rank=-3), "positive integer"),
        ("rank_float", dict(delta=delta, H=H, rank=2.0), "positive integer"),
        ("nan_delta", dict(delta=nan_delta, H=H, rank=2), "residual contains NaN or inf"),
        ("inf_delta", dict(delta=inf_delta, H=H, rank=2), "residual contains NaN or inf"),
        ("nan_H", dict(delta=delta, H=nan_H, rank=2), "covariance contains NaN or inf"),
        ("nan_H_damped", dict(delta=delta, H=nan_H, rank=2, damping=0.1), "covariance contains NaN or inf"),
        ("inf_H", dict(delta=delta, H=inf_H, rank=2), "covariance contains NaN or inf"),
        ("H_shape", dict(delta=delta, H=H[:12, :12], rank=2), "does not match the layer's input size 16"),
        ("H_nonsquare", dict(delta=delta, H=H[:, :12], rank=2), "covariance shape (16, 12)"),
        ("H_for_out_dim", dict(delta=delta, H=torch.eye(12, dtype=F64), rank=2), "does not match"),
        ("unknown_method", dict(delta=delta, H=H, rank=2, method="qr"), "Unknown EoRA method 'qr'"),
        ("negative_damping", dict(delta=delta, H=H, rank=2, damping=-0.1), "damping must be a number ≥ 0"),
        ("nan_damping", dict(delta=delta, H=H, rank=2, damping=float("nan")), "damping must be"),
        ("eora_without_H", dict(delta=delta, H=None, rank=2), "needs the activation covariance"),
        ("delta_1d", dict(delta=delta[0], H=H, rank=2), "2-D matrix"),
        ("delta_3d", dict(delta=delta[None], H=H, rank=2), "2-D matrix"),
    ]


@pytest.mark.parametrize("kwargs,phrase", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_invalid_inputs_raise_value_error(kwargs, phrase):
    with pytest.raises(ValueError) as exc:
        eora_factors(**kwargs)
    assert phrase in str(exc.value), str(exc.value)


def test_error_messages_name_the_module():
    delta, _, H = make_case(out_f=12, in_f=16, n=64)
    name = "model.layers.3.self_attn.q_proj"
    with pytest.raises(ValueError) as exc:
        eora_factors(delta, H, 12, name=name)
    msg = str(exc.value)
    assert name in msg and "(12×16)" in msg and "rank_pattern={'q_proj': <r>}" in msg
    with pytest.raises(ValueError, match="q_proj: covariance shape"):
        eora_factors(delta, H[:3, :3], 2, name=name)
    # check_rank on its own
    check_rank(11, 12, 16)
    with pytest.raises(ValueError, match="too large"):
        check_rank(12, 16, 12)


# --------------------------------------------------------------------------------------------
# damping="auto": ridge chosen on held-out tokens
# --------------------------------------------------------------------------------------------

from peft_eora.decompose import (  # noqa: E402
    AUTO_DAMPING_GRID,
    allocate_ranks,
    captured_energy,
    eigen,
    eora_factors_auto,
    projected_spectrum,
    select_damping,
)


def _shifted_case(seed: int = 0, out_f: int = 24, in_f: int = 32, n_fit: int = 128, n_val: int = 256):
    """Fit activations concentrated on a few directions; two held-out sets: the same
    distribution, and one whose energy sits in the directions the fit data barely excited."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, in_f, dtype=F64)
    mix = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=F64))[0]
    X_fit = (torch.randn(n_fit, in_f, generator=g, dtype=F64) * scales) @ mix
    X_same = (torch.randn(n_val, in_f, generator=g, dtype=F64) * scales) @ mix
    X_shift = (torch.randn(n_val, in_f, generator=g, dtype=F64) * scales.flip(0)) @ mix
    delta = torch.randn(out_f, in_f, generator=g, dtype=F64)
    return delta, X_fit, X_same, X_shift


def test_eigen_shift_equals_damped_eigendecomposition():
    """One eigh + shifted eigenvalues gives the factors of eigh(H + δ·mean(diag H)·I), for every δ."""
    delta, _, H = make_case(seed=101)
    e = eigen(H)
    for d in [g for g in AUTO_DAMPING_GRID if math.isfinite(g)] + [10.0]:
        ref = product(eora_factors(delta, H, 6, damping=d))
        got = product(eora_factors(delta, H, 6, projection=e.projection(d)))
        assert rel_diff(got, ref) < 1e-9, d
    # the grid's δ = inf is plain SVD of the residual
    assert math.inf in AUTO_DAMPING_GRID
    svd = product(eora_factors(delta, None, 6, method="svd"))
    assert rel_diff(product(eora_factors(delta, H, 6, projection=e.projection(math.inf))), svd) < 1e-6
    # rank-deficient H: same cut-off and kept count
    delta, _, Hd = DEGENERATE["few_samples"]
    for d in (0.0, 0.01):
        ref = eora_factors(delta, Hd, 5, damping=d)
        got = eora_factors(delta, Hd, 5, projection=eigen(Hd).projection(d))
        assert got.kept_eigen == ref.kept_eigen
        assert rel_diff(product(got), product(ref)) < 1e-7
    # no signal: a rotation, i.e. plain SVD
    z = eigen(torch.zeros(32, 32, dtype=F64))
    f = eora_factors(delta, torch.zeros(32, 32, dtype=F64), 5, projection=z.projection(0.1))
    assert rel_diff(product(f), product(eora_factors(delta, None, 5, method="svd"))) < 1e-6


def test_select_damping_scores_are_heldout_errors_and_argmin():
    delta, X_fit, X_val, _ = _shifted_case(seed=1)
    H_fit, H_val = X_fit.T @ X_fit, X_val.T @ X_val
    choice = select_damping(delta, H_fit, H_val, rank=6, early_stop=False)
    assert set(choice.errors) == set(AUTO_DAMPING_GRID)
    for d, err in choice.errors.items():
        direct = direct_error(delta, X_val, eora_factors(delta, H_fit, 6, damping=d))
        assert err == pytest.approx(direct, rel=1e-5), (d, err, direct)
    assert choice.errors[choice.damping] == min(choice.errors.values())


def test_select_damping_scores_rounded_factors_when_asked():
    """With ``round_factors`` (int4 adapters) each δ is scored by the held-out error of its factors
    *as stored*; small ridges blow up A's columns (1/√λ), which the grid rounds badly."""
    from peft_eora.adapter_quant import factor_rounder

    delta, X_fit, X_val, _ = _shifted_case(seed=1, in_f=64)
    H_fit, H_val = X_fit.T @ X_fit, X_val.T @ X_val
    rounder = factor_rounder(4)
    aware = select_damping(delta, H_fit, H_val, rank=6, round_factors=rounder)
    plain = select_damping(delta, H_fit, H_val, rank=6, early_stop=False)
    # every ridge scored, so plain's choice has a rounded error to compare with (with early stopping
    # the rounded errors may rise, and stop the scan, before plain's ridge)
    aware_all = select_damping(delta, H_fit, H_val, rank=6, round_factors=rounder, early_stop=False)
    assert aware_all.errors[aware.damping] == aware.errors[aware.damping]
    for d, err in aware_all.errors.items():
        f = eora_factors(delta, H_fit, 6, damping=d) if math.isfinite(d) else eora_factors(delta, None, 6, "svd")
        A, B = rounder(f.A.double(), f.B.double())
        direct = direct_error(delta, X_val, type(f)(A=A, B=B, singular_values=f.singular_values, kept_eigen=0))
        assert err == pytest.approx(direct, rel=1e-3), (d, err, direct)
        assert err >= plain.errors[d] * (1 - 1e-6)  # rounding only adds error (here)
    assert aware_all.errors[aware.damping] <= aware_all.errors[plain.damping]  # the choice, even early-stopped
    factors, choice = eora_factors_auto(delta, H_fit, H_val, rank=6, round_factors=rounder)
    assert choice.damping == aware.damping


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("rank", [4, 10])
def test_auto_damping_grows_when_heldout_differs_and_beats_every_fixed_value(seed, rank):
    delta, X_fit, X_same, X_shift = _shifted_case(seed=seed)
    H_fit = X_fit.T @ X_fit
    same = select_damping(delta, H_fit, X_same.T @ X_same, rank)
    shift = select_damping(delta, H_fit, X_shift.T @ X_shift, rank)
    assert shift.damping > same.damping, (same, shift)
    assert shift.damping >= 0.1, shift
    # the chosen δ's held-out error is ≤ that of every fixed grid value (fitted independently)
    for choice, X_val in ((same, X_same), (shift, X_shift)):
        fixed = {d: direct_error(delta, X_val, eora_factors(delta, H_fit, rank, damping=d)) for d in AUTO_DAMPING_GRID}
        assert fixed[choice.damping] <= min(fixed.values()) * (1 + 1e-6), (choice.damping, fixed)


@pytest.mark.parametrize("seed", range(6))
def test_early_stop_scores_fewer_ridges_and_keeps_the_full_grids_choice(seed):
    """Finite ridges are scored in ascending order until the held-out error first rises; plain SVD
    (inf) is always scored, so the choice never loses to SVD on the held-out tokens."""
    delta, X_fit, X_same, X_shift = _shifted_case(seed=seed)
    H_fit = X_fit.T @ X_fit
    for X_val in (X_same, X_shift):
        H_val = X_val.T @ X_val
        full = select_damping(delta, H_fit, H_val, 6, early_stop=False)
        fast = select_damping(delta, H_fit, H_val, 6)
        assert fast.damping == full.damping
        assert math.inf in fast.errors and set(fast.errors) <= set(full.errors)
        for d, e in fast.errors.items():
            assert e == full.errors[d]
        finite = sorted(d for d in fast.errors if math.isfinite(d))
        assert finite == sorted(d for d in AUTO_DAMPING_GRID if math.isfinite(d))[:len(finite)]  # a prefix
        if len(finite) < len(AUTO_DAMPING_GRID) - 1:  # stopped: the last two scored ridges rose
            assert fast.errors[finite[-1]] > fast.errors[finite[-2]]


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("profile", ["falls-then-rises", "rises-at-once", "falls-throughout", "flat"])
def test_parallel_ridge_scoring_returns_what_one_at_a_time_does(workers, profile, monkeypatch):
    """Ridges scored ``workers`` at a time (speculatively past the one the early-stop rule needs)
    give the same errors — and so the same choice — as one at a time, in the same order, and
    score at most ``workers − 1`` ridges per round past the stop."""
    import peft_eora.decompose as dec

    finite = sorted(d for d in AUTO_DAMPING_GRID if math.isfinite(d))
    curve = {"falls-then-rises": [5.0, 4.0, 3.0, 3.5, 2.0, 1.0], "rises-at-once": [1.0, 2.0, 0.5, 0.4, 0.3, 0.2],
             "falls-throughout": [6.0, 5.0, 4.0, 3.0, 2.0, 1.0], "flat": [1.0] * 6}[profile]
    table = dict(zip(finite, curve)) | {math.inf: 2.5}
    results = {}
    for w in (1, workers):
        calls = []

        def score(d: float) -> float:
            calls.append(d)
            return table[d]

        monkeypatch.setattr(dec, "_ridge_workers", lambda device: w)
        results[w] = (dec._score_ridges(AUTO_DAMPING_GRID, score, True, torch.device("cpu")), calls)
    (seq, seq_calls), (par, par_calls) = results[1], results[workers]
    assert list(par.items()) == list(seq.items())
    assert set(seq_calls) <= set(par_calls) and len(par_calls) == len(set(par_calls))
    assert len(par_calls) - len(seq_calls) <= workers - 1
    full = dec._score_ridges(AUTO_DAMPING_GRID, lambda d: table[d], False, torch.device("cpu"))
    assert list(full) == finite + [math.inf]


def test_a_speculative_ridge_that_fails_is_ignored_unless_needed(monkeypatch):
    """A ridge scored only speculatively (past the early stop) may raise without failing the run;
    one that is needed raises its error."""
    import peft_eora.decompose as dec

    finite = sorted(d for d in AUTO_DAMPING_GRID if math.isfinite(d))
    table = dict(zip(finite, [3.0, 4.0, 1.0, 1.0, 1.0, 1.0])) | {math.inf: 5.0}  # rises at the second ridge

    def score(d: float) -> float:
        if d == finite[2]:
            raise RuntimeError("eigh did not converge")
        return table[d]

    monkeypatch.setattr(dec, "_ridge_workers", lambda device: 3)  # scores finite[2] beside finite[1]
    got = dec._score_ridges(AUTO_DAMPING_GRID, score, True, torch.device("cpu"))
    assert list(got) == finite[:2] + [math.inf]
    with pytest.raises(RuntimeError, match="did not converge"):
        dec._score_ridges(AUTO_DAMPING_GRID, score, False, torch.device("cpu"))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", ["wide", "tall", "cut-eigenvalues", "rounded"])
def test_select_damping_in_threads_matches_one_at_a_time(seed, case, monkeypatch):
    """Every scoring route (the wide Gram route; H_fit's eigenbasis with and without eigenvalues
    under the cut-off; factors scored as rounded) gives the same choice and errors with ridges
    scored in two threads as one at a time."""
    import peft_eora.decompose as dec
    from peft_eora.adapter_quant import factor_rounder

    delta, X_fit, _, X_shift = _shifted_case(seed=seed, out_f=40 if case == "tall" else 24,
                                             n_fit=20 if case == "cut-eigenvalues" else 128)
    H_fit, H_val = X_fit.T @ X_fit, X_shift.T @ X_shift
    rounder = factor_rounder(8) if case == "rounded" else None
    got = {}
    for w in (1, 2):
        monkeypatch.setattr(dec, "_ridge_workers", lambda device: w)
        got[w] = select_damping(delta, H_fit, H_val, 6, round_factors=rounder)
    assert got[2].damping == got[1].damping
    assert list(got[2].errors) == list(got[1].errors)
    for d, e in got[2].errors.items():
        assert e == pytest.approx(got[1].errors[d], rel=1e-9)


@pytest.mark.parametrize("case", ["wide", "tall", "dead-channel", "tall-zero-column"])
@pytest.mark.parametrize("blocks", [False, True])
def test_select_damping_paths_agree(case, blocks, monkeypatch):
    """Residuals with a well-conditioned H_fit are scored from Gram matrices without an eigh of
    H_fit: a wide one from its own out × out ones, a tall one from those of its in × in Gram root
    ``R`` (``RᵀR = ΔWᵀΔW``). H_fit with an eigenvalue under the cut-off, and a tall residual short
    of full column rank (no Cholesky factor of ``ΔWᵀΔW``), go through H_fit's eigenbasis (a tall one
    without forming its out × out ``ΔW·H_val·ΔWᵀ``). All give the held-out errors of the fitted
    factors (identity rounding forces the eigenbasis route); ``blocks``: every row-block loop takes a
    few rows at a time."""
    if blocks:
        monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", 8 * 40 * 3)
    delta, X_fit, _, X_shift = _shifted_case(seed=3, out_f=40 if case.startswith("tall") else 24)
    if case == "dead-channel":
        X_fit = X_fit.clone()
        X_fit[:, 0] = 0.0
    if case == "tall-zero-column":  # an input channel the compression left exact in every row
        delta = delta.clone()
        delta[:, 5] = 0.0
    H_fit, H_val = X_fit.T @ X_fit, X_shift.T @ X_shift
    calls = []

    def fit() -> "object":
        calls.append(1)
        return eigen(H_fit)

    fast = select_damping(delta, H_fit, H_val, 6, fit=fit, early_stop=False)
    assert len(calls) == (0 if case in ("wide", "tall") else 1)  # well-conditioned cases never decompose H_fit
    ref = select_damping(delta, H_fit, H_val, 6, round_factors=lambda A, B: (A, B), early_stop=False)
    assert fast.damping == ref.damping
    for d, err in fast.errors.items():
        assert err == pytest.approx(ref.errors[d], rel=1e-6), (d, err, ref.errors[d])


@pytest.mark.parametrize("seed", range(3))
def test_tall_residuals_gram_root_scores_equal_the_eigenbasis_route(seed, monkeypatch):
    """A tall residual's ridges scored through its Gram root equal those scored in H_fit's
    eigenbasis to round-off (the same choice; every error within 1e-12)."""
    delta, X_fit, _, X_shift = _shifted_case(seed=seed, out_f=60)
    H_fit, H_val = X_fit.T @ X_fit, X_shift.T @ X_shift
    R = decompose._gram_root(delta.T @ delta)
    assert R.shape == (32, 32) and torch.equal(R, R.triu())
    assert torch.allclose(R.T @ R, delta.T @ delta, rtol=1e-12, atol=1e-12 * delta.norm() ** 2)
    fast = select_damping(delta, H_fit, H_val, 6, early_stop=False)
    monkeypatch.setattr(decompose, "_gram_root", lambda G: None)
    ref = select_damping(delta, H_fit, H_val, 6, early_stop=False)
    assert fast.damping == ref.damping and list(fast.errors) == list(ref.errors)
    for d, err in fast.errors.items():
        assert err == pytest.approx(ref.errors[d], rel=1e-12), d


def test_eora_factors_auto_refits_on_all_tokens():
    delta, X_fit, _, X_shift = _shifted_case(seed=5)
    H_fit, H_val = X_fit.T @ X_fit, X_shift.T @ X_shift
    f, choice = eora_factors_auto(delta, H_fit, H_val, 6)
    ref = eora_factors(delta, H_fit + H_val, 6, damping=choice.damping)
    assert rel_diff(product(f), product(ref)) < 1e-7
    # sharing precomputed decompositions gives the same result
    f2, c2 = eora_factors_auto(delta, H_fit, H_val, 6, fit=eigen(H_fit), full=eigen(H_fit + H_val))
    assert c2 == choice and rel_diff(product(f2), product(f)) < 1e-9


def test_auto_damping_ties_go_to_the_larger_ridge():
    """Isotropic H: every δ only rescales H, so all candidates tie and the largest wins."""
    delta, _, _ = make_case(seed=7)
    H = 5.0 * torch.eye(32, dtype=F64)
    choice = select_damping(delta, H, 2.0 * H, 6)
    assert choice.damping == max(AUTO_DAMPING_GRID)
    assert max(choice.errors.values()) <= min(choice.errors.values()) * (1 + 1e-9)


@pytest.mark.parametrize(
    "kwargs,phrase",
    [
        (dict(grid=()), "grid is empty"),
        (dict(grid=(0.0, -0.1)), "damping must be a finite number"),
        (dict(grid=(float("nan"),)), "damping must be a finite number"),
        (dict(H_val=torch.zeros(32, 32, dtype=F64)), "held-out covariance is zero"),
        (dict(H_val=torch.eye(31, dtype=F64)), "held-out covariance shape (31, 31)"),
        (dict(H_fit=torch.eye(30, dtype=F64)), "fit covariance shape (30, 30)"),
        (dict(rank=24), "too large"),
    ],
    ids=["empty_grid", "negative", "nan", "zero_val", "val_shape", "fit_shape", "rank"],
)
def test_select_damping_rejects_bad_input(kwargs, phrase):
    delta, X_fit, X_val, _ = _shifted_case(seed=0)
    args = {"delta": delta, "H_fit": X_fit.T @ X_fit, "H_val": X_val.T @ X_val, "rank": 4, **kwargs}
    with pytest.raises(ValueError) as exc:
        select_damping(**args)
    assert phrase in str(exc.value), str(exc.value)


# --------------------------------------------------------------------------------------------
# rank allocation under a parameter budget
# --------------------------------------------------------------------------------------------


def test_projected_spectrum_is_that_of_delta_times_xt():
    delta, X, H = make_case(seed=111)
    s = projected_spectrum(delta, H)
    assert s.dtype == F64 and s.shape == (24,)
    ref = torch.linalg.svdvals(delta @ X.T)
    torch.testing.assert_close(s, ref, rtol=1e-7, atol=1e-7 * float(ref[0]))
    torch.testing.assert_close(
        projected_spectrum(delta, H, damping=0.1), eora_factors(delta, H, 3, damping=0.1).singular_values.double(),
        rtol=1e-5, atol=1e-5 * float(ref[0]),
    )
    torch.testing.assert_close(projected_spectrum(delta, None, method="svd"), torch.linalg.svdvals(delta), rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="needs the activation covariance"):
        projected_spectrum(delta, None)


@pytest.mark.parametrize("damping", [0.0, 0.01, 1.0])
@pytest.mark.parametrize(
    "case", ["wide", "tall", "few_samples", "dead_channels", "zeros"],
)
def test_projected_spectrum_without_eigh_matches_the_factors_spectrum(case, damping):
    """The eigh-free paths (ΔW·H·ΔWᵀ, Cholesky) and the fallback give EoRA's own spectrum."""
    if case in ("wide", "tall"):
        delta, _, H = make_case(out_f=24 if case == "wide" else 48, in_f=32, seed=121)
    elif case == "zeros":
        delta, _, _ = make_case(out_f=48, in_f=32, seed=122)
        H = torch.zeros(32, 32, dtype=F64)
    else:
        delta, _, H = DEGENERATE[case]
        delta = torch.cat([delta, delta.flip(0)]) if damping == 0.0 else delta  # tall: the Cholesky/fallback path
    ref = eora_factors(delta, H, 3, damping=damping).singular_values.double()
    got = projected_spectrum(delta, H, damping=damping)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref[0]))
    exact = projected_spectrum(delta, H, projection=eigen_projection(H, damping))
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6 * float(ref[0]))


@pytest.mark.parametrize("out_f", [24, 48])
def test_projected_spectrum_reads_a_float32_h_in_row_blocks(out_f, monkeypatch):
    """A float32 ``H`` (as collected) is read a block of rows at a time for a wide residual (no float64
    copy of it, no ``D·H``) and factorised over its own float64 copy for a tall one: the spectrum of the
    float64 computation."""
    delta, _, H = make_case(out_f=out_f, in_f=32, seed=131)
    delta = delta.double()
    before = delta.clone()
    ref = projected_spectrum(delta, H, damping=0.01)
    assert torch.equal(delta, before)  # a float64 residual is projected in a copy
    monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", 8 * 48 * 5)
    got = projected_spectrum(delta, H.float(), damping=0.01)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref[0]))


def _brute_force(spectra, costs, budget, min_rank, caps):
    """Best captured energy over every rank vector within bounds and budget (exhaustive)."""
    names = list(spectra)
    grids = torch.meshgrid(*[torch.arange(min_rank, caps[n] + 1) for n in names], indexing="ij")
    cost = sum(g * costs[n] for g, n in zip(grids, names))
    energy = sum(torch.cat([torch.zeros(1, dtype=F64), spectra[n].double().pow(2).cumsum(0)])[g] for g, n in zip(grids, names))
    ok = cost <= budget
    return float(energy[ok].max()) if bool(ok.any()) else -1.0


def _random_spectra(seed: int, layers: int = 4, length: int = 6):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        s = torch.rand(length, generator=g, dtype=F64) * torch.logspace(0, -torch.rand(1, generator=g).item() * 3, length, dtype=F64)
        out[f"layer{i}"] = s.sort(descending=True).values * (1 + 4 * torch.rand(1, generator=g, dtype=F64))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_greedy_allocation_is_optimal_for_equal_costs(seed):
    spectra = _random_spectra(seed)
    costs = {n: 3 for n in spectra}
    caps = {n: 5 for n in spectra}  # len − 1
    for budget in (12, 20, 33, 45, 60):
        ranks = allocate_ranks(spectra, costs, budget)
        spent = sum(ranks[n] * costs[n] for n in ranks)
        assert spent <= budget
        assert budget - spent < 3 or all(ranks[n] == caps[n] for n in ranks)  # budget used up to one rank
        assert captured_energy(spectra, ranks) == pytest.approx(_brute_force(spectra, costs, budget, 1, caps), rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_greedy_allocation_with_unequal_costs_is_near_optimal(seed):
    """Unequal costs (a knapsack): never above the optimum, never below the optimum for one
    most expensive rank less of budget, and the budget is respected from below."""
    spectra = _random_spectra(seed + 50)
    costs = {"layer0": 2, "layer1": 3, "layer2": 5, "layer3": 7}
    caps = {n: 5 for n in spectra}
    c_max = max(costs.values())
    exact = 0
    for budget in range(17, 90, 6):
        ranks = allocate_ranks(spectra, costs, budget)
        assert sum(ranks[n] * costs[n] for n in ranks) <= budget
        got = captured_energy(spectra, ranks)
        opt = _brute_force(spectra, costs, budget, 1, caps)
        assert got <= opt * (1 + 1e-12)
        assert got >= _brute_force(spectra, costs, budget - c_max + 1, 1, caps) * (1 - 1e-12)
        exact += got >= opt * (1 - 1e-12)
    assert exact >= 6  # and it is exactly optimal for most budgets


def test_allocation_bounds_budget_and_errors():
    spectra = _random_spectra(3)
    costs = {n: 4 for n in spectra}
    r = allocate_ranks(spectra, costs, budget=4 * 12, min_rank=2, max_rank=4)
    assert all(2 <= v <= 4 for v in r.values()) and sum(r.values()) == 12
    r = allocate_ranks(spectra, costs, budget=10_000, max_rank={"layer0": 2})
    assert r["layer0"] == 2 and all(r[n] == 5 for n in r if n != "layer0")  # capped at len − 1 = 5
    # zero gains (past the data rank) are never bought: the budget is under-spent
    flat = {"a": torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0], dtype=F64), "b": torch.tensor([2.0, 0.0, 0.0], dtype=F64)}
    r = allocate_ranks(flat, {"a": 1, "b": 1}, budget=100)
    assert r == {"a": 2, "b": 1}
    # a cheap layer's rank is bought over an expensive one of equal gain
    r = allocate_ranks({"big": torch.ones(4, dtype=F64), "small": torch.ones(4, dtype=F64)}, {"big": 10, "small": 2}, 16)
    assert r == {"big": 1, "small": 3}
    with pytest.raises(ValueError, match=r"cannot give every one of the 4 layers its minimum rank 2 \(32 parameters\)"):
        allocate_ranks(spectra, costs, budget=31, min_rank=2)
    with pytest.raises(ValueError, match=r"layer0: min_rank=6 exceeds its largest allowed rank 5"):
        allocate_ranks(spectra, costs, budget=10_000, min_rank=6)
    with pytest.raises(ValueError, match="min_rank must be an integer"):
        allocate_ranks(spectra, costs, budget=100, min_rank=0)
    with pytest.raises(ValueError, match="same layers"):
        allocate_ranks(spectra, {"layer0": 1}, budget=100)
    with pytest.raises(ValueError, match="cost per rank must be positive"):
        allocate_ranks(spectra, {**costs, "layer1": 0}, budget=100)


# --------------------------------------------------------------------------------------------
# Cholesky projection (the fast exact path for a positive ridge)


def test_cholesky_projection_gives_the_eigen_factors():
    from peft_eora.decompose import Projection, cholesky_projection, projection_for

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 48, generator=gen, dtype=F64) * torch.logspace(0, -4, 48, dtype=F64)
    x[:, 5] = 0.0  # a dead channel
    H = x.T @ x
    delta = torch.randn(24, 48, generator=gen, dtype=F64)
    for d in (1e-3, 0.01, 1.0):
        chol = cholesky_projection(H, d)
        assert isinstance(chol, Projection) and chol.lower
        S, S_pinv, kept = eigen_projection(H, d)
        eig = Projection(S=S, kept=kept, S_pinv=S_pinv)
        f_c = eora_factors(delta, H, 6, projection=chol)
        f_e = eora_factors(delta, H, 6, projection=eig)
        ref = f_e.B.double() @ f_e.A.double()
        got = f_c.B.double() @ f_c.A.double()
        assert (got - ref).norm() <= 1e-5 * ref.norm()  # float32 factors: same product
        assert torch.allclose(f_c.singular_values, f_e.singular_values, rtol=1e-5)
        assert projection_for(H, d).lower
    # no ridge (or one below the eigenvalue cut-off): the eigendecomposition with its pseudo-inverse
    assert cholesky_projection(H, 0.0) is None and not projection_for(H, 0.0).lower
    assert cholesky_projection(H, 1e-12) is None
    assert cholesky_projection(torch.zeros(8, 8, dtype=F64), 0.1) is None  # no signal: plain SVD fallback


def test_the_gram_routes_no_cut_check_factorises_in_place():
    from peft_eora.decompose import _cholesky_

    A = torch.randn(40, 24, dtype=F64)
    pd = A.T @ A + 1e-3 * torch.eye(24, dtype=F64)
    singular = A[:10].T @ A[:10]  # rank 10 < 24
    singular.diagonal().sub_(1e-6)
    for M, expected in ((pd, True), (singular, False)):
        work = M.clone()
        assert _cholesky_(work) is expected
        if expected:  # the factor was written over the input: no second n × n matrix
            L = work.tril()
            assert torch.allclose(L @ L.T, M, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tile", [7, 1024])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_damped_is_bit_identical_to_the_plain_formula(monkeypatch, tile, damping):
    """The tile-by-tile, in-place symmetrisation and ridge give exactly ``0.5·(H + Hᵀ) + δ·m·I``
    (in float64, a new tensor), also when the tile does not divide ``n``."""
    monkeypatch.setattr(decompose, "_SYM_TILE", tile)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(50, 20, generator=g)
    H = X.T @ X + 1e-3 * torch.randn(20, 20, generator=g)  # float32, not exactly symmetric
    Hd = H.double()
    ref = 0.5 * (Hd + Hd.T)
    if damping:
        ref = ref + damping * float(torch.diagonal(ref).mean()) * torch.eye(20, dtype=F64)
    out = damped(H, damping)
    assert out.dtype == F64 and torch.equal(out, ref)
    H64 = H.double()
    assert damped(H64, damping).data_ptr() != H64.data_ptr() and torch.equal(H64, H.double())  # input untouched


def test_cholesky_projection_can_factorise_in_place():
    """``overwrite=True``: a float64 H becomes its own Cholesky factor (no second n × n matrix), with
    the same factor as the default copy; float32 input is never written."""
    from peft_eora.decompose import cholesky_projection

    X = torch.randn(200, 30, dtype=F64)
    H = X.T @ X
    ref = cholesky_projection(H, 0.01)
    work = H.clone()
    proj = cholesky_projection(work, 0.01, overwrite=True)
    assert proj.S.data_ptr() == work.data_ptr()
    assert torch.allclose(proj.S, ref.S, rtol=1e-12, atol=1e-12 * float(ref.S.abs().max()))
    assert torch.equal(proj.S, proj.S.tril())
    H32 = H.float()
    before = H32.clone()
    cholesky_projection(H32, 0.01, overwrite=True)
    assert torch.equal(H32, before)


def test_all_finite_checks_every_slice():
    from peft_eora.decompose import _all_finite

    M = torch.zeros(300, 40, dtype=F64)
    assert _all_finite(M, chunk=100) and _all_finite(M.T, chunk=100) and _all_finite(torch.zeros(5))
    for bad in (math.nan, math.inf, -math.inf):
        M[-1, -1] = bad
        assert not _all_finite(M, chunk=100) and not _all_finite(M.T, chunk=100)


@pytest.mark.parametrize("damping", [0.0, 0.5])  # eigenbasis / Cholesky square root
def test_projection_in_place_matches_and_leaves_the_residual_alone(monkeypatch, damping):
    """eora_factors projects its float64 copy of ΔW in place, a few rows at a time: the same
    product as ΔW·S, and a float64 residual passed in (no copy made by .double()) is left as it was."""
    from peft_eora.decompose import eora_factors, projection_for

    monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", 8 * 48 * 3)  # blocks of 3 rows
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(200, 48, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3.0, 48, dtype=torch.float64)
    H = X.T @ X
    delta = torch.randn(10, 48, generator=gen, dtype=torch.float64)
    proj = projection_for(H, damping)
    D = delta.clone()
    assert proj.project_(D) is D
    whole = delta @ proj.S if proj.scale is None else (delta @ proj.S) * proj.scale  # Q·diag(√λ) at δ = 0
    torch.testing.assert_close(D, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(proj.project(delta), whole, rtol=0, atol=0)
    before = delta.clone()
    f = eora_factors(delta, H, 4, damping=damping)
    assert torch.equal(delta, before)
    ref = whole
    U, sv, Vh = torch.linalg.svd(ref, full_matrices=False)
    torch.testing.assert_close(f.singular_values.double(), sv.float().double(), rtol=1e-5, atol=1e-6)


def test_row_block_products_match_the_whole_ones(monkeypatch):
    """The row-block loops that keep a second out × in (or in × in) float64 matrix from existing give
    the whole products: D·H·Dᵀ, and eora_factors_auto's float64 H_fit + H_val (same choice, same factors)."""
    from peft_eora.decompose import _sandwich, eora_factors_auto

    gen = torch.Generator().manual_seed(7)
    D = torch.randn(10, 48, generator=gen, dtype=torch.float64)
    X = torch.randn(300, 48, generator=gen) * torch.linspace(0.2, 2.0, 48)
    H_fit, H_val = X[:150].T @ X[:150], X[150:].T @ X[150:]
    whole_f, whole_c = eora_factors_auto(D.float(), H_fit, H_val, 3)
    monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", 8 * 48 * 4)  # blocks of 4 rows
    torch.testing.assert_close(_sandwich(D, H_fit.double()), D @ H_fit.double() @ D.T, rtol=1e-12, atol=1e-9)
    # float32 parts read as they are (rows converted a block at a time), their sum never made
    both = H_fit.double() + H_val.double()
    torch.testing.assert_close(_sandwich(D, (H_fit, H_val)), D @ both @ D.T, rtol=1e-12, atol=1e-9)
    # an asymmetric H: the quadratic form of its symmetric part, returned exactly symmetric
    skew = H_fit.double() + torch.randn(48, 48, generator=gen, dtype=torch.float64)
    K = _sandwich(D, skew)
    torch.testing.assert_close(K, D @ (0.5 * (skew + skew.T)) @ D.T, rtol=1e-12, atol=1e-9)
    assert torch.equal(K, K.T)
    f, c = eora_factors_auto(D.float(), H_fit, H_val, 3)
    assert c.damping == whole_c.damping
    torch.testing.assert_close(f.B @ f.A, whole_f.B @ whole_f.A, rtol=1e-5, atol=1e-6)


def test_symmetrize_in_place_is_bit_identical():
    """``_symmetrize_`` (tiles, in place) gives exactly ``0.5·(G + Gᵀ)`` across tile edges."""
    from peft_eora.decompose import _symmetrize_

    D = torch.randn(1500, 700, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    G = D @ D.T
    assert torch.equal(_symmetrize_(G.clone()), 0.5 * (G + G.T))


def test_covariance_parts_are_used_without_adding_them_in_float32(monkeypatch):
    """``damping="auto"``'s fit and held-out covariances are passed as a pair: ``damped`` sums them in
    float64 (bit for bit the float64 sum, row blocks or not), ``weighted_error`` adds their traces."""
    from peft_eora.decompose import covariance64, damped, weighted_error

    gen = torch.Generator().manual_seed(11)
    X = torch.randn(400, 40, generator=gen) * torch.linspace(0.1, 3.0, 40)
    A, B = X[:200].T @ X[:200], X[200:].T @ X[200:]
    ref = A.double() + B.double()
    monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", 8 * 40 * 3)  # blocks of 3 rows
    assert torch.equal(covariance64((A, B)), ref)
    assert torch.equal(damped((A, B), 0.1), damped(ref, 0.1))
    delta = torch.randn(12, 40, generator=gen)
    approx = torch.randn(12, 40, generator=gen) * 0.1
    E = delta.double() - approx.double()
    direct = math.sqrt(float(torch.trace(E @ ref @ E.T)))
    assert weighted_error(delta, (A, B), approx) == pytest.approx(direct, rel=1e-12)
    assert weighted_error(delta, ref, approx) == pytest.approx(direct, rel=1e-12)
    # an asymmetric H (rounding of a float32 accumulation) reads the same through its row blocks
    skew = torch.randn(40, 40, generator=gen, dtype=torch.float64) * 1e-3
    assert weighted_error(delta, ref + skew, approx) == pytest.approx(
        math.sqrt(float(torch.trace(E @ (ref + skew) @ E.T))), rel=1e-12)


def test_scaled_truncated_svd_matches_scaling_first(monkeypatch):
    """``truncated_svd(D, r, col_scale=s, gram=DᵀD)`` (a tall D: the Gram matrix scaled; a wide one:
    its Gram matrix summed a block of scaled columns at a time; never ``D·diag(s)`` whole) gives the
    triplets of ``D·diag(s)``."""
    from peft_eora.decompose import truncated_svd

    monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", 8 * 20 * 7)  # the wide D: blocks of 7 columns
    gen = torch.Generator().manual_seed(5)
    for shape in ((60, 20), (20, 60)):
        D = torch.randn(*shape, generator=gen, dtype=torch.float64)
        s = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.1
        U0, sv0, Vh0 = truncated_svd(D * s, 5)
        gram = D.T @ D if shape[0] > shape[1] else None
        U1, sv1, Vh1 = truncated_svd(D, 5, col_scale=s, gram=gram)
        torch.testing.assert_close(sv1, sv0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close((U1 * sv1[:5]) @ Vh1, (U0 * sv0[:5]) @ Vh0, rtol=1e-9, atol=1e-9)
        if gram is not None:
            assert torch.equal(gram, D.T @ D)  # the shared Gram matrix is not written over


def test_residual_sq_in_row_blocks_matches_the_whole_product(monkeypatch):
    """``tr(E·H·Eᵀ)`` for ``E = D − B·A`` with E made a block of rows at a time and H (a float64
    matrix, or float32 parts) read a block of rows at a time equals the whole product."""
    from peft_eora.decompose import _residual_sq

    gen = torch.Generator().manual_seed(9)
    D = torch.randn(30, 16, generator=gen, dtype=torch.float64)
    B, A = torch.randn(30, 4, generator=gen, dtype=torch.float64), torch.randn(4, 16, generator=gen, dtype=torch.float64)
    X = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    H = X.T @ X
    E = D - B @ A
    monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", 8 * 16 * 7)  # blocks of 7 rows
    assert _residual_sq(D, B, A, H) == pytest.approx(float(((E @ H) * E).sum()), rel=1e-12)
    parts = (X[:20].T @ X[:20]).float(), (X[20:].T @ X[20:]).float()
    H32 = parts[0].double() + parts[1].double()
    assert _residual_sq(D, B, A, parts) == pytest.approx(float(((E @ H32) * E).sum()), rel=1e-12)


def _pair(n: int = 40, dead: int = 0, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit and held-out covariances (float32) of anisotropic inputs; ``dead`` channels never fire."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(400, n, generator=gen) * torch.logspace(0, -1.5, n)
    if dead:
        X[:, :dead] = 0
    return X[:200].T @ X[:200], X[200:].T @ X[200:]


@pytest.mark.parametrize("damping", [0.0, 0.1, 3.0])
@pytest.mark.parametrize("dead", [0, 3])
def test_refit_auto_matches_the_eigen_route_and_its_root_gives_the_pairs_statistics(damping, dead):
    """``refit_auto`` factorises ``H_fit + H_val`` in place (Cholesky where the ridge — or at δ = 0 a
    shifted Cholesky proving nothing is cut — allows it, else ``eigh``): the factors of the eigenbasis
    route, and a root whose weighted errors are those of the pair; ``release`` is called once."""
    from peft_eora.decompose import CovarianceRoot, refit_auto

    H_fit, H_val = _pair(dead=dead)
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(3)) * 0.01
    released: list[int] = []
    f, root = refit_auto(delta, (H_fit, H_val), damping, 5, release=lambda: released.append(1))
    assert released == [1] and isinstance(root, CovarianceRoot)
    both = H_fit.double() + H_val.double()
    ref = eora_factors(delta, both, 5, projection=eigen(both).projection(damping))
    assert rel_diff(product(f), product(ref)) < 1e-6
    assert f.kept_eigen == ref.kept_eigen
    approx = f.B.double() @ f.A.double()
    for a in (None, approx):
        assert weighted_error(delta, root, a) == pytest.approx(weighted_error(delta, (H_fit, H_val), a), rel=1e-7)
    # the root as a matrix: H itself (and H + δ·m·I through damped)
    torch.testing.assert_close(root.matrix(), 0.5 * (both + both.T), rtol=1e-9, atol=1e-9 * float(both.abs().max()))
    torch.testing.assert_close(decompose.damped(root, damping), decompose.damped(both, damping),
                               rtol=1e-9, atol=1e-9 * float(both.abs().max()))
    # the route taken: a Cholesky factor (no scale) unless δ = 0 with dead channels (the eigenvectors)
    assert (root.scale is not None) == (damping == 0.0 and dead > 0)


def test_refit_auto_refuses_what_it_cannot_refit():
    from peft_eora.decompose import refit_auto

    H_fit, H_val = _pair()
    delta = torch.randn(24, 40) * 0.01
    with pytest.raises(ValueError, match="finite damping"):
        refit_auto(delta, (H_fit, H_val), math.inf, 5)
    with pytest.raises(ValueError, match="does not match"):
        refit_auto(delta, (H_fit[:30, :30], H_val[:30, :30]), 0.1, 5)
    H_val[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        refit_auto(delta, (H_fit, H_val), 0.1, 5)


@pytest.mark.parametrize("iterate,shape", [(False, (24, 40)), (False, (40, 40)), (False, (60, 40)), (True, (80, 120)),
                                            (True, (160, 100))])
@pytest.mark.parametrize("damping", [0.01, 0.3, math.inf])
def test_gram_refit_gives_the_refits_factors_from_the_scorings_gram_matrices(damping, shape, iterate, monkeypatch):
    """A residual scored from Gram matrices keeps them (``choice.gram``): ``G0 + K + δ·m·G1`` is the Gram
    matrix of ``ΔW·S`` on all tokens (of ``R·S`` for a tall one, ``RᵀR = ΔWᵀΔW``), so ``gram_refit``
    gives ``refit_auto``'s factors (plain SVD's at δ = inf) with no ``S`` made — wide, square and tall,
    by ``eigh`` and by the iterative route (started from the chosen candidate's block) — and uses the
    pencil up."""
    from peft_eora.decompose import gram_refit, refit_auto

    calls: list[int] = []
    if iterate:
        monkeypatch.setattr(decompose, "ITERATIVE_MIN_DIM", 0)
        top_eigh = decompose.topeig.top_eigh
        monkeypatch.setattr(decompose.topeig, "top_eigh",
                            lambda *a, **k: calls.append(k.get("start") is not None) or top_eigh(*a, **k))
    H_fit, H_val = _pair(n=shape[1])
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(5)) * 0.01
    ranks = 5
    choice = select_damping(delta, H_fit, H_val, ranks, grid=(damping,), early_stop=False)
    assert choice.damping == damping and choice.gram is not None
    assert (choice.gram.root is not None) == (shape[0] > shape[1])
    got = gram_refit(delta, choice, ranks, H=(H_fit, H_val))
    # scored (from a random start: one candidate) and refitted from the chosen candidate's Ritz block
    assert calls == ([False, True] if iterate else [])
    if damping == math.inf:
        ref = eora_factors(delta, None, ranks, method="svd")
    else:
        ref, _ = refit_auto(delta, (H_fit, H_val), damping, ranks)
    assert rel_diff(product(got), product(ref)) < 1e-8
    torch.testing.assert_close(got.singular_values[:ranks], ref.singular_values[:ranks], rtol=1e-6, atol=0)
    assert got.kept_eigen == ref.kept_eigen == shape[1]
    assert got.energy_retained == pytest.approx(ref.energy_retained, rel=1e-6)
    assert got.A.dtype == got.B.dtype == torch.float32 and got.A.shape == (ranks, shape[1])
    with pytest.raises(RuntimeError, match="already used"):
        choice.gram.take()
    # the public pair of calls takes this route too
    factors, _ = eora_factors_auto(delta, H_fit, H_val, ranks, grid=(damping,))
    assert rel_diff(product(factors), product(ref)) < 1e-8


def test_the_cut_off_test_is_shareable_and_its_answer_routes_the_scoring():
    """``is_cut_free``: True for a well-conditioned covariance, False with dead channels or none at
    all, NaN refused. Passed to ``select_damping`` (a value or a function) it is the test itself:
    True scores through the Gram matrices (as testing there would), False in ``H_fit``'s eigenbasis,
    with the same ridge and errors where both apply."""
    from peft_eora.decompose import is_cut_free

    H_fit, H_val = _pair()
    H_dead, _ = _pair(dead=3)
    assert is_cut_free(H_fit) and not is_cut_free(H_dead) and not is_cut_free(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="NaN or inf"):
        is_cut_free(torch.full((4, 4), math.nan))
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(5)) * 0.01
    asked: list[bool] = []
    shared = select_damping(delta, H_fit, H_val, 5, early_stop=False,
                            cut_free=lambda: asked.append(True) or is_cut_free(H_fit))
    tested = select_damping(delta, H_fit, H_val, 5, early_stop=False)
    eigenbasis = select_damping(delta, H_fit, H_val, 5, early_stop=False, cut_free=False)
    assert asked == [True] and shared.gram is not None and eigenbasis.gram is None
    assert shared.damping == tested.damping == eigenbasis.damping and shared.errors == tested.errors
    for d, e in eigenbasis.errors.items():
        assert shared.errors[d] == pytest.approx(e, rel=1e-8), d


def test_gram_refit_declines_what_it_cannot_prove():
    """δ = 0 needs ``refit_auto``'s test of ``H_fit + H_val`` (the pencil is dropped all the same); a
    tall residual's refit needs the covariances; an ``H_fit`` with dead channels is scored in its
    eigenbasis (no Gram matrices at all); a tall residual's errors before are known only unweighted."""
    from peft_eora.decompose import gram_refit

    H_fit, H_val = _pair()
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(5)) * 0.01
    choice = select_damping(delta, H_fit, H_val, 5, grid=(0.0,))
    assert choice.gram is not None and gram_refit(delta, choice, 5) is None
    with pytest.raises(RuntimeError, match="already used"):
        choice.gram.take()
    tall = select_damping(delta.T.contiguous(), H_fit[:24, :24], H_val[:24, :24], 5, grid=(0.1,))
    weights = torch.rand(40, dtype=F64) + 0.5
    assert tall.gram.before_sq() is not None and tall.gram.before_sq(weights) is None
    assert gram_refit(delta.T, tall, 5) is None
    assert tall.gram.before_sq(weights) is None  # still refused once the refit has taken R
    H_dead, H_dead_val = _pair(dead=3)
    assert select_damping(delta, H_dead, H_dead_val, 5, grid=(0.1,)).gram is None
    # a wide residual's rows: the weighted residual's errors before, row by row
    wide = select_damping(delta * weights[:24, None].sqrt(), H_fit, H_val, 5, grid=(0.1,))
    both = H_fit.double() + H_val.double()
    assert wide.gram.before_sq(weights[:24]) == pytest.approx(float((delta.double() @ both * delta.double()).sum()),
                                                              rel=1e-6)


@pytest.mark.parametrize("out_f", [24, 60])
@pytest.mark.parametrize("factors", ["refit", "rounded", "exact"])
def test_weighted_errors_known_equals_the_pass_over_h(factors, out_f):
    """With the error before known (``GramPencil.before_sq``), the errors before and after come from
    ``H·Aᵀ`` alone: those of ``weighted_errors`` for the refit's factors (wide and tall), for factors
    rounded away from them, and for factors that reproduce the residual exactly (where the terms
    cancel to ~1e-8)."""
    from peft_eora.decompose import gram_refit, weighted_errors, weighted_errors_known

    H_fit, H_val = _pair()
    gen = torch.Generator().manual_seed(8)
    delta = torch.randn(out_f, 40, generator=gen) * 0.01
    choice = select_damping(delta, H_fit, H_val, 5, grid=(0.1,))
    before_sq = choice.gram.before_sq()
    f = gram_refit(delta, choice, 5, H=(H_fit, H_val))
    B, A = f.B, f.A
    if factors == "rounded":
        B, A = (B * 64).round() / 64, (A * 64).round() / 64
    elif factors == "exact":  # delta of rank 5 and its exact factors
        B, A = torch.randn(out_f, 5, generator=gen) * 0.1, torch.randn(5, 40, generator=gen) * 0.1
        delta = B @ A
        before_sq = float((delta.double() @ (H_fit.double() + H_val.double()) * delta.double()).sum())
    ref = weighted_errors(delta, (H_fit, H_val), B, A)
    got = weighted_errors_known(delta, (H_fit, H_val), B, A, before_sq)
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    if factors == "exact":
        assert got[1] <= 1e-6 * got[0] and ref[1] <= 1e-6 * ref[0]
    else:
        assert got[1] == pytest.approx(ref[1], rel=1e-6)
        assert got[1] < got[0]


def test_eigh_in_place_and_the_eigen_root():
    """``eigen(H, overwrite=True)`` writes the eigenvectors over a float64 ``H`` (no copy): the values
    of ``torch.linalg.eigh``; ``Eigen.root`` projects and unprojects as the ``(S, S⁺)`` tuple does."""
    from peft_eora.decompose import Projection

    H_fit, H_val = _pair(dead=2)
    H = (H_fit.double() + H_val.double())
    ref_lam, _ = torch.linalg.eigh(0.5 * (H + H.T))
    own = H.clone()
    e = eigen(own, overwrite=True)
    assert e.Q.untyped_storage().data_ptr() == own.untyped_storage().data_ptr()
    torch.testing.assert_close(e.lam, ref_lam, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close((e.Q * e.lam) @ e.Q.T, 0.5 * (H + H.T), rtol=1e-9, atol=1e-9 * float(H.abs().max()))
    kept_copy = H.clone()
    eigen(kept_copy)  # without overwrite the caller's matrix is left alone
    assert torch.equal(kept_copy, H)
    D = torch.randn(7, 40, dtype=F64)
    for d in (0.0, 0.1):
        S, S_pinv, kept = e.projection(d)
        root = e.root(d)
        tup = Projection(S=S, kept=kept, S_pinv=S_pinv)
        assert root.kept == kept
        torch.testing.assert_close(root.project(D), tup.project(D), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(root.project_(D.clone()), tup.project(D), rtol=1e-12, atol=1e-12)
        M = torch.randn(3, 40, dtype=F64)
        torch.testing.assert_close(root.unproject(M), tup.unproject(M), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("damping,dead", [(0.01, 0), (0.0, 0), (0.0, 3), (1e-12, 0)])
def test_projection_and_root_gives_hs_statistics(damping, dead):
    """``projection_and_root``: the projection of :func:`projection_for` and a root of ``H`` sharing its
    matrix, whose weighted errors are ``H``'s (Cholesky route: ``L`` less the ridge; eigen route: ``Q·√λ``)."""
    from peft_eora.decompose import projection_and_root, projection_for

    H_fit, H_val = _pair(dead=dead)
    H = H_fit + H_val
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(4)) * 0.01
    proj, root = projection_and_root(H, damping)
    assert root.S.untyped_storage().data_ptr() == proj.S.untyped_storage().data_ptr()
    f = eora_factors(delta, None, 5, projection=proj)
    ref = eora_factors(delta, H, 5, projection=projection_for(H, damping))
    torch.testing.assert_close(product(f), product(ref), rtol=0, atol=0)
    approx = f.B.double() @ f.A.double()
    for a in (None, approx):
        assert weighted_error(delta, root, a) == pytest.approx(weighted_error(delta, H, a), rel=1e-6)
    assert proj.lower == (damping > 1e-10 * 40)
