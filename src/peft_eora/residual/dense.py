"""Dense float layers: pruned (2:4 or unstructured) or fake-quantized bases keep nn.Linear (or, in GPT-2 and
its kin, transformers' ``Conv1D``, whose weight is stored ``(in, out)``: read transposed)."""

from __future__ import annotations

import torch
from torch import nn

from .base import is_conv1d


class DenseBackend:
    name = "dense"
    description = "torch.nn.Linear (or transformers' Conv1D) with a plain float weight: pruned or fake-quantized bases"

    def matches(self, module: nn.Module) -> bool:
        return (isinstance(module, nn.Linear) or is_conv1d(module)) and not _is_quantized(module)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight.detach()
        return weight.T.float().contiguous() if is_conv1d(module) else weight.float()

    def refusal(self, module: nn.Module) -> str | None:
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dtype not in _DENSE_DTYPES:
            return (f"its weight is stored as {weight.dtype} with scales kept elsewhere (e.g. transformers' FP8Linear, "
                    "which also quantizes activations), not a plain float weight; use a weight-only format such as "
                    "torchao Float8WeightOnlyConfig or compressed-tensors W8A16")
        return None


_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_quantized(module: nn.Module) -> bool:
    # bitsandbytes/hqq subclasses of nn.Linear hold packed weights, and torchao (or any other
    # tensor-subclass scheme) keeps nn.Linear but swaps the weight's class: their own back-ends.
    if type(module).__module__.split(".")[0] in {"bitsandbytes", "torchao", "hqq"}:
        return True
    # compressed-tensors keeps nn.Linear and attaches its scheme (a quantizing forward, maybe no weight)
    if hasattr(module, "quantization_scheme"):
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _DENSE_DTYPES:  # float8 codes need their scales
        return True
    return type(weight) not in (torch.Tensor, nn.Parameter)
