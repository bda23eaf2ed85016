"""EoRA through the public API on tiny random models of the architectures users quantize.

Every model is built from its transformers config (random weights, no download), its linears
inside the decoder blocks rounded to 3 bits (the dense back-end) or packed as GPTQ
(``GPTQLinear``); the default ``target_modules`` must find them, EoRA must bring the logits on
held-out tokens closer to the original's, and the adapter must save and load back.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import peft_eora  # noqa: F401  (registers the EORA PEFT type)
from peft_eora import EoRAConfig, initialize_eora_weights
from peft_eora.kernels.gptq_linear import GPTQLinear
from peft_eora.model import default_target_modules
from peft_eora.residual.base import is_conv1d

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: model type → extra config (its linears per block with the defaults, for the target check)
ARCHITECTURES = {
    "llama": ({"num_key_value_heads": 2}, 7),
    "mistral": ({"num_key_value_heads": 2}, 7),
    "qwen2": ({"num_key_value_heads": 2}, 7),
    "qwen3": ({"num_key_value_heads": 2, "head_dim": 16}, 7),
    "gemma2": ({"num_key_value_heads": 2, "head_dim": 16}, 7),
    "phi3": ({"num_key_value_heads": 2}, 4),  # fused qkv_proj and gate_up_proj
    "olmo2": ({"num_key_value_heads": 2}, 7),
    "gpt_neox": ({}, 4),  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    "falcon": ({}, 4),  # under transformer.h, not model.layers
    "phi": ({}, 6),
    "opt": ({"ffn_dim": 128, "word_embed_proj_dim": 64}, 6),  # fc1/fc2 see the tokens flattened
    "gpt2": ({"n_inner": 128}, 4),  # transformers' Conv1D: weights stored (in, out)
    "openai-gpt": ({}, 4),  # Conv1D, and blocks that take no use_cache
    "ctrl": ({"dff": 128}, 6),  # ffn = Sequential(Linear, ReLU, Linear): the ReLU is no target
    "qwen3_moe": ({"num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                   "moe_intermediate_size": 64}, 4),  # fused expert parameters: attention only
}


def _blocks_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks' linears: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-1/2, weight ``(in, out)``)."""
    return [(n, m) for n, m in model.named_modules()
            if (isinstance(m, nn.Linear) or is_conv1d(m)) and any(f".{p}." in f".{n}" for p in ("layers", "h"))]


@torch.no_grad()
def _round_(model: nn.Module, bits: int = 3, group: int = 16) -> nn.Module:
    """Round every linear of the decoder blocks to ``bits`` per group of inputs, in place."""
    qmax = 2**bits - 1
    for _, m in _blocks_linears(model):
        weight = m.weight.T if is_conv1d(m) else m.weight  # (out, in) either way
        if weight.shape[1] % group:  # e.g. a Mamba dt_proj's few inputs: kept as it is
            continue
        w = weight.reshape(weight.shape[0], -1, group)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (hi - lo).clamp_min(1e-8) / qmax
        weight.copy_((((w - lo) / scale).round().clamp(0, qmax) * scale + lo).reshape_as(weight))
    return model


def _build(model_type: str, extra: dict) -> nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **extra})
    return AutoModelForCausalLM.from_config(cfg).eval()


def _logit_error(model: nn.Module, original: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - original(ids).logits).pow(2).mean())


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_eora_on_architecture(model_type, tmp_path):
    extra, per_block = ARCHITECTURES[model_type]
    original = _build(model_type, extra)
    quantized = _round_(copy.deepcopy(original))
    base_copy = copy.deepcopy(quantized)
    torch.manual_seed(1)
    calib, held = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (4, 32))
    before = _logit_error(quantized, original, held)

    pm = get_peft_model(quantized, EoRAConfig(r=8))  # damping="auto", the default
    adapters = [n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(adapters) == 2 * per_block, adapters
    stats = initialize_eora_weights(pm, original, calib, progress=False)
    assert len(stats.modules) == 2 * per_block
    after = _logit_error(pm, original, held)
    assert after < 0.8 * before, (before, after)

    pm.save_pretrained(tmp_path)
    back = PeftModel.from_pretrained(base_copy, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(held).logits, pm(held).logits)


def _gptq_with_float_gates(original: nn.Module) -> nn.Module:
    """``original`` with every block linear packed as 4-bit GPTQ except the shared-expert gates (1 output),
    as GPTQ quantizers leave MoE gates in float."""
    model = copy.deepcopy(original)
    for name, lin in _blocks_linears(model):
        if not name.endswith("shared_expert_gate"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, GPTQLinear.from_linear(lin, 4, 16))
    return model


def test_float_linears_beside_compressed_ones_are_left_out(caplog):
    """A GPTQ MoE keeps its gates in float: the default targets leave them out (they carry no residual,
    and a 1-output gate cannot hold any rank), and EoRA runs on the packed layers."""
    original = _build("qwen2_moe", {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64})
    assert any(n.endswith("shared_expert_gate") for n, _ in _blocks_linears(original))
    quantized = _gptq_with_float_gates(original)
    with caplog.at_level(logging.INFO, logger="peft_eora.model"):
        pattern = default_target_modules(quantized)
    assert "shared_expert_gate" not in pattern and "shared_expert\\.down_proj" in pattern
    assert "leaves out the float linears" in caplog.text and "mlp.shared_expert_gate" in caplog.text

    torch.manual_seed(1)
    calib, held = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (4, 32))
    before = _logit_error(quantized, original, held)
    pm = get_peft_model(quantized, EoRAConfig(r=8))
    stats = initialize_eora_weights(pm, original, calib, progress=False)
    assert len(stats.modules) == 2 * 7 and not any("shared_expert_gate" in m.name for m in stats.modules)
    assert _logit_error(pm, original, held) < before

    # all-float (pruned or fake-quantized) models keep every linear; named explicitly, a gate is refused clearly
    assert "shared_expert_gate" in default_target_modules(_round_(copy.deepcopy(original)))
    pm = get_peft_model(_round_(copy.deepcopy(original)), EoRAConfig(r=8, target_modules=["shared_expert_gate"]))
    with pytest.raises(ValueError,
                       match=r"too large for .*shared_expert_gate \(1×64\).*exclude_modules=\['shared_expert_gate'\]"):
        initialize_eora_weights(pm, original, calib, progress=False)


