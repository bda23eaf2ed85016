"""Calibration specs: templates, mixing sources by weight, JSON round trip, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_eora import CalibrationConfig, CalibrationSource, EoRAConfig
from peft_eora.calibration import CalibrationError, load_calibration_tokens, share_windows
from peft_eora.cli.options import mix_source as _mix_source


def _ids_file(path: Path, token: int, rows: int = 20, length: int = 10) -> str:
    """A jsonl file whose documents are token-id lists filled with ``token`` (no tokenizer needed)."""
    path.write_text("".join(json.dumps({"ids": [token] * length}) + "\n" for _ in range(rows)))
    return str(path)


@pytest.mark.parametrize(
    "weights, total, expected",
    [([1, 1], 5, [3, 2]), ([1, 0, 2], 7, [2, 0, 5]), ([0.5, 0.25, 0.25], 4, [2, 1, 1]), ([3], 4, [4])],
)
def test_share_windows_largest_remainder(weights, total, expected):
    assert share_windows(weights, total) == expected
    assert sum(share_windows(weights, total)) == total


def test_mix_shares_windows_by_weight_and_shuffles_them(tmp_path):
    a, b = _ids_file(tmp_path / "a.jsonl", 7), _ids_file(tmp_path / "b.jsonl", 9)
    spec = CalibrationConfig(a, column="ids", num_samples=6, seq_len=8, mix=[{"dataset": b, "column": "ids", "weight": 2}])
    tokens = load_calibration_tokens(spec)
    assert tokens.shape == (6, 8)
    # every window comes from one source: 1/3 of them from a, 2/3 from b
    per_window = [set(row.tolist()) for row in tokens]
    assert sorted(tuple(s) for s in per_window) == [(7,)] * 2 + [(9,)] * 4
    # shuffled together (not a's windows then b's), deterministically for a seed
    assert [next(iter(s)) for s in per_window] != [7, 7, 9, 9, 9, 9]
    assert torch.equal(tokens, load_calibration_tokens(spec))
    # a source with weight 0 contributes nothing
    only_b = CalibrationConfig(a, column="ids", weight=0, num_samples=3, seq_len=8, mix=[{"dataset": b, "column": "ids"}])
    assert set(load_calibration_tokens(only_b).unique().tolist()) == {9}


def test_single_source_unchanged_by_mix_support(tmp_path):
    """Without ``mix`` the windows are the source's documents in shuffled order, not reshuffled windows."""
    path = tmp_path / "seq.jsonl"
    path.write_text("".join(json.dumps({"ids": list(range(10 * i, 10 * i + 10))}) + "\n" for i in range(8)))
    tokens = load_calibration_tokens(CalibrationConfig(str(path), column="ids", num_samples=4, seq_len=10))
    # each window is one whole document (10 ids, no tokenizer so no EOS): consecutive ids
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10)) for row in tokens)


