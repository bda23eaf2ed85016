"""What reaches the terminal while a verb runs: our log lines on stderr, the JSON result on stdout,
and nothing from the libraries underneath unless ``--debug``.

    >>> with terminal(args):
    ...     result = args.handler(args)

Without ``--debug``, third-party warnings (``warnings.warn`` in torch, transformers, gptqmodel, …),
their log records below ERROR (torch's ``W…`` lines, transformers' notices, kernels/bitsandbytes
offline notices) and their prints to stdout (gptqmodel's banner) are dropped; warnings and logs of
peft-eora itself (e.g. a base-fingerprint mismatch) are shown. ``-v`` keeps library prints on
stderr; ``--debug`` shows everything.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

#: Read by torch, transformers and huggingface_hub when they are imported (set only if unset).
QUIET_ENVIRONMENT = {
    "TORCH_LOGS": "-torch",  # torch's Python loggers at ERROR (its "W… _pytree.py" lines)
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def _ours(record_name: str) -> bool:
    return record_name == "peft_eora" or record_name.startswith("peft_eora.")


class _OursOrErrors(logging.Filter):
    """Log records of peft-eora at the chosen level; other libraries' only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _ours(record.name) or record.levelno >= logging.ERROR


def _show_our_warnings_only(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """``warnings.showwarning`` for the CLI: peft-eora's warnings on stderr as one log-style line, the libraries' nowhere."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _ours(getattr(category, "__module__", "")) or os.path.abspath(filename).startswith(package_dir + os.sep):
        text = " ".join(str(message).split())
        (file or sys.stderr).write(f"WARNING peft_eora ({category.__name__}): {text}\n")


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """transformers logs through its own handler (not the root logger): when it is already imported, lower it."""
    module = sys.modules.get("transformers.utils.logging")
    if module is None:
        yield
        return
    previous = module.get_verbosity()
    module.set_verbosity_error()
    try:
        yield
    finally:
        module.set_verbosity(previous)


@contextlib.contextmanager
def _no_library_progress_bars() -> Iterator[None]:
    """``--no-progress``: huggingface_hub's, transformers' and datasets' bars too (env for later imports of the
    first, switches for the others)."""
    module = sys.modules.get("transformers.utils.logging")
    active = module is not None and module.is_progress_bar_enabled()
    if active:
        module.disable_progress_bar()
    datasets = sys.modules.get("datasets")  # its "Generating train split" bars when a calibration file is read
    bars = datasets is not None and datasets.is_progress_bar_enabled()
    if bars:
        datasets.disable_progress_bars()
    try:
        with _environment({"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}):
            yield
    finally:
        if active:
            module.enable_progress_bar()
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def terminal(args: argparse.Namespace) -> Iterator[None]:
    """Log lines of the chosen level (``-q``/``-v``/``--debug``) on stderr; libraries quiet unless ``--debug``."""
    debug = bool(getattr(args, "debug", False))
    verbose = bool(getattr(args, "verbose", False))
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if (verbose or debug) else logging.WARNING if args.quiet else logging.INFO
    handler.setLevel(level)
    if not debug:
        handler.addFilter(_OursOrErrors())
    previous = root.level
    root.addHandler(handler)
    root.setLevel(min(level, previous) if previous else level)
    try:
        with contextlib.ExitStack() as stack:
            if not debug:
                stack.enter_context(_environment(QUIET_ENVIRONMENT))
                stack.enter_context(_transformers_errors_only())
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("default")  # each distinct warning once per place (pytest may have said "ignore")
                warnings.showwarning = _show_our_warnings_only
            if getattr(args, "no_progress", False):
                stack.enter_context(_no_library_progress_bars())
            # libraries that print (gptqmodel's banner) must not mix with the JSON on stdout
            sink = sys.stderr if (verbose or debug) else stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
