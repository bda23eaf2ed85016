"""Adapters that travel: atomic saving, safe loading, plain-LoRA export, model card, Hub push.

Importing ``peft_eora`` makes the usual PEFT calls do the right thing for EoRA adapters::

    >>> model.save_pretrained("eora-adapter")          # atomic, safetensors only, EoRA model card
    >>> model.push_to_hub("me/smollm2-gptq4-eora")     # same files + card, one commit
    >>> PeftModel.from_pretrained(qmodel, "me/smollm2-gptq4-eora", revision="<commit sha>")

and adds one function for engines and processes without peft-eora::

    >>> from peft_eora.hub import export_lora
    >>> export_lora(model, "lora-export")   # peft_type LORA, loads with stock PEFT, vLLM layout

Guarantees for EoRA adapters:

- ``save_pretrained`` writes into a temporary directory beside the target and renames it into
  place (a new directory appears complete or not at all; into an existing directory each file is
  replaced atomically, weights first). ``safe_serialization=False`` is refused.
- Loading (``EoRAConfig.from_pretrained``, which ``PeftModel.from_pretrained`` calls) checks that
  ``adapter_model.safetensors`` is present and intact: a truncated or corrupted file raises one
  :class:`AdapterFileError` naming it, and a pickle file (``adapter_model.bin``) is never loaded.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from torch import nn

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
README_NAME = "README.md"
CARD_BEGIN = "<!-- peft-eora:begin -->"
CARD_END = "<!-- peft-eora:end -->"
PAPER_URL = "https://arxiv.org/abs/2410.21271"

# bytes per element of the safetensors dtypes (sub-byte and exotic types are not size-checked)
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated, corrupted, or in a format peft-eora refuses (pickle)."""


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------

_REPAIR_HINT = "Save the adapter again (model.save_pretrained) or download it again (force_download=True)."


def check_safetensors(path: PathLike) -> dict[str, Any]:
    """Validate a safetensors file without loading it; return its header.

    Checks the header length, that the header is JSON, that every tensor's byte range matches its
    dtype and shape, and that the data section has exactly the announced size (catches truncated
    downloads and partial writes). Raises :class:`AdapterFileError` naming the file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            raw = f.read(n) if n is not None and 0 < n <= min(size - 8, _MAX_HEADER) else None
    except OSError as exc:
        raise AdapterFileError(f"Cannot read the adapter weights {path}: {exc}") from exc
    if n is None or raw is None:
        raise AdapterFileError(
            f"{path} is truncated or not a safetensors file ({size} bytes; header length field "
            f"{'missing' if n is None else n}). {_REPAIR_HINT}"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFileError(f"{path} has a corrupted safetensors header ({exc}). {_REPAIR_HINT}") from exc
    data_size = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFileError(f"{path}: corrupted safetensors entry for tensor {name!r}. {_REPAIR_HINT}") from exc
        itemsize = _DTYPE_SIZES.get(dtype)
        if not (0 <= begin <= stop) or (itemsize is not None and numel * itemsize != stop - begin):
            raise AdapterFileError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) has inconsistent byte offsets [{begin}, {stop}]; "
                f"the file is corrupted. {_REPAIR_HINT}"
            )
        end = max(end, stop)
    if end != data_size:
        state = "truncated" if end > data_size else "corrupted (trailing bytes)"
        raise AdapterFileError(
            f"{path} is {state}: its tensors need {end} bytes of data but the file holds {data_size}. {_REPAIR_HINT}"
        )
    return header


def _pickle_refused(where: str) -> AdapterFileError:
    return AdapterFileError(
        f"{where} holds only {WEIGHTS_NAME} (a pickle file) and no {SAFETENSORS_WEIGHTS_NAME}. peft-eora never loads "
        "pickle files, which can run arbitrary code; save the adapter with safetensors (the default of "
        "model.save_pretrained)."
    )


def check_adapter_weights(model_id: PathLike, subfolder: Optional[str] = None, **kwargs: Any) -> Optional[str]:
    """Locate and validate ``adapter_model.safetensors`` of a local adapter directory or Hub repo.

    Returns the checked file path, or ``None`` when there are no weights at all (PEFT reports
    that itself). Raises :class:`AdapterFileError` for a damaged file or a pickle-only adapter.
    ``kwargs`` may hold ``hf_hub_download`` arguments (``revision``, ``token``, ``cache_dir``...).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
    from peft import PeftConfig

    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        weights = os.path.join(local, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(weights):
            check_safetensors(weights)
            return weights
        if os.path.isfile(os.path.join(local, WEIGHTS_NAME)):
            raise _pickle_refused(local)
        return None
    hf_kwargs, _, _ = PeftConfig._split_kwargs(kwargs)
    for key in ("repo_id", "filename", "subfolder", "local_dir"):
        hf_kwargs.pop(key, None)
    try:
        weights = hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hf_kwargs)
    except RemoteEntryNotFoundError:
        pickle_name = f"{subfolder}/{WEIGHTS_NAME}" if subfolder else WEIGHTS_NAME
        api = HfApi()
        if api.file_exists(model_id, pickle_name, revision=hf_kwargs.get("revision"), token=hf_kwargs.get("token")):
            raise _pickle_refused(f"The Hub repo {model_id}") from None
        return None
    except LocalEntryNotFoundError:  # offline and not cached: PEFT raises its own error next
        return None
    check_safetensors(weights)
    return weights


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # directories on some filesystems
        pass
    finally:
        os.close(fd)


