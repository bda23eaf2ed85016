"""Prune a checkpoint (Wanda or SparseGPT; 2:4 / N:M semi-structured or unstructured) into a
dense float model whose linears hold zeros: the ``dense`` residual back-end handles it.

    >>> from peft_eora.embedded import export_original
    >>> from peft_eora.prune import prune
    >>> p24 = prune(export_original(), method="sparsegpt", pattern="2:4")    # cached afterwards
    >>> p50 = prune(export_original(), method="wanda", sparsity=0.5)          # unstructured, 50 %
    >>> model = AutoModelForCausalLM.from_pretrained(p24)                      # plain nn.Linear

Methods, per linear inside the decoder blocks (``lm_head`` and embeddings stay dense), with
``X`` the layer's calibration inputs:

- ``"wanda"`` (Sun et al. 2023): score ``|W_ij|·‖X_j‖₂``; each output row drops its lowest
  scores (unstructured: ``sparsity`` of the row; ``N:M``: the ``M−N`` lowest of every ``M``
  consecutive inputs). Kept weights are unchanged.
- ``"sparsegpt"`` (Frantar & Alistarh 2023): with ``H = XᵀX + λI`` (``damp``·mean diag), columns
  are pruned left to right in blocks of 128 by the OBS saliency ``w²/[H⁻¹]_jj²`` and each
  removal's error is pushed onto the not-yet-pruned columns (kept weights are updated).
  Unstructured masks are chosen per 128-column block over all rows, as in the reference code.

Layer by layer as the references do: the inputs of block 0 are captured once; in each block
one forward pass gathers the statistics of all its linears, they are pruned, and the *pruned*
block's outputs feed the next block. Calibration is :func:`peft_eora.quantize.gptq_calibration`
(the shipped C4 sample, file order, consecutive windows) so pruned and quantized bases see the
same tokens. Computation runs in float32; the result is saved in the source's dtype to
``cache_dir()/models/<name>-<path hash>-<method>-<2of4|u50>[-n<N>x<L>]`` with ``peft_eora_quantize.json``
(method, pattern, measured sparsity, calibration, versions, times), atomically.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .embedded import atomic_publish, check_publishable, dtype_name, is_complete, make_temp_dir, remove_stale_temps
from .quantize import DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, META_FILE, _versions, calibration_metadata, gptq_calibration
from .quantize.checkpoints import cached_model_dir, machine_metadata, recorded_differences, source_setting

logger = logging.getLogger(__name__)

METHODS = ("wanda", "sparsegpt")
SPARSEGPT_BLOCK = 128


def parse_pattern(pattern: Optional[str], sparsity: Optional[float]) -> tuple[Optional[tuple[int, int]], float]:
    """``("2:4", None)`` → ``((2, 4), 0.5)``; ``(None, 0.5)`` → ``(None, 0.5)`` (unstructured).

    ``N:M`` keeps ``N`` of every ``M`` consecutive weights of a row (sparsity ``1 − N/M``).
    """
    if pattern is not None:
        try:
            n, m = (int(v) for v in pattern.split(":"))
        except ValueError:
            raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}.") from None
        if not 0 < n < m:
            raise ValueError(f"pattern {pattern!r}: need 0 < N < M.")
        if sparsity is not None and not math.isclose(sparsity, 1 - n / m):
            raise ValueError(f"pattern {pattern!r} means sparsity {1 - n / m:g}; got sparsity={sparsity}.")
        return (n, m), 1 - n / m
    if sparsity is None or not 0.0 < sparsity < 1.0:
        raise ValueError(f"Unstructured pruning needs 0 < sparsity < 1, got {sparsity!r} (or pass pattern='2:4').")
    return None, float(sparsity)


def pattern_label(nm: Optional[tuple[int, int]], sparsity: float) -> str:
    """``(2, 4)`` → ``"2of4"``; unstructured 0.5 → ``"u50"``, 0.504 → ``"u50.4"`` (folder-name friendly, exact: nearby
    sparsities are other models)."""
    return f"{nm[0]}of{nm[1]}" if nm else f"u{sparsity * 100:.6g}"


def pruned_dir(
    model_dir: str | Path,
    method: str = "wanda",
    pattern: Optional[str] = "2:4",
    sparsity: Optional[float] = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Path:
    """Default output folder of :func:`prune` for these settings."""
    nm, ratio = parse_pattern(pattern, sparsity)
    return cached_model_dir(model_dir, f"{method}-{pattern_label(nm, ratio)}", num_samples, seq_len)


# --------------------------------------------------------------------------------------------
# masks and updates (pure tensor functions)


def wanda_mask(weight: torch.Tensor, col_norm_sq: torch.Tensor, nm: Optional[tuple[int, int]], sparsity: float) -> torch.Tensor:
    """Boolean mask of the weights Wanda removes (True = pruned), per output row.

    ``col_norm_sq`` is ``Σ_tokens x_j²`` per input column.
    >>> mask = wanda_mask(W, (X * X).sum(0), (2, 4), 0.5)
    """
    score = weight.abs().float() * col_norm_sq.float().clamp_min(0).sqrt()[None, :]
    out_f, in_f = score.shape
    if nm is not None:
        n, m = nm
        grouped = score.reshape(out_f, in_f // m, m)
        drop = torch.topk(grouped, m - n, dim=-1, largest=False).indices
        mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, drop, True)
        return mask.reshape(out_f, in_f)
    k = int(in_f * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def sparsegpt_prune(
    weight: torch.Tensor, H: torch.Tensor, nm: Optional[tuple[int, int]], sparsity: float, damp: float = 0.01,
    blocksize: int = SPARSEGPT_BLOCK,
) -> torch.Tensor:
    """SparseGPT: the pruned and error-compensated weight (float32, same shape as ``weight``).

    ``H = Σ xᵀx`` of the layer's inputs. Dead inputs (zero diagonal) get their weights zeroed.
    >>> W_sparse = sparsegpt_prune(W, X.T @ X, (2, 4), 0.5)
    """
    W = weight.detach().float().clone()
    H = H.detach().double().clone()
    cols = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * float(torch.diagonal(H).mean()) * torch.eye(cols, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # upper Cholesky of H⁻¹
    if nm is not None:  # blocks of whole N:M groups (1:3 or 2:6 in blocks of 128 cut groups in two)
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        if nm is None:
            saliency = W1.pow(2) / d[None, :].pow(2)
            k = int(saliency.numel() * sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                mask1.view(-1)[torch.topk(saliency.view(-1), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                sal = W1[:, i : i + m].pow(2) / d[i : i + m][None, :].pow(2)
                mask1.scatter_(1, i + torch.topk(sal, m - n, dim=1, largest=False).indices, True)
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


# --------------------------------------------------------------------------------------------
# the model-level driver


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def _batches(examples: list[dict[str, list[int]]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive examples of equal length stacked into ``{"input_ids": (b, L)}`` batches."""
    out: list[dict[str, torch.Tensor]] = []
    run: list[list[int]] = []
    for ex in examples:
        if run and (len(ex["input_ids"]) != len(run[0]) or len(run) == batch_size):
            out.append({"input_ids": torch.tensor(run)})
            run = []
        run.append(ex["input_ids"])
    if run:
        out.append({"input_ids": torch.tensor(run)})
    return out