class _Routed(nn.Module):
    """A block whose ``expert`` sees every other token only (as a routed MoE expert sees its share)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32, bias=False)
        self.expert = nn.Linear(32, 32, bias=False)

    def forward(self, h: torch.Tensor, **_: object) -> torch.Tensor:
        h = h + self.proj(h)
        flat = h.reshape(-1, h.shape[-1])
        out = flat.clone()
        out[::2] = out[::2] + self.expert(flat[::2])
        return out.view_as(h)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList([_Routed()])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)
        return h


def test_layer_fed_a_subset_of_tokens(caplog):
    """A layer fed a subset of the tokens (a routed MoE expert) has no windows to hold out: with
    ``damping="auto"`` it takes the fixed ridge (warned once) while its neighbours choose theirs; a padding
    mask cannot be applied to its rows (warned once)."""
    original = _Toy().eval()
    quantized = _round_(copy.deepcopy(original))
    ids = torch.randint(3, VOCAB, (8, 16))

    def run(damping, calib, targets=None):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=damping, target_modules=targets))
        stats = initialize_eora_weights(pm, original, calib, progress=False)
        expert = pm.base_model.model.layers[0].expert
        return stats, (expert.lora_A["default"].weight.clone(), expert.lora_B["default"].weight.clone())

    with caplog.at_level(logging.WARNING, logger="peft_eora.compensate"):
        auto, _ = run("auto", ids)
    assert [m.name for m in auto.modules] == ["layers.0.proj", "layers.0.expert"]
    assert auto.summary()["damping_per_module"]["layers.0.expert"] == 0.01 and auto.modules[1].heldout_errors is None
    assert auto.modules[0].heldout_errors is not None  # proj sees whole windows: chosen on held-out ones
    assert caplog.text.count("sees only the tokens routed to it") == 1
    # the expert alone: the same factors as a fixed-ridge run
    for a, b in zip(run("auto", ids, ["expert"])[1], run(0.01, ids, ["expert"])[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # one window padded
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peft_eora.compensate"):
        padded, _ = run(0.01, [{"input_ids": ids, "attention_mask": mask}])
    assert caplog.text.count("padding mask cannot be applied") == 1 and len(padded.modules) == 2


MOE = {
    "qwen3_moe": {"num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 64},
    "mixtral": {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "shared_expert_intermediate_size": 64},
}


@pytest.mark.parametrize("model_type", list(MOE))
def test_moe_with_experts_as_linears(model_type):
    """A MoE whose experts are linears fed their routed tokens (gptqmodel's loader turns transformers' fused
    expert parameters into these with ``defuser`` before quantizing), the original left fused in memory:
    its experts are read under the per-expert names, the default targets reach every expert,
    ``damping="auto"`` gives them the fixed ridge, and the logits come closer to the original's."""
    defuser = pytest.importorskip("defuser", reason="defuser comes with the gptq extra (gptqmodel)")
    from peft_eora.original import OriginalWeights

    original = _build(model_type, MOE[model_type])  # fused experts, as transformers loads it
    defused = copy.deepcopy(original)
    assert defuser.convert_model(defused)
    reference = OriginalWeights.from_module(original)
    experts = [(n, m) for n, m in defused.named_modules() if ".experts." in n and isinstance(m, nn.Linear)]
    assert len(experts) == 2 * 4 * 3
    for name, lin in experts:  # the per-expert views are exactly the weights defuser moved into linears
        assert torch.equal(reference.get(name), lin.weight.float()), name

    quantized = _round_(defused)
    torch.manual_seed(1)
    calib, held = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (4, 32))
    before = _logit_error(quantized, original, held)
    # all linears are float here (rounded in place), so the 1-output shared-expert gate is a target unless excluded
    gates = ["shared_expert_gate"] if any(n.endswith("shared_expert_gate") for n, _ in _blocks_linears(original)) else None
    pm = get_peft_model(quantized, EoRAConfig(r=8, exclude_modules=gates))
    stats = initialize_eora_weights(pm, original, calib, progress=False)
    per_module = stats.summary()["damping_per_module"]
    assert sorted(n for n in per_module if ".experts." in n) == sorted(n for n, _ in experts)
    assert all(per_module[n] == 0.01 for n, _ in experts)
    assert _logit_error(pm, original, held) < 0.8 * before


def test_layers_kept_in_parallel_lists_refused():
    """XLM keeps each layer's attention and MLP in two lists (``transformer.attentions[i]``, ``transformer.ffns[i]``)
    with no module per block: EoRA's block walk cannot serve it, and it says so at ``get_peft_model`` instead of
    failing inside a forward with a tensor-size error."""
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("xlm", vocab_size=VOCAB, emb_dim=64, n_layers=2,
                                                                   n_heads=4)).eval()
    with pytest.raises(ValueError, match=r"XLMWithLMHeadModel keeps the parts of each layer in parallel lists "
                                         r"\(transformer\.attentions, transformer\.ffns\)"):
        get_peft_model(model, EoRAConfig(r=4))


