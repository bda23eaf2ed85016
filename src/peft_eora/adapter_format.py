"""How an EoRA adapter is laid out on disk, so that the float ones load wherever LoRA loads.

    eora-adapter/
      adapter_model.safetensors  base_model.model.<module>.lora_A.weight / .lora_B.weight (float factors),
                                 or .lora_[AB].qweight/.qscale/.qshape (adapter_bits 8 or 4)
      adapter_config.json        a plain LoRA config: peft_type "LORA" (float factors) or
                                 QUANTIZED_PEFT_TYPE (int8/int4 factors)
      eora_config.json           EoRA's own fields: method, calibration, damping, eora_stats,
                                 base_fingerprint, adapter_bits, … (stock tools never read it)
      README.md                  the model card

Stock PEFT (``PeftModel.from_pretrained``), transformers (``model.load_adapter``) and
lm-evaluation-harness (``peft=``) read a float EoRA adapter as the LoRA adapter it is at inference
time. With peft-eora imported, a LoRA folder with a matching ``eora_config.json`` loads as an
:class:`~peft_eora.EoRAConfig` instead: the base fingerprint is checked and the EoRA metadata kept
(see :mod:`peft_eora._peft_compat`). Quantized adapters need peft-eora to unpack their codes; their
``peft_type`` is a sentence that stock PEFT reports as ``KeyError: '<that sentence>'``. Adapters
in the first, single-file layout (everything in ``adapter_config.json``, ``peft_type: "EORA"``) still load.

    >>> adapter, sidecar = split(config.to_dict())     # what EoRAConfig.save_pretrained writes
    >>> merge(adapter, sidecar, "eora-adapter")        # the keyword arguments of EoRAConfig
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import warnings
from typing import Any, Optional

from .safe_files import CONFIG_NAME, EORA_CONFIG_NAME, AdapterFileError, PathLike, read_json

logger = logging.getLogger(__name__)

FORMAT = "peft-eora"
FORMAT_VERSION = 1
#: ``peft_type`` of adapters in the first, single-file layout (all fields in adapter_config.json).
LEGACY_PEFT_TYPE = "EORA"
#: ``peft_type`` of int8/int4 adapters: stock PEFT cannot unpack their codes and says ``KeyError: '<this>'``.
QUANTIZED_PEFT_TYPE = "EORA-INT8/INT4 adapter: install peft-eora (pip install peft-eora) and import peft_eora to load it"
#: ``adapter_config.json`` fields whose change means the sidecar no longer describes the adapter.
_SIGNATURE_KEYS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")
_META_KEYS = ("format", "format_version", "peft_eora_version", "lora_signature", "weights_sha256")


def _lora_fields() -> frozenset[str]:
    from peft import LoraConfig

    return frozenset(f.name for f in dataclasses.fields(LoraConfig))


def lora_signature(adapter: dict[str, Any]) -> str:
    """A digest of the LoRA settings in ``adapter`` (rank, alpha, targets, patterns)."""
    picked = {}
    for key in _SIGNATURE_KEYS:
        value = adapter.get(key)
        picked[key] = sorted(value) if isinstance(value, (list, tuple, set)) else value
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def split(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(adapter_config.json, eora_config.json)`` contents for the dict of a saved EoRAConfig.

    LoRA fields go to the first with ``peft_type`` ``"LORA"`` (float factors) or
    :data:`QUANTIZED_PEFT_TYPE` (``adapter_bits`` 8/4); the other fields to the second, with the
    format version and a signature of the LoRA settings they belong to.
    """
    from ._version import __version__

    lora = _lora_fields()
    adapter = {k: v for k, v in data.items() if k in lora}
    adapter["peft_type"] = "LORA" if int(data.get("adapter_bits", 16)) == 16 else QUANTIZED_PEFT_TYPE
    sidecar = {k: v for k, v in data.items() if k not in lora}
    sidecar.update(
        format=FORMAT, format_version=FORMAT_VERSION, peft_eora_version=__version__, lora_signature=lora_signature(adapter)
    )
    return adapter, sidecar


def merge(adapter: dict[str, Any], sidecar: Optional[dict[str, Any]], where: str) -> dict[str, Any]:
    """The keyword arguments of ``EoRAConfig`` from ``adapter_config.json`` and ``eora_config.json``.

    ``sidecar`` is ``None`` for adapters in the first, single-file layout. Raises
    :class:`~peft_eora.AdapterFileError` naming ``where`` when the files are not an EoRA adapter
    this version can read.
    """
    peft_type = adapter.get("peft_type")
    if sidecar is None:
        if peft_type == QUANTIZED_PEFT_TYPE:
            raise AdapterFileError(
                f"{where} is an int8/int4 EoRA adapter whose {EORA_CONFIG_NAME} is missing: the settings needed to read "
                f"its factor codes are kept there. Copy {EORA_CONFIG_NAME} back beside adapter_config.json from where "
                "the adapter was saved or downloaded, or compute the adapter again."
            )
        if peft_type != LEGACY_PEFT_TYPE:
            raise AdapterFileError(
                f"{where} has no {EORA_CONFIG_NAME}: it is a {peft_type} adapter, not an EoRA one. Load it with "
                "PeftModel.from_pretrained as usual; EoRA settings exist only for adapters saved by peft-eora."
            )
        return dict(adapter)
    if sidecar.get("format") != FORMAT:
        raise AdapterFileError(f"{where}/{EORA_CONFIG_NAME} is not a peft-eora file (format {sidecar.get('format')!r}).")
    version = sidecar.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{where}/{EORA_CONFIG_NAME} has format version {version!r}; this peft-eora reads up to {FORMAT_VERSION}. "
            "Upgrade peft-eora (pip install -U peft-eora)."
        )
    if peft_type not in ("LORA", QUANTIZED_PEFT_TYPE, LEGACY_PEFT_TYPE):
        raise AdapterFileError(f"{where}: adapter_config.json says peft_type {peft_type!r}, not an EoRA adapter.")
    data = {**adapter, **{k: v for k, v in sidecar.items() if k not in _META_KEYS}}
    data["peft_type"] = LEGACY_PEFT_TYPE
    return data


