"""GPTQ packed format in pure torch, and the reference for the fused GPTQ + low-rank op.

The layout is the one gptqmodel keeps in memory for its plain-GPTQ modules (``TorchLinear``,
``TritonV2Linear``) after a checkpoint is loaded through transformers:

* ``qweight``: int32 ``(ceil(in·bits/32), out)``, codes packed along ``in_features``;
* ``qzeros``:  int32 ``(groups, ceil(out·bits/32))``, zero points packed along ``out_features``;
* ``scales``:  float ``(groups, out)``;
* ``g_idx``:   int32 ``(in,)``, the group of every input row (a permutation of groups under
  act-order / ``desc_act``);
* ``W[k, n] = scales[g_idx[k], n] · (q[k, n] − (z[g_idx[k], n] + zero_offset))`` with
  ``zero_offset = 0`` for gptqmodel's in-memory "v2" zeros (TorchLinear converts the
  on-disk "v1" zeros, stored minus one, when it loads) and ``1`` for raw v1 tensors.

Bit layout, one rule for every width (2/3/4/8): along the packed dimension, every run of 32
codes occupies ``bits`` consecutive int32 words read as one little-endian ``32·bits``-bit
stream, code ``i`` at bit ``bits·i``. For 2/4/8 bits a code never straddles a word; for
3 bits codes 10 and 21 of each run straddle (GPTQ's "10-1-10-1-10" layout).

    >>> import torch
    >>> from peft_eora.kernels.reference import pack_rows, unpack_rows
    >>> q = torch.randint(0, 8, (64, 16))
    >>> bool((unpack_rows(pack_rows(q, 3), 3, 64) == q).all())
    True
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "SUPPORTED_BITS",
    "check_bits",
    "packed_len",
    "pack_rows",
    "pack_cols",
    "unpack_rows",
    "unpack_cols",
    "trivial_g_idx",
    "dequantize_gptq",
    "dequantize_lora",
    "gptq_lora_linear_reference",
    "gptq_lora_linear_torch",
]

#: Code widths of the plain (non-planar) GPTQ layout that this package reads.
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
_MASK32 = (1 << 32) - 1


def check_bits(bits: int) -> int:
    """Return ``bits`` or raise a one-line ``ValueError`` if it is not 2, 3, 4 or 8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported GPTQ bits={bits}: expected one of {SUPPORTED_BITS}")
    return bits