def test_narrow_experts_beside_a_wide_shared_expert():
    """The rank error's fix must spare the layers that need none: in a Qwen2-MoE whose routed experts (48 wide)
    are too narrow for r = 48 while its shared expert (64 wide) is not, ``down_proj`` alone would exclude both,
    so the error names the experts by ``experts\\.\\d+\\.down_proj`` (one key for all of them); the ``rank_pattern`` it
    suggests then runs, the shared expert at the full rank (k/v, 32 wide, are too narrow as well)."""
    defuser = pytest.importorskip("defuser", reason="defuser comes with the gptq extra (gptqmodel)")
    from peft_eora.compensate import _narrow_kinds

    assert _narrow_kinds(["m.0.ffn.0", "m.1.ffn.0"], ["m.0.ffn.2", "m.1.ffn.2"]) == {"ffn.0": ["m.0.ffn.0", "m.1.ffn.0"]}
    assert _narrow_kinds(["m.0.mixer.dt_proj"], ["m.0.mixer.in_proj"]) == {"dt_proj": ["m.0.mixer.dt_proj"]}
    original = _build("qwen2_moe", MOE["qwen2_moe"])
    defused = copy.deepcopy(original)
    assert defuser.convert_model(defused)
    quantized = _round_(defused)
    calib = torch.randint(3, VOCAB, (4, 32))
    config = {"r": 48, "exclude_modules": ["shared_expert_gate"]}
    with pytest.raises(ValueError, match=r"rank r=48 is too large for 5 kinds of layer: .*experts\.0\.gate_proj \(48×64\)"
                                         r".*rank_pattern=\{'k_proj': <r>, 'v_proj': <r>, r'experts\\\.\\d\+\\\.down_proj': <r>, "
                                         r".*exclude_modules=r'\(\.\*\\\.\)\?\(k_proj\|v_proj\|experts") as error:
        initialize_eora_weights(get_peft_model(copy.deepcopy(quantized), EoRAConfig(**config)), original, calib,
                                progress=False)
    exclude = re.search(r"exclude_modules=r'([^']+)'", str(error.value)).group(1)  # the regex it suggests, applied
    wrapped = [n for n, m in get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=48, exclude_modules=exclude)
                                            ).named_modules() if hasattr(m, "lora_A")]
    assert not any(".experts." in n or n.endswith(("k_proj", "v_proj")) for n in wrapped)
    assert sum(".shared_expert." in n for n in wrapped) == 2 * 3
    pattern = {"k_proj": 8, "v_proj": 8, r"experts\.\d+\.down_proj": 8, r"experts\.\d+\.gate_proj": 8,
               r"experts\.\d+\.up_proj": 8}
    pm = get_peft_model(quantized, EoRAConfig(**config, rank_pattern=pattern))
    stats = initialize_eora_weights(pm, original, calib, progress=False)
    ranks = {m.name: m.rank for m in stats.modules}
    assert {r for n, r in ranks.items() if ".experts." in n} == {8}
    assert {r for n, r in ranks.items() if ".shared_expert." in n} == {48}


class _TwoExperts(nn.Module):
    """Tokens whose first feature is positive go to ``a``, the others to ``b`` (an expert no token is
    routed to is not called, as in transformers' MoE loops)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32, bias=False)
        self.b = nn.Linear(32, 32, bias=False)

    def forward(self, h: torch.Tensor, **_: object) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        out = flat.clone()
        for expert, sel in ((self.a, flat[:, 0] > 0), (self.b, flat[:, 0] <= 0)):
            if sel.any():
                out[sel] = out[sel] + expert(flat[sel])
        return out.view_as(h)


class _ToyMoE(_Toy):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_TwoExperts(), _TwoExperts()])
        with torch.no_grad():  # ids below VOCAB/2 are routed to `a`, the others to `b`
            self.embed.weight[:, 0] = torch.where(torch.arange(VOCAB) < VOCAB // 2, 1.0, -1.0)


def test_expert_skipped_by_a_whole_batch(monkeypatch):
    """An expert that one calibration batch never calls: the batches cannot move in step from group to
    group, so the block runs one forward per group; the expert's statistics are those of the tokens
    routed to it, whichever batches they came from."""
    original = _ToyMoE().eval()
    quantized = _round_(copy.deepcopy(original))
    mixed = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    only_b = torch.randint(VOCAB // 2, VOCAB, (4, 16), generator=torch.Generator().manual_seed(6))

    def factors(calib, targets, damping=0.01):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=damping, target_modules=targets))
        stats = initialize_eora_weights(pm, original, calib, progress=False)
        layers = {n: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        return stats, {n: m.lora_B["default"].weight @ m.lora_A["default"].weight for n, m in layers.items()}

    stats, both = factors([mixed, only_b], None)
    assert len(stats.modules) == 4 and all(m.error_after < m.error_before for m in stats.modules)
    # batches parked in step would let the second batch run `b` before `b` was compensated, so the second
    # block's inputs would differ: the result is that of one forward per group, as on a GPU
    from peft_eora import walker

    with monkeypatch.context() as m:
        m.setattr(walker, "PARK_LIMIT_BYTES", 0)
        _, per_group = factors([mixed, only_b], None)
    for name, update in both.items():
        torch.testing.assert_close(update, per_group[name], rtol=0, atol=0)
    # the first block's `a` sees no token of the second batch: the same factors as from the first batch alone
    _, first_only = factors([mixed], ["0.a"])
    torch.testing.assert_close(both["base_model.model.layers.0.a"], first_only["base_model.model.layers.0.a"])
    stats, _ = factors([mixed, only_b], None, damping="auto")  # four windows: two held out
    assert stats.summary()["damping_per_module"]["layers.0.a"] == 0.01

    with pytest.raises(RuntimeError, match=r"never called .*layers\.0\.a.*exclude_modules"):
        factors([only_b], None)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_original_from_a_checkpoint(model_type, tmp_path):
    """transformers writes a MoE checkpoint with one tensor per expert under the model's historical names:
    Qwen3-MoE's (``mlp.experts.{e}.gate_proj``) are those of the defused linears; Mixtral's
    (``block_sparse_moe.experts.{e}.w1``/``w3``/``w2``) are read through transformers' conversion mapping.
    Either way the factors equal those from the original in memory (experts fused)."""
    defuser = pytest.importorskip("defuser", reason="defuser comes with the gptq extra (gptqmodel)")
    original = _build(model_type, MOE[model_type])
    original.save_pretrained(tmp_path)
    defused = copy.deepcopy(original)
    assert defuser.convert_model(defused)
    quantized = _round_(defused)
    calib = torch.randint(3, VOCAB, (4, 32))

    def factors(reference):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
        stats = initialize_eora_weights(pm, reference, calib, progress=False)
        assert sum(".experts." in m.name for m in stats.modules) == 2 * 4 * 3
        return {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}

    from_folder, from_memory = factors(str(tmp_path)), factors(original)
    for name, value in from_memory.items():
        torch.testing.assert_close(from_folder[name], value, rtol=0, atol=0)


_GPTQ_CHILD = """
import json, os, torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from peft_eora import EoRAConfig, initialize_eora_weights
from peft_eora.quantize.gptq import quantize_gptq
from peft_eora.quantize.loading import load_quantized

