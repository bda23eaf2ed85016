"""What a PEFT user's model and configs look like after EoRA runs: a reused config, a failed computation, a merged
adapter. Tiny random Llamas (``tests/tiny_models.py``), dense fake-quantized base."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from peft_eora import CalibrationConfig, EoRAConfig, initialize_eora_weights
from peft_eora.original import ModelMismatchError

INPUT = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def _factors(model: torch.nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if f"lora_A.{adapter}." in k or
            f"lora_B.{adapter}." in k}


def _lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


CALIBRATION = CalibrationConfig(dataset="builtin:c4", num_samples=2, seq_len=32)


def test_a_reused_config_computes_every_time_and_stays_the_callers(tiny_llama, calib_ids, tmp_path,
                                                                    tiny_tokenizer_dir):
    """Computing wrote init_eora=False (and the stats) into the caller's config: reused, it gave a zero adapter."""
    from tiny_models import tiny_llama_pair

    original, quantized = tiny_llama
    other_original, _ = tiny_llama_pair(seed=1)
    original.save_pretrained(tmp_path / "orig")
    cfg = EoRAConfig(r=8, damping=0.01, original_model=str(tmp_path / "orig"),
                     calibration=dataclasses.replace(CALIBRATION, tokenizer=tiny_tokenizer_dir))
    first = get_peft_model(copy.deepcopy(quantized), cfg)
    second = get_peft_model(copy.deepcopy(quantized), cfg)
    a, b = _factors(first), _factors(second)
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)
    assert cfg.init_eora is True and cfg.eora_stats is None and cfg.base_fingerprint is None
    assert second.peft_config["default"] is not cfg and second.peft_config["default"].init_eora is False
    second.add_adapter("again", cfg)  # an adapter added later computes too
    c = _factors(second, "again")
    assert all(torch.equal(a[k.replace(".again.", ".default.")], c[k]) for k in c)
    # deferred (init_eora=False, computed by initialize_eora_weights): the same
    deferred = EoRAConfig(r=8, damping=0.01, init_eora=False)
    _, other = tiny_llama_pair(seed=1)
    for base, orig in ((quantized, original), (other, other_original)):
        model = get_peft_model(copy.deepcopy(base), deferred)  # was checked against the first model's base
        initialize_eora_weights(model, original_model=orig, calibration=calib_ids[:4], progress=False)
    assert deferred.eora_stats is None and deferred.base_fingerprint is None


def test_a_failed_recompute_keeps_the_earlier_factors_and_their_statistics(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    model = get_peft_model(copy.deepcopy(quantized),
                           EoRAConfig(r=8, damping=0.01, rank_allocation="spectrum", rank_budget=None))
    initialize_eora_weights(model, original_model=original, calibration=calib_ids[:4], progress=False)
    before, stats = _logits(model), copy.deepcopy(model.peft_config["default"].eora_stats)
    ranks = {id(m): m.r["default"] for m in _lora_layers(model)}
    bad = copy.deepcopy(original)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
    with pytest.raises(ModelMismatchError, match="NaN"):
        initialize_eora_weights(model, original_model=bad, calibration=calib_ids[:4], progress=False)
    assert torch.equal(_logits(model), before)
    assert model.peft_config["default"].eora_stats == stats
    assert {id(m): m.r["default"] for m in _lora_layers(model)} == ranks
    # a new adapter's allocation (layers resized, rank_pattern written) is undone too
    fresh = get_peft_model(copy.deepcopy(quantized),
                           EoRAConfig(r=8, damping=0.01, rank_allocation="spectrum", init_eora=False))
    with pytest.raises(ModelMismatchError, match="NaN"):
        initialize_eora_weights(fresh, original_model=bad, calibration=calib_ids[:4], progress=False)
    assert {m.r["default"] for m in _lora_layers(fresh)} == {8} and not fresh.peft_config["default"].rank_pattern


def test_computing_or_loading_onto_a_merged_adapter_is_refused_with_the_way_out(tiny_llama, calib_ids, tmp_path):
    """A merged product in the base weights was taken for part of the base: a wrong residual (the unmerge after it
    subtracted other factors: a corrupted base), a false base mismatch. Not unmerged silently: in half precision
    that does not give the base back."""
    original, quantized = tiny_llama
    model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
    initialize_eora_weights(model, original_model=original, calibration=calib_ids[:4], progress=False)
    expected = _factors(model)
    model.merge_adapter()
    with pytest.raises(ValueError, match=r"adapter\(s\) default are merged into them\. Call model\.unmerge_adapter"):
        initialize_eora_weights(model, original_model=original, calibration=calib_ids[:4], progress=False)
    assert all(torch.equal(expected[k], v) for k, v in _factors(model).items())  # nothing touched
    model.unmerge_adapter()
    initialize_eora_weights(model, original_model=original, calibration=calib_ids[:4], progress=False)
    got = _factors(model)
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    with model.disable_adapter():
        assert torch.allclose(_logits(model), _logits(quantized), atol=1e-6)  # the base is the base
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "a")
    loaded.merge_adapter()
    with pytest.raises(ValueError, match="are merged into them"):  # was a BaseMismatchError
        loaded.load_adapter(tmp_path / "a", adapter_name="again")