def packed_len(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    w = words64 & _MASK32
    return torch.where(w >= (1 << 31), w - (1 << 32), w).to(torch.int32)


def _pack_dim0(values: torch.Tensor, bits: int) -> torch.Tensor:
    n = values.shape[0]
    v = values.to(torch.int64)
    if int(v.min()) < 0 or int(v.max()) > (1 << bits) - 1:
        raise ValueError(f"codes out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}]")
    pos = torch.arange(n, dtype=torch.int64, device=v.device) * bits
    word, off = pos // 32, pos % 32
    out = torch.zeros((packed_len(n, bits) + 1,) + tuple(v.shape[1:]), dtype=torch.int64, device=v.device)
    shape = (n,) + (1,) * (v.dim() - 1)
    out.index_add_(0, word, (v << off.view(shape)) & _MASK32)
    spill = off + bits > 32
    if bool(spill.any()):
        out.index_add_(0, word[spill] + 1, v[spill] >> (32 - off[spill]).view((-1,) + shape[1:]))
    return _to_int32(out[:-1])


def _unpack_dim0(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    w = words.to(torch.int64) & _MASK32
    w = torch.cat([w, torch.zeros_like(w[:1])], dim=0)  # spill guard for the last word
    pos = torch.arange(n, dtype=torch.int64, device=words.device) * bits
    word, off = pos // 32, pos % 32
    shape = (n,) + (1,) * (w.dim() - 1)
    stream = w[word] | (w[word + 1] << 32)
    return ((stream >> off.view(shape)) & ((1 << bits) - 1)).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(in, out)`` in ``[0, 2**bits)`` into GPTQ ``qweight`` ``(ceil(in·bits/32), out)``."""
    check_bits(bits)
    return _pack_dim0(codes, bits)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack zero points ``(groups, out)`` into GPTQ ``qzeros`` ``(groups, ceil(out·bits/32))``."""
    check_bits(bits)
    return _pack_dim0(codes.T, bits).T.contiguous()


def unpack_rows(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Unpack GPTQ ``qweight`` into int32 codes ``(in_features, out)``."""
    check_bits(bits)
    if qweight.shape[0] < packed_len(in_features, bits):
        raise ValueError(
            f"qweight has {qweight.shape[0]} rows, {in_features} {bits}-bit codes need {packed_len(in_features, bits)}"
        )
    return _unpack_dim0(qweight, bits, in_features)


def unpack_cols(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Unpack GPTQ ``qzeros`` into int32 zero points ``(groups, out_features)``."""
    check_bits(bits)
    if qzeros.shape[1] < packed_len(out_features, bits):
        raise ValueError(
            f"qzeros has {qzeros.shape[1]} columns, {out_features} {bits}-bit codes need "
            f"{packed_len(out_features, bits)}"
        )
    return _unpack_dim0(qzeros.T, bits, out_features).T.contiguous()


def trivial_g_idx(in_features: int, group_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The ``g_idx`` of a checkpoint without act-order: ``k // group_size`` (int32)."""
    return (torch.arange(in_features, dtype=torch.int32, device=device) // group_size).to(torch.int32)


def _resolve_g_idx(
    g_idx: Optional[torch.Tensor], group_size: int, in_features: int, groups: int, device: torch.device
) -> torch.Tensor:
    if g_idx is None:
        g = trivial_g_idx(in_features, group_size if group_size > 0 else in_features, device).long()
    else:
        if g_idx.numel() != in_features:
            raise ValueError(f"g_idx has {g_idx.numel()} entries, expected in_features={in_features}")
        g = g_idx.to(device=device, dtype=torch.long)
        # the range check reads the values on the host: not possible inside CUDA graph capture (checked eagerly)
        capturing = g.is_cuda and torch.cuda.is_current_stream_capturing()
        if g.numel() and not capturing and (int(g.min()) < 0 or int(g.max()) >= groups):
            raise ValueError(f"g_idx values must lie in [0, {groups}), got [{int(g.min())}, {int(g.max())}]")
    return g


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bits: int,
    *,
    in_features: Optional[int] = None,
    group_size: int = -1,
    zero_offset: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dequantize a GPTQ layer to ``(in, out)`` (the orientation of gptqmodel's ``dequantize_weight``).

    ``in_features`` defaults to ``g_idx.numel()`` (or every packed row); when ``g_idx`` is None
    the groups are ``k // group_size`` (one group when ``group_size <= 0``). Arithmetic is
    float32, the result is cast to ``dtype``.
    """
    check_bits(bits)
    if in_features is None:
        in_features = g_idx.numel() if g_idx is not None else qweight.shape[0] * 32 // bits
    out_features = scales.shape[1]
    if qweight.shape[1] != out_features:
        raise ValueError(f"qweight has {qweight.shape[1]} columns but scales has {out_features}")
    if qzeros.shape[0] != scales.shape[0]:
        raise ValueError(f"qzeros has {qzeros.shape[0]} groups but scales has {scales.shape[0]}")
    q = unpack_rows(qweight, bits, in_features)
    z = unpack_cols(qzeros, bits, out_features) + int(zero_offset)
    g = _resolve_g_idx(g_idx, group_size, in_features, scales.shape[0], qweight.device)
    w = (q - z[g]).to(torch.float32) * scales[g].to(torch.float32)
    return w.to(dtype)


def dequantize_lora(
    w: torch.Tensor, scale: Optional[torch.Tensor], lora_bits: int, cols: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Float view ``(rows, cols)`` of a LoRA factor stored as float (16), int8 (8) or packed int4 (4)."""
    if lora_bits == 16:
        return w[:, :cols].to(dtype)
    if scale is None:
        raise ValueError(f"{lora_bits}-bit LoRA factor needs per-channel scales")
    if lora_bits == 8:
        q = w.to(torch.float32)
    elif lora_bits == 4:
        from .lowbit import unpack_int4

        q = unpack_int4(w, cols).to(torch.float32)
    else:
        raise ValueError(f"unsupported lora_bits={lora_bits}: expected 16, 8 or 4")
    q = q[:, :cols]
    scale = scale.to(torch.float32)
    if scale.dim() == 2:  # one scale per row and group of columns
        if cols % scale.shape[1]:
            raise ValueError(f"{scale.shape[1]} scale groups do not divide {cols} columns")
        return (q * scale.repeat_interleave(cols // scale.shape[1], dim=1)).to(dtype)
    return (q * scale.view(-1, 1)).to(dtype)


def _lora_shapes(x: torch.Tensor, lora_a: torch.Tensor, lora_bits: int) -> tuple[int, int]:
    in_features = x.shape[-1]
    rank = lora_a.shape[0]
    expected = math.ceil(in_features / 2) if lora_bits == 4 else in_features
    if lora_a.dim() != 2 or lora_a.shape[1] != expected:
        raise ValueError(f"lora_a must be (r, {expected}) for lora_bits={lora_bits}, got {tuple(lora_a.shape)}")
    return in_features, rank


def gptq_lora_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a_scale: Optional[torch.Tensor],
    lora_b_scale: Optional[torch.Tensor],
    *,
    bits: int,
    group_size: int = -1,
    lora_bits: int = 16,
    scaling: float = 1.0,
    zero_offset: int = 0,
) -> torch.Tensor:
    """``y = x·dequant(W) + scaling·(x·Aᵀ)·Bᵀ + bias`` in float32, returned in ``x.dtype``.

    ``lora_a`` is ``(r, in)``, ``lora_b`` is ``(out, r)`` (``nn.Linear`` weight layout); for
    ``lora_bits`` 8/4 they hold int8 / packed-int4 codes with float32 per-row scales
    (``lora_a_scale`` may be ``(r, in / g)``: one scale per row and group of g inputs). This is
    the definition of correctness for the Triton and CUDA kernels.
    """
    in_features, rank = _lora_shapes(x, lora_a, lora_bits)
    w = dequantize_gptq(
        qweight, qzeros, scales, g_idx, bits, in_features=in_features, group_size=group_size, zero_offset=zero_offset
    )
    a = dequantize_lora(lora_a, lora_a_scale, lora_bits, in_features)
    b = dequantize_lora(lora_b, lora_b_scale, lora_bits, rank)
    xf = x.reshape(-1, in_features).to(torch.float32)
    y = xf @ w + ((xf @ a.T) * float(scaling)) @ b.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[1])


def gptq_lora_linear_torch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a_scale: Optional[torch.Tensor],
    lora_b_scale: Optional[torch.Tensor],
    *,
    bits: int,
    group_size: int = -1,
    lora_bits: int = 16,
    scaling: float = 1.0,
    zero_offset: int = 0,
) -> torch.Tensor:
    """Portable torch path of the op: the reference on CPU; on GPU a dequantize + cuBLAS matmul.

    On CUDA with half/bfloat16 input the weight is dequantized to ``x.dtype`` and multiplied
    there (fp32 accumulation in cuBLAS), which is what the unfused gptqmodel/PEFT stack does;
    the low-rank term stays in float32.
    """
    if x.device.type != "cuda" or x.dtype == torch.float32:
        return gptq_lora_linear_reference(
            x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_b, lora_a_scale, lora_b_scale,
            bits=bits, group_size=group_size, lora_bits=lora_bits, scaling=scaling, zero_offset=zero_offset,
        )
    in_features, rank = _lora_shapes(x, lora_a, lora_bits)
    w = dequantize_gptq(
        qweight, qzeros, scales, g_idx, bits,
        in_features=in_features, group_size=group_size, zero_offset=zero_offset, dtype=x.dtype,
    )
    a = dequantize_lora(lora_a, lora_a_scale, lora_bits, in_features)
    b = dequantize_lora(lora_b, lora_b_scale, lora_bits, rank)
    x2 = x.reshape(-1, in_features)
    t = (x2.to(torch.float32) @ a.T) * float(scaling)
    y = (x2 @ w).to(torch.float32) + t @ b.T
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[1])
