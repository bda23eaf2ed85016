"""Pushing EoRA adapters to the Hugging Face Hub: weights, config and model card in one commit.

    >>> import peft_eora
    >>> commit = model.push_to_hub("me/smollm2-gptq4-eora", ppl_before=21.3, ppl_after=19.8)
    >>> PeftModel.from_pretrained(qmodel, "me/smollm2-gptq4-eora", revision=commit.oid)

``model.push_to_hub`` runs :func:`push_to_hub` below once ``peft_eora`` is imported (see
:mod:`peft_eora._peft_compat`). Files are written by :mod:`peft_eora.saving`, the card by
:mod:`peft_eora.card`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Optional, Union

from huggingface_hub import ModelCard
from torch import nn

from .safe_files import CONFIG_NAME, EORA_CONFIG_NAME, README_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from .saving import save_pretrained

logger = logging.getLogger(__name__)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[bool, str]] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    base_model: Optional[str] = None,
    ppl_before: Optional[float] = None,
    ppl_after: Optional[float] = None,
    card: Optional[ModelCard] = None,
    **save_kwargs: Any,
):
    """Push an EoRA adapter (weights, config, model card) to the Hub in one commit.

        >>> commit = push_to_hub(model, "me/smollm2-gptq4-eora", ppl_before=21.3, ppl_after=19.8)
        >>> commit.oid   # pin it: PeftModel.from_pretrained(qmodel, "me/...", revision=commit.oid)

    ``model.push_to_hub(repo_id, ...)`` runs this once ``peft_eora`` is imported. An existing
    README on the Hub keeps its text; only its peft-eora section and metadata are updated. Pushing
    to a ``revision`` creates that branch if needed. In each folder this save writes an adapter into, the
    adapter files an earlier push left that it does not write (an old sidecar or ``adapter_model.bin``) are
    deleted in the same commit; other files and folders stay. ``card``: the card to start from where the repo has
    none yet (e.g. the saved adapter folder's ``README.md``: ``ModelCard.load(path)``; ``peft-eora push``
    passes it). Returns ``huggingface_hub.CommitInfo``.
    """
    from huggingface_hub import HfApi

    save_kwargs.pop("max_shard_size", None)  # transformers' push_to_hub argument; adapters are one file
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card_kwargs = {"base_model": base_model, "ppl_before": ppl_before, "ppl_after": ppl_after, "extra_tags": tags}
    with tempfile.TemporaryDirectory(prefix="peft-eora-push-") as tmp:
        work = os.path.join(tmp, "adapter")
        # the repo's cards (its top README and each adapter folder's) where the save looks for them, so that a push
        # treats them as a save treats a folder's: the user's text kept, a card of other adapters left alone
        fetched = _fetch_cards(api, repo_id, revision, token, work)
        existing = None if README_NAME in fetched else card
        save_pretrained(model, work, repo_id=repo_id, existing_card=existing, card_kwargs=card_kwargs, **save_kwargs)
        # cards the save removed (an EoRA card in the folder of what is now a plain-LoRA adapter) go on the Hub too
        gone = [name for name in fetched if not os.path.exists(os.path.join(work, name))]
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=work,
            commit_message=commit_message or "Upload EoRA adapter",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
            # in each folder this save writes an adapter into (the top, a named adapter's subfolder), the adapter
            # files an earlier push left there and this one does not write (an old sidecar, adapter_model.bin) go
            # in the same commit; other folders (other adapters, Trainer checkpoints) are left alone
            delete_patterns=_stale_candidates(work) + gone,
        )
    logger.info("Pushed EoRA adapter to %s (commit %s)", repo_id, commit.oid)
    return commit


def _fetch_cards(api: Any, repo_id: str, revision: Optional[str], token: Optional[Union[bool, str]],
                 work: str) -> list[str]:
    """Copy the model cards of ``repo_id`` (at ``revision``, else its main branch: a new branch starts from it) into
    ``work``: the top ``README.md`` and each first-level folder's. Returns their repo paths."""
    import shutil

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    for rev in dict.fromkeys([revision, None]):
        try:
            files = api.list_repo_files(repo_id, revision=rev, token=token)
            break
        except RevisionNotFoundError:
            continue
        except RepositoryNotFoundError:
            return []
    else:
        return []
    cards = [f for f in files if f == README_NAME or (f.count("/") == 1 and f.endswith(f"/{README_NAME}"))]
    for name in cards:
        path = hf_hub_download(repo_id, name, revision=rev, token=token, endpoint=api.endpoint)
        os.makedirs(os.path.dirname(os.path.join(work, name)), exist_ok=True)
        shutil.copyfile(path, os.path.join(work, name))
    return cards


#: The files of one adapter folder.
_ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, EORA_CONFIG_NAME)


def _stale_candidates(folder: str) -> list[str]:
    """The exact repo paths of every adapter file in each folder of ``folder`` (the save) holding an adapter: what
    the push replaces (``upload_folder`` keeps those it uploads)."""
    from pathlib import Path

    root = Path(folder)
    homes = sorted({p.parent.relative_to(root).as_posix() for p in root.rglob(CONFIG_NAME)})
    return [name if home == "." else f"{home}/{name}" for home in homes for name in _ADAPTER_FILES]


# Names that lived in this module before it was split (peft-eora 0.1.0): still importable from here.
_MOVED = {
    "AdapterFileError": "safe_files", "atomic_directory": "safe_files", "check_adapter_weights": "safe_files",
    "check_safetensors": "safe_files", "CARD_BEGIN": "card", "CARD_END": "card", "build_model_card": "card",
    "quantization_info": "card", "save_pretrained": "saving", "export_lora": "export",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
