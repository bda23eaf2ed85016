"""``peft_eora.fused.fuse/unfuse`` on a real PEFT model over gptqmodel ``TorchLinear`` bases.

Fused and unfused outputs are compared on CPU through the torch path (and the Triton path in
the interpreter). Stated tolerance (documented in ``peft_eora.fused``): max |fused − unfused|
≤ 1e-3·max|y| for float32 activations, ≤ 1e-2·max|y| for float16.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("gptqmodel", reason="gptqmodel provides the GPTQ base layers PEFT wraps")
from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.gptq import GPTQLoraLinear  # noqa: E402

from peft_eora.fused import FusedGPTQLoraLinear, base_layer_reason, fuse, fused_modules, unfuse  # noqa: E402
from peft_eora.kernels.reference import pack_cols, pack_rows, trivial_g_idx  # noqa: E402

F32_TOL = 1e-3
F16_TOL = 1e-2


def _triton_cpu() -> bool:
    if torch.cuda.is_available():
        return False
    try:
        from peft_eora.kernels.triton_gptq_lora import interpreter_active, interpreter_problem
    except Exception:
        return False
    return interpreter_active() and interpreter_problem() is None


def gptq_layer(k: int, n: int, bits: int, group_size: int, act_order: bool, bias: bool, seed: int) -> TorchLinear:
    """A gptqmodel TorchLinear holding random packed codes (what a loaded checkpoint looks like in memory)."""
    gen = torch.Generator().manual_seed(seed)
    m = TorchLinear(bits=bits, group_size=group_size, sym=False, desc_act=act_order, in_features=k, out_features=n,
                    bias=bias).eval()
    groups = math.ceil(k / group_size)
    m.qweight.copy_(pack_rows(torch.randint(0, 2**bits, (k, n), generator=gen), bits))
    m.qzeros.copy_(pack_cols(torch.randint(0, 2**bits, (groups, n), generator=gen), bits))
    m.scales.copy_((torch.rand(groups, n, generator=gen) * 0.02 + 0.002).half())
    g = trivial_g_idx(k, group_size)
    if act_order:
        g = g[torch.randperm(k, generator=gen)]
    m.g_idx.copy_(g)
    if bias:
        m.bias.copy_(torch.randn(n, generator=gen).half())
    return m


class TinyBlock(nn.Module):
    """norm → q (4-bit, bias) → act → down (3-bit, act-order) → plus an unquantized lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(128)
        self.q = gptq_layer(128, 256, bits=4, group_size=32, act_order=False, bias=True, seed=1)
        self.down = gptq_layer(256, 128, bits=3, group_size=64, act_order=True, bias=False, seed=2)
        self.lm_head = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.down(torch.nn.functional.silu(self.q(self.norm(x)))))


def peft_model(r: int = 8, seed: int = 0, **lora_kwargs):
    torch.manual_seed(seed)
    model = TinyBlock()
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q", "down", "lm_head"], init_lora_weights=False,
                     **lora_kwargs)
    pm = get_peft_model(model, cfg).eval()
    with torch.no_grad():  # EoRA-like non-zero factors of a realistic scale
        for mod in pm.modules():
            if isinstance(mod, GPTQLoraLinear):
                for name in mod.lora_B:
                    mod.lora_B[name].weight.normal_(0.0, 0.05)
    return pm


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_peft_wraps_torchlinear_with_gptq_lora_layer():
    pm = peft_model()
    inner = pm.base_model.model
    assert isinstance(inner.q, GPTQLoraLinear) and isinstance(inner.down, GPTQLoraLinear)
    assert base_layer_reason(inner.q.get_base_layer()) is None
    assert "nor a plain-GPTQ gptqmodel module" in base_layer_reason(nn.Linear(4, 4))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32_TOL), (torch.float16, F16_TOL)])
