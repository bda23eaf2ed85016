"""The on-disk format (peft_eora.adapter_format): float EoRA adapters load wherever LoRA loads.

A fresh process that cannot import peft_eora plays a machine with only stock PEFT, transformers
(and lm-evaluation-harness): it loads what ``save_pretrained`` and ``push_to_hub`` wrote through
``PeftModel.from_pretrained``, transformers' ``model.load_adapter`` and lm-eval's ``peft=`` path,
and must reproduce the EoRA model's logits; a quantized adapter must fail there with a message
that names peft-eora. In this process (peft-eora imported) the same folders load as EoRA adapters
(base check, metadata), and adapters saved by peft-eora 0.1.0 still load.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_eora
from child_process import BLOCK_PEFT_EORA, WarmChild
from hub_server import HubTestServer, point_client_at
from peft_eora import AdapterFileError, BaseMismatchError, EoRAConfig
from peft_eora.adapter_format import FORMAT_VERSION, QUANTIZED_PEFT_TYPE
from tiny_models import tiny_llama_pair

INPUT = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(2))
ROUTES = ("peft", "transformers", "lm_eval")

#: Stock tools only (peft_eora blocked): for each adapter, PeftConfig, then the three loading routes.
STOCK_CHILD = """
    import warnings
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM

    args = wait_for_job()
    ids = load_file(args["input"])["input"]
    logits, report = {}, {}
    for name, path in args["adapters"].items():
        entry = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                config = PeftConfig.from_pretrained(path)
                entry["config"] = [type(config).__name__, str(getattr(config.peft_type, "value", config.peft_type))]
            except Exception as exc:
                entry["config"] = f"{type(exc).__name__}: {exc}"
            for route in ("peft", "transformers", "lm_eval"):
                base = LlamaForCausalLM.from_pretrained(args["base"], dtype=torch.float32).eval()
                try:
                    if route == "peft":
                        model = PeftModel.from_pretrained(base, path)
                    elif route == "transformers":
                        base.load_adapter(path)
                        model = base
                    else:  # what lm-eval's HFLM does with peft=<path> (lm_eval/models/huggingface.py)
                        model = PeftModel.from_pretrained(base, path, revision="main")
                    with torch.no_grad():
                        logits[f"{name}/{route}"] = model.eval()(ids).logits.contiguous()
                    entry[route] = "ok"
                except Exception as exc:
                    entry[route] = f"{type(exc).__name__}: {exc}"
        entry["warnings"] = sorted({str(w.message)[:200] for w in caught})
        report[name] = entry
    assert not [m for m in sys.modules if m.startswith("peft_eora")]
    save_file(logits, args["output"])
    print(json.dumps(report))
