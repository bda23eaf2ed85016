// peft-eora: fused GPTQ GEMV/GEMM + low-rank (EoRA/LoRA) term for decode-sized batches.
//
//     y[m, n] = sum_k x[m, k] * W[k, n] + sum_j B[n, j] * t[m, j] + bias[n],
//     t[m, j] = scaling * a_scale[j] * sum_k A[j, k] * x[m, k],
//     W[k, n] = scales[g(k), n] * (q[k, n] - (z[g(k), n] + zero_offset)),
//
// with GPTQ-packed q/z (2/3/4/8 bits, int32 words, codes packed along `in` for qweight and
// along `out` for qzeros: every run of 32 codes fills `bits` words read as one little-endian
// bit stream, code i at bit bits*i) and g(k) = g_idx[k] (act-order) or k / group_size.
// x, scales, bias, out: fp16 or bf16 (same type). A/B: same float type, int8, or packed int4
// (two codes per byte, low nibble first) with float32 per-row scales. Accumulation is fp32.
//
// This header has no torch dependency (the compile-only test builds it with plain nvcc).
//
// ---------------------------------------------------------------------------------------
// Design: ONE launch, split-phase grid barrier.
//
// The low-rank term needs t = A.x completely reduced over K before any output can add
// B.t, which is a grid-wide dependency. Options considered:
//   (a) every CTA recomputes t itself in a prologue: reads all of A (r x K) per CTA; with
//       ~130 CTAs that is ~130x the bytes of A through L2 -- too slow for r = 128.
//   (b) two launches (t = A.x, then GEMV + B.t): correct and simple, but the second launch
//       costs a launch gap (~2-4 us eager, ~1 us in a CUDA graph), which is the same order as
//       the whole 4096x4096 4-bit GEMV at batch 1 (~3-5 us); it would blow the 1.25x budget.
//   (c) chosen: each CTA first does a small slice of A.x (phase 1: "chunks" of 8 rank rows x
//       a K-slice, ~1/G of A), publishes it (partial sums + per-row-group arrival counter;
//       the last arriving CTA of a row group reduces the K-slices in a fixed order, so the
//       result is deterministic -- no float atomics), then streams its weight tile (phase 2,
//       the bulk of the work), and only then waits for t. By the time a CTA finishes its
//       weight tile, every other CTA has long finished its tiny phase 1, so the wait is one
//       L2 round trip. This is a split (arrive early / wait late) grid barrier.
// Phase 1 must not delay the weight stream: before it, each CTA issues L2 prefetches for its
// first weight tile, so the HBM fetch of the bulk data overlaps the A.x work.
// Deadlock freedom needs all CTAs of the grid to be co-resident eventually: the host caps
// the grid at the occupancy-derived capacity (blocks/SM x SMs) and CTAs loop over tiles.
// A CTA only ever waits after it has finished its own phase-1 work, so as long as every CTA
// can become resident, all arrivals happen. (Under MPS SM limits or a persistent kernel on
// another stream occupying SMs forever this assumption can break: the host offers the
// two-launch variant, PEFT_EORA_CUDA_TWO_PASS=1, which uses the same code with mode flags.)
// The barrier counters live in a small workspace that the last CTA to exit resets to zero,
// so the op needs no memset launch and stays capturable in CUDA graphs (replays start from
// zeroed counters). Consequently one workspace must not be used by two launches at once
// (the host keeps one per device; launches on one stream are ordered).
//
// Phase 2 tiling (decode, M <= 16): a CTA owns 32 output columns (one per lane, so a warp
// reads one 128-byte line of qweight per packed row); its 8 warps split K into contiguous
// ranges of 32-row blocks; per block a lane loads `bits` int32 words of its column,
// unpacks 32 codes in registers with constant shifts (3-bit cross-word codes included),
// converts code - zero to float exactly with the 0x4B000000 magic-number trick, and does
// fp32 FMAs against x (read as 16-byte broadcast loads, L1 resident). The group scale is
// applied once per block (or per row under act-order). Warps reduce through shared
// memory, then the CTA adds B.t for its 32 columns (lanes split r, shuffle reduction), bias,
// and stores once. Weights are loaded with the streaming cache hint (read once).
// For M up to 16 this is CUDA-core math; at M = 16 it becomes compute-bound (a tensor-core
// mma path would be the next step), at M = 1..4 it is bandwidth-bound, which is the target.
// ---------------------------------------------------------------------------------------
#pragma once

