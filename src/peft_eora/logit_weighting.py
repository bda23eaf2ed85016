"""Query and key projections weighted by the attention logits they feed (``EoRAConfig.logit_weighting``).

EoRA fits ``‖(ΔW − BA)·Xᵀ‖_F``: every output channel of a layer counts alike. A key projection's
output reaches the model only through the logits ``q_tᵀ·R_{t−s}·k_s`` (``R``: the rotary rotation),
so an error ``δk_s`` costs ``Σ_t (q_tᵀ·R·δk_s)² = δk_sᵀ·(Σ_t Rᵀ q_t q_tᵀ R)·δk_s``. Averaged over the
rotation angles, each rotary pair ``(i, i + d/2)`` of a head sees a multiple of the identity: the
metric is diagonal, one weight per pair, the energy of the queries in that pair summed over the query
heads that read this key head. That energy needs no new statistic: with ``H`` the covariance of the
block's attention input (the one ``q_proj`` and ``k_proj`` share), ``diag(W_q·H·W_qᵀ)``, from the
original ``W_q``. Query projections are weighted the same way by the keys of their key head. With
``G = diag(g)`` the weighted problem is EoRA on ``G^½·ΔW``::

    g = key_weights(W_q, H, AttentionShape(heads=9, kv_heads=3, head_dim=64))   # (kv_heads·head_dim,)
    factors = eora_factors(g.sqrt()[:, None] * delta, H, r)                        # then B ← G^-½·B

Found by forcing plain SVD on one layer type at a time where EoRA trailed SVD (SmolLM2-135M, GPTQ
4-bit, r=128, WikiText-2): ``k_proj`` held most of the loss. Measured there (WikiText-2 / GSM8K):
unweighted 38.339 / 6.346, keys weighted 38.297 / 6.332, queries and keys 38.230 / 6.332 (plain SVD
38.252 / 6.362); README "Measured" has the full tables.

The softmax (an error on a key nobody attends to costs nothing) and the causal order are ignored:
every query counts against every key. Models whose projections are not laid out as
``heads × head_dim`` (checked by shape) keep unweighted outputs, with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config import LOGIT_WEIGHTINGS
from .decompose import Covariance, covariance_parts

logger = logging.getLogger(__name__)

__all__ = ["LOGIT_WEIGHTINGS", "AttentionShape", "attention_shape", "key_weights", "query_weights", "output_weights",
           "unmodelled"]

#: Pair weights below this share of their mean are raised to it: a rotary pair no query uses still
#: keeps a small weight, so ``G`` stays invertible and ``B = G^-½·B'`` finite.
WEIGHT_FLOOR = 1e-3

#: Model types whose rotary embedding pairs neighbouring channels (``x[..., ::2]``/``x[..., 1::2]``, or a complex
#: view), not ``(i, i + d/2)``: the metric's pairs are not theirs (read off transformers' ``rotate_half``).
NEIGHBOUR_PAIRED_ROTARY = frozenset({"gptj", "codegen", "cohere", "cohere2", "helium", "ernie4_5", "ernie4_5_moe",
                                     "llama4", "llama4_text", "glm", "glm4"})

#: Attribute names of the query and key projections inside an attention module.
QUERY_NAME, KEY_NAME = "q_proj", "k_proj"


@dataclass(frozen=True)
class AttentionShape:
    """Heads of an attention module: ``heads`` query heads share ``kv_heads`` key heads of ``head_dim``."""

    heads: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.heads <= 0 or self.kv_heads <= 0 or self.heads % self.kv_heads or self.head_dim % 2:
            raise ValueError(f"Unsupported attention shape {self}: heads must be a multiple of kv_heads and "
                             "head_dim even.")


def attention_shape(config: Any) -> Optional[AttentionShape]:
    """The model config's attention shape (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``),
    or ``None`` where the config does not say."""
    config = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(heads, int) or heads <= 0:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if isinstance(hidden, int) else None)
    if not isinstance(head_dim, int) or head_dim % 2 or heads % kv:
        return None
    return AttentionShape(heads, int(kv), head_dim)


def unmodelled(model: Any) -> Optional[str]:
    """Why the metric above does not describe ``model``'s attention logits, or None. It assumes rotary pairs
    ``(i, i + d/2)`` over the whole head and queries/keys used as projected: QK-norm (Qwen3, OLMo2, Gemma 3: each
    channel reaches the logits through its norm gain, a 66× spread of sensitivities a review measured), partial
    or interleaved rotary embeddings (Phi, GPT-J) and no rotary embedding (OPT) break that."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if names & {"q_norm", "k_norm", "qk_norm", "q_layernorm", "k_layernorm"}:
        return "its queries and keys pass through a norm (QK-norm), whose gains the metric does not model"
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    if getattr(config, "model_type", None) in NEIGHBOUR_PAIRED_ROTARY:
        return "its rotary embedding rotates neighbouring channel pairs (2i, 2i + 1)"
    rope = getattr(config, "rope_parameters", None) or {}
    partial = getattr(config, "partial_rotary_factor", None) or (rope.get("partial_rotary_factor")
                                                                 if isinstance(rope, dict) else None)
    if partial is not None and float(partial) < 1.0:
        return f"its rotary embedding covers {float(partial):g} of each head"
    if getattr(config, "rotary_dim", None) not in (None, getattr(config, "head_dim", None)):
        return "its rotary embedding covers part of each head"
    if not any("rotary" in type(m).__name__.lower() for m in model.modules()):
        return "it has no rotary position embedding"
    return None


