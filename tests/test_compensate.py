"""The layer-by-layer driver on a tiny random Llama with a dense (fake-quantized) base."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch.utils.data import DataLoader

from peft_eora import CalibrationConfig, EoRAConfig, initialize_eora_weights
from peft_eora.calibration import CalibrationError
from peft_eora.compensate import _input_groups, capture_block_inputs, find_targets
from peft_eora.decompose import weighted_error
from peft_eora.original import ModelMismatchError
from peft_eora.residual import UnsupportedModuleError


def _logit_mse(model, reference, ids) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - reference(input_ids=ids).logits).pow(2).mean())


def _eora(quantized, original, ids, **cfg):
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(**{"r": 8, "damping": 0.0, **cfg}))
    stats = initialize_eora_weights(pm, original_model=original, calibration=ids, progress=False)
    return pm, stats


def test_default_targets_every_block_linear_not_lm_head(tiny_llama):
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
    wrapped = sorted(n for n, m in pm.named_modules() if isinstance(m, LoraLayer))
    assert len(wrapped) == 7 * original.config.num_hidden_layers
    assert not any("lm_head" in n for n in wrapped)


def test_layers_to_transform_selects_blocks_of_the_default_targets(tiny_llama, calib_ids, tmp_path):
    """PEFT applies ``layers_to_transform`` to lists of targets only; EoRA's default targets are a pattern, so the
    blocks go into it (and the saved config loads: PEFT refuses ``layers_to_transform`` beside a pattern)."""
    from peft import PeftModel

    original, quantized = tiny_llama
    last = original.config.num_hidden_layers - 1
    pm, stats = _eora(quantized, original, calib_ids, layers_to_transform=[last])
    wrapped = sorted(n for n, m in pm.named_modules() if isinstance(m, LoraLayer))
    assert len(wrapped) == len(stats.modules) == 7 and all(f".layers.{last}." in n for n in wrapped)
    pm.save_pretrained(tmp_path / "one-block")
    again = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "one-block")
    assert sorted(n for n, m in again.named_modules() if isinstance(m, LoraLayer)) == wrapped
    with pytest.raises(ValueError, match="names no decoder block"):
        get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, layers_to_transform=[last + 1]))


def test_groups_follow_execution_and_shared_inputs(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
    blocks, targets = find_targets(pm.base_model.model, "default")
    inputs = capture_block_inputs(pm.base_model.model, blocks[0], [{"input_ids": calib_ids[:2]}])
    groups = _input_groups(blocks[0], [t for t in targets if t.block == 0], inputs[0])
    names = [[t.name.split(".")[-1] for t in g] for g in groups]
    assert [sorted(g) for g in names] == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_eora_beats_quantized_and_svd_on_heldout(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    heldout = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(99))
    eora, stats_e = _eora(quantized, original, calib_ids, method="eora")
    svd, stats_s = _eora(quantized, original, calib_ids, method="svd")
    base = _logit_mse(quantized, original, heldout)
    assert _logit_mse(eora, original, heldout) < _logit_mse(svd, original, heldout) < base
    assert all(m.error_after < m.error_before for m in stats_e.modules)
    assert stats_s.tokens == 0  # the SVD baseline runs no forward pass
    assert [m.name for m in stats_e.modules] == [m.name for m in stats_s.modules]
    assert pm_config_flipped(eora)


def pm_config_flipped(pm) -> bool:
    cfg = pm.peft_config["default"]
    return cfg.init_eora is False and cfg.eora_stats["modules"] == 14 and cfg.eora_stats["calibration_tokens"] == 16 * 64


def test_installed_factors_reproduce_the_decomposition(tiny_llama, calib_ids):
    """B·A·scaling in the layer is the factor pair, whatever lora_alpha is."""
    original, quantized = tiny_llama
    pm, stats = _eora(quantized, original, calib_ids, lora_alpha=32)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    delta = original.model.layers[0].self_attn.q_proj.weight - layer.base_layer.weight
    ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert layer.scaling["default"] == 4.0
    # the first block sees the same inputs in both models: its weighted error is reproducible from the weights
    x = original.model.embed_tokens(calib_ids)
    x = original.model.layers[0].input_layernorm(x).reshape(-1, 64).double()
    H = x.T @ x
    rel = weighted_error(delta.detach(), H, ba.detach()) / weighted_error(delta.detach(), H)
    assert rel == pytest.approx(stats.modules[0].error_after / stats.modules[0].error_before, rel=1e-3)


def test_sequential_flag_and_dataloader_with_padding(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    mask = torch.ones_like(calib_ids)
    mask[:, 48:] = 0  # padded tail must not enter the statistics
    loader = DataLoader([{"input_ids": i, "attention_mask": m} for i, m in zip(calib_ids, mask)], batch_size=4)
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, sequential=False))
    stats = initialize_eora_weights(pm, original_model=original, calibration=loader, progress=False)
    assert stats.tokens == 16 * 48
    assert all(m.error_after < m.error_before for m in stats.modules)


def test_config_driven_run_from_checkpoint_dir(tiny_llama, tmp_path, tiny_tokenizer_dir):
    """get_peft_model alone computes the factors from a checkpoint path + calibration spec."""
    original, quantized = tiny_llama
    original.save_pretrained(tmp_path / "orig")
    cfg = EoRAConfig(
        r=8,
        original_model=str(tmp_path / "orig"),
        calibration=CalibrationConfig(dataset="builtin:c4", num_samples=4, seq_len=64, tokenizer=tiny_tokenizer_dir),
    )
    pm = get_peft_model(copy.deepcopy(quantized), cfg)
    computed = pm.peft_config["default"]
    assert computed.init_eora is False and computed.eora_stats["calibration_tokens"] == 256
    b = pm.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    assert b.abs().sum() > 0


def test_rank_too_large_fails_before_any_work(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=32, rank_pattern={"k_proj": 32}, init_eora=False))
    with pytest.raises(ValueError, match=r"rank r=32 is too large for .*k_proj \(32×64\).*every layer here takes "
                                         r"r ≤ 31.*CLI `--exclude-modules k_proj v_proj`"):
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, progress=False)
    # every layer too narrow: excluding them all is no advice, the largest rank that fits is
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=64, init_eora=False))
    with pytest.raises(ValueError, match=r"r ≤ 31\), .*\(Python API\)\.$") as info:
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, progress=False)
    assert "exclude" not in str(info.value)


def test_the_same_model_as_original_and_compressed_is_said(tiny_llama, calib_ids):
    """No residual anywhere (the original passed as the compressed model too): every adapter is a zero update, and
    the user is told the inputs look swapped or the same rather than handed a silent no-op."""
    original, _ = tiny_llama
    with pytest.warns(UserWarning, match="identical in all 14 adapted layers"):
        pm, stats = _eora(original, original, calib_ids, damping="auto")
    assert all(m.error_before == 0 for m in stats.modules)
    assert all(float(m.lora_B["default"].weight.abs().max()) == 0 for m in pm.modules() if isinstance(m, LoraLayer))


def test_an_original_with_other_norms_is_refused_before_any_work(tiny_llama, calib_ids):
    """Norms are never compressed: an original whose norms differ (another fine-tune, or a smoothed compressed model
    given a raw original) is refused up front for every format, not only gptqmodel's AWQ layers (a review made a
    compressed-tensors checkpoint of an AWQ-smoothed model and got no error)."""
    original, quantized = tiny_llama
    other = copy.deepcopy(original)
    with torch.no_grad():
        other.model.layers[1].post_attention_layernorm.weight.mul_(1.5)
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=0.01))
    with pytest.raises(ModelMismatchError, match=r"post_attention_layernorm differs from the compressed model's "
                                                 r"by up to 33% per channel\. Norms are never compressed"):
        initialize_eora_weights(pm, original_model=other, calibration=calib_ids, progress=False)
    assert all(float(m.lora_B["default"].weight.abs().max()) == 0 for m in pm.modules() if isinstance(m, LoraLayer))


def test_an_original_carrying_peft_adapters_is_refused_with_the_two_ways_out(tiny_llama, calib_ids):
    """Its LoRA-wrapped linears were reported as missing ("the two models do not match")."""
    from peft import LoraConfig

    original, quantized = tiny_llama
    adapted = get_peft_model(copy.deepcopy(original), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=0.01))
    with pytest.raises(ModelMismatchError, match=r"carries PEFT adapter layers.*merge_and_unload\(\).*unload\(\)"):
        initialize_eora_weights(pm, original_model=adapted, calibration=calib_ids, progress=False)
    initialize_eora_weights(pm, original_model=adapted.merge_and_unload(), calibration=calib_ids, progress=False)


def test_an_original_further_from_the_compressed_weights_than_zeros_is_said(tiny_llama, calib_ids):
    """Another model of the same shapes and norms (random init: all ones) passes every structural check; a residual
    larger than the weights themselves, which no compression leaves, is told."""
    from tiny_models import tiny_llama_pair

    _, quantized = tiny_llama
    stranger, _ = tiny_llama_pair(seed=1)
    with pytest.warns(UserWarning, match=r"In 14 of 14 adapted layers the compressed weight is further from the "
                                         r"original than zero weights would be \(.* up to 1\.\d\d"):
        _, stats = _eora(quantized, stranger, calib_ids)
    assert all(m.weight_error > 1 for m in stats.modules)
    original, _ = tiny_llama
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _, stats = _eora(quantized, original, calib_ids)
    assert not [w for w in seen if "further from the original" in str(w.message)]
    assert all(0 < m.weight_error < 1 for m in stats.modules)


def test_an_in_memory_original_with_offloaded_weights_is_refused_up_front(tiny_llama, calib_ids):
    """accelerate leaves offloaded weights on the meta device: such an original cannot be read from the module, so a
    target's offloaded weight is refused before any block is computed (it used to fail mid-walk), pointing at the
    checkpoint folder; an offloaded weight EoRA does not read (the LM head) is no reason to refuse."""
    from peft_eora.original import OriginalWeights

    original, quantized = tiny_llama
    head = original.lm_head
    head.weight = torch.nn.Parameter(torch.empty_like(head.weight, device="meta"), requires_grad=False)
    OriginalWeights.from_module(original).check("model.layers.1.mlp.up_proj", (128, 64))
    layer = original.model.layers[1].mlp.up_proj
    layer.weight = torch.nn.Parameter(torch.empty_like(layer.weight, device="meta"), requires_grad=False)
    with pytest.raises(ModelMismatchError, match="up_proj offloaded by accelerate .*checkpoint's folder"):
        OriginalWeights.from_module(original).check("model.layers.1.mlp.up_proj", (128, 64))
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping=0.01))
    with pytest.raises(ModelMismatchError, match="offloaded"):
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, progress=False)
    assert all(float(m.lora_B["default"].weight.abs().max()) == 0 for m in pm.modules() if isinstance(m, LoraLayer))


def test_mismatched_original_names_the_module(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    from tiny_models import tiny_llama_pair

    other, _ = tiny_llama_pair(layers=2)
    other.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
    with pytest.raises(ModelMismatchError, match=r"Shape mismatch for model\.layers\.1\.mlp\.up_proj"):
        initialize_eora_weights(pm, original_model=other, calibration=calib_ids, progress=False)


def test_nan_weight_leaves_nothing_half_written(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    broken = copy.deepcopy(original)
    with torch.no_grad():
        broken.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
    with pytest.raises(ModelMismatchError, match=r"original weight of model\.layers\.1\.mlp\.gate_proj contains NaN"):
        initialize_eora_weights(pm, original_model=broken, calibration=calib_ids, progress=False)
    assert all(
        float(m.lora_B["default"].weight.abs().sum()) == 0 for m in pm.modules() if isinstance(m, LoraLayer)
    )
    assert pm.peft_config["default"].eora_stats is None


@pytest.mark.parametrize("data", [torch.empty(0, 8, dtype=torch.long), [], [{"input_ids": torch.empty(1, 0)}]])
def test_empty_calibration(tiny_llama, data):
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
    with pytest.raises(CalibrationError, match="empty"):
        initialize_eora_weights(pm, original_model=original, calibration=data, progress=False)


def test_calibration_longer_than_the_context(tiny_llama):
    """Sequences past ``max_position_embeddings`` (256 here): one error naming the limit and the fix,
    before any compute; at the limit they run."""
    from peft_eora.calibration import check_context

    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
    with pytest.raises(CalibrationError, match=r"sequences of 300 tokens are longer than the model's context \(256 "
                       r"positions.*truncate the calibration sequences to at most 256 tokens"):
        initialize_eora_weights(pm, original_model=original, calibration=torch.randint(3, 1000, (1, 300)), progress=False)
    with pytest.raises(CalibrationError, match=r"lower CalibrationConfig\(seq_len=\.\.\.\) to at most 256"):
        check_context([{"input_ids": torch.zeros(1, 300, dtype=torch.long)}], 256, windows=True)
    assert pm.peft_config["default"].eora_stats is None
    check_context([{"input_ids": torch.zeros(1, 256, dtype=torch.long)}], 256)
    check_context([{"input_ids": torch.zeros(1, 9999, dtype=torch.long)}], None)


def test_calibration_texts_are_one_sample_each(tiny_llama, tokenizer, caplog):
    """A list of texts (GPTQ quantizers' calibration form), a ``{"text": [...]}`` mapping or a
    ``datasets.Dataset`` with a text column: each text one sample, tokenized with the model's
    tokenizer, right-padded under an attention mask. The padding changes nothing: two texts per batch
    (padded) give the factors of one per batch (no padding), whatever id the padding holds."""
    from peft_eora.calibration import as_batches

    original, quantized = tiny_llama
    texts = ["The tower is 330 metres tall.", "   ", None, "def add(a, b):\n    return a + b",
             "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."]
    real = [t for t in texts if t and t.strip()]
    batches = as_batches(texts, tokenizer, batch_size=2)
    lengths = [len(tokenizer(t)["input_ids"]) for t in real]
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]  # the blank and missing texts dropped
    assert batches[0]["attention_mask"].sum(1).tolist() == lengths[:2] and "attention_mask" not in batches[1]
    assert batches[0]["input_ids"][1, :lengths[1]].tolist() == tokenizer(real[1])["input_ids"]

    def factors(calibration, **kw):
        pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
        initialize_eora_weights(pm, original_model=original, calibration=calibration, progress=False, **kw)
        return [m.lora_B["default"].weight for m in pm.modules() if isinstance(m, LoraLayer)]

    unpadded = factors(texts, tokenizer=tokenizer, batch_size=1)
    padded = factors(texts, tokenizer=tokenizer, batch_size=2)
    for got, want in zip(padded, unpadded):  # padded rows: the same statistics up to float32 summation order
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    # the padding's id outside the vocabulary (a pad token added to the tokenizer only): set to 0, same factors
    odd = [{**b, "input_ids": b["input_ids"].masked_fill(b["attention_mask"] == 0, 49152)} if "attention_mask" in b
           else b for b in batches]
    assert int(odd[0]["input_ids"].max()) == 49152
    for got, want in zip(factors(odd), padded):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    datasets = pytest.importorskip("datasets")
    for given in ({"text": texts}, datasets.Dataset.from_dict({"text": texts, "source": list("abcde")})):
        for got, want in zip(factors(given, tokenizer=tokenizer, batch_size=2), padded):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # texts past the model's context (256 positions) are cut to it, with one warning
    with caplog.at_level("WARNING", logger="peft_eora.calibration"):
        long = as_batches([" ".join(["word"] * 400), real[0]], tokenizer, max_text_tokens=256)
    assert long[0]["input_ids"].shape[1] == 256 and "1 of 2 calibration texts are longer" in caplog.text
    with pytest.raises(CalibrationError, match="Calibration text needs a tokenizer.*tokenizer= to peft_eora"):
        factors(texts)  # the tiny model was built from a config: no tokenizer to be found
    with pytest.raises(CalibrationError, match="every text given is blank"):
        as_batches(["", " \n"], tokenizer)


def test_too_short_calibration_text(tiny_llama, tmp_path, tiny_tokenizer_dir):
    original, quantized = tiny_llama
    (tmp_path / "c.jsonl").write_text('{"text": "only a few words"}\n')
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
    spec = CalibrationConfig(dataset=str(tmp_path / "c.jsonl"), num_samples=2, seq_len=64, tokenizer=tiny_tokenizer_dir)
    with pytest.raises(CalibrationError, match=r"has only \d+ tokens but num_samples×seq_len = 2×64 = 128"):
        initialize_eora_weights(pm, original_model=original, calibration=spec, progress=False)


def test_unsupported_module_lists_formats(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    model = copy.deepcopy(quantized)
    pm = get_peft_model(model, EoRAConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_eora=False))
    with pytest.raises((UnsupportedModuleError, ValueError), match=r"embed_tokens"):
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, progress=False)


def test_unsupported_block_module_type(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    from peft_eora.residual import backend_for

    class Weird(torch.nn.Module):
        in_features, out_features = 4, 4

    with pytest.raises(UnsupportedModuleError, match=r"Supported formats: gptq .*; dense"):
        backend_for(Weird(), "model.layers.0.weird")


# --------------------------------------------------------------------------------------------
# damping="auto"
# --------------------------------------------------------------------------------------------

from peft_eora.decompose import AUTO_DAMPING_GRID, eora_factors_auto  # noqa: E402


def test_auto_damping_chooses_per_module_on_heldout_windows(tiny_llama, calib_ids):
    """Every 2nd window is held out; block 0's choice and factors are reproducible from the activations."""
    original, quantized = tiny_llama
    # 16 windows in 2 batches of 8; q_proj unweighted, so its reference needs only the activations
    pm, stats = _eora(quantized, original, calib_ids, damping="auto", logit_weighting="none")
    summary = pm.peft_config["default"].eora_stats
    assert summary["damping"] == "auto" and summary["calibration_tokens"] == 16 * 64
    assert summary["heldout_tokens"] == 8 * 64
    # JSON-safe: plain SVD (δ = inf) is recorded as the string "inf"
    assert summary["damping_per_module"] == {m.name: (m.damping if m.damping != float("inf") else "inf")
                                             for m in stats.modules}
    assert sum(summary["damping_counts"].values()) == 14
    for m in stats.modules:
        assert m.damping in AUTO_DAMPING_GRID and set(m.heldout_errors) <= set(AUTO_DAMPING_GRID)
        assert {0.0, float("inf")} <= set(m.heldout_errors)  # the smallest ridge and plain SVD always scored
        assert m.heldout_errors[m.damping] == min(m.heldout_errors.values())
        assert m.error_after < m.error_before
    name = "model.layers.0.self_attn.q_proj"
    layer = pm.base_model.model.get_submodule(name)
    with torch.no_grad():
        x = original.model.layers[0].input_layernorm(original.model.embed_tokens(calib_ids)).double()
    held = torch.arange(16) % 2 == 1
    xf, xv = x[~held].reshape(-1, 64), x[held].reshape(-1, 64)
    delta = (original.get_submodule(name).weight - layer.base_layer.weight).detach()
    f, choice = eora_factors_auto(delta, xf.T @ xf, xv.T @ xv, 8)
    module = next(m for m in stats.modules if m.name == name)
    assert choice.damping == module.damping
    for d in AUTO_DAMPING_GRID:
        assert module.heldout_errors[d] == pytest.approx(choice.errors[d], rel=1e-3)
    ba = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]).detach().double()
    ref = f.B.double() @ f.A.double()
    assert float((ba - ref).norm() / ref.norm()) < 1e-3


