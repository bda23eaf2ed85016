"""Compensated layers forward as one dense product during a CPU block visit (``peft_eora.merged_forward``):
the same outputs as PEFT's layer to float32 rounding, every case it cannot serve falls back to the
layer's own forward, and EoRA's factors do not depend on it."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.gptq import GPTQLoraLinear
from torch import nn

from peft_eora import EoRAConfig, initialize_eora_weights
from peft_eora.kernels.gptq_linear import GPTQLinear, register_gptq_linear
from peft_eora.merged_forward import MergedForwards
from peft_eora.residual import backend_for


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = GPTQLinear.from_linear(nn.Linear(96, 64, bias=True), bits=3, group_size=32)
        self.dense = nn.Linear(64, 80, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.q(x))


def _lora(**kwargs) -> nn.Module:
    cfg = register_gptq_linear(LoraConfig(r=8, lora_alpha=16, target_modules=["q", "dense"], init_lora_weights=False,
                                          **kwargs))
    pm = get_peft_model(Pair(), cfg).eval()
    with torch.no_grad():
        for mod in pm.modules():
            if hasattr(mod, "lora_B"):
                mod.lora_B["default"].weight.normal_(0.0, 0.05)
                if mod.lora_B["default"].bias is not None:
                    mod.lora_B["default"].bias.normal_(0.0, 0.05)
    return pm


def _layers(pm) -> list[nn.Module]:
    return [pm.base_model.model.q, pm.base_model.model.dense]


def _compressed(layer: nn.Module) -> torch.Tensor:
    base = layer.get_base_layer()
    return backend_for(base, "layer").dequantize(base).float()


@torch.no_grad()
@pytest.mark.parametrize("lora_bias", [False, True])
def test_merged_layers_match_their_own_forward_and_restore_it(lora_bias):
    pm = _lora(lora_bias=lora_bias)
    assert (pm.base_model.model.dense.lora_B["default"].bias is not None) == lora_bias
    layers = _layers(pm)
    assert isinstance(layers[0], GPTQLoraLinear) and layers[0].get_base_layer().bias is not None
    x = torch.randn(3, 7, 96)
    ref = pm(x)
    with MergedForwards("default", layers) as merged:
        assert all("forward" in vars(layer) for layer in layers)
        assert all(merged.add(layer, _compressed(layer)) for layer in layers)
        calls = []
        layers[0].get_base_layer().register_forward_hook(lambda *a: calls.append(1))
        out = pm(x)
        assert calls == []  # the quantized base was not run: one dense product instead
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-6
    assert all("forward" not in vars(layer) for layer in layers)
    pm(x)
    assert calls == [1]  # its own forward is back


@torch.no_grad()
def test_merged_layers_fall_back_wherever_the_product_would_differ():
    pm = _lora()
    q = _layers(pm)[0]
    x = torch.randn(4, 96)
    base_calls = []
    q.get_base_layer().register_forward_hook(lambda *a: base_calls.append(1))

    def runs_own(call) -> bool:
        base_calls.clear()
        call()
        return base_calls == [1]

    with MergedForwards("default", [q]) as merged:
        assert runs_own(lambda: q(x))  # not merged yet: its own forward
        merged.add(q, _compressed(q))
        assert not runs_own(lambda: q(x))
        assert runs_own(lambda: q(x.to(torch.bfloat16)))  # another dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert runs_own(lambda: q(x))
        with pm.disable_adapter():
            ref = q.get_base_layer()(x)
            assert runs_own(lambda: q(x)) and torch.equal(q(x), ref)  # adapters off: the base alone
        q.lora_B["default"].weight.mul_(2)  # factors changed after merging: the merged weight is stale
        assert runs_own(lambda: q(x))
        doubled = q(x)
    expect = q.get_base_layer()(x) + q.lora_B["default"](q.lora_A["default"](x)) * q.scaling["default"]
    assert torch.allclose(doubled, expect, atol=1e-6)


@torch.no_grad()
def test_layers_it_cannot_serve_are_left_alone():
    pm = _lora(use_dora=False)
    q, dense = _layers(pm)
    dense.forward = dense.forward  # e.g. accelerate's hooks replace forward on the instance
    with MergedForwards("default", [q, dense], enabled=False) as off:
        assert not off.add(q, _compressed(q)) and "forward" not in vars(q)
    with MergedForwards("default", [q, dense]) as merged:
        assert not merged.add(dense, _compressed(dense))
        assert merged.add(q, _compressed(q))
    assert "forward" in vars(dense)  # not ours to take back

    dora = get_peft_model(Pair(), register_gptq_linear(LoraConfig(r=4, target_modules=["dense"], use_dora=True))).eval()
    layer = dora.base_model.model.dense
    with MergedForwards("default", [layer]) as merged:
        assert "forward" not in vars(layer) and not merged.add(layer, _compressed(layer))


def test_eora_factors_do_not_depend_on_merging(tiny_llama, calib_ids, monkeypatch):
    """A CPU float32 walk merges every installed layer; turned off, the factors agree to float32 rounding."""
    import peft_eora.merged_forward as mf

    original, quantized = tiny_llama
    added = []
    real_add = mf.MergedForwards.add
    monkeypatch.setattr(mf.MergedForwards, "add", lambda self, layer, w: added.append(real_add(self, layer, w))
                        or added[-1])

    def run():
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping="auto"))
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False)
        return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}

    merged = run()
    assert added and all(added) and len(added) == len(merged) // 2
    monkeypatch.setattr(mf, "ENABLED", False)  # what scale.py --per-group-forwards sets
    added.clear()
    own = run()
    assert added == []
    for name in merged:
        if "lora_A" in name:  # compare the products B·A (the factors' signs and bases may differ)
            b = name.replace("lora_A", "lora_B")
            pa, pb = merged[b] @ merged[name], own[b] @ own[name]
            assert ((pa - pb).norm() / pb.norm()).item() < 1e-5, name  # measured ≤ 4e-7


def test_half_precision_walks_do_not_merge(tiny_llama, calib_ids, monkeypatch):
    import peft_eora.merged_forward as mf

    original, quantized = tiny_llama
    added = []
    monkeypatch.setattr(mf.MergedForwards, "add", lambda self, layer, w: added.append(1) or False)
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
    initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False,
                            forward_dtype="bfloat16")
    assert added == []
