"""AWQ checkpoints made elsewhere carry no record of their smoothing scales: they are recovered from the checkpoint and
its original (norm scales exactly, linear→linear scales from the first linear's rows), so the smoothed original EoRA
needs can be written for any AWQ (GEMM layout) checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("gptqmodel", reason="gptqmodel made the AWQ fixture")


def _elsewhere(awq_dir: Path, tmp_path: Path) -> Path:
    """The AWQ checkpoint as another tool would have written it: no recorded scales, no peft_eora metadata."""
    from peft_eora.quantize import AWQ_SCALES_FILE
    from peft_eora.quantize.checkpoints import META_FILE

    out = tmp_path / "hub-awq"
    shutil.copytree(awq_dir, out, ignore=shutil.ignore_patterns(AWQ_SCALES_FILE, META_FILE))
    return out


def test_recovered_scales_match_the_recorded_ones(tiny_awq4_dir, tiny_original_dir):
    from peft_eora.quantize import read_awq_scales, recover_awq_scales

    recorded, recovered = read_awq_scales(tiny_awq4_dir), recover_awq_scales(tiny_awq4_dir, tiny_original_dir)
    assert [(r["prev"], r["kind"], sorted(r["layers"])) for r in recorded] == \
        [(r["prev"], r["kind"], sorted(r["layers"])) for r in recovered]
    for a, b in zip(recorded, recovered):
        err = (b["scales"].double() / a["scales"].double()).log().abs()
        if a["kind"] == "norm":  # the stored norm's float16 rounding (the recovered scale is what the model computes)
            assert float(err.max()) < 1e-3, a["prev"]
        else:  # from the rows of up_proj and the columns of down_proj
            assert float(err.median()) < 0.02 and float(err.max()) < 0.15, (a["prev"], err.median(), err.max())
    assert any(r["kind"] == "linear" for r in recovered)


def test_smoothed_original_of_a_checkpoint_made_elsewhere(tiny_awq4_dir, tiny_original_dir, tmp_path):
    """The recovered-scale original computes the original function and sits as close to the AWQ weights as the
    recorded-scale one (norm groups: the same residuals; up/down: a smaller total)."""
    from transformers import AutoModelForCausalLM

    from peft_eora.original import OriginalWeights
    from peft_eora.quantize import awq_smoothed_original
    from peft_eora.quantize.awq_recover import _dequantize

    hub = _elsewhere(tiny_awq4_dir, tmp_path)
    with pytest.raises(ValueError, match="pass the float model it was quantized from as original_dir"):
        awq_smoothed_original(hub)
    made = awq_smoothed_original(hub, tiny_original_dir, out_dir=tmp_path / "smoothed")
    assert json.loads((made / "peft_eora_smoothed.json").read_text())["scales"] == "recovered"
    original = AutoModelForCausalLM.from_pretrained(tiny_original_dir, dtype=torch.float32).eval()
    smoothed = AutoModelForCausalLM.from_pretrained(made, dtype=torch.float32).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = original(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        got = smoothed(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    recorded = OriginalWeights.open(str(awq_smoothed_original(tiny_awq4_dir)))
    recovered = OriginalWeights.open(str(made))
    from safetensors.torch import load_file

    q = load_file(str(tiny_awq4_dir / "model.safetensors"))
    cfg = json.loads((tiny_awq4_dir / "config.json").read_text())["quantization_config"]
    def residual(weights: OriginalWeights, full: str) -> float:
        w_q = _dequantize(q, full, cfg["bits"], cfg["group_size"])
        return float((weights.get(full, torch.device("cpu")) - w_q).pow(2).sum())

    for block in (0, 1):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj"):  # norm scales: the same up to rounding
            full = f"model.layers.{block}.{name}"
            assert residual(recovered, full) < 1.001 * residual(recorded, full), full
        # up → down: the scales minimising the two residuals' energy together (measured 0.97× AWQ's own)
        pair = [f"model.layers.{block}.mlp.{n}" for n in ("up_proj", "down_proj")]
        assert sum(residual(recovered, n) for n in pair) <= sum(residual(recorded, n) for n in pair), block


def test_unexplained_scaling_is_refused(tiny_awq4_dir, tiny_original_dir, tmp_path):
    """An original whose down_proj columns were rescaled by something no norm or linear before it explains: refused,
    naming the layer, rather than smoothed wrongly."""
    from safetensors.torch import load_file, save_file

    from peft_eora.quantize import recover_awq_scales

    other = tmp_path / "other-original"
    shutil.copytree(tiny_original_dir, other)
    state = load_file(str(other / "model.safetensors"))
    key = "model.layers.1.self_attn.o_proj.weight"
    state[key] = state[key] * torch.linspace(0.3, 3.0, state[key].shape[1])[None, :]
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="o_proj's columns stay scaled against the original"):
        recover_awq_scales(tiny_awq4_dir, other)


def test_raw_original_of_an_awq_model_is_refused_before_work(tiny_awq4_dir, tiny_original_dir):
    """Without the smoothing, the residual against the raw original is 0.39-1.25 of the weights instead of
    ~0.1: an error naming the fix, before any calibration forward."""
    from peft import get_peft_model

    from peft_eora import CalibrationConfig, EoRAConfig
    from peft_eora.original import ModelMismatchError
    from peft_eora.quantize import awq_smoothed_original, load_quantized

    calib = CalibrationConfig(dataset="builtin:c4", num_samples=2, seq_len=32)
    with pytest.raises(ModelMismatchError, match=r"AWQ divided the norms .*awq_smoothed_original"):
        get_peft_model(load_quantized(tiny_awq4_dir, compute_dtype=torch.float32),
                       EoRAConfig(r=8, original_model=str(tiny_original_dir), calibration=calib))
    # the smoothed one passes the check (and the plain-SVD baseline is checked the same way)
    get_peft_model(load_quantized(tiny_awq4_dir, compute_dtype=torch.float32),
                   EoRAConfig(r=8, method="svd", original_model=str(awq_smoothed_original(tiny_awq4_dir))))


def test_awq_original_smooths_only_a_raw_original(tiny_awq4_dir, tiny_original_dir, tmp_path):
    from peft_eora.quantize import awq_original, awq_smoothed_original

    smoothed = awq_smoothed_original(tiny_awq4_dir)
    assert awq_original(tiny_awq4_dir, tiny_original_dir) == smoothed
    assert awq_original(tiny_awq4_dir, smoothed) == smoothed  # never smoothed twice


@pytest.mark.slow
def test_cli_computes_on_an_awq_checkpoint_made_elsewhere(tiny_awq4_dir, tiny_original_dir, tmp_path, capsys,
                                                          monkeypatch):
    """``peft-eora compute --original RAW --compressed AWQ`` brings the original into AWQ's coordinates itself
    (scales recovered: the checkpoint has none recorded) and writes an adapter whose card names the original."""
    from peft_eora import cli

    monkeypatch.setenv("PEFT_EORA_CACHE", str(tmp_path / "cache"))  # the smoothed copy: not into the user's cache

    hub = _elsewhere(tiny_awq4_dir, tmp_path)
    code = cli.main(["compute", "--original", str(tiny_original_dir), "--compressed", str(hub), "--rank", "8",
                     "--method", "svd", "--out", str(tmp_path / "adapter"), "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["original"] != str(tiny_original_dir) and Path(result["original"]).name.endswith("smoothed-original")
    assert json.loads((Path(result["original"]) / "peft_eora_smoothed.json").read_text())["scales"] == "recovered"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"`{Path(tiny_original_dir).resolve()}` (in the AWQ model's coordinates" in card


def test_cli_sweep_on_an_awq_checkpoint_takes_the_original_into_its_coordinates(tiny_awq4_dir, tiny_original_dir,
                                                                                  tmp_path, capsys, monkeypatch):
    """``peft-eora sweep`` does what ``compute`` does for an AWQ model (it used to hand the raw original to the
    residual and stop with a mismatch after evaluating the compressed model); its rows keep the original as given."""
    from peft_eora import cli

    monkeypatch.setenv("PEFT_EORA_CACHE", str(tmp_path / "cache"))
    hub = _elsewhere(tiny_awq4_dir, tmp_path)
    code = cli.main(["sweep", "--original", str(tiny_original_dir), "--compressed", str(hub), "--ranks", "4",
                     "--methods", "svd", "--ppl", "wikitext2", "--ppl-seq-len", "64", "--ppl-windows", "1",
                     "--skip-original", "--no-plot", "--no-progress", "--out-dir", str(tmp_path / "sweep")])
    assert code == 0
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert summary["complete"] and summary["original"] == str(tiny_original_dir)
    assert [r["label"] for r in summary["rows"]] == ["compressed", "svd r=4"]


def _synthetic(folder: Path, *, kv: int, plus_one: bool = False, bias: bool = False, extra_norms: tuple = (),
               norm_dtype: torch.dtype = torch.float16, seed: int = 0, sigma: float = 0.5) -> tuple[Path, Path, dict]:
    """One Llama-style block (hidden 128, 4 heads of 32, ``kv`` key/value heads, MLP 256) and its AWQ checkpoint
    made as gptqmodel's ``apply_scale`` does: random log-normal scales (log σ ``sigma``) for input norm → q/k/v, post norm → gate/up,
    up → down and, where the shapes match (``kv`` = 4), v → o; 4-bit RTN in the GEMM layout. Returns the original
    folder, the AWQ folder and the true scales."""
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    hidden, inter, hd, p = 128, 256, 32, "model.layers.0"
    shapes = {"self_attn.q_proj": (128, hidden), "self_attn.k_proj": (kv * hd, hidden),
              "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, 128),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    orig = {f"{p}.{n}.weight": torch.randn(*s, generator=gen) / s[1] ** 0.5 for n, s in shapes.items()}
    if bias:
        orig.update({f"{p}.self_attn.{n}.bias": torch.randn(shapes[f"self_attn.{n}"][0], generator=gen)
                     for n in ("q_proj", "k_proj", "v_proj")})
    for n in ("input_layernorm", "post_attention_layernorm", *extra_norms):
        orig[f"{p}.{n}.weight"] = torch.rand(hidden, generator=gen) * 2 - 0.5 if plus_one else \
            0.5 + torch.rand(hidden, generator=gen)
    orig["model.embed_tokens.weight"] = torch.randn(16, hidden, generator=gen)

    def scales(n: int) -> torch.Tensor:
        return torch.exp(torch.randn(n, generator=gen) * sigma)

    truth = {"input_layernorm": scales(hidden), "post_attention_layernorm": scales(hidden),
             "mlp.up_proj": scales(inter)}
    if kv * hd == 128:
        truth["self_attn.v_proj"] = scales(kv * hd)
    smooth = {k: v.clone() for k, v in orig.items()}
    for norm, layers in (("input_layernorm", ("q_proj", "k_proj", "v_proj")), ("post_attention_layernorm", ())):
        s, key = truth[norm], f"{p}.{norm}.weight"
        smooth[key] = ((smooth[key] + 1) / s - 1) if plus_one else smooth[key] / s
        targets = [f"self_attn.{n}" for n in layers] or ["mlp.gate_proj", "mlp.up_proj"]
        for n in targets:
            smooth[f"{p}.{n}.weight"] = smooth[f"{p}.{n}.weight"] * s[None, :]
    for prev, nxt in (("mlp.up_proj", "mlp.down_proj"), ("self_attn.v_proj", "self_attn.o_proj")):
        if prev in truth:
            s = truth[prev]
            smooth[f"{p}.{prev}.weight"] = smooth[f"{p}.{prev}.weight"] / s[:, None]
            if f"{p}.{prev}.bias" in smooth:
                smooth[f"{p}.{prev}.bias"] = smooth[f"{p}.{prev}.bias"] / s
            smooth[f"{p}.{nxt}.weight"] = smooth[f"{p}.{nxt}.weight"] * s[None, :]
    awq = {k: v.to(norm_dtype) if "norm" in k else v.half() for k, v in smooth.items() if k[:-7] not in
           {f"{p}.{n}" for n in shapes}}
    group = 32
    for n in shapes:
        w = smooth[f"{p}.{n}.weight"]  # (out, in) → groups along in
        g = w.T.reshape(w.shape[1] // group, group, w.shape[0])
        lo, hi = g.amin(1), g.amax(1)
        sc = ((hi - lo).clamp_min(1e-6) / 15).half().float()
        z = (-lo / sc).round().clamp(0, 15)
        codes = ((g / sc[:, None]).round() + z[:, None]).clamp(0, 15).reshape(w.shape[1], w.shape[0])
        qweight, qzeros = pack_awq(codes.to(torch.int32), z.to(torch.int32), 4)
        awq.update({f"{p}.{n}.qweight": qweight, f"{p}.{n}.qzeros": qzeros, f"{p}.{n}.scales": sc.half()})
    config = {"model_type": "llama", "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group,
                                                             "version": "gemm", "zero_point": True}}
    out = {}
    for name, state in (("original", orig), ("awq", awq)):
        (folder / name).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name / "model.safetensors"))
        (folder / name / "config.json").write_text(json.dumps(config if name == "awq" else {"model_type": "llama"}))
        out[name] = folder / name
    return out["original"], out["awq"], truth


@pytest.mark.parametrize("case", [
    {"kv": 4},                                                      # MHA: v → o scaled too
    {"kv": 2},                                                      # GQA: no v → o
    {"kv": 4, "plus_one": True},                                    # Gemma: γ − 1 stored, γ divided
    {"kv": 4, "extra_norms": ("pre_feedforward_layernorm", "post_feedforward_layernorm"), "seed": 1},
    {"kv": 4, "extra_norms": ("pre_feedforward_layernorm",), "norm_dtype": torch.bfloat16, "seed": 2},
    {"kv": 4, "bias": True},                                        # Qwen-style q/k/v biases: v → o exact
    {"kv": 2, "sigma": 0.04},                                       # mild scales (a margin once dropped them)
])
def test_recovery_on_synthetic_blocks(case, tmp_path):
    """The groups AWQ made, found whatever the convention; norms it did not scale (only rounded to the stored dtype)
    attract no linear. Norm scales exact to the stored norm's rounding; v → o exact from v's bias where it has one."""
    from peft_eora.quantize import recover_awq_scales

    original, awq, truth = _synthetic(tmp_path, **case)
    records = {r["prev"].split("layers.0.")[1]: r for r in recover_awq_scales(awq, original)}
    assert set(records) == set(truth), (set(records), set(truth))
    expect = {"input_layernorm": ["q_proj", "k_proj", "v_proj"], "post_attention_layernorm": ["gate_proj", "up_proj"],
              "mlp.up_proj": ["down_proj"], "self_attn.v_proj": ["o_proj"]}
    for prev, rec in records.items():
        assert sorted(n.rpartition(".")[2] for n in rec["layers"]) == sorted(expect[prev]), prev
        err = (rec["scales"].double() / truth[prev].double()).log().abs()
        if "norm" in prev:
            assert rec["kind"] == ("gemma_norm" if case.get("plus_one") else "norm")
            assert float(err.max()) < 2 * torch.finfo(case.get("norm_dtype", torch.float16)).eps * 4, prev
        elif prev == "self_attn.v_proj" and case.get("bias"):
            assert float(err.max()) < 2e-3, prev  # the float16 bias's rounding
        else:
            assert float(err.median()) < min(0.03, case.get("sigma", 0.5) / 4), (prev, float(err.median()))


def test_the_check_reads_offloaded_norms(tiny_awq4_dir, tiny_original_dir):
    """Norms accelerate offloaded (on ``meta``, their values in the hook) are read through the hook."""
    from accelerate import cpu_offload

    from peft_eora.original import ModelMismatchError, OriginalWeights
    from peft_eora.quantize import load_quantized
    from peft_eora.residual.norms import check_original_norms

    model = load_quantized(tiny_awq4_dir, compute_dtype=torch.float32)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].input_layernorm.weight.device.type == "meta"
    with pytest.raises(ModelMismatchError, match="AWQ divided the norms"):
        check_original_norms(model, OriginalWeights.open(str(tiny_original_dir)))


def test_norm_gap_sees_a_few_strongly_scaled_small_channels():
    """Relative to the largest weight alone, eight channels of γ = 0.005 divided by 10 read 0.2 %; per channel (floored
    at 1 % of the largest) they read 45 %. Rounding of a Gemma γ − 1 stays small read as γ (the check asks the norm
    module which reading applies)."""
    from peft_eora.residual.norms import NORM_TOLERANCE, norm_gap, norm_tolerance

    original = torch.ones(2048)
    original[:8] = 0.005
    smoothed = original.clone()
    smoothed[:8] /= 10
    assert norm_gap(smoothed, original, plus_one=False) > NORM_TOLERANCE
    gemma = torch.rand(2048, generator=torch.Generator().manual_seed(0)) * 0.02 - 0.01  # γ − 1 near 0
    s = torch.exp(torch.randn(2048, generator=torch.Generator().manual_seed(1)) * 0.5)
    stored = ((gemma + 1) / s - 1).bfloat16().float()  # gptqmodel's in-place (γ / s) − 1 in bfloat16
    exact = (gemma + 1) / s - 1
    tolerance = norm_tolerance(torch.bfloat16)  # four bfloat16 roundings, amplified where γ is near 0
    assert norm_gap(stored, exact, plus_one=True) <= tolerance < norm_gap(stored, gemma, plus_one=True)
    assert norm_gap(stored, exact) <= tolerance  # files alone: the closer reading (awq_original's shortcut)


def test_the_check_tells_gemma_norms_by_their_output():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from peft_eora.residual.norms import _multiplies_one_plus

    gemma, llama = GemmaRMSNorm(64), LlamaRMSNorm(64)
    with torch.no_grad():
        gemma.weight.uniform_(-0.5, 0.5)
        llama.weight.uniform_(0.5, 1.5)
    assert _multiplies_one_plus(gemma, gemma.weight) and not _multiplies_one_plus(llama, llama.weight)


def test_smoothed_copy_survives_a_touch_or_copy_of_the_original(tiny_awq4_dir, tiny_original_dir, tmp_path):
    import os

    from peft_eora.quantize import awq_original, awq_smoothed_original

    original = tmp_path / "original"
    shutil.copytree(tiny_original_dir, original)
    made = awq_smoothed_original(tiny_awq4_dir, original, out_dir=tmp_path / "smoothed")
    for f in original.iterdir():
        os.utime(f)  # a touch: the same weights
    assert awq_smoothed_original(tiny_awq4_dir, original, out_dir=tmp_path / "smoothed") == made
    assert awq_original(tiny_awq4_dir, made) == made
