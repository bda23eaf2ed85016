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

from typing import Any

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