def test_in_memory_models_and_data_in_the_config_are_refused_with_the_api_to_use(tiny_llama, calib_ids):
    """The config is saved with the adapter: a module or a token tensor in it computed, then failed at save_pretrained
    ("Tensor is not JSON serializable")."""
    original, _ = tiny_llama
    with pytest.raises(TypeError, match=r"original_model takes .* not a LlamaForCausalLM\. .*initialize_eora_weights"):
        EoRAConfig(r=8, original_model=original)
    with pytest.raises(TypeError, match=r"calibration takes a CalibrationConfig .* not a Tensor\. .*initialize_eora"):
        EoRAConfig(r=8, calibration=calib_ids)


def test_a_failed_computation_leaves_no_adapter_layers_behind(tiny_llama, calib_ids, tmp_path):
    """PEFT drops only the config of an adapter whose add_adapter failed: its layers stayed, could not be deleted and
    were saved into the other adapter's file. A failed get_peft_model hands the caller's model back unwrapped."""
    original, quantized = tiny_llama
    model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01, modules_to_save=["lm_head"]))
    initialize_eora_weights(model, original_model=original, calibration=calib_ids[:4], progress=False)
    trainable = model.get_nb_trainable_parameters()
    with pytest.raises(ModelMismatchError):
        model.add_adapter("c", EoRAConfig(r=8, original_model=str(tmp_path / "nowhere"), calibration=CALIBRATION,
                                          modules_to_save=["lm_head"]))
    assert list(model.peft_config) == ["default"]
    assert not [m for m in _lora_layers(model) if "c" in m.lora_A]
    assert "c" not in model.base_model.model.lm_head.modules_to_save
    assert model.get_nb_trainable_parameters() == trainable
    model.save_pretrained(tmp_path / "saved")
    from safetensors.torch import load_file

    assert len(load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))) == 2 * 14 + 1  # + lm_head

    base = copy.deepcopy(quantized)
    with pytest.raises(ModelMismatchError):
        get_peft_model(base, EoRAConfig(r=8, original_model=str(tmp_path / "nowhere"), calibration=CALIBRATION,
                                        modules_to_save=["lm_head"]))
    assert not _lora_layers(base) and isinstance(base.lm_head, torch.nn.Linear)
    assert all(p.requires_grad for p in base.parameters())  # PEFT froze them while injecting
    assert torch.equal(_logits(base), _logits(quantized))


