"""AWQ with gptqmodel: quantization, its recorded smoothing scales, the smoothed original EoRA needs,
and a float32 forward for CPUs.

    >>> a4 = quantize_awq(export_original(torch.float32), bits=4, group_size=64)
    >>> original = awq_smoothed_original(a4)          # pass as EoRAConfig(original_model=...)
    >>> model = load_quantized(a4, compute_dtype=torch.float32)   # awq_float32_forward_ applied
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ..embedded import atomic_publish, cache_dir, is_complete, make_temp_dir, remove_stale_temps
from .calibration import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN
from .checkpoints import META_FILE, _cached, awq_dir, source_setting
from .gptqmodel_run import _quantize_with_gptqmodel

logger = logging.getLogger("peft_eora.quantize")

#: norm classes whose weight stores ``γ − 1`` and which gptqmodel's ``apply_scale`` divides as ``γ`` (others, Gemma 3's
#: included, it divides as stored)
_PLUS_ONE_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm")
#: model types whose RMS norms multiply by ``1 + w`` (Gemma 3n and 4 multiply by ``w``)
_PLUS_ONE_MODELS = ("gemma", "gemma2", "gemma3", "gemma3_text")
#: AWQ's per-channel smoothing scales, recorded by :func:`quantize_awq` inside the checkpoint.
AWQ_SCALES_FILE = "peft_eora_awq_scales.safetensors"


def quantize_awq(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    out_dir: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float16,
    batch_size: int = 1,
    device: str = "cpu",
    **kw: Any,
) -> Path:
    """AWQ-quantize the checkpoint at ``model_dir`` with gptqmodel (GEMM layout, zero point);
    return the output folder (``cache_dir()/models/<name>-awq-w<bits>g<group>[-n<N>x<L>]``).

    Same calibration, caching and metadata as :func:`quantize_gptq`
    (``QuantizeConfig(method="awq", format="gemm", sym=False, bits, group_size, **kw)``).
    gptqmodel's AWQ kernels hold float16/bfloat16 scales only, so ``dtype`` must be one of
    those (float32 is refused before any work). ~3 min for the 2-layer test model on 2 CPU cores.

    AWQ *rescales the float model* before quantizing it: per input channel, a norm's weight is
    divided by ``s`` and the following linears' columns multiplied by it (or a linear's rows
    divided, e.g. ``up_proj`` for ``down_proj``). The quantized linears therefore approximate
    ``diag(1/s_out)·W·diag(s_in)``, not ``W``. The scales are recorded here
    (``peft_eora_awq_scales.safetensors``) so that :func:`awq_smoothed_original` can write the
    original model in the same coordinates; pass *that* as EoRA's ``original_model``.

    >>> q4 = quantize_awq(export_original(torch.float32, num_layers=2), bits=4, group_size=64)
    >>> original = awq_smoothed_original(q4)            # what EoRA must compare against
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"AWQ quantization needs dtype float16 or bfloat16 (gptqmodel's AWQ kernels), got {dtype}.")
    model_dir = Path(model_dir)
    final = Path(out_dir) if out_dir is not None else awq_dir(model_dir, bits, group_size, num_samples, seq_len)
    if _cached(final, "awq", bits, group_size, {**source_setting(model_dir), "num_samples": num_samples,
                                                "seq_len": seq_len, "dtype": dtype, **kw}):
        return final
    config_file = model_dir / "config.json"
    if group_size > 0 and config_file.is_file():  # AWQ stores one zero/scale row per whole group
        config = json.loads(config_file.read_text())
        dims = {k: config[k] for k in ("hidden_size", "intermediate_size") if isinstance(config.get(k), int)}
        bad = {k: v for k, v in dims.items() if v % group_size}
        if bad:
            raise ValueError(
                f"AWQ group_size={group_size} must divide every linear's input size; {model_dir.name} has {bad}. "
                f"Use a divisor of {math.gcd(*dims.values())} (e.g. 64 for SmolLM2)."
            )

    def describe(qcfg: Any) -> dict[str, Any]:
        return {"sym": qcfg.sym, "zero_point": not qcfg.sym, "desc_act": qcfg.desc_act,
                "true_sequential": qcfg.true_sequential}

    qcfg_kw = {"method": "awq", "format": "gemm", "sym": False}
    qcfg_kw.update({k: kw.pop(k) for k in list(kw) if k in qcfg_kw})
    return _quantize_with_gptqmodel(
        model_dir, final, "awq", bits, group_size, num_samples, seq_len, dtype, batch_size, device, qcfg_kw, kw,
        describe, recorder=_AwqScaleRecorder,
    )


