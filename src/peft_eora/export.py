"""Plain-LoRA export: an EoRA adapter written as ordinary LoRA for LoRA-serving engines.

    >>> from peft_eora import export_lora
    >>> export_lora(model, "lora-export", dtype=torch.float16)
    >>> PeftModel.from_pretrained(qmodel, "lora-export")      # stock PEFT, vLLM-style loaders

Unlike :mod:`peft_eora.saving` it folds per-module scales into ``lora_B`` so that one global
``lora_alpha / r`` holds for every module, writes ``target_modules`` as an explicit list, can
cast the tensors, and turns int8/int4 adapters into their float grid values.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional, Union

import torch
from peft import LoraConfig
from torch import nn

from .card import adapter_layers, peft_model_parts
from .fingerprint import _base_modules
from .safe_files import CONFIG_NAME, EORA_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, PathLike, atomic_directory

logger = logging.getLogger(__name__)


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

    _, tuner = peft_model_parts(model)
    if adapter_name not in tuner.peft_config:
        raise KeyError(f"No adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]
    if not isinstance(config, LoraConfig):
        raise TypeError(f"Adapter {adapter_name!r} is a {type(config).__name__}; only LoRA-type adapters export.")
    if config.use_dora or getattr(config, "lora_bias", False) or config.modules_to_save:
        raise ValueError("Plain-LoRA export supports lora_A/lora_B only (no DoRA, lora_bias or modules_to_save).")
    layers = adapter_layers(tuner, adapter_name)
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
    # an eora_config.json left by an earlier save would make this folder load as that EoRA adapter
    with atomic_directory(save_directory, stale=[EORA_CONFIG_NAME]) as tmp:
        save_file(tensors, os.path.join(tmp, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        lora_config.save_pretrained(tmp)
        _sort_json_lists(os.path.join(tmp, CONFIG_NAME), ("target_modules",))
        if model_card:
            from .saving import write_card, mark_fine_tuned

            mark_fine_tuned(model, [adapter_name])  # the card then says the factors were trained further
            # the folder's card keeps the user's text (only its peft-eora section is rewritten), as a save does
            write_card(model, adapter_name, tmp, os.fspath(save_directory), None, {"exported": True})
    logger.info("Exported adapter %r as plain LoRA (%d modules) to %s", adapter_name, len(layers), save_directory)
    return os.fspath(save_directory)