args = wait_for_job()
torch.manual_seed(0)
cfg = AutoConfig.for_model(**args["config"])
original = AutoModelForCausalLM.from_config(cfg).eval()  # fused experts: defuser has patched nothing yet
if args["stage"] == "quantize":  # gptqmodel's quantizer patches transformers' classes itself: a process of its own
    original.save_pretrained(args["original"])
    AutoTokenizer.from_pretrained(args["tokenizer"]).save_pretrained(args["original"])
    quantize_gptq(args["original"], bits=3, group_size=32, num_samples=8, seq_len=64, out_dir=args["gptq"])
    print(json.dumps({}))
    raise SystemExit
quantized = load_quantized(args["gptq"])
kinds = sorted({type(m).__name__ for n, m in quantized.named_modules() if args["probe"] in n})
ids, held = torch.randint(0, 49152, (8, 64)), torch.randint(0, 49152, (4, 64))

def error(model):
    with torch.no_grad():
        return float((model(held).logits - original(held).logits).pow(2).mean())

before = error(quantized)
pm = get_peft_model(quantized, EoRAConfig(r=8))
stats = initialize_eora_weights(pm, args["original"], ids, progress=False)
print(json.dumps({"kinds": kinds, "before": before, "after": error(pm),
                  "damping": stats.summary()["damping_per_module"]}))
"""


def _gptq_end_to_end(tmp_path, config: dict, probe: str) -> dict:
    """Quantize a random model of ``config`` with gptqmodel (3-bit GPTQ g32) in a fresh process, then in
    another load it with ``load_quantized``, compensate it from the original's folder and report the
    layer classes whose names hold ``probe``, the held-out logit error before and after, and the ridges."""
    import os

    from child_process import WarmChild

    from peft_eora.embedded import export_original

    tokenizer = export_original(torch.float32, num_layers=2)  # the cached 2-layer SmolLM2 fixture's folder
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    job = {"original": str(tmp_path / "fp"), "gptq": str(tmp_path / "gptq"), "tokenizer": str(tokenizer),
           "config": config, "probe": probe}
    for stage in ("quantize", "eora"):
        (tmp_path / stage).mkdir()
        child = WarmChild(_GPTQ_CHILD, tmp_path / stage, env)
        try:
            out = child.run({**job, "stage": stage})
        finally:
            child.close()
    return out


@pytest.mark.slow
def test_gptq_moe_end_to_end(tmp_path):
    """A tiny Qwen3-MoE quantized by gptqmodel (3-bit GPTQ, experts as one packed linear each), loaded with
    ``load_quantized`` in a fresh process (it builds the experts as gptqmodel stored them: transformers
    alone would leave them random) and compensated from the original's checkpoint folder. Fresh processes:
    defuser patches transformers' classes for good."""
    pytest.importorskip("gptqmodel", reason="needs the gptq extra")
    config = dict(model_type="qwen3_moe", vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True)
    out = _gptq_end_to_end(tmp_path, config, ".experts.0.")
    assert "TorchLinear" in out["kinds"], out["kinds"]  # packed experts (`.experts.0.gate_proj` …)
    experts = [n for n in out["damping"] if ".experts." in n]
    assert len(experts) == 2 * 4 * 3 and all(out["damping"][n] == 0.01 for n in experts)
    assert len(out["damping"]) == 2 * 4 + len(experts)
    assert out["after"] < 0.85 * out["before"], out


def test_weight_shims_marked_while_any_load_runs():
    """The initialised mark on gptqmodel's weight stand-in (which lets GPT-2 checkpoints load) is on a class,
    shared by every thread: a load that ends while another still runs must leave it on, the last one take it off."""
    import threading

    pytest.importorskip("gptqmodel", reason="gptqmodel is an optional extra")
    from gptqmodel.nn_modules.qlinear.torch import _LinearWeightMetadata as shim

    from peft_eora.quantize.loading import _weight_shims_initialized

    assert "_is_hf_initialized" not in shim.__dict__
    entered, release = threading.Event(), threading.Event()

    def other_load() -> None:
        with _weight_shims_initialized():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other_load)
    with _weight_shims_initialized():
        thread.start()
        assert entered.wait(10)
    assert shim._is_hf_initialized  # this load ended, the other still runs
    release.set()
    thread.join(10)
    assert "_is_hf_initialized" not in shim.__dict__