def test_a_text_files_rows_are_its_paragraphs_not_its_lines(tmp_path, tokenizer):
    """Rows are shuffled and EOS-joined: a hard-wrapped .txt read line by line was cut into fragments of unrelated
    documents with an EOS every 80 characters. Its blank-line separated paragraphs stay whole."""
    words = [f"w{i}" for i in range(400)]
    doc_a = "\n".join(" ".join(words[i:i + 10]) for i in range(0, 200, 10))  # 20 wrapped lines
    doc_b = "\n".join(" ".join(words[i:i + 10]) for i in range(200, 400, 10))
    path = tmp_path / "wrapped.txt"
    path.write_text(doc_a + "\n\n" + doc_b + "\n")
    folder = tmp_path / "corpus"  # a dataset folder of .txt files is read the same way
    folder.mkdir()
    (folder / "a.txt").write_text(doc_a + "\n")
    (folder / "b.txt").write_text(doc_b + "\n")
    n = len(tokenizer(doc_a + "\n" + doc_b, add_special_tokens=False)["input_ids"])
    for source in (path, folder):
        tokens = load_calibration_tokens(CalibrationConfig(str(source), num_samples=1, seq_len=n // 2), tokenizer)
        assert int((tokens == tokenizer.eos_token_id).sum()) <= 1  # one document boundary at most, not one per line
        text = tokenizer.decode(tokens[0])
        first = int(text.split()[0][1:])
        assert text.startswith(f"w{first} w{first + 1} w{first + 2}") and first in (0, 200)  # a paragraph's start


def test_template_and_builtin_gsm8k(tokenizer):
    spec = CalibrationConfig("builtin:gsm8k", template="Q: {question}\nA: {answer}", num_samples=2, seq_len=256)
    text = tokenizer.decode(load_calibration_tokens(spec, tokenizer)[0])
    assert text.startswith("Q: ") and "\nA: " in text
    # without a template the built-in GSM8K sample is "{question}\n{answer}" (the perplexity convention)
    plain = tokenizer.decode(load_calibration_tokens(CalibrationConfig("builtin:gsm8k", num_samples=1, seq_len=256), tokenizer)[0])
    assert plain.startswith("Nurse Missy") and "her patients?\nNurse Missy has" in plain  # question, newline, answer


def test_calibration_errors(tmp_path, tokenizer):
    with pytest.raises(CalibrationError, match=r"template '\{question\} \{missing\}' does not fit .*columns are \['question', 'answer'\]"):
        load_calibration_tokens(CalibrationConfig("builtin:gsm8k", template="{question} {missing}", num_samples=1, seq_len=8), tokenizer)
    with pytest.raises(CalibrationError, match=r"no column 'body'.*template="):
        load_calibration_tokens(CalibrationConfig("builtin:c4", column="body", num_samples=1, seq_len=8), tokenizer)
    with pytest.raises(ValueError, match=r"mix entries take the keys .*got \['path'\]"):
        CalibrationConfig(mix=[{"path": "x"}])
    with pytest.raises(ValueError, match="weight of 'builtin:gsm8k' must be a finite number"):
        CalibrationConfig(mix=[{"dataset": "builtin:gsm8k", "weight": -1}])
    with pytest.raises(ValueError, match="every source has weight 0"):
        CalibrationConfig(weight=0, mix=[{"dataset": "builtin:gsm8k", "weight": 0}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationError, match="empty.jsonl is empty"):
        load_calibration_tokens(CalibrationConfig(str(empty), num_samples=1, seq_len=8), tokenizer)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"\n')
    with pytest.raises(CalibrationError, match=r"Could not read the calibration file .*broken.jsonl .*valid"):
        load_calibration_tokens(CalibrationConfig(str(broken), num_samples=1, seq_len=8), tokenizer)
    short = _ids_file(tmp_path / "short.jsonl", 3, rows=2, length=4)
    spec = CalibrationConfig("builtin:c4", num_samples=4, seq_len=16, mix=[{"dataset": short, "column": "ids"}])
    with pytest.raises(CalibrationError, match=r"has only 10 tokens but num_samples×seq_len \(its share of the mix\) = 2×16"):
        load_calibration_tokens(spec, tokenizer)


def test_mixed_spec_json_round_trip(tmp_path):
    spec = CalibrationConfig(
        "builtin:c4", num_samples=8, seq_len=64,
        mix=[CalibrationSource("builtin:gsm8k", template="{question}\n{answer}", weight=0.5)],
    )  # fmt: skip
    EoRAConfig(r=4, calibration=spec).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "eora_config.json").read_text())["calibration"]
    assert saved["mix"] == [
        {"dataset": "builtin:gsm8k", "subset": None, "split": "train", "column": "text",
         "template": "{question}\n{answer}", "weight": 0.5, "data_files": None}
    ]  # fmt: skip
    again = EoRAConfig(r=4, calibration=saved).calibration  # what loading the adapter config does
    assert again == spec and isinstance(again.mix[0], CalibrationSource)


def test_cli_mix_argument():
    assert _mix_source("builtin:gsm8k") == {"dataset": "builtin:gsm8k"}
    assert _mix_source('{"dataset": "d.jsonl", "weight": 3}') == {"dataset": "d.jsonl", "weight": 3}
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="JSON object with keys dataset"):
        _mix_source('{"path": "x"}')


