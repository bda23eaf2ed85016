"""``peft-eora push``: push a saved adapter (weights, config, model card) to the Hugging Face Hub.

    peft-eora push eora-w3-r64 me/smollm2-gptq3-eora --ppl-before 132.1 --ppl-after 61.9
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from .models import load_adapter, load_model, pick_device, resolve_model
from .options import CLIError

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``push`` verb's parser (a subparser of ``peft-eora``)."""
    p = subparsers.add_parser(
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
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Push a saved adapter to the Hub."""
    from ..config import EoRAConfig
    from ..hub import push_to_hub

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
    model = load_adapter(load_model(base_path, pick_device(args.device), args.dtype), adapter, args.allow_base_mismatch)
    if isinstance(model.peft_config["default"], EoRAConfig):
        from huggingface_hub import ModelCard

        readme = adapter / "README.md"  # the folder's card (with the user's edits) where the repo has none yet
        try:
            card = ModelCard.load(readme) if readme.is_file() else None
        except Exception as exc:  # unparsable metadata: a fresh card, as a save would
            logger.warning("Not starting from %s: its metadata could not be parsed (%s).", readme, exc)
            card = None
        commit = push_to_hub(
            model, args.repo_id, commit_message=args.commit_message, private=args.private or None,
            revision=args.revision, create_pr=args.create_pr, base_model=args.base_model_id,
            ppl_before=args.ppl_before, ppl_after=args.ppl_after,
            card=card,
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
