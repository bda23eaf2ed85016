"""Saving EoRA adapters: PEFT's files, written atomically, safetensors only, with the EoRA model card.

    >>> import peft_eora
    >>> model.save_pretrained("eora-adapter")          # runs save_pretrained below (see _peft_compat)
    >>> save_pretrained(model, "eora-adapter")         # the same, called directly

A new directory appears complete or not at all; into an existing directory each file is
replaced atomically (weights first, config and card last) and other files are kept.
``safe_serialization=False`` is refused: peft-eora never loads pickle files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

from huggingface_hub import ModelCard
from torch import nn

from .adapter_format import record_weights_digest
from .card import build_model_card
from .config import EoRAConfig
from .fingerprint import SIGNATURES, signature_moved
from .safe_files import EORA_CONFIG_NAME, README_NAME, PathLike, atomic_directory

logger = logging.getLogger(__name__)


def eora_adapter_names(model: nn.Module, selected: Optional[list[str]] = None) -> list[str]:
    """Names of the EoRA adapters of ``model`` (among ``selected`` when given)."""
    configs = getattr(model, "peft_config", {}) or {}
    names = list(configs) if selected is None else [n for n in selected if n in configs]
    return [n for n in names if isinstance(configs[n], EoRAConfig)]


def _peft_save(model: nn.Module, directory: str, **kwargs: Any) -> None:
    from ._peft_compat import peft_save_pretrained
    from .residual.bnb import restore_cpu_layouts

    restore_cpu_layouts(model)  # else bitsandbytes' state_dict() corrupts its CPU-repacked layers
    peft_save_pretrained(model, directory, **kwargs)


def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    safe_serialization: bool = True,
    selected_adapters: Optional[list[str]] = None,
    is_main_process: bool = True,
    repo_id: Optional[str] = None,
    existing_card: Optional[ModelCard] = None,
    card_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> str:
    """Save a PEFT model holding EoRA adapters: PEFT's files, written atomically, plus the EoRA card.

    This is what ``model.save_pretrained(dir)`` runs once ``peft_eora`` is imported. ``kwargs`` go
    to PEFT's ``save_pretrained``; ``card_kwargs`` to :func:`build_model_card`.
    """
    if not safe_serialization:
        raise ValueError(
            "EoRA adapters are saved as safetensors only: safe_serialization=False would write a pickle file, "
            "which peft-eora refuses to load."
        )
    save_directory = os.fspath(save_directory)
    if not is_main_process:
        return save_directory
    configs = getattr(model, "peft_config", {}) or {}
    saved = list(configs) if selected_adapters is None else [n for n in selected_adapters if n in configs]
    names = eora_adapter_names(model, selected_adapters) or saved
    mark_fine_tuned(model, names)
    card_kwargs = dict(card_kwargs or {}, repo_id=repo_id)
    # PEFT writes the default adapter at the top and every other one into a subfolder of its name; an
    # eora_config.json left there by an earlier save would pass a plain LoRA adapter off as EoRA
    stale = [os.path.join(_folder(n), EORA_CONFIG_NAME) for n in saved if not isinstance(configs[n], EoRAConfig)]
    # a named plain-LoRA adapter's folder gets no card from PEFT: an EoRA card left there would describe it as EoRA
    stale += [os.path.join(n, README_NAME) for n in saved if n != "default" and not isinstance(configs[n], EoRAConfig)
              and _is_eora_card(os.path.join(save_directory, n, README_NAME))]
    with atomic_directory(save_directory, stale=stale) as tmp:
        _peft_save(
            model, tmp, safe_serialization=True, selected_adapters=selected_adapters, is_main_process=True, **kwargs
        )
        for name in eora_adapter_names(model, saved):  # the weights each sidecar was written with
            record_weights_digest(os.path.join(tmp, _folder(name)))
        # each EoRA adapter gets its card beside its files
        for name in names:
            if name != "default":
                write_card(model, name, os.path.join(tmp, name), os.path.join(save_directory, name), None,
                            dict(card_kwargs, subfolder=name))
        if "default" in names:
            write_card(model, "default", tmp, save_directory, existing_card, card_kwargs)
        elif "default" in saved:  # a plain LoRA at the top
            _keep_users_top_card(save_directory, tmp)
        elif not os.path.isfile(os.path.join(save_directory, README_NAME)):  # named ones only, no card yet
            write_card(model, names[0], tmp, save_directory, existing_card, dict(card_kwargs, subfolder=names[0]))
        else:  # named adapters only: the card at the top stays as it is
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(tmp, README_NAME))
    logger.info("Saved EoRA adapter(s) %s to %s", names, save_directory)
    return save_directory


def _is_eora_card(path: str) -> Optional[bool]:
    """Whether the card at ``path`` is (or holds) an EoRA card; None if there is no readable card."""
    from .card import CARD_BEGIN

    try:
        with open(path, encoding="utf-8") as f:
            return CARD_BEGIN in f.read()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _keep_users_top_card(save_directory: str, tmp: str) -> None:
    """A plain-LoRA adapter saved at the top: the user's own card there stays; an EoRA card (which described an
    EoRA adapter saved there before) gives way to PEFT's card, written in ``tmp``."""
    top = os.path.join(save_directory, README_NAME)
    eora_card = _is_eora_card(top)
    if eora_card is None:
        return
    if eora_card:
        logger.info("%s described an EoRA adapter; the plain-LoRA adapter now at the top gets PEFT's card.", top)
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tmp, README_NAME))


def _folder(adapter_name: str) -> str:
    """Where PEFT saves ``adapter_name`` in a save directory: the top for ``"default"``, else its own folder."""
    return "" if adapter_name == "default" else adapter_name


def mark_fine_tuned(model: nn.Module, names: list[str]) -> None:
    """Set ``fine_tuned`` on the configs of ``names`` whose factors moved since EoRA computed them, so that the
    saved ``eora_config.json`` and card do not present trained factors as EoRA's training-free ones."""
    configs = getattr(model, "peft_config", {}) or {}
    for name in names:
        config = configs.get(name)
        stats = getattr(config, "eora_stats", None) or {}
        if getattr(config, "fine_tuned", True):
            continue
        # the factors, and the trainable copies (modules_to_save) where they were recorded: either may be trained
        for key, signature in SIGNATURES:
            recorded = stats.get(key)
            now = signature(model, name) if recorded else None
            if not now:  # not recorded, or not materialised here: nothing to compare
                continue
            if signature_moved(recorded, now):
                config.fine_tuned = True
                logger.info("Adapter %r was fine-tuned since EoRA computed it: saved with fine_tuned=True.", name)
                break
            if now[5] > recorded[5]:  # cast to a coarser dtype since: its rounding is now part of the values
                stats[key] = now


def write_card(
    model: nn.Module,
    adapter_name: str,
    folder: str,
    target: str,
    existing: Optional[ModelCard],
    card_kwargs: dict[str, Any],
) -> None:
    """The EoRA card of ``adapter_name`` into ``folder``, keeping the text of ``existing`` or of ``target``'s card."""
    readme = os.path.join(target, README_NAME)
    if existing is None and os.path.isfile(readme):
        try:
            existing = ModelCard.load(readme)
        except Exception as exc:  # unparsable metadata: leave the user's file alone
            logger.warning("Not updating %s: its metadata could not be parsed (%s).", readme, exc)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, README_NAME))
            return
    build_model_card(model, adapter_name, existing=existing, **card_kwargs).save(os.path.join(folder, README_NAME))
