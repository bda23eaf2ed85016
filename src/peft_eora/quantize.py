"""GPTQ-compress a checkpoint with gptqmodel, and load the result back through transformers.

gptqmodel is optional and imported lazily (``import peft_eora`` never imports it)::

    >>> from peft_eora.embedded import export_original
    >>> from peft_eora.quantize import quantize_gptq, load_quantized
    >>> q4 = quantize_gptq(export_original(), bits=4)        # minutes on CPU; cached afterwards
    >>> model = load_quantized(q4)                            # TorchLinear modules on CPU

Calibration: the shipped C4 sample (``data/c4_validation_256.jsonl``), documents tokenised
without special tokens in file order, joined with EOS and cut into consecutive windows of
``seq_len`` tokens (deterministic; no randomness involved). Quantization settings are
gptqmodel's defaults apart from ``bits`` and ``group_size`` (override any via ``**kw``); the
weights are quantized from float32 (gptqmodel's own CPU default would first cast them to
bfloat16). Everything that defines the checkpoint is recorded in ``peft_eora_quantize.json``
next to it.

Output goes to ``cache_dir()/models/<name>-gptq-w<bits>g<group>`` (plus ``-n<N>x<L>`` when the
calibration size differs from the default 128×512), written to a temporary sibling folder and
renamed into place; gptqmodel's offload files go to another temporary sibling folder that is
removed afterwards, never into the working directory.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .embedded import atomic_publish, cache_dir, dtype_name, is_complete, make_temp_dir, remove_stale_temps

logger = logging.getLogger(__name__)

C4_SAMPLE = Path(__file__).resolve().parent / "data" / "c4_validation_256.jsonl"
META_FILE = "peft_eora_quantize.json"
INSTALL_HINT = "pip install 'peft-eora[gptq]'"
DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


def import_gptqmodel() -> ModuleType:
    """Import gptqmodel with an environment that works on small machines.

    gptqmodel sizes its CPU thread pool from ``GPTQMODEL_CPU_WORKERS`` (default: half the
    cores) and refuses a pool smaller than its 2 model-loader workers, so on machines with
    fewer than 4 cores the variable is set to 2 unless the user set it. Note that importing
    gptqmodel prints a banner and sets ``PYTORCH_ALLOC_CONF`` and ``CUDA_DEVICE_ORDER``.
    """
    if (os.cpu_count() or 1) < 4:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        import gptqmodel
    except ImportError as exc:
        raise ImportError(f"GPTQ quantization and loading need gptqmodel: {INSTALL_HINT}") from exc
    return gptqmodel


def gptq_calibration(
    tokenizer: Any,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    path: str | Path = C4_SAMPLE,
    field: str = "text",
) -> list[dict[str, list[int]]]:
    """Calibration examples for gptqmodel: ``[{"input_ids": [...], "attention_mask": [...]}]``.

    Documents of the JSON-lines file at ``path`` are tokenised in file order (no special
    tokens), joined with the EOS token and cut into ``num_samples`` consecutive windows of
    ``seq_len`` tokens. If the text runs out, fewer windows are returned (with a warning); the
    ragged tail is kept as a last, shorter window when it has at least 10 tokens (gptqmodel's
    minimum).

    >>> examples = gptq_calibration(tokenizer, num_samples=8, seq_len=64)
    """
    if num_samples < 1 or seq_len < 10:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 10, got {num_samples}, {seq_len}")
    eos = tokenizer.eos_token_id
    needed = num_samples * seq_len
    stream: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            text = json.loads(line)[field].replace("\r\n", "\n")
            if stream and eos is not None:
                stream.append(eos)
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(stream) >= needed:
                break
    windows = [stream[i : i + seq_len] for i in range(0, min(len(stream), needed), seq_len)]
    if windows and len(windows[-1]) < min(seq_len, 10):
        windows.pop()
    if len(windows) < num_samples or len(windows[-1]) < seq_len:
        logger.warning(
            "%s holds only %d tokens: %d calibration windows instead of %d×%d",
            path, len(stream), len(windows), num_samples, seq_len,
        )
    return [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]


def _redirect_gptqmodel_logs(folder: Path):
    """Point gptqmodel's per-run layer logs (``./logs/gptq_log_*.log`` relative to the working
    directory) at ``folder``; returns a function that restores the previous location.
    The per-module losses also land in ``quant_log.csv`` inside the checkpoint."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # layout of another gptqmodel release: leave it alone
        return lambda: None
    previous = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    if previous is None:
        return lambda: None
    loop_processor._PROJECT_LOG_DIR = folder

    def restore() -> None:
        loop_processor._PROJECT_LOG_DIR = previous

    return restore


