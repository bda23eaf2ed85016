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
