"""Low-bit factors fitted to the activations (``peft_eora.factor_quant``): GPTQ-style rounding on
the stored grid and the rank rotation (through ``EoRAConfig(adapter_bits=4)`` on a real GPTQ base:
``test_eora_gptq.py``)."""

from __future__ import annotations

import pytest
import torch
from peft_eora.adapter_quant import factor_rounder
from peft_eora.decompose import eora_factors
from peft_eora.factor_quant import _balanced, _plan, fit_lowbit_factors, gptq_round, rank_rotation
from peft_eora.kernels.lowbit import quantize_per_channel


def _inputs(n: int, tokens: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few loud channels, like a transformer's hidden states."""
    mix = torch.randn(n, n, generator=torch.Generator().manual_seed(98)) / n**0.5  # one distribution,
    g = torch.Generator().manual_seed(seed)  # different tokens per seed
    loud = torch.exp(1.5 * torch.randn(n, generator=torch.Generator().manual_seed(99)))
    return (torch.randn(tokens, n, generator=g) @ mix) * loud


def _weighted(E: torch.Tensor, H: torch.Tensor) -> float:
    E = E.double()
    return float(((E @ H.double()) * E).sum())


def _eora_layer(seed: int, n: int = 192, out: int = 160, r: int = 32):
    """A residual with a decaying spectrum, its EoRA factors (δ = 0.01), the δ-damped calibration
    covariance they are fitted to and a held-out covariance."""
    X, X_val = _inputs(n, 4096, seed), _inputs(n, 4096, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    decay = torch.logspace(0, -2, n)
    delta = (torch.randn(out, n, generator=g) * decay) @ torch.linalg.qr(torch.randn(n, n, generator=g))[0].T * 0.05
    H, H_val = X.T @ X, X_val.T @ X_val
    f = eora_factors(delta, H, r, damping=0.01)
    return delta, f, H + 0.01 * H.diagonal().mean() * torch.eye(n), H_val


@pytest.mark.parametrize("r", [8, 12, 37, 128])
def test_rank_rotation_is_orthogonal_and_spreads(r):
    R = rank_rotation(r)
    assert torch.allclose(R @ R.T, torch.eye(r, dtype=R.dtype), atol=1e-12)
    assert float(R.abs().max()) < 0.75  # no direction stays in one column


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 0), (8, 64)])
def test_gptq_round_is_on_the_stored_grid_and_beats_round_to_nearest(bits, group):
    n, rows = 128, 24
    X, X_val = _inputs(n, 2048, 0), _inputs(n, 2048, 1)
    W = torch.randn(rows, n, generator=torch.Generator().manual_seed(2))
    W_hat = gptq_round(W, X.T @ X, bits, group)
    assert W_hat.dtype == torch.float32 and torch.isfinite(W_hat).all()
    q = quantize_per_channel(W_hat, bits, group)
    assert torch.equal(q.dequantize(), W_hat)  # stored as is: the same codes and scales come back
    rtn = quantize_per_channel(W, bits, group).dequantize()
    H_val = X_val.T @ X_val
    assert _weighted(W - W_hat, H_val) < 0.85 * _weighted(W - rtn, H_val)  # held-out inputs


def test_gptq_round_leaves_the_callers_tensor_alone():
    """A float32 transposed view was its own contiguous copy's storage, so the in-place updates (between blocks of
    columns: more than one block) wrote into it."""
    n = 256
    X = _inputs(n, 512, 5)
    M = torch.randn(n, 16, generator=torch.Generator().manual_seed(6))
    before = M.clone()
    gptq_round(M.T, X.T @ X, 4, 16)
    assert torch.equal(M, before)


def test_svd_baseline_quantized_adapters_are_fitted_not_rounded_entrywise():
    """``method="svd"`` with ``adapter_bits=4`` was rounded entry by entry after computing (what EoRA's int4
    adapters are compared against); its factors are fitted towards the residual as every other layer's are."""
    import copy

    from peft import get_peft_model
    from tiny_models import tiny_llama_pair

    import peft_eora
    from peft_eora.kernels.lowbit import factor_group_size, grid_values

    original, quantized = tiny_llama_pair()
    calib = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))

    def run(bits):
        pm = get_peft_model(copy.deepcopy(quantized), peft_eora.EoRAConfig(r=8, adapter_bits=bits, method="svd"))
        peft_eora.initialize_eora_weights(pm, original_model=original, calibration=calib, progress=False)
        return pm

    floats, fitted = run(16), run(4)
    weights = dict(original.named_parameters())
    err = {"fitted": 0.0, "entrywise": 0.0}
    for name, mod in fitted.named_modules():
        if not (hasattr(mod, "lora_A") and "default" in mod.lora_A):
            continue
        ref = floats.get_submodule(name)
        dW = weights[name.replace("base_model.model.", "") + ".weight"].detach() - mod.base_layer.weight.detach()
        A, B = ref.lora_A["default"].weight.detach(), ref.lora_B["default"].weight.detach() * ref.scaling["default"]
        A4, B4 = mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach() * mod.scaling["default"]
        entry_A, entry_B = grid_values(A, 4, factor_group_size("lora_A", 4, A.shape[1])), grid_values(B, 4, 0)
        err["fitted"] += float((dW - B4 @ A4).norm() ** 2)
        err["entrywise"] += float((dW - entry_B @ entry_A).norm() ** 2)
    assert err["fitted"] < err["entrywise"]


