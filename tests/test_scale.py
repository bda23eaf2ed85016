"""EoRA at scale (``peft_eora.walker``, ``peft_eora.checkpoint``): one forward per block, offload,
device bookkeeping, resumable runs (SIGKILL mid-run), bad input at scale, the scale benchmark."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_eora import CalibrationConfig, EoRAConfig, initialize_eora_weights
from peft_eora.checkpoint import CheckpointMismatchError
from peft_eora.original import ModelMismatchError, OriginalWeights
from peft_eora.walker import BlockWalker, PausingRunner, device_of

REPO = Path(__file__).resolve().parents[1]

HAS_GPU = torch.cuda.is_available()


def _factors(pm) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in pm.named_parameters() if "lora_" in n}


def _products(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: f[n.replace("lora_A", "lora_B")] @ f[n] for n in f if "lora_A" in n}


def _eora(quantized, original, calib, **kwargs):
    config = {"damping": kwargs.pop("damping", 0.01), **kwargs.pop("config", {})}
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, **config))
    stats = initialize_eora_weights(pm, original_model=original, calibration=calib, batch_size=4, progress=False,
                                    **kwargs)
    return pm, stats


# ---------------------------------------------------------------------------------------------
# the walker


def test_pausing_runner_runs_batches_in_order_and_parks():
    log = []
    runner: PausingRunner

    def fn(i):
        log.append(("a", i))
        runner.pause()
        log.append(("b", i))
        return i * 10

    runner = PausingRunner(3, fn)
    assert runner.step() is True
    assert log == [("a", 0), ("a", 1), ("a", 2)]  # every batch parked at the same point, in order
    assert runner.step() is False
    assert log[3:] == [("b", 0), ("b", 1), ("b", 2)]
    assert runner.results() == [0, 10, 20]


def test_pausing_runner_hands_errors_to_the_caller_and_unwinds():
    runner: PausingRunner

    def fn(i):
        runner.pause()
        if i == 1:
            raise ValueError("boom in batch 1")
        return i

    runner = PausingRunner(3, fn)
    runner.step()
    with pytest.raises(ValueError, match="boom in batch 1"):
        runner.step()
    assert all(not t.is_alive() for t in runner._threads) or runner._threads == []


def test_one_block_forward_per_batch(tiny_llama, calib_ids):
    """Sequential compensation runs each block once per calibration batch (plus one probe), not once per group."""
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
    blocks = pm.base_model.model.model.layers
    calls = [0] * len(blocks)
    # counted on the attention, which only a real forward of the block computes: the capture of the blocks'
    # arguments calls recorders in their place
    handles = [b.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks)]
    initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False,
                            execution_device=None)
    for h in handles:
        h.remove()
    batches = len(calib_ids) // 4
    # per block: one probe forward (module order) + one forward per batch; the capture computes no block
    assert calls == [batches + 1] * len(blocks)


def test_the_module_order_probe_runs_one_calibration_row(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
    rows: list[int] = []
    block = pm.base_model.model.model.layers[0]
    handle = block.register_forward_pre_hook(lambda _m, args, kw: rows.append((args[0] if args else kw["hidden_states"]).shape[0]),
                                             with_kwargs=True)
    initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False,
                            execution_device=None)
    handle.remove()
    n = len(calib_ids) // 4  # the input capture (stopped at block 0), the probe, the forwards
    assert rows == [4] * n + [1] + [4] * n  # the probe costs a row, not a batch


def test_parked_and_per_group_forwards_give_identical_factors(tiny_llama, calib_ids, monkeypatch):
    original, quantized = tiny_llama
    parked, _ = _eora(quantized, original, calib_ids, execution_device=None)
    from peft_eora import walker

    orig_run = walker.BlockVisit.run

    def per_group(self, *args, **kwargs):
        kwargs["park"] = False
        return orig_run(self, *args, **kwargs)

    monkeypatch.setattr(walker.BlockVisit, "run", per_group)
    regrouped, _ = _eora(quantized, original, calib_ids, execution_device=None)
    a, b = _factors(parked), _factors(regrouped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_covariance_stays_float32_under_autocast():
    """Half-precision forwards (forward_dtype) run under autocast; XᵀX must not be demoted with them."""
    from peft_eora.compensate import accumulate_gram

    x = torch.randn(257, 48, dtype=torch.float64)
    H = torch.zeros(48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        accumulate_gram(H, x.float())
    ref = (x.T @ x).float()
    assert H.dtype == torch.float32
    assert ((H - ref).norm() / ref.norm()).item() < 1e-6  # bfloat16 products would be ~1e-3 off


@pytest.mark.parametrize("n", [48, 600, 1100])
def test_covariance_panels_sum_xtx_symmetrically(n, monkeypatch):
    """Wide inputs accumulate the upper triangle in row panels and mirror it: the float64 XᵀX to
    float32 accuracy over several batches (a sliced, non-contiguous input among them), exactly symmetric."""
    import peft_eora.compensate as comp

    monkeypatch.setattr(comp, "GRAM_PANEL", 128)
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(rows, n + 3, dtype=torch.float64, generator=g)[:, 2:-1] for rows in (70, 129, 5)]
    H = torch.zeros(n, n)
    for x in xs:
        comp.accumulate_gram(H, x.float())
    ref = sum(x.T @ x for x in xs)
    assert torch.equal(H, H.T)
    assert ((H.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_forward_dtype_bfloat16_runs_the_blocks_in_bfloat16_and_stays_close(tiny_llama, calib_ids):
    original, quantized = tiny_llama
    seen: list[torch.dtype] = []
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01, forward_dtype="bfloat16"))
    o_proj = pm.base_model.model.model.layers[1].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False,
                            execution_device=None)
    handle.remove()
    assert torch.bfloat16 in seen  # the attention output fed to o_proj came out of bfloat16 matmuls
    plain, _ = _eora(quantized, original, calib_ids, execution_device=None)
    pa, pb = _products(_factors(plain)), _products(_factors(pm))
    rel = max(((pa[k] - pb[k]).norm() / pa[k].norm()).item() for k in pa)
    assert 0 < rel < 0.05, rel
    assert "forward_dtype" not in pm.peft_config["default"].to_dict()  # a run choice: never saved


def test_forward_dtype_auto_resolves_only_where_it_is_a_plain_speed_up(tiny_llama):
    from peft_eora.model import resolve_forward_dtype

    original, _ = tiny_llama
    cpu_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert resolve_forward_dtype(original, "auto", None) == (torch.bfloat16 if cpu_bf16 else None)
    assert resolve_forward_dtype(copy.deepcopy(original).to(torch.bfloat16), "auto", None) is None  # already half
    assert resolve_forward_dtype(original, "model", None) is None
    assert resolve_forward_dtype(original, None, None) is None
    assert resolve_forward_dtype(original, "float16", None) == torch.float16
    with pytest.raises(ValueError, match="forward_dtype"):
        EoRAConfig(r=8, forward_dtype="int8")


def test_offloaded_model_gives_the_same_factors(tiny_llama, calib_ids, tmp_path):
    """A model dispatched by accelerate with blocks offloaded to the CPU and to disk (weights on
    'meta' until a forward loads them) computes the same factors as the plain model."""
    from accelerate import dispatch_model

    original, quantized = tiny_llama
    plain, _ = _eora(quantized, original, calib_ids, execution_device=None)
    model = copy.deepcopy(quantized)
    layers = len(model.model.layers)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(layers)})
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"), main_device="cpu")
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    pm = get_peft_model(model, EoRAConfig(r=8, damping=0.01))
    initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False)
    pa, pb = _products(_factors(plain)), _products(_factors(pm))
    assert set(pa) == set(pb)
    assert max(((pa[k] - pb[k]).norm() / pa[k].norm()).item() for k in pa) <= 1e-6


def test_offloaded_gptq_model_gives_the_same_factors(tiny_gptq3_dir, tiny_original_dir, calib_ids, tmp_path):
    """A GPTQ model (gptqmodel's packed layers hold buffers, not parameters) dispatched by accelerate with a
    block on disk and ``offload_buffers=True`` (its packed weights on 'meta' until a forward loads them) gives
    the factors of the model kept in memory, bit for bit."""
    from accelerate import dispatch_model

    from peft_eora.quantize.loading import load_quantized

    plain, _ = _eora(load_quantized(tiny_gptq3_dir), str(tiny_original_dir), calib_ids, damping="auto")
    model = load_quantized(tiny_gptq3_dir)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"), main_device="cpu",
                           offload_buffers=True)
    assert model.model.layers[1].mlp.down_proj.qweight.device.type == "meta"
    offloaded = get_peft_model(model, EoRAConfig(r=8, damping="auto"))  # no copy: accelerate's hooks do not survive one
    initialize_eora_weights(offloaded, str(tiny_original_dir), calib_ids, batch_size=4, progress=False)
    a, b = _factors(plain), _factors(offloaded)
    assert set(a) == set(b) and len(a) == 2 * 7 * 2
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_walker_moves_each_blocks_inputs_to_that_blocks_device(tiny_llama, calib_ids, monkeypatch):
    """Device bookkeeping of multi-device models, checked on CPU: the walker asks every block where it
    computes (accelerate's execution device) and hands it its inputs there."""
    from peft_eora import walker as walker_mod

    _, quantized = tiny_llama
    model = quantized.eval()
    blocks = model.model.layers
    fake = {id(b): torch.device("cuda", i % 2) for i, b in enumerate(blocks)}
    moved: list[torch.device] = []
    real_device_of = walker_mod.device_of

    def fake_device_of(module):
        return fake.get(id(module), real_device_of(module))

    def fake_to_device(obj, device):
        moved.append(device)
        return obj

    monkeypatch.setattr(walker_mod, "device_of", fake_device_of)
    monkeypatch.setattr(walker_mod, "to_device", fake_to_device)
    w = BlockWalker(model, blocks, [{"input_ids": calib_ids[:2]}, {"input_ids": calib_ids[2:4]}])
    inputs = w.first_inputs()
    seen, start = [], len(moved)
    for visit in w.visits(len(blocks) - 1, 0, inputs):
        seen.append((visit.index, visit.device))
        assert moved[start:] and all(d == visit.device for d in moved[start:])  # hidden + kwargs of each batch
        start = len(moved)
    assert seen == [(i, torch.device("cuda", i % 2)) for i in range(len(blocks))]


def test_blocks_the_capture_does_not_reach_take_the_last_reached_blocks_arguments():
    """A model whose loop fails on what the recorders hand on (here after block 1) leaves the later blocks'
    arguments unread: they take block 1's, as a walk from block 0 would hand on, so that a walk resumed at
    block 2 computes with the same arguments as an uninterrupted one (block 0's before)."""
    from peft_eora.walker import capture_inputs

    class Block(torch.nn.Module):
        def forward(self, hidden, mask=None):
            return (hidden + mask,)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Block() for _ in range(4))

        def forward(self, input_ids, use_cache=False):
            h = input_ids.float()[..., None]
            for i, block in enumerate(self.layers):
                out = block(h, mask=torch.full((1,), float(i)))
                h = out[0] if i == 0 else out.hidden  # fails on the tensor a recorder hands on from block 1
            return h

    model = Toy()
    inputs, kwargs_of = capture_inputs(model, model.layers, [{"input_ids": torch.ones(1, 3)}])
    assert len(inputs) == 1
    masks = [row[0]["mask"].item() for row in kwargs_of]
    assert masks == [0.0, 1.0, 1.0, 1.0]


def test_device_of_reads_accelerate_execution_devices():
    class Hook:
        def __init__(self, dev):
            self.execution_device = dev

    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert device_of(m) == torch.device("cpu")
    m[0]._hf_hook = Hook(1)
    assert device_of(m) == torch.device("cuda", 1)
    m._hf_hook = Hook("cuda:0")
    assert device_of(m) == torch.device("cuda", 0)


# ---------------------------------------------------------------------------------------------
# resumable runs


def test_checkpoint_resume_installs_saved_blocks_without_recomputing(tiny_llama, calib_ids, tmp_path):
    original, quantized = tiny_llama
    full, _ = _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["done"] == len(quantized.model.layers) - 1
    assert sorted(p.name for p in (tmp_path / "run").glob("inputs_*")) == []  # committed inputs are dropped
    # a second run on the finished folder only reloads (and drops a write a killed run left unfinished)
    stray = tmp_path / "run" / ".block_0001.safetensors.4242.tmp"
    stray.write_bytes(b"partial")
    again, stats = _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"), resume=True)
    assert not stray.exists()
    a, b = _factors(full), _factors(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(stats.modules) == 7 * len(quantized.model.layers)


def test_checkpoint_refuses_other_runs_and_unrequested_resumes(tiny_llama, calib_ids, tmp_path):
    original, quantized = tiny_llama
    _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(FileExistsError, match="resume"):
        _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(CheckpointMismatchError, match="damping"):
        _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"), resume=True, damping=0.1)
    with pytest.raises(CheckpointMismatchError, match="calibration"):
        _eora(quantized, original, calib_ids[:8], checkpoint_dir=str(tmp_path / "run"), resume=True)
    # lora_B is stored over the layer's scaling, and adapter_bits decides the rounding: both must match
    with pytest.raises(CheckpointMismatchError, match="scalings"):
        _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"), resume=True,
              config={"lora_alpha": 16})
    with pytest.raises(CheckpointMismatchError, match="adapter_bits"):
        _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"), resume=True,
              config={"adapter_bits": 8})
    # the same base in another precision (one fingerprint): its finished float32 blocks must not continue in bf16
    with pytest.raises(CheckpointMismatchError, match="dtypes"):
        _eora(copy.deepcopy(quantized).to(torch.bfloat16), original, calib_ids, checkpoint_dir=str(tmp_path / "run"),
              resume=True)
    # a folder of the earlier checkpoint format (its signature did not cover the original): refused as such
    manifest = tmp_path / "run" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 1}))
    with pytest.raises(CheckpointMismatchError, match="format 1"):
        _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"), resume=True)
    from peft_eora.checkpoint import FORMAT_VERSION

    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": FORMAT_VERSION}))
    # another original of the same architecture: its finished blocks must not be kept (a review found them kept)
    from tiny_models import tiny_llama_pair

    with pytest.raises(CheckpointMismatchError, match="original"):
        _eora(quantized, tiny_llama_pair(seed=1)[0], calib_ids, checkpoint_dir=str(tmp_path / "run"), resume=True)
    # the same tokens cut into other batches: the saved block inputs are per batch
    with pytest.raises(CheckpointMismatchError, match="calibration"):
        _eora(quantized, original, calib_ids.reshape(-1, calib_ids.shape[1] // 2), checkpoint_dir=str(tmp_path / "run"),
              resume=True)


def test_a_run_that_finished_no_block_does_not_block_its_folder(tiny_llama, calib_ids, tmp_path):
    """A run failing before its first block was done (a rank too large, out of memory in block 0) left a manifest
    whose signature refused the corrected run, with and without resume: nothing of it is kept now."""
    original, quantized = tiny_llama
    too_wide = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=4096, damping=0.01))
    with pytest.raises(ValueError, match="rank"):
        initialize_eora_weights(too_wide, original_model=original, calibration=calib_ids, batch_size=4,
                                progress=False, checkpoint_dir=str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["done"] == -1
    fresh, _ = _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"))  # r=8: starts afresh
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["done"] == len(quantized.model.layers) - 1
    plain, _ = _eora(quantized, original, calib_ids)
    a, b = _factors(plain), _factors(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # starting afresh is for a run that is over: a live one (its block 0 or spectrum pass running, nothing committed
    # yet) holds the folder's lock, and a second run there is refused rather than taking its files over
    from peft_eora.checkpoint import Checkpoint

    live = Checkpoint(tmp_path / "live", {"run": "a"}, resume=False)
    live.save_plan({"ranks": {}})
    with pytest.raises(FileExistsError, match="Another run is using the checkpoint folder"):
        Checkpoint(tmp_path / "live", {"run": "b"}, resume=False)
    assert (tmp_path / "live" / "rank_plan.json").is_file()
    live.close()
    Checkpoint(tmp_path / "live", {"run": "b"}, resume=False).close()  # over: the folder is free
    # a refused run lets the lock go at once, though its exception (and so the object) is kept, as a notebook keeps
    # the last one: the resume that follows is not refused as "another run"
    done = Checkpoint(tmp_path / "done", {"run": "a"}, resume=False)
    done.commit(0)
    done.close()
    with pytest.raises(FileExistsError, match="Resume it") as kept:
        Checkpoint(tmp_path / "done", {"run": "a"}, resume=False)
    resumed = Checkpoint(tmp_path / "done", {"run": "a"}, resume=True)
    assert resumed.done == 0 and kept.value is not None
    resumed.close()


def test_a_resumed_rank_allocated_run_reuses_its_plan(tiny_llama, calib_ids, tmp_path, monkeypatch):
    """The spectrum pass (one more walk over every block) ran again on resume: the plan is now kept in the folder."""
    from peft_eora import compensate as comp
    from peft_eora.checkpoint import Checkpoint

    original, quantized = tiny_llama
    allocated = {"rank_allocation": "spectrum", "rank_budget": 3000}
    straight, _ = _eora(quantized, original, calib_ids, config=allocated)
    commit = Checkpoint.commit

    def stop_after_block_0(self, index):
        commit(self, index)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "commit", stop_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        _eora(quantized, original, calib_ids, config=allocated, checkpoint_dir=str(tmp_path / "run"))
    monkeypatch.setattr(Checkpoint, "commit", commit)
    assert (tmp_path / "run" / "rank_plan.json").is_file()

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the spectrum pass ran again")

    monkeypatch.setattr(comp, "collect_spectra", no_second_pass)
    resumed, _ = _eora(quantized, original, calib_ids, config=allocated, checkpoint_dir=str(tmp_path / "run"),
                       resume=True)
    a, b = _factors(straight), _factors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.peft_config["default"].rank_pattern == resumed.peft_config["default"].rank_pattern
    assert len(set(straight.peft_config["default"].rank_pattern.values())) > 1  # allocated indeed
    # recomputed against its finished folder, on the model whose layers now hold the allocated ranks (the signature
    # read those ranks, and refused it)
    initialize_eora_weights(resumed, original_model=original, calibration=calib_ids, batch_size=4, progress=False,
                            checkpoint_dir=str(tmp_path / "run"), resume=True)
    c = _factors(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_layer_called_twice_in_one_forward_is_collected_once_on_both_walks(calib_ids, monkeypatch):
    """A target layer run twice in one forward: its first input counts, and the parked walk (one forward per batch,
    paused per group: the CPU default) pauses once for it, as the per-group walk collects it once. Both give the
    same factors. The parked walk used to pause at every call, run ahead of its groups and stop with an error."""
    from transformers.models.llama import modeling_llama

    from peft_eora import walker
    from tiny_models import tiny_llama_pair

    def forward(self, x):
        self.up_proj(x)  # an extra call, its result unused
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)
    original, quantized = tiny_llama_pair(layers=2)
    parked, stats = _eora(quantized, original, calib_ids[:8], execution_device=None)
    run = walker.BlockVisit.run
    monkeypatch.setattr(walker.BlockVisit, "run", lambda self, *a, **k: run(self, *a, **{**k, "park": False}))
    per_group, _ = _eora(quantized, original, calib_ids[:8], execution_device=None)
    assert len(stats.modules) == 14
    a, b = _factors(parked), _factors(per_group)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from tiny_models import tiny_llama_pair
    from peft import get_peft_model
    from peft_eora import EoRAConfig, initialize_eora_weights
    from peft_eora import checkpoint as ck
    original, quantized = tiny_llama_pair(layers=6)
    commit = ck.Checkpoint.commit
    def slow_commit(self, index):  # give the parent time to kill us between blocks (or mid-write)
        commit(self, index)
        time.sleep(0.4)
    ck.Checkpoint.commit = slow_commit
    calib = torch.randint(0, 49152, (16, 64), generator=torch.Generator().manual_seed(0))
    pm = get_peft_model(quantized, EoRAConfig(r=8, damping=0.01))
    initialize_eora_weights(pm, original_model=original, calibration=calib, batch_size=4, progress=False,
                            checkpoint_dir={ckpt!r}, resume=True)
    print("finished")
""")


@pytest.mark.slow
def test_plain_svd_leaves_no_checkpoint_to_block_the_next_run(tiny_llama, calib_ids, tmp_path):
    # the baseline walks no blocks: a manifest written for it only made the next (EoRA) run in the folder fail
    original, quantized = tiny_llama
    _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"), config={"method": "svd"})
    assert not (tmp_path / "run" / "manifest.json").exists()
    _eora(quantized, original, calib_ids, checkpoint_dir=str(tmp_path / "run"))
    assert (tmp_path / "run" / "manifest.json").exists()


def test_sigkilled_run_resumes_to_the_uninterrupted_factors(tmp_path):
    from tiny_models import tiny_llama_pair

    ckpt = tmp_path / "run"
    script = tmp_path / "run_eora.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), ckpt=str(ckpt)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        manifest = ckpt / "manifest.json"
        if manifest.exists():
            try:
                done = json.loads(manifest.read_text())["done"]
            except ValueError:
                done = -1
            if done >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = done
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None, proc.stderr.read().decode()[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((ckpt / "manifest.json").read_text())["done"] < 5  # it really stopped mid-run
    # resume in this process, and compare with an uninterrupted run
    original, quantized = tiny_llama_pair(layers=6)
    calib = torch.randint(0, 49152, (16, 64), generator=torch.Generator().manual_seed(0))
    resumed, _ = _eora(quantized, original, calib, checkpoint_dir=str(ckpt), resume=True)
    original2, quantized2 = tiny_llama_pair(layers=6)
    straight, _ = _eora(quantized2, original2, calib)
    a, b = _factors(straight), _factors(resumed)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------
# bad input at scale


def test_out_of_memory_names_the_block_and_leaves_nothing_half_written(tiny_llama, calib_ids, monkeypatch):
    from peft_eora import compensate as comp

    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
    real = comp.accumulate_gram
    calls = [0]

    def oom_on_block_1(H, x):
        calls[0] += 1
        if calls[0] > 5 * 4 * 1:  # 5 groups (q/k, v, o, gate/up, down) x 4 batches of block 0, then fail
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real(H, x)

    monkeypatch.setattr(comp, "accumulate_gram", oom_on_block_1)
    with pytest.raises(comp.EoRAOutOfMemoryError, match=r"block 1 .*batch size.*calibration tokens.*CPU.*--offload"):
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False)
    assert all(float(p.abs().sum()) == 0 for n, p in pm.named_parameters() if "lora_B" in n)
    # the rank-allocation spectrum pass: the same one error (it was a bare OutOfMemoryError)
    calls[0] = 0
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01, rank_allocation="spectrum"))
    with pytest.raises(comp.EoRAOutOfMemoryError, match=r"block 1 \(rank-allocation spectrum pass\)"):
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False)
    monkeypatch.setattr(comp, "accumulate_gram", real)
    # a block that fails to move (offload) is named, not the block before it
    from peft_eora.walker import BlockWalker

    placed = BlockWalker._placed

    def no_room_for_block_1(self, block):
        if block is self.blocks[1]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return placed(self, block)

    monkeypatch.setattr(BlockWalker, "_placed", no_room_for_block_1)
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
    with pytest.raises(comp.EoRAOutOfMemoryError, match=r"decoder block 1 "):
        initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False)
    monkeypatch.setattr(BlockWalker, "_placed", placed)
    # each module's own train/eval mode is kept (model.train(flag) set one flag for all of them)
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
    pm.eval()
    pm.base_model.model.model.layers[0].mlp.train()
    modes = {n: m.training for n, m in pm.named_modules()}
    initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False)
    assert {n: m.training for n, m in pm.named_modules()} == modes


def _save_sharded(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    path.mkdir(parents=True)
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(path / fname))
        weight_map.update({k: fname for k in ks})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_original_with_a_missing_shard_or_tensor_is_refused_before_compute(tiny_llama, calib_ids, tmp_path):
    original, quantized = tiny_llama
    good = tmp_path / "good"
    _save_sharded(original, good)
    assert OriginalWeights.open(good).shape("model.layers.0.mlp.up_proj") is not None
    missing_shard = tmp_path / "missing_shard"
    _save_sharded(original, missing_shard)
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelMismatchError, match=r"missing shard.*model-00002-of-00002"):
        OriginalWeights.open(missing_shard)
    # a checkpoint storing fused projections (transformers splits them when loading some models): said so, with the
    # way that works (the original in memory), not "the two models do not match"
    from safetensors.torch import load_file as load_tensors, save_file as save_tensors

    fused = tmp_path / "fused"
    fused.mkdir()
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    prefix = "model.layers.0.mlp."
    state[prefix + "gate_up_proj.weight"] = torch.cat([state.pop(prefix + "gate_proj.weight"),
                                                       state.pop(prefix + "up_proj.weight")])
    save_tensors(state, str(fused / "model.safetensors"))
    assert load_tensors(str(fused / "model.safetensors")).keys() == state.keys()
    shape = tuple(original.model.layers[0].mlp.gate_proj.weight.shape)
    with pytest.raises(ModelMismatchError, match=r"stores model\.layers\.0\.mlp\.gate_up_proj.*loaded in memory"):
        OriginalWeights.open(fused).check(prefix + "gate_proj", shape)
    # a shard passed for its folder: said so (it was a Hub repo-id validation error)
    with pytest.raises(ModelMismatchError, match=r"is a file, not a checkpoint folder\. Pass its folder"):
        OriginalWeights.open(good / "model-00001-of-00002.safetensors")
    lying_index = tmp_path / "lying_index"
    _save_sharded(original, lying_index)
    index = json.loads((lying_index / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (lying_index / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelMismatchError, match="no shard holds.*layers.9"):
        OriginalWeights.open(lying_index)
    # a missing tensor: refused with the module's name before any forward
    from safetensors.torch import load_file, save_file

    holey = tmp_path / "holey"
    _save_sharded(original, holey)
    shard = holey / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    victim = next(k for k in tensors if k.endswith("self_attn.q_proj.weight"))
    del tensors[victim]
    save_file(tensors, str(shard))
    index = json.loads((holey / "model.safetensors.index.json").read_text())
    del index["weight_map"][victim]
    (holey / "model.safetensors.index.json").write_text(json.dumps(index))
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8))
    blocks = pm.base_model.model.model.layers
    calls = [0]
    handle = blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with pytest.raises(ModelMismatchError, match=victim[: -len(".weight")].split("model.", 1)[-1]):
        initialize_eora_weights(pm, original_model=str(holey), calibration=calib_ids, batch_size=4, progress=False)
    handle.remove()
    assert calls[0] == 0


def test_original_weights_on_disk_are_read_ahead_with_the_same_factors(tiny_llama, calib_ids, tmp_path, monkeypatch):
    """A checkpoint on disk: each block's original weights are read in a background thread while the
    block before is computed (``OriginalWeights.prefetch``); the factors are bit-identical to reading
    them when needed (``PREFETCH`` off), nothing is left pending, and in-memory originals never read ahead."""
    import threading

    from peft_eora import original as original_mod

    original, quantized = tiny_llama
    _save_sharded(copy.deepcopy(original).to(torch.bfloat16), tmp_path / "orig")

    def opened() -> tuple[OriginalWeights, list[str]]:
        weights = OriginalWeights.open(tmp_path / "orig")
        threads: list[str] = []
        load = weights._loader

        def recording(key: str) -> torch.Tensor:
            if "norm" not in key:  # the norms are read once up front, by the original's check
                threads.append(threading.current_thread().name)
            return load(key)

        weights._loader = recording
        return weights, threads

    ahead, ahead_threads = opened()
    pm_ahead, _ = _eora(quantized, ahead, calib_ids)
    monkeypatch.setattr(original_mod, "PREFETCH", False)
    now, now_threads = opened()
    pm_now, _ = _eora(quantized, now, calib_ids)
    fa, fn = _factors(pm_ahead), _factors(pm_now)
    assert fa.keys() == fn.keys() and all(torch.equal(fa[k], fn[k]) for k in fa)
    targets = len(fa) // 2
    assert len(ahead_threads) == len(now_threads) == targets  # each weight read once
    assert all(t.startswith("peft_eora_original") for t in ahead_threads)
    assert not any(t.startswith("peft_eora_original") for t in now_threads)
    assert not ahead._pending and ahead._pool is None  # cancelled at the end
    # a read taken from the background: the stored bfloat16 values, as float32
    monkeypatch.setattr(original_mod, "PREFETCH", True)
    name = "model.layers.1.mlp.down_proj"
    ahead.prefetch([name])
    assert name in ahead._pending
    w = ahead.get(name)
    assert w.dtype == torch.float32 and name not in ahead._pending
    assert torch.equal(w, original.get_submodule(name).weight.detach().to(torch.bfloat16).float())
    ahead.cancel_prefetch()
    in_memory = OriginalWeights.open(original)
    in_memory.prefetch([name])
    assert not in_memory._pending


def _resident_kb(ptr: int) -> int | None:
    """Resident kB of this process's mapping holding address ``ptr`` (``/proc/self/smaps``), None
    where there is no such file."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= ptr < hi
        elif inside and line.startswith("Rss:"):
            return int(head[1])
    return None


def test_read_ahead_brings_the_bytes_in(tmp_path):
    """safetensors hands back a view of the memory-mapped file whose pages are read only when first
    touched; a read ahead touches them in its thread, so the later copy reads memory, not the disk."""
    from safetensors.torch import save_file

    save_file({"big.weight": torch.randn(2048, 1024).to(torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    ahead = OriginalWeights.open(tmp_path)
    ahead.prefetch(["big"])
    t = ahead._pending["big"].result()
    rss = _resident_kb(t.untyped_storage().data_ptr())
    if rss is None:
        pytest.skip("no /proc/self/smaps to read residency from")
    assert rss * 1024 >= 0.95 * t.numel() * t.element_size()
    ahead.cancel_prefetch()


# ---------------------------------------------------------------------------------------------
# the scale benchmark


def _run_benchmark(script: str, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """``benchmarks/<script> ARGS --out ...`` in a subprocess (the repository's ``src`` first): the
    process and its JSON (None where it wrote none)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=300)
        return proc, json.loads(out.read_text()) if out.exists() else None


def _smoke(script: str) -> dict:
    """``benchmarks/<script> --smoke``'s JSON."""
    proc, res = _run_benchmark(script, "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return res


def test_scale_benchmark_smoke():
    res = _smoke("scale.py")
    assert res["status"] == "ok" and res["seconds"] > 0
    assert {"block_forward", "covariance", "decomposition", "factors", "original_reads"} <= set(res["phases"])
    assert 0 < res["mean_relative_error"] < 1
    if sys.platform.startswith("linux"):  # the host high-water mark over the step
        assert 0 <= res["host_rise_gib"] < res["host_peak_gib"]


def test_scale_benchmark_profile_charges_operators_to_phases():
    """``scale.py --profile`` (a ``gpu_check.sh`` step): per phase of the walk, the operators with the
    most self time; with per-group forwards (the GPU's path) the block forwards' own operators."""
    proc, res = _run_benchmark("scale.py", "--smoke", "--profile", "--per-group-forwards")
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = res["profile"]["phases"]
    assert {"block_forward", "factors", "covariance"} <= set(phases)
    assert any(op["name"] == "aten::addmm_" for op in phases["covariance"]["operators"])  # XᵀX added into H
    assert any("eigh" in op["name"] or "cholesky" in op["name"] for p in ("factors", "decomposition")
               for op in phases.get(p, {}).get("operators", []))
    for v in phases.values():
        assert v["total_ms"] >= 0 and all(op["calls"] >= 1 and 0 <= op["share"] <= 1 for op in v["operators"])


def test_scale_benchmark_reports_the_phases_so_far_when_terminated(monkeypatch, benchmark_module):
    """``gpu_check.sh`` stops a step with SIGTERM at its time limit: ``scale.py`` then still reports
    the phases it measured, with ``status: "timed_out"``, instead of writing nothing."""
    scale = benchmark_module("scale")

    import peft_eora

    def terminated_midway(*args, times, **kwargs):
        with times.phase("block_forward"):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the step")

    monkeypatch.setattr(peft_eora, "initialize_eora_weights", terminated_midway)
    # a harmless handler of our own: if scale.py ever stopped installing its handler, SIGTERM would
    # reach this one (and the test fail on the AssertionError above) instead of killing pytest
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        before = signal.getsignal(signal.SIGTERM)
        res = scale.run(["--smoke"])
        assert signal.getsignal(signal.SIGTERM) is before  # the handler was put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert res["status"] == "timed_out" and res["mean_relative_error"] is None
    assert res["phases"]["block_forward"] > 0 and res["phase_counts"] == {"block_forward": 1}
    assert res["seconds"] < 30


def test_scale_benchmark_group_size_fits_the_shape():
    """The default group is 128, else the largest of 64/32 dividing every input width (the default
    SmolLM2-135M shape's 576 takes 64); a group dividing none is refused before anything is built."""
    shape = ["--hidden", "96", "--intermediate", "160", "--layers", "1", "--heads", "2", "--kv-heads", "1",
             "--vocab", "300", "--samples", "4", "--seq-len", "16", "--batch-size", "4", "--rank", "4", "--device", "cpu"]
    proc, res = _run_benchmark("scale.py", *shape)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert res["status"] == "ok" and res["group_size"] == 32
    proc, res = _run_benchmark("scale.py", *shape, "--group-size", "128")
    assert proc.returncode != 0 and res is None
    assert "--group-size 128 does not divide" in proc.stderr


def test_live_tensor_peak_counts_new_storages_until_freed(benchmark_module):
    """``bench_common.LiveTensorPeak`` (scale.py's ``tensor_peak_gib``): new storages count until freed;
    views and in-place results add nothing."""
    LiveTensorPeak = benchmark_module("bench_common").LiveTensorPeak
    outside = torch.zeros(500, 500)
    phase = ["first"]
    with LiveTensorPeak(label=lambda: phase[0]) as live:
        a = torch.zeros(1000, 1000)  # 4 MB
        b = a.double()  # 8 MB
        phase[0] = "second"
        c = b @ b  # 8 MB: 20 MB at once
        del b
        view = c[:2]
        c.add_(1)
        outside.mul_(2)  # in place on a tensor made before: not new
        del c  # its storage lives on in the view
    assert live.peak_bytes == 20_000_000 and live.current == 12_000_000
    assert live.by_label == {"first": 12_000_000, "second": 20_000_000}
    del view, a
    assert live.current == 0


def test_linalg_benchmark_smoke():
    """``benchmarks/linalg.py --smoke``: every timing it reports on the GPU is taken on small CPU sizes."""
    res = _smoke("linalg.py")
    for n in ("96", "160"):
        assert res[n]["eigh_fp64_s"] > 0 and res[n]["fit_lowbit_int4_r128_s"] > 0 and res[n]["gptq_round_int4_A_r128_s"] > 0
    # a ridge between the steep and the flat Gram matrix, from a random start and from their Ritz blocks
    cold, warm = res["160"]["gram_top_eigh_ridge_cold_products_steps"], res["160"]["gram_top_eigh_ridge_warm_products_steps"]
    assert res["160"]["gram_top_eigh_ridge_warm_fp64_s"] > 0 and 1 <= warm[1] and 1 <= cold[1]
    # and from the same blocks to the looser bound that only scores a candidate: no more products
    score = res["160"]["gram_top_eigh_ridge_warm_score_products_steps"]
    assert res["160"]["score_tol"] > 1e-10 and 1 <= score[1] and score[0] <= warm[0]


def test_linalg_benchmark_saves_each_size_as_it_finishes(benchmark_module):
    """A ``linalg.py`` run stopped by ``gpu_check.sh``'s time limit keeps the sizes it finished:
    ``probe`` hands its results to ``save`` after every size."""
    linalg = benchmark_module("linalg")

    saved: list[list[str]] = []
    linalg.probe([96, 160], 128, 256, torch.device("cpu"), 1, save=lambda res: saved.append(sorted(res)))
    assert saved == [["96", "device", "kv_gram"], ["160", "96", "device", "kv_gram"]]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the CPU high-water mark needs Linux /proc")
@pytest.mark.parametrize("damping,dead,bits", [("auto", 0, 16), ("0.01", 0, 8), ("auto", 4, 4)])
def test_factor_memory_benchmark_runs(damping, dead, bits):
    """``benchmarks/factor_memory.py`` (the factor step's peak memory over its inputs) on a small layer;
    with ``--adapter-bits`` the rounding's peak too."""
    proc, res = _run_benchmark("factor_memory.py", "--out-features", "96", "--in-features", "384", "--rank", "8",
                               "--damping", damping, "--dead-channels", str(dead), "--adapter-bits", str(bits))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert res["status"] == "ok" and res["finite"] and res["shape"] == [96, 384]
    assert res["peak_over_inputs_gib"] >= 0 and res["in_x_in_float64_units"] >= 0
    # at least the float64 copy the factor step factorises (384² × 8 bytes) is counted, never more than
    # a few such matrices and the residual's float64 copies
    assert 1 <= res["tensor_in_x_in_float64_units"] <= 8
    assert res["dead_channels"] == dead and res["adapter_bits"] == bits
    phases = res["peak_by_phase_gib"]
    assert phases["factors"] > 0 and (bits == 16) == ("round" not in phases) == (res["round_seconds"] is None)


# ---------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("damping", [0.01, "auto"])
def test_offload_to_gpu_matches_the_cpu_run(tiny_llama, calib_ids, damping):
    """The model stays on the CPU and its blocks visit the GPU: same factors as computing on the CPU
    (at ``auto`` — ridge scoring, ``gram_refit`` and its statistics on the device — wherever the two
    runs chose the same ridge; round-off may tip a near-tie)."""
    original, quantized = tiny_llama
    cpu_run, cpu_stats = _eora(quantized, original, calib_ids, damping=damping, execution_device=None)
    gpu_run, gpu_stats = _eora(quantized, original, calib_ids, damping=damping, execution_device="cuda")
    assert all(p.device.type == "cpu" for p in gpu_run.parameters())  # blocks went back home
    pa, pb = _products(_factors(cpu_run)), _products(_factors(gpu_run))
    same = {m.name for m, g in zip(cpu_stats.modules, gpu_stats.modules) if m.damping == g.damping}
    assert len(same) >= 0.75 * len(cpu_stats.modules)
    assert max(((pa[k] - pb[k]).norm() / pa[k].norm()).item() for k in pa if any(f"{n}.lora_A" in k for n in same)) <= 1e-3
    for m in gpu_stats.modules:
        assert math.isfinite(m.error_after) and m.error_after <= m.error_before


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_covariance_accumulates_in_place(dtype):
    """On CUDA, ``H += xᵀx`` from half-precision ``x`` runs in float32 into ``H`` itself (no n × n
    temporary where torch allows it): the float64 sum of the same half values, to float32 accuracy,
    over several batches; no allocation the size of ``H`` per batch where the in-place form ran."""
    import peft_eora.compensate as comp

    n = 1024
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(rows, n, generator=g).to(dtype).cuda() for rows in (300, 513, 7)]
    H = torch.zeros(n, n, device="cuda")
    comp.accumulate_gram(H, xs[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for x in xs[1:]:
        comp.accumulate_gram(H, x)
    torch.cuda.synchronize()
    ref = sum(x.double().T @ x.double() for x in xs)
    assert ((H.double() - ref).norm() / ref.norm()).item() < 1e-6
    if comp._HALF_GRAM_IN_PLACE[0]:
        assert torch.cuda.max_memory_allocated() - base < n * n * 4  # cuBLAS workspace aside, no n × n
    print(f"in-place half-precision XᵀX: {comp._HALF_GRAM_IN_PLACE[0]}, half products: {comp._HALF_GRAM[0]}")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_dispatched_by_accelerate_match_one_gpu(tiny_llama, calib_ids):
    from accelerate import dispatch_model

    original, quantized = tiny_llama
    one, _ = _eora(copy.deepcopy(quantized).cuda(), original, calib_ids, execution_device=None)
    model = copy.deepcopy(quantized)
    layers = len(model.model.layers)
    device_map = {"model.embed_tokens": 0, "model.norm": 1, "model.rotary_emb": 0, "lm_head": 1}
    device_map.update({f"model.layers.{i}": (0 if i < layers // 2 else 1) for i in range(layers)})
    model = dispatch_model(model, device_map=device_map)
    two, _ = _eora(model, original, calib_ids, execution_device=None)
    pa, pb = _products(_factors(one)), _products(_factors(two))
    assert max(((pa[k] - pb[k]).norm() / pa[k].norm()).item() for k in pa) <= 1e-4


def test_kernel_benchmark_smoke_and_goals(benchmark_module):
    """``benchmarks/kernel.py --smoke`` runs its layer rows and the end-to-end decode on CPU, and its
    goal table turns measured rows into the issue's ratios (synthetic GPU-like rows)."""
    res = _smoke("kernel.py")
    assert res["status"] == "ok" and res["e2e"]["status"] == "ok" and len(res["layers"]) == 4
    for row in res["layers"]:
        assert row["fused_rel_err_vs_torch"] < 1e-4
        assert all(row["timings_us"][k] > 0 for k in ("base", "unfused", "fused", "fused_int8"))
    kernel = benchmark_module("kernel")
    us1 = dict(fp16_linear=13.0, int4_tinygemm=7.0, base=9.0, unfused=22.0, fused=10.0, fused_v3=11.0,
               fused_lora_in_epilogue=12.0, fused_triton=14.0, base_triton=12.0, fused_triton_default=21.0)
    row1 = dict(shape="4096x4096", bits=4, rank=128, batch=1, timings_us=us1, bandwidth_fraction_fused=0.5)
    row16 = dict(shape="4096x4096", bits=4, rank=128, batch=16, timings_us=dict(fused=14.0, fp16_linear=13.0))
    g = kernel.goals([row1, row16])
    b1 = g["batch1_r128"]["4096x4096_b4"]
    assert b1["fused_over_int4"] == pytest.approx(10 / 7) and not b1["met"]["fused_le_1_25x_int4"]
    assert b1["met"]["ge_1_3x_faster_than_unfused"] and b1["v3_over_tuned_fused"] == pytest.approx(1.1)
    assert b1["v2_expand_over_v3"] == pytest.approx(12 / 11)
    assert g["batch4_16_r128"]["4096x4096_b4_M16"]["fused_over_batch1"] == pytest.approx(1.4)
    tri = g["triton"]["4096x4096_b4_M1"]
    assert tri["met"] and tri["default_tiling_over_tuned"] == pytest.approx(1.5)


def test_run_choices_hold_for_their_call_and_the_sources_are_recorded(tiny_llama, calib_ids, tokenizer, tmp_path):
    """checkpoint_dir/resume/execution_device/forward_dtype given to initialize_eora_weights stayed in the config: a
    second call with other data was refused as a resume of the first's folder, with no argument to clear it. And a
    path and a CalibrationConfig given to the call were not recorded (the card said "token batches")."""
    original, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), EoRAConfig(r=8, damping=0.01))
    initialize_eora_weights(pm, original_model=original, calibration=calib_ids, batch_size=4, progress=False,
                            checkpoint_dir=str(tmp_path / "run"), forward_dtype="bfloat16")
    config = pm.peft_config["default"]
    assert config.checkpoint_dir is None and config.forward_dtype is None and config.resume is False
    initialize_eora_weights(pm, original_model=original, calibration=calib_ids[:, :-1], batch_size=4, progress=False)
    original.save_pretrained(tmp_path / "orig")
    calibration = CalibrationConfig("builtin:c4", num_samples=2, seq_len=16)
    initialize_eora_weights(pm, original_model=tmp_path / "orig", calibration=calibration, tokenizer=tokenizer,
                            batch_size=4, progress=False)
    assert config.original_model == str(tmp_path / "orig") and config.calibration == calibration



def test_a_token_id_column_needs_no_tokenizer_and_text_says_what_to_pass(tiny_llama, tmp_path):
    """A CalibrationConfig over a column of token-id lists with an in-memory original asked for a tokenizer it never
    used; text with no tokenizer to be found is one error naming both ways to give one."""
    from peft_eora.calibration import CalibrationError

    original, quantized = tiny_llama
    ids = tmp_path / "ids.jsonl"
    ids.write_text("".join(json.dumps({"ids": [(7 * i + j) % 900 + 3 for j in range(40)]}) + "\n" for i in range(8)))
    pm, stats = _eora(quantized, original, CalibrationConfig(str(ids), column="ids", num_samples=4, seq_len=16))
    assert stats.tokens == 64 and len(stats.modules) > 0
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(8)))
    with pytest.raises(CalibrationError, match=r"holds text but no tokenizer was given or found: set "
                                               r"CalibrationConfig\(tokenizer=\.\.\.\), or pass tokenizer="):
        _eora(quantized, original, CalibrationConfig(str(text), num_samples=2, seq_len=8))
