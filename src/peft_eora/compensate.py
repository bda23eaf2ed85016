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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from tqdm.auto import tqdm

from .calibration import Batch, count_tokens
from .decompose import check_rank, eigen_projection, eora_factors, weighted_error
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


@dataclass
class CompensationStats:
    """What a run measured; ``summary()`` is what goes into ``EoRAConfig.eora_stats``."""

    method: str
    damping: float
    tokens: int
    seconds: float = 0.0
    modules: list[ModuleStats] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        rel = [m.error_after / m.error_before for m in self.modules if m.error_before > 0]
        return {
            "method": self.method,
            "damping": self.damping,
            "calibration_tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "modules": len(self.modules),
            "mean_relative_error_after": (sum(rel) / len(rel)) if rel else None,
        }


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


def validate(targets: list[Target], original: OriginalWeights) -> None:
    """Check every target before any work: back-end, original weight and shape, rank."""
    for t in targets:
        backend_for(t.base, t.name)
        original.check(t.name, t.shape)
        check_rank(t.rank, *t.shape, name=t.name)


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
) -> list[torch.Tensor]:
    """Σ xᵀx (float32) of each group's shared input over all batches.

    One hook per group (its first member); each pass stops as soon as every group was seen.
    """
    H = [torch.zeros(g[0].shape[1], g[0].shape[1], dtype=torch.float32, device=_device_of(g[0].base)) for g in groups]
    seen: set[int] = set()
    current_mask: list[Optional[torch.Tensor]] = [None]

    def make_hook(i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            if i in seen:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            mask = current_mask[0]
            if mask is not None:
                x = x[mask.reshape(-1).to(x.device).bool()]
            x = x.float()
            H[i].addmm_(x.T, x)
            seen.add(i)
            if len(seen) == len(groups):
                raise _StopForward

        return hook

    handles = [g[0].layer.register_forward_pre_hook(make_hook(i)) for i, g in enumerate(groups)]
    with _hooks(handles):
        for (hidden, kwargs), mask in zip(inputs, masks):
            seen.clear()
            current_mask[0] = mask
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
    damping: float = 0.0,
    eig_rtol: float = 1e-10,
    sequential: bool = True,
    progress: bool = True,
) -> CompensationStats:
    """Compute and install EoRA factors for every LoRA layer of ``adapter_name`` (see module doc)."""
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
        "EoRA (%s, damping %g): %d modules in %.1f s over %d tokens", method, damping, len(stats.modules),
        stats.seconds, stats.tokens,
    )
    return stats


def _compensate_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    targets: list[Target],
    adapter_name: str,
    original: OriginalWeights,
    batches: list[Batch],
    stats: CompensationStats,
    damping: float,
    eig_rtol: float,
    sequential: bool,
    progress: bool,
) -> None:
    if stats.tokens == 0:
        raise ValueError("The calibration data is empty: no token to estimate the activation statistics from.")
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
                for group, H in zip(pass_groups, _accumulate_covariances(block, pass_groups, inputs, masks)):
                    projection = eigen_projection(H, damping, eig_rtol)  # shared by the group's members
                    for t in group:
                        stats.modules.append(_install(t, adapter_name, original, H, projection, "eora", eig_rtol))
                    del H, projection
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
) -> ModuleStats:
    device = H.device if H is not None else _device_of(t.base)
    w_q = backend_for(t.base, t.name).dequantize(t.base).to(device)
    w_fp = original.get(t.name, device)
    for label, w in (("compressed", w_q), ("original", w_fp)):
        if not torch.isfinite(w).all():
            raise ModelMismatchError(f"The {label} weight of {t.name} contains NaN or inf; fix the checkpoint first.")
    delta = w_fp - w_q
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
    return ModuleStats(t.name, t.rank, before, after, factors.energy_retained, factors.kept_eigen)
