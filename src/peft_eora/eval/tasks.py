"""Zero-shot task evaluation: multiple choice by log-likelihood, GSM8K by greedy generation.

    >>> from peft_eora.eval.tasks import evaluate_task
    >>> evaluate_task(model, tokenizer, "arc_easy", data_dir="shared/data", limit=200)
    {'task': 'arc_easy', 'num_examples': 200, 'acc': 0.585, 'acc_stderr': 0.0349, 'acc_norm': 0.52, ...}

Prompts, choices and metrics follow lm-evaluation-harness 0.4 (its ``arc_easy``,
``arc_challenge``, ``piqa``, ``mathqa`` and ``gsm8k`` task configs), so figures are comparable:

- **ARC-Easy / ARC-Challenge** (MosaicML jsonl ``{query, choices, gold}``, ``query`` being
  ``"Question: <stem>"``): context ``"Question: <stem>\\nAnswer:"``, continuations
  ``" <choice text>"``.
- **PIQA** (``valid.jsonl`` ``{goal, sol1, sol2}`` + ``valid-labels.lst``): context
  ``"Question: <goal>\\nAnswer:"``, continuations ``" <sol1>"``, ``" <sol2>"``.
- **MathQA** (``test.json``, a JSON array): context ``"Question: <Problem>\\nAnswer:"``; the
  ``options`` string ``"a ) 38 , b ) 27.675 , … e ) none of these"`` gives the choices (each the
  text after ``"x ) "`` up to the first ``", "``, or the end for ``e``; trailing spaces/commas
  stripped); gold ``"abcde".index(correct)``.
- **Metrics**: the log-likelihood of a continuation is the sum of its tokens' log-probabilities
  given the context; its tokens are those of ``tokenize(context + continuation)`` after the
  first ``len(tokenize(context))`` (tokenizer defaults, so BOS only if the tokenizer adds one).
  ``acc``: the argmax choice is the gold one. ``acc_norm``: the argmax of log-likelihood divided
  by the choice text's length in characters (without the leading space). ``*_stderr``: sample
  standard deviation / √n.
- **GSM8K** (``test.jsonl`` ``{question, answer}``): prompt ``"Question: <q>\\nAnswer:"``, preceded
  for ``num_fewshot=k`` by k training examples ``"Question: <q>\\nAnswer: <answer>"`` joined with
  ``"\\n\\n"`` (drawn with ``random.Random(seed)`` in test-file order). Greedy decoding until
  ``"Question:"``, ``"</s>"``, ``"<|im_end|>"`` or EOS (``max_new_tokens``). ``exact_match_strict``:
  the first ``"#### <number>"`` of the completion; ``exact_match_flexible``: the last number in it.
  Both sides are compared after removing ``,``, ``$``, everything up to ``"#### "`` and a final
  ``.``, case-insensitively; the gold answer is the number after ``"#### "``.

Efficiency: continuations are scored in batches of ``batch_size`` rows; the context of a
question is run once (all but its last token, with the KV cache), the cache is repeated for its
choices and the continuations (prefixed by the context's last token) are run right-padded with
explicit position ids. Padding never changes a result; ``share_context=False`` scores whole
sequences instead (the reference). Everything is deterministic (no sampling, fixed order).

This module is the entry point (:func:`evaluate_task`); the pieces live beside it: task files and
answers in :mod:`.task_data`, log-likelihood scoring in :mod:`.multiple_choice`, GSM8K generation
in :mod:`.generation`, the shared batching loop in :mod:`.batching`. Their public names are
importable from here too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from .generation import evaluate_gsm8k, generate_greedy, gsm8k_prompt
from .multiple_choice import encode_pair, evaluate_multiple_choice, score_choices
from .task_data import (
    DATA_ENV,
    GENERATION_TASKS,
    GSM8K_TRAIN_FILE,
    MULTIPLE_CHOICE_TASKS,
    TASK_FILES,
    TASK_NAMES,
    GenerationExample,
    MultipleChoiceExample,
    PathLike,
    TaskDataError,
    extract_flexible,
    extract_strict,
    load_arc,
    load_examples,
    load_gsm8k,
    load_mathqa,
    load_piqa,
    normalize_answer,
    parse_mathqa_options,
    resolve_data_dir,
    task_file,
)

logger = logging.getLogger(__name__)


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str,
    data_dir: Optional[PathLike] = None,
    path: Optional[PathLike] = None,
    limit: Optional[int] = None,
    batch_size: int = 32,
    num_fewshot: int = 0,
    fewshot_path: Optional[PathLike] = None,
    max_new_tokens: int = 256,
    generation_batch_size: int = 8,
    progress: bool = True,
    details: bool = False,
) -> dict[str, Any]:
    """Evaluate one task (``TASK_NAMES``) on the first ``limit`` examples of its data file.

    >>> evaluate_task(model, tok, "arc_challenge", data_dir="shared/data", limit=100)
    >>> evaluate_task(model, tok, "gsm8k", data_dir="shared/data", limit=50, num_fewshot=5)

    Files: ``path``, else ``data_dir`` (or ``$PEFT_EORA_TASK_DATA``) / ``TASK_FILES[task]``; the
    GSM8K few-shot pool is ``fewshot_path``, else ``data_dir / gsm8k/train.jsonl``. Multiple-choice
    tasks are scored zero-shot (``num_fewshot`` must be 0 for them).
    """
    if task not in TASK_NAMES:
        raise TaskDataError(f"Unknown task {task!r}; choose from {list(TASK_NAMES)}.")
    if num_fewshot and task not in GENERATION_TASKS:
        raise TaskDataError(
            f"num_fewshot={num_fewshot} applies to {', '.join(GENERATION_TASKS)} only: {task} is scored zero-shot "
            "(no few-shot pool ships for it). Pass num_fewshot=0 for this task."
        )
    examples = load_examples(task, data_dir, path, limit)
    file = str(task_file(task, data_dir, path))
    if task in GENERATION_TASKS:
        pool = None
        if num_fewshot:
            pool_file = Path(fewshot_path) if fewshot_path is not None else resolve_data_dir(data_dir) / GSM8K_TRAIN_FILE
            if not pool_file.is_file():
                raise TaskDataError(f"GSM8K few-shot pool not found: {pool_file} (pass fewshot_path).")
            pool = load_gsm8k(pool_file)
        result = evaluate_gsm8k(
            model, tokenizer, examples, num_fewshot=num_fewshot, fewshot_pool=pool, max_new_tokens=max_new_tokens,
            batch_size=generation_batch_size, progress=progress, details=details,
        )  # fmt: skip
    else:
        result = evaluate_multiple_choice(
            model, tokenizer, examples, batch_size=batch_size, progress=progress, details=details
        )
        result = {**result, "num_fewshot": 0}
    logger.info("%s: %s", task, {k: round(v, 4) for k, v in result.items() if isinstance(v, float)})
    return {"task": task, "data": file, **result}


__all__ = [
    "DATA_ENV",
    "GENERATION_TASKS",
    "GSM8K_TRAIN_FILE",
    "GenerationExample",
    "MULTIPLE_CHOICE_TASKS",
    "MultipleChoiceExample",
    "TASK_FILES",
    "TASK_NAMES",
    "TaskDataError",
    "encode_pair",
    "evaluate_gsm8k",
    "evaluate_multiple_choice",
    "evaluate_task",
    "extract_flexible",
    "extract_strict",
    "generate_greedy",
    "gsm8k_prompt",
    "load_arc",
    "load_examples",
    "load_gsm8k",
    "load_mathqa",
    "load_piqa",
    "normalize_answer",
    "parse_mathqa_options",
    "resolve_data_dir",
    "score_choices",
    "task_file",
]
