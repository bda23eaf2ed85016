"""``peft-eora``: compute, evaluate, sweep and push EoRA adapters from the command line.

    peft-eora compute --original ORIG --compressed QUANT --rank 64 --out my-adapter
    peft-eora eval --model QUANT --adapter my-adapter --ppl wikitext2 --tasks arc_easy piqa \\
        --task-data shared/data --limit 200
    peft-eora sweep --original embedded --compressed gptq-w3g128 --ranks 16 64 --methods eora svd \\
        --ppl wikitext2 --out-dir sweep-w3
    peft-eora push my-adapter me/smollm2-gptq3-eora
    peft-eora lm-eval --model hf --model_args pretrained=QUANT,peft=my-adapter --tasks arc_easy

``python -m peft_eora`` is the same program. Models are local checkpoint folders or Hub ids
(offline: cached); ``embedded`` names the embedded SmolLM2-135M-Instruct (float16 export) and
``gptq-w<bits>g<group>`` its cached GPTQ checkpoint (quantized on first use, ~30-40 min on a
2-core CPU). GPTQ folders load through :func:`peft_eora.quantize.load_quantized`, anything else
(e.g. a pruned float model) through ``AutoModelForCausalLM``. Results are JSON on stdout (or
``--out``); logs and progress bars go to stderr. Bad input exits with status 1 (2 for bad
arguments) and one ``peft-eora <command>: error: …`` line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence, Union

logger = logging.getLogger("peft_eora.cli")

EMBEDDED = "embedded"
_GPTQ_NAME = re.compile(r"^gptq-w(\d+)g(\d+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REGEX_CHARS = set("*?()[]|\\^$+{}")
SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png")


class CLIError(ValueError):
    """A user error found by the command line itself (bad path, bad combination of options)."""


# --------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message (see --help)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _mix_source(text: str) -> dict[str, Any]:
    """``--mix``: a dataset name/path, or a JSON object of CalibrationSource fields."""
    from .config import CalibrationSource

    if not text.lstrip().startswith("{"):
        return {"dataset": text}
    try:
        entry = json.loads(text)
        CalibrationSource(**entry)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"expected a dataset or a JSON object with keys dataset, subset, split, column, template, weight; {exc}"
        ) from None
    return entry


def _calibration_summary(calibration) -> dict[str, Any]:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(calibration).items() if k != "tokenizer"}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value}")
    return value


def _damping(text: str) -> Union[float, str]:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0 or 'auto', got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0 or 'auto', got {text}")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("general")
    group.add_argument("--device", default="auto", help="Device to run on: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="Compute dtype: auto = float32 on CPU (GPTQ layers keep their float16 scales), float16 on GPU.",
    )
    group.add_argument("--no-progress", action="store_true", help="Hide the tqdm progress bars.")
    group.add_argument("-q", "--quiet", action="store_true", help="Log warnings and errors only.")
    group.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    group.add_argument("--debug", action="store_true", help="Show the full traceback of an error (and debug logs).")
    return common


def _add_model_pair(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument(
        "--original",
        help="Uncompressed model: checkpoint folder with safetensors, cached Hub id, or 'embedded' (the embedded "
        "SmolLM2-135M-Instruct, float16 export). Required unless --embedded.",
    )
    group.add_argument(
        "--compressed",
        help="Compressed model: GPTQ checkpoint folder (loaded with peft_eora.quantize.load_quantized), dense float "
        "checkpoint (e.g. pruned; loaded with transformers), cached Hub id, or 'gptq-w3g128'/'gptq-w4g128' (the "
        "embedded model's cached GPTQ checkpoints). Required unless --embedded.",
    )
    group.add_argument(
        "--embedded",
        action="store_true",
        help="Shorthand for --original embedded --compressed gptq-w3g128 (either can still be given explicitly).",
    )


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration data (method eora)")
    group.add_argument(
        "--dataset",
        default="builtin:c4",
        help="Calibration text: 'builtin:c4' (shipped C4 sample), a local .jsonl/.json/.txt/.parquet/.csv file or "
        "folder, or a cached Hub dataset id.",
    )
    group.add_argument("--subset", default=None, help="Dataset configuration name (Hub datasets), e.g. 'en'.")
    group.add_argument("--split", default="train", help="Dataset split to read (local files accept any name).")
    group.add_argument("--column", default="text", help="Column holding the text (or lists of token ids).")
    group.add_argument(
        "--template", default=None,
        help="Build each document from several columns instead, e.g. 'Question: {question}\\nAnswer: {answer}'.",
    )  # fmt: skip
    group.add_argument(
        "--mix", action="append", type=_mix_source, default=None, metavar="SOURCE",
        help="Add a calibration source (repeatable): a dataset as for --dataset (e.g. builtin:gsm8k), or a JSON "
        "object with keys dataset, subset, split, column, template, weight. Windows are shared by weight (the "
        "main source's is 1), e.g. --mix builtin:gsm8k gives half C4, half GSM8K train (the paper's task calibration).",
    )  # fmt: skip
    group.add_argument("--num-samples", type=_positive_int, default=128, help="Number of calibration windows.")
    group.add_argument("--seq-len", type=_positive_int, default=512, help="Tokens per calibration window (≥ 2).")
    group.add_argument("--seed", type=int, default=0, help="Seed for shuffling the calibration documents.")
    group.add_argument("--calib-batch-size", type=_positive_int, default=8, help="Calibration windows per forward pass.")


def _add_eora(parser: argparse.ArgumentParser, sweep: bool) -> None:
    group = parser.add_argument_group("EoRA")
    if sweep:
        group.add_argument("--ranks", type=_positive_int, nargs="+", required=True, help="Ranks to sweep, e.g. 16 32 64.")
        group.add_argument(
            "--methods", nargs="+", choices=("eora", "svd"), default=["eora"],
            help="Methods to sweep: eora (activation-aware) and/or svd (plain SVD of the residual, the baseline).",
        )  # fmt: skip
    else:
        group.add_argument("--rank", type=_positive_int, required=True, help="LoRA rank r of every adapted layer.")
        group.add_argument(
            "--method", choices=("eora", "svd"), default="eora",
            help="eora (residual projected into the activation eigenspace) or svd (plain SVD baseline, no calibration).",
        )  # fmt: skip
    group.add_argument(
        "--damping", type=_damping, default=None,
        help="Relative ridge δ added as δ·mean(diag H)·I to each input covariance, or 'auto' (chosen per layer on "
        "held-out calibration windows; needs ≥ 4 samples). Default: EoRAConfig's (0.01).",
    )  # fmt: skip
    group.add_argument(
        "--target-modules", nargs="+", default=None,
        help="Layers to adapt: module-name suffixes (q_proj v_proj, or comma-separated), or one regular expression "
        "matched against full module names. Default: every linear inside the decoder blocks.",
    )  # fmt: skip


def _add_evaluation(parser: argparse.ArgumentParser) -> None:
    from .eval.tasks import DATA_ENV, TASK_NAMES

    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--ppl", nargs="+", default=[], metavar="TEXT",
        help="Perplexity on these texts: 'wikitext2' or 'c4' (shipped samples) or files (.txt, .jsonl with a 'text' field).",
    )  # fmt: skip
    group.add_argument("--ppl-seq-len", type=_positive_int, default=512, help="Tokens per perplexity window.")
    group.add_argument(
        "--ppl-windows", type=_positive_int, default=None, help="Use at most this many windows per text (default: all)."
    )
    group.add_argument(
        "--tasks", nargs="+", default=[], choices=TASK_NAMES, metavar="TASK",
        help=f"Tasks to evaluate: {', '.join(TASK_NAMES)} (lm-eval-harness prompts; see peft_eora.eval.tasks).",
    )  # fmt: skip
    group.add_argument(
        "--task-data", default=None,
        help=f"Folder with the task files (arc/, piqa/, mathqa/, gsm8k/; default ${DATA_ENV}).",
    )  # fmt: skip
    group.add_argument("--limit", type=_positive_int, default=None, help="Evaluate the first N examples of each task.")
    group.add_argument("--num-fewshot", type=_non_negative_int, default=0, help="GSM8K few-shot examples (from gsm8k/train.jsonl).")
    group.add_argument("--max-new-tokens", type=_positive_int, default=256, help="GSM8K: most tokens generated per answer.")
    group.add_argument(
        "--batch-size", type=_positive_int, default=32, help="Multiple choice: continuations (question × choice) per forward pass."
    )
    group.add_argument("--ppl-batch-size", type=_positive_int, default=4, help="Perplexity: windows per forward pass.")
    group.add_argument("--gen-batch-size", type=_positive_int, default=8, help="GSM8K: prompts generated together.")


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-eora`` argument parser (subcommands compute, eval, sweep, push, lm-eval)."""
    from . import __version__

    parser = _Parser(
        prog="peft-eora",
        description="Training-free EoRA adapters for compressed LLMs (arXiv 2410.21271): compute, evaluate, sweep, push.",
        epilog="Run 'peft-eora <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"peft-eora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True
    common = _common_options()

    p = sub.add_parser(
        "compute", parents=[common], help="Compute an EoRA adapter and save it (PeftModel.save_pretrained).",
        description="Compute EoRA (or SVD) factors of the compression residual and save them as a PEFT adapter.",
    )  # fmt: skip
    _add_model_pair(p)
    _add_eora(p, sweep=False)
    _add_calibration(p)
    p.add_argument("--out", required=True, help="Adapter folder to write (created or updated atomically).")
    p.set_defaults(handler=cmd_compute)

    p = sub.add_parser(
        "eval", parents=[common], help="Perplexity and task accuracy of a model (optionally with an adapter).",
        description="Evaluate a model, optionally with a saved EoRA/LoRA adapter, on perplexity texts and tasks.",
    )  # fmt: skip
    p.add_argument(
        "--model", required=True,
        help="Base model: checkpoint folder, cached Hub id, 'embedded' or 'gptq-w3g128'/'gptq-w4g128'.",
    )  # fmt: skip
    p.add_argument("--adapter", default=None, help="Adapter folder (EoRA or plain LoRA) to apply to the base model.")
    p.add_argument(
        "--allow-base-mismatch", action="store_true",
        help="Load the adapter even if its recorded base fingerprint differs (warning instead of error).",
    )  # fmt: skip
    _add_evaluation(p)
    p.add_argument("--details", action="store_true", help="Include per-example predictions in the JSON.")
    p.add_argument("--out", default=None, help="Write the JSON result to this file instead of stdout.")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser(
        "sweep", parents=[common], help="Ranks × methods: compute, evaluate, write JSON + markdown table + plot.",
        description="For every method and rank: compute an adapter, evaluate it, and compare with the compressed and "
        "original models. Writes sweep.json, sweep.md and sweep.png into --out-dir.",
    )  # fmt: skip
    _add_model_pair(p)
    _add_eora(p, sweep=True)
    _add_calibration(p)
    _add_evaluation(p)
    p.add_argument("--out-dir", required=True, help="Folder for sweep.json, sweep.md, sweep.png and adapters/.")
    p.add_argument("--no-save-adapters", action="store_true", help="Do not keep the computed adapters.")
    p.add_argument("--skip-original", action="store_true", help="Do not evaluate the original (uncompressed) model.")
    p.add_argument(
        "--plot-metric", default=None,
        help="Metric to plot, e.g. 'ppl/wikitext2' or 'arc_easy/acc_norm' (default: the first one measured).",
    )  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="Skip the PNG plot (no matplotlib needed).")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser(
        "push", parents=[common], help="Push a saved adapter to the Hugging Face Hub (with its EoRA model card).",
        description="Load a saved adapter onto its base model and push weights, config and model card in one commit.",
    )  # fmt: skip
    p.add_argument("adapter", help="Adapter folder written by 'peft-eora compute' or PeftModel.save_pretrained.")
    p.add_argument("repo_id", help="Hub repository, e.g. me/smollm2-gptq3-eora (created if missing).")
    p.add_argument(
        "--base", default=None,
        help="Base model to load the adapter onto (default: base_model_name_or_path of adapter_config.json).",
    )  # fmt: skip
    p.add_argument("--base-model-id", default=None, help="Hub id of the base model for the card's base_model metadata.")
    p.add_argument("--private", action="store_true", help="Create the repository as private.")
    p.add_argument("--revision", default=None, help="Branch to push to (created if missing).")
    p.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing directly.")
    p.add_argument("--commit-message", default=None, help="Commit message (default: 'Upload EoRA adapter').")
    p.add_argument("--ppl-before", type=float, default=None, help="Perplexity of the compressed model, for the card.")
    p.add_argument("--ppl-after", type=float, default=None, help="Perplexity with the adapter, for the card.")
    p.add_argument(
        "--allow-base-mismatch", action="store_true", help="Load the adapter even if the base fingerprint differs."
    )
    p.set_defaults(handler=cmd_push)

    sub.add_parser(
        "lm-eval", add_help=False,
        help="Run lm-evaluation-harness with peft-eora imported (so --model_args peft=<EoRA adapter> loads). "
        "Every following argument goes to lm_eval.",
    )  # fmt: skip
    return parser


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine.")
    return name


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, name)