"""
STOCK_TEST = "test_stock_peft_transformers_and_lm_eval_load_float_eora_adapters"


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def _compute(quantized, original, **config) -> PeftModel:
    model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, **config))
    peft_eora.initialize_eora_weights(model, original_model=original, calibration=CALIB, progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def hub():
    with HubTestServer() as server:
        yield server


@pytest.fixture(scope="module")
def stock_child(request, hub, tmp_path_factory):
    """The stock-tools process, started first (its imports overlap the EoRA computations)."""
    if not any(item.originalname == STOCK_TEST for item in request.session.items):
        yield None
        return
    work = tmp_path_factory.mktemp("stock-child")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(work / "hf-cache"), HF_TOKEN="hf_x")
    child = WarmChild(STOCK_CHILD, work, env, block_peft_eora=True)
    yield child
    child.close()


@pytest.fixture(scope="module")
def models(stock_child):
    """(original, dense quantized base, {"float": EoRA model, "int8": EoRA model with int8 factors})."""
    original, quantized = tiny_llama_pair(seed=0)
    eora = {"float": _compute(quantized, original), "int8": _compute(quantized, original, adapter_bits=8)}
    return original, quantized, eora


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("saved")
    for name, model in models[2].items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models[2]}


def test_saved_files_are_plain_lora_plus_eora_config(saved, models):
    lora = json.loads((saved["float"] / "adapter_config.json").read_text())
    sidecar = json.loads((saved["float"] / "eora_config.json").read_text())
    assert lora["peft_type"] == "LORA" and (lora["r"], lora["lora_alpha"]) == (8, 8)
    # nothing in adapter_config.json that stock LoraConfig does not know (no "unexpected keyword" warning)
    assert set(lora) <= {f.name for f in __import__("dataclasses").fields(LoraConfig)}
    assert sidecar["format"] == "peft-eora" and sidecar["format_version"] == FORMAT_VERSION
    assert sidecar["method"] == "eora" and sidecar["base_fingerprint"]["digest"].startswith("eora-fp3:")
    tensors = load_file(saved["float"] / "adapter_model.safetensors")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    quantized = json.loads((saved["int8"] / "adapter_config.json").read_text())
    assert quantized["peft_type"] == QUANTIZED_PEFT_TYPE and "peft-eora" in QUANTIZED_PEFT_TYPE
    assert json.loads((saved["int8"] / "eora_config.json").read_text())["adapter_bits"] == 8
    card = (saved["float"] / "README.md").read_text()
    assert "peft-eora is not needed" in card and "base fingerprint" in card


@pytest.mark.slow
def test_stock_peft_transformers_and_lm_eval_load_float_eora_adapters(models, saved, stock_child, hub, tmp_path, monkeypatch):
    _, quantized, eora = models
    point_client_at(hub.url, str(tmp_path / "hf-cache"), monkeypatch)
    eora["float"].push_to_hub("test-user/eora-portable")
    quantized.save_pretrained(tmp_path / "base")
    save_file({"input": INPUT}, tmp_path / "input.safetensors")
    job = {
        "adapters": {"float": str(saved["float"]), "hub": "test-user/eora-portable", "int8": str(saved["int8"])},
        "base": str(tmp_path / "base"),
        "input": str(tmp_path / "input.safetensors"),
        "output": str(tmp_path / "logits.safetensors"),
    }
    report = stock_child.run(job)
    child = load_file(tmp_path / "logits.safetensors")
    expected = logits(eora["float"])
    for name in ("float", "hub"):
        entry = report[name]
        assert entry["config"] == ["LoraConfig", "LORA"], entry
        assert [entry[r] for r in ROUTES] == ["ok"] * 3, entry
        assert not [w for w in entry["warnings"] if "nexpected" in w or "missing" in w.lower()], entry["warnings"]
        for route in ROUTES:
            assert (child[f"{name}/{route}"] - expected).abs().max().item() <= 1e-5, (name, route)
    # quantized factors need peft-eora: every route says so instead of loading garbage
    entry = report["int8"]
    for key in ("config", *ROUTES):
        assert entry[key].startswith("KeyError") and "pip install peft-eora" in entry[key], (key, entry[key])


@pytest.mark.slow
def test_stock_lm_eval_harness_loads_the_float_adapter(tiny_gptq3_dir, tiny_original_dir, tmp_path):
    """lm-evaluation-harness itself (``lm_eval --model hf --model_args peft=...``) in a process without peft-eora."""
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from lm_eval_run import ARC_EASY, run_arc_easy
    from peft_eora.eval.multiple_choice import score_choices
    from peft_eora.eval.task_data import load_arc
    from peft_eora.quantize import load_quantized

    base = load_quantized(tiny_gptq3_dir, dtype=torch.float16, compute_dtype=torch.float32)
    config = EoRAConfig(r=8, target_modules=["q_proj", "v_proj"], original_model=str(tiny_original_dir),
                        calibration=peft_eora.CalibrationConfig(num_samples=4, seq_len=64))  # fmt: skip
    model = get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_original_dir)
    ours = score_choices(model, tokenizer, load_arc(ARC_EASY)[:4], progress=False)
    code = BLOCK_PEFT_EORA + "import sys\nfrom lm_eval.__main__ import cli_evaluate\nsys.argv[0] = 'lm_eval'\ncli_evaluate()\n"
    rows = run_arc_easy([sys.executable, "-c", code], tiny_gptq3_dir, tmp_path / "adapter", tmp_path)
    assert len(rows) == 4
    for theirs, mine in zip(rows, ours):
        assert [float(r[0]) for r in theirs["filtered_resps"]] == pytest.approx(mine, abs=2e-3)


# ---------------------------------------------------------------------------------------------
# With peft-eora: the same folders are EoRA adapters
# ---------------------------------------------------------------------------------------------


def test_peft_config_of_a_saved_folder_is_the_eora_config(saved):
    for name in ("float", "int8"):
        config = PeftConfig.from_pretrained(saved[name])
        assert isinstance(config, EoRAConfig) and config.init_eora is False and config.eora_stats
    assert PeftConfig.from_pretrained(saved["int8"]).adapter_bits == 8


def test_transformers_load_adapter_with_peft_eora_checks_the_base(models, saved):
    original, quantized, eora = models
    base = copy.deepcopy(quantized)
    base.load_adapter(str(saved["float"]))
    assert isinstance(base.peft_config["default"], EoRAConfig)
    assert (logits(base) - logits(eora["float"])).abs().max().item() <= 1e-5
    with pytest.raises(BaseMismatchError):
        copy.deepcopy(original).load_adapter(str(saved["float"]))  # another base: refused, as PeftModel does
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        copy.deepcopy(quantized).load_adapter(str(saved["int8"]))  # transformers cannot unpack int8 codes


def test_a_sidecar_written_before_its_weights_records_no_digest(models, saved, tmp_path):
    """transformers' save_pretrained writes the config before the weights (PEFT the other way round): a sidecar
    written then records no weights digest (one of the older file there would misjudge the new weights), so the
    folder loads as EoRA, silently; peft-eora's own save records the digest once both are written."""
    import warnings

    _, quantized, eora = models
    folder = tmp_path / "config-first"
    shutil.copytree(saved["int8"], folder)  # an older adapter: other weights in the folder
    eora["float"].peft_config["default"].save_pretrained(str(folder))  # the config first ...
    shutil.copy2(saved["float"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")  # ... then weights
    assert "weights_sha256" not in json.loads((folder / "eora_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = PeftModel.from_pretrained(copy.deepcopy(quantized), folder)
    assert isinstance(model.peft_config["default"], EoRAConfig)
    assert (logits(model.eval()) - logits(eora["float"])).abs().max().item() <= 1e-5


def test_lm_eval_loading_path_with_peft_eora(models, saved):
    _, quantized, eora = models
    for name in ("float", "int8"):
        model = PeftModel.from_pretrained(copy.deepcopy(quantized), saved[name], revision="main").eval()
        assert isinstance(model.peft_config["default"], EoRAConfig)
        assert (logits(model) - logits(eora[name])).abs().max().item() <= 1e-5


def _legacy_copy(folder: Path, target: Path) -> Path:
    """The folder as peft-eora 0.1.0 wrote it: one adapter_config.json with every field, peft_type EORA."""
    shutil.copytree(folder, target)
    lora = json.loads((target / "adapter_config.json").read_text())
    sidecar = json.loads((target / "eora_config.json").read_text())
    for key in ("format", "format_version", "peft_eora_version", "lora_signature", "weights_sha256"):
        sidecar.pop(key, None)  # the sidecar's own fields (0.1.0 had none)
    (target / "adapter_config.json").write_text(json.dumps({**lora, **sidecar, "peft_type": "EORA"}))
    (target / "eora_config.json").unlink()
    return target


def test_adapters_saved_by_peft_eora_0_1_still_load(models, saved, tmp_path):
    _, quantized, eora = models
    for name in ("float", "int8"):
        legacy = _legacy_copy(saved[name], tmp_path / name)
        model = PeftModel.from_pretrained(copy.deepcopy(quantized), legacy).eval()
        config = model.peft_config["default"]
        assert isinstance(config, EoRAConfig) and config.base_fingerprint == eora[name].peft_config["default"].base_fingerprint
        assert (logits(model) - logits(eora[name])).abs().max().item() <= 1e-5
        model.save_pretrained(tmp_path / f"{name}-resaved")  # saving again writes the new format
        assert (tmp_path / f"{name}-resaved" / "eora_config.json").is_file()


def test_eora_config_of_other_lora_settings_is_ignored_with_a_warning(models, saved, tmp_path):
    _, quantized, _ = models
    folder = tmp_path / "resaved-by-another-tool"
    shutil.copytree(saved["float"], folder)
    lora = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**lora, "lora_alpha": 16}))
    with pytest.warns(UserWarning, match="loading it as plain LoRA"):
        model = PeftModel.from_pretrained(copy.deepcopy(quantized), folder)
    assert type(model.peft_config["default"]) is LoraConfig


def test_newer_format_and_missing_eora_config_give_one_clear_error(saved, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(saved["float"], newer)
    sidecar = json.loads((newer / "eora_config.json").read_text())
    (newer / "eora_config.json").write_text(json.dumps({**sidecar, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(AdapterFileError, match="Upgrade peft-eora"):
        EoRAConfig.from_pretrained(newer)
    lost = tmp_path / "lost"
    shutil.copytree(saved["int8"], lost)
    (lost / "eora_config.json").unlink()
    with pytest.raises(AdapterFileError, match="is an int8/int4 EoRA adapter whose eora_config.json is missing") as error:
        PeftConfig.from_pretrained(lost)
    assert "install peft-eora" not in str(error.value)


def test_plain_lora_folders_are_not_taken_for_eora(models, tmp_path):
    _, quantized, _ = models
    lora = get_peft_model(copy.deepcopy(quantized), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert type(PeftConfig.from_pretrained(tmp_path / "lora")) is LoraConfig
    peft_eora.export_lora(lora, tmp_path / "exported")
    assert type(PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "exported").peft_config["default"]) is LoraConfig


def test_lora_and_eora_adapters_share_one_model(models, saved, tmp_path):
    """PEFT refuses adapters of two peft types in one model; an EoRA adapter is a LoRA adapter at inference, so a
    LoRA adapter joins an EoRA model (and is saved and reloaded beside it) and a float EoRA adapter joins a LoRA
    model, each computing what it computes alone; an int8 one, which only EoRA's tuner unpacks, is refused."""
    _, quantized, eora = models
    lora = get_peft_model(copy.deepcopy(quantized), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False)).eval()
    lora.save_pretrained(tmp_path / "lora")
    alone = logits(lora)

    both = PeftModel.from_pretrained(copy.deepcopy(quantized), saved["float"])
    both.load_adapter(tmp_path / "lora", adapter_name="task")
    both.set_adapter("task")
    assert (logits(both.eval()) - alone).abs().max().item() <= 1e-5
    both.set_adapter("default")
    assert (logits(both) - logits(eora["float"])).abs().max().item() <= 1e-5
    both.save_pretrained(tmp_path / "both")
    again = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "both")
    assert isinstance(again.peft_config["default"], EoRAConfig)
    again.load_adapter(tmp_path / "both" / "task", adapter_name="task")
    assert type(again.peft_config["task"]) is LoraConfig
    again.set_adapter("task")
    assert (logits(again.eval()) - alone).abs().max().item() <= 1e-5

    into_lora = PeftModel.from_pretrained(copy.deepcopy(quantized), tmp_path / "lora")
    into_lora.load_adapter(saved["float"], adapter_name="eora")
    into_lora.set_adapter("eora")
    assert (logits(into_lora.eval()) - logits(eora["float"])).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="cannot join a LoRA model: it stores int8 factors"):
        into_lora.load_adapter(saved["int8"], adapter_name="int8")
    # joining a LoRA model, an EoRA adapter is still checked against its base
    elsewhere = PeftModel.from_pretrained(tiny_llama_pair(seed=1)[1], tmp_path / "lora")
    with pytest.raises(BaseMismatchError):
        elsewhere.load_adapter(saved["float"], adapter_name="eora")
    assert "eora" not in elsewhere.peft_config
    # and a LoRA config without target_modules joining an EoRA model gets PEFT's defaults, not EoRA's
    both.add_adapter("plain", LoraConfig(r=4))
    assert both.peft_config["plain"].target_modules == {"q_proj", "v_proj"}


def test_an_eora_config_beside_other_weights_is_not_taken_for_eora(models, saved, tmp_path):
    """Another tool saving other weights (same LoRA settings) into an EoRA folder leaves its
    eora_config.json behind: the SHA-256 it records of the weights no longer matches, so the folder loads
    as plain LoRA (no base check: it may belong to another base), with a warning naming the stale file."""
    from safetensors.torch import load_file, save_file

    _, quantized, _ = models
    folder = tmp_path / "overwritten"
    shutil.copytree(saved["float"], folder)
    assert len(json.loads((folder / "eora_config.json").read_text())["weights_sha256"]) == 64
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({k: torch.randn_like(v) for k, v in weights.items()}, folder / "adapter_model.safetensors",
              metadata={"format": "pt"})
    elsewhere = tiny_llama_pair(seed=1)[1]
    with pytest.warns(UserWarning, match="other weights than adapter_model.safetensors"):
        model = PeftModel.from_pretrained(elsewhere, folder)
    assert type(model.peft_config["default"]) is LoraConfig
    # the weights it was written for: EoRA again (the digest of a file is remembered, not trusted: rewritten)
    shutil.copy2(saved["float"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    assert isinstance(PeftConfig.from_pretrained(folder), EoRAConfig)


def test_exports_and_plain_lora_saves_clear_a_stale_eora_config(models, saved, tmp_path):
    """export_lora into a folder that held an (int8) EoRA adapter, or a save whose top adapter is plain
    LoRA, removes the eora_config.json there: the folder holds a plain LoRA adapter and says so (config,
    card). A named EoRA adapter saved beside a plain "default" has its card in its own folder, and that
    card's usage line loads it from there."""
    _, quantized, eora = models
    folder = tmp_path / "exported-over"
    shutil.copytree(saved["int8"], folder)
    peft_eora.export_lora(eora["int8"], folder)
    assert not (folder / "eora_config.json").exists()
    assert type(PeftConfig.from_pretrained(folder)) is LoraConfig
    assert "plain LoRA" in (folder / "README.md").read_text()

    both = get_peft_model(copy.deepcopy(quantized), LoraConfig(r=4, target_modules=["q_proj"]))
    both.load_adapter(saved["float"], adapter_name="eora")
    mixed = tmp_path / "mixed"
    shutil.copytree(saved["float"], mixed)  # an EoRA "default" saved here before
    both.save_pretrained(mixed)
    assert not (mixed / "eora_config.json").exists() and (mixed / "eora" / "eora_config.json").is_file()
    assert type(PeftConfig.from_pretrained(mixed)) is LoraConfig
    assert "peft-eora" not in (mixed / "README.md").read_text()  # PEFT's card for the plain LoRA at the top
    (mixed / "README.md").write_text("# My adapters\n\nHand-written.\n")  # the user's own card: kept on a re-save
    both.save_pretrained(mixed)
    assert (mixed / "README.md").read_text() == "# My adapters\n\nHand-written.\n"
    card = (mixed / "eora" / "README.md").read_text()
    assert 'subfolder="eora", adapter_name="eora"' in card
    loaded = PeftModel.from_pretrained(copy.deepcopy(quantized), str(mixed), subfolder="eora", adapter_name="eora")
    assert isinstance(loaded.peft_config["eora"], EoRAConfig)
    loaded.set_adapter("eora")
    assert (logits(loaded.eval()) - logits(eora["float"])).abs().max().item() <= 1e-5
