"""The ``peft-eora`` command line, end to end on the tiny real model (2-layer SmolLM2 + its GPTQ 3-bit).

compute → eval → sweep → push run in-process through ``cli.main``; their outputs are checked
against the Python API and against log-likelihoods computed by hand. Bad input must exit non-zero
with one ``peft-eora <command>: error: …`` line and no traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_eora import cli
from peft_eora.eval import load_text, perplexity
from peft_eora.eval.tasks import load_examples

DATA = Path(__file__).parent / "data" / "tasks"
RANK = 8


def run(argv: list) -> tuple[int, str, str]:
    """``cli.main(argv)`` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(code: int, out: str, err: str, expected_code: int, match: str) -> None:
    assert code == expected_code, err
    assert out == ""
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err
    assert errors[0].startswith("peft-eora") and match in errors[0], errors[0]


@pytest.fixture(scope="module")
def ppl_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(load_text("wikitext2", max_chars=4000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_opts(tiny_original_dir, tiny_gptq3_dir) -> list:
    return [
        "--original", tiny_original_dir, "--compressed", tiny_gptq3_dir, "--target-modules", "q_proj", "v_proj",
        "--num-samples", 4, "--seq-len", 64, "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def eval_opts(ppl_text) -> list:
    return [
        "--tasks", "arc_easy", "--task-data", DATA, "--limit", 4,
        "--ppl", ppl_text, "--ppl-seq-len", 32, "--ppl-windows", 2, "--no-progress",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def computed(tmp_path_factory, model_opts) -> tuple[Path, dict]:
    adapter = tmp_path_factory.mktemp("compute") / "adapter"
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", adapter])
    assert code == 0, err
    return adapter, json.loads(out)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, computed, tiny_gptq3_dir, eval_opts) -> dict:
    adapter, _ = computed
    result = tmp_path_factory.mktemp("eval") / "result.json"
    code, out, err = run(["eval", "--model", tiny_gptq3_dir, "--adapter", adapter, *eval_opts, "--details", "--out", result])
    assert code == 0, err
    assert out == ""  # --out: the JSON goes to the file
    return json.loads(result.read_text())


def _qmodel(path):
    from peft_eora.quantize import load_quantized

    return load_quantized(path, dtype=torch.float16, compute_dtype=torch.float32)


def _lora_params_per_rank(config_dir) -> int:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(config_dir)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    return c.num_hidden_layers * ((c.hidden_size + c.hidden_size) + (c.hidden_size + kv))  # q_proj + v_proj


def test_compute_saves_the_factors_of_the_python_api(computed, tiny_original_dir, tiny_gptq3_dir):
    from peft import get_peft_model

    from peft_eora import CalibrationConfig, EoRAConfig, initialize_eora_weights

    adapter, result = computed
    saved = load_file(adapter / "adapter_model.safetensors")
    lora = json.loads((adapter / "adapter_config.json").read_text())
    config = json.loads((adapter / "eora_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["r"] == RANK and config["init_eora"] is False
    assert sorted(lora["target_modules"]) == ["q_proj", "v_proj"]

    def factors(model) -> dict:
        return {n.replace(".default.weight", ".weight"): p.detach() for n, p in model.named_parameters() if ".lora_" in n}

    def eora_config(**kw) -> EoRAConfig:
        return EoRAConfig(
            r=RANK, target_modules=["q_proj", "v_proj"], original_model=str(tiny_original_dir),
            calibration=CalibrationConfig(num_samples=4, seq_len=64), **kw,
        )  # fmt: skip

    # two steps (inject, then initialize_eora_weights): what the CLI runs, bit for bit
    model = get_peft_model(_qmodel(tiny_gptq3_dir), eora_config(init_eora=False))
    initialize_eora_weights(model, progress=False)
    expected = factors(model)
    assert set(saved) == set(expected) and len(saved) == 8  # 2 layers × (q, v) × (A, B)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    # one step (get_peft_model computes): the same factors up to float16 rounding, because PEFT creates the
    # LoRA weights in the GPTQ layer's float16 during the computation and casts them to float32 afterwards
    one_step = factors(get_peft_model(_qmodel(tiny_gptq3_dir), eora_config()))
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, one_step[name], rtol=2e-3, atol=2e-4)
    assert result["lora_parameters"] == RANK * _lora_params_per_rank(tiny_original_dir) == sum(t.numel() for t in saved.values())
    stats = model.peft_config["default"].eora_stats
    assert result["eora_stats"]["calibration_tokens"] == stats["calibration_tokens"] == 4 * 64
    assert result["eora_stats"]["mean_relative_error_after"] == pytest.approx(stats["mean_relative_error_after"])


def test_eval_accuracy_and_perplexity_match_a_direct_computation(evaluated, computed, tiny_gptq3_dir, tokenizer, ppl_text):
    from peft import PeftModel

    adapter, _ = computed
    model = PeftModel.from_pretrained(_qmodel(tiny_gptq3_dir), str(adapter)).eval()
    task = evaluated["tasks"]["arc_easy"]
    examples = load_examples("arc_easy", DATA, limit=4)
    assert task["num_examples"] == 4 and evaluated["lora_parameters"] > 0
    preds, golds = [], []
    for ex, row in zip(examples, task["details"]):
        lls = []
        for choice in ex.choices:  # by hand: one unpadded sequence per choice
            ctx = tokenizer(ex.context)["input_ids"]
            cont = tokenizer(ex.context + " " + choice)["input_ids"][len(ctx) :]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
            lls.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        assert row["loglikelihoods"] == pytest.approx(lls, abs=2e-3)
        preds.append(max(range(len(lls)), key=lls.__getitem__))
        golds.append(ex.gold)
    assert task["acc"] == sum(p == g for p, g in zip(preds, golds)) / 4
    ppl = perplexity(model, tokenizer, load_text(ppl_text), seq_len=32, max_windows=2, progress=False)
    assert evaluated["perplexity"][str(ppl_text)]["perplexity"] == pytest.approx(ppl, rel=1e-5)


def test_adapter_changes_the_evaluated_model(evaluated, tiny_gptq3_dir, eval_opts):
    code, out, err = run(["eval", "--model", tiny_gptq3_dir, *eval_opts])
    assert code == 0, err
    base = json.loads(out)  # no --out: JSON on stdout
    assert base["adapter"] is None and base["lora_parameters"] == 0
    key = next(iter(base["perplexity"]))
    assert base["perplexity"][key]["perplexity"] != pytest.approx(evaluated["perplexity"][key]["perplexity"], rel=1e-4)


@pytest.mark.slow  # ~20-25 s: 6 model loads, 4 computes, 6 evaluations
def test_sweep_writes_json_table_and_plot(tmp_path, model_opts, eval_opts, evaluated, tiny_original_dir):
    out_dir = tmp_path / "sweep"
    code, out, err = run(["sweep", *model_opts, "--ranks", 4, RANK, "--methods", "eora", "svd", *eval_opts, "--out-dir", out_dir])
    assert code == 0, err
    summary = json.loads((out_dir / "sweep.json").read_text())
    rows = {r["label"]: r for r in summary["rows"]}
    assert list(rows) == ["original", "compressed", "eora r=4", "eora r=8", "svd r=4", "svd r=8"]
    per_rank = _lora_params_per_rank(tiny_original_dir)
    for method in ("eora", "svd"):
        for rank in (4, RANK):
            row = rows[f"{method} r={rank}"]
            assert row["lora_parameters"] == rank * per_rank
            assert row["lora_parameters_pct"] == pytest.approx(100 * rank * per_rank / summary["original_parameters"])
            assert Path(row["adapter"], "adapter_model.safetensors").is_file()
    # the sweep's eora r=8 adapter is the one `compute` made: same metrics as `eval` measured
    metrics = rows[f"eora r={RANK}"]["metrics"]
    assert metrics == pytest.approx(cli.flat_metrics(evaluated), rel=1e-6)
    assert set(metrics) == {f"ppl/{Path(eval_opts[eval_opts.index('--ppl') + 1]).name}", "arc_easy/acc", "arc_easy/acc_norm"}
    ppl = next(k for k in metrics if k.startswith("ppl/"))
    assert rows["compressed"]["metrics"][ppl] != pytest.approx(metrics[ppl], rel=1e-4)
    assert rows["svd r=4"]["metrics"][ppl] != pytest.approx(rows["eora r=4"]["metrics"][ppl], rel=1e-4)
    table = (out_dir / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| model | rank | LoRA params | % of original | ppl/") and len(table) == 2 + 6
    assert table[5].startswith(f"| eora r=8 | 8 | {RANK * per_rank:,} |")
    assert (out_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an ordinary file, as sweep.json is (it was left private, 0600)
    assert (out_dir / "sweep.png").stat().st_mode & 0o777 == (out_dir / "sweep.json").stat().st_mode & 0o777
    assert json.loads(out)["files"]["plot"] == str(out_dir / "sweep.png")


def test_push_uploads_the_adapter_to_the_hub(computed, tmp_path, monkeypatch):
    from hub_server import HubTestServer, point_client_at

    adapter, _ = computed
    with HubTestServer() as hub:
        point_client_at(hub.url, str(tmp_path / "hf-cache"), monkeypatch)
        code, out, err = run(["push", adapter, "test-user/cli-eora", "--ppl-before", 30.5, "--ppl-after", 25.25, "--no-progress"])
        assert code == 0, err
        files = hub.files("test-user/cli-eora")
        assert json.loads(out)["commit"] == hub.history("test-user/cli-eora")[0]
    assert {"README.md", "adapter_config.json", "eora_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
    assert "30.5 → 25.25" in files["README.md"].decode()
    pushed = files["adapter_model.safetensors"]
    local = load_file(adapter / "adapter_model.safetensors")
    from safetensors.torch import load

    for name, tensor in load(pushed).items():
        assert torch.equal(tensor, local[name])


# ---------------------------------------------------------------------------------------------
# Bad input: non-zero exit, one line
# ---------------------------------------------------------------------------------------------


def test_missing_paths_fail_before_loading_anything(tmp_path, tiny_gptq3_dir, tiny_original_dir):
    missing = tmp_path / "no-such-model"
    code, out, err = run(["compute", "--original", missing, "--compressed", tiny_gptq3_dir, "--rank", 4, "--out", tmp_path / "a"])
    assert_one_error_line(code, out, err, 1, f"Original model {missing}: no such folder")
    assert len(err.splitlines()) == 1
    code, out, err = run(["eval", "--model", tiny_gptq3_dir, "--adapter", missing, "--tasks", "arc_easy", "--task-data", DATA])
    assert_one_error_line(code, out, err, 1, "no adapter_config.json")
    code, out, err = run(["eval", "--model", tiny_gptq3_dir, "--tasks", "piqa", "--task-data", tmp_path])
    assert_one_error_line(code, out, err, 1, "Data file for piqa not found")
    # PIQA's labels and a few-shot pool smaller than --num-fewshot: refused here too, not after the model and the
    # other metrics were computed (they were lost)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text((DATA / "piqa" / "valid.jsonl").read_text())
    code, out, err = run(["eval", "--model", missing, "--tasks", "piqa", "--task-data", tmp_path])
    assert_one_error_line(code, out, err, 1, "PIQA labels file")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text((DATA / "gsm8k" / "test.jsonl").read_text())
    (tmp_path / "gsm8k" / "train.jsonl").write_text((DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[0] + "\n")
    code, out, err = run(["eval", "--model", missing, "--tasks", "gsm8k", "--task-data", tmp_path, "--num-fewshot", 3])
    assert_one_error_line(code, out, err, 1, "has 1 examples; lower --num-fewshot")
    code, out, err = run(["eval", "--model", tiny_gptq3_dir, "--ppl", missing])
    assert_one_error_line(code, out, err, 1, f"--ppl {missing}: no such file")
    code, out, err = run(["compute", "--compressed", tiny_gptq3_dir, "--rank", 4, "--out", tmp_path / "a"])
    assert_one_error_line(code, out, err, 1, "--original required")
    with pytest.raises(cli.CLIError):  # --debug: the exception (and its traceback) propagates
        run(["compute", "--original", missing, "--compressed", tiny_original_dir, "--rank", 4, "--out", tmp_path, "--debug"])


def test_bad_inputs_fail_before_loading_anything(tmp_path, tiny_gptq3_dir, model_opts):
    """Each of these was a traceback (some only after the model loaded, --out after the whole evaluation)."""
    (tmp_path / "folder").mkdir()
    code, out, err = run(["eval", "--model", tiny_gptq3_dir, "--ppl", "wikitext2", "--out", tmp_path / "folder"])
    assert_one_error_line(code, out, err, 1, "is a folder: give the path of the JSON file")
    code, out, err = run(["eval", "--model", tiny_gptq3_dir, "--ppl", "wikitext2", "--out", tmp_path / "no" / "x.json"])
    assert_one_error_line(code, out, err, 1, "does not exist")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"content": "words"}\n')
    code, out, err = run(["eval", "--model", tiny_gptq3_dir, "--ppl", rows])
    assert_one_error_line(code, out, err, 1, "its rows have no 'text' field (fields: ['content'])")
    for option, value in (("--target-modules", "(q_proj"), ("--exclude-modules", "*proj")):
        code, out, err = run(["compute", *model_opts, "--rank", 4, option, value, "--out", tmp_path / "a"])
        assert_one_error_line(code, out, err, 1, f"{option} {value!r} is not a valid regular expression")
    code, out, err = run(["compute", *model_opts, "--rank", 4, "--device", "bogus", "--out", tmp_path / "a"])
    assert_one_error_line(code, out, err, 1, "--device bogus: not a device torch knows")
    assert not (tmp_path / "a").exists()


def test_perplexity_metrics_of_files_sharing_a_name_stay_apart():
    from peft_eora.cli.evaluate import flat_metrics

    result = {"perplexity": {"a/test.txt": {"perplexity": 1.0}, "b/test.txt": {"perplexity": 2.0},
                             "wikitext2": {"perplexity": 3.0}}}
    assert flat_metrics(result) == {"ppl/a/test.txt": 1.0, "ppl/b/test.txt": 2.0, "ppl/wikitext2": 3.0}


def test_bad_rank_and_options(tmp_path, model_opts, eval_opts):
    code, out, err = run(["compute", *model_opts, "--rank", 0, "--out", tmp_path / "a"])
    assert_one_error_line(code, out, err, 2, "argument --rank: expected a positive integer, got 0")
    assert len(err.splitlines()) == 1
    code, out, err = run(["compute", *model_opts, "--rank", "ten", "--out", tmp_path / "a"])
    assert_one_error_line(code, out, err, 2, "expected a positive integer, got 'ten'")
    code, out, err = run(["compute", *model_opts, "--rank", 4, "--damping", -1, "--out", tmp_path / "a"])
    assert_one_error_line(code, out, err, 2, "--damping")
    code, out, err = run(["eval", "--model", model_opts[1], *eval_opts, "--num-fewshot", 5])
    assert_one_error_line(code, out, err, 1, "--num-fewshot 5 applies to gsm8k only")
    code, out, err = run(["sweep", *model_opts, "--ranks", 4, *eval_opts, "--plot-metric", "hellaswag/acc", "--out-dir", tmp_path])
    assert_one_error_line(code, out, err, 1, "--plot-metric hellaswag/acc: not measured")
    # a rank larger than a layer allows is found by the EoRA code itself, after loading
    code, out, err = run(["compute", *model_opts, "--rank", 1000, "--method", "svd", "--out", tmp_path / "big"])
    assert_one_error_line(code, out, err, 1, "rank")
    assert not (tmp_path / "big").exists()


def test_empty_calibration_data(tmp_path, model_opts):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": ""}\n')
    code, out, err = run(["compute", *model_opts, "--rank", 4, "--dataset", empty, "--out", tmp_path / "a"])
    assert_one_error_line(code, out, err, 1, "is empty")
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "only a few words"}\n')
    code, out, err = run(["compute", *model_opts, "--rank", 4, "--dataset", short, "--out", tmp_path / "a"])
    assert_one_error_line(code, out, err, 1, "lower num_samples or seq_len")
    assert not (tmp_path / "a").exists()


#: ``--help`` in a fresh process: which heavy libraries did it import?
HELP_CHILD = """
import contextlib, io, json, sys
from peft_eora.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(["--help"]), main(["compute", "--help"]), main(["eval", "--help"])]
heavy = ("torch", "peft", "transformers", "gptqmodel", "torchao", "bitsandbytes", "huggingface_hub", "datasets")
print(json.dumps({"codes": codes, "imported": [m for m in heavy if m in sys.modules]}))
"""


def test_console_entry_runs_as_a_module():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "peft_eora", "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no library warnings before the help text
    for command in ("compute", "eval", "sweep", "push", "lm-eval"):
        assert command in proc.stdout


def test_help_imports_no_heavy_library():
    """``peft-eora --help`` is fast because it imports neither torch nor PEFT nor transformers."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", HELP_CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"codes": [0, 0, 0], "imported": []}


def test_library_warnings_stay_quiet_ours_are_shown(computed, tiny_gptq4_dir, ppl_text):
    """Loading the 3-bit adapter onto the 4-bit base: our base-mismatch warning is shown, nothing from the
    libraries (transformers' quantization_config and deprecation warnings) is."""
    adapter, _ = computed
    argv = ["eval", "--model", tiny_gptq4_dir, "--adapter", adapter, "--allow-base-mismatch", "--ppl", ppl_text,
            "--ppl-seq-len", 32, "--ppl-windows", 1, "--no-progress"]  # fmt: skip
    code, out, err = run(argv)
    assert code == 0, err
    assert "BaseMismatchWarning" in err and "Loading anyway because allow_base_mismatch=True" in err
    assert "FutureWarning" not in err and "You passed `quantization_config`" not in err
    ours = ("INFO peft_eora", "WARNING peft_eora", "DEBUG peft_eora")
    assert all(line.startswith(ours) or "BaseMismatch" in line for line in err.splitlines() if line.strip()), err
    code, out, debug_err = run([*argv, "--debug"])  # --debug: the libraries speak again (gptqmodel's logs here)
    assert code == 0 and [line for line in debug_err.splitlines() if line.strip() and not line.startswith(ours)]


@pytest.mark.slow
def test_console_entry_prints_clean_json(computed, evaluated, tiny_gptq3_dir, eval_opts):
    """In a fresh process gptqmodel prints a banner on import: it must not end up in the JSON on stdout."""
    adapter, _ = computed
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "peft_eora", "eval", "--model", tiny_gptq3_dir, "--adapter", adapter, *eval_opts]
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert cli.flat_metrics(result) == pytest.approx(cli.flat_metrics(evaluated), rel=1e-6)
    # and nothing but our own log lines on stderr: no torch/transformers/gptqmodel warnings, banners or bars
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("INFO peft_eora") for line in lines), proc.stderr[-3000:]


@pytest.mark.slow
def test_lm_eval_wrapper_loads_eora_adapters_and_agrees_with_our_scores(computed, evaluated, tiny_gptq3_dir, tmp_path):
    """``peft-eora lm-eval`` (lm-evaluation-harness with peft_eora imported) on a local copy of ARC-Easy:
    lm-eval's per-choice log-likelihoods equal ours, so acc/acc_norm agree."""
    pytest.importorskip("lm_eval")
    from lm_eval_run import run_arc_easy

    adapter, _ = computed
    rows = run_arc_easy([sys.executable, "-m", "peft_eora", "lm-eval"], tiny_gptq3_dir, adapter, tmp_path)
    ours = evaluated["tasks"]["arc_easy"]["details"]
    assert len(rows) == len(ours) == 4
    for theirs, mine in zip(rows, ours):
        assert [float(r[0]) for r in theirs["filtered_resps"]] == pytest.approx(mine["loglikelihoods"], abs=2e-3)
        assert theirs["acc"] == float(mine["pred"] == mine["gold"])
        assert theirs["acc_norm"] == float(mine["pred_norm"] == mine["gold"])


def test_compute_checkpoint_and_resume(computed, model_opts, tmp_path):
    """--checkpoint-dir writes a resumable run; --resume on a finished folder reloads the same factors;
    a non-empty folder without --resume, and --resume without a folder, are one clear error each."""
    adapter, _ = computed
    ckpt = tmp_path / "run"
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", tmp_path / "a1", "--checkpoint-dir", ckpt])
    assert code == 0, err
    assert json.loads((ckpt / "manifest.json").read_text())["done"] >= 0
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", tmp_path / "a2", "--checkpoint-dir", ckpt])
    assert_one_error_line(code, out, err, 1, "--resume")
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", tmp_path / "a2", "--checkpoint-dir", ckpt,
                          "--resume"])
    assert code == 0, err
    first, second = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "a1", tmp_path / "a2"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", tmp_path / "a3", "--resume"])
    assert_one_error_line(code, out, err, 1, "--checkpoint-dir")


def test_run_options_are_refused_before_any_model_is_made_or_loaded(model_opts, tmp_path, monkeypatch):
    """--offload on a CPU device and --resume without a folder were refused only after the models were resolved (a
    gptq-w* name quantizes for minutes first) and the compressed one loaded."""
    from peft_eora.cli import compute

    def resolved(*args, **kwargs):
        raise AssertionError("a model was resolved before the options were checked")

    monkeypatch.setattr(compute, "resolve_model", resolved)
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", tmp_path / "a", "--offload", "--device",
                          "cpu"])
    assert_one_error_line(code, out, err, 1, "--offload moves decoder blocks to the GPU")
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", tmp_path / "a", "--resume"])
    assert_one_error_line(code, out, err, 1, "--checkpoint-dir")


def test_offload_loads_the_model_in_the_gpus_dtype(monkeypatch):
    """--offload keeps the model on the CPU but computes on the GPU: ``auto`` is the GPU's float16, not the CPU's
    float32 (twice the host memory, and other factors than a run on the GPU)."""
    import torch

    from peft_eora.cli import models

    assert models.pick_dtype("auto", "cpu") == torch.float32
    seen = {}

    class Loaded:
        def eval(self):
            return self

    def from_pretrained(path, dtype):
        seen["dtype"] = dtype
        return type("M", (), {"to": lambda self, device: seen.setdefault("device", device) and Loaded()})()

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", from_pretrained)
    monkeypatch.setattr(models, "_quant_method", lambda path: None)
    models.load_model("dense", "cpu", "auto", dtype_device="cuda")
    assert seen == {"dtype": torch.float16, "device": "cpu"}


def test_weighting_choices_are_the_configs():
    """The CLI spells the weighting choices out (importing ``config`` would import PEFT and slow
    ``--help``): they must stay the ones ``EoRAConfig`` accepts."""
    from peft_eora.config import LOGIT_WEIGHTINGS, VALUE_WEIGHTINGS

    compute = cli.build_parser()._subparsers._group_actions[0].choices["compute"]
    choices = {o: a.choices for a in compute._actions for o in a.option_strings}
    assert tuple(choices["--logit-weighting"]) == LOGIT_WEIGHTINGS
    assert tuple(choices["--value-weighting"]) == VALUE_WEIGHTINGS
    import dataclasses

    from peft_eora.cli.options import MIX_KEYS
    from peft_eora.config import CalibrationSource

    assert MIX_KEYS == tuple(f.name for f in dataclasses.fields(CalibrationSource))


def test_exclude_modules_reaches_the_config():
    """``--exclude-modules`` takes the forms of ``--target-modules`` and lands in ``EoRAConfig.exclude_modules``
    (what PEFT leaves out of the default targets too)."""
    from peft_eora.cli.compute import eora_config

    compute = cli.build_parser()._subparsers._group_actions[0].choices["compute"]
    base = ["--embedded", "--rank", "8", "--out", "x"]
    args = compute.parse_args([*base, "--exclude-modules", "shared_expert_gate,mlp.gate"])
    config = eora_config(args, 8, "eora", "orig", None)
    assert sorted(config.exclude_modules) == ["mlp.gate", "shared_expert_gate"] and config.target_modules is None
    args = compute.parse_args([*base, "--exclude-modules", r".*\.experts\.7\..*"])
    assert eora_config(args, 8, "eora", "orig", None).exclude_modules == r".*\.experts\.7\..*"
    assert eora_config(compute.parse_args(base), 8, "eora", "orig", None).exclude_modules is None


def test_mix_options_are_checked_without_importing_the_library(tmp_path, model_opts):
    """``--mix`` built a ``CalibrationSource`` while parsing (importing torch and PEFT before the terminal set-up
    silenced them); its keys are checked there now, its values with the rest of the calibration options."""
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", tmp_path / "a", "--mix", '{"bad": 1}'])
    assert code == 2 and "unknown: bad" in err and "Traceback" not in err
    code, out, err = run(["compute", *model_opts, "--rank", RANK, "--out", tmp_path / "a", "--mix",
                          '{"dataset": "builtin:gsm8k", "weight": -1}'])
    assert_one_error_line(code, out, err, 1, "weight")
