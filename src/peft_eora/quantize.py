"""Compress a checkpoint (GPTQ or AWQ with gptqmodel; compressed-tensors W4A16/W8A16; bitsandbytes,
HQQ, torchao on the fly) and load the result back through transformers.

gptqmodel and the other libraries are optional and imported lazily (``import peft_eora`` never
imports them)::

    >>> from peft_eora.embedded import export_original
    >>> from peft_eora.quantize import quantize_gptq, quantize_awq, load_quantized, load_and_quantize
    >>> q4 = quantize_gptq(export_original(), bits=4)        # minutes on CPU; cached afterwards
    >>> model = load_quantized(q4)                            # TorchLinear modules on CPU
    >>> a4 = quantize_awq(export_original(), bits=4)          # AwqTorchLinear; see awq_smoothed_original
    >>> nf4 = load_and_quantize(export_original(torch.float32), "bnb-nf4")   # seconds, not cached

Calibration (GPTQ, AWQ): the shipped C4 sample (``data/c4_validation_256.jsonl``), documents
tokenised without special tokens in file order, joined with EOS and cut into consecutive
windows of ``seq_len`` tokens (deterministic; no randomness involved). Quantization settings
are gptqmodel's defaults apart from ``bits`` and ``group_size`` (override any via ``**kw``);
GPTQ weights are quantized from float32 (gptqmodel's own CPU default would first cast them to
bfloat16), AWQ weights from float16 (its kernels need it). Everything that defines the
checkpoint is recorded in ``peft_eora_quantize.json`` next to it.

Output goes to ``cache_dir()/models/<name>-<gptq|awq>-w<bits>g<group>`` (plus ``-n<N>x<L>`` when
the calibration size differs from the default 128×512), written to a temporary sibling folder
and renamed into place; gptqmodel's offload files go to another temporary sibling folder that is
removed afterwards, never into the working directory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import time
from pathlib import Path
from contextlib import nullcontext
from types import ModuleType
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from .embedded import atomic_publish, cache_dir, dtype_name, is_complete, make_temp_dir, remove_stale_temps

logger = logging.getLogger(__name__)

C4_SAMPLE = Path(__file__).resolve().parent / "data" / "c4_validation_256.jsonl"
META_FILE = "peft_eora_quantize.json"
INSTALL_HINT = "pip install 'peft-eora[gptq]'"
DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


def import_gptqmodel() -> ModuleType:
    """Import gptqmodel with an environment that works on small machines.

    gptqmodel sizes its CPU thread pool from ``GPTQMODEL_CPU_WORKERS`` (default: half the
    cores) and refuses a pool smaller than its 2 model-loader workers, so on machines with
    fewer than 4 cores the variable is set to 2 unless the user set it. Note that importing
    gptqmodel prints a banner and sets ``PYTORCH_ALLOC_CONF`` and ``CUDA_DEVICE_ORDER``.
    """
    if (os.cpu_count() or 1) < 4:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    try:
        import gptqmodel
    except ImportError as exc:
        raise ImportError(f"GPTQ quantization and loading need gptqmodel: {INSTALL_HINT}") from exc
    return gptqmodel


def gptq_calibration(
    tokenizer: Any,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    path: str | Path = C4_SAMPLE,
    field: str = "text",
) -> list[dict[str, list[int]]]:
    """Calibration examples for gptqmodel: ``[{"input_ids": [...], "attention_mask": [...]}]``.

    Documents of the JSON-lines file at ``path`` are tokenised in file order (no special
    tokens), joined with the EOS token and cut into ``num_samples`` consecutive windows of
    ``seq_len`` tokens. If the text runs out, fewer windows are returned (with a warning); the
    ragged tail is kept as a last, shorter window when it has at least 10 tokens (gptqmodel's
    minimum).

    >>> examples = gptq_calibration(tokenizer, num_samples=8, seq_len=64)
    """
    if num_samples < 1 or seq_len < 10:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 10, got {num_samples}, {seq_len}")
    eos = tokenizer.eos_token_id
    needed = num_samples * seq_len
    stream: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            text = json.loads(line)[field].replace("\r\n", "\n")
            if stream and eos is not None:
                stream.append(eos)
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(stream) >= needed:
                break
    windows = [stream[i : i + seq_len] for i in range(0, min(len(stream), needed), seq_len)]
    if windows and len(windows[-1]) < min(seq_len, 10):
        windows.pop()
    if len(windows) < num_samples or len(windows[-1]) < seq_len:
        logger.warning(
            "%s holds only %d tokens: %d calibration windows instead of %d×%d",
            path, len(stream), len(windows), num_samples, seq_len,
        )
    return [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]


def _redirect_gptqmodel_logs(folder: Path):
    """Point gptqmodel's per-run layer logs (``./logs/gptq_log_*.log`` relative to the working
    directory) at ``folder``; returns a function that restores the previous location.
    The per-module losses also land in ``quant_log.csv`` inside the checkpoint."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:  # layout of another gptqmodel release: leave it alone
        return lambda: None
    previous = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    if previous is None:
        return lambda: None
    loop_processor._PROJECT_LOG_DIR = folder

    def restore() -> None:
        loop_processor._PROJECT_LOG_DIR = previous

    return restore


