"""The layer-by-layer EoRA driver: statistics → residual → factors → installed LoRA weights.

    >>> from peft_eora.compensate import compensate
    >>> stats = compensate(model, "default", original, batches, method="eora", damping=0.01)

``model`` is a transformers model whose target linears are already wrapped in PEFT LoRA
layers (``get_peft_model`` does that; :func:`peft_eora.initialize_eora_weights` is the public
entry point). The inputs of decoder block 0 are captured once; then, block by block, the input
second moment ``H = Σ xᵀx`` (float32) of each targeted linear is accumulated, the factors are
computed and installed, and the *compensated* block's outputs feed the next block. Within a
block, modules are processed in execution order by groups sharing one input (q/k/v, o,
gate/up, down in a Llama block), so each group sees the compensated groups before it.

``damping="auto"`` splits the calibration windows (every ``AUTO_HOLDOUT_EVERY``-th window held
out) and accumulates two covariances per group in the same forward passes; each layer's ridge
is chosen on the held-out one, then the factors are refitted on both (see
:func:`peft_eora.decompose.eora_factors_auto`). :func:`plan_ranks` is the statistics pass of
``rank_allocation="spectrum"``: one uncompensated pass over the blocks that records each layer's
projected residual spectrum and allocates per-layer ranks under a parameter budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from tqdm.auto import tqdm

from .calibration import Batch, count_tokens
from .decompose import (
    AUTO_HOLDOUT_EVERY,
    allocate_ranks,
    captured_energy,
    check_rank,
    eigen,
    eigen_projection,
    eora_factors,
    eora_factors_auto,
    projected_spectrum,
    weighted_error,
)
from .original import ModelMismatchError, OriginalWeights
from .residual import UnsupportedModuleError, backend_for

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook to cut a forward pass short once the needed inputs were seen."""


@dataclass
class Target:
    """One targeted linear: its name in the base model, its LoRA wrapper and its block."""

    name: str
    layer: LoraLayer
    block: int
    rank: int

    @property
    def base(self) -> nn.Module:
        return self.layer.get_base_layer()

    @property
    def shape(self) -> tuple[int, int]:
        base = self.base
        return (int(base.out_features), int(base.in_features))


@dataclass
class ModuleStats:
    name: str
    rank: int
    error_before: float  # ‖ΔW·Xᵀ‖_F over the calibration tokens
    error_after: float  # ‖(ΔW − BA)·Xᵀ‖_F
    energy_retained: float
    kept_eigen: int
    damping: Optional[float] = None  # the ridge used (chosen per layer by damping="auto"); None for SVD
    heldout_errors: Optional[dict[float, float]] = None  # damping="auto": held-out error per candidate δ


@dataclass
class CompensationStats:
    """What a run measured; ``summary()`` is what goes into ``EoRAConfig.eora_stats``.

    With ``damping="auto"`` the summary also has ``damping_per_module`` (the δ chosen for each
    module), ``damping_counts`` and ``heldout_tokens``; with a rank allocation, ``rank_allocation``.
    """

    method: str
    damping: Union[float, str]
    tokens: int
    seconds: float = 0.0
    modules: list[ModuleStats] = field(default_factory=list)
    heldout_tokens: int = 0
    allocation: Optional[dict[str, Any]] = None

    def summary(self) -> dict[str, Any]:
        rel = [m.error_after / m.error_before for m in self.modules if m.error_before > 0]
        out: dict[str, Any] = {
            "method": self.method,
            "damping": self.damping,
            "calibration_tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "modules": len(self.modules),
            "mean_relative_error_after": (sum(rel) / len(rel)) if rel else None,
        }
        if self.damping == "auto" and self.method != "svd":
            chosen = {m.name: m.damping for m in self.modules}
            counts = Counter(chosen.values())
            out["heldout_tokens"] = self.heldout_tokens
            out["damping_counts"] = {f"{d:g}": counts[d] for d in sorted(counts)}
            out["damping_per_module"] = chosen
        if self.allocation is not None:
            out["rank_allocation"] = self.allocation
        return out