def resolve_model(spec: str, role: str) -> Union[Path, str]:
    """A model spec → checkpoint folder (``embedded``/``gptq-wXgY`` exported or quantized if needed) or Hub id."""
    if spec == EMBEDDED:
        import torch

        from .embedded import export_original

        return export_original(torch.float16)
    match = _GPTQ_NAME.match(spec)
    if match:
        import torch

        from .embedded import export_original
        from .quantize import gptq_dir, quantize_gptq

        bits, group = int(match.group(1)), int(match.group(2))
        original = export_original(torch.float16)
        if not (gptq_dir(original, bits, group) / "config.json").is_file():
            logger.warning("Quantizing the embedded model to GPTQ w%dg%d (once; ~30-40 min on a 2-core CPU)", bits, group)
        return quantize_gptq(original, bits=bits, group_size=group)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIError(f"{role} model {spec}: the folder has no config.json (not a checkpoint folder).")
        return path
    if path.exists():
        raise CLIError(f"{role} model {spec}: expected a checkpoint folder, got a file.")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec
    raise CLIError(f"{role} model {spec}: no such folder (nor a Hub id, 'embedded' or 'gptq-w<bits>g<group>').")


def _quant_method(path: Union[Path, str]) -> Optional[str]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CLIError(f"Cannot read the config of {path}: {_one_line(str(exc))}") from exc
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)
    return str(method).lower() if method else "unknown"


