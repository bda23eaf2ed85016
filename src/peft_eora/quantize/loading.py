"""Loading GPTQ/AWQ checkpoints through transformers (gptqmodel kernels), and float32 compute outside them.

    >>> model = load_quantized(q4, dtype=torch.float16, compute_dtype=torch.float32)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .awq import awq_float32_forward_
from .gptqmodel_run import import_gptqmodel

logger = logging.getLogger(__name__)


def load_quantized(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Load a GPTQ or AWQ checkpoint through ``transformers.AutoModelForCausalLM`` (eval mode).

    transformers dispatches both to gptqmodel. ``backend`` is a gptqmodel backend name; the
    default for GPTQ, ``"gptq_torch"``, gives ``gptqmodel.nn_modules.qlinear.torch.TorchLinear``
    for every bit width, whose buffers keep the GPTQ packed layout and whose
    ``dequantize_weight()`` is what its forward multiplies by. With ``"auto"``, 4-bit layers on
    CPU become ``TorchAtenLinear`` instead: it repacks its buffers in place on the first forward
    (after which ``dequantize_weight()`` returns garbage: EoRA reads such layers through their forward,
    the ``probe`` back-end) and fails when ``in_features`` is not a multiple of the group size
    (SmolLM2's 576 with g128). The default for AWQ, ``"torch_awq"``,
    gives ``AwqTorchLinear`` (GEMM layout kept; it computes in float16 whatever the activation
    dtype: float32 inputs are cast to float16 and the output cast back).

    ``dtype`` is the model dtype (activations, embeddings, norms); ``None`` picks float32 on
    CPU (exact and by far the fastest there: CPUs without AVX-512-BF16/AMX run bfloat16 and
    float16 matmuls ~100x slower than float32) and bfloat16 elsewhere. gptqmodel keeps the
    quantized layers' ``scales`` in float16 whatever ``dtype`` is, so ``dequantize_weight()``
    is float16 and the forward casts it to the activation dtype: in float32 and float16 a
    layer computes exactly ``x @ dequantize_weight()``; in bfloat16 the weight is additionally
    rounded to bfloat16. ``compute_dtype`` (optional) runs everything outside the quantized
    layers in that dtype instead, while ``dtype`` then only sets the scales' dtype (a cast
    from the stored float16, exact for float16/float32)::

        >>> model = load_quantized(q4, dtype=torch.float16, compute_dtype=torch.float32)

    For AWQ, ``compute_dtype=torch.float32`` also makes the AWQ layers multiply in float32 by
    their exact float16 dequantized weights (:func:`awq_float32_forward_`; the CPU kernel's own
    float16 matmul is ~60× slower here).

    float32 loads and runs on CPU. The first load in a fresh process can be slow (kernels
    are compiled with torch.compile).

    >>> model = load_quantized(quantize_gptq(export_original(), bits=4))
    >>> awq = load_quantized(quantize_awq(export_original(), bits=4))
    """
    import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoConfig, AutoModelForCausalLM, AwqConfig, GPTQConfig

    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    config = AutoConfig.from_pretrained(str(path))
    stored = config.quantization_config
    if not isinstance(stored, dict):
        stored = stored.to_dict()
    method = str(stored.get("quant_method", "gptq")).lower().removeprefix("quantizationmethod.")
    bits, group_size = stored["bits"], stored.get("group_size", 128)
    if method == "awq":
        qcfg = AwqConfig(bits=bits, group_size=group_size, backend=backend or "torch_awq")
    elif method == "gptq":
        qcfg = GPTQConfig(bits=bits, group_size=group_size, backend=backend or "gptq_torch")
    else:
        raise ValueError(f"{path} is a {method!r} checkpoint; load_quantized reads GPTQ and AWQ checkpoints only.")
    _defuse_experts(config.model_type)
    with _weight_shims_initialized():
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=compute_dtype or dtype, device_map=str(device), quantization_config=qcfg,
            output_loading_info=True,
        )
    unloaded = {k: sorted(v) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))}
    if unloaded:
        detail = "; ".join(f"{k.replace('_', ' ')}: {len(v)} (e.g. {', '.join(map(str, v[:2]))})" for k, v in unloaded.items())
        raise ValueError(
            f"{path} did not load cleanly into {type(model).__name__} ({detail}): its tensors do not fit the modules "
            "transformers built, so some weights would be random. Load it with gptqmodel's GPTQModel.load, or a "
            "transformers/gptqmodel pair that supports this architecture."
        )
    if method == "awq" and compute_dtype == torch.float32:
        awq_float32_forward_(model)
    elif compute_dtype is not None:
        for module in model.modules():
            if isinstance(module, BaseQuantLinear) and module.scales.dtype != dtype:
                module.scales = module.scales.to(dtype)
    return model.eval()


