"""Layers whose forward computes more than ``x·Wᵀ + b`` with the weight their back-end reads.

EoRA's residual is the back-end's weight against the original's: a layer that also rotates or scales its
input, carries an adapter of its own or repacks what it stores would get factors for the wrong matrix, in
silence. Each such layer is either read as its forward computes (torchao's input pre-scale folded in, a
per-row int8 weight as its kernel multiplies) or refused with the reason. Also: an "original" that is itself
quantized is refused, and our own ``GPTQLinear`` follows its ``g_idx`` however it was written.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from peft_eora.original import ModelMismatchError, OriginalWeights
from peft_eora.residual import UnsupportedModuleError, backend_for


def _forward_error(layer: nn.Module, x: torch.Tensor) -> float:
    """Relative max difference between the layer's forward and ``x·Wᵀ + b`` with its back-end's weight."""
    with torch.no_grad():
        y = layer(x).double()
        backend = backend_for(layer)
        kw = {"dtype": x.dtype} if getattr(backend, "reads_forward", False) else {}  # read for x's dtype
        w = backend.dequantize(layer, **kw).double()
        ref = x.double() @ w.T
        bias = getattr(layer, "bias", None)
        if isinstance(bias, torch.Tensor):
            ref = ref + bias.double()
    return float((y - ref).abs().max() / ref.abs().max())


def _torch_linear(cls_name: str = "TorchLinear", k: int = 128, n: int = 64, bits: int = 4, group: int = 64):
    """A gptqmodel GPTQ layer of class ``cls_name`` holding random packed codes."""
    import importlib

    from peft_eora.kernels.reference import pack_cols, pack_rows, trivial_g_idx

    module = {"TorchLinear": "torch", "TorchAtenLinear": "torch_aten_kernel"}[cls_name]
    cls = getattr(importlib.import_module(f"gptqmodel.nn_modules.qlinear.{module}"), cls_name)
    gen = torch.Generator().manual_seed(0)
    layer = cls(bits=bits, group_size=group, sym=False, desc_act=False, in_features=k, out_features=n, bias=False)
    groups = math.ceil(k / group)
    layer.qweight.copy_(pack_rows(torch.randint(0, 2**bits, (k, n), generator=gen), bits))
    layer.qzeros.copy_(pack_cols(torch.randint(0, 2**bits, (groups, n), generator=gen), bits))
    layer.scales.copy_((torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half())
    layer.g_idx.copy_(trivial_g_idx(k, group))
    return layer.eval()


def test_gptq_layers_with_input_transforms_are_read_through_their_forward_own_adapters_refused():
    """A Hadamard-rotated layer's stored weight is in rotated coordinates: it is read through its forward (the
    ``probe`` back-end), rotation included. A layer carrying gptqmodel's own adapter is refused."""
    pytest.importorskip("gptqmodel", reason="gptqmodel provides the GPTQ layers")
    layer = _torch_linear()
    assert backend_for(layer).name == "gptq" and _forward_error(layer, torch.randn(4, 128)) < 1e-5
    stored = backend_for(layer).dequantize(layer)
    layer.online_full_had, layer.K = True, 1  # what gptqmodel's loader sets for rotation="hadamard" checkpoints
    assert backend_for(layer).name == "probe"
    assert _forward_error(layer, torch.randn(4, 128)) < 1e-5
    assert (backend_for(layer).dequantize(layer, dtype=torch.float32) - stored).abs().max() > 0.1 * stored.abs().max()
    from gptqmodel.adapter.adapter import Lora

    layer = _torch_linear()
    layer.adapter = Lora(rank=8, lora_A=torch.randn(128, 8) * 0.02, lora_B=torch.randn(8, 64) * 0.02)
    with pytest.raises(UnsupportedModuleError, match="carries gptqmodel's own adapter"):
        backend_for(layer)


def test_gptq_kernels_that_repack_in_place_are_read_through_their_forward():
    """``TorchAtenLinear`` (gptqmodel's ``backend="auto"`` on CPU) repacks its buffers on its first half-precision
    forward, after which reading them failed with an unrelated torch error: it is read through its forward. It is
    also the same base as a ``TorchLinear`` load for an adapter's fingerprint, before and after that forward."""
    pytest.importorskip("gptqmodel", reason="gptqmodel provides the GPTQ layers")
    from peft_eora.fingerprint import compute_fingerprint, differences

    aten = _torch_linear("TorchAtenLinear")
    aten.post_init()
    assert backend_for(aten).name == "probe"
    plain = nn.Sequential(_torch_linear("TorchLinear"))
    fp, before = compute_fingerprint(plain), compute_fingerprint(nn.Sequential(aten))
    assert fp.structure == before.structure
    assert differences(fp, before)[0] == []
    aten(torch.randn(2, 128, dtype=torch.bfloat16))  # repacks
    assert aten._cpu_transformed
    after = compute_fingerprint(nn.Sequential(aten))
    # repacked buffers are not the checkpoint's: not compared (version 3), where version 2 called it another base
    assert after.packed_weights == "repacked"
    differ, unchecked = differences(before, after)
    assert differ == [] and any("repacked its buffers" in u for u in unchecked)
    assert differences(compute_fingerprint(nn.Sequential(_torch_linear("TorchAtenLinear")), version=2),
                       compute_fingerprint(nn.Sequential(aten), version=2))[0] == ["packed_weights"]
    assert _forward_error(aten, torch.randn(4, 128, dtype=torch.bfloat16)) < 1e-2


