"""``EoRAModel``: PEFT's LoRA tuner whose adapters are initialised by EoRA after injection.

    >>> import peft_eora                      # registers the "EORA" PEFT type
    >>> from peft import get_peft_model
    >>> model = get_peft_model(qmodel, peft_eora.EoRAConfig(r=64, original_model=path,
    ...                                                    calibration=peft_eora.CalibrationConfig()))

or, with an in-memory original model and your own batches (EVA-style two steps)::

    >>> model = get_peft_model(qmodel, peft_eora.EoRAConfig(r=64))   # zero-initialised B
    >>> peft_eora.initialize_eora_weights(model, original_model=fp_model, calibration=dataloader)

Several adapters on one base (e.g. one calibrated per task) are computed one at a time: while one
is computed, it is the only active adapter, so the others never shape its calibration inputs::

    >>> model.add_adapter("gsm8k", peft_eora.EoRAConfig(r=64, original_model=path, calibration=gsm8k_calib))
    >>> model(input_ids=batch, adapter_names=["default", "gsm8k"])    # one adapter per row (see layer.py)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from ._peft_compat import (
    AUTOCAST_ADAPTER_DTYPE,
    kept_on_failure,
    kept_requires_grad,
    only_active,
    refuse_merged,
    remove_adapter_layers,
    writable_fields,
)
from .adapter_quant import is_packed, pack_adapter_state_dict, quantize_adapter_, unpack_adapter_state_dict
from .calibration import (
    CalibrationData,
    as_batches,
    check_context,
    check_vocabulary,
    context_length,
    is_token_mapping,
    text_rows,
)
from .compensate import CompensationStats, RankPlan, compensate, find_targets, index_pattern, plan_ranks
from .config import DEFAULT_LOGIT_WEIGHTING, FIXED_DAMPING, CalibrationConfig, EoRAConfig
from .fingerprint import compute_fingerprint, record_fingerprint, record_signatures, verify_fingerprint
from .kernels.gptq_linear import GPTQLinear, register_gptq_linear
from .layer import with_mixed_batch
from .original import OriginalWeights
from .residual import backend_for, is_supported, prepare_model, registered
from .residual.norms import check_original_norms
from .residual.probe import repacks_on_first_forward

logger = logging.getLogger(__name__)


def decoder_blocks_path(model: nn.Module) -> str:
    """Dotted path of the model's decoder-block ``ModuleList``: the longest one holding linears that no
    other such list holds (a MoE block's list of experts, often longer, sits inside one), inside the
    language decoder where transformers names one (``get_decoder()``: a vision-language model's vision
    tower may hold more blocks than its language model, Qwen2.5-VL-7B's 32 against 28)."""
    lists = {name: len(module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0
             and any(isinstance(m, nn.Linear) or is_supported(m) for m in module[0].modules())}
    scope = _decoder_path(model)
    inside = {n: k for n, k in lists.items() if scope is not None and (not scope or n.startswith(f"{scope}."))}
    lists = inside or lists
    outer = [n for n in lists if not any(n.startswith(f"{o}.") for o in lists if o != n)]
    best = max(((lists[n], n) for n in outer), key=lambda c: c[0], default=None)  # the first of equal length
    if best is None:
        _raise_refusal(model)
        raise ValueError("Could not find the decoder blocks (a ModuleList of layers with linears); set target_modules.")
    parent = best[1].rpartition(".")[0]
    siblings = [n for n in outer if n != best[1] and n.rpartition(".")[0] == parent and lists[n] == best[0]]
    if siblings:  # XLM / FlauBERT: transformer.attentions[i] and transformer.ffns[i], no module per layer
        raise ValueError(
            f"{type(model).__name__} keeps the parts of each layer in parallel lists ({', '.join([best[1], *siblings])}) "
            "instead of one module per decoder block; EoRA walks decoder blocks one at a time and cannot compensate "
            "this model."
        )
    return best[1]


def _raise_refusal(model: nn.Module, prefix: str = "") -> None:
    """Where no layer is supported: the back-ends' reason for the first layer one of them refuses (a kernel that
    quantizes activations, a layer with gptqmodel's own adapter, ...), as the error, rather than "none found"."""
    for name, module in model.named_modules():
        if any(hasattr(b, "refusal") and b.refusal(module) for b in registered()):
            backend_for(module, prefix + name)  # raises UnsupportedModuleError with the reason


def _decoder_path(model: nn.Module) -> Optional[str]:
    """Where transformers' ``get_decoder()`` puts the language decoder (``""``: the model itself), or None."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - a model whose get_decoder does not apply
        return None
    if not isinstance(decoder, nn.Module):
        return None
    return next((name for name, m in model.named_modules() if m is decoder), None)


def default_target_modules(model: nn.Module, layers: Union[int, list[int], None] = None) -> str:
    """A regex matching every supported linear inside the decoder blocks (not the LM head); with
    ``layers`` (``EoRAConfig.layers_to_transform``: PEFT applies it to lists of targets only), inside
    those blocks only.

    In a model that holds compressed linears (GPTQ, AWQ, …), the float ``nn.Linear`` layers beside
    them — MoE routers and shared-expert gates, layers the quantizer skipped — carry no compression
    residual and are left out (logged); name them in ``target_modules`` to compensate them anyway.
    A model of float linears only (pruned or fake-quantized: the ``dense`` back-end) keeps them all.
    """
    path = decoder_blocks_path(model)
    blocks = model.get_submodule(path)
    kinds: dict[str, set[str]] = {}  # the base layers' names (also when adapters already wrap them) → back-ends
    every: set[str] = set()  # every submodule's name: a pattern must match none but the chosen layers
    for block in blocks:
        for name, m in block.named_modules():
            if name and not any(part.startswith("lora_") for part in name.split(".")):
                every.add(_unwrapped(name))
                if is_supported(m):
                    kinds.setdefault(_unwrapped(name), set()).add(backend_for(m).name)
    if not kinds:
        _raise_refusal(blocks, prefix=f"{path}.")
        raise ValueError(f"No supported linear layer inside {path}; set target_modules explicitly.")
    compressed = sorted(s for s, names in kinds.items() if names != {"dense"})
    suffixes = compressed or sorted(kinds)
    if compressed and len(compressed) < len(kinds):
        logger.info(
            "EoRA leaves out the float linears beside the compressed ones (no compression residual): %s. Name them "
            "in target_modules to compensate them too.", ", ".join(sorted(set(kinds) - set(compressed))),
        )
    if layers is None:
        index = r"\d+"
    else:
        chosen = sorted({int(i) for i in ([layers] if isinstance(layers, int) else layers)})
        outside = [i for i in chosen if not 0 <= i < len(blocks)]
        if not chosen or outside:
            raise ValueError(f"EoRAConfig.layers_to_transform={layers!r} names no decoder block of this model "
                             f"({len(blocks)} blocks, numbered 0–{len(blocks) - 1}): {outside or 'none given'}.")
        index = f"({'|'.join(map(str, chosen))})"
    return rf"(.*\.)?{re.escape(path)}\.{index}\.({'|'.join(_alternatives(suffixes, every))})"


def _alternatives(chosen: list[str], every: set[str]) -> list[str]:
    """Regex alternatives for the ``chosen`` layer names: a MoE's ``experts.0.gate_proj`` …
    ``experts.127.gate_proj`` as one alternative with the index as ``\\d+``, where that form matches no
    name of ``every`` (the block's submodules) that was not chosen: a float expert the quantizer skipped
    stays out, and so does the activation between two linears of a ``Sequential`` (CTRL's ``ffn.0``,
    ``ffn.1`` = ReLU, ``ffn.2``)."""
    left_out = [name for name in every if name not in set(chosen)]
    out: dict[str, None] = {}
    for name in chosen:
        form = index_pattern(name)
        out[form if not any(re.fullmatch(form, other) for other in left_out) else re.escape(name)] = None
    return list(out)


def _unwrapped(name: str) -> str:
    """``mlp.down_proj.base_layer`` → ``mlp.down_proj``: the name the layer had before PEFT wrapped it."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


class EoRAModel(LoraModel):
    """LoRA tuner that computes EoRA factors in ``_post_injection_hook`` when the config asks."""

    prefix: str = "lora_"

    def __init__(self, model: nn.Module, config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        if isinstance(config, EoRAConfig) and not config.init_eora and config.adapter_bits != 16:
            # PeftModel passes {name: config}; a bare config comes from inject_adapter_in_model, which is how
            # transformers' model.load_adapter loads: it then reads the weights itself and would skip the codes
            raise ValueError(
                f"This EoRA adapter stores int{config.adapter_bits} factors (adapter_bits={config.adapter_bits}), which "
                "only peft-eora's PEFT loading path unpacks: load it with peft.PeftModel.from_pretrained(model, path) "
                "(after import peft_eora) rather than transformers' model.load_adapter, or export a float LoRA with "
                "peft_eora.export_lora."
            )
        try:
            with kept_requires_grad(model):  # PEFT freezes the base while injecting
                super().__init__(model, config, adapter_name, **kwargs)
        except BaseException:
            remove_adapter_layers(model, adapter_name)  # a failed computation hands the caller's model back as it was
            raise
        self._eora_initialised = True  # from now on inject_adapter runs the hooks itself (add/load_adapter)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's injection; for adapters added later (``add_adapter``, ``load_adapter``) with EoRA's hooks too.

        PEFT runs ``_pre_injection_hook``/``_post_injection_hook`` only for the tuner's first adapter;
        without this a second EoRA adapter would be neither checked against the base nor computed.
        """
        later = getattr(self, "_eora_initialised", False)
        if later:
            self._pre_injection_hook(model, self.peft_config[adapter_name], adapter_name)
        with kept_requires_grad(model):
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            if later:
                try:
                    self._post_injection_hook(model, self.peft_config[adapter_name], adapter_name)
                except BaseException:
                    remove_adapter_layers(model, adapter_name)  # PEFT's add_adapter drops only the config
                    raise

    def _pre_injection_hook(self, model: nn.Module, config: EoRAConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        if isinstance(config, EoRAConfig):
            # computing writes into the config (init_eora=False, stats, fingerprint, targets; also when deferred
            # to initialize_eora_weights): into the model's own copy, so that the caller's config, reused, computes
            # again (it gave a zero adapter, or was checked against the first model's base)
            config = self.peft_config[adapter_name] = own_copy(config)
        prepare_for_eora(model, config, adapter_name)

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        """PEFT's LoRA layer for ``target``; on GPTQ/AWQ bases one that also serves mixed batches."""
        return with_mixed_batch(LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs))

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of this adapter's entries; int8/int4 codes + scales when ``adapter_bits`` < 16."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return pack_adapter_state_dict(out, getattr(config, "adapter_bits", 16))

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Dequantize saved int8/int4 factors to their grid values, then PEFT's key remapping."""
        if is_packed(state_dict):
            state_dict = unpack_adapter_state_dict(state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def _post_injection_hook(self, model: nn.Module, config: EoRAConfig, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        if not getattr(config, "init_eora", False):
            return
        if config.original_model is None or (config.calibration is None and config.method != "svd"):
            warnings.warn(
                "EoRAConfig has no original_model/calibration: the adapter starts as a zero update. Compute it with "
                "peft_eora.initialize_eora_weights(model, original_model=..., calibration=...).",
                stacklevel=2,
            )
            return
        # PEFT creates the factors in the base layer's dtype (float16 on GPTQ layers) and upcasts them only
        # after this hook: upcast first, so the factors are stored at the precision they were computed in
        # (unless the caller asked for the base dtype: get_peft_model(..., autocast_adapter_dtype=False))
        self._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=AUTOCAST_ADAPTER_DTYPE.get())
        _initialize(model, config, adapter_name, config.original_model, config.calibration)


def record_combination(tuner: Any, adapters: list[str], weights: list[float], adapter_name: str,
                       combination_type: str) -> None:
    """After PEFT's ``add_weighted_adapter`` (on EoRA's tuner, or a LoRA model an EoRA adapter joined): PEFT copies the
    first adapter's config, so an EoRA combination would carry that adapter's statistics (and, its factors differing
    from the recorded ones, be saved as that adapter "fine-tuned"). It records what it combines instead, and its own
    factors' signature (trained later, it is saved as fine-tuned).

        >>> model.add_weighted_adapter(["c4", "gsm8k"], [0.5, 0.5], "mix", combination_type="cat")
        >>> model.peft_config["mix"].eora_stats["combination"]["adapters"]     # ['c4', 'gsm8k']
    """
    config = tuner.peft_config.get(adapter_name)
    if not isinstance(config, EoRAConfig):
        return
    config.eora_stats = {"combination": {
        "adapters": list(adapters), "weights": [float(w) for w in weights],
        "combination_type": "linear" if len(adapters) == 1 else combination_type,  # PEFT's rule
    }}
    record_signatures(tuner, adapter_name, config.eora_stats)
    config.fine_tuned = False
    config.calibration = None  # each combined adapter's own: in their configs


def own_copy(config: EoRAConfig) -> EoRAConfig:
    """A copy of ``config`` whose fields can be written without touching the caller's (containers copied; the
    calibration spec, only read, shared)."""
    new = copy.copy(config)
    for key, value in writable_fields(config).items():
        setattr(new, key, value)
    return new


#: Base-layer residual back-ends whose modules move between devices with ``.to()`` unchanged
#: (execution_device="auto" offloads only such models; others compute where they are).
MOVABLE_BACKENDS = ("dense", "gptq")


def prepare_for_eora(model: nn.Module, config: Any, adapter_name: str) -> None:
    """What an EoRA adapter needs before PEFT injects it, in any tuner (EoRA's, or a LoRA model it joins): our packed
    GPTQ layers registered with PEFT, the base prepared (compressed-tensors decompressed), a loaded adapter's base
    fingerprint checked, EoRA's default targets. Plain LoRA configs get the first two only."""
    if any(isinstance(m, GPTQLinear) for m in model.modules()):
        register_gptq_linear(config)  # PEFT wraps our packed GPTQ layers like gptqmodel's
    prepare_model(model)  # e.g. decompress a compressed-tensors model, as its first forward would
    if isinstance(config, EoRAConfig):
        if not getattr(config, "init_eora", False):  # loading computed factors: same base?
            refuse_merged(model, "Checking an EoRA adapter's base")
            verify_fingerprint(model, config, adapter_name)
        if config.target_modules is None and not config.target_parameters:
            config.target_modules = default_target_modules(model, config.layers_to_transform)
            # the blocks are in the pattern now; PEFT refuses layers_to_transform beside a pattern on loading
            config.layers_to_transform = config.layers_pattern = None
            logger.info("EoRA targets: %s", config.target_modules)



def resolve_execution_device(model: nn.Module, targets: list, choice: Optional[str] = "auto") -> Optional[torch.device]:
    """The device decoder blocks are moved to for their visit, or None to compute in place.

    ``"auto"``: CUDA when the model's tensors are all on the CPU (no accelerate dispatch), a GPU
    exists and every target layer is of a kind that moves as it is (dense, GPTQ); ``None``: in
    place; anything else: that device.
    """
    if choice is None or choice == "none":
        return None
    if choice != "auto":
        return torch.device(choice)
    if not torch.cuda.is_available():
        return None
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        return None  # accelerate placed it: blocks compute where their hooks say
    if any(p.device.type != "cpu" for p in model.parameters()):
        return None
    from .residual import backend_for

    kinds = {backend_for(t.base, t.name).name for t in targets}
    if not kinds <= set(MOVABLE_BACKENDS):
        logger.info("execution_device='auto': %s layers stay on the CPU (offload handles %s)", sorted(kinds),
                    MOVABLE_BACKENDS)
        return None
    return torch.device("cuda")


def resolve_forward_dtype(model: nn.Module, choice: Optional[str], device: Optional[torch.device]) -> Optional[torch.dtype]:
    """The autocast dtype of the calibration forwards for ``EoRAConfig.forward_dtype`` (None: none).

    ``"auto"`` picks bfloat16 only where it is a plain speed-up: the model computes in float32 and
    the device (``device``, else the model's) multiplies bfloat16 natively (CUDA with bf16, or a CPU
    whose oneDNN has bf16 kernels: AVX512-BF16 / AMX). Measured on the 135M demo model (2-core Xeon
    with AMX): a forward of the 30 blocks 2.5× faster (4.87 → 1.97 s per 4096 tokens), the whole
    EoRA step 85 → 77 s, recovery perplexities within 0.06 % (``benchmarks/recovery.py``).
    """
    if choice is None or choice == "model":
        return None
    locking = next((m for m in model.modules() if repacks_on_first_forward(m)), None)
    if locking is not None:  # autocast would set such a layer up for the autocast dtype, for good
        if choice != "auto":
            raise ValueError(
                f"forward_dtype={choice!r}: gptqmodel's {type(locking).__name__} sets itself up for the dtype of its "
                "first inputs and refuses any other after it, so calibration forwards under autocast would leave the "
                "model unusable in its own dtype. Load the model in that dtype instead, or leave forward_dtype unset.")
        logger.info("forward_dtype='auto': no autocast (%s keeps the dtype of its first inputs)", type(locking).__name__)
        return None
    if choice != "auto":
        return getattr(torch, choice)
    params = [p for p in model.parameters() if p.is_floating_point() and p.device.type != "meta"]
    if not params or params[0].dtype != torch.float32:
        return None
    dev = device if device is not None else params[0].device
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if dev.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
        except (AttributeError, RuntimeError):  # a torch build without oneDNN
            return None
    return None


def _run_signature(model: nn.Module, config: EoRAConfig, adapter_name: str, batches: list,
                   base: str, original: OriginalWeights, forward_dtype: Optional[torch.dtype]) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (models, data, settings, ranks); ``base``: the base
    fingerprint's digest, taken before any forward; ``forward_dtype``: what ``config.forward_dtype`` resolved to."""
    import hashlib

    from ._version import __version__

    h = hashlib.sha256()
    for b in batches:  # the batches as cut (their shapes), not only the tokens: the saved inputs are per batch
        for key in ("input_ids", "attention_mask"):
            if key in b:
                h.update(f"{key}{tuple(b[key].shape)}".encode())
                h.update(b[key].detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    _, targets = find_targets(model, adapter_name)
    allocation = getattr(config, "rank_allocation", "uniform")
    return {
        "peft_eora_version": __version__,
        "base": base,
        # the first rows of every original weight: finished blocks of another original must not be kept
        "original": original.digest([t.name for t in targets]),
        "calibration": h.hexdigest(),
        "method": config.method,
        "damping": config.damping,
        "eig_rtol": config.eig_rtol,
        "sequential": config.sequential,
        "value_weighting": getattr(config, "value_weighting", "attention"),
        "logit_weighting": getattr(config, "logit_weighting", DEFAULT_LOGIT_WEIGHTING),
        # uniform: the ranks; allocated: what the allocation follows from (taken before it runs), its settings and
        # budget: the configured ranks' parameters on a first run, recorded in rank_budget by it (so a finished run,
        # whose layers hold the allocated ranks, is recomputed against its folder too)
        "ranks": ({t.name: t.rank for t in targets} if allocation == "uniform" else sorted(t.name for t in targets)),
        "rank_allocation": [allocation, getattr(config, "rank_min", None), getattr(config, "rank_max", None),
                            None if allocation == "uniform" else (
                                config.rank_budget if getattr(config, "rank_budget", None) is not None
                                else sum(t.rank * sum(t.shape) for t in targets))],
        # the stored lora_B is the factor over the layer's scaling (lora_alpha, alpha_pattern, use_rslora), and
        # adapter_bits decides how the factors are rounded: finished blocks restored at another are wrong
        "scalings": {t.name: float(t.layer.scaling[adapter_name]) for t in targets},
        "adapter_bits": int(getattr(config, "adapter_bits", 16)),
        # the fingerprint ignores the precision (one checkpoint in float32 or bfloat16 is one base), the activations
        # and factors do not: finished blocks of a float32 run must not continue in bfloat16
        "dtypes": sorted({str(t.dtype) for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}),
        # a resumed run's forwards must keep the precision of the interrupted one's ("auto" as resolved here)
        **({"forward_dtype": str(forward_dtype)} if forward_dtype is not None else {}),
    }


def _initialize(
    model: nn.Module,
    config: EoRAConfig,
    adapter_name: str,
    original_model: Union[str, nn.Module, OriginalWeights],
    calibration: CalibrationData,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    times: Any = None,
) -> CompensationStats:
    refuse_merged(model, "Computing EoRA factors")
    # other adapters on the model must not feed the calibration passes; a failure keeps earlier factors
    with only_active(model, adapter_name), kept_on_failure(model, config, adapter_name):
        return _compute(model, config, adapter_name, original_model, calibration, tokenizer, batch_size, progress,
                        times)


def _compute(
    model: nn.Module,
    config: EoRAConfig,
    adapter_name: str,
    original_model: Union[str, nn.Module, OriginalWeights],
    calibration: CalibrationData,
    tokenizer: Any,
    batch_size: int,
    progress: bool,
    times: Any = None,
) -> CompensationStats:
    original = OriginalWeights.open(original_model)
    check_original_norms(model, original)  # another model, or a raw original of a smoothed one: refused before any work
    base = compute_fingerprint(model)  # before any forward: gptqmodel's CPU kernels repack on their first one
    if config.method == "svd":  # the plain-SVD baseline reads weights only
        batches = []
    else:
        if tokenizer is None and not _is_token_data(calibration):
            tokenizer = _load_tokenizer(calibration, original_model, model)
        context = context_length(model)
        batches = as_batches(calibration, tokenizer, batch_size=batch_size, max_text_tokens=context)
        batches = check_vocabulary(batches, _vocabulary_size(model))
        check_context(batches, context, windows=isinstance(calibration, (CalibrationConfig, Mapping))
                      and not is_token_mapping(calibration) and text_rows(calibration) is None)
    _, targets = find_targets(model, adapter_name)
    device = resolve_execution_device(model, targets, getattr(config, "execution_device", "auto"))
    if device is not None:
        logger.info("EoRA computes on %s (decoder blocks visit it one at a time)", device)
    forward_dtype = resolve_forward_dtype(model, getattr(config, "forward_dtype", None), device)
    value_weighting = getattr(config, "value_weighting", "attention")
    logit_weighting = getattr(config, "logit_weighting", DEFAULT_LOGIT_WEIGHTING)
    if forward_dtype is not None:
        logger.info("calibration forwards under autocast to %s (covariances in float32)", forward_dtype)
    allocation = getattr(config, "rank_allocation", "uniform")
    checkpoint = None
    if getattr(config, "checkpoint_dir", None) and config.method == "svd":
        # the plain-SVD baseline walks no blocks (seconds, no activations): nothing worth resuming, and a
        # manifest left behind would only block the next run in that folder
        logger.info("method='svd' needs no block walk: checkpoint_dir %s is not used", config.checkpoint_dir)
    elif getattr(config, "checkpoint_dir", None):
        from .checkpoint import Checkpoint

        # before the rank allocation: its plan follows from these (configured ranks and allocation settings)
        run = _run_signature(model, config, adapter_name, batches, base.digest, original, forward_dtype)
        checkpoint = Checkpoint(config.checkpoint_dir, run, resume=bool(getattr(config, "resume", False)))
    with checkpoint if checkpoint is not None else contextlib.nullcontext():  # its lock held until the run ends
        plan: Optional[RankPlan] = None
        if allocation != "uniform" and checkpoint is not None and checkpoint.plan is not None:
            plan = RankPlan(**checkpoint.plan)  # the interrupted run's: its spectrum pass is not repeated
            logger.info("rank allocation: the plan saved in %s (%d layers)", config.checkpoint_dir, len(plan.ranks))
        elif allocation != "uniform":
            # statistics pass (uncompensated); "auto" damping is chosen later, per layer: rank with the default ridge
            spectrum_damping = FIXED_DAMPING if config.damping == "auto" else config.damping
            plan = plan_ranks(
                model, adapter_name, original, batches, method=config.method, damping=spectrum_damping,
                eig_rtol=config.eig_rtol, budget=config.rank_budget, min_rank=config.rank_min or 1,
                max_rank=config.rank_max, gain="absolute" if allocation == "spectrum_absolute" else "relative",
                progress=progress, device=device, times=times, forward_dtype=forward_dtype,
                value_weighting=value_weighting, logit_weighting=logit_weighting,
            )
            if checkpoint is not None:
                checkpoint.save_plan(dataclasses.asdict(plan))
        if plan is not None:
            apply_ranks(model, config, adapter_name, plan.ranks)
            config.rank_budget = plan.budget  # recorded: a recomputation keeps this budget, not the allocated ranks
        stats = compensate(
            model,
            adapter_name,
            original,
            batches,
            method=config.method,
            damping=config.damping,
            eig_rtol=config.eig_rtol,
            sequential=config.sequential,
            progress=progress,
            device=device,
            checkpoint=checkpoint,
            times=times,
            adapter_bits=config.adapter_bits,
            forward_dtype=forward_dtype,
            value_weighting=value_weighting,
            logit_weighting=logit_weighting,
        )
    if plan is not None:
        stats.allocation = plan.summary()
    quantize_adapter_(model, adapter_name, config.adapter_bits)  # no-op for adapter_bits=16
    config.init_eora = False  # the weights now hold the factors; loading must not recompute
    config.eora_stats = stats.summary()
    record_signatures(model, adapter_name, config.eora_stats)  # tells a fine-tuned copy apart when saved
    record_fingerprint(model, config, base)
    return stats


def apply_ranks(model: nn.Module, config: EoRAConfig, adapter_name: str, ranks: dict[str, int]) -> None:
    """Give each LoRA layer of ``adapter_name`` its rank from ``ranks`` (module name → rank), in place.

        >>> apply_ranks(peft_model.base_model.model, config, "default", plan.ranks)

    Layers whose rank changes get fresh ``lora_A``/``lora_B`` (``B`` zero: a zero update until
    computed) on the old device/dtype; each layer keeps its scale (``lora_alpha/r``, or
    ``/√r`` with rsLoRA), so ``lora_alpha`` is rescaled. ``config.rank_pattern`` and
    ``config.alpha_pattern`` are rewritten with the full module names whose rank/alpha differ
    from ``r``/``lora_alpha``, which is what PEFT reads to rebuild the layers on load.
    """
    _, targets = find_targets(model, adapter_name)
    missing = [t.name for t in targets if t.name not in ranks]
    if missing:
        raise ValueError(f"No rank given for {missing[:3]} ({len(missing)} module(s)).")
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, Union[int, float]] = {}
    for t in targets:
        r_new = int(ranks[t.name])
        layer = t.layer
        use_rslora = bool(layer.use_rslora.get(adapter_name, False))
        alpha = _number(float(layer.scaling[adapter_name]) * (math.sqrt(r_new) if use_rslora else r_new))
        if r_new != int(layer.r[adapter_name]):
            _resize_adapter(layer, adapter_name, r_new, alpha)
        if r_new != config.r:
            rank_pattern[t.name] = r_new
        if alpha != config.lora_alpha:
            alpha_pattern[t.name] = alpha
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern


def _number(x: float) -> Union[int, float]:
    """An integral float as int (JSON- and PEFT-friendly), else rounded to 12 significant digits."""
    rounded = float(f"{x:.12g}")
    return int(rounded) if rounded.is_integer() else rounded


@torch.no_grad()
def _resize_adapter(layer: LoraLayer, adapter_name: str, r: int, alpha: Union[int, float]) -> None:
    old_a, old_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    new_a = nn.Linear(layer.in_features, r, bias=False, device=old_a.weight.device, dtype=old_a.weight.dtype)
    new_b = nn.Linear(r, layer.out_features, bias=old_b.bias is not None, device=old_b.weight.device,
                      dtype=old_b.weight.dtype)
    new_b.weight.zero_()
    if old_b.bias is not None:
        new_b.bias.copy_(old_b.bias)
    new_a.weight.requires_grad_(old_a.weight.requires_grad)
    for p_new, p_old in zip(new_b.parameters(), old_b.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    layer.lora_A[adapter_name], layer.lora_B[adapter_name] = new_a, new_b
    layer.r[adapter_name] = r
    layer.lora_alpha[adapter_name] = alpha
    layer.scaling[adapter_name] = alpha / (math.sqrt(r) if layer.use_rslora.get(adapter_name, False) else r)


def _vocabulary_size(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding (None where it has none that says)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return None


def _is_token_data(calibration: CalibrationData) -> bool:
    """Token ids (no tokenizer needed), not a :class:`CalibrationConfig`, its fields or texts."""
    if text_rows(calibration) is not None:
        return False
    return is_token_mapping(calibration) or not isinstance(calibration, (CalibrationConfig, Mapping))


def _load_tokenizer(calibration: Any, original_model: Any, model: nn.Module):
    from transformers import AutoTokenizer

    named = calibration.get("tokenizer") if isinstance(calibration, dict) else getattr(calibration, "tokenizer", None)
    if named:  # the user's choice: its failure is an error, never a silent switch to another tokenizer
        try:
            return AutoTokenizer.from_pretrained(named)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types here
            raise ValueError(f"CalibrationConfig(tokenizer={named!r}) could not be loaded: {exc}") from exc
    candidates = [original_model] if isinstance(original_model, str) else []
    candidates.append(getattr(getattr(model, "config", None), "_name_or_path", None))
    for name in [c for c in candidates if c]:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - try the next candidate
            logger.debug("no tokenizer at %s: %s", name, exc)
            continue
        logger.info("calibration text tokenized with the tokenizer of %s", name)
        return tokenizer
    # none found: a column of token ids needs none; a text row met later says what to pass
    logger.debug("no tokenizer found for the calibration data (%s)", ", ".join(map(str, candidates)) or "no candidate")
    return None


def initialize_eora_weights(
    peft_model: nn.Module,
    original_model: Union[str, nn.Module, OriginalWeights, None] = None,
    calibration: Optional[CalibrationData] = None,
    adapter_name: str = "default",
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    execution_device: Any = "config",
    checkpoint_dir: Optional[str] = None,
    resume: Optional[bool] = None,
    times: Any = None,
    forward_dtype: Any = "config",
) -> CompensationStats:
    """Compute EoRA factors for ``adapter_name`` of an existing PEFT model, in place.

    ``original_model`` is a checkpoint path/Hub id or an in-memory uncompressed model;
    ``calibration`` is a :class:`CalibrationConfig`, an ``(n, seq_len)`` token tensor, an
    iterable/``DataLoader`` of ``input_ids`` batches, or texts (a list of strings or a
    ``datasets.Dataset`` with a ``"text"`` column: one sample each, padded under a mask). Both
    default to the adapter's config.
    ``execution_device``, ``checkpoint_dir``, ``resume`` and ``forward_dtype`` override the config's
    run choices::

        initialize_eora_weights(model, original, calib, execution_device="cuda",     # model on CPU
                                checkpoint_dir="eora-run", resume=True)             # resumable
        initialize_eora_weights(model, original, calib, forward_dtype="auto")        # bf16 forwards

    ``tokenizer`` turns a :class:`CalibrationConfig`'s texts into tokens (default: its own
    ``tokenizer``, else the original checkpoint's, else the model's); ``batch_size``: calibration
    rows per block forward; ``times`` (a :class:`peft_eora.walker.PhaseTimes`) collects seconds per
    phase. Returns the run's :class:`~peft_eora.compensate.CompensationStats` (per module: rank,
    activation-weighted error before/after, chosen ridge); its summary is kept in the config's
    ``eora_stats`` (saved with the adapter).
    """
    tuner = getattr(peft_model, "base_model", peft_model)
    if not isinstance(tuner, LoraModel):
        raise TypeError("initialize_eora_weights expects a PeftModel (or LoraModel) made with an EoRAConfig.")
    if adapter_name not in tuner.peft_config:
        raise KeyError(f"No adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]
    if not isinstance(config, EoRAConfig):
        raise TypeError(f"Adapter {adapter_name!r} has a {type(config).__name__}; EoRA needs an EoRAConfig.")
    original_model = original_model if original_model is not None else config.original_model
    calibration = calibration if calibration is not None else config.calibration
    if original_model is None or (calibration is None and config.method != "svd"):
        raise ValueError("initialize_eora_weights needs original_model and calibration (in the call or the config).")
    # the run choices given here hold for this call only (a later call without them reads the config's again)
    overrides = {}
    if execution_device != "config":
        overrides["execution_device"] = execution_device
    if checkpoint_dir is not None:
        overrides["checkpoint_dir"] = str(checkpoint_dir)
    if resume is not None:
        overrides["resume"] = bool(resume)
    if forward_dtype != "config":
        overrides["forward_dtype"] = forward_dtype
    kept = {key: getattr(config, key) for key in overrides}
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        config._check_forward_dtype()
        stats = _initialize(tuner.model, config, adapter_name, original_model, calibration, tokenizer, batch_size,
                            progress, times=times)
    finally:
        for key, value in kept.items():
            setattr(config, key, value)
    # what the adapter was computed from, where it can be saved with it (its card and eora_config.json say so)
    if config.original_model is None and isinstance(original_model, (str, os.PathLike)):
        config.original_model = os.fspath(original_model)
    if config.calibration is None and isinstance(calibration, CalibrationConfig):
        config.calibration = calibration
    return stats