class _AwqScaleRecorder:
    """Context manager around gptqmodel's AWQ ``quantize()`` that records every ``apply_scale``
    call (which norm/linear was divided by which scales, which linears multiplied) with full
    module names; ``save(folder)`` writes them to :data:`AWQ_SCALES_FILE`."""

    def __init__(self, gptq_model: Any) -> None:
        self.model = gptq_model.model  # the transformers model being quantized
        self.records: list[dict[str, Any]] = []

    def __enter__(self) -> "_AwqScaleRecorder":
        from gptqmodel.looper import awq_processor

        self._module = awq_processor
        self._original = awq_processor.apply_scale

        def recording_apply_scale(module: torch.nn.Module, scales_list: list, input_feat_dict: Any = None) -> Any:
            self._record(module, scales_list)
            return self._original(module, scales_list, input_feat_dict=input_feat_dict)

        awq_processor.apply_scale = recording_apply_scale
        return self

    def __exit__(self, *exc: Any) -> None:
        self._module.apply_scale = self._original

    def _record(self, block: torch.nn.Module, scales_list: list) -> None:
        prefix = next((n for n, m in self.model.named_modules() if m is block), None)
        if prefix is None:
            raise RuntimeError("AWQ scaled a module outside the model being quantized; cannot record its scales.")
        for prev_name, layer_names, scales, _loss in scales_list:
            prev = block.get_submodule(prev_name)
            if isinstance(prev, torch.nn.Linear):
                kind = "linear"
            elif any(c.__name__ in _PLUS_ONE_NORMS for c in type(prev).__mro__):
                kind = "gemma_norm"  # weight stored as (γ − 1): gptqmodel divides γ for these classes only
            elif hasattr(prev, "weight") and "norm" in type(prev).__name__.lower():
                kind = "norm"
            else:
                raise NotImplementedError(
                    f"AWQ scaled {type(prev).__name__} {prefix}.{prev_name} (an activation function): EoRA's smoothed "
                    "original supports norm→linear and linear→linear scaling only (Llama-family models)."
                )
            self.records.append({
                "prev": f"{prefix}.{prev_name}" if prefix else prev_name,
                "kind": kind,
                "layers": [f"{prefix}.{n}" if prefix else n for n in layer_names],
                "scales": scales.detach().to("cpu", torch.float32).clone(),
            })

    def save(self, folder: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        tensors = {f"{i}": r["scales"] for i, r in enumerate(self.records)}
        index = [{k: r[k] for k in ("prev", "kind", "layers")} for r in self.records]
        save_file(tensors, str(folder / AWQ_SCALES_FILE), metadata={"records": json.dumps(index)})
        return {"awq_scales": {"file": AWQ_SCALES_FILE, "groups": len(self.records)}}


def read_awq_scales(awq_path: str | Path) -> list[dict[str, Any]]:
    """The scaling groups recorded by :func:`quantize_awq`: ``[{"prev", "kind", "layers", "scales"}]``
    in the order AWQ applied them. ``FileNotFoundError`` for AWQ checkpoints made elsewhere."""
    from safetensors import safe_open

    path = Path(awq_path) / AWQ_SCALES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{awq_path} has no {AWQ_SCALES_FILE}: its AWQ smoothing scales are unknown, so the original weights "
            "cannot be read from it (awq_smoothed_original(path, original_dir) recovers them from the checkpoint and "
            "its original)."
        )
    with safe_open(str(path), framework="pt") as st:
        index = json.loads(st.metadata()["records"])
        return [{**rec, "scales": st.get_tensor(str(i))} for i, rec in enumerate(index)]


