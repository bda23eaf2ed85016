"""Base fingerprint: which quantized model an EoRA adapter was computed against.

An EoRA adapter compensates the error of *one* compressed checkpoint, so loading it onto another
base silently gives wrong outputs. When the factors are computed, a cheap, deterministic
fingerprint of the base is stored in ``EoRAConfig.base_fingerprint``; when the adapter is loaded
(``PeftModel.from_pretrained``), the base being wrapped is fingerprinted again and compared::

    >>> from peft_eora.fingerprint import compute_fingerprint
    >>> fp = compute_fingerprint(qmodel)
    >>> fp.digest                      # 'eora-fp1:3f9c0a...'
    >>> PeftModel.from_pretrained(other_qmodel, "adapter")            # raises BaseMismatchError
    >>> PeftModel.from_pretrained(other_qmodel, "adapter", allow_base_mismatch=True)  # warns, loads

What is hashed (SHA-256 over canonical JSON / float64 bytes), per part:

- ``structure``: every module that owns tensors, by name (PEFT wrappers and adapter modules are
  ignored, so the value is independent of any adapter), its kind (the residual back-end name for
  quantized layers, else the class name) and shapes (logical ``out × in`` for quantized layers).
- ``quantization``: ``bits``, ``group_size``, ``sym``, ``desc_act``, ``quant_method`` of the
  model's ``config.quantization_config`` (``None`` for dense bases).
- ``dense_weights``: 8 evenly spaced values of every tensor of the non-quantized modules
  (embeddings, norms, dense linears), rounded to bfloat16 (version 2), so the same fp16 or bf16
  checkpoint loaded in fp16, bf16 or fp32 gives the same value.
- Offloaded modules (accelerate's ``device_map`` with ``"cpu"``/``"disk"``: ``meta`` tensors, values in the hook)
  are sampled from what their hooks hold (memory, memory-mapped ``.dat``, safetensors slices: only the sampled
  values are read), so an offloaded base has the digest it has loaded.
- ``packed_weights``: 8 evenly spaced values of every tensor of the quantized modules, as stored
  by the loaded kernel (``qweight``, ``scales``, ...), or in the canonical layout the back-end's
  optional ``fingerprint_tensors(module)`` gives for kernels that repack lazily (bitsandbytes on
  AVX512-BF16 CPUs repacks on the first forward).

Kernels that repack at load time (gptqmodel's Marlin, ExLlama) store the same checkpoint in
another layout, so ``packed_weights`` can only be compared between bases loaded with the same
kernel classes (recorded in ``kernels``); across kernels it is skipped with a warning, while
structure, quantization config and dense weights are still checked. gptqmodel's CPU kernels that
repack on their *first forward* (``TorchAtenLinear``, ``TorchFusedLinear``, ``TorchCpuAvx512Linear``)
hold different buffers before and after it: EoRA records the fingerprint before its calibration
forwards, and a base fingerprinted after such a forward has ``packed_weights = "repacked"`` (version 3),
which is reported as not compared rather than as a mismatch. The cost is a few small
index operations per tensor: well under a second for 7B models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Bump when what is hashed changes. Version 1 hashed float samples as stored; version 2 rounds them to
#: bfloat16 first, so a checkpoint loaded in float16, bfloat16 or float32 gives one fingerprint; version 3 leaves
#: out the buffers of gptqmodel CPU kernels once their first forward repacked them (``packed_weights`` is then
#: ``"repacked"``, compared with nothing). Recorded fingerprints of a version listed here are checked by computing
#: that version; others are not compared.
FINGERPRINT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
#: ``packed_weights`` of a base some of whose layers repacked their buffers on a first forward (version 3)
REPACKED = "repacked"
SAMPLES_PER_TENSOR = 8
_QUANT_KEYS = ("quant_method", "bits", "group_size", "sym", "desc_act")
_PARTS = ("structure", "quantization", "dense_weights", "packed_weights")


class BaseMismatchError(ValueError):
    """The adapter was computed against another quantized base than the one it is loaded onto."""


class BaseMismatchWarning(UserWarning):
    """Loading onto another base was allowed (``allow_base_mismatch=True``) or could not be fully checked."""


@dataclass(frozen=True)
class BaseFingerprint:
    """The fingerprint of a (quantized) base model; ``to_dict()`` is what the config stores."""

    digest: str
    structure: str
    quantization: str
    dense_weights: Optional[str]
    packed_weights: Optional[str]
    kernels: list[str] = field(default_factory=list)
    num_modules: int = 0
    model: Optional[str] = None
    version: int = FINGERPRINT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseFingerprint":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a ``PeftModel`` or a PEFT tuner, ``torch.compile``'s wrapper included (else
    ``model`` itself)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    model = getattr(model, "_orig_mod", model)
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    if isinstance(model, BaseTuner):
        model = model.model
    return model


#: where PEFT's ``modules_to_save`` / ``trainable_token_indices`` wrappers keep the module they wrap
_ORIGINAL_PATHS = ("original_module", "token_adapter.base_layer")


def _base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the base as if no adapter were injected (adapter modules skipped,
    ``.base_layer`` removed from the names of PEFT-wrapped layers; a ``modules_to_save`` or trainable-tokens
    wrapper stands for the module it wraps, its trainable copies skipped)."""
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as wrapper_type
    except ImportError:  # an older PEFT
        from peft.utils.other import ModulesToSaveWrapper as wrapper_type
    wrappers: list[str] = []
    for name, module in model.named_modules():
        parts = name.split(".") if name else []
        if any(p.startswith("lora_") for p in parts):
            continue
        if isinstance(module, wrapper_type):
            wrappers.append(name)
            continue
        owner = next((w for w in wrappers if name.startswith(f"{w}.")), None)
        if owner is not None:
            rel = name[len(owner) + 1:]
            path = next((p for p in _ORIGINAL_PATHS if rel == p or rel.startswith(f"{p}.")), None)
            if path is None:  # the adapter's own copy of the module
                continue
            name = owner + rel[len(path):]
            parts = name.split(".")
        yield ".".join(p for p in parts if p != "base_layer"), module


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers held by ``module`` itself (not its children)."""
    tensors = [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None]
    skip = getattr(module, "_non_persistent_buffers_set", set())
    tensors += [(n, b) for n, b in module.named_buffers(recurse=False) if b is not None and n not in skip]
    return sorted(tensors, key=lambda item: item[0])


class _Packed:
    """Stands for the back-end of a quantized layer that EoRA does not read but the fingerprint must still treat as
    one (a gptqmodel GPTQ/AWQ kernel whose buffers are not read, its layer read through its forward by the ``probe``
    back-end: Marlin, ExLlama, TorchAtenLinear, ...)."""


def _kind(module: nn.Module) -> tuple[str, Any]:
    """(kind label, back-end if quantized else None): the residual back-end name, or the class name. gptqmodel's
    GPTQ and AWQ layers are "gptq"/"awq" whatever kernel holds them, so the same checkpoint loaded with another
    kernel differs only in ``packed_weights`` (compared between equal kernels only)."""
    from .residual import registered
    from .residual.gptq import has_gptqmodel_base

    for base, label in (("GPTQQuantLinear", "gptq"), ("AWQuantLinear", "awq")):
        if has_gptqmodel_base(module, base):
            backend = next((b for b in registered() if b.name == label and b.matches(module)), _Packed())
            return label, backend
    for backend in registered():
        if backend.matches(module):
            return backend.name, (backend if backend.name != "dense" else None)
    return type(module).__name__, None


def repacked(module: nn.Module) -> bool:
    """Whether ``module`` is one of gptqmodel's CPU kernels that rewrite their buffers on their first forward
    (:func:`~peft_eora.residual.probe.repacks_on_first_forward`) and has done so."""
    from .residual.probe import repacks_on_first_forward

    if not repacks_on_first_forward(module):
        return False
    mode = getattr(module, "linear_mode", None)
    return bool(getattr(module, "_cpu_transformed", False)) or str(getattr(mode, "value", mode)).lower() == "inference"


def _quantization_summary(model: nn.Module) -> Optional[dict[str, Any]]:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    summary = {}
    for key in _QUANT_KEYS:
        value = qc.get(key)
        if hasattr(value, "value"):  # enums
            value = value.value
        summary[key] = str(value).lower() if key == "quant_method" and value is not None else value
    return summary


def _sample(tensor: torch.Tensor, k: int, version: int = FINGERPRINT_VERSION,
            offloaded: Optional[Any] = None) -> Optional[torch.Tensor]:
    """``k`` evenly spaced values of ``tensor`` (flat order) as float64, or None if unreadable. From version 2,
    floating-point values are rounded to bfloat16 first: a float16 or bfloat16 checkpoint then samples the same
    whatever dtype it was loaded in (float16 ↔ bfloat16 ↔ float32 casts of its values round to the same
    bfloat16; a float32 checkpoint loaded in float16 may still differ, by double rounding). ``offloaded``: for a
    ``meta`` tensor, a reader of the values accelerate's offload hook holds for it (:func:`_offloaded_reader`)."""
    if tensor.device.type == "meta" and offloaded is None:
        return None
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        # tensor subclasses (torchao quantized weights) cannot be indexed: sample their inner tensors
        inner = [_sample(getattr(tensor, attr), k, version) for attr in tensor.__tensor_flatten__()[0]]
        return None if any(v is None for v in inner) else torch.cat([v.reshape(-1) for v in inner])
    n = tensor.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    flat_idx = torch.tensor(sorted({(i * (n - 1)) // max(k - 1, 1) for i in range(min(k, n))}), dtype=torch.long)
    coords = torch.unravel_index(flat_idx, tensor.shape) if tensor.dim() > 0 else ()
    with torch.no_grad():
        if offloaded is not None:
            values = offloaded([tuple(int(c[i]) for c in coords) for i in range(len(flat_idx))] if coords else [()])
            if values is None:
                return None
            if values.is_floating_point() and tensor.is_floating_point():  # as the hook sets it: in the model's dtype
                values = values.to(tensor.dtype)
        else:
            values = tensor.detach()[coords] if coords else tensor.detach().reshape(1)
        if version >= 2 and values.is_floating_point() and values.dtype.itemsize >= 2:
            values = values.to(torch.bfloat16)
        try:
            return values.to(torch.float64).cpu()
        except (RuntimeError, TypeError):  # exotic packed dtypes: hash the raw bytes instead
            return values.contiguous().view(torch.uint8).to(torch.float64).cpu()


def _offloaded_reader(module: nn.Module, t_name: str) -> Optional[Any]:
    """For a tensor accelerate offloaded (``device_map`` with ``"cpu"``/``"disk"``: ``meta`` on the module, the values
    in its hook's weights map), a function reading the values at given coordinates (a list of index tuples) as a 1-D
    tensor: from memory, a ``.dat`` memory map or a safetensors slice, so only the sampled values are read from disk,
    not the whole weight. None where the module holds no such hook."""
    hook = getattr(module, "_hf_hook", None)
    weights_map = next((getattr(h, "weights_map", None) for h in getattr(hook, "hooks", [hook])
                        if getattr(h, "weights_map", None) is not None), None)
    if weights_map is None:
        return None
    dataset, key = getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "") + t_name
    state = dataset if isinstance(dataset, dict) else getattr(dataset, "state_dict", {})
    if key in state:  # "cpu" offload: in memory
        held = state[key]
        return lambda points: torch.stack([held[p] if p else held.reshape(-1)[0] for p in points]).reshape(-1)
    info = getattr(dataset, "index", {}).get(key)
    if info is None:
        return None

    def read(points: list[tuple[int, ...]]) -> Optional[torch.Tensor]:
        if info.get("safetensors_file") is not None:
            from safetensors import safe_open

            with safe_open(info["safetensors_file"], framework="pt", device="cpu") as f:
                part = f.get_slice(info.get("weight_name", key))
                values = torch.stack([part[tuple(slice(c, c + 1) for c in p)].reshape(()) if p else
                                      part[:].reshape(-1)[0] for p in points])
            return values.to(getattr(torch, info["dtype"])) if "dtype" in info else values
        import numpy as np

        stored = info["dtype"]
        shape = tuple(info["shape"]) or (1,)
        as_np = {"bfloat16": "int16"}.get(stored, "int8" if stored.startswith("float8_") else stored)
        path = os.path.join(dataset.save_folder, f"{key}.dat")
        array = np.memmap(path, dtype=as_np, shape=shape, mode="r")  # only the sampled pages are read
        values = torch.from_numpy(np.array([array[p] if p else array[0] for p in points]))
        return values.view(getattr(torch, stored)) if as_np != stored else values

    return read


def _canonical_hash(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def compute_fingerprint(model: nn.Module, samples_per_tensor: int = SAMPLES_PER_TENSOR,
                        version: int = FINGERPRINT_VERSION) -> BaseFingerprint:
    """Fingerprint the base of ``model`` (a transformers model, ``PeftModel`` or PEFT tuner).

    Deterministic across processes and machines, independent of any injected adapter. ``version``: one of
    ``READABLE_VERSIONS`` (an older one to check a fingerprint an older peft-eora recorded).
    """
    if version not in READABLE_VERSIONS:
        raise ValueError(f"Fingerprint version {version} is not one this peft-eora computes ({READABLE_VERSIONS}).")
    model = _unwrap(model)
    structure: list[Any] = []
    dense = hashlib.sha256()
    packed = hashlib.sha256()
    readable = {"dense": True, "packed": True, "repacked": False}
    kernels: set[str] = set()
    count = 0
    for name, module in _base_modules(model):
        tensors = _own_tensors(module)
        if not tensors:
            continue
        kind, backend = _kind(module)
        quantized = backend is not None
        count += 1
        if quantized:
            kernels.add(type(module).__name__)
            shape: Any = {
                "out": int(getattr(module, "out_features", -1)),
                "in": int(getattr(module, "in_features", -1)),
            }
        else:
            shape = [[t_name, list(t.shape)] for t_name, t in tensors]
        structure.append([name, kind, shape])
        target, key = (packed, "packed") if quantized else (dense, "dense")
        if quantized and version >= 3 and repacked(module):
            readable["repacked"] = True  # its buffers are no longer the checkpoint's: structure and config stand for it
            continue
        if quantized and hasattr(backend, "fingerprint_tensors"):  # layouts that change after loading
            tensors = backend.fingerprint_tensors(module)
        for t_name, t in tensors:
            # offloaded by accelerate (meta here): the values its hook holds, so an offloaded base is told apart
            offloaded = _offloaded_reader(module, t_name) if t.device.type == "meta" else None
            values = _sample(t, samples_per_tensor, version, offloaded)
            if values is None:
                readable[key] = False
                continue
            target.update(f"{name}.{t_name}:{values.numel()};".encode())
            target.update(values.numpy().astype("<f8").tobytes())
    if count == 0:
        raise ValueError("The model holds no parameters or buffers: nothing to fingerprint.")
    parts = {
        "structure": _canonical_hash(structure),
        "quantization": _canonical_hash(_quantization_summary(model)),
        "dense_weights": dense.hexdigest()[:16] if readable["dense"] else None,
        "packed_weights": (REPACKED if readable["repacked"] else packed.hexdigest()[:16]) if readable["packed"] else None,
    }
    digest = hashlib.sha256(f"v{version}|{json.dumps(parts, sort_keys=True)}".encode()).hexdigest()[:16]
    return BaseFingerprint(
        digest=f"eora-fp{version}:{digest}",
        version=version,
        kernels=sorted(kernels),
        num_modules=count,
        model=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        **parts,
    )


def record_fingerprint(model: nn.Module, config: Any, fp: Optional[BaseFingerprint] = None) -> BaseFingerprint:
    """Store the fingerprint of ``model``'s base (``fp``: computed earlier, before any forward) in
    ``config.base_fingerprint``."""
    fp = fp if fp is not None else compute_fingerprint(model)
    config.base_fingerprint = fp.to_dict()
    logger.info("EoRA base fingerprint %s (%d modules, kernels %s)", fp.digest, fp.num_modules, fp.kernels or "dense")
    return fp


def differences(recorded: BaseFingerprint, current: BaseFingerprint) -> tuple[list[str], list[str]]:
    """(parts that differ, parts that could not be compared) between two fingerprints."""
    differ, unchecked = [], []
    for part in _PARTS:
        a, b = getattr(recorded, part), getattr(current, part)
        if a is None or b is None:
            unchecked.append(f"{part} (weights not materialised)")
        elif part == "packed_weights" and a != b and recorded.kernels != current.kernels:
            unchecked.append(f"packed_weights (kernels {recorded.kernels} vs {current.kernels} store them differently)")
        elif part == "packed_weights" and a != b and REPACKED in (a, b):
            unchecked.append("packed_weights (a gptqmodel CPU kernel repacked its buffers on its first forward: they "
                             "compare only before it)")
        elif a != b:
            differ.append(part)
    return differ, unchecked


def _describe(fp: BaseFingerprint) -> str:
    return f"{fp.digest} ({fp.model})" if fp.model else fp.digest


def verify_fingerprint(model: nn.Module, config: Any, adapter_name: str = "default") -> Optional[BaseFingerprint]:
    """Check ``model``'s base against ``config.base_fingerprint``.

    Raises :class:`BaseMismatchError` on a mismatch unless ``config.allow_base_mismatch`` is true
    (then a :class:`BaseMismatchWarning` is emitted). Does nothing for configs without a recorded
    fingerprint. Returns the current fingerprint when one was compared.
    """
    data = getattr(config, "base_fingerprint", None)
    if not data:
        logger.debug("adapter %r has no recorded base fingerprint; not checked", adapter_name)
        return None
    if data.get("version") not in READABLE_VERSIONS:
        warnings.warn(
            f"Adapter {adapter_name!r} records a version-{data.get('version')} base fingerprint; this peft-eora "
            f"computes versions {READABLE_VERSIONS}, so the base could not be checked.",
            BaseMismatchWarning,
            stacklevel=3,
        )
        return None
    recorded = BaseFingerprint.from_dict(data)
    current = compute_fingerprint(model, version=recorded.version)
    differ, unchecked = differences(recorded, current)
    if not differ:
        if unchecked:
            compared = [p.replace("_", " ") for p in _PARTS if not any(u.startswith(p) for u in unchecked)]
            warnings.warn(
                f"EoRA adapter {adapter_name!r}: base matches {recorded.digest} on {', '.join(compared)}, but could "
                f"not compare {', '.join(unchecked)}.",
                BaseMismatchWarning,
                stacklevel=3,
            )
        logger.debug("adapter %r: base fingerprint %s verified", adapter_name, current.digest)
        return current
    message = (
        f"EoRA adapter {adapter_name!r} was computed against the quantized base {_describe(recorded)}, but the model "
        f"it is being loaded onto is {_describe(current)} (differs in: {', '.join(differ)}). EoRA factors compensate "
        "one specific compressed checkpoint; load the adapter onto that base"
    )
    if differ == ["dense_weights"]:  # the same checkpoint in another precision rounds its samples otherwise
        message += (" (if it is that base, loaded in another dtype: a float32 checkpoint loaded in float16 or "
                    "bfloat16 rounds differently; load it in the dtype the adapter was computed on)")
    if getattr(config, "allow_base_mismatch", False):
        warnings.warn(message + ". Loading anyway because allow_base_mismatch=True.", BaseMismatchWarning, stacklevel=3)
        return current
    raise BaseMismatchError(
        message + ", or pass allow_base_mismatch=True (PeftModel.from_pretrained(model, path, "
        "allow_base_mismatch=True), or set it on the EoRAConfig; `peft-eora eval --allow-base-mismatch` on the "
        "command line) to load it anyway."
    )


# ---------------------------------------------------------------------------------------------
# the factors' signature: did they move since EoRA computed them (fine-tuning)?

#: same precision as when recorded: a change of a signature sum beyond this share of ``Σ |t|`` is a change of
#: the factors (float64 sums in another order differ by far less)
FACTOR_CHANGE_RTOL = 1e-7
#: factors cast to a coarser dtype since (model.half()): each entry moves by up to u·|t| (u the dtype's unit
#: roundoff) with a random sign, so a signature sum by about u·‖t‖₂; beyond this many times that, a change
CAST_SIGMAS = 8.0


def factor_signature(model: nn.Module, adapter_name: str) -> list[float]:
    """Sums over every ``lora_A``/``lora_B`` weight of ``adapter_name`` (layers in name order, float64): ``Σ t``,
    ``Σ w₁·t``, ``Σ w₂·t`` with two fixed ±1 patterns ``w`` over each tensor's entries, ``Σ |t|``, ``Σ t²``, and the
    unit roundoff of the coarsest dtype among them. Recorded in ``eora_stats["factor_signature"]`` when EoRA
    computes the factors (empty where a factor is not materialised); :func:`signature_moved` compares it with the
    current factors' when the adapter is saved::

        >>> signature_moved(config.eora_stats["factor_signature"], factor_signature(model, "default"))  # tuned: True
    """
    from peft.tuners.lora import LoraLayer

    layers = sorted((n, m) for n, m in _unwrap(model).named_modules()
                    if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {}))
    return _signature(t for _, layer in layers
                      for t in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight))


def copies_signature(model: nn.Module, adapter_name: str) -> list[float]:
    """:func:`factor_signature`'s sums over the adapter's trainable copies (``modules_to_save``, trainable-token
    deltas), in name order; empty where it has none. Fine-tuning may train those too (an ``lm_head``)."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    from ._peft_compat import auxiliary_copies

    tensors = [t for _, wrapper in sorted((n, m) for n, m in _unwrap(model).named_modules()
                                          if isinstance(m, AuxiliaryTrainingWrapper))
               for t in auxiliary_copies(wrapper).get(adapter_name, [])]
    return _signature(tensors) if tensors else []


#: what a saved adapter's ``eora_stats`` records of its weights, by key: the LoRA factors and the trainable copies
SIGNATURES = (("factor_signature", factor_signature), ("copies_signature", copies_signature))


def record_signatures(model: nn.Module, adapter_name: str, stats: dict[str, Any]) -> None:
    """Record :data:`SIGNATURES` of ``adapter_name``'s weights in ``stats`` (its ``eora_stats``), those that exist:
    compared on save (:func:`peft_eora.saving.mark_fine_tuned`), they tell a fine-tuned copy apart."""
    for key, signature in SIGNATURES:
        values = signature(model, adapter_name)
        if values:
            stats[key] = values


def _signature(tensors: Any) -> list[float]:
    """The sums of :func:`factor_signature` over ``tensors`` (empty if one is not materialised)."""
    sums = torch.zeros(5, dtype=torch.float64)
    roundoff = 0.0
    for t in tensors:
        if t.device.type == "meta":  # not materialised (offloaded): no signature
            return []
        if t.is_floating_point():
            roundoff = max(roundoff, torch.finfo(t.dtype).eps / 2)
        x = t.detach().reshape(-1).to(torch.float64)
        i = torch.arange(x.numel(), device=x.device, dtype=torch.int64)
        signs = [1.0 - 2.0 * (((i * 2654435761 + k * 40503) >> 17) & 1).to(torch.float64) for k in (1, 2)]
        sums += torch.stack([x.sum(), (x * signs[0]).sum(), (x * signs[1]).sum(), x.abs().sum(), x.square().sum()]
                            ).cpu()
    return [float(v) for v in sums] + [roundoff]


def signature_moved(recorded: list[float], now: list[float]) -> bool:
    """Whether the factors moved between two :func:`factor_signature` s: beyond summation round-off at the recorded
    precision, or beyond what a cast can explain where they were cast to a coarser dtype since (a fine-tuning too
    slight to outgrow the cast's rounding then passes unnoticed)."""
    tol = FACTOR_CHANGE_RTOL * max(abs(recorded[3]), abs(now[3]))
    if now[5] > recorded[5]:  # coarser now
        tol += CAST_SIGMAS * now[5] * max(recorded[4], now[4]) ** 0.5
    return any(abs(a - b) > tol for a, b in zip(now[:4], recorded[:4]))
