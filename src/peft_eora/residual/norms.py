"""The norm check between an original and its compressed model: norms are never compressed, so an original whose
norm weights differ is another model, or the compressed model was smoothed (AWQ, SmoothQuant) and the original is
not in its coordinates. Every residual back-end relies on it; :mod:`peft_eora.model` runs it before computing.

    >>> check_original_norms(qmodel, OriginalWeights.open("HuggingFaceTB/SmolLM2-135M-Instruct"))   # or raises
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .gptq import has_gptqmodel_base

#: a norm of the original differing from the AWQ model's by more than this (per channel, relative to the channel or
#: to 1 % of the norm's largest weight, whichever is larger) is not in the AWQ model's coordinates
NORM_TOLERANCE = 1e-2


def norm_tolerance(dtype: torch.dtype) -> float:
    """:data:`NORM_TOLERANCE`, or four roundings of ``dtype`` where that is coarser (bfloat16: 3 %)."""
    return max(NORM_TOLERANCE, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point else NORM_TOLERANCE


def norm_gap(base: torch.Tensor, original: torch.Tensor, plus_one: Optional[bool] = None) -> float:
    """How far two norm weights are apart: the largest per-channel difference relative to the channel (floored at 1 %
    of the largest weight). ``plus_one``: the norm multiplies by ``1 + w`` (Gemma), so ``1 + w`` is compared (a
    channel near 0 rounded by an in-place ``(γ / s) − 1`` in half precision is no large change); None: whichever
    reading is closer (lenient, for checkpoint files without the module)."""
    b, o = base.detach().float().cpu(), original.detach().float().cpu()
    if not b.numel():
        return 0.0

    def gap(x: torch.Tensor, y: torch.Tensor) -> float:
        floor = 1e-2 * float(torch.maximum(x.abs().max(), y.abs().max()).clamp_min(1e-12))
        return float(((x - y).abs() / torch.maximum(torch.maximum(x.abs(), y.abs()), torch.tensor(floor))).max())

    if plus_one is None:
        return min(gap(b, o), gap(b + 1, o + 1))
    return gap(b + 1, o + 1) if plus_one else gap(b, o)


def _multiplies_one_plus(module: nn.Module, weight: torch.Tensor) -> bool:
    """Whether norm ``module`` scales by ``1 + weight`` (Gemma's RMSNorm) rather than ``weight``: its output on a row of
    ones (an RMS norm of ones is ones) tells."""
    try:
        with torch.no_grad():
            y = module(torch.ones(1, weight.numel(), dtype=weight.dtype, device=weight.device)).float().reshape(-1)
    except Exception:  # noqa: BLE001 - a norm that takes no such input: read as plain
        return False
    w = weight.detach().float().reshape(-1).to(y.device)
    return bool(torch.allclose(y, 1 + w, rtol=1e-2, atol=1e-2)) and not bool(torch.allclose(y, w, rtol=1e-2, atol=1e-2))


def check_original_norms(model: nn.Module, original: object) -> None:
    """Refuse an original whose norm weights differ from the compressed model's. No compression format quantizes
    norms, so they match to rounding unless the original is another model (another fine-tune, the base model of an
    instruct one) or the compressed model was smoothed: AWQ (gptqmodel's, llm-compressor's) and SmoothQuant divide
    the norms (and scale the linears' columns) by per-channel scales, so ``W_original − W_compressed`` is only the
    compression residual once the original is in the compressed model's coordinates
    (:func:`peft_eora.quantize.awq_smoothed_original`). ``original``: an :class:`~peft_eora.original.OriginalWeights`."""
    from ..original import ModelMismatchError

    awq = any(has_gptqmodel_base(m, "AWQuantLinear") for m in model.modules())
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if ("norm" not in type(module).__name__.lower() or not isinstance(weight, torch.Tensor) or weight.dim() != 1
                or original.shape(name) != tuple(weight.shape)):
            continue
        if weight.device.type == "meta":  # offloaded by accelerate: its hook holds the values
            if getattr(module, "_hf_hook", None) is None:
                continue
            from accelerate.utils import align_module_device

            with align_module_device(module, torch.device("cpu")):
                weight = module.weight.detach().clone()
                plus_one = _multiplies_one_plus(module, weight)
            if weight.device.type == "meta":
                continue
        else:
            plus_one = _multiplies_one_plus(module, weight)
        gap = norm_gap(weight, original.get(name), plus_one)
        if gap <= norm_tolerance(weight.dtype):
            continue
        if awq:
            raise ModelMismatchError(
                f"The original's {original.resolve(name)} differs from the AWQ model's by up to {gap:.0%} per channel: "
                "AWQ divided the norms by its smoothing scales, so the residual against this original would be wrong. "
                "Pass the original in the AWQ model's coordinates: original_model=str(peft_eora.quantize."
                "awq_smoothed_original(awq_checkpoint, original)) (it recovers the scales of checkpoints made "
                "elsewhere; the CLI does this itself)."
            )
        raise ModelMismatchError(
            f"The original's {original.resolve(name)} differs from the compressed model's by up to {gap:.0%} per "
            "channel. Norms are never compressed, so the residual against this original would be wrong: either it is "
            "not the checkpoint the compressed model was made from (another fine-tune, or the base model of an "
            "instruct one), or the compressed model was smoothed (AWQ, SmoothQuant: its norms divided by per-channel "
            "scales). Pass the uncompressed checkpoint it was made from, in the compressed model's coordinates where "
            "it was smoothed: for gptqmodel/AutoAWQ checkpoints peft_eora.quantize.awq_smoothed_original makes it; "
            "for llm-compressor's (compressed-tensors) AWQ or SmoothQuant, save the smoothed float model before "
            "quantizing (peft-eora cannot recover those scales)."
        )
