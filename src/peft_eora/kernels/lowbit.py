"""int8 / int4 storage for EoRA factors: symmetric, float32 scales per row or per row and group.

``A`` is ``(r, in)`` and ``B`` is ``(out, r)`` (``nn.Linear`` layout), so "per channel" means
one scale per rank direction for ``A`` and one per output feature for ``B``. Codes are
symmetric (``[-127, 127]`` for int8, ``[-7, 7]`` for int4, no zero point). int4 codes are packed
two per byte along the last dimension, the even column in the low nibble, two's complement.
With ``group_size`` g, a row has one scale per g consecutive columns (``scale`` is
``(rows, cols / g)``): int4 ``A`` uses g = 16 (:data:`INT4_A_GROUP`), because EoRA's ``A`` holds
entries of very different sizes along a row (small where activations are large), which one
scale per row rounds away — measured on SmolLM2-135M, 3-bit r = 128: +10.6 % WikiText-2
perplexity with per-row int4 ``A``, +1.1 % with groups of 32 (``B`` per row costs +0.4 %), both
rounded entry by entry; with the fitted rounding of :mod:`peft_eora.factor_quant`, groups of 16
lose 0.74 % of the uncompensated held-out layer error against 0.86 % with 32 (scales: half of
``A``'s int4 bytes). Adapters saved with groups of 32 (or one scale per row) keep their grid
(:func:`factor_grid`). int8
``A`` uses g = 64 (:data:`INT8_A_GROUP`): with value projections weighted by attention, per-row
int8 ``A`` cost +0.23 % / +0.56 % WikiText-2 / GSM8K perplexity there, groups of 64 +0.03 % / +0.06 %
(scales: 1/16 of ``A``'s int8 bytes).
This is the format the fused kernels read (``lora_bits`` 8 or 4; a 2-D ``lora_a_scale`` is grouped).

    >>> import torch
    >>> from peft_eora.kernels.lowbit import quantize_per_channel, dequantize_per_channel
    >>> w = torch.randn(8, 64)
    >>> q = quantize_per_channel(w, bits=8)
    >>> q.data.dtype, q.scale.shape
    (torch.int8, torch.Size([8]))
    >>> bool(((dequantize_per_channel(q) - w).abs() <= q.scale.view(-1, 1) / 2 + 1e-7).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "INT4_A_GROUP",
    "INT8_A_GROUP",
    "LOWBIT_BITS",
    "factor_group_size",
    "factor_grid",
    "grid_values",
    "LowBitTensor",
    "pack_int4",
    "unpack_int4",
    "quantize_per_channel",
    "dequantize_per_channel",
    "quantize_lora_pair",
]

#: Storage widths supported for quantized LoRA factors.
LOWBIT_BITS: tuple[int, ...] = (8, 4)
#: Columns per scale of int4 ``lora_A`` factors (0: one scale per row).
INT4_A_GROUP = 16
#: Groups of ``lora_A`` used by earlier versions, per width (besides one scale per row): an adapter
#: saved on one of these grids is stored on it again rather than rounded a second time.
EARLIER_A_GROUPS: dict[int, tuple[int, ...]] = {4: (32,), 8: ()}
#: Columns per scale of int8 ``lora_A`` factors (0: one scale per row).
INT8_A_GROUP = 64


@dataclass(frozen=True)
class LowBitTensor:
    """A quantized 2-D factor: ``data`` (int8 codes, or uint8 packed int4), ``scale`` float32
    ``(rows,)``, or ``(rows, cols / group_size)`` when ``group_size`` > 0."""

    data: torch.Tensor
    scale: torch.Tensor
    bits: int
    shape: tuple[int, int]
    group_size: int = 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float tensor of ``shape``."""
        return dequantize_per_channel(self, dtype)

    def to(self, device: torch.device | str) -> "LowBitTensor":
        """Copy to ``device``."""
        return LowBitTensor(self.data.to(device), self.scale.to(device), self.bits, self.shape, self.group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes in ``[-8, 7]`` of shape ``(rows, cols)`` into uint8 ``(rows, ceil(cols/2))``."""
    if codes.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D tensor, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < -8 or int(c.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    if c.shape[1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    nib = c & 0xF
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes ``(rows, cols)``."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    out = torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)[:, :cols]
    return torch.where(out >= 8, out - 16, out).to(torch.int8)


def quantize_per_channel(w: torch.Tensor, bits: int = 8, group_size: int = 0) -> LowBitTensor:
    """Symmetric quantization of a 2-D float tensor to int8 (``bits=8``) or int4 (``bits=4``):
    one scale per row, or per row and ``group_size`` consecutive columns (``cols % group_size == 0``)."""
    if bits not in LOWBIT_BITS:
        raise ValueError(f"unsupported adapter bits={bits}: expected one of {LOWBIT_BITS}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D factor, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    if group_size and (group_size < 0 or cols % group_size):
        raise ValueError(f"group_size={group_size} must divide the {cols} columns")
    g = group_size if group_size else cols
    qmax = (1 << (bits - 1)) - 1
    wf = w.detach().to(torch.float32).reshape(rows, cols // g if cols else 0, g)
    absmax = wf.abs().amax(dim=2) if cols else torch.zeros(rows, 0)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    codes = torch.clamp(torch.round(wf / scale.unsqueeze(-1)), -qmax, qmax).reshape(rows, cols)
    data = codes.to(torch.int8) if bits == 8 else pack_int4(codes)
    scale = scale.reshape(rows) if not group_size else scale
    return LowBitTensor(data=data.contiguous(), scale=scale.contiguous(), bits=bits, shape=(rows, cols),
                        group_size=int(group_size))


def dequantize_per_channel(q: LowBitTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float tensor ``codes · scale`` of shape ``q.shape`` (per row, or per row and group)."""
    codes = (q.data if q.bits == 8 else unpack_int4(q.data, q.shape[1])).to(torch.float32)
    scale = q.scale.to(torch.float32)
    if scale.dim() == 2:  # grouped along the columns
        return (codes * scale.repeat_interleave(q.shape[1] // scale.shape[1], dim=1)).to(dtype)
    return (codes * scale.view(-1, 1)).to(dtype)


def factor_grid(w: torch.Tensor, bits: int, kind: str) -> int:
    """The group size to store factor ``w`` with: :func:`factor_group_size`, unless ``w`` already
    holds the values of another grid this package has stored (``A`` in the groups of
    :data:`EARLIER_A_GROUPS`, or one scale per row, from adapters saved before), which is then kept
    as it is instead of being rounded again."""
    group = factor_group_size(kind, bits, w.shape[1])
    if not group:
        return 0
    for earlier in (0, *EARLIER_A_GROUPS.get(bits, ())):  # (lossless either way where both hold)
        if earlier != group and (earlier == 0 or w.shape[1] % earlier == 0) and _holds_grid(w, bits, earlier):
            return earlier
    return group


def grid_values(w: torch.Tensor, bits: int, group_size: int = 0) -> torch.Tensor:
    """``w`` as the store keeps it: quantized (per row, or per row and ``group_size`` columns) and
    dequantized again, in ``w``'s dtype."""
    return dequantize_per_channel(quantize_per_channel(w, bits, group_size), w.dtype)


def _holds_grid(w: torch.Tensor, bits: int, group: int) -> bool:
    return torch.equal(grid_values(w, bits, group), w)


def quantize_lora_pair(
    lora_a: torch.Tensor, lora_b: torch.Tensor, bits: int = 8
) -> tuple[LowBitTensor, LowBitTensor]:
    """Quantize an EoRA pair (``A`` ``(r, in)``, ``B`` ``(out, r)``) for storage and the fused kernels:
    ``A`` in groups of :data:`INT4_A_GROUP` (int4) / :data:`INT8_A_GROUP` (int8) columns when they
    divide ``in``, else per row (and factors already on an earlier grid stay there, see
    :func:`factor_grid`); ``B`` per row."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"incompatible LoRA shapes A={tuple(lora_a.shape)}, B={tuple(lora_b.shape)}")
    return quantize_per_channel(lora_a, bits, factor_grid(lora_a, bits, "lora_A")), quantize_per_channel(lora_b, bits)


def factor_group_size(kind: str, bits: int, cols: int) -> int:
    """The group size this package uses for a factor (``kind`` "lora_A"/"lora_B"); 0 = per row
    (``B``, and an ``A`` whose input count the group does not divide)."""
    group = {4: INT4_A_GROUP, 8: INT8_A_GROUP}.get(bits, 0) if kind == "lora_A" else 0
    return group if group and cols % group == 0 else 0
