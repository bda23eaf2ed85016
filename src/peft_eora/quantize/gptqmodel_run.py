"""Running gptqmodel: importing it on small machines, and the calibrate → quantize → save → publish
driver that GPTQ and AWQ share.

    >>> gptqmodel = import_gptqmodel()      # sets GPTQMODEL_CPU_WORKERS=2 on < 4 cores

Output is written to a temporary sibling of the final folder and renamed into place;
gptqmodel's offload files and per-run logs go to another temporary folder, removed afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from ..embedded import atomic_publish, dtype_name, make_temp_dir, remove_stale_temps
from .calibration import calibration_metadata, gptq_calibration
from .checkpoints import META_FILE, _versions, machine_metadata, source_setting

logger = logging.getLogger("peft_eora.quantize")

INSTALL_HINT = "pip install 'peft-eora[gptq]'"


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


def _quantize_with_gptqmodel(
    model_dir: Path,
    final: Path,
    method: str,
    bits: int,
    group_size: int,
    num_samples: int,
    seq_len: int,
    dtype: torch.dtype,
    batch_size: int,
    device: str,
    qcfg_kw: dict[str, Any],
    user_kw: dict[str, Any],
    describe: Callable[[Any], dict[str, Any]],
    recorder: Callable[[Any], Any] | None = None,
) -> Path:
    """The part shared by :func:`quantize_gptq` and :func:`quantize_awq`: calibrate, quantize with
    gptqmodel into a temporary sibling of ``final``, write ``peft_eora_quantize.json`` and publish.

    ``describe(qcfg)`` returns the method-specific metadata; ``recorder(gptq_model)`` (optional)
    is a context manager around ``quantize()`` whose value has ``save(folder) -> dict`` (extra
    files written into the checkpoint, and their metadata).
    """
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
    label = f"{method.upper()} w{bits}g{group_size}"
    try:
        qcfg = QuantizeConfig(
            bits=bits, group_size=group_size, offload_to_disk_path=str(offload), **qcfg_kw, **user_kw
        )
        logger.info("%s of %s on %d×≤%d tokens (%d) → %s", label, model_dir, len(examples), seq_len, n_tokens, final)
        start = time.perf_counter()
        model = GPTQModel.load(str(model_dir), qcfg, device=device, dtype=dtype)
        load_s = time.perf_counter() - start
        with recorder(model) if recorder is not None else nullcontext() as recorded:
            model.quantize(examples, batch_size=batch_size, tokenizer=tokenizer)
        quant_s = time.perf_counter() - start - load_s
        model.save(str(tmp))
        scrub_offload_path(tmp)
        tokenizer.save_pretrained(tmp)
        extra = recorded.save(tmp) if recorded is not None else {}
        wall = time.perf_counter() - start
        meta = {
            "method": method,
            "bits": bits,
            "group_size": group_size,
            **describe(qcfg),
            "format": str(getattr(qcfg.format, "value", qcfg.format)),
            "pack_dtype": dtype_name(qcfg.pack_dtype),
            "lm_head_quantized": qcfg.lm_head,
            "user_overrides": {k: repr(v) for k, v in user_kw.items()},
            "quantize_dtype": dtype_name(dtype),
            **source_setting(model_dir),
            "calibration": calibration_metadata(num_samples, len(examples), seq_len, n_tokens, batch_size),
            **extra,
            "versions": _versions(gptqmodel=getattr(gptqmodel, "__version__", "unknown")),
            "device": device,
            "machine": machine_metadata(),
            "wall_time_s": {"load": round(load_s, 2), "quantize": round(quant_s, 2), "total": round(wall, 2)},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        atomic_publish(tmp, final)
        logger.info("%s done in %.1f s: %s", label, wall, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore_log_dir()
        shutil.rmtree(offload, ignore_errors=True)
    return final
