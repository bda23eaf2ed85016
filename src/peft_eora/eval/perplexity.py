"""Perplexity over fixed, non-overlapping windows of a text.

Convention (documented so numbers are comparable): the text is tokenised once as a whole
(no BOS/EOS added), cut into ``num_windows`` consecutive, non-overlapping windows of
``seq_len`` tokens from the start (the ragged tail is dropped), and perplexity is
``exp(mean token NLL)`` over every predicted token of every window (``seq_len − 1`` per
window)::

    >>> from peft_eora.eval import perplexity, load_text
    >>> ppl = perplexity(model, tokenizer, load_text("wikitext2"), seq_len=512, max_windows=32)

``load_text`` normalises CRLF to LF; a WikiText-2 raw file is read line by line and joined
with ``"\\n"`` (no blank separator lines), a JSON-lines file joins its ``text`` (or given)
field with ``"\\n\\n"``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: reading texts and names stays light
    import torch

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUILTIN_TEXTS = {
    "wikitext2": DATA_DIR / "wikitext2_test_head.txt",
    "c4": DATA_DIR / "c4_validation_256.jsonl",
}


def load_text(source: str | Path, field: str = "text", max_chars: int | None = None) -> str:
    """Read evaluation text from a built-in name (``"wikitext2"``, ``"c4"``) or a file.

    ``"c4"`` is the file ``builtin:c4`` calibration draws its windows from: held-out only for adapters
    calibrated on other data. ``"wikitext2"`` (the test split's head) is held out from every built-in set.

    ``.jsonl`` files join the ``field`` of each row (GSM8K: use ``field="question+answer"`` to
    join question and answer) with blank lines; other files are read as text.
    """
    path = BUILTIN_TEXTS.get(str(source), Path(source))
    if not path.exists():
        raise FileNotFoundError(
            f"No evaluation text at {path}; pass a file path or one of {sorted(BUILTIN_TEXTS)}."
        )
    if path.suffix == ".jsonl":
        parts = []
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    parts.append("\n".join(str(row[f]) for f in field.split("+")))
                except (ValueError, KeyError, TypeError) as exc:  # one error naming the line, not a traceback
                    raise ValueError(f"{path}, line {number}: not a JSON object with the field(s) {field!r} "
                                     f"({type(exc).__name__}: {exc}).") from exc
        text = "\n\n".join(parts)
    else:
        raw = path.read_text(encoding="utf-8")
        text = "\n".join(raw.replace("\r\n", "\n").split("\n")).strip("\n")
    text = text.replace("\r\n", "\n")
    return text[:max_chars] if max_chars else text


def make_windows(token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token tensor into ``(n, seq_len)`` non-overlapping windows from the start."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}.")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows!r}.")
    n = token_ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"The text has {token_ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "use a longer text or a smaller seq_len."
        )
    return token_ids[: n * seq_len].view(n, seq_len)


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``text`` (see the module docstring for the convention)."""
    import torch

    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    windows = make_windows(ids, seq_len, max_windows)
    return perplexity_on_windows(model, windows, batch_size=batch_size, progress=progress)


def perplexity_on_windows(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> float:
    """Perplexity over pre-tokenised ``(n, seq_len)`` windows."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(
            f"Expected (n ≥ 1, seq_len ≥ 2) token windows, got shape {tuple(windows.shape)}: "
            "a window needs at least two tokens to predict one."
        )
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        batch = batch.to(device)
        with torch.no_grad():
            logits = model(input_ids=batch).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += target.numel()
    model.train(was_training)
    ppl = math.exp(nll / count)
    logger.info("perplexity %.4f over %d windows × %d tokens", ppl, windows.shape[0], windows.shape[1])
    return ppl
