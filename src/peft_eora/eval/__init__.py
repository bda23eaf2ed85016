"""Evaluation helpers: perplexity over fixed windows, and zero-shot tasks (ARC, PIQA, MathQA, GSM8K).

    >>> from peft_eora.eval import perplexity, load_text, evaluate_task
    >>> perplexity(model, tokenizer, load_text("wikitext2"), seq_len=512, max_windows=16)
    >>> evaluate_task(model, tokenizer, "arc_easy", data_dir="shared/data", limit=200)

The task evaluators (which need torch at import) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .perplexity import load_text, make_windows, perplexity, perplexity_on_windows
from .task_data import TASK_NAMES, TaskDataError, load_examples

_LAZY = {
    "evaluate_gsm8k": "generation", "evaluate_multiple_choice": "multiple_choice", "score_choices": "multiple_choice",
    "evaluate_task": "tasks",
}  # fmt: skip

__all__ = [
    "TASK_NAMES",
    "TaskDataError",
    "evaluate_gsm8k",
    "evaluate_multiple_choice",
    "evaluate_task",
    "load_examples",
    "load_text",
    "make_windows",
    "perplexity",
    "perplexity_on_windows",
    "score_choices",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
