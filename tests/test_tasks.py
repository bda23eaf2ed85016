"""Task evaluation (peft_eora.eval.tasks) on the tiny real model and the shipped task subsets.

Scores are checked against log-likelihoods computed by hand (one unpadded sequence per choice),
formats against lm-evaluation-harness's prompts, and batching/padding/cache sharing for invariance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_eora.eval.tasks import (
    TASK_NAMES,
    GenerationExample,
    MultipleChoiceExample,
    TaskDataError,
    encode_pair,
    evaluate_gsm8k,
    evaluate_multiple_choice,
    evaluate_task,
    extract_flexible,
    extract_strict,
    generate_greedy,
    gsm8k_prompt,
    load_examples,
    load_gsm8k,
    normalize_answer,
    parse_mathqa_options,
    score_choices,
)

DATA = Path(__file__).parent / "data" / "tasks"


@pytest.fixture(scope="module")
def model(tiny_original_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_original_dir, dtype=torch.float32).eval()


def hand_loglikelihood(model, tokenizer, context: str, choice: str) -> float:
    """Sum of log p(continuation token | prefix) over one unpadded sequence, without the library."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + " " + choice)["input_ids"]
    cont = whole[len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + j, tok]) for j, tok in enumerate(cont))


# ---------------------------------------------------------------------------------------------
# Formats and loaders
# ---------------------------------------------------------------------------------------------


def test_loaders_follow_the_lm_eval_prompt_formats():
    arc = load_examples("arc_easy", DATA)
    assert len(arc) == 24
    first = json.loads((DATA / "arc/arc_easy_test.jsonl").read_text().splitlines()[0])
    assert arc[0].context == first["query"] + "\nAnswer:" and arc[0].context.startswith("Question: ")
    assert arc[0].choices == tuple(first["choices"]) and arc[0].gold == first["gold"]

    piqa = load_examples("piqa", DATA, limit=3)
    row = json.loads((DATA / "piqa/valid.jsonl").read_text().splitlines()[0])
    assert piqa[0].context == f"Question: {row['goal']}\nAnswer:"
    assert piqa[0].choices == (row["sol1"], row["sol2"])
    assert [ex.gold for ex in piqa] == [0, 1, 1]  # valid-labels.lst

    mathqa = load_examples("mathqa", DATA, limit=1)[0]
    assert mathqa.context.startswith("Question: a shopkeeper sold an article") and mathqa.context.endswith("\nAnswer:")
    assert mathqa.choices == ("38", "27.675", "30", "data inadequate", "none of these") and mathqa.gold == 0

    gsm = load_examples("gsm8k", DATA, limit=2)
    assert gsm[0].target == "18" and gsm[1].target == "3"
    assert len(load_examples("arc_challenge", DATA, limit=5)) == 5
    assert set(TASK_NAMES) == {"arc_easy", "arc_challenge", "piqa", "mathqa", "gsm8k"}


def test_mathqa_options_parse_like_lm_eval():
    assert parse_mathqa_options("a ) rs . 400 , b ) rs . 300 , c ) 1 / 2 , d ) 7 , e ) none") == [
        "rs . 400", "rs . 300", "1 / 2", "7", "none",
    ]  # fmt: skip
    # a comma inside an option ends it (lm-eval's regex does the same)
    assert parse_mathqa_options("a ) 1 , 2 , b ) 3 , c ) 4 , d ) 5 , e ) 6")[:2] == ["1", "3"]


def test_gsm8k_answer_extraction_and_normalisation():
    assert extract_strict("so 5 + 5 = 10\n#### 10\n") == "10"
    assert extract_strict("the answer is 10") == "[invalid]"
    assert extract_flexible("First 3 apples, then $1,250.") == "$1,250."
    assert extract_flexible("no digits here") == "[invalid]"
    assert normalize_answer("$1,250.") == "1250"
    assert normalize_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert GenerationExample("q", "work\n#### 1,234").target == "1234"
    shot = GenerationExample("What is 1+1?", "1+1=2\n#### 2")
    assert gsm8k_prompt(GenerationExample("Q2?", "#### 3"), [shot]) == (
        "Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: Q2?\nAnswer:"
    )


