"""Low-bit factors fitted to the activations (``peft_eora.factor_quant``): GPTQ-style rounding on
the stored grid and the rank rotation (through ``EoRAConfig(adapter_bits=4)`` on a real GPTQ base:
``test_eora_gptq.py``)."""

from __future__ import annotations

import pytest
import torch
from peft_eora.adapter_quant import factor_rounder
from peft_eora.decompose import eora_factors
from peft_eora.factor_quant import fit_lowbit_factors, gptq_round, rank_rotation
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
    n, out, r = 192, 160, 32
    X, X_val = _inputs(n, 4096, 5), _inputs(n, 4096, 6)
    g = torch.Generator().manual_seed(7)
    decay = torch.logspace(0, -2, n)
    delta = (torch.randn(out, n, generator=g) * decay) @ torch.linalg.qr(torch.randn(n, n, generator=g))[0].T * 0.05
    H, H_val = X.T @ X, X_val.T @ X_val
    f = eora_factors(delta, H, r, damping=0.01)
    float_err = _weighted(delta - f.B @ f.A, H_val)
    A_hat, B_hat = fit_lowbit_factors(f.A, f.B, H + 0.01 * H.diagonal().mean() * torch.eye(n), bits)
    A_rtn, B_rtn = factor_rounder(bits)(f.A, f.B)
    fitted = _weighted(delta - B_hat @ A_hat, H_val) - float_err
    rounded = _weighted(delta - B_rtn @ A_rtn, H_val) - float_err
    assert 0 <= fitted < 0.9 * rounded, (fitted, rounded)
    for w, kind in ((A_hat, "lora_A"), (B_hat, "lora_B")):  # what save_pretrained stores, bit for bit
        assert torch.equal(factor_rounder(bits)(w, w)[0 if kind == "lora_A" else 1], w)
    with pytest.raises(ValueError, match="incompatible shapes"):
        fit_lowbit_factors(f.A, f.B[:, :-1], H, bits)
