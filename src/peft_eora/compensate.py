"""The layer-by-layer EoRA driver: statistics → residual → factors → installed LoRA weights.

    >>> from peft_eora.compensate import compensate
    >>> stats = compensate(model, "default", original, batches, method="eora", damping=0.01)

``model`` is a transformers model whose target linears are already wrapped in PEFT LoRA
layers (``get_peft_model`` does that; :func:`peft_eora.initialize_eora_weights` is the public
entry point). The inputs of decoder block 0 are captured once; then, block by block
(:class:`~peft_eora.walker.BlockWalker`), the input second moment ``H = Σ xᵀx`` (float32) of
each targeted linear is accumulated, the factors are computed and installed, and the
*compensated* block's outputs feed the next block. Within a block, modules are processed in
execution order by groups sharing one input (q/k/v, o, gate/up, down in a Llama block), so
each group sees the compensated groups before it — all in one forward of the block per
calibration batch (the batches park at each group while its factors are installed). On a CPU in
float32, an installed layer runs the rest of the visit as one dense product ``W_compressed + s·B·A``
(:mod:`peft_eora.merged_forward`); the statistics pass computes no adapter at all (zero updates).

``device`` runs the blocks there (the model may stay on the CPU: offload, one block at a time);
``checkpoint`` (a :class:`~peft_eora.checkpoint.Checkpoint`) makes the run resumable;
``times`` (a :class:`~peft_eora.walker.PhaseTimes`) records seconds per phase.

``damping="auto"`` splits the calibration windows (every ``AUTO_HOLDOUT_EVERY``-th window held
out) and accumulates two covariances per group in the same forward passes; each layer's ridge
is chosen on the held-out one, then the factors are refitted on both (see
:func:`peft_eora.decompose.eora_factors_auto`). :func:`plan_ranks` is the statistics pass of
``rank_allocation="spectrum"``: one uncompensated pass over the blocks that records each layer's
projected residual spectrum and allocates per-layer ranks under a parameter budget.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple, Optional, Union

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from tqdm.auto import tqdm

from . import merged_forward
from ._peft_compat import adapters_off
from .calibration import Batch, count_tokens
from .config import DEFAULT_LOGIT_WEIGHTING, FIXED_DAMPING, LOGIT_WEIGHTINGS, VALUE_WEIGHTINGS
from .decompose import (
    AUTO_HOLDOUT_EVERY,
    Covariance,
    CovarianceRoot,
    Eigen,
    allocate_ranks,
    captured_energy,
    check_rank,
    eigen,
    eora_factors,
    gram_refit,
    is_cut_free,
    projected_spectrum,
    projection_and_root,
    refit_auto,
    select_damping,
    weighted_error,
    weighted_errors,
    weighted_errors_known,
)
from .factor_quant import fit_lowbit_factors
from .logit_weighting import AttentionShape, attention_shape, output_weights, partner, unmodelled
from .original import ModelMismatchError, OriginalWeights
from .residual import UnsupportedModuleError, backend_for
from .residual.base import is_conv1d
from .value_weighting import attached, value_taps, verified
from .walker import (
    NO_TIMES,
    BlockVisit,
    BlockWalker,
    Inputs,
    PhaseTimes,
    capture_block_inputs,
    device_of,
    has_offload_hooks,
    map_tensors,
)

__all__ = [
    "CompensationStats",
    "ModuleStats",
    "RankPlan",
    "Target",
    "capture_block_inputs",
    "collect_spectra",
    "compensate",
    "find_targets",
    "plan_ranks",
    "validate",
]

logger = logging.getLogger(__name__)


@dataclass
class Target:
    """One targeted linear: its name in the base model, its LoRA wrapper and its block."""

    name: str
    layer: LoraLayer
    block: int
    rank: int
    #: the model's activation dtype (its input embeddings'), and the dtype of the layer's inputs in the calibration
    #: walk (None until a batch reached it): a layer read through its forward is read in the latter, else the former
    activation_dtype: Optional[torch.dtype] = None
    input_dtype: Optional[torch.dtype] = None

    @property
    def base(self) -> nn.Module:
        return self.layer.get_base_layer()

    @property
    def shape(self) -> tuple[int, int]:
        base = self.base
        if is_conv1d(base):  # weight (in, out)
            return (int(base.nf), int(base.nx))
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
    weight_error: Optional[float] = None  # ‖ΔW‖_F / ‖W_original‖_F (above 1: further from the original than zeros)


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
    current_block: Optional[int] = None  # the block being computed (error messages)
    warned: set[str] = field(default_factory=set, repr=False)  # warnings given once per run

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
            out["damping_counts"] = {f"{d:g}": counts[d] for d in sorted(counts)}  # "inf": plain SVD
            out["damping_per_module"] = {n: (d if d is None or math.isfinite(d) else "inf") for n, d in chosen.items()}
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
    dtype = activation_dtype(model)
    for name, layer in named:
        parts = name.split(".")
        hit = None
        for i in range(1, len(parts) - 1):  # the outermost list: a MoE's list of experts sits inside a block
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
        targets.append(Target(name, layer, hit[1], int(layer.r[adapter_name]), dtype))
    assert blocks_path is not None
    return model.get_submodule(blocks_path), targets


def activation_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the activations entering the decoder blocks (the input embeddings' weight's), or None."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        weight = getattr(get() if callable(get) else None, "weight", None)
    except Exception:  # noqa: BLE001 - a model whose get_input_embeddings does not apply
        return None
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


def validate(targets: list[Target], original: OriginalWeights, check_ranks: bool = True) -> None:
    """Check every target before any work: back-end, original weight and shape, rank (every kind of layer
    too narrow for its rank named in one error, so that one change of the config fixes them all)."""
    narrow: list[Target] = []
    for t in targets:
        backend_for(t.base, t.name)
        original.check(t.name, t.shape)
        if check_ranks:
            try:
                check_rank(t.rank, *t.shape, name=t.name)
            except ValueError:
                if not (isinstance(t.rank, int) and t.rank > 0):
                    raise
                narrow.append(t)
    if not narrow:
        return
    too_narrow = {t.name for t in narrow}
    kinds = _narrow_kinds([t.name for t in narrow], [t.name for t in targets if t.name not in too_narrow])
    first = {key: next(t for t in narrow if t.name == names[0]) for key, names in kinds.items()}
    regex = any(key != key.replace("\\d+", "") for key in kinds)
    exclude = (f"exclude_modules=r'(.*\\.)?({'|'.join(kinds)})'" if regex  # PEFT matches a str as a whole regex
               else f"exclude_modules={list(kinds)!r}")
    # what fits every layer; excluding is no advice where it would leave nothing to adapt
    largest = min(min(t.shape) for t in targets) - 1  # < 1: some layer (a 1-output gate) holds no rank at all
    lower = "Lower `r` (CLI `--rank`" + (f"; every layer here takes r ≤ {largest})" if largest >= 1 else ")")
    cli = "" if regex else f" (CLI `--exclude-modules {' '.join(kinds)}`)"

    def leave(them: str) -> str:
        if len(narrow) == len(targets) and largest >= 1:  # a lower r fits them all: excluding all is no advice
            return ""
        return f", or leave {them} out with `{exclude}`{cli}"

    if len(kinds) == 1 and not regex:
        key, t = next(iter(first.items()))
        raise ValueError(
            f"EoRA rank r={t.rank} is too large for {t.name} ({t.shape[0]}×{t.shape[1]}): it must be smaller than "
            f"min(out, in) = {min(t.shape)}. {lower}, give {'this module' if len(kinds[key]) == 1 else 'these modules'} "
            f"a smaller rank with `rank_pattern={{{_shown(key)}: <r>}}` (Python API)"
            f"{leave('it' if len(kinds[key]) == 1 else 'them')}."
        )
    ranks = {t.rank for t in first.values()}
    one = len(ranks) == 1  # the same r everywhere: said once
    layers = ", ".join(f"{t.name} ({t.shape[0]}×{t.shape[1]}{'' if one else f', r={t.rank}'})" for t in first.values())
    raise ValueError(
        f"EoRA {f'rank r={ranks.pop()} is' if one else 'ranks are'} too large for {len(kinds)} kind"
        f"{'s' if len(kinds) > 1 else ''} of layer: {layers}; a rank must be smaller than min(out, in). {lower}, "
        f"give them smaller ranks with `rank_pattern={{{', '.join(f'{_shown(k)}: <r>' for k in kinds)}}}` (Python API)"
        f"{leave('them')}."
    )


def _shown(key: str) -> str:
    """A pattern as the user would type it: a raw string where it holds a backslash."""
    return f"r'{key}'" if "\\" in key else repr(key)


def index_pattern(name: str) -> str:
    """``name`` as a regex with its indices as ``\\d+``: ``experts.3.down_proj`` → ``experts\\.\\d+\\.down_proj``."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _narrow_kinds(narrow: list[str], wide: list[str]) -> dict[str, list[str]]:
    """Group the names of layers too narrow for their rank by the shortest name suffix that PEFT's
    ``rank_pattern`` (``re.match(r"(.*\\.)?(key)$", name)``) matches on none of the ``wide`` layers, so that
    the fix the error suggests touches no layer that needs none: ``dt_proj`` in a Mamba, but
    ``shared_expert.down_proj`` in a MoE whose routed experts' ``down_proj`` are wide. Indices become
    ``\\d+`` where that still spares the wide layers (``experts\\.\\d+\\.down_proj``, one key for every expert);
    a key starts at a name, never at an index.

    >>> _narrow_kinds(["l.0.mlp.shared_expert.down_proj"], ["l.0.mlp.experts.3.down_proj"])
    {'shared_expert.down_proj': ['l.0.mlp.shared_expert.down_proj']}
    """
    def spares_wide(key: str) -> bool:
        return not any(re.match(rf"(.*\.)?({key})$", w) for w in wide)

    kinds: dict[str, list[str]] = {}
    for name in narrow:
        parts = name.split(".")
        key = name
        for k in range(1, len(parts) + 1):
            tail = parts[-k:]
            if tail[0].isdigit() and k < len(parts):  # a key starts at a name, not an index ("0" would match anything's 0)
                continue
            literal = ".".join(tail)
            collapsed = index_pattern(literal)
            if any(p.isdigit() for p in tail) and spares_wide(collapsed):
                key = collapsed
                break
            if spares_wide(re.escape(literal)):
                key = literal
                break
        kinds.setdefault(key, []).append(name)
    return kinds


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
            f"damping='auto' holds out one calibration window in {every} to choose the damping, so it needs at "
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


