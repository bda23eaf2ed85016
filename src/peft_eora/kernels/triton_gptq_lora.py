"""Triton implementation of ``y = x·dequant(W_gptq) + scaling·(x·Aᵀ)·Bᵀ + bias`` (the portable fallback).

Two launches: ``_lora_a`` computes the tiny ``t = scaling·(x·Aᵀ)`` (float32, ``(M, r)``), then
``_gptq_lora_main`` streams the packed weight, dequantizes it in registers (2/3/4/8-bit, with or
without act-order ``g_idx``) and appends the ``t·Bᵀ`` term to the same accumulator before the
single store. LoRA factors may be float, int8 or packed int4 with per-row float32 scales (see
:mod:`peft_eora.kernels.lowbit`).

On CPU tensors the kernels run in Triton's interpreter (numpy); that needs
``TRITON_INTERPRET=1`` in the environment *before Triton is first imported* (``import peft``
imports it), see :func:`interpreter_active`. bfloat16 is upcast to float32 there. Tests only.

    >>> y = gptq_lora_linear_triton(x, qweight, qzeros, scales, g_idx, None, A, B, None, None,
    ...                             bits=4, group_size=128, lora_bits=16, scaling=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import check_bits, packed_len

logger = logging.getLogger(__name__)

__all__ = ["gptq_lora_linear_triton", "dequantize_gptq_triton", "interpreter_active"]


@triton.jit
def _lora_a_kernel(
    x_ptr, a_ptr, ascale_ptr, t_ptr,
    M, K, R,
    stride_xm, stride_a,
    scaling,
    LORA_BITS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        amask = mask_k[:, None] & mask_r[None, :]
        if LORA_BITS == 4:
            byte = tl.load(a_ptr + offs_r[None, :] * stride_a + (offs_k[:, None] // 2), mask=amask, other=0)
            code = (byte.to(tl.int32) >> ((offs_k[:, None] % 2) * 4)) & 0xF
            a = tl.where(code >= 8, code - 16, code).to(tl.float32)
        else:
            a = tl.load(a_ptr + offs_r[None, :] * stride_a + offs_k[:, None], mask=amask, other=0).to(tl.float32)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), a, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, a.to(x.dtype), acc)
    if LORA_BITS != 16:
        acc = acc * tl.load(ascale_ptr + offs_r, mask=mask_r, other=0.0)[None, :]
    acc = acc * scaling
    tl.store(t_ptr + offs_m[:, None] * R + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _gptq_lora_main_kernel(
    x_ptr, qw_ptr, qz_ptr, sc_ptr, gidx_ptr, bias_ptr, t_ptr, b_ptr, bscale_ptr, out_ptr,
    M, N, K, R, QW_ROWS, QZ_COLS, group_size, zero_offset,
    stride_xm, stride_qw, stride_qz, stride_sc, stride_b, stride_om,
    BITS: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, LORA_BITS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    MASKQ: tl.constexpr = (1 << BITS) - 1

    # zero points: column n is code n of its group row, at bit BITS·n of the packed stream
    zbit = offs_n * BITS
    zword = zbit // 32
    zoff = zbit % 32
    zspill = (zoff + BITS) > 32
    zsh = ((32 - zoff) & 31).to(tl.uint32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        kn_mask = mask_k[:, None] & mask_n[None, :]

        # weight codes: row k is code k of column n, at bit BITS·k of the packed stream
        kbit = offs_k * BITS
        kword = kbit // 32
        koff = (kbit % 32)
        lo = tl.load(qw_ptr + kword[:, None] * stride_qw + offs_n[None, :], mask=kn_mask, other=0)
        q = lo.to(tl.uint32, bitcast=True) >> koff[:, None].to(tl.uint32)
        if BITS == 3:
            kspill = (koff + BITS) > 32
            hi_mask = kn_mask & kspill[:, None] & ((kword + 1) < QW_ROWS)[:, None]
            hi = tl.load(qw_ptr + (kword[:, None] + 1) * stride_qw + offs_n[None, :], mask=hi_mask, other=0)
            ksh = ((32 - koff) & 31).to(tl.uint32)
            q = tl.where(kspill[:, None], q | (hi.to(tl.uint32, bitcast=True) << ksh[:, None]), q)
        q = (q & MASKQ).to(tl.int32)

        if HAS_GIDX:
            g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
        else:
            g = offs_k // group_size
        s = tl.load(sc_ptr + g[:, None] * stride_sc + offs_n[None, :], mask=kn_mask, other=0.0).to(tl.float32)
        zlo = tl.load(qz_ptr + g[:, None] * stride_qz + zword[None, :], mask=kn_mask, other=0)
        z = zlo.to(tl.uint32, bitcast=True) >> zoff[None, :].to(tl.uint32)
        if BITS == 3:
            zhi_mask = kn_mask & zspill[None, :] & ((zword + 1) < QZ_COLS)[None, :]
            zhi = tl.load(qz_ptr + g[:, None] * stride_qz + zword[None, :] + 1, mask=zhi_mask, other=0)
            z = tl.where(zspill[None, :], z | (zhi.to(tl.uint32, bitcast=True) << zsh[None, :]), z)
        z = (z & MASKQ).to(tl.int32) + zero_offset

        w = (q - z).to(tl.float32) * s
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)

    if HAS_LORA:
        lacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t = tl.load(t_ptr + offs_m[:, None] * R + offs_r[None, :],
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            rn_mask = mask_r[:, None] & mask_n[None, :]
            if LORA_BITS == 4:
                byte = tl.load(b_ptr + offs_n[None, :] * stride_b + (offs_r[:, None] // 2), mask=rn_mask, other=0)
                code = (byte.to(tl.int32) >> ((offs_r[:, None] % 2) * 4)) & 0xF
                bt = tl.where(code >= 8, code - 16, code).to(tl.float32)
            else:
                bt = tl.load(b_ptr + offs_n[None, :] * stride_b + offs_r[:, None], mask=rn_mask, other=0).to(tl.float32)
            lacc = tl.dot(t, bt, lacc, input_precision="ieee")
        if LORA_BITS != 16:
            lacc = lacc * tl.load(bscale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        acc = acc + lacc

    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def interpreter_active() -> bool:
    """True when Triton was imported in interpreter mode (``TRITON_INTERPRET=1`` before import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old Triton
        return False
    return isinstance(tl.zeros, InterpretedFunction) and isinstance(_gptq_lora_main_kernel, InterpretedFunction)


def _blocks(m: int, n: int, k: int, interpret: bool) -> tuple[int, int, int, int]:
    """Tile sizes: decode-shaped on GPU, small on the interpreter (numpy cost grows with tiles)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    if interpret:
        return block_m, 32, 32, 16
    block_n = 64 if n >= 64 else 32
    return block_m, block_n, 64, 32


def gptq_lora_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    lora_a_scale: Optional[torch.Tensor],
    lora_b_scale: Optional[torch.Tensor],
    *,
    bits: int,
    group_size: int = -1,
    lora_bits: int = 16,
    scaling: float = 1.0,
    zero_offset: int = 0,
) -> torch.Tensor:
    """Triton fused op (same contract as :func:`~peft_eora.kernels.reference.gptq_lora_linear_reference`).

    ``lora_a``/``lora_b`` may be None for the plain quantized GEMM (used by the benchmark).
    """
    check_bits(bits)
    if lora_bits not in (16, 8, 4):
        raise ValueError(f"unsupported lora_bits={lora_bits}: expected 16, 8 or 4")
    orig_dtype = x.dtype
    in_features = x.shape[-1]
    out_features = scales.shape[1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    interpret = x.device.type == "cpu"
    if interpret and orig_dtype == torch.bfloat16:  # numpy has no bfloat16
        x2 = x2.float()
        scales = scales.float()
        bias = bias.float() if bias is not None else None
        if lora_bits == 16 and lora_a is not None:
            lora_a, lora_b = lora_a.float(), lora_b.float()
    x2 = x2.contiguous()
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    if qweight.shape[0] < packed_len(in_features, bits) or qweight.shape[1] != out_features:
        raise ValueError(
            f"qweight {tuple(qweight.shape)} does not hold a {in_features}x{out_features} {bits}-bit weight"
        )
    if qzeros.shape[1] < packed_len(out_features, bits) or qzeros.shape[0] != scales.shape[0]:
        raise ValueError(f"qzeros {tuple(qzeros.shape)} does not match scales {tuple(scales.shape)}")
    if g_idx is None and group_size <= 0:
        group_size = in_features
    has_gidx = g_idx is not None
    gidx_t = g_idx.to(torch.int32).contiguous() if has_gidx else qweight  # dummy pointer when unused
    out = torch.empty((m, out_features), dtype=x2.dtype, device=x.device)
    if m == 0:
        return out.to(orig_dtype).reshape(*x.shape[:-1], out_features)

    if interpret and not interpreter_active():
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is first imported"
        )
    lora_k, main_k = _lora_a_kernel, _gptq_lora_main_kernel
    block_m, block_n, block_k, block_r = _blocks(m, out_features, in_features, interpret)
    has_lora = lora_a is not None
    rank = lora_a.shape[0] if has_lora else 0
    if has_lora:
        lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
        if lora_b.shape[0] != out_features:
            raise ValueError(f"lora_b has {lora_b.shape[0]} rows, expected out_features={out_features}")
        if lora_bits != 16 and (lora_a_scale is None or lora_b_scale is None):
            raise ValueError(f"{lora_bits}-bit LoRA factors need lora_a_scale and lora_b_scale")
        a_scale = lora_a_scale.float().contiguous() if lora_bits != 16 else x2
        b_scale = lora_b_scale.float().contiguous() if lora_bits != 16 else x2
        t = torch.empty((m, rank), dtype=torch.float32, device=x.device)
        dot_fp32_a = x2.dtype == torch.float32 or (lora_bits == 16 and lora_a.dtype == torch.float32)
        lora_k[(triton.cdiv(m, block_m), triton.cdiv(rank, block_r))](
            x2, lora_a, a_scale, t, m, in_features, rank, x2.stride(0), lora_a.stride(0), float(scaling),
            LORA_BITS=lora_bits, DOT_FP32=dot_fp32_a, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        )
    else:
        t = b_scale = x2
        lora_b = x2
    bias_t = bias.contiguous() if bias is not None else x2
    main_k[(triton.cdiv(m, block_m), triton.cdiv(out_features, block_n))](
        x2, qweight, qzeros, scales, gidx_t, bias_t, t, lora_b, b_scale, out,
        m, out_features, in_features, rank, qweight.shape[0], qzeros.shape[1], group_size, int(zero_offset),
        x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
        lora_b.stride(0) if has_lora else 0, out.stride(0),
        BITS=bits, HAS_GIDX=has_gidx, HAS_BIAS=bias is not None, HAS_LORA=has_lora, LORA_BITS=lora_bits,
        DOT_FP32=x2.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r,
    )
    return out.to(orig_dtype).reshape(*x.shape[:-1], out_features)


def dequantize_gptq_triton(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: Optional[torch.Tensor],
    bits: int,
    *,
    in_features: int,
    group_size: int = -1,
    zero_offset: int = 0,
) -> torch.Tensor:
    """Dequantized ``(in, out)`` weight via the main kernel (``x = I``); a debugging aid."""
    eye = torch.eye(in_features, dtype=torch.float32, device=qweight.device)
    return gptq_lora_linear_triton(
        eye, qweight, qzeros, scales, g_idx, None, None, None, None, None,
        bits=bits, group_size=group_size, zero_offset=zero_offset,
    )
