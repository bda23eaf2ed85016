"""Residual back-ends beyond GPTQ on the tiny real model (the first 2 layers of the embedded SmolLM2):
AWQ (gptqmodel), bitsandbytes 4-bit, HQQ, torchao weight-only (int and float8), compressed-tensors.

Per format: (a) the back-end's dequantized weight reproduces the layer's own forward; (b) EoRA
through ``get_peft_model`` brings the hidden states measurably closer to the original's on
held-out text, in and out of the calibration domain; (c) in the calibration domain EoRA's
activation-weighted residual error is below plain SVD's. Formats whose library is missing skip
with the install command.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
from torch import nn

from eora_checks import (
    c4_split,
    check_dequantize_matches_forward,
    check_reload,
    eora_vs_svd,
    target_names,
    wikitext_windows,
)
from peft_eora.residual import UnsupportedModuleError, backend_for, registered

INSTALL = {"bitsandbytes": "bnb", "hqq": "hqq", "torchao": "torchao", "gptqmodel": "gptq", "compressed_tensors": "ct"}


def _require(library: str) -> None:
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} not installed: pip install 'peft-eora[{INSTALL[library]}]'")


@pytest.fixture(scope="module")
def texts(tmp_path_factory, tokenizer):
    calib, c4_held = c4_split(tmp_path_factory.mktemp("c4"), tokenizer)
    return calib, {"c4": c4_held, "wikitext2": wikitext_windows(tokenizer)}


@pytest.fixture(scope="module")
def original_model(tiny_original_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_original_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(original_model, texts):
    """The original model's last hidden states on the held-out texts (computed once)."""
    from eora_checks import reference_hidden

    return reference_hidden(original_model, texts[1])


def _on_the_fly(path, method: str, bits: int = 4, group_size: int = 64, **kw):
    from peft_eora.quantize import load_and_quantize

    return lambda: load_and_quantize(path, method, bits=bits, group_size=group_size, **kw)


#: PEFT's LoRA layer for each back-end (its quantized-base dispatch, all working on CPU here); on AWQ (and GPTQ)
#: EoRA uses the subclass that also serves mixed batches (peft_eora.layer).
PEFT_LAYER = {"bnb-4bit": "Linear4bit", "hqq": "HqqLoraLinear", "torchao": "TorchaoLoraLinear", "awq": "MixedBatchAwqLoraLinear",
              "compressed-tensors": "Linear"}

# (format id, library, factory(tiny_original_dir) -> model maker, backend name)
ON_THE_FLY_CASES = {
    "bnb-nf4": ("bitsandbytes", lambda p: _on_the_fly(p, "bnb-nf4"), "bnb-4bit"),
    "bnb-fp4-double": ("bitsandbytes", lambda p: _on_the_fly(p, "bnb-fp4", double_quant=True), "bnb-4bit"),
    "hqq-w4g64": ("hqq", lambda p: _on_the_fly(p, "hqq", 4, 64), "hqq"),
    "hqq-w3g64": ("hqq", lambda p: _on_the_fly(p, "hqq", 3, 64), "hqq"),
    "hqq-w2g32": ("hqq", lambda p: _on_the_fly(p, "hqq", 2, 32), "hqq"),
    "torchao-int4g64": ("torchao", lambda p: _on_the_fly(p, "torchao", 4, 64), "torchao"),
    "torchao-int3g32": ("torchao", lambda p: _on_the_fly(p, "torchao", 3, 32), "torchao"),
    "torchao-int8": ("torchao", lambda p: _on_the_fly(p, "torchao", 8), "torchao"),
    "torchao-fp8": ("torchao", lambda p: _on_the_fly(p, "torchao-fp8", 8), "torchao"),
}


# ---------------------------------------------------------------------------------------------
# (a) the dequantized weight is what the kernel multiplies by