def test_probe_reads_a_kernel_in_the_dtype_it_was_set_up_for():
    """A kernel a bfloat16 forward already repacked (o_proj under forward_dtype autocast) refuses float32 inputs: the
    probe reads it in bfloat16 whatever dtype it is asked for, and a failing forward is one error naming the layer."""
    pytest.importorskip("gptqmodel", reason="gptqmodel provides the GPTQ layers")
    aten = _torch_linear("TorchAtenLinear")
    aten.post_init()
    aten(torch.randn(2, 128, dtype=torch.bfloat16))
    w = backend_for(aten).dequantize(aten, dtype=torch.float32)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert float((aten(x).float() - x.float() @ w.T).norm() / (x.float() @ w.T).norm()) < 8e-3

    class Broken(type(_torch_linear())):
        def forward(self, x):
            raise RuntimeError("kernel exploded")

    broken = _torch_linear()
    broken.__class__ = Broken
    with pytest.raises(UnsupportedModuleError, match="Broken's forward failed on .*kernel exploded.*gptq_torch"):
        backend_for(broken).dequantize(broken, dtype=torch.float32)


def test_paroquant_layers_are_not_read_as_awq():
    """ParoQuant rotates and scales the input before its AWQ-layout kernel: not read from its buffers."""
    pytest.importorskip("gptqmodel", reason="gptqmodel provides the AWQ layers")
    from gptqmodel.nn_modules.qlinear.paroquant import ParoLinear

    layer = ParoLinear(bits=4, group_size=64, sym=True, desc_act=False, in_features=128, out_features=64, bias=False,
                       register_buffers=False)
    with pytest.raises(UnsupportedModuleError, match="through their qweight, which ParoLinear does not hold"):
        backend_for(layer)  # PEFT could not wrap it either
    layer.register_buffer("qweight", torch.zeros(128, 8, dtype=torch.int32))  # as its loader fills it
    assert backend_for(layer).name == "probe"


def test_torchao_input_pre_scale_is_folded_into_the_weight():
    """torchao's AWQ / SmoothQuant keep a weight-only tensor whose linear first multiplies the input by
    ``act_pre_scale``: the weight EoRA reads is ``W·diag(s)``, what the forward computes with."""
    pytest.importorskip("torchao", reason="torchao is an optional extra")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    quantize_(model, Int8WeightOnlyConfig())
    model[0].weight.act_pre_scale = torch.rand(128) * 3 + 0.25
    assert _forward_error(model[0], torch.randn(4, 128)) < 1e-5


def test_torchao_per_row_int8_read_as_its_kernel_multiplies():
    """In bfloat16 the kernel computes ``(x·q)·scale``; ``dequantize()`` rounds each ``q·scale`` to bfloat16, an
    error half the size of a 3-bit residual. The back-end reads ``q·scale`` unrounded."""
    pytest.importorskip("torchao", reason="torchao is an optional extra")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256, bias=False).to(torch.bfloat16))
    quantize_(model, Int8WeightOnlyConfig())
    weight = model[0].weight
    read = backend_for(model[0]).dequantize(model[0])
    assert torch.equal(read, weight.qdata.float() * weight.scale.to(torch.bfloat16).float().reshape(-1, 1))
    assert not torch.equal(read, weight.dequantize().float())  # what was read before: rounded per element


def test_compressed_tensors_rotations_are_refused():
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is an optional extra")
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme, apply_transform_config

    model = nn.Sequential(nn.Linear(64, 32, bias=False))
    apply_transform_config(model, TransformConfig(config_groups={"v": TransformScheme(type="hadamard", apply=[
        TransformArgs(targets=["Linear"], location="weight_input", inverse=True),
        TransformArgs(targets=["Linear"], location="input")])}))
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": QuantizationScheme(targets=["Linear"],
                                                                                             weights=args)}))
    with pytest.raises(UnsupportedModuleError, match="compressed-tensors transform"):
        backend_for(model[0])


def test_an_original_that_is_itself_quantized_is_refused(tmp_path):
    from safetensors.torch import save_file

    weight = torch.randn(96, 64)
    save_file({"model.layers.0.mlp.up_proj.weight": (weight / 0.01).to(torch.float8_e4m3fn),
               "model.layers.0.mlp.up_proj.weight_scale_inv": torch.tensor([[0.01]])},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelMismatchError, match=r"is itself quantized \(model.layers.0.mlp.up_proj.weight \(F8_E4M3\)"):
        OriginalWeights.open(str(tmp_path))
    fp8 = nn.Linear(64, 96, bias=False)
    fp8.weight = nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ModelMismatchError, match="is itself quantized"):
        OriginalWeights.open(nn.Sequential(fp8))


def test_gptqlinear_follows_g_idx_however_it_was_written():
    """Loading through accelerate (``set_module_tensor_to_device``) or a plain buffer copy skipped the state-dict hook
    that kept ``act_order`` in sync: the forward then ignored an act-order ``g_idx`` the residual used."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    from peft_eora.kernels.gptq_linear import GPTQLinear

    torch.manual_seed(0)
    source = GPTQLinear.from_linear(nn.Linear(128, 64), bits=4, group_size=32)
    source.set_g_idx(torch.arange(128).flip(0) // 32)
    assert source.act_order
    with init_empty_weights(include_buffers=True):
        loaded = GPTQLinear(128, 64, bits=4, group_size=32, bias=True)
    for name, tensor in source.state_dict().items():
        set_module_tensor_to_device(loaded, name, "cpu", value=tensor)
    x = torch.randn(4, 128)
    assert loaded.act_order and _forward_error(loaded, x) < 1e-5
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
        loaded.g_idx.copy_(torch.arange(128) // 32)  # written in place: plain order again
    assert not loaded.act_order and _forward_error(loaded, x) < 1e-5
