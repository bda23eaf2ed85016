"""AWQ layers from gptqmodel (what transformers 5.x loads AWQ checkpoints into), GEMM layout.

The module is recognised by its class path (gptqmodel is never imported here), and the weight
is unpacked from its buffers with the same arithmetic as the kernel's ``dequantize_gemm``::

    qweight (in, out·bits/32) int32, qzeros (in/g, out·bits/32) int32, scales (in/g, out) fp16
    W[i, o] = (q[i, o] − z[i // g, o]) · s[i // g, o]        computed in the scales' dtype

4-bit codes sit eight to a word in AWQ's interleaved order (nibble k holds column
``[0, 2, 4, 6, 1, 3, 5, 7][k]`` of each block of 8); other widths are a little-endian bit
stream along the output dimension. Only kernels that keep this layout in their buffers are
matched (``AwqTorchLinear``, the CPU default of :func:`peft_eora.quantize.load_quantized`,
and the GEMM kernels); Marlin, ExLlama, GEMV and the repacking CPU kernels are read through their forward by
the ``probe`` back-end.

AWQ also *rescales* the float model before quantizing (norm weights divided by per-channel
scales, linear columns multiplied), so the original weights must be brought into the same
coordinates before taking the residual: see :func:`peft_eora.quantize.awq_smoothed_original`.

    >>> w = AWQBackend().dequantize(qmodel.model.layers[0].mlp.down_proj)   # (576, 1536) float32
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .gptq import forward_extras, has_gptqmodel_base

#: Kernels whose ``qweight``/``qzeros``/``scales`` keep the AWQ GEMM checkpoint layout.
GEMM_LAYOUT_KERNELS = frozenset({"AwqTorchLinear", "AwqGEMMLinear", "AwqGEMMTritonLinear"})
_AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Integer codes (rows, count) from AWQ-packed int32 words (rows, ⌈count·bits/32⌉), natural column order."""
    if not 2 <= bits <= 8:
        raise ValueError(f"AWQ packs 2-8 bit codes, got bits={bits}.")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows = words.shape[0]
    if bits == 4:
        shifts = torch.arange(0, 32, 4, device=words.device)
        nibbles = (words[:, :, None] >> shifts) & 0xF  # (rows, words, 8): nibble k of each word
        reverse = torch.tensor(_AWQ_REVERSE_ORDER, device=words.device)
        return nibbles[:, :, reverse].reshape(rows, -1)[:, :count]
    # little-endian bit stream: code i occupies bits [i·bits, (i+1)·bits)
    idx = torch.arange(count, device=words.device)
    start = idx * bits
    word, shift = start // 32, start % 32
    low = words[:, word] >> shift
    spill = (shift + bits > 32) & (word + 1 < words.shape[1])
    high = torch.where(spill, words[:, (word + 1).clamp(max=words.shape[1] - 1)] << (32 - shift), torch.zeros_like(low))
    return (low | high) & ((1 << bits) - 1)


class AWQBackend:
    name = "awq"
    description = (
        "gptqmodel AWQ QuantLinear in the GEMM layout (AwqTorchLinear: load_quantized's CPU default 'torch_awq'; "
        "AwqGEMM/AwqGEMMTriton on GPU); original weights must be AWQ-smoothed (quantize.awq_smoothed_original)"
    )

    def matches(self, module: nn.Module) -> bool:
        # the exact kernel classes: subclasses such as ParoQuant's ParoLinear rotate and scale the input first
        return (has_gptqmodel_base(module, "AWQuantLinear") and type(module).__name__ in GEMM_LAYOUT_KERNELS
                and type(module).__module__.startswith("gptqmodel.") and forward_extras(module) is None)

    @torch.no_grad()
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        bits, out_f, in_f = int(module.bits), int(module.out_features), int(module.in_features)
        group = int(module.group_size) if int(module.group_size) > 0 else in_f
        scales = module.scales
        if in_f % group or scales.shape != (in_f // group, out_f):
            raise ValueError(
                f"AWQ scales of shape {tuple(scales.shape)} do not fit a {in_f}→{out_f} layer with group size {group}."
            )
        q = unpack_awq_codes(module.qweight, bits, out_f)
        z = unpack_awq_codes(module.qzeros, bits, out_f)
        if q.shape != (in_f, out_f) or z.shape != (in_f // group, out_f):
            raise ValueError(f"AWQ qweight/qzeros unpack to {tuple(q.shape)}/{tuple(z.shape)} for a {in_f}→{out_f} layer.")
        diff = (q - z.repeat_interleave(group, dim=0)).to(scales.dtype)
        w = diff * scales.repeat_interleave(group, dim=0)  # rounded in the scales' dtype, as the kernel does
        return w.T.float().contiguous()


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