@pytest.mark.parametrize("case", sorted(ON_THE_FLY_CASES))
def test_dequantize_matches_forward(case, tiny_original_dir):
    library, factory, backend_name = ON_THE_FLY_CASES[case]
    _require(library)
    model = factory(tiny_original_dir)()
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits  # (bitsandbytes repacks its CPU weights on the first forward)
    # bitsandbytes' AVX512-BF16 CPU layout multiplies in bfloat16: its forward is only that close to any float weight
    rtol = 5e-3 if _bnb_cpu_packed(model) else 1e-5
    assert check_dequantize_matches_forward(model, backend_name, rtol=rtol) == 14
    with torch.no_grad():  # dequantizing leaves the layers as they were (bnb's CPU unpacking once did not)
        assert torch.equal(model(input_ids=ids).logits, before)
    # and it is a compressed weight: close to the original, not equal to it
    from peft_eora.original import OriginalWeights

    original = OriginalWeights.open(str(tiny_original_dir))
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    w, w0 = backend_for(module).dequantize(module), original.get(name)
    rel = float((w - w0).norm() / w0.norm())
    assert 1e-4 < rel < 0.5, rel


def _bnb_cpu_packed(model) -> bool:
    return any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
               for m in model.modules())


@pytest.mark.parametrize("case", ["bnb-nf4", "bnb-fp4-double"])
def test_bnb_cpu_layout_unpacks_to_the_same_weight(case, tiny_original_dir):
    """After bitsandbytes repacks a layer for AVX512-BF16 CPUs, its dequantized weight is the one before
    repacking up to the bfloat16 rounding of the block scales (absmax) that the layout stores."""
    library, factory, backend_name = ON_THE_FLY_CASES[case]
    _require(library)
    from peft_eora.fingerprint import compute_fingerprint

    model = factory(tiny_original_dir)()
    names = target_names(model)
    fresh = {n: backend_for(model.get_submodule(n)).dequantize(model.get_submodule(n)) for n in names}
    fingerprint = compute_fingerprint(model)
    with torch.no_grad():
        model(input_ids=torch.arange(1, 17)[None])
    if not _bnb_cpu_packed(model):
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16): nothing to unpack")
    for n in names:
        w = backend_for(model.get_submodule(n)).dequantize(model.get_submodule(n))
        rel = float((w - fresh[n]).norm() / fresh[n].norm())
        assert rel < 3e-3, (n, rel)  # was 0.57 when the transposed absmax was read as is
    # the base fingerprint reads both layouts the same way, so an adapter saved before the first
    # forward still loads onto the same checkpoint after it
    assert compute_fingerprint(model) == fingerprint
    # bitsandbytes' own state_dict() un-repacks with a transposed absmax (the layer then computes
    # garbage); restore_cpu_layouts, run by every EoRA save, makes that a no-op
    from peft_eora.residual.bnb import restore_cpu_layouts

    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert restore_cpu_layouts(model) == len(names)
    model.state_dict()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) < 1e-2
    assert compute_fingerprint(model) == fingerprint


def test_awq_dequantize_matches_forward(tiny_awq4_dir):
    from peft_eora.quantize import load_quantized

    model = load_quantized(tiny_awq4_dir)
    # AwqTorchLinear casts float32 inputs to float16 and multiplies in float16
    assert check_dequantize_matches_forward(model, "awq", rtol=2e-3, cast=torch.float16) == 14
    # the float32 CPU emulation multiplies by exactly the same weights
    emulated = load_quantized(tiny_awq4_dir, compute_dtype=torch.float32)
    assert check_dequantize_matches_forward(emulated, "awq", rtol=1e-6) == 14
    # its float32 copy follows in-place writes into the buffers (a load_state_dict): it was keyed on the storages
    layer = emulated.model.layers[0].mlp.down_proj
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        layer.scales.mul_(2)
        assert torch.allclose(layer(x), 2 * before, rtol=1e-5, atol=1e-5)


