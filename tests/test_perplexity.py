"""Tests of the perplexity helper (``peft_eora.eval.perplexity``) with a toy bigram model: no LLM."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from peft_eora.eval.perplexity import (
    BUILTIN_TEXTS,
    load_text,
    make_windows,
    perplexity,
    perplexity_on_windows,
)

# --------------------------------------------------------------------------------------------
# make_windows
# --------------------------------------------------------------------------------------------


def test_make_windows_shapes_and_content():
    ids = torch.arange(10)
    w = make_windows(ids, 3)
    assert w.shape == (3, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # ragged tail (9) dropped
    assert make_windows(ids, 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert make_windows(ids, 3, max_windows=100).shape == (3, 3)
    assert make_windows(ids, 5).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # exact multiple
    assert make_windows(ids, 10).tolist() == [list(range(10))]  # exactly one window
    assert make_windows(ids, 1).shape == (10, 1)
    assert make_windows(torch.arange(10, dtype=torch.int32), 4).dtype == torch.int32


def test_make_windows_too_short_raises():
    with pytest.raises(ValueError, match="fewer than one window of seq_len=11"):
        make_windows(torch.arange(10), 11)
    with pytest.raises(ValueError, match="has 0 tokens"):
        make_windows(torch.zeros(0, dtype=torch.long), 4)


@pytest.mark.parametrize(
    "seq_len,max_windows,phrase",
    [(0, None, "seq_len must be a positive integer"), (-3, None, "seq_len must be"),
     (2.5, None, "seq_len must be"), (3, 0, "max_windows must be"), (3, -1, "max_windows must be")],
)
def test_make_windows_rejects_bad_arguments(seq_len, max_windows, phrase):
    with pytest.raises(ValueError, match=phrase):
        make_windows(torch.arange(10), seq_len, max_windows)


# --------------------------------------------------------------------------------------------
# load_text
# --------------------------------------------------------------------------------------------


def test_load_text_wikitext2_builtin():
    text = load_text("wikitext2")
    assert "\r" not in text
    assert len(text) > 200_000  # ~300 KB shipped
    assert text.startswith(" = Robert Boulter = \n")
    assert not text.startswith("\n") and not text.endswith("\n")
    assert "\n\n\n\n" not in text  # lines joined with a single "\n", no extra separators
    assert load_text("wikitext2", max_chars=1000) == text[:1000]


def test_load_text_c4_builtin_joins_documents():
    text = load_text("c4")
    path = BUILTIN_TEXTS["c4"]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 256
    assert text == "\n\n".join(r["text"] for r in rows).replace("\r\n", "\n")
    assert text.startswith(rows[0]["text"][:50])


def test_load_text_jsonl_question_plus_answer(tmp_path):
    p = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": "What is 2+2?", "answer": "It is 4.\r\n#### 4"},
        {"question": "Half of 10?", "answer": 5},  # non-string values are str()-ed
    ]
    p.write_text(json.dumps(rows[0]) + "\n\n   \n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    assert load_text(p, field="question+answer") == "What is 2+2?\nIt is 4.\n#### 4\n\nHalf of 10?\n5"
    assert load_text(str(p), field="question") == "What is 2+2?\n\nHalf of 10?"
    assert load_text(p, field="question+answer", max_chars=12) == "What is 2+2?"
    with pytest.raises(ValueError, match=r"gsm8k.jsonl, line 1: not a JSON object with the field\(s\) 'text'"):
        load_text(p)  # no "text" field: one error naming the file and line (the CLI prints it as one line)
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps([1, 2]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_text(p, field="question")  # a later row that is no object


def test_load_text_plain_file_normalises_crlf(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_bytes(b"\r\nline one\r\nline two\r\n\r\nline four\r\n")
    assert load_text(p) == "line one\nline two\n\nline four"


def test_load_text_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="wikitext2"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError):
        load_text("wikitext3")


# --------------------------------------------------------------------------------------------
# perplexity with a toy bigram model
# --------------------------------------------------------------------------------------------

VOCAB = 7


class Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]] — next-token scores depend only on the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())
        self.calls: list[tuple[int, bool]] = []

    def forward(self, input_ids):
        self.calls.append((input_ids.shape[0], self.training))
        return SimpleNamespace(logits=self.table[input_ids])


def make_model(seed: int = 0, dtype=torch.float32) -> Bigram:
    g = torch.Generator().manual_seed(seed)
    return Bigram((2.0 * torch.randn(VOCAB, VOCAB, generator=g)).to(dtype))


def hand_ppl(table: torch.Tensor, windows: torch.Tensor) -> float:
    """exp(mean NLL) with plain Python arithmetic over every predicted token."""
    t = table.double().tolist()
    nll, count = 0.0, 0
    for row in windows.tolist():
        for cur, nxt in zip(row[:-1], row[1:]):
            scores = t[cur]
            m = max(scores)
            lse = m + math.log(sum(math.exp(s - m) for s in scores))
            nll += lse - scores[nxt]
            count += 1
    return math.exp(nll / count)


def toy_windows(n: int = 5, seq_len: int = 9, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=g)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_perplexity_on_windows_matches_hand_computation(batch_size):
    model = make_model()
    windows = toy_windows()
    ref = hand_ppl(model.table.detach(), windows)
    got = perplexity_on_windows(model, windows, batch_size=batch_size, progress=False)
    assert got == pytest.approx(ref, rel=1e-6)
    assert 1.0 < got < 1e4
    assert [b for b, _ in model.calls] == [len(c) for c in windows.split(batch_size)]


def test_perplexity_of_uniform_model_is_vocab_size():
    model = Bigram(torch.zeros(VOCAB, VOCAB))
    assert perplexity_on_windows(model, toy_windows(), progress=False) == pytest.approx(VOCAB, rel=1e-6)


def test_perplexity_of_perfect_model_is_one():
    # deterministic cycle 0→1→…→6→0 and a model that puts (almost) all mass on the successor
    table = torch.full((VOCAB, VOCAB), -1e4)
    table[torch.arange(VOCAB), (torch.arange(VOCAB) + 1) % VOCAB] = 0.0
    windows = make_windows(torch.arange(40) % VOCAB, 8)
    assert perplexity_on_windows(Bigram(table), windows, progress=False) == pytest.approx(1.0, abs=1e-9)


def test_perplexity_half_precision_logits_are_upcast():
    model = make_model(dtype=torch.bfloat16)
    windows = toy_windows()
    ref = hand_ppl(model.table.detach().float(), windows)
    assert perplexity_on_windows(model, windows, progress=False) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("start_training", [True, False])
def test_perplexity_runs_in_eval_and_restores_mode(start_training):
    model = make_model()
    model.train(start_training)
    perplexity_on_windows(model, toy_windows(), batch_size=2, progress=False)
    assert model.calls and all(not training for _, training in model.calls)
    assert model.training is start_training
    assert model.table.grad is None  # no_grad


@pytest.mark.parametrize("shape", [(3, 1), (0, 5), (12,)])
def test_perplexity_on_windows_rejects_degenerate_windows(shape):
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity_on_windows(make_model(), torch.zeros(shape, dtype=torch.long), progress=False)


class CharTokenizer:
    """Maps characters to ids mod VOCAB; records the kwargs it was called with."""

    def __init__(self):
        self.kwargs = None

    def __call__(self, text, **kwargs):
        self.kwargs = kwargs
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def test_perplexity_end_to_end_with_toy_tokenizer():
    model = make_model(seed=3)
    tok = CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 3  # 132 chars
    got = perplexity(model, tok, text, seq_len=16, max_windows=5, batch_size=2, progress=False)
    assert tok.kwargs == {"add_special_tokens": False}
    ids = torch.tensor([ord(c) % VOCAB for c in text])
    windows = ids[:80].view(5, 16)
    assert got == pytest.approx(hand_ppl(model.table.detach(), windows), rel=1e-6)
    # without max_windows: floor(132 / 16) = 8 windows, tail dropped
    got_all = perplexity(model, tok, text, seq_len=16, progress=False)
    assert got_all == pytest.approx(hand_ppl(model.table.detach(), ids[:128].view(8, 16)), rel=1e-6)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "short", seq_len=16, progress=False)