def test_gptq_round_handles_dead_inputs_and_zero_rows():
    n = 64
    X = _inputs(n, 512, 3)
    X[:, 5] = 0.0  # a channel that never fires
    W = torch.randn(6, n, generator=torch.Generator().manual_seed(4))
    W[2] = 0.0
    W_hat = gptq_round(W, X.T @ X, 4, 32)
    assert torch.isfinite(W_hat).all()
    assert torch.equal(W_hat[2], torch.zeros(n))  # nothing to store, nothing invented
    with pytest.raises(ValueError, match="does not match the 64 input columns"):
        gptq_round(W, torch.eye(n + 1), 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_fitted_factors_beat_rounding_each_entry(bits):
    """EoRA factors of a residual with a decaying spectrum: the fitted int4/int8 pair loses less of
    the activation-weighted compensation on held-out inputs than rounding A and B entry by entry."""
    delta, f, H_fit, H_val = _eora_layer(5)
    float_err = _weighted(delta - f.B @ f.A, H_val)
    A_hat, B_hat = fit_lowbit_factors(f.A, f.B, H_fit, bits)
    A_rtn, B_rtn = factor_rounder(bits)(f.A, f.B)
    fitted = _weighted(delta - B_hat @ A_hat, H_val) - float_err
    rounded = _weighted(delta - B_rtn @ A_rtn, H_val) - float_err
    assert 0 <= fitted < 0.9 * rounded, (fitted, rounded)
    for w, kind in ((A_hat, "lora_A"), (B_hat, "lora_B")):  # what save_pretrained stores, bit for bit
        assert torch.equal(factor_rounder(bits)(w, w)[0 if kind == "lora_A" else 1], w)
    with pytest.raises(ValueError, match="incompatible shapes"):
        fit_lowbit_factors(f.A, f.B[:, :-1], H_fit, bits)


def test_scale_clipping_lowers_held_out_error_and_stays_on_the_grid():
    """Each group's scale chosen among shrunk candidates (``CLIP_GRID``) rounds held-out inputs'
    products closer than the largest entry's scale alone, and is still stored bit for bit."""
    n = 128
    X, X_val = _inputs(n, 2048, 11), _inputs(n, 2048, 12)
    W = torch.randn(24, n, generator=torch.Generator().manual_seed(13))
    H, H_val = X.T @ X, X_val.T @ X_val
    clipped, plain = gptq_round(W, H, 4, 32), gptq_round(W, H, 4, 32, clip=(1.0,))
    assert torch.equal(quantize_per_channel(clipped, 4, 32).dequantize(), clipped)
    assert _weighted(W - clipped, H_val) < 0.7 * _weighted(W - plain, H_val)


def test_balance_keeps_the_product():
    X = _inputs(48, 512, 14)
    g = torch.Generator().manual_seed(15)
    A, B = torch.randn(8, 48, generator=g, dtype=torch.float64), torch.randn(20, 8, generator=g, dtype=torch.float64)
    B[:, 3] = 0.0  # a direction that does nothing stays as it is
    H = (X.T @ X).double()
    A2, B2 = _balanced(A, B, H, 0.2)
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-10)
    assert torch.equal(A2[3], A[3])
    size = B.norm(dim=0) * torch.einsum("ij,jk,ik->i", A, H, A).sqrt()
    keep = B.norm(dim=0) > 0
    assert torch.allclose(B2.norm(dim=0)[keep], size[keep] ** 0.2)


def test_alternating_rounds_and_balance_beat_one_pass():
    """Rebalancing the pair towards ``A``, refitting each factor to the other's rounded values and
    clipped scales: on held-out inputs the int4 pair loses well under what one GPTQ pass over the
    EoRA split lost (the previous method: ``rounds=1, balance=0.5, clip=(1.0,)``)."""
    delta, f, H_fit, H_val = _eora_layer(16)
    float_err = _weighted(delta - f.B @ f.A, H_val)

    def lost(**kw) -> float:
        A_hat, B_hat = fit_lowbit_factors(f.A, f.B, H_fit, 4, **kw)
        assert torch.equal(factor_rounder(4)(A_hat, B_hat)[0], A_hat)
        assert torch.equal(factor_rounder(4)(A_hat, B_hat)[1], B_hat)
        return _weighted(delta - B_hat @ A_hat, H_val) - float_err

    one_pass, now = lost(rounds=1, balance=0.5, clip=(1.0,)), lost()
    assert 0 <= now < 0.8 * one_pass, (now, one_pass)
    with pytest.raises(ValueError, match="rounds=0 must be at least 1"):
        fit_lowbit_factors(f.A, f.B, H_fit, 4, rounds=0)


