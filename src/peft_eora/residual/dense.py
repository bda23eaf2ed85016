"""Dense float layers: pruned (2:4 or unstructured) or fake-quantized bases keep nn.Linear."""

from __future__ import annotations

import torch
from torch import nn


class DenseBackend:
    name = "dense"
    description = "torch.nn.Linear: pruned or fake-quantized float weights"

    def matches(self, module: nn.Module) -> bool:
        return type(module) is nn.Linear or (isinstance(module, nn.Linear) and not _is_quantized(module))

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float()


def _is_quantized(module: nn.Module) -> bool:
    # bitsandbytes/torchao subclasses of nn.Linear hold packed weights; they need their own back-end.
    return type(module).__module__.split(".")[0] in {"bitsandbytes", "torchao", "hqq"}
