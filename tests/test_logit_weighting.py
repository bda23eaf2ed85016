"""Key/query projections weighted by the attention logits they feed (``logit_weighting``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import get_peft_model

from peft_eora import EoRAConfig, initialize_eora_weights
from peft_eora.decompose import eora_factors
from peft_eora.logit_weighting import (
    WEIGHT_FLOOR,
    AttentionShape,
    attention_shape,
    key_weights,
    output_weights,
    pair_energy,
    query_weights,
    unmodelled,
)


def _rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout (pairs ``(i, i + d/2)``), as in Llama."""
    half = x.shape[-1] // 2
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def test_pair_energy_is_the_rotation_average_of_the_query_metric():
    """Σ_t Rᵀq_t q_tᵀR averaged over the rotary angles is diagonal, each pair's entries = half its energy."""
    torch.manual_seed(0)
    d, n = 8, 50
    X = torch.randn(n, 12, dtype=torch.float64)
    W = torch.randn(d, 12, dtype=torch.float64)
    q = X @ W.T
    freqs = torch.tensor([1.0, 0.37, 0.11, 0.013], dtype=torch.float64)  # distinct, like RoPE's
    M = torch.zeros(d, d, dtype=torch.float64)
    positions = 4000
    for p in range(positions):
        qr = _rotate(q, p * freqs)
        M += qr.T @ qr
    M /= positions
    e = pair_energy(W, X.T @ X, heads=1, head_dim=d)[0]
    expected = torch.diag(torch.cat([e, e]) / 2)
    assert torch.allclose(M, expected, atol=0.03 * float(e.max()))


