"""Pruned bases (peft_eora.prune): Wanda and SparseGPT masks and updates on synthetic layers, the
pruned tiny real model (first 2 layers of the embedded SmolLM2, cached), and EoRA on top of it."""

from __future__ import annotations

import json
import time

import pytest
import torch

from eora_checks import c4_split, eora_vs_svd, reference_hidden, target_names, wikitext_windows
from peft_eora.prune import parse_pattern, prune, prune_model_, sparsegpt_prune, wanda_mask
from peft_eora.residual import backend_for

#: Pruning calibration of the tiny fixtures: 32×128 C4 tokens (SparseGPT overfits 8×64 on 1536-wide layers).
PRUNE_SAMPLES, PRUNE_SEQ_LEN = 32, 128


# ---------------------------------------------------------------------------------------------
# masks and updates


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(0, -2, d)
    return (torch.randn(n, d, generator=g) * scales) @ mix + 0.3 * torch.randn(n, d, generator=g)


def test_parse_pattern():
    assert parse_pattern("2:4", None) == ((2, 4), 0.5)
    assert parse_pattern("1:4", 0.75) == ((1, 4), 0.75)
    assert parse_pattern(None, 0.6) == (None, 0.6)
    for pattern, sparsity, phrase in [("2-4", None, "N:M"), ("4:2", None, "0 < N < M"), ("2:4", 0.3, "means sparsity"),
                                      (None, None, "0 < sparsity < 1"), (None, 1.0, "0 < sparsity < 1")]:
        with pytest.raises(ValueError, match=phrase):
            parse_pattern(pattern, sparsity)


def test_wanda_mask_2_of_4_and_unstructured():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 32, generator=g)
    norms = torch.rand(32, generator=g) + 0.1
    mask = wanda_mask(W, norms, (2, 4), 0.5)
    assert (mask.reshape(12, 8, 4).sum(-1) == 2).all()
    score = (W.abs() * norms.sqrt()).reshape(12, 8, 4)
    m = mask.reshape(12, 8, 4)
    assert (score[m].reshape(12, 8, 2).max(-1).values <= score[~m].reshape(12, 8, 2).min(-1).values).all()
    un = wanda_mask(W, norms, None, 0.25)
    assert (un.sum(1) == 8).all()  # per output row


def test_wanda_keeps_small_weights_on_loud_inputs():
    """Magnitude alone would prune column 0 (tiny weights); Wanda keeps it because its input is 100× louder."""
    W = torch.ones(4, 8)
    W[:, 0] = 0.05
    norms = torch.ones(8)
    norms[0] = 100.0**2
    assert not wanda_mask(W, norms, (2, 4), 0.5)[:, 0].any()
    assert wanda_mask(W, torch.ones(8), (2, 4), 0.5)[:, 0].all()


@pytest.mark.parametrize("pattern", [(2, 4), None])
def test_sparsegpt_reconstructs_better_than_wanda(pattern):
    X = _correlated_inputs(2048, 64)
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    H = X.T @ X
    Ws = sparsegpt_prune(W, H, pattern, 0.5)
    Ww = W.masked_fill(wanda_mask(W, (X * X).sum(0), pattern, 0.5), 0.0)
    zeros = Ws == 0
    if pattern:
        assert (zeros.reshape(48, 16, 4).sum(-1) == 2).all()
    else:
        assert zeros.float().mean().item() == pytest.approx(0.5, abs=1e-3)
    err_s, err_w = ((W - Ws) @ X.T).norm(), ((W - Ww) @ X.T).norm()
    assert err_s < 0.9 * err_w, (float(err_s), float(err_w))