def _commit_order(rel: str) -> tuple[int, str]:
    """Weights first, then other files, then the config, the model card last."""
    name = os.path.basename(rel)
    rank = 0 if name.endswith(".safetensors") else 2 if name == CONFIG_NAME else 3 if name == README_NAME else 1
    return rank, rel


@contextmanager
def atomic_directory(target: PathLike) -> Iterator[str]:
    """Write a directory atomically: yield a temporary directory beside ``target``, then move it in.

        >>> with atomic_directory("out") as tmp:
        ...     write_files(tmp)

    If ``target`` does not exist (or is empty) the temporary directory is renamed onto it, so it
    appears complete or not at all. If it holds files, each written file replaces its namesake
    with ``os.replace`` (weights first, config and card last) and other files are kept. On an
    exception nothing in ``target`` changes and the temporary directory is removed.
    """
    target = os.path.abspath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"Cannot save into {target}: it is a file, not a directory.")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    try:
        yield tmp
        files = sorted(
            (os.path.relpath(os.path.join(root, f), tmp) for root, _, names in os.walk(tmp) for f in names),
            key=_commit_order,
        )
        for rel in files:
            _fsync(os.path.join(tmp, rel))
        if not os.path.isdir(target) or not os.listdir(target):
            os.replace(tmp, target)  # atomic; replaces an empty directory
        else:
            for rel in files:
                dest = os.path.join(target, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(os.path.join(tmp, rel), dest)
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(target)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _peft_model_parts(model: nn.Module) -> tuple[nn.Module, Any]:
    """(transformers base model, tuner) of a ``PeftModel`` or tuner."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.get_base_model(), model.base_model
    if isinstance(model, BaseTuner):
        return model.model, model
    raise TypeError(f"Expected a PeftModel (or PEFT tuner) with an EoRA adapter, got {type(model).__name__}.")


def quantization_info(model: nn.Module) -> dict[str, Any]:
    """Compression details from ``model.config.quantization_config`` (``format: "dense"`` if none)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return {"format": "dense"}
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    method = qc.get("quant_method")
    method = getattr(method, "value", method)
    info: dict[str, Any] = {"format": str(method).lower() if method else "unknown"}
    for key in ("bits", "group_size", "sym", "desc_act", "checkpoint_format"):
        value = qc.get(key)
        if value is not None:
            info[key] = getattr(value, "value", value)
    groups = qc.get("config_groups")  # compressed-tensors: the scheme sits in its config groups
    if isinstance(groups, dict) and groups:
        weights = [g.get("weights") if isinstance(g, dict) else getattr(g, "weights", None) for g in groups.values()]
        weights = [w if isinstance(w, dict) else (w.model_dump() if hasattr(w, "model_dump") else None) for w in weights]
        if weights and all(w for w in weights) and len({(w.get("num_bits"), w.get("group_size")) for w in weights}) == 1:
            w = weights[0]
            info.setdefault("bits", w.get("num_bits"))
            if w.get("group_size") is not None:
                info.setdefault("group_size", w.get("group_size"))
            if w.get("symmetric") is not None:
                info.setdefault("sym", w.get("symmetric"))
            if qc.get("format"):
                info.setdefault("checkpoint_format", qc.get("format"))
    return info


def _describe_quant(info: dict[str, Any]) -> str:
    if info.get("format") == "dense":
        return "dense weights (no `quantization_config`: a pruned or fake-quantized base)"
    parts = [info["format"].upper()]
    if info.get("bits") is not None:
        parts.append(f"{info['bits']}-bit")
    if info.get("group_size") is not None:
        parts.append("per-channel" if info["group_size"] in (-1, 0) else f"group size {info['group_size']}")
    extra = [f"{k}={info[k]}" for k in ("sym", "desc_act", "checkpoint_format") if k in info]
    return ", ".join(parts) + (f" ({', '.join(extra)})" if extra else "")


def _adapter_layers(tuner: Any, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    return [
        (name, module)
        for name, module in tuner.model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eora_section(
    model: nn.Module,
    adapter_name: str,
    repo_id: Optional[str],
    ppl_before: Optional[float],
    ppl_after: Optional[float],
    exported: bool = False,
    base_model: Optional[str] = None,
) -> str:
    import peft
    import transformers

    from . import __version__

    base, tuner = _peft_model_parts(model)
    config = tuner.peft_config[adapter_name]
    stats = dict(getattr(config, "eora_stats", None) or {})
    layers = _adapter_layers(tuner, adapter_name)
    ranks = sorted({int(layer.r[adapter_name]) for _, layer in layers}) or [config.r]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
    base_id = (
        base_model or getattr(getattr(base, "config", None), "_name_or_path", None) or config.base_model_name_or_path
    )
    base_text = f"`{base_id}`" if base_id else "the compressed base model"
    load_id = base_id or "path/to/compressed-base"
    quant = quantization_info(base)
    calib = getattr(config, "calibration", None)
    tokens = stats.get("calibration_tokens") or (calib.num_tokens if calib is not None else None)
    if calib is not None:
        sources = calib.sources
        whole = sum(s.weight for s in sources)
        calib_text = " + ".join(
            f"`{s.dataset}`" + (f" ({s.subset})" if s.subset else "") + (f" {s.weight / whole:.0%}" if len(sources) > 1 else "")
            for s in sources
        )
        calib_text += f", {calib.num_samples} × {calib.seq_len}-token windows"
    else:
        calib_text = "token batches passed to `initialize_eora_weights`" if tokens else "not recorded"
    if tokens:
        calib_text += f" ({int(tokens):,} tokens)"
    ppl_before = ppl_before if ppl_before is not None else stats.get("ppl_before")
    ppl_after = ppl_after if ppl_after is not None else stats.get("ppl_after")
    if ppl_before is not None or ppl_after is not None:
        before, after = (_fmt(v) if v is not None else "n/a" for v in (ppl_before, ppl_after))
        ppl = f"{before} → {after}"
        if stats.get("ppl_dataset"):
            ppl += f" on {stats['ppl_dataset']}"
    else:
        ppl = "not measured"
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{config.r} (per module {ranks[0]}–{ranks[-1]})"
    digest = (getattr(config, "base_fingerprint", None) or {}).get("digest")
    fingerprint = f"`{digest}`" if digest else "not recorded"
    method = getattr(config, "method", "eora")
    damping = getattr(config, "damping", None)
    if isinstance(damping, str):  # "auto": chosen per module; show what was picked
        counts = ((getattr(config, "eora_stats", None) or {}).get("damping_counts") or {})
        picked = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items(), key=lambda kv: float(kv[0])))
        damping_text = f" (damping {damping}" + (f": {picked}" if picked else "") + ")"
    else:
        damping_text = f" (damping {damping:g})" if damping is not None else ""
    rows = [
        ("Compressed base model", base_text if base_id else "not recorded"),
        ("Original (uncompressed) model", f"`{config.original_model}`" if config.original_model else "not recorded"),
        ("Compression", _describe_quant(quant)),
        ("Method", f"{method}{damping_text}"),
        ("Rank", f"{rank_text} (lora_alpha {_fmt(config.lora_alpha)})"),
        ("Target modules", f"{len(layers)} linear layers ({', '.join(suffixes)})"),
        ("Calibration data", calib_text),
        ("Perplexity before → after", ppl),
        ("Base fingerprint", fingerprint),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    where = repo_id or "path/to/this/adapter"
    if exported:
        kind = "exported as a plain LoRA adapter (`peft_type: LORA`)"
        usage = f"""```python
from peft import PeftModel  # stock PEFT; peft-eora is not needed
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{load_id}")
model = PeftModel.from_pretrained(base, "{where}")
```

LoRA-serving engines (vLLM-style loaders) read `adapter_model.safetensors` and `adapter_config.json`
directly: the effective scale `lora_alpha / r` is the same for every module. Apply it only to
the compressed base above; the base fingerprint is not checked in this format."""
    else:
        kind = "a standard LoRA adapter at inference time"
        usage = f"""```python
import peft_eora  # registers the EORA adapter type
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{load_id}")
model = PeftModel.from_pretrained(base, "{where}")
```

Loading checks the base against the recorded fingerprint. Without peft-eora (or for vLLM-style
serving engines), export a plain LoRA adapter: `peft_eora.hub.export_lora(model, "lora-export")`."""
    return f"""{CARD_BEGIN}
## EoRA adapter

A training-free [EoRA]({PAPER_URL}) adapter: low-rank factors that compensate the compression error of
{base_text}, computed by projecting the residual `W_original − W_compressed` into the eigenspace of
the calibration activations; {kind}.

{table}

### Usage

{usage}

### Framework versions

- peft-eora {__version__}
- PEFT {peft.__version__}
- Transformers {transformers.__version__}
{CARD_END}
"""


def build_model_card(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    ppl_before: Optional[float] = None,
    ppl_after: Optional[float] = None,
    existing: Optional[ModelCard] = None,
    extra_tags: Optional[list[str]] = None,
    exported: bool = False,
) -> ModelCard:
    """The model card of an EoRA adapter (``huggingface_hub.ModelCard``).

        >>> card = build_model_card(model, repo_id="me/adapter", ppl_before=21.3, ppl_after=19.8)
        >>> card.save("README.md")

    Metadata: ``library_name: peft``, tags ``peft``/``eora``/``lora``/format/bits, ``base_model`` (when
    it is a Hub id; pass ``base_model=`` to override). The body lists base model, compression
    format/bits/group size, rank, method, calibration data and token count, and perplexity before/after
    (from ``eora_stats["ppl_before"/"ppl_after"]`` or the arguments). With ``existing``, its text and
    metadata are kept and only the peft-eora section (between ``<!-- peft-eora:... -->`` markers) is
    replaced or appended.
    """
    base, tuner = _peft_model_parts(model)
    if adapter_name not in tuner.peft_config:
        raise KeyError(f"No adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]
    quant = quantization_info(base)
    tags = {"peft", "eora", "lora"} | set(extra_tags or [])
    if quant["format"] not in ("dense", "unknown"):
        tags.add(quant["format"])
    if quant.get("bits") is not None:
        tags.add(f"{quant['bits']}-bit")
    base_id = (
        base_model or getattr(getattr(base, "config", None), "_name_or_path", None) or config.base_model_name_or_path
    )
    data = existing.data if existing is not None else ModelCardData()
    data.library_name = "peft"
    data.tags = sorted(set(data.tags or []) | tags)
    if base_id and (base_model is not None or (_HUB_ID.match(base_id) and not os.path.exists(base_id))):
        data.base_model = base_id
        data.base_model_relation = "adapter"
    if getattr(data, "pipeline_tag", None) is None and type(model).__name__ == "PeftModelForCausalLM":
        data.pipeline_tag = "text-generation"
    section = _eora_section(model, adapter_name, repo_id, ppl_before, ppl_after, exported, base_model)
    if existing is not None:
        text = existing.text
        start, stop = text.find(CARD_BEGIN), text.find(CARD_END)
        if 0 <= start < stop:
            text = text[:start] + section.rstrip("\n") + text[stop + len(CARD_END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        title = f"EoRA adapter for {base_id}" if base_id else "EoRA adapter"
        text = f"\n# {title}\n\n{section}"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


# --------------------------------------------------------------------------------------------
# save_pretrained / push_to_hub for EoRA adapters
# --------------------------------------------------------------------------------------------

_ORIGINAL: dict[str, Any] = {}


def _eora_adapter_names(model: nn.Module, selected: Optional[list[str]] = None) -> list[str]:
    from .config import EoRAConfig

    configs = getattr(model, "peft_config", {}) or {}
    names = list(configs) if selected is None else [n for n in selected if n in configs]
    return [n for n in names if isinstance(configs[n], EoRAConfig)]


def _peft_save(model: nn.Module, directory: str, **kwargs: Any) -> None:
    from peft import PeftModel

    from .residual.bnb import restore_cpu_layouts

    restore_cpu_layouts(model)  # else bitsandbytes' state_dict() corrupts its CPU-repacked layers
    save = _ORIGINAL.get("save_pretrained", PeftModel.save_pretrained)
    save(model, directory, **kwargs)


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
    names = _eora_adapter_names(model, selected_adapters) or list(getattr(model, "peft_config", {}))
    card_adapter = "default" if "default" in names else names[0]
    readme = os.path.join(save_directory, README_NAME)
    keep_readme = False
    if existing_card is None and os.path.isfile(readme):
        try:
            existing_card = ModelCard.load(readme)
        except Exception as exc:  # unparsable metadata: leave the user's file alone
            logger.warning("Not updating %s: its metadata could not be parsed (%s).", readme, exc)
            keep_readme = True
    with atomic_directory(save_directory) as tmp:
        _peft_save(
            model, tmp, safe_serialization=True, selected_adapters=selected_adapters, is_main_process=True, **kwargs
        )
        if keep_readme:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(tmp, README_NAME))
        else:
            card = build_model_card(model, card_adapter, repo_id=repo_id, existing=existing_card, **(card_kwargs or {}))
            card.save(os.path.join(tmp, README_NAME))
    logger.info("Saved EoRA adapter(s) %s to %s", names, save_directory)
    return save_directory


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
    **save_kwargs: Any,
):
    """Push an EoRA adapter (weights, config, model card) to the Hub in one commit.

        >>> commit = push_to_hub(model, "me/smollm2-gptq4-eora", ppl_before=21.3, ppl_after=19.8)
        >>> commit.oid   # pin it: PeftModel.from_pretrained(qmodel, "me/...", revision=commit.oid)

    ``model.push_to_hub(repo_id, ...)`` runs this once ``peft_eora`` is imported. An existing
    README on the Hub keeps its text; only its peft-eora section and metadata are updated. Pushing
    to a ``revision`` creates that branch if needed. Returns ``huggingface_hub.CommitInfo``.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    save_kwargs.pop("max_shard_size", None)  # transformers' push_to_hub argument; adapters are one file
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    existing = None
    for rev in dict.fromkeys([revision, None]):
        try:
            readme = hf_hub_download(repo_id, README_NAME, revision=rev, token=token, endpoint=api.endpoint)
            existing = ModelCard.load(readme)
            break
        except (EntryNotFoundError, RevisionNotFoundError):
            continue
        except RepositoryNotFoundError:
            break
    card_kwargs = {"base_model": base_model, "ppl_before": ppl_before, "ppl_after": ppl_after, "extra_tags": tags}
    with tempfile.TemporaryDirectory(prefix="peft-eora-push-") as tmp:
        work = os.path.join(tmp, "adapter")
        save_pretrained(model, work, repo_id=repo_id, existing_card=existing, card_kwargs=card_kwargs, **save_kwargs)
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
        )
    logger.info("Pushed EoRA adapter to %s (commit %s)", repo_id, commit.oid)
    return commit


def install() -> None:
    """Route ``PeftModel.save_pretrained``/``push_to_hub`` through this module for EoRA adapters.

    Models without an EoRA adapter keep PEFT's behaviour unchanged. Idempotent; called on
    ``import peft_eora``.
    """
    from peft import PeftModel

    if getattr(PeftModel.save_pretrained, "_peft_eora", False):
        return
    original_save = PeftModel.save_pretrained
    original_push = PeftModel.push_to_hub
    _ORIGINAL.update(save_pretrained=original_save, push_to_hub=original_push)
    save_signature = inspect.signature(original_save)

    @functools.wraps(original_save)
    def save_pretrained_(self, save_directory, *args, **kwargs):
        bound = save_signature.bind(self, save_directory, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        if not _eora_adapter_names(self, arguments.get("selected_adapters")):
            return original_save(self, save_directory, *args, **kwargs)
        save_directory = arguments.pop("save_directory")
        save_pretrained(self, save_directory, **arguments, **extra)

    @functools.wraps(original_push)
    def push_to_hub_(self, repo_id, *args, **kwargs):
        if args or not _eora_adapter_names(self):
            return original_push(self, repo_id, *args, **kwargs)
        return push_to_hub(self, repo_id, **kwargs)

    save_pretrained_._peft_eora = True  # type: ignore[attr-defined]
    push_to_hub_._peft_eora = True  # type: ignore[attr-defined]
    PeftModel.save_pretrained = save_pretrained_
    PeftModel.push_to_hub = push_to_hub_


# --------------------------------------------------------------------------------------------
# Plain-LoRA export
# --------------------------------------------------------------------------------------------


def _number(x: float) -> Union[int, float]:
    return int(x) if float(x).is_integer() else float(x)


def _sort_json_lists(path: str, keys: tuple[str, ...]) -> None:
    """Sort list values (PEFT stores target_modules as a set) so the file is deterministic."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for key in keys:
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def _export_targets(model: nn.Module, names: list[str]) -> list[str]:
    """Module-name suffixes (``q_proj``...) if they select exactly ``names``, else the full names."""
    from .fingerprint import _base_modules

    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n, _ in _base_modules(model) if n and n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == set(names) else sorted(names)


def export_lora(
    model: nn.Module,
    save_directory: PathLike,
    adapter_name: str = "default",
    *,
    dtype: Optional[torch.dtype] = None,
    model_card: bool = True,
) -> str:
    """Write ``adapter_name`` as an ordinary LoRA adapter (``peft_type: LORA``), atomically.

        >>> export_lora(model, "lora-export", dtype=torch.float16)
        >>> # elsewhere, without peft-eora:
        >>> PeftModel.from_pretrained(qmodel, "lora-export")      # stock PEFT
        >>> LLM(model=..., enable_lora=True)  # vLLM: LoRARequest("eora", 1, "lora-export")

    Layout (what PEFT and vLLM-style loaders read): ``adapter_model.safetensors`` with
    ``base_model.model.<module>.lora_A.weight`` (``r × in``) and ``.lora_B.weight`` (``out × r``);
    ``adapter_config.json`` with ``r``, ``lora_alpha``, ``target_modules`` as an explicit list
    (module suffixes such as ``q_proj`` when they select exactly the adapted layers, else full
    names), ``rank_pattern``/``alpha_pattern`` for modules whose rank differs from ``r``.

    Scaling: every module gets the effective scale ``lora_alpha / r`` of the EoRA config
    (``alpha_pattern[m] = scale · rank_pattern[m]``), so PEFT (which reads the patterns) and engines
    that apply one global ``lora_alpha / r`` compute the same update. Modules whose EoRA scale
    differs from that (custom ``alpha_pattern``, rsLoRA with mixed ranks) get the ratio folded into
    ``lora_B``; otherwise the tensors are copied bit for bit. ``dtype`` casts the tensors (e.g.
    ``torch.float16`` for serving).
    """
    from safetensors.torch import save_file

    _, tuner = _peft_model_parts(model)
    if adapter_name not in tuner.peft_config:
        raise KeyError(f"No adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]
    if not isinstance(config, LoraConfig):
        raise TypeError(f"Adapter {adapter_name!r} is a {type(config).__name__}; only LoRA-type adapters export.")
    if config.use_dora or getattr(config, "lora_bias", False) or config.modules_to_save:
        raise ValueError("Plain-LoRA export supports lora_A/lora_B only (no DoRA, lora_bias or modules_to_save).")
    layers = _adapter_layers(tuner, adapter_name)
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} has no LoRA layers to export.")
    r = int(config.r)
    scale = config.lora_alpha / (math.sqrt(r) if config.use_rslora else r)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, Union[int, float]] = {}
    folded = []
    for name, layer in layers:
        if adapter_name in getattr(layer, "lora_embedding_A", {}) or adapter_name not in layer.lora_B:
            raise ValueError(f"{name}: only linear LoRA layers can be exported.")
        r_m, s_m = int(layer.r[adapter_name]), float(layer.scaling[adapter_name])
        a = layer.lora_A[adapter_name].weight.detach()
        b = layer.lora_B[adapter_name].weight.detach()
        if s_m != scale:
            b = (b.double() * (s_m / scale)).to(b.dtype)
            folded.append(name)
        if r_m != r:
            rank_pattern[name] = r_m
            alpha_pattern[name] = _number(scale * r_m)
        key = f"base_model.model.{name}"
        out_dtype = dtype or a.dtype
        tensors[f"{key}.lora_A.weight"] = a.to("cpu", out_dtype).contiguous()
        tensors[f"{key}.lora_B.weight"] = b.to("cpu", out_dtype).contiguous()
    if folded:
        logger.info("export_lora: folded a per-module scale into lora_B of %d module(s)", len(folded))
    lora_config = LoraConfig(
        r=r,
        lora_alpha=_number(scale * r),
        target_modules=_export_targets(tuner.model, [n for n, _ in layers]),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        fan_in_fan_out=config.fan_in_fan_out,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        inference_mode=True,
    )
    with atomic_directory(save_directory) as tmp:
        save_file(tensors, os.path.join(tmp, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        lora_config.save_pretrained(tmp)
        _sort_json_lists(os.path.join(tmp, CONFIG_NAME), ("target_modules",))
        if model_card:
            build_model_card(model, adapter_name, exported=True).save(os.path.join(tmp, README_NAME))
    logger.info("Exported adapter %r as plain LoRA (%d modules) to %s", adapter_name, len(layers), save_directory)
    return os.fspath(save_directory)
