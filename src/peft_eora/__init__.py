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
from .config import CalibrationConfig, CalibrationSource, EoRAConfig
from .fingerprint import BaseMismatchError
from .hub import AdapterFileError, export_lora
from .hub import install as _install_save_and_push
from .model import EoRAModel, initialize_eora_weights

__version__ = "0.1.0"

PEFT_TYPE = _peft_compat.register(EoRAConfig, EoRAModel)
_install_save_and_push()  # model.save_pretrained/push_to_hub: atomic, safetensors-only, EoRA model card

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
