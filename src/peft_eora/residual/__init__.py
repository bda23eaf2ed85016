"""Residual back-ends: one small module per compression format, in a registry.

A back-end recognises its module type and returns the weight *exactly as its kernel computes
it* (dequantized, out × in, float32), so that ``ΔW = W_original − W_compressed`` is the error the
adapter must compensate::

    >>> from peft_eora.residual import backend_for
    >>> backend = backend_for(module)          # raises UnsupportedModuleError listing formats
    >>> w_q = backend.dequantize(module)       # (out_features, in_features), float32

Registered formats: GPTQ and AWQ (gptqmodel), bitsandbytes 4-bit, HQQ, torchao weight-only,
compressed-tensors weight-only (llm-compressor / vLLM checkpoints), any other gptqmodel kernel (Marlin, ExLlama,
...: read through its forward, ``probe``), and dense float layers (pruned or fake-quantized). Back-ends recognise modules by class path:
none of these libraries is imported until a layer of its kind is dequantized. Register a new
format with :func:`register_backend`.
"""

from __future__ import annotations

from .awq import AWQBackend
from .base import (
    ResidualBackend,
    UnsupportedModuleError,
    backend_for,
    is_supported,
    prepare_model,
    register_backend,
    registered,
)
from .bnb import BnB4bitBackend
from .compressed_tensors import CompressedTensorsBackend
from .dense import DenseBackend
from .gptq import GPTQBackend
from .hqq import HQQBackend
from .probe import ProbeBackend
from .torchao import TorchAOBackend

register_backend(GPTQBackend())
register_backend(AWQBackend())
register_backend(BnB4bitBackend())
register_backend(HQQBackend())
register_backend(TorchAOBackend())
register_backend(CompressedTensorsBackend())
register_backend(ProbeBackend())  # gptqmodel kernels the two above do not read from their buffers
register_backend(DenseBackend())  # last: a plain nn.Linear check

__all__ = [
    "ResidualBackend",
    "UnsupportedModuleError",
    "backend_for",
    "is_supported",
    "prepare_model",
    "register_backend",
    "registered",
]