def smooth_state_dict(state: dict[str, torch.Tensor], records: list[dict[str, Any]],
                      done: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
    """Apply AWQ's recorded scalings to a float state dict (in place, float32 math), exactly as
    gptqmodel's ``apply_scale`` does: the model computes the same function, and each linear
    now holds the weight its AWQ-quantized counterpart approximates. ``done``: the state is one
    shard of a checkpoint; weights it does not hold are skipped and those it rescaled added to
    ``done`` (:func:`scaled_weights` lists what every shard together must cover).

    >>> smooth_state_dict(state, read_awq_scales(q4))
    """
    def has(key: str) -> bool:
        if key in state:
            if done is not None:
                done.add(key)
            return True
        if done is None:
            raise ValueError(f"The original checkpoint has no {key}, which AWQ rescaled; is it the model AWQ quantized?")
        return False

    def scaled(key: str, f: Any) -> None:
        if key in state:  # optional tensors (biases) are rescaled where they exist
            state[key] = f(state[key].double()).to(state[key].dtype)

    for rec in records:
        s = rec["scales"].double()
        prev = rec["prev"]
        if rec["kind"] == "linear":
            if has(f"{prev}.weight"):
                w = state[f"{prev}.weight"]
                w[-s.numel():] = (w[-s.numel():].double() / s[:, None]).to(w.dtype)
            scaled(f"{prev}.bias", lambda b: b / s)
        else:
            if has(f"{prev}.weight"):
                scaled(f"{prev}.weight", (lambda g: (g + 1) / s - 1) if rec["kind"] == "gemma_norm" else (lambda g: g / s))
            scaled(f"{prev}.bias", lambda b: b / s)
        for layer in rec["layers"]:
            if not has(f"{layer}.weight"):
                continue
            if state[f"{layer}.weight"].shape[1] != s.numel():
                raise ValueError(f"AWQ scales of length {s.numel()} do not fit {layer} of shape "
                                 f"{tuple(state[f'{layer}.weight'].shape)}.")
            scaled(f"{layer}.weight", lambda w: w * s[None, :])
    return state


def scaled_weights(records: list[dict[str, Any]]) -> set[str]:
    """The weight tensors that :func:`smooth_state_dict` rescales for ``records``."""
    return {f"{r['prev']}.weight" for r in records} | {f"{n}.weight" for r in records for n in r["layers"]}


def awq_smoothed_original(
    awq_path: str | Path, original_dir: str | Path | None = None, out_dir: str | Path | None = None
) -> Path:
    """Write (once, cached as ``<awq name>-<key>-smoothed-original``, the key a hash of both checkpoints' paths and
    files and of the recorded scales, checked again on every cache hit) the original float model with the AWQ
    scales of ``awq_path`` folded in, and return its folder. Checkpoints made elsewhere (AutoAWQ, gptqmodel: no
    recorded scales) have them recovered from the checkpoint and ``original_dir``
    (:func:`~peft_eora.quantize.awq_recover.recover_awq_scales`). Both are local folders (download Hub ids first,
    ``huggingface_hub.snapshot_download``); the original may be sharded (rewritten one shard at a time).

    It computes the same function as the original but its linears live in the AWQ model's
    coordinates, so ``W_smoothed − W_awq`` is the true compression residual: pass this folder
    as ``EoRAConfig(original_model=...)`` for AWQ bases. ``original_dir`` defaults to the
    ``source_model`` recorded by :func:`quantize_awq`.

    >>> get_peft_model(load_quantized(q4), EoRAConfig(r=64, original_model=str(awq_smoothed_original(q4)), ...))
    """
    from safetensors.torch import load_file, save_file

    from .awq_recover import checkpoint_files

    awq_path = Path(awq_path)
    if original_dir is None:
        meta = awq_path / META_FILE
        if not meta.is_file():
            raise ValueError(f"{awq_path} was not made by peft_eora.quantize.quantize_awq: pass the float model it was "
                             "quantized from as original_dir.")
        original_dir = json.loads(meta.read_text())["source_model"]
    original_dir = Path(original_dir)
    scales = awq_path / AWQ_SCALES_FILE
    files = checkpoint_files(original_dir)
    made_from = {  # what the folder is made from: a cached folder of other sources is never handed back
        "source_model": str(original_dir.resolve()), "source_files": _stats(files), **_awq_side(awq_path)}
    key = hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:10]
    final = Path(out_dir) if out_dir is not None else cache_dir() / "models" / f"{awq_path.name}-{key}-smoothed-original"
    if is_complete(final):
        recorded = json.loads((final / "peft_eora_smoothed.json").read_text())
        if {k: recorded.get(k) for k in made_from} != made_from:
            raise ValueError(
                f"{final} holds the smoothed original of {recorded.get('awq_checkpoint')} (from "
                f"{recorded.get('source_model')}), not of {awq_path} from {original_dir} as they are now: pass another "
                "out_dir or delete it."
            )
        return final
    if scales.is_file():
        records = read_awq_scales(awq_path)
    else:
        from .awq_recover import recover_awq_scales

        records = recover_awq_scales(awq_path, original_dir)
    records = _stored_names(records, files)
    remove_stale_temps(final)
    tmp = make_temp_dir(final)
    try:
        for item in original_dir.iterdir():  # config, tokenizer, the shards' index: not weights in other formats
            if (item.is_file() and item.suffix not in _WEIGHT_SUFFIXES and not item.name.startswith(".")):
                shutil.copy2(item, tmp / item.name)
        done: set[str] = set()
        for f in files:  # one shard in memory at a time
            shard = load_file(str(f))
            smooth_state_dict(shard, records, done)
            save_file(shard, str(tmp / f.name), metadata={"format": "pt"})
            del shard
        missing = sorted(scaled_weights(records) - done)
        if missing:
            raise ValueError(f"The original checkpoint {original_dir} has no {', '.join(missing[:3])}, which AWQ "
                             "rescaled; is it the model AWQ quantized?")
        (tmp / "peft_eora_smoothed.json").write_text(json.dumps({
            **made_from, "groups": len(records), "scales": "recorded" if scales.is_file() else "recovered"},
            indent=2) + "\n")
        atomic_publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("AWQ-smoothed original (%d scaling groups) written to %s", len(records), final)
    return final


