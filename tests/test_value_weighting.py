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
from peft_eora.value_weighting import ValueTap, attached, mean_attention
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


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_tap_collects_attention_averaged_inputs_and_restores_the_model(impl: str) -> None:
    """Under a tap, block 0 hands its hook P̄·X, P̄ the eager attention weights averaged over the
    heads (left padding, grouped-query heads; the mask in the block's own format: additive for
    eager, boolean or none for sdpa), and computes what it computes without one."""
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
