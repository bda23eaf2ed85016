"""EoRA's LoRA layers: PEFT's, plus mixed-batch inference where PEFT's quantized layers lack it.

Several task adapters on one quantized base can serve one batch, each row with its own adapter::

    >>> model = PeftModel.from_pretrained(qmodel, "eora-c4", adapter_name="c4")
    >>> model.load_adapter("eora-gsm8k", adapter_name="gsm8k")
    >>> model(input_ids=batch, adapter_names=["c4", "gsm8k", "__base__"])   # one adapter per row

PEFT's dense, bitsandbytes and HQQ LoRA layers take ``adapter_names``; its GPTQ and AWQ layers
(``GPTQLoraLinear``, ``AwqLoraLinear``, peft 0.21) do not (``forward(x)`` only). EoRA creates its
layers through :func:`with_mixed_batch`, which gives those two the same forward as PEFT's own
``Linear`` (``LoraLayer._mixed_batch_forward``: the base layer once, then each adapter on its rows).
The classes only add that method, so ``isinstance`` checks against PEFT's classes still hold.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora.awq import AwqLoraLinear
from peft.tuners.lora.gptq import GPTQLoraLinear
from torch import nn


class _MixedBatchForward:
    """``forward(x, adapter_names=[...])``: each row of ``x`` through its own adapter (``"__base__"``: none)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None or self.disable_adapters:
            return super().forward(x, *args, **kwargs)
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows.")
        return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)


class MixedBatchGPTQLoraLinear(_MixedBatchForward, GPTQLoraLinear):
    """PEFT's ``GPTQLoraLinear`` that also takes ``adapter_names``."""


class MixedBatchAwqLoraLinear(_MixedBatchForward, AwqLoraLinear):
    """PEFT's ``AwqLoraLinear`` that also takes ``adapter_names``."""


_MIXED_BATCH = {GPTQLoraLinear: MixedBatchGPTQLoraLinear, AwqLoraLinear: MixedBatchAwqLoraLinear}


def with_mixed_batch(module: nn.Module) -> nn.Module:
    """``module`` itself, its class swapped for the mixed-batch subclass when PEFT's lacks ``adapter_names``.

        >>> layer = with_mixed_batch(LoraModel._create_new_module(config, "default", target))
    """
    upgraded = _MIXED_BATCH.get(type(module))
    if upgraded is not None:
        module.__class__ = upgraded  # the subclass adds a method only: no state to initialise
    return module


def plain_adapter(layer: nn.Module) -> tuple[Optional[str], Optional[str]]:
    """``(reason, adapter)``: ``reason`` is None when the LoRA ``layer`` computes the plain update
    ``s·lora_B(lora_A(x))`` of exactly one active ``adapter`` (not merged into its base, adapters on,
    no DoRA or other variant, ``nn.Linear`` factors, no ``lora_A`` bias), the form the fused op and
    the calibration walks' merged product compute; else why not::

        >>> reason, name = plain_adapter(peft_model.base_model.model.model.layers[0].mlp.down_proj)
    """
    if layer.merged:
        return "adapter weights are merged", None
    if layer.disable_adapters:
        return "adapters are disabled", None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"needs exactly one active LoRA adapter, found {len(active)}", None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}):
        return f"adapter {name!r} uses a LoRA variant ({type(layer.lora_variant[name]).__name__})", None
    if not isinstance(layer.lora_A[name], nn.Linear) or not isinstance(layer.lora_B[name], nn.Linear):
        return f"adapter {name!r} factors are not nn.Linear", None
    if layer.lora_A[name].bias is not None:
        return f"adapter {name!r} lora_A has a bias", None
    return None, name
