"""peft-eora: EoRA (arXiv 2410.21271) training-free compensation for compressed LLMs, as a PEFT method.

    >>> import peft_eora
    >>> from peft import get_peft_model
    >>> model = get_peft_model(quantized_model, peft_eora.EoRAConfig(
    ...     r=64, original_model="path/to/original", calibration=peft_eora.CalibrationConfig()))

Importing the package makes PEFT know EoRA: the ``EORA`` PEFT type, saving/pushing with the
EoRA model card, and loading saved EoRA adapters through ``PeftConfig.from_pretrained`` and
``PeftModel.from_pretrained``. Importing it is instant: nothing heavy (torch, PEFT, transformers)
is imported until used, and the PEFT registration happens as soon as PEFT itself is imported —
right away if it already was (see :func:`peft_eora._peft_compat.when_peft_ready`). The names below
are imported on first access.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from . import _peft_compat
from ._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: public name → module that defines it (imported on first access)
_LAZY = {
    "AdapterFileError": "safe_files",
    "BaseMismatchError": "fingerprint",
    "CalibrationConfig": "config",
    "CalibrationError": "calibration",
    "CalibrationSource": "config",
    "EoRAConfig": "config",
    "EoRAModel": "model",
    "EoRAOutOfMemoryError": "compensate",
    "FuseReport": "fused",
    "ModelMismatchError": "original",
    "export_lora": "export",
    "fuse": "fused",
    "initialize_eora_weights": "model",
    "unfuse": "fused",
}


def _install() -> Any:
    """Wire peft-eora into PEFT (idempotent); returns ``PeftType.EORA``. Runs once PEFT is imported."""
    from .adapter_format import QUANTIZED_PEFT_TYPE, is_eora_adapter
    from .config import EoRAConfig
    from .hub import push_to_hub
    from .model import EoRAModel, record_combination
    from .saving import eora_adapter_names, save_pretrained

    peft_type = _peft_compat.register(EoRAConfig, EoRAModel, config_aliases=(QUANTIZED_PEFT_TYPE,))
    # PeftConfig/LoraConfig.from_pretrained of a folder holding eora_config.json: the EoRA config
    _peft_compat.patch_config_loading(EoRAConfig, is_eora_adapter)
    # model.save_pretrained/push_to_hub of EoRA adapters: atomic, safetensors-only, EoRA model card
    _peft_compat.patch_peft_model(lambda m, sel: bool(eora_adapter_names(m, sel)), save_pretrained, push_to_hub)
    # LoRA and EoRA adapters side by side in one PeftModel (PEFT refuses two peft types)
    _peft_compat.patch_add_adapter(peft_type, _join_lora_model)
    # model.load_adapter(path, name, allow_base_mismatch=True) as PeftModel.from_pretrained takes it
    _peft_compat.patch_load_adapter(("allow_base_mismatch",))
    # peft.utils.hotswap.hotswap_adapter: EoRA adapters swap in like LoRA ones, their base checked first
    _peft_compat.patch_hotswap(peft_type, _hotswap_prepare)
    # get_peft_model(..., autocast_adapter_dtype=False): computed factors stay in the base layer's dtype
    _peft_compat.patch_autocast_flag()
    # add_weighted_adapter of EoRA adapters: the combination records what it combines, not its first source's stats
    _peft_compat.patch_weighted_adapter(record_combination)
    return peft_type


def _hotswap_prepare(model: Any, config: Any, adapter_name: str, state_dict: dict) -> dict:
    """An EoRA adapter about to be hot-swapped in: its base fingerprint checked against ``model``'s, its int8/int4
    codes unpacked to the float factors PEFT copies in place."""
    from ._peft_compat import refuse_merged
    from .adapter_quant import is_packed, unpack_adapter_state_dict
    from .fingerprint import verify_fingerprint

    refuse_merged(getattr(model, "_orig_mod", model), "Hot-swapping an EoRA adapter")
    verify_fingerprint(model, config, adapter_name)
    return unpack_adapter_state_dict(state_dict) if is_packed(state_dict) else state_dict


def _join_lora_model(model: Any, adapter_name: str, config: Any) -> None:
    """Before an EoRA adapter joins a plain LoRA model: refused where it needs EoRA's tuner (int8/int4 codes to
    unpack, factors to compute); else what EoRA's tuner does before injecting (the base fingerprint checked)."""
    from .model import prepare_for_eora

    reason = None
    if getattr(config, "adapter_bits", 16) != 16:
        reason = f"it stores int{config.adapter_bits} factors, which only EoRA's tuner unpacks"
    elif getattr(config, "init_eora", False):
        reason = "its factors are still to be computed, which EoRA's tuner does"
    if reason is not None:
        raise ValueError(
            f"Adapter {adapter_name!r} cannot join a LoRA model: {reason}. Create the model from the EoRA adapter "
            "first (PeftModel.from_pretrained(base, eora_dir)) and add LoRA adapters to it."
        )
    prepare_for_eora(model.base_model.model, config, adapter_name)


_peft_compat.when_peft_ready(_install)


def __getattr__(name: str) -> Any:
    if name == "PEFT_TYPE":
        return _peft_compat.install_now(_install)
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:  # peft_eora.quantize.awq_original(...) after a bare `import peft_eora`
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The subpackages a user reaches as attributes (``peft_eora.eval.perplexity``), imported on first use.
_SUBPACKAGES = ("eval", "kernels", "prune", "quantize", "residual")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES) | {"PEFT_TYPE"})


__all__ = [
    "AdapterFileError",
    "BaseMismatchError",
    "CalibrationConfig",
    "CalibrationError",
    "CalibrationSource",
    "EoRAConfig",
    "EoRAModel",
    "EoRAOutOfMemoryError",
    "FuseReport",
    "ModelMismatchError",
    "PEFT_TYPE",
    "export_lora",
    "fuse",
    "initialize_eora_weights",
    "unfuse",
    "__version__",
]
