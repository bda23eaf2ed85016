// peft-eora: fused GPTQ GEMV/GEMM + low-rank (EoRA/LoRA) term for decode-sized batches.
//
//     y[m, n] = sum_k x[m, k] * W[k, n] + sum_j B[n, j] * t[m, j] + bias[n],
//     t[m, j] = scaling * sum_k a_scale[j, g(k)] * A[j, k] * x[m, k]   (one A scale per row, or per
//               row and group of a_group inputs),
//     W[k, n] = scales[g(k), n] * (q[k, n] - (z[g(k), n] + zero_offset)),
//
// with GPTQ-packed q/z (2/3/4/8 bits, int32 words, codes packed along `in` for qweight and
// along `out` for qzeros: every run of 32 codes fills `bits` words read as one little-endian
// bit stream, code i at bit bits*i) and g(k) = g_idx[k] (act-order) or k / group_size.
// x, scales, bias, out: fp16 or bf16 (same type). A/B: same float type, int8, or packed int4
// (two codes per byte, low nibble first) with float32 per-row scales. Accumulation is fp32.
//
// This header has no torch dependency (the compile-only test builds it with plain nvcc, and
// the CPU emulation test runs it on host threads).
//
// ---------------------------------------------------------------------------------------
// Design (version 2: tensor cores, split-K, one launch)
//
// Weight stream (phase 2). The GEMV runs on tensor cores with the weights as the A operand
// of mma.m16n8k16 ("swap AB": rows of A = output columns, B = x^T, the batch is mma's n = 8),
// so one mma consumes 16 columns x 16 k of weights and a decode batch of up to 8 rows (two
// mmas for 9..16). A warp owns a tile of 32 output columns; lane (g = lane/4, t = lane%4)
// loads, with one 16-byte load per packed word row, the words of 4 adjacent columns
// 4g..4g+3 for its own 32-row run of k (t selects the run: a warp step covers 4 runs = 128
// rows), i.e. `bits` 128-bit loads per step, every warp load instruction reading whole
// 128-byte lines. No repacking at fuse() time is needed: instead of moving the codes to
// where the mma fragment wants them, the k order inside each run is permuted to where the
// codes already are (a dot product does not care about the order of k, as long as x uses
// the same order). For 2/4/8 bits the pair of codes a fragment register holds is
// (code j, code j + 16/bits) of one word, so ((w >> bits*j) & mask) | magic turns a word
// into two fp16/bf16 values 1024+q / 128+q with one shift and one LOP3 (the magic-number
// trick), then (v - (magic+z)) * s in half2 (exact subtraction, one rounding); x gets the
// same permutation with one byte-permute per pair. 3-bit runs straddle words and take the
// generic code extraction. Act-order (g_idx) dequantizes code by code in fp32.
//
// Enough parallelism at batch 1. Work units are (column tile, K slice) pairs; the K split is
// chosen per shape so that the units fill the resident CTAs (4 warps each) in as few waves
// as possible. Each lane double-buffers its weight words in registers (the next step's
// loads are in flight while the current step's mmas run). The partial sums of a tile's K
// slices meet in a workspace; the last slice to arrive (an atomic counter per tile) adds
// them up in a fixed order -- deterministic, no float atomics -- and runs the epilogue.
//
// Low-rank term (phase 1). t = A.x is needed complete before any output can add B.t, a
// grid-wide dependency. A.x is cut into chunks of 8 rank rows x a K slice; each chunk's
// partial is published with one arrival on its row group's counter and the chunk's CTA moves
// on at once (version 3: nobody reduces at the producer). A consumer waits for all K slices
// of the row groups it needs and adds their partials up itself in slice order (deterministic),
// so the only phase-1 latency a GEMV CTA ever pays up front is its own chunk's loads and one
// fenced arrival. Where the GPU has room beside the GEMV units
// (the usual decode case), dedicated CTAs with the lowest indices do the chunks, so the
// weight stream never waits for phase 1; otherwise every CTA first does a share of the
// chunks after asking L2 to prefetch its first unit.
//
// Low-rank expand (version 3: the rank split over the K slices). B.t = sum over rank chunks
// of B[:, chunk].t[chunk], so each unit (tile, K slice ks) adds the share of rank chunk ks
// (lr_chunk entries, a multiple of 32) to its own partial before publishing it: the expand
// work and its B reads are spread over the K slices instead of all landing on the last slice
// to arrive, and the unit copies its B rows (32 x lr_chunk, <= 16 KiB) into shared memory with
// cp.async when it starts, so they arrive while the weights stream and the expand reads shared
// memory only. Every such unit gathers its chunk of t (phase 1 ran first or beside it)
// before publishing. Where B's rows are not 16-byte aligned (odd ranks) or a chunk would not fit,
// the version-2 epilogue does the whole B.t on the last slice (reading B from L2, prefetched
// when the tile's first slice starts); kOptLoraInEpilogue forces it (A/B timing). Waiting needs all
// CTAs co-resident: the host caps the grid at the occupancy-derived capacity and CTAs loop
// over units (PEFT_EORA_CUDA_TWO_PASS=1 runs phase 1 as its own launch instead, for MPS
// limits or persistent kernels beside ours; on sm_90 the second launch is a programmatic
// dependent launch that streams its weights while phase 1 runs and waits only to gather t).
// The barrier counters live in a workspace that the last CTA out (phase 1) or the last
// slice of a tile (split-K) resets to zero, so the op needs no memset launch and stays
// capturable in CUDA graphs. One workspace must not serve two launches at once (the host
// keeps one per device; launches on one stream are ordered).
// ---------------------------------------------------------------------------------------
#pragma once

#ifdef PEFT_EORA_CPU_EMULATION
#include "cpu_emulation.h"  // host-thread emulation of the CUDA built-ins (tests only)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>
#include <stdio.h>

