"""Value projections weighted by the attention they feed (peft_eora.value_weighting)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama_pair

import peft_eora.walker as walker_mod
from peft_eora import EoRAConfig, initialize_eora_weights
from peft_eora.decompose import eora_factors, weighted_error
import peft_eora.value_weighting as vw
from peft_eora.value_weighting import ValueTap, attached, attention_average, mean_attention
from peft_eora.walker import capture_block_inputs


def _ids(rows: int = 8, seq: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (rows, seq), generator=g)


def _eager(model: torch.nn.Module) -> torch.nn.Module:
    model.config._attn_implementation = "eager"
    return model


def _reference_value_covariance(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ (P̄·X)ᵀ(P̄·X) of block 0's v_proj from the eager attention weights (padding rows dropped)."""
    attn = model.model.layers[0].self_attn
    seen = {}
    h = attn.v_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
    h.remove()
    P = out.attentions[0].float().mean(1)  # (B, L, L)
    Y = torch.bmm(P, seen["x"].float())
    if mask is not None:
        Y = Y[mask.bool()]
    Y = Y.reshape(-1, Y.shape[-1]).double()
    return Y.T @ Y


def _block_inputs(model, ids: torch.Tensor, mask: torch.Tensor | None = None):
    """Block 0's (hidden, kwargs), masks made by the model's own attention implementation (as the walker)."""
    batch = {"input_ids": ids, **({"attention_mask": mask} if mask is not None else {})}
    (inputs,) = capture_block_inputs(model, model.model.layers[0], [batch])
    return inputs


@pytest.mark.parametrize("chunk", [None, 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_tap_collects_attention_averaged_inputs_and_restores_the_model(impl: str, chunk, monkeypatch) -> None:
    """Under a tap, block 0 hands its hook P̄·X, P̄ the eager attention weights averaged over the
    heads (left padding, grouped-query heads; the mask in the block's own format: additive for
    eager, boolean or none for sdpa), and computes what it computes without one; the same with the
    queries taken in chunks (keys up to each chunk's end)."""
    if chunk is not None:
        monkeypatch.setattr(vw, "QUERY_CHUNK", chunk)
    original, _ = tiny_llama_pair(layers=1)
    original.config._attn_implementation = impl
    ids = _ids(3, 16)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ref = _reference_value_covariance(_eager(copy.deepcopy(original)), ids, mask)
    block = original.model.layers[0]
    hidden, kwargs = _block_inputs(original, ids, mask)
    attn = block.self_attn
    tap = ValueTap(attention=attn, layer=attn.v_proj)
    seen = []
    handle = tap.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        plain = block(hidden, **kwargs)[0]
        with attached([tap]):
            assert original.config._attn_implementation != impl  # routed through the tap meanwhile
            tapped = block(hidden, **kwargs)[0]
    handle.remove()
    (Y,) = seen
    Y = Y[mask.bool()].double()
    torch.testing.assert_close(Y.T @ Y, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tapped, plain)  # the tap only observes
    assert original.config._attn_implementation == impl
    assert not hasattr(attn, "_peft_eora_value_tap")


def test_mean_attention_causal_without_mask() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g)
    P = mean_attention(q, k, None, None)
    kr = k.repeat_interleave(2, dim=1)
    s = (q @ kr.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(P, s.softmax(-1).mean(1))


def _dense_reference(q, k, mask, causal: bool) -> torch.Tensor:
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ kr.transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        mask = mask.bool()[:, None, None, :] if mask.dim() == 2 else mask
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if causal and (mask is None or mask.shape[-2] == 1):  # a per-query mask holds the whole structure
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(s.shape[-1] - s.shape[-2]), float("-inf"))
    return s.softmax(-1).nan_to_num(nan=0.0).mean(1)


def _with_span(keep: torch.Tensor) -> torch.Tensor:
    """``keep`` with queries 5–7 of every row also seeing keys up to 3 positions past themselves
    (as image tokens in Gemma 3 see their whole image)."""
    out = keep.clone()
    lq, lk = out.shape[-2:]
    for q in range(5, min(8, lq)):
        out[..., q, : min(lk, q + (lk - lq) + 4)] = True
    out[1, ..., :4] = False  # the padding stays hidden
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 128])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "key-only", "key-only-causal", "2d-padding",
                                       "noncausal", "bidirectional-span"])