def test_fused_matches_unfused_torch_path(dtype, tol):
    pm = peft_model()
    if dtype != torch.float32:
        pm = pm.to(dtype)
    x = torch.randn(2, 3, 128).to(dtype)
    with torch.no_grad():
        ref = pm(x)
        report = fuse(pm, backend="torch")
        assert sorted(report.fused) == ["base_model.model.down", "base_model.model.q"]
        assert report.skipped == {}  # lm_head is a plain LoRA Linear: not a candidate at all
        out = pm(x)
    assert out.dtype == ref.dtype
    err = rel_err(out, ref)
    assert err <= tol, err
    q = pm.base_model.model.q
    assert isinstance(q, FusedGPTQLoraLinear) and q._fused_cache


def test_a_layer_first_called_inside_graph_capture_keeps_peft_forward_there(monkeypatch, caplog):
    """Copies (and the CUDA kernel's zeroed workspace) made inside CUDA graph capture exist only once the graph
    replays: a fused layer not yet prepared runs PEFT's forward in the capture and prepares nothing, so the next
    eager call prepares its copies for real; a prepared layer is captured fused. The workspace is never made in a
    capture (one error naming the warm-up). Capture is mimicked on the CPU."""
    import peft_eora.fused as fused_mod
    from peft_eora.kernels import ops

    pm = peft_model()
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = pm(x)
        fuse(pm, backend="torch")
        q = pm.base_model.model.q
        called = []
        real_op = ops.gptq_lora_linear_eager
        monkeypatch.setattr(ops, "gptq_lora_linear_eager", lambda *a, **k: called.append(1) or real_op(*a, **k))
        monkeypatch.setattr(fused_mod, "_capturing", lambda t: True)
        with caplog.at_level("WARNING", logger="peft_eora.fused"):
            assert rel_err(pm(x), ref) <= F32_TOL
        assert not called and not q._fused_cache and "captured with PEFT's forward" in caplog.text
        monkeypatch.setattr(fused_mod, "_capturing", lambda t: False)
        assert rel_err(pm(x), ref) <= F32_TOL and called and q._fused_cache  # eager: fused, prepared
        called.clear()
        monkeypatch.setattr(fused_mod, "_capturing", lambda t: True)
        assert rel_err(pm(x), ref) <= F32_TOL and called  # prepared before: captured fused
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(ops, "_workspaces", {})
    with pytest.raises(ops.WorkspaceNotReady, match="workspace made before CUDA graph capture"):
        ops._workspace(torch.device("cuda", 0), 1024)
    # prepared by an eager prefill (> 16 rows: not the CUDA kernel) and first decoded inside a capture: "auto" captures
    # the next backend instead of making the workspace there; an explicit "cuda" says why it cannot
    p, meta = q._prepared(x), q._fused_meta
    args = (x, p["qweight"], p["qzeros"], p["scales"], p["g_idx"], p["bias"], p["lora_a"], p["lora_b"], None, None)
    kw = dict(bits=meta.bits, group_size=meta.group_size, lora_bits=16, scaling=p["scaling"],
              zero_offset=meta.zero_offset)
    want = ops.gptq_lora_linear_eager(*args, **kw, backend="torch")
    monkeypatch.setattr(ops, "select_backend", lambda *a, **k: "cuda")
    monkeypatch.setattr(ops, "triton_available", lambda device: False)
    monkeypatch.setattr(ops, "_warned_capture_fallback", False)
    monkeypatch.setattr(ops, "_run_cuda", lambda *a, **k: ops._workspace(torch.device("cuda", 0), 1024))
    with caplog.at_level("WARNING", logger="peft_eora.kernels.ops"):
        assert torch.equal(ops.gptq_lora_linear_eager(*args, **kw, backend="auto"), want)
    assert "captured with the torch backend" in caplog.text
    with pytest.raises(ops.WorkspaceNotReady):
        ops.gptq_lora_linear_eager(*args, **kw, backend="cuda")
    monkeypatch.setenv(ops.ENV_BACKEND, "cuda")  # forced through the environment: the same error, no fallback
    with pytest.raises(ops.WorkspaceNotReady):
        ops.gptq_lora_linear_eager(*args, **kw, backend="auto")


