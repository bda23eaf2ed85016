"""Saving and loading EoRA adapters: identical logits, nothing recomputed, atomic writes, safe files.

All on a random tiny Llama with a dense fake-quantized base (seconds).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_eora
from peft_eora import AdapterFileError, CalibrationConfig, EoRAConfig
from peft_eora.safe_files import atomic_directory, check_safetensors
from tiny_models import tiny_llama_pair

INPUT = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(2))
FILES = {"adapter_model.safetensors", "adapter_config.json", "eora_config.json", "README.md"}


@pytest.fixture(scope="module")
def computed():
    """(dense quantized base, PeftModel with computed EoRA factors), computed once."""
    original, quantized = tiny_llama_pair(seed=0)
    model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8))
    peft_eora.initialize_eora_weights(model, original_model=original, calibration=CALIB, progress=False)
    return quantized, model.eval()


@pytest.fixture(scope="module")
def saved(computed, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("saved") / "adapter"
    computed[1].save_pretrained(directory)
    return directory


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def load(quantized: torch.nn.Module, path: Path, **kwargs) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(quantized), path, **kwargs).eval()


def temp_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_round_trip_restores_identical_logits(computed, saved):
    quantized, model = computed
    assert set(os.listdir(saved)) == FILES
    lora = json.loads((saved / "adapter_config.json").read_text())
    assert lora["peft_type"] == "LORA" and lora["r"] == 8 and lora["lora_alpha"] == 8  # plain LoRA for every tool
    config = json.loads((saved / "eora_config.json").read_text())
    assert config["format"] == "peft-eora" and config["format_version"] == 1
    assert config["init_eora"] is False
    assert config["eora_stats"]["calibration_tokens"] == CALIB.numel()
    assert config["base_fingerprint"]["digest"].startswith("eora-fp3:")
    assert "allow_base_mismatch" not in config  # a loading choice, never saved
    assert not set(config) & set(lora)  # each field in one file
    tensors = load_file(saved / "adapter_model.safetensors")
    assert len(tensors) == 2 * 14 and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)

    loaded = load(quantized, saved)
    cfg = loaded.peft_config["default"]
    assert isinstance(cfg, EoRAConfig) and cfg.init_eora is False
    assert cfg.base_fingerprint == model.peft_config["default"].base_fingerprint
    expected = logits(model)
    assert (logits(loaded) - expected).abs().max().item() <= 1e-5
    # the adapter is not a no-op: the loaded model really carries the factors
    assert (logits(quantized) - expected).abs().max().item() > 1e-3


def test_load_recomputes_nothing_and_needs_no_sources(computed, saved, tmp_path, monkeypatch):
    """A config naming an original model and calibration file that do not exist still loads."""
    quantized, model = computed
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in FILES:
        (adapter / name).write_bytes((saved / name).read_bytes())
    config = json.loads((adapter / "eora_config.json").read_text())
    config["original_model"] = str(tmp_path / "no-such-original")
    config["calibration"] = {"dataset": str(tmp_path / "no-such-data.jsonl"), "num_samples": 4, "seq_len": 8}
    (adapter / "eora_config.json").write_text(json.dumps(config))

    def forbidden(*args, **kwargs):
        raise AssertionError("loading must not compute EoRA factors or open the original model")

    monkeypatch.setattr(peft_eora.model, "_initialize", forbidden)
    monkeypatch.setattr(peft_eora.model, "compensate", forbidden)
    monkeypatch.setattr(peft_eora.model.OriginalWeights, "open", forbidden)
    loaded = load(quantized, adapter)
    assert isinstance(loaded.peft_config["default"].calibration, CalibrationConfig)
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5


def test_failed_save_into_new_directory_leaves_nothing(computed, tmp_path, monkeypatch):
    import peft.peft_model

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        computed[1].save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert temp_leftovers(tmp_path) == []


def test_failed_save_over_existing_adapter_keeps_it(computed, saved, tmp_path, monkeypatch):
    import peft.peft_model

    target = tmp_path / "adapter"
    target.mkdir()
    for name in FILES:
        (target / name).write_bytes((saved / name).read_bytes())
    (target / "notes.txt").write_text("kept")
    before = {name: (target / name).read_bytes() for name in os.listdir(target)}

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        computed[1].save_pretrained(target)
    assert {name: (target / name).read_bytes() for name in os.listdir(target)} == before
    assert temp_leftovers(tmp_path) == []


def test_save_over_existing_directory_replaces_files_and_keeps_others(computed, tmp_path):
    quantized, model = computed
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "notes.txt").write_text("kept")
    (target / "README.md").write_text("---\nlicense: apache-2.0\n---\n# My adapter\n\nHand-written notes.\n")
    model.save_pretrained(target)
    model.save_pretrained(target)  # twice: the EoRA section is replaced, not appended again
    assert set(os.listdir(target)) == FILES | {"notes.txt"}
    assert (target / "notes.txt").read_text() == "kept"
    readme = (target / "README.md").read_text()
    assert "Hand-written notes." in readme and "license: apache-2.0" in readme
    assert readme.count("<!-- peft-eora:begin -->") == 1 and "library_name: peft" in readme
    assert temp_leftovers(tmp_path) == []
    assert (logits(load(quantized, target)) - logits(model)).abs().max().item() <= 1e-5


def test_atomic_directory_appears_complete(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        Path(tmp, "a.safetensors").write_bytes(b"1")
        Path(tmp, "sub").mkdir()
        Path(tmp, "sub", "adapter_config.json").write_text("{}")
        assert not target.exists()  # nothing visible until the block succeeds
    assert (target / "a.safetensors").read_bytes() == b"1" and (target / "sub" / "adapter_config.json").exists()
    with pytest.raises(NotADirectoryError):
        with atomic_directory(target / "a.safetensors"):
            pass


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_merge_into_an_existing_directory_that_fails_half_way_is_undone(tmp_path, monkeypatch, fail_at):
    """Saving into a folder that holds an adapter replaces its files one rename at a time: a rename failing
    half-way (disk full, permissions) puts every file back as it was — the old adapter, not new weights beside
    old configs — removes a subfolder it made, and leaves no temporary folder."""
    target = tmp_path / "out"
    target.mkdir()
    old = {"adapter_model.safetensors": "old weights", "adapter_config.json": "old config",
           "eora_config.json": "old sidecar", "notes.txt": "kept"}
    for name, text in old.items():
        (target / name).write_text(text)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        with atomic_directory(target, stale=["eora_config.json"]) as tmp:
            Path(tmp, "adapter_model.safetensors").write_text("new weights")
            Path(tmp, "adapter_config.json").write_text("new config")
            Path(tmp, "task").mkdir()
            Path(tmp, "task", "adapter_model.safetensors").write_text("new task weights")
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_text() for p in target.iterdir()} == old
    assert temp_leftovers(tmp_path) == []
    # and without a failure: the new files in, the stale sidecar gone, the rest kept
    with atomic_directory(target, stale=["eora_config.json"]) as tmp:
        Path(tmp, "adapter_model.safetensors").write_text("new weights")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert (target / "adapter_model.safetensors").read_text() == "new weights"


def test_written_files_are_ordinary_files_not_private_temporaries(computed, tmp_path):
    """Temporary files are created 0600 (and safetensors writes its files so): what a save, or an atomic text
    write (sweep tables, configs), leaves behind gets the mode any new file gets under the umask."""
    from peft_eora.safe_files import atomic_write, atomic_write_text

    old = os.umask(0o022)
    try:
        computed[1].save_pretrained(tmp_path / "adapter")
        atomic_write_text(tmp_path / "table.md", "| a |\n")
        atomic_write(tmp_path / "plot.png", lambda tmp: Path(tmp).write_bytes(b"png"), suffix=".png")  # the sweep's
    finally:
        os.umask(old)
    written = [*(tmp_path / "adapter").iterdir(), tmp_path / "table.md", tmp_path / "plot.png"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in written}
    assert set(modes.values()) == {0o644}, modes
    with pytest.raises(UnicodeEncodeError):  # a failed write leaves no temporary file behind (it did)
        atomic_write_text(tmp_path / "bad.json", "x\ud800")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "plot.png", "table.md"]


def test_odd_local_paths_behave_as_with_plain_peft(computed, tmp_path):
    """A symlink to an empty folder is saved into (the rename onto the link failed), and a folder that is not there
    gets PEFT's own error (an ``HFValidationError`` about repo ids came out instead)."""
    from peft import PeftConfig

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    computed[1].save_pretrained(tmp_path / "link")
    assert (tmp_path / "real" / "adapter_config.json").is_file() and (tmp_path / "link").is_symlink()
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftConfig.from_pretrained(str(tmp_path / "missing" / "dir"))