def test_bad_task_data_gives_one_clear_error(tmp_path):
    with pytest.raises(TaskDataError, match="Unknown task 'hellaswag'"):
        load_examples("hellaswag", DATA)
    # multiple-choice tasks are zero-shot: a few-shot request for one is refused, not silently ignored
    with pytest.raises(TaskDataError, match="num_fewshot=5 applies to gsm8k only: arc_easy is scored zero-shot"):
        evaluate_task(None, None, "arc_easy", data_dir=DATA, num_fewshot=5)
    with pytest.raises(TaskDataError, match="not found"):
        load_examples("arc_easy", tmp_path)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa/valid.jsonl").write_text((DATA / "piqa/valid.jsonl").read_text())
    (tmp_path / "piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(TaskDataError, match="2 labels but .* 24 rows"):
        load_examples("piqa", tmp_path)
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc/arc_easy_test.jsonl").write_text('{"query": "Question: x", "choices": ["a"]}\n')
    with pytest.raises(TaskDataError, match=r"missing field\(s\) \['gold'\]"):
        load_examples("arc_easy", tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_examples("arc_easy", DATA, limit=0)


def test_continuation_tokens_are_split_from_the_whole_sequence(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: Which gas?\nAnswer:", " carbon dioxide")
    assert ctx == tokenizer("Question: Which gas?\nAnswer:")["input_ids"]
    assert ctx + cont == tokenizer("Question: Which gas?\nAnswer: carbon dioxide")["input_ids"]
    # trailing context spaces move to the continuation
    assert encode_pair(tokenizer, "Answer: ", "x") == encode_pair(tokenizer, "Answer:", " x")


# ---------------------------------------------------------------------------------------------
# Scoring on the tiny real model
# ---------------------------------------------------------------------------------------------


def test_loglikelihoods_and_accuracy_match_a_hand_computation(model, tokenizer):
    examples = load_examples("arc_easy", DATA, limit=3)
    scores = score_choices(model, tokenizer, examples, progress=False)
    expected = [[hand_loglikelihood(model, tokenizer, ex.context, c) for c in ex.choices] for ex in examples]
    for got, want in zip(scores, expected):
        assert got == pytest.approx(want, abs=2e-3)
    acc = sum(max(range(4), key=lambda j: e[j]) == ex.gold for e, ex in zip(expected, examples)) / 3
    acc_norm = sum(
        max(range(4), key=lambda j: e[j] / len(ex.choices[j])) == ex.gold for e, ex in zip(expected, examples)
    ) / 3
    result = evaluate_multiple_choice(model, tokenizer, examples, progress=False, details=True)
    assert result["num_examples"] == 3
    assert result["acc"] == pytest.approx(acc) and result["acc_norm"] == pytest.approx(acc_norm)
    assert [d["pred"] for d in result["details"]] == [max(range(4), key=lambda j: e[j]) for e in expected]


@pytest.mark.parametrize("task", ["arc_challenge", "piqa", "mathqa"])
def test_shared_context_batching_equals_whole_sequences(model, tokenizer, task):
    examples = load_examples(task, DATA, limit=4)
    shared = score_choices(model, tokenizer, examples, batch_size=32, progress=False)
    whole = score_choices(model, tokenizer, examples, batch_size=32, share_context=False, progress=False)
    one_by_one = score_choices(model, tokenizer, examples, batch_size=1, progress=False)
    for a, b, c in zip(shared, whole, one_by_one):
        assert a == pytest.approx(b, abs=2e-3) and a == pytest.approx(c, abs=2e-3)
        assert all(v < 0 for v in a)
    # a choice's tokens are scored once: appending text lowers the log-likelihood
    ex = MultipleChoiceExample("Question: What color is the sky?\nAnswer:", ("blue", "blue and green"), 0)
    short, longer = score_choices(model, tokenizer, [ex], progress=False)[0]
    assert longer < short


def test_contexts_are_cut_on_the_left_to_fit_and_keep_a_token(model, tokenizer, monkeypatch):
    """Contexts longer than the model's length are cut on the left to fit it; a continuation as long as the model
    length keeps one context token (``ctx[-0:]`` used to keep the whole context)."""
    from peft_eora.eval import multiple_choice

    seen: list[list[int]] = []
    real = multiple_choice.inference_batches

    def spy(model, lengths, *args, **kwargs):
        seen.append(list(lengths))
        return real(model, lengths, *args, **kwargs)

    monkeypatch.setattr(multiple_choice, "inference_batches", spy)
    monkeypatch.setattr(multiple_choice, "max_length", lambda m: 12)
    long_context = MultipleChoiceExample("Question: " + "why is the sky blue " * 8 + "?\nAnswer:", ("blue", "red"), 0)
    long_choice = MultipleChoiceExample("Question: colors?\nAnswer:", ("blue " * 14, "red"), 0)
    scores = score_choices(model, tokenizer, [long_context, long_choice], progress=False)
    assert all(v < 0 for row in scores for v in row)
    longest = len(tokenizer(" " + "blue " * 14, add_special_tokens=False)["input_ids"])
    assert seen[0][0] == 12 and seen[0][1] <= longest + 1


def test_evaluate_task_is_deterministic_and_reports_lm_eval_metrics(model, tokenizer):
    first = evaluate_task(model, tokenizer, "piqa", data_dir=DATA, limit=10, progress=False)
    second = evaluate_task(model, tokenizer, "piqa", data_dir=DATA, limit=10, batch_size=3, progress=False)
    assert first["acc"] == second["acc"] and first["acc_norm"] == second["acc_norm"]
    assert set(first) >= {"task", "data", "num_examples", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert first["num_examples"] == 10 and first["data"].endswith("piqa/valid.jsonl")
    n, acc = 10, first["acc"]
    assert first["acc_stderr"] == pytest.approx((acc * (1 - acc) * n / (n - 1) / n) ** 0.5)


def test_greedy_generation_is_unaffected_by_left_padding(model, tokenizer):
    prompts = ["Question: What is 2 plus 3?\nAnswer:", "Question: Tom has 4 apples and buys 7 more. How many?\nAnswer:"]
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=8, batch_size=2, progress=False)
    for prompt, text in zip(prompts, batched):
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        alone = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text == alone.split("Question:")[0]


def test_gsm8k_exact_match_from_completions(model, tokenizer, monkeypatch):
    import peft_eora.eval.generation as generation

    examples = load_examples("gsm8k", DATA, limit=3)
    canned = [" 16 - 3 - 4 = 9, 9 * 2 = 18\n#### 18", " It takes 2 + 1 = 3 bolts.", " #### 7"]
    seen = {}

    def fake_generate(model, tokenizer, prompts, **kw):
        seen["prompts"] = prompts
        return canned

    monkeypatch.setattr(generation, "generate_greedy", fake_generate)
    pool = load_gsm8k(DATA / "gsm8k/train.jsonl")
    result = evaluate_gsm8k(model, tokenizer, examples, num_fewshot=2, fewshot_pool=pool, details=True)
    assert result["exact_match_strict"] == pytest.approx(1 / 3)  # only the first has "#### 18"
    assert result["exact_match_flexible"] == pytest.approx(2 / 3)  # "18" and "3" (last numbers)
    assert [d["gold"] for d in result["details"]] == ["18", "3", "70000"]
    prompt = seen["prompts"][0]
    assert prompt.count("Question: ") == 3 and prompt.endswith(f"Question: {examples[0].question}\nAnswer:")
    again = evaluate_gsm8k(model, tokenizer, examples, num_fewshot=2, fewshot_pool=pool)
    assert seen["prompts"][0] == prompt and again["exact_match_strict"] == result["exact_match_strict"]


def test_gsm8k_few_shot_prompts_are_lm_eval_s(monkeypatch):
    """lm-eval 0.4 draws exactly ``num_fewshot`` shots per question when they come from another split (gsm8k: train
    shots, test questions): with the same seed, every prompt is the one lm-eval builds."""
    samplers = pytest.importorskip("lm_eval.api.samplers", reason="lm-evaluation-harness is an optional extra")
    from peft_eora.eval import generation

    pool, tests = load_gsm8k(DATA / "gsm8k/train.jsonl"), load_gsm8k(DATA / "gsm8k/test.jsonl")
    seen: list[str] = []
    monkeypatch.setattr(generation, "generate_greedy", lambda m, t, prompts, **kw: seen.extend(prompts) or [""] * len(prompts))
    generation.evaluate_gsm8k(None, None, tests, num_fewshot=3, fewshot_pool=pool, progress=False)
    docs = [json.loads(line) for line in (DATA / "gsm8k/train.jsonl").read_text().splitlines() if line.strip()]
    sampler = samplers.ContextSampler(docs, rnd=1234)
    for ex, prompt in zip(tests, seen):
        shots = sampler.sample(n=3)
        expected = [f"Question: {d['question']}\nAnswer: {d['answer']}" for d in shots]
        assert prompt == "\n\n".join([*expected, f"Question: {ex.question}\nAnswer:"])


def test_gsm8k_end_to_end_on_the_tiny_model(model, tokenizer):
    result = evaluate_task(
        model, tokenizer, "gsm8k", data_dir=DATA, limit=2, num_fewshot=1, max_new_tokens=12, details=True,
        progress=False,
    )  # fmt: skip
    assert result["num_examples"] == 2 and result["num_fewshot"] == 1
    for row in result["details"]:
        assert "Question:" not in row["completion"]
        assert row["flexible"] == extract_flexible(row["completion"])
    expected = sum(normalize_answer(r["flexible"]) == r["gold"] for r in result["details"]) / 2
    assert result["exact_match_flexible"] == expected