namespace peft_eora {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileN = 32;               // output columns per tile (one warp covers them all)
constexpr int kRunK = 32;                // k rows of one lane's run (one GPTQ 32-code run)
constexpr int kStepK = 4 * kRunK;        // k rows of one warp step (4 runs, one per t)
constexpr int kRowsPerChunk = 8;         // LoRA-A rows per phase-1 chunk (two per warp)
constexpr int kMaxKSplit = 32;           // at most this many K slices (both phases)
constexpr int kMaxM = 16;                // decode batch handled by this kernel
constexpr int kWsHeader = 256;           // int32 words: [0] timeout flag, [1] exit, [2 + i] arrivals of row group i
constexpr int kMaxRank = (kWsHeader - 2) * kRowsPerChunk;
constexpr int kMaxSplitUnits = 1024;     // tiles x K slices when K is split (bounds the partials area)
constexpr int kMaxTileCounters = 4096;   // split-K arrival counters (tiles); wider layers are not split
// Workspace (int32 words): [0, kWsHeader) phase-1 counters, [kWsHeader, kWsData) tile counters,
// then float data (t, phase-1 partials, phase-2 partials) whose offsets depend on the shape. The
// counter words never hold data of another shape: every launch finds them zero (each is reset
// by the last CTA that uses it), whatever ran on the workspace before.
constexpr int kWsData = kWsHeader + kMaxTileCounters;

enum Mode : int { kModeFused = 0, kModePhase1 = 1, kModePhase2 = 2 };
// Launch options (bit flags, from the host): kOptTwoPass runs phase 1 as its own launch;
// kOptLoraInEpilogue keeps the whole B.t in the last slice's epilogue (version 2);
// kOptPrefetchFirstOnly asks L2 for a unit's weights up front only where version 2 did (the
// first unit of a CTA sharing phase 1) instead of at the start of every unit.
enum Option : int { kOptTwoPass = 1, kOptLoraInEpilogue = 2, kOptPrefetchFirstOnly = 4 };
// Floats of the shared t buffer [M][R], rounded up to 16 bytes (the B stage follows it).
__host__ __device__ inline int ts_floats(int M, int R) { return ((M * (R > 0 ? R : 0)) + 3) & ~3; }
// Bytes that hold `j` entries of one B row in the adapter's storage (16, 8 or packed 4 bits: two
// per byte, the last one rounded up).
__host__ __device__ inline int64_t b_row_bytes(int lora_bits, int j) {
  return lora_bits == 16 ? 2 * static_cast<int64_t>(j) : (lora_bits == 8 ? j : (j + 1) / 2);
}
constexpr int kMaxStageBytes = 16384;    // shared-memory B rows of one unit (32 x lr_chunk)
// A wait for phase 1 longer than this (phase 1 takes microseconds) means the grid is not
// co-resident (e.g. an MPS thread limit): the kernel traps rather than spin forever.
constexpr unsigned long long kSpinLimitNs = 10ull * 1000 * 1000 * 1000;

struct Params {
  const void* x;           // [M, K] scalar_t, contiguous, 16-byte aligned
  const int32_t* qweight;  // [K*bits/32, N], 16-byte aligned, N % 4 == 0
  const int32_t* qzeros;   // [G, qz_cols]
  const void* scales;      // [G, N] scalar_t, 8-byte aligned
  const int32_t* g_idx;    // [K] or nullptr (then g = k / group_size, group_size % 32 == 0)
  const void* bias;        // [N] scalar_t or nullptr
  const void* lora_a;      // [R, K] (16/8 bit) or [R, K/2] bytes (4 bit); nullptr when R == 0
  const void* lora_b;      // [N, R] or [N, ceil(R/2)] bytes
  const float* a_scale;    // [R] (8/4 bit), or [R, K / a_group] when a_group > 0
  const float* b_scale;    // [N] (8/4 bit)
  void* out;               // [M, N] scalar_t
  int32_t* ws;             // workspace (see make_plan)
  int M, K, N, R;
  int qz_cols, group_size, zero_offset;
  int lora_bits;           // 16, 8, 4
  int a_group;             // 0: one A scale per rank row; else per row and a_group inputs (a multiple of 8)
  int mode;                // Mode
  // planned by make_plan:
  int num_tiles;           // ceil(N / 32)
  int ksplit, kslice;      // phase-2 K split (kslice multiple of kStepK)
  int num_units;           // num_tiles * ksplit
  int ksplit_a, kslice_a;  // phase-1 K split (kslice_a multiple of 256)
  int nrg;                 // number of 8-row groups of A = ceil(R / 8)
  int ws_tiles;            // int32 offset of the per-tile arrival counters
  int p1_ctas;             // CTAs [0, p1_ctas) only do phase 1 (0: every CTA does its share first)
  int ws_part_a;           // float offset of the phase-1 partials [ksplit_a, M, R]
  int ws_part_y;           // float offset of the phase-2 partials [num_units, M, 32]
  int lr_split;            // 1: unit (tile, ks) adds B[:, chunk ks].t[chunk ks] (B staged in shared memory)
  int lr_chunk;            // rank entries per K slice when lr_split (a multiple of 32)
  int options;             // kOpt* flags of this launch
  int prefetch_rows;       // packed rows of its K slice a unit asks L2 for up front (bounded by L2 / units)
  float scaling;
};

// ---- element conversions --------------------------------------------------------------

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

// float of the 16-bit pattern `h` of a T.
template <typename T>
__device__ __forceinline__ float bits_to_f(uint32_t h);
template <>
__device__ __forceinline__ float bits_to_f<__half>(uint32_t h) {
  __half_raw r;
  r.x = static_cast<unsigned short>(h);
  return __half2float(__half(r));
}
template <>
__device__ __forceinline__ float bits_to_f<__nv_bfloat16>(uint32_t h) {
  return __uint_as_float(h << 16);
}

// 16-bit pattern of float `v` rounded to T (round to nearest even).
template <typename T>
__device__ __forceinline__ uint32_t f_to_bits(float v);
template <>
__device__ __forceinline__ uint32_t f_to_bits<__half>(float v) {
  const __half h = __float2half_rn(v);
  return static_cast<__half_raw>(h).x;
}
template <>
__device__ __forceinline__ uint32_t f_to_bits<__nv_bfloat16>(float v) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  return static_cast<__nv_bfloat16_raw>(h).x;
}

// 8 consecutive elements (16 bytes) as floats; `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&o)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = to_f<T>(h[i]);
}

// ---- code extraction and dequantization ------------------------------------------------

// The magic-number exponent: fp16 1024 + q (0x6400 | q), bf16 128 + q (0x4300 | q).
template <typename T>
struct Magic;
template <>
struct Magic<__half> {
  static constexpr uint32_t kBits = 0x6400u;
  static constexpr int kMaxCode = 1023;
};
template <>
struct Magic<__nv_bfloat16> {
  static constexpr uint32_t kBits = 0x4300u;
  static constexpr int kMaxCode = 127;
};

// Whether (T, BITS) takes the half2 magic-number path (else: fp32 per code).
template <typename T, int BITS>
struct FastDequant {
  static constexpr bool value = ((1 << BITS) + 1) <= Magic<T>::kMaxCode;  // codes and zero + 1 fit
};

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

// Position (0..31) inside a run of the code in slot `e` (0..31) of the pair sequence: pair q
// holds slots 2q (low half) and 2q+1 (high half). For 2/4/8 bits pair q is
// (code j, code j + half) of word q / half, half = 16 / bits: one shift and mask extract it.
template <int BITS>
__host__ __device__ constexpr int slot_code(int e) {
  if (BITS == 3) return e;
  const int per_word = 32 / BITS;
  const int half = per_word / 2;
  const int q = e >> 1;
  const int word = q / half;
  const int j = q % half;
  return word * per_word + j + ((e & 1) ? half : 0);
}

// Pair q of a run as a 32-bit value: low code in bits 0.., high code in bits 16..
template <int BITS>
__device__ __forceinline__ uint32_t code_pair(const uint32_t (&w)[BITS], int q) {
  if constexpr (BITS == 3) {
    return code_of<3>(w, 2 * q) | (code_of<3>(w, 2 * q + 1) << 16);
  } else {
    constexpr int half = 16 / BITS;
    constexpr uint32_t mask = ((1u << BITS) - 1u) * 0x00010001u;
    return (w[q / half] >> (BITS * (q % half))) & mask;
  }
}

