"""GSM8K by greedy generation and exact match, as lm-evaluation-harness 0.4 does.

    >>> evaluate_gsm8k(model, tok, load_examples("gsm8k", "shared/data", limit=50), num_fewshot=5,
    ...                fewshot_pool=load_gsm8k("shared/data/gsm8k/train.jsonl"))

Prompt ``"Question: <q>\\nAnswer:"``, preceded for ``num_fewshot=k`` by k training examples
(drawn with ``random.Random(seed)``); greedy decoding until ``"Question:"``, ``"</s>"``,
``"<|im_end|>"`` or EOS; answers read by :func:`~peft_eora.eval.task_data.extract_strict` and
:func:`~peft_eora.eval.task_data.extract_flexible`.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Optional, Sequence

import torch

from .batching import encode, inference_batches, max_length, mean_and_stderr, model_device, pad_id
from .task_data import GSM8K_STOP, GenerationExample, extract_flexible, extract_strict, normalize_answer


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
    device = model_device(model)
    pad = pad_id(tokenizer)
    budget = max_length(model) - max_new_tokens
    if budget < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {max_length(model)} tokens.")
    encoded = [encode(tokenizer, p)[-budget:] for p in prompts]
    eos = getattr(tokenizer, "eos_token", None)
    stops = list(stop) + ([eos] if eos else [])
    out: list[str] = [""] * len(prompts)
    lengths = [len(e) for e in encoded]
    for group in inference_batches(model, lengths, batch_size, desc="generate", unit="prompt", progress=progress):
        width = max(lengths[i] for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):  # left-padded
            ids[row, width - lengths[i] :] = torch.tensor(encoded[i], dtype=torch.long)
            mask[row, width - lengths[i] :] = 1
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
    pool = list(fewshot_pool or [])
    # lm-eval draws one shot more, to drop the question itself, only where the pool is the evaluated split
    # (its gsm8k task: shots from train, questions from test, so exactly num_fewshot draws per question)
    asked = {ex.question for ex in examples}
    extra = int(any(s.question in asked for s in pool))
    prompts = []
    for ex in examples:
        shots: list[GenerationExample] = []
        if num_fewshot:
            candidates = rng.sample(pool, min(num_fewshot + extra, len(pool)))
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
        "num_examples": len(examples), "num_fewshot": num_fewshot,
        **mean_and_stderr("exact_match_strict", strict), **mean_and_stderr("exact_match_flexible", flexible),
    }  # fmt: skip
    if details:
        result["details"] = rows
    return result
