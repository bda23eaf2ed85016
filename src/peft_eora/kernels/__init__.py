"""Fused GPTQ + low-rank kernels: CUDA (JIT-built), Triton fallback, pure-torch reference.

    >>> from peft_eora import kernels
    >>> y = kernels.gptq_lora_linear(x, qweight, qzeros, scales, g_idx, bias, A, B, None, None,
    ...                              bits=4, group_size=128, scaling=2.0)  # doctest: +SKIP

Importing this package registers the ``torch.ops.peft_eora.gptq_lora_linear`` custom op.
Triton is imported lazily, only when its kernel is used.
"""

from __future__ import annotations

from . import cuda_ext, lowbit, reference
from .lowbit import (
    LowBitTensor,
    dequantize_per_channel,
    pack_int4,
    quantize_lora_pair,
    quantize_per_channel,
    unpack_int4,
)
from .ops import BACKENDS, gptq_lora_linear, select_backend
from .reference import (
    SUPPORTED_BITS,
    dequantize_gptq,
    gptq_lora_linear_reference,
    pack_cols,
    pack_rows,
    trivial_g_idx,
    unpack_cols,
    unpack_rows,
)

__all__ = [
    "BACKENDS",
    "SUPPORTED_BITS",
    "LowBitTensor",
    "cuda_ext",
    "dequantize_gptq",
    "dequantize_per_channel",
    "gptq_lora_linear",
    "gptq_lora_linear_reference",
    "lowbit",
    "pack_cols",
    "pack_int4",
    "pack_rows",
    "quantize_lora_pair",
    "quantize_per_channel",
    "reference",
    "select_backend",
    "trivial_g_idx",
    "unpack_cols",
    "unpack_int4",
    "unpack_rows",
]