def test_fixed_damping_is_recorded_per_module(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    pm, stats = _eora(quantized, original, calib_ids, damping=0.1)
    assert {m.damping for m in stats.modules} == {0.1}
    assert all(m.heldout_errors is None for m in stats.modules)
    summary = pm.peft_config["default"].eora_stats
    assert summary["damping"] == 0.1 and "damping_per_module" not in summary and "heldout_tokens" not in summary


def test_auto_damping_falls_back_to_the_fixed_ridge_without_windows_to_hold_out(tiny_llama, calib_ids):
    """damping='auto' (the default) needs 2 windows and non-padding held-out tokens; with less it warns and
    uses the fixed ridge 0.01, recorded in the stats."""
    from peft_eora.config import DEFAULT_DAMPING, FIXED_DAMPING

    assert DEFAULT_DAMPING == "auto" and EoRAConfig(r=4).damping == "auto"
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, init_eora=False))
    with pytest.warns(UserWarning, match=r"needs at least 2 windows; got 1.*fixed damping 0.01"):
        stats = initialize_eora_weights(pm, original_model=original, calibration=calib_ids[:1], progress=False)
    assert stats.damping == FIXED_DAMPING and all(m.damping == FIXED_DAMPING for m in stats.modules)
    assert pm.peft_config["default"].eora_stats["damping"] == FIXED_DAMPING
    # held-out windows that are all padding: nothing to choose on
    mask = torch.ones(4, 64, dtype=torch.long)
    mask[1::2] = 0  # the held-out windows 1 and 3
    pm2 = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4, damping="auto", init_eora=False))
    with pytest.warns(UserWarning, match=r"found 128 fit and 0 held-out calibration tokens"):
        initialize_eora_weights(
            pm2, original_model=original, calibration=[{"input_ids": calib_ids[:4], "attention_mask": mask}],
            progress=False,
        )
    EoRAConfig(r=4, damping="auto", calibration=CalibrationConfig(num_samples=2, seq_len=64))  # falls back at run time