def test_rows_that_are_neither_text_nor_token_ids_are_refused(tmp_path):
    """A column of numbers or of nested lists gets one error naming it (a TypeError deep inside before); blank
    texts and rows missing a value the template names are skipped, not calibrated on as spaces or "None"."""
    from peft_eora.calibration import load_documents

    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": 12345 + i}) + "\n" for i in range(4)))
    with pytest.raises(CalibrationError, match="holds int values .* text or a flat list of token ids"):
        load_documents(CalibrationSource(str(numbers)))
    nested = tmp_path / "nested.jsonl"
    nested.write_text(json.dumps({"ids": [[1, 2], [3]]}) + "\n")
    with pytest.raises(CalibrationError, match="holds list values"):
        load_documents(CalibrationSource(str(nested), column="ids"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("  \n ", "real text", "\t")))
    assert load_documents(CalibrationSource(str(blank))) == ["real text"]
    blank.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(CalibrationError, match="is empty"):
        load_documents(CalibrationSource(str(blank)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"q": "a?", "a": None}) + "\n" + json.dumps({"q": "b?", "a": "yes"}) + "\n")
    assert load_documents(CalibrationSource(str(qa), template="{q} {a}")) == ["b? yes"]


def test_a_source_given_no_window_is_said(tmp_path, caplog):
    a, b = _ids_file(tmp_path / "a.jsonl", 7), _ids_file(tmp_path / "b.jsonl", 9)
    spec = CalibrationConfig(a, column="ids", num_samples=4, seq_len=8,
                             mix=[{"dataset": b, "column": "ids", "weight": 0.1}])
    with caplog.at_level("WARNING", logger="peft_eora.calibration"):
        tokens = load_calibration_tokens(spec)
    assert set(tokens.unique().tolist()) == {7}
    assert "gets no window of the 4" in caplog.text and "b.jsonl" in caplog.text


def test_a_default_collated_dataloader_of_list_rows_is_said_for_what_it_is():
    """Default collate turns rows that are Python lists into one tensor per position; the error blamed unequal row
    lengths."""
    from torch.utils.data import DataLoader

    from peft_eora.calibration import as_batches

    rows = [{"input_ids": list(range(i, i + 6))} for i in range(4)]
    with pytest.raises(CalibrationError, match=r"list of 6 tensors \(of \(2,\)\): PyTorch's default collate"):
        as_batches(DataLoader(rows, batch_size=2))
    tensor_rows = [{"input_ids": torch.arange(i, i + 6)} for i in range(4)]
    assert [b["input_ids"].shape for b in as_batches(DataLoader(tensor_rows, batch_size=2))] == [(2, 6), (2, 6)]