// (code - zero) * scale for both halves of `pair`, rounded to T once: `zz` holds the T
// pattern of (magic + zero) twice, `ss` the scale's pattern twice.
template <typename T>
__device__ __forceinline__ uint32_t dq_pair(uint32_t pair, uint32_t zz, uint32_t ss) {
  const uint32_t v = pair | (Magic<T>::kBits * 0x00010001u);
#ifdef PEFT_EORA_CPU_EMULATION
  // exact subtraction of small integers, then one correctly rounded product (fp32 holds the
  // exact product of two 16-bit floats): bit-identical to __hsub2 then __hmul2
  const float lo = (bits_to_f<T>(v & 0xFFFFu) - bits_to_f<T>(zz & 0xFFFFu)) * bits_to_f<T>(ss & 0xFFFFu);
  const float hi = (bits_to_f<T>(v >> 16) - bits_to_f<T>(zz >> 16)) * bits_to_f<T>(ss >> 16);
  return f_to_bits<T>(lo) | (f_to_bits<T>(hi) << 16);
#else
  if constexpr (sizeof(T) == 2 && Magic<T>::kBits == 0x6400u) {
    __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&v), *reinterpret_cast<const __half2*>(&zz));
    h = __hmul2(h, *reinterpret_cast<const __half2*>(&ss));
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    __nv_bfloat162 h =
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&v), *reinterpret_cast<const __nv_bfloat162*>(&zz));
    h = __hmul2(h, *reinterpret_cast<const __nv_bfloat162*>(&ss));
    return *reinterpret_cast<const uint32_t*>(&h);
  }
#endif
}

// Two fp32 values as one T pair (low, high).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  return f_to_bits<T>(lo) | (f_to_bits<T>(hi) << 16);
}

// Zero-point codes of 4 adjacent columns n..n+3 in one qzeros row (runtime n).
template <int BITS>
__device__ __forceinline__ void zero_codes4(const int32_t* row, int qz_cols, int n, int (&z)[4]) {
  const int pos = n * BITS;
  const int wi = pos >> 5;
  const int off = pos & 31;
  uint64_t v = static_cast<uint32_t>(__ldg(row + wi));
  if (off + 4 * BITS > 32 && wi + 1 < qz_cols) v |= static_cast<uint64_t>(static_cast<uint32_t>(__ldg(row + wi + 1))) << 32;
  v >>= off;
#pragma unroll
  for (int c = 0; c < 4; ++c) z[c] = static_cast<int>((v >> (c * BITS)) & ((1u << BITS) - 1u));
}

// ---- warp-level tensor-core op ---------------------------------------------------------

// d += a . b with mma.m16n8k16 (row.col), fp32 accumulators; a: 4 regs, b: 2 regs of T pairs.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef PEFT_EORA_CPU_EMULATION
  peft_eora_emu::mma_m16n8k16(d, a, b, &bits_to_f<T>);
#else
  if constexpr (Magic<T>::kBits == 0x6400u) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Pair (x[slot_code(2q)], x[slot_code(2q+1)]) of a 32-element run held as 16 T-pair words.
template <int BITS>
__device__ __forceinline__ uint32_t x_pair(const uint32_t (&xw)[16], int q) {
  const int lo = slot_code<BITS>(2 * q), hi = slot_code<BITS>(2 * q + 1);
  const uint32_t sel = ((lo & 1) ? 0x0032u : 0x0010u) | ((hi & 1) ? 0x7600u : 0x5400u);
  return __byte_perm(xw[lo >> 1], xw[hi >> 1], sel);
}

#ifndef PEFT_EORA_CPU_EMULATION
__device__ __forceinline__ uint32_t ld_acquire(const int32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Ask L2 to fetch a line now (a non-blocking hint): lets the weight stream start while the
// CTA is busy with phase 1.
__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// 16 bytes global -> shared without passing through registers (sm_80+); completes by
// cp_async_wait_all. Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Programmatic dependent launch (sm_90+; no-ops below): the two-launch mode starts its second
// launch while the first still runs; the second waits for the first's completion (and memory)
// only where it reads the phase-1 partials.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Nanoseconds of the GPU's global timer (the same on every SM, whatever the clock speed).
__device__ __forceinline__ unsigned long long timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#else
inline void prefetch_l2(const void*) {}
inline void launch_dependents() {}
inline void wait_prerequisite_grid() {}
inline unsigned long long timer_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
inline void cp_async16(void* smem_dst, const void* gmem_src) { std::memcpy(smem_dst, gmem_src, 16); }
inline void cp_async_commit() {}
inline void cp_async_wait_all() {}
#endif

// ---- phase 1: t = scaling * A.x ---------------------------------------------------------

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

// Partial t for one chunk (8 rank rows x one K slice), published with one arrival on its row
// group's counter. Nobody waits on the arrival here: the consumers (the units, before their
// expand) wait for all K slices of the row groups they need and add the partials up
// themselves, in a fixed order. The loads of both rows of a warp and of x go out together.
template <typename T, int MAXM>
__device__ void lora_a_chunk(const Params& p, int chunk) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int32_t* counters = p.ws;
  float* part = reinterpret_cast<float*>(p.ws) + p.ws_part_a;
  const int rg = chunk / p.ksplit_a, ks = chunk % p.ksplit_a;
  const int kbeg = ks * p.kslice_a;
  const int kend = min(p.K, kbeg + p.kslice_a);
  const T* x = reinterpret_cast<const T*>(p.x);
  int j[2];
  bool ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    j[r] = rg * kRowsPerChunk + warp + r * kWarps;
    ok[r] = j[r] < p.R;
  }
  float acc[2][MAXM];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[r][m] = 0.f;
  }
  if (ok[0]) {  // row 1 of a warp exists only if row 0 does
#pragma unroll 2
    for (int k = kbeg + lane * 8; k < kend; k += 32 * 8) {
      float a[2][8], gs[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (ok[r]) {
          load_a8<T>(p, j[r], k, a[r]);
          // grouped scales: the lane's 8 inputs lie in one group (a_group % 8 == 0)
          gs[r] = p.a_group > 0 ? __ldg(p.a_scale + static_cast<size_t>(j[r]) * (p.K / p.a_group) + k / p.a_group)
                                : 1.f;
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) a[r][i] = 0.f;
          gs[r] = 0.f;
        }
      }
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m < p.M) {
          float xv[8];
          load8<T>(x + static_cast<size_t>(m) * p.K + k, xv);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float d = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) d = fmaf(a[r][i], xv[i], d);
            acc[r][m] = fmaf(gs[r], d, acc[r][m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < p.M) {  // warp-uniform
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
      }
    }
    if (lane == 0 && ok[r]) {
#pragma unroll
      for (int m = 0; m < MAXM; ++m)
        if (m < p.M) part[(static_cast<size_t>(ks) * p.M + m) * p.R + j[r]] = acc[r][m];
    }
  }
  __syncthreads();  // every warp's partials written ...
  if (threadIdx.x == 0) {
    __threadfence();  // ... and visible (cumulatively, through the barrier) before the arrival
    atomicAdd(counters + 2 + rg, 1);
  }
}