@pytest.mark.parametrize("pattern", [(1, 3), (2, 6), (2, 4)])
def test_sparsegpt_n_m_groups_span_its_blocks(pattern):
    """SparseGPT works in blocks of 128 columns: for an M that does not divide 128, groups were cut at block edges
    (1:3 kept two weights in 15 % of its groups; 2:6 crashed). Blocks now hold whole groups."""
    n, m = pattern
    X = _correlated_inputs(1024, 384)
    W = torch.randn(8, 384, generator=torch.Generator().manual_seed(3))
    Ws = sparsegpt_prune(W, X.T @ X, pattern, 0.5)
    assert ((Ws.reshape(8, 384 // m, m) != 0).sum(-1) == n).all()


def test_sparsegpt_zeroes_dead_inputs():
    X = _correlated_inputs(512, 16)
    X[:, 3] = 0.0
    Ws = sparsegpt_prune(torch.randn(8, 16), X.T @ X, (2, 4), 0.5)
    assert (Ws[:, 3] == 0).all() and (Ws.reshape(8, 4, 4) == 0).sum(-1).ge(2).all()


# ---------------------------------------------------------------------------------------------
# the tiny real model


def _tiny_pruned(tiny_original_dir, method: str, pattern, sparsity=None):
    return prune(tiny_original_dir, method, pattern, sparsity, num_samples=PRUNE_SAMPLES, seq_len=PRUNE_SEQ_LEN)


@pytest.fixture(scope="module")
def pruned_dirs(tiny_original_dir):
    """Wanda 2:4, SparseGPT 2:4 and Wanda 50 % unstructured (cached: ~15 s once on 2 cores)."""
    return {
        "wanda-2of4": _tiny_pruned(tiny_original_dir, "wanda", "2:4"),
        "sparsegpt-2of4": _tiny_pruned(tiny_original_dir, "sparsegpt", "2:4"),
        "wanda-u50": _tiny_pruned(tiny_original_dir, "wanda", None, 0.5),
    }


@pytest.mark.parametrize("case", ["wanda-2of4", "sparsegpt-2of4", "wanda-u50"])
def test_pruned_checkpoint(case, pruned_dirs, tiny_original_dir):
    from safetensors.torch import load_file

    path = pruned_dirs[case]
    meta = json.loads((path / "peft_eora_quantize.json").read_text())
    assert meta["method"] == case.split("-")[0] and meta["pattern"] == case.split("-")[1]
    assert meta["calibration"]["tokens"] == PRUNE_SAMPLES * PRUNE_SEQ_LEN and meta["saved_dtype"] == "float32"
    start = time.perf_counter()
    assert _tiny_pruned(tiny_original_dir, meta["method"], *(("2:4",) if meta["n_m"] else (None, 0.5))) == path
    assert time.perf_counter() - start < 1.0  # cached
    pruned, original = load_file(str(path / "model.safetensors")), load_file(str(tiny_original_dir / "model.safetensors"))
    assert pruned.keys() == original.keys()
    linears = [k for k in pruned if ".layers." in k and k.endswith("_proj.weight")]
    assert len(linears) == 14
    for key in linears:
        zeros = pruned[key] == 0
        if meta["n_m"]:
            assert (zeros.reshape(zeros.shape[0], -1, 4).sum(-1) >= 2).all(), key
            assert zeros.float().mean() == pytest.approx(0.5, abs=1e-4)
        else:
            assert (zeros.sum(1) >= zeros.shape[1] // 2).all(), key
        kept = ~zeros
        if meta["method"] == "wanda":  # Wanda never changes a kept weight
            assert torch.equal(pruned[key][kept], original[key][kept]), key
    for key in pruned.keys() - set(linears):  # embeddings and norms untouched
        assert torch.equal(pruned[key], original[key]), key


def test_pruned_model_is_dense_for_eora(pruned_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned_dirs["sparsegpt-2of4"], dtype=torch.float32)
    names = target_names(model)
    assert len(names) == 14
    for name in names:
        module = model.get_submodule(name)
        assert backend_for(module, name).name == "dense"
        assert torch.equal(backend_for(module).dequantize(module), module.weight)


def test_bad_inputs_are_refused_before_work(tiny_original_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_original_dir, dtype=torch.float32)
    batches = [{"input_ids": torch.tensor([[1, 504, 3575, 282]])}]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has 576 inputs, not a multiple of M=5"):
        prune_model_(model, batches, "wanda", "2:5")
    with pytest.raises(ValueError, match="Unknown pruning method 'magnitude'"):
        prune_model_(model, batches, "magnitude", "2:4")
    with pytest.raises(ValueError, match="needs calibration batches"):
        prune_model_(model, [], "wanda", "2:4")
    before = model.model.layers[1].mlp.up_proj.weight.clone()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj contains NaN"):
        prune_model_(model, batches, "sparsegpt", "2:4")
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, before)  # nothing was pruned
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prune(tmp_path, "wanda", "2:4")
    # an out_dir holding the user's files is refused before any work and left as it was (it was deleted)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"mine already exists and was not written by peft-eora"):
        prune(tiny_original_dir, "wanda", "2:4", out_dir=mine)
    assert [p.name for p in mine.iterdir()] == ["precious.txt"]


def test_publishing_never_deletes_a_folder_it_did_not_write(tmp_path):
    from peft_eora.embedded import COMPLETE_MARKER, atomic_publish, check_publishable, make_temp_dir

    final = tmp_path / "out"
    final.mkdir()
    (final / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="move that folder away"):
        make_temp_dir(final)
    tmp = tmp_path / ".out.tmp-x"
    tmp.mkdir()
    with pytest.raises(FileExistsError):
        atomic_publish(tmp, final)  # a folder filled while the work ran
    assert sorted(p.name for p in final.iterdir()) == ["precious.txt"]
    (final / "precious.txt").unlink()  # empty: published into
    assert atomic_publish(tmp, final) == final and (final / COMPLETE_MARKER).is_file()
    check_publishable(final)  # complete: ours


def test_unstructured_sparsities_name_their_own_folders():
    from peft_eora.prune import pattern_label

    assert [pattern_label(None, s) for s in (0.5, 0.504, 0.495, 0.7)] == ["u50", "u50.4", "u49.5", "u70"]
    assert pattern_label((2, 4), 0.5) == "2of4"


# ---------------------------------------------------------------------------------------------
# EoRA on pruned bases


@pytest.fixture(scope="module")
def texts(tmp_path_factory, tokenizer):
    calib, c4_held = c4_split(tmp_path_factory.mktemp("c4"), tokenizer)
    return calib, {"c4": c4_held, "wikitext2": wikitext_windows(tokenizer)}


@pytest.fixture(scope="module")
def reference(tiny_original_dir, texts):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_original_dir, dtype=torch.float32).eval()
    return reference_hidden(original, texts[1])


def _eora(pruned_dir, tiny_original_dir, reference, texts) -> dict:
    from transformers import AutoModelForCausalLM

    calib, heldout = texts
    return eora_vs_svd(lambda: AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval(),
                       tiny_original_dir, reference, heldout, calib)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wanda-2of4", "wanda-u50"])
def test_eora_compensates_wanda(case, pruned_dirs, tiny_original_dir, reference, texts):
    result = _eora(pruned_dirs[case], tiny_original_dir, reference, texts)
    h, w = result["hidden"], result["weighted_c4"]
    for text in ("c4", "wikitext2"):
        assert h["eora"][text] < 0.95 * h["base"][text], (case, text, h)
        assert h["eora"][text] < h["svd"][text], (case, text, h)
    assert w["eora"] < 0.97 * w["svd"] < w["base"], (case, w)


@pytest.mark.slow
def test_eora_on_sparsegpt_is_on_par_with_svd(pruned_dirs, tiny_original_dir, reference, texts):
    """SparseGPT already pushes its pruning error away from the calibration activations (OBS
    updates with the same kind of H), so what is left is nearly white in that metric: EoRA still
    compensates, but only on par with plain SVD (activation-weighted error on held-out C4, EoRA vs
    SVD at r=32, measured: 456 vs 449 with these 8×128 calibration tokens, 447 vs 449 with 32×128)."""
    result = _eora(pruned_dirs["sparsegpt-2of4"], tiny_original_dir, reference, texts)
    h, w = result["hidden"], result["weighted_c4"]
    for text in ("c4", "wikitext2"):
        assert h["eora"][text] < 0.95 * h["base"][text], (text, h)
    assert w["eora"] <= 1.03 * w["svd"] and w["eora"] < 0.95 * w["base"], w
