"""Dense float layers: pruned (2:4 or unstructured) or fake-quantized bases keep nn.Linear."""

from __future__ import annotations

import torch
from torch import nn


class DenseBackend:
    name = "dense"
    description = "torch.nn.Linear with a plain float weight: pruned or fake-quantized bases"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and not _is_quantized(module)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float()


def _is_quantized(module: nn.Module) -> bool:
    # bitsandbytes/hqq subclasses of nn.Linear hold packed weights, and torchao (or any other
    # tensor-subclass scheme) keeps nn.Linear but swaps the weight's class: their own back-ends.
    if type(module).__module__.split(".")[0] in {"bitsandbytes", "torchao", "hqq"}:
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return True
    return type(weight) not in (torch.Tensor, nn.Parameter)
