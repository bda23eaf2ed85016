"""torchao weight-only layers: an ``nn.Linear`` whose ``weight`` is a torchao tensor subclass.

Recognised by the weight's class path (torchao is never imported here). The weight is the
tensor's own ``dequantize()``, what its weight-only ``F.linear`` computes with: CPU layouts
``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``, int1-8 per group), ``Int8Tensor``
(``Int8WeightOnlyConfig``) and ``Float8Tensor`` (``Float8WeightOnlyConfig``: float8 e4m3, a
scale per row); the CUDA int4 layouts dequantize the same way. Subclasses that also
quantize the *activations* (dynamic-activation configs) are not matched: no single weight
matrix describes their forward.

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
        w = module.weight.dequantize()
        shape = (int(module.out_features), int(module.in_features))
        if tuple(w.shape) != shape:
            raise ValueError(f"torchao dequantized a weight of shape {tuple(w.shape)} for a {shape[1]}→{shape[0]} layer.")
        return w.float().contiguous()