@pytest.mark.parametrize(
    "kwargs,phrase",
    [
        ({"damping": "Auto"}, "number ≥ 0 or 'auto', got the string 'Auto'"),
        ({"damping": "0.01"}, "got the string '0.01'"),
        ({"damping": -0.1}, "finite number ≥ 0 or 'auto', got -0.1"),
        ({"damping": float("nan")}, "got nan"),
        ({"damping": float("inf")}, "got inf"),
        ({"damping": True}, "got True"),
        ({"rank_allocation": "greedy"}, "'uniform', 'spectrum' or 'spectrum_absolute', got 'greedy'"),
        ({"rank_budget": 1000}, "rank_budget only applies with rank_allocation='spectrum'"),
        ({"rank_min": 2}, "rank_min only applies"),
        ({"rank_allocation": "spectrum", "rank_budget": 0}, "rank_budget must be a positive integer, got 0"),
        ({"rank_allocation": "spectrum", "rank_min": 1.5}, "rank_min must be a positive integer"),
        ({"rank_allocation": "spectrum", "rank_min": 8, "rank_max": 4}, "rank_max (4) is smaller than rank_min (8)"),
    ],
)
def test_config_rejects_bad_damping_and_allocation(kwargs, phrase):
    with pytest.raises(ValueError) as exc:
        EoRAConfig(r=8, **kwargs)
    assert phrase in str(exc.value), str(exc.value)