def find_targets(model: nn.Module, adapter_name: str) -> tuple[nn.ModuleList, list[Target]]:
    """The decoder-block list and every LoRA layer carrying ``adapter_name`` inside it."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r]
    if not named:
        raise ValueError(f"No LoRA layer with adapter {adapter_name!r} found: nothing to compensate.")
    for name, layer in named:
        if adapter_name not in layer.lora_A:  # embeddings/convs keep other LoRA parameter names
            backend_for(layer.get_base_layer(), name)  # raises with the supported formats
            raise UnsupportedModuleError(f"{name} ({type(layer).__name__}) is not a linear LoRA layer; EoRA needs linears.")
    blocks_path: Optional[str] = None
    targets: list[Target] = []
    for name, layer in named:
        parts = name.split(".")
        hit = None
        for i in range(len(parts) - 1, 0, -1):
            if parts[i].isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
                hit = (".".join(parts[:i]), int(parts[i]))
                break
        if hit is None:
            raise ValueError(
                f"{name} is not inside the model's decoder blocks; EoRA compensates block by block. Remove it from "
                "target_modules (the default targets every linear inside the blocks)."
            )
        if blocks_path is None:
            blocks_path = hit[0]
        elif hit[0] != blocks_path:
            raise ValueError(f"Targets span two block lists ({blocks_path} and {hit[0]}); compensate one at a time.")
        targets.append(Target(name, layer, hit[1], int(layer.r[adapter_name])))
    assert blocks_path is not None
    return model.get_submodule(blocks_path), targets


def validate(targets: list[Target], original: OriginalWeights, check_ranks: bool = True) -> None:
    """Check every target before any work: back-end, original weight and shape, rank."""
    for t in targets:
        backend_for(t.base, t.name)
        original.check(t.name, t.shape)
        if check_ranks:
            check_rank(t.rank, *t.shape, name=t.name)


def holdout_rows(batches: list[Batch], every: int = AUTO_HOLDOUT_EVERY) -> list[torch.Tensor]:
    """Per batch, a bool mask over its windows (rows): True for the windows held out by ``damping="auto"``.

    Window ``i`` (counted over all batches, in order) is held out when ``i % every == every − 1``.
    Raises ``ValueError`` when there are fewer than ``every`` windows (none could be held out).
    """
    rows, start = [], 0
    for b in batches:
        n = int(b["input_ids"].shape[0])
        rows.append(torch.arange(start, start + n) % every == every - 1)
        start += n
    if start < every:
        raise ValueError(
            f"damping='auto' holds out every {every}th calibration window to choose the damping, so it needs at "
            f"least {every} windows; got {start}. Use more calibration samples (num_samples ≥ {every}) or a fixed "
            "damping such as 0.01."
        )
    return rows


def _split_tokens(batches: list[Batch], rows: list[torch.Tensor]) -> tuple[int, int]:
    """(fit, held-out) real-token counts for the split ``rows``."""
    fit = val = 0
    for b, r in zip(batches, rows):
        per_row = b["attention_mask"].sum(-1) if "attention_mask" in b else torch.full(
            (b["input_ids"].shape[0],), b["input_ids"].shape[-1]
        )
        val += int(per_row[r].sum())
        fit += int(per_row[~r].sum())
    return fit, val


def _device_of(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: list[Batch]
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run the model up to ``first_block`` for each batch; return (hidden_states, kwargs) per batch."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        rest.pop("past_key_values", None)
        rest.pop("past_key_value", None)
        rest["use_cache"] = False
        captured.append((hidden.detach(), rest))
        raise _StopForward

    device = _device_of(model)
    with _hooks([first_block.register_forward_pre_hook(pre_hook, with_kwargs=True)]):
        for batch in batches:
            try:
                model(**_to(batch, device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires for decoder models
                raise RuntimeError("The first decoder block was never called; is this a decoder model?")
    return captured


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _input_groups(
    block: nn.Module, targets: list[Target], sample: tuple[torch.Tensor, dict[str, Any]]
) -> list[list[Target]]:
    """Targets of a block in execution order, grouped by shared input tensor."""
    order: list[tuple[Target, torch.Tensor]] = []  # holding the inputs keeps their identity unambiguous
    handles = []
    for t in targets:
        def hook(_m: nn.Module, args: tuple, t: Target = t) -> None:
            if all(o[0] is not t for o in order):
                order.append((t, args[0]))
        handles.append(t.layer.register_forward_pre_hook(hook))
    with _hooks(handles), torch.no_grad():
        hidden, kwargs = sample
        block(hidden, **kwargs)
    missing = [t.name for t in targets if all(o[0] is not t for o in order)]
    if missing:
        raise RuntimeError(f"These targeted modules are never called in the forward pass: {missing}.")
    groups: list[list[Target]] = []
    last_input: Optional[torch.Tensor] = None
    for t, x in order:
        if groups and x is last_input:
            groups[-1].append(t)
        else:
            groups.append([t])
        last_input = x
    return groups


def _accumulate_covariances(
    block: nn.Module,
    groups: list[list[Target]],
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    masks: list[Optional[torch.Tensor]],
    holdout: Optional[list[torch.Tensor]] = None,
) -> list[list[torch.Tensor]]:
    """Σ xᵀx (float32) of each group's shared input over all batches: ``[H]`` per group, or
    ``[H_fit, H_val]`` when ``holdout`` (per batch, a bool mask of held-out rows) is given.

    One hook per group (its first member); each pass stops as soon as every group was seen.
    """
    parts = 1 if holdout is None else 2
    H = [
        [torch.zeros(g[0].shape[1], g[0].shape[1], dtype=torch.float32, device=_device_of(g[0].base)) for _ in range(parts)]
        for g in groups
    ]
    seen: set[int] = set()
    current_mask: list[Optional[torch.Tensor]] = [None]
    current_rows: list[Optional[torch.Tensor]] = [None]

    def make_hook(i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            if i in seen:
                return
            inp = args[0].detach()
            x = inp.reshape(-1, inp.shape[-1])
            mask = current_mask[0]
            if parts == 1:
                if mask is not None:
                    x = x[mask.reshape(-1).to(x.device).bool()]
                x = x.float()
                H[i][0].addmm_(x.T, x)
            else:
                rows = current_rows[0]
                assert rows is not None
                if inp.ndim < 3 or inp.shape[0] != rows.numel():
                    raise RuntimeError(
                        f"damping='auto' needs (batch, seq, features) inputs to split windows; {groups[i][0].name} "
                        f"got shape {tuple(inp.shape)} for a batch of {rows.numel()}. Use a fixed damping."
                    )
                val = rows.to(x.device).view(-1, *([1] * (inp.ndim - 2))).expand(inp.shape[:-1]).reshape(-1)
                keep = mask.reshape(-1).to(x.device).bool() if mask is not None else torch.ones_like(val)
                for part, sel in ((0, keep & ~val), (1, keep & val)):
                    xs = x[sel].float()
                    H[i][part].addmm_(xs.T, xs)
            seen.add(i)
            if len(seen) == len(groups):
                raise _StopForward

        return hook

    handles = [g[0].layer.register_forward_pre_hook(make_hook(i)) for i, g in enumerate(groups)]
    with _hooks(handles):
        for j, ((hidden, kwargs), mask) in enumerate(zip(inputs, masks)):
            seen.clear()
            current_mask[0] = mask
            current_rows[0] = holdout[j] if holdout is not None else None
            try:
                block(hidden, **kwargs)
            except _StopForward:
                pass
    return H


@torch.no_grad()
def compensate(
    model: nn.Module,
    adapter_name: str,
    original: OriginalWeights,
    batches: list[Batch],
    method: str = "eora",
    damping: Union[float, str] = 0.0,
    eig_rtol: float = 1e-10,
    sequential: bool = True,
    progress: bool = True,
) -> CompensationStats:
    """Compute and install EoRA factors for every LoRA layer of ``adapter_name`` (see module doc).

    ``damping`` is a ridge ``δ ≥ 0`` or ``"auto"`` (chosen per layer on held-out windows).
    """
    _check_damping_arg(damping)
    blocks, targets = find_targets(model, adapter_name)
    validate(targets, original)
    stats = CompensationStats(method=method, damping=damping, tokens=count_tokens(batches) if method != "svd" else 0)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    for t in targets:  # adapters not yet computed must contribute nothing
        t.layer.lora_B[adapter_name].weight.zero_()

    try:
        if method == "svd":  # the baseline needs no activations: no forward pass at all
            for t in tqdm(targets, desc="SVD", unit="module", disable=not progress):
                stats.modules.append(_install(t, adapter_name, original, None, None, method, eig_rtol))
        else:
            _compensate_blocks(model, blocks, targets, adapter_name, original, batches, stats, damping, eig_rtol,
                               sequential, progress)
    except BaseException:
        # nothing half-written: a failure leaves every adapter as a zero update
        for t in targets:
            t.layer.lora_B[adapter_name].weight.zero_()
        raise
    finally:
        model.train(was_training)
    stats.seconds = time.perf_counter() - start
    logger.info(
        "EoRA (%s, damping %s): %d modules in %.1f s over %d tokens", method, damping, len(stats.modules),
        stats.seconds, stats.tokens,
    )
    return stats


def _check_damping_arg(damping: Union[float, str]) -> None:
    if damping == "auto":
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (0 <= damping < float("inf")):
        raise ValueError(f"damping must be a finite number ≥ 0 or 'auto', got {damping!r}.")


def _compensate_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    targets: list[Target],
    adapter_name: str,
    original: OriginalWeights,
    batches: list[Batch],
    stats: CompensationStats,
    damping: Union[float, str],
    eig_rtol: float,
    sequential: bool,
    progress: bool,
) -> None:
    if stats.tokens == 0:
        raise ValueError("The calibration data is empty: no token to estimate the activation statistics from.")
    auto = damping == "auto"
    holdout = holdout_rows(batches) if auto else None
    if holdout is not None:
        fit_tokens, stats.heldout_tokens = _split_tokens(batches, holdout)
        if fit_tokens == 0 or stats.heldout_tokens == 0:
            raise ValueError(
                f"damping='auto' found {fit_tokens} fit and {stats.heldout_tokens} held-out calibration tokens (every "
                f"{AUTO_HOLDOUT_EVERY}th window held out, padding excluded); both must be non-empty."
            )
    inputs = capture_block_inputs(model, blocks[0], batches)
    masks = [b.get("attention_mask") for b in batches]
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    last = max(by_block)
    for idx in tqdm(range(last + 1), desc="EoRA", unit="block", disable=not progress):
        block = blocks[idx]
        device = _device_of(block)
        inputs = [(_to(h, device), _to(kw, device)) for h, kw in inputs]
        block_targets = by_block.get(idx, [])
        if block_targets:
            groups = _input_groups(block, block_targets, inputs[0])
            passes = [[g] for g in groups] if sequential else [groups]
            for pass_groups in passes:
                for group, Hs in zip(pass_groups, _accumulate_covariances(block, pass_groups, inputs, masks, holdout)):
                    if auto:  # one eigh of H_fit (every δ) and one of H_fit + H_val, shared by the group's members
                        H_fit, H_val = Hs
                        H = H_fit + H_val
                        shared = (H_fit, H_val, eigen(H_fit), eigen(H))
                        for t in group:
                            stats.modules.append(_install(t, adapter_name, original, H, None, "eora", eig_rtol, auto=shared))
                        del shared
                    else:
                        H = Hs[0]
                        projection = eigen_projection(H, damping, eig_rtol)  # shared by the group's members
                        for t in group:
                            stats.modules.append(
                                _install(t, adapter_name, original, H, projection, "eora", eig_rtol, damping=damping)
                            )
                        del projection
                    del H, Hs
        if idx < last:
            inputs = [(_block_output(block(h, **kw)), kw) for h, kw in inputs]


def _install(
    t: Target,
    adapter_name: str,
    original: OriginalWeights,
    H: Optional[torch.Tensor],
    projection: Optional[tuple[torch.Tensor, torch.Tensor, int]],
    method: str,
    eig_rtol: float,
    damping: Optional[float] = None,
    auto: Optional[tuple[torch.Tensor, torch.Tensor, Any, Any]] = None,
) -> ModuleStats:
    device = H.device if H is not None else _device_of(t.base)
    delta = _residual(t, original, device)
    heldout_errors = None
    if auto is not None:
        H_fit, H_val, fit, full = auto
        factors, choice = eora_factors_auto(delta, H_fit, H_val, t.rank, eig_rtol=eig_rtol, name=t.name, fit=fit, full=full)
        damping, heldout_errors = choice.damping, choice.errors
        logger.debug("%s: damping %g chosen, held-out errors %s", t.name, damping, heldout_errors)
    else:
        factors = eora_factors(delta, H, t.rank, method=method, eig_rtol=eig_rtol, name=t.name, projection=projection)
    lora_A, lora_B = t.layer.lora_A[adapter_name], t.layer.lora_B[adapter_name]
    scaling = t.layer.scaling[adapter_name]
    lora_A.weight.copy_(factors.A.to(lora_A.weight))
    lora_B.weight.copy_((factors.B / scaling).to(lora_B.weight))
    approx = factors.B @ factors.A
    if H is not None:
        before, after = weighted_error(delta, H), weighted_error(delta, H, approx)
    else:  # plain SVD: the unweighted Frobenius error
        before, after = float(delta.norm()), float((delta - approx).norm())
    logger.debug("%s: error %.4g -> %.4g (r=%d)", t.name, before, after, t.rank)
    return ModuleStats(
        t.name, t.rank, before, after, factors.energy_retained, factors.kept_eigen,
        damping=None if method == "svd" else damping, heldout_errors=heldout_errors,
    )


def _residual(t: Target, original: OriginalWeights, device: torch.device) -> torch.Tensor:
    """``ΔW = W_original − W_compressed`` of one target (float, on ``device``), NaN/inf refused."""
    w_fp, w_q = _weights(t, original, device)
    return w_fp - w_q


def _weights(t: Target, original: OriginalWeights, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_original, W_compressed)`` of one target (float, on ``device``), NaN/inf refused."""
    w_q = backend_for(t.base, t.name).dequantize(t.base).to(device)
    w_fp = original.get(t.name, device)
    for label, w in (("compressed", w_q), ("original", w_fp)):
        if not torch.isfinite(w).all():
            raise ModelMismatchError(f"The {label} weight of {t.name} contains NaN or inf; fix the checkpoint first.")
    return w_fp, w_q


