// Host entry of the fused GPTQ + low-rank kernel (see gptq_lora_kernel.cuh for the design):
// argument checks, then dispatch to the per-width translation units gptq_lora_b{2,3,4,8}.cu.
// Built just-in-time by peft_eora.kernels.cuda_ext with torch.utils.cpp_extension.load.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Optional.h>

#include "gptq_lora_launch.cuh"

namespace peft_eora {

namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Every tensor the kernel reads must sit on x's GPU (a host or peer pointer would be read as device memory).
void check_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "peft_eora: ", name, " is on ", t.device(), ", x on ", x.device(),
              ": move both to one GPU");
}

template <typename T>
void dispatch_bits(Params& p, int bits, int options, int64_t ws_ints, int device, cudaStream_t stream) {
  switch (bits) {
    case 2: launch_bits<T, 2>(p, options, ws_ints, device, stream); break;
    case 3: launch_bits<T, 3>(p, options, ws_ints, device, stream); break;
    case 4: launch_bits<T, 4>(p, options, ws_ints, device, stream); break;
    case 8: launch_bits<T, 8>(p, options, ws_ints, device, stream); break;
    default: TORCH_CHECK(false, "peft_eora: unsupported bits=", bits, " (expected 2, 3, 4 or 8)");
  }
}

}  // namespace

