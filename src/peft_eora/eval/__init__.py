"""Evaluation helpers: perplexity over fixed windows, and zero-shot tasks (ARC, PIQA, MathQA, GSM8K).

    >>> from peft_eora.eval import perplexity, load_text, evaluate_task
    >>> perplexity(model, tokenizer, load_text("wikitext2"), seq_len=512, max_windows=16)
    >>> evaluate_task(model, tokenizer, "arc_easy", data_dir="shared/data", limit=200)
"""

from .perplexity import load_text, make_windows, perplexity, perplexity_on_windows
from .tasks import (
    TASK_NAMES,
    TaskDataError,
    evaluate_gsm8k,
    evaluate_multiple_choice,
    evaluate_task,
    load_examples,
    score_choices,
)

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
