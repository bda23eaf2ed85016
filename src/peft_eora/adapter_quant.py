"""Quantized EoRA adapters: ``lora_A``/``lora_B`` kept on an int8 or int4 grid.

``EoRAConfig(adapter_bits=8 | 4)`` puts every factor on a symmetric grid as EoRA computes it
(float32 scales: one per output feature for ``B``; one per rank direction and 64 (int8) or 16
(int4) input columns for ``A``; see :mod:`peft_eora.kernels.lowbit`), rounded against the layer's
activations rather than entry by entry (:mod:`peft_eora.factor_quant`). In memory the factors stay ordinary
float ``nn.Linear`` weights holding grid values, so PEFT's forward, merging and training work
unchanged and what you evaluate is exactly what is saved. On disk each factor is stored as codes
plus scales, 4× (int8) or ~6× (int4 at r = 128) smaller than float32::

    >>> cfg = EoRAConfig(r=128, adapter_bits=4, original_model=..., calibration=...)
    >>> model = get_peft_model(qmodel, cfg)         # factors computed, then rounded to int4
    >>> model.save_pretrained("eora-int4")          # adapter_model.safetensors: codes + scales
    >>> PeftModel.from_pretrained(qmodel2, "eora-int4")   # the same grid values, bit for bit

Saved keys (``X`` = ``base_model.model.<module>.lora_A`` or ``.lora_B``): ``X.qweight`` (int8
codes, or uint8 with two int4 codes per byte, even column in the low nibble), ``X.qscale``
(float32, one per row, or ``[rows, cols / g]`` for ``lora_A`` in groups of g inputs) and ``X.qshape`` (int64
``[rows, cols]``). The fused kernels read the same
layout (``peft_eora.fuse(model, adapter_bits=...)``). After fine-tuning, saving re-rounds the
trained factors onto the grid (lossy); set ``adapter_bits=16`` to keep them exact.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .kernels.lowbit import (
    LOWBIT_BITS,
    LowBitTensor,
    dequantize_per_channel,
    factor_grid,
    factor_group_size,
    grid_values,
    quantize_per_channel,
)

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_BITS", "quantize_adapter_", "pack_adapter_state_dict", "unpack_adapter_state_dict", "is_packed"]

#: Storage widths for EoRA factors: 16 = the model's float dtype (no rounding), 8 / 4 = int codes.
ADAPTER_BITS: tuple[int, ...] = (16,) + LOWBIT_BITS

CODES, SCALE, SHAPE = "qweight", "qscale", "qshape"
_FACTOR_WEIGHT = re.compile(r"^(?P<stem>.*\.lora_[AB](?:\.[^.]+)?)\.weight$")
_PACKED = re.compile(rf"^(?P<stem>.*\.lora_[AB](?:\.[^.]+)?)\.(?P<part>{CODES}|{SCALE}|{SHAPE})$")


def check_bits(bits: int) -> int:
    """``bits`` if it is a supported adapter width, else a ``ValueError`` naming the choices."""
    if bits not in ADAPTER_BITS:
        raise ValueError(f"adapter_bits={bits!r} is not supported: use one of {ADAPTER_BITS} (16 = no quantization).")
    return int(bits)


_KIND = re.compile(r"\.(lora_[AB])(?:\.[^.]+)?$")  # the factor segment, then the adapter name if any


def _kind(stem: str) -> str:
    """``"lora_A"`` or ``"lora_B"`` for ``<module>.lora_[AB][.<adapter name>]`` (whatever the adapter is called:
    a name such as ``lora_Alpaca`` must not make a ``lora_B`` an ``A``)."""
    m = _KIND.search(stem)
    if m is None:
        raise ValueError(f"{stem!r} names no lora_A / lora_B factor.")
    return m[1]


def _round_to_grid(w: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    return grid_values(w, bits, factor_group_size(kind, bits, w.shape[1]))


def factor_rounder(bits: int) -> Optional[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """``(A, B) → (Â, B̂)`` on the grid ``adapter_bits=bits`` stores (None for 16): what EoRA's
    computation uses to score and install factors as they will be saved.

        >>> A_hat, B_hat = factor_rounder(4)(A, B)    # int4 A in groups along its input, B per row  # doctest: +SKIP
    """
    check_bits(bits)
    if bits == 16:
        return None

    def round_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _round_to_grid(A, bits, "lora_A"), _round_to_grid(B, bits, "lora_B")

    return round_factors


def _factor_modules(model: nn.Module, adapter_name: str) -> Iterable[tuple[str, nn.Linear]]:
    for name, module in model.named_modules():
        for attr in ("lora_A", "lora_B"):
            factors = getattr(module, attr, None)
            if isinstance(factors, nn.ModuleDict) and adapter_name in factors:
                factor = factors[adapter_name]
                if not isinstance(factor, nn.Linear):
                    raise TypeError(f"{name}.{attr}.{adapter_name} is a {type(factor).__name__}; only linear "
                                    "LoRA factors can be quantized.")
                yield f"{name}.{attr}.{adapter_name}", factor


@torch.no_grad()
def quantize_adapter_(model: nn.Module, adapter_name: str = "default", bits: int = 8) -> int:
    """Round ``adapter_name``'s ``lora_A``/``lora_B`` weights onto the ``bits`` grid in place.

    Returns the number of factors rounded (``0`` for ``bits=16``). Rounding values already on
    the grid leaves them unchanged, so calling it twice is harmless.
    """
    if check_bits(bits) == 16:
        return 0
    count = 0
    for name, factor in _factor_modules(model, adapter_name):
        factor.weight.copy_(_round_to_grid(factor.weight.detach(), bits, _kind(name)))
        count += 1
    logger.info("rounded %d factor(s) of adapter %r to int%d", count, adapter_name, bits)
    return count


def pack_adapter_state_dict(state_dict: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Replace every ``...lora_[AB]....weight`` entry by its int codes, scales and shape.

    Other entries (biases, embeddings, modules_to_save) pass through untouched.
    """
    if check_bits(bits) == 16:
        return dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _FACTOR_WEIGHT.match(key)
        if m is None or value.dim() != 2:
            out[key] = value
            continue
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} holds NaN or inf values; refusing to save a broken adapter.")
        stem = m["stem"]
        q = quantize_per_channel(value, bits, factor_grid(value, bits, _kind(stem)))
        out[f"{stem}.{CODES}"] = q.data.contiguous()
        out[f"{stem}.{SCALE}"] = q.scale.contiguous()
        out[f"{stem}.{SHAPE}"] = torch.tensor(q.shape, dtype=torch.int64)
    return out


