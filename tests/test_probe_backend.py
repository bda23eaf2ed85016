"""The ``probe`` back-end: gptqmodel kernels that repack their buffers (Marlin, ExLlama, TorchAtenLinear) or
transform their input are read through their own forward, ``W[:, j] = f(e_j)``, and checked to be linear.

On this CPU the kernels that can run are gptqmodel's ``TorchAtenLinear`` (what ``backend="auto"`` picks for
4-bit layers on a CPU) and subclasses of ``TorchLinear`` standing in for the others: a subclass is not one of
the kernels the ``gptq`` back-end reads from their buffers, so it goes through the probe.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_eora.residual import UnsupportedModuleError, backend_for

pytest.importorskip("gptqmodel", reason="gptqmodel provides the quantized layers")

from test_forward_extras import _torch_linear  # noqa: E402


def _as(layer: nn.Module, cls: type) -> nn.Module:
    layer.__class__ = cls
    return layer


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_repacking_kernel_is_read_as_it_computes(dtype, bound):
    """TorchAtenLinear multiplies by bfloat16-rounded scales on bfloat16 inputs (0.5 % of the weight away from the
    checkpoint's values): the probe reads what it computes for the activations' dtype, to the output's rounding."""
    exact = backend_for(_torch_linear("TorchLinear", k=256, n=128)).dequantize(_torch_linear("TorchLinear", k=256, n=128))
    aten = _torch_linear("TorchAtenLinear", k=256, n=128)
    aten.post_init()
    backend = backend_for(aten)
    assert backend.name == "probe"
    w = backend.dequantize(aten, dtype=dtype)
    x = torch.randn(6, 256).to(dtype)
    with torch.no_grad():
        assert _relative(aten(x), x.float() @ w.T) < bound
    if dtype == torch.float32:
        assert torch.equal(w, exact)  # the float32 path multiplies by the checkpoint's weight: read bit for bit


def test_probe_runs_no_hooks_and_leaves_the_bias_in_place():
    """The walk's covariance hooks must not see the identity; the bias is left out of the read and restored."""
    layer = _as(_torch_linear("TorchLinear", k=128, n=64), type("RepackedLinear", (type(_torch_linear()),), {}))
    layer.bias = nn.Parameter(torch.randn(64))
    bias = layer.bias
    layer.register_forward_pre_hook(lambda *_: pytest.fail("the probe ran a forward hook"))
    backend = backend_for(layer)
    assert backend.name == "probe"
    w = backend.dequantize(layer, dtype=torch.float32)
    assert layer.bias is bias
    plain = _torch_linear("TorchLinear", k=128, n=64)
    assert torch.equal(w, backend_for(plain).dequantize(plain))


def _fake_quantized_input(kind: str) -> type:
    base = type(_torch_linear())

    def forward(self, x):
        if kind == "int8":  # per-token symmetric int8, as W8A8 kernels quantize
            s = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
            x = (x / s).round().clamp(-127, 127) * s
        else:  # per-token FP8 e4m3
            s = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 448
            x = (x / s).to(torch.float8_e4m3fn).to(x.dtype) * s
        return base.forward(self, x)

    return type(f"Activation{kind}Linear", (base,), {"forward": forward})


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_that_quantize_activations_fail_the_linearity_check(kind, dtype):
    """Unit rows quantize exactly, so the identity alone would read a weight: the heavy-tailed check batch shows the
    forward is not ``x·Wᵀ`` (per-token int8 2.6 %, FP8 2.1 % here against the 1 % allowed; TorchAtenLinear's bfloat16
    rounding is 0.24 %)."""
    layer = _as(_torch_linear("TorchLinear", k=256, n=128), _fake_quantized_input(kind))
    with pytest.raises(UnsupportedModuleError, match="is not x·Wᵀ for one matrix W"):
        backend_for(layer).dequantize(layer, dtype=dtype)


def test_known_activation_quantizing_kernels_are_refused_up_front():
    from gptqmodel.nn_modules.qlinear.qqq import QQQTorchLinear

    layer = QQQTorchLinear(bits=4, group_size=128, sym=True, desc_act=False, in_features=256, out_features=128,
                           bias=False)
    with pytest.raises(UnsupportedModuleError, match="QQQTorchLinear quantizes the activations too"):
        backend_for(layer)


@pytest.mark.slow
def test_eora_through_the_probe_equals_the_exact_read(tiny_gptq4_dir, tiny_original_dir):
    """A GPTQ model whose layers are read through their forward gets the same factors, bit for bit, as one read from
    its buffers (float32 activations: the probe's identity products are exact), through get_peft_model."""
    from peft import get_peft_model

    from peft_eora import CalibrationConfig, EoRAConfig
    from peft_eora.quantize import load_quantized

    def model(probed: bool):
        qmodel = load_quantized(tiny_gptq4_dir, dtype=torch.float16, compute_dtype=torch.float32)
        if probed:
            cls = type("MarlinLikeLinear", (type(qmodel.model.layers[0].mlp.down_proj),), {})
            for m in qmodel.modules():
                if type(m).__name__ == "TorchLinear":
                    m.__class__ = cls
        calib = CalibrationConfig(dataset="builtin:c4", num_samples=4, seq_len=128)
        return get_peft_model(qmodel, EoRAConfig(r=16, damping=0.01, original_model=str(tiny_original_dir),
                                                  calibration=calib))

    exact, probed = model(False), model(True)
    layers = [m for m in probed.modules() if type(getattr(m, "base_layer", None)).__name__ == "MarlinLikeLinear"]
    assert len(layers) == 14
    assert {backend_for(m.base_layer).name for m in layers} == {"probe"}
    a, b = exact.state_dict(), probed.state_dict()
    keys = [k for k in a if "lora_" in k]
    assert keys and all(torch.equal(a[k], b[k]) for k in keys)
