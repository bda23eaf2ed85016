"""What the task evaluators share: device, length and padding of a model/tokenizer, and the one
batching loop (longest first, eval mode, progress bar).

    >>> for group in inference_batches(model, lengths, batch_size=8, desc="generate", unit="prompt"):
    ...     run(group)      # indices into lengths, longest first
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..calibration import context_length


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's defaults (BOS only if it adds one)."""
    return list(tokenizer(text)["input_ids"])


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def max_length(model: torch.nn.Module) -> int:
    """The model's context length from its config (2048 if it names none)."""
    return context_length(model) or 2048


def pad_id(tokenizer: Any) -> int:
    """The pad token id, else EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the (base) model's forward takes the keyword ``name``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def right_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of ``rows`` padded on the right with ``pad``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _batches(sizes: Sequence[int], order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive groups of ``order`` whose ``sizes`` add up to at most ``batch_size`` (≥ 1 item each)."""
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        if current and total + sizes[i] > batch_size:
            out.append(current)
            current, total = [], 0
        current.append(i)
        total += sizes[i]
    if current:
        out.append(current)
    return out


def inference_batches(
    model: torch.nn.Module,
    lengths: Sequence[int],
    batch_size: int,
    sizes: Optional[Sequence[int]] = None,
    desc: str = "batches",
    unit: str = "item",
    progress: bool = True,
) -> Iterator[list[int]]:
    """Indices of ``lengths`` in batches, longest first (similar lengths share a batch: less padding).

    Each batch holds items whose ``sizes`` (default 1 each) add up to at most ``batch_size`` (≥ 1
    item). While iterating, the model is in eval mode and a progress bar counts the sizes; both
    are restored afterwards, also when the loop stops early.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    sizes = [1] * len(lengths) if sizes is None else list(sizes)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(sizes), desc=desc, unit=unit, disable=not progress, leave=False)
    try:
        for group in _batches(sizes, order, batch_size):
            yield group
            bar.update(sum(sizes[i] for i in group))
    finally:
        bar.close()
        model.train(was_training)


def mean_and_stderr(name: str, values: Sequence[float]) -> dict[str, Any]:
    """``{name: mean, name + "_stderr": sample standard deviation / √n}`` (stderr ``None`` below 2 values)."""
    n = len(values)
    mean = sum(values) / n
    stderr = None if n < 2 else (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5
    return {name: mean, f"{name}_stderr": stderr}