def test_zero_factors_and_dead_directions_stay_finite():
    """A layer with nothing to compensate (zero factors) and a rank direction that does nothing fit
    without NaNs: zeros stay zeros, the rest is still on the grid."""
    n, out, r = 64, 40, 8
    H = (_inputs(n, 512, 19).T @ _inputs(n, 512, 19)).double()
    A_hat, B_hat = fit_lowbit_factors(torch.zeros(r, n), torch.zeros(out, r), H, 4)
    assert torch.equal(A_hat, torch.zeros(r, n)) and torch.equal(B_hat, torch.zeros(out, r))
    g = torch.Generator().manual_seed(20)
    A, B = torch.randn(r, n, generator=g), torch.randn(out, r, generator=g)
    B[:, 2] = 0.0
    A_hat, B_hat = fit_lowbit_factors(A, B, H, 4)
    assert torch.isfinite(A_hat).all() and torch.isfinite(B_hat).all()
    assert _weighted(B @ A - B_hat @ A_hat, H) < 0.05 * _weighted(B @ A, H)


def test_aiming_at_the_residual():
    """``target=``: refits and the choice of pair aim at the matrix ``B·A`` stands for (the
    residual), not at ``B·A``. Aimed at ``B·A`` itself it is the same fit; aimed at a residual with
    more in the pair's reach than ``B·A`` holds, the rounded pair follows it there."""
    delta, f, H_fit, _ = _eora_layer(21, r=16)
    err = lambda T, A, B: _weighted(T - B @ A, H_fit)  # noqa: E731
    A0, B0 = fit_lowbit_factors(f.A, f.B, H_fit, 4)
    A1, B1 = fit_lowbit_factors(f.A, f.B, H_fit, 4, target=f.B @ f.A)
    assert err(f.B @ f.A, A1, B1) == pytest.approx(err(f.B @ f.A, A0, B0), rel=1e-3)  # float32 T·H
    # a target the rank-16 pair can reach but B·A misses: B·(A + D)
    D = 0.3 * f.A.std() * torch.randn(f.A.shape, generator=torch.Generator().manual_seed(22))
    T = f.B @ (f.A + D)
    A2, B2 = fit_lowbit_factors(f.A, f.B, H_fit, 4, target=T)
    assert err(T, A2, B2) < 0.2 * err(T, A0, B0)  # measured 0.05×
    for w, i in ((A2, 0), (B2, 1)):  # still what save_pretrained stores, bit for bit
        assert torch.equal(factor_rounder(4)(w, w)[i], w)
    with pytest.raises(ValueError, match="target shape"):
        fit_lowbit_factors(f.A, f.B, H_fit, 4, target=T[:, :-1])


