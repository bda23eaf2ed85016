// C entry point running the real CUDA kernel source on CPU threads (tests only):
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DPEFT_EORA_CPU_EMULATION \
//       -I/usr/local/cuda/include cuda/cpu_emulation_main.cpp -o libpe_emu.so
// Called through ctypes by tests/test_kernels.py with pointers to torch CPU tensors.
#include "gptq_lora_kernel.cuh"

namespace {

using namespace peft_eora;

template <typename T, int BITS, int MAXM>
int run(Params p, int capacity, int options, int64_t ws_ints) {
  const LaunchPlan plan = make_plan(p, MAXM, capacity, options);
  if (ws_ints < plan.ws_ints) return -2;
  for (int i = 0; i < plan.launches; ++i) {
    p.mode = plan.mode[i];
    const Params q = p;
    peft_eora_emu::launch(plan.grid[i], kThreads, plan.smem, [q]() { gptq_lora_kernel<T, BITS, MAXM>(q); });
  }
  return plan.launches * 100 + (plan.launches == 1 ? plan.grid[0] : plan.grid[1]);
}

template <typename T, int BITS>
int by_m(const Params& p, int capacity, int options, int64_t ws_ints) {
  if (p.M <= 8) return run<T, BITS, 8>(p, capacity, options, ws_ints);
  return run<T, BITS, 16>(p, capacity, options, ws_ints);
}

template <typename T>
int by_bits(const Params& p, int bits, int capacity, int options, int64_t ws_ints) {
  switch (bits) {
    case 2: return by_m<T, 2>(p, capacity, options, ws_ints);
    case 3: return by_m<T, 3>(p, capacity, options, ws_ints);
    case 4: return by_m<T, 4>(p, capacity, options, ws_ints);
    case 8: return by_m<T, 8>(p, capacity, options, ws_ints);
    default: return -1;
  }
}

}  // namespace

extern "C" {

// dtype: 0 = float16, 1 = bfloat16; options: kOpt* flags. Returns launches*100 + grid of the GEMV launch, < 0 on error.
int pe_emu_gptq_lora(int dtype, const void* x, const int32_t* qweight, const int32_t* qzeros, const void* scales,
                     const int32_t* g_idx, const void* bias, const void* lora_a, const void* lora_b,
                     const float* a_scale, const float* b_scale, void* out, int32_t* ws, int64_t ws_ints, int M,
                     int K, int N, int R, int qz_cols, int group_size, int zero_offset, int lora_bits, float scaling,
                     int bits, int capacity, int options, int a_group) {
  Params p{};
  p.x = x;
  p.qweight = qweight;
  p.qzeros = qzeros;
  p.scales = scales;
  p.g_idx = g_idx;
  p.bias = bias;
  p.lora_a = lora_a;
  p.lora_b = lora_b;
  p.a_scale = a_scale;
  p.b_scale = b_scale;
  p.out = out;
  p.ws = ws;
  p.M = M;
  p.K = K;
  p.N = N;
  p.R = R;
  p.qz_cols = qz_cols;
  p.group_size = group_size;
  p.zero_offset = zero_offset;
  p.lora_bits = lora_bits;
  p.scaling = scaling;
  p.a_group = a_group;
  if (M < 1 || M > kMaxM || K % 32 != 0) return -3;
  return dtype == 0 ? by_bits<__half>(p, bits, capacity, options, ws_ints)
                    : by_bits<__nv_bfloat16>(p, bits, capacity, options, ws_ints);
}

int pe_emu_max_m() { return kMaxM; }
int pe_emu_max_rank() { return kMaxRank; }
int64_t pe_emu_workspace_ints(int M, int R, int N) { return workspace_ints_for(M, R, N); }

// The plan for one call (tests of the planner):
// out = {ksplit, grid, p1_ctas, ksplit_a, ws_ints, lr_split, lr_chunk, smem, prefetch_rows}.
void pe_emu_plan(int M, int K, int N, int R, int capacity, int lora_bits, int options, int64_t l2_bytes,
                 int64_t* out) {
  Params p{};
  p.M = M;
  p.K = K;
  p.N = N;
  p.R = R;
  p.lora_bits = lora_bits;
  const LaunchPlan plan = make_plan(p, M <= 8 ? 8 : 16, capacity, options, l2_bytes);
  out[0] = p.ksplit;
  out[1] = plan.grid[0];
  out[2] = p.p1_ctas;
  out[3] = p.ksplit_a;
  out[4] = plan.ws_ints;
  out[5] = p.lr_split;
  out[6] = p.lr_chunk;
  out[7] = static_cast<int64_t>(plan.smem);
  out[8] = p.prefetch_rows;
}
}
