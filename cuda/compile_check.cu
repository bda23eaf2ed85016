// Compile-only check of the device code without torch headers (used by tests/test_kernels.py):
//   nvcc -std=c++20 -arch=sm_90 -I cuda -c cuda/compile_check.cu -o /tmp/x.o
// Instantiates the kernel for every code width, both activation types and every M variant,
// so template or PTX errors surface in seconds instead of during the JIT build.
#include "gptq_lora_kernel.cuh"

namespace peft_eora {
template __global__ void gptq_lora_kernel<__half, 4, 1>(const Params);
template __global__ void gptq_lora_kernel<__half, 4, 16>(const Params);
template __global__ void gptq_lora_kernel<__nv_bfloat16, 3, 4>(const Params);
template __global__ void gptq_lora_kernel<__half, 2, 1>(const Params);
template __global__ void gptq_lora_kernel<__nv_bfloat16, 8, 1>(const Params);
}  // namespace peft_eora