def pair_energy(W: torch.Tensor, H: Covariance, heads: int, head_dim: int) -> torch.Tensor:
    """``(heads, head_dim/2)``: the energy ``Σ_t (w_i·x_t)² + (w_{i+d/2}·x_t)²`` of each rotary pair of
    each head's outputs, from ``H = Σ_t x_t x_tᵀ`` (or its parts; float64)."""
    parts = covariance_parts(H)
    W = W.detach().to(parts[0].device, torch.float64)
    e = sum(((W @ part.detach().to(torch.float64)) * W).sum(1) for part in parts).view(heads, head_dim)
    half = head_dim // 2
    return e[:, :half] + e[:, half:]


def _expand(pairs: torch.Tensor) -> torch.Tensor:
    """Per-pair weights ``(heads, d/2)`` → per-output-channel weights ``(heads·d,)``, mean 1, floored."""
    g = torch.cat([pairs, pairs], 1).reshape(-1).clamp_min(0.0)
    mean = float(g.mean())
    if not mean > 0.0:  # no query (key) energy at all: nothing to weight by
        return torch.ones_like(g)
    return (g / mean).clamp_min(WEIGHT_FLOOR)


def key_weights(W_q: torch.Tensor, H: Covariance, shape: AttentionShape) -> torch.Tensor:
    """Output weights of a key projection: each rotary pair of key head ``j`` weighted by the energy of
    that pair in the queries of the heads that read ``j`` (``W_q``: the original query weight)."""
    e = pair_energy(W_q, H, shape.heads, shape.head_dim)
    return _expand(e.view(shape.kv_heads, shape.heads // shape.kv_heads, -1).sum(1))


def query_weights(W_k: torch.Tensor, H: Covariance, shape: AttentionShape) -> torch.Tensor:
    """Output weights of a query projection: each rotary pair of query head ``h`` weighted by the energy
    of that pair in the keys of the head ``h`` reads (``W_k``: the original key weight)."""
    e = pair_energy(W_k, H, shape.kv_heads, shape.head_dim)
    return _expand(e.repeat_interleave(shape.heads // shape.kv_heads, 0))


def partner(name: str, weighting: str) -> Optional[tuple[str, str]]:
    """``(role, partner module name)`` for a module the weighting applies to, else ``None``::

        partner("model.layers.0.self_attn.k_proj", "keys")   # ("key", "model.layers.0.self_attn.q_proj")
    """
    head, _, leaf = name.rpartition(".")
    if leaf == KEY_NAME and weighting != "none":  # keys are weighted by both other choices
        return "key", f"{head}.{QUERY_NAME}" if head else QUERY_NAME
    if leaf == QUERY_NAME and weighting == "queries_and_keys":
        return "query", f"{head}.{KEY_NAME}" if head else KEY_NAME
    return None


def output_weights(name: str, out_features: int, weighting: str, shape: Optional[AttentionShape],
                   partner_weight: Any, H: Covariance) -> Optional[torch.Tensor]:
    """The diagonal output metric ``g`` (float64, ``(out_features,)``) of module ``name``, or ``None``
    where it is unweighted (not a query/key projection, unknown shape, shapes that do not fit).

    ``partner_weight(name) -> Tensor | None`` reads the original weight of the sibling projection.
    """
    if weighting == "none" or shape is None:
        return None
    found = partner(name, weighting)
    if found is None:
        return None
    role, other = found
    W = partner_weight(other)
    q_rows, k_rows = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    own, theirs = (k_rows, q_rows) if role == "key" else (q_rows, k_rows)
    if W is None or out_features != own or W.shape[0] != theirs or W.shape[1] != covariance_parts(H)[0].shape[0]:
        logger.warning("%s: logit weighting skipped (the %s projection %s is missing or not laid out as heads × "
                       "head_dim for %s)", name, "query" if role == "key" else "key", other, shape)
        return None
    return key_weights(W, H, shape) if role == "key" else query_weights(W, H, shape)