@pytest.mark.parametrize("bits", [16, 8])
def test_peft_hotswap_swaps_eora_adapters_and_checks_their_base(tiny_llama, calib_ids, tmp_path, bits):
    """``peft.utils.hotswap.hotswap_adapter`` (swapping weights under torch.compile) refused EoRA adapters."""
    from peft.utils.hotswap import hotswap_adapter

    from peft_eora.fingerprint import BaseMismatchError
    from tiny_models import tiny_llama_pair

    original, quantized = tiny_llama
    for i, name in enumerate("ab"):
        model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01, adapter_bits=bits))
        initialize_eora_weights(model, original_model=original, calibration=calib_ids[2 * i:2 * i + 2], progress=False)
        model.save_pretrained(tmp_path / name)
    swapped = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "a").eval()
    direct = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "b").eval()
    assert not torch.equal(_logits(swapped), _logits(direct))
    compiled = torch.compile(swapped)  # the use hot-swapping is for (the compiled forward itself is not run here)
    hotswap_adapter(compiled, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")
    assert torch.equal(_logits(swapped), _logits(direct))
    _, other = tiny_llama_pair(seed=1)
    elsewhere = PeftModel.from_pretrained(copy.deepcopy(other), tmp_path / "a", allow_base_mismatch=True)
    with pytest.raises(BaseMismatchError):
        hotswap_adapter(elsewhere, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")


def test_autocast_adapter_dtype_false_keeps_computed_factors_in_the_base_dtype(tiny_llama, tmp_path,
                                                                              tiny_tokenizer_dir):
    """EoRA computes before PEFT's own cast and upcast the factors itself: ``autocast_adapter_dtype=False`` (keep the
    adapter in the base layer's dtype) was ignored."""
    original, quantized = tiny_llama
    original.save_pretrained(tmp_path / "orig")
    half = copy.deepcopy(quantized).to(torch.bfloat16)
    cfg = EoRAConfig(r=8, damping=0.01, original_model=str(tmp_path / "orig"),
                     calibration=dataclasses.replace(CALIBRATION, tokenizer=tiny_tokenizer_dir))
    kept = get_peft_model(copy.deepcopy(half), cfg, autocast_adapter_dtype=False)
    upcast = get_peft_model(copy.deepcopy(half), cfg)
    kept.add_adapter("later", cfg, autocast_adapter_dtype=False)
    upcast.add_adapter("later", cfg)
    for model, dtype in ((kept, torch.bfloat16), (upcast, torch.float32)):
        for adapter in ("default", "later"):
            factors = _factors(model, adapter)
            assert factors and {v.dtype for v in factors.values()} == {dtype}
            assert any(float(v.abs().max()) > 0 for k, v in factors.items() if "lora_B" in k)
    a, b = _factors(kept), _factors(upcast)
    first = [k for k in a if ".layers.0.self_attn.q_proj." in k]  # the same inputs: the same factors, rounded
    assert first and all(torch.equal(a[k], b[k].to(torch.bfloat16)) for k in first)
    # later layers see the rounded adapters' outputs: their products B·A close, not equal
    for k in (k for k in a if "lora_A" in k):
        kb = k.replace("lora_A", "lora_B")
        ours, ref = a[kb].float() @ a[k].float(), b[kb] @ b[k]
        assert float((ours - ref).norm() / ref.norm()) < 0.05, k


def test_a_named_tokenizer_that_does_not_load_is_an_error_not_a_silent_switch(tiny_llama, tmp_path,
                                                                              tiny_tokenizer_dir):
    """CalibrationConfig(tokenizer=...) that failed to load fell back to the original's tokenizer, silently: the
    calibration text was then tokenized otherwise than asked."""
    original, quantized = tiny_llama
    original.save_pretrained(tmp_path / "orig")
    cfg = EoRAConfig(r=8, damping=0.01, init_eora=False)
    model = get_peft_model(copy.deepcopy(quantized), cfg)
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(ValueError, match=r"CalibrationConfig\(tokenizer=.*no-such-tokenizer.*could not be loaded"):
        initialize_eora_weights(model, original_model=str(tmp_path / "orig"), progress=False,
                                calibration=dataclasses.replace(CALIBRATION, tokenizer=missing))