_SHIMS_LOCK = threading.Lock()
_SHIMS: dict = {"users": 0, "before": None}  # loads inside _weight_shims_initialized now (all threads); the mark before


@contextmanager
def _weight_shims_initialized() -> Iterator[None]:
    """Inside, transformers' weight initialisation skips the tensor-like ``weight`` stand-in of gptqmodel's
    packed layers. GPT-2's ``_init_weights`` re-initialises ``attn.c_proj.weight`` whatever its type (its
    scaled init), and the stand-in has no data: loading a GPTQ GPT-2 raised ``AttributeError: ...
    '_LinearWeightMetadata' object has no attribute 'normal_'``. Marked initialised while any load runs (the
    mark is on the class, so loads in several threads share it: the last to finish takes it off)."""
    try:
        from gptqmodel.nn_modules.qlinear.torch import _LinearWeightMetadata as shim
    except ImportError:  # another gptqmodel: nothing to mark
        yield
        return
    with _SHIMS_LOCK:
        if _SHIMS["users"] == 0:
            _SHIMS["before"] = shim.__dict__.get("_is_hf_initialized")
            shim._is_hf_initialized = True
        _SHIMS["users"] += 1
    try:
        yield
    finally:
        with _SHIMS_LOCK:
            _SHIMS["users"] -= 1
            if _SHIMS["users"] == 0:
                before = _SHIMS["before"]
                if before is None:
                    del shim._is_hf_initialized
                else:
                    shim._is_hf_initialized = before


def _defuse_experts(model_type: str) -> None:
    """Make transformers build one linear per MoE expert for ``model_type``, as gptqmodel's loader does
    (``defuser``) before quantizing: its checkpoints store each expert's packed layers, which the fused
    3-D expert parameters of transformers 5 cannot hold. A no-op for dense models or without defuser.
    The patch holds for the rest of the process (defuser has no undo): an original model of that type
    loaded afterwards has one linear per expert too, which EoRA reads as well."""
    try:
        import defuser
    except ImportError:  # older gptqmodel: its checkpoints of such models load as they are
        return
    if defuser.replace_fused_blocks(model_type):
        logger.info("%s: experts built as one linear per expert (defuser), as gptqmodel quantized them", model_type)


def upcast_unquantized(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Cast every floating tensor outside the quantized layers (embeddings, norms, lm_head)
    to ``dtype`` in place; quantized layers keep their packed weights and scales. For a model
    loaded elsewhere; :func:`load_quantized` does this with ``compute_dtype``.

    >>> upcast_unquantized(model_loaded_in_fp16)   # float32 activations, fp16 scales
    """
    import_gptqmodel()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    quant = [m for m in model.modules() if isinstance(m, BaseQuantLinear)]
    inside = {id(t) for m in quant for t in (*m.parameters(), *m.buffers())}
    for module in model.modules():
        if isinstance(module, BaseQuantLinear):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and id(param) not in inside and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and id(buf) not in inside and buf.dtype != dtype:
                setattr(module, name, buf.to(dtype))
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model
