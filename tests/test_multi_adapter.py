"""Several task adapters on one quantized base (peft_eora.layer, peft_eora.model.only_active).

Two EoRA adapters of the tiny GPTQ 3-bit model, one calibrated on C4 and one on GSM8K, are loaded
together, switched with ``set_adapter`` and mixed in one batch (``adapter_names=``): every row must
equal the output of a model holding that row's adapter alone. Computing the second adapter in place,
on a model that already holds the first, must give the factors it gets when computed alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora.gptq import GPTQLoraLinear

from peft_eora import CalibrationConfig, EoRAConfig
from peft_eora.layer import MixedBatchGPTQLoraLinear

RANK = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]
CALIBRATIONS = {
    "c4": CalibrationConfig(dataset="builtin:c4", num_samples=4, seq_len=64),
    "gsm8k": CalibrationConfig(dataset="builtin:gsm8k", num_samples=4, seq_len=64),
}
IDS = torch.randint(0, 49152, (3, 16), generator=torch.Generator().manual_seed(3))


def _base(path):
    from peft_eora.quantize import load_quantized

    return load_quantized(path, dtype=torch.float16, compute_dtype=torch.float32)


def _config(original, task: str) -> EoRAConfig:
    return EoRAConfig(r=RANK, target_modules=TARGETS, original_model=str(original), calibration=CALIBRATIONS[task])


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits


def _factors(model, adapter: str) -> dict[str, torch.Tensor]:
    return {
        n.replace(f".{adapter}.", "."): p.detach().clone()
        for n, p in model.named_parameters()
        if ".lora_" in n and f".{adapter}." in n
    }


@pytest.fixture(scope="module")
def base(tiny_gptq3_dir):
    return _base(tiny_gptq3_dir)


@pytest.fixture(scope="module")
def adapters(base, tiny_original_dir, tmp_path_factory):
    """Each task adapter computed alone on a fresh copy of the base and saved; with its logits and factors."""
    root = tmp_path_factory.mktemp("task-adapters")
    alone = {}
    for task in CALIBRATIONS:
        model = get_peft_model(copy.deepcopy(base), _config(tiny_original_dir, task)).eval()
        model.save_pretrained(root / task)
        alone[task] = {"logits": _logits(model), "factors": _factors(model, "default")}
    return root, alone


def test_two_task_adapters_switch_and_mix_in_one_batch(base, adapters):
    root, alone = adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "c4", adapter_name="c4")
    model.load_adapter(root / "gsm8k", adapter_name="gsm8k")
    model.eval()
    assert all(isinstance(model.peft_config[t], EoRAConfig) for t in CALIBRATIONS)
    layers = [m for m in model.modules() if isinstance(m, GPTQLoraLinear)]
    assert layers and all(isinstance(m, MixedBatchGPTQLoraLinear) for m in layers)
    with model.disable_adapter():
        plain = _logits(model)
    assert (alone["c4"]["logits"] - alone["gsm8k"]["logits"]).abs().max().item() > 1e-3  # two different adapters

    for task in CALIBRATIONS:
        model.set_adapter(task)
        assert (_logits(model) - alone[task]["logits"]).abs().max().item() <= 1e-4, task

    mixed = _logits(model, adapter_names=["c4", "gsm8k", "__base__"])
    for row, expected in enumerate((alone["c4"]["logits"], alone["gsm8k"]["logits"], plain)):
        assert (mixed[row] - expected[row]).abs().max().item() <= 1e-4, row
    with pytest.raises(ValueError, match="non-existing adapter"):
        _logits(model, adapter_names=["c4", "gsm8k", "math"])


def test_second_adapter_computed_in_place_equals_computing_it_alone(base, adapters, tiny_original_dir):
    root, alone = adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "c4", adapter_name="c4")  # c4 loaded and active
    model.add_adapter("gsm8k", _config(tiny_original_dir, "gsm8k"))  # computed now, with c4 on the model
    assert model.active_adapters == ["c4"]  # computing left the active adapter alone
    computed = _factors(model, "gsm8k")
    assert computed.keys() == alone["gsm8k"]["factors"].keys()
    for name, tensor in computed.items():
        assert torch.allclose(tensor, alone["gsm8k"]["factors"][name], atol=1e-5, rtol=1e-4), name


def test_an_adapter_loaded_later_is_checked_against_the_base_too(adapters, tiny_gptq4_dir):
    from peft_eora import BaseMismatchError
    from peft_eora.fingerprint import BaseMismatchWarning

    root, _ = adapters
    with pytest.warns(BaseMismatchWarning, match="Loading anyway"):
        model = PeftModel.from_pretrained(_base(tiny_gptq4_dir), root / "c4", adapter_name="c4", allow_base_mismatch=True)
    with pytest.raises(BaseMismatchError, match="gsm8k"):
        model.load_adapter(root / "gsm8k", adapter_name="gsm8k")  # the 3-bit adapter onto the 4-bit base
    assert list(model.peft_config) == ["c4"]


def test_a_weighted_combination_is_described_as_one_not_as_its_first_adapter(base, adapters, tmp_path):
    """PEFT's ``add_weighted_adapter`` copies the first adapter's config: saved, the combination carried the c4
    adapter's statistics (and, its factors differing from the recorded ones, was called c4's adapter "fine-tuned")."""
    root, alone = adapters
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / "c4", adapter_name="c4")
    model.load_adapter(root / "gsm8k", adapter_name="gsm8k")
    model.add_weighted_adapter(["c4", "gsm8k"], [0.5, 0.5], "mix", combination_type="cat")
    config = model.peft_config["mix"]
    assert isinstance(config, EoRAConfig) and not config.init_eora and not config.fine_tuned
    assert config.eora_stats["combination"] == {"adapters": ["c4", "gsm8k"], "weights": [0.5, 0.5],
                                                "combination_type": "cat"}
    assert set(config.eora_stats) == {"combination", "factor_signature"}  # not c4's statistics
    assert model.peft_config["c4"].eora_stats.get("factor_signature")  # the sources keep theirs
    assert config.base_fingerprint == model.peft_config["c4"].base_fingerprint  # one base
    model.set_adapter("mix")
    model.eval()
    mixed = _logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    saved = EoRAConfig.from_pretrained(tmp_path / "mix")
    assert saved.eora_stats == config.eora_stats and not saved.fine_tuned
    card = (tmp_path / "mix" / "README.md").read_text()
    assert "weighted combination (cat) of EoRA adapters `c4` ×0.5, `gsm8k` ×0.5" in card
    assert "then fine-tuned" not in card
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix", adapter_name="mix").eval()
    assert torch.allclose(_logits(again), mixed, rtol=1e-4, atol=1e-3)
    # trained afterwards, the combination is saved as fine-tuned (its own factors' signature is recorded)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B.mix" in n).add_(0.01)
    model.save_pretrained(tmp_path / "tuned", selected_adapters=["mix"])
    assert EoRAConfig.from_pretrained(tmp_path / "tuned" / "mix").fine_tuned
    # EoRA adapters that joined a plain LoRA model (PEFT's LoraModel tuner): combined the same way
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.load_adapter(root / "c4", adapter_name="c4")
    lora.load_adapter(root / "gsm8k", adapter_name="gsm8k")
    assert type(lora.base_model) is LoraModel
    lora.add_weighted_adapter(["c4", "gsm8k"], [0.5, 0.5], "mix", combination_type="cat")
    assert lora.peft_config["mix"].eora_stats["combination"] == config.eora_stats["combination"]