def test_a_dataloader_of_return_tensors_rows_gives_two_d_batches():
    """``DataLoader`` over ``tokenizer(text, return_tensors="pt")`` items stacks (1, seq_len) rows into (batch, 1,
    seq_len): it went into the forward as it was (worse factors, a misleading value-weighting warning)."""
    from torch.utils.data import DataLoader

    from peft_eora.calibration import as_batches

    items = [{"input_ids": torch.arange(i, i + 8)[None], "attention_mask": torch.ones(1, 8, dtype=torch.long)}
             for i in range(4)]
    items[3]["attention_mask"][0, 6:] = 0
    batches = as_batches(DataLoader(items, batch_size=2))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 8), (2, 8)]
    assert "attention_mask" not in batches[0] and tuple(batches[1]["attention_mask"].shape) == (2, 8)
    with pytest.raises(CalibrationError, match=r"must be \(batch, seq_len\), got \(2, 2, 4\)"):
        as_batches([{"input_ids": torch.zeros(2, 2, 4, dtype=torch.long)}])
    with pytest.raises(CalibrationError, match=r"attention_mask \(2, 3\) does not match its input_ids \(2, 8\)"):
        as_batches([{"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 3)}])


def test_hub_data_files_reach_load_dataset(monkeypatch):
    """``data_files`` names the files of a Hub dataset to read: without it, allenai/c4's validation split downloads
    every shard (the json builder prepares all splits' files). It reaches ``load_dataset``, and the CLI's
    ``--data-files`` becomes it."""
    import datasets

    from peft_eora.calibration import load_documents
    from peft_eora.cli import build_parser
    from peft_eora.cli.compute import calibration_from_args

    seen = []

    def fake_load(name, subset=None, split=None, **kw):
        seen.append((name, subset, split, kw))
        return datasets.Dataset.from_dict({"text": ["a document"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert load_documents(CalibrationConfig("allenai/c4", split="validation", data_files=shard)) == ["a document"]
    load_documents(CalibrationConfig("allenai/c4", subset="en", split="validation"))
    assert seen == [("allenai/c4", None, "validation", {"data_files": shard}), ("allenai/c4", "en", "validation", {})]
    args = build_parser().parse_args(["compute", "--embedded", "--dataset", "allenai/c4", "--split", "validation",
                                      "--data-files", shard["validation"], "--rank", "8", "--out", "x"])
    assert calibration_from_args(args).data_files == {"validation": [shard["validation"]]}


def test_documents_are_joined_with_a_separator_when_the_tokenizer_has_no_eos(tokenizer, tmp_path, caplog):
    """Without EOS the documents ran into each other ('...starts.Third one.'); BOS (or SEP) joins them then."""
    import copy

    from peft_eora.calibration import load_calibration_tokens

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document number {i} ends here."}) + "\n" for i in range(8)))
    spec = CalibrationConfig(str(docs), num_samples=2, seq_len=16)
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None and no_eos.bos_token_id is not None
    with caplog.at_level("INFO", logger="peft_eora.calibration"):
        ids = load_calibration_tokens(spec, no_eos)
    assert int((ids == no_eos.bos_token_id).sum()) >= 2 and "joined with its BOS" in caplog.text
    assert int((load_calibration_tokens(spec, tokenizer) == tokenizer.eos_token_id).sum()) >= 2


def test_token_batches_accepted_and_checked():
    """A tokenizer's output passes as it is (one batch of rows, split by batch_size, its padding mask kept); ids
    that are not integers, negative or beyond the model's vocabulary are refused with one error."""
    from transformers import BatchEncoding

    from peft_eora.calibration import as_batches, check_vocabulary

    ids = torch.randint(3, 100, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, :2] = 0
    batches = as_batches(BatchEncoding({"input_ids": ids, "attention_mask": mask}), batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), ids) and "attention_mask" in batches[0]
    assert "attention_mask" not in batches[1]  # an all-ones mask is dropped, as for batches given one by one
    assert len(as_batches({"input_ids": ids[0]})) == 1
    with pytest.raises(CalibrationError, match="integer tensor"):
        as_batches(ids.float())
    with pytest.raises(CalibrationError, match="≥ 0"):
        as_batches([{"input_ids": -ids}])
    # DataLoader(TensorDataset(ids)) yields one-tensor lists; other types are refused saying what is accepted
    from torch.utils.data import DataLoader, TensorDataset

    loaded = as_batches(DataLoader(TensorDataset(ids), batch_size=2))
    assert torch.equal(torch.cat([b["input_ids"] for b in loaded]), ids)
    with pytest.raises(CalibrationError, match="a token-id tensor, a mapping with 'input_ids'"):
        as_batches([ids.tolist()])
    assert check_vocabulary(batches, 100) == batches
    with pytest.raises(CalibrationError, match="outside the model's vocabulary \\(50 tokens\\)"):
        check_vocabulary(batches, 50)


def test_padding_outside_the_vocabulary_is_not_blamed_on_the_tokenizer():
    """A pad token added to the tokenizer but not to the model (Llama 3's ``[PAD]``, id = vocabulary
    size), or a negative pad id, sits only where the attention mask hides it: those positions get
    id 0 in a copy; a real token outside the vocabulary is still one error naming it."""
    from peft_eora.calibration import as_batches, check_vocabulary

    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    ids[1, :2], mask[1, :2] = 100, 0  # left padding with the added pad id
    given = ids.clone()
    (batch,) = check_vocabulary(as_batches({"input_ids": ids, "attention_mask": mask}), 100)
    assert torch.equal(ids, given)  # the caller's tensor untouched
    assert torch.equal(batch["input_ids"][1, :2], torch.zeros(2, dtype=torch.long))
    assert torch.equal(batch["input_ids"][:, 2:], ids[:, 2:]) and torch.equal(batch["input_ids"][0], ids[0])
    ids[0, 3] = 120  # a real token outside it
    with pytest.raises(CalibrationError, match="token id 120 is outside the model's vocabulary \\(100 tokens\\)"):
        check_vocabulary(as_batches({"input_ids": ids, "attention_mask": mask}), 100)
    # padding written as a negative id (-1, -100) is hidden the same way; a negative real token is refused
    ids[0, 3], ids[1, :2] = 7, -100
    (batch,) = as_batches({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(batch["input_ids"][1, :2], torch.zeros(2, dtype=torch.long)) and int(ids[1, 0]) == -100
    ids[0, 1] = -1
    with pytest.raises(CalibrationError, match="must be ≥ 0, got -1"):
        as_batches({"input_ids": ids, "attention_mask": mask})
