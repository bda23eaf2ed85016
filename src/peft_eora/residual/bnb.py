"""bitsandbytes 4-bit layers (``Linear4bit``: NF4 or FP4, optional double quantization).

Recognised by class path, so bitsandbytes is imported only to dequantize. The weight is
``bitsandbytes.functional.dequantize_4bit(weight, quant_state)``, the same call the layer's
forward makes, cast to the layer's ``compute_dtype`` as its matmul does. On CPUs with
AVX512-BF16 the layer repacks its weight on the first forward; that layout is inverted first.
``Linear8bitLt`` (LLM.int8) is not supported: it quantizes the activations too, so no single
weight matrix describes its forward.

    >>> w = BnB4bitBackend().dequantize(model.model.layers[0].mlp.down_proj)   # (576, 1536) float32
"""

from __future__ import annotations

import torch
from torch import nn

INSTALL_HINT = "pip install 'peft-eora[bnb]'"


def _has_base(module: nn.Module, base: str) -> bool:
    return any(c.__module__.startswith("bitsandbytes.") and c.__name__ == base for c in type(module).__mro__)


class BnB4bitBackend:
    name = "bnb-4bit"
    description = "bitsandbytes Linear4bit (NF4/FP4, transformers' BitsAndBytesConfig(load_in_4bit=True))"

    def matches(self, module: nn.Module) -> bool:
        return _has_base(module, "Linear4bit")

    @torch.no_grad()
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        try:
            import bitsandbytes.functional as F
        except ImportError as exc:
            raise ImportError(f"Dequantizing a bitsandbytes layer needs bitsandbytes: {INSTALL_HINT}") from exc
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError("This Linear4bit has no quant_state: its weight was never quantized (move it to a device first).")
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):  # AVX512-BF16 CPU layout: undo it on a copy
            data, state = F._convert_weight_packed_for_cpu_inverse(data.clone(), state)
        w = F.dequantize_4bit(data, state)
        compute_dtype = getattr(module, "compute_dtype", None)
        if compute_dtype is not None:
            w = w.to(compute_dtype)
        shape = (int(module.out_features), int(module.in_features))
        if tuple(w.shape) != shape:
            raise ValueError(f"bitsandbytes dequantized a weight of shape {tuple(w.shape)} for a {shape[1]}→{shape[0]} layer.")
        return w.float().contiguous()
