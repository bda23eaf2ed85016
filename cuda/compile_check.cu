// Compile-only check of the device code without torch headers (used by tests/test_kernels.py):
//   nvcc -std=c++20 -arch=sm_90 -I cuda -c cuda/compile_check.cu -o /tmp/x.o
// Instantiates the kernel for every code width, both activation types and both M variants,
// so template or PTX errors surface in seconds instead of during the JIT build.
#include "gptq_lora_kernel.cuh"

namespace peft_eora {
template __global__ void gptq_lora_kernel<__half, 4, 8>(const Params);
template __global__ void gptq_lora_kernel<__half, 4, 16>(const Params);
template __global__ void gptq_lora_kernel<__nv_bfloat16, 4, 8>(const Params);
template __global__ void gptq_lora_kernel<__nv_bfloat16, 3, 8>(const Params);
template __global__ void gptq_lora_kernel<__half, 3, 16>(const Params);
template __global__ void gptq_lora_kernel<__half, 2, 8>(const Params);
template __global__ void gptq_lora_kernel<__nv_bfloat16, 8, 8>(const Params);
template __global__ void gptq_lora_kernel<__half, 8, 16>(const Params);
}  // namespace peft_eora