def _stored_names(records: list[dict[str, Any]], files: list[Path]) -> list[dict[str, Any]]:
    """``records`` with the module names the AWQ run saw (transformers' runtime names: Mixtral's ``mlp.experts.0.
    gate_proj``) turned into the names the original checkpoint stores them under (``block_sparse_moe.experts.0.w1``)."""
    from safetensors import safe_open

    from ..original import checkpoint_aliases

    stored: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            stored += [k[: -len(".weight")] for k in st.keys() if k.endswith(".weight")]
    aliases = checkpoint_aliases(files[0].parent, stored)
    if not aliases:
        return records
    return [{**r, "prev": aliases.get(r["prev"], r["prev"]), "layers": [aliases.get(n, n) for n in r["layers"]]}
            for r in records]


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def _stats(files: list[Path]) -> list[str]:
    """Per file: name, size and a hash of its first and last MiB (a copy or a touch is the same file; new weights
    change the safetensors header at least)."""
    out = []
    for f in files:
        size, h = f.stat().st_size, hashlib.sha256()
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
        out.append(f"{f.name}:{size}:{h.hexdigest()[:16]}")
    return sorted(out)


def _awq_side(awq_path: Path) -> dict[str, Any]:
    """What a smoothed copy records of its AWQ checkpoint (path, recorded scales or checkpoint files)."""
    scales = awq_path / AWQ_SCALES_FILE
    side: dict[str, Any] = {
        "awq_checkpoint": str(awq_path.resolve()),
        "awq_scales_sha256": hashlib.sha256(scales.read_bytes()).hexdigest() if scales.is_file() else None,
    }
    if not scales.is_file():  # made elsewhere: the scales are recovered from the checkpoint and the original
        from .awq_recover import checkpoint_files

        side["awq_checkpoint_files"] = _stats(checkpoint_files(awq_path))
    return side