def load_model(path: Union[Path, str], device: str, dtype_name: str = "auto"):
    """Load a causal LM for EoRA/evaluation: GPTQ through ``load_quantized``, others through transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _dtype(dtype_name, device)
    method = _quant_method(path)
    start = time.perf_counter()
    try:
        if method == "gptq":
            from .quantize import load_quantized

            if dtype == torch.float32:  # fp16 scales, fp32 activations: exact and fast on CPU
                model = load_quantized(path, dtype=torch.float16, device=device, compute_dtype=torch.float32)
            else:
                model = load_quantized(path, dtype=dtype, device=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    except (OSError, ValueError) as exc:
        raise CLIError(f"Cannot load the model {path}: {_one_line(str(exc))}") from exc
    logger.info("Loaded %s (%s) in %.1f s", path, method or "dense", time.perf_counter() - start)
    return model.eval()


def load_tokenizer(*candidates: Union[Path, str, None]):
    """The tokenizer of the first candidate that has one."""
    from transformers import AutoTokenizer

    errors = []
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(str(candidate))
        except (OSError, ValueError) as exc:
            errors.append(f"{candidate}: {_one_line(str(exc))[:200]}")
    raise CLIError(f"No tokenizer found ({'; '.join(errors) or 'no candidate'}).")


def count_lora_parameters(model) -> int:
    """Number of LoRA parameters (``lora_A``/``lora_B`` weights) in a PEFT model."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)


