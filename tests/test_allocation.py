"""Per-layer rank allocation (``rank_allocation="spectrum"``) on tiny models: budget, bounds, PEFT
plumbing (``rank_pattern``/``alpha_pattern``, save → reload, plain-LoRA export), and on the real
2-layer GPTQ model with ``damping="auto"``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_eora import CalibrationConfig, EoRAConfig, export_lora, initialize_eora_weights


def _layers(pm) -> dict[str, LoraLayer]:
    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _params(pm) -> int:
    return sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel() for m in _layers(pm).values())


def _run(quantized, original, ids, **cfg):
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(**{"r": 8, "init_eora": False, **cfg}))
    stats = initialize_eora_weights(pm, original_model=original, calibration=ids, progress=False)
    return pm, stats


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_spectrum_allocation_keeps_the_budget_and_reloads(tiny_llama, calib_ids, tmp_path):
    original, quantized = tiny_llama
    pm, stats = _run(quantized, original, calib_ids, rank_allocation="spectrum")
    cfg = pm.peft_config["default"]
    layers = _layers(pm)
    costs = {n: m.in_features + m.out_features for n, m in layers.items()}
    uniform = sum(8 * c for c in costs.values())
    params = _params(pm)
    assert uniform - max(costs.values()) < params <= uniform  # the budget of uniform r=8, spent from below
    alloc = cfg.eora_stats["rank_allocation"]
    assert alloc["budget_params"] == alloc["configured_params"] == uniform and alloc["params"] == params
    assert alloc["captured_energy"] > alloc["configured_captured_energy"]
    assert cfg.rank_budget == uniform  # recorded, so a recomputation keeps the budget of r=8
    ranks = {n: int(m.r["default"]) for n, m in layers.items()}
    assert len(set(ranks.values())) > 2, ranks  # genuinely per layer
    for n, m in layers.items():
        r = ranks[n]
        assert 1 <= r < min(m.in_features, m.out_features)
        assert m.lora_A["default"].weight.shape == (r, m.in_features)
        assert m.lora_B["default"].weight.shape == (m.out_features, r)
        assert m.scaling["default"] == 1.0  # lora_alpha = r by default: the scale is kept per layer
    assert cfg.rank_pattern == {n: r for n, r in ranks.items() if r != 8}
    assert cfg.alpha_pattern == cfg.rank_pattern
    assert [m.rank for m in stats.modules] == [ranks[m.name] for m in stats.modules]
    assert all(m.error_after < m.error_before for m in stats.modules)
    again = initialize_eora_weights(pm, original_model=original, calibration=calib_ids, progress=False)
    assert again.allocation["budget_params"] == uniform and {m.name: m.rank for m in again.modules} == ranks

    # save → reload: PEFT rebuilds every layer at its allocated rank from rank_pattern
    pm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    eora = json.loads((tmp_path / "adapter" / "eora_config.json").read_text())
    assert saved["rank_pattern"] == cfg.rank_pattern and eora["rank_allocation"] == "spectrum"
    assert eora["init_eora"] is False
    reloaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "adapter")
    assert {n: int(m.r["default"]) for n, m in _layers(reloaded).items()} == ranks
    ids = calib_ids[:2]
    assert float((_logits(reloaded, ids) - _logits(pm, ids)).abs().max()) <= 1e-6
    # the plain-LoRA export loads in stock PEFT with the same per-layer ranks and output
    export_lora(pm, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    stock = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "lora")
    assert {n: int(m.r["default"]) for n, m in _layers(stock).items()} == ranks
    assert float((_logits(stock, ids) - _logits(pm, ids)).abs().max()) <= 1e-5


@pytest.mark.parametrize("cfg", [{"lora_alpha": 16}, {"lora_alpha": 16, "use_rslora": True}], ids=["alpha", "rslora"])
def test_allocation_keeps_each_layers_scale(tiny_llama, calib_ids, tmp_path, cfg):
    """A custom lora_alpha (and rsLoRA's alpha/√r) keeps its scale per layer through alpha_pattern."""
    original, quantized = tiny_llama
    pm, stats = _run(quantized, original, calib_ids, rank_allocation="spectrum", **cfg)
    scale = 16 / (8**0.5 if cfg.get("use_rslora") else 8)
    layers = _layers(pm)
    assert len({int(m.r["default"]) for m in layers.values()}) > 2
    for m in layers.values():
        assert m.scaling["default"] == pytest.approx(scale, rel=1e-9)
    assert all(m.error_after < m.error_before for m in stats.modules)
    pm.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "adapter")
    for n, m in _layers(reloaded).items():
        assert m.scaling["default"] == pytest.approx(scale, rel=1e-9) and m.r["default"] == layers[n].r["default"]
    assert float((_logits(reloaded, calib_ids[:2]) - _logits(pm, calib_ids[:2])).abs().max()) <= 1e-6


