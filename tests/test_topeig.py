"""Top eigenpairs by Chebyshev-filtered subspace iteration (``peft_eora.topeig``) and its use in
EoRA's truncated SVDs (``decompose._gram_top`` for wide Gram matrices): the same eigenvalues,
subspaces, factors and ridge choices as the full ``eigh`` it replaces, to its error bound, on
the spectra EoRA meets (flat quantisation noise, steep activation spectra, rank-deficient and
clustered ones)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_eora import decompose, topeig
from peft_eora.decompose import eora_factors, select_damping, weighted_error
from peft_eora.kernels.gptq_linear import quantize_rtn

F64 = torch.float64
HAS_GPU = torch.cuda.is_available()


def _rtn_residual(W: torch.Tensor, bits: int = 3, group: int = 32) -> torch.Tensor:
    """``W − RTN(W)`` (asymmetric, per group of ``group`` inputs, :func:`quantize_rtn`): quantisation noise."""
    codes, zeros, scales = quantize_rtn(W, bits, group)  # (in, out), (groups, out), (groups, out)
    g = torch.arange(W.shape[1]) // group
    return W - (scales[g] * (codes - zeros[g])).T.to(W)


def _spectrum(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """A symmetric PSD ``n × n`` matrix with a named kind of spectrum."""
    if kind == "flat":  # Gram of quantisation noise (Marchenko–Pastur-like: a flat top)
        D = _rtn_residual(torch.randn(n, 2 * n, generator=g, dtype=F64))
        return D @ D.T
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    if kind == "steep":  # power law with outliers, as activation covariances have
        lam = torch.arange(1, n + 1, dtype=F64).pow(-1.5)
        lam[:4] *= 400
    elif kind == "deficient":  # rank 40 < the block: zero eigenvalues in the block
        lam = torch.zeros(n, dtype=F64)
        lam[:40] = torch.linspace(5, 1, 40, dtype=F64)
    elif kind == "clustered":  # the wanted eigenvalue repeated across the cut
        lam = torch.full((n,), 0.1, dtype=F64)
        lam[:24] = 1.0
        lam[:8] = torch.linspace(3, 2, 8, dtype=F64)
    else:
        raise ValueError(kind)
    return (Q * lam) @ Q.T


@pytest.mark.parametrize("step_products", [4, 16])  # the CPU's and the GPUs' default
@pytest.mark.parametrize("kind", ["flat", "steep", "deficient", "clustered"])
def test_top_eigh_matches_eigh(kind, step_products):
    """Eigenvalues to 1e-9 of the largest; the eigen-equation holds; the vectors are
    orthonormal; the top-``r`` energy is ``eigh``'s to its 1e-10 bound; where the ``r``-th
    eigenvalue is separated from the next, the subspace is ``eigh``'s."""
    g = torch.Generator().manual_seed(0)
    n, r = 256, 16
    G = _spectrum(kind, n, g)
    before = G.clone()
    info: dict = {}
    lam, vecs = topeig.top_eigh(G, r, info=info, step_products=step_products)
    assert info["products"] >= step_products or info["steps"] == 1
    assert torch.equal(G, before)  # read only
    ref, Q = torch.linalg.eigh(G)
    ref, Q = ref.flip(0)[:r], Q.flip(1)[:, :r]
    scale = float(ref[0])
    assert float((lam - ref).abs().max()) <= 1e-9 * scale
    assert abs(float(lam.sum() - ref.sum())) <= 1e-10 * float(ref.sum()) + 1e-12 * scale
    assert float((vecs.T @ vecs - torch.eye(r, dtype=F64)).abs().max()) <= 1e-10
    assert float((G @ vecs - vecs * lam).norm()) <= 1e-4 * scale
    full = torch.linalg.eigvalsh(G).flip(0)
    if float(full[r - 1] - full[r]) > 1e-3 * scale:  # a well-defined top-r subspace
        overlap = torch.linalg.svdvals(Q.T @ vecs)
        assert float(overlap.min()) >= 1 - 1e-8


def test_top_eigh_zero_matrix_and_identity():
    """No signal (all eigenvalues 0) and a fully degenerate spectrum: orthonormal vectors and
    the exact eigenvalues, no NaN."""
    for G, value in ((torch.zeros(200, 200, dtype=F64), 0.0), (torch.eye(200, dtype=F64) * 2.5, 2.5)):
        lam, vecs = topeig.top_eigh(G, 10)
        assert torch.isfinite(vecs).all()
        assert torch.allclose(lam, torch.full((10,), value, dtype=F64), atol=1e-12)
        assert torch.allclose(vecs.T @ vecs, torch.eye(10, dtype=F64), atol=1e-10)


