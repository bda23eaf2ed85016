"""compressed-tensors checkpoints (llm-compressor / vLLM ``W4A16``, ``W8A16``), made here by round to nearest.

    >>> ct4 = quantize_compressed_tensors(export_original(torch.float32), bits=4, group_size=64)
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ..embedded import atomic_publish, make_temp_dir, remove_stale_temps
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
from .checkpoints import META_FILE, _cached, _checkpoint_dir, _versions, source_setting

logger = logging.getLogger("peft_eora.quantize")


def quantize_compressed_tensors(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    out_dir: str | Path | None = None,
) -> Path:
    """Write a compressed-tensors checkpoint of ``model_dir`` (symmetric int ``bits`` weights,
    float activations: the ``W4A16``/``W8A16`` schemes of llm-compressor and vLLM) and return its
    folder (``cache_dir()/models/<name>-ct-w<bits>g<group>``, cached; seconds for SmolLM2-135M).

    Scales are round-to-nearest from each group's absolute maximum (``group_size`` ≤ 0: one per
    output channel), computed by compressed-tensors itself, and the weights are stored as
    ``pack-quantized`` int32 words. Decoder-block linears are quantized; embeddings and the LM head
    stay float. Load it with ``AutoModelForCausalLM.from_pretrained`` (transformers decompresses it
    on the first forward, or when EoRA prepares the model). Symmetric only: transformers 5.24 fails
    to load the packed zero points of asymmetric checkpoints (compressed-tensors 0.20).

    >>> ct4 = quantize_compressed_tensors(export_original(torch.float32), bits=4, group_size=64)
    >>> model = AutoModelForCausalLM.from_pretrained(ct4, dtype=torch.float32)
    """
    if importlib.util.find_spec("compressed_tensors") is None:
        raise ImportError("compressed-tensors checkpoints need compressed-tensors: pip install 'peft-eora[ct]'")
    if bits not in (4, 8):
        raise ValueError(f"compressed-tensors pack-quantized int weights here have 4 or 8 bits, got bits={bits}.")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint folder (no config.json)")
    config = json.loads((model_dir / "config.json").read_text())
    if group_size > 0:
        dims = {k: config[k] for k in ("hidden_size", "intermediate_size") if isinstance(config.get(k), int)}
        if isinstance(config.get("head_dim"), int) and isinstance(config.get("num_attention_heads"), int):
            dims["num_attention_heads × head_dim"] = config["num_attention_heads"] * config["head_dim"]  # o_proj's input
        bad = {k: v for k, v in dims.items() if v % group_size}
        if bad:
            raise ValueError(f"group_size={group_size} must divide every linear's input size; {model_dir.name} has {bad}.")
    final = Path(out_dir) if out_dir is not None else _checkpoint_dir(
        model_dir, "ct", bits, group_size, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN)
    if _cached(final, "compressed-tensors", bits, group_size, source_setting(model_dir)):
        return final

    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model import decoder_blocks_path

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    blocks = decoder_blocks_path(model)
    strategy = {"strategy": "group", "group_size": group_size} if group_size > 0 else {"strategy": "channel"}
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, **strategy)
    outside = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith(blocks + ".")]
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=outside)
    apply_quantization_config(model, qconfig, show_progress=False)
    quantized = 0
    with torch.no_grad():
        for module in model.modules():
            if not is_module_quantized(module):
                continue
            w = module.weight.detach()
            grouped = w.unflatten(-1, (w.shape[-1] // group_size, group_size)) if group_size > 0 else w[:, None, :]
            scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
            quantized += 1
    if quantized == 0:
        raise ValueError(f"No linear layer inside {blocks} of {model_dir}: nothing to quantize.")
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    remove_stale_temps(final)
    tmp = make_temp_dir(final)
    try:
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        meta = {
            "method": "compressed-tensors",
            "bits": bits,
            "group_size": group_size,
            "scheme": f"W{bits}A16 symmetric int, {'group ' + str(group_size) if group_size > 0 else 'per channel'}, "
                      "round to nearest (absmax scale)",
            "format": "pack-quantized",
            "quantized_linears": quantized,
            **source_setting(model_dir),
            "versions": _versions(compressed_tensors=compressed_tensors.__version__),
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        atomic_publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("compressed-tensors W%dA16 g%d of %s: %d linears → %s", bits, group_size, model_dir, quantized, final)
    return final
