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
from .config import CalibrationConfig, EoRAConfig
from .model import EoRAModel, initialize_eora_weights

__version__ = "0.1.0"

PEFT_TYPE = _peft_compat.register(EoRAConfig, EoRAModel)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["CalibrationConfig", "EoRAConfig", "EoRAModel", "PEFT_TYPE", "initialize_eora_weights", "__version__"]
