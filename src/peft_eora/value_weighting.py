"""Value projections weighted by the attention they feed (``EoRAConfig.value_weighting="attention"``).

EoRA weights a layer's residual by its input covariance ``H = Σ_t x_t x_tᵀ``: every calibration
token counts once. For a value projection that is the wrong measure. Its output reaches the model
only through attention, ``out_t = Σ_s P_ts v_s``, so an error ``δv_s`` counts as much as the
attention the later tokens pay to position ``s`` — and in LLMs most of that attention goes to a few
tokens (the first one, the "attention sink"). The error that reaches the attention output is
``‖P·X·ΔWᵀ‖``: the covariance of the *attention-averaged* inputs ``Y = P·X``. With the attention
probabilities averaged over the query heads (``P̄``; the per-head sum measured the same), ::

    H_v = Σ_windows (P̄·X)ᵀ(P̄·X)

Measured on SmolLM2-135M, GPTQ 4-bit r=16 (README "How it works"; the search that found it in
benchmarks/results/README.md): WikiText-2 43.56 → 41.47,
GSM8K 6.89 → 6.74, held-out C4 41.85 → 40.18 (plain SVD: 42.07 / 6.88 / 41.38).

How it is taken: the value projection becomes its own group whose statistics hook sits inside its
attention module, where ``P`` is known. :class:`ValueTap` looks like a module to the walker (it has
``register_forward_pre_hook``); while a tap is attached, the attention module's config routes its
attention call through :func:`_tapped_attention`, which computes ``P̄`` (float32, from the query and
key states it is handed, the causal / padding mask applied; soft-capping, sliding windows and learned
sinks are ignored: these are statistics only), hands ``P̄·X`` to the hook (which may pause the batch
while the group's factors are installed), then recomputes the value states from the now
compensated projection and calls the model's own attention function. The value-state layout
(``v_proj(x).view(..., heads, head_dim).transpose(1, 2)``, as in Llama, Mistral, Qwen, Gemma, …) is
checked in each block's module-order probe (:func:`value_taps`, :func:`verified`); a model where it does not hold
keeps token weighting for that projection, with a warning.
"""
from __future__ import annotations

import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Name of the attention function registered with transformers' ``AttentionInterface``.
TAP_ATTENTION = "peft_eora_value_tap"

#: Attribute names of value projections inside an attention module.
VALUE_NAMES: tuple[str, ...] = ("v_proj",)

_ORIGINAL_IMPL: dict[int, Optional[str]] = {}  # id(config) → its attention implementation while tapped
_local = threading.local()  # per forward thread: value-projection inputs seen, keyed by id(tap)


class _Handle:
    def __init__(self, remove: Callable[[], None]) -> None:
        self._remove = remove

    def remove(self) -> None:
        self._remove()