@dataclass
class RankPlan:
    """Per-layer ranks from :func:`plan_ranks`; ``summary()`` goes into ``eora_stats["rank_allocation"]``."""

    ranks: dict[str, int]
    budget: int  # parameters allowed (A and B of every targeted layer)
    params: int  # parameters the allocated ranks use (≤ budget)
    uniform_params: int  # parameters of the ranks configured before allocation (r / rank_pattern)
    captured: float  # share of the summed gains (s², or s²/‖W·Xᵀ‖² for gain="relative") the ranks capture
    uniform_captured: float  # the same share for the configured ranks
    gain: str = "relative"  # "relative": s_k² / ‖W·Xᵀ‖²_F per layer; "absolute": s_k²
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        ranks = list(self.ranks.values())
        return {
            "method": "spectrum",
            "gain": self.gain,
            "budget_params": self.budget,
            "params": self.params,
            "configured_params": self.uniform_params,
            "min_rank": min(ranks),
            "max_rank": max(ranks),
            "captured_energy": round(self.captured, 6),
            "configured_captured_energy": round(self.uniform_captured, 6),
            "seconds": round(self.seconds, 3),
        }


@torch.no_grad()
def collect_spectra(
    model: nn.Module,
    adapter_name: str,
    original: OriginalWeights,
    batches: list[Batch],
    method: str = "eora",
    damping: float = 0.0,
    eig_rtol: float = 1e-10,
    progress: bool = True,
) -> tuple[list[Target], dict[str, torch.Tensor], dict[str, float]]:
    """The targets, the spectrum of each one's projected residual ``ΔW·Q·diag(√λ)`` and each
    one's output energy ``‖W_original·Xᵀ‖²_F = tr(W·H·Wᵀ)`` (``‖W‖²_F`` for SVD), uncompensated.

    One pass over the blocks with every adapter a zero update (its ``lora_B`` is zeroed): per
    block, one forward over the calibration batches accumulates one covariance per input group
    (all groups at once); per layer, a product with H, at most one Cholesky and one ``eigvalsh``
    of a ``min(out, in)``-square matrix (no eigendecomposition of H). ``method="svd"`` needs no
    forward pass (spectrum of ``ΔW``).
    """
    blocks, targets = find_targets(model, adapter_name)
    validate(targets, original, check_ranks=False)
    was_training = model.training
    model.eval()
    for t in targets:
        t.layer.lora_B[adapter_name].weight.zero_()
    spectra: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    try:
        if method == "svd":
            for t in tqdm(targets, desc="Spectra", unit="module", disable=not progress):
                w_fp, w_q = _weights(t, original, _device_of(t.base))
                spectra[t.name] = projected_spectrum(w_fp - w_q, None, method="svd")
                energy[t.name] = float(w_fp.double().pow(2).sum())
            return targets, spectra, energy
        if count_tokens(batches) == 0:
            raise ValueError("The calibration data is empty: no token to estimate the activation statistics from.")
        inputs = capture_block_inputs(model, blocks[0], batches)
        masks = [b.get("attention_mask") for b in batches]
        by_block: dict[int, list[Target]] = {}
        for t in targets:
            by_block.setdefault(t.block, []).append(t)
        last = max(by_block)
        for idx in tqdm(range(last + 1), desc="Spectra", unit="block", disable=not progress):
            block = blocks[idx]
            device = _device_of(block)
            inputs = [(_to(h, device), _to(kw, device)) for h, kw in inputs]
            block_targets = by_block.get(idx, [])
            if block_targets:
                groups = _input_groups(block, block_targets, inputs[0])
                for group, (H,) in zip(groups, _accumulate_covariances(block, groups, inputs, masks)):
                    for t in group:  # no eigendecomposition: a Cholesky at most (see projected_spectrum)
                        w_fp, w_q = _weights(t, original, H.device)
                        spectra[t.name] = projected_spectrum(w_fp - w_q, H, damping=damping, eig_rtol=eig_rtol).cpu()
                        w = w_fp.double()
                        energy[t.name] = float(((w @ H.double()) * w).sum())
                    del H
            if idx < last:
                inputs = [(_block_output(block(h, **kw)), kw) for h, kw in inputs]
    finally:
        model.train(was_training)
    return targets, spectra, energy


