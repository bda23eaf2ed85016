"""peft-eora: EoRA (arXiv 2410.21271) training-free compensation for compressed LLMs, as a PEFT method.

    >>> import peft_eora
    >>> from peft import get_peft_model
    >>> model = get_peft_model(quantized_model, peft_eora.EoRAConfig(
    ...     r=64, original_model="path/to/original", calibration=peft_eora.CalibrationConfig()))

Importing the package registers the ``EORA`` PEFT type, so ``PeftConfig.from_pretrained`` and
``PeftModel.from_pretrained`` load saved EoRA adapters.
"""

from __future__ import annotations

import logging

from . import _peft_compat
from .adapter_format import QUANTIZED_PEFT_TYPE as _QUANTIZED_PEFT_TYPE
from .adapter_format import is_eora_adapter as _is_eora_adapter
from .config import CalibrationConfig, CalibrationSource, EoRAConfig
from .export import export_lora
from .fingerprint import BaseMismatchError
from .hub import push_to_hub as _push_to_hub
from .model import EoRAModel, initialize_eora_weights
from .safe_files import AdapterFileError
from .saving import eora_adapter_names as _eora_adapter_names
from .saving import save_pretrained as _save_pretrained

__version__ = "0.1.0"

PEFT_TYPE = _peft_compat.register(EoRAConfig, EoRAModel, config_aliases=(_QUANTIZED_PEFT_TYPE,))
# PeftConfig/LoraConfig.from_pretrained of a folder holding eora_config.json: the EoRA config
_peft_compat.patch_config_loading(EoRAConfig, _is_eora_adapter)
# model.save_pretrained/push_to_hub of EoRA adapters: atomic, safetensors-only, EoRA model card
_peft_compat.patch_peft_model(lambda m, sel: bool(_eora_adapter_names(m, sel)), _save_pretrained, _push_to_hub)

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    # the fused path (kernels, Triton) is imported on first use only
    if name in ("fuse", "unfuse", "FuseReport"):
        from . import fused

        return getattr(fused, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterFileError",
    "BaseMismatchError",
    "CalibrationConfig",
    "CalibrationSource",
    "EoRAConfig",
    "EoRAModel",
    "FuseReport",
    "PEFT_TYPE",
    "export_lora",
    "fuse",
    "initialize_eora_weights",
    "unfuse",
    "__version__",
]
