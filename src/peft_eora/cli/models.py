"""Resolving and loading what the verbs work on: models, tokenizers, adapters.

    >>> path = resolve_model("gptq-w3g128", "Compressed")      # the embedded model's cached checkpoint
    >>> model = load_model(path, pick_device("auto"))               # GPTQ via load_quantized, else transformers
    >>> model = load_adapter(model, Path("eora-adapter"), allow_base_mismatch=False)
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Optional, Union

from .options import CLIError, one_line

logger = logging.getLogger("peft_eora.cli")

#: ``embedded`` names the embedded SmolLM2-135M-Instruct; ``gptq-w<bits>g<group>`` its cached GPTQ checkpoints.
EMBEDDED = "embedded"
_GPTQ_NAME = re.compile(r"^gptq-w(\d+)g(\d+)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def pick_device(name: str) -> str:
    """``--device``: ``auto`` → cuda if available, else cpu; refuses cuda without CUDA."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"--device {name}: not a device torch knows (use auto, cpu, cuda or cuda:N).") from exc
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine.")
    return name


def pick_dtype(name: str, device: str):
    """``--dtype`` as a torch dtype: ``auto`` → float32 on CPU, float16 on GPU."""
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, name)


def resolve_model(spec: str, role: str) -> Union[Path, str]:
    """A model spec → checkpoint folder (``embedded``/``gptq-wXgY`` exported or quantized if needed) or Hub id."""
    if spec == EMBEDDED:
        import torch

        from ..embedded import export_original

        return export_original(torch.float16)
    match = _GPTQ_NAME.match(spec)
    if match:
        import torch

        from ..embedded import export_original
        from ..quantize import gptq_dir, quantize_gptq

        bits, group = int(match.group(1)), int(match.group(2))
        original = export_original(torch.float16)
        if not (gptq_dir(original, bits, group) / "config.json").is_file():
            logger.warning("Quantizing the embedded model to GPTQ w%dg%d (once; ~30-40 min on a 2-core CPU)", bits, group)
        return quantize_gptq(original, bits=bits, group_size=group)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIError(f"{role} model {spec}: the folder has no config.json (not a checkpoint folder).")
        return path
    if path.exists():
        raise CLIError(f"{role} model {spec}: expected a checkpoint folder, got a file.")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return spec
    raise CLIError(f"{role} model {spec}: no such folder (nor a Hub id, 'embedded' or 'gptq-w<bits>g<group>').")


def _quant_method(path: Union[Path, str]) -> Optional[str]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CLIError(f"Cannot read the config of {path}: {one_line(str(exc))}") from exc
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)
    return str(method).lower() if method else "unknown"


def load_model(path: Union[Path, str], device: str, dtype_name: str = "auto", dtype_device: Optional[str] = None):
    """Load a causal LM for EoRA/evaluation: GPTQ through ``load_quantized``, others through transformers.
    ``dtype_device``: the device whose ``auto`` dtype applies (where it computes), if not ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = pick_dtype(dtype_name, dtype_device or device)
    method = _quant_method(path)
    start = time.perf_counter()
    try:
        if method == "gptq":
            from ..quantize import load_quantized

            if torch_dtype == torch.float32:  # fp16 scales, fp32 activations: exact and fast on CPU
                model = load_quantized(path, dtype=torch.float16, device=device, compute_dtype=torch.float32)
            else:
                model = load_quantized(path, dtype=torch_dtype, device=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(device)
    except (OSError, ValueError) as exc:
        raise CLIError(f"Cannot load the model {path}: {one_line(str(exc))}") from exc
    logger.info("Loaded %s (%s) in %.1f s", path, method or "dense", time.perf_counter() - start)
    return model.eval()


def load_tokenizer(*candidates: Union[Path, str, None]):
    """The tokenizer of the first candidate that has one."""
    from transformers import AutoTokenizer

    errors = []
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(str(candidate))
        except (OSError, ValueError) as exc:
            errors.append(f"{candidate}: {one_line(str(exc))[:200]}")
    raise CLIError(f"No tokenizer found ({'; '.join(errors) or 'no candidate'}).")


def count_lora_parameters(model) -> int:
    """Number of LoRA parameters (``lora_A``/``lora_B`` weights) in a PEFT model."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)


def checkpoint_parameter_count(path: Union[Path, str]) -> Optional[int]:
    """Number of parameters stored in a local checkpoint's safetensors files (``None`` if not local)."""
    from safetensors import safe_open

    folder = Path(str(path))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    return total


def load_adapter(base, adapter: Path, allow_base_mismatch: bool):
    """``base`` with the adapter folder ``adapter`` (EoRA or plain LoRA) loaded, in eval mode."""
    from peft import PeftModel

    from ..safe_files import check_adapter_weights

    if not adapter.is_dir():
        raise CLIError(f"Adapter folder {adapter} not found.")
    if not (adapter / "adapter_config.json").is_file():
        raise CLIError(f"{adapter} has no adapter_config.json (not a PEFT adapter folder).")
    check_adapter_weights(adapter)
    kwargs = {"allow_base_mismatch": True} if allow_base_mismatch else {}
    return PeftModel.from_pretrained(base, str(adapter), **kwargs).eval()
