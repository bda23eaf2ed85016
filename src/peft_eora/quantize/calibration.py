"""Calibration windows for gptqmodel's GPTQ/AWQ, and how they are recorded in a checkpoint.

    >>> examples = gptq_calibration(tokenizer, num_samples=8, seq_len=64)

The shipped C4 sample (``data/c4_validation_256.jsonl``), documents tokenised without special
tokens in file order, joined with EOS and cut into consecutive windows (deterministic).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("peft_eora.quantize")

C4_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "c4_validation_256.jsonl"
DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


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


def calibration_metadata(num_samples: int, windows: int, seq_len: int, tokens: int, batch_size: int) -> dict[str, Any]:
    """How :func:`gptq_calibration` windows were made, for a compressed checkpoint's metadata file:
    ``num_samples`` asked for (what a later call is compared with), ``windows`` obtained (fewer where the
    text ran out)."""
    return {
        "data": f"peft_eora/data/{C4_SAMPLE.name}",
        "recipe": "docs in file order, no special tokens, EOS-joined, consecutive windows",
        "num_samples": num_samples,
        "windows": windows,
        "seq_len": seq_len,
        "tokens": tokens,
        "batch_size": batch_size,
    }