def checkpoint_parameter_count(path: Union[Path, str]) -> Optional[int]:
    """Number of parameters stored in a local checkpoint's safetensors files (``None`` if not local)."""
    from safetensors import safe_open

    folder = Path(str(path))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    return total


def _target_modules(values: Optional[list[str]]) -> Union[list[str], str, None]:
    if not values:
        return None
    if len(values) == 1 and _REGEX_CHARS & set(values[0]):
        return values[0]
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not names:
        raise CLIError("--target-modules: no module name given.")
    return names


def _models_from_args(args: argparse.Namespace) -> tuple[str, str]:
    original = args.original or (EMBEDDED if args.embedded else None)
    compressed = args.compressed or ("gptq-w3g128" if args.embedded else None)
    if original is None or compressed is None:
        missing = " and ".join(n for n, v in (("--original", original), ("--compressed", compressed)) if v is None)
        raise CLIError(f"{missing} required (or --embedded for the embedded SmolLM2 and its GPTQ 3-bit version).")
    return original, compressed


def _calibration(args: argparse.Namespace):
    from .config import CalibrationConfig

    try:
        return CalibrationConfig(
            dataset=args.dataset, subset=args.subset, split=args.split, column=args.column, template=args.template,
            mix=args.mix, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
        )  # fmt: skip
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def _check_calibration(calibration, tokenizer) -> None:
    """Load and tokenize the calibration data before any model is loaded (fails fast, one error)."""
    from .calibration import load_calibration_tokens

    tokens = load_calibration_tokens(calibration, tokenizer)
    logger.info("Calibration: %d × %d tokens from %s", tokens.shape[0], tokens.shape[1], calibration.dataset)


