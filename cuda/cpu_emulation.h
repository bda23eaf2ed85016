// Host-thread emulation of the CUDA built-ins used by gptq_lora_kernel.cuh (tests only).
//
// Every CUDA thread of a launch becomes a std::thread, all CTAs run at once (so the
// in-kernel grid barrier works as on a GPU whose grid is fully resident), __syncthreads is a
// std::barrier per CTA and warp shuffles exchange through a per-warp buffer. This runs the
// real kernel source on a CPU to check indexing, unpacking, the split-phase barrier
// protocol and the counter reset; it says nothing about GPU memory ordering or speed.
// mma.m16n8k16 is emulated from the fragment layouts of the PTX ISA ("Matrix Fragments for
// mma.m16n8k16 with floating point type"): the warp's fragments are gathered into the full
// A (16x16), B (16x8) matrices, and each lane computes its own D elements in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace peft_eora_emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

struct Warp {
  explicit Warp() : bar(32) {}
  std::barrier<> bar;
  float buf[32];
  uint32_t a[32][4];  // mma fragments, per lane
  uint32_t b[32][2];
};

struct Block {
  Block(int threads, size_t smem_bytes) : bar(threads), smem(smem_bytes / sizeof(float) + 1, 0.f) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<Warp>());
  }
  std::barrier<> bar;
  std::vector<float> smem;
  int flag = 0;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Dim tl_thread;
inline thread_local Dim tl_block;
inline thread_local Block* tl_blk = nullptr;
inline Dim g_grid;

inline float* block_smem() { return tl_blk->smem.data(); }
inline int& block_flag() { return tl_blk->flag; }

// Run `kernel()` on grid x threads emulated threads, all concurrently.
template <class F>
void launch(int grid, int threads, size_t smem_bytes, F kernel) {
  g_grid = Dim{static_cast<unsigned>(grid), 1, 1};
  std::vector<std::unique_ptr<Block>> blocks;
  for (int b = 0; b < grid; ++b) blocks.emplace_back(std::make_unique<Block>(threads, smem_bytes));
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(grid) * threads);
  for (int b = 0; b < grid; ++b) {
    for (int t = 0; t < threads; ++t) {
      Block* blk = blocks[b].get();
      pool.emplace_back([=]() {
        tl_thread = Dim{static_cast<unsigned>(t), 0, 0};
        tl_block = Dim{static_cast<unsigned>(b), 0, 0};
        tl_blk = blk;
        kernel();
      });
    }
  }
  for (auto& th : pool) th.join();
}

}  // namespace peft_eora_emu

#define threadIdx peft_eora_emu::tl_thread
#define blockIdx peft_eora_emu::tl_block
#define gridDim peft_eora_emu::g_grid

inline void __syncthreads() { peft_eora_emu::tl_blk->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned lane = threadIdx.x & 31u;
  peft_eora_emu::Warp& w = *peft_eora_emu::tl_blk->warps[threadIdx.x >> 5];
  w.buf[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.buf[lane ^ static_cast<unsigned>(lane_mask)];
  w.bar.arrive_and_wait();
  return r;
}

// __byte_perm(x, y, s): byte i of the result is byte (s >> 4i) & 7 of the 8 bytes {y:x}.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = static_cast<uint64_t>(x) | (static_cast<uint64_t>(y) << 32);
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcs(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *const_cast<const volatile T*>(p);
}
inline float4 __ldcg(const float4* p) {  // element-wise volatile reads (a struct has no volatile copy)
  const volatile float* f = reinterpret_cast<const volatile float*>(p);
  return make_float4(f[0], f[1], f[2], f[3]);
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
[[noreturn]] inline void __trap() { std::abort(); }
inline int atomicCAS(int* p, int compare, int value) {
  std::atomic_ref<int>(*p).compare_exchange_strong(compare, value);
  return compare;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
using std::fmaf;
using std::max;
using std::min;

namespace peft_eora_emu {
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d (4 fp32) += A (16x16) . B (16x8).
// `to_f` turns a 16-bit element pattern into float. Layouts (groupID = lane >> 2,
// tig = lane % 4), element i of a lane's fragment:
//   A a_i: row = groupID (+8 for i in {2,3,6,7}), col = 2 tig + (i & 1) (+8 for i >= 4)
//   B b_i: row = 2 tig + (i & 1) (+8 for i >= 2), col = groupID
//   C c_i: row = groupID (+8 for i >= 2), col = 2 tig + (i & 1)
// Register r of A holds elements a_{2r} (low 16 bits) and a_{2r+1}; likewise for B.
template <class F>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], F to_f) {
  const unsigned lane = threadIdx.x & 31u;
  Warp& w = *tl_blk->warps[threadIdx.x >> 5];
  for (int r = 0; r < 4; ++r) w.a[lane][r] = a[r];
  for (int r = 0; r < 2; ++r) w.b[lane][r] = b[r];
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned gid = l >> 2, tig = l & 3u;
    for (int i = 0; i < 8; ++i) {
      const unsigned bits = (w.a[l][i >> 1] >> (16 * (i & 1))) & 0xFFFFu;
      const unsigned row = gid + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8u : 0u);
      const unsigned col = 2 * tig + (i & 1) + (i >= 4 ? 8u : 0u);
      A[row][col] = to_f(bits);
    }
    for (int i = 0; i < 4; ++i) {
      const unsigned bits = (w.b[l][i >> 1] >> (16 * (i & 1))) & 0xFFFFu;
      const unsigned row = 2 * tig + (i & 1) + (i >= 2 ? 8u : 0u);
      B[row][gid] = to_f(bits);
    }
  }
  w.bar.arrive_and_wait();
  const unsigned gid = lane >> 2, tig = lane & 3u;
  for (int i = 0; i < 4; ++i) {
    const unsigned row = gid + (i >= 2 ? 8u : 0u);
    const unsigned col = 2 * tig + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc = std::fmaf(A[row][k], B[k][col], acc);
    d[i] += acc;
  }
}
}  // namespace peft_eora_emu

namespace peft_eora {
inline uint32_t ld_acquire(const int32_t* p) {
  return static_cast<uint32_t>(std::atomic_ref<int32_t>(*const_cast<int32_t*>(p)).load(std::memory_order_acquire));
}
}  // namespace peft_eora