def test_top_eigh_is_deterministic_and_gives_up_within_its_budget():
    g = torch.Generator().manual_seed(1)
    G = _spectrum("flat", 320, g)
    a, b = topeig.top_eigh(G, 20), topeig.top_eigh(G, 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert topeig.top_eigh(G, 20, max_products=3) is None  # not converged in 3 products: the caller uses eigh
    with pytest.raises(ValueError, match="square"):
        topeig.top_eigh(torch.zeros(4, 5, dtype=F64), 2)
    with pytest.raises(ValueError, match="rank"):
        topeig.top_eigh(G, 0)


def test_filter_degree_bounds_the_growth():
    """Flat spectra get high degrees (the filter separates close eigenvalues), steep ones low
    degrees (their products would make the block too ill-conditioned to re-orthonormalise)."""
    assert topeig._degree(1.3, 1.0, 0.9) == topeig.MAX_DEGREE
    assert topeig._degree(1e6, 1.0, 0.5) == 1
    for m in range(1, topeig.MAX_DEGREE + 1):
        assert math.isclose(math.exp(topeig._log_cheb(m, 1.7)), math.cosh(m * math.acosh(1.7)), rel_tol=1e-12)


# --------------------------------------------------------------------------------------------
# in EoRA: truncated SVDs of wide Gram matrices
# --------------------------------------------------------------------------------------------


def _layer(out_f: int, in_f: int, seed: int = 0):
    """A quantisation residual and the fit/held-out covariances of steep, correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    delta = _rtn_residual(torch.randn(out_f, in_f, generator=g, dtype=F64) * 0.02)
    scales = torch.logspace(0, -2, in_f, dtype=F64)
    mix = torch.eye(in_f, dtype=F64) + 0.3 * torch.randn(in_f, in_f, generator=g, dtype=F64)
    X = (torch.randn(2048, in_f, generator=g, dtype=F64) * scales) @ mix
    return delta, X[::2].T @ X[::2], X[1::2].T @ X[1::2]


@pytest.fixture
def routes(monkeypatch):
    """Run a function with the iterative route forced on, then with ``eigh`` only."""

    def run(fn):
        monkeypatch.setattr(decompose, "ITERATIVE_MIN_DIM", 0)
        fast = fn()
        monkeypatch.setattr(decompose, "ITERATIVE_MIN_DIM", 1 << 30)
        return fast, fn()

    return run


@pytest.mark.parametrize("shape", [(160, 320), (320, 160)])
def test_factors_match_the_eigh_route(routes, shape):
    """Wide and tall residuals: the factors' weighted error is the ``eigh`` route's (1e-9), the
    products ``B·A`` agree, the top singular values too; the iterative route reports the top of
    the spectrum and the whole energy, so ``energy_retained`` is unchanged."""
    delta, H_fit, H_val = _layer(*shape)
    H = H_fit + H_val
    fast, exact = routes(lambda: eora_factors(delta, H, rank=16, damping=0.01))
    assert fast.singular_values.numel() == 16 < exact.singular_values.numel()
    assert fast.total_energy is not None and exact.total_energy is None
    e_fast = weighted_error(delta, H, (fast.B @ fast.A).double())
    e_exact = weighted_error(delta, H, (exact.B @ exact.A).double())
    assert abs(e_fast - e_exact) <= 1e-6 * e_exact  # float32 factors: their rounding dominates
    P, R = (fast.B @ fast.A).double(), (exact.B @ exact.A).double()
    assert float((P - R).norm() / R.norm()) <= 1e-5
    assert torch.allclose(fast.singular_values, exact.singular_values[:16], rtol=1e-6)
    assert fast.energy_retained == pytest.approx(exact.energy_retained, rel=1e-6)  # float32 σ


@pytest.mark.parametrize("shape", [(160, 320), (320, 160)])
def test_ridge_choice_matches_the_eigh_route(routes, shape):
    """``damping="auto"``'s held-out errors per ridge agree to 1e-7 (Gram route for the wide
    residual, eigenbasis route for the tall one) and the choice is the same."""
    delta, H_fit, H_val = _layer(*shape, seed=2)
    fast, exact = routes(lambda: select_damping(delta, H_fit.float(), H_val.float(), rank=16, early_stop=False))
    assert fast.damping == exact.damping
    assert fast.errors.keys() == exact.errors.keys()
    for d, e in exact.errors.items():
        assert fast.errors[d] == pytest.approx(e, rel=1e-7), d


def test_small_gram_matrices_keep_eigh(monkeypatch):
    """Below ``ITERATIVE_MIN_DIM``, or where the iterated block would exceed half the width, the
    whole spectrum comes from ``eigh``."""
    monkeypatch.setattr(decompose, "ITERATIVE_MIN_DIM", 0)
    delta, H_fit, H_val = _layer(48, 96)
    f = eora_factors(delta, H_fit, rank=16)  # block 48 > 48 / 2
    assert f.singular_values.numel() == 48 and f.total_energy is None
    monkeypatch.setattr(decompose, "ITERATIVE_MIN_DIM", 1000)
    delta, H_fit, H_val = _layer(160, 320)
    assert eora_factors(delta, H_fit, rank=16).singular_values.numel() == 160


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("host_rr", [False, True])
def test_top_eigh_on_cuda_matches_cpu_eigh(monkeypatch, host_rr):
    """cuBLAS/cuSOLVER: rank 128, flat and steep spectra; the Rayleigh–Ritz eigh on the device or
    on the host (``PEFT_EORA_TOPEIG_HOST_RR``)."""
    monkeypatch.setattr(topeig, "HOST_RAYLEIGH_RITZ", host_rr)
    g = torch.Generator().manual_seed(0)
    for kind in ("flat", "steep"):
        G = _spectrum(kind, 1024, g)
        lam, vecs = topeig.top_eigh(G.cuda(), 128)
        ref = torch.linalg.eigvalsh(G).flip(0)[:128]
        assert float((lam.cpu() - ref).abs().max()) <= 1e-9 * float(ref[0])
        V = vecs.cpu()
        assert float((G @ V - V * lam.cpu()).norm()) <= 1e-4 * float(ref[0])