@pytest.mark.parametrize("lq,lk", [(10, 13), (10, 10)])
def test_chunked_attention_average_matches_dense(chunk: int, mask_kind: str, lq: int, lk: int) -> None:
    """Chunked queries (causal: keys up to the chunk's end, the causal mask applied on top of
    padding-only masks) give the dense head-averaged probabilities and ``P̄·X`` on every unpadded
    query, with more keys than queries too (a cache)."""
    g = torch.Generator().manual_seed(1)
    b, h, kv, d = 3, 4, 2, 8
    q, k = torch.randn(b, h, lq, d, generator=g), torch.randn(b, kv, lk, d, generator=g)
    x = torch.randn(b, lk, 6, generator=g)
    causal = mask_kind != "noncausal"
    keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq).expand(b, 1, lq, lk).clone()
    keep[1, ..., :4] = False  # left padding of row 1: its first keys hidden
    mask = {"none": None, "noncausal": None, "bool": keep,
            "additive": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min),
            "key-only": keep[:, :, -1:, :].clone(),  # (b, 1, 1, lk): broadcast over queries
            "key-only-causal": keep[:, :, -1:, :].clone(),
            "2d-padding": keep[:, 0, -1, :].long(),  # (b, lk) 0/1, as flash attention gets
            "bidirectional-span": _with_span(keep)}[mask_kind]  # a causal model's mask seeing ahead in a span
    if mask_kind == "key-only":
        causal = False  # a mask without the causal part on a non-causal attention
    ref = _dense_reference(q, k, mask, causal)
    got = mean_attention(q, k, mask, None, causal=causal, chunk=chunk)
    y = attention_average(q, k, x, mask, None, causal=causal, chunk=chunk)
    rows = torch.ones(b, lq, dtype=torch.bool)
    if mask_kind in ("bool", "additive", "key-only-causal", "2d-padding", "bidirectional-span"):
        rows[1, : 4 - (lk - lq)] = False  # queries whose every key is padding: dropped by the covariances
    torch.testing.assert_close(got[rows], ref[rows])
    torch.testing.assert_close(y[rows], (ref @ x)[rows])


@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_chunked_attention_average_with_more_queries_than_keys(chunk: int) -> None:
    """Causal with more queries than keys: the first queries see no key (zero rows), as dense."""
    g = torch.Generator().manual_seed(2)
    q, k, x = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 9, 5, generator=g)
    ref = _dense_reference(q, k, None, True)
    torch.testing.assert_close(mean_attention(q, k, None, None, chunk=chunk), ref)
    torch.testing.assert_close(attention_average(q, k, x, None, None, chunk=chunk), ref @ x)


def test_value_projection_factors_are_eora_of_the_attention_weighted_covariance() -> None:
    original, quantized = tiny_llama_pair(layers=1)
    ids = _ids(8, 24)
    H = _reference_value_covariance(_eager(copy.deepcopy(original)), ids)
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=0.01, target_modules=["v_proj"]))
    stats = initialize_eora_weights(pm, original_model=original, calibration=ids, batch_size=4, progress=False)
    layer = pm.base_model.model.model.layers[0].self_attn.v_proj
    delta = original.model.layers[0].self_attn.v_proj.weight.double() - layer.base_layer.weight.double()
    ref = eora_factors(delta, H, 4, method="eora", damping=0.01)
    got = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    want = (ref.B @ ref.A).double()
    assert float((got - want).norm() / want.norm()) < 1e-2  # float32 statistics and factors
    err_got, err_want = weighted_error(delta, H, got), weighted_error(delta, H, want)
    assert abs(err_got - err_want) <= 1e-4 * err_want
    (m,) = stats.modules
    assert m.error_after == pytest.approx(err_want, rel=1e-4)  # the stats speak of the weighted error
    tokens = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=0.01, target_modules=["v_proj"],
                                                                  value_weighting="tokens"))
    initialize_eora_weights(tokens, original_model=original, calibration=ids, batch_size=4, progress=False)
    t_layer = tokens.base_model.model.model.layers[0].self_attn.v_proj
    by_tokens = t_layer.lora_B["default"].weight.double() @ t_layer.lora_A["default"].weight.double()
    assert weighted_error(delta, H, by_tokens) > 1.01 * err_want  # token weighting misses what attention sees


