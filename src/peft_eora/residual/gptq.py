"""GPTQ layers from gptqmodel (what transformers 5.x loads GPTQ checkpoints into), and this
package's own :class:`~peft_eora.kernels.gptq_linear.GPTQLinear` (same packed layout).

gptqmodel modules are recognised by their class path, so gptqmodel is never imported here;
their own ``dequantize_weight()`` gives the weight their kernel uses (``(in, out)``,
transposed here), called eagerly (see :func:`_eager_dequantize_weight`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def has_gptqmodel_base(module: nn.Module, base: str) -> bool:
    """True if ``module`` derives from gptqmodel's class named ``base`` (checked without importing it)."""
    return any(c.__module__.startswith("gptqmodel.") and c.__name__ == base for c in type(module).__mro__)


def _eager_dequantize_weight(module: nn.Module) -> torch.Tensor:
    """gptqmodel's ``dequantize_weight`` of ``module``, run eagerly.

    ``TorchLinear.optimize()`` replaces the instance's ``dequantize_weight`` with a
    ``torch.compile`` wrapper whose guards differ per layer shape; dequantizing every layer of a
    model through it recompiles until dynamo's recompile limit (~15 s of a 135M model's 100 s EoRA
    run on 2 CPU cores). The class's method is the same arithmetic (the same values, checked in
    ``tests/test_fixtures.py``) at ~1 ms per layer.
    """
    method = getattr(type(module), "dequantize_weight", None)
    return method(module) if callable(method) else module.dequantize_weight()


#: gptqmodel GPTQ kernels whose ``dequantize_weight()`` is checked to be what their forward multiplies by, at any
#: time; others (which repack their buffers, at load or on the first forward) are read through their forward by the
#: ``probe`` back-end
GPTQ_KERNELS = frozenset({"TorchLinear", "TorchCpuAvx512Linear", "TorchInt8Linear", "TritonV2Linear"})


def forward_extras(module: nn.Module) -> str | None:
    """Why a gptqmodel layer's forward computes more than ``x·Wᵀ + b`` with its stored weight (an online Hadamard
    rotation of its input, a gptqmodel adapter of its own), or None. Such layers are not read from their buffers
    (a rotated one is read through its forward by the ``probe`` back-end; one with its own adapter is refused)."""
    if getattr(module, "online_full_had", False) or getattr(module, "online_partial_had", False) or (
        getattr(module, "had_K", None) is not None
    ):
        return ("it rotates its input online (a checkpoint quantized with rotation='hadamard'), so its weight alone "
                "does not describe its forward")
    return own_adapter(module)


def own_adapter(module: nn.Module) -> str | None:
    """Why a gptqmodel layer carrying an adapter of its own is refused, or None (no adapter)."""
    if getattr(module, "adapter", None) is not None:
        return ("it carries gptqmodel's own adapter (loaded with GPTQModel.load(..., adapter=...)); load the model "
                "without it")
    return None


class GPTQBackend:
    name = "gptq"
    reads_forward = True  # dequantize takes the activations' dtype (the forward rounds the weight to it)
    description = (f"gptqmodel GPTQ QuantLinear ({', '.join(sorted(GPTQ_KERNELS))}: load_quantized's CPU default "
                   "'gptq_torch', 'triton' on GPU) or peft_eora GPTQLinear")

    def matches(self, module: nn.Module) -> bool:
        from ..kernels.gptq_linear import GPTQLinear

        if isinstance(module, GPTQLinear):
            return True
        return (type(module).__name__ in GPTQ_KERNELS and has_gptqmodel_base(module, "GPTQQuantLinear")
                and hasattr(module, "dequantize_weight") and forward_extras(module) is None)

    @torch.no_grad()
    def dequantize(self, module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``(out, in)`` float32, as the forward computes with it on ``dtype`` activations: gptqmodel's kernels cast the
        dequantized weight to the activations' dtype (a bfloat16 model's float16 weight is rounded again)."""
        from ..kernels.gptq_linear import GPTQLinear

        if isinstance(module, GPTQLinear):
            return module.dequantize(dtype)
        w = _eager_dequantize_weight(module)
        if dtype is not None and dtype.is_floating_point and dtype != w.dtype and w.dtype != torch.float32:
            w = w.to(dtype)
        w = w.T  # gptqmodel returns (in, out)
        out_f, in_f = module.out_features, module.in_features
        if w.shape != (out_f, in_f):
            raise ValueError(
                f"gptqmodel returned a dequantized weight of shape {tuple(w.shape)} for a {in_f}→{out_f} layer."
            )
        return w.float().contiguous()
