// Python bindings of the fused GPTQ + low-rank CUDA kernel (loaded by peft_eora.kernels.cuda_ext).
#include <torch/extension.h>

namespace peft_eora {
at::Tensor gptq_lora_forward(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& qzeros,
                             const at::Tensor& scales, const c10::optional<at::Tensor>& g_idx, int64_t group_size,
                             const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_a,
                             const c10::optional<at::Tensor>& lora_b, const c10::optional<at::Tensor>& lora_a_scale,
                             const c10::optional<at::Tensor>& lora_b_scale, int64_t bits, int64_t lora_bits,
                             double scaling, int64_t zero_offset, const at::Tensor& workspace, int64_t options);
int64_t workspace_ints(int64_t M, int64_t R, int64_t N);
}  // namespace peft_eora

// Keep in sync with gptq_lora_kernel.cuh (checked by tests/test_kernels.py).
static constexpr int64_t kMaxM = 16;
static constexpr int64_t kMaxRank = (256 - 2) * 8;
static constexpr int64_t kAbiVersion = 3;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peft-eora fused GPTQ GEMV + low-rank kernel";
  m.def("gptq_lora_forward", &peft_eora::gptq_lora_forward, "y = x.dequant(W) + B.(scaling*A.x) + bias (M <= 16)",
        py::arg("x"), py::arg("qweight"), py::arg("qzeros"), py::arg("scales"), py::arg("g_idx"),
        py::arg("group_size"), py::arg("bias"), py::arg("lora_a"), py::arg("lora_b"), py::arg("lora_a_scale"),
        py::arg("lora_b_scale"), py::arg("bits"), py::arg("lora_bits"), py::arg("scaling"), py::arg("zero_offset"),
        py::arg("workspace"), py::arg("options"));
  m.def("workspace_ints", &peft_eora::workspace_ints, "int32 words of workspace for M rows, rank R, N outputs",
        py::arg("M"), py::arg("R"), py::arg("N"));
  m.attr("MAX_M") = kMaxM;
  m.attr("MAX_RANK") = kMaxRank;
  m.attr("ABI_VERSION") = kAbiVersion;
}