def awq_float32_forward_(model: torch.nn.Module) -> int:
    """Make every GEMM-layout AWQ layer of ``model`` multiply in float32 (in place); returns the count.

    gptqmodel's ``AwqTorchLinear`` casts float32 inputs to float16 and multiplies in float16,
    which CPUs without float16 matrix units run ~60× slower than float32 (measured here: 2.6 s
    vs 0.05 s for 1024×576 @ 576×1536). This CPU emulation multiplies by the *same* weights
    (the kernel's float16 dequantized values, unpacked once by the ``awq`` residual back-end and
    kept as a float32 copy) in float32; only the float16 rounding of inputs and accumulation
    is gone. The packed buffers are untouched (checkpoints and fingerprints are unchanged).
    ``load_quantized(awq_path, compute_dtype=torch.float32)`` applies it.

    >>> awq_float32_forward_(load_quantized(a4))
    """
    import types

    from ..residual.awq import AWQBackend

    backend = AWQBackend()
    count = 0
    for module in model.modules():
        if backend.matches(module):
            module.forward = types.MethodType(_awq_forward_float32, module)
            count += 1
    return count


def _awq_forward_float32(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from ..kernels.gptq_linear import tensor_stamp
    from ..residual.awq import AWQBackend

    # which tensors, storages and in-place versions: a load_state_dict into the buffers is seen
    key = (*(tensor_stamp(t) for t in (self.qweight, self.qzeros, self.scales)), self.scales.dtype)
    cached = getattr(self, "_peft_eora_w32", None)
    if cached is None or cached[0] != key:
        cached = (key, AWQBackend().dequantize(self).T.contiguous())  # (in, out) float32
        self._peft_eora_w32 = cached
    x_flat = x.reshape(-1, x.shape[-1]).float()
    out = x_flat @ cached[1].to(x.device)
    if self.bias is not None:
        out = out + self.bias.float()
    if getattr(self, "adapter", None):
        out = self.adapter.apply(x=x_flat, out=out)
    return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def awq_original(awq_path: str | Path, original_dir: str | Path) -> Path:
    """``original_dir`` in AWQ checkpoint ``awq_path``'s coordinates: itself where it was smoothed for that checkpoint
    or its norms already match the checkpoint's, else :func:`awq_smoothed_original` of the pair (cached). Both are
    local folders::

        >>> EoRAConfig(original_model=str(awq_original("Llama-3-8B-AWQ", "Llama-3-8B")), ...)
    """
    from ..residual.norms import norm_gap, norm_tolerance
    from .awq_recover import CheckpointTensors

    def norms(folder: Path) -> dict[str, torch.Tensor]:
        tensors = CheckpointTensors(folder)
        found = {key: tensors[key] for key in tensors.where if key.endswith(".weight") and "norm" in key.lower()}
        return {key: t for key, t in found.items() if t.dim() == 1}

    awq_path, original_dir = Path(awq_path), Path(original_dir)
    made = original_dir / "peft_eora_smoothed.json"
    if made.is_file():
        recorded, side = json.loads(made.read_text()), _awq_side(awq_path)
        if {k: recorded.get(k) for k in side} == side:
            return original_dir  # smoothed for this checkpoint (as it is now) already
    ours, theirs = norms(awq_path), norms(original_dir)
    shared = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape]
    model_type = json.loads((awq_path / "config.json").read_text()).get("model_type", "")
    plus_one = model_type in _PLUS_ONE_MODELS  # their norms multiply by 1 + w
    if shared and all(norm_gap(ours[k], theirs[k], plus_one) <= norm_tolerance(ours[k].dtype) for k in shared):
        return original_dir
    smoothed = awq_smoothed_original(awq_path, original_dir)
    logger.info("AWQ base: the original in its coordinates is %s", smoothed)
    return smoothed
