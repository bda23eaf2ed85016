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

import copy

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

    def refusal(self, module: nn.Module) -> str | None:
        if _has_base(module, "Linear8bitLt"):
            return ("bitsandbytes LLM.int8 (Linear8bitLt) quantizes the activations too (outlier decomposition), so no "
                    "single weight matrix describes its forward; load in 4 bits (BitsAndBytesConfig(load_in_4bit=True))")
        return None

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
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpack_cpu_layout(F, data, state)
        w = F.dequantize_4bit(data, state)
        compute_dtype = getattr(module, "compute_dtype", None)
        if compute_dtype is not None:
            w = w.to(compute_dtype)
        shape = (int(module.out_features), int(module.in_features))
        if tuple(w.shape) != shape:
            raise ValueError(f"bitsandbytes dequantized a weight of shape {tuple(w.shape)} for a {shape[1]}→{shape[0]} layer.")
        return w.float().contiguous()

    @torch.no_grad()
    def fingerprint_tensors(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The layer's codes and absmax in one canonical layout, whether or not it has repacked.

        bitsandbytes repacks a CPU layer lazily on its first forward (and rewrites its QuantState),
        so the stored tensors of one checkpoint change over time; the base fingerprint hashes
        these instead: 4-bit codes as uint8 in the original order, absmax (double quantization
        undone) rounded to bfloat16 as the packed kernel keeps it.
        """
        import bitsandbytes.functional as F

        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is None:
            return [("weight", weight)]
        if getattr(state, "packing_format_for_cpu", False):
            codes, plain = _unpack_cpu_layout(F, weight.data, state)
            absmax = plain.absmax
        else:
            codes, absmax = weight.data, state.absmax
            if getattr(state, "nested", False):
                absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        codes = codes.contiguous().view(torch.uint8).reshape(-1)
        return [("codes", codes), ("absmax", absmax.float().to(torch.bfloat16).reshape(-1))]


def restore_cpu_layouts(model: nn.Module) -> int:
    """Undo bitsandbytes' AVX512-BF16 CPU repacking of every ``Linear4bit`` in ``model``, correctly.

    ``Linear4bit._save_to_state_dict`` (so any ``model.state_dict()``, hence PEFT's
    ``save_pretrained``) undoes the repacking in place with bitsandbytes' own inverse, which leaves
    a non-nested absmax transposed: afterwards the layer computes garbage (observed on
    bitsandbytes 0.49: loss 2.2 → 21). Restoring the plain layout here first makes that a no-op;
    the next forward repacks again. Returns the number of layers restored.

        >>> restore_cpu_layouts(model); model.save_pretrained("adapter")
    """
    packed = [m for m in model.modules() if _has_base(m, "Linear4bit")
              and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]
    if not packed:
        return 0
    import bitsandbytes.functional as F

    for module in packed:
        state = module.weight.quant_state
        codes, plain = _unpack_cpu_layout(F, module.weight.data, state)
        if getattr(state, "original_storage_type", None):
            codes = codes.view(state.original_storage_type)
        module.weight.data = codes
        module.weight.quant_state = plain
    return len(packed)


def _unpack_cpu_layout(F, data: torch.Tensor, state):
    """Codes and a plain QuantState from bitsandbytes' AVX512-BF16 CPU layout, on copies.

    The layout stores the codes interleaved and the absmax transposed to ``(in/blocksize, out)``
    in bfloat16 (double quantization undone). bitsandbytes' own inverse restores the codes but
    rewrites the state it is given and leaves a non-nested absmax transposed, so only its code
    unpacking is used; the absmax the kernel multiplies by (bfloat16) is un-transposed here.
    """
    plain = copy.copy(state)
    codes, plain = F._convert_weight_packed_for_cpu_inverse(data.clone(), plain)
    plain.absmax = state.absmax.T.reshape(-1).float()
    plain.nested, plain.state2, plain.offset = False, None, None
    plain.dtype = getattr(state, "original_dtype", torch.float32)
    plain.packing_format_for_cpu = False
    if getattr(state, "original_storage_type", None):
        codes = codes.view(torch.uint8)
    return codes, plain