def is_packed(state_dict: dict[str, torch.Tensor]) -> bool:
    """True if ``state_dict`` holds quantized factors (written by :func:`pack_adapter_state_dict`)."""
    return any(_PACKED.match(k) for k in state_dict)


def unpack_adapter_state_dict(
    state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_adapter_state_dict`: float ``...weight`` entries of grid values.

    Raises ``ValueError`` naming the factor when a part is missing or inconsistent.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _PACKED.match(key)
        if m is None:
            out[key] = value
        else:
            parts.setdefault(m["stem"], {})[m["part"]] = value
    for stem, p in parts.items():
        missing = {CODES, SCALE, SHAPE} - set(p)
        if missing:
            raise ValueError(f"quantized adapter factor {stem} lacks {sorted(missing)}: the adapter file is incomplete.")
        rows, cols = (int(v) for v in p[SHAPE].tolist())
        codes = p[CODES]
        if codes.dtype == torch.int8 and tuple(codes.shape) == (rows, cols):
            bits = 8
        elif codes.dtype == torch.uint8 and tuple(codes.shape) == (rows, (cols + 1) // 2):
            bits = 4
        else:
            raise ValueError(f"quantized adapter factor {stem}: codes {codes.dtype} {tuple(codes.shape)} do not match "
                             f"shape {(rows, cols)} (int8 codes or uint8 packed int4 expected).")
        scale = p[SCALE]
        group = 0
        if scale.dim() == 2 and scale.shape[0] == rows and scale.shape[1] > 0 and cols % scale.shape[1] == 0:
            group = cols // scale.shape[1]
        elif tuple(scale.shape) != (rows,):
            raise ValueError(f"quantized adapter factor {stem}: {tuple(scale.shape)} scales for {rows} rows.")
        low = LowBitTensor(data=codes, scale=scale.to(torch.float32), bits=bits, shape=(rows, cols), group_size=group)
        out[f"{stem}.weight"] = dequantize_per_channel(low, dtype)
    return out