@pytest.mark.slow
def test_gptq_gpt2_end_to_end(tmp_path):
    """GPT-2 quantized by gptqmodel: its ``Conv1D``s become packed linears, which ``load_quantized`` loads
    (transformers' GPT-2 init would otherwise touch their weightless ``weight`` stand-in), while the original's
    folder stores them ``(in, out)``: read transposed, all four layers of each block are compensated."""
    pytest.importorskip("gptqmodel", reason="needs the gptq extra")
    config = dict(model_type="gpt2", vocab_size=49152, n_embd=128, n_layer=2, n_head=4, n_positions=256,
                  bos_token_id=1, eos_token_id=2)
    out = _gptq_end_to_end(tmp_path, config, "attn.c_proj")
    assert out["kinds"] == ["TorchLinear"], out["kinds"]
    assert len(out["damping"]) == 2 * 4
    assert out["after"] < 0.9 * out["before"], out


def test_experts_collected_by_stage(monkeypatch):
    """Experts do not feed each other: one forward collects every expert's gate/up, the next every down,
    instead of a forward per expert group; the factors are bit-identical to one stage per group, and a
    covariance budget splits a kind into several stages without changing them."""
    defuser = pytest.importorskip("defuser", reason="defuser comes with the gptq extra (gptqmodel)")
    from peft_eora import compensate

    extra = {**MOE["qwen3_moe"], "num_experts": 8}
    original = _build("qwen3_moe", extra)
    defused = copy.deepcopy(original)
    assert defuser.convert_model(defused)
    quantized = _round_(defused)
    calib = [torch.randint(3, VOCAB, (4, 32)) for _ in range(2)]
    seen_stages = []
    real_stages = compensate._stages

    def run(budget):
        monkeypatch.setattr(compensate, "STAGE_BYTES", budget)
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8))
        block = pm.base_model.model.model.layers[1]
        calls = [0]
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        monkeypatch.setattr(compensate, "_stages", lambda g, r, b=None: seen_stages.append(real_stages(g, r, b))
                            or seen_stages[-1])
        initialize_eora_weights(pm, original, calib, progress=False)
        layers = {n: m for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        return calls[0], {n: (m.lora_A["default"].weight, m.lora_B["default"].weight) for n, m in layers.items()}

    staged_calls, staged = run(compensate.STAGE_BYTES)
    kinds = [len(s) for s in seen_stages[-1]]
    assert kinds[-2:] == [8, 8] and all(k == 1 for k in kinds[:-2]), kinds  # attention groups, then two stages
    two_calls, two = run(4 * 64**2 * 4)  # room for four experts' gate/up covariances (64 wide) per stage
    assert [len(s) for s in seen_stages[-1]][-4:] == [4, 4, 4, 4]  # gate/up 0-3, down 0-3, gate/up 4-7, down 4-7
    single_calls, single = run(0)
    assert all(len(s) == 1 for s in seen_stages[-1])
    assert staged_calls < two_calls < single_calls, (staged_calls, two_calls, single_calls)
    for name, (a, b) in single.items():
        for other in (staged, two):
            torch.testing.assert_close(other[name][0], a, rtol=0, atol=0)
            torch.testing.assert_close(other[name][1], b, rtol=0, atol=0)


class _ListedExperts(nn.Module):
    """Experts in a nested list, as a MoE holds them; the last one is never routed to."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(32, 32, bias=False) for _ in range(3))

    def forward(self, h: torch.Tensor, **_: object) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        out = flat.clone()
        for expert, sel in ((self.experts[0], flat[:, 0] > 0), (self.experts[1], flat[:, 0] <= 0)):
            if sel.any():
                out[sel] = out[sel] + expert(flat[sel])
        return out.view_as(h)


def test_expert_no_token_reaches(caplog):
    """An expert no calibration token is routed to has no activation statistics: its adapter is the plain
    SVD of its residual (warned once), the other experts are compensated as usual."""
    original = _ToyMoE().eval()
    original.layers = nn.ModuleList([_ListedExperts(), _ListedExperts()])
    quantized = _round_(copy.deepcopy(original))
    calib = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))

    def run(method):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, method=method))
        stats = initialize_eora_weights(pm, original, calib, progress=False)
        lin = pm.base_model.model.layers[1].experts[2]
        return stats, lin.lora_B["default"].weight @ lin.lora_A["default"].weight

    with caplog.at_level(logging.INFO, logger="peft_eora.compensate"):
        stats, update = run("eora")
    per_module = stats.summary()["damping_per_module"]
    assert per_module["layers.1.experts.2"] == "inf" and per_module["layers.1.experts.0"] == 0.01  # inf: plain SVD
    assert len(stats.modules) == 6
    assert "receive no calibration token" in caplog.text and "block 1: 1 expert layer(s)" in caplog.text
    _, svd_update = run("svd")
    torch.testing.assert_close(update, svd_update)


class _HotExpertAndCross(nn.Module):
    """``experts.0`` is chosen by every token but sees them in the router's order (permuted), as a MoE
    expert every token picked does; ``cross`` reads another sequence (the first 4 positions: cross-attention's
    keys/values see (batch, other length, features)), one window per row as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(32, 32, bias=False)])
        self.cross = nn.Linear(32, 32, bias=False)

    def forward(self, h: torch.Tensor, **_: object) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        order = torch.arange(flat.shape[0]).flip(0)  # the router's order
        out = flat.clone()
        out[order] = out[order] + self.experts[0](flat[order])
        out = out.view_as(h)
        return out + self.cross(out[:, :4]).mean(1, keepdim=True)