def test_copies_a_captured_graph_reads_outlive_a_later_miss(monkeypatch):
    """A CUDA graph replays the addresses it captured: the prepared copies a capture used stay alive when
    a later eager call (the adapter changed) replaces them in the cache; unfuse lets them go. Capture is
    mimicked on the CPU."""
    import gc
    import weakref

    import peft_eora.fused as fused_mod
    from peft_eora.fused import unfuse

    pm = peft_model()
    x = torch.randn(2, 128)
    with torch.no_grad():
        fuse(pm, backend="torch")
        q = pm.base_model.model.q
        pm(x)  # the eager warm-up prepares the copies
        monkeypatch.setattr(fused_mod, "_capturing", lambda t: True)
        pm(x)  # captured fused, with those copies
        monkeypatch.setattr(fused_mod, "_capturing", lambda t: False)
        captured = next(iter(q._fused_cache.values()))
        lora_b = weakref.ref(captured["lora_b"])
        del captured
        q.lora_B["default"].weight.mul_(2.0)  # a training step: the next eager call prepares new copies
        pm(x)
        assert next(iter(q._fused_cache.values()))["lora_b"] is not lora_b()
        gc.collect()
        assert lora_b() is not None and list(q._fused_captured.values())[0]["lora_b"] is lora_b()
        fuse(pm, backend="torch")  # bound again: a graph captured before may still replay
        gc.collect()
        assert lora_b() is not None
        unfuse(pm)
        del q
        gc.collect()
        assert lora_b() is None


TRITON_CPU = _triton_cpu()


@pytest.mark.skipif(
    not TRITON_CPU,
    reason="Triton interpreter inactive here (TRITON_INTERPRET=1 must precede Triton's import; covered by "
    "test_triton_fused_in_subprocess) or unable to run the kernels (interpreter_problem() says why)",
)
def test_fused_matches_unfused_triton_interpreter():
    pm = peft_model(r=16, seed=3)
    x = torch.randn(3, 128)
    with torch.no_grad():
        ref = pm(x)
        fuse(pm, backend="triton")
        out = pm(x)
        assert rel_err(out, ref) <= F32_TOL
        unfuse(pm)
        fuse(pm, backend="torch")
        out_torch = pm(x)
    assert rel_err(out, out_torch) <= 1e-5


@pytest.mark.skipif(
    torch.cuda.is_available() or TRITON_CPU or os.environ.get("PEFT_EORA_TRITON_SUBPROCESS") == "1",
    reason="the Triton fused test runs in this process",
)
def test_triton_fused_in_subprocess():
    """Re-run the Triton fused test with TRITON_INTERPRET=1 set before anything imports Triton."""
    from triton_cpu import interpreter_env, subprocess_problem

    problem = subprocess_problem()
    if problem:
        pytest.skip(problem)
    env = interpreter_env()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", __file__, "-k",
         "test_fused_matches_unfused_triton_interpreter"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("bits,tol", [(8, 2e-2), (4, 1.5e-1)])
def test_fused_with_quantized_adapters(bits, tol):
    pm = peft_model(seed=4)
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref = pm(x)
        fuse(pm, backend="torch", adapter_bits=bits)
        out = pm(x)
        fused = fused_modules(pm)["base_model.model.q"]
        cache = next(iter(fused._fused_cache.values()))
        assert cache["lora_a"].dtype == (torch.int8 if bits == 8 else torch.uint8)
        # the LoRA term is what changes: its error is bounded by the factor quantization
        assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("bits", [8, 4])
