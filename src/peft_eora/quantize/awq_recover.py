"""AWQ's smoothing scales of a checkpoint made elsewhere (AutoAWQ, gptqmodel; Hub checkpoints once downloaded),
recovered from it and its original.

AWQ divides each norm's weight by per-channel scales ``s`` and multiplies the columns of the linears after it
by ``s`` (linear → linear: the first one's rows and bias divided, the next one's columns multiplied) before
quantizing. EoRA needs the original in those coordinates (:func:`~peft_eora.quantize.awq_smoothed_original`);
:func:`~peft_eora.quantize.quantize_awq` records the scales, but checkpoints made elsewhere do not. Both kinds
of scaling can be read back from the pair, one decoder block at a time:

- **norm → linears**: ``s = g_original / g_awq`` per channel, exact: the AWQ model multiplies its activations by
  the stored ``g_awq``, so ``W·diag(s)`` is what its linears must equal. Gemma's norms store ``γ − 1`` and
  gptqmodel divides ``γ`` for some of them and ``γ − 1`` for others, so both readings are candidates. Each linear
  goes to the candidate whose scales reproduce its dequantized weight best (relative error of
  ``diag(ρ)·W·diag(s)`` against ``Ŵ``, with the best row ratios ``ρ``), if that beats "unscaled"; norms that
  differ from the original only by the checkpoint dtype's rounding are no candidates, and a norm that differs
  beyond it but fits no linear is an error.
- **linear → linear** (``up_proj → down_proj``; ``v_proj → o_proj`` where the shapes match; siblings under one
  parent module): the first's rows were divided by ``s``. Where it has a bias, ``s = b_original / b_awq``
  exactly; elsewhere each row has its own quantization scales, so its ratio ``ρ = ⟨Ŵ[i], W[i]⟩ / ‖W[i]‖²`` is
  ``1/s_i`` within the rounding noise, refined per channel to the scales that minimise the two layers' residual
  energy together (any ``s`` computes the same function: it moves ``ε·W`` between the two residuals).

Afterwards every linear's columns must be unscaled against the smoothed original (median |log ratio| at most
0.05 once rows are fitted, more for noisier quantization; unscaled 4-bit layers read ~0.01); one that is not
is an error naming it::

    >>> records = recover_awq_scales("Llama-3-8B-AWQ", "Llama-3-8B")     # local folders
    >>> smooth_state_dict(original_state, records)     # what awq_smoothed_original does with them
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger("peft_eora.quantize")

#: a linear whose columns stay scaled beyond this (median |log ratio|, rows fitted; more for noisier quantization:
#: :func:`_offset_limit`) is refused
SCALED = 0.05
#: a linear → linear hypothesis must reproduce a linear's weight this much better than "unscaled"
MARGIN = 0.9


def checkpoint_files(folder: Path) -> list[Path]:
    """A checkpoint's safetensors files: the index's shards where an index exists (Mistral folders also hold a
    ``consolidated.safetensors`` beside them), else every ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors file.")
    return files


class CheckpointTensors:
    """Name → tensor over a checkpoint's safetensors files, read one tensor at a time."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        for f in checkpoint_files(folder):
            with safe_open(str(f), framework="pt") as st:
                self.where.update({k: f for k in st.keys()})

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.where[key]), framework="pt") as st:
            return st.get_tensor(key)


def _dequantize(q: Any, prefix: str, bits: int, group: int) -> torch.Tensor:
    """``(out, in)`` float32 weight of an AWQ GEMM-layout linear from its checkpoint tensors."""
    from ..residual.awq import unpack_awq_codes

    scales = q[f"{prefix}.scales"].float()
    qweight = q[f"{prefix}.qweight"]
    in_f, out_f = qweight.shape[0], scales.shape[1]
    codes = unpack_awq_codes(qweight, bits, out_f).float()
    if f"{prefix}.qzeros" in q:
        zeros = unpack_awq_codes(q[f"{prefix}.qzeros"], bits, out_f).float()
    else:  # zero_point=False: symmetric codes around the middle
        zeros = torch.full_like(scales, float(1 << (bits - 1)))
    g = group if group > 0 else in_f
    return ((codes - zeros.repeat_interleave(g, 0)[:in_f]) * scales.repeat_interleave(g, 0)[:in_f]).T


def _row_ratios(w_q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row, the least-squares ratio ``⟨Ŵ[i], W[i]⟩ / ‖W[i]‖²`` (1 where the row is 0)."""
    num, den = (w_q * w).sum(1), (w * w).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))