// t[m, j] for j in [j0, j1) into ts[m * R + j] (shared memory): waits (single-launch mode) for
// every K slice of the row groups covering [j0, j1), then sums their partials in slice order
// (deterministic) and applies the per-row A scale and the LoRA scaling.
template <typename T>
__device__ __forceinline__ void gather_t(const Params& p, int j0, int j1, float* ts) {
  const int32_t* counters = p.ws;
  const float* part = reinterpret_cast<const float*>(p.ws) + p.ws_part_a;
  if (p.mode == kModePhase2) wait_prerequisite_grid();  // the phase-1 launch, started before this one
  if (p.mode == kModeFused && threadIdx.x == 0) {
    for (int rg = j0 / kRowsPerChunk; rg * kRowsPerChunk < j1; ++rg) {
      const unsigned long long t0 = timer_ns();
      while (ld_acquire(counters + 2 + rg) < static_cast<uint32_t>(p.ksplit_a)) {
        __nanosleep(32);
        if (timer_ns() - t0 > kSpinLimitNs) {  // a launch error instead of a hang
          if (atomicCAS(p.ws, 0, 1) == 0)      // (header word 0 is free: one CTA prints)
            printf("peft_eora: the fused kernel waited 10 s for phase 1: its CTAs are not all resident (MPS or "
                   "a partitioned GPU?). Set PEFT_EORA_CUDA_TWO_PASS=1.\n");
          __trap();
        }
      }
    }
  }
  __syncthreads();
  // Work items of V adjacent entries (float4 loads where rows and [j0, j1) allow); `lpe` lanes
  // per item (a power of two <= 32) share its K slices, then a shuffle tree adds their sums:
  // few items (a 32-wide chunk at batch 1) still keep every thread loading.
  const int width = j1 - j0;
  const bool vec = ((p.R | j0 | width) & 3) == 0;
  const int V = vec ? 4 : 1, items = p.M * width / V, per_row = width / V;
  int lpe = 1;
  while (lpe < 32 && lpe < p.ksplit_a && 2 * lpe * items <= kThreads) lpe *= 2;
  const int per_round = kThreads / lpe;
  for (int base = 0; base < items; base += per_round) {  // block-uniform trip count
    const int idx = base + static_cast<int>(threadIdx.x) / lpe, sub = static_cast<int>(threadIdx.x) % lpe;
    const int m = idx / per_row, jj = j0 + (idx % per_row) * V;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    if (idx < items) {
      const float* src = part + static_cast<size_t>(m) * p.R + jj;
      const size_t stride = static_cast<size_t>(p.M) * p.R;  // one K slice of partials
#pragma unroll 8
      for (int q = sub; q < p.ksplit_a; q += lpe) {
        if (vec) {
          const float4 v = __ldcg(reinterpret_cast<const float4*>(src + q * stride));
          s.x += v.x;
          s.y += v.y;
          s.z += v.z;
          s.w += v.w;
        } else {
          s.x += __ldcg(src + q * stride);
        }
      }
    }
    for (int o = lpe / 2; o > 0; o >>= 1) {
      s.x += __shfl_xor_sync(0xffffffffu, s.x, o);
      s.y += __shfl_xor_sync(0xffffffffu, s.y, o);
      s.z += __shfl_xor_sync(0xffffffffu, s.z, o);
      s.w += __shfl_xor_sync(0xffffffffu, s.w, o);
    }
    if (sub == 0 && idx < items) {
      const float sums[4] = {s.x, s.y, s.z, s.w};
      for (int v = 0; v < V; ++v) {
        const float sa = (p.lora_bits == 16 || p.a_group > 0) ? 1.f : __ldg(p.a_scale + jj + v);
        ts[m * p.R + jj + v] = sums[v] * sa * p.scaling;
      }
    }
  }
  __syncthreads();
}

// ---- phase 2: the quantized GEMV on tensor cores ----------------------------------------

// What one lane loads for one run: the words of its 4 columns, their group's scales and
// the qzeros words holding their zero points.
template <int BITS>
struct RunLoad {
  uint4 w[BITS];
  uint2 s;
  int z[4];
};

template <typename T, int BITS>
__device__ __forceinline__ void load_run(const Params& p, int run, bool valid, int ncol, RunLoad<BITS>& L) {
  if (!valid) {
#pragma unroll
    for (int i = 0; i < BITS; ++i) L.w[i] = make_uint4(0u, 0u, 0u, 0u);
    L.s = make_uint2(0u, 0u);
#pragma unroll
    for (int c = 0; c < 4; ++c) L.z[c] = 0;
    return;
  }
  const int32_t* src = p.qweight + static_cast<size_t>(run / 32) * BITS * p.N + ncol;
#pragma unroll
  for (int i = 0; i < BITS; ++i) L.w[i] = __ldcs(reinterpret_cast<const uint4*>(src + static_cast<size_t>(i) * p.N));
  if (p.g_idx == nullptr) {
    const int grp = run / p.group_size;
    L.s = __ldg(reinterpret_cast<const uint2*>(reinterpret_cast<const T*>(p.scales) + static_cast<size_t>(grp) * p.N + ncol));
    zero_codes4<BITS>(p.qzeros + static_cast<size_t>(grp) * p.qz_cols, p.qz_cols, ncol, L.z);
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& u, int c) {
  return c == 0 ? u.x : (c == 1 ? u.y : (c == 2 ? u.z : u.w));
}

// Dequantized pairs q (for the 4 columns) of one run: fast half2 path (group per run).
template <typename T, int BITS>
struct RunDequant {
  uint32_t w[4][BITS];  // words per column
  uint32_t zz[4], ss[4];

  __device__ __forceinline__ void init(const Params& p, const RunLoad<BITS>& L) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
#pragma unroll
      for (int i = 0; i < BITS; ++i) w[c][i] = word_of(L.w[i], c);
      const uint32_t sbits = ((c < 2 ? L.s.x : L.s.y) >> (16 * (c & 1))) & 0xFFFFu;
      ss[c] = sbits * 0x00010001u;
      zz[c] = (Magic<T>::kBits + static_cast<uint32_t>(L.z[c] + p.zero_offset)) * 0x00010001u;
    }
  }
  __device__ __forceinline__ uint32_t pair(int c, int q) const {
    return dq_pair<T>(code_pair<BITS>(w[c], q), zz[c], ss[c]);
  }
};

// Slow exact path: act-order (group per code) or codes too wide for T's magic number.
// Every code is (q - z) * s in fp32 (exact), rounded to T once.
template <typename T, int BITS>
__device__ __forceinline__ void dq_pairs_slow(const Params& p, int run, int ncol, bool valid, const RunLoad<BITS>& L,
                                              int q, uint32_t (&out)[4]) {
  float v[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int e = slot_code<BITS>(2 * q + h);
    float sc[4];
    int z[4];
    if (p.g_idx != nullptr) {
      if (valid) {
        const int grp = __ldg(p.g_idx + run + e);
        const uint2 su = __ldg(reinterpret_cast<const uint2*>(reinterpret_cast<const T*>(p.scales) +
                                                              static_cast<size_t>(grp) * p.N + ncol));
        zero_codes4<BITS>(p.qzeros + static_cast<size_t>(grp) * p.qz_cols, p.qz_cols, ncol, z);
#pragma unroll
        for (int c = 0; c < 4; ++c) sc[c] = bits_to_f<T>(((c < 2 ? su.x : su.y) >> (16 * (c & 1))) & 0xFFFFu);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          sc[c] = 0.f;
          z[c] = 0;
        }
      }
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        sc[c] = bits_to_f<T>(((c < 2 ? L.s.x : L.s.y) >> (16 * (c & 1))) & 0xFFFFu);
        z[c] = L.z[c];
      }
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint32_t w[BITS];
#pragma unroll
      for (int i = 0; i < BITS; ++i) w[i] = word_of(L.w[i], c);
      const int code = static_cast<int>(code_of<BITS>(w, e));
      v[h][c] = static_cast<float>(code - z[c] - p.zero_offset) * sc[c];
    }
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) out[c] = pack_pair<T>(v[0][c], v[1][c]);
}