def test_fuse_reads_eora_adapter_bits_exactly(bits):
    """EoRAConfig(adapter_bits=b) factors are already on the grid: the fused int path is as exact as float."""
    import warnings

    from peft_eora import EoRAConfig
    from peft_eora.adapter_quant import quantize_adapter_

    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no original/calibration: zero-initialised, filled below
        pm = get_peft_model(TinyBlock(), EoRAConfig(r=8, target_modules=["q", "down"], adapter_bits=bits)).eval()
    with torch.no_grad():
        for mod in pm.modules():
            if isinstance(mod, GPTQLoraLinear):
                mod.lora_B["default"].weight.normal_(0.0, 0.05)
    quantize_adapter_(pm, "default", bits)
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref = pm(x)
        report = fuse(pm, backend="torch")
        out = pm(x)
        assert len(report.fused) == 2
        assert all(m._fused_adapter_bits == bits for m in fused_modules(pm).values())
        unfuse(pm)
        fuse(pm, backend="torch", adapter_bits=16)
        out_float = pm(x)
    assert rel_err(out, ref) <= F32_TOL  # the base GEMM's own fused-vs-gptqmodel difference
    assert rel_err(out, out_float) <= 1e-6  # int codes reproduce the float grid values


def test_unfuse_restores_exact_modules_and_state():
    pm = peft_model()
    inner = pm.base_model.model
    originals = (inner.q, inner.down)
    keys = list(pm.state_dict().keys())
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = pm(x)
        fuse(pm, backend="torch")
        assert list(pm.state_dict().keys()) == keys  # same parameter names while fused
        assert inner.q.lora_A is originals[0].lora_A and inner.q.base_layer is originals[0].base_layer
        pm.train()
        pm.eval()
        assert unfuse(pm) == 2
        assert inner.q is originals[0] and inner.down is originals[1]
        assert type(inner.q) is GPTQLoraLinear and not fused_modules(pm)
        assert torch.equal(pm(x), ref)
    assert list(pm.state_dict().keys()) == keys
    assert unfuse(pm) == 0


def test_fallbacks_follow_peft_semantics():
    pm = peft_model(lora_dropout=0.1)
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = pm(x)
        with pm.disable_adapter():
            ref_base = pm(x)
    fuse(pm, backend="torch")
    with torch.no_grad():
        out = pm(x)
        assert rel_err(out, ref) <= F32_TOL
        with pm.disable_adapter():  # PEFT reaches fused layers: they are GPTQLoraLinear too
            assert torch.equal(pm(x), ref_base)
    # gradients requested: the plain PEFT forward runs (the op has no backward)
    out_grad = pm(x)
    assert out_grad.requires_grad
    out_grad.sum().backward()
    assert pm.base_model.model.q.lora_B["default"].weight.grad is not None
    assert torch.equal(out_grad.detach(), ref)
    # training mode with dropout: PEFT forward (random), never the fused op
    pm.train()
    with torch.no_grad():
        a, b = pm(x), pm(x)
    assert not torch.equal(a, b)


def test_auto_backend_on_cpu_keeps_peft_forward(monkeypatch):
    monkeypatch.delenv("PEFT_EORA_BACKEND", raising=False)
    pm = peft_model()
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = pm(x)
        fuse(pm)  # backend="auto"
        assert torch.equal(pm(x), ref)
    assert not pm.base_model.model.q._fused_cache  # the op was not used on CPU


