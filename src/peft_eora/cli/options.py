"""Argument types and the option groups the ``peft-eora`` verbs share.

    >>> parser = Parser(prog="peft-eora compute")
    >>> add_model_pair(parser); add_eora(parser, sweep=False); add_calibration(parser)

Nothing here imports torch, PEFT or transformers: ``peft-eora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, NoReturn, Union

from ..eval.task_data import DATA_ENV, TASK_NAMES


class CLIError(ValueError):
    """A user error found by the command line itself (bad path, bad combination of options)."""


def one_line(text: str) -> str:
    """``text`` with every run of white space (newlines included) folded to one space."""
    return " ".join(str(text).split())


class _HelpWithDefaults(argparse.HelpFormatter):
    """Option help ends with its default where there is one to say (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False or default is argparse.SUPPRESS
                or default == [] or not action.option_strings or action.nargs == 0):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prog: error: message (see --help)``) and defaults in option help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def output_folder(value: str, option: str) -> Path:
    """``value`` as a folder to write into (it may not exist yet); ``CLIError`` if it is a file."""
    folder = Path(value).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"{option} {folder} is a file, not a folder.")
    return folder


def int_at_least(minimum: int, name: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer ≥ ``minimum`` (``name`` describes it in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {name}, got {value}")
        return value

    parse.__name__ = name.replace(" ", "_")
    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer ≥ 0")


def damping(text: str) -> Union[float, str]:
    """``--damping``: a number ≥ 0 or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0 or 'auto', got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0 or 'auto', got {text}")
    return value


#: the fields of :class:`peft_eora.config.CalibrationSource` (spelled out: importing ``config`` imports torch and PEFT,
#: which ``--help`` and argument errors must not wait for or print the warnings of); its values are checked later
MIX_KEYS = ("dataset", "subset", "split", "column", "template", "weight", "data_files")


def mix_source(text: str) -> dict[str, Any]:
    """``--mix``: a dataset name/path, or a JSON object of CalibrationSource fields."""
    if not text.lstrip().startswith("{"):
        return {"dataset": text}
    expected = f"expected a dataset or a JSON object with keys {', '.join(MIX_KEYS)}"
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{expected}; {exc}") from None
    if not isinstance(entry, dict) or "dataset" not in entry or set(entry) - set(MIX_KEYS):
        extra = sorted(set(entry) - set(MIX_KEYS)) if isinstance(entry, dict) else []
        raise argparse.ArgumentTypeError(f"{expected}" + (f"; unknown: {', '.join(extra)}" if extra else ""))
    return entry


def common_options() -> argparse.ArgumentParser:
    """The options every verb takes (device, dtype, progress, logging), as a parent parser."""
    common = Parser(add_help=False)
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
    group.add_argument("-v", "--verbose", action="store_true", help="Log debug messages (and show what libraries print).")
    group.add_argument(
        "--debug", action="store_true",
        help="Show the full traceback of an error, debug logs, and the warnings and logs of third-party libraries.",
    )  # fmt: skip
    return common


def add_model_pair(parser: argparse.ArgumentParser) -> None:
    """``--original``, ``--compressed``, ``--embedded``."""
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


def add_calibration(parser: argparse.ArgumentParser) -> None:
    """Where the calibration text comes from and how it is cut (method eora)."""
    group = parser.add_argument_group("calibration data (method eora)")
    group.add_argument(
        "--dataset",
        default="builtin:c4",
        help="Calibration text: 'builtin:c4' (shipped C4 sample), a local .jsonl/.json/.txt/.parquet/.csv file or "
        "folder, or a cached Hub dataset id.",
    )
    group.add_argument("--subset", default=None, help="Dataset configuration name (Hub datasets), e.g. 'en'.")
    group.add_argument("--data-files", nargs="+", default=None, metavar="FILE",
                       help="Files of a Hub dataset to read for --split (only those are downloaded), e.g. "
                            "en/c4-validation.00000-of-00008.json.gz for allenai/c4.")
    group.add_argument("--split", default="train", help="Dataset split to read (local files accept any name).")
    group.add_argument("--column", default="text", help="Column holding the text (or lists of token ids).")
    group.add_argument(
        "--template", default=None,
        help="Build each document from several columns instead, e.g. 'Question: {question}\\nAnswer: {answer}'.",
    )  # fmt: skip
    group.add_argument(
        "--mix", action="append", type=mix_source, default=None, metavar="SOURCE",
        help="Add a calibration source (repeatable): a dataset as for --dataset (e.g. builtin:gsm8k), or a JSON "
        "object with keys dataset, subset, split, column, template, weight. Windows are shared by weight (the "
        "main source's is 1), e.g. --mix builtin:gsm8k gives half C4, half GSM8K train (the paper's task calibration).",
    )  # fmt: skip
    group.add_argument("--num-samples", type=positive_int, default=128, help="Number of calibration windows.")
    group.add_argument("--seq-len", type=int_at_least(2, "an integer ≥ 2"), default=512,
                       help="Tokens per calibration window (≥ 2).")
    group.add_argument("--seed", type=int, default=0, help="Seed for shuffling the calibration documents.")
    group.add_argument("--calib-batch-size", type=positive_int, default=8, help="Calibration windows per forward pass.")


def add_eora(parser: argparse.ArgumentParser, sweep: bool) -> None:
    """Rank and method (``--rank``/``--method``, or the lists ``--ranks``/``--methods`` to sweep), damping, targets."""
    group = parser.add_argument_group("EoRA")
    if sweep:
        group.add_argument("--ranks", type=positive_int, nargs="+", required=True, help="Ranks to sweep, e.g. 16 32 64.")
        group.add_argument(
            "--methods", nargs="+", choices=("eora", "svd"), default=["eora"],
            help="Methods to sweep: eora (activation-aware) and/or svd (plain SVD of the residual, the baseline).",
        )  # fmt: skip
    else:
        group.add_argument("--rank", type=positive_int, required=True, help="LoRA rank r of every adapted layer.")
        group.add_argument(
            "--method", choices=("eora", "svd"), default="eora",
            help="eora (residual projected into the activation eigenspace) or svd (plain SVD baseline, no calibration).",
        )  # fmt: skip
    group.add_argument(
        "--damping", type=damping, default=None,
        help="Relative ridge δ added as δ·mean(diag H)·I to each input covariance, or 'auto' (chosen per layer on "
        "held-out calibration windows among 0 … 3 and plain SVD; with 1 sample the fixed 0.01). Default: auto.",
    )  # fmt: skip
    group.add_argument(
        "--value-weighting", choices=("attention", "tokens"), default=None,
        help="How value projections weight their residual: by the attention each token receives (default) or by "
        "every token once, like the other layers.",
    )  # fmt: skip
    group.add_argument(
        "--logit-weighting", choices=("queries_and_keys", "keys", "none"), default=None,
        help="Weight key projections' output channels by the queries that read them and query projections' by "
        "the keys (queries_and_keys, default), keys only (keys), or every output channel alike (none).",
    )  # fmt: skip
    group.add_argument(
        "--target-modules", nargs="+", default=None,
        help="Layers to adapt: module-name suffixes (q_proj v_proj, or comma-separated), or one regular expression "
        "matched against full module names. Default: every linear inside the decoder blocks.",
    )  # fmt: skip
    group.add_argument(
        "--exclude-modules", nargs="+", default=None,
        help="Layers to leave out (same forms as --target-modules), e.g. a MoE's shared_expert_gate, whose one "
        "output cannot hold a rank.",
    )  # fmt: skip


def add_evaluation(parser: argparse.ArgumentParser) -> None:
    """Perplexity texts, tasks and their batch sizes."""
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--ppl", nargs="+", default=[], metavar="TEXT",
        help="Perplexity on these texts: 'wikitext2' or 'c4' (shipped samples; 'c4' is the text the default "
        "calibration builtin:c4 draws from, so not held out for such adapters) or files (.txt, .jsonl with a 'text' field).",
    )  # fmt: skip
    group.add_argument("--ppl-seq-len", type=int_at_least(2, "an integer ≥ 2"), default=512,
                       help="Tokens per perplexity window (≥ 2: one token predicted from another at least).")
    group.add_argument(
        "--ppl-windows", type=positive_int, default=None, help="Use at most this many windows per text (default: all)."
    )
    group.add_argument(
        "--tasks", nargs="+", default=[], choices=TASK_NAMES, metavar="TASK",
        help=f"Tasks to evaluate: {', '.join(TASK_NAMES)} (lm-eval-harness prompts; see peft_eora.eval.tasks).",
    )  # fmt: skip
    group.add_argument(
        "--task-data", default=None,
        help=f"Folder with the task files (arc/, piqa/, mathqa/, gsm8k/; default ${DATA_ENV}).",
    )  # fmt: skip
    group.add_argument("--limit", type=positive_int, default=None, help="Evaluate the first N examples of each task.")
    group.add_argument("--num-fewshot", type=non_negative_int, default=0, help="GSM8K few-shot examples (from gsm8k/train.jsonl); the multiple-choice tasks are scored zero-shot.")
    group.add_argument("--max-new-tokens", type=positive_int, default=256, help="GSM8K: most tokens generated per answer.")
    group.add_argument(
        "--batch-size", type=positive_int, default=32, help="Multiple choice: continuations (question × choice) per forward pass."
    )
    group.add_argument("--ppl-batch-size", type=positive_int, default=4, help="Perplexity: windows per forward pass.")
    group.add_argument("--gen-batch-size", type=positive_int, default=8, help="GSM8K: prompts generated together.")