def test_an_eora_card_does_not_outlive_its_adapter_in_a_named_folder(computed, tmp_path):
    """Save EoRA adapter ``b``, then a plain LoRA under the same name: its folder kept the EoRA card (its sidecar
    went), describing the LoRA adapter as EoRA."""
    from peft import LoraConfig

    quantized, model = computed
    eora = copy.deepcopy(model)
    eora.add_adapter("b", copy.deepcopy(eora.peft_config["default"]))
    eora.save_pretrained(tmp_path, selected_adapters=["b"])
    assert (tmp_path / "b" / "README.md").is_file()
    lora = copy.deepcopy(model)  # an EoRA model (its saves are peft-eora's) now holding a plain LoRA "b"
    lora.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path)
    assert not (tmp_path / "b" / "README.md").exists() and not (tmp_path / "b" / "eora_config.json").exists()
    (tmp_path / "b" / "README.md").write_text("# my notes\n")  # a user's own card there stays
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "README.md").read_text() == "# my notes\n"


def test_pickle_serialization_is_refused(computed, tmp_path):
    with pytest.raises(ValueError, match="safetensors only"):
        computed[1].save_pretrained(tmp_path / "adapter", safe_serialization=False)
    assert not (tmp_path / "adapter").exists()


def test_other_peft_methods_keep_peft_behaviour(computed, tmp_path):
    """The save hook only takes over for EoRA adapters: a plain LoRA model may still save a .bin."""
    lora = get_peft_model(copy.deepcopy(computed[0]), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora", safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path / "lora")


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "empty", "trailing-bytes"])
def test_damaged_safetensors_gives_one_clear_error(computed, saved, tmp_path, damage):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in FILES:
        (adapter / name).write_bytes((saved / name).read_bytes())
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage-header": b"\x13\x37" * 4 + data[8:],
            "empty": b"",
            "trailing-bytes": data + b"\0" * 16,
        }[damage]
    )
    with pytest.raises(AdapterFileError) as info:
        load(computed[0], adapter)
    message = str(info.value)
    assert str(weights) in message
    assert ("truncated" in message) or ("corrupted" in message)
    with pytest.raises(AdapterFileError):
        check_safetensors(weights)