def test_absolute_allocation_lowers_the_summed_weighted_error(tiny_llama, calib_ids):
    """Same parameter count: Σ‖(ΔW − BA)Xᵀ‖² over the layers is lower than with uniform ranks."""
    original, quantized = tiny_llama
    _, uniform = _run(quantized, original, calib_ids, damping=0.01)
    _, spectrum = _run(quantized, original, calib_ids, damping=0.01, rank_allocation="spectrum_absolute")
    total = lambda st: sum(m.error_after**2 for m in st.modules)  # noqa: E731
    assert total(spectrum) < 0.95 * total(uniform), (total(spectrum), total(uniform))


def test_relative_and_absolute_gains_each_win_their_own_criterion(tiny_llama, calib_ids):
    """gain="relative" ranks by s_k²/‖W·Xᵀ‖², "absolute" by s_k²: each plan captures more of its own
    criterion than the other plan does, and the output energies are tr(W·H·Wᵀ)."""
    from peft_eora.calibration import as_batches
    from peft_eora.compensate import collect_spectra, plan_ranks
    from peft_eora.decompose import captured_energy
    from peft_eora.original import OriginalWeights

    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, init_eora=False))
    model, weights, batches = pm.base_model.model, OriginalWeights.open(original), as_batches(calib_ids)
    _, spectra, energy = collect_spectra(model, "default", weights, batches, damping=0.01, progress=False,
                                         logit_weighting="none")  # q_proj's energy unweighted: tr(W·H·Wᵀ)
    with torch.no_grad():
        x = original.model.layers[0].input_layernorm(original.model.embed_tokens(calib_ids)).reshape(-1, 64).double()
        w = original.model.layers[0].self_attn.q_proj.weight.double()
        assert energy["model.layers.0.self_attn.q_proj"] == pytest.approx(float((w @ x.T).pow(2).sum()), rel=1e-4)
    rel_spectra = {n: s / energy[n] ** 0.5 for n, s in spectra.items()}
    plans = {g: plan_ranks(model, "default", weights, batches, damping=0.01, gain=g, progress=False,
                           logit_weighting="none").ranks
             for g in ("relative", "absolute")}
    assert plans["relative"] != plans["absolute"]
    assert captured_energy(rel_spectra, plans["relative"]) > captured_energy(rel_spectra, plans["absolute"])
    assert captured_energy(spectra, plans["absolute"]) > captured_energy(spectra, plans["relative"])
    with pytest.raises(ValueError, match="gain must be 'relative' or 'absolute'"):
        plan_ranks(model, "default", weights, batches, gain="log")


def test_explicit_budget_bounds_and_a_rank_above_layer_dims(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    # uniform r=32 is refused (k_proj is 64→32); allocation caps k_proj at 31 and keeps r=32's budget
    with pytest.raises(ValueError, match=r"rank r=32 is too large for .*k_proj"):
        _run(quantized, original, calib_ids, r=32)
    pm, _ = _run(quantized, original, calib_ids, r=32, rank_allocation="spectrum", rank_min=2, rank_max=40)
    for n, m in _layers(pm).items():
        assert 2 <= m.r["default"] <= min(40, min(m.in_features, m.out_features) - 1), n
    # an explicit budget in parameters, respected from below
    pm, _ = _run(quantized, original, calib_ids, rank_allocation="spectrum", rank_budget=5000)
    assert 5000 - 192 < _params(pm) <= 5000
    assert pm.peft_config["default"].eora_stats["rank_allocation"]["budget_params"] == 5000


@pytest.mark.parametrize(
    "cfg,phrase",
    [
        ({"rank_budget": 100}, r"cannot give every one of the 14 layers its minimum rank 1"),
        ({"rank_min": 40}, r"k_proj: min_rank=40 exceeds its largest allowed rank 31"),
    ],
)
def test_impossible_allocation_fails_before_any_work(tiny_llama, calib_ids, cfg, phrase):
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, rank_allocation="spectrum", init_eora=False, **cfg))
    with pytest.raises(ValueError, match=phrase):
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, progress=False)
    assert all(int(m.r["default"]) == 8 for m in _layers(pm).values())
    assert pm.peft_config["default"].eora_stats is None