@dataclass(eq=False)
class ValueTap:
    """The statistics hook point of one value projection, inside its attention module::

        tap = ValueTap(attention=block.self_attn, layer=block.self_attn.v_proj)
        handle = tap.register_forward_pre_hook(lambda m, args: print(args[0].shape))  # P̄·X
        with attached([tap]):
            block(hidden, **kwargs)
        handle.remove()
    """

    attention: nn.Module
    layer: nn.Module
    hooks: list[Callable[..., None]] = field(default_factory=list)
    verify: bool = False  # probe mode: check the value-state layout instead of collecting
    verified: Optional[bool] = None

    def register_forward_pre_hook(self, hook: Callable[..., None]) -> _Handle:
        """``hook(tap, (P̄·X,))`` runs at each attention call (the walker's hook signature)."""
        self.hooks.append(hook)
        return _Handle(lambda: self.hooks.remove(hook) if hook in self.hooks else None)

    def value_states(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        """The value states the attention module makes from input ``x`` (checked by the probe)."""
        return self.layer(x).view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _inputs() -> dict[int, torch.Tensor]:
    seen = getattr(_local, "inputs", None)
    if seen is None:
        seen = _local.inputs = {}
    return seen


def _original_function(module: nn.Module) -> Callable[..., Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _ORIGINAL_IMPL.get(id(module.config))
    if name in (None, "eager"):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward in its module.")
        return eager
    return ALL_ATTENTION_FUNCTIONS[name]


#: Queries per chunk of the attention average: a causal model's chunk reads the keys up to its own
#: end only (about half the scores of a window), and the score buffer is ``heads × chunk × keys``.
QUERY_CHUNK = 128


def _attention_chunks(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      scaling: Optional[float], causal: bool, chunk: Optional[int]
                      ) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """``(row, q_start, q_end, P̄)`` with ``P̄`` the head-averaged probabilities of queries
    ``q_start:q_end`` over keys ``0:P̄.shape[-1]`` (float32). ``attention_mask``: 4-D (bool keep or
    additive, broadcastable) or a 2-D ``(batch, keys)`` padding mask. A mask with a query dimension
    holds the whole structure; without one (or no mask) ``causal`` adds the causal mask. Where the
    keys after a chunk's last query are masked for it (a causal model's mask), they are left out:
    they get probability 0 for every query that is not fully masked (padding, whose rows the
    covariances drop)."""
    b, h, lq, d = query.shape
    lk = key.shape[2]
    scale = d ** -0.5 if scaling is None else float(scaling)
    rep = h // key.shape[1]
    chunk = QUERY_CHUNK if chunk is None else int(chunk)
    if attention_mask is not None and attention_mask.dim() == 2:  # (batch, keys) padding mask (flash attention)
        attention_mask = attention_mask.bool()[:, None, None, :]
    for i in range(b):  # one row at a time
        k_row = key[i].float().repeat_interleave(rep, dim=0)
        q_row = query[i].float()
        m_row = None
        if attention_mask is not None:
            m_row = attention_mask[i if attention_mask.shape[0] > 1 else 0]
        full = m_row is not None and m_row.shape[-2] != 1  # a per-query mask: the structure is its own
        for a in range(0, lq, chunk):
            e = min(a + chunk, lq)
            kend = max(0, min(lk, e + lk - lq)) if causal else lk
            m = m_row[..., a:e, :] if full else m_row
            if full and kend < lk and not _all_masked(m[..., kend:]):
                kend = lk  # the mask lets these queries see later keys (e.g. bidirectional spans)
            s = torch.matmul(q_row[:, a:e], k_row[:, :kend].transpose(-1, -2)).mul_(scale)
            if m is not None:
                m = m[..., :kend]
                s = s.masked_fill_(~m, float("-inf")) if m.dtype == torch.bool else s.add_(m.float())
            if causal and not full:  # no mask, or a padding mask only
                keep = torch.ones(e - a, kend, dtype=torch.bool, device=query.device).tril_(a + lk - lq)
                s.masked_fill_(~keep, float("-inf"))
            s = torch.softmax(s, dim=-1).nan_to_num_(nan=0.0)  # one more heads × q × k buffer, not two
            yield i, a, e, s.mean(0)
            del s


def _all_masked(m: torch.Tensor) -> bool:
    """Whether a bool keep mask hides every entry, or an additive mask puts each at ≤ half its dtype's minimum."""
    if m.numel() == 0:
        return True
    if m.dtype == torch.bool:
        return not bool(m.any())
    return bool((m <= torch.finfo(m.dtype).min / 2).all())


def mean_attention(query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor],
                   scaling: Optional[float], causal: bool = True, chunk: Optional[int] = None) -> torch.Tensor:
    """Attention probabilities averaged over the query heads, ``(batch, q_len, k_len)``, float32.

    ``query`` ``(batch, heads, q_len, d)``, ``key`` ``(batch, kv_heads, k_len, d)`` (grouped-query
    heads share a key head, as ``repeat_kv``); ``attention_mask`` additive (float) or keep (bool),
    broadcastable to ``(batch, heads, q_len, k_len)``, or a ``(batch, k_len)`` padding mask; the
    causal mask is applied too when ``causal``. Fully masked query rows (padding) are zeros with a keep (bool) mask
    and uniform with an additive one (the covariance drops padded rows either way). ``chunk``: queries per score buffer (default :data:`QUERY_CHUNK`).
    """
    b, _, lq, _ = query.shape
    out = torch.zeros(b, lq, key.shape[2], dtype=torch.float32, device=query.device)
    for i, a, e, p in _attention_chunks(query, key, attention_mask, scaling, causal, chunk):
        out[i, a:e, : p.shape[-1]] = p
    return out


def attention_average(query: torch.Tensor, key: torch.Tensor, x: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float], causal: bool = True,
                      chunk: Optional[int] = None) -> torch.Tensor:
    """``P̄·X`` (float32, ``(batch, q_len, features)``) for ``x`` ``(batch, k_len, features)``, without
    the ``q_len × k_len`` matrix :func:`mean_attention` returns::

        y = attention_average(q, k, x, mask, scaling=None)   # == mean_attention(q, k, mask, None) @ x
    """
    b, _, lq, _ = query.shape
    y = torch.empty(b, lq, x.shape[-1], dtype=torch.float32, device=query.device)
    row, xf = -1, x
    for i, a, e, p in _attention_chunks(query, key, attention_mask, scaling, causal, chunk):
        if i != row:
            row, xf = i, x[i].float()
        torch.matmul(p, xf[: p.shape[-1]], out=y[i, a:e])
    return y