def scrub_offload_path(checkpoint: str | Path) -> None:
    """Drop the quantization-time ``offload_to_disk_path`` that gptqmodel writes into
    ``quantize_config.json`` and ``config.json``: gptqmodel would reuse that (temporary) folder
    when it later offloads modules of this checkpoint, e.g. for its own EoRA generation."""
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        path = Path(checkpoint) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        cfg = data.get(key) if key else data
        meta = (cfg or {}).get("meta") or {}
        if meta.pop("offload_to_disk_path", None) is not None:
            path.write_text(json.dumps(data, indent=2, sort_keys=key is not None) + "\n")


def _checkpoint_dir(model_dir: str | Path, method: str, bits: int, group_size: int, num_samples: int, seq_len: int) -> Path:
    name = f"{Path(model_dir).name}-{method}-w{bits}g{group_size}"
    if (num_samples, seq_len) != (DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN):
        name += f"-n{num_samples}x{seq_len}"
    return cache_dir() / "models" / name


def gptq_dir(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Path:
    """Default output folder of :func:`quantize_gptq` for these settings."""
    return _checkpoint_dir(model_dir, "gptq", bits, group_size, num_samples, seq_len)


def awq_dir(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Path:
    """Default output folder of :func:`quantize_awq` for these settings."""
    return _checkpoint_dir(model_dir, "awq", bits, group_size, num_samples, seq_len)


def _cached(final: Path, method: str, bits: int, group_size: int) -> bool:
    """True if ``final`` is a complete checkpoint of these settings; ``ValueError`` if it holds others."""
    if not is_complete(final):
        return False
    meta = json.loads((final / META_FILE).read_text())
    found = (meta.get("method", "gptq"), meta.get("bits"), meta.get("group_size"))
    if found != (method, bits, group_size):
        raise ValueError(
            f"{final} holds a {found[0]} w{found[1]}g{found[2]} checkpoint, not {method} w{bits}g{group_size}: "
            "pass another out_dir or delete it"
        )
    return True


def _quantize_with_gptqmodel(
    model_dir: Path,
    final: Path,
    method: str,
    bits: int,
    group_size: int,
    num_samples: int,
    seq_len: int,
    dtype: torch.dtype,
    batch_size: int,
    device: str,
    qcfg_kw: dict[str, Any],
    user_kw: dict[str, Any],
    describe: Callable[[Any], dict[str, Any]],
    recorder: Callable[[Any], Any] | None = None,
) -> Path:
    """The part shared by :func:`quantize_gptq` and :func:`quantize_awq`: calibrate, quantize with
    gptqmodel into a temporary sibling of ``final``, write ``peft_eora_quantize.json`` and publish.

    ``describe(qcfg)`` returns the method-specific metadata; ``recorder(gptq_model)`` (optional)
    is a context manager around ``quantize()`` whose value has ``save(folder) -> dict`` (extra
    files written into the checkpoint, and their metadata).
    """
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint folder (no config.json)")

    gptqmodel = import_gptqmodel()
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = gptq_calibration(tokenizer, num_samples, seq_len)
    n_tokens = sum(len(e["input_ids"]) for e in examples)

    remove_stale_temps(final)
    tmp = make_temp_dir(final)
    offload = make_temp_dir(final, "offload")
    restore_log_dir = _redirect_gptqmodel_logs(offload / "logs")
    label = f"{method.upper()} w{bits}g{group_size}"
    try:
        qcfg = QuantizeConfig(
            bits=bits, group_size=group_size, offload_to_disk_path=str(offload), **qcfg_kw, **user_kw
        )
        logger.info("%s of %s on %d×≤%d tokens (%d) → %s", label, model_dir, len(examples), seq_len, n_tokens, final)
        start = time.perf_counter()
        model = GPTQModel.load(str(model_dir), qcfg, device=device, dtype=dtype)
        load_s = time.perf_counter() - start
        with recorder(model) if recorder is not None else nullcontext() as recorded:
            model.quantize(examples, batch_size=batch_size, tokenizer=tokenizer)
        quant_s = time.perf_counter() - start - load_s
        model.save(str(tmp))
        scrub_offload_path(tmp)
        tokenizer.save_pretrained(tmp)
        extra = recorded.save(tmp) if recorded is not None else {}
        wall = time.perf_counter() - start
        meta = {
            "method": method,
            "bits": bits,
            "group_size": group_size,
            **describe(qcfg),
            "format": str(getattr(qcfg.format, "value", qcfg.format)),
            "pack_dtype": dtype_name(qcfg.pack_dtype),
            "lm_head_quantized": qcfg.lm_head,
            "user_overrides": {k: repr(v) for k, v in user_kw.items()},
            "quantize_dtype": dtype_name(dtype),
            "source_model": str(model_dir.resolve()),
            "calibration": calibration_metadata(len(examples), seq_len, n_tokens, batch_size),
            **extra,
            "versions": _versions(gptqmodel=getattr(gptqmodel, "__version__", "unknown")),
            "device": device,
            "cpu_count": os.cpu_count(),
            "wall_time_s": {"load": round(load_s, 2), "quantize": round(quant_s, 2), "total": round(wall, 2)},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        atomic_publish(tmp, final)
        logger.info("%s done in %.1f s: %s", label, wall, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        restore_log_dir()
        shutil.rmtree(offload, ignore_errors=True)
    return final


def calibration_metadata(num_samples: int, seq_len: int, tokens: int, batch_size: int) -> dict[str, Any]:
    """How :func:`gptq_calibration` windows were made, for a compressed checkpoint's metadata file."""
    return {
        "data": f"peft_eora/data/{C4_SAMPLE.name}",
        "recipe": "docs in file order, no special tokens, EOS-joined, consecutive windows",
        "num_samples": num_samples,
        "seq_len": seq_len,
        "tokens": tokens,
        "batch_size": batch_size,
    }


def _versions(**extra: str) -> dict[str, str]:
    return {
        **extra,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
    }


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
    if _cached(final, "gptq", bits, group_size):
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
    if _cached(final, "awq", bits, group_size):
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
            elif "gemma" in type(prev).__name__.lower() and "norm" in type(prev).__name__.lower():
                kind = "gemma_norm"  # weight stored as (w - 1)
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
            "cannot be expressed in its coordinates. Quantize with peft_eora.quantize.quantize_awq, which records them."
        )
    with safe_open(str(path), framework="pt") as st:
        index = json.loads(st.metadata()["records"])
        return [{**rec, "scales": st.get_tensor(str(i))} for i, rec in enumerate(index)]


def smooth_state_dict(state: dict[str, torch.Tensor], records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Apply AWQ's recorded scalings to a float state dict (in place, float32 math), exactly as
    gptqmodel's ``apply_scale`` does: the model computes the same function, and each linear
    now holds the weight its AWQ-quantized counterpart approximates.

    >>> smooth_state_dict(state, read_awq_scales(q4))
    """
    def get(name: str, what: str = "weight") -> torch.Tensor:
        key = f"{name}.{what}"
        if key not in state:
            raise KeyError(f"The original checkpoint has no {key}, which AWQ rescaled; is it the model AWQ quantized?")
        return state[key]

    for rec in records:
        s = rec["scales"].double()
        prev = rec["prev"]
        if rec["kind"] == "linear":
            w = get(prev)
            w[-s.numel():] = (w[-s.numel():].double() / s[:, None]).to(w.dtype)
            if f"{prev}.bias" in state:
                state[f"{prev}.bias"] = (state[f"{prev}.bias"].double() / s).to(state[f"{prev}.bias"].dtype)
        else:
            w = get(prev)
            if rec["kind"] == "gemma_norm":
                state[f"{prev}.weight"] = (((w.double() + 1) / s) - 1).to(w.dtype)
            else:
                state[f"{prev}.weight"] = (w.double() / s).to(w.dtype)
            if f"{prev}.bias" in state:
                state[f"{prev}.bias"] = (state[f"{prev}.bias"].double() / s).to(state[f"{prev}.bias"].dtype)
        for layer in rec["layers"]:
            w = get(layer)
            if w.shape[1] != s.numel():
                raise ValueError(f"AWQ scales of length {s.numel()} do not fit {layer} of shape {tuple(w.shape)}.")
            state[f"{layer}.weight"] = (w.double() * s[None, :]).to(w.dtype)
    return state


def awq_smoothed_original(
    awq_path: str | Path, original_dir: str | Path | None = None, out_dir: str | Path | None = None
) -> Path:
    """Write (once, cached next to the AWQ checkpoint as ``<awq name>-smoothed-original``) the
    original float model with the AWQ scales of ``awq_path`` folded in, and return its folder.

    It computes the same function as the original but its linears live in the AWQ model's
    coordinates, so ``W_smoothed − W_awq`` is the true compression residual: pass this folder
    as ``EoRAConfig(original_model=...)`` for AWQ bases. ``original_dir`` defaults to the
    ``source_model`` recorded by :func:`quantize_awq`.

    >>> get_peft_model(load_quantized(q4), EoRAConfig(r=64, original_model=str(awq_smoothed_original(q4)), ...))
    """
    from safetensors.torch import load_file, save_file

    awq_path = Path(awq_path)
    final = Path(out_dir) if out_dir is not None else cache_dir() / "models" / f"{awq_path.name}-smoothed-original"
    if is_complete(final):
        return final
    records = read_awq_scales(awq_path)
    if original_dir is None:
        original_dir = json.loads((awq_path / META_FILE).read_text())["source_model"]
    original_dir = Path(original_dir)
    files = sorted(original_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{original_dir}: expected one model.safetensors file, found {[f.name for f in files]}.")
    state = load_file(str(files[0]))
    smooth_state_dict(state, records)
    remove_stale_temps(final)
    tmp = make_temp_dir(final)
    try:
        for item in original_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and not item.name.startswith("."):
                shutil.copy2(item, tmp / item.name)
        save_file(state, str(tmp / files[0].name), metadata={"format": "pt"})
        (tmp / "peft_eora_smoothed.json").write_text(json.dumps({
            "source_model": str(original_dir.resolve()), "awq_checkpoint": str(awq_path.resolve()),
            "groups": len(records),
        }, indent=2) + "\n")
        atomic_publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("AWQ-smoothed original (%d scaling groups) written to %s", len(records), final)
    return final


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
    (after which ``dequantize_weight()`` returns garbage) and fails when ``in_features`` is not a
    multiple of the group size (SmolLM2's 576 with g128). The default for AWQ, ``"torch_awq"``,
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
    stored = AutoConfig.from_pretrained(str(path)).quantization_config
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
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=compute_dtype or dtype, device_map=str(device), quantization_config=qcfg
    )
    if method == "awq" and compute_dtype == torch.float32:
        awq_float32_forward_(model)
    elif compute_dtype is not None:
        for module in model.modules():
            if isinstance(module, BaseQuantLinear) and module.scales.dtype != dtype:
                module.scales = module.scales.to(dtype)
    return model.eval()


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

    from .residual.awq import AWQBackend

    backend = AWQBackend()
    count = 0
    for module in model.modules():
        if backend.matches(module):
            module.forward = types.MethodType(_awq_forward_float32, module)
            count += 1
    return count


def _awq_forward_float32(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from .residual.awq import AWQBackend

    key = (self.qweight.data_ptr(), self.qzeros.data_ptr(), self.scales.data_ptr(), self.scales.dtype)
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


#: Formats quantized on the fly at load time (data-free, deterministic, seconds): see :func:`load_and_quantize`.
ON_THE_FLY = {
    "bnb-nf4": "bitsandbytes 4-bit NormalFloat (blocksize 64), Linear4bit",
    "bnb-fp4": "bitsandbytes 4-bit float (blocksize 64), Linear4bit",
    "hqq": "HQQ (half-quadratic, zero point + scale per group), HQQLinear, 1-8 bits",
    "torchao": "torchao weight-only int1-8 per group (IntxWeightOnlyConfig; int8: Int8WeightOnlyConfig), nn.Linear",
    "torchao-fp8": "torchao weight-only float8 e4m3, one scale per output row (Float8WeightOnlyConfig), nn.Linear",
}
_ON_THE_FLY_INSTALL = {"bnb-nf4": "bnb", "bnb-fp4": "bnb", "hqq": "hqq", "torchao": "torchao", "torchao-fp8": "torchao"}


def quantize_compressed_tensors(
    model_dir: str | Path,
    bits: int = 4,
    group_size: int = 128,
    out_dir: str | Path | None = None,
) -> Path:
    """Write a compressed-tensors checkpoint of ``model_dir`` (symmetric int ``bits`` weights,
    float activations: the ``W4A16``/``W8A16`` schemes of llm-compressor and vLLM) and return its
    folder (``cache_dir()/models/<name>-ct-w<bits>g<group>``, cached; seconds for SmolLM2-135M).

    Scales are round-to-nearest from each group's absolute maximum (``group_size`` ≤ 0: one per
    output channel), computed by compressed-tensors itself, and the weights are stored as
    ``pack-quantized`` int32 words. Decoder-block linears are quantized; embeddings and the LM head
    stay float. Load it with ``AutoModelForCausalLM.from_pretrained`` (transformers decompresses it
    on the first forward, or when EoRA prepares the model). Symmetric only: transformers 5.24 fails
    to load the packed zero points of asymmetric checkpoints (compressed-tensors 0.20).

    >>> ct4 = quantize_compressed_tensors(export_original(torch.float32), bits=4, group_size=64)
    >>> model = AutoModelForCausalLM.from_pretrained(ct4, dtype=torch.float32)
    """
    if importlib.util.find_spec("compressed_tensors") is None:
        raise ImportError("compressed-tensors checkpoints need compressed-tensors: pip install 'peft-eora[ct]'")
    if bits not in (4, 8):
        raise ValueError(f"compressed-tensors pack-quantized int weights here have 4 or 8 bits, got bits={bits}.")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint folder (no config.json)")
    config = json.loads((model_dir / "config.json").read_text())
    if group_size > 0:
        dims = {k: config[k] for k in ("hidden_size", "intermediate_size") if isinstance(config.get(k), int)}
        bad = {k: v for k, v in dims.items() if v % group_size}
        if bad:
            raise ValueError(f"group_size={group_size} must divide every linear's input size; {model_dir.name} has {bad}.")
    final = Path(out_dir) if out_dir is not None else _checkpoint_dir(
        model_dir, "ct", bits, group_size, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN)
    if _cached(final, "compressed-tensors", bits, group_size):
        return final

    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import decoder_blocks_path

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    blocks = decoder_blocks_path(model)
    strategy = {"strategy": "group", "group_size": group_size} if group_size > 0 else {"strategy": "channel"}
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, **strategy)
    outside = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith(blocks + ".")]
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, ignore=outside)
    apply_quantization_config(model, qconfig, show_progress=False)
    quantized = 0
    with torch.no_grad():
        for module in model.modules():
            if not is_module_quantized(module):
                continue
            w = module.weight.detach()
            grouped = w.unflatten(-1, (w.shape[-1] // group_size, group_size)) if group_size > 0 else w[:, None, :]
            scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
            module.quantization_status = QuantizationStatus.FROZEN
            quantized += 1
    if quantized == 0:
        raise ValueError(f"No linear layer inside {blocks} of {model_dir}: nothing to quantize.")
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    remove_stale_temps(final)
    tmp = make_temp_dir(final)
    try:
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        meta = {
            "method": "compressed-tensors",
            "bits": bits,
            "group_size": group_size,
            "scheme": f"W{bits}A16 symmetric int, {'group ' + str(group_size) if group_size > 0 else 'per channel'}, "
                      "round to nearest (absmax scale)",
            "format": "pack-quantized",
            "quantized_linears": quantized,
            "source_model": str(model_dir.resolve()),
            "versions": _versions(compressed_tensors=compressed_tensors.__version__),
            "wall_time_s": round(time.perf_counter() - start, 2),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        atomic_publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("compressed-tensors W%dA16 g%d of %s: %d linears → %s", bits, group_size, model_dir, quantized, final)
    return final


def load_and_quantize(
    model_dir: str | Path,
    method: str,
    bits: int | None = None,
    group_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    double_quant: bool = False,
) -> torch.nn.Module:
    """Load the float checkpoint at ``model_dir`` and quantize its decoder linears on the fly
    (no calibration data; a few seconds for SmolLM2-135M on a CPU); returns the model (eval).

    ``bits`` defaults to 8 for ``"torchao-fp8"`` and 4 otherwise. ``method`` is one of
    :data:`ON_THE_FLY`: ``"bnb-nf4"``/``"bnb-fp4"`` (bitsandbytes
    ``Linear4bit`` via transformers' ``BitsAndBytesConfig``; ``bits`` must be 4, ``group_size``
    is bnb's blocksize 64, ``double_quant`` quantizes the absmax too), ``"hqq"`` (each
    ``nn.Linear`` in the decoder blocks replaced by ``hqq``'s ``HQQLinear(nbits=bits,
    group_size)``; transformers 5.x has no HQQ loader yet), ``"torchao"`` (transformers'
    ``TorchAoConfig`` with ``IntxWeightOnlyConfig(int<bits>, PerGroup(group_size))``, or
    ``Int8WeightOnlyConfig`` per channel for 8 bits; the CPU layouts of torchao 0.18 — its
    ``Int4WeightOnlyConfig`` needs CUDA kernels), ``"torchao-fp8"`` (``Float8WeightOnlyConfig``:
    float8 e4m3 weights with one scale per output row, activations untouched; ``bits`` must be 8,
    ``group_size`` is unused). The LM head and embeddings stay float.

    >>> model = load_and_quantize(export_original(torch.float32), "bnb-nf4")
    >>> model = load_and_quantize(path, "hqq", bits=3, group_size=64)
    >>> model = load_and_quantize(path, "torchao-fp8", bits=8)
    """
    from transformers import AutoModelForCausalLM

    if method not in ON_THE_FLY:
        raise ValueError(f"Unknown on-the-fly method {method!r}; choose one of {sorted(ON_THE_FLY)}.")
    if bits is None:
        bits = 8 if method == "torchao-fp8" else 4
    extra = _ON_THE_FLY_INSTALL[method]
    library = {"bnb": "bitsandbytes", "hqq": "hqq", "torchao": "torchao"}[extra]
    if importlib.util.find_spec(library) is None:
        raise ImportError(f"{method} needs {library}: pip install 'peft-eora[{extra}]'")
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": str(device)}
    if method.startswith("bnb-"):
        if bits != 4:
            raise ValueError(f"bitsandbytes 4-bit formats have 4 bits, got bits={bits}.")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=method[4:], bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=double_quant,
        )
    elif method == "torchao-fp8":
        if bits != 8:
            raise ValueError(f"torchao-fp8 stores 8-bit float weights, got bits={bits}; pass bits=8.")
        from torchao.quantization import Float8WeightOnlyConfig
        from transformers import TorchAoConfig

        kwargs["quantization_config"] = TorchAoConfig(quant_type=Float8WeightOnlyConfig())
    elif method == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup
        from transformers import TorchAoConfig

        if not 1 <= bits <= 8:
            raise ValueError(f"torchao weight-only quantization has 1-8 bits, got bits={bits}.")
        quant = Int8WeightOnlyConfig() if bits == 8 else IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size))
        kwargs["quantization_config"] = TorchAoConfig(quant_type=quant)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if method == "hqq":
        _hqq_quantize_(model, bits, group_size, dtype, device)
    return model.eval()


def _hqq_quantize_(model: torch.nn.Module, bits: int, group_size: int, dtype: torch.dtype, device: str) -> None:
    """Replace every ``nn.Linear`` inside the decoder blocks by an ``HQQLinear`` (PyTorch backend)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    from .model import decoder_blocks_path

    if HQQLinear.backend not in (HQQBackend.PYTORCH, HQQBackend.PYTORCH_FORWARD):
        logger.info("HQQLinear backend is %s (set globally elsewhere); keeping it", HQQLinear.backend)
    blocks = model.get_submodule(decoder_blocks_path(model))
    names = [(b, n) for b, block in enumerate(blocks) for n, m in block.named_modules() if type(m) is torch.nn.Linear]
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    for b, name in tqdm(names, desc=f"HQQ w{bits}g{group_size}", unit="linear", disable=len(names) < 50):
        linear = blocks[b].get_submodule(name)
        blocks[b].set_submodule(name, HQQLinear(linear, config, compute_dtype=dtype, device=str(device)))


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


__all__ = [
    "import_gptqmodel",
    "gptq_calibration",
    "gptq_dir",
    "quantize_gptq",
    "awq_dir",
    "quantize_awq",
    "read_awq_scales",
    "smooth_state_dict",
    "awq_smoothed_original",
    "load_quantized",
    "awq_float32_forward_",
    "quantize_compressed_tensors",
    "ON_THE_FLY",
    "load_and_quantize",
    "upcast_unquantized",
    "scrub_offload_path",
]
