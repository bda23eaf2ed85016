"""``peft-eora eval``: perplexity and task accuracy of a model, optionally with an adapter.

    peft-eora eval --model gptq-w3g128 --adapter eora-w3-r64 --ppl wikitext2 --ppl-windows 16 \\
        --tasks arc_easy piqa --task-data ../shared/data --limit 200

Also what ``sweep`` shares: :func:`evaluate` (every measurement the options ask for) and
:func:`flat_metrics` (one number per metric name).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from .models import count_lora_parameters, load_adapter, load_model, load_tokenizer, pick_device, resolve_model
from .options import CLIError, add_evaluation

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``eval`` verb's parser (a subparser of ``peft-eora``)."""
    p = subparsers.add_parser(
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
    add_evaluation(p)
    p.add_argument("--details", action="store_true", help="Include per-example predictions in the JSON.")
    p.add_argument("--out", default=None, help="Write the JSON result to this file instead of stdout.")
    p.set_defaults(handler=run)
    return p


def check_eval_inputs(args: argparse.Namespace) -> None:
    """Every ``--ppl`` file and task data file exists (one clear error before any model is loaded)."""
    from ..eval.perplexity import BUILTIN_TEXTS
    from ..eval.task_data import GENERATION_TASKS
    from ..eval.tasks import task_file

    if "c4" in args.ppl:
        logger.warning("--ppl c4 reads the same C4 documents the default calibration (builtin:c4) draws from: for "
                       "adapters calibrated on it this is not held-out text (wikitext2 is).")
    for source in args.ppl:
        if source not in BUILTIN_TEXTS and not Path(source).expanduser().is_file():
            raise CLIError(f"--ppl {source}: no such file (nor one of {sorted(BUILTIN_TEXTS)}).")
        if source not in BUILTIN_TEXTS and Path(source).suffix == ".jsonl":
            first = _first_row(Path(source).expanduser())
            if first is not None and "text" not in first:
                raise CLIError(f"--ppl {source}: its rows have no 'text' field (fields: {sorted(first)}).")
    out = getattr(args, "out", None) if getattr(args, "command", None) == "eval" else None  # sweep: a folder
    if out and Path(out).expanduser().is_dir():
        raise CLIError(f"--out {out} is a folder: give the path of the JSON file to write.")
    if out and not Path(out).expanduser().parent.is_dir():
        raise CLIError(f"--out {out}: the folder {Path(out).expanduser().parent} does not exist.")
    for task in args.tasks:
        task_file(task, args.task_data)
    if args.num_fewshot and not any(t in GENERATION_TASKS for t in args.tasks):
        raise CLIError(f"--num-fewshot {args.num_fewshot} applies to {', '.join(GENERATION_TASKS)} only; the "
                       "multiple-choice tasks are scored zero-shot. Drop --num-fewshot, or add --tasks gsm8k.")
    if "gsm8k" in args.tasks and args.num_fewshot:
        from ..eval.tasks import GSM8K_TRAIN_FILE, resolve_data_dir

        pool = resolve_data_dir(args.task_data) / GSM8K_TRAIN_FILE
        if not pool.is_file():
            raise CLIError(f"--num-fewshot {args.num_fewshot}: the GSM8K few-shot pool {pool} is missing.")
        with pool.open(encoding="utf-8") as fh:
            rows = sum(1 for line in fh if line.strip())
        if rows < args.num_fewshot:
            raise CLIError(f"--num-fewshot {args.num_fewshot}: the GSM8K few-shot pool {pool} has {rows} examples; "
                           "lower --num-fewshot or give a larger pool.")
    if not args.ppl and not args.tasks:
        raise CLIError("Nothing to evaluate: give --ppl TEXT… and/or --tasks TASK….")


def _first_row(path: Path) -> Optional[dict[str, Any]]:
    """The first row of a JSON-lines file (None if it has none or it is not an object)."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CLIError(f"{path}: its first row is not JSON ({exc}).") from exc
                return row if isinstance(row, dict) else None
    return None


def evaluate(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Perplexities and task results of ``model`` for the evaluation options in ``args``."""
    from ..eval.perplexity import load_text, perplexity
    from ..eval.task_data import GENERATION_TASKS
    from ..eval.tasks import evaluate_task

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
            num_fewshot=args.num_fewshot if task in GENERATION_TASKS else 0, max_new_tokens=args.max_new_tokens,
            generation_batch_size=args.gen_batch_size, progress=progress, details=getattr(args, "details", False),
        )  # fmt: skip
        res["seconds"] = round(time.perf_counter() - start, 2)
        result["tasks"][task] = res
    return result


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``{"ppl/wikitext2": …, "arc_easy/acc": …, "arc_easy/acc_norm": …, "gsm8k/exact_match_strict": …}``."""
    flat: dict[str, float] = {}
    names = _ppl_names(list(result.get("perplexity", {})))
    for source, entry in result.get("perplexity", {}).items():
        flat[f"ppl/{names[source]}"] = entry["perplexity"]
    for task, entry in result.get("tasks", {}).items():
        for key in ("acc", "acc_norm", "exact_match_strict", "exact_match_flexible"):
            if key in entry:
                flat[f"{task}/{key}"] = entry[key]
    return flat


def _ppl_names(sources: list[str]) -> dict[str, str]:
    """Each ``--ppl`` source's metric name: its file name, or the path as given where two share a file name."""
    counts: dict[str, int] = {}
    for source in sources:
        counts[Path(source).name] = counts.get(Path(source).name, 0) + 1
    return {source: Path(source).name if counts[Path(source).name] == 1 else source for source in sources}


def expected_metrics(args: argparse.Namespace) -> list[str]:
    """The metric names :func:`flat_metrics` will produce for these evaluation options."""
    names = [f"ppl/{name}" for name in _ppl_names(list(args.ppl)).values()]
    for task in args.tasks:
        keys = ("exact_match_strict", "exact_match_flexible") if task == "gsm8k" else ("acc", "acc_norm")
        names += [f"{task}/{k}" for k in keys]
    return names


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``--model`` (plus ``--adapter``)."""
    check_eval_inputs(args)
    adapter = Path(args.adapter).expanduser() if args.adapter else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise CLIError(f"--adapter {adapter}: no adapter_config.json there (not a PEFT adapter folder).")
    device = pick_device(args.device)  # before a model is quantized or loaded
    path = resolve_model(args.model, "The")
    tokenizer = load_tokenizer(path, adapter)
    model = load_model(path, device, args.dtype)
    if adapter is not None:
        model = load_adapter(model, adapter, args.allow_base_mismatch)
    start = time.perf_counter()
    result = evaluate(model, tokenizer, args)
    return {
        "model": str(path),
        "adapter": str(adapter) if adapter else None,
        "lora_parameters": count_lora_parameters(model) if adapter else 0,
        **result,
        "seconds": round(time.perf_counter() - start, 2),
    }
