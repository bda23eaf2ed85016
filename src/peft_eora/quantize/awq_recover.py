"""AWQ's smoothing scales of a checkpoint made elsewhere (AutoAWQ, gptqmodel, the Hub), recovered from it and
its original.

AWQ divides each norm's weight by per-channel scales ``s`` and multiplies the columns of the linears after it
by ``s`` (linear → linear: the first one's rows divided, the next one's columns multiplied) before quantizing.
EoRA needs the original in those coordinates (:func:`~peft_eora.quantize.awq_smoothed_original`);
:func:`~peft_eora.quantize.quantize_awq` records the scales, but checkpoints made elsewhere do not. Both
kinds of scaling can be read back from the pair:

- **norm → linears**: ``s = g_original / g_awq`` per channel, exact: the AWQ model multiplies its activations
  by the stored ``g_awq``, so ``W·diag(s)`` is what its linears must equal. Which linears follow the norm is
  found by their columns: per input column ``j``, ``c_j = ⟨Ŵ[:, j], W[:, j]⟩ / ‖W[:, j]‖²`` (``Ŵ`` dequantized)
  follows ``s`` (the logs correlate) for the linears AWQ scaled with it.
- **linear → linear** (``up_proj → down_proj``; ``v_proj → o_proj`` where the shapes match): the first's rows
  were divided by ``s``; each row has its own quantization scales, so its ratio ``ρ = ⟨Ŵ[i], W[i]⟩ / ‖W[i]‖²``
  is ``1/s_i`` within the rounding noise over the row (the second's columns, sharing groups, quantize a small
  ``s_j`` to zeros). Which linear came first is the one whose ``1/ρ`` explains the second's columns best; the
  scale is then refined per channel to the one that minimises the two residuals' energy together (the ratios
  of both layers, Newton's method from ``1/ρ``). Any ``s`` computes the same function (it moves ``ε·W`` between
  the two residuals), so the least total residual is the one to compensate.

A linear whose columns stay scaled after all this (``|log c|``'s median above 0.02) is an error naming it::

    >>> records = recover_awq_scales("TheBloke/…-AWQ folder", "the original folder")
    >>> smooth_state_dict(original_state, records)     # what awq_smoothed_original does with them
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("peft_eora.quantize")

#: a linear no scaling explains is refused when the median |log c| of its columns is above this
SCALED = 0.02


def _load_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors file.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _dequantize(q: dict[str, torch.Tensor], prefix: str, bits: int, group: int) -> torch.Tensor:
    """``(out, in)`` float32 weight of an AWQ GEMM-layout linear from its checkpoint tensors."""
    from ..residual.awq import unpack_awq_codes

    scales = q[f"{prefix}.scales"].float()
    in_f, out_f = q[f"{prefix}.qweight"].shape[0], scales.shape[1]
    codes = unpack_awq_codes(q[f"{prefix}.qweight"], bits, out_f).float()
    zeros = unpack_awq_codes(q[f"{prefix}.qzeros"], bits, out_f).float()
    g = group if group > 0 else in_f
    return ((codes - zeros.repeat_interleave(g, 0)[:in_f]) * scales.repeat_interleave(g, 0)[:in_f]).T


def _row_ratios(w_q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row, the least-squares ratio ``⟨Ŵ[i], W[i]⟩ / ‖W[i]‖²`` (1 where the row is 0)."""
    num, den = (w_q * w).sum(1), (w * w).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))


def _fit_error(w_q: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None = None) -> float:
    """How well ``diag(ρ)·W·diag(s)`` reproduces ``Ŵ`` with the best row ratios ``ρ`` (relative Frobenius error):
    the hypothesis that AWQ scaled ``W``'s columns by ``s`` (and maybe its rows)."""
    ws = w if s is None else w * s[None, :]
    return float((w_q - _row_ratios(w_q, ws)[:, None] * ws).norm() / w_q.norm().clamp_min(1e-30))


def _best(w_q: torch.Tensor, w: torch.Tensor, hypotheses: dict[str, torch.Tensor]) -> str | None:
    """The hypothesis (a name → column scales) that reproduces ``Ŵ`` best, or None when unscaled does."""
    errors = {None: _fit_error(w_q, w)}
    errors.update({k: _fit_error(w_q, w, s) for k, s in hypotheses.items() if s.numel() == w.shape[1]})
    return min(errors, key=lambda k: errors[k])


def recover_awq_scales(awq_path: str | Path, original_dir: str | Path) -> list[dict[str, Any]]:
    """The scaling groups of AWQ checkpoint ``awq_path`` against its float original, in the format of
    :func:`~peft_eora.quantize.read_awq_scales`: ``[{"prev", "kind", "layers", "scales"}]``."""
    awq_path, original_dir = Path(awq_path), Path(original_dir)
    config = json.loads((awq_path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if str(qc.get("quant_method", "")).lower() != "awq":
        raise ValueError(f"{awq_path} is not an AWQ checkpoint (quant_method {qc.get('quant_method')!r}).")
    layout = str(qc.get("version") or qc.get("format") or qc.get("checkpoint_format") or "gemm").lower()
    if layout != "gemm":
        raise ValueError(f"{awq_path} stores AWQ's {layout!r} layout; recovering its scales reads the 'gemm' layout "
                         "(AutoAWQ's default) only.")
    bits, group = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128)))
    gemma = str(config.get("model_type", "")).startswith("gemma")
    q, o = _load_all(awq_path), _load_all(original_dir)
    linears = sorted(k[: -len(".qweight")] for k in q if k.endswith(".qweight"))
    if not linears:
        raise ValueError(f"{awq_path} holds no AWQ linear (no '*.qweight' tensor).")
    blocks: dict[str, list[str]] = {}
    for name in linears:
        m = re.match(r"^(.*?\.\d+)\.", name)
        blocks.setdefault(m.group(1) if m else "", []).append(name)
    records: list[dict[str, Any]] = []
    for block, names in blocks.items():
        records += _block_records(block, names, q, o, bits, group, gemma)
    logger.info("Recovered %d AWQ scaling groups of %s from its original %s", len(records), awq_path, original_dir)
    return records