def _factors(model) -> dict[str, torch.Tensor]:
    return {n: m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach()
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


@pytest.mark.parametrize("forward_dtype", [None, "bfloat16"])
def test_parked_and_per_group_forwards_agree(monkeypatch, forward_dtype) -> None:
    """Parked batches resume with the value states of the compensated v_proj: o_proj then sees the
    same inputs as in the per-group forwards (one forward per group), so the factors agree — also
    under autocast, whose per-thread cache of half-precision weight copies must not serve the
    v_proj weights cast before the pause."""
    original, quantized = tiny_llama_pair(layers=2)
    ids = _ids(8, 24)
    out = []
    for limit in (1 << 40, 0):  # park (CPU default) / one forward per group (the GPU default)
        monkeypatch.setattr(walker_mod, "PARK_LIMIT_BYTES", limit)
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=0.01, forward_dtype=forward_dtype))
        initialize_eora_weights(pm, original_model=original, calibration=ids, batch_size=4, progress=False,
                                execution_device=None)
        out.append(_factors(pm))
    assert out[0].keys() == out[1].keys() and len(out[0]) == 14
    for name in out[0]:
        torch.testing.assert_close(out[0][name], out[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_tokens_weighting_and_the_fallback_agree(monkeypatch) -> None:
    """value_weighting="tokens" is the plain token covariance; an attention whose value states the
    tap cannot reproduce falls back to it, with a warning."""
    original, quantized = tiny_llama_pair(layers=1)
    ids = _ids(8, 24)

    def run(weighting: str) -> dict[str, torch.Tensor]:
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=0.01, value_weighting=weighting))
        initialize_eora_weights(pm, original_model=original, calibration=ids, batch_size=4, progress=False)
        return _factors(pm)

    tokens, attention = run("tokens"), run("attention")
    v = next(n for n in tokens if "v_proj" in n)
    assert (tokens[v] - attention[v]).abs().max() > 1e-3  # the weighting matters
    monkeypatch.setattr(ValueTap, "value_states", lambda self, x, d: torch.zeros(1))
    with pytest.warns(UserWarning, match="weighted by tokens"):
        fallback = run("attention")
    for name in tokens:
        torch.testing.assert_close(fallback[name], tokens[name], msg=name)


def test_bad_value_weighting_is_refused() -> None:
    with pytest.raises(ValueError, match="value_weighting"):
        EoRAConfig(r=4, value_weighting="heads")


def test_cli_passes_value_weighting_to_the_config(tmp_path) -> None:
    from peft_eora.cli import build_parser
    from peft_eora.cli.compute import eora_config

    args = build_parser().parse_args(["compute", "--original", str(tmp_path), "--compressed", str(tmp_path),
                                      "--rank", "4", "--value-weighting", "tokens", "--out", str(tmp_path / "a")])
    assert eora_config(args, 4, "eora", tmp_path, None).value_weighting == "tokens"
    args = build_parser().parse_args(["compute", "--original", str(tmp_path), "--compressed", str(tmp_path),
                                      "--rank", "4", "--out", str(tmp_path / "a")])
    assert eora_config(args, 4, "eora", tmp_path, None).value_weighting == "attention"