def test_a_groups_covariances_exist_only_from_its_first_input_to_its_factors():
    """Each group's covariance matrices are allocated at its first input and released when taken, so
    a block never holds the matrices of groups not reached yet (the 8B ``down_proj``'s float32 pair is
    1.5 GiB) during the factor steps of the groups before them."""
    from types import SimpleNamespace

    from peft_eora.compensate import _Covariances
    from peft_eora.walker import NO_TIMES

    groups = [[SimpleNamespace(shape=(3, 4), name="a", input_dtype=None)],
              [SimpleNamespace(shape=(5, 6), name="b", input_dtype=None)]]
    holdout = [torch.tensor([False, True])]
    cov = _Covariances(groups, torch.device("cpu"), [None], holdout, NO_TIMES)
    assert cov.H == [[], []]
    x = torch.randn(2, 3, 4)
    cov.collect(0, x, 0)
    assert len(cov.H[0]) == 2 and cov.H[1] == []
    H_fit, H_val = cov.take(0)
    torch.testing.assert_close(H_fit, x[0].T @ x[0])
    torch.testing.assert_close(H_val, x[1].T @ x[1])
    assert cov.H[0] is None and cov.H[1] == []
    assert [tuple(h.shape) for h in cov.take(1)] == [(6, 6), (6, 6)]  # never reached: zeros