// y = x.dequant(W) + B.(scaling * A.x) + bias for a decode batch (M <= 16). x: [M, K].
at::Tensor gptq_lora_forward(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                             const at::Tensor& scales, const c10::optional<at::Tensor>& g_idx, int64_t group_size,
                             const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_a,
                             const c10::optional<at::Tensor>& lora_b, const c10::optional<at::Tensor>& lora_a_scale,
                             const c10::optional<at::Tensor>& lora_b_scale, int64_t bits, int64_t lora_bits,
                             double scaling, int64_t zero_offset, const at::Tensor& workspace, int64_t options) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "peft_eora: x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "peft_eora: x must be float16 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxM, "peft_eora: the CUDA kernel handles 1..", kMaxM, " rows, got ", M);
  TORCH_CHECK(K % 32 == 0, "peft_eora: in_features must be a multiple of 32, got ", K);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) % 4 == 0, "peft_eora: out_features must be a multiple of 4");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "peft_eora: unsupported bits=", bits);
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.dim() == 2,
              "peft_eora: qweight must be contiguous int32 [in*bits/32, out]");
  const int64_t N = qweight.size(1);
  TORCH_CHECK(qweight.size(0) == K * bits / 32, "peft_eora: qweight has ", qweight.size(0), " rows, expected ",
              K * bits / 32);
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(1) == N,
              "peft_eora: scales must be contiguous [groups, out] with x's dtype");
  const int64_t G = scales.size(0);
  check_device(qweight, x, "qweight");
  check_device(qzeros, x, "qzeros");
  check_device(scales, x, "scales");
  TORCH_CHECK(qzeros.scalar_type() == at::kInt && qzeros.is_contiguous() && qzeros.dim() == 2 && qzeros.size(0) == G &&
                  qzeros.size(1) * 32 >= N * bits,
              "peft_eora: qzeros must be contiguous int32 [groups, ceil(out*bits/32)]");
  TORCH_CHECK(aligned16(x.data_ptr()), "peft_eora: x must be 16-byte aligned");
  TORCH_CHECK(aligned16(qweight.data_ptr()), "peft_eora: qweight must be 16-byte aligned");
  TORCH_CHECK((reinterpret_cast<uintptr_t>(scales.data_ptr()) & 7u) == 0, "peft_eora: scales must be 8-byte aligned");

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gidx;
  if (g_idx.has_value() && g_idx->defined()) {
    gidx = g_idx->to(at::kInt).contiguous();
    TORCH_CHECK(gidx.numel() == K, "peft_eora: g_idx must have in_features entries");
    check_device(gidx, x, "g_idx");  // its values (< groups) are the caller's to keep: checking them would sync
  } else {
    if (group_size <= 0) group_size = K;
    TORCH_CHECK(G == (K + group_size - 1) / group_size, "peft_eora: scales has ", G, " groups; in_features ", K,
                " in groups of ", group_size, " needs ", (K + group_size - 1) / group_size);
    if (group_size % 32 != 0) {  // groups not aligned to 32-row blocks: per-row group lookup
      gidx = at::div(at::arange(K, x.options().dtype(at::kInt)), group_size, "floor").to(at::kInt);
    }
  }
  if (gidx.defined()) TORCH_CHECK(aligned16(gidx.data_ptr()), "peft_eora: g_idx must be 16-byte aligned");

  Params p{};
  p.x = x.data_ptr();
  p.qweight = qweight.data_ptr<int32_t>();
  p.qzeros = qzeros.data_ptr<int32_t>();
  p.scales = scales.data_ptr();
  p.g_idx = gidx.defined() ? gidx.data_ptr<int32_t>() : nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    check_device(bias_c, x, "bias");
    TORCH_CHECK(bias_c.scalar_type() == x.scalar_type() && bias_c.numel() == N,
                "peft_eora: bias must have x's dtype and out_features entries");
    p.bias = bias_c.data_ptr();
  }
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(K);
  p.N = static_cast<int>(N);
  p.qz_cols = static_cast<int>(qzeros.size(1));
  p.group_size = static_cast<int>(group_size);
  p.zero_offset = static_cast<int>(zero_offset);
  p.lora_bits = static_cast<int>(lora_bits);
  p.scaling = static_cast<float>(scaling);
  p.R = 0;
  at::Tensor a_c, b_c, sa_c, sb_c;
  if (lora_a.has_value() && lora_a->defined()) {
    TORCH_CHECK(lora_b.has_value() && lora_b->defined(), "peft_eora: lora_a given without lora_b");
    a_c = lora_a->contiguous();
    b_c = lora_b->contiguous();
    check_device(a_c, x, "lora_a");
    check_device(b_c, x, "lora_b");
    const int64_t R = a_c.size(0);
    TORCH_CHECK(R >= 1 && R <= kMaxRank, "peft_eora: rank must be in [1, ", kMaxRank, "], got ", R);
    TORCH_CHECK(b_c.dim() == 2 && b_c.size(0) == N, "peft_eora: lora_b must be [out, r]");
    if (lora_bits == 16) {
      TORCH_CHECK(a_c.scalar_type() == x.scalar_type() && b_c.scalar_type() == x.scalar_type(),
                  "peft_eora: float LoRA factors must have x's dtype");
      TORCH_CHECK(a_c.size(1) == K && b_c.size(1) == R, "peft_eora: lora_a must be [r, in], lora_b [out, r]");
    } else if (lora_bits == 8) {
      TORCH_CHECK(a_c.scalar_type() == at::kChar && b_c.scalar_type() == at::kChar,
                  "peft_eora: 8-bit LoRA factors must be int8");
      TORCH_CHECK(a_c.size(1) == K && b_c.size(1) == R, "peft_eora: lora_a must be [r, in], lora_b [out, r]");
    } else if (lora_bits == 4) {
      TORCH_CHECK(a_c.scalar_type() == at::kByte && b_c.scalar_type() == at::kByte,
                  "peft_eora: 4-bit LoRA factors must be packed uint8");
      TORCH_CHECK(a_c.size(1) == K / 2 && b_c.size(1) == (R + 1) / 2,
                  "peft_eora: packed int4 lora_a must be [r, in/2], lora_b [out, ceil(r/2)]");
    } else {
      TORCH_CHECK(false, "peft_eora: unsupported lora_bits=", lora_bits, " (expected 16, 8 or 4)");
    }
    TORCH_CHECK(aligned16(a_c.data_ptr()), "peft_eora: lora_a must be 16-byte aligned");
    TORCH_CHECK(aligned16(b_c.data_ptr()), "peft_eora: lora_b must be 16-byte aligned");
    if (lora_bits != 16) {
      TORCH_CHECK(lora_a_scale.has_value() && lora_b_scale.has_value(), "peft_eora: quantized LoRA needs scales");
      sa_c = lora_a_scale->to(at::kFloat).contiguous();
      sb_c = lora_b_scale->to(at::kFloat).contiguous();
      check_device(sa_c, x, "lora_a_scale");
      check_device(sb_c, x, "lora_b_scale");
      TORCH_CHECK(sb_c.numel() == N, "peft_eora: lora_b_scale must be [out]");
      if (sa_c.dim() == 2) {  // grouped: [r, K / group]
        TORCH_CHECK(sa_c.size(0) == R && sa_c.size(1) > 0 && K % sa_c.size(1) == 0 && (K / sa_c.size(1)) % 8 == 0,
                    "peft_eora: a grouped lora_a_scale must be [r, in / g] with g a multiple of 8");
        p.a_group = static_cast<int>(K / sa_c.size(1));
      } else {
        TORCH_CHECK(sa_c.numel() == R, "peft_eora: lora_a_scale must be [r] or [r, in / g]");
      }
      p.a_scale = sa_c.data_ptr<float>();
      p.b_scale = sb_c.data_ptr<float>();
    }
    p.lora_a = a_c.data_ptr();
    p.lora_b = b_c.data_ptr();
    p.R = static_cast<int>(R);
  }
  TORCH_CHECK(workspace.scalar_type() == at::kInt && workspace.is_contiguous(), "peft_eora: workspace must be contiguous int32");
  if (workspace.numel() > 0) {
    TORCH_CHECK(workspace.is_cuda() && workspace.device() == x.device(), "peft_eora: workspace must be on x's device");
    p.ws = workspace.data_ptr<int32_t>();
  }

  at::Tensor out = at::empty({M, N}, x.options());
  p.out = out.data_ptr();
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t ws_ints = workspace.numel();
  if (x.scalar_type() == at::kHalf) {
    dispatch_bits<__half>(p, static_cast<int>(bits), static_cast<int>(options), ws_ints, device, stream);
  } else {
    dispatch_bits<__nv_bfloat16>(p, static_cast<int>(bits), static_cast<int>(options), ws_ints, device, stream);
  }
  return out;
}

int64_t workspace_ints(int64_t M, int64_t R, int64_t N) {
  return workspace_ints_for(static_cast<int>(M), static_cast<int>(R), static_cast<int>(N));
}

}  // namespace peft_eora
