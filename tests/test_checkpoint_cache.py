"""Cached compressed checkpoints are handed back only for the settings they were made with.

A complete folder under the cache (or an explicit ``out_dir``) is returned without recomputing. Its name holds
the source folder (name and a hash of its path), method, bits, group size and calibration size only, so the
source recorded and every other setting a call asks for (the quantizer's
overrides, ``dtype``, SparseGPT's ``damp``) is compared with the recorded metadata; and the AWQ-smoothed
original is keyed on the AWQ checkpoint's path and scales and on the original's path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_eora.embedded import COMPLETE_MARKER
from peft_eora.quantize.checkpoints import META_FILE, gptq_dir
from tiny_models import tiny_llama_pair


def _published(folder: Path, meta: dict) -> None:
    """A folder as a finished earlier call left it."""
    folder.mkdir(parents=True)
    (folder / COMPLETE_MARKER).write_text("")
    (folder / META_FILE).write_text(json.dumps(meta))


def test_cached_checkpoints_made_with_other_settings_are_refused(tmp_path, monkeypatch):
    from peft_eora.prune import prune, pruned_dir
    from peft_eora.quantize import quantize_gptq

    monkeypatch.setenv("PEFT_EORA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m"
    source.mkdir()
    calibration = {"num_samples": 128, "seq_len": 512}
    _published(gptq_dir(source, 4, 128), {"method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                                          "desc_act": False, "user_overrides": {}, "quantize_dtype": "float32",
                                          "calibration": calibration})
    assert quantize_gptq(source, 4, 128) == gptq_dir(source, 4, 128)  # the same settings: handed back
    with pytest.raises(ValueError, match=r"made with other settings \(desc_act: False → True\)"):
        quantize_gptq(source, 4, 128, desc_act=True)
    with pytest.raises(ValueError, match="dtype: float32 → bfloat16"):
        quantize_gptq(source, 4, 128, dtype=torch.bfloat16)
    _published(pruned_dir(source, "sparsegpt", "2:4"), {"method": "sparsegpt", "pattern": "2of4", "damp": 0.01,
                                                        "calibration": calibration})
    with pytest.raises(ValueError, match=r"damp: 0.01 → 0.1"):
        prune(source, "sparsegpt", "2:4", damp=0.1)
    # a run whose calibration text ran out (fewer windows than asked for) is handed back for the same request
    _published(gptq_dir(source, 3, 128), {"method": "gptq", "bits": 3, "group_size": 128, "user_overrides": {},
                                          "quantize_dtype": "float32",
                                          "calibration": {**calibration, "windows": 33}})
    assert quantize_gptq(source, 3, 128) == gptq_dir(source, 3, 128)


def test_two_models_in_folders_of_one_name_get_two_cached_checkpoints(tmp_path, monkeypatch):
    """The cache folder was named after the source folder's name alone: model b got model a's checkpoint back."""
    from peft_eora.quantize import quantize_gptq

    monkeypatch.setenv("PEFT_EORA_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    assert gptq_dir(a, 4, 128) != gptq_dir(b, 4, 128)
    assert gptq_dir(a, 4, 128).name.startswith("model-")
    meta = {"method": "gptq", "bits": 4, "group_size": 128, "user_overrides": {}, "quantize_dtype": "float32",
            "calibration": {"num_samples": 128, "seq_len": 512}, "source_model": str(a.resolve())}
    _published(gptq_dir(a, 4, 128), meta)
    assert quantize_gptq(a, 4, 128) == gptq_dir(a, 4, 128)
    # an explicit out_dir holding a's checkpoint is refused for b
    with pytest.raises(ValueError, match=r"made with other settings \(source_model: .*a/model → .*b/model\)"):
        quantize_gptq(b, 4, 128, out_dir=gptq_dir(a, 4, 128))


def test_smoothed_originals_of_two_awq_checkpoints_stay_apart(tmp_path, monkeypatch):
    """Two AWQ folders of one name (two runs, or one folder quantized again) got one cached smoothed original."""
    from peft_eora.quantize.awq import AWQ_SCALES_FILE, awq_smoothed_original

    monkeypatch.setenv("PEFT_EORA_CACHE", str(tmp_path / "cache"))
    original, _ = tiny_llama_pair(layers=1)
    original.save_pretrained(tmp_path / "orig")

    def fake_awq(folder: Path, scale: float) -> Path:
        folder.mkdir(parents=True)
        records = [{"prev": "model.layers.0.input_layernorm", "kind": "norm",
                    "layers": [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]}]
        save_file({"0": torch.full((64,), scale)}, str(folder / AWQ_SCALES_FILE),
                  metadata={"records": json.dumps(records)})
        (folder / META_FILE).write_text(json.dumps({"source_model": str(tmp_path / "orig")}))
        return folder

    first = awq_smoothed_original(fake_awq(tmp_path / "run1" / "q4", 2.0))
    second = awq_smoothed_original(fake_awq(tmp_path / "run2" / "q4", 4.0))
    assert first != second
    w = original.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    for folder, scale in ((first, 2.0), (second, 4.0)):
        smoothed = load_file(str(folder / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
        assert torch.allclose(smoothed, w * scale)
    assert awq_smoothed_original(tmp_path / "run1" / "q4") == first  # cached
    with pytest.raises(ValueError, match="holds the smoothed original of"):
        awq_smoothed_original(tmp_path / "run2" / "q4", out_dir=first)


def test_a_mixtral_original_is_smoothed_under_the_names_its_checkpoint_stores(tmp_path, monkeypatch):
    """AWQ records name the modules as the model ran (``mlp.experts.0.gate_proj``); a Mixtral checkpoint stores them
    as ``block_sparse_moe.experts.0.w1``: smoothing looked the recorded names up as stored and refused the original."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from peft_eora.quantize.awq import AWQ_SCALES_FILE, awq_smoothed_original

    monkeypatch.setenv("PEFT_EORA_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "orig")
    stored = load_file(str(tmp_path / "orig" / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.1.w1.weight" in stored
    awq = tmp_path / "awq"
    awq.mkdir()
    layers = [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(2) for p in ("gate_proj", "up_proj")]
    records = [{"prev": "model.layers.0.post_attention_layernorm", "kind": "norm", "layers": layers}]
    save_file({"0": torch.full((32,), 2.0)}, str(awq / AWQ_SCALES_FILE), metadata={"records": json.dumps(records)})
    smoothed = load_file(str(awq_smoothed_original(awq, tmp_path / "orig") / "model.safetensors"))
    for e in range(2):
        for w in ("w1", "w3"):
            key = f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"
            assert torch.allclose(smoothed[key], stored[key] * 2.0)
        key = f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"
        assert torch.equal(smoothed[key], stored[key])
    norm = "model.layers.0.post_attention_layernorm.weight"
    assert torch.allclose(smoothed[norm], stored[norm] / 2.0)


def test_a_checkpoint_cached_under_its_name_before_the_path_hash_is_adopted(tmp_path, monkeypatch):
    """Cache folders were named after the source folder alone: one that records this source is used where it is
    (an upgrade quantizes nothing again; what was made from it keeps its path); another source's is not used."""
    from peft_eora.quantize import quantize_gptq

    monkeypatch.setenv("PEFT_EORA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "m"
    source.mkdir()
    meta = {"method": "gptq", "bits": 4, "group_size": 128, "user_overrides": {}, "quantize_dtype": "float32",
            "calibration": {"num_samples": 128, "seq_len": 512}, "source_model": str(source.resolve())}
    legacy = tmp_path / "cache" / "models" / "m-gptq-w4g128"
    _published(legacy, meta)
    assert quantize_gptq(source, 4, 128) == gptq_dir(source, 4, 128) == legacy
    other = tmp_path / "elsewhere" / "m"
    other.mkdir(parents=True)
    _published(tmp_path / "cache" / "models" / "m-gptq-w3g128", meta)  # made from tmp_path/m, not from other
    assert gptq_dir(other, 3, 128).name != "m-gptq-w3g128"
    assert (tmp_path / "cache" / "models" / "m-gptq-w3g128").exists()
