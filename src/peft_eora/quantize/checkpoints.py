"""Where compressed checkpoints are cached, and the metadata file that says what made them.

    >>> gptq_dir(export_original(), bits=3)     # cache_dir()/models/<name>-gptq-w3g128
    >>> json.loads((gptq_dir(...) / META_FILE).read_text())["wall_time_s"]

Each quantizer writes ``peft_eora_quantize.json`` (method, bits, group size, settings, versions,
calibration, timings) into its checkpoint; a complete folder with other settings is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

import torch

from ..embedded import cache_dir, dtype_name, is_complete
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN

META_FILE = "peft_eora_quantize.json"


def source_label(model_dir: str | Path) -> str:
    """``<folder name>-<8 hex digits of its resolved path>``: two models in folders of one name get two cache
    folders (the name alone once handed one model's checkpoint back for the other)."""
    path = Path(model_dir).expanduser().resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def source_setting(model_dir: str | Path) -> dict[str, str]:
    """The ``source_model`` a cached checkpoint must record to be handed back (see :func:`_cached`)."""
    return {"source_model": str(Path(model_dir).expanduser().resolve())}


def adopt_legacy(final: Path, legacy: Path, model_dir: str | Path) -> Path:
    """``final``, or ``legacy`` (the name a checkpoint was cached under before folder names held the source's path
    hash) where only that exists and it records this source: an upgrade does not quantize again. Used where it is,
    not renamed: adapters and smoothed originals made from it record its path."""
    if final.exists() or not is_complete(legacy):
        return final
    try:
        recorded = json.loads((legacy / META_FILE).read_text()).get("source_model")
    except (OSError, ValueError):
        return final
    return legacy if recorded == source_setting(model_dir)["source_model"] else final


def cached_model_dir(model_dir: str | Path, settings: str, num_samples: int, seq_len: int) -> Path:
    """``cache_dir()/models/<source label>-<settings>[-n<samples>x<seq_len>]`` for a checkpoint made from
    ``model_dir`` (or the name it was cached under before, see :func:`adopt_legacy`)."""
    suffix = f"-{settings}"
    if (num_samples, seq_len) != (DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN):
        suffix += f"-n{num_samples}x{seq_len}"
    models = cache_dir() / "models"
    return adopt_legacy(models / f"{source_label(model_dir)}{suffix}", models / f"{Path(model_dir).name}{suffix}",
                        model_dir)


def _checkpoint_dir(model_dir: str | Path, method: str, bits: int, group_size: int, num_samples: int, seq_len: int) -> Path:
    return cached_model_dir(model_dir, f"{method}-w{bits}g{group_size}", num_samples, seq_len)


def gptq_dir(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Path:
    """Default output folder of :func:`quantize_gptq` for these settings."""
    return _checkpoint_dir(model_dir, "gptq", bits, group_size, num_samples, seq_len)


def awq_dir(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Path:
    """Default output folder of :func:`quantize_awq` for these settings."""
    return _checkpoint_dir(model_dir, "awq", bits, group_size, num_samples, seq_len)


def _cached(final: Path, method: str, bits: int, group_size: int, requested: Optional[dict[str, Any]] = None) -> bool:
    """True if ``final`` is a complete checkpoint of these settings; ``ValueError`` if it holds others.

    ``requested``: the other settings of this call (``source_model``, ``num_samples``, ``seq_len``, ``dtype``, the
    quantizer's keyword overrides): each is compared with what the checkpoint recorded, and the overrides it was made with
    must all be asked for again, so a cached checkpoint made otherwise is never handed back in silence.
    """
    if not is_complete(final):
        return False
    meta = json.loads((final / META_FILE).read_text())
    found = (meta.get("method", "gptq"), meta.get("bits"), meta.get("group_size"))
    if found != (method, bits, group_size):
        raise ValueError(
            f"{final} holds a {found[0]} w{found[1]}g{found[2]} checkpoint, not {method} w{bits}g{group_size}: "
            "pass another out_dir or delete it"
        )
    differ = recorded_differences(meta, requested or {})
    if differ:
        raise ValueError(f"{final} holds a {method} w{bits}g{group_size} checkpoint made with other settings "
                         f"({'; '.join(differ)}): pass another out_dir or delete it")
    return True


def recorded_differences(meta: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """``"name: recorded → requested"`` for each requested setting the metadata records otherwise (``num_samples``
    and ``seq_len`` under ``calibration``, ``dtype`` as ``quantize_dtype``, anything else at the top level or
    among ``user_overrides``), and each recorded user override this call does not ask for."""
    calibration = meta.get("calibration") or {}
    overrides = meta.get("user_overrides") or {}
    differ = []
    for key, value in requested.items():
        if key in ("num_samples", "seq_len"):
            recorded, wanted = calibration.get(key), value
        elif key == "dtype":
            recorded, wanted = meta.get("quantize_dtype"), dtype_name(value) if value is not None else None
        elif key in overrides:
            recorded, wanted = overrides[key], repr(value)
        else:
            recorded, wanted = meta.get(key), value
        if recorded is not None and wanted is not None and recorded != wanted:
            differ.append(f"{key}: {recorded} → {wanted}")
    differ += [f"{key}={value} (not asked for now)" for key, value in overrides.items() if key not in requested]
    return differ


def machine_metadata() -> dict[str, object]:
    """Where a checkpoint was made: GPTQ/pruning results are bit-for-bit reproducible on one machine
    and software stack, but float32 CPU kernels are chosen by CPU features, so another CPU may give
    another checkpoint (see benchmarks/gptq_reproducibility.py). Recorded to tell such cases apart."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16] if flags else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _versions(**extra: str) -> dict[str, str]:
    return {
        **extra,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
    }