def test_hot_expert_and_cross_sequence(caplog):
    """An expert every token chose receives the batch's token count in another order: it is still routed
    (no padding mask, no held-out window, fixed ridge), while a layer reading another sequence keeps its
    held-out windows and only loses the padding mask."""
    original = _Toy().eval()
    original.layers = nn.ModuleList([_HotExpertAndCross()])
    quantized = _round_(copy.deepcopy(original))
    ids = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0

    def run(damping, calib, targets=None):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=damping, target_modules=targets))
        stats = initialize_eora_weights(pm, original, calib, progress=False)
        lin = pm.base_model.model.layers[0].experts[0]
        return stats, lin.lora_B["default"].weight @ lin.lora_A["default"].weight

    with caplog.at_level(logging.WARNING, logger="peft_eora.compensate"):
        stats, _ = run("auto", [{"input_ids": ids, "attention_mask": mask}])
    per_module = {m.name: m for m in stats.modules}
    assert per_module["layers.0.experts.0"].damping == 0.01 and per_module["layers.0.experts.0"].heldout_errors is None
    assert per_module["layers.0.cross"].heldout_errors is not None  # its windows are still held out
    assert "padding mask cannot be applied" in caplog.text
    # the expert alone: the mask is not applied to its rows, so padding changes nothing
    _, padded = run(0.01, [{"input_ids": ids, "attention_mask": mask}], ["experts.0"])
    _, plain = run(0.01, ids, ["experts.0"])
    torch.testing.assert_close(padded, plain, rtol=0, atol=0)


def test_routed_inputs_and_aliased_names():
    """Which inputs count as gathered by a router, and an alias that adds a prefix to a stored name (as
    transformers' renames of multimodal checkpoints do) does not make a suffix lookup ambiguous."""
    from peft_eora.compensate import _routed_input
    from peft_eora.original import OriginalWeights

    batch = (4, 16)
    expert, dense = "model.layers.0.mlp.experts.3.up_proj", "model.layers.0.mlp.up_proj"
    assert _routed_input(dense, torch.zeros(10, 8), batch)  # a subset of the 64 tokens, flattened
    assert not _routed_input(dense, torch.zeros(64, 8), batch)  # all of them in order (OPT's fc1)
    assert not _routed_input(dense, torch.zeros(4, 7, 8), batch)  # another sequence (cross-attention)
    assert _routed_input(expert, torch.zeros(64, 8), batch)  # every token chose it: the router's order
    assert _routed_input(expert, torch.zeros(1, 10, 8), batch)  # gathered, kept 3-D
    assert not _routed_input(expert, torch.zeros(4, 16, 8), batch)  # a nested list fed the batch as it is

    stored = "language_model.model.layers.0.self_attn.q_proj"
    alias = "model.language_model.model.layers.0.self_attn.q_proj"
    weights = OriginalWeights({stored: (8, 8), alias: (8, 8)}, lambda n: torch.zeros(8, 8), "checkpoint",
                              aliases={alias: stored})
    assert weights.resolve("model.layers.0.self_attn.q_proj") in (stored, alias)
    assert OriginalWeights({stored: (8, 8), alias: (8, 8)}, lambda n: torch.zeros(8, 8), "checkpoint"
                           ).resolve("model.layers.0.self_attn.q_proj") is None  # two tensors: ambiguous


