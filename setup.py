"""Build hook (the metadata is in pyproject.toml): the wheel carries the CUDA sources of ``cuda/`` as
``peft_eora/_cuda``, where :mod:`peft_eora.kernels.cuda_ext` looks when no source checkout is at hand, so that
``pip install peft-eora`` builds the fused kernel on a GPU machine as a checkout does."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CUDA = Path(__file__).resolve().parent / "cuda"
#: what the extension build reads (peft_eora.kernels.cuda_ext SOURCES + HEADERS), not the CPU-emulation test files
SHIPPED = ("gptq_lora.cu", "gptq_lora_b2.cu", "gptq_lora_b3.cu", "gptq_lora_b4.cu", "gptq_lora_b8.cu", "bindings.cpp",
           "gptq_lora_kernel.cuh", "gptq_lora_launch.cuh")


class BuildPyWithCudaSources(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "peft_eora" / "_cuda"
        self.mkpath(str(target))
        for name in SHIPPED:
            self.copy_file(str(CUDA / name), str(target / name))


setup(cmdclass={"build_py": BuildPyWithCudaSources})
