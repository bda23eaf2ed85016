"""Residual back-ends: one small module per compression format, in a registry.

A back-end recognises its module type and returns the weight *exactly as its kernel computes
it* (dequantized, out × in, float32), so that ``ΔW = W_original − W_compressed`` is the error the
adapter must compensate::

    >>> from peft_eora.residual import backend_for
    >>> backend = backend_for(module)          # raises UnsupportedModuleError listing formats
    >>> w_q = backend.dequantize(module)       # (out_features, in_features), float32

Register a new format with :func:`register_backend`.
"""

from __future__ import annotations

from .base import ResidualBackend, UnsupportedModuleError, backend_for, is_supported, register_backend, registered
from .dense import DenseBackend
from .gptq import GPTQBackend

register_backend(GPTQBackend())
register_backend(DenseBackend())

__all__ = [
    "ResidualBackend",
    "UnsupportedModuleError",
    "backend_for",
    "is_supported",
    "register_backend",
    "registered",
]