def test_moe_offloaded_interrupted_and_resumed(tmp_path, monkeypatch):
    """A MoE dispatched by accelerate with its second block on disk (weights on ``meta`` until a forward
    loads them), stopped after the first block's checkpoint commit and resumed: the same factors, bit for
    bit, as one uninterrupted run of the plain model (its experts collected in stages either way)."""
    defuser = pytest.importorskip("defuser", reason="defuser comes with the gptq extra (gptqmodel)")
    from accelerate import dispatch_model

    from peft_eora.checkpoint import Checkpoint

    original = _build("qwen3_moe", MOE["qwen3_moe"])
    defused = copy.deepcopy(original)
    assert defuser.convert_model(defused)
    quantized = _round_(defused)
    calib = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(2))

    def lora(pm):
        return {n: p.detach().to("cpu", copy=True) for n, p in pm.named_parameters() if "lora_" in n}

    def run(model, **kwargs):
        pm = get_peft_model(model, EoRAConfig(r=8))
        initialize_eora_weights(pm, original, calib, batch_size=4, progress=False, **kwargs)
        return pm

    plain = lora(run(copy.deepcopy(quantized)))

    def offloaded():
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                      "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        model = dispatch_model(copy.deepcopy(quantized), device_map=device_map,
                               offload_dir=str(tmp_path / "offload"), main_device="cpu")
        assert model.model.layers[1].mlp.experts[0].gate_proj.weight.device.type == "meta"
        return model

    class Interrupted(Exception):
        pass

    real_commit = Checkpoint.commit

    def commit_then_stop(self, index):
        real_commit(self, index)
        raise Interrupted(index)

    ckpt = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "commit", commit_then_stop)
        with pytest.raises(Interrupted):
            run(offloaded(), checkpoint_dir=ckpt)
    assert json.loads((Path(ckpt) / "manifest.json").read_text())["done"] == 0
    resumed = lora(run(offloaded(), checkpoint_dir=ckpt, resume=True))
    assert set(resumed) == set(plain) and any(".experts." in n for n in plain)
    for name, value in plain.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def _gpt2_pair() -> tuple[nn.Module, nn.Module]:
    """A tiny random GPT-2 (its linears are transformers' ``Conv1D``, weights stored ``(in, out)``) and a copy
    whose ``Conv1D``s became ``nn.Linear``s (``(out, in)``), as gptqmodel and bitsandbytes load a GPT-2."""
    from transformers.pytorch_utils import Conv1D

    original = _build("gpt2", {})
    linears = copy.deepcopy(original)
    for parent in list(linears.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                lin = nn.Linear(child.nx, child.nf)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    lin.bias.copy_(child.bias)
                setattr(parent, child_name, lin)
    return original, linears.eval()


def test_gpt2_original_read_as_linears(tmp_path):
    """A compressed GPT-2 whose layers are linears reads its original's ``Conv1D`` weights transposed, from
    memory or from the checkpoint folder: there they are found on an empty skeleton of the model its config
    describes, since the square ``attn.c_proj`` cannot be told by its shape. Both give the same factors."""
    from peft_eora.original import ModelMismatchError, OriginalWeights

    original, linears = _gpt2_pair()
    original.save_pretrained(tmp_path)
    from_folder = OriginalWeights.open(tmp_path)
    square = "transformer.h.0.attn.c_proj"
    assert torch.equal(from_folder.get(square), original.get_submodule(square).weight.T)
    assert from_folder.shape("transformer.h.0.attn.c_attn") == (192, 64)
    assert OriginalWeights.open(original).shape("transformer.h.0.mlp.c_fc") == (256, 64)  # n_inner = 4 · n_embd
    (tmp_path / "config.json").rename(tmp_path / "config.json.away")  # no model type: stored as it is, and said so
    with pytest.raises(ModelMismatchError, match=r"c_attn: original .* \(64, 192\), compressed model has \(192, 64\).*transpose"):
        OriginalWeights.open(tmp_path).check("transformer.h.0.attn.c_attn", (192, 64))
    (tmp_path / "config.json.away").rename(tmp_path / "config.json")
    remote = tmp_path / "remote"  # a model type only its own code knows: that code is never run (nor asked about)
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "made_up", "auto_map": {"AutoConfig": "x.Config"}}))
    (remote / "x.py").write_text("raise SystemExit('the folder code ran')\n")
    from peft_eora.original import conv1d_names, model_skeleton

    assert model_skeleton(remote) is None and conv1d_names(remote, ["h.0.attn.c_proj"], None) == set()

    quantized = _round_(linears)
    torch.manual_seed(1)
    calib, held = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (4, 32))
    before = _logit_error(quantized, original, held)

    def factors(reference):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8))
        stats = initialize_eora_weights(pm, reference, calib, progress=False)
        assert len(stats.modules) == 2 * 4
        return pm, {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}

    pm, in_memory = factors(original)
    assert _logit_error(pm, original, held) < 0.8 * before
    _, on_disk = factors(str(tmp_path))
    for name, value in in_memory.items():
        torch.testing.assert_close(on_disk[name], value, rtol=0, atol=0)


def test_gpt2_conv1d_base(tmp_path, monkeypatch):
    """A GPT-2 base that keeps its ``Conv1D``s (here magnitude-pruned to half) is compensated through the dense
    back-end (the weight read transposed); the adapter saves, loads back to the same outputs and merges."""
    from transformers.pytorch_utils import Conv1D

    original, _ = _gpt2_pair()
    pruned = copy.deepcopy(original)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, Conv1D):
                m.weight.mul_(m.weight.abs() >= m.weight.abs().median())
    torch.manual_seed(1)
    calib, held = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (4, 32))
    before = _logit_error(pruned, original, held)
    pm = get_peft_model(copy.deepcopy(pruned), EoRAConfig(r=8))
    stats = initialize_eora_weights(pm, original, calib, progress=False)
    assert sorted(m.name.rsplit(".", 1)[-1] for m in stats.modules) == ["c_attn", "c_attn", "c_fc", "c_fc"] + ["c_proj"] * 4
    assert all(m.error_after < m.error_before for m in stats.modules)
    assert _logit_error(pm, original, held) < 0.8 * before
    from peft_eora import merged_forward

    with monkeypatch.context() as m:  # the CPU's merged forward of installed Conv1D layers is their own forward
        m.setattr(merged_forward, "ENABLED", False)
        own = get_peft_model(copy.deepcopy(pruned), EoRAConfig(r=8))
        initialize_eora_weights(own, original, calib, progress=False)
    ours, theirs = dict(pm.named_parameters()), dict(own.named_parameters())
    for name in (n for n in ours if "lora_" in n):
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-4, atol=1e-5)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(pruned), tmp_path).eval()
    with torch.no_grad():
        expected = pm(held).logits
        torch.testing.assert_close(loaded(held).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded.merge_and_unload()(held).logits, expected, rtol=1e-4, atol=1e-5)


def test_gpt2_bitsandbytes_4bit(tmp_path):
    """GPT-2 loaded in 4 bits by bitsandbytes (its ``Conv1D``s become ``Linear4bit``) against its checkpoint
    folder, whose weights are stored ``(in, out)``."""
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes")
    from transformers import BitsAndBytesConfig

    original, _ = _gpt2_pair()
    original.save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)).eval()
    assert type(quantized.transformer.h[0].attn.c_proj).__name__ == "Linear4bit"
    torch.manual_seed(1)
    calib, held = torch.randint(3, VOCAB, (8, 32)), torch.randint(3, VOCAB, (4, 32))
    before = _logit_error(quantized, original, held)
    pm = get_peft_model(quantized, EoRAConfig(r=8))
    stats = initialize_eora_weights(pm, str(tmp_path), calib, progress=False)
    assert len(stats.modules) == 2 * 4
    assert _logit_error(pm, original, held) < 0.8 * before