def test_awq_unpacking_matches_gptqmodel(tiny_awq4_dir):
    """Our unpacking of the GEMM layout against gptqmodel's own dequantize_gemm, bit for bit."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    from peft_eora.quantize import load_quantized
    from peft_eora.residual.awq import AWQBackend

    model = load_quantized(tiny_awq4_dir)
    for name in target_names(model):
        m = model.get_submodule(name)
        ref = dequantize_gemm(m.qweight, m.qzeros, m.scales, m.bits, m.group_size).T.float()
        assert torch.equal(AWQBackend().dequantize(m), ref), name


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_awq_unpacking_other_widths(bits):
    """Non-4-bit AWQ words are a little-endian bit stream; round trip through gptqmodel's packer."""
    pytest.importorskip("gptqmodel", reason="pip install 'peft-eora[gptq]'")
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq

    from peft_eora.residual.awq import unpack_awq_codes

    codes = torch.randint(0, 2**bits, (16, 96), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed, _ = pack_awq(codes, codes[:2], bits)
    assert torch.equal(unpack_awq_codes(packed, bits, 96), codes.long())


def test_awq_needs_the_smoothed_original(tiny_awq4_dir, tiny_original_dir):
    """AWQ folds per-channel scales into norms and weights: the raw original is far from the AWQ
    weights, the smoothed original (scales recorded at quantization) is as close as 4 bits allow."""
    from peft_eora.original import OriginalWeights
    from peft_eora.quantize import awq_smoothed_original, load_quantized

    smoothed = awq_smoothed_original(tiny_awq4_dir)
    model = load_quantized(tiny_awq4_dir)
    raw, smooth = OriginalWeights.open(str(tiny_original_dir)), OriginalWeights.open(str(smoothed))
    def rel(name: str, reference: OriginalWeights) -> float:
        m = model.get_submodule(name)
        w, w0 = backend_for(m).dequantize(m), reference.get(name)
        return float((w - w0).norm() / w0.norm())

    # measured: 0.09-0.13 against the smoothed original, 0.39-1.25 against the raw one
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"):
        assert rel(name, smooth) < 0.15 and rel(name, raw) > 2.5 * rel(name, smooth), name
    # o_proj: no scaling group (GQA: v_proj's 192 outputs ≠ o_proj's 576 inputs), both the same
    assert rel("model.layers.0.self_attn.o_proj", raw) == rel("model.layers.0.self_attn.o_proj", smooth)


def test_smoothed_original_computes_the_original_function(tiny_awq4_dir, original_model, texts):
    from transformers import AutoModelForCausalLM

    from eora_checks import hidden
    from peft_eora.quantize import awq_smoothed_original

    smoothed = AutoModelForCausalLM.from_pretrained(awq_smoothed_original(tiny_awq4_dir), dtype=torch.float32)
    ids = texts[1]["c4"][:2]
    ref = hidden(original_model, ids)
    assert float((hidden(smoothed, ids) - ref).norm() / ref.norm()) < 1e-5
    # the norms really were rescaled (otherwise this test would prove nothing)
    g0 = original_model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(smoothed.model.layers[0].input_layernorm.weight, g0, rtol=1e-2)


@pytest.fixture(scope="module")
def tiny_ct4_dir(tiny_original_dir):
    """compressed-tensors W4A16 (symmetric int4, group 64, pack-quantized) of the 2-layer model (cached)."""
    _require("compressed_tensors")
    from peft_eora.quantize import quantize_compressed_tensors

    return quantize_compressed_tensors(tiny_original_dir, bits=4, group_size=64)


def _load_ct(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_compressed_tensors_dequantize_matches_forward(tiny_ct4_dir, tiny_original_dir):
    """Loaded compressed (packed int32, no weight), the back-end decompresses copies; preparing the model
    runs compressed-tensors' own decompress-on-first-forward hook; both give the weight the forward uses."""
    from peft_eora.fingerprint import compute_fingerprint
    from peft_eora.original import OriginalWeights
    from peft_eora.residual import prepare_model

    model = _load_ct(tiny_ct4_dir)
    name = "model.layers.0.mlp.down_proj"
    module = model.get_submodule(name)
    assert "weight" not in module._parameters and "weight_packed" in module._parameters
    names = target_names(model)
    assert len(names) == 14 and all(backend_for(model.get_submodule(n)).name == "compressed-tensors" for n in names)
    packed = {n: backend_for(model.get_submodule(n)).dequantize(model.get_submodule(n)) for n in names}
    assert "weight" not in module._parameters  # dequantizing changed nothing
    fingerprint = compute_fingerprint(model)
    with torch.no_grad():  # what a plain forward gives (transformers' hook decompresses on the first call)
        logits = _load_ct(tiny_ct4_dir)(input_ids=torch.arange(1, 17)[None]).logits
    prepare_model(model)
    assert "weight" in module._parameters and not hasattr(model, "ct_decompress_hook")
    with torch.no_grad():
        assert torch.equal(model(input_ids=torch.arange(1, 17)[None]).logits, logits)
    assert check_dequantize_matches_forward(model, "compressed-tensors", rtol=1e-5) == 14
    for n in names:
        assert torch.equal(backend_for(model.get_submodule(n)).dequantize(model.get_submodule(n)), packed[n]), n
    assert compute_fingerprint(model) == fingerprint  # same base, compressed or decompressed
    from peft_eora.card import quantization_info  # what the model card says about the base

    assert quantization_info(model) == {"format": "compressed-tensors", "bits": 4, "group_size": 64, "sym": True,
                                        "checkpoint_format": "pack-quantized"}
    w0 = OriginalWeights.open(str(tiny_original_dir)).get(name)
    rel = float((packed[name] - w0).norm() / w0.norm())
    assert 0.01 < rel < 0.3, rel  # int4 grid values: close to the original, not equal to it
    # every int4 group is a multiple of its scale with |code| <= 8
    scale = module.weight_scale.detach().float().repeat_interleave(64, dim=1)
    codes = packed[name] / scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 8


@pytest.mark.parametrize("fmt", ["pack-quantized", "naive-quantized", "float-quantized"])
def test_compressed_tensors_weight_only_formats(fmt):
    """int4 groups (packed int32), int8 and FP8 per channel: in each lifecycle state of a layer (frozen: the
    forward fake-quantizes; compressed: codes only; decompressed) the back-end gives the one weight the
    forward multiplies by."""
    _require("compressed_tensors")
    from compressed_tensors.compressors import compress_module, decompress_module
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    args = {
        "pack-quantized": QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
        "naive-quantized": QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
        "float-quantized": QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel"),
    }[fmt]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    w0 = model[0].weight.detach().clone()
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": scheme}), show_progress=False)
    layer = model[0]
    grouped = w0.unflatten(-1, (2, 32)) if args.strategy == "group" else w0[:, None, :]
    scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    layer.weight_scale.data.copy_(scale.reshape(layer.weight_scale.shape))
    layer.quantization_status = QuantizationStatus.FROZEN
    backend = backend_for(layer, "lin")
    assert backend.name == "compressed-tensors"
    x = torch.randn(4, 64)
    with torch.no_grad():
        weights = [backend.dequantize(layer)]
        y = layer(x)
        compress_module(layer, fmt)
        assert layer.weight_scale.shape[0] == 32 and ("weight_packed" in layer._parameters) == (fmt == "pack-quantized")
        weights.append(backend.dequantize(layer))
        decompress_module(layer)
        weights.append(backend.dequantize(layer))
        assert torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])
        torch.testing.assert_close(layer(x), x @ weights[2].T + layer.bias, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    rel = float((weights[2] - w0).norm() / w0.norm())
    assert 1e-4 < rel < 0.2, rel


def test_compressed_tensors_checkpoint_is_cached_and_validated(tiny_ct4_dir, tiny_original_dir, tmp_path):
    from peft_eora.quantize import quantize_compressed_tensors

    assert quantize_compressed_tensors(tiny_original_dir, bits=4, group_size=64) == tiny_ct4_dir
    meta = __import__("json").loads((tiny_ct4_dir / "peft_eora_quantize.json").read_text())
    assert (meta["method"], meta["bits"], meta["group_size"], meta["quantized_linears"]) == ("compressed-tensors", 4, 64, 14)
    with pytest.raises(ValueError, match="group_size=100 must divide"):
        quantize_compressed_tensors(tiny_original_dir, bits=4, group_size=100, out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantize_compressed_tensors(tiny_original_dir, bits=3, out_dir=tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------
# (b) + (c) EoRA on each compressed base


def _assert_compensates(result: dict, name: str) -> None:
    h, w = result["hidden"], result["weighted_c4"]
    for text in ("c4", "wikitext2"):  # closer to the original on held-out text, in and out of domain
        assert h["eora"][text] < 0.9 * h["base"][text], (name, text, h)
        assert h["svd"][text] < h["base"][text], (name, text, h)
    assert h["eora"]["c4"] < h["svd"]["c4"], (name, h)
    # activation-weighted residual on held-out C4 inputs: EoRA below SVD below nothing
    assert w["eora"] < w["svd"] < w["base"], (name, w)
    assert result["stats"]["calibration_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bnb-nf4", "hqq-w3g64", "torchao-int4g64", "torchao-fp8"])
def test_eora_compensates_on_the_fly_formats(case, tiny_original_dir, reference, texts, tmp_path):
    library, factory, backend_name = ON_THE_FLY_CASES[case]
    _require(library)
    calib, heldout = texts
    make_base = factory(tiny_original_dir)
    result = eora_vs_svd(make_base, tiny_original_dir, reference, heldout, calib)
    _assert_compensates(result, case)
    assert result["lora_layers"] == [PEFT_LAYER[backend_name]], result["lora_layers"]
    # the saved adapter reloads onto a freshly quantized base (same fingerprint) with the same outputs
    assert check_reload(result["eora_model"], make_base, tmp_path / "adapter", heldout["c4"][:2]) <= 1e-5


@pytest.mark.slow
def test_eora_compensates_awq(tiny_awq4_dir, reference, texts):
    from peft.tuners.lora.awq import AwqLoraLinear

    from peft_eora.quantize import awq_smoothed_original, load_quantized

    calib, heldout = texts
    smoothed = awq_smoothed_original(tiny_awq4_dir)
    # float32 CPU emulation of the AWQ kernel (same weights; its float16 matmul is ~60x slower here)
    result = eora_vs_svd(lambda: load_quantized(tiny_awq4_dir, compute_dtype=torch.float32), smoothed,
                         reference, heldout, calib)
    _assert_compensates(result, "awq")
    # PEFT wrapped the gptqmodel AWQ layers in its AWQ LoRA layer
    assert result["lora_layers"] == [PEFT_LAYER["awq"]]
    assert sum(isinstance(m, AwqLoraLinear) for m in result["eora_model"].modules()) == 14
    # the AWQ LoRA layers serve mixed batches too (PEFT's own take x only): row 0 adapted, row 1 the base
    model, ids = result["eora_model"].eval(), heldout["c4"][:1, :16].repeat(2, 1)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["default", "__base__"]).logits
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-3
    assert (mixed[0] - adapted[0]).abs().max() <= 1e-4 and (mixed[1] - plain[1]).abs().max() <= 1e-4


@pytest.mark.slow
def test_eora_compensates_compressed_tensors(tiny_ct4_dir, tiny_original_dir, reference, texts, tmp_path):
    from peft_eora.residual import prepare_model

    def decompressed():  # the helpers run the inner decoder, which transformers' decompress hook does not see
        model = _load_ct(tiny_ct4_dir)
        prepare_model(model)
        return model

    calib, heldout = texts
    result = eora_vs_svd(decompressed, tiny_original_dir, reference, heldout, calib)
    _assert_compensates(result, "compressed-tensors")
    assert result["lora_layers"] == [PEFT_LAYER["compressed-tensors"]]
    # the adapter reloads onto a freshly loaded, still compressed base (PeftModel.from_pretrained prepares it):
    # the fingerprint reads both states alike
    compressed = lambda: _load_ct(tiny_ct4_dir)  # noqa: E731
    assert check_reload(result["eora_model"], compressed, tmp_path / "adapter", heldout["c4"][:2]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# (d) errors and optional imports


def test_on_the_fly_options_a_format_lacks_are_refused(tiny_original_dir):
    """``double_quant`` for hqq/torchao and a bnb group size other than its blocksize were dropped silently; they
    are refused before the library is looked for (the same error with or without the extra installed)."""
    from peft_eora.quantize import load_and_quantize

    with pytest.raises(ValueError, match="double_quant .* bitsandbytes option; hqq has none"):
        load_and_quantize(tiny_original_dir, "hqq", double_quant=True)
    with pytest.raises(ValueError, match="blocks of 64 weights, got group_size=128"):
        load_and_quantize(tiny_original_dir, "bnb-nf4", group_size=128)
    with pytest.raises(ValueError, match="1-8 bits, got bits=9"):
        load_and_quantize(tiny_original_dir, "torchao", bits=9)


def test_unknown_module_lists_every_format():
    class Mystery(nn.Module):
        in_features, out_features = 8, 8

    with pytest.raises(UnsupportedModuleError) as info:
        backend_for(Mystery(), "model.layers.0.mlp.down_proj")
    message = str(info.value)
    assert message.count("Supported formats") == 1 and "model.layers.0.mlp.down_proj" in message
    for name in ("gptq", "awq", "bnb-4bit", "hqq", "torchao", "compressed-tensors", "dense"):
        assert f"{name} (" in message, name
    assert [b.name for b in registered()][-1] == "dense"


def test_activation_quantized_torchao_is_refused_not_treated_as_dense():
    _require("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = nn.Sequential(nn.Linear(64, 32))
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(UnsupportedModuleError, match=r"torchao .* quantizes the activations too .*weight-only"):
        backend_for(model[0], "lin")


@pytest.mark.parametrize("preset", ["W8A8", "FP8_DYNAMIC"])
def test_activation_quantized_compressed_tensors_is_refused(preset):
    _require("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    model = nn.Sequential(nn.Linear(64, 32))
    scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": scheme}), show_progress=False)
    with pytest.raises(UnsupportedModuleError, match=r"compressed-tensors scheme quantizes the activations too.*W4A16"):
        backend_for(model[0], "lin")


def test_fp8_weights_with_separate_scales_are_refused_not_treated_as_dense():
    """transformers' FineGrainedFP8 layer is an nn.Linear whose float8 weight means nothing without its scales."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    layer = FP8Linear(64, 32, block_size=(32, 32))
    with pytest.raises(UnsupportedModuleError, match=r"stored as torch.float8_e4m3fn with scales kept elsewhere"):
        backend_for(layer, "lin")


def test_llm_int8_is_refused_with_the_reason():
    _require("bitsandbytes")
    import bitsandbytes as bnb

    with pytest.raises(UnsupportedModuleError, match=r"LLM.int8 \(Linear8bitLt\) quantizes the activations too"):
        backend_for(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False), "lin")


def test_repacking_awq_kernel_is_read_through_its_forward():
    """A gptqmodel AWQ kernel that repacks its buffers (here: Marlin's class path) is not read as the GEMM layout
    but through its forward (the ``probe`` back-end)."""
    _require("gptqmodel")
    from gptqmodel.nn_modules.qlinear.marlin_awq import AwqMarlinLinear

    fake = AwqMarlinLinear.__new__(AwqMarlinLinear)
    nn.Module.__init__(fake)
    fake.in_features, fake.out_features = 128, 64
    fake.register_buffer("qweight", torch.zeros(8, 128, dtype=torch.int32))  # Marlin's repacked codes
    assert backend_for(fake, "q_proj").name == "probe"


def test_peft_eora_works_without_the_format_libraries(tiny_original_dir):
    """With bitsandbytes, hqq, torchao, compressed-tensors and gptqmodel unimportable, peft_eora imports, every back-end
    is registered, dense layers resolve, and asking for a missing format names its install command."""
    code = f"""
import sys
for name in ("bitsandbytes", "hqq", "torchao", "gptqmodel", "compressed_tensors"):
    sys.modules[name] = None          # import fails, find_spec says 'not installed'
import torch, peft_eora
from peft_eora.residual import backend_for, registered
from peft_eora import prune, quantize
assert [b.name for b in registered()] == ["gptq", "awq", "bnb-4bit", "hqq", "torchao", "compressed-tensors", "probe",
        "dense"]
assert backend_for(torch.nn.Linear(4, 4)).name == "dense"
try:
    quantize.load_and_quantize({str(tiny_original_dir)!r}, "hqq")
except ImportError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'peft-eora[hqq]'" in out.stdout