@pytest.mark.parametrize("case", ["plain", "dead", "indefinite", "parts"])
def test_plan_is_the_damped_inverse_cholesky(case):
    """``_plan``: the upper triangular ``U`` with ``Uᵀ·U = (H + ridge·I)⁻¹`` (float64 reference),
    dead inputs set to 1; an indefinite ``H`` gets a ridge ten times larger until it factorises;
    ``H`` given as float32 parts with a ``damping`` is their damped sum's plan."""
    n = 48
    X = _inputs(n, 256, 30)
    if case == "dead":
        X[:, [3, 40]] = 0.0
    H = (X.T @ X).double()
    if case == "indefinite":
        # unit diagonal, eigenvalues 1 + 4·cos(kπ/(n+1)) down to about −3: factorises at a ridge of 10
        H = torch.eye(n, dtype=torch.float64) + 2.0 * (torch.diag(torch.ones(n - 1), 1) + torch.diag(torch.ones(n - 1), -1)).double()
    if case == "parts":
        X2 = _inputs(n, 128, 31)
        parts = ((X.T @ X).float(), (X2.T @ X2).float())
        U = _plan(parts, 0.01, damping=0.3).double()
        H = parts[0].double() + parts[1].double()
        H = H + 0.3 * float(H.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
    else:
        U = _plan(H.float(), 0.01).double()
    assert torch.equal(U, torch.triu(U)) and torch.isfinite(U).all()
    ref = H if case == "parts" else H.float().double()
    dead = ref.diagonal() <= 0
    ref[dead, :], ref[:, dead] = 0.0, 0.0
    ref[dead, dead] = 1.0
    ridge = 0.01 * float(ref.diagonal().mean())
    eye = torch.eye(n, dtype=torch.float64)
    while not bool(torch.linalg.cholesky_ex(ref + ridge * eye).info == 0):
        ridge *= 10.0
    if case == "indefinite":
        assert ridge > 0.01 * float(ref.diagonal().mean())  # the retries did run
    expected = torch.linalg.inv(ref + ridge * eye)
    assert torch.allclose(U.T @ U, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_no_covariance_rounds_each_group_without_feedback(benchmark_module):
    """``H=None`` (identity): each entry rounded on its group's clipped scale, the same values as
    the column-by-column loop against the identity, and no ``in × in`` matrix is made for it."""
    n, g = 1024, 32
    W = torch.randn(40, n, generator=torch.Generator().manual_seed(31))
    assert torch.equal(gptq_round(W, None, 4, g), gptq_round(W, torch.eye(n), 4, g))
    assert torch.equal(gptq_round(W, None, 8, 0), gptq_round(W, torch.eye(n), 8, 0))
    gen = torch.Generator().manual_seed(32)
    A, B = torch.randn(16, n, generator=gen), torch.randn(24, 16, generator=gen)
    with benchmark_module("bench_common").LiveTensorPeak(inventory_bytes=n * n * 4) as live:
        A_hat, B_hat = fit_lowbit_factors(A, B, None, 4, target=torch.randn(24, n, generator=gen))
    assert torch.isfinite(A_hat).all() and torch.isfinite(B_hat).all()
    assert live.at_peak == [] and live.peak_bytes < n * n * 2, live.at_peak  # measured 0.16·n²·8


def test_fit_memory_is_one_and_a_half_float64_covariances(benchmark_module, monkeypatch):
    """The fit's peak beyond its inputs: one ``in × in`` float64 matrix and GPTQ's float32 plan (the
    plan factorised and inverted in place in the matrix it is built in, and made before the float64
    ``H``; before: 7.6 float64 matrices, 11.6 GiB at a 14336-input layer), also when it is given
    float32 parts and a ridge, or a root, as compensation fits. The tiles of the block loops shrunk
    to this small ``n`` (at 14336 inputs they are 0.04 of a matrix); what grows with ``n × r`` adds
    ~0.2 here."""
    from peft_eora import decompose

    n = 1024
    monkeypatch.setattr(decompose, "_SYM_TILE", 64)
    monkeypatch.setattr(decompose, "_PROJECT_BLOCK_BYTES", 16 * n * 8)
    X, X_val = _inputs(n, 1024, 33), _inputs(n, 1024, 35)
    H, H_val = X.T @ X, X_val.T @ X_val
    gen = torch.Generator().manual_seed(34)
    A, B, T = torch.randn(16, n, generator=gen), torch.randn(64, 16, generator=gen), torch.randn(64, n, generator=gen)
    LiveTensorPeak = benchmark_module("bench_common").LiveTensorPeak
    for given, damping in ((H, 0.0), ((H, H_val), 0.01)):
        with LiveTensorPeak(inventory_bytes=n * n * 4) as live:
            A_hat, B_hat = fit_lowbit_factors(A, B, given, 8, target=T, damping=damping)
        assert live.peak_bytes <= 1.8 * n * n * 8, (live.peak_bytes / (n * n * 8), live.at_peak)
    # the parts and the ridge are the damped sum's fit, bit for bit
    A_ref, B_ref = fit_lowbit_factors(A, B, decompose.damped((H, H_val), 0.01), 8, target=T)
    assert torch.equal(A_hat, A_ref) and torch.equal(B_hat, B_ref)
    # a root of H (what compensation keeps at a fixed ridge: the Cholesky factor of H + δ·m·I, less
    # the shift; or eigenvectors with their scales): the plan is made from its rows, no third matrix
    Hs = (H + H_val).double()
    shift = 0.01 * float(Hs.diagonal().mean())
    lam, Q = torch.linalg.eigh(Hs)
    roots = (decompose.CovarianceRoot(torch.linalg.cholesky(Hs + shift * torch.eye(n, dtype=torch.float64)), shift),
             decompose.CovarianceRoot(Q, 0.0, lam.clamp_min(0).sqrt()))
    for root in roots:
        torch.testing.assert_close(root.matrix(), Hs, rtol=1e-9, atol=1e-9 * float(Hs.abs().max()))
        with LiveTensorPeak(inventory_bytes=n * n * 4) as live:
            A_root, B_root = fit_lowbit_factors(A, B, root, 8, target=T, damping=0.01)
        assert live.peak_bytes <= 1.8 * n * n * 8, (live.peak_bytes / (n * n * 8), live.at_peak)
        err = lambda a, b: _weighted(T - b @ a, Hs)  # noqa: E731
        assert err(A_root, B_root) == pytest.approx(err(A_ref, B_ref), rel=1e-3)