// One run of one lane: 8 k-substeps x 2 column halves of mma (x2 for 9..16 batch rows).
// `run_ok`: the run lies inside the K slice (x is loaded: this lane's x feeds every column of
// the warp); `w_ok`: also the lane's columns exist (its weights were loaded).
template <typename T, int BITS, int MAXM>
__device__ __forceinline__ void compute_run(const Params& p, int run, bool run_ok, bool w_ok, int ncol,
                                            const RunLoad<BITS>& L, float (&acc)[2][(MAXM > 8) ? 2 : 1][4]) {
  constexpr int NT = (MAXM > 8) ? 2 : 1;
  const int lane = threadIdx.x & 31, g = lane >> 2;
  const T* x = reinterpret_cast<const T*>(p.x);
  uint32_t xw[NT][16];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int m = g + 8 * nt;
    if (run_ok && m < p.M) {
      const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * p.K + run);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint4 u = __ldg(src + i);
        xw[nt][4 * i + 0] = u.x;
        xw[nt][4 * i + 1] = u.y;
        xw[nt][4 * i + 2] = u.z;
        xw[nt][4 * i + 3] = u.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) xw[nt][i] = 0u;
    }
  }
  constexpr bool kFast = FastDequant<T, BITS>::value;
  const bool fast = kFast && p.g_idx == nullptr;
  RunDequant<T, BITS> dq;
  if (fast) dq.init(p, L);
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    uint32_t pa[2][4];  // [pair 2s / 2s+1][column]
    if (fast) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int c = 0; c < 4; ++c) pa[h][c] = dq.pair(c, 2 * s + h);
      }
    } else {
      dq_pairs_slow<T, BITS>(p, run, ncol, w_ok, L, 2 * s, pa[0]);
      dq_pairs_slow<T, BITS>(p, run, ncol, w_ok, L, 2 * s + 1, pa[1]);
    }
    uint32_t b[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      b[nt][0] = x_pair<BITS>(xw[nt], 2 * s);
      b[nt][1] = x_pair<BITS>(xw[nt], 2 * s + 1);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // A rows g / g+8 are columns 4g+2i / 4g+2i+1; A cols (2t,2t+1) / (2t+8,2t+9) are pairs 2s / 2s+1
      const uint32_t a[4] = {pa[0][2 * i], pa[0][2 * i + 1], pa[1][2 * i], pa[1][2 * i + 1]};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[i][nt], a, b[nt]);
    }
  }
}

// One work unit (tile, K slice): per-warp partial sums into red[warp][m][col].
template <typename T, int BITS, int MAXM>
__device__ __forceinline__ void gemv_unit(const Params& p, int tile, int ks, float* red) {
  constexpr int NT = (MAXM > 8) ? 2 : 1;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ncol = tile * kTileN + 4 * g;
  const bool col_ok = ncol < p.N;  // N % 4 == 0: the 4 columns are valid together
  const int kbeg = ks * p.kslice;
  const int kend = min(p.K, kbeg + p.kslice);
  const int steps = (kend - kbeg + kStepK - 1) / kStepK;
  float acc[2][NT][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][nt][e] = 0.f;
    }
  }
  int st = warp;
  int run = kbeg + st * kStepK + t * kRunK;
  RunLoad<BITS> cur, nxt;
  load_run<T, BITS>(p, run, col_ok && st < steps && run < kend, ncol, cur);
  while (st < steps) {  // warp-uniform: every lane takes part in the mmas
    const int st_n = st + kWarps;
    const int run_n = kbeg + st_n * kStepK + t * kRunK;
    load_run<T, BITS>(p, run_n, col_ok && st_n < steps && run_n < kend, ncol, nxt);
    compute_run<T, BITS, MAXM>(p, run, run < kend, col_ok && run < kend, ncol, cur, acc);
    cur = nxt;
    st = st_n;
    run = run_n;
  }
  // D fragment of column half i, batch tile nt: c0 = (col 4g+2i, m 2t), c1 = (4g+2i, 2t+1),
  // c2 = (4g+2i+1, 2t), c3 = (4g+2i+1, 2t+1), m offset by 8 nt.
  float* mine = red + warp * MAXM * kTileN;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int m = 8 * nt + 2 * t + (e & 1);
        const int col = 4 * g + 2 * i + (e >> 1);
        if (m < p.M) mine[m * kTileN + col] = acc[i][nt][e];
      }
    }
  }
}

// L2 prefetch of one unit's packed weights (one 128-byte line per packed row of the tile; a
// second line when the tile's 128 bytes straddle two lines).
template <int BITS>
__device__ __forceinline__ void prefetch_unit(const Params& p, int unit) {
  const int tile = unit / p.ksplit, ks = unit % p.ksplit;
  const int kbeg = ks * p.kslice;
  const int kend = min(p.K, kbeg + p.kslice);
  const int row_begin = (kbeg / 32) * BITS, row_end = min((kend / 32) * BITS, row_begin + p.prefetch_rows);
  const int n0 = tile * kTileN;
  const int n1 = min(p.N, n0 + kTileN) - 1;
  for (int row = row_begin + static_cast<int>(threadIdx.x); row < row_end; row += kThreads) {
    const int32_t* base = p.qweight + static_cast<size_t>(row) * p.N;
    prefetch_l2(base + n0);
    if (((reinterpret_cast<uintptr_t>(base + n0) ^ reinterpret_cast<uintptr_t>(base + n1)) >> 7) != 0)
      prefetch_l2(base + n1);
  }
}

// ---- epilogue: + B.t (LoRA), + bias, store ----------------------------------------------

// B[n, j0 .. j0+8) as floats (without the per-row scale); j0 % 8 == 0, R % 8 == 0.
template <typename T>
__device__ __forceinline__ void load_b8(const Params& p, int n, int j0, float (&b)[8]) {
  if (p.lora_bits == 16) {
    load8<T>(reinterpret_cast<const T*>(p.lora_b) + static_cast<size_t>(n) * p.R + j0, b);
  } else if (p.lora_bits == 8) {
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(reinterpret_cast<const int8_t*>(p.lora_b) +
                                                         static_cast<size_t>(n) * p.R + j0));
    const int8_t* c = reinterpret_cast<const int8_t*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) b[i] = static_cast<float>(c[i]);
  } else {
    const uint32_t u = __ldg(reinterpret_cast<const uint32_t*>(reinterpret_cast<const uint8_t*>(p.lora_b) +
                                                               static_cast<size_t>(n) * ((p.R + 1) / 2) + j0 / 2));
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = static_cast<int>((u >> (4 * i)) & 0xFu);
      b[i] = static_cast<float>(c >= 8 ? c - 16 : c);
    }
  }
}

