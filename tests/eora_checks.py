"""Shared measurements for the per-format tests (test_formats.py, test_prune.py): held-out text,
hidden-state error against the original, activation-weighted residual error per layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from peft_eora import CalibrationConfig, EoRAConfig
from peft_eora.decompose import weighted_error
from peft_eora.eval import load_text, make_windows
from peft_eora.original import OriginalWeights
from peft_eora.residual import backend_for

#: EoRA settings of the per-format tests: small enough for a 2-core CPU, large enough to matter.
RANK = 32
CALIB_SAMPLES = 8
CALIB_SEQ_LEN = 128


def c4_split(tmp_dir: Path, tokenizer) -> tuple[Path, torch.Tensor]:
    """The shipped C4 sample split in two: a calibration file (docs 0-127) and 8×128 held-out tokens (128-255)."""
    from peft_eora.eval.perplexity import BUILTIN_TEXTS

    lines = BUILTIN_TEXTS["c4"].read_text(encoding="utf-8").splitlines()
    calib = tmp_dir / "calib.jsonl"
    calib.write_text("\n".join(lines[:128]) + "\n", encoding="utf-8")
    held = tmp_dir / "held.jsonl"
    held.write_text("\n".join(lines[128:]) + "\n", encoding="utf-8")
    ids = torch.tensor(tokenizer(load_text(held), add_special_tokens=False)["input_ids"])
    return calib, make_windows(ids, 128, 8)


def wikitext_windows(tokenizer) -> torch.Tensor:
    ids = torch.tensor(tokenizer(load_text("wikitext2", max_chars=40_000), add_special_tokens=False)["input_ids"])
    return make_windows(ids, 128, 8)


def _decoder(model: nn.Module) -> nn.Module:
    """The transformers decoder (``model.model``) under a PeftModel / causal-LM wrapper: no LM head."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model.model


def hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states (after the final norm), without the 49k-vocabulary LM head."""
    with torch.no_grad():
        return _decoder(model)(input_ids=ids).last_hidden_state.float()


def hidden_errors(model: nn.Module, original: nn.Module | dict[str, torch.Tensor],
                  texts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of the last hidden states per text (a 2-layer truncation has no meaningful perplexity).

    ``original``: the float model, or its hidden states per text (see :func:`reference_hidden`).
    """
    refs = original if isinstance(original, dict) else reference_hidden(original, texts)
    return {name: float((hidden(model, ids) - refs[name]).norm() / refs[name].norm()) for name, ids in texts.items()}


def reference_hidden(original: nn.Module, texts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: hidden(original, ids) for name, ids in texts.items()}


def input_covariances(model: nn.Module, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Σ xᵀx (float64) of the inputs of the named modules over ``ids`` (one forward pass)."""
    H: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_m, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            H[name] = H.get(name, 0) + x.T @ x
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _decoder(model)(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return H


def weighted_errors(peft_model: nn.Module, original_dir: str | Path, H: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(‖ΔW·Xᵀ‖, ‖(ΔW − BA)·Xᵀ‖) summed in quadrature over every LoRA layer, X the held-out inputs.

    ``H`` is keyed by the *base* model's module names (as from :func:`input_covariances` on the
    un-adapted compressed model).
    """
    original = OriginalWeights.open(str(original_dir))
    before = after = 0.0
    seen = 0
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
            continue
        key = next(k for k in H if name.endswith("." + k) or name == k)
        base = layer.get_base_layer()
        delta = original.get(key) - backend_for(base, key).dequantize(base)
        BA = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).float() * layer.scaling["default"]
        before += weighted_error(delta, H[key]) ** 2
        after += weighted_error(delta, H[key], BA) ** 2
        seen += 1
    assert seen == len(H), (seen, len(H))
    return math.sqrt(before), math.sqrt(after)


def target_names(model: nn.Module) -> list[str]:
    """Names of the linears EoRA targets by default (every supported linear in the decoder blocks)."""
    import re

    from peft_eora.model import default_target_modules

    pattern = re.compile(default_target_modules(model))
    return [n for n, _ in model.named_modules() if pattern.fullmatch(n)]


def check_dequantize_matches_forward(model: nn.Module, expected_backend: str, rtol: float = 1e-5,
                                     cast: torch.dtype | None = None) -> int:
    """For every target linear: the back-end's weight reproduces the module's own forward on random x.

    ``cast``: the dtype the kernel casts its input to (AWQ's float16), applied to x for the reference.
    Returns the number of modules checked.
    """
    names = target_names(model)
    assert names
    torch.manual_seed(0)
    for name in names:
        module = model.get_submodule(name)
        backend = backend_for(module, name)
        assert backend.name == expected_backend, (name, backend.name)
        w = backend.dequantize(module)
        assert w.dtype == torch.float32 and w.shape == (module.out_features, module.in_features)
        assert torch.isfinite(w).all()
        x = torch.randn(4, module.in_features)
        with torch.no_grad():
            y = module(x).float()
        xr = x.to(cast).float() if cast is not None else x
        ref = xr @ w.T
        bias = getattr(module, "bias", None)
        if bias is not None:
            ref = ref + bias.float()
        rel = float((y - ref).norm() / ref.norm())
        assert rel <= rtol, (name, rel)
    return len(names)


def eora_vs_svd(
    make_base: Callable[[], nn.Module],
    original_dir: str | Path,
    original_model: nn.Module | dict[str, torch.Tensor],
    texts: dict[str, torch.Tensor],
    calib_file: Path,
) -> dict[str, object]:
    """Hidden-state and activation-weighted errors of the compressed base, +SVD and +EoRA (r=RANK).

    ``original_dir`` is what EoRA compares weights against (AWQ: the smoothed original);
    ``original_model`` the float model whose hidden states are the reference (or those states).
    """
    if not isinstance(original_model, dict):
        original_model = reference_hidden(original_model, texts)
    base = make_base()
    names = target_names(base)
    H = input_covariances(base, texts["c4"], names)
    err_base = hidden_errors(base, original_model, texts)
    calib = CalibrationConfig(dataset=str(calib_file), num_samples=CALIB_SAMPLES, seq_len=CALIB_SEQ_LEN)
    eora = get_peft_model(base, EoRAConfig(r=RANK, original_model=str(original_dir), calibration=calib))
    err_eora = hidden_errors(eora, original_model, texts)
    w_before, w_eora = weighted_errors(eora, original_dir, H)
    svd = get_peft_model(make_base(), EoRAConfig(r=RANK, method="svd", original_model=str(original_dir)))
    err_svd = hidden_errors(svd, original_model, texts)
    _, w_svd = weighted_errors(svd, original_dir, H)
    return {"hidden": {"base": err_base, "eora": err_eora, "svd": err_svd},
            "weighted_c4": {"base": w_before, "eora": w_eora, "svd": w_svd},
            "stats": eora.peft_config["default"].eora_stats, "modules": len(names), "eora_model": eora,
            "lora_layers": sorted({type(m).__name__ for m in eora.modules() if isinstance(m, LoraLayer)})}


def check_reload(eora_model: nn.Module, make_base: Callable[[], nn.Module], folder: Path, ids: torch.Tensor) -> float:
    """Save the EoRA adapter, reload it onto a freshly built base (no original, no calibration):
    returns the max abs difference of the last hidden states (the base fingerprint must match)."""
    from peft import PeftModel

    eora_model.save_pretrained(folder)
    reloaded = PeftModel.from_pretrained(make_base(), folder)
    return float((hidden(eora_model, ids) - hidden(reloaded, ids)).abs().max())