def test_svd_allocation_needs_no_calibration(tiny_llama):
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, method="svd", rank_allocation="spectrum", init_eora=False))
    stats = initialize_eora_weights(pm, original_model=original, calibration=[], progress=False)
    assert stats.tokens == 0 and _params(pm) <= sum(8 * (m.in_features + m.out_features) for m in _layers(pm).values())
    assert len({int(m.r["default"]) for m in _layers(pm).values()}) > 1


def test_auto_damping_adapter_saves_and_reloads(tiny_llama, calib_ids, tmp_path):
    original, quantized = tiny_llama
    pm, _ = _run(quantized, original, calib_ids, damping="auto", rank_allocation="spectrum")
    pm.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "damping auto: " in card  # the per-module choices, e.g. "0.1×12, 1×2"
    reloaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "adapter")
    assert reloaded.peft_config["default"].damping == "auto"
    assert float((_logits(reloaded, calib_ids[:2]) - _logits(pm, calib_ids[:2])).abs().max()) <= 1e-6


@pytest.mark.slow
def test_gptq_auto_damping_with_spectrum_allocation(tiny_gptq3_dir, tiny_original_dir, tmp_path):
    """The real 2-layer GPTQ 3-bit model: one config-driven run, closer outputs, exact reload."""
    from transformers import AutoModelForCausalLM

    from peft_eora.quantize import load_quantized

    def load():
        return load_quantized(tiny_gptq3_dir, dtype=torch.float16, compute_dtype=torch.float32)

    original = AutoModelForCausalLM.from_pretrained(tiny_original_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(3))
    calib = CalibrationConfig(dataset="builtin:c4", num_samples=8, seq_len=64)
    qmodel = load()
    with torch.no_grad():
        ref = original.model(input_ids=ids).last_hidden_state
        err_q = float((qmodel.model(input_ids=ids).last_hidden_state - ref).norm() / ref.norm())
    model = get_peft_model(qmodel, EoRAConfig(r=16, original_model=str(tiny_original_dir), calibration=calib,
                                              damping="auto", rank_allocation="spectrum"))
    cfg = model.peft_config["default"]
    stats = cfg.eora_stats
    assert stats["heldout_tokens"] == 4 * 64 and len(stats["damping_per_module"]) == 14
    assert stats["rank_allocation"]["params"] <= stats["rank_allocation"]["budget_params"]
    assert stats["rank_allocation"]["captured_energy"] > stats["rank_allocation"]["configured_captured_energy"]
    with torch.no_grad():
        err = float((model.get_base_model().model(input_ids=ids).last_hidden_state - ref).norm() / ref.norm())
    assert err < 0.9 * err_q, (err, err_q)
    # saved with PEFT's own helpers (peft-eora's save_pretrained also writes a model card, which cannot
    # show damping="auto" until hub.py formats it: see the xfail test above), reloaded the usual way
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    (tmp_path / "adapter").mkdir()
    cfg.save_pretrained(str(tmp_path / "adapter"))
    save_file(get_peft_model_state_dict(model), str(tmp_path / "adapter" / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    reloaded = PeftModel.from_pretrained(load(), tmp_path / "adapter")
    ranks = {n: int(m.r["default"]) for n, m in _layers(model).items()}
    assert {n: int(m.r["default"]) for n, m in _layers(reloaded).items()} == ranks
    with torch.no_grad():
        assert float((reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()) <= 1e-5


def test_the_spectrum_pass_skips_the_zero_updates_exactly(tiny_llama, calib_ids, monkeypatch):
    """The statistics pass runs with every adapter a zero update: with the adapters switched off for
    its forwards (their products not computed) the spectra are bit for bit the same, and the adapters
    are back on afterwards."""
    import contextlib

    import peft_eora.compensate as comp
    from peft_eora.calibration import as_batches
    from peft_eora.original import OriginalWeights

    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, init_eora=False))
    model, weights, batches = pm.base_model.model, OriginalWeights.open(original), as_batches(calib_ids)
    lora_calls = []
    for layer in _layers(pm).values():
        layer.lora_A["default"].register_forward_hook(lambda m, args, out: lora_calls.append(args[0].shape[0]))
    _, off, _ = comp.collect_spectra(model, "default", weights, batches, damping=0.01, progress=False)
    assert set(lora_calls) == {1}  # only the one-row probes of the call order, before the pass's forwards
    lora_calls.clear()
    assert not any(layer.disable_adapters for layer in _layers(pm).values())
    monkeypatch.setattr(comp, "adapters_off", lambda layers: contextlib.nullcontext())
    _, on, _ = comp.collect_spectra(model, "default", weights, batches, damping=0.01, progress=False)
    assert max(lora_calls) == batches[0]["input_ids"].shape[0]
    assert off.keys() == on.keys() and all(torch.equal(off[n], on[n]) for n in off)