// B[n, j] as float (without its per-row scale): any R.
template <typename T>
__device__ __forceinline__ float load_b(const Params& p, int n, int j) {
  if (p.lora_bits == 16) return to_f<T>(reinterpret_cast<const T*>(p.lora_b)[static_cast<size_t>(n) * p.R + j]);
  if (p.lora_bits == 8)
    return static_cast<float>(reinterpret_cast<const int8_t*>(p.lora_b)[static_cast<size_t>(n) * p.R + j]);
  const uint8_t byte = reinterpret_cast<const uint8_t*>(p.lora_b)[static_cast<size_t>(n) * ((p.R + 1) / 2) + j / 2];
  const int c = (byte >> (4 * (j & 1))) & 0xF;
  return static_cast<float>(c >= 8 ? c - 16 : c);
}

// Bytes between staged B rows: the chunk's bytes plus 16, so the 8 rows a quarter-warp reads
// in lowrank_add start in different shared-memory banks.
__device__ __forceinline__ size_t stage_stride(const Params& p) { return b_row_bytes(p.lora_bits, p.lr_chunk) + 16; }

// 8 staged B entries (shared memory, entry offset e % 8 == 0 of a staged row) as floats.
template <typename T>
__device__ __forceinline__ void stage_b8(const Params& p, const unsigned char* row, int e, float (&b)[8]) {
  if (p.lora_bits == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(row + 2 * e);
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) b[i] = to_f<T>(h[i]);
  } else if (p.lora_bits == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(row + e);
    const int8_t* c = reinterpret_cast<const int8_t*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) b[i] = static_cast<float>(c[i]);
  } else {
    const uint32_t u = *reinterpret_cast<const uint32_t*>(row + e / 2);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = static_cast<int>((u >> (4 * i)) & 0xFu);
      b[i] = static_cast<float>(c >= 8 ? c - 16 : c);
    }
  }
}

// Copy B[tile columns, j0 .. j1) into `stage` (row c at c * stage_row bytes) with cp.async.
// Rows and the chunk are 16-byte aligned (the planner's lr_split condition).
__device__ __forceinline__ void stage_b_rows(const Params& p, int tile, int j0, int j1, unsigned char* stage) {
  const size_t row_bytes = b_row_bytes(p.lora_bits, p.R), begin = b_row_bytes(p.lora_bits, j0);
  const int pieces = static_cast<int>(b_row_bytes(p.lora_bits, j1 - j0) / 16);
  const size_t stage_row = stage_stride(p);
  const unsigned char* src = reinterpret_cast<const unsigned char*>(p.lora_b);
  for (int idx = threadIdx.x; idx < kTileN * pieces; idx += kThreads) {
    const int c = idx / pieces, q = idx % pieces;
    const int n = tile * kTileN + c;
    if (n < p.N) cp_async16(stage + c * stage_row + 16 * q, src + static_cast<size_t>(n) * row_bytes + begin + 16 * q);
  }
  cp_async_commit();
}

