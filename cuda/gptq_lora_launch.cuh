// Launch helpers shared by the per-bit-width translation units (gptq_lora_b{2,3,4,8}.cu).
// Splitting the 16 kernel instantiations over four files lets ninja compile them in parallel.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "gptq_lora_kernel.cuh"

#define PE_CUDA_CHECK(expr)                                                                   \
  do {                                                                                        \
    cudaError_t err__ = (expr);                                                               \
    TORCH_CHECK(err__ == cudaSuccess, "peft_eora CUDA error: ", cudaGetErrorString(err__)); \
  } while (0)

namespace peft_eora {

// Resident-CTA capacity of one kernel instantiation on one device (cached, thread-safe).
inline int capacity(const void* func, int device, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, int> cache;
  static std::map<std::pair<const void*, int>, size_t> smem_limit;  // opt-in limit set so far
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(func, device, smem);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  size_t& limit = smem_limit[std::make_pair(func, device)];
  if (smem > 48 * 1024 && smem > limit) {  // only ever raise the per-function limit
    PE_CUDA_CHECK(cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    limit = smem;
  }
  int per_sm = 0;
  PE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, func, kThreads, smem));
  int sms = 0;
  PE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(per_sm > 0, "peft_eora: kernel cannot be resident (shared memory ", smem, " bytes)");
  const int cap = per_sm * sms;
  cache.emplace(key, cap);
  return cap;
}

// A device attribute (cached: read once per attribute and device).
inline int device_attribute(cudaDeviceAttr attr, int device) {
  static std::mutex mu;
  static std::map<std::pair<int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(static_cast<int>(attr), device);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int value = 0;
  PE_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  cache.emplace(key, value);
  return value;
}

// Whether the two-launch mode may start its GEMV launch early (programmatic dependent launch):
// the kernel running on `device` was compiled for sm_90+ (its PTX has griddepcontrol; a kernel
// JIT-compiled from older PTX on a newer GPU does not) and no such launch was refused before.
inline std::map<std::pair<const void*, int>, bool>& pdl_state() {
  static std::map<std::pair<const void*, int>, bool> state;
  return state;
}
inline std::mutex& pdl_mutex() {
  static std::mutex mu;
  return mu;
}
inline bool pdl_ready(const void* func, int device) {
  std::lock_guard<std::mutex> lock(pdl_mutex());
  const auto key = std::make_pair(func, device);
  const auto it = pdl_state().find(key);
  if (it != pdl_state().end()) return it->second;
  cudaFuncAttributes fa{};
  PE_CUDA_CHECK(cudaFuncGetAttributes(&fa, func));
  const bool ok = fa.ptxVersion >= 90 && device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 9;
  pdl_state().emplace(key, ok);
  return ok;
}
inline void pdl_refused(const void* func, int device, cudaError_t err) {
  {
    std::lock_guard<std::mutex> lock(pdl_mutex());
    pdl_state()[std::make_pair(func, device)] = false;
  }
  TORCH_WARN_ONCE("peft_eora: programmatic dependent launch refused (", cudaGetErrorString(err),
                  "): the two-launch mode runs its launches one after the other");
}

template <typename T, int BITS, int MAXM>
void launch(Params& p, int options, int64_t ws_ints, int device, cudaStream_t stream) {
  const void* func = reinterpret_cast<const void*>(&gptq_lora_kernel<T, BITS, MAXM>);
  const int cap = capacity(func, device, smem_bytes(MAXM, p.M, p.R, p.lora_bits, options));
  const LaunchPlan plan = make_plan(p, MAXM, cap, options, device_attribute(cudaDevAttrL2CacheSize, device));
  TORCH_CHECK(ws_ints >= plan.ws_ints, "peft_eora: workspace has ", ws_ints, " int32 words, needs ", plan.ws_ints);
  TORCH_CHECK(plan.ws_ints == 0 || p.ws != nullptr, "peft_eora: this call needs a workspace");
  for (int i = 0; i < plan.launches; ++i) {
    p.mode = plan.mode[i];
    if (i == 1 && pdl_ready(func, device)) {  // programmatic dependent launch of the GEMV pass
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(plan.grid[i]);
      config.blockDim = dim3(kThreads);
      config.dynamicSmemBytes = plan.smem;
      config.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[0].val.programmaticStreamSerializationAllowed = 1;
      config.attrs = attr;
      config.numAttrs = 1;
      const cudaError_t err = cudaLaunchKernelEx(&config, gptq_lora_kernel<T, BITS, MAXM>, p);
      if (err == cudaSuccess) continue;
      (void)cudaGetLastError();  // refused (nothing was launched): an ordinary launch from now on
      cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
      if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) (void)cudaGetLastError();
      // refused inside graph capture: this launch goes on ordinarily (or the capture fails), but the
      // early launch stays on for eager calls, where it was not refused
      if (capture == cudaStreamCaptureStatusNone) pdl_refused(func, device, err);
    }
    gptq_lora_kernel<T, BITS, MAXM><<<plan.grid[i], kThreads, plan.smem, stream>>>(p);
    PE_CUDA_CHECK(cudaGetLastError());
  }
}

// Both M variants for one code width (one mma batch tile for M <= 8, two for 9..16).
// Instantiated (for __half and __nv_bfloat16) only in gptq_lora_b<BITS>.cu; other
// translation units see the extern declarations below.
template <typename T, int BITS>
void launch_bits(Params& p, int options, int64_t ws_ints, int device, cudaStream_t stream) {
  if (p.M <= 8) {
    launch<T, BITS, 8>(p, options, ws_ints, device, stream);
  } else {
    launch<T, BITS, 16>(p, options, ws_ints, device, stream);
  }
}

#define PEFT_EORA_LAUNCH_BITS(PREFIX, T, BITS) \
  PREFIX template void launch_bits<T, BITS>(Params&, int, int64_t, int, cudaStream_t);
#define PEFT_EORA_LAUNCH_BITS_BOTH(PREFIX, BITS)     \
  PEFT_EORA_LAUNCH_BITS(PREFIX, __half, BITS)        \
  PEFT_EORA_LAUNCH_BITS(PREFIX, __nv_bfloat16, BITS)

#ifndef PEFT_EORA_BITS_UNIT
PEFT_EORA_LAUNCH_BITS_BOTH(extern, 2)
PEFT_EORA_LAUNCH_BITS_BOTH(extern, 3)
PEFT_EORA_LAUNCH_BITS_BOTH(extern, 4)
PEFT_EORA_LAUNCH_BITS_BOTH(extern, 8)
#endif

}  // namespace peft_eora