@torch.no_grad()
def prune_model_(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    method: str = "wanda",
    pattern: Optional[str] = "2:4",
    sparsity: Optional[float] = None,
    damp: float = 0.01,
    progress: bool = True,
) -> dict[str, float]:
    """Prune every ``nn.Linear`` inside ``model``'s decoder blocks in place (see the module doc);
    returns the measured sparsity per pruned module.

    >>> prune_model_(model, [{"input_ids": ids}], method="wanda", pattern="2:4")
    """
    from .walker import capture_inputs, with_block_kwargs
    from .model import decoder_blocks_path

    if method not in METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; choose one of {METHODS}.")
    nm, ratio = parse_pattern(pattern, sparsity)
    if not batches:
        raise ValueError("Pruning needs calibration batches; got none.")
    path = decoder_blocks_path(model)
    blocks = model.get_submodule(path)
    if not any(_linears(block) for block in blocks):
        raise ValueError(f"{type(model).__name__} has no nn.Linear in its decoder blocks ({path}) to prune; this "
                         "pruner handles nn.Linear only (not transformers' Conv1D, GPT-2's layers).")
    for b, block in enumerate(blocks):
        for name, lin in _linears(block).items():
            full = f"{path}.{b}.{name}"
            if not torch.isfinite(lin.weight).all():
                raise ValueError(f"The weight of {full} contains NaN or inf; fix the checkpoint before pruning.")
            if nm is not None and lin.in_features % nm[1]:
                raise ValueError(f"{full} has {lin.in_features} inputs, not a multiple of M={nm[1]} for pattern {pattern}.")
    was_training = model.training
    model.eval()
    inputs, block_kwargs = capture_inputs(model, blocks, batches)
    measured: dict[str, float] = {}
    try:
        for b, block in enumerate(tqdm(blocks, desc=f"{method} {pattern or ratio}", unit="block", disable=not progress)):
            linears = _linears(block)
            stats = {n: _new_stat(lin, method) for n, lin in linears.items()}
            handles = [lin.register_forward_pre_hook(_stat_hook(stats, n, method)) for n, lin in linears.items()]
            inputs = with_block_kwargs(inputs, block_kwargs[b])
            try:
                for hidden, kwargs in inputs:
                    block(hidden, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for name, lin in linears.items():
                W = lin.weight
                if method == "wanda":
                    new = W.float().masked_fill(wanda_mask(W, stats[name], nm, ratio), 0.0)
                else:
                    new = sparsegpt_prune(W, stats[name], nm, ratio, damp)
                lin.weight.copy_(new.to(W.dtype))
                measured[f"{path}.{b}.{name}"] = float((lin.weight == 0).float().mean())
            del stats
            if b + 1 < len(blocks):
                inputs = [(_first(block(h, **kw)), kw) for h, kw in inputs]
    finally:
        model.train(was_training)
    return measured


def _new_stat(lin: nn.Linear, method: str) -> torch.Tensor:
    size = (lin.in_features,) if method == "wanda" else (lin.in_features, lin.in_features)
    return torch.zeros(size, dtype=torch.float32, device=lin.weight.device)


def _stat_hook(stats: dict[str, torch.Tensor], name: str, method: str):
    def hook(_m: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if method == "wanda":
            stats[name] += (x * x).sum(0)
        else:
            stats[name].addmm_(x.T, x)

    return hook


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def prune(
    model_dir: str | Path,
    method: str = "wanda",
    pattern: Optional[str] = "2:4",
    sparsity: Optional[float] = None,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    out_dir: str | Path | None = None,
    *,
    damp: float = 0.01,
    batch_size: int = 8,
    device: str = "cpu",
) -> Path:
    """Prune the float checkpoint at ``model_dir``; return the (cached) output folder.

    ``pattern="2:4"`` (default) or any ``"N:M"``; ``pattern=None, sparsity=0.5`` for
    unstructured. ``damp`` is SparseGPT's ridge (fraction of mean diag H). A complete output
    folder is returned at once; one made with other settings raises ``ValueError``.

    >>> p24 = prune(export_original(torch.float32, num_layers=2), "wanda", "2:4", num_samples=8, seq_len=64)
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    nm, ratio = parse_pattern(pattern, sparsity)
    model_dir = Path(model_dir)
    if method not in METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; choose one of {METHODS}.")
    final = Path(out_dir) if out_dir is not None else pruned_dir(model_dir, method, pattern, sparsity, num_samples, seq_len)
    label = pattern_label(nm, ratio)
    if is_complete(final):
        meta = json.loads((final / META_FILE).read_text())
        if (meta.get("method"), meta.get("pattern")) != (method, label):
            raise ValueError(f"{final} holds a {meta.get('method')} {meta.get('pattern')} model, not {method} {label}: "
                             "pass another out_dir or delete it")
        requested = {**source_setting(model_dir), "num_samples": num_samples, "seq_len": seq_len, "sparsity": ratio,
                     **({"damp": damp} if method == "sparsegpt" else {})}
        differ = recorded_differences(meta, requested)
        if differ:
            raise ValueError(f"{final} holds a {method} {label} model made with other settings ({'; '.join(differ)}): "
                             "pass another out_dir or delete it")
        return final
    check_publishable(final)  # an out_dir holding other files: refused before the work, never written over
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint folder (no config.json)")

    source_dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None) or torch.float32
    if isinstance(source_dtype, str):
        source_dtype = getattr(torch, source_dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = gptq_calibration(tokenizer, num_samples, seq_len)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device)
    load_s = time.perf_counter() - start
    logger.info("%s %s of %s on %d tokens → %s", method, label, model_dir, n_tokens, final)
    measured = prune_model_(model, _batches(examples, batch_size), method, pattern, sparsity, damp)
    prune_s = time.perf_counter() - start - load_s

    remove_stale_temps(final)
    tmp = make_temp_dir(final)
    try:
        model.to(source_dtype)
        model.config.dtype = source_dtype
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        values = list(measured.values())
        meta = {
            "method": method,
            "pattern": label,
            "n_m": list(nm) if nm else None,
            "sparsity": ratio,
            "measured_sparsity": {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                                  "modules": len(values)},
            "damp": damp if method == "sparsegpt" else None,
            "order": "block by block; all linears of a block from one pass; pruned outputs feed the next block",
            "compute_dtype": "float32",
            "saved_dtype": dtype_name(source_dtype),
            **source_setting(model_dir),
            "calibration": calibration_metadata(num_samples, len(examples), seq_len, n_tokens, batch_size),
            "versions": _versions(),
            "device": device,
            "machine": machine_metadata(),
            "wall_time_s": {"load": round(load_s, 2), "prune": round(prune_s, 2),
                            "total": round(time.perf_counter() - start, 2)},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        atomic_publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("%s %s done in %.1f s (mean sparsity %.3f): %s", method, label, time.perf_counter() - start,
                meta["measured_sparsity"]["mean"], final)
    return final


__all__ = ["METHODS", "parse_pattern", "pruned_dir", "wanda_mask", "sparsegpt_prune", "prune_model_", "prune"]
