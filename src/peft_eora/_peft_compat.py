"""The one place where peft-eora adapts PEFT internals (checked against peft 0.21.2).

PEFT's public ``register_peft_method`` only accepts names already in the closed enum
``peft.utils.peft_types.PeftType`` and refuses a second tuner with the prefix ``lora_``. EoRA *is*
LoRA at inference time (same ``lora_A``/``lora_B`` modules, same state-dict keys, so the adapter
stays readable by LoRA tooling), so we:

1. add a real ``PeftType.EORA`` member to the enum (so ``PeftType("EORA")`` and ``.value`` work
   everywhere PEFT uses them), and
2. insert EoRA into the three lookup tables that ``register_peft_method`` fills (config, tuner,
   prefix), keeping the ``lora_`` prefix.

``tests/test_registration.py`` fails loudly if a PEFT release changes any of this.
"""

from __future__ import annotations

import logging

from peft.utils.peft_types import PeftType

logger = logging.getLogger(__name__)

EORA_NAME = "EORA"


def _extend_peft_type(name: str = EORA_NAME) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the (closed) enum if needed."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # Set the class attribute before the member maps know the name: EnumType.__setattr__
    # refuses to rebind existing members.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(config_cls: type, model_cls: type) -> PeftType:
    """Make PEFT's ``get_peft_model``/``PeftConfig``/``PeftModel`` know the EoRA method."""
    from peft import mapping

    peft_type = _extend_peft_type()
    current = mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if current is not None and current is not model_cls:
        raise RuntimeError(f"Another tuner ({current!r}) is already registered as PEFT type {peft_type.value}.")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    logger.debug("registered PEFT method %s -> %s", peft_type.value, model_cls.__name__)
    return peft_type