_DIGESTS: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime): a load asks several times


def weights_digest(path: PathLike) -> str:
    """The SHA-256 of a weights file (hex), remembered while the file is unchanged (~0.25 s per 400 MB)."""
    path = os.path.realpath(os.fspath(path))
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if len(_DIGESTS) > 16:  # a few adapters at a time is all loads need
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


def write_split(directory: PathLike) -> None:
    """Rewrite the full EoRA ``adapter_config.json`` PEFT saved in ``directory`` as the two files (atomically)."""
    from .safe_files import atomic_write_text

    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    with open(path, encoding="utf-8") as f:
        adapter, sidecar = split(json.load(f))
    atomic_write_text(os.path.join(os.fspath(directory), EORA_CONFIG_NAME), json.dumps(sidecar, indent=2, sort_keys=True))
    atomic_write_text(path, json.dumps(adapter, indent=2, sort_keys=True))


def record_weights_digest(directory: PathLike) -> bool:
    """Add the SHA-256 of ``adapter_model.safetensors`` to the ``eora_config.json`` beside it (atomically), once
    both are written: weights another tool writes over it later are then not taken for EoRA's. Returns whether
    both files were there. peft-eora's save calls it after PEFT's; a sidecar without it (written by
    transformers' ``save_pretrained``, which writes the config before the weights) is not checked."""
    from .safe_files import SAFETENSORS_WEIGHTS_NAME, atomic_write_text

    sidecar_path = os.path.join(os.fspath(directory), EORA_CONFIG_NAME)
    weights = os.path.join(os.fspath(directory), SAFETENSORS_WEIGHTS_NAME)
    if not (os.path.isfile(sidecar_path) and os.path.isfile(weights)):
        return False
    with open(sidecar_path, encoding="utf-8") as f:
        sidecar = json.load(f)
    sidecar["weights_sha256"] = weights_digest(weights)
    atomic_write_text(sidecar_path, json.dumps(sidecar, indent=2, sort_keys=True))
    return True


def read(model_id: PathLike, subfolder: Optional[str] = None, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments of the EoRAConfig saved in a local folder or Hub repo (``kwargs``: Hub options)."""
    where = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    adapter = read_json(model_id, CONFIG_NAME, subfolder, **kwargs)
    if adapter is None:
        raise ValueError(f"Can't find '{CONFIG_NAME}' at '{where}'")
    sidecar = None if adapter.get("peft_type") == LEGACY_PEFT_TYPE else read_json(model_id, EORA_CONFIG_NAME, subfolder, **kwargs)
    return merge(adapter, sidecar, where)


def is_eora_adapter(model_id: PathLike, subfolder: Optional[str] = None, **kwargs: Any) -> bool:
    """Whether the adapter in a local folder or Hub repo is an EoRA adapter (any version of the format).

    A LoRA ``adapter_config.json`` counts only with an ``eora_config.json`` whose signature matches
    it and, for float factors, whose recorded SHA-256 matches ``adapter_model.safetensors``; a
    mismatch (another tool saved other LoRA settings or other weights into the folder) warns and
    counts as plain LoRA. Files that cannot be found count as not EoRA (the loader reports them
    itself).
    """
    try:
        adapter = read_json(model_id, CONFIG_NAME, subfolder, **kwargs)
    except AdapterFileError:
        return False
    peft_type = None if adapter is None else adapter.get("peft_type")
    if peft_type == LEGACY_PEFT_TYPE:
        return True
    if peft_type not in ("LORA", QUANTIZED_PEFT_TYPE):
        return False
    sidecar = read_json(model_id, EORA_CONFIG_NAME, subfolder, **kwargs)
    if sidecar is None:
        return peft_type == QUANTIZED_PEFT_TYPE  # merge() then names the missing file
    where = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    recorded = sidecar.get("lora_signature")
    if recorded is not None and recorded != lora_signature(adapter):
        warnings.warn(
            f"{where}: {EORA_CONFIG_NAME} was written for other LoRA settings than {CONFIG_NAME} now holds (the adapter "
            "was re-saved by another tool); loading it as plain LoRA, without the EoRA base check.",
            stacklevel=3,
        )
        return False
    digest = sidecar.get("weights_sha256")
    if digest is not None and peft_type == "LORA":  # int8/int4 codes: only peft-eora writes (or reads) them
        from .safe_files import SAFETENSORS_WEIGHTS_NAME, check_safetensors, resolve_file

        weights = resolve_file(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder, **kwargs)
        try:
            intact = weights is not None and bool(check_safetensors(weights))
        except AdapterFileError:  # damaged: EoRAConfig.from_pretrained names it
            intact = False
        if intact and weights_digest(weights) != digest:
            warnings.warn(
                f"{where}: {EORA_CONFIG_NAME} was written for other weights than {SAFETENSORS_WEIGHTS_NAME} now holds "
                "(another tool saved an adapter into this folder); loading it as plain LoRA, without the EoRA base "
                "check. Delete the stale eora_config.json to silence this.",
                stacklevel=3,
            )
            return False
    return True