def _fit_error(w_q: torch.Tensor, w: torch.Tensor, s: Optional[torch.Tensor] = None) -> float:
    """How well ``diag(ρ)·W·diag(s)`` reproduces ``Ŵ`` with the best row ratios ``ρ`` (relative Frobenius error):
    the hypothesis that AWQ scaled ``W``'s columns by ``s`` (and maybe its rows)."""
    ws = w if s is None else w * s[None, :]
    return float((w_q - _row_ratios(w_q, ws)[:, None] * ws).norm() / w_q.norm().clamp_min(1e-30))


def _column_offset(w_q: torch.Tensor, w: torch.Tensor) -> float:
    """Median |log| of ``Ŵ``'s column ratios against ``W`` once its rows are fitted, over columns not (nearly) zero:
    ~0 when ``W`` is in ``Ŵ``'s coordinates (columns AWQ scaled down to zeros count as far off, hence the median)."""
    wr = _row_ratios(w_q, w)[:, None] * w
    num, den = (w_q * wr).sum(0), (wr * wr).sum(0)
    live = den > 1e-6 * den.max().clamp_min(1e-30)
    if not bool(live.any()):
        return 0.0
    return float((num[live] / den[live]).clamp_min(1e-6).log().abs().median())


def _offset_limit(w_q: torch.Tensor, w: torch.Tensor) -> float:
    """How far an unscaled layer's column ratios may read from 1: :data:`SCALED`, or more where the quantization
    noise is larger (six times its relative error over √rows; 4-bit layers of 576 rows read ~0.01)."""
    return max(SCALED, 6 * _fit_error(w_q, w) / w.shape[0] ** 0.5)


def _ratio(num: torch.Tensor, den: torch.Tensor, where_zero: float = 1.0) -> torch.Tensor:
    """``num / den`` per entry, ``where_zero`` where ``den`` is 0."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.full_like(den, where_zero))


def _norm_scales(g_o: torch.Tensor, g_q: torch.Tensor, noise: float) -> Optional[torch.Tensor]:
    """``g_o / g_q`` where that is a positive per-channel scaling beyond the stored dtype's rounding, else None."""
    if ((g_q == 0) != (g_o == 0)).any():
        return None
    s = _ratio(g_o, g_q)
    if not bool((s > 0).all()) or float(s.log().abs().max()) <= noise:
        return None
    return s