def _tapped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    tap: Optional[ValueTap] = getattr(module, "_peft_eora_value_tap", None)
    if tap is not None:
        x = _inputs().pop(id(tap), None)
        matched = x is not None and x.shape[-2] == key.shape[2]
        head_dim = value.shape[-1]
        if tap.verify:
            tap.verified = False
            try:
                if matched:
                    expected = tap.value_states(x, head_dim)
                    tap.verified = expected.shape == value.shape and torch.allclose(
                        expected.float(), value.float(), rtol=1e-3, atol=1e-5)
            except Exception as exc:  # noqa: BLE001 - a layout the tap cannot follow: token weighting
                logger.debug("value tap check failed: %s", exc)
        elif tap.hooks:
            if not matched:  # the probe saw this layout hold; a different call now is a bug
                raise RuntimeError(f"peft-eora's value tap on {type(module).__name__} found no matching value input.")
            with torch.autocast(query.device.type, enabled=False):
                y = attention_average(query, key, x, attention_mask, kwargs.get("scaling"),
                                      causal=getattr(module, "is_causal", True))
            for hook in list(tap.hooks):
                hook(tap, (y,))
            del y
            # the projection may have been compensated meanwhile; under autocast, the half-precision copies
            # of its weights cast before the pause are cached (per thread) and would be reused: drop them
            if torch.is_autocast_enabled(query.device.type):
                torch.clear_autocast_cache()
            value = tap.value_states(x, head_dim)
        _inputs().pop(id(tap), None)  # what value_states re-fed the input hook: not kept alive
    return _original_function(module)(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(TAP_ATTENTION, _tapped_attention)


class attached:
    """Context manager: route the taps' attention modules through :func:`_tapped_attention`."""

    def __init__(self, taps: list[ValueTap]) -> None:
        self.taps = taps
        self._handles: list[Any] = []
        self._configs: list[Any] = []

    def __enter__(self) -> "attached":
        if not self.taps:
            return self
        _register()
        for tap in self.taps:
            tap.attention._peft_eora_value_tap = tap
            cfg = tap.attention.config
            if id(cfg) not in _ORIGINAL_IMPL:
                _ORIGINAL_IMPL[id(cfg)] = getattr(cfg, "_attn_implementation_internal", None)
                cfg._attn_implementation_internal = TAP_ATTENTION  # this config only, not its sub-configs
                self._configs.append(cfg)

            def keep_input(_m: nn.Module, args: tuple, tap: ValueTap = tap) -> None:
                _inputs()[id(tap)] = args[0]

            self._handles.append(tap.layer.register_forward_pre_hook(keep_input))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        for cfg in self._configs:
            cfg._attn_implementation_internal = _ORIGINAL_IMPL.pop(id(cfg))
        for tap in self.taps:
            if getattr(tap.attention, "_peft_eora_value_tap", None) is tap:
                del tap.attention._peft_eora_value_tap
        _inputs().clear()


def value_taps(block: nn.Module, layers: set[int]) -> list[ValueTap]:
    """A tap, in check mode, for each targeted value projection of ``block`` whose attention module
    dispatches through transformers' attention interface (``layers``: the ``id`` of each targeted layer).

    Run one forward of the block with them :class:`attached` (the module-order probe does), then
    keep what :func:`verified` returns."""
    taps = []
    for module in block.modules():
        cfg = getattr(module, "config", None)
        if cfg is None or not hasattr(cfg, "_attn_implementation_internal") or not hasattr(module, "head_dim"):
            continue
        for name in VALUE_NAMES:
            layer = getattr(module, name, None)
            if layer is not None and id(layer) in layers:
                taps.append(ValueTap(attention=module, layer=layer, verify=True))
    return taps


def verified(taps: list[ValueTap]) -> list[ValueTap]:
    """The taps whose value-state layout held in the check forward, switched to collecting; the
    others keep token weighting, with a warning."""
    good = []
    for tap in taps:
        tap.verify = False
        if tap.verified:
            good.append(tap)
        else:
            warnings.warn(
                f"{type(tap.attention).__name__}: its value states are not v_proj(x) split into heads (or its attention "
                "was never called), so its value projection is weighted by tokens, not by attention "
                "(EoRAConfig.value_weighting).", stacklevel=3)
    return good
