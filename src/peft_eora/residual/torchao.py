"""torchao weight-only layers: an ``nn.Linear`` whose ``weight`` is a torchao tensor subclass.

Recognised by the weight's class path (torchao is never imported here). The weight is the
tensor's own ``dequantize()``, what its weight-only ``F.linear`` computes with: CPU layouts
``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``, int1-8 per group), ``Int8Tensor``
(``Int8WeightOnlyConfig``) and ``Float8Tensor`` (``Float8WeightOnlyConfig``: float8 e4m3, a
scale per row); the CUDA int4 layouts dequantize the same way. A per-row ``Int8Tensor`` is read
as its kernel computes, ``q·scale`` (``dequantize()`` rounds each product to the model dtype), and an
input pre-scale (``act_pre_scale``: torchao's AWQ and SmoothQuant) is folded into the weight's
columns. Subclasses that also quantize the *activations* (dynamic-activation configs) are not
matched: no single weight matrix describes their forward.

    >>> w = TorchAOBackend().dequantize(model.model.layers[0].mlp.down_proj)   # (576, 1536) float32
"""

from __future__ import annotations

import torch
from torch import nn


def is_torchao_tensor(t: object) -> bool:
    return any(c.__module__.startswith("torchao.") for c in type(t).__mro__[:-1])


def quantizes_activations(weight: object) -> bool:
    """True for torchao tensors whose linear also quantizes its input (dynamic activation quantization)."""
    for attr in ("act_quant_kwargs", "activation_quantization", "input_quant_func"):
        if getattr(weight, attr, None) not in (None, False):
            return True
    return type(weight).__name__ in {"LinearActivationQuantizedTensor", "WeightTensorWithLinearActivationScaleMetadata"}


class TorchAOBackend:
    name = "torchao"
    description = ("torchao weight-only tensor subclass on nn.Linear (IntxWeightOnlyConfig, Int8WeightOnlyConfig, "
                   "Float8WeightOnlyConfig, ...)")

    def matches(self, module: nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return isinstance(module, nn.Linear) and is_torchao_tensor(weight) and not quantizes_activations(weight)

    def refusal(self, module: nn.Module) -> str | None:
        weight = getattr(module, "weight", None)
        if is_torchao_tensor(weight) and quantizes_activations(weight):
            return (f"torchao {type(weight).__name__} quantizes the activations too (a dynamic-activation config), so no "
                    "single weight matrix describes its forward; quantize weight-only (e.g. IntxWeightOnlyConfig)")
        return None

    @torch.no_grad()
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        shape = (int(module.out_features), int(module.in_features))
        w = _per_row_int8(weight, shape[0])
        if w is None:
            w = weight.dequantize().float()
        if tuple(w.shape) != shape:
            raise ValueError(f"torchao dequantized a weight of shape {tuple(w.shape)} for a {shape[1]}→{shape[0]} layer.")
        pre_scale = getattr(weight, "act_pre_scale", None)
        if isinstance(pre_scale, torch.Tensor):  # AWQ / SmoothQuant: the forward computes (x·s)·Wᵀ = x·(W·diag(s))ᵀ
            w = w * pre_scale.detach().float().reshape(1, -1).to(w.device)
        return w.contiguous()


def _per_row_int8(weight: object, rows: int) -> torch.Tensor | None:
    """For a per-row ``Int8Tensor``, the weight its kernel computes with, ``q·scale`` with the scale in the tensor's
    dtype and no per-element rounding (``dequantize()`` rounds every ``q·scale`` to that dtype: in bfloat16 half the
    size of a 3-bit residual); None for other tensors."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    if type(weight).__name__ != "Int8Tensor" or not isinstance(qdata, torch.Tensor) or not isinstance(scale, torch.Tensor):
        return None
    if scale.numel() != rows or qdata.dim() != 2:
        return None
    dtype = getattr(weight, "dtype", torch.float32)
    return qdata.float() * scale.detach().to(dtype).float().reshape(-1, 1)
