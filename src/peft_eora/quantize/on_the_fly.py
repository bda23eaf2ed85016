"""Formats quantized on the fly at load time (bitsandbytes NF4/FP4, HQQ, torchao int/FP8): no
calibration data, deterministic, seconds; nothing cached.

    >>> nf4 = load_and_quantize(export_original(torch.float32), "bnb-nf4")
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("peft_eora.quantize")

#: Formats quantized on the fly at load time (data-free, deterministic, seconds): see :func:`load_and_quantize`.
ON_THE_FLY = {
    "bnb-nf4": "bitsandbytes 4-bit NormalFloat (blocksize 64), Linear4bit",
    "bnb-fp4": "bitsandbytes 4-bit float (blocksize 64), Linear4bit",
    "hqq": "HQQ (half-quadratic, zero point + scale per group), HQQLinear, 1-8 bits",
    "torchao": "torchao weight-only int1-8 per group (IntxWeightOnlyConfig; int8: Int8WeightOnlyConfig), nn.Linear",
    "torchao-fp8": "torchao weight-only float8 e4m3, one scale per output row (Float8WeightOnlyConfig), nn.Linear",
}
_ON_THE_FLY_INSTALL = {"bnb-nf4": "bnb", "bnb-fp4": "bnb", "hqq": "hqq", "torchao": "torchao", "torchao-fp8": "torchao"}


def load_and_quantize(
    model_dir: str | Path,
    method: str,
    bits: int | None = None,
    group_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    double_quant: bool = False,
) -> torch.nn.Module:
    """Load the float checkpoint at ``model_dir`` and quantize its decoder linears on the fly
    (no calibration data; a few seconds for SmolLM2-135M on a CPU); returns the model (eval).

    ``bits`` defaults to 8 for ``"torchao-fp8"`` and 4 otherwise. ``method`` is one of
    :data:`ON_THE_FLY`: ``"bnb-nf4"``/``"bnb-fp4"`` (bitsandbytes
    ``Linear4bit`` via transformers' ``BitsAndBytesConfig``; ``bits`` must be 4, ``group_size``
    is bnb's blocksize 64, ``double_quant`` quantizes the absmax too), ``"hqq"`` (each
    ``nn.Linear`` in the decoder blocks replaced by ``hqq``'s ``HQQLinear(nbits=bits,
    group_size)``; transformers 5.x has no HQQ loader yet), ``"torchao"`` (transformers'
    ``TorchAoConfig`` with ``IntxWeightOnlyConfig(int<bits>, PerGroup(group_size))``, or
    ``Int8WeightOnlyConfig`` per channel for 8 bits; the CPU layouts of torchao 0.18 — its
    ``Int4WeightOnlyConfig`` needs CUDA kernels), ``"torchao-fp8"`` (``Float8WeightOnlyConfig``:
    float8 e4m3 weights with one scale per output row, activations untouched; ``bits`` must be 8,
    ``group_size`` is unused). The LM head and embeddings stay float.

    >>> model = load_and_quantize(export_original(torch.float32), "bnb-nf4")
    >>> model = load_and_quantize(path, "hqq", bits=3, group_size=64)
    >>> model = load_and_quantize(path, "torchao-fp8", bits=8)
    """
    from transformers import AutoModelForCausalLM

    if method not in ON_THE_FLY:
        raise ValueError(f"Unknown on-the-fly method {method!r}; choose one of {sorted(ON_THE_FLY)}.")
    if bits is None:
        bits = 8 if method == "torchao-fp8" else 4
    # the options first: a wrong one is refused whether or not the library is installed
    if double_quant and not method.startswith("bnb-"):
        raise ValueError(f"double_quant (quantizing the block scales) is a bitsandbytes option; {method} has none.")
    if method.startswith("bnb-"):
        if bits != 4:
            raise ValueError(f"bitsandbytes 4-bit formats have 4 bits, got bits={bits}.")
        if group_size != 64:
            raise ValueError(f"bitsandbytes 4-bit formats quantize blocks of 64 weights, got group_size={group_size}.")
    elif method == "torchao-fp8" and bits != 8:
        raise ValueError(f"torchao-fp8 stores 8-bit float weights, got bits={bits}; pass bits=8.")
    elif method == "torchao" and not 1 <= bits <= 8:
        raise ValueError(f"torchao weight-only quantization has 1-8 bits, got bits={bits}.")
    extra = _ON_THE_FLY_INSTALL[method]
    library = {"bnb": "bitsandbytes", "hqq": "hqq", "torchao": "torchao"}[extra]
    if importlib.util.find_spec(library) is None:
        raise ImportError(f"{method} needs {library}: pip install 'peft-eora[{extra}]'")
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": str(device)}
    if method.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=method[4:], bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=double_quant,
        )
    elif method == "torchao-fp8":
        from torchao.quantization import Float8WeightOnlyConfig
        from transformers import TorchAoConfig

        kwargs["quantization_config"] = TorchAoConfig(quant_type=Float8WeightOnlyConfig())
    elif method == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup
        from transformers import TorchAoConfig

        quant = Int8WeightOnlyConfig() if bits == 8 else IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size))
        kwargs["quantization_config"] = TorchAoConfig(quant_type=quant)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if method == "hqq":
        _hqq_quantize_(model, bits, group_size, dtype, device)
    return model.eval()


def _hqq_quantize_(model: torch.nn.Module, bits: int, group_size: int, dtype: torch.dtype, device: str) -> None:
    """Replace every ``nn.Linear`` inside the decoder blocks by an ``HQQLinear`` (PyTorch backend)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    from ..model import decoder_blocks_path

    if HQQLinear.backend not in (HQQBackend.PYTORCH, HQQBackend.PYTORCH_FORWARD):
        logger.info("HQQLinear backend is %s (set globally elsewhere); keeping it", HQQLinear.backend)
    blocks = model.get_submodule(decoder_blocks_path(model))
    names = [(b, n) for b, block in enumerate(blocks) for n, m in block.named_modules() if type(m) is torch.nn.Linear]
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    for b, name in tqdm(names, desc=f"HQQ w{bits}g{group_size}", unit="linear", disable=len(names) < 50):
        linear = blocks[b].get_submodule(name)
        blocks[b].set_submodule(name, HQQLinear(linear, config, compute_dtype=dtype, device=str(device)))