def test_a_groups_covariance_is_freed_before_its_factor_steps_and_its_projection_with_its_last_member(
        tiny_llama, calib_ids, monkeypatch):
    """At a fixed ridge a group's float32 covariance (for the 8B ``down_proj`` 784 MiB) is dropped once the
    group's projection exists: the statistics read the projection's root (its Cholesky factor, 1.5 GiB in
    float64), so no member's factor step runs beside ``H``; the projection goes with the group's last
    member, before the next group's is made; the statistics agree with ``H``'s own."""
    import gc
    import weakref

    from peft_eora import compensate, decompose

    covariances: list = []
    projections: list = []
    real_take, real_projection_and_root = compensate._Covariances.take, compensate.projection_and_root

    def take(self, g):
        Hs = real_take(self, g)
        covariances.append(weakref.ref(Hs[0]))
        return Hs

    checked: list[tuple[str, float, float]] = []
    older_projection_alive: list[bool] = []

    def projection_and_root(H, damping, eig_rtol):
        gc.collect()
        older_projection_alive.append(any(r() is not None for r in projections))
        proj, root = real_projection_and_root(H, damping, eig_rtol)
        projections.append(weakref.ref(proj.S))
        checked.append(("H", float(torch.diagonal(H).double().sum()), float(root.matrix().diagonal().sum())))
        return proj, root

    alive_at_factors: list[bool] = []
    real_eora_factors = decompose.eora_factors

    def eora_factors(delta, H, rank, *args, **kwargs):
        gc.collect()
        alive_at_factors.append(covariances[-1]() is not None)
        return real_eora_factors(delta, H, rank, *args, **kwargs)

    monkeypatch.setattr(compensate._Covariances, "take", take)
    monkeypatch.setattr(compensate, "projection_and_root", projection_and_root)
    monkeypatch.setattr(compensate, "eora_factors", eora_factors)
    original, quantized = tiny_llama
    pm, stats = _eora(quantized, original, calib_ids, damping=0.01)
    blocks, _ = find_targets(pm.base_model.model, "default")
    # groups of a block (value weighting on): [q, k], [v], [o], [gate, up], [down]
    assert [m.name.rsplit(".", 1)[-1] for m in stats.modules[:7]] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "gate_proj", "up_proj", "down_proj"]
    assert len(alive_at_factors) == 7 * len(blocks) and not any(alive_at_factors)
    assert len(older_projection_alive) == 5 * len(blocks) and not any(older_projection_alive)
    for _, trace_h, trace_root in checked:  # the root is H (its Cholesky factor of H + δ·m·I, less δ·m·I)
        assert trace_root == pytest.approx(trace_h, rel=1e-9)


