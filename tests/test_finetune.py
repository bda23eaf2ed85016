"""Fine-tuning from the EoRA init (peft_eora.finetune) on the real embedded model.

Fast tests check the supervised GSM8K data and the error paths; the slow test trains, on the same
NF4-quantized SmolLM2-135M (QLoRA's format), an EoRA-initialised adapter and a zero-init LoRA of
the same rank with the same data order and learning rate, and checks that the EoRA start is ahead
in training and on held-out GSM8K rows, and that the loss curves are plotted.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peft_eora.calibration import BUILTIN_DATASETS
from peft_eora.finetune import GSM8K_PROMPT, gsm8k_calibration_source, gsm8k_sft_dataset, mean_loss, plot_losses, train_losses

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def test_plot_losses_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_losses({"a": [3.0, 2.5, 2.0, 1.8], "b": [3.2, 3.0, 2.9, 2.7]}, tmp_path / "sub" / "l.png", smooth=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["l.png"]  # no temporary file left


@pytest.mark.slow
def test_eora_init_fine_tunes_ahead_of_zero_init_lora(tokenizer, tmp_path):
    """The paper's EoRA-vs-QLoRA comparison at toy scale: same NF4 base, rank, alpha, targets,
    data order, learning rate; only the adapter's starting point differs."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed: pip install 'peft-eora[bnb]'")
    pytest.importorskip("matplotlib")
    from peft import LoraConfig, get_peft_model

    from peft_eora import CalibrationConfig, EoRAConfig
    from peft_eora.embedded import export_original
    from peft_eora.quantize import load_and_quantize

    original_dir = export_original(torch.float32)
    pad = tokenizer.eos_token_id
    train = gsm8k_sft_dataset(tokenizer, num_examples=STEPS * BATCH, max_length=MAX_LEN)
    heldout = gsm8k_sft_dataset(tokenizer, num_examples=HELDOUT, max_length=MAX_LEN, offset=512 - HELDOUT)
    calibration = CalibrationConfig(dataset="builtin:c4", num_samples=8, seq_len=128,
                                    mix=[gsm8k_calibration_source(STEPS * BATCH, tmp_path)])
    quantized_loss = None
    result = {}
    for name in ("eora", "lora"):
        base = load_and_quantize(original_dir, "bnb-nf4")
        if quantized_loss is None:
            quantized_loss = mean_loss(base, heldout, pad_token_id=pad)
        if name == "eora":
            model = get_peft_model(base, EoRAConfig(r=RANK, target_modules=TARGETS, original_model=str(original_dir),
                                                    calibration=calibration))
        else:
            model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, lora_dropout=0.0))
        before = mean_loss(model, heldout, pad_token_id=pad)
        losses = train_losses(model, train, steps=STEPS, learning_rate=LR, batch_size=BATCH, seed=0, pad_token_id=pad)
        result[name] = {"before": before, "losses": losses, "after": mean_loss(model, heldout, pad_token_id=pad)}
    eora, lora = result["eora"], result["lora"]
    # zero-init LoRA starts as the quantized base; EoRA starts closer to the original on unseen GSM8K rows
    assert abs(lora["before"] - quantized_loss) < 1e-4, (lora["before"], quantized_loss)
    assert eora["before"] < quantized_loss - 0.01, (eora["before"], quantized_loss)
    # ... and stays ahead: mean training loss over the run and held-out loss after it
    assert sum(eora["losses"]) <= sum(lora["losses"]), result
    assert eora["after"] <= lora["after"], result
    png = plot_losses({"EoRA init": eora["losses"], "zero-init LoRA": lora["losses"]}, tmp_path / "losses.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


RANK, STEPS, BATCH, LR, MAX_LEN, HELDOUT = 8, 6, 2, 2e-4, 160, 16
