"""Fine-tune from the EoRA init vs from a zero-init LoRA (QLoRA-style) on the same quantized base.

    python examples/finetune_from_eora.py                         # NF4 base, r=16, 40 steps on GSM8K train
    python examples/finetune_from_eora.py --format hqq-w3 --rank 32 --steps 100 --png losses.png

The embedded SmolLM2-135M-Instruct (fp32 export) is quantized on the fly (bitsandbytes NF4 as in
QLoRA, or HQQ 3-bit), then two adapters with the same rank, alpha, target modules, data order and
learning rate are trained with transformers' ``Trainer`` on the first ``--train-examples`` rows
of the shipped GSM8K train sample:

- **EoRA init**: ``get_peft_model(qmodel, EoRAConfig(...))`` calibrated on half C4, half the
  GSM8K training rows (the paper's task calibration), then trained;
- **zero-init LoRA**: ``LoraConfig`` (Kaiming A, B = 0), i.e. QLoRA on this base.

Printed as JSON: the held-out loss (answer tokens of later GSM8K train rows, never trained on) of
the original model, the quantized base, each adapter before and after training, each curve, and
the time of each step. The loss curves go to ``--png``. Runs offline on a CPU (minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_eora import CalibrationConfig, EoRAConfig
from peft_eora.cli.options import damping as damping_option
from peft_eora.embedded import export_original
from peft_eora.finetune import gsm8k_calibration_source, gsm8k_sft_dataset, mean_loss, plot_losses, train_losses
from peft_eora.quantize import load_and_quantize

FORMATS = {"nf4": ("bnb-nf4", 4, 64), "hqq-w3": ("hqq", 3, 64), "hqq-w4": ("hqq", 4, 64)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="nf4", choices=sorted(FORMATS), help="on-the-fly quantization of the base")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank r (lora_alpha = r for both)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per adapter")
    parser.add_argument("--lr", type=float, default=2e-4, help="constant learning rate (AdamW)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per training example (cut)")
    parser.add_argument("--train-examples", type=int, default=256, help="GSM8K train rows 0… used for training")
    parser.add_argument("--heldout", type=int, default=64, help="later GSM8K train rows used for the held-out loss")
    parser.add_argument("--calib-samples", type=int, default=16, help="EoRA calibration windows (half GSM8K, half C4)")
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--damping", default="auto", type=damping_option,
                        help="EoRA ridge: 'auto' (chosen per layer on held-out windows) or a number such as 0.01 "
                             "(~4x faster on a CPU at this scale)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default="finetune_losses.png", help="where to write the loss curves")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.redirect_stdout(sys.stderr):  # PEFT and Trainer print as they go: stdout keeps the JSON alone
        report = run(args, parser)
    print(json.dumps(report, indent=2))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Both runs; the report printed as JSON."""
    log = logging.getLogger("finetune")

    method, bits, group = FORMATS[args.format]
    damping = args.damping
    original_dir = export_original(torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    if args.train_examples > 512 - args.heldout:
        parser.error(f"--train-examples + --heldout must be ≤ 512 (the shipped GSM8K rows), got "
                     f"{args.train_examples} + {args.heldout}.")
    train = gsm8k_sft_dataset(tokenizer, num_examples=args.train_examples, max_length=args.max_length)
    heldout = gsm8k_sft_dataset(tokenizer, num_examples=args.heldout, max_length=args.max_length,
                                offset=512 - args.heldout)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    report: dict = {"format": args.format, "rank": args.rank, "damping": damping, "steps": args.steps, "lr": args.lr,
                    "batch_size": args.batch_size, "train_examples": args.train_examples, "heldout_examples": args.heldout}

    original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
    report["heldout_loss_original"] = round(mean_loss(original, heldout, pad_token_id=pad), 4)
    del original

    # task calibration on the training rows only (the held-out rows stay unseen)
    rows = tempfile.TemporaryDirectory(prefix="eora-ft-")  # the training rows as a file; removed when run returns
    calibration = CalibrationConfig(dataset="builtin:c4", num_samples=args.calib_samples, seq_len=args.calib_seq_len,
                                    mix=[gsm8k_calibration_source(args.train_examples, rows.name)])
    runs = {
        "EoRA init": lambda base: get_peft_model(base, EoRAConfig(r=args.rank, target_modules=TARGETS, damping=damping,
                                                                  original_model=str(original_dir),
                                                                  calibration=calibration)),
        "zero-init LoRA": lambda base: get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=args.rank,
                                                                       target_modules=TARGETS, lora_dropout=0.0)),
    }
    curves = {}
    for name, make in runs.items():
        base = load_and_quantize(original_dir, method, bits=bits, group_size=group)
        if "heldout_loss_quantized" not in report:
            report["heldout_loss_quantized"] = round(mean_loss(base, heldout, pad_token_id=pad), 4)
        start = time.perf_counter()
        model = make(base)
        init_s = time.perf_counter() - start
        model.print_trainable_parameters()
        before = mean_loss(model, heldout, pad_token_id=pad)
        start = time.perf_counter()
        curves[name] = train_losses(model, train, steps=args.steps, learning_rate=args.lr,
                                    batch_size=args.batch_size, seed=args.seed, pad_token_id=pad)
        train_s = time.perf_counter() - start
        after = mean_loss(model, heldout, pad_token_id=pad)
        report[name] = {"init_seconds": round(init_s, 1), "heldout_loss_before": round(before, 4),
                        "heldout_loss_after": round(after, 4), "train_seconds_per_step": round(train_s / args.steps, 2),
                        "mean_train_loss_first_5": round(sum(curves[name][:5]) / min(5, len(curves[name])), 4),
                        "mean_train_loss_last_5": round(sum(curves[name][-5:]) / min(5, len(curves[name])), 4),
                        "losses": [round(v, 4) for v in curves[name]]}
        log.info("%s: held-out loss %.4f → %.4f after %d steps", name, before, after, args.steps)
        del model, base
    title = f"GSM8K fine-tuning, SmolLM2-135M {args.format}, r={args.rank}"
    report["png"] = str(plot_losses(curves, args.png, title=title, smooth=min(5, args.steps)))
    rows.cleanup()
    return report


if __name__ == "__main__":
    main()
