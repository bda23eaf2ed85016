"""Hub round trips through the real huggingface_hub client against the test Hub server.

``tests/hub_server.py`` serves a Hub-compatible API on 127.0.0.1; the client is pointed at it
as ``HF_ENDPOINT`` would (in this process by patching the already-read constants, in a fresh
process by the environment variable alone).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, model_info
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_eora
from hub_server import HubTestServer, point_client_at
from peft_eora import AdapterFileError, EoRAConfig
from peft_eora.card import CARD_BEGIN, build_model_card
from tiny_models import tiny_llama_pair

INPUT = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(2))
BASE_ID = "test-org/tiny-llama-q3"


@pytest.fixture(scope="module")
def hub():
    with HubTestServer() as server:
        yield server


@pytest.fixture
def client(hub, tmp_path, monkeypatch) -> HfApi:
    point_client_at(hub.url, str(tmp_path / "hf-cache"), monkeypatch)
    return HfApi()


@pytest.fixture(scope="module")
def computed():
    """(dense quantized base named like a Hub model, PeftModel with computed EoRA factors)."""
    original, quantized = tiny_llama_pair(seed=0)
    quantized.config._name_or_path = BASE_ID  # as if loaded from the Hub
    model = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8))
    peft_eora.initialize_eora_weights(model, original_model=original, calibration=CALIB, progress=False)
    model.peft_config["default"].eora_stats.update(ppl_before=25.5, ppl_after=21.25, ppl_dataset="wikitext2")
    return quantized, model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def pull(quantized, repo_id: str, **kwargs) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(quantized), repo_id, **kwargs).eval()


def test_push_creates_repo_with_adapter_and_model_card(hub, client, computed):
    quantized, model = computed
    commit = model.push_to_hub("test-user/eora-card")
    files = hub.files("test-user/eora-card")
    assert set(files) == {
        ".gitattributes", "README.md", "adapter_config.json", "eora_config.json", "adapter_model.safetensors",
    }  # fmt: skip
    assert json.loads(files["adapter_config.json"])["peft_type"] == "LORA"
    assert json.loads(files["eora_config.json"])["base_fingerprint"] == model.peft_config["default"].base_fingerprint
    assert commit.oid == hub.history("test-user/eora-card")[0] == model_info("test-user/eora-card").sha

    card = ModelCard.load("test-user/eora-card")  # downloaded through the client
    assert card.data.library_name == "peft"
    assert {"peft", "eora", "lora"} <= set(card.data.tags)
    assert card.data.base_model == BASE_ID
    fingerprint = model.peft_config["default"].base_fingerprint["digest"]
    for row in (
        f"| Compressed base model | `{BASE_ID}` |",
        "| Compression | dense weights",
        "| Method | eora (damping auto: ",  # two windows: one fits, one chooses each layer's ridge
        "| Rank | 8 (lora_alpha 8) |",
        f"| Calibration data | token batches passed to `initialize_eora_weights` ({CALIB.numel()} tokens) |",
        "| Perplexity before → after | 25.5 → 21.25 on wikitext2 |",
        f"| Base fingerprint | `{fingerprint}` |",
        'PeftModel.from_pretrained(base, "test-user/eora-card")',
    ):
        assert row in card.text, row
    info = model_info("test-user/eora-card")
    assert info.library_name == "peft" and "eora" in info.tags


def test_a_first_push_starts_from_the_given_card_a_later_one_from_the_repos(hub, client, computed, tmp_path):
    """``card=`` (what ``peft-eora push`` reads from the adapter folder) keeps the user's own text on a repo that
    has no card yet; once the repo has one, its text is what is kept (only the peft-eora section is rewritten)."""
    from peft_eora.hub import push_to_hub

    _, model = computed
    model.save_pretrained(tmp_path / "adapter")
    readme = tmp_path / "adapter" / "README.md"
    readme.write_text(readme.read_text() + "\nMY LOCAL NOTE\n")
    push_to_hub(model, "test-user/eora-local-card", card=ModelCard.load(readme))
    text = hub.files("test-user/eora-local-card")["README.md"]
    text = text.decode() if isinstance(text, bytes) else text
    assert "MY LOCAL NOTE" in text and text.count(CARD_BEGIN) == 1
    push_to_hub(model, "test-user/eora-local-card", card=ModelCard("---\nlicense: mit\n---\nANOTHER CARD\n"))
    text = hub.files("test-user/eora-local-card")["README.md"]
    text = text.decode() if isinstance(text, bytes) else text
    assert "MY LOCAL NOTE" in text and "ANOTHER CARD" not in text


def test_pull_restores_identical_logits(client, computed):
    quantized, model = computed
    model.push_to_hub("test-user/eora-pull")
    loaded = pull(quantized, "test-user/eora-pull")
    assert isinstance(loaded.peft_config["default"], EoRAConfig)
    assert loaded.peft_config["default"].init_eora is False
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5


def test_second_push_updates_adapter_and_revision_pins_the_first(hub, client, computed):
    quantized, model = computed
    repo = "test-user/eora-versions"
    first = model.push_to_hub(repo)
    v1 = logits(model)
    # someone edits the card on the Hub; the next push must keep the prose
    readme = hub.files(repo)["README.md"].decode().replace(CARD_BEGIN, "Notes by a human.\n\n" + CARD_BEGIN)
    client.upload_file(path_or_fileobj=readme.encode(), path_in_repo="README.md", repo_id=repo)

    changed = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in changed.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    second = changed.push_to_hub(repo, commit_message="Halve the update")
    v2 = logits(changed)
    assert first.oid != second.oid and hub.history(repo)[0] == second.oid and first.oid in hub.history(repo)
    assert (v1 - v2).abs().max().item() > 1e-4

    latest = pull(quantized, repo)
    assert (logits(latest) - v2).abs().max().item() <= 1e-5
    pinned = pull(quantized, repo, revision=first.oid)
    assert (logits(pinned) - v1).abs().max().item() <= 1e-5

    files = hub.files(repo)
    new_readme = files["README.md"].decode()
    assert "Notes by a human." in new_readme and new_readme.count(CARD_BEGIN) == 1
    assert files["adapter_config.json"] == hub.files(repo, revision=first.oid)["adapter_config.json"]
    assert [c.title for c in client.list_repo_commits(repo)][0] == "Halve the update"


def test_a_push_replaces_the_adapter_files_an_earlier_push_left(hub, client, computed):
    """Where a push writes an adapter, an old pickle file or a stale sidecar left on the Hub would load beside (or
    instead of) it: they go in the same commit. Other folders (another adapter, a Trainer checkpoint) and other
    files stay."""
    quantized, model = computed
    repo = "test-user/eora-replaced"
    client.create_repo(repo)
    kept = ("other/adapter_config.json", "other/adapter_model.safetensors", "last-checkpoint/adapter_model.safetensors",
            "runs/a/adapter_config.json", "notes.txt", "data/eval.json")
    for path in ("adapter_model.bin", *kept):
        client.upload_file(path_or_fileobj=b"{}", path_in_repo=path, repo_id=repo)
    model.push_to_hub(repo)
    assert set(hub.files(repo)) == {
        ".gitattributes", "README.md", "adapter_config.json", "eora_config.json", "adapter_model.safetensors", *kept,
    }  # fmt: skip
    loaded = pull(quantized, repo)
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5


def test_a_push_keeps_the_text_of_every_card_it_updates(hub, client, computed):
    """A push saved into an empty folder, so only the top README reached the save: a named adapter's card lost the
    user's text, a user's own top card beside a plain-LoRA ``default`` was replaced by PEFT's template, and a card with
    unparsable metadata aborted the push. They are read from the repo now, as a local save reads its folder."""
    from peft import LoraConfig

    _, model = computed
    repo = "test-user/eora-cards"
    named = copy.deepcopy(model)
    named.add_adapter("b", copy.deepcopy(named.peft_config["default"]))  # a computed config: loaded as it is
    named.push_to_hub(repo, selected_adapters=["b"])
    card = hub.files(repo)["b/README.md"].decode()
    client.upload_file(path_or_fileobj=(card + "\nB NOTES BY A HUMAN\n").encode(), path_in_repo="b/README.md",
                       repo_id=repo)
    client.upload_file(path_or_fileobj=b"# My own top card\n", path_in_repo="README.md", repo_id=repo)
    named.push_to_hub(repo, selected_adapters=["b"])
    files = hub.files(repo)
    assert "B NOTES BY A HUMAN" in files["b/README.md"].decode() and files["b/README.md"].decode().count(CARD_BEGIN) == 1
    assert files["README.md"] == b"# My own top card\n"  # named adapters only: the top card is not theirs
    # a plain LoRA at the top beside the EoRA adapter: the user's own top card stays
    mixed = get_peft_model(copy.deepcopy(computed[0]), LoraConfig(r=4, target_modules=["q_proj"]))
    mixed.add_adapter("b", copy.deepcopy(named.peft_config["b"]))
    mixed.load_state_dict({k: v for k, v in named.state_dict().items() if ".b." in k}, strict=False)
    mixed.push_to_hub(repo)
    assert hub.files(repo)["README.md"] == b"# My own top card\n"
    # unparsable metadata in a card: left as it is (with a warning), the push goes on
    client.upload_file(path_or_fileobj=b"---\nbad: [yaml\n---\ntext\n", path_in_repo="b/README.md", repo_id=repo)
    named.push_to_hub(repo, selected_adapters=["b"])
    assert hub.files(repo)["b/README.md"] == b"---\nbad: [yaml\n---\ntext\n"
    # "b" pushed again as a plain LoRA adapter: its folder's EoRA card goes with its sidecar
    client.upload_file(path_or_fileobj=card.encode(), path_in_repo="b/README.md", repo_id=repo)  # its EoRA card back
    lora = copy.deepcopy(model)  # an EoRA model (its pushes are peft-eora's) now holding a plain LoRA "b"
    lora.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    lora.push_to_hub(repo)
    assert "b/README.md" not in hub.files(repo) and "b/eora_config.json" not in hub.files(repo)


def test_push_to_a_branch_leaves_main_alone(hub, client, computed):
    quantized, model = computed
    repo = "test-user/eora-branch"
    client.create_repo(repo)
    model.push_to_hub(repo, revision="dev")
    assert set(hub.files(repo)) == {".gitattributes"}
    assert "adapter_model.safetensors" in hub.files(repo, revision="dev")
    loaded = pull(quantized, repo, revision="dev")
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5


def test_an_original_on_the_hub_is_read_without_mistrals_second_copy_of_the_weights(hub, client, tmp_path):
    """``original_model="org/name"``: the snapshot holds the checkpoint's shards and configs, never the
    ``consolidated.safetensors`` copy Mistral's repos also carry (as large again as the model)."""
    from peft_eora.original import OriginalWeights

    original, _ = tiny_llama_pair(seed=0)
    original.save_pretrained(tmp_path / "orig")
    repo = "test-user/tiny-original"
    client.create_repo(repo)
    client.upload_folder(folder_path=tmp_path / "orig", repo_id=repo)
    client.upload_file(path_or_fileobj=b"a second copy", path_in_repo="consolidated.safetensors", repo_id=repo)
    weights = OriginalWeights.open(repo)
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(weights.get(name), original.state_dict()[f"{name}.weight"])
    cached = {p.name for p in (tmp_path / "hf-cache").rglob("*.safetensors")}
    assert "consolidated.safetensors" not in cached and "model.safetensors" in cached, cached


