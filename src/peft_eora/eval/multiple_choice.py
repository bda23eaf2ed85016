"""Multiple-choice tasks (ARC, PIQA, MathQA) scored by log-likelihood, as lm-evaluation-harness 0.4 does.

    >>> evaluate_multiple_choice(model, tok, load_examples("piqa", "shared/data", limit=100))
    {'num_examples': 100, 'acc': 0.62, 'acc_stderr': 0.0488, 'acc_norm': 0.61, 'acc_norm_stderr': 0.049}

Each question's context runs once (all but its last token, with the KV cache); the cache is
repeated for its choices, whose continuations run right-padded with explicit position ids.
Padding never changes a result; ``share_context=False`` scores whole sequences (the reference).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from .batching import accepts, encode, inference_batches, max_length, mean_and_stderr, model_device, pad_id, right_pad
from .task_data import MultipleChoiceExample

logger = logging.getLogger(__name__)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens): the continuation's are those of ``context +
    continuation`` after the context's; trailing spaces of the context move to the continuation."""
    stripped = context.rstrip()
    if stripped != context:
        continuation = context[len(stripped) :] + continuation
        context = stripped
    if not context:
        raise ValueError("The context of a multiple-choice question is empty.")
    ctx = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"The continuation {continuation!r} tokenizes to nothing after {context[-40:]!r}.")
    return ctx, cont


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
    device = model_device(model)
    pad = pad_id(tokenizer)
    max_len = max_length(model)
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
            # one context token at least: a continuation of max_len tokens or more left ctx[-0:], the whole context
            ctx = ctx[-max(1, max_len - longest):]
        encoded.append((ctx, conts))
    sizes = [len(conts) for _, conts in encoded]
    lengths = [len(ctx) + max(map(len, conts)) for ctx, conts in encoded]
    keep_logits = accepts(model, "logits_to_keep")
    results: list[list[float]] = [[] for _ in encoded]  # filled in input order
    for group in inference_batches(model, lengths, batch_size, sizes, "log-likelihood", "choice", progress):
        items = [encoded[i] for i in group]
        if share_context and all(len(ctx) >= 2 for ctx, _ in items):
            scores = _score_shared(model, items, pad, device, keep_logits)
        else:
            scores = _score_whole(model, items, pad, device)
        for i, values in zip(group, scores):
            results[i] = values
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
    ids, mask = right_pad(rows, pad, device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    values = _span_logprobs(logits, ids, torch.tensor(starts, device=device), torch.tensor(lengths, device=device))
    return _split(values, items)


def _score_shared(model, items, pad: int, device, keep_logits: bool) -> list[list[float]]:
    prefixes = [ctx[:-1] for ctx, _ in items]
    ids, mask = right_pad(prefixes, pad, device)
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
    cont_ids, cont_mask = right_pad(rows, pad, device)
    full_mask = torch.cat([mask[index], cont_mask], dim=1)
    cont_pos = torch.tensor(offsets, device=device)[:, None] + torch.arange(cont_ids.shape[1], device=device)[None]
    logits = model(
        input_ids=cont_ids, attention_mask=full_mask, position_ids=cont_pos, past_key_values=cache, use_cache=True
    ).logits
    lengths = torch.tensor([len(r) - 1 for r in rows], device=device)
    values = _span_logprobs(logits, cont_ids, torch.zeros_like(lengths), lengths)
    return _split(values, items)


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
        "num_examples": len(examples), **mean_and_stderr("acc", acc), **mean_and_stderr("acc_norm", acc_norm),
    }  # fmt: skip
    if details:
        result["details"] = rows
    return result