def plan_ranks(
    model: nn.Module,
    adapter_name: str,
    original: OriginalWeights,
    batches: list[Batch],
    method: str = "eora",
    damping: float = 0.0,
    eig_rtol: float = 1e-10,
    budget: Optional[int] = None,
    min_rank: int = 1,
    max_rank: Optional[int] = None,
    gain: str = "relative",
    progress: bool = True,
) -> RankPlan:
    """Allocate per-layer ranks under a parameter budget from each layer's residual spectrum::

        >>> plan = plan_ranks(model, "default", original, batches, damping=0.01)
        >>> plan.ranks["model.layers.0.self_attn.q_proj"], plan.params <= plan.budget

    ``budget`` (parameters of all ``lora_A``/``lora_B``) defaults to that of the ranks the
    layers have now (``r``/``rank_pattern``); ranks stay within ``[min_rank, max_rank]`` and
    below each layer's ``min(out, in)``. ``gain="relative"`` ranks by ``s_k² / ‖W·Xᵀ‖²_F``, what
    the k-th rank removes from the layer's squared *relative* output error; ``"absolute"`` by
    ``s_k²`` (which favours layers with large activations). See :func:`collect_spectra` for the cost.
    """
    if gain not in ("relative", "absolute"):
        raise ValueError(f"gain must be 'relative' or 'absolute', got {gain!r}.")
    start = time.perf_counter()
    _, targets = find_targets(model, adapter_name)
    costs = {t.name: sum(t.shape) for t in targets}
    uniform_params = sum(t.rank * costs[t.name] for t in targets)
    budget = uniform_params if budget is None else int(budget)
    # bounds and budget checked before any work (a dry run on empty spectra)
    allocate_ranks({t.name: torch.zeros(min(t.shape)) for t in targets}, costs, budget, min_rank, max_rank)
    targets, spectra, energy = collect_spectra(model, adapter_name, original, batches, method, damping, eig_rtol, progress)
    if gain == "relative":  # s_k / ‖W·Xᵀ‖: the greedy then ranks by reduction of squared relative error
        spectra = {n: s / math.sqrt(energy[n]) if energy[n] > 0 else s for n, s in spectra.items()}
    configured = {t.name: t.rank for t in targets}
    ranks = allocate_ranks(spectra, costs, budget, min_rank=min_rank, max_rank=max_rank)
    total = sum(float((s.double() ** 2).sum()) for s in spectra.values())
    clipped = {n: min(r, spectra[n].numel()) for n, r in configured.items()}
    plan = RankPlan(
        ranks=ranks,
        budget=budget,
        params=sum(ranks[n] * costs[n] for n in costs),
        uniform_params=uniform_params,
        captured=captured_energy(spectra, ranks) / total if total > 0 else 1.0,
        uniform_captured=captured_energy(spectra, clipped) / total if total > 0 else 1.0,
        gain=gain,
        seconds=time.perf_counter() - start,
    )
    logger.info(
        "Rank allocation: %d modules, ranks %d–%d, %d of %d parameters (configured ranks: %d), energy captured %.4f "
        "(configured ranks: %.4f), %.1f s", len(ranks), min(ranks.values()), max(ranks.values()), plan.params,
        plan.budget, plan.uniform_params, plan.captured, plan.uniform_captured, plan.seconds,
    )
    return plan