def scrub_offload_path(checkpoint: str | Path) -> None:
    """Drop the quantization-time ``offload_to_disk_path`` that gptqmodel writes into
    ``quantize_config.json`` and ``config.json``: gptqmodel would reuse that (temporary) folder
    when it later offloads modules of this checkpoint, e.g. for its own EoRA generation."""
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        path = Path(checkpoint) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        cfg = data.get(key) if key else data
        meta = (cfg or {}).get("meta") or {}
        if meta.pop("offload_to_disk_path", None) is not None:
            path.write_text(json.dumps(data, indent=2, sort_keys=key is not None) + "\n")


def gptq_dir(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Path:
    """Default output folder of :func:`quantize_gptq` for these settings."""
    name = f"{Path(model_dir).name}-gptq-w{bits}g{group_size}"
    if (num_samples, seq_len) != (DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN):
        name += f"-n{num_samples}x{seq_len}"
    return cache_dir() / "models" / name


def quantize_gptq(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    out_dir: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    device: str = "cpu",
    **kw: Any,
) -> Path:
    """GPTQ-quantize the checkpoint at ``model_dir`` with gptqmodel; return the output folder.

    ``QuantizeConfig(bits=bits, group_size=group_size, **kw)``: everything else is
    gptqmodel's default (recorded in ``peft_eora_quantize.json``). Calibration:
    :func:`gptq_calibration` (``num_samples`` windows of ``seq_len`` C4 tokens). The weights
    are loaded in ``dtype`` on ``device`` for quantization. A complete output folder is
    returned at once; one made with different bits or group size raises ``ValueError``.

    >>> q3 = quantize_gptq(export_original(), bits=3, group_size=128)
    """
    model_dir = Path(model_dir)
    final = Path(out_dir) if out_dir is not None else gptq_dir(model_dir, bits, group_size, num_samples, seq_len)
    if is_complete(final):
        meta = json.loads((final / META_FILE).read_text())
        if (meta.get("bits"), meta.get("group_size")) != (bits, group_size):
            raise ValueError(
                f"{final} holds a w{meta.get('bits')}g{meta.get('group_size')} checkpoint, not "
                f"w{bits}g{group_size}: pass another out_dir or delete it"
            )
        return final
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint folder (no config.json)")

    gptqmodel = import_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = gptq_calibration(tokenizer, num_samples, seq_len)
    n_tokens = sum(len(e["input_ids"]) for e in examples)

    remove_stale_temps(final)
    tmp = make_temp_dir(final)
    offload = make_temp_dir(final, "offload")
    restore_log_dir = _redirect_gptqmodel_logs(offload / "logs")
    try:
        qcfg = QuantizeConfig(bits=bits, group_size=group_size, offload_to_disk_path=str(offload), **kw)
        logger.info(
            "GPTQ w%dg%d of %s on %d×≤%d tokens (%d) → %s",
            bits, group_size, model_dir, len(examples), seq_len, n_tokens, final,
        )
        start = time.perf_counter()
        model = GPTQModel.load(str(model_dir), qcfg, device=device, dtype=dtype)
        load_s = time.perf_counter() - start
        model.quantize(examples, batch_size=batch_size, tokenizer=tokenizer)
        quant_s = time.perf_counter() - start - load_s
        model.save(str(tmp))
        scrub_offload_path(tmp)
        tokenizer.save_pretrained(tmp)
        wall = time.perf_counter() - start
        meta = {
            "method": "gptq",
            "bits": bits,
            "group_size": group_size,
            "sym": qcfg.sym,
            "desc_act": qcfg.desc_act,
            "act_group_aware": getattr(qcfg, "act_group_aware", None),
            "damp_percent": getattr(qcfg, "damp_percent", None),
            "damp_auto_increment": getattr(qcfg, "damp_auto_increment", None),
            "true_sequential": qcfg.true_sequential,
            "format": str(getattr(qcfg.format, "value", qcfg.format)),
            "pack_dtype": dtype_name(qcfg.pack_dtype),
            "lm_head_quantized": qcfg.lm_head,
            "user_overrides": {k: repr(v) for k, v in kw.items()},
            "quantize_dtype": dtype_name(dtype),
            "source_model": str(model_dir.resolve()),
            "calibration": {
                "data": f"peft_eora/data/{C4_SAMPLE.name}",
                "recipe": "docs in file order, no special tokens, EOS-joined, consecutive windows",
                "num_samples": len(examples),
                "seq_len": seq_len,
                "tokens": n_tokens,
                "batch_size": batch_size,
            },
            "versions": {
                "gptqmodel": getattr(gptqmodel, "__version__", "unknown"),
                "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "python": platform.python_version(),
            },
            "device": device,
            "cpu_count": os.cpu_count(),
            "wall_time_s": {"load": round(load_s, 2), "quantize": round(quant_s, 2), "total": round(wall, 2)},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        atomic_publish(tmp, final)
        logger.info("GPTQ w%dg%d done in %.1f s: %s", bits, group_size, wall, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore_log_dir()
        shutil.rmtree(offload, ignore_errors=True)
    return final


def load_quantized(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    backend: str = "gptq_torch",
    compute_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Load a GPTQ checkpoint through ``transformers.AutoModelForCausalLM`` (eval mode).

    transformers dispatches to gptqmodel. ``backend`` is a gptqmodel backend name; the default
    ``"gptq_torch"`` gives ``gptqmodel.nn_modules.qlinear.torch.TorchLinear`` for every bit
    width, whose buffers keep the GPTQ packed layout and whose ``dequantize_weight()`` is what
    its forward multiplies by. With ``"auto"``, 4-bit layers on CPU become ``TorchAtenLinear``
    instead: it repacks its buffers in place on the first forward (after which
    ``dequantize_weight()`` returns garbage) and fails when ``in_features`` is not a multiple of
    the group size (SmolLM2's 576 with g128).

    ``dtype`` is the model dtype (activations, embeddings, norms); ``None`` picks float32 on
    CPU (exact and by far the fastest there: CPUs without AVX-512-BF16/AMX run bfloat16 and
    float16 matmuls ~100x slower than float32) and bfloat16 elsewhere. gptqmodel keeps the
    quantized layers' ``scales`` in float16 whatever ``dtype`` is, so ``dequantize_weight()``
    is float16 and the forward casts it to the activation dtype: in float32 and float16 a
    layer computes exactly ``x @ dequantize_weight()``; in bfloat16 the weight is additionally
    rounded to bfloat16. ``compute_dtype`` (optional) runs everything outside the quantized
    layers in that dtype instead, while ``dtype`` then only sets the scales' dtype (a cast
    from the stored float16, exact for float16/float32)::

        >>> model = load_quantized(q4, dtype=torch.float16, compute_dtype=torch.float32)

    float32 loads and runs on CPU. The first load in a fresh process can be slow (kernels
    are compiled with torch.compile).

    >>> model = load_quantized(quantize_gptq(export_original(), bits=4))
    """
    import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoConfig, AutoModelForCausalLM, GPTQConfig

    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    stored = AutoConfig.from_pretrained(str(path)).quantization_config
    qcfg = GPTQConfig(bits=stored["bits"], group_size=stored.get("group_size", 128), backend=backend)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=compute_dtype or dtype, device_map=str(device), quantization_config=qcfg
    )
    if compute_dtype is not None:
        for module in model.modules():
            if isinstance(module, BaseQuantLinear) and module.scales.dtype != dtype:
                module.scales = module.scales.to(dtype)
    return model.eval()


def upcast_unquantized(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Cast every floating tensor outside the quantized layers (embeddings, norms, lm_head)
    to ``dtype`` in place; quantized layers keep their packed weights and scales. For a model
    loaded elsewhere; :func:`load_quantized` does this with ``compute_dtype``.

    >>> upcast_unquantized(model_loaded_in_fp16)   # float32 activations, fp16 scales
    """
    import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    quant = [m for m in model.modules() if isinstance(m, BaseQuantLinear)]
    inside = {id(t) for m in quant for t in (*m.parameters(), *m.buffers())}
    for module in model.modules():
        if isinstance(module, BaseQuantLinear):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and id(param) not in inside and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and id(buf) not in inside and buf.dtype != dtype:
                setattr(module, name, buf.to(dtype))
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model


__all__ = [
    "import_gptqmodel",
    "gptq_calibration",
    "gptq_dir",
    "quantize_gptq",
    "load_quantized",
    "upcast_unquantized",
    "scrub_offload_path",
]
