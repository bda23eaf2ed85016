"""The model card (``README.md``) of an EoRA adapter.

    >>> card = build_model_card(model, repo_id="me/smollm2-gptq3-eora", ppl_before=132.1, ppl_after=61.9)
    >>> card.save("eora-adapter/README.md")

Saving (:mod:`peft_eora.saving`), export (:mod:`peft_eora.export`) and Hub pushes
(:mod:`peft_eora.hub`) write it; text a user adds to an existing card is kept (only the section
between the ``peft-eora`` markers is replaced).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData
from peft.tuners.lora import LoraLayer
from torch import nn

CARD_BEGIN = "<!-- peft-eora:begin -->"
CARD_END = "<!-- peft-eora:end -->"
PAPER_URL = "https://arxiv.org/abs/2410.21271"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def peft_model_parts(model: nn.Module) -> tuple[nn.Module, Any]:
    """(transformers base model, tuner) of a ``PeftModel`` or tuner."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        return model.get_base_model(), model.base_model
    if isinstance(model, BaseTuner):
        return model.model, model
    raise TypeError(f"Expected a PeftModel (or PEFT tuner) with an EoRA adapter, got {type(model).__name__}.")


def quantization_info(model: nn.Module) -> dict[str, Any]:
    """Compression details from ``model.config.quantization_config`` (``format: "dense"`` if none)."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return {"format": "dense"}
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    method = qc.get("quant_method")
    method = getattr(method, "value", method)
    info: dict[str, Any] = {"format": str(method).lower() if method else "unknown"}
    for key in ("bits", "group_size", "sym", "desc_act", "checkpoint_format"):
        value = qc.get(key)
        if value is not None:
            info[key] = getattr(value, "value", value)
    groups = qc.get("config_groups")  # compressed-tensors: the scheme sits in its config groups
    if isinstance(groups, dict) and groups:
        weights = [g.get("weights") if isinstance(g, dict) else getattr(g, "weights", None) for g in groups.values()]
        weights = [w if isinstance(w, dict) else (w.model_dump() if hasattr(w, "model_dump") else None) for w in weights]
        if weights and all(w for w in weights) and len({(w.get("num_bits"), w.get("group_size")) for w in weights}) == 1:
            w = weights[0]
            info.setdefault("bits", w.get("num_bits"))
            if w.get("group_size") is not None:
                info.setdefault("group_size", w.get("group_size"))
            if w.get("symmetric") is not None:
                info.setdefault("sym", w.get("symmetric"))
            if qc.get("format"):
                info.setdefault("checkpoint_format", qc.get("format"))
    return info


def _describe_quant(info: dict[str, Any]) -> str:
    if info.get("format") == "dense":
        return "dense weights (no `quantization_config`: a pruned or fake-quantized base)"
    parts = [info["format"].upper()]
    if info.get("bits") is not None:
        parts.append(f"{info['bits']}-bit")
    if info.get("group_size") is not None:
        parts.append("per-channel" if info["group_size"] in (-1, 0) else f"group size {info['group_size']}")
    extra = [f"{k}={info[k]}" for k in ("sym", "desc_act", "checkpoint_format") if k in info]
    return ", ".join(parts) + (f" ({', '.join(extra)})" if extra else "")


def adapter_layers(tuner: Any, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    """``(name, layer)`` of every LoRA layer of the tuner that carries ``adapter_name``."""
    return [
        (name, module)
        for name, module in tuner.model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _eora_section(
    model: nn.Module,
    adapter_name: str,
    repo_id: Optional[str],
    ppl_before: Optional[float],
    ppl_after: Optional[float],
    exported: bool = False,
    base_model: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> str:
    import peft
    import transformers

    from ._version import __version__

    base, tuner = peft_model_parts(model)
    config = tuner.peft_config[adapter_name]
    stats = dict(getattr(config, "eora_stats", None) or {})
    layers = adapter_layers(tuner, adapter_name)
    ranks = sorted({int(layer.r[adapter_name]) for _, layer in layers}) or [config.r]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name, _ in layers})
    base_id = (
        base_model or getattr(getattr(base, "config", None), "_name_or_path", None) or config.base_model_name_or_path
    )
    base_text = f"`{base_id}`" if base_id else "the compressed base model"
    load_id = base_id or "path/to/compressed-base"
    quant = quantization_info(base)
    calib = getattr(config, "calibration", None)
    recorded = stats.get("calibration_tokens")  # what the run used (0: none, the plain-SVD baseline)
    tokens = recorded if recorded is not None else (calib.num_tokens if calib is not None else None)
    if calib is not None:
        sources = calib.sources
        whole = sum(s.weight for s in sources)
        calib_text = " + ".join(
            f"`{s.dataset}`" + (f" ({s.subset})" if s.subset else "") + (f" {s.weight / whole:.0%}" if len(sources) > 1 else "")
            for s in sources
        )
        calib_text += f", {calib.num_samples} × {calib.seq_len}-token windows"
    else:
        calib_text = "token batches passed to `initialize_eora_weights`" if tokens else "not recorded"
    if tokens:
        calib_text += f" ({int(tokens):,} tokens)"
    ppl_before = ppl_before if ppl_before is not None else stats.get("ppl_before")
    ppl_after = ppl_after if ppl_after is not None else stats.get("ppl_after")
    if ppl_before is not None or ppl_after is not None:
        before, after = (_fmt(v) if v is not None else "n/a" for v in (ppl_before, ppl_after))
        ppl = f"{before} → {after}"
        if stats.get("ppl_dataset"):
            ppl += f" on {stats['ppl_dataset']}"
    else:
        ppl = "not measured"
    original = getattr(config, "original_model", None)  # a plain LoRA adapter (export_lora) has none
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{config.r} (per module {ranks[0]}–{ranks[-1]})"
    digest = (getattr(config, "base_fingerprint", None) or {}).get("digest")
    fingerprint = f"`{digest}`" if digest else "not recorded"
    method = getattr(config, "method", "eora")
    used = (getattr(config, "eora_stats", None) or {}).get("damping")  # what the run used (auto may fall back)
    damping = used if used is not None else getattr(config, "damping", None)
    if isinstance(damping, str):  # "auto": chosen per module; show what was picked
        counts = ((getattr(config, "eora_stats", None) or {}).get("damping_counts") or {})
        picked = ", ".join(f"{k}×{v}" for k, v in sorted(counts.items(), key=lambda kv: float(kv[0])))
        damping_text = f" (damping {damping}" + (f": {picked}" if picked else "") + ")"
    else:
        damping_text = f" (damping {damping:g})" if damping is not None else ""
    fine_tuned = bool(getattr(config, "fine_tuned", False))
    alpha_text = _fmt(config.lora_alpha)
    if exported:  # export_lora writes one scale alpha/r for every module, without rsLoRA
        r = int(config.r)
        rslora = bool(getattr(config, "use_rslora", False))
        scale = config.lora_alpha / (math.sqrt(r) if rslora else r)
        alpha_text = _fmt(float(scale * r)) + (", without rsLoRA" if rslora else "")
    if method == "svd":  # reads the weights only: no activations, calibration data or ridge
        damping_text, calib_text = "", "none (plain SVD of the residual, no activations)"
    combination = stats.get("combination")  # add_weighted_adapter: the run's statistics are the sources' own
    if combination:
        parts = ", ".join(f"`{a}` ×{_fmt(w)}" for a, w in zip(combination["adapters"], combination["weights"]))
        method, damping_text = f"weighted combination ({combination['combination_type']}) of EoRA adapters {parts}", ""
        calib_text = "that of each combined adapter (their own configs)"
    rows = [
        ("Compressed base model", base_text if base_id else "not recorded"),
        ("Original (uncompressed) model", _original_text(original) if original else "not recorded"),
        ("Compression", _describe_quant(quant)),
        ("Method", f"{method}{damping_text}" + (", then fine-tuned" if fine_tuned else "")),
        ("Rank", f"{rank_text} (lora_alpha {alpha_text})"),
        ("Target modules", f"{len(layers)} linear layers ({', '.join(suffixes)})"),
        ("Calibration data", calib_text),
        ("Perplexity before → after" + (" (EoRA initialisation)" if fine_tuned else ""), ppl),
        ("Base fingerprint", fingerprint),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    where = repo_id or "path/to/this/adapter"
    # a named adapter is saved in a subfolder of its name, and loads under that name
    peft_args = f'"{where}"' + (f', subfolder="{subfolder}", adapter_name="{subfolder}"' if subfolder else "")
    tf_args = f'"{where}"' + (f', adapter_name="{subfolder}", adapter_kwargs={{"subfolder": "{subfolder}"}}'
                               if subfolder else "")
    lm_eval_peft = f"{where}/{subfolder}`, a local copy" if subfolder else f"{where}`"
    if exported:
        kind = "exported as a plain LoRA adapter (`peft_type: LORA`)"
        usage = f"""```python
from peft import PeftModel  # stock PEFT; peft-eora is not needed
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{load_id}")
model = PeftModel.from_pretrained(base, {peft_args})
```

