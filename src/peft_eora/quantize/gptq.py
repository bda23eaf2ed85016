"""GPTQ quantization with gptqmodel (cached checkpoints).

    >>> q3 = quantize_gptq(export_original(), bits=3, group_size=128)   # ~6-15 min for SmolLM2-135M on 2 cores
    >>> model = load_quantized(q3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
from .checkpoints import _cached, gptq_dir, source_setting
from .gptqmodel_run import _quantize_with_gptqmodel


def quantize_gptq(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    out_dir: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    device: str = "cpu",
    **kw: Any,
) -> Path:
    """GPTQ-quantize the checkpoint at ``model_dir`` with gptqmodel; return the output folder.

    ``QuantizeConfig(bits=bits, group_size=group_size, **kw)``: everything else is
    gptqmodel's default (recorded in ``peft_eora_quantize.json``). Calibration:
    :func:`gptq_calibration` (``num_samples`` windows of ``seq_len`` C4 tokens). The weights
    are loaded in ``dtype`` on ``device`` for quantization. A complete output folder is
    returned at once; one made with different bits or group size raises ``ValueError``.

    >>> q3 = quantize_gptq(export_original(), bits=3, group_size=128)
    """
    model_dir = Path(model_dir)
    final = Path(out_dir) if out_dir is not None else gptq_dir(model_dir, bits, group_size, num_samples, seq_len)
    if _cached(final, "gptq", bits, group_size, {**source_setting(model_dir), "num_samples": num_samples,
                                                 "seq_len": seq_len, "dtype": dtype, **kw}):
        return final

    def describe(qcfg: Any) -> dict[str, Any]:
        return {
            "sym": qcfg.sym,
            "desc_act": qcfg.desc_act,
            "act_group_aware": getattr(qcfg, "act_group_aware", None),
            "damp_percent": getattr(qcfg, "damp_percent", None),
            "damp_auto_increment": getattr(qcfg, "damp_auto_increment", None),
            "true_sequential": qcfg.true_sequential,
        }

    return _quantize_with_gptqmodel(
        model_dir, final, "gptq", bits, group_size, num_samples, seq_len, dtype, batch_size, device, {}, kw, describe
    )