def test_pickle_file_is_never_loaded(computed, saved, tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "eora_config.json"):
        (adapter / name).write_bytes((saved / name).read_bytes())
    torch.save(load_file(saved / "adapter_model.safetensors"), adapter / "adapter_model.bin")

    def no_pickle(*args, **kwargs):
        raise AssertionError("a pickle file was loaded")

    monkeypatch.setattr(torch, "load", no_pickle)
    with pytest.raises(AdapterFileError, match="pickle"):
        load(computed[0], adapter)
    # with both files present the safetensors one is used
    (adapter / "adapter_model.safetensors").write_bytes((saved / "adapter_model.safetensors").read_bytes())
    assert (logits(load(computed[0], adapter)) - logits(computed[1])).abs().max().item() <= 1e-5


def test_named_adapter_saves_into_subfolder_and_loads(computed, tmp_path):
    quantized, model = computed
    model.save_pretrained(tmp_path / "multi")
    top_card = (tmp_path / "multi" / "README.md").read_text()
    config = copy.deepcopy(model.peft_config["default"])
    model.add_adapter("second", config)
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".second." in name:
                    param.copy_(model.get_parameter(name.replace(".second.", ".default.")))
        model.save_pretrained(tmp_path / "multi", selected_adapters=["second"])
    finally:
        model.delete_adapter("second")
        model.set_adapter("default")
    assert (tmp_path / "multi" / "second" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "multi" / "adapter_model.safetensors").is_file()  # the first save is untouched
    assert (tmp_path / "multi" / "README.md").read_text() == top_card
    assert "<!-- peft-eora:begin -->" in (tmp_path / "multi" / "second" / "README.md").read_text()  # its own card
    assert (tmp_path / "multi" / "second" / "eora_config.json").is_file()
    loaded = load(quantized, tmp_path / "multi", subfolder="second", adapter_name="second")
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5