def test_auto_backend_sends_only_decode_sized_calls_to_the_op(monkeypatch):
    """Backend "auto" sends calls of at most FUSED_MAX_ROWS rows (decode) to the fused op; a prefill went to Triton
    16 rows at a time, each chunk streaming the whole weight. A backend the caller chose takes every call."""
    from peft_eora import fused as fused_module

    monkeypatch.delenv("PEFT_EORA_BACKEND", raising=False)
    pm = peft_model()
    fuse(pm)
    layer = pm.base_model.model.q
    limit = fused_module.FUSED_MAX_ROWS
    on_gpu = lambda rows: torch.empty(rows, 128, device="meta")  # noqa: E731 - any non-CPU device
    with torch.no_grad():  # trainable factors under autograd take PEFT's forward whatever the rows
        assert layer._can_fuse_call(on_gpu(limit)) and layer._can_fuse_call(torch.empty(2, limit // 2, 128, device="meta"))
        assert not layer._can_fuse_call(on_gpu(limit + 1)) and not layer._can_fuse_call(torch.empty(2, limit, 128,
                                                                                                      device="meta"))
        assert not layer._can_fuse_call(torch.empty(1, 128))  # CPU: PEFT's forward
        fuse(pm, backend="torch")
        assert layer._can_fuse_call(on_gpu(4 * limit)) and layer._can_fuse_call(torch.empty(4 * limit, 128))


def test_skips_with_reasons():
    pm = peft_model()
    pm.base_model.model.q.get_base_layer().bits = 5  # pretend an unsupported width
    pm.add_adapter("other", LoraConfig(r=4, target_modules=["down"]))
    pm.base_model.set_adapter(["default", "other"])
    report = fuse(pm)
    assert report.fused == []
    assert "bits=5" in report.skipped["base_model.model.q"]
    assert "exactly one active" in report.skipped["base_model.model.down"]
    pm.base_model.model.q.get_base_layer().bits = 4
    pm.base_model.set_adapter("default")
    assert len(fuse(pm)) == 2
    fused = dict(fused_modules(pm))
    assert len(fuse(pm)) == 2 and fused_modules(pm) == fused  # fused before: bound again in place, listed
    with pytest.raises(ValueError, match="adapter_bits"):
        fuse(pm, adapter_bits=3)


def test_fused_follows_scaling_changes():
    """The adapter's scaling is read on every call: ``set_scale`` and ``rescale_adapter_scale`` act on fused layers
    as on PEFT's (the first fused call inside the context no longer freezes its scale)."""
    from peft.helpers import rescale_adapter_scale

    pm = peft_model()
    x = torch.randn(2, 128)
    fuse(pm, backend="torch")
    with torch.no_grad():
        with pm.disable_adapter():
            base = pm(x)
        with rescale_adapter_scale(pm, 0.0):
            assert rel_err(pm(x), base) <= F32_TOL
        fused = pm(x)
        for layer in fused_modules(pm).values():
            layer.set_scale("default", 0.5)
        half = pm(x)
        unfuse(pm)
        half_ref = pm(x)
    assert rel_err(half, half_ref) <= F32_TOL and rel_err(half, fused) > 10 * F32_TOL


@pytest.mark.parametrize("dtype,bits", [(torch.float16, None), (torch.float32, 8)])
def test_fused_sees_training_steps_and_replaced_adapters(dtype, bits):
    """Copies made for the fused op (float16 activations beside float32 factors, int8 codes) are remade when the
    factors change: an optimizer step between two evaluations, an adapter deleted and loaded under the same name."""
    pm = peft_model().to(dtype)
    for layer in pm.modules():  # PEFT keeps adapters in float32 (autocast_adapter_dtype)
        if isinstance(layer, GPTQLoraLinear):
            layer.lora_A.float(), layer.lora_B.float()
    x = torch.randn(2, 128, dtype=dtype)
    tol = F16_TOL if dtype == torch.float16 else 2e-2  # int8 factors: their rounding
    fuse(pm, backend="torch", adapter_bits=bits)
    q = pm.base_model.model.q
    with torch.no_grad():
        before = q(x)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    pm(x).float().pow(2).mean().backward()
    opt.step()
    pm.eval()
    with torch.no_grad():
        after = q(x)
        unfuse(pm)
        reference = pm.base_model.model.q(x)
    assert rel_err(after, reference) <= tol and rel_err(after, before) > 3 * tol

    fuse(pm, backend="torch", adapter_bits=bits)
    with torch.no_grad():
        pm(x)
        other = peft_model(seed=5)
        pm.delete_adapter("default")
        pm.add_adapter("default", other.peft_config["default"])
        pm.load_state_dict(other.state_dict(), strict=False)
        pm.set_adapter("default")
        pm.to(dtype).eval()
        for layer in pm.modules():
            if isinstance(layer, GPTQLoraLinear):
                layer.lora_A.float(), layer.lora_B.float()
        swapped = pm(x)
        unfuse(pm)
        assert rel_err(swapped, pm(x)) <= tol


def test_fused_mixed_batch_keeps_adapter_names():
    """EoRA's GPTQ layers take ``adapter_names`` (one adapter per row); their fused twins still do."""
    from peft_eora import EoRAConfig
    from peft_eora.fused import FusedMixedBatchGPTQLoraLinear
    from peft_eora.layer import MixedBatchGPTQLoraLinear

    torch.manual_seed(0)
    pm = get_peft_model(TinyBlock(), EoRAConfig(r=8, target_modules=["q", "down"])).eval()
    pm.add_adapter("other", EoRAConfig(r=8, target_modules=["q", "down"]))
    with torch.no_grad():
        for layer in pm.modules():
            if isinstance(layer, GPTQLoraLinear):
                for name in layer.lora_B:
                    layer.lora_B[name].weight.normal_(0.0, 0.05)
    pm.set_adapter("default")
    x = torch.randn(3, 128)
    names = ["default", "other", "__base__"]
    with torch.no_grad():
        ref = pm(x, adapter_names=names)
        fuse(pm, backend="torch")
        q = pm.base_model.model.q
        assert isinstance(q, FusedMixedBatchGPTQLoraLinear) and isinstance(q, MixedBatchGPTQLoraLinear)
        assert torch.equal(pm(x, adapter_names=names), ref)  # PEFT's mixed-batch forward, as before
        unfuse(pm)
    assert type(pm.base_model.model.q) is MixedBatchGPTQLoraLinear


def test_hooks_follow_the_layer_across_fuse_and_unfuse():
    """A forward hook belongs to the layer: one removed while fused stops firing, one added while fused stays."""
    pm = peft_model()
    x = torch.randn(2, 128)
    fired: list[str] = []
    before = pm.base_model.model.q.register_forward_hook(lambda *_: fired.append("before"))
    fuse(pm, backend="torch")
    with torch.no_grad():
        pm(x)
        before.remove()
        pm(x)
        pm.base_model.model.q.register_forward_hook(lambda *_: fired.append("while"))
        unfuse(pm)
        pm(x)
    assert fired == ["before", "while"]


@pytest.mark.parametrize("called_before", [True, False])
def test_fused_rereads_the_group_order(called_before):
    """A base layer given an act-order permutation after fusing (a checkpoint loaded into the skeleton) is computed
    with it: the layout the op reads is re-derived when ``g_idx`` changes, before the first call too (it was not)."""
    from peft_eora.kernels.gptq_linear import GPTQLinear, register_gptq_linear

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(128)  # PEFT's injection reads the device off a parameter
            self.q = GPTQLinear.from_linear(nn.Linear(128, 64), bits=4, group_size=32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q(self.norm(x))

    torch.manual_seed(0)
    pm = get_peft_model(Model(), register_gptq_linear(LoraConfig(r=4, target_modules=["q"], init_lora_weights=False)))
    pm.eval()
    x = torch.randn(2, 128)
    with torch.no_grad():
        fuse(pm, backend="torch")
        if called_before:
            pm(x)
        pm.base_model.model.q.base_layer.set_g_idx(torch.arange(128).flip(0) // 32)
        fused = pm(x)
        assert pm.base_model.model.q._fused_meta.act_order
        unfuse(pm)
        assert rel_err(fused, pm(x)) <= F32_TOL


def test_fused_adapter_follows_set_adapter():
    """Active adapters a layer does not hold do not keep it from fusing (an adapter on ``lm_head`` only); after
    ``set_adapter("other")`` a second ``fuse`` binds the fused layers to ``other``."""
    pm = peft_model()
    x = torch.randn(2, 128)
    pm.add_adapter("head", LoraConfig(r=4, target_modules=["lm_head"]))
    pm.base_model.set_adapter(["default", "head"])
    with torch.no_grad():
        ref = pm(x)
        assert len(fuse(pm, backend="torch")) == 2
        assert rel_err(pm(x), ref) <= F32_TOL
        assert pm.base_model.model.q._fused_cache  # the fused op ran
        unfuse(pm)
    pm.base_model.set_adapter("default")
    pm.add_adapter("other", LoraConfig(r=8, target_modules=["q", "down"], init_lora_weights=False))
    fuse(pm, backend="torch")
    pm.set_adapter("other")
    with torch.no_grad():
        ref_other = pm(x)  # falls back to PEFT's forward: "default" is what the layers were fused for
        report = fuse(pm, backend="torch")
        assert sorted(report.fused) == ["base_model.model.down", "base_model.model.q"] and not report.skipped
        assert pm.base_model.model.q._fused_adapter == "other"
        assert rel_err(pm(x), ref_other) <= F32_TOL


def test_fused_under_inference_mode_and_compile():
    """Tensors made under ``torch.inference_mode()`` track no version (gptqmodel packs its buffers there); the
    stamps then fall back to identity and storage. Compiled, a new scaling is still read (a traced float)."""
    pm = peft_model()
    x = torch.randn(2, 128)
    with torch.inference_mode():
        ref = pm(x)
        fuse(pm, backend="torch")
        pm.base_model.model.q.base_layer.qweight = pm.base_model.model.q.base_layer.qweight.clone()  # an inference tensor
        assert pm.base_model.model.q.base_layer.qweight.is_inference()
        assert rel_err(pm(x), ref) <= F32_TOL
        assert rel_err(pm(x), ref) <= F32_TOL  # cached
    unfuse(pm)
    torch._dynamo.reset()
    pm = peft_model()
    with torch.no_grad():
        fuse(pm, backend="torch")
        compiled = torch.compile(pm, backend="aot_eager")
        compiled(x)
        for layer in fused_modules(pm).values():
            layer.set_scale("default", 3.0)
        got = compiled(x)
        unfuse(pm)
        assert rel_err(got, pm(x)) <= F32_TOL


def test_a_compiled_fused_model_rereads_changed_factors_after_fuse_again():
    """Compiled, the op's copies of the factors (int8 here) are not re-checked: after an in-place change the compiled
    model keeps the traced copies until ``fuse(model)`` runs again, which makes it re-read them (documented)."""
    torch._dynamo.reset()
    pm = peft_model()
    x = torch.randn(2, 128)
    with torch.no_grad():
        fuse(pm, backend="torch", adapter_bits=8)
        compiled = torch.compile(pm, backend="aot_eager")
        before = compiled(x)
        for layer in fused_modules(pm).values():
            layer.lora_B["default"].weight.mul_(3.0)
        assert torch.equal(compiled(x), before)  # the limitation the docs state
        fuse(pm, backend="torch", adapter_bits=8)
        got = compiled(x)
        unfuse(pm)
        ref = pm(x)
    assert rel_err(before, ref) > 0.1 and rel_err(got, ref) <= 1e-2  # int8 factors: their rounding


def test_dora_is_not_fused():
    torch.manual_seed(0)
    model = TinyBlock()
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q"], use_dora=False)).eval()
    pm.base_model.model.q.lora_variant["default"] = object()  # stands in for a DoRA/QALoRA variant
    report = fuse(pm)
    assert "variant" in report.skipped["base_model.model.q"]


def test_fusing_a_model_without_gptq_layers_says_so(tiny_llama):
    """A dense (or bnb, AWQ, ...) base has nothing the fused path serves: an empty report, and a warning saying why."""
    _, quantized = tiny_llama
    pm = get_peft_model(copy.deepcopy(quantized), LoraConfig(r=4, target_modules=["q_proj"])).eval()
    with pytest.warns(UserWarning, match="no GPTQ LoRA layer to fuse"):
        report = fuse(pm)
    assert not report.fused and not report.skipped


def test_fused_model_compiles():
    pm = peft_model()
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref = pm(x)
        fuse(pm, backend="torch")
        compiled = torch.compile(pm, backend="aot_eager", fullgraph=False)
        out = compiled(x)
    assert rel_err(out, ref) <= F32_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_matches_unfused_on_gpu(dtype):
    pm = peft_model().to("cuda", dtype)
    with torch.no_grad():
        for m in (1, 4, 16, 40):
            x = torch.randn(m, 128, device="cuda", dtype=dtype)
            ref = pm(x)
            fuse(pm)
            out = pm(x)
            assert rel_err(out, ref) <= (F16_TOL if dtype == torch.float16 else 3e-2)
            unfuse(pm)
