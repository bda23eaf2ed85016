"""int8 / int4 storage for EoRA factors: symmetric, one float32 scale per row (output channel).

``A`` is ``(r, in)`` and ``B`` is ``(out, r)`` (``nn.Linear`` layout), so "per channel" means
one scale per rank direction for ``A`` and one per output feature for ``B``. Codes are
symmetric (``[-127, 127]`` for int8, ``[-7, 7]`` for int4, no zero point). int4 codes are packed
two per byte along the last dimension, the even column in the low nibble, two's complement.
This is the format the fused kernels read (``lora_bits`` 8 or 4).

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
    "LOWBIT_BITS",
    "LowBitTensor",
    "pack_int4",
    "unpack_int4",
    "quantize_per_channel",
    "dequantize_per_channel",
    "quantize_lora_pair",
]

#: Storage widths supported for quantized LoRA factors.
LOWBIT_BITS: tuple[int, ...] = (8, 4)


@dataclass(frozen=True)
class LowBitTensor:
    """A quantized 2-D factor: ``data`` (int8 codes, or uint8 packed int4), ``scale`` float32 ``(rows,)``."""

    data: torch.Tensor
    scale: torch.Tensor
    bits: int
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float tensor of ``shape``."""
        return dequantize_per_channel(self, dtype)

    def to(self, device: torch.device | str) -> "LowBitTensor":
        """Copy to ``device``."""
        return LowBitTensor(self.data.to(device), self.scale.to(device), self.bits, self.shape)


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


def quantize_per_channel(w: torch.Tensor, bits: int = 8) -> LowBitTensor:
    """Symmetric per-row quantization of a 2-D float tensor to int8 (``bits=8``) or int4 (``bits=4``)."""
    if bits not in LOWBIT_BITS:
        raise ValueError(f"unsupported adapter bits={bits}: expected one of {LOWBIT_BITS}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D factor, got shape {tuple(w.shape)}")
    qmax = (1 << (bits - 1)) - 1
    wf = w.detach().to(torch.float32)
    absmax = wf.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    codes = torch.clamp(torch.round(wf / scale.view(-1, 1)), -qmax, qmax)
    data = codes.to(torch.int8) if bits == 8 else pack_int4(codes)
    return LowBitTensor(data=data.contiguous(), scale=scale.contiguous(), bits=bits, shape=(w.shape[0], w.shape[1]))


def dequantize_per_channel(q: LowBitTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float tensor ``codes · scale`` of shape ``q.shape``."""
    codes = q.data if q.bits == 8 else unpack_int4(q.data, q.shape[1])
    return (codes.to(torch.float32) * q.scale.to(torch.float32).view(-1, 1)).to(dtype)


def quantize_lora_pair(
    lora_a: torch.Tensor, lora_b: torch.Tensor, bits: int = 8
) -> tuple[LowBitTensor, LowBitTensor]:
    """Quantize an EoRA pair (``A`` ``(r, in)``, ``B`` ``(out, r)``) for the fused kernels."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"incompatible LoRA shapes A={tuple(lora_a.shape)}, B={tuple(lora_b.shape)}")
    return quantize_per_channel(lora_a, bits), quantize_per_channel(lora_b, bits)