def recover_awq_scales(awq_path: str | Path, original_dir: str | Path) -> list[dict[str, Any]]:
    """The scaling groups of AWQ checkpoint ``awq_path`` (local folder) against its float original, in the format of
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
    q, o = CheckpointTensors(awq_path), CheckpointTensors(original_dir)
    linears = sorted(k[: -len(".qweight")] for k in q.where if k.endswith(".qweight"))
    if not linears:
        raise ValueError(f"{awq_path} holds no AWQ linear (no '*.qweight' tensor).")
    blocks: dict[str, list[str]] = {}
    for name in linears:
        m = re.match(r"^(.*?\.\d+)\.", name)
        blocks.setdefault(m.group(1) if m else "", []).append(name)
    records: list[dict[str, Any]] = []
    for block, names in blocks.items():
        records += _block_records(block, names, q, o, bits, group)
    logger.info("Recovered %d AWQ scaling groups of %s from its original %s", len(records), awq_path, original_dir)
    return records


def _block_records(block: str, names: list[str], q: CheckpointTensors, o: CheckpointTensors, bits: int,
                   group: int) -> list[dict[str, Any]]:
    w: dict[str, torch.Tensor] = {}
    w_q: dict[str, torch.Tensor] = {}
    for name in names:
        if f"{name}.weight" not in o:
            raise ValueError(f"The original has no {name}.weight, which the AWQ checkpoint quantized; is it the model "
                             "AWQ quantized?")
        w[name], w_q[name] = o[f"{name}.weight"].float(), _dequantize(q, name, bits, group)
        if w[name].shape != w_q[name].shape:
            raise ValueError(f"{name}: original {tuple(w[name].shape)} against AWQ {tuple(w_q[name].shape)}.")
    prefix = f"{block}." if block else ""
    # norm → linears: candidates (norm, reading) → scales
    candidates: dict[tuple[str, str], torch.Tensor] = {}
    for key in sorted(k for k in q.where if k.startswith(prefix) and k.endswith(".weight") and "norm" in k.lower()
                      and k in o):
        stored, g_o = q[key], o[key].float()
        if stored.dim() != 1 or stored.shape != g_o.shape:
            continue
        noise = 4 * torch.finfo(stored.dtype).eps if stored.is_floating_point() else 1e-6
        g_q = stored.float()
        for kind, (a, b) in (("norm", (g_o, g_q)), ("gemma_norm", (g_o + 1, g_q + 1))):
            s = _norm_scales(a, b, noise)
            if s is not None:
                candidates[(key[: -len(".weight")], kind)] = s
    chosen: dict[str, tuple[str, str]] = {}  # linear → its candidate
    for name in names:  # norms that differ only by rounding are no candidates, so "better than unscaled" is enough
        none = _fit_error(w_q[name], w[name])
        fits = {c: _fit_error(w_q[name], w[name], s) for c, s in candidates.items() if s.numel() == w[name].shape[1]}
        best = min(fits, key=fits.__getitem__, default=None)
        if best is not None and fits[best] < none:
            chosen[name] = best
    records: list[dict[str, Any]] = []
    for norm in dict.fromkeys(c[0] for c in candidates):  # the block's order
        kinds = {chosen[n][1] for n in names if n in chosen and chosen[n][0] == norm}
        if len(kinds) > 1:
            raise ValueError(f"{norm}: its linears fit two readings of its weight (γ and γ − 1); cannot tell which "
                             "one AWQ divided.")
        if not kinds:
            raise ValueError(
                f"{norm} differs from the original beyond rounding (AWQ scaled it), but no linear of {block or 'it'} "
                "fits its scales: is the original the model AWQ quantized?")
        kind = kinds.pop()
        layers = [n for n in names if chosen.get(n) == (norm, kind)]
        records.append({"prev": norm, "kind": kind, "layers": layers, "scales": candidates[(norm, kind)]})
        for n in layers:
            w[n] = w[n] * candidates[(norm, kind)][None, :]
    for name in names:  # linear → linear: a sibling before it whose rows were divided by its columns' scales
        if name in chosen:
            continue
        parent = name.rpartition(".")[0]
        before = {p: 1 / _row_ratios(w_q[p], w[p]).clamp_min(1e-6) for p in names
                  if p != name and p.rpartition(".")[0] == parent and w[p].shape[0] == w[name].shape[1]
                  and not any(r["prev"] == p for r in records)}
        none = _fit_error(w_q[name], w[name])
        fits = {p: _fit_error(w_q[name], w[name], t) for p, t in before.items()}
        best = min(fits, key=fits.__getitem__, default=None)
        if best is None or fits[best] >= MARGIN * none:
            continue
        scales = _joint_scales(w_q[best], w[best], w_q[name], w[name], before[best])
        bias = f"{best}.bias"
        if bias in q and bias in o:  # the bias was divided by the same scales and kept in float: exact there
            from_bias = _ratio(o[bias].float(), q[bias].float(), 0)  # b_original / b_awq, 0 where b_awq is 0
            scales = torch.where(from_bias > 0, from_bias, scales)
        records.append({"prev": best, "kind": "linear", "layers": [name], "scales": scales})
        w[name] = w[name] * scales[None, :]
        w[best] = w[best] / scales[:, None]
    for name in names:  # every linear now in the AWQ model's coordinates, or an error naming it
        offset = _column_offset(w_q[name], w[name])
        if offset > _offset_limit(w_q[name], w[name]):
            raise ValueError(
                f"{name}'s columns stay scaled against the original after the recovered scalings (median |log ratio| "
                f"{offset:.3f}): no norm or linear before it explains them. Is {block or 'it'} from the model AWQ "
                "quantized, and a norm→linear / linear→linear model (Llama family)?")
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