LoRA-serving engines (vLLM-style loaders) read `adapter_model.safetensors` and `adapter_config.json`
directly: the effective scale `lora_alpha / r` is the same for every module. Apply it only to
the compressed base above; the base fingerprint is not checked in this format."""
    elif int(getattr(config, "adapter_bits", 16)) == 16:
        kind = "saved as a plain LoRA adapter (`peft_type: LORA`) that every LoRA tool loads"
        usage = f"""```python
from peft import PeftModel  # stock PEFT; peft-eora is not needed
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{load_id}")
model = PeftModel.from_pretrained(base, {peft_args})
```

transformers (`base.load_adapter({tf_args})`) and lm-evaluation-harness
(`--model_args pretrained={load_id},peft={lm_eval_peft}) load it the same way. The EoRA settings and
statistics are in `eora_config.json`: with peft-eora installed (`import peft_eora` before loading),
loading also checks the base fingerprint, so the adapter is never applied to another checkpoint.
For vLLM-style serving engines, export it: `peft_eora.export_lora(model, "lora-export")`."""
    else:
        bits = int(config.adapter_bits)
        kind = f"with int{bits} factors (codes + float32 scales), which need peft-eora to load"
        usage = f"""```python
import peft_eora  # unpacks the int{bits} factors (pip install peft-eora)
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{load_id}")
model = PeftModel.from_pretrained(base, {peft_args})
```

Loading checks the base against the recorded fingerprint. Without peft-eora, or for vLLM-style
serving engines, export a float LoRA adapter: `peft_eora.export_lora(model, "lora-export")`."""
    intro = (f"A training-free [EoRA]({PAPER_URL}) adapter: low-rank factors that compensate the compression "
             f"error of {base_text}, computed by projecting the residual `W_original − W_compressed` into the "
             "eigenspace of the calibration activations")
    if method == "svd":
        intro = (f"A low-rank adapter that compensates the compression error of {base_text} by a plain truncated SVD "
                 f"of the residual `W_original − W_compressed` (the data-free baseline of [EoRA]({PAPER_URL}), which "
                 "projects it into the eigenspace of calibration activations instead)")
    if combination:
        intro = (f"A weighted combination of [EoRA]({PAPER_URL}) adapters (low-rank factors that compensate the "
                 f"compression error of {base_text}, each computed without training from the residual "
                 "`W_original − W_compressed` in the eigenspace of its calibration activations)")
    if fine_tuned:  # the initialisation as above, then trained
        start = intro[0].lower() + intro[1:]
        intro = (f"An adapter initialised as {start}, and then fine-tuned. The statistics below describe the "
                 "initialisation, not the fine-tuned factors")
    return f"""{CARD_BEGIN}
## EoRA adapter

{intro}; {kind}.

{table}

### Usage

{usage}

### Framework versions

- peft-eora {__version__}
- PEFT {peft.__version__}
- Transformers {transformers.__version__}
{CARD_END}
"""


def build_model_card(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    ppl_before: Optional[float] = None,
    ppl_after: Optional[float] = None,
    existing: Optional[ModelCard] = None,
    extra_tags: Optional[list[str]] = None,
    exported: bool = False,
    subfolder: Optional[str] = None,
) -> ModelCard:
    """The model card of an EoRA adapter (``huggingface_hub.ModelCard``).

        >>> card = build_model_card(model, repo_id="me/adapter", ppl_before=21.3, ppl_after=19.8)
        >>> card.save("README.md")

    Metadata: ``library_name: peft``, tags ``peft``/``eora``/``lora``/format/bits, ``base_model`` (when
    it is a Hub id; pass ``base_model=`` to override). The body lists base model, compression
    format/bits/group size, rank, method, calibration data and token count, and perplexity before/after
    (from ``eora_stats["ppl_before"/"ppl_after"]`` or the arguments). With ``existing``, its text and
    metadata are kept and only the peft-eora section (between ``<!-- peft-eora:... -->`` markers) is
    replaced or appended. ``subfolder``: where the adapter's files sit under ``repo_id`` (a named
    adapter's folder: ``save_pretrained`` writes each adapter but ``"default"`` into one of its name);
    the usage snippet then loads it from there, under that name.
    """
    base, tuner = peft_model_parts(model)
    if adapter_name not in tuner.peft_config:
        raise KeyError(f"No adapter named {adapter_name!r}; adapters: {sorted(tuner.peft_config)}.")
    config = tuner.peft_config[adapter_name]
    quant = quantization_info(base)
    tags = {"peft", "eora", "lora"} | set(extra_tags or [])
    if quant["format"] not in ("dense", "unknown"):
        tags.add(quant["format"])
    if quant.get("bits") is not None:
        tags.add(f"{quant['bits']}-bit")
    base_id = (
        base_model or getattr(getattr(base, "config", None), "_name_or_path", None) or config.base_model_name_or_path
    )
    data = existing.data if existing is not None else ModelCardData()
    data.library_name = "peft"
    data.tags = sorted(set(data.tags or []) | tags)
    if base_id and (base_model is not None or (_HUB_ID.match(base_id) and not os.path.exists(base_id))):
        data.base_model = base_id
        data.base_model_relation = "adapter"
    if getattr(data, "pipeline_tag", None) is None and type(model).__name__ == "PeftModelForCausalLM":
        data.pipeline_tag = "text-generation"
    section = _eora_section(model, adapter_name, repo_id, ppl_before, ppl_after, exported, base_model, subfolder)
    if existing is not None:
        text = existing.text
        start, stop = text.find(CARD_BEGIN), text.find(CARD_END)
        if 0 <= start < stop:
            text = text[:start] + section.rstrip("\n") + text[stop + len(CARD_END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        title = f"EoRA adapter for {base_id}" if base_id else "EoRA adapter"
        text = f"\n# {title}\n\n{section}"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")


def _original_text(original: str) -> str:
    """The original as the user named it; an AWQ-smoothed copy (``awq_smoothed_original``) by its source."""
    from pathlib import Path

    made = Path(str(original)) / "peft_eora_smoothed.json"
    try:
        source = json.loads(made.read_text()).get("source_model") if made.is_file() else None
    except (OSError, ValueError):
        source = None
    return f"`{source}` (in the AWQ model's coordinates: `{original}`)" if source else f"`{original}`"