def test_every_layer_too_narrow_for_the_rank_in_one_error():
    """A Mamba mixer holds two narrow linears (here ``dt_proj`` 128 × 4 and ``x_proj`` 36 × 128): at r = 8 the
    error names the one, at r = 40 both, with the config change that fixes them all at once."""
    model = _round_(_build("mamba", {"state_size": 16}))
    original = _build("mamba", {"state_size": 16})
    calib = torch.randint(3, VOCAB, (4, 32))
    with pytest.raises(ValueError, match=r"rank r=8 is too large for .*dt_proj \(128×4\).*exclude_modules=\['dt_proj'\]"):
        initialize_eora_weights(get_peft_model(copy.deepcopy(model), EoRAConfig(r=8)), original, calib, progress=False)
    with pytest.raises(ValueError, match=r"rank r=40 is too large for 2 kinds of layer: .*x_proj \(36×128\).*dt_proj \(128×4\)"
                                         r".*rank_pattern=\{'x_proj': <r>, 'dt_proj': <r>\}.*exclude_modules=\['x_proj', 'dt_proj'\]"):
        initialize_eora_weights(get_peft_model(copy.deepcopy(model), EoRAConfig(r=40)), original, calib, progress=False)
    pm = get_peft_model(copy.deepcopy(model), EoRAConfig(r=40, exclude_modules=["x_proj", "dt_proj"]))
    stats = initialize_eora_weights(pm, original, calib, progress=False)
    assert sorted({m.name.rsplit(".", 1)[-1] for m in stats.modules}) == ["in_proj", "out_proj"]


class _GatedBlock(nn.Module):
    """A block the model calls with a second positional argument (as older and some newer models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 64, bias=False)
        self.down = nn.Linear(64, 32, bias=False)

    def forward(self, hidden: torch.Tensor, gate: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return hidden + self.down(torch.relu(self.up(hidden))) * gate


class _PositionalToy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.embed = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList([_GatedBlock(), _GatedBlock()])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        h = self.embed(input_ids)
        gate = torch.sigmoid(h[..., :1])  # per token, from the embeddings
        for block in self.layers:
            h = block(h, gate)
        return h


def test_blocks_called_with_positional_arguments():
    """The second positional argument a model passes its blocks is kept under its parameter name and passed
    to every replay of the block (it was dropped: ``missing 1 required positional argument``)."""
    original = _PositionalToy().eval()
    quantized = _round_(copy.deepcopy(original))
    calib, held = torch.randint(3, VOCAB, (8, 16)), torch.randint(3, VOCAB, (4, 16))
    with torch.no_grad():
        before = float((quantized(held) - original(held)).pow(2).mean())
    pm = get_peft_model(quantized, EoRAConfig(r=4))
    stats = initialize_eora_weights(pm, original, calib, progress=False)
    assert len(stats.modules) == 4 and all(m.error_after < m.error_before for m in stats.modules)
    with torch.no_grad():
        assert float((pm(held) - original(held)).pow(2).mean()) < 0.8 * before


def test_vision_language_model_compensates_its_language_model(tmp_path):
    """A vision-language model whose vision tower holds more blocks than its language model (Qwen2.5-VL-7B:
    32 against 28; here 4 against 2): the decoder blocks are the language model's (``get_decoder()``), the
    default targets its linears, and text-only calibration brings its logits closer to the original's; the
    original is read from its checkpoint folder as well."""
    from transformers import AutoModelForImageTextToText

    from peft_eora.model import decoder_blocks_path

    cfg = AutoConfig.for_model(
        "qwen2_5_vl",
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]))
    torch.manual_seed(0)
    original = AutoModelForImageTextToText.from_config(cfg).eval()
    assert decoder_blocks_path(original) == "model.language_model.layers"
    original.save_pretrained(tmp_path)
    quantized = copy.deepcopy(original)
    _round_(quantized.model.language_model)
    torch.manual_seed(1)
    calib, held = torch.randint(3, 200, (8, 32)), torch.randint(3, 200, (4, 32))
    before = _logit_error(quantized, original, held)
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8))
    stats = initialize_eora_weights(pm, original, calib, progress=False)
    assert len(stats.modules) == 2 * 7 and all(".language_model.layers." in m.name for m in stats.modules)
    assert _logit_error(pm, original, held) < 0.8 * before
    from_folder = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8))
    initialize_eora_weights(from_folder, str(tmp_path), calib, progress=False)
    ours = dict(pm.named_parameters())
    for name, value in from_folder.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(value, ours[name], rtol=0, atol=0)


#: Models whose layers of two kinds take different arguments (a sliding-window or a full mask; Gemma 3: a
#: local or a global rotary table), with windows shorter than the calibration windows.
LAYER_KINDS = {
    "gemma2": {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4},
    "gemma3_text": {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention"] * 2},
    "gpt_oss": {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4, "num_local_experts": 4,
                "num_experts_per_tok": 2, "layer_types": ["sliding_attention", "full_attention"] * 2},
    "llama": {"num_key_value_heads": 2},
}


@pytest.mark.parametrize("model_type", list(LAYER_KINDS))
def test_every_block_gets_its_own_arguments(model_type):
    """The walk hands every block the arguments the model itself passes it (they were block 0's for all:
    a full-attention layer of Gemma 2/3 or gpt-oss computed with the sliding-window mask, Gemma 3's global
    layers with the local rotary table): each block's replayed output equals the model's own hidden states."""
    from peft_eora.walker import BlockWalker

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, "num_hidden_layers": 4, **LAYER_KINDS[model_type]})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, VOCAB, (2, 16))
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
             for b in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    walker = BlockWalker(model, model.model.layers, [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}])
    for visit in walker.visits(len(model.model.layers) - 1):
        outs = visit.forward_all()
        replayed = torch.cat([h for h, _ in outs])
        torch.testing.assert_close(replayed, seen[visit.index], rtol=1e-5, atol=1e-5, msg=f"block {visit.index}")
