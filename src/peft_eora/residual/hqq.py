"""HQQ layers (``hqq.core.quantize.HQQLinear``, 1-8 bits, zero point + scale per group).

Recognised by class path; the weight is the layer's own ``dequantize()`` (what its PyTorch
backends multiply by; ``dequantize_aten()`` when the ATen backend is selected), in its
``compute_dtype``.

    >>> w = HQQBackend().dequantize(model.model.layers[0].mlp.down_proj)   # (576, 1536) float32
"""

from __future__ import annotations

import torch
from torch import nn


class HQQBackend:
    name = "hqq"
    description = "hqq HQQLinear (PyTorch or ATen backend; quantize.load_and_quantize(path, 'hqq'))"

    def matches(self, module: nn.Module) -> bool:
        return any(c.__module__.startswith("hqq.") and c.__name__ == "HQQLinear" for c in type(module).__mro__)

    @torch.no_grad()
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        if not getattr(module, "ready", True):
            raise ValueError("This HQQLinear was never quantized (ready=False).")
        backend = getattr(type(module), "backend", None)
        aten = "aten" in str(getattr(backend, "value", backend)).lower()
        w = module.dequantize_aten() if aten else module.dequantize()
        shape = (int(module.out_features), int(module.in_features))
        w = w.reshape(shape) if w.numel() == shape[0] * shape[1] else w
        if tuple(w.shape) != shape:
            raise ValueError(f"HQQ dequantized a weight of shape {tuple(w.shape)} for a {shape[1]}→{shape[0]} layer.")
        return w.float().contiguous()
