// Kernel instantiations for 8-bit GPTQ weights (float16 and bfloat16; M variants 1, 4, 16).
#define PEFT_EORA_BITS_UNIT
#include "gptq_lora_launch.cuh"

namespace peft_eora {
PEFT_EORA_LAUNCH_BITS_BOTH(, 8)
}  // namespace peft_eora