def _first_row(obj: Any, batch: int) -> Any:
    """``obj`` (tensors in tuples/lists/dicts) cut to its first batch row: every tensor whose leading
    dimension is ``batch`` keeps row 0 only (tensors broadcast over the batch stay as they are)."""
    return map_tensors(obj, lambda t: t[:1] if batch > 1 and t.ndim >= 1 and t.shape[0] == batch else t)


class _BlockPlan(NamedTuple):
    groups: list[list[Target]]
    points: list[Any]  # per group, where its statistics are taken: its first layer, or a ValueTap
    taps: list[Any]
    routed: set[int]  # groups of routed MoE experts: the block then runs in _stages, not parked
    unreached: list[Target]  # experts no calibration token reaches (in no group)


def _visit_groups(block: nn.Module, targets: list[Target], samples: Inputs, value_weighting: str = "attention",
                  precision: Callable[[], Any] = nullcontext) -> _BlockPlan:
    """The block's groups (:func:`_probe`), each group's statistics hook point (its first layer, or a
    :class:`~peft_eora.value_weighting.ValueTap`), the taps, the groups whose members see a subset of
    the tokens, and the experts no token reaches.

    With ``value_weighting="attention"``, each targeted value projection whose attention the tap
    can follow becomes a group of its own right after the group it shared its input with; its
    statistics are taken inside the attention (``P̄·X``, see :mod:`peft_eora.value_weighting`)."""
    taps = value_taps(block, {id(t.layer) for t in targets}) if value_weighting == "attention" else []
    with attached(taps):  # the module-order probe also checks each tap's value-state layout
        groups, routed, unreached = _probe(block, targets, samples, precision)
    taps = verified(taps)
    by_layer = {id(tap.layer): tap for tap in taps}
    out: list[list[Target]] = []
    points: list[Any] = []
    for g in groups:
        rest = [t for t in g if id(t.layer) not in by_layer]
        if rest:
            out.append(rest)
            points.append(rest[0].layer)
        for t in g:
            if id(t.layer) in by_layer:
                out.append([t])
                points.append(by_layer[id(t.layer)])
    routed_groups = {g for g, members in enumerate(out) if all(id(t.layer) in routed for t in members)}
    return _BlockPlan(out, points, taps, routed_groups, unreached)


def _input_groups(
    block: nn.Module, targets: list[Target], samples: Union[Inputs, tuple[torch.Tensor, dict[str, Any]]]
) -> list[list[Target]]:
    """Targets of a block in execution order, grouped by shared input tensor (probe forwards)."""
    return _probe(block, targets, samples)[0]


