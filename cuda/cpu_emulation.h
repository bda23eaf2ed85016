// Host-thread emulation of the CUDA built-ins used by gptq_lora_kernel.cuh (tests only).
//
// Every CUDA thread of a launch becomes a std::thread, all CTAs run at once (so the
// in-kernel grid barrier works as on a GPU whose grid is fully resident), __syncthreads is a
// std::barrier per CTA and warp shuffles exchange through a per-warp buffer. This runs the
// real kernel source on a CPU to check indexing, unpacking, the split-phase barrier
// protocol and the counter reset; it says nothing about GPU memory ordering or speed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
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
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
using std::fmaf;
using std::max;
using std::min;

namespace peft_eora {
inline uint32_t ld_acquire(const int32_t* p) {
  return static_cast<uint32_t>(std::atomic_ref<int32_t>(*const_cast<int32_t*>(p)).load(std::memory_order_acquire));
}
}  // namespace peft_eora