// red0[m][col] += sum_{j in [j0, j1)} B[n, j] * t[m, j] for one tile (red0 reduced over the
// warps). B from `stage` (staged rows of this chunk) or, when null, from global memory.
template <typename T, int MAXM>
__device__ __forceinline__ void lowrank_add(const Params& p, int tile, int j0, int j1, float* red0, const float* ts,
                                            const unsigned char* stage) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  // 8 columns per warp: lane/4 picks the column, lane%4 a quarter of the rank
  const int col = warp * 8 + (lane >> 2), jq = lane & 3;
  const int n = tile * kTileN + col;
  float l[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) l[m] = 0.f;
  if (n < p.N) {
    if ((p.R & 7) == 0) {
      const unsigned char* row = stage != nullptr ? stage + col * stage_stride(p) : nullptr;
      for (int j = j0 + jq * 8; j < j1; j += 32) {
        float b[8];
        if (row != nullptr) {
          stage_b8<T>(p, row, j - j0, b);
        } else {
          load_b8<T>(p, n, j, b);
        }
#pragma unroll
        for (int m = 0; m < MAXM; ++m) {
          if (m < p.M) {
#pragma unroll
            for (int i = 0; i < 8; ++i) l[m] = fmaf(b[i], ts[m * p.R + j + i], l[m]);
          }
        }
      }
    } else {
      for (int j = j0 + jq; j < j1; j += 4) {
        const float bv = load_b<T>(p, n, j);
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
          if (m < p.M) l[m] = fmaf(bv, ts[m * p.R + j], l[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    l[m] += __shfl_xor_sync(0xffffffffu, l[m], 1);
    l[m] += __shfl_xor_sync(0xffffffffu, l[m], 2);
  }
  if (jq == 0 && n < p.N) {
    const float sb = p.lora_bits == 16 ? 1.f : __ldg(p.b_scale + n);
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
      if (m < p.M) red0[m * kTileN + col] += sb * l[m];
  }
  __syncthreads();
}

// y (red0[m][col], fully reduced, low-rank term included) + bias -> out for one tile.
template <typename T>
__device__ __forceinline__ void store_tile(const Params& p, int tile, const float* red0) {
  T* out = reinterpret_cast<T*>(p.out);
  const T* bias = reinterpret_cast<const T*>(p.bias);
  for (int idx = threadIdx.x; idx < p.M * kTileN; idx += kThreads) {
    const int m = idx / kTileN, col = idx % kTileN;
    const int nn = tile * kTileN + col;
    if (nn < p.N) {
      float v = red0[m * kTileN + col];
      if (bias != nullptr) v += to_f<T>(bias[nn]);
      out[static_cast<size_t>(m) * p.N + nn] = from_f<T>(v);
    }
  }
  __syncthreads();
}

// L2 prefetch of a tile's B rows (read by the epilogue of whichever slice arrives last): the
// rows of a tile are one contiguous byte range of the row-major B.
__device__ __forceinline__ void prefetch_b_rows(const Params& p, int tile) {
  const size_t row_bytes = b_row_bytes(p.lora_bits, p.R);
  const int n0 = tile * kTileN;
  const int n1 = min(p.N, n0 + kTileN);
  // whole 128-byte lines of the rows' addresses (lora_b is only 16-byte aligned: rounding the offset would
  // straddle lines and miss the last one); the first line starts at most 112 bytes before the rows, inside
  // the allocation's 512-byte-aligned block
  const char* base = reinterpret_cast<const char*>(p.lora_b);
  const uintptr_t first = reinterpret_cast<uintptr_t>(base + static_cast<size_t>(n0) * row_bytes);
  // signed: the first line may begin before base (n0 = 0)
  const intptr_t begin = static_cast<intptr_t>(first & ~static_cast<uintptr_t>(127)) -
                         static_cast<intptr_t>(reinterpret_cast<uintptr_t>(base));
  const intptr_t end = static_cast<intptr_t>(static_cast<size_t>(n1) * row_bytes);
  for (intptr_t off = begin + static_cast<intptr_t>(threadIdx.x) * 128; off < end;
       off += static_cast<intptr_t>(kThreads) * 128)
    prefetch_l2(base + off);
}

// ---- the kernel ---------------------------------------------------------------------------

template <typename T, int BITS, int MAXM>
__global__ void __launch_bounds__(kThreads, (BITS >= 8 ? 2 : 4)) gptq_lora_kernel(const Params p) {
#ifdef PEFT_EORA_CPU_EMULATION
  float* smem = peft_eora_emu::block_smem();
  int& s_flag = peft_eora_emu::block_flag();
#else
  extern __shared__ __align__(16) float smem[];  // 16-byte aligned: the B stage takes cp.async
  __shared__ int s_flag;
#endif
  float* red = smem;                          // [kWarps][MAXM][32]
  float* ts = smem + kWarps * MAXM * kTileN;  // [M][R]
  unsigned char* stage = reinterpret_cast<unsigned char*>(ts + ts_floats(p.M, p.R));  // [32][lr_chunk] B entries

  int32_t* counters = p.ws;
  float* wsf = reinterpret_cast<float*>(p.ws);
  const bool has_lora = p.R > 0;

  // ---- phase 1: t = scaling * A.x ---------------------------------------------------------
  if (p.mode == kModePhase1) launch_dependents();  // the GEMV launch may start streaming weights now
  const int bid = static_cast<int>(blockIdx.x);
  const bool p1_only = p.mode == kModeFused && bid < p.p1_ctas;  // a dedicated phase-1 CTA
  if (has_lora && p.mode != kModePhase2) {
    const int chunks = p.nrg * p.ksplit_a;
    if (p.p1_ctas > 0 && p.mode == kModeFused) {
      if (p1_only) {
        for (int c = bid; c < chunks; c += p.p1_ctas) lora_a_chunk<T, MAXM>(p, c);
      }
    } else {
      // every CTA takes a share (weight stream of its first unit requested first)
      if (p.mode == kModeFused && bid < p.num_units) prefetch_unit<BITS>(p, bid);
      for (int c = bid; c < chunks; c += gridDim.x) lora_a_chunk<T, MAXM>(p, c);
    }
  }
  // whether the first unit's weights were requested above
  const bool first_prefetched = has_lora && p.mode == kModeFused && p.p1_ctas == 0 && bid < p.num_units;

  // ---- phase 2: units (tile, K slice) -------------------------------------------------------
  if (p.mode != kModePhase1 && !p1_only) {
    bool t_whole = false;  // the v2 path: ts holds all of t (gathered once per CTA)
    const int first = p.mode == kModeFused ? bid - p.p1_ctas : bid;
    const int stride = p.mode == kModeFused ? static_cast<int>(gridDim.x) - p.p1_ctas : static_cast<int>(gridDim.x);
    for (int u = first; u < p.num_units; u += stride) {
      const int tile = u / p.ksplit, ks = u % p.ksplit;
      // the whole unit's weights requested from L2 at once: the register double buffer then
      // waits on L2, not DRAM (far more bytes in flight than two steps of loads per lane)
      if (!(p.options & kOptPrefetchFirstOnly) && !(first_prefetched && u == first)) prefetch_unit<BITS>(p, u);
      // this unit's rank chunk (version 3), staged while the weights stream
      const int j0 = p.lr_split ? min(p.R, ks * p.lr_chunk) : 0;
      const int j1 = p.lr_split ? min(p.R, j0 + p.lr_chunk) : 0;
      if (has_lora && p.lr_split && j0 < j1) stage_b_rows(p, tile, j0, j1, stage);
      if (has_lora && !p.lr_split && ks == 0) prefetch_b_rows(p, tile);
      gemv_unit<T, BITS, MAXM>(p, tile, ks, red);
      __syncthreads();
      for (int idx = threadIdx.x; idx < p.M * kTileN; idx += kThreads) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += red[w * MAXM * kTileN + idx];
        red[idx] = s;  // red[0]: only this thread touches index idx
      }
      if (has_lora && p.lr_split && j0 < j1) {  // this slice's share of B.t, before the partial goes out
        cp_async_wait_all();
        gather_t<T>(p, j0, j1, ts);  // its barriers also publish the warp sums and the staged rows
        lowrank_add<T, MAXM>(p, tile, j0, j1, red, ts, stage);
      }
      if (p.ksplit > 1) {
        float* part = wsf + p.ws_part_y;
        for (int idx = threadIdx.x; idx < p.M * kTileN; idx += kThreads)
          part[static_cast<size_t>(u) * p.M * kTileN + idx] = red[idx];
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
          const int prev = atomicAdd(counters + p.ws_tiles + tile, 1);
          s_flag = (prev == p.ksplit - 1);
        }
        __syncthreads();
        if (!s_flag) continue;  // block-uniform
        __threadfence();
        for (int idx = threadIdx.x; idx < p.M * kTileN; idx += kThreads) {
          float s = 0.f;
          for (int q = 0; q < p.ksplit; ++q)
            s += __ldcg(part + (static_cast<size_t>(tile) * p.ksplit + q) * p.M * kTileN + idx);
          red[idx] = s;  // fixed order over the K slices: deterministic
        }
        if (threadIdx.x == 0) counters[p.ws_tiles + tile] = 0;  // every slice of this tile has arrived
      }
      __syncthreads();
      if (has_lora && !p.lr_split) {  // version 2: the whole B.t on the last slice, B from global memory
        if (!t_whole) gather_t<T>(p, 0, p.R, ts);
        t_whole = true;
        lowrank_add<T, MAXM>(p, tile, 0, p.R, red, ts, nullptr);
      }
      store_tile<T>(p, tile, red);
    }
  }

  // The GEMV launch of the two-launch mode ends no earlier than phase 1 (whatever its units
  // needed): the stream's next work, which may reuse phase 1's workspace, waits only on this one.
  if (has_lora && p.mode == kModePhase2) wait_prerequisite_grid();

  // ---- exit: the last CTA out resets the phase-1 counters for the next launch -------------
  if (has_lora && p.mode != kModePhase2) {
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      const int prev = atomicAdd(counters + 1, 1);
      if (prev == static_cast<int>(gridDim.x) - 1) {
        for (int i = 0; i < p.nrg; ++i) counters[2 + i] = 0;
        counters[1] = 0;
        __threadfence();
      }
    }
  }
}

// ---- host-side planning (shared by the CUDA launcher and the CPU emulation) ------------

struct LaunchPlan {
  int launches;     // 1 (fused or no LoRA) or 2 (two-pass)
  int grid[2];
  int mode[2];
  size_t smem;      // dynamic shared memory bytes
  int64_t ws_ints;  // workspace int32 words needed
};

// Shared memory of the B stage for rank R: one unit's 32 rows of at most the whole rank and at
// most kMaxStageBytes / 32 bytes each, every row padded by 16 bytes (see stage_stride).
inline size_t stage_bytes_for(int lora_bits, int R) {
  if (R <= 0 || R % 8 != 0 || b_row_bytes(lora_bits, R) % 16 != 0) return 0;
  const int64_t row = b_row_bytes(lora_bits, R), cap = kMaxStageBytes / kTileN;
  return static_cast<size_t>(kTileN * ((row < cap ? row : cap) + 16));
}

// Dynamic shared memory: per-warp sums, t, and the B stage unless kOptLoraInEpilogue.
inline size_t smem_bytes(int maxm, int M, int R, int lora_bits, int options) {
  return (static_cast<size_t>(kWarps) * maxm * kTileN + ts_floats(M, R)) * sizeof(float) +
         ((options & kOptLoraInEpilogue) ? 0 : stage_bytes_for(lora_bits, R));
}