def test_key_and_query_weights_follow_the_heads_that_read_them():
    torch.manual_seed(1)
    shape = AttentionShape(heads=4, kv_heads=2, head_dim=4)
    X = torch.randn(30, 16, dtype=torch.float64)
    H = X.T @ X
    W_q, W_k = torch.randn(16, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    gk, gq = key_weights(W_q, H, shape), query_weights(W_k, H, shape)
    assert gk.shape == (8,) and gq.shape == (16,)
    assert math.isclose(float(gk.mean()), 1.0) and math.isclose(float(gq.mean()), 1.0)
    # brute force: key head j, pair i ← query heads 2j, 2j+1, channels i and i+2 of each
    q = (X @ W_q.T).view(30, 4, 4)
    pair = (q[..., :2] ** 2 + q[..., 2:] ** 2).sum(0)  # (heads, pairs)
    by_kv = pair.view(2, 2, 2).sum(1)
    ref = torch.cat([by_kv, by_kv], 1).reshape(-1)
    assert torch.allclose(gk, ref / ref.mean())
    k = (X @ W_k.T).view(30, 2, 4)
    kpair = (k[..., :2] ** 2 + k[..., 2:] ** 2).sum(0).repeat_interleave(2, 0)
    refq = torch.cat([kpair, kpair], 1).reshape(-1)
    assert torch.allclose(gq, refq / refq.mean())


def test_unused_pairs_keep_a_floor_and_no_energy_means_no_weighting():
    shape = AttentionShape(heads=2, kv_heads=1, head_dim=4)
    W_q = torch.zeros(8, 6, dtype=torch.float64)
    W_q[0, 0] = 1.0  # only pair 0 of head 0 carries energy
    g = key_weights(W_q, torch.eye(6, dtype=torch.float64), shape)
    assert float(g.min()) == pytest.approx(WEIGHT_FLOOR) and torch.isfinite(g).all()
    assert torch.equal(key_weights(torch.zeros(8, 6), torch.eye(6), shape), torch.ones(4, dtype=torch.float64))


def test_output_weights_only_for_query_key_projections_of_a_known_layout():
    shape = AttentionShape(heads=4, kv_heads=2, head_dim=4)
    H = torch.eye(16, dtype=torch.float64)
    W = {"m.self_attn.q_proj": torch.randn(16, 16), "m.self_attn.k_proj": torch.randn(8, 16)}
    get = W.get
    assert output_weights("m.self_attn.k_proj", 8, "keys", shape, get, H).shape == (8,)
    assert output_weights("m.self_attn.q_proj", 16, "keys", shape, get, H) is None
    assert output_weights("m.self_attn.q_proj", 16, "queries_and_keys", shape, get, H).shape == (16,)
    assert output_weights("m.self_attn.v_proj", 8, "queries_and_keys", shape, get, H) is None
    assert output_weights("m.self_attn.k_proj", 8, "none", shape, get, H) is None
    assert output_weights("m.self_attn.k_proj", 8, "keys", None, get, H) is None
    assert output_weights("m.self_attn.k_proj", 12, "keys", shape, get, H) is None  # not heads × head_dim
    assert output_weights("x.self_attn.k_proj", 8, "keys", shape, get, H) is None  # no query weight


def test_attention_shape_from_configs():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert attention_shape(cfg) == AttentionShape(4, 2, 16)
    assert attention_shape(LlamaConfig(hidden_size=64, num_attention_heads=4)) == AttentionShape(4, 4, 16)
    assert attention_shape(None) is None
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        AttentionShape(heads=3, kv_heads=2, head_dim=4)
    assert EoRAConfig(r=4).logit_weighting == "queries_and_keys"  # the default
    with pytest.raises(ValueError, match="logit_weighting must be one of"):
        EoRAConfig(r=4, logit_weighting="values")


def _block0_metric(original, calib_ids, name: str):
    """(H of block 0's attention input, g of ``name`` under logit weighting) from the original model."""
    with torch.no_grad():
        x = original.model.layers[0].input_layernorm(original.model.embed_tokens(calib_ids)).double().reshape(-1, 64)
    H = x.T @ x
    shape = attention_shape(original.config)
    weights = {n: m.weight.detach() for n, m in original.named_modules() if hasattr(m, "weight")}
    return H, output_weights(name, 32 if name.endswith("k_proj") else 64, "queries_and_keys", shape, weights.get, H)


def test_weighted_factors_are_eora_of_the_weighted_residual_and_fit_their_metric(tiny_llama, calib_ids):
    """Block 0, δ = 0: the installed k_proj factors are EoRA of G^½·ΔW with B ← G^-½·B, they beat the
    unweighted factors on the weighted error, and q_proj (not weighted under "keys") is unchanged."""
    original, quantized = tiny_llama
    runs = {}
    for mode in ("none", "keys"):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.0, logit_weighting=mode))
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, progress=False)
        runs[mode] = pm

    def product(pm, name):
        layer = pm.base_model.model.get_submodule(name)
        return (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]).double()

    k, q = "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"
    H, g = _block0_metric(original, calib_ids, k)
    delta = (original.get_submodule(k).weight - runs["none"].base_model.model.get_submodule(k).base_layer.weight).double()
    root = g.sqrt()[:, None]
    ref = eora_factors(root * delta, H, 8)
    expected = (ref.B.double() / root) @ ref.A.double()
    got = product(runs["keys"], k)
    assert float((got - expected).norm() / expected.norm()) < 1e-4

    def weighted(approx):
        E = root * (delta - approx)
        return float(((E @ H) * E).sum())

    assert weighted(got) < 0.999 * weighted(product(runs["none"], k))
    assert torch.allclose(product(runs["keys"], q), product(runs["none"], q), rtol=0, atol=1e-6)


