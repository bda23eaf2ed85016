"""Shared test fixtures: a tiny real model (the first 2 layers of the embedded SmolLM2-135M)
and its GPTQ 4-bit / 3-bit versions, all cached on disk under ``peft_eora.embedded.cache_dir()``
(``$PEFT_EORA_CACHE`` or ``~/.cache/peft_eora``).

First run: ~35 s for the export and ~1 min per quantized model on 2 CPU cores; later runs
reuse the cache. Fixtures skip (with the install command) when the embedded model or
gptqmodel is not installed.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub or gptqmodel.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

#: The tiny test model: first N decoder layers of the embedded model, exported in float32
#: (the GGUF's dequantized weights bit for bit; fastest on CPU).
TINY_LAYERS = 2
TINY_DTYPE = torch.float32
#: GPTQ settings of the tiny quantized fixtures (a few short C4 windows: fast, deterministic).
TINY_GROUP_SIZE = 128
TINY_CALIB_SAMPLES = 8
TINY_CALIB_SEQ_LEN = 64


@pytest.fixture
def benchmark_module():
    """``benchmark_module("linalg")``: ``benchmarks/linalg.py`` imported as a module (the benchmarks
    import their siblings by name, so their folder is on ``sys.path`` while one loads)."""
    import importlib
    import sys

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")

    def load(name: str):
        sys.path.insert(0, folder)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(folder)

    return load


def _require_embedded() -> None:
    from peft_eora.embedded import embedded_gguf

    try:
        embedded_gguf()
    except ImportError as exc:
        pytest.skip(f"embedded model not installed: {exc}")


def _require_gptqmodel() -> None:
    for module in ("gptqmodel", "optimum"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed: pip install 'peft-eora[gptq]'")


@pytest.fixture(scope="session")
def tiny_original_dir() -> Path:
    """2-layer float32 export of the embedded model (plain HF checkpoint folder)."""
    from peft_eora.embedded import export_original, is_complete, original_dir

    if not is_complete(original_dir(TINY_DTYPE, TINY_LAYERS)):
        _require_embedded()
    return export_original(TINY_DTYPE, num_layers=TINY_LAYERS)


@pytest.fixture(scope="session")
def tokenizer(tiny_original_dir: Path):
    """The SmolLM2 tokenizer (saved with every export)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_original_dir)


def _tiny_gptq(tiny_original_dir: Path, bits: int) -> Path:
    from peft_eora.quantize import quantize_gptq

    # Cached in cache_dir()/models/smollm2-135m-instruct-float32-2l-<path hash>-gptq-w{bits}g128-n8x64:
    # keyed on the source (its folder: dtype, layers), bits, group size and calibration size.
    return quantize_gptq(
        tiny_original_dir,
        bits=bits,
        group_size=TINY_GROUP_SIZE,
        num_samples=TINY_CALIB_SAMPLES,
        seq_len=TINY_CALIB_SEQ_LEN,
    )


@pytest.fixture(scope="session")
def tiny_gptq4_dir(tiny_original_dir: Path) -> Path:
    """GPTQ w4 g128 checkpoint of the tiny model (gptqmodel defaults otherwise)."""
    _require_gptqmodel()
    return _tiny_gptq(tiny_original_dir, 4)


@pytest.fixture(scope="session")
def tiny_gptq3_dir(tiny_original_dir: Path) -> Path:
    """GPTQ w3 g128 checkpoint of the tiny model (gptqmodel defaults otherwise)."""
    _require_gptqmodel()
    return _tiny_gptq(tiny_original_dir, 3)


#: AWQ group size of the tiny fixture: AWQ needs whole groups and SmolLM2's 576 is not a multiple of 128.
TINY_AWQ_GROUP_SIZE = 64


@pytest.fixture(scope="session")
def tiny_awq4_dir(tiny_original_dir: Path) -> Path:
    """AWQ w4 g64 checkpoint of the tiny model (gptqmodel, GEMM layout, zero point; ~3 min once on
    2 cores, then cached as ...-float32-2l-<path hash>-awq-w4g64-n8x64), with its recorded smoothing scales."""
    _require_gptqmodel()
    from peft_eora.quantize import quantize_awq

    return quantize_awq(
        tiny_original_dir,
        bits=4,
        group_size=TINY_AWQ_GROUP_SIZE,
        num_samples=TINY_CALIB_SAMPLES,
        seq_len=TINY_CALIB_SEQ_LEN,
    )


# Tiny random models with a dense (fake-quantized) base: fast tests of the driver and PEFT plumbing.
from fixtures_tiny import calib_ids, tiny_llama  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_original_dir: Path) -> str:
    """A folder holding the SmolLM2 tokenizer (the tiny export's)."""
    return str(tiny_original_dir)