@pytest.mark.parametrize("head_dim", [16, 32])
def test_auto_refit_from_the_scorings_gram_matrices_matches_refit_auto(calib_ids, monkeypatch, head_dim):
    """``damping="auto"`` on a tiny model: refitted from the scoring's Gram matrices (``gram_refit``:
    q/k/v/o/down wide, gate/up tall through ``R``; q/k logit-weighted) the ridges, factors and error
    statistics are those of ``refit_auto``'s route. With ``head_dim=32`` (heads·head_dim = 128 > hidden
    64) q_proj is tall *and* logit-weighted: its error before is not a tall pencil's (its rows are
    ``R``'s), so the statistics read the pair."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_eora import compensate
    from tiny_models import fake_quantize_

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256)
    original = LlamaForCausalLM(cfg).eval()
    quantized = fake_quantize_(copy.deepcopy(original))
    routes: list[tuple[str, bool]] = []
    real_gram_refit = compensate.gram_refit

    def spy(delta, choice, *args, **kwargs):
        tall = choice.gram is not None and choice.gram.tall
        factors = real_gram_refit(delta, choice, *args, **kwargs)
        routes.append(("tall" if tall else "wide", factors is not None))
        return factors

    monkeypatch.setattr(compensate, "gram_refit", spy)
    pm_gram, gram = _eora(quantized, original, calib_ids, damping="auto")
    assert ("tall", True) in routes and ("wide", True) in routes, routes
    monkeypatch.setattr(compensate, "gram_refit", lambda *args, **kwargs: None)
    pm_ref, ref = _eora(quantized, original, calib_ids, damping="auto")
    lora = {n: m for n, m in pm_gram.named_modules() if isinstance(m, LoraLayer)}
    lora_ref = {n: m for n, m in pm_ref.named_modules() if isinstance(m, LoraLayer)}
    assert len(gram.modules) == len(ref.modules) == 7
    for a, b in zip(gram.modules, ref.modules):
        assert a.name == b.name and a.damping == b.damping
        assert a.error_before == pytest.approx(b.error_before, rel=1e-6), a.name
        assert a.error_after == pytest.approx(b.error_after, rel=1e-5), a.name
    for name, layer in lora.items():
        got = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        want = lora_ref[name].lora_B["default"].weight.double() @ lora_ref[name].lora_A["default"].weight.double()
        assert float((got - want).norm() / want.norm()) < 1e-5, name


def test_auto_tests_each_groups_fit_covariance_once(tiny_llama, calib_ids, monkeypatch):
    """``damping="auto"``: whether ``H_fit`` has an eigenvalue under the cut-off (a float64 Cholesky
    factorisation: 4096² for q/k/v of an 8B block) is asked once per group, not once per member, and
    the shared answer gives the ridges, statistics and factors of testing per member."""
    from peft_eora import compensate

    tested: list[tuple[int, ...]] = []
    real = compensate.is_cut_free

    def spy(H_fit, *args, **kwargs):
        tested.append(tuple(H_fit.shape))
        return real(H_fit, *args, **kwargs)

    monkeypatch.setattr(compensate, "is_cut_free", spy)
    original, quantized = tiny_llama
    pm, shared = _eora(quantized, original, calib_ids, damping="auto")
    blocks, _ = find_targets(pm.base_model.model, "default")
    # groups of a block (value weighting on): [q, k], [v], [o], [gate, up], [down]; each H_fit once
    hidden, inner = original.config.hidden_size, original.config.intermediate_size
    assert sorted(tested) == sorted([(hidden, hidden)] * 4 * len(blocks) + [(inner, inner)] * len(blocks)), tested
    assert {m.damping for m in shared.modules} - {math.inf}, "no layer took a finite ridge: the test proves nothing"
    monkeypatch.setattr(compensate._HeldOut, "cut_free", lambda self, eig_rtol: None)  # each member tests again
    pm_ref, ref = _eora(quantized, original, calib_ids, damping="auto")
    assert len(tested) == 5 * len(blocks)  # the members' own tests are decompose's, not the spy's
    for a, b in zip(shared.modules, ref.modules, strict=True):
        assert (a.name, a.damping, a.heldout_errors) == (b.name, b.damping, b.heldout_errors)
        assert (a.error_before, a.error_after) == (b.error_before, b.error_after)
    for (name, p), (_, q) in zip(pm.named_parameters(), pm_ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("route", ["gram", "refit_auto"])
def test_a_groups_covariance_pair_is_freed_before_its_last_members_refit(tiny_llama, calib_ids, monkeypatch, route):
    """``damping="auto"``: the fit and held-out covariances (for the 8B ``down_proj`` a 1.5 GiB float32
    pair) are shared by a group's members. Where the refit sums them in float64 (``refit_auto``: δ = 0,
    or no Gram matrices from the scoring) the last member drops them once summed: they are dead while
    its factors are computed, alive for the members before it; the statistics then read the refit's
    factorisation. From the scoring's Gram matrices (``gram_refit``, nothing summed in float64) the
    pair is read by the statistics and dropped after them. Either way every pair is gone at the end."""
    import gc
    import weakref

    from peft_eora import compensate, decompose

    refits: list[str] = []
    real_gram_refit = compensate.gram_refit

    def gram_refit(delta, choice, *args, **kwargs):
        if route == "refit_auto":
            return None
        factors = real_gram_refit(delta, choice, *args, **kwargs)
        refits.append("gram" if factors is not None else "declined")
        return factors

    monkeypatch.setattr(compensate, "gram_refit", gram_refit)

    pairs: list = []
    real_init = compensate._HeldOut.__init__

    def init(self, H_fit, H_val, *args, **kwargs):
        pairs.append((weakref.ref(H_fit), weakref.ref(H_val)))
        real_init(self, H_fit, H_val, *args, **kwargs)

    alive_at_factors: list[tuple[str, bool]] = []
    real_eora_factors = decompose.eora_factors

    def eora_factors(delta, H, rank, *args, **kwargs):
        if kwargs.get("projection") is not None:  # the refit, after H_fit + H_val is factorised
            gc.collect()
            alive_at_factors.append((kwargs["name"].rsplit(".", 1)[-1], all(r() is not None for r in pairs[-1])))
        return real_eora_factors(delta, H, rank, *args, **kwargs)

    monkeypatch.setattr(compensate._HeldOut, "__init__", init)
    monkeypatch.setattr(decompose, "eora_factors", eora_factors)
    original, quantized = tiny_llama
    pm, stats = _eora(quantized, original, calib_ids, damping="auto")
    if route == "refit_auto":
        assert alive_at_factors, "no refit ran"
        # groups of a block: [q, k], [v], [o], [gate, up], [down]: alive only for a group's first members
        assert all(alive == (name in ("q_proj", "gate_proj")) for name, alive in alive_at_factors), alive_at_factors
        assert {name for name, _ in alive_at_factors} >= {"k_proj", "down_proj"}
    else:  # every finite ridge but δ = 0 refitted from the Gram matrices (plain SVD: no refit at all)
        finite = [m for m in stats.modules if m.damping not in (math.inf, None)]
        assert refits.count("gram") == sum(m.damping > 0 for m in finite) + sum(m.damping == math.inf
                                                                               for m in stats.modules)
        assert refits.count("gram") > 0
        assert len(alive_at_factors) == refits.count("declined")
    gc.collect()
    assert all(r() is None for pair in pairs for r in pair)
    for m in stats.modules:  # the statistics are computed: finite, and the fit improves on the residual
        assert math.isfinite(m.error_before) and m.error_after <= m.error_before
