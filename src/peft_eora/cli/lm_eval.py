"""``peft-eora lm-eval``: lm-evaluation-harness with peft-eora imported.

    peft-eora lm-eval --model hf --model_args pretrained=QUANT,peft=eora-adapter,dtype=float32 --tasks arc_easy

Float EoRA adapters load with stock ``lm_eval`` too (they are plain LoRA on disk); through this
wrapper the base fingerprint is checked and quantized (int8/int4) adapters load as well.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def add_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The ``lm-eval`` entry of ``peft-eora --help`` (its arguments go to lm_eval unparsed)."""
    subparsers.add_parser(
        "lm-eval", add_help=False,
        help="Run lm-evaluation-harness with peft-eora imported (so --model_args peft=<EoRA adapter> loads). "
        "Every following argument goes to lm_eval.",
    )  # fmt: skip


def run(argv: Sequence[str]) -> int:
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
