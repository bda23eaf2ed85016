"""Calibration data: from a spec (Hub id, local files, shipped sample) or user batches to token windows.

    >>> from peft_eora.calibration import load_calibration_tokens
    >>> from peft_eora import CalibrationConfig
    >>> tokens = load_calibration_tokens(CalibrationConfig("builtin:c4", num_samples=8, seq_len=256), tokenizer)
    >>> tokens.shape
    torch.Size([8, 256])

Any of these can be passed where calibration data is expected (see :func:`as_batches`): a
:class:`~peft_eora.config.CalibrationConfig`, an ``(n, seq_len)`` tensor of token ids, an
iterable (list, ``DataLoader``) of tensors or of dicts with ``input_ids`` (and optionally
``attention_mask``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import torch

from .config import CalibrationConfig

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_DATASETS = {"builtin:c4": DATA_DIR / "c4_validation_256.jsonl"}
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}

Batch = dict[str, torch.Tensor]
CalibrationData = Union[CalibrationConfig, torch.Tensor, Iterable[Any]]


class CalibrationError(ValueError):
    """Calibration data is missing, empty or too short."""


def load_documents(spec: CalibrationConfig) -> list[Any]:
    """Rows of ``spec.column`` from the dataset the spec names (text or token-id lists)."""
    import datasets

    source = spec.dataset
    path = BUILTIN_DATASETS.get(source, Path(source).expanduser())
    try:
        if path.exists():
            if path.is_dir():
                ds = datasets.load_dataset(str(path), spec.subset, split=spec.split)
            else:
                builder = _FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise CalibrationError(
                        f"Calibration file {path} has an unsupported extension; use one of {sorted(_FILE_BUILDERS)}."
                    )
                ds = datasets.load_dataset(builder, data_files={spec.split: str(path)}, split=spec.split)
        elif source.startswith("builtin:"):
            raise CalibrationError(f"Unknown built-in calibration set {source!r}; choose one of {sorted(BUILTIN_DATASETS)}.")
        else:
            ds = datasets.load_dataset(source, spec.subset, split=spec.split)
    except CalibrationError:
        raise
    except Exception as exc:  # datasets raises many types; give one actionable message
        raise CalibrationError(
            f"Could not load calibration dataset {source!r} (split {spec.split!r}): {exc}. Pass a local file, "
            "'builtin:c4', or a Hub id that is cached (offline) / reachable."
        ) from exc
    if spec.column not in ds.column_names:
        raise CalibrationError(
            f"Calibration dataset {source!r} has no column {spec.column!r}; its columns are {ds.column_names}."
        )
    rows = [r for r in ds[spec.column] if r is not None and len(r) > 0]
    if not rows:
        raise CalibrationError(f"Calibration dataset {source!r} (column {spec.column!r}) is empty.")
    return rows


def load_calibration_tokens(spec: CalibrationConfig, tokenizer=None) -> torch.Tensor:
    """Shuffle documents with ``spec.seed``, tokenise, join with EOS and cut ``(num_samples, seq_len)``."""
    rows = load_documents(spec)
    order = list(range(len(rows)))
    random.Random(spec.seed).shuffle(order)
    need = spec.num_samples * spec.seq_len
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    ids: list[int] = []
    for i in order:
        row = rows[i]
        if isinstance(row, str):
            if tokenizer is None:
                raise CalibrationError("Calibration rows are text but no tokenizer was given.")
            ids.extend(tokenizer(row, add_special_tokens=False)["input_ids"])
        else:
            ids.extend(int(t) for t in row)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise CalibrationError(
            f"Calibration data {spec.dataset!r} has only {len(ids)} tokens but num_samples×seq_len = "
            f"{spec.num_samples}×{spec.seq_len} = {need} are needed; lower num_samples or seq_len, or add data."
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(spec.num_samples, spec.seq_len)


def as_batches(data: CalibrationData, tokenizer=None, batch_size: int = 8) -> list[Batch]:
    """Normalise any accepted calibration input to a list of ``{"input_ids", "attention_mask"?}``."""
    if isinstance(data, Mapping) and not isinstance(data, CalibrationConfig):
        data = CalibrationConfig(**data)
    if isinstance(data, CalibrationConfig):
        data = load_calibration_tokens(data, tokenizer)
    if isinstance(data, torch.Tensor):
        if data.ndim == 1:
            data = data[None]
        if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
            raise CalibrationError(f"Calibration token tensor must be (n, seq_len) and non-empty, got {tuple(data.shape)}.")
        return [{"input_ids": chunk} for chunk in data.long().split(batch_size)]
    if isinstance(data, (str, bytes)):
        raise CalibrationError("Pass a CalibrationConfig (e.g. CalibrationConfig(dataset=path)) rather than a bare string.")
    batches: list[Batch] = []
    for item in data:
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        elif isinstance(item, Mapping):
            if "input_ids" not in item:
                raise CalibrationError(f"Calibration batches need an 'input_ids' entry, got keys {sorted(item)}.")
            item = {k: v for k, v in item.items() if k in ("input_ids", "attention_mask")}
        else:
            raise CalibrationError(f"Unsupported calibration batch of type {type(item).__name__}.")
        ids = torch.as_tensor(item["input_ids"]).long()
        if ids.ndim == 1:
            ids = ids[None]
        batch: Batch = {"input_ids": ids}
        if item.get("attention_mask") is not None:
            mask = torch.as_tensor(item["attention_mask"]).reshape(ids.shape)
            if not bool(mask.all()):
                batch["attention_mask"] = mask.long()
        if ids.numel():
            batches.append(batch)
    if not batches:
        raise CalibrationError("The calibration data is empty: no batch with any token was given.")
    return batches


def count_tokens(batches: list[Batch]) -> int:
    """Number of real (unmasked) tokens in ``batches``."""
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
