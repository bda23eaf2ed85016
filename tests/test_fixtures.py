"""The model fixtures: tiny export, tiny GPTQ checkpoints, packed layout, dequantize == forward."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_CALIB_SAMPLES, TINY_CALIB_SEQ_LEN, TINY_GROUP_SIZE, TINY_LAYERS

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.lru_cache(maxsize=4)
def _quantized(path: Path, dtype: torch.dtype):
    from peft_eora.quantize import load_quantized

    return load_quantized(path, dtype=dtype)


def _proj_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJ}


def _gptq_dir(request, bits: int) -> Path:
    return request.getfixturevalue(f"tiny_gptq{bits}_dir")


def test_import_does_not_import_gptqmodel():
    code = "import sys, peft_eora.embedded, peft_eora.quantize; sys.exit('gptqmodel' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tiny_original_loads_plain(tiny_original_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_original_dir)
    assert model.config.num_hidden_layers == TINY_LAYERS == len(model.model.layers)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.tensor([[1, 504, 3575, 282]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("bits", [4, 3])
def test_tiny_gptq_cached_and_recorded(request, tiny_original_dir, bits):
    from peft_eora.quantize import quantize_gptq

    path = _gptq_dir(request, bits)
    start = time.perf_counter()
    again = quantize_gptq(
        tiny_original_dir, bits=bits, num_samples=TINY_CALIB_SAMPLES, seq_len=TINY_CALIB_SEQ_LEN
    )
    assert again == path and time.perf_counter() - start < 1.0
    meta = json.loads((path / "peft_eora_quantize.json").read_text())
    assert (meta["bits"], meta["group_size"]) == (bits, TINY_GROUP_SIZE)
    assert meta["calibration"]["tokens"] == TINY_CALIB_SAMPLES * TINY_CALIB_SEQ_LEN
    assert not any(p.name.startswith(f".{path.name}.") for p in path.parent.iterdir())  # no leftovers


@pytest.mark.parametrize("bits", [4, 3])
def test_tiny_gptq_layout(request, bits):
    pytest.importorskip("gptqmodel", reason="gptqmodel made the GPTQ fixture (pip install 'peft-eora[gptq]')")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    model = _quantized(_gptq_dir(request, bits), torch.float32)
    mods = _proj_modules(model)
    assert len(mods) == 7 * TINY_LAYERS
    for name, m in mods.items():
        assert type(m) is TorchLinear, name
        k, n, g = m.in_features, m.out_features, m.group_size
        assert (m.bits, g) == (bits, TINY_GROUP_SIZE)
        groups = -(-k // g)
        assert m.qweight.dtype == torch.int32 and tuple(m.qweight.shape) == (k * bits // 32, n)
        assert m.qzeros.dtype == torch.int32 and tuple(m.qzeros.shape) == (groups, n * bits // 32)
        assert m.scales.dtype == torch.float16 and tuple(m.scales.shape) == (groups, n)
        assert m.g_idx.dtype == torch.int32 and torch.equal(m.g_idx.long(), torch.arange(k) // g)
        assert m.qzero_format() == 2  # zeros held in memory without GPTQ v1's "minus one"
        assert m.bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bits", [4, 3])
def test_dequantize_matches_forward(request, bits, dtype):
    """``module(x) == x @ dequantize_weight().to(dtype)`` for every layer.

    Tolerance: exact (0) in float32; in bfloat16 1e-2 relative to max |y| (matmul
    accumulation order of the bf16 kernels), while the fp32 product of the float16
    dequantized weight differs from the bf16 forward by the bf16 rounding of weight and input.
    """
    model = _quantized(_gptq_dir(request, bits), dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in _proj_modules(model).items():
            W = m.dequantize_weight().T  # (out, in), float16
            assert W.dtype == torch.float16 and tuple(W.shape) == (m.out_features, m.in_features)
            x = torch.randn(2, 5, m.in_features, generator=gen).to(dtype)
            y = m(x)
            assert y.dtype == dtype
            ref = x @ W.to(dtype).T
            if dtype == torch.float32:
                torch.testing.assert_close(y, ref, rtol=0, atol=0, msg=name)
            else:
                err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
                assert err < 1e-2, (name, err.item())


@pytest.mark.parametrize("bits", [4, 3])
def test_residual_backend_dequantizes_as_the_kernel(request, bits):
    """The GPTQ residual backend calls gptqmodel's dequantization eagerly (not through the
    instance's torch.compile wrapper): the same weight, bit for bit, for every layer."""
    from peft_eora.residual import backend_for

    model = _quantized(_gptq_dir(request, bits), torch.float32)
    with torch.no_grad():
        for name, m in _proj_modules(model).items():
            backend = backend_for(m, name)
            assert backend.name == "gptq"
            w = backend.dequantize(m)
            assert w.dtype == torch.float32
            assert torch.equal(w, m.dequantize_weight().T.float()), name
            x = torch.randn(3, m.in_features)
            torch.testing.assert_close(m(x), x @ w.T.contiguous(), rtol=0, atol=0, msg=name)  # (in, out) as the kernel


def test_compute_dtype(tiny_gptq4_dir):
    """float16 scales, float32 everywhere else: layers compute exactly x @ W in float32."""
    from peft_eora.quantize import load_quantized

    model = load_quantized(tiny_gptq4_dir, dtype=torch.float16, compute_dtype=torch.float32)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scales.dtype == torch.float16
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dequantize_weight().float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 3])
def test_tiny_gptq_close_to_original(request, tiny_original_dir, bits):
    """The quantized weights are a small, named-alike perturbation of the original ones."""
    from transformers import AutoModelForCausalLM

    orig = AutoModelForCausalLM.from_pretrained(tiny_original_dir)
    quant = _quantized(_gptq_dir(request, bits), torch.float32)
    errors = []
    for name, m in _proj_modules(quant).items():
        w = orig.get_submodule(name).weight.detach()
        wq = m.dequantize_weight().T.float()
        errors.append(((w - wq).norm() / w.norm()).item())
    bound = {4: 0.2, 3: 0.4}[bits]
    assert 0 < min(errors) and max(errors) < bound, errors


@pytest.mark.slow
def test_full_original_says_paris():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_eora.embedded import export_original, is_complete, original_dir

    if not is_complete(original_dir()):
        from conftest import _require_embedded

        _require_embedded()
    path = export_original()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_machine_metadata_identifies_the_cpu_stack():
    """Quantized/pruned checkpoints record where they were made (GPTQ is bit-for-bit reproducible
    on one machine, not across CPUs): platform, CPU feature digest, core and thread counts."""
    from peft_eora.quantize.checkpoints import machine_metadata

    meta = machine_metadata()
    assert set(meta) == {"platform", "cpu", "cpu_flags_sha256", "cpu_count", "torch_threads"}
    assert meta["cpu_count"] >= 1 and meta["torch_threads"] >= 1
    if Path("/proc/cpuinfo").is_file():
        assert isinstance(meta["cpu_flags_sha256"], str) and len(meta["cpu_flags_sha256"]) == 16
    json.dumps(meta)  # goes into peft_eora_quantize.json