def test_fine_tuned_adapters_are_saved_as_such(computed, saved, tmp_path):
    """eora_stats and the card describe the factors EoRA computed: once the factors are trained further, saving
    marks the adapter ``fine_tuned`` (kept through reloads) and the card says so. A cast to half precision is
    no training."""
    quantized, model = computed
    assert model.peft_config["default"].eora_stats["factor_signature"][3] > 0
    sidecar = json.loads((saved / "eora_config.json").read_text())
    assert sidecar["fine_tuned"] is False and "A training-free" in (saved / "README.md").read_text()

    cast = load(quantized, saved).to(torch.bfloat16)
    cast.save_pretrained(tmp_path / "cast")
    assert json.loads((tmp_path / "cast" / "eora_config.json").read_text())["fine_tuned"] is False
    # reloaded (PEFT keeps adapters in float32: the bf16-rounded values) and saved again: still not trained
    load(quantized, tmp_path / "cast").save_pretrained(tmp_path / "cast-again")
    assert json.loads((tmp_path / "cast-again" / "eora_config.json").read_text())["fine_tuned"] is False

    trained = load(quantized, saved, is_trainable=True).train()
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        trained(INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained.save_pretrained(tmp_path / "tuned")
    assert json.loads((tmp_path / "tuned" / "eora_config.json").read_text())["fine_tuned"] is True
    card = (tmp_path / "tuned" / "README.md").read_text()
    assert "then fine-tuned" in card and "A training-free" not in card
    again = load(quantized, tmp_path / "tuned")
    assert again.peft_config["default"].fine_tuned is True
    assert torch.allclose(logits(again), logits(trained.eval()), atol=1e-5)


def test_a_trained_modules_to_save_copy_marks_the_adapter_fine_tuned(tmp_path):
    """Only the LoRA factors were compared: training a ``modules_to_save`` copy (an ``lm_head``) left the adapter
    described as training-free."""
    original, quantized = tiny_llama_pair(seed=0)
    model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, modules_to_save=["lm_head"]))
    peft_eora.initialize_eora_weights(model, original_model=original, calibration=CALIB, progress=False)
    assert model.peft_config["default"].eora_stats["copies_signature"][3] > 0
    model.save_pretrained(tmp_path / "as-computed")
    assert json.loads((tmp_path / "as-computed" / "eora_config.json").read_text())["fine_tuned"] is False
    head = model.base_model.model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        head.weight[0].add_(0.1)  # a step on the copy alone; the factors stay as computed
    model.save_pretrained(tmp_path / "tuned")
    assert json.loads((tmp_path / "tuned" / "eora_config.json").read_text())["fine_tuned"] is True