def test_damaged_or_pickle_adapters_on_the_hub_are_refused(client, computed, tmp_path):
    quantized, model = computed
    local = tmp_path / "adapter"
    model.save_pretrained(local)
    config = (local / "adapter_config.json").read_bytes()
    eora = (local / "eora_config.json").read_bytes()
    weights = (local / "adapter_model.safetensors").read_bytes()

    client.create_repo("test-user/eora-truncated")
    for path, data in (
        ("adapter_config.json", config), ("eora_config.json", eora), ("adapter_model.safetensors", weights[:-100]),
    ):  # fmt: skip
        client.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id="test-user/eora-truncated")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors is truncated"):
        pull(quantized, "test-user/eora-truncated")

    client.create_repo("test-user/eora-pickle")
    for path, data in (("adapter_config.json", config), ("eora_config.json", eora), ("adapter_model.bin", b"not loaded")):
        client.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id="test-user/eora-pickle")
    with pytest.raises(AdapterFileError, match="never loads pickle"):
        pull(quantized, "test-user/eora-pickle")


def test_a_plain_svd_adapters_card_claims_no_activations_or_calibration(tmp_path):
    """method="svd" reads weights only; its card described the eigenspace projection, a damping and the config's
    calibration windows it never used."""
    from peft_eora import CalibrationConfig

    original, quantized = tiny_llama_pair(seed=0)
    config = EoRAConfig(r=8, method="svd", calibration=CalibrationConfig("builtin:c4", num_samples=16, seq_len=64))
    model = get_peft_model(copy.deepcopy(quantized), config)
    peft_eora.initialize_eora_weights(model, original_model=original, calibration=CALIB, progress=False)
    text = build_model_card(model).text
    assert "| Method | svd |" in text and "damping" not in text.split("| Method |")[1].splitlines()[0]
    assert "| Calibration data | none (plain SVD of the residual, no activations) |" in text
    assert "plain truncated SVD" in text and "eigenspace of the calibration activations" not in text
    model.peft_config["default"].fine_tuned = True  # trained since: the intro still says what it started from
    text = build_model_card(model).text
    assert "initialised as a low-rank adapter" in text and "plain truncated SVD" in text and "then fine-tuned" in text
    assert "eigenspace of the calibration activations" not in text


