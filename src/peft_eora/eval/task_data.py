"""Task data: the files, their examples and gold answers (ARC, PIQA, MathQA, GSM8K).

    >>> load_examples("arc_easy", "shared/data", limit=2)[0].choices
    >>> task_file("gsm8k", "shared/data")        # shared/data/gsm8k/test.jsonl

Layouts and prompts follow lm-evaluation-harness 0.4 (see :mod:`peft_eora.eval.tasks`). No torch
here: the command line reads these names for ``--help``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

PathLike = Union[str, os.PathLike]

#: Environment variable naming the default task data folder (layout of ``TASK_FILES``).
DATA_ENV = "PEFT_EORA_TASK_DATA"

#: Default file of each task, relative to the data folder.
TASK_FILES: dict[str, str] = {
    "arc_easy": "arc/arc_easy_test.jsonl",
    "arc_challenge": "arc/arc_challenge_test.jsonl",
    "piqa": "piqa/valid.jsonl",
    "mathqa": "mathqa/test.json",
    "gsm8k": "gsm8k/test.jsonl",
}
#: Few-shot pool of GSM8K, relative to the data folder.
GSM8K_TRAIN_FILE = "gsm8k/train.jsonl"
MULTIPLE_CHOICE_TASKS = ("arc_easy", "arc_challenge", "piqa", "mathqa")
GENERATION_TASKS = ("gsm8k",)
TASK_NAMES = MULTIPLE_CHOICE_TASKS + GENERATION_TASKS

GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")
_STRICT_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE_ANSWER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE_FOR_MATCH = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
_MATHQA_OPTION = re.compile(r"[a-d] \) (.*?), |e \) (.*)$")
INVALID = "[invalid]"


class TaskDataError(ValueError):
    """A task's data file is missing or malformed, or the task is unknown."""



@dataclass(frozen=True)
class MultipleChoiceExample:
    """One question: the context, the choice texts (no leading space) and the gold index."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class GenerationExample:
    """One GSM8K problem: the question and the reference solution ending in ``"#### <number>"``."""

    question: str
    answer: str

    @property
    def target(self) -> str:
        """The gold number, normalised like the predictions (see :func:`normalize_answer`)."""
        return normalize_answer(self.answer)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}, line {number}: not JSON ({exc.msg}).") from exc
    return rows


def _fields(row: dict[str, Any], names: Sequence[str], path: Path, index: int) -> list[Any]:
    missing = [n for n in names if n not in row]
    if missing:
        raise TaskDataError(f"{path}, row {index}: missing field(s) {missing}; expected {list(names)}.")
    return [row[n] for n in names]


def load_arc(path: PathLike) -> list[MultipleChoiceExample]:
    """ARC (MosaicML jsonl ``{query: "Question: …", choices: [...], gold: i}``)."""
    path = Path(path)
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        query, choices, gold = _fields(row, ("query", "choices", "gold"), path, i)
        out.append(MultipleChoiceExample(f"{query}\nAnswer:", tuple(str(c) for c in choices), int(gold)))
    return out


def load_piqa(path: PathLike, labels: Optional[PathLike] = None) -> list[MultipleChoiceExample]:
    """PIQA: ``valid.jsonl`` (``goal``, ``sol1``, ``sol2``) and its labels file (default ``valid-labels.lst``)."""
    path = Path(path)
    labels = Path(labels) if labels is not None else path.with_name(f"{path.stem}-labels.lst")
    if not labels.is_file():
        raise TaskDataError(f"PIQA labels file {labels} not found (one 0/1 label per line of {path.name}).")
    gold = [int(line) for line in labels.read_text(encoding="utf-8").split()]
    rows = _read_jsonl(path)
    if len(gold) != len(rows):
        raise TaskDataError(f"{labels} has {len(gold)} labels but {path} has {len(rows)} rows.")
    out = []
    for i, (row, label) in enumerate(zip(rows, gold)):
        goal, sol1, sol2 = _fields(row, ("goal", "sol1", "sol2"), path, i)
        out.append(MultipleChoiceExample(f"Question: {goal}\nAnswer:", (sol1, sol2), label))
    return out


def parse_mathqa_options(options: str) -> list[str]:
    """``"a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these"`` → 5 choice texts."""
    return [(m.group(1) if m.group(1) is not None else m.group(2)).rstrip(" ,") for m in _MATHQA_OPTION.finditer(options)]


def load_mathqa(path: PathLike) -> list[MultipleChoiceExample]:
    """MathQA (a JSON array of ``{Problem, options, correct, …}``)."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TaskDataError(f"{path} is not a JSON array ({exc.msg}).") from exc
    out = []
    for i, row in enumerate(rows):
        problem, options, correct = _fields(row, ("Problem", "options", "correct"), path, i)
        choices = parse_mathqa_options(options)
        gold = "abcde".find(str(correct))
        if gold < 0 or gold >= len(choices):
            raise TaskDataError(f"{path}, row {i}: answer {correct!r} is not one of the {len(choices)} parsed options.")
        out.append(MultipleChoiceExample(f"Question: {problem}\nAnswer:", tuple(choices), gold))
    return out