def _eora_config(args: argparse.Namespace, rank: int, method: str, original: Union[Path, str], calibration):
    from .config import EoRAConfig

    kwargs: dict[str, Any] = {}
    if args.damping is not None:
        kwargs["damping"] = args.damping
    return EoRAConfig(
        r=rank,
        method=method,
        target_modules=_target_modules(args.target_modules),
        original_model=str(original),
        calibration=calibration if method == "eora" else None,
        **kwargs,
    )


def _compute(args: argparse.Namespace, compressed: Union[Path, str], config, device: str, tokenizer):
    """Load the compressed model, inject the adapter and compute its factors; (PeftModel, seconds)."""
    from peft import get_peft_model

    from .model import initialize_eora_weights

    qmodel = load_model(compressed, device, args.dtype)
    start = time.perf_counter()
    # Inject first (init_eora=False: a zero update), then compute with this command's batch size and
    # progress setting; initialize_eora_weights runs the same computation get_peft_model would.
    config.init_eora = False
    model = get_peft_model(qmodel, config)
    initialize_eora_weights(
        model,
        original_model=config.original_model,
        calibration=config.calibration,
        tokenizer=tokenizer,
        batch_size=args.calib_batch_size,
        progress=not args.no_progress,
    )
    return model, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_compute(args: argparse.Namespace) -> dict[str, Any]:
    """Compute one adapter and save it to ``--out``."""
    original_spec, compressed_spec = _models_from_args(args)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file, not a folder.")
    calibration = _calibration(args)
    original = resolve_model(original_spec, "Original")
    compressed = resolve_model(compressed_spec, "Compressed")
    config = _eora_config(args, args.rank, args.method, original, calibration)
    tokenizer = load_tokenizer(original, compressed)
    if args.method == "eora":
        _check_calibration(calibration, tokenizer)
    device = _device(args.device)
    model, seconds = _compute(args, compressed, config, device, tokenizer)
    model.save_pretrained(str(out))
    stats = model.peft_config["default"].eora_stats
    logger.info("Saved the %s r=%d adapter to %s (%.1f s)", args.method, args.rank, out, seconds)
    return {
        "adapter": str(out),
        "original": str(original),
        "compressed": str(compressed),
        "method": args.method,
        "rank": args.rank,
        "lora_parameters": count_lora_parameters(model),
        "original_parameters": checkpoint_parameter_count(original),
        "seconds": round(seconds, 2),
        "eora_stats": stats,
    }


def _check_eval_inputs(args: argparse.Namespace) -> None:
    from .eval.perplexity import BUILTIN_TEXTS
    from .eval.tasks import task_file

    for source in args.ppl:
        if source not in BUILTIN_TEXTS and not Path(source).expanduser().is_file():
            raise CLIError(f"--ppl {source}: no such file (nor one of {sorted(BUILTIN_TEXTS)}).")
    for task in args.tasks:
        task_file(task, args.task_data)
    if "gsm8k" in args.tasks and args.num_fewshot:
        from .eval.tasks import GSM8K_TRAIN_FILE, resolve_data_dir

        pool = resolve_data_dir(args.task_data) / GSM8K_TRAIN_FILE
        if not pool.is_file():
            raise CLIError(f"--num-fewshot {args.num_fewshot}: the GSM8K few-shot pool {pool} is missing.")
    if not args.ppl and not args.tasks:
        raise CLIError("Nothing to evaluate: give --ppl TEXT… and/or --tasks TASK….")


