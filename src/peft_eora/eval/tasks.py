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
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# Examples and loaders
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Log-likelihood scoring
# --------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens): the continuation's are those of ``context +
    continuation`` after the context's; trailing spaces of the context move to the continuation."""
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped) :] + continuation
        context = stripped
    if not context:
        raise ValueError("The context of a multiple-choice question is empty.")
    ctx = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"The continuation {continuation!r} tokenizes to nothing after {context[-40:]!r}.")
    return ctx, cont


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _max_length(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _accepts(model: torch.nn.Module, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _right_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _span_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Sum over ``j < lengths[i]`` of ``log p(input_ids[i, starts[i]+j+1] | logits[i, starts[i]+j])``."""
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    pos = torch.arange(targets.shape[1], device=targets.device)[None]
    keep = (pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])
    return (picked * keep).sum(dim=1)


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


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[MultipleChoiceExample],
    batch_size: int = 32,
    share_context: bool = True,
    progress: bool = True,
) -> list[list[float]]:
    """Log-likelihood of every choice (``" " + text``) given its context, per example.

    ``batch_size`` counts continuation rows per forward pass. With ``share_context`` each
    context is run once and its KV cache reused for its choices; otherwise each choice is scored
    as one whole sequence. Contexts longer than the model's maximum length are cut on the left.

    >>> score_choices(model, tokenizer, load_examples("arc_easy", data, limit=2))
    [[-9.1, -12.3, -10.7, -11.0], [...]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    device = _device(model)
    pad = _pad_id(tokenizer)
    max_len = _max_length(model)
    encoded: list[tuple[list[int], list[list[int]]]] = []
    for ex in examples:
        if not ex.choices:
            raise ValueError(f"A question has no choices: {ex.context[:60]!r}.")
        pairs = [encode_pair(tokenizer, ex.context, " " + c) for c in ex.choices]
        ctx = pairs[0][0]  # the same for every choice: the context is tokenized alone
        conts = [p[1] for p in pairs]
        longest = max(len(c) for c in conts)
        if len(ctx) + longest > max_len:
            logger.warning("Context of %d tokens cut on the left to fit %d tokens.", len(ctx), max_len)
            ctx = ctx[-(max_len - longest) :]
        encoded.append((ctx, conts))
    sizes = [len(conts) for _, conts in encoded]
    # longest first: similar lengths share a batch (less padding); results go back in input order
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + max(map(len, encoded[i][1]))))
    keep_logits = _accepts(model, "logits_to_keep")
    results: list[list[float]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(sizes), desc="log-likelihood", unit="choice", disable=not progress, leave=False)
    try:
        for group in _batches(sizes, order, batch_size):
            items = [encoded[i] for i in group]
            if share_context and all(len(ctx) >= 2 for ctx, _ in items):
                scores = _score_shared(model, items, pad, device, keep_logits)
            else:
                scores = _score_whole(model, items, pad, device)
            for i, values in zip(group, scores):
                results[i] = values
            bar.update(sum(sizes[i] for i in group))
    finally:
        bar.close()
        model.train(was_training)
    return results


def _split(values: torch.Tensor, items: Sequence[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
    flat = values.tolist()
    out, k = [], 0
    for _, conts in items:
        out.append(flat[k : k + len(conts)])
        k += len(conts)
    return out


def _score_whole(model, items, pad: int, device) -> list[list[float]]:
    rows, starts, lengths = [], [], []
    for ctx, conts in items:
        for cont in conts:
            rows.append(ctx + cont)
            starts.append(len(ctx) - 1)
            lengths.append(len(cont))
    ids, mask = _right_pad(rows, pad, device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    values = _span_logprobs(logits, ids, torch.tensor(starts, device=device), torch.tensor(lengths, device=device))
    return _split(values, items)


def _score_shared(model, items, pad: int, device, keep_logits: bool) -> list[list[float]]:
    prefixes = [ctx[:-1] for ctx, _ in items]
    ids, mask = _right_pad(prefixes, pad, device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "reorder_cache"):
        logger.debug("no reorderable KV cache: scoring whole sequences")
        return _score_whole(model, items, pad, device)
    counts = torch.tensor([len(conts) for _, conts in items], device=device)
    index = torch.repeat_interleave(torch.arange(len(items), device=device), counts)
    cache.reorder_cache(index)
    rows, offsets = [], []
    for (ctx, conts), prefix in zip(items, prefixes):
        for cont in conts:
            rows.append([ctx[-1]] + cont)
            offsets.append(len(prefix))
    cont_ids, cont_mask = _right_pad(rows, pad, device)
    full_mask = torch.cat([mask[index], cont_mask], dim=1)
    cont_pos = torch.tensor(offsets, device=device)[:, None] + torch.arange(cont_ids.shape[1], device=device)[None]
    logits = model(
        input_ids=cont_ids, attention_mask=full_mask, position_ids=cont_pos, past_key_values=cache, use_cache=True
    ).logits
    lengths = torch.tensor([len(r) - 1 for r in rows], device=device)
    values = _span_logprobs(logits, cont_ids, torch.zeros_like(lengths), lengths)
    return _split(values, items)


def _stderr(values: Sequence[float]) -> Optional[float]:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[MultipleChoiceExample],
    batch_size: int = 32,
    share_context: bool = True,
    progress: bool = True,
    details: bool = False,
) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` (with standard errors) of ``model`` on ``examples``.

    >>> evaluate_multiple_choice(model, tok, load_examples("piqa", data, limit=100))
    {'num_examples': 100, 'acc': 0.62, 'acc_stderr': 0.0488, 'acc_norm': 0.61, 'acc_norm_stderr': 0.049}

    ``details=True`` adds per-example ``loglikelihoods``, ``pred``, ``pred_norm`` and ``gold``.
    """
    if not examples:
        raise ValueError("No examples to evaluate.")
    lls = score_choices(model, tokenizer, examples, batch_size=batch_size, share_context=share_context, progress=progress)
    acc, acc_norm, rows = [], [], []
    for ex, ll in zip(examples, lls):
        pred = max(range(len(ll)), key=lambda j: ll[j])
        normed = [v / max(len(c), 1) for v, c in zip(ll, ex.choices)]
        pred_norm = max(range(len(ll)), key=lambda j: normed[j])
        acc.append(float(pred == ex.gold))
        acc_norm.append(float(pred_norm == ex.gold))
        rows.append({"loglikelihoods": ll, "pred": pred, "pred_norm": pred_norm, "gold": ex.gold})
    result: dict[str, Any] = {
        "num_examples": len(examples),
        "acc": sum(acc) / len(acc),
        "acc_stderr": _stderr(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
        "acc_norm_stderr": _stderr(acc_norm),
    }
    if details:
        result["details"] = rows
    return result


# --------------------------------------------------------------------------------------------
# GSM8K: greedy generation, exact match
# --------------------------------------------------------------------------------------------


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


def gsm8k_prompt(example: GenerationExample, shots: Sequence[GenerationExample] = ()) -> str:
    """``"Question: …\\nAnswer: …"`` for each shot, joined with blank lines, then the question."""
    parts = [f"Question: {s.question}\nAnswer: {s.answer}" for s in shots]
    parts.append(f"Question: {example.question}\nAnswer:")
    return "\n\n".join(parts)


def _cut_at_stops(text: str, stops: Iterable[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


@torch.no_grad()
def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    stop: Sequence[str] = GSM8K_STOP,
    batch_size: int = 8,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches, longest first), cut at ``stop``."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be ≥ 1, got {max_new_tokens}, {batch_size}.")
    device = _device(model)
    pad = _pad_id(tokenizer)
    budget = _max_length(model) - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {_max_length(model)} tokens.")
    encoded = [_encode(tokenizer, p)[-budget:] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    eos = getattr(tokenizer, "eos_token", None)
    stops = list(stop) + ([eos] if eos else [])
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in group)
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                n = len(encoded[i])
                ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, width - n :] = 1
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
                stop_strings=[s for s in stop if s],
                tokenizer=tokenizer,
            )
            for row, i in enumerate(group):
                text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
                out[i] = _cut_at_stops(text, stops)
            bar.update(len(group))
    finally:
        bar.close()
        model.train(was_training)
    return out


def evaluate_gsm8k(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[GenerationExample],
    num_fewshot: int = 0,
    fewshot_pool: Optional[Sequence[GenerationExample]] = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 1234,
    progress: bool = True,
    details: bool = False,
) -> dict[str, Any]:
    """GSM8K exact match (strict ``"#### N"`` and flexible last-number extraction).

    >>> evaluate_gsm8k(model, tok, load_examples("gsm8k", data, limit=50), num_fewshot=5,
    ...                fewshot_pool=load_gsm8k("shared/data/gsm8k/train.jsonl"))
    {'num_examples': 50, 'num_fewshot': 5, 'exact_match_strict': 0.02, 'exact_match_flexible': 0.04, ...}
    """
    if not examples:
        raise ValueError("No examples to evaluate.")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be ≥ 0, got {num_fewshot}.")
    if num_fewshot and (not fewshot_pool or len(fewshot_pool) < num_fewshot):
        raise ValueError(f"num_fewshot={num_fewshot} needs a few-shot pool of at least that many examples.")
    rng = random.Random(seed)
    prompts = []
    for ex in examples:
        shots: list[GenerationExample] = []
        if num_fewshot:
            candidates = rng.sample(list(fewshot_pool), min(num_fewshot + 1, len(fewshot_pool)))
            shots = [s for s in candidates if s.question != ex.question][:num_fewshot]
        prompts.append(gsm8k_prompt(ex, shots))
    completions = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    strict, flexible, rows = [], [], []
    for ex, text in zip(examples, completions):
        gold = ex.target
        s, f = extract_strict(text), extract_flexible(text)
        strict.append(float(normalize_answer(s) == gold))
        flexible.append(float(normalize_answer(f) == gold))
        rows.append({"completion": text, "strict": s, "flexible": f, "gold": gold})
    result: dict[str, Any] = {
        "num_examples": len(examples),
        "num_fewshot": num_fewshot,
        "exact_match_strict": sum(strict) / len(strict),
        "exact_match_strict_stderr": _stderr(strict),
        "exact_match_flexible": sum(flexible) / len(flexible),
        "exact_match_flexible_stderr": _stderr(flexible),
    }
    if details:
        result["details"] = rows
    return result


# --------------------------------------------------------------------------------------------
# One entry point
# --------------------------------------------------------------------------------------------


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
    GSM8K few-shot pool is ``fewshot_path``, else ``data_dir / gsm8k/train.jsonl``.
    """
    if task not in TASK_NAMES:
        raise TaskDataError(f"Unknown task {task!r}; choose from {list(TASK_NAMES)}.")
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
    logger.info("%s: %s", task, {k: round(v, 4) for k, v in result.items() if isinstance(v, float)})
    return {"task": task, "data": file, **result}


__all__ = [
    "DATA_ENV",
    "GENERATION_TASKS",
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
    "score_choices",
]