def test_rank_allocation_sees_the_weighted_spectrum_of_keys(tiny_llama, calib_ids):
    """collect_spectra reports G^½·ΔW's projected spectrum (and G^½·W's energy) for weighted keys only."""
    from peft_eora.compensate import collect_spectra
    from peft_eora.decompose import projected_spectrum
    from peft_eora.original import OriginalWeights

    original, quantized = tiny_llama
    batches = [{"input_ids": calib_ids}]
    out = {}
    for mode in ("none", "keys"):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, init_eora=False))
        _, spectra, energy = collect_spectra(pm, "default", OriginalWeights.open(original), batches, damping=0.01,
                                             progress=False, logit_weighting=mode)
        out[mode] = spectra, energy
    k, q = "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"
    out = {mode: ({n.removeprefix("base_model.model."): s for n, s in sp.items()},
                  {n.removeprefix("base_model.model."): e for n, e in en.items()}) for mode, (sp, en) in out.items()}
    assert torch.equal(out["keys"][0][q], out["none"][0][q]) and out["keys"][1][q] == out["none"][1][q]
    H, g = _block0_metric(original, calib_ids, k)
    root = g.sqrt()[:, None]
    delta = (original.get_submodule(k).weight - quantized.get_submodule(k).weight).double()
    ref = projected_spectrum(root * delta, H, damping=0.01)
    assert torch.allclose(out["keys"][0][k].double(), ref.double(), rtol=1e-3, atol=1e-6 * float(ref.max()))
    w = original.get_submodule(k).weight.double() * root
    assert out["keys"][1][k] == pytest.approx(float(((w @ H) * w).sum()), rel=1e-4)


def test_query_and_key_originals_are_read_once(tiny_llama, calib_ids, monkeypatch):
    """Both weighted: a query projection's original serves its own residual and the key's metric (and
    vice versa), one read each per run, in compensation and in the spectrum pass; the factors equal
    those of a run that reads them twice (the kept tensors are not modified)."""
    import collections
    import contextlib

    from peft_eora.compensate import collect_spectra
    from peft_eora.original import OriginalWeights

    original, quantized = tiny_llama

    def run(keep: bool):
        ref = OriginalWeights.open(original)
        reads = collections.Counter()
        load = ref._loader
        ref._loader = lambda key: (reads.update([key]), load(key))[1]
        if not keep:
            monkeypatch.setattr(ref, "keeping", lambda names: contextlib.nullcontext())
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.0, logit_weighting="queries_and_keys"))
        initialize_eora_weights(pm, original_model=ref, calibration=calib_ids, progress=False)
        compensation = dict(reads)
        reads.clear()
        collect_spectra(pm, "default", ref, [{"input_ids": calib_ids}], damping=0.01, progress=False,
                        logit_weighting="queries_and_keys")
        factors = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
        return compensation, dict(reads), factors

    comp, spectra, factors = run(keep=True)
    qk = [k for k in comp if k.endswith(("q_proj", "k_proj"))]
    assert qk and set(comp.values()) == {1} and set(spectra.values()) == {1}
    comp2, _, factors2 = run(keep=False)
    assert all(comp2[k] == 2 for k in qk)  # without keeping: own residual + partner
    assert all(torch.equal(factors[n], factors2[n]) for n in factors)


@pytest.mark.parametrize("model_type, extra, reason", [
    ("llama", {}, None),
    ("qwen3", {"head_dim": 16}, "(QK-norm)"),
    ("phi", {"partial_rotary_factor": 0.5}, "covers 0.5 of each head"),
    ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}, "no rotary position embedding"),
    ("cohere", {}, "neighbouring channel pairs"),
])
def test_the_weighting_is_off_where_its_metric_does_not_describe_the_logits(model_type, extra, reason, caplog):
    """The metric assumes rotary pairs (i, i + d/2) over whole heads and unnormalised queries/keys: QK-norm
    (a 66× spread of per-channel sensitivities against 1.3× in the weights, measured by a review), partial and
    absent rotary embeddings get unweighted query/key outputs, and say so."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_eora.compensate import _logit_setup

    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, **extra)
    model = AutoModelForCausalLM.from_config(cfg)
    assert (unmodelled(model) is None) == (reason is None)
    with caplog.at_level("INFO", logger="peft_eora.compensate"):
        weighting, shape = _logit_setup(model, "queries_and_keys")
    if reason is None:
        assert shape is not None
    else:
        assert shape is None and reason in unmodelled(model) and "logit weighting off" in caplog.text
