"""Fine-tuning from the EoRA init (peft_eora.finetune) on the real embedded model.

Fast tests check the supervised GSM8K data and the error paths; the slow test runs
``examples/finetune_from_eora.py``, which trains, on the same NF4-quantized SmolLM2-135M (QLoRA's
format), an EoRA-initialised adapter and a zero-init LoRA of the same rank with the same data order
and learning rate, and checks from its JSON report that the EoRA start is ahead in training and on
held-out GSM8K rows, and that the loss curves are plotted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_eora.calibration import BUILTIN_DATASETS
from peft_eora.finetune import GSM8K_PROMPT, gsm8k_sft_dataset, plot_losses, train_losses

def test_gsm8k_examples_learn_the_answer_only(tokenizer):
    data = gsm8k_sft_dataset(tokenizer, num_examples=4, max_length=512)
    assert len(data) == 4
    import json

    first = json.loads(open(BUILTIN_DATASETS["builtin:gsm8k"], encoding="utf-8").readline())
    row = data[0]
    prompt = tokenizer(GSM8K_PROMPT.format(question=first["question"]), add_special_tokens=False)["input_ids"]
    assert row["input_ids"][: len(prompt)] == prompt and row["labels"][: len(prompt)] == [-100] * len(prompt)
    learnt = [t for t in row["labels"] if t != -100]
    assert tokenizer.decode(learnt[:-1]) == first["answer"] and learnt[-1] == tokenizer.eos_token_id
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
    short = gsm8k_sft_dataset(tokenizer, num_examples=2, max_length=16, offset=10)
    assert all(len(r["input_ids"]) <= 16 for r in short)


def test_gsm8k_dataset_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="512 rows"):
        gsm8k_sft_dataset(tokenizer, num_examples=10, offset=510)
    with pytest.raises(FileNotFoundError, match="builtin:gsm8k"):
        gsm8k_sft_dataset(tokenizer, source=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no question here"}\n')
    with pytest.raises(ValueError, match="question"):
        gsm8k_sft_dataset(tokenizer, source=bad, num_examples=1)


def test_train_losses_needs_trainable_parameters(tiny_original_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_original_dir, dtype=torch.float32)
    model.requires_grad_(False)
    data = gsm8k_sft_dataset(tokenizer, num_examples=2, max_length=32)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_losses(model, data, steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_losses(model, data, steps=0)


def test_train_losses_pads_with_the_first_of_several_end_tokens():
    """Llama 3 and Qwen2.5 configs have no pad token and a list of end tokens: the first pads the batches."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import tiny_llama_pair

    _, model = tiny_llama_pair(seed=0)
    model.config.pad_token_id, model.config.eos_token_id = None, [1, 2]
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    rows = [{"input_ids": [5, 6, 7][: n], "attention_mask": [1] * n, "labels": [5, 6, 7][: n]} for n in (2, 3)]
    losses = train_losses(pm, rows, steps=1, batch_size=2)
    assert len(losses) == 1


def test_plot_losses_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_losses({"a": [3.0, 2.5, 2.0, 1.8], "b": [3.2, 3.0, 2.9, 2.7]}, tmp_path / "sub" / "l.png", smooth=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["l.png"]  # no temporary file left


@pytest.mark.slow
def test_eora_init_fine_tunes_ahead_of_zero_init_lora(tmp_path):
    """The paper's EoRA-vs-QLoRA comparison at toy scale, run as ``examples/finetune_from_eora.py``
    (so the example is what is tested): same NF4 base, rank, alpha, targets, data order, learning
    rate; only the adapter's starting point differs. Its stdout is the JSON report alone. A fixed ridge
    (the default 'auto' chooses one per layer: ~100 s more here for the same check)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed: pip install 'peft-eora[bnb]'")
    pytest.importorskip("matplotlib")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--format", "nf4", "--rank", str(RANK), "--steps", str(STEPS), "--batch-size", str(BATCH),
            "--lr", str(LR), "--max-length", str(MAX_LEN), "--train-examples", str(STEPS * BATCH),
            "--heldout", str(HELDOUT), "--calib-samples", "8", "--calib-seq-len", "128", "--damping", "0.01",
            "--png", str(tmp_path / "losses.png")]
    proc = subprocess.run([sys.executable, str(repo / "examples" / "finetune_from_eora.py"), *args], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    eora, lora, quantized = report["EoRA init"], report["zero-init LoRA"], report["heldout_loss_quantized"]
    # zero-init LoRA starts as the quantized base; EoRA starts closer to the original on unseen GSM8K rows
    assert abs(lora["heldout_loss_before"] - quantized) < 1e-4, report
    assert eora["heldout_loss_before"] < quantized - 0.01, report
    assert report["heldout_loss_original"] < quantized
    # ... and stays ahead: mean training loss over the run and held-out loss after it
    assert len(eora["losses"]) == len(lora["losses"]) == STEPS
    assert sum(eora["losses"]) <= sum(lora["losses"]), report
    assert eora["heldout_loss_after"] <= lora["heldout_loss_after"], report
    assert Path(report["png"]).read_bytes()[:4] == b"\x89PNG"


RANK, STEPS, BATCH, LR, MAX_LEN, HELDOUT = 8, 6, 2, 2e-4, 160, 16
