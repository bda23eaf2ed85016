"""Plain-LoRA export: stock-PEFT loadable without peft-eora, vLLM-style layout, exact scaling."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_eora
from peft_eora import EoRAConfig, export_lora
from peft_eora.safe_files import check_safetensors
from child_process import WarmChild
from tiny_models import tiny_llama_pair

INPUT = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(2))
SUFFIXES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
SHAPES = {  # (out, in) of the tiny Llama's linears
    "q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
    "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128),
}  # fmt: skip
#: ranks differ per module (down_proj r=4 while r=8: scale alpha/r = 2 there) and q_proj has its
#: own alpha (scale 2 at the default rank): both must survive the export.
MIXED = {"rank_pattern": {"down_proj": 4}, "alpha_pattern": {"q_proj": 16}}


STOCK_PEFT_TEST = "test_export_loads_with_stock_peft_in_a_process_without_peft_eora"
#: Runs in a fresh interpreter where ``import peft_eora`` fails: stock PEFT only.
STOCK_PEFT_CHILD = """
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    try:
        import peft_eora
    except ImportError:
        pass
    else:
        raise SystemExit("peft_eora was importable")
    args = wait_for_job()
    ids = load_file(args["input"])["input"]
    out, report = {}, {}
    for name, path in args["adapters"].items():
        config = PeftConfig.from_pretrained(path)
        base = LlamaForCausalLM.from_pretrained(args["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, path).eval()
        with torch.no_grad():
            out[name] = model(ids).logits.contiguous()
        loaded = model.peft_config["default"]
        report[name] = [type(config).__name__, type(loaded).__name__, loaded.peft_type.value]
    assert not [m for m in sys.modules if m.startswith("peft_eora") and sys.modules[m] is not None]
    save_file(out, args["output"])
    print(json.dumps(report))
"""


@pytest.fixture(scope="module", autouse=True)
def stock_peft_child(request, tmp_path_factory):
    """The stock-PEFT process, started before the EoRA factors are computed (if its test runs)."""
    if not any(item.originalname == STOCK_PEFT_TEST for item in request.session.items):
        yield None
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = WarmChild(STOCK_PEFT_CHILD, tmp_path_factory.mktemp("child"), env, block_peft_eora=True)
    yield child
    child.close()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


@pytest.fixture(scope="module")
def models():
    """The dense quantized base and two computed EoRA models: uniform rank, mixed ranks/alphas."""
    original, quantized = tiny_llama_pair(seed=0)
    out = {}
    for name, extra in (("uniform", {}), ("mixed", MIXED)):
        model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, **extra))
        peft_eora.initialize_eora_weights(model, original_model=original, calibration=CALIB, progress=False)
        out[name] = model.eval()
    return quantized, out


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    return {name: Path(export_lora(model, root / name)) for name, model in models[1].items()}


def lora_layers(model) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def test_export_layout_is_plain_lora(models, exported):
    model, path = models[1]["uniform"], exported["uniform"]
    assert set(os.listdir(path)) == {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (8, 8)
    assert config["target_modules"] == SUFFIXES  # an explicit list, not a regex
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["use_rslora"] is False and config["bias"] == "none" and config["use_dora"] is False
    assert not {"init_eora", "base_fingerprint", "eora_stats", "original_model", "calibration"} & set(config)

    weights = path / "adapter_model.safetensors"
    check_safetensors(weights)
    with safe_open(weights, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    tensors = load_file(weights)
    expected_keys = {
        f"base_model.model.model.layers.{i}.{block}.{proj}.lora_{ab}.weight"
        for i in range(2)
        for block, projs in (("self_attn", SUFFIXES[2:5] + SUFFIXES[6:]), ("mlp", SUFFIXES[:2] + SUFFIXES[5:6]))
        for proj in projs
        for ab in "AB"
    }
    assert set(tensors) == expected_keys
    for name, layer in lora_layers(model).items():
        out_f, in_f = SHAPES[name.rsplit(".", 1)[-1]]
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape == (8, in_f) and b.shape == (out_f, 8)
        # uniform scale: the factors are copied bit for bit
        assert torch.equal(a, layer.lora_A["default"].weight) and torch.equal(b, layer.lora_B["default"].weight)


def test_export_mixed_ranks_writes_rank_and_alpha_patterns(models, exported):
    model, path = models[1]["mixed"], exported["mixed"]
    config = json.loads((path / "adapter_config.json").read_text())
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert (config["r"], config["lora_alpha"]) == (8, 8)
    assert config["rank_pattern"] == {name: 4 for name in down}
    # the exported scale is lora_alpha / r = 1 for every module, so alpha_pattern = rank_pattern
    assert config["alpha_pattern"] == {name: 4 for name in down}
    tensors = load_file(path / "adapter_model.safetensors")
    for name, layer in lora_layers(model).items():
        eora_scale = layer.scaling["default"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert b.shape[1] == (4 if name in down else 8)
        # the per-module scale (2 for down_proj and q_proj) is folded into lora_B, exactly
        expected_scale = 2.0 if name.endswith(("down_proj", "q_proj")) else 1.0
        assert eora_scale == expected_scale
        assert torch.equal(b, layer.lora_B["default"].weight * eora_scale)


@pytest.mark.parametrize("variant", ["uniform", "mixed"])
def test_vllm_style_loader_reproduces_outputs(models, exported, variant):
    """A serving-engine reader: keys + one global lora_alpha / r, patterns ignored, merged into W."""
    quantized, model = models[0], models[1][variant]
    config = json.loads((exported[variant] / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(exported[variant] / "adapter_model.safetensors")
    merged = copy.deepcopy(quantized)
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key[len("base_model.model.") : -len(".lora_A.weight")]
                assert module.rsplit(".", 1)[-1] in config["target_modules"]
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                merged.get_submodule(module).weight += scale * (b @ a)
    assert (logits(merged) - logits(model)).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_export_loads_with_stock_peft_in_a_process_without_peft_eora(models, exported, stock_peft_child, tmp_path):
    quantized, eora = models
    quantized.save_pretrained(tmp_path / "base")
    save_file({"input": INPUT}, tmp_path / "input.safetensors")
    job = {
        "adapters": {name: str(path) for name, path in exported.items()},
        "base": str(tmp_path / "base"),
        "input": str(tmp_path / "input.safetensors"),
        "output": str(tmp_path / "logits.safetensors"),
    }
    report = stock_peft_child.run(job)
    assert report == {name: ["LoraConfig", "LoraConfig", "LORA"] for name in exported}
    child = load_file(tmp_path / "logits.safetensors")
    for name, model in eora.items():
        assert (child[name] - logits(model)).abs().max().item() <= 1e-5


def test_export_dtype_and_errors(models, tmp_path):
    model = models[1]["uniform"]
    path = export_lora(model, tmp_path / "fp16", dtype=torch.float16)
    assert {t.dtype for t in load_file(Path(path) / "adapter_model.safetensors").values()} == {torch.float16}
    with pytest.raises(KeyError, match="no-such"):
        export_lora(model, tmp_path / "x", adapter_name="no-such")
    with pytest.raises(TypeError, match="PeftModel"):
        export_lora(models[0], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_export_keeps_its_folders_card_text_and_states_the_exported_alpha(models, tmp_path):
    """A second export dropped the user's text in the folder's card (a save keeps it); with rsLoRA the card stated
    the EoRA config's lora_alpha, not the one the export wrote (without rsLoRA)."""
    model = models[1]["uniform"]
    export_lora(model, tmp_path / "out")
    readme = tmp_path / "out" / "README.md"
    readme.write_text(readme.read_text() + "\nMY NOTES\n")
    export_lora(model, tmp_path / "out")
    assert "MY NOTES" in readme.read_text() and readme.read_text().count("peft-eora:begin") == 1
    rs = copy.deepcopy(model)
    config = rs.peft_config["default"]
    config.use_rslora = True
    for layer in lora_layers(rs).values():
        layer.scaling["default"] = config.lora_alpha / math.sqrt(config.r)
    export_lora(rs, tmp_path / "rs")
    written = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    card = (tmp_path / "rs" / "README.md").read_text()
    assert f"(lora_alpha {written['lora_alpha']:.4g}, without rsLoRA)" in card and not written["use_rslora"]


def test_export_targets_fall_back_to_full_names(models, tmp_path):
    """When suffixes would select more modules than were adapted, the full names are exported."""
    quantized = models[0]
    config = EoRAConfig(r=4, target_modules=r"model\.layers\.0\.self_attn\.q_proj", init_eora=False)
    model = get_peft_model(copy.deepcopy(quantized), config)
    config = json.loads((Path(export_lora(model, tmp_path / "one")) / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "one")
    assert [n for n, m in loaded.get_base_model().named_modules() if isinstance(m, LoraLayer)] == [
        "model.layers.0.self_attn.q_proj"
    ]
