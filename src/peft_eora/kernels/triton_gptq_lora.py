"""Triton implementation of ``y = x·dequant(W_gptq) + scaling·(x·Aᵀ)·Bᵀ + bias`` (the portable fallback).

Split-K, at most two launches, no atomics:

1. ``_partials_kernel``: programs ``(column tile, K slice)`` stream the packed weight of their
   slice (2/4/8-bit words are unpacked with one shift and mask per code — the words are read
   once, not once per code; 3-bit runs are assembled from their three words), dequantize in
   registers (with or without act-order ``g_idx``) to the activation dtype and multiply on tensor
   cores (``tl.dot``, the decode batch padded to 16 rows; at batch 1 a tiling may instead use
   products and sums — every step, or accumulated over the K slice and summed once — and grouped
   weights may multiply the raw codes and apply scale and zero once per group:
   ``s·(Σ x·q − (z + offset)·Σ x)``; whole 2/4/8-bit words then stay ``[words, codes, columns]``). Extra programs compute K slices of
   ``x·Aᵀ`` for the low-rank term. Each program writes float32 partials. With one K slice and no
   low-rank term it writes the output itself and the call is a single launch.
2. ``_epilogue_kernel``: per column tile, sums the partials in a fixed order (deterministic),
   forms ``t = scaling·a_scale·(x·Aᵀ)`` (grouped ``A`` scales are applied per K slice instead), adds ``t·Bᵀ`` (``b_scale`` per row of B) and the bias,
   and stores in the activation dtype.

Tilings (:class:`Config`: tile widths, K split, warps, the two forms above) are timed on the GPU at
the first call of each shape and the fastest is kept for the process (:func:`select_config`,
:func:`tuning_report`; ``PEFT_EORA_TRITON_AUTOTUNE=0`` keeps :data:`DEFAULT_CONFIG`), as
``triton.autotune`` does for one kernel: the two launches and their K split are chosen together.

LoRA factors may be float, int8 or packed int4 with float32 scales: per row of ``B``, per row or per row
and group of inputs of ``A`` (see
:mod:`peft_eora.kernels.lowbit`). On CPU tensors the kernels run in Triton's interpreter (numpy);
that needs ``TRITON_INTERPRET=1`` in the environment *before Triton is first imported*
(``import peft`` imports it), see :func:`interpreter_active`. bfloat16 is upcast to float32 there.

    >>> y = gptq_lora_linear_triton(x, qweight, qzeros, scales, g_idx, None, A, B, None, None,
    ...                             bits=4, group_size=128, lora_bits=16, scaling=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .reference import check_bits, packed_len
from .tuning import Tuner

logger = logging.getLogger(__name__)

__all__ = [
    "CANDIDATES",
    "Config",
    "DEFAULT_CONFIG",
    "ENV_AUTOTUNE",
    "dequantize_gptq_triton",
    "gptq_lora_linear_triton",
    "interpreter_active",
    "interpreter_problem",
    "plan",
    "TUNER",
    "select_config",
    "tuning_report",
]


@triton.jit
def _unpack_codes(qw_ptr, k0, offs_n, mask_n, QW_ROWS, stride_qw,
                  BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Codes ``[BLOCK_K, BLOCK_N]`` (int32) of rows ``k0 .. k0+BLOCK_K`` (``k0 % 32 == 0``)."""
    MASKQ: tl.constexpr = (1 << BITS) - 1
    if BITS == 3:
        RUNS: tl.constexpr = BLOCK_K // 32
        offs_run = k0 // 32 + tl.arange(0, RUNS)
        wmask = (offs_run < QW_ROWS // 3)[:, None] & mask_n[None, :]
        base = qw_ptr + (offs_run * 3)[:, None] * stride_qw + offs_n[None, :]
        w0 = tl.load(base, mask=wmask, other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(base + stride_qw, mask=wmask, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(base + 2 * stride_qw, mask=wmask, other=0).to(tl.uint32, bitcast=True)
        i = tl.arange(0, 32)
        pos = i * 3
        word = (pos // 32)[None, :, None]
        off = (pos % 32).to(tl.uint32)[None, :, None]
        lo = tl.where(word == 0, w0[:, None, :], tl.where(word == 1, w1[:, None, :], w2[:, None, :]))
        hi = tl.where(word == 0, w1[:, None, :], w2[:, None, :])
        spill = (pos % 32 + 3 > 32)[None, :, None]
        val = lo >> off
        val = tl.where(spill, val | (hi << ((32 - off) & 31)), val)
        codes = (val & MASKQ).to(tl.int32)
        return tl.reshape(codes, (BLOCK_K, BLOCK_N))
    else:
        CPW: tl.constexpr = 32 // BITS
        ROWS: tl.constexpr = BLOCK_K // CPW
        offs_w = k0 // CPW + tl.arange(0, ROWS)
        packed = tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                         mask=(offs_w < QW_ROWS)[:, None] & mask_n[None, :], other=0)
        shifts = tl.arange(0, CPW) * BITS
        codes = (packed[:, None, :] >> shifts[None, :, None]) & MASKQ
        return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@triton.jit
def _zero_codes(qz_ptr, rows, offs_n, mask, QZ_COLS, stride_qz, BITS: tl.constexpr):
    """Zero-point codes of columns ``offs_n`` in qzeros rows ``rows`` (broadcast shapes)."""
    MASKQ: tl.constexpr = (1 << BITS) - 1
    zbit = offs_n * BITS
    zword = zbit // 32
    zoff = (zbit % 32).to(tl.uint32)
    z = tl.load(qz_ptr + rows * stride_qz + zword, mask=mask, other=0).to(tl.uint32, bitcast=True) >> zoff
    if BITS == 3:
        spill = (zbit % 32 + BITS) > 32
        hi = tl.load(qz_ptr + rows * stride_qz + zword + 1, mask=mask & spill & ((zword + 1) < QZ_COLS),
                     other=0).to(tl.uint32, bitcast=True)
        z = tl.where(spill, z | (hi << ((32 - zoff) & 31)), z)
    return (z & MASKQ).to(tl.int32)


@triton.jit
def _group_scale_zero(qz_ptr, sc_ptr, k0, offs_n, mask_n, QZ_COLS, group_size, zero_offset, stride_qz, stride_sc,
                      BITS: tl.constexpr):
    """float32 scales and ``zero + offset`` of the tile's columns in the group of row ``k0``."""
    g0 = k0 // group_size
    s = tl.load(sc_ptr + g0 * stride_sc + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    zo = (_zero_codes(qz_ptr, g0, offs_n, mask_n, QZ_COLS, stride_qz, BITS) + zero_offset).to(tl.float32)
    return s, zo


@triton.jit
def _dequant_codes(q, qz_ptr, sc_ptr, gidx_ptr, k0, offs_k, mask_k, offs_n, mask_n, QZ_COLS, group_size,
                   zero_offset, stride_qz, stride_sc, BITS: tl.constexpr, HAS_GIDX: tl.constexpr):
    """float32 weights ``(q − z − offset)·s`` of codes ``q`` ``[BLOCK_K, BLOCK_N]`` (rows ``offs_k``)."""
    if HAS_GIDX:
        g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)
        kn_mask = mask_k[:, None] & mask_n[None, :]
        s = tl.load(sc_ptr + g[:, None] * stride_sc + offs_n[None, :], mask=kn_mask, other=0.0)
        z = _zero_codes(qz_ptr, g[:, None], offs_n[None, :], kn_mask, QZ_COLS, stride_qz, BITS)
        return (q - z - zero_offset).to(tl.float32) * s.to(tl.float32)
    # BLOCK_K divides group_size: one group per block (small integers: exact in float32 either way)
    s, zo = _group_scale_zero(qz_ptr, sc_ptr, k0, offs_n, mask_n, QZ_COLS, group_size, zero_offset, stride_qz,
                              stride_sc, BITS)
    return (q.to(tl.float32) - zo[None, :]) * s[None, :]


@triton.jit
def _block_product(acc, x, qw_ptr, qz_ptr, sc_ptr, gidx_ptr, k0, offs_k, mask_k, offs_n, mask_n,
                   QW_ROWS, QZ_COLS, group_size, zero_offset, stride_qw, stride_qz, stride_sc,
                   BITS: tl.constexpr, HAS_GIDX: tl.constexpr, DOT_FP32: tl.constexpr, FACTOR_ZEROS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc + x·dequant(W)`` over rows ``k0 .. k0 + BLOCK_K`` of the tile's columns (``x``: ``[BLOCK_K]``
    when ``BLOCK_M == 1``, the GEMV form, else ``[BLOCK_M, BLOCK_K]`` for ``tl.dot``)."""
    q = _unpack_codes(qw_ptr, k0, offs_n, mask_n, QW_ROWS, stride_qw, BITS, BLOCK_K, BLOCK_N)
    if FACTOR_ZEROS:  # one group per block: sum_k x.(q - z).s = s.(sum_k x.q - (z + offset).sum_k x)
        s, zo = _group_scale_zero(qz_ptr, sc_ptr, k0, offs_n, mask_n, QZ_COLS, group_size, zero_offset, stride_qz,
                                  stride_sc, BITS)
        if BLOCK_M == 1:
            d = tl.sum(x[:, None] * q.to(tl.float32), axis=0)
            acc += ((d - tl.sum(x, axis=0) * zo) * s)[None, :]
        else:
            xf = x.to(tl.float32)
            if DOT_FP32:
                d = tl.dot(xf, q.to(tl.float32), input_precision="ieee")
            else:
                d = tl.dot(x, q.to(x.dtype))  # codes < 256: exact in float16 and bfloat16
            acc += (d - tl.sum(xf, axis=1)[:, None] * zo[None, :]) * s[None, :]
    else:
        w = _dequant_codes(q, qz_ptr, sc_ptr, gidx_ptr, k0, offs_k, mask_k, offs_n, mask_n, QZ_COLS, group_size,
                           zero_offset, stride_qz, stride_sc, BITS, HAS_GIDX)
        if BLOCK_M == 1:
            acc += tl.sum(x[:, None] * w, axis=0)[None, :]
        elif DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    return acc


@triton.jit
def _partials_kernel(
    x_ptr, qw_ptr, qz_ptr, sc_ptr, gidx_ptr, bias_ptr, out_ptr, part_ptr, a_ptr, tpart_ptr, ascale_ptr,
    M, N, K, R, QW_ROWS, QZ_COLS, group_size, zero_offset,
    stride_xm, stride_qw, stride_qz, stride_sc, stride_a, stride_om,
    n_tiles, ksplit, kslice, ka_split, ka_slice,
    BITS: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr, FINAL: tl.constexpr,
    HAS_LORA: tl.constexpr, LORA_BITS: tl.constexpr, DOT_FP32: tl.constexpr, A_GROUP: tl.constexpr,
    FACTOR_ZEROS: tl.constexpr, DEFER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KA: tl.constexpr,
):
    # BLOCK_M == 1 is the GEMV form (a batch of one row): products and row sums instead of tl.dot,
    # which needs 16 rows (15 of them padding at batch 1).
    pid = tl.program_id(0)
    n_units = n_tiles * ksplit
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if pid < n_units:
        tile = pid // ksplit
        ks = pid % ksplit
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_begin = ks * kslice
        k_end = tl.minimum(K, k_begin + kslice)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if DEFER:  # GEMV with the K sum deferred: products accumulate per (k, column), one reduction at the end
            acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_end
            if DEFER:
                x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                q = _unpack_codes(qw_ptr, k0, offs_n, mask_n, QW_ROWS, stride_qw, BITS, BLOCK_K, BLOCK_N)
                acc2 += x[:, None] * _dequant_codes(q, qz_ptr, sc_ptr, gidx_ptr, k0, offs_k, mask_k, offs_n, mask_n,
                                                    QZ_COLS, group_size, zero_offset, stride_qz, stride_sc, BITS,
                                                    HAS_GIDX)
            elif BLOCK_M == 1 and FACTOR_ZEROS and BITS != 3:
                # batch 1, whole words: the codes stay [words, codes per word, columns] and x is
                # shaped to match, so no [BLOCK_K, BLOCK_N] rearrangement of the codes is made
                CPW: tl.constexpr = 32 // BITS
                WORDS: tl.constexpr = BLOCK_K // CPW
                offs_w = k0 // CPW + tl.arange(0, WORDS)
                packed = tl.load(qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :],
                                 mask=(offs_w < QW_ROWS)[:, None] & mask_n[None, :], other=0)
                codes = (packed[:, None, :] >> (tl.arange(0, CPW) * BITS)[None, :, None]) & ((1 << BITS) - 1)
                k3 = k0 + tl.arange(0, WORDS)[:, None] * CPW + tl.arange(0, CPW)[None, :]
                x3 = tl.load(x_ptr + k3, mask=k3 < k_end, other=0.0).to(tl.float32)
                d = tl.sum(tl.sum(codes.to(tl.float32) * x3[:, :, None], axis=1), axis=0)
                s, zo = _group_scale_zero(qz_ptr, sc_ptr, k0, offs_n, mask_n, QZ_COLS, group_size, zero_offset,
                                          stride_qz, stride_sc, BITS)
                acc += ((d - tl.sum(tl.sum(x3, axis=1), axis=0) * zo) * s)[None, :]
            else:
                if BLOCK_M == 1:
                    x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # row 0: [BLOCK_K]
                else:
                    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                acc = _block_product(acc, x, qw_ptr, qz_ptr, sc_ptr, gidx_ptr, k0, offs_k, mask_k, offs_n, mask_n,
                                     QW_ROWS, QZ_COLS, group_size, zero_offset, stride_qw, stride_qz, stride_sc,
                                     BITS, HAS_GIDX, DOT_FP32, FACTOR_ZEROS, BLOCK_M, BLOCK_K, BLOCK_N)
        if DEFER:
            acc += tl.sum(acc2, axis=0)[None, :]
        if FINAL:
            if HAS_BIAS:
                acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
        else:
            tl.store(part_ptr + (ks * M + offs_m[:, None]) * N + offs_n[None, :], acc,
                     mask=mask_m[:, None] & mask_n[None, :])
    else:
        if HAS_LORA:  # a K slice of x·Aᵀ for one block of rank rows
            c = pid - n_units
            rb = c // ka_split
            ka = c % ka_split
            offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            tacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            ka_begin = ka * ka_slice
            ka_end = tl.minimum(K, ka_begin + ka_slice)
            for k0 in range(ka_begin, ka_end, BLOCK_KA):
                offs_k = k0 + tl.arange(0, BLOCK_KA)
                mask_k = offs_k < ka_end
                amask = mask_k[:, None] & mask_r[None, :]
                if LORA_BITS == 4:
                    byte = tl.load(a_ptr + offs_r[None, :] * stride_a + (offs_k[:, None] // 2), mask=amask, other=0)
                    code = (byte.to(tl.int32) >> ((offs_k[:, None] % 2) * 4)) & 0xF
                    a = tl.where(code >= 8, code - 16, code).to(tl.float32)
                else:
                    a = tl.load(a_ptr + offs_r[None, :] * stride_a + offs_k[:, None], mask=amask, other=0).to(tl.float32)
                if A_GROUP > 0:  # one scale per rank row and group of A_GROUP inputs
                    sa = tl.load(ascale_ptr + offs_r[None, :] * (K // A_GROUP) + offs_k[:, None] // A_GROUP,
                                 mask=amask, other=0.0)
                    a = a * sa
                if BLOCK_M == 1:
                    x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                    tacc += tl.sum(x[:, None] * a, axis=0)[None, :]
                else:
                    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                                mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    tacc = tl.dot(x.to(tl.float32), a, tacc, input_precision="ieee")
            tl.store(tpart_ptr + (ka * M + offs_m[:, None]) * R + offs_r[None, :], tacc,
                     mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _epilogue_kernel(
    part_ptr, tpart_ptr, b_ptr, ascale_ptr, bscale_ptr, bias_ptr, out_ptr,
    M, N, R, ksplit, ka_split, scaling, stride_b, stride_om,
    HAS_LORA: tl.constexpr, LORA_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, A_GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mn_mask = mask_m[:, None] & mask_n[None, :]
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ks in range(0, ksplit):  # fixed order: deterministic
        y += tl.load(part_ptr + (ks * M + offs_m[:, None]) * N + offs_n[None, :], mask=mn_mask, other=0.0)
    if HAS_LORA:
        lacc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for ka in range(0, ka_split):
                t += tl.load(tpart_ptr + (ka * M + offs_m[:, None]) * R + offs_r[None, :],
                             mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if LORA_BITS != 16 and not A_GROUPED:
                t = t * tl.load(ascale_ptr + offs_r, mask=mask_r, other=0.0)[None, :]
            t = t * scaling
            rn_mask = mask_r[:, None] & mask_n[None, :]
            if LORA_BITS == 4:
                byte = tl.load(b_ptr + offs_n[None, :] * stride_b + (offs_r[:, None] // 2), mask=rn_mask, other=0)
                code = (byte.to(tl.int32) >> ((offs_r[:, None] % 2) * 4)) & 0xF
                bt = tl.where(code >= 8, code - 16, code).to(tl.float32)
            else:
                bt = tl.load(b_ptr + offs_n[None, :] * stride_b + offs_r[:, None], mask=rn_mask, other=0).to(tl.float32)
            if BLOCK_M == 1:  # [1, R] x [R, N] as products and column sums
                lacc += tl.sum(tl.sum(t, axis=0)[:, None] * bt, axis=0)[None, :]
            else:
                lacc = tl.dot(t, bt, lacc, input_precision="ieee")
        if LORA_BITS != 16:
            lacc = lacc * tl.load(bscale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        y += lacc
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mn_mask)


def interpreter_active() -> bool:
    """True when Triton was imported in interpreter mode (``TRITON_INTERPRET=1`` before import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old Triton
        return False
    return isinstance(tl.zeros, InterpretedFunction) and isinstance(_partials_kernel, InterpretedFunction)


@triton.jit
def _range_probe_kernel(out_ptr, n):
    pid = tl.program_id(0)
    for i in range(pid * 2, n, 2):  # loop bounds from a program id, as the K slices of the kernels above
        tl.store(out_ptr + i, i)


@functools.lru_cache(maxsize=1)
def interpreter_problem() -> Optional[str]:
    """None when the active Triton interpreter runs these kernels, else why not (checked once).

    Triton 3.6's interpreter turns a loop bound derived from ``tl.program_id`` into a one-element array
    and NumPy ≥ 2.4 refuses to convert such an array to an index, so every kernel here fails inside Triton.

        >>> interpreter_problem() is None  # doctest: +SKIP
        True
    """
    if not interpreter_active():
        return "Triton's interpreter is inactive (TRITON_INTERPRET=1 must be set before triton is first imported)"
    out = torch.zeros(6, dtype=torch.int32)
    try:
        _range_probe_kernel[(1,)](out, 6)
    except Exception as exc:  # noqa: BLE001 - any failure inside the interpreter means it cannot run ours
        import numpy

        return (f"Triton {triton.__version__}'s interpreter cannot run these kernels with NumPy {numpy.__version__} "
                f"({type(exc).__name__}: {exc}); a newer triton (3.8 works) or numpy < 2.4 does")
    if out.tolist() != [0, 0, 2, 0, 4, 0]:
        return f"Triton {triton.__version__}'s interpreter computed a wrong probe loop ({out.tolist()})"
    return None


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: ``0`` turns the tuner off: every call uses :data:`DEFAULT_CONFIG` (the same tiling on every GPU).
ENV_AUTOTUNE = "PEFT_EORA_TRITON_AUTOTUNE"


@dataclasses.dataclass(frozen=True)
class Config:
    """One tiling of the two launches. On a GPU the first call of each shape times the applicable
    :data:`CANDIDATES` and keeps the fastest (see :func:`tuning_report`).

        >>> Config(block_n=32, gemv=True, factor_zeros=True).name
        'n32k128p4w4s3e64-fz-gemv'
    """

    block_n: int = 64  #: output columns per GEMV program
    block_k: int = 128  #: K rows per step (halved until it divides the group size)
    programs_per_sm: int = 4  #: K is split until there are about this many GEMV programs per SM
    num_warps: int = 4
    num_stages: int = 3
    block_ka: int = 128  #: K per step of the x·Aᵀ programs
    ka_slice: int = 512  #: K per x·Aᵀ program
    block_r: int = 16  #: rank rows per x·Aᵀ program
    epilogue_block_n: int = 64
    epilogue_block_r: int = 32
    #: grouped weights (no act-order): ``s·(Σ x·q − (z + offset)·Σ x)`` per group, so the inner
    #: product runs on the raw codes (one conversion per code, no scale or zero per element)
    factor_zeros: bool = False
    #: batch 1 only: products and row sums instead of ``tl.dot`` over 16 rows (15 of them padding)
    gemv: bool = False
    #: with ``gemv``: products accumulated per (k, column) over the whole K slice and summed once at
    #: the end, instead of a cross-thread sum every step (dequantized per code: not with ``factor_zeros``)
    defer: bool = False

    @property
    def name(self) -> str:
        base = (f"n{self.block_n}k{self.block_k}p{self.programs_per_sm}w{self.num_warps}s{self.num_stages}"
                f"e{self.epilogue_block_n}")
        return (base + ("-fz" if self.factor_zeros else "") + ("-gemv" if self.gemv else "")
                + ("-defer" if self.defer else ""))

    def applies(self, m: int, has_gidx: bool) -> bool:
        """Whether this tiling can run a call of ``m`` rows (``has_gidx``: per-row groups)."""
        valid = (self.gemv or not self.defer) and not (self.defer and self.factor_zeros)
        return valid and (m == 1 or not self.gemv) and not (self.factor_zeros and has_gidx)


#: The tiling used without tuning (and the first candidate).
DEFAULT_CONFIG = Config()
#: Small blocks for the CPU interpreter: the tests' small layers still get several tiles and K slices.
INTERPRET_CONFIG = Config(block_n=32, block_k=32, block_ka=32, epilogue_block_n=32, epilogue_block_r=16)
#: What the tuner times (those that apply to the call): narrower and wider column tiles, finer K
#: splits, codes multiplied raw with scales and zeros per group, and the batch-1 GEMV form.
CANDIDATES: tuple[Config, ...] = (
    DEFAULT_CONFIG,
    Config(block_n=32, epilogue_block_n=32),
    Config(block_n=128, num_warps=8),
    Config(block_k=64, programs_per_sm=8, num_stages=4),
    Config(factor_zeros=True),
    Config(block_n=32, epilogue_block_n=32, factor_zeros=True),
    Config(gemv=True),  # batch 1 with act-order too
    Config(block_k=64, gemv=True, defer=True),
    Config(gemv=True, factor_zeros=True),
    Config(block_n=32, num_warps=2, epilogue_block_n=32, gemv=True, factor_zeros=True),
    Config(block_n=128, block_k=64, programs_per_sm=8, gemv=True, factor_zeros=True),
)

TUNER = Tuner("Triton GPTQ", ENV_AUTOTUNE, DEFAULT_CONFIG, describe=lambda c: c.name)
_KEY_NAMES = ("device", "dtype", "m", "n", "k", "rank", "bits", "group_size", "act_order", "lora_bits", "a_group")


def select_config(key: tuple, m: int, has_gidx: bool, run, bench=None,
                  device: Optional[torch.device] = None) -> Config:
    """The tiling for calls of ``key`` (see :class:`~peft_eora.kernels.tuning.Tuner`): the applicable
    :data:`CANDIDATES` are checked against the default tiling's output and timed once per process
    (``run(config)`` executes the call and returns its output); :data:`DEFAULT_CONFIG` without tuning."""
    return TUNER.select(key, [c for c in CANDIDATES if c.applies(m, has_gidx)], run, bench, device)


def tuning_report() -> list[dict]:
    """What the tuner chose so far in this process: one entry per call shape, with the µs of each
    candidate timed (None: it failed or disagreed there)."""
    return TUNER.report(_KEY_NAMES)


def plan(m: int, n: int, k: int, rank: int, group_size: int, has_gidx: bool, sms: int,
         interpret: bool = False, config: Optional[Config] = None) -> dict[str, Any]:
    """Tile sizes and K splits for one call (pure function of the shapes and the tiling; see the module doc).

        >>> plan(1, 4096, 4096, 128, 128, False, 132)["ksplit"]
        8
    """
    cfg = config or (INTERPRET_CONFIG if interpret else DEFAULT_CONFIG)
    if not cfg.applies(m, has_gidx):
        raise ValueError(f"tiling {cfg.name} cannot run {m} rows{' with act-order' if has_gidx else ''}"
                         f"{' (defer needs gemv, not factor_zeros)' if cfg.defer else ''}")
    block_m = 1 if cfg.gemv else 16
    block_n = cfg.block_n
    while block_n > 32 and block_n > n:  # narrow layers: no mostly-masked tiles
        block_n //= 2
    block_k = cfg.block_k
    if not has_gidx:  # one group per K block
        while block_k > 32 and group_size % block_k:
            block_k //= 2
    n_tiles = triton.cdiv(n, block_n)
    max_split = max(1, k // block_k)
    target = cfg.programs_per_sm * sms  # programs to keep every SM streaming
    ksplit = max(1, min(max_split, 32, round(target / n_tiles)))
    kslice = triton.cdiv(triton.cdiv(k, ksplit), block_k) * block_k
    ksplit = triton.cdiv(k, kslice)
    block_ka = cfg.block_ka
    ka_slice = max(block_ka, triton.cdiv(cfg.ka_slice, block_ka) * block_ka)
    ka_split = triton.cdiv(k, ka_slice) if rank else 0
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, n_tiles=n_tiles, ksplit=ksplit, kslice=kslice,
                block_r=cfg.block_r, block_ka=block_ka, ka_slice=ka_slice, ka_split=ka_split,
                n_rank_blocks=triton.cdiv(rank, cfg.block_r) if rank else 0, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, epilogue_block_n=cfg.epilogue_block_n,
                epilogue_block_r=cfg.epilogue_block_r, factor_zeros=cfg.factor_zeros, defer=cfg.defer)


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
    config: Optional[Config] = None,
) -> torch.Tensor:
    """Triton fused op (same contract as :func:`~peft_eora.kernels.reference.gptq_lora_linear_reference`).

    ``lora_a``/``lora_b`` may be None for the plain quantized GEMM (used by the benchmark).
    Decode batches up to 16 rows per call; larger inputs are processed 16 rows at a time.
    ``config`` forces a tiling (default: tuned per shape on a GPU, see :func:`select_config`;
    :data:`INTERPRET_CONFIG` on CPU).
    """
    check_bits(bits)
    if lora_bits not in (16, 8, 4):
        raise ValueError(f"unsupported lora_bits={lora_bits}: expected 16, 8 or 4")
    orig_dtype = x.dtype
    in_features = x.shape[-1]
    out_features = scales.shape[1]
    if in_features % 32:
        raise ValueError(f"the Triton kernel needs in_features % 32 == 0, got {in_features}")
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
    if g_idx is None and group_size % 32:  # groups not aligned to 32-row runs: per-row group lookup
        g_idx = torch.div(torch.arange(in_features, device=x.device), group_size, rounding_mode="floor")
    has_gidx = g_idx is not None
    gidx_t = g_idx.to(torch.int32).contiguous() if has_gidx else qweight  # dummy pointer when unused
    out = torch.empty((m, out_features), dtype=x2.dtype, device=x.device)
    if m == 0:
        return out.to(orig_dtype).reshape(*x.shape[:-1], out_features)
    problem = interpreter_problem() if interpret else None
    if problem is not None:
        raise RuntimeError(f"Triton kernels on CPU tensors cannot run here: {problem}")
    has_lora = lora_a is not None
    rank = lora_a.shape[0] if has_lora else 0
    a_group = 0
    if has_lora:
        lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
        if lora_b.shape[0] != out_features:
            raise ValueError(f"lora_b has {lora_b.shape[0]} rows, expected out_features={out_features}")
        if lora_bits != 16 and (lora_a_scale is None or lora_b_scale is None):
            raise ValueError(f"{lora_bits}-bit LoRA factors need lora_a_scale and lora_b_scale")
        if lora_bits != 16 and lora_a_scale.dim() == 2:
            a_group = in_features // lora_a_scale.shape[1]
    index = x.device.index if x.device.index is not None else (0 if interpret else torch.cuda.current_device())
    sms = 4 if interpret else _sm_count(index)
    rows = min(m, 16)

    def run(cfg: Config, upto: Optional[int] = None) -> torch.Tensor:
        pl = plan(rows, out_features, in_features, rank, group_size, has_gidx, sms, interpret, cfg)
        end = m if upto is None else min(m, upto)
        for r0 in range(0, end, 16):  # the kernels hold 16 batch rows
            chunk = slice(r0, min(end, r0 + 16))
            _launch(x2[chunk], qweight, qzeros, scales, gidx_t, has_gidx, bias, lora_a, lora_b, lora_a_scale,
                    lora_b_scale, out[chunk], pl, bits=bits, group_size=group_size, lora_bits=lora_bits,
                    scaling=scaling, zero_offset=zero_offset, rank=rank, a_group=a_group, interpret=interpret)
        return out[:end]

    # Triton launches on the current GPU: make it the input's
    with contextlib.nullcontext() if interpret else torch.cuda.device(x.device):
        if config is None and not interpret:  # tuned on the first 16 rows (the kernels' unit of work)
            key = (index, x2.dtype, rows, out_features, in_features, rank, bits, group_size, has_gidx,
                   lora_bits if has_lora else 0, a_group)
            config = select_config(key, rows, has_gidx, lambda cfg: run(cfg, 16), device=x.device)
        run(config or INTERPRET_CONFIG)
    return out.to(orig_dtype).reshape(*x.shape[:-1], out_features)


def _launch(x2, qweight, qzeros, scales, gidx_t, has_gidx, bias, lora_a, lora_b, lora_a_scale, lora_b_scale, out,
            pl, *, bits, group_size, lora_bits, scaling, zero_offset, rank, a_group, interpret) -> None:
    m, k = x2.shape
    n = out.shape[1]
    has_lora = rank > 0
    block_m = pl["block_m"]
    final = not has_lora and pl["ksplit"] == 1
    part = x2.new_empty((pl["ksplit"], m, n), dtype=torch.float32) if not final else out
    tpart = x2.new_empty((pl["ka_split"], m, rank), dtype=torch.float32) if has_lora else part
    a = lora_a if has_lora else x2
    a_scale = lora_a_scale.float().contiguous() if has_lora and lora_bits != 16 else x2
    units = pl["n_tiles"] * pl["ksplit"]
    grid1 = units + (pl["n_rank_blocks"] * pl["ka_split"] if has_lora else 0)
    bias_t = bias.contiguous() if bias is not None else x2
    warps = {} if interpret else dict(num_warps=pl["num_warps"], num_stages=pl["num_stages"])
    _partials_kernel[(grid1,)](
        x2, qweight, qzeros, scales, gidx_t, bias_t, out, part, a, tpart, a_scale,
        m, n, k, rank, qweight.shape[0], qzeros.shape[1], group_size, int(zero_offset),
        x2.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), a.stride(0), out.stride(0),
        pl["n_tiles"], pl["ksplit"], pl["kslice"], max(pl["ka_split"], 1), pl["ka_slice"],
        BITS=bits, HAS_GIDX=has_gidx, HAS_BIAS=bias is not None, FINAL=final, HAS_LORA=has_lora,
        LORA_BITS=lora_bits, DOT_FP32=x2.dtype == torch.float32, A_GROUP=a_group,
        FACTOR_ZEROS=pl["factor_zeros"], DEFER=pl["defer"], BLOCK_M=block_m, BLOCK_N=pl["block_n"],
        BLOCK_K=pl["block_k"], BLOCK_R=pl["block_r"], BLOCK_KA=pl["block_ka"], **warps,
    )
    if final:
        return
    b_scale = lora_b_scale.float().contiguous() if has_lora and lora_bits != 16 else x2
    b = lora_b if has_lora else x2
    block_n2 = pl["epilogue_block_n"]
    _epilogue_kernel[(triton.cdiv(n, block_n2),)](
        part, tpart, b, a_scale, b_scale, bias_t, out,
        m, n, rank, pl["ksplit"], max(pl["ka_split"], 1), float(scaling), b.stride(0), out.stride(0),
        HAS_LORA=has_lora, LORA_BITS=lora_bits, HAS_BIAS=bias is not None, A_GROUPED=a_group > 0,
        BLOCK_M=block_m, BLOCK_N=block_n2, BLOCK_R=pl["epilogue_block_r"],
        **({} if interpret else dict(num_warps=4)),
    )


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
    """Dequantized ``(in, out)`` weight via the kernels (``x = I``, 16 rows at a time); a debugging aid."""
    eye = torch.eye(in_features, dtype=torch.float32, device=qweight.device)
    return gptq_lora_linear_triton(
        eye, qweight, qzeros, scales, g_idx, None, None, None, None, None,
        bits=bits, group_size=group_size, zero_offset=zero_offset,
    )