def load_gsm8k(path: PathLike) -> list[GenerationExample]:
    """GSM8K jsonl (``question``, ``answer`` ending in ``"#### <number>"``)."""
    path = Path(path)
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        question, answer = _fields(row, ("question", "answer"), path, i)
        out.append(GenerationExample(question, answer))
    return out


_LOADERS = {"arc_easy": load_arc, "arc_challenge": load_arc, "piqa": load_piqa, "mathqa": load_mathqa, "gsm8k": load_gsm8k}


def resolve_data_dir(data_dir: Optional[PathLike] = None) -> Path:
    """``data_dir``, else ``$PEFT_EORA_TASK_DATA``; raises :class:`TaskDataError` if neither is set."""
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not data_dir:
        raise TaskDataError(f"No task data folder: pass data_dir (CLI: --task-data) or set ${DATA_ENV}.")
    return Path(data_dir).expanduser()


def task_file(task: str, data_dir: Optional[PathLike] = None, path: Optional[PathLike] = None) -> Path:
    """The file a task reads: ``path`` if given, else ``data_dir / TASK_FILES[task]``."""
    if task not in TASK_FILES:
        raise TaskDataError(f"Unknown task {task!r}; choose from {list(TASK_NAMES)}.")
    file = Path(path).expanduser() if path is not None else resolve_data_dir(data_dir) / TASK_FILES[task]
    if not file.is_file():
        raise TaskDataError(f"Data file for {task} not found: {file}.")
    labels = file.with_name(f"{file.stem}-labels.lst")
    if task == "piqa" and not labels.is_file():  # its answers are a file of their own (see load_piqa)
        raise TaskDataError(f"PIQA labels file {labels} not found (one 0/1 label per line of {file.name}).")
    return file


def load_examples(
    task: str, data_dir: Optional[PathLike] = None, path: Optional[PathLike] = None, limit: Optional[int] = None
) -> list[Union[MultipleChoiceExample, GenerationExample]]:
    """The first ``limit`` examples of ``task`` (file order).

    >>> load_examples("piqa", "shared/data", limit=2)[0].choices
    ('Provide the guinea pig with a cage full of …', …)
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}.")
    file = task_file(task, data_dir, path)  # checks the task name first
    examples = _LOADERS[task](file)
    if not examples:
        raise TaskDataError(f"The {task} data file has no examples.")
    return examples[:limit] if limit is not None else examples



def extract_strict(completion: str) -> str:
    """The number of the first ``"#### <number>"`` in ``completion``, else ``"[invalid]"``."""
    match = _STRICT_ANSWER.search(completion)
    return match.group(1).strip() if match else INVALID


def extract_flexible(completion: str) -> str:
    """The last number-like span of ``completion`` (lm-eval's "flexible-extract"), else ``"[invalid]"``."""
    found = _FLEXIBLE_ANSWER.findall(completion)
    if not found:
        return INVALID
    last = [g for g in found[-1] if g]
    return last[0].strip() if last else INVALID


def normalize_answer(text: str) -> str:
    """Drop ``,``, ``$``, everything up to ``"#### "`` and a final ``.``; lower-case."""
    for pattern in _IGNORE_FOR_MATCH:
        text = pattern.sub("", text)
    return text.lower()