def evaluate(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Perplexities and task results of ``model`` for the evaluation options in ``args``."""
    from .eval.perplexity import load_text, perplexity
    from .eval.tasks import evaluate_task

    progress = not args.no_progress
    result: dict[str, Any] = {"perplexity": {}, "tasks": {}}
    for source in args.ppl:
        start = time.perf_counter()
        value = perplexity(
            model, tokenizer, load_text(source), seq_len=args.ppl_seq_len, max_windows=args.ppl_windows,
            batch_size=args.ppl_batch_size, progress=progress,
        )  # fmt: skip
        result["perplexity"][source] = {
            "perplexity": value, "seq_len": args.ppl_seq_len, "max_windows": args.ppl_windows,
            "seconds": round(time.perf_counter() - start, 2),
        }  # fmt: skip
    for task in args.tasks:
        start = time.perf_counter()
        res = evaluate_task(
            model, tokenizer, task, data_dir=args.task_data, limit=args.limit, batch_size=args.batch_size,
            num_fewshot=args.num_fewshot, max_new_tokens=args.max_new_tokens,
            generation_batch_size=args.gen_batch_size, progress=progress, details=getattr(args, "details", False),
        )  # fmt: skip
        res["seconds"] = round(time.perf_counter() - start, 2)
        result["tasks"][task] = res
    return result


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``{"ppl/wikitext2": …, "arc_easy/acc": …, "arc_easy/acc_norm": …, "gsm8k/exact_match_strict": …}``."""
    flat: dict[str, float] = {}
    for source, entry in result.get("perplexity", {}).items():
        flat[f"ppl/{Path(source).name}"] = entry["perplexity"]
    for task, entry in result.get("tasks", {}).items():
        for key in ("acc", "acc_norm", "exact_match_strict", "exact_match_flexible"):
            if key in entry:
                flat[f"{task}/{key}"] = entry[key]
    return flat


def expected_metrics(args: argparse.Namespace) -> list[str]:
    """The metric names :func:`flat_metrics` will produce for these evaluation options."""
    names = [f"ppl/{Path(source).name}" for source in args.ppl]
    for task in args.tasks:
        keys = ("exact_match_strict", "exact_match_flexible") if task == "gsm8k" else ("acc", "acc_norm")
        names += [f"{task}/{k}" for k in keys]
    return names


def _load_adapter(base, adapter: Path, allow_base_mismatch: bool):
    from peft import PeftModel

    from .safe_files import check_adapter_weights

    if not adapter.is_dir():
        raise CLIError(f"Adapter folder {adapter} not found.")
    if not (adapter / "adapter_config.json").is_file():
        raise CLIError(f"{adapter} has no adapter_config.json (not a PEFT adapter folder).")
    check_adapter_weights(adapter)
    kwargs = {"allow_base_mismatch": True} if allow_base_mismatch else {}
    return PeftModel.from_pretrained(base, str(adapter), **kwargs).eval()


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``--model`` (plus ``--adapter``)."""
    _check_eval_inputs(args)
    adapter = Path(args.adapter).expanduser() if args.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise CLIError(f"--adapter {adapter}: no adapter_config.json there (not a PEFT adapter folder).")
    path = resolve_model(args.model, "The")
    device = _device(args.device)
    tokenizer = load_tokenizer(path, adapter)
    model = load_model(path, device, args.dtype)
    if adapter is not None:
        model = _load_adapter(model, adapter, args.allow_base_mismatch)
    start = time.perf_counter()
    result = evaluate(model, tokenizer, args)
    return {
        "model": str(path),
        "adapter": str(adapter) if adapter else None,
        "lora_parameters": count_lora_parameters(model) if adapter else 0,
        **result,
        "seconds": round(time.perf_counter() - start, 2),
    }


def cmd_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Every method × rank: compute, evaluate; write sweep.json, sweep.md, sweep.png."""
    import gc

    original_spec, compressed_spec = _models_from_args(args)
    _check_eval_inputs(args)
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise CLIError("The sweep plot needs matplotlib: pip install 'peft-eora[plot]' (or pass --no-plot).") from exc
    expected = expected_metrics(args)
    if args.plot_metric is not None and args.plot_metric not in expected:
        raise CLIError(f"--plot-metric {args.plot_metric}: not measured by this sweep; choose from {expected}.")
    out_dir = Path(args.out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out-dir {out_dir} is a file, not a folder.")
    calibration = _calibration(args)
    original = resolve_model(original_spec, "Original")
    compressed = resolve_model(compressed_spec, "Compressed")
    for method in args.methods:  # validates every option combination before any work
        _eora_config(args, args.ranks[0], method, original, calibration)
    tokenizer = load_tokenizer(original, compressed)
    if "eora" in args.methods:
        _check_calibration(calibration, tokenizer)
    device = _device(args.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_original = checkpoint_parameter_count(original)
    rows: list[dict[str, Any]] = []

    def record(label: str, kind: str, method: Optional[str], rank: int, model, params: int, seconds=None, adapter=None):
        logger.info("Evaluating %s", label)
        result = evaluate(model, tokenizer, args)
        rows.append({
            "label": label, "kind": kind, "method": method, "rank": rank, "lora_parameters": params,
            "lora_parameters_pct": 100.0 * params / n_original if n_original else None,
            "compute_seconds": None if seconds is None else round(seconds, 2), "adapter": adapter,
            "metrics": flat_metrics(result), "result": result,
        })  # fmt: skip

    if not args.skip_original:
        model = load_model(original, device, args.dtype)
        record("original", "original", None, 0, model, 0)
        del model
    model = load_model(compressed, device, args.dtype)
    record("compressed", "compressed", None, 0, model, 0)
    del model
    runs = [(m, r) for m in args.methods for r in sorted(set(args.ranks))]
    for i, (method, rank) in enumerate(runs, 1):
        logger.info("[%d/%d] %s r=%d", i, len(runs), method, rank)
        config = _eora_config(args, rank, method, original, calibration)
        model, seconds = _compute(args, compressed, config, device, tokenizer)
        adapter = None
        if not args.no_save_adapters:
            adapter = str(out_dir / "adapters" / f"{method}-r{rank}")
            model.save_pretrained(adapter)
        record(f"{method} r={rank}", "adapter", method, rank, model, count_lora_parameters(model), seconds, adapter)
        del model
        gc.collect()
    summary = {
        "original": str(original), "compressed": str(compressed), "original_parameters": n_original,
        "calibration": _calibration_summary(calibration),
        "methods": args.methods, "ranks": sorted(set(args.ranks)), "damping": args.damping,
        "target_modules": _target_modules(args.target_modules), "rows": rows,
    }  # fmt: skip
    _write_text(out_dir / "sweep.json", json.dumps(summary, indent=2, default=str) + "\n")
    _write_text(out_dir / "sweep.md", sweep_markdown(rows))
    files = {"json": str(out_dir / "sweep.json"), "markdown": str(out_dir / "sweep.md")}
    if not args.no_plot:
        metric = args.plot_metric or expected[0]
        sweep_plot(rows, metric, out_dir / "sweep.png")
        files["plot"] = str(out_dir / "sweep.png")
    logger.info("Sweep written to %s", out_dir)
    return {"files": files, "rows": [{k: v for k, v in r.items() if k != "result"} for r in rows]}


def sweep_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per model (original, compressed, each adapter), one column per metric."""
    metrics = list(rows[0]["metrics"]) if rows else []
    head = ["model", "rank", "LoRA params", "% of original"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        pct = row.get("lora_parameters_pct")
        cells = [
            row["label"],
            str(row["rank"]) if row["kind"] == "adapter" else "–",
            f"{row['lora_parameters']:,}",
            f"{pct:.2f} %" if pct is not None else "–",
        ]
        for m in metrics:
            value = row["metrics"].get(m)
            cells.append("–" if value is None else f"{value:.2f}" if m.startswith("ppl/") else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_plot(rows: Sequence[dict[str, Any]], metric: str, path: Path) -> None:
    """PNG with two panels: ``metric`` vs rank and vs extra (LoRA) parameters, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in rows if r["kind"] == "adapter"})
    for ax, xkey, xlabel in ((axes[0], "rank", "rank r"), (axes[1], "lora_parameters", "extra (LoRA) parameters")):
        for method in methods:
            points = sorted((r[xkey], r["metrics"][metric]) for r in rows if r["method"] == method and metric in r["metrics"])
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        for row, style in ((r, s) for r in rows for k, s in (("original", "--"), ("compressed", ":")) if r["kind"] == k):
            if metric in row["metrics"]:
                ax.axhline(row["metrics"][metric], linestyle=style, color="grey", label=row["label"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes[0].legend()
    fig.suptitle(f"EoRA sweep: {metric}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    plt.close(fig)
    os.replace(tmp.name, path)


def cmd_push(args: argparse.Namespace) -> dict[str, Any]:
    """Push a saved adapter to the Hub."""
    from .config import EoRAConfig
    from .hub import push_to_hub

    adapter = Path(args.adapter).expanduser()
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise CLIError(f"{adapter}: no adapter_config.json (not an adapter folder).")
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CLIError(f"{config_file} is not valid JSON ({exc.msg}).") from exc
    base_spec = args.base or saved.get("base_model_name_or_path")
    if not base_spec:
        raise CLIError(f"{config_file} names no base model: pass --base.")
    base_path = resolve_model(str(base_spec), "Base")
    model = _load_adapter(load_model(base_path, _device(args.device), args.dtype), adapter, args.allow_base_mismatch)
    if isinstance(model.peft_config["default"], EoRAConfig):
        commit = push_to_hub(
            model, args.repo_id, commit_message=args.commit_message, private=args.private or None,
            revision=args.revision, create_pr=args.create_pr, base_model=args.base_model_id,
            ppl_before=args.ppl_before, ppl_after=args.ppl_after,
        )  # fmt: skip
    else:  # a plain-LoRA export: PEFT's own push
        commit = model.push_to_hub(
            args.repo_id, commit_message=args.commit_message, private=args.private or None, revision=args.revision,
            create_pr=args.create_pr,
        )  # fmt: skip
    return {
        "repo_id": args.repo_id,
        "commit": getattr(commit, "oid", None),
        "url": getattr(commit, "commit_url", None) or str(commit),
        "adapter": str(adapter),
        "base": str(base_path),
    }


def run_lm_eval(argv: Sequence[str]) -> int:
    """``lm_eval`` with ``peft_eora`` imported: ``--model_args peft=<EoRA adapter>`` then loads."""
    import peft_eora  # noqa: F401  (registers the EORA PEFT type)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.stderr.write("peft-eora lm-eval: error: lm-evaluation-harness is not installed (pip install lm-eval)\n")
        return 1
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _user_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from .calibration import CalibrationError
    from .fingerprint import BaseMismatchError
    from .safe_files import AdapterFileError
    from .original import ModelMismatchError
    from .residual import UnsupportedModuleError

    return (
        CLIError, CalibrationError, ModelMismatchError, AdapterFileError, BaseMismatchError, UnsupportedModuleError,
        HfHubHTTPError, OfflineModeIsEnabled, ValueError, ImportError, OSError,
    )  # fmt: skip


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8") as f:
        f.write(text)
    os.replace(f.name, path)


@contextlib.contextmanager
def _logging(args: argparse.Namespace):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if (args.verbose or args.debug) else logging.WARNING if args.quiet else logging.INFO
    handler.setLevel(level)
    previous = root.level
    root.addHandler(handler)
    root.setLevel(min(level, previous) if previous else level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``peft-eora`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    >>> main(["eval", "--model", "gptq-w3g128", "--adapter", "my-adapter", "--ppl", "wikitext2"])
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lm-eval":
        return run_lm_eval(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    handler: Callable[[argparse.Namespace], dict[str, Any]] = args.handler
    stdout = sys.stdout
    with _logging(args):
        try:
            # libraries that print (gptqmodel's banner) must not mix with the JSON on stdout
            with contextlib.redirect_stdout(sys.stderr):
                result = handler(args)
        except KeyboardInterrupt:
            sys.stderr.write(f"peft-eora {args.command}: interrupted\n")
            return 130
        except _user_errors() as exc:
            if args.debug:
                raise
            message = _one_line(str(exc)) or type(exc).__name__
            sys.stderr.write(f"peft-eora {args.command}: error: {message}\n")
            return 1
    text = json.dumps(result, indent=2, default=str) + "\n"
    out = getattr(args, "out", None) if args.command == "eval" else None
    if out:
        _write_text(Path(out).expanduser(), text)
        logger.info("Wrote %s", out)
    else:
        stdout.write(text)
        stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