#ifdef PEFT_EORA_CPU_EMULATION
#include "cpu_emulation.h"  // host-thread emulation of the CUDA built-ins (tests only)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>

namespace peft_eora {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 32;            // output columns per tile: one per lane
constexpr int kRowsPerChunk = kWarps;  // LoRA-A rows per phase-1 chunk: one per warp
constexpr int kMaxKSplit = 32;        // at most this many K-slices per row group
constexpr int kMaxM = 16;             // decode batch handled by this kernel
constexpr int kWsHeader = 256;        // int32 words: [0] done, [1] exit, [2 + i] arrivals of row group i
constexpr int kMaxRank = (kWsHeader - 2) * kRowsPerChunk;

enum Mode : int { kModeFused = 0, kModePhase1 = 1, kModePhase2 = 2 };

struct Params {
  const void* x;        // [M, K] scalar_t, contiguous, 16-byte aligned
  const int32_t* qweight;  // [ceil(K*bits/32), N]
  const int32_t* qzeros;   // [G, qz_cols]
  const void* scales;   // [G, N] scalar_t
  const int32_t* g_idx; // [K] or nullptr (then g = k / group_size, group_size % 32 == 0)
  const void* bias;     // [N] scalar_t or nullptr
  const void* lora_a;   // [R, K] (16/8 bit) or [R, K/2] bytes (4 bit); nullptr when R == 0
  const void* lora_b;   // [N, R] or [N, ceil(R/2)] bytes
  const float* a_scale; // [R] (8/4 bit)
  const float* b_scale; // [N] (8/4 bit)
  void* out;            // [M, N] scalar_t
  int32_t* ws;          // workspace: header counters, then float t[M*R], then float part[KS*M*R]
  int M, K, N, R;
  int qz_cols, group_size, zero_offset;
  int lora_bits;        // 16, 8, 4
  int mode;             // Mode
  int num_tiles;
  int ksplit, kslice;   // phase-1 K split (kslice multiple of 256)
  int nrg;              // number of 8-row groups of A = ceil(R / 8)
  float scaling;
};

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 8 consecutive elements (16 bytes) as floats; `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&o)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = to_f<T>(h[i]);
}

// Code `i` (compile-time after unrolling) of a 32-code run held in BITS words.
template <int BITS>
__device__ __forceinline__ uint32_t code_of(const uint32_t (&w)[BITS], int i) {
  const int pos = i * BITS;
  const int wi = pos >> 5;
  const int off = pos & 31;
  uint32_t v = w[wi] >> off;
  if (off + BITS > 32) v |= w[wi + 1] << (32 - off);
  return v & ((1u << BITS) - 1u);
}

// Zero-point code of column n in one qzeros row (runtime n; 3-bit codes may straddle words).
template <int BITS>
__device__ __forceinline__ uint32_t zero_code(const int32_t* row, int n) {
  const int pos = n * BITS;
  const int wi = pos >> 5;
  const int off = pos & 31;
  uint32_t v = static_cast<uint32_t>(__ldg(row + wi)) >> off;
  if (BITS == 3 && off + BITS > 32) v |= static_cast<uint32_t>(__ldg(row + wi + 1)) << (32 - off);
  return v & ((1u << BITS) - 1u);
}

// float(code) exactly: 0x4B000000 is 2^23, whose mantissa LSB has weight 1.
__device__ __forceinline__ float magic_f(uint32_t code) { return __uint_as_float(0x4B000000u | code); }
constexpr float kMagic = 8388608.0f;

#ifndef PEFT_EORA_CPU_EMULATION
__device__ __forceinline__ uint32_t ld_acquire(const int32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Ask L2 to fetch a line now (a non-blocking hint): lets the weight stream start while the
// CTA is busy with phase 1.
__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }
#else
inline void prefetch_l2(const void*) {}
#endif

// Weights are read exactly once: streaming (evict-first) loads keep x, A, B in cache.
__device__ __forceinline__ uint32_t ld_stream(const int32_t* p) {
  return static_cast<uint32_t>(__ldcs(p));
}

// Decode 8 LoRA-A entries A[j, k .. k+8) to float (scale applied later).
template <typename T>
__device__ __forceinline__ void load_a8(const Params& p, int j, int k, float (&a)[8]) {
  if (p.lora_bits == 16) {
    load8<T>(reinterpret_cast<const T*>(p.lora_a) + static_cast<size_t>(j) * p.K + k, a);
  } else if (p.lora_bits == 8) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(reinterpret_cast<const int8_t*>(p.lora_a) +
                                                         static_cast<size_t>(j) * p.K + k));
    const int8_t* c = reinterpret_cast<const int8_t*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] = static_cast<float>(c[i]);
  } else {
    const uint32_t u = __ldg(reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint8_t*>(p.lora_a) +
                                                               static_cast<size_t>(j) * (p.K / 2) + k / 2));
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = static_cast<int>((u >> (4 * i)) & 0xFu);
      a[i] = static_cast<float>(c >= 8 ? c - 16 : c);
    }
  }
}

// B[n, j] as float (without its per-row scale).
template <typename T>
__device__ __forceinline__ float load_b(const Params& p, int n, int j) {
  if (p.lora_bits == 16) return to_f<T>(reinterpret_cast<const T*>(p.lora_b)[static_cast<size_t>(n) * p.R + j]);
  if (p.lora_bits == 8)
    return static_cast<float>(reinterpret_cast<const int8_t*>(p.lora_b)[static_cast<size_t>(n) * p.R + j]);
  const uint8_t byte = reinterpret_cast<const uint8_t*>(p.lora_b)[static_cast<size_t>(n) * ((p.R + 1) / 2) + j / 2];
  const int c = (byte >> (4 * (j & 1))) & 0xF;
  return static_cast<float>(c >= 8 ? c - 16 : c);
}

// Phase 1: partial t for one chunk (8 rank rows x one K-slice); the last K-slice to arrive
// for a row group reduces the slices in order and publishes t for those rows.
template <typename T, int MAXM>
__device__ void lora_a_chunk(const Params& p, int chunk, float* part, float* t, int32_t* counters,
                             int* s_flag) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rg = chunk / p.ksplit, ks = chunk % p.ksplit;
  const int j = rg * kRowsPerChunk + warp;
  const int kbeg = ks * p.kslice;
  const int kend = min(p.K, kbeg + p.kslice);
  const T* x = reinterpret_cast<const T*>(p.x);
  float acc[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
  if (j < p.R) {
    for (int k = kbeg + lane * 8; k < kend; k += 32 * 8) {
      float a[8];
      load_a8<T>(p, j, k, a);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < p.M) {
          float xv[8];
          load8<T>(x + static_cast<size_t>(m) * p.K + k, xv);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[m] = fmaf(a[i], xv[i], acc[m]);
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], o);
  }
  if (lane == 0 && j < p.R) {
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
      if (m < p.M) part[(static_cast<size_t>(ks) * p.M + m) * p.R + j] = acc[m];
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int prev = atomicAdd(counters + 2 + rg, 1);
    *s_flag = (prev == p.ksplit - 1);
  }
  __syncthreads();
  if (*s_flag) {  // last K-slice of this row group: reduce in a fixed order, publish t
    __threadfence();
    for (int idx = threadIdx.x; idx < p.M * kRowsPerChunk; idx += kThreads) {
      const int m = idx / kRowsPerChunk;
      const int jj = rg * kRowsPerChunk + idx % kRowsPerChunk;
      if (jj < p.R) {
        float s = 0.f;
        for (int q = 0; q < p.ksplit; ++q) s += __ldcg(part + (static_cast<size_t>(q) * p.M + m) * p.R + jj);
        const float sa = p.lora_bits == 16 ? 1.f : __ldg(p.a_scale + jj);
        t[static_cast<size_t>(m) * p.R + jj] = s * sa * p.scaling;
      }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(counters + 0, 1);
  }
  __syncthreads();
}

// Phase 2: one 32-row block of one column (codes in `w`), accumulated into acc[0..M).
// `cur_g`, `s`, `zm` cache the group scale and (2^23 + zero) across blocks of one group.
template <typename T, int BITS, int MAXM>
__device__ __forceinline__ void gemv_block(const Params& p, const uint32_t (&w)[BITS], int b, int nc, int& cur_g,
                                           float& s, float& zm, float (&acc)[MAXM]) {
  const T* x = reinterpret_cast<const T*>(p.x);
  const T* scales = reinterpret_cast<const T*>(p.scales);
  const int k0 = b * 32;
  float wv[32];
  float sb = 1.f;
  if (p.g_idx == nullptr) {
    const int g = k0 / p.group_size;
    if (g != cur_g) {
      cur_g = g;
      s = to_f<T>(scales[static_cast<size_t>(g) * p.N + nc]);
      zm = kMagic + static_cast<float>(
                        static_cast<int>(zero_code<BITS>(p.qzeros + static_cast<size_t>(g) * p.qz_cols, nc)) +
                        p.zero_offset);
    }
    sb = s;
#pragma unroll
    for (int i = 0; i < 32; ++i) wv[i] = magic_f(code_of<BITS>(w, i)) - zm;
  } else {
    // act-order: every row may belong to another group (scale and zero per row)
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int4 gi = __ldg(reinterpret_cast<const int4*>(p.g_idx + k0) + c);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int g = e == 0 ? gi.x : (e == 1 ? gi.y : (e == 2 ? gi.z : gi.w));
        const float sg = to_f<T>(scales[static_cast<size_t>(g) * p.N + nc]);
        const float zg = kMagic + static_cast<float>(
            static_cast<int>(zero_code<BITS>(p.qzeros + static_cast<size_t>(g) * p.qz_cols, nc)) + p.zero_offset);
        wv[c * 4 + e] = (magic_f(code_of<BITS>(w, c * 4 + e)) - zg) * sg;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    if (m < p.M) {
      const T* xr = x + static_cast<size_t>(m) * p.K + k0;
      float d = 0.f;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float xv[8];
        load8<T>(xr + c * 8, xv);
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(wv[c * 8 + i], xv[i], d);
      }
      acc[m] = fmaf(sb, d, acc[m]);
    }
  }
}

// Phase 2 for one tile: per-thread partial sums over this warp's contiguous K range.
template <typename T, int BITS, int MAXM>
__device__ __forceinline__ void gemv_tile(const Params& p, int n, bool col_ok, float (&acc)[MAXM]) {
  const int warp = threadIdx.x >> 5;
  const int nblocks = p.K / 32;
  const int b_begin = (warp * nblocks) / kWarps;
  const int b_end = ((warp + 1) * nblocks) / kWarps;
  const int nc = col_ok ? n : 0;  // out-of-range lanes read column 0 and discard
  constexpr int UNROLL = BITS <= 4 ? 4 : 2;  // blocks of loads in flight per thread
  int cur_g = -1;
  float s = 0.f, zm = 0.f;
  int b = b_begin;
  for (; b + UNROLL <= b_end; b += UNROLL) {
    uint32_t w[UNROLL][BITS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int32_t* src = p.qweight + static_cast<size_t>(b + u) * BITS * p.N + nc;
#pragma unroll
      for (int i = 0; i < BITS; ++i) w[u][i] = ld_stream(src + static_cast<size_t>(i) * p.N);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) gemv_block<T, BITS, MAXM>(p, w[u], b + u, nc, cur_g, s, zm, acc);
  }
  for (; b < b_end; ++b) {
    uint32_t w[BITS];
    const int32_t* src = p.qweight + static_cast<size_t>(b) * BITS * p.N + nc;
#pragma unroll
    for (int i = 0; i < BITS; ++i) w[i] = ld_stream(src + static_cast<size_t>(i) * p.N);
    gemv_block<T, BITS, MAXM>(p, w, b, nc, cur_g, s, zm, acc);
  }
}

// L2 prefetch of this warp's share of one tile's packed weights (one line per 32-column row;
// a second line when the tile's 128 bytes straddle two lines).
template <int BITS>
__device__ __forceinline__ void prefetch_tile(const Params& p, int tile) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nblocks = p.K / 32;
  const int row_begin = ((warp * nblocks) / kWarps) * BITS;
  const int row_end = (((warp + 1) * nblocks) / kWarps) * BITS;
  const int n0 = tile * kTileN;
  const int n1 = min(p.N, n0 + kTileN) - 1;
  for (int row = row_begin + lane; row < row_end; row += 32) {
    const int32_t* base = p.qweight + static_cast<size_t>(row) * p.N;
    prefetch_l2(base + n0);
    if (((reinterpret_cast<uintptr_t>(base + n0) ^ reinterpret_cast<uintptr_t>(base + n1)) >> 7) != 0)
      prefetch_l2(base + n1);
  }
}

template <typename T, int BITS, int MAXM>
__global__ void __launch_bounds__(kThreads, 2) gptq_lora_kernel(const Params p) {
#ifdef PEFT_EORA_CPU_EMULATION
  float* smem = peft_eora_emu::block_smem();
  int& s_flag = peft_eora_emu::block_flag();
#else
  extern __shared__ float smem[];
  __shared__ int s_flag;
#endif
  float* red = smem;                           // [kWarps][MAXM][32]
  float* ts = smem + kWarps * MAXM * kTileN;   // [M][R]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int32_t* counters = p.ws;
  float* t_glob = reinterpret_cast<float*>(p.ws + kWsHeader);
  float* part = t_glob + static_cast<size_t>(p.M) * p.R;
  const bool has_lora = p.R > 0;

  // ---- phase 1: my share of t = scaling * A.x ------------------------------------------
  if (has_lora && p.mode == kModeFused && blockIdx.x < p.num_tiles) prefetch_tile<BITS>(p, blockIdx.x);
  if (has_lora && p.mode != kModePhase2) {
    const int chunks = p.nrg * p.ksplit;
    for (int c = blockIdx.x; c < chunks; c += gridDim.x) lora_a_chunk<T, MAXM>(p, c, part, t_glob, counters, &s_flag);
  }

  // ---- phase 2: weight tiles ---------------------------------------------------------------
  if (p.mode != kModePhase1) {
    bool t_ready = false;
    for (int tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x) {
      const int n = tile * kTileN + lane;
      const bool col_ok = n < p.N;
      float acc[MAXM];
#pragma unroll
      for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
      gemv_tile<T, BITS, MAXM>(p, n, col_ok, acc);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) red[(warp * MAXM + m) * kTileN + lane] = acc[m];
      __syncthreads();
      for (int idx = threadIdx.x; idx < p.M * kTileN; idx += kThreads) {
        const int m = idx / kTileN, col = idx % kTileN;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[(w * MAXM + m) * kTileN + col];
        red[m * kTileN + col] = s;  // row (w = 0, m): only this thread touches (m, col)
      }

      if (has_lora) {
        if (!t_ready) {  // wait for the whole grid's phase 1 (normally already complete)
          if (p.mode == kModeFused && threadIdx.x == 0) {
            while (ld_acquire(counters + 0) < static_cast<uint32_t>(p.nrg)) __nanosleep(64);
          }
          __syncthreads();
          for (int idx = threadIdx.x; idx < p.M * p.R; idx += kThreads) ts[idx] = __ldcg(t_glob + idx);
          t_ready = true;
        }
        __syncthreads();
        // B.t for this tile: each warp takes kTileN / kWarps columns, lanes split r.
        for (int col = warp; col < kTileN; col += kWarps) {
          const int nn = tile * kTileN + col;
          if (nn >= p.N) continue;  // warp-uniform
          float l[MAXM];
#pragma unroll
          for (int m = 0; m < MAXM; ++m) l[m] = 0.f;
          for (int j = lane; j < p.R; j += 32) {
            const float bv = load_b<T>(p, nn, j);
#pragma unroll
            for (int m = 0; m < MAXM; ++m)
              if (m < p.M) l[m] = fmaf(bv, ts[m * p.R + j], l[m]);
          }
          const float sb = p.lora_bits == 16 ? 1.f : __ldg(p.b_scale + nn);
#pragma unroll
          for (int m = 0; m < MAXM; ++m) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) l[m] += __shfl_xor_sync(0xffffffffu, l[m], o);
          }
          if (lane == 0) {
#pragma unroll
            for (int m = 0; m < MAXM; ++m)
              if (m < p.M) red[m * kTileN + col] += sb * l[m];
          }
        }
      }
      __syncthreads();
      T* out = reinterpret_cast<T*>(p.out);
      const T* bias = reinterpret_cast<const T*>(p.bias);
      for (int idx = threadIdx.x; idx < p.M * kTileN; idx += kThreads) {
        const int m = idx / kTileN, col = idx % kTileN;
        const int nn = tile * kTileN + col;
        if (nn < p.N) {
          float v = red[m * kTileN + col];
          if (bias != nullptr) v += to_f<T>(bias[nn]);
          out[static_cast<size_t>(m) * p.N + nn] = from_f<T>(v);
        }
      }
      __syncthreads();
    }
  }

  // ---- exit: the last CTA out resets the barrier counters for the next launch ------------
  if (has_lora && p.mode != kModePhase2) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      const int prev = atomicAdd(counters + 1, 1);
      if (prev == static_cast<int>(gridDim.x) - 1) {
        for (int i = 0; i < p.nrg; ++i) counters[2 + i] = 0;
        counters[0] = 0;
        counters[1] = 0;
        __threadfence();
      }
    }
  }
}

// ---- host-side planning (shared by the CUDA launcher and the CPU emulation) ------------

struct LaunchPlan {
  int launches;   // 1 (fused or no LoRA) or 2 (two-pass)
  int grid[2];
  int mode[2];
  size_t smem;    // dynamic shared memory bytes
  int64_t ws_ints;  // workspace int32 words needed (0 without LoRA)
};

inline size_t smem_bytes(int maxm, int M, int R) {
  return (static_cast<size_t>(kWarps) * maxm * kTileN + static_cast<size_t>(M) * R) * sizeof(float);
}

inline int64_t workspace_ints_for(int M, int R) {
  return kWsHeader + static_cast<int64_t>(M) * R * (1 + kMaxKSplit);
}

// Fill the tiling fields of `p` and return the launch sequence. `capacity` is the number of
// CTAs that can be resident at once: the fused (single-launch) grid never exceeds it.
inline LaunchPlan make_plan(Params& p, int maxm, int capacity, bool two_pass) {
  LaunchPlan plan{};
  plan.smem = smem_bytes(maxm, p.M, p.R);
  p.num_tiles = (p.N + kTileN - 1) / kTileN;
  if (p.R <= 0) {
    p.nrg = p.ksplit = p.kslice = 0;
    plan.launches = 1;
    plan.grid[0] = p.num_tiles;
    plan.mode[0] = kModePhase2;
    return plan;
  }
  const int fused_grid = p.num_tiles < capacity ? p.num_tiles : capacity;
  const int target = two_pass ? capacity : fused_grid;
  p.nrg = (p.R + kRowsPerChunk - 1) / kRowsPerChunk;
  int ks = target / p.nrg;
  if (ks < 1) ks = 1;
  if (ks > kMaxKSplit) ks = kMaxKSplit;
  if (ks > (p.K + 255) / 256) ks = (p.K + 255) / 256;
  int slice = (p.K + ks - 1) / ks;
  slice = ((slice + 255) / 256) * 256;
  p.kslice = slice;
  p.ksplit = (p.K + slice - 1) / slice;
  plan.ws_ints = kWsHeader + static_cast<int64_t>(p.M) * p.R * (1 + p.ksplit);
  if (two_pass) {
    plan.launches = 2;
    plan.grid[0] = p.nrg * p.ksplit;
    plan.mode[0] = kModePhase1;
    plan.grid[1] = p.num_tiles;
    plan.mode[1] = kModePhase2;
  } else {
    plan.launches = 1;
    plan.grid[0] = fused_grid;
    plan.mode[0] = kModeFused;
  }
  return plan;
}

}  // namespace peft_eora