def test_model_card_compression_details_from_quantization_config(computed, tmp_path):
    _, model = computed
    with_quant = copy.deepcopy(model)
    with_quant.get_base_model().config.quantization_config = {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
    }  # fmt: skip
    card = build_model_card(with_quant, repo_id="me/x", ppl_before=30.0)
    assert {"gptq", "4-bit"} <= set(card.data.tags)
    assert "| Compression | GPTQ, 4-bit, group size 128 (sym=True, desc_act=False) |" in card.text
    assert "| Perplexity before → after | 30 → 21.25 on wikitext2 |" in card.text
    assert build_model_card(model, base_model="org/explicit").data.base_model == "org/explicit"
    local = copy.deepcopy(model)
    local.get_base_model().config._name_or_path = str(tmp_path)  # a local path is no Hub base_model
    card = build_model_card(local)
    assert card.data.base_model is None and f"| Compressed base model | `{tmp_path}` |" in card.text


#: A fresh interpreter that only gets HF_ENDPOINT & co. in its environment: pulls the adapter,
#: pushes it to a new repo, and reports the base fingerprint (stable across processes).
ENV_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    import peft_eora
    from peft import PeftModel
    from peft_eora.fingerprint import compute_fingerprint
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM
    args = json.loads(sys.argv[1])
    base = LlamaForCausalLM.from_pretrained(args["base"], dtype=torch.float32)
    digest = compute_fingerprint(base).digest
    model = PeftModel.from_pretrained(base, args["repo"]).eval()
    with torch.no_grad():
        save_file({"logits": model(load_file(args["input"])["input"]).logits.contiguous()}, args["output"])
    commit = model.push_to_hub(args["repo"] + "-copy")
    print(json.dumps({"digest": digest, "commit": commit.oid}))
    """
)
ENV_TEST = "test_hf_endpoint_alone_is_enough_in_a_fresh_process"


@pytest.fixture(scope="module", autouse=True)
def env_child(request, hub, computed, tmp_path_factory):
    """Pushes the adapter and starts the fresh process right away (it runs beside the other tests)."""
    if not any(item.originalname == ENV_TEST for item in request.session.items):
        yield None
        return
    quantized, model = computed
    work = tmp_path_factory.mktemp("env-child")
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_client_at(hub.url, str(work / "hf-cache"), monkeypatch)
        model.push_to_hub("test-user/eora-env")
    quantized.save_pretrained(work / "base")
    save_file({"input": INPUT}, work / "input.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_CACHE=str(work / "child-cache"), HF_TOKEN="hf_x")
    args = {
        "base": str(work / "base"),
        "repo": "test-user/eora-env",
        "input": str(work / "input.safetensors"),
        "output": str(work / "logits.safetensors"),
    }
    with open(work / "stdout.txt", "w") as out, open(work / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", ENV_CHILD, json.dumps(args)], stdout=out, stderr=err, env=env)
    yield proc, work
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_hf_endpoint_alone_is_enough_in_a_fresh_process(hub, computed, env_child):
    _, model = computed
    proc, work = env_child
    assert proc.wait(timeout=300) == 0, (work / "stderr.txt").read_text()[-3000:]
    report = json.loads((work / "stdout.txt").read_text().strip().splitlines()[-1])
    assert report["digest"] == model.peft_config["default"].base_fingerprint["digest"]
    assert (load_file(work / "logits.safetensors")["logits"] - logits(model)).abs().max().item() <= 1e-5
    assert report["commit"] == hub.history("test-user/eora-env-copy")[0]
    assert hub.files("test-user/eora-env-copy")["adapter_model.safetensors"] == (
        hub.files("test-user/eora-env")["adapter_model.safetensors"]
    )
