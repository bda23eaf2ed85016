"""Compensated layers forward as one dense product while a CPU block visit lasts.

During a visit, a compensated layer ``y = base(x) + s·B·(A·x)`` is run by every calibration batch
that passes it. On a CPU in float32 its three products (and, for quantized bases, a dequantization
per call) cost more than one: with the dense weight ``W = W_compressed + s·B·A`` at hand — the
residual step has just dequantized ``W_compressed`` — the layer is ``F.linear(x, W, bias)``.
The same map, rounded once instead of three times (float32, relative ~1e-7)::

    >>> with MergedForwards(adapter_name, lora_layers, enabled=visit.device.type == "cpu") as merged:
    ...     merged.add(layer, w_compressed)     # after its factors are installed
    ...     block(hidden)                      # `layer` runs as one product
    >>> # on exit the layer's own forward is back and the dense weights are gone

A merged layer falls back to its own forward whenever the merged product would not be what it
computes: other arguments, adapters disabled or switched, autocast on, another dtype or device, or
its factors changed after :meth:`MergedForwards.add` (a ``lora_B`` bias joins the output bias). Layers whose ``forward`` is already replaced
on the instance (accelerate hooks) and layers with another kind of update (DoRA) are left alone.
Kept off on GPUs (their memory goes to the covariances; the low-rank products there are small
against the base kernel). Measured on SmolLM2-135M, GPTQ 3-bit r=64, 2-core CPU: the walk's block
forwards ~20 % shorter, the EoRA step 117.6 s against gptqmodel's 165.9 s (README "Measured").
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layer import plain_adapter

#: False: CPU walks keep every layer's own forward too (``benchmarks/scale.py --per-group-forwards``
#: sets it to count the tensors of a walk as a GPU runs it).
ENABLED = True


class MergedForwards:
    """Context manager over one block visit: :meth:`add` makes a compensated LoRA layer forward as
    one dense product until the context ends (see the module doc). ``layers``: the visit's LoRA
    layers; each gets its routing forward on entry, before any batch runs, so a layer merged while
    a batch is parked in its own pre-hook already runs merged in that call."""

    def __init__(self, adapter_name: str, layers: list[nn.Module], enabled: bool = True) -> None:
        self.adapter_name = adapter_name
        self.enabled = enabled
        self._candidates = layers if enabled else []
        self._wrapped: dict[int, nn.Module] = {}  # id(layer) → layer
        self._merged: dict[int, tuple[torch.Tensor, Optional[torch.Tensor], tuple[int, ...]]] = {}

    def __enter__(self) -> "MergedForwards":
        for layer in self._candidates:
            if "forward" not in vars(layer) and self._plain_lora(layer):  # accelerate's hooks: left alone
                layer.forward = self._router(layer)
                self._wrapped[id(layer)] = layer
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _versions(self, layer: nn.Module) -> tuple[int, ...]:
        """In-place edit counters of the adapter's tensors (a changed one makes the merged weight stale)."""
        name = self.adapter_name
        params = (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.lora_B[name].bias)
        return tuple(p._version for p in params if p is not None)

    def _router(self, layer: nn.Module) -> Callable[..., torch.Tensor]:
        own_forward = layer.forward
        name, merged = self.adapter_name, self._merged

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            entry = merged.get(id(layer))
            if entry is not None and not args and not kwargs:
                weight, bias, versions = entry
                if (x.dtype == weight.dtype and x.device == weight.device and not layer.disable_adapters
                        and not torch.is_autocast_enabled(x.device.type) and layer.active_adapters == [name]
                        and self._versions(layer) == versions):
                    return F.linear(x, weight, bias)
            return own_forward(x, *args, **kwargs)

        return forward

    def add(self, layer: nn.Module, w_compressed: torch.Tensor) -> bool:
        """Merge ``layer`` (its ``adapter_name`` factors installed) over ``w_compressed`` (out × in,
        its base weight as the kernel computes it). Returns whether the layer now runs merged."""
        if id(layer) not in self._wrapped:
            return False
        lora_A, lora_B = layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name]
        scaling = layer.scaling[self.adapter_name]
        if w_compressed.dtype != torch.float32 or lora_A.weight.device != w_compressed.device:
            return False
        bias = getattr(layer.get_base_layer(), "bias", None)
        if isinstance(bias, torch.Tensor) and bias.device.type == "meta":
            return False  # offloaded by accelerate: only the layer's own forward loads it
        bias = bias.detach().to(w_compressed.device, torch.float32) if isinstance(bias, torch.Tensor) else None
        if lora_B.bias is not None:  # lora_bias=True: s·b_B joins the output bias
            lora_bias = lora_B.bias.detach().float() * scaling
            bias = lora_bias if bias is None else bias + lora_bias
        weight = torch.addmm(w_compressed, lora_B.weight.float(), lora_A.weight.float(), alpha=scaling)
        self._merged[id(layer)] = (weight, bias, self._versions(layer))
        return True

    def _plain_lora(self, layer: nn.Module) -> bool:
        """``layer``'s update is the plain ``s·B·A`` of this adapter (:func:`peft_eora.layer.plain_adapter`)
        with no dropout at work."""
        reason, name = plain_adapter(layer) if hasattr(layer, "lora_A") else ("not a LoRA layer", None)
        if reason is not None or name != self.adapter_name:
            return False
        dropout = layer.lora_dropout[name]
        return not (dropout.training and isinstance(dropout, nn.Dropout) and dropout.p > 0)

    def close(self) -> None:
        """Give every wrapped layer its own forward back (and free the dense weights)."""
        for layer in self._wrapped.values():
            vars(layer).pop("forward", None)
        self._wrapped.clear()
        self._merged.clear()
