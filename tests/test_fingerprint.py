"""The base fingerprint: stable, adapter-independent, sensitive; recorded at compute time, checked on load.

(Stability across processes is checked in tests/test_hub.py, whose fresh process recomputes it.)
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import peft_eora
from peft_eora import BaseMismatchError, EoRAConfig
from peft_eora.fingerprint import (
    BaseFingerprint,
    BaseMismatchWarning,
    compute_fingerprint,
    differences,
    verify_fingerprint,
)
from tiny_models import tiny_llama_pair

CALIB = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """(dense quantized base, computed EoRA PeftModel, saved adapter directory)."""
    original, quantized = tiny_llama_pair(seed=0)
    model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8))
    peft_eora.initialize_eora_weights(model, original_model=original, calibration=CALIB, progress=False)
    path = tmp_path_factory.mktemp("fp") / "adapter"
    model.save_pretrained(path)
    return quantized, model, path


def test_recorded_when_factors_are_computed_and_saved(computed):
    quantized, model, path = computed
    recorded = model.peft_config["default"].base_fingerprint
    assert recorded == compute_fingerprint(quantized).to_dict()
    assert recorded["version"] == 3 and recorded["digest"].startswith("eora-fp3:")
    assert recorded["kernels"] == [] and recorded["num_modules"] == 2 * 9 + 3  # 7 linears + 2 norms per block
    saved = json.loads((path / "eora_config.json").read_text())["base_fingerprint"]
    assert saved == recorded


def test_stable_and_independent_of_adapters(computed):
    quantized, model, _ = computed
    fp = compute_fingerprint(quantized)
    assert compute_fingerprint(copy.deepcopy(quantized)) == fp
    assert compute_fingerprint(model) == fp  # PeftModel with computed factors
    assert compute_fingerprint(model.base_model) == fp  # the tuner
    other = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=2, init_eora=False))
    other.add_adapter("second", EoRAConfig(r=4, init_eora=False))
    with torch.no_grad():
        for name, param in other.named_parameters():
            if "lora_" in name:
                param.normal_()
    assert compute_fingerprint(other) == fp
    # loading the same checkpoint in another float dtype (fp16 checkpoint read as fp32) is the same base
    half = copy.deepcopy(quantized).half()
    assert compute_fingerprint(copy.deepcopy(half).float()) == compute_fingerprint(half)
    # ... and read in bfloat16 for serving (version 2 samples at bfloat16 precision; version 1 did not)
    assert compute_fingerprint(copy.deepcopy(half).bfloat16()) == compute_fingerprint(half)
    assert compute_fingerprint(copy.deepcopy(quantized).bfloat16()) == fp  # a float32 checkpoint read in bf16
    assert (compute_fingerprint(copy.deepcopy(half).bfloat16(), version=1).digest
            != compute_fingerprint(half, version=1).digest)


def test_fingerprints_of_the_previous_version_are_still_checked(computed, tmp_path):
    """Adapters saved before version 2 record a version-1 fingerprint: it is checked by computing version 1."""
    quantized, model, path = computed
    old = tmp_path / "v1"
    shutil.copytree(path, old)
    sidecar = json.loads((old / "eora_config.json").read_text())
    sidecar["base_fingerprint"] = compute_fingerprint(quantized, version=1).to_dict()
    assert sidecar["base_fingerprint"]["digest"].startswith("eora-fp1:")
    (old / "eora_config.json").write_text(json.dumps(sidecar))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        PeftModel.from_pretrained(copy.deepcopy(quantized), old)
    with pytest.raises(BaseMismatchError):
        PeftModel.from_pretrained(tiny_llama_pair(seed=1)[1], old)


def test_sensitive_to_weights_structure_and_quantization(computed):
    quantized, _, _ = computed
    fp = compute_fingerprint(quantized)

    edited = copy.deepcopy(quantized)
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # a sampled position
    changed = compute_fingerprint(edited)
    assert changed.digest != fp.digest and differences(fp, changed) == (["dense_weights"], [])

    other_seed = compute_fingerprint(tiny_llama_pair(seed=1)[1])
    assert other_seed.digest != fp.digest and other_seed.structure == fp.structure

    deeper = compute_fingerprint(tiny_llama_pair(seed=0, layers=3)[1])
    assert "structure" in differences(fp, deeper)[0]

    quant = copy.deepcopy(quantized)
    quant.config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    assert differences(fp, compute_fingerprint(quant))[0] == ["quantization"]


def test_loading_onto_another_base_raises_naming_both(computed):
    _, model, path = computed
    other = tiny_llama_pair(seed=1)[1]
    recorded = model.peft_config["default"].base_fingerprint["digest"]
    current = compute_fingerprint(other).digest
    with pytest.raises(BaseMismatchError) as info:
        PeftModel.from_pretrained(other, path)
    message = str(info.value)
    assert recorded in message and current in message and recorded != current
    assert "dense_weights" in message and "allow_base_mismatch=True" in message
    # refused before injection: the model passed in was not modified
    assert not any(isinstance(m, LoraLayer) for m in other.modules())


def test_allow_base_mismatch_loads_with_a_warning(computed, tmp_path):
    _, model, path = computed
    other = tiny_llama_pair(seed=1)[1]
    with pytest.warns(BaseMismatchWarning, match="Loading anyway"):
        loaded = PeftModel.from_pretrained(other, path, allow_base_mismatch=True)
    config = loaded.peft_config["default"]
    assert config.allow_base_mismatch is True
    assert sum(isinstance(m, LoraLayer) for m in loaded.modules()) == 14
    # the flag is a loading choice: saving again records the original fingerprint, not the flag
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "eora_config.json").read_text())
    assert "allow_base_mismatch" not in saved
    assert saved["base_fingerprint"] == model.peft_config["default"].base_fingerprint
    # the same through an explicit config object
    config = EoRAConfig.from_pretrained(path)
    config.allow_base_mismatch = True
    with pytest.warns(BaseMismatchWarning):
        PeftModel.from_pretrained(tiny_llama_pair(seed=1)[1], path, config=config)
    # and for a second adapter: load_adapter takes the flag as from_pretrained does (PEFT drops it on the way)
    with pytest.raises(BaseMismatchError):
        loaded.load_adapter(path, adapter_name="strict")
    assert "strict" not in loaded.peft_config
    with pytest.warns(BaseMismatchWarning, match="Loading anyway"):
        loaded.load_adapter(path, adapter_name="second", allow_base_mismatch=True)
    assert loaded.peft_config["second"].allow_base_mismatch is True


def test_same_base_loads_silently(computed):
    quantized, _, path = computed
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        PeftModel.from_pretrained(copy.deepcopy(quantized), path)


@pytest.mark.parametrize("extra", [{"modules_to_save": ["lm_head"]}, {"trainable_token_indices": [3, 5]}])
def test_wrapped_base_modules_read_as_the_modules_they_wrap(extra, tmp_path):
    """``modules_to_save`` and trainable tokens wrap a base module (and hold a trainable copy or delta): the
    fingerprint reads the module they wrap, so the adapter saved from the wrapped model loads on its plain base."""
    original, quantized = tiny_llama_pair(seed=0)
    model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, **extra))
    peft_eora.initialize_eora_weights(model, original_model=original, calibration=CALIB, progress=False)
    assert compute_fingerprint(model) == compute_fingerprint(quantized)
    with torch.no_grad():  # the trainable copy moves away from the base: still the same base
        for name, param in model.named_parameters():
            if "modules_to_save" in name or "trainable_tokens_delta" in name:
                param.add_(0.5)
    assert compute_fingerprint(model) == compute_fingerprint(quantized)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        loaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path).eval()
    ids = CALIB[:, :8]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model.eval()(ids).logits, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_offloaded_base_fingerprints_as_the_same_base_not_as_any_base(tmp_path, dtype):
    """accelerate's CPU/disk offload leaves ``meta`` tensors on the modules: the fingerprint read no weights there, so
    two compressed models of one original (3- and 2-bit) had one digest (a resumed run accepted the other's blocks).
    The values the hooks hold are sampled (memory, ``.dat`` memory maps, safetensors slices), as loaded ones are."""
    from accelerate import dispatch_model

    from tiny_models import fake_quantize_

    original, _ = tiny_llama_pair(seed=0, layers=3)
    bases = {bits: fake_quantize_(copy.deepcopy(original), bits=bits).to(dtype) for bits in (3, 2)}

    def offloaded(model, tag):
        device_map = {"model.embed_tokens": "cpu", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(3)})
        return dispatch_model(copy.deepcopy(model), device_map=device_map, offload_dir=str(tmp_path / tag),
                              main_device="cpu")

    plain = {bits: compute_fingerprint(m) for bits, m in bases.items()}
    moved = {bits: offloaded(m, f"off{bits}") for bits, m in bases.items()}
    assert any(p.device.type == "meta" for p in moved[3].parameters())  # offloaded indeed
    seen = {bits: compute_fingerprint(m) for bits, m in moved.items()}
    assert seen[3].digest == plain[3].digest and seen[2].digest == plain[2].digest
    assert seen[3].digest != seen[2].digest and seen[3].dense_weights is not None


def test_packed_weights_are_compared_only_between_equal_kernels(computed):
    quantized, _, _ = computed
    fp = compute_fingerprint(quantized).to_dict()
    config = EoRAConfig(r=8, init_eora=False)

    config.base_fingerprint = {**fp, "packed_weights": "0" * 16, "kernels": ["MarlinQuantLinear"]}
    with pytest.warns(BaseMismatchWarning, match="on structure, quantization, dense weights, but could not compare "
                                                 "packed_weights"):
        verify_fingerprint(quantized, config)
    config.base_fingerprint = {**fp, "dense_weights": None}  # what it compared is what it names (it said "dense")
    with pytest.warns(BaseMismatchWarning, match=r"on structure, quantization, packed weights, but could not compare "
                                                 r"dense_weights \(weights not materialised\)"):
        verify_fingerprint(quantized, config)
    config.base_fingerprint = {**fp, "dense_weights": "0" * 16}
    with pytest.raises(BaseMismatchError, match="loaded in another dtype"):
        verify_fingerprint(quantized, config)

    config.base_fingerprint = {**fp, "packed_weights": "0" * 16}  # same kernels, other packed values
    with pytest.raises(BaseMismatchError, match="packed_weights"):
        verify_fingerprint(quantized, config)

    config.base_fingerprint = {**fp, "version": 999}
    with pytest.warns(BaseMismatchWarning, match="version-999"):
        assert verify_fingerprint(quantized, config) is None

    config.base_fingerprint = None  # adapters saved before fingerprints existed: not checked
    assert verify_fingerprint(quantized, config) is None
    assert BaseFingerprint.from_dict({**fp, "future_field": 1}) == BaseFingerprint.from_dict(fp)


@pytest.mark.slow
def test_real_gptq_base(tiny_gptq4_dir):
    """gptqmodel GPTQ 4-bit: quantized layers are sampled as packed tensors, config bits recorded."""
    from peft_eora.quantize import load_quantized

    first, second = load_quantized(tiny_gptq4_dir), load_quantized(tiny_gptq4_dir)
    fp = compute_fingerprint(first)
    assert compute_fingerprint(second) == fp
    assert fp.kernels and all("Linear" in k for k in fp.kernels) and fp.packed_weights is not None
    wrapped = get_peft_model(second, EoRAConfig(r=4, init_eora=False))
    assert compute_fingerprint(wrapped) == fp
    with torch.no_grad():
        qweight = next(m for m in first.modules() if type(m).__name__ in fp.kernels).qweight
        qweight.view(-1)[0] ^= 1
    assert differences(fp, compute_fingerprint(first))[0] == ["packed_weights"]