// Version 3's rank split (see the design note): chunks of whole 32-entry runs, one per K
// slice, when B's rows are 16-byte aligned and the rank a multiple of 8 (the vector path) and
// a chunk's 32 rows fit the stage; else the version-2 epilogue.
inline void plan_lowrank(Params& p, int options) {
  p.lr_split = 0;
  p.lr_chunk = 0;
  if (p.R <= 0 || (options & kOptLoraInEpilogue) || stage_bytes_for(p.lora_bits, p.R) == 0) return;
  int chunk = (p.R + p.ksplit - 1) / p.ksplit;
  chunk = ((chunk + 31) / 32) * 32;
  if (chunk > p.R) chunk = p.R;
  if (b_row_bytes(p.lora_bits, chunk) > kMaxStageBytes / kTileN) return;  // 32 rows must fit the stage
  p.lr_split = 1;
  p.lr_chunk = chunk;
}

// Upper bound of the workspace any plan for (M, R, N) needs (what the host allocates).
inline int64_t workspace_ints_for(int M, int R, int N) {
  (void)N;
  return kWsData + static_cast<int64_t>(M) * (R > 0 ? R : 0) * kMaxKSplit +
         static_cast<int64_t>(kMaxSplitUnits) * M * kTileN;
}

// Phase-2 K split: fewest waves x steps per warp over `ctas` CTAs (ties: fewer slices).
inline void plan_ksplit(Params& p, int ctas) {
  const int max_steps = (p.K + kStepK - 1) / kStepK;
  int best_ks = 1, best_slice = max_steps * kStepK;
  int64_t best_cost = -1;
  for (int ks = 1; ks <= kMaxKSplit && ks <= max_steps; ++ks) {
    const int steps_per = (max_steps + ks - 1) / ks;
    const int slice = steps_per * kStepK;
    const int eff = (p.K + slice - 1) / slice;
    if (eff != ks) continue;  // the same split as a smaller ks
    const int64_t units = static_cast<int64_t>(p.num_tiles) * eff;
    if (eff > 1 && (units > kMaxSplitUnits || p.num_tiles > kMaxTileCounters)) break;
    const int64_t waves = (units + ctas - 1) / ctas;
    const int64_t iters = (steps_per + kWarps - 1) / kWarps;
    const int64_t cost = waves * iters;
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_ks = eff;
      best_slice = slice;
    }
  }
  p.ksplit = best_ks;
  p.kslice = best_slice;
  p.num_units = p.num_tiles * best_ks;
}

// Phase-1 K split into `target` chunks at most (slices of whole 256-element steps).
inline void plan_phase1(Params& p, int target) {
  p.nrg = (p.R + kRowsPerChunk - 1) / kRowsPerChunk;
  int ks = target / p.nrg;
  if (ks < 1) ks = 1;
  if (ks > kMaxKSplit) ks = kMaxKSplit;
  if (ks > (p.K + 255) / 256) ks = (p.K + 255) / 256;
  int slice = (p.K + ks - 1) / ks;
  slice = ((slice + 255) / 256) * 256;
  p.kslice_a = slice;
  p.ksplit_a = (p.K + slice - 1) / slice;
}

// Packed rows per unit that the units resident at once may ask L2 for together: half of an L2
// of `l2_bytes` (0: unknown, no bound), 128 bytes per row of a 32-column tile.
inline int plan_prefetch_rows(const Params& p, int capacity, int64_t l2_bytes) {
  if (l2_bytes <= 0) return 1 << 30;
  const int64_t resident = p.num_units < capacity ? p.num_units : capacity;
  const int64_t rows = l2_bytes / 2 / (128 * (resident > 0 ? resident : 1));
  return static_cast<int>(rows < (1 << 30) ? rows : (1 << 30));
}

// Fill the planned fields of `p` and return the launch sequence. `capacity` is the number of
// CTAs that can be resident at once: the fused (single-launch) grid never exceeds it;
// `l2_bytes` bounds the weights the units ask L2 for up front (see plan_prefetch_rows).
inline LaunchPlan make_plan(Params& p, int maxm, int capacity, int options, int64_t l2_bytes = 0) {
  const bool two_pass = (options & kOptTwoPass) != 0;
  p.options = options;
  LaunchPlan plan{};
  if (capacity < 1) capacity = 1;
  plan.smem = smem_bytes(maxm, p.M, p.R, p.lora_bits, options);
  p.num_tiles = (p.N + kTileN - 1) / kTileN;
  p.ws_tiles = kWsHeader;
  p.p1_ctas = 0;
  if (p.R <= 0) {
    plan_ksplit(p, capacity);
    p.lr_split = p.lr_chunk = 0;
    p.nrg = p.ksplit_a = p.kslice_a = 0;
    p.ws_part_a = p.ws_part_y = kWsData;
    plan.ws_ints = p.ksplit > 1 ? kWsData + static_cast<int64_t>(p.num_units) * p.M * kTileN : 0;
    plan.launches = 1;
    plan.grid[0] = p.num_units < capacity ? p.num_units : capacity;
    plan.mode[0] = kModePhase2;
    p.prefetch_rows = plan_prefetch_rows(p, capacity, l2_bytes);
    return plan;
  }
  const int nrg = (p.R + kRowsPerChunk - 1) / kRowsPerChunk;
  if (two_pass) {
    plan_ksplit(p, capacity);
    plan_phase1(p, capacity);
    plan.launches = 2;
    plan.grid[0] = p.nrg * p.ksplit_a;
    plan.mode[0] = kModePhase1;
    plan.grid[1] = p.num_units;
    plan.mode[1] = kModePhase2;
  } else {
    // Dedicated phase-1 CTAs pay off only when each one's K chunk of A is no longer than a
    // unit's K slice of W: otherwise the units finish their slices and wait on a few long
    // phase-1 CTAs (H200: 4096 x 4096 went from 17.8 to 36 us, 14336 x 4096 from 31.6 to 92 us).
    // Then every CTA does a share of phase 1 first, which keeps phase 1 split as finely as phase 2.
    plan_ksplit(p, capacity);
    const int spare = capacity - p.num_units;
    bool dedicated = false;
    if (spare >= nrg) {  // room beside the units: dedicated phase-1 CTAs, one wave of units
      plan_phase1(p, spare);
      dedicated = p.kslice_a <= p.kslice;
      if (dedicated) {
        p.p1_ctas = p.nrg * p.ksplit_a;
        plan.grid[0] = p.num_units + p.p1_ctas;
      }
    } else if (capacity >= 4 * nrg) {  // full GPU: reserve one CTA per row group, units loop on the rest
      plan_ksplit(p, capacity - nrg);
      plan_phase1(p, nrg);
      dedicated = p.kslice_a <= p.kslice;
      if (dedicated) {
        p.p1_ctas = p.nrg * p.ksplit_a;
        plan.grid[0] = capacity;
      } else {
        plan_ksplit(p, capacity);
      }
    }
    if (!dedicated) {  // every CTA does a share of phase 1 first
      p.p1_ctas = 0;
      plan.grid[0] = p.num_units < capacity ? p.num_units : capacity;
      plan_phase1(p, plan.grid[0]);
    }
    plan.launches = 1;
    plan.mode[0] = kModeFused;
  }
  plan_lowrank(p, options);
  p.ws_part_a = kWsData;
  p.ws_part_y = p.ws_part_a + p.ksplit_a * p.M * p.R;
  plan.ws_ints = p.ws_part_y + (p.ksplit > 1 ? static_cast<int64_t>(p.num_units) * p.M * kTileN : 0);
  p.prefetch_rows = plan_prefetch_rows(p, capacity, l2_bytes);
  return plan;
}

}  // namespace peft_eora