def _routed_input(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> bool:
    """Whether a layer's input ``x`` holds tokens gathered by a router (a MoE expert) rather than the
    batch's ``shape`` of tokens in order: flattened rows in another number than the batch's tokens, or,
    inside a list of experts, any input not laid out as the batch (an expert every token chose sees
    them all, in the router's order)."""
    if x.ndim == 2 and x.shape[0] != math.prod(shape):
        return True
    return _expert_of(name) is not None and tuple(x.shape[:-1]) != tuple(shape)


def _probe(
    block: nn.Module, targets: list[Target], samples: Union[Inputs, tuple[torch.Tensor, dict[str, Any]]],
    precision: Callable[[], Any] = nullcontext,
) -> tuple[list[list[Target]], set[int], list[Target]]:
    """``(groups, routed, unreached)``: the targets in execution order, grouped by shared input tensor;
    the ids of the targets that see a subset of the tokens (routed MoE experts); and the experts of such
    a block that no calibration token reaches (in no group). Any other target never called is an error.

    One calibration row is probed first; targets it does not reach (experts no token of that row was
    routed to) are looked for in the whole first batch, then in the next batches. ``precision``: the
    block forwards' autocast (routing may depend on it)."""
    if isinstance(samples, tuple):
        samples = [samples]
    order: list[tuple[Target, torch.Tensor]] = []  # holding the inputs keeps their identity unambiguous
    tokens: list[tuple[int, ...]] = [()]  # the probe input's (batch, seq)
    routed: set[int] = set()
    handles = []
    for t in targets:
        def hook(_m: nn.Module, args: tuple, t: Target = t) -> None:
            if all(o[0] is not t for o in order):
                order.append((t, args[0]))
                if _routed_input(t.name, args[0], tokens[0]):
                    routed.add(id(t.layer))
        handles.append(t.layer.register_forward_pre_hook(hook))

    def run(hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        tokens[0] = tuple(hidden.shape[:-1])
        with precision():
            block(hidden, **kwargs)

    def missing() -> list[Target]:
        return [t for t in targets if all(o[0] is not t for o in order)]

    try:
        with torch.no_grad():
            hidden, kwargs = samples[0]
            first = 0  # the first batch still to run whole
            try:  # one calibration row is enough to see the call order (a whole batch costs a forward)
                run(_first_row(hidden, hidden.shape[0]), _first_row(kwargs, hidden.shape[0]))
            except Exception:  # noqa: BLE001 - kwargs this slicing does not understand: the whole batch
                order.clear()
                routed.clear()
                run(hidden, kwargs)
                first = 1
            for hidden, kwargs in samples[first:]:  # targets no token of that row reached (routed experts)
                if not missing():
                    break
                run(hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    # experts of a block with routed ones that no calibration token reaches: factors without statistics
    unreached = [t for t in missing() if routed and _expert_of(t.name) is not None]
    never = [t.name for t in missing() if t not in unreached]
    if never:
        raise RuntimeError(
            f"{len(never)} targeted module(s) are never called in the forward pass of the calibration data "
            f"({', '.join(never[:3])}{', …' if len(never) > 3 else ''}): leave them out of target_modules "
            "(exclude_modules=[...])."
        )
    groups: list[list[Target]] = []
    last_input: Optional[torch.Tensor] = None
    for t, x in order:
        if groups and x is last_input:
            groups[-1].append(t)
        else:
            groups.append([t])
        last_input = x
    return groups, routed, unreached


def accumulate_gram(H: torch.Tensor, x: torch.Tensor) -> None:
    """``H += xᵀx`` in float32. On CUDA, half-precision activations are multiplied as they are
    with float32 accumulation (products of two half values are exact in float32), ~12× faster
    than upcasting first (``benchmarks/linalg.py``); elsewhere ``x`` is upcast. Autocast (half-precision
    forwards, see :class:`~peft_eora.walker.BlockWalker`) is switched off here: the sum stays float32."""
    with torch.autocast(x.device.type, enabled=False):
        _accumulate_gram(H, x)


def _accumulate_gram(H: torch.Tensor, x: torch.Tensor) -> None:
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _HALF_GRAM[0]:
        if _HALF_GRAM_IN_PLACE[0]:  # H += xᵀx by cuBLAS into H itself: no n × n float32 temporary
            try:  # (784 MiB for the 8B down_proj, per batch); a torch that wants self in x's dtype refuses
                torch.addmm(H, x.T, x, out_dtype=torch.float32, out=H)
                return
            except (TypeError, RuntimeError, NotImplementedError) as exc:
                logger.debug("in-place half-precision XᵀX unavailable (%s): product then add", exc)
                _HALF_GRAM_IN_PLACE[0] = False
        try:
            H.add_(torch.mm(x.T, x, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError, NotImplementedError) as exc:  # older torch: no out_dtype
            logger.debug("half-precision XᵀX unavailable (%s): upcasting", exc)
            _HALF_GRAM[0] = False
    xf = x.float()
    n = xf.shape[1]
    if xf.device.type != "cpu" or n <= 2 * GRAM_PANEL:
        H.addmm_(xf.T, xf)
        return
    # the upper triangle in row panels (H[a:b, a:] += x_aᵀ·x[:, a:]), mirrored below: ~0.55× the
    # products of a full xᵀx, 1.5× faster on a CPU at 576–1536 features (BLAS has no syrk in torch)
    edges = list(range(0, n, GRAM_PANEL)) + [n]
    for a, b in zip(edges[:-1], edges[1:]):
        H[a:b, a:].addmm_(xf[:, a:b].T, xf[:, a:])
    for a, b in zip(edges[:-1], edges[1:]):
        H[b:, a:b] = H[a:b, b:].T
        diag = H[a:b, a:b]  # a full product: symmetric up to the BLAS's summation order, made exact
        diag.copy_(diag.triu() + diag.triu(1).T)


_HALF_GRAM = [True]
_HALF_GRAM_IN_PLACE = [True]

#: Rows per panel of the CPU covariance update (see :func:`_accumulate_gram`).
GRAM_PANEL = 256


class _Covariances:
    """Per group, ``[H]`` or ``[H_fit, H_val]`` (``damping="auto"``), filled by a visit's hooks.

    A group's matrices are allocated at its first input and released by :meth:`take`, so only the
    group being computed holds any: the 8B ``down_proj``'s pair (2 × 784 MiB in float32) does not sit
    beside the factor steps of the six projections before it."""

    def __init__(self, groups: list[list[Target]], device: torch.device, masks: list[Optional[torch.Tensor]],
                 holdout: Optional[list[torch.Tensor]], times: PhaseTimes, inputs: Optional[Inputs] = None,
                 warned: Optional[set[str]] = None, routed: Iterable[int] = ()) -> None:
        self.parts = 1 if holdout is None else 2
        # per batch, (windows, tokens) of the block's input: a layer fed the tokens flattened is viewed back
        self.token_shapes = None if inputs is None else [tuple(h.shape[:-1]) for h, _ in inputs]
        self.H: list[Optional[list[torch.Tensor]]] = [[] for _ in groups]
        self.groups = groups
        self.masks = masks
        self.holdout = holdout
        self.times = times
        self.device = device
        self.seen: set[tuple[int, int]] = set()
        #: groups whose inputs are tokens gathered by a router (MoE experts), as the probe found them or a batch
        #: showed: their rows are not in the batch's order, so neither a padding mask nor, with damping="auto", a
        #: held-out window can be told apart in them: they are fitted on every row with the fixed ridge
        self.routed: set[int] = set(routed)
        self.rows = [0] * len(groups)  # rows collected per group (a routed expert may receive none)
        self.warned = set() if warned is None else warned

    def collect(self, g: int, inp: torch.Tensor, batch: int) -> None:
        if (g, batch) in self.seen:  # a module called twice in one forward: its first input counts
            return
        self.seen.add((g, batch))
        for t in self.groups[g]:
            t.input_dtype = t.input_dtype or inp.dtype
        with self.times.phase("covariance", self.device):
            shape = None if self.token_shapes is None else self.token_shapes[batch]
            if shape is not None and _routed_input(self.groups[g][0].name, inp, shape):
                self.routed.add(g)
            if g not in self.routed and shape is not None and inp.ndim == 2 and len(shape) > 1:
                inp = inp.reshape(*shape, inp.shape[-1])  # the batch's tokens flattened (OPT's fc1/fc2), in order
            x = inp.reshape(-1, inp.shape[-1])
            self.rows[g] += x.shape[0]
            mask = self.masks[batch]
            H = self._matrices(g, x.device)
            if mask is not None and (g in self.routed or x.shape[0] != mask.numel()):
                if "padding" not in self.warned:  # gathered tokens, or another sequence (cross-attention)
                    self.warned.add("padding")
                    logger.warning(
                        "%s sees %d rows that are not the batch's %d token positions in order (a routed MoE "
                        "expert?), so the padding mask cannot be applied: its covariance (and any such layer's) "
                        "includes rows from padded positions. Calibrate with windows of equal length (no padding) to "
                        "avoid it.", self.groups[g][0].name, x.shape[0], mask.numel())
                mask = None
            rows = None if self.holdout is None else self.holdout[batch]
            if rows is not None and (g in self.routed or inp.ndim < 3 or inp.shape[0] != rows.numel()):
                self.routed.add(g)  # no window to hold out: its group takes the fixed ridge (see routed)
                rows = None
            if rows is None:
                if mask is not None:
                    x = x[mask.reshape(-1).to(x.device).bool()]
                accumulate_gram(H[0], x)
                return
            val = rows.to(x.device).view(-1, *([1] * (inp.ndim - 2))).expand(inp.shape[:-1]).reshape(-1)
            keep = mask.reshape(-1).to(x.device).bool() if mask is not None else torch.ones_like(val)
            for part, sel in ((0, keep & ~val), (1, keep & val)):
                accumulate_gram(H[part], x[sel])

    def _matrices(self, g: int, device: Optional[torch.device] = None) -> list[torch.Tensor]:
        """Group ``g``'s matrices, allocated at its first input on that input's ``device`` (a block that a custom
        ``device_map`` splits over two devices feeds its MLP on another device than its attention)."""
        H = self.H[g]
        assert H is not None, "covariance requested after its group was finished"
        if not H:
            n = self.groups[g][0].shape[1]
            parts = 1 if g in self.routed else self.parts  # known routed: no window is held out of it
            where = device if device is not None else self.device
            H.extend(torch.zeros(n, n, dtype=torch.float32, device=where) for _ in range(parts))
        return H

    def drop(self, g: int) -> None:
        """Release group ``g``'s covariance(s) unread (allocating none if no input reached it)."""
        self.H[g] = None

    def take(self, g: int) -> list[torch.Tensor]:
        """The finished covariance(s) of group ``g`` (released here: the group is done)."""
        H = self._matrices(g)  # zeros if no input reached it
        self.H[g] = None
        if g in self.routed and len(H) == 2:  # batches split before the group was found routed: one covariance
            H[0].add_(H.pop())
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
    device: Union[str, torch.device, None] = None,
    checkpoint: Any = None,
    times: Optional[PhaseTimes] = None,
    adapter_bits: int = 16,
    forward_dtype: Optional[torch.dtype] = None,
    value_weighting: str = "attention",
    logit_weighting: str = DEFAULT_LOGIT_WEIGHTING,
) -> CompensationStats:
    """Compute and install EoRA factors for every LoRA layer of ``adapter_name`` (see module doc).

    ``damping`` is a ridge ``δ ≥ 0`` or ``"auto"`` (chosen per layer on held-out windows).
    ``forward_dtype`` (e.g. ``torch.bfloat16``): the block forwards run under autocast to it, the
    covariances still accumulate in float32 (see :func:`peft_eora.model.resolve_forward_dtype`).
    ``adapter_bits`` 8 or 4: factors are installed on the int8/int4 grid they will be stored on,
    rounded against the layer's activations towards its residual (:func:`peft_eora.factor_quant.fit_lowbit_factors`),
    so later blocks see the adapters as they will be stored.
    ``value_weighting="attention"`` weights value projections by the attention they feed (see
    :mod:`peft_eora.value_weighting`); ``"tokens"``: every token once, like the other layers.
    ``logit_weighting="queries_and_keys"`` weights a key projection's output channels by the queries
    that read them and a query projection's by the keys (``"keys"``: keys only; ``"none"``:
    unweighted; see :mod:`peft_eora.logit_weighting`).
    """
    _check_damping_arg(damping)
    _check_value_weighting(value_weighting)
    logits = _logit_setup(model, logit_weighting)
    times = times if times is not None else NO_TIMES
    blocks, targets = find_targets(model, adapter_name)
    validate(targets, original)
    stats = CompensationStats(method=method, damping=damping, tokens=count_tokens(batches) if method != "svd" else 0)
    start = time.perf_counter()
    modes = _eval_modes(model)
    materialize_adapters(targets, adapter_name)
    for t in targets:  # adapters not yet computed must contribute nothing
        t.layer.lora_B[adapter_name].weight.zero_()

    try:
        if method == "svd":  # the baseline needs no activations: no forward pass at all
            for t in tqdm(targets, desc="SVD", unit="module", disable=not progress):
                dev = torch.device(device) if device is not None else device_of(t.base)
                stats.modules.append(_install(t, adapter_name, original, None, method, eig_rtol, device=dev,
                                              times=times, adapter_bits=adapter_bits))
        else:
            _compensate_blocks(model, blocks, targets, adapter_name, original, batches, stats, damping, eig_rtol,
                               sequential, progress, device, checkpoint, times, adapter_bits, forward_dtype,
                               value_weighting, logits)
    except BaseException as exc:
        # nothing half-written: a failure leaves every adapter as a zero update
        for t in targets:
            t.layer.lora_B[adapter_name].weight.zero_()
        if _is_oom(exc):
            _raise_oom(exc, stats.current_block, device, checkpointed=checkpoint is not None)
        raise
    finally:
        _restore_modes(modes)
    stats.seconds = time.perf_counter() - start
    logger.info(
        "EoRA (%s, damping %s): %d modules in %.1f s over %d tokens", method, stats.damping, len(stats.modules),
        stats.seconds, stats.tokens,
    )
    if stats.modules and all(m.error_before == 0 for m in stats.modules):
        warnings.warn(
            f"The original and compressed weights are identical in all {len(stats.modules)} adapted layers: there is "
            "no compression error to compensate, and every adapter is a zero update. Is original_model the "
            "uncompressed checkpoint, and the model the compressed one?",
            UserWarning, stacklevel=3,
        )
    far = sorted((m for m in stats.modules if (m.weight_error or 0.0) > 1.0), key=lambda m: -(m.weight_error or 0.0))
    if far:
        warnings.warn(
            f"In {len(far)} of {len(stats.modules)} adapted layers the compressed weight is further from the original "
            f"than zero weights would be (‖W_original − W_compressed‖ / ‖W_original‖ up to {far[0].weight_error:.2f}, "
            f"{far[0].name}): no compression does that. Is original_model the checkpoint the compressed model was made "
            "from (not another fine-tune, or the base model of an instruct one)?",
            UserWarning, stacklevel=3,
        )
    return stats


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return oom is not None and isinstance(exc, oom)


class EoRAOutOfMemoryError(RuntimeError):
    """The accelerator ran out of memory while computing EoRA factors (the message says what to lower)."""


def _oom_error(exc: BaseException, block: Optional[int], device: Any, stage: str = "",
               checkpointed: bool = False) -> EoRAOutOfMemoryError:
    """The one error an out-of-memory becomes: where (``block``, ``stage``) and what to lower. ``device``: the
    execution device the blocks visit one at a time (offload), or None (the model's own placement)."""
    where = f"decoder block {block}" if block is not None else "before the first decoder block"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    offload = ("the model already visits the GPU one block at a time" if device is not None else
               "or keep the model on the CPU so that only one block at a time visits the GPU "
               "(execution_device='cuda', CLI --offload)")
    resume = (" The checkpoint folder's finished blocks were computed with the old batches: start a new folder with "
              "the new ones." if checkpointed else "")
    return EoRAOutOfMemoryError(
        f"Out of GPU memory in {where}{stage} ({first}). Lower the calibration batch size "
        "(initialize_eora_weights(batch_size=...), CLI --calib-batch-size) or the calibration tokens "
        f"(num_samples × seq_len); {offload}.{resume} No adapter was changed."
    )


def _raise_oom(exc: BaseException, block: Optional[int], device: Any, stage: str = "",
               checkpointed: bool = False) -> None:
    """Raise :func:`_oom_error` for ``exc``, its traceback's frames cleared first: they hold the visit's activations
    and covariances, which must go before the user retries (a notebook keeps the last exception alive)."""
    traceback.clear_frames(exc.__traceback__)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise _oom_error(exc, block, device, stage, checkpointed) from exc


def _eval_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """``model.eval()`` for a walk, returning every module's own ``training`` flag for :func:`_restore_modes`
    (``model.train(flag)`` would set one flag for all: PEFT's new LoRA layers are in train mode in an eval model)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    return modes


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, flag in modes:
        module.training = flag


def _check_damping_arg(damping: Union[float, str]) -> None:
    if damping == "auto":
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (0 <= damping < float("inf")):
        raise ValueError(f"damping must be a finite number ≥ 0 or 'auto', got {damping!r}.")


def _check_value_weighting(value_weighting: str) -> None:
    if value_weighting not in VALUE_WEIGHTINGS:
        raise ValueError(f"value_weighting must be one of {VALUE_WEIGHTINGS}, got {value_weighting!r}.")


def _by_block(targets: list[Target]) -> dict[int, list[Target]]:
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    return by_block


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
    device: Union[str, torch.device, None],
    checkpoint: Any,
    times: PhaseTimes,
    adapter_bits: int = 16,
    forward_dtype: Optional[torch.dtype] = None,
    value_weighting: str = "attention",
    logits: tuple[str, Optional[AttentionShape]] = ("none", None),
) -> None:
    if stats.tokens == 0:
        raise ValueError("The calibration data is empty: no token to estimate the activation statistics from.")
    holdout = None
    if damping == "auto":
        try:
            holdout = holdout_rows(batches)
            fit_tokens, stats.heldout_tokens = _split_tokens(batches, holdout)
            if fit_tokens == 0 or stats.heldout_tokens == 0:
                raise ValueError(
                    f"damping='auto' found {fit_tokens} fit and {stats.heldout_tokens} held-out calibration tokens "
                    f"(every window i with i % {AUTO_HOLDOUT_EVERY} == {AUTO_HOLDOUT_EVERY - 1} held out, padding excluded); both must be non-empty."
                )
        except ValueError as exc:  # too little data to hold some out: the fixed ridge instead
            warnings.warn(f"{exc} Using the fixed damping {FIXED_DAMPING} instead.", stacklevel=3)
            holdout, stats.heldout_tokens = None, 0
            damping = stats.damping = FIXED_DAMPING
    masks = [b.get("attention_mask") for b in batches]
    by_block = _by_block(targets)
    last = max(by_block)
    walker = BlockWalker(model, blocks, batches, device=device, times=times, checkpoint=checkpoint,
                         autocast=forward_dtype)
    first, inputs = 0, None
    if checkpoint is not None and checkpoint.done >= 0:
        _restore(checkpoint, by_block, adapter_name, stats)
        if checkpoint.done >= last:
            return
        first = checkpoint.done + 1
        captured = walker.first_inputs()  # the block kwargs (masks, positions) are the same for every block
        hidden = checkpoint.load_inputs(first)
        if len(hidden) != len(captured):
            raise ValueError(f"The checkpoint holds {len(hidden)} calibration batches, this run has {len(captured)}.")
        if any(h.shape != hc.shape for h, (hc, _) in zip(hidden, captured)):
            raise ValueError("The checkpoint's saved block inputs do not have this run's batch shapes: resume with the "
                             "calibration batches (and batch size) of the interrupted run.")
        inputs = [(h.to(hc.device, hc.dtype), kw) for h, (hc, kw) in zip(hidden, captured)]
        del captured, hidden
    bar = tqdm(total=last + 1, initial=first, desc="EoRA", unit="block", disable=not progress)
    visits = walker.visits(last, first, inputs)
    del inputs  # the walk holds them (a resumed run's loaded ones) only until the first visit replaces them
    with closing(visits), _read_ahead(original, by_block) as read_ahead, _tracking(walker, stats):
        read_ahead(first)  # (visits closed at once on an error: block home)
        for visit in visits:
            read_ahead(visit.index + 1)
            block_targets = by_block.get(visit.index, [])
            if block_targets:
                n_before = len(stats.modules)
                _compensate_visit(visit, block_targets, adapter_name, original, stats, damping, eig_rtol, sequential,
                                  masks, holdout, keep_outputs=visit.index < last, times=times,
                                  adapter_bits=adapter_bits, value_weighting=value_weighting, logits=logits)
                if checkpoint is not None:
                    with times.phase("checkpoint"):
                        done = stats.modules[n_before:]
                        checkpoint.save_block(visit.index, {t.name: _factors_of(t, adapter_name) for t in block_targets},
                                              [asdict(m) for m in done])
            bar.update(1)
    bar.close()


@contextmanager
def _tracking(walker: BlockWalker, stats: CompensationStats) -> Iterator[None]:
    """On an error, ``stats.current_block`` is the block the walker was placing or visiting (a failed move of block
    k + 1 to the GPU is block k + 1's, not block k's)."""
    try:
        yield
    except BaseException:
        stats.current_block = walker.current
        raise


@contextmanager
def _read_ahead(original: OriginalWeights, by_block: dict[int, list[Target]]) -> Iterator[Callable[[int], None]]:
    """Inside, ``read_ahead(i)`` starts reading block ``i``'s original weights in the background (a
    checkpoint on disk: called for the next block, they are read while this one is computed); what
    is not taken is dropped on exit (:meth:`OriginalWeights.prefetch`)."""
    try:
        yield lambda i: original.prefetch(t.name for t in by_block.get(i, []))
    finally:
        original.cancel_prefetch()


def _compensate_visit(
    visit: BlockVisit,
    block_targets: list[Target],
    adapter_name: str,
    original: OriginalWeights,
    stats: CompensationStats,
    damping: Union[float, str],
    eig_rtol: float,
    sequential: bool,
    masks: list[Optional[torch.Tensor]],
    holdout: Optional[list[torch.Tensor]],
    keep_outputs: bool,
    times: PhaseTimes,
    adapter_bits: int = 16,
    value_weighting: str = "attention",
    logits: tuple[str, Optional[AttentionShape]] = ("none", None),
) -> None:
    groups, points, taps, routed, unreached = _visit_groups(visit.block, block_targets, visit.inputs, value_weighting,
                                                            visit._precision)
    cov = _Covariances(groups, visit.device, masks, holdout, times, visit.inputs, stats.warned, routed)
    # on a CPU in float32 the installed layers run as one dense product for the rest of the visit
    merged = merged_forward.MergedForwards(adapter_name, [t.layer for t in block_targets],
                                           enabled=sequential and _merges(visit))

    metric = _output_metric(original, logits)

    def plain_svd(members: list[Target]) -> None:
        """Experts no calibration token reaches: no statistics, so the plain SVD of the residual (warned)."""
        names = ", ".join(t.name for t in members[:3]) + (", …" if len(members) > 3 else "")
        if "unreached" not in stats.warned:
            stats.warned.add("unreached")
            logger.warning("%d expert layer(s) of block %d receive no calibration token (%s): their adapters are the "
                           "plain SVD of the residual, without activation statistics (later blocks are logged at "
                           "INFO). More calibration data reaches more experts.", len(members), visit.index, names)
        else:
            logger.info("block %d: %d expert layer(s) receive no calibration token (%s): plain SVD", visit.index,
                        len(members), names)
        for t in members:
            module = _install(t, adapter_name, original, None, "svd", eig_rtol, device=visit.device, times=times,
                              adapter_bits=adapter_bits)
            module.damping = math.inf if holdout is not None else None  # damping="auto" lists plain SVD as inf
            stats.modules.append(module)

    def finish(g: int) -> None:
        if g in cov.routed and cov.rows[g] == 0:  # the probe reached it; routing moved with the compensation
            cov.drop(g)
            plain_svd(groups[g])
            return
        if holdout is not None and g in cov.routed and "routed" not in stats.warned:
            stats.warned.add("routed")
            logger.warning("%s sees only the tokens routed to it (a MoE expert?), whose windows cannot be told apart: "
                           "damping='auto' cannot hold any out, so it and every such layer use the fixed ridge %g "
                           "(eora_stats['damping_per_module'] lists them).", groups[g][0].name, FIXED_DAMPING)
        if holdout is not None and g not in cov.routed:
            # the pair and H_fit's eigh (made only if needed) go with the last member
            pair = cov.take(g)
            dev = pair[0].device  # where the group's inputs arrived (the visit's device unless a map split the block)
            held = _HeldOut(*pair, users=len(groups[g]), times=times, device=dev)
            del pair
            with original.keeping(_read_twice(groups[g], logits)):
                for t in groups[g]:
                    stats.modules.append(_install(t, adapter_name, original, None, "eora", eig_rtol,
                                                  device=dev, times=times, adapter_bits=adapter_bits,
                                                  out_weight=metric(t, held.pair), auto=held, merged=merged))
            return
        H = cov.take(g)[0]
        dev = H.device
        with original.keeping(_read_twice(groups[g], logits)):
            out_weights = [metric(t, H) for t in groups[g]]  # the logit weighting reads H itself
            ridge = FIXED_DAMPING if holdout is not None else float(damping)
            with times.phase("decomposition", dev):  # shared by the group's members
                projection = _Shared(projection_and_root(H, ridge, eig_rtol), users=len(groups[g]))
            del H  # the statistics read the projection's root: the float32 H goes before any factor step
            for t, weight in zip(groups[g], out_weights):
                stats.modules.append(_install(t, adapter_name, original, projection, "eora", eig_rtol,
                                              device=dev, times=times, adapter_bits=adapter_bits,
                                              out_weight=weight, damping=ridge, merged=merged))

    with attached(taps), merged:
        if sequential:  # one forward: the batches park at each group while its factors are installed
            if routed:  # parked batches move in step from group to group; a batch that skips an expert would not
                visit.run(points, cov.collect, on_group=finish, keep_outputs=keep_outputs, park=False,
                          stages=_stages(groups, routed))
            else:
                visit.run(points, cov.collect, on_group=finish, keep_outputs=keep_outputs)
        else:  # every group from the uncompensated block; the walker then forwards the compensated block
            visit.run(points, cov.collect, on_group=None, keep_outputs=False)
    if not sequential:
        for g in range(len(groups)):
            finish(g)
    if unreached:  # no token reaches them, so they change no calibration activation: installed last
        plain_svd(unreached)


#: Bytes of float32 covariances one stage of routed experts may hold at once (:func:`_stages`).
STAGE_BYTES = 1 << 30


def _expert_of(name: str) -> Optional[tuple[str, str, str]]:
    """``model.layers.3.mlp.experts.7.up_proj`` → ``("mlp.experts", "7", "up_proj")``: the list of
    experts inside the block, the expert and the layer in it (None outside a nested list)."""
    digits = [i for i, part in enumerate(name.split(".")) if part.isdigit()]
    if len(digits) < 2:
        return None
    parts, (i, j) = name.split("."), digits[:2]
    return ".".join(parts[i + 1 : j]), parts[j], ".".join(parts[j + 1 :])


def _stages(groups: list[list[Target]], routed: set[int], budget: Optional[int] = None) -> list[list[int]]:
    """The order a block with routed experts collects and installs its groups in, as stages of groups.

    The groups of routed experts of one kind (one list of experts, the same member names: every
    expert's gate/up, then every expert's down) share a stage, whose forwards collect all of them with
    none installed meanwhile — experts do not feed each other — while their covariances fit ``budget``
    bytes (:data:`STAGE_BYTES`); every other group is a stage of its own. A group joins the first
    stage of its kind after those holding what it may read: the last group before it that is not a
    routed expert, and its own expert's group before it. Without experts: one stage per group.
    """
    budget = STAGE_BYTES if budget is None else budget
    stages: list[list[int]] = []
    kinds: list[Optional[tuple[Any, ...]]] = []
    sizes: list[int] = []
    last_plain = -1
    last_of_expert: dict[tuple[str, str], int] = {}
    for g, group in enumerate(groups):
        where = [_expert_of(t.name) for t in group] if g in routed else [None]
        if any(w is None for w in where) or len({w[:2] for w in where}) != 1:  # type: ignore[index]
            stages.append([g])
            kinds.append(None)
            sizes.append(0)
            last_plain = len(stages) - 1
            continue
        experts, index = where[0][:2]  # type: ignore[index]
        kind = (experts, tuple(w[2] for w in where))  # type: ignore[index]
        nbytes = 4 * group[0].shape[1] ** 2
        after = max(last_plain, last_of_expert.get((experts, index), -1))
        s = next((i for i in range(after + 1, len(stages)) if kinds[i] == kind and sizes[i] + nbytes <= budget), None)
        if s is None:
            stages.append([])
            kinds.append(kind)
            sizes.append(0)
            s = len(stages) - 1
        stages[s].append(g)
        sizes[s] += nbytes
        last_of_expert[(experts, index)] = s
    return stages


def _merges(visit: BlockVisit) -> bool:
    """Whether the visit's installed layers run merged (:mod:`peft_eora.merged_forward`): on a CPU,
    float32 activations, no autocast."""
    hidden = visit.inputs[0][0] if visit.inputs else None
    return (merged_forward.ENABLED and visit.device.type == "cpu" and visit.autocast is None
            and isinstance(hidden, torch.Tensor) and hidden.dtype == torch.float32)


def _logit_setup(model: nn.Module, logit_weighting: str) -> tuple[str, Optional[AttentionShape]]:
    """``(logit_weighting, the model's attention shape)`` after checking the value."""
    if logit_weighting not in LOGIT_WEIGHTINGS:
        raise ValueError(f"logit_weighting must be one of {LOGIT_WEIGHTINGS}, got {logit_weighting!r}.")
    if logit_weighting == "none":
        return logit_weighting, None
    reason = unmodelled(model)
    if reason is not None:
        logger.info("logit weighting off for this model (query/key outputs unweighted): %s", reason)
        return logit_weighting, None
    return logit_weighting, attention_shape(getattr(model, "config", None))


def _read_twice(group: list[Target], logits: tuple[str, Optional[AttentionShape]]) -> set[str]:
    """Members of ``group`` whose original weight is read twice: for their own residual and as another
    member's logit-weighting partner (the query/key projections of one attention)."""
    weighting, shape = logits
    if weighting == "none" or shape is None:
        return set()
    names = {t.name for t in group}
    return {found[1] for t in group if (found := partner(t.name, weighting)) is not None and found[1] in names}


def _output_metric(original: OriginalWeights, logits: tuple[str, Optional[AttentionShape]]
                   ) -> Callable[[Target, Covariance], Optional[torch.Tensor]]:
    """``metric(t, H)``: the logit weighting ``g`` of ``t``'s output channels (``None``: unweighted),
    from the original sibling projection and the group's covariance ``H`` (:mod:`peft_eora.logit_weighting`)."""
    weighting, shape = logits

    def metric(t: Target, H: Covariance) -> Optional[torch.Tensor]:
        on = (H[0] if isinstance(H, (tuple, list)) else H).device  # the group's (the visit's unless a map split it)

        def partner_weight(name: str) -> Optional[torch.Tensor]:
            return original.get(name, on) if original.shape(name) is not None else None

        return output_weights(t.name, t.shape[0], weighting, shape, partner_weight, H)

    return metric


def _factors_of(t: Target, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The installed ``(lora_A, lora_B)`` weights of ``t`` (what a checkpoint stores)."""
    return t.layer.lora_A[adapter_name].weight.detach(), t.layer.lora_B[adapter_name].weight.detach()


def _restore(checkpoint: Any, by_block: dict[int, list[Target]], adapter_name: str, stats: CompensationStats) -> None:
    """Install the factors and stats of the checkpoint's finished blocks."""
    for idx in sorted(by_block):
        if idx > checkpoint.done:
            break
        factors, block_stats = checkpoint.load_block(idx)
        for t in by_block[idx]:
            if t.name not in factors:
                raise ValueError(f"The checkpoint has no factors for {t.name}: it was made for other target modules.")
            a, b = factors[t.name]
            lora_A, lora_B = t.layer.lora_A[adapter_name], t.layer.lora_B[adapter_name]
            if tuple(a.shape) != tuple(lora_A.weight.shape) or tuple(b.shape) != tuple(lora_B.weight.shape):
                raise ValueError(f"The checkpoint's factors for {t.name} have another rank; start a new folder.")
            lora_A.weight.copy_(a.to(lora_A.weight))
            lora_B.weight.copy_(b.to(lora_B.weight))
        for m in block_stats:
            if m.get("heldout_errors") is not None:
                m["heldout_errors"] = {float(k): v for k, v in m["heldout_errors"].items()}
            stats.modules.append(ModuleStats(**m))


class _Shared:
    """A value the members of a group share, dropped by the last one to take it: the projection of
    the 8B ``down_proj`` (its Cholesky factor, 1.5 GiB in float64, also the root its statistics read)
    goes when that layer's install ends, not with the block."""

    def __init__(self, value: Any, users: int) -> None:
        self.value, self.users = value, users

    def take(self) -> Any:
        value = self.value
        self.users -= 1
        if self.users <= 0:
            self.value = None
        return value


class _HeldOut:
    """``damping="auto"``: a group's fit and held-out covariances and the eigendecomposition of
    ``H_fit`` (made only if a member's ridge scoring needs it), shared by the group's members. The
    last member drops the eigendecomposition once it has chosen its ridge, and the pair once its
    refit has summed it in float64 (``refit_auto``: neither is alive while that sum of an 8B
    ``down_proj`` is factorised, 1.5 GiB each) or, refitted from the scoring's Gram matrices
    (``gram_refit``: no sum made), once its statistics have read it."""

    def __init__(self, H_fit: torch.Tensor, H_val: torch.Tensor, users: int, times: PhaseTimes,
                 device: torch.device) -> None:
        self.H_fit: Optional[torch.Tensor] = H_fit
        self.H_val: Optional[torch.Tensor] = H_val
        self.users, self.times, self.device = users, times, device
        self._eigen: Optional[Eigen] = None
        self._cut_free: Optional[bool] = None

    @property
    def pair(self) -> Covariance:
        """``(H_fit, H_val)``: their sum, never added up in float32 (784 MiB more at 14336²)."""
        if self.H_fit is None or self.H_val is None:
            raise RuntimeError("the group's covariances were already released")
        return (self.H_fit, self.H_val)

    def fit(self) -> Eigen:
        if self._eigen is None:
            with self.times.phase("decomposition", self.device):
                self._eigen = eigen(self.H_fit)
        return self._eigen

    def cut_free(self, eig_rtol: float) -> bool:
        """Whether ``H_fit`` has no eigenvalue under the cut-off (:func:`is_cut_free`): tested once
        for the group (one Cholesky factorisation of ``H_fit``: a 4096² one for q/k/v of an 8B block)."""
        if self._cut_free is None:
            self._cut_free = is_cut_free(self.pair[0], eig_rtol, self.device)
        return self._cut_free

    @property
    def last(self) -> bool:
        return self.users <= 1

    def chosen(self) -> None:
        """A member has chosen its ridge: after the last one, ``H_fit``'s eigendecomposition goes."""
        if self.last:
            self._eigen = None

    def release(self) -> None:
        """A member has read the pair for the last time: after the last one, the pair goes."""
        self.users -= 1
        if self.users <= 0:
            self.H_fit = self.H_val = self._eigen = None


def _install(
    t: Target,
    adapter_name: str,
    original: OriginalWeights,
    projection: Optional[_Shared],
    method: str,
    eig_rtol: float,
    damping: Optional[float] = None,
    auto: Optional[_HeldOut] = None,
    device: Optional[torch.device] = None,
    times: PhaseTimes = NO_TIMES,
    adapter_bits: int = 16,
    out_weight: Optional[torch.Tensor] = None,
    merged: Optional[merged_forward.MergedForwards] = None,
) -> ModuleStats:
    """Compute ``t``'s factors and install them. ``out_weight`` (``g``, one weight per output channel):
    fit ``‖G^½·(ΔW − BA)·Xᵀ‖`` instead, i.e. EoRA on ``G^½·ΔW`` and ``B ← G^-½·B`` (logit weighting).
    ``merged``: the installed layer forwards as one dense product for the rest of the visit."""
    device = device if device is not None else device_of(t.base)
    w_fp, w_q = _weights(t, original, device, times)
    delta = w_fp - w_q
    weight_error = float(delta.norm()) / max(float(w_fp.norm()), 1e-30)
    del w_fp
    if merged is None or not merged.enabled:
        w_q = None
    H: Optional[Union[Covariance, CovarianceRoot]] = None  # what the statistics read (None: plain SVD)
    pair_for_stats = False  # damping="auto": the statistics read the pair, released after them
    before_sq: Optional[float] = None  # tr(ΔW·H·ΔWᵀ) where the refit's Gram matrices gave it
    heldout_errors = None
    with times.phase("factors", device):
        root = None if out_weight is None else out_weight.to(device, torch.float64).sqrt()[:, None]
        fitted = delta if root is None else (delta.double() * root).to(delta.dtype)
        if auto is not None:
            choice = select_damping(fitted, auto.H_fit, auto.H_val, t.rank, eig_rtol=eig_rtol, name=t.name, fit=auto.fit,
                                    cut_free=functools.partial(auto.cut_free, eig_rtol))
            auto.chosen()
            damping, heldout_errors = choice.damping, choice.errors
            logger.debug("%s: damping %g chosen, held-out errors %s", t.name, damping, heldout_errors)
            # from the scoring's Gram matrices, or plain SVD: the statistics read the pair, released after them;
            # else (δ = 0, or H_fit decomposed) they read refit_auto's factorisation, the pair released in there
            factors = gram_refit(fitted, choice, t.rank, eig_rtol, t.name, H=auto.pair)
            pair_for_stats = factors is not None or damping == math.inf
            if factors is not None:
                H = auto.pair
                before_sq = choice.gram.before_sq(None if root is None else root[:, 0].square())
            elif damping == math.inf:
                factors = eora_factors(fitted, None, t.rank, method="svd", name=t.name, start=choice.basis)
                H = auto.pair
            else:
                factors, H = refit_auto(fitted, auto.pair, damping, t.rank, eig_rtol, t.name, release=auto.release,
                                        start=choice.basis)
            del choice  # the chosen candidate's Ritz block
        elif projection is not None:  # the group's (projection, root): the root serves the statistics
            shared, H = projection.take()
            factors = eora_factors(fitted, None, t.rank, method=method, eig_rtol=eig_rtol, name=t.name,
                                   projection=shared)
            del shared
        else:
            factors = eora_factors(fitted, None, t.rank, method=method, eig_rtol=eig_rtol, name=t.name)
        if adapter_bits != 16:  # rounded against the activations the factors were fitted to (δ-damped)
            plain_svd = method == "svd" or H is None or damping is None or damping == math.inf
            # aimed at the residual itself, not at the float pair: the rounded pair's error is the layer's;
            # H as it is, damped in there (one float64 in × in matrix fewer at once than a damped copy)
            A_hat, B_hat = fit_lowbit_factors(factors.A, factors.B, None if plain_svd else H, adapter_bits,
                                              target=fitted, damping=0.0 if plain_svd else float(damping))
            factors = replace(factors, A=A_hat.float(), B=B_hat.float())
        if root is not None:  # back from the weighted problem (rounded in it: B's per-row scales absorb G^-½)
            factors = replace(factors, B=(factors.B.double() / root).to(factors.B.dtype))
    with times.phase("install", device):
        lora_A, lora_B = t.layer.lora_A[adapter_name], t.layer.lora_B[adapter_name]
        scaling = t.layer.scaling[adapter_name]
        lora_A.weight.copy_(factors.A.to(lora_A.weight))
        lora_B.weight.copy_((factors.B / scaling).to(lora_B.weight))
        if before_sq is not None:  # the error before known: only H·Aᵀ is made
            before, after = weighted_errors_known(delta, H, factors.B, factors.A, before_sq)
        elif H is not None:  # one pass over H for both
            before, after = weighted_errors(delta, H, factors.B, factors.A)
        else:  # plain SVD: the unweighted Frobenius error
            before, after = float(delta.norm()), float((delta - factors.B @ factors.A).norm())
        if auto is not None and pair_for_stats:
            del H
            auto.release()
        if merged is not None and w_q is not None:
            merged.add(t.layer, w_q)
        del w_q
    logger.debug("%s: error %.4g -> %.4g (r=%d)", t.name, before, after, t.rank)
    return ModuleStats(
        t.name, t.rank, before, after, factors.energy_retained, factors.kept_eigen,
        damping=None if method == "svd" else damping, heldout_errors=heldout_errors, weight_error=weight_error,
    )


def materialize_adapters(targets: list[Target], adapter_name: str) -> None:
    """Give adapters of offloaded layers real storage (PEFT leaves them on ``meta`` when the base
    layer's weights are offloaded by accelerate): on the layer's execution device, zeros."""
    for t in targets:
        for mod in (t.layer.lora_A[adapter_name], t.layer.lora_B[adapter_name]):
            if any(p.device.type == "meta" for p in mod.parameters()):
                mod.to_empty(device=device_of(t.base))
                for p in mod.parameters():
                    p.data.zero_()


@contextmanager
def _weights_on(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Within the block, ``module``'s own weights are real tensors (accelerate offload loads them)."""
    if not has_offload_hooks(module):
        yield
        return
    from accelerate.utils import align_module_device

    with align_module_device(module, device):
        yield


def _weights(t: Target, original: OriginalWeights, device: torch.device,
             times: PhaseTimes = NO_TIMES) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_original, W_compressed)`` of one target (float, on ``device``), NaN/inf refused."""
    with times.phase("residual", device), _weights_on(t.base, device):
        backend = backend_for(t.base, t.name)
        if getattr(backend, "reads_forward", False):  # the kernel rounds as it does on the model's activations
            w_q = backend.dequantize(t.base, dtype=t.input_dtype or t.activation_dtype).to(device)
        else:
            w_q = backend.dequantize(t.base).to(device)
    with times.phase("original_reads", device):
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
    device: Union[str, torch.device, None] = None,
    times: Optional[PhaseTimes] = None,
    forward_dtype: Optional[torch.dtype] = None,
    value_weighting: str = "attention",
    logit_weighting: str = DEFAULT_LOGIT_WEIGHTING,
) -> tuple[list[Target], dict[str, torch.Tensor], dict[str, float]]:
    """The targets, the spectrum of each one's projected residual ``ΔW·Q·diag(√λ)`` and each
    one's output energy ``‖W_original·Xᵀ‖²_F = tr(W·H·Wᵀ)`` (``‖W‖²_F`` for SVD), uncompensated.

    One walk over the blocks with every adapter a zero update (its ``lora_B`` is zeroed): per
    block, one forward over the calibration batches accumulates one covariance per input group
    (all groups at once) and gives the next block's inputs; per layer, a product with H, at
    most one Cholesky and one ``eigvalsh`` of a ``min(out, in)``-square matrix (no
    eigendecomposition of H). ``method="svd"`` needs no forward pass (spectrum of ``ΔW``).
    Logit-weighted layers (``logit_weighting``) report the spectrum and energy of ``G^½·ΔW`` and
    ``G^½·W``, what their factors will fit.
    """
    times = times if times is not None else NO_TIMES
    blocks, targets = find_targets(model, adapter_name)
    validate(targets, original, check_ranks=False)
    logits = _logit_setup(model, logit_weighting)
    modes = _eval_modes(model)
    for t in targets:
        t.layer.lora_B[adapter_name].weight.zero_()
    spectra: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    walker: Optional[BlockWalker] = None
    try:
        if method == "svd":
            for t in tqdm(targets, desc="Spectra", unit="module", disable=not progress):
                dev = torch.device(device) if device is not None else device_of(t.base)
                w_fp, w_q = _weights(t, original, dev, times)
                spectra[t.name] = projected_spectrum(w_fp - w_q, None, method="svd").cpu()
                energy[t.name] = float(w_fp.double().pow(2).sum())
            return targets, spectra, energy
        if count_tokens(batches) == 0:
            raise ValueError("The calibration data is empty: no token to estimate the activation statistics from.")
        masks = [b.get("attention_mask") for b in batches]
        warned: set[str] = set()  # warnings given once per pass
        by_block = _by_block(targets)
        last = max(by_block)
        walker = BlockWalker(model, blocks, batches, device=device, times=times, autocast=forward_dtype)
        with _read_ahead(original, by_block) as read_ahead:
            read_ahead(0)
            for visit in tqdm(walker.visits(last), total=last + 1, desc="Spectra", unit="block", disable=not progress):
                read_ahead(visit.index + 1)
                block_targets = by_block.get(visit.index, [])
                if not block_targets:
                    continue
                groups, points, taps, routed, unreached = _visit_groups(visit.block, block_targets, visit.inputs,
                                                                        value_weighting, visit._precision)
                cov = _Covariances(groups, visit.device, masks, None, times, visit.inputs, warned, routed)
                metric = _output_metric(original, logits)
                with attached(taps), adapters_off([t.layer for t in block_targets]):  # zero updates: not computed
                    visit.run(points, cov.collect, on_group=None, keep_outputs=visit.index < last)
                empty = {g for g in cov.routed if cov.rows[g] == 0}  # reached by the probe only
                for t in unreached + [t for g in sorted(empty) for t in groups[g]]:
                    spectra[t.name], energy[t.name] = torch.zeros(min(t.shape)), 1.0  # no gain: the smallest rank
                for g, group in enumerate(groups):
                    if g in empty:
                        cov.drop(g)
                        continue
                    (H,) = cov.take(g)
                    with original.keeping(_read_twice(group, logits)):
                        for t in group:  # no eigendecomposition: a Cholesky at most (see projected_spectrum)
                            w_fp, w_q = _weights(t, original, H.device, times)
                            with times.phase("factors", H.device):
                                out_weight = metric(t, H)
                                delta, w = w_fp - w_q, w_fp.double()
                                if out_weight is not None:  # what the logit-weighted factors fit: G^½·ΔW, G^½·W
                                    root = out_weight.to(H.device).sqrt()[:, None]
                                    delta, w = delta.double() * root, w * root
                                spectra[t.name] = projected_spectrum(delta, H, damping=damping, eig_rtol=eig_rtol).cpu()
                                energy[t.name] = weighted_error(w, H) ** 2  # row blocks: no float64 copy of H
                    del H
    except BaseException as exc:
        if _is_oom(exc):
            _raise_oom(exc, walker.current if walker is not None else None, device, " (rank-allocation spectrum pass)")
        raise
    finally:
        _restore_modes(modes)
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
    device: Union[str, torch.device, None] = None,
    times: Optional[PhaseTimes] = None,
    forward_dtype: Optional[torch.dtype] = None,
    value_weighting: str = "attention",
    logit_weighting: str = DEFAULT_LOGIT_WEIGHTING,
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
    targets, spectra, energy = collect_spectra(model, adapter_name, original, batches, method, damping, eig_rtol, progress,
                                               device=device, times=times, forward_dtype=forward_dtype,
                                               value_weighting=value_weighting, logit_weighting=logit_weighting)
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
