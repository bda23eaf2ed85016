"""Fine-tuning from the EoRA init: supervised GSM8K data, a Trainer run that records its losses, a plot.

EoRA factors are ordinary LoRA weights, so further training is PEFT as usual; this module holds
the few pieces the example and the tests share::

    >>> from peft_eora.finetune import gsm8k_sft_dataset, train_losses, plot_losses
    >>> data = gsm8k_sft_dataset(tokenizer, num_examples=256, max_length=256)
    >>> eora_curve = train_losses(eora_model, data, steps=100, learning_rate=1e-4)
    >>> lora_curve = train_losses(get_peft_model(qmodel, LoraConfig(r=64, lora_alpha=64)), data, steps=100, learning_rate=1e-4)
    >>> plot_losses({"EoRA init": eora_curve, "zero-init LoRA": lora_curve}, "losses.png")

The comparison mirrors the paper's EoRA vs QLoRA: same quantized base, rank, data order,
learning rate; only the adapter's starting point differs (EoRA's A/B vs Kaiming A and B = 0).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .safe_files import atomic_write

logger = logging.getLogger(__name__)

#: Prompt / answer layout of the supervised GSM8K examples (the answer is what the loss is on).
GSM8K_PROMPT = "Question: {question}\nAnswer: "


def gsm8k_sft_dataset(
    tokenizer,
    source: Union[str, Path] = "builtin:gsm8k",
    num_examples: Optional[int] = 256,
    max_length: int = 256,
    offset: int = 0,
):
    """GSM8K problems as causal-LM examples: ``input_ids``, ``attention_mask`` and ``labels``.

    ``source`` is ``"builtin:gsm8k"`` (512 shipped training rows) or a GSM8K-layout jsonl file
    (``question``, ``answer``). Rows ``offset … offset+num_examples`` are used; the prompt
    (:data:`GSM8K_PROMPT`) is masked out of ``labels`` (-100), the answer and the EOS token are
    learnt; examples are cut at ``max_length`` tokens.
    """
    import datasets

    from .calibration import BUILTIN_DATASETS

    path = BUILTIN_DATASETS.get(str(source), Path(source))
    if not Path(path).is_file():
        raise FileNotFoundError(f"No GSM8K file at {path}; pass 'builtin:gsm8k' or a jsonl with question/answer rows.")
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    missing = {"question", "answer"} - set(rows.column_names)
    if missing:
        raise ValueError(f"{path} lacks the GSM8K column(s) {sorted(missing)}; its columns are {rows.column_names}.")
    end = len(rows) if num_examples is None else offset + num_examples
    if offset < 0 or end > len(rows) or end <= offset:
        raise ValueError(f"Rows {offset}…{end} requested but {path} has {len(rows)} rows.")
    rows = rows.select(range(offset, end))
    eos = tokenizer.eos_token_id

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        prompt = tokenizer(GSM8K_PROMPT.format(question=row["question"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (prompt + answer)[:max_length]
        labels = ([-100] * len(prompt) + answer)[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return rows.map(encode, remove_columns=rows.column_names)


def gsm8k_calibration_source(num_examples: int, folder: Union[str, Path]) -> dict[str, Any]:
    """A calibration ``mix`` entry holding only the first ``num_examples`` shipped GSM8K train rows.

    Task calibration for a fine-tuning run should see the training rows only, never the held-out
    ones; the rows are copied to ``folder/gsm8k_train_rows.jsonl``::

        >>> CalibrationConfig(dataset="builtin:c4", mix=[gsm8k_calibration_source(160, tmp)])
    """
    from .calibration import BUILTIN_DATASETS, BUILTIN_TEMPLATES

    path = Path(folder) / "gsm8k_train_rows.jsonl"
    with open(BUILTIN_DATASETS["builtin:gsm8k"], encoding="utf-8") as f:
        path.write_text("".join(f.readlines()[:num_examples]), encoding="utf-8")
    return {"dataset": str(path), "template": BUILTIN_TEMPLATES["builtin:gsm8k"]}


def _collate(pad_id: int):
    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [pad_id] * pad)
            batch["attention_mask"].append(f["attention_mask"] + [0] * pad)
            batch["labels"].append(f["labels"] + [-100] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    return collate


def train_losses(
    model: nn.Module,
    dataset,
    steps: int = 100,
    learning_rate: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    pad_token_id: Optional[int] = None,
    output_dir: Optional[Union[str, Path]] = None,
    **training_args: Any,
) -> list[float]:
    """Train ``model`` (a PeftModel) with transformers' ``Trainer`` for ``steps`` steps; the loss of each step.

    Constant learning rate, no warm-up, no checkpoints, the data order fixed by ``seed`` (the
    same for every model given the same dataset), so two runs differ only in the model. Extra
    keyword arguments go to ``TrainingArguments``.
    """
    from transformers import Trainer, TrainingArguments

    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}.")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("The model has no trainable parameters; pass a PeftModel whose adapter is trainable.")
    if pad_token_id is None:
        config = getattr(model, "config", None)
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(config, "eos_token_id", 0) or 0
            if isinstance(pad_token_id, (list, tuple)):  # Llama 3, Qwen2.5: several end tokens
                pad_token_id = pad_token_id[0] if pad_token_id else 0
    with tempfile.TemporaryDirectory(prefix="peft-eora-train-") as tmp:
        args = TrainingArguments(
            output_dir=str(output_dir or tmp),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            disable_tqdm=not logger.isEnabledFor(logging.INFO),
            use_cpu=not torch.cuda.is_available(),
            **training_args,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=_collate(int(pad_token_id)))
        model.train()
        trainer.train()
        model.eval()
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    if len(losses) != steps or not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"Training logged {len(losses)} losses for {steps} steps (non-finite: {losses[-3:]}).")
    return losses


@torch.no_grad()
def mean_loss(model: nn.Module, dataset, batch_size: int = 8, pad_token_id: int = 0) -> float:
    """Token-weighted mean loss over ``dataset`` (labels as built by :func:`gsm8k_sft_dataset`)."""
    collate = _collate(pad_token_id)
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((target != -100).sum())
    return total / max(count, 1)


def plot_losses(curves: dict[str, list[float]], path: Union[str, Path], title: str = "Fine-tuning loss", smooth: int = 1) -> Path:
    """Loss per step for each named curve (and a moving average over ``smooth`` steps) as a PNG, written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("Plotting the loss curves needs matplotlib: pip install 'peft-eora[plot]'.") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, losses in curves.items():
        steps = range(1, len(losses) + 1)
        if smooth > 1:
            line = ax.plot(steps, losses, alpha=0.25)[0]
            kernel = torch.ones(smooth) / smooth
            avg = torch.nn.functional.conv1d(torch.tensor(losses)[None, None], kernel[None, None]).flatten()
            ax.plot(range(smooth, len(losses) + 1), avg.tolist(), color=line.get_color(), label=f"{name} ({smooth}-step mean)")
        else:
            ax.plot(steps, losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    finally:
        plt.close(fig)
    return path
