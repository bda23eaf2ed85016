"""``peft-eora``: compute, evaluate, sweep and push EoRA adapters from the command line.

    peft-eora compute --original ORIG --compressed QUANT --rank 64 --out my-adapter
    peft-eora eval --model QUANT --adapter my-adapter --ppl wikitext2 --tasks arc_easy piqa \\
        --task-data shared/data --limit 200
    peft-eora sweep --original embedded --compressed gptq-w3g128 --ranks 16 64 --methods eora svd \\
        --ppl wikitext2 --out-dir sweep-w3
    peft-eora push my-adapter me/smollm2-gptq3-eora
    peft-eora lm-eval --model hf --model_args pretrained=QUANT,peft=my-adapter --tasks arc_easy

``python -m peft_eora`` is the same program. One module per verb (``compute``, ``evaluate``,
``sweep``, ``push``, ``lm_eval``), each with ``add_parser(subparsers, common)`` and ``run(args)``;
shared option groups in :mod:`.options`, model loading in :mod:`.models`. Models are local
checkpoint folders or Hub ids (offline: cached); ``embedded`` names the embedded
SmolLM2-135M-Instruct (float16 export) and ``gptq-w<bits>g<group>`` its cached GPTQ checkpoint
(quantized on first use, ~15-40 min on a 2-core CPU). Results are JSON on stdout (or ``--out``);
logs and progress bars go to stderr, libraries stay quiet unless ``--debug`` (:mod:`.terminal`). Bad input exits with status 1 (2 for bad arguments) and one
``peft-eora <command>: error: …`` line; ``--debug`` shows the traceback and third-party warnings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..safe_files import atomic_write_text
from . import compute, evaluate, lm_eval, push, sweep
from .evaluate import flat_metrics
from .options import CLIError, Parser, common_options, mix_source, one_line
from .terminal import terminal

logger = logging.getLogger("peft_eora.cli")

#: The verbs in the order ``--help`` lists them.
VERBS = (compute, evaluate, sweep, push, lm_eval)

# kept for callers of the single-module CLI of peft-eora 0.1.0
_mix_source = mix_source

__all__ = ["CLIError", "VERBS", "build_parser", "flat_metrics", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-eora`` argument parser (subcommands compute, eval, sweep, push, lm-eval)."""
    from .._version import __version__

    parser = Parser(
        prog="peft-eora",
        description="Training-free EoRA adapters for compressed LLMs (arXiv 2410.21271): compute, evaluate, sweep, push.",
        epilog="Run 'peft-eora <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"peft-eora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=Parser)
    sub.required = True
    common = common_options()
    for verb in VERBS:
        verb.add_parser(sub, common)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from ..calibration import CalibrationError
    from ..compensate import EoRAOutOfMemoryError
    from ..fingerprint import BaseMismatchError
    from ..original import ModelMismatchError
    from ..residual import UnsupportedModuleError
    from ..safe_files import AdapterFileError

    return (
        CLIError, CalibrationError, ModelMismatchError, AdapterFileError, BaseMismatchError, UnsupportedModuleError,
        EoRAOutOfMemoryError, HfHubHTTPError, OfflineModeIsEnabled, ValueError, ImportError, OSError,
    )  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``peft-eora`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    >>> main(["eval", "--model", "gptq-w3g128", "--adapter", "my-adapter", "--ppl", "wikitext2"])
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lm-eval":
        return lm_eval.run(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    handler: Callable[[argparse.Namespace], dict[str, Any]] = args.handler
    stdout = sys.stdout
    out = getattr(args, "out", None) if args.command == "eval" else None
    with terminal(args):
        try:
            result = handler(args)
            text = json.dumps(result, indent=2, default=str) + "\n"
            if out:  # checked before any work; a write that still fails is one error line, as any other
                atomic_write_text(Path(out).expanduser(), text)
                logger.info("Wrote %s", out)
        except KeyboardInterrupt:
            sys.stderr.write(f"peft-eora {args.command}: interrupted\n")
            return 130
        except _user_errors() as exc:
            if args.debug:
                raise
            message = one_line(str(exc)) or type(exc).__name__
            sys.stderr.write(f"peft-eora {args.command}: error: {message}\n")
            return 1
    if not out:
        stdout.write(text)
        stdout.flush()
    return 0