def _block_records(block: str, names: list[str], q: dict[str, torch.Tensor], o: dict[str, torch.Tensor],
                   bits: int, group: int, gemma: bool) -> list[dict[str, Any]]:
    w: dict[str, torch.Tensor] = {}
    w_q: dict[str, torch.Tensor] = {}
    for name in names:
        if f"{name}.weight" not in o:
            raise ValueError(f"The original has no {name}.weight, which the AWQ checkpoint quantized; is it the model "
                           "AWQ quantized?")
        w[name], w_q[name] = o[f"{name}.weight"].float(), _dequantize(q, name, bits, group)
        if w[name].shape != w_q[name].shape:
            raise ValueError(f"{name}: original {tuple(w[name].shape)} against AWQ {tuple(w_q[name].shape)}.")
    records: list[dict[str, Any]] = []
    prefix = f"{block}." if block else ""
    norms: dict[str, torch.Tensor] = {}  # the block's rescaled norms → their scales
    for key in sorted(k for k in q if k.startswith(prefix) and k.endswith(".weight") and "norm" in k.lower()
                      and q[k].dim() == 1 and k in o and o[k].shape == q[k].shape):
        g_q, g_o = q[key].float(), o[key].float()
        if gemma:  # stored as (γ − 1)
            g_q, g_o = g_q + 1, g_o + 1
        if ((g_q == 0) != (g_o == 0)).any():
            raise ValueError(f"{key}: zero channels differ between the original and the AWQ checkpoint.")
        scale = torch.where(g_q != 0, g_o / torch.where(g_q != 0, g_q, torch.ones_like(g_q)), torch.ones_like(g_q))
        if (scale > 0).all() and scale.log().abs().max() > 1e-6:  # rescaled (a sign change is no smoothing)
            norms[key[: -len(".weight")]] = scale
    members: dict[str, list[str]] = {}
    for name in names:  # norm → linears: each linear to the norm whose scales reproduce its weight best
        best = _best(w_q[name], w[name], norms)
        if best is not None:
            members.setdefault(best, []).append(name)
    grouped: set[str] = set()
    for norm, layers in ((n, members[n]) for n in norms if n in members):  # in the block's order
        records.append({"prev": norm, "kind": "gemma_norm" if gemma else "norm", "layers": layers,
                        "scales": norms[norm]})
        for n in layers:
            grouped.add(n)
            w[n] = w[n] * norms[norm][None, :]
    for name in names:  # linear → linear: a linear before it whose rows were divided by its columns' scales
        if name in grouped:
            continue
        before = {p: 1 / _row_ratios(w_q[p], w[p]) for p in names
                  if p != name and w[p].shape[0] == w[name].shape[1] and not any(r["prev"] == p for r in records)}
        best = _best(w_q[name], w[name], {p: t.clamp_min(1e-6) for p, t in before.items()})
        if best is None:
            num, den = (w_q[name] * w[name]).sum(0), (w[name] * w[name]).sum(0)
            log_c = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den)).clamp_min(1e-6).log()
            if float(log_c.abs().median()) > SCALED:
                raise ValueError(
                    f"{name}'s columns are scaled against the original (median |log ratio| "
                    f"{float(log_c.abs().median()):.3f}) but no norm or linear before it explains it: is "
                    f"{block or 'it'} from the model AWQ quantized, and a norm→linear / linear→linear model (Llama "
                    "family)?")
            continue
        scales = _joint_scales(w_q[best], w[best], w_q[name], w[name], before[best].clamp_min(1e-6))
        records.append({"prev": best, "kind": "linear", "layers": [name], "scales": scales})
    return records


def _joint_scales(p_q: torch.Tensor, p: torch.Tensor, n_q: torch.Tensor, n: torch.Tensor, start: torch.Tensor,
                  steps: int = 8) -> torch.Tensor:
    """Per channel ``j``, the ``t`` minimising ``‖Ŵp[j] − Wp[j]/t‖² + ‖Ŵn[:, j] − Wn[:, j]·t‖²``: the two layers'
    residual energy together (no larger than at AWQ's own scales). The stationary point solves
    ``C·t⁴ − D·t³ + B·t − A = 0``; Newton's method from the rows' estimate ``start``."""
    a, b = (p * p).sum(1).double(), (p_q * p).sum(1).double()
    c, d = (n * n).sum(0).double(), (n_q * n).sum(0).double()
    t = start.double()
    for _ in range(steps):
        g = ((c * t - d) * t * t + b) * t - a
        dg = (4 * c * t - 3 * d) * t * t + b
        t = torch.where(dg > 0, t - g / dg.clamp_min(1e-30), t).clamp_min(1e-6)
    return t.float()
