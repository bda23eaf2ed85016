"""Quantized EoRA adapters (``EoRAConfig(adapter_bits=8|4)``): rounding, storage, reload, fusing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import peft_eora
from peft_eora.adapter_format import QUANTIZED_PEFT_TYPE
from peft_eora.adapter_quant import (
    is_packed,
    pack_adapter_state_dict,
    quantize_adapter_,
    unpack_adapter_state_dict,
)
from peft_eora.kernels.lowbit import factor_group_size, quantize_per_channel


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def _data_bytes(directory) -> int:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


def _eora(tiny_llama, calib_ids, bits: int, r: int = 8):
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), peft_eora.EoRAConfig(r=r, adapter_bits=bits))
    peft_eora.initialize_eora_weights(pm, original_model=original, calibration=calib_ids[:4], progress=False)
    return pm.eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_pack_unpack_round_trip_odd_shapes(bits):
    gen = torch.Generator().manual_seed(0)
    sd = {
        "base_model.model.l.lora_A.weight": torch.randn(5, 33, generator=gen),  # odd columns (int4 padding)
        "base_model.model.l.lora_B.weight": torch.randn(7, 5, generator=gen),
        "base_model.model.l.lora_B.bias": torch.randn(7, generator=gen),  # passes through
    }
    packed = pack_adapter_state_dict(sd, bits)
    assert is_packed(packed) and "base_model.model.l.lora_A.weight" not in packed
    assert packed["base_model.model.l.lora_A.qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(packed["base_model.model.l.lora_B.bias"], sd["base_model.model.l.lora_B.bias"])
    back = unpack_adapter_state_dict(packed)
    for key in ("base_model.model.l.lora_A.weight", "base_model.model.l.lora_B.weight"):
        q = quantize_per_channel(sd[key], bits)
        assert torch.equal(back[key], q.dequantize())  # exactly the grid values
        assert ((back[key] - sd[key]).abs() <= q.scale.view(-1, 1) / 2 + 1e-7).all()
    # codes: 1 byte (int8) or half a byte (int4) per value, plus one float32 scale per row
    codes = packed["base_model.model.l.lora_A.qweight"]
    assert codes.numel() * codes.element_size() == 5 * (33 if bits == 8 else 17)
    assert packed["base_model.model.l.lora_A.qscale"].shape == (5,)


@pytest.mark.parametrize("adapter", ["", ".task", ".lora_Alpaca", ".lora_B", ".lora_A"])
def test_the_factor_kind_is_read_off_its_own_segment_whatever_the_adapter_is_called(adapter):
    """int4 groups ``lora_A`` by columns and quantizes ``lora_B`` per row: an adapter named e.g.
    ``lora_Alpaca`` (in the saved keys as ``...lora_B.lora_Alpaca.weight``) must not make ``B`` an ``A``."""
    gen = torch.Generator().manual_seed(0)
    sd = {f"base_model.model.mlp.up_proj.lora_A{adapter}.weight": torch.randn(32, 64, generator=gen),
          f"base_model.model.mlp.up_proj.lora_B{adapter}.weight": torch.randn(128, 32, generator=gen)}
    packed = pack_adapter_state_dict(sd, 4)
    assert packed[f"base_model.model.mlp.up_proj.lora_B{adapter}.qscale"].shape == (128,)
    assert packed[f"base_model.model.mlp.up_proj.lora_A{adapter}.qscale"].shape == (32, 64 // factor_group_size("lora_A", 4, 64))


def test_unpack_errors_name_the_factor():
    packed = pack_adapter_state_dict({"m.lora_A.weight": torch.randn(4, 8)}, 8)
    incomplete = {k: v for k, v in packed.items() if not k.endswith("qscale")}
    with pytest.raises(ValueError, match=r"m\.lora_A lacks \['qscale'\]"):
        unpack_adapter_state_dict(incomplete)
    wrong = dict(packed, **{"m.lora_A.qshape": torch.tensor([4, 9])})
    with pytest.raises(ValueError, match="do not match shape"):
        unpack_adapter_state_dict(wrong)
    with pytest.raises(ValueError, match="NaN or inf"):
        pack_adapter_state_dict({"m.lora_A.weight": torch.tensor([[float("nan"), 1.0]])}, 4)


def test_config_validates_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match=r"adapter_bits=3 is not supported: use one of \(16, 8, 4\)"):
        peft_eora.EoRAConfig(r=8, adapter_bits=3)
    cfg = peft_eora.EoRAConfig(r=8, adapter_bits=4)
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "eora_config.json").read_text())["adapter_bits"] == 4
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == QUANTIZED_PEFT_TYPE


@pytest.mark.parametrize("bits", [8, 4])
def test_eora_factors_on_grid_saved_as_codes_and_reloaded_exactly(tiny_llama, calib_ids, tmp_path, bits):
    pm = _eora(tiny_llama, calib_ids, bits)
    weights = _lora_weights(pm)
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    for key, w in weights.items():  # already on the grid: re-rounding changes nothing
        kind = "lora_A" if ".lora_A" in key else "lora_B"
        group = factor_group_size(kind, bits, w.shape[1])
        assert group == ({4: 16, 8: 64}[bits] if kind == "lora_A" else 0)  # A: one scale per 16 (int4) / 64 (int8) inputs
        assert torch.equal(quantize_per_channel(w, bits, group).dequantize(), w), key
    x = calib_ids[4:6, :32]
    with torch.no_grad():
        ref = pm(x).logits
    pm.save_pretrained(tmp_path / "q")
    float_dir = tmp_path / "f"
    pm.peft_config["default"].adapter_bits = 16
    pm.save_pretrained(float_dir)
    pm.peft_config["default"].adapter_bits = bits
    with safe_open(str(tmp_path / "q" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.endswith(".weight") for k in keys)
    assert {k.rsplit(".", 1)[1] for k in keys} == {"qweight", "qscale", "qshape"}
    size_q, size_f = _data_bytes(tmp_path / "q"), _data_bytes(float_dir)  # tensor bytes, JSON header aside
    # tiny r=8 factors: the per-row scales of B weigh as much as its int4 codes, and A's scales (one
    # per 16 inputs) half as much as its codes (≈6× smaller than float32 at r=128)
    assert size_q < size_f / (3.0 if bits == 8 else 4.0), (size_q, size_f)

    _, quantized = tiny_llama
    loaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "q").eval()
    assert loaded.peft_config["default"].adapter_bits == bits
    for key, w in _lora_weights(loaded).items():
        assert torch.equal(w, weights[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


@pytest.mark.parametrize("bits,old_group", [(8, 0), (4, 0), (4, 32)])
def test_adapter_saved_with_earlier_a_scales_stays_on_its_grid(tiny_llama, calib_ids, tmp_path, monkeypatch, bits,
                                                                 old_group):
    """An adapter saved when ``A`` had one scale per row (int8 before grouping) or int4 groups of 32
    loads, saves again and feeds the fused kernels' quantizer on its own grid: nothing is rounded a
    second time."""
    from peft_eora.kernels import lowbit

    assert old_group == 0 or old_group in lowbit.EARLIER_A_GROUPS[bits]
    with monkeypatch.context() as m:  # the old format
        m.setattr(lowbit, "INT4_A_GROUP", old_group)
        m.setattr(lowbit, "INT8_A_GROUP", old_group)
        pm = _eora(tiny_llama, calib_ids, bits)
        pm.save_pretrained(tmp_path / "old")
    weights = _lora_weights(pm)
    _, quantized = tiny_llama
    loaded = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "old").eval()
    for key, w in _lora_weights(loaded).items():
        assert torch.equal(w, weights[key]), key
    loaded.save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "adapter_model.safetensors"), "pt") as f:
        scales = {k: (f.get_tensor(k), int(f.get_tensor(k.replace(".qscale", ".qshape"))[1]))
                  for k in f.keys() if k.endswith("lora_A.qscale")}
    assert scales
    for scale, cols in scales.values():  # still the grid it was saved on
        assert scale.dim() == 1 if old_group == 0 else (scale.dim() == 2 and scale.shape[1] * old_group == cols)
    again = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "again").eval()
    for key, w in _lora_weights(again).items():
        assert torch.equal(w, weights[key]), key
    a = next(w for k, w in weights.items() if ".lora_A." in k)
    b = next(w for k, w in weights.items() if ".lora_B." in k and w.shape[1] == a.shape[0])
    qa, _ = lowbit.quantize_lora_pair(a, b, bits)
    assert qa.group_size == old_group and torch.equal(lowbit.dequantize_per_channel(qa), a)


def test_quantized_adapter_cost_is_small(tiny_llama, calib_ids):
    """int8 factors change the compensated output far less than the compensation itself; int4 more."""
    original, quantized = tiny_llama
    x = calib_ids[8:12, :48]
    with torch.no_grad():
        target = original(x).logits
        base_err = (quantized(x).logits - target).norm().item()
    pm = _eora(tiny_llama, calib_ids, 16, r=16)
    float_weights = _lora_weights(pm)
    errs = {}
    for bits in (16, 8, 4):
        pm.load_state_dict(float_weights, strict=False)
        quantize_adapter_(pm, "default", bits)
        with torch.no_grad():
            errs[bits] = (pm(x).logits - target).norm().item()
    assert errs[16] < 0.9 * base_err  # the adapter compensates
    assert abs(errs[8] - errs[16]) <= 0.01 * (base_err - errs[16])
    assert errs[4] < base_err and abs(errs[4] - errs[16]) <= 0.25 * (base_err - errs[16])


def test_export_of_quantized_adapter_is_plain_float_lora(tiny_llama, calib_ids, tmp_path):
    pm = _eora(tiny_llama, calib_ids, 4)
    peft_eora.export_lora(pm, tmp_path / "plain")
    with safe_open(str(tmp_path / "plain" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(k.endswith(".weight") for k in keys)
        a_key = next(k for k in keys if "q_proj.lora_A" in k)
        a = f.get_tensor(a_key)
    assert a.dtype == torch.float32
    assert torch.equal(a, pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach())
