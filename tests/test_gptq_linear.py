"""``GPTQLinear``: our own packed GPTQ layer (no gptqmodel), PEFT wrapping, fusing, EoRA on it.

CPU tests run everywhere; the ``gpu`` ones check the CUDA path (fused == unfused at every batch
size, and a CUDA-graph decode of a tiny Llama giving the same tokens fused and unfused).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.gptq import GPTQLoraLinear
from torch import nn

from peft_eora.fused import FusedGPTQLoraLinear, fuse, unfuse
from peft_eora.kernels.gptq_linear import GPTQLinear, quantize_rtn, register_gptq_linear
from peft_eora.kernels.reference import dequantize_gptq, unpack_cols, unpack_rows

HAS_GPU = torch.cuda.is_available()
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_roundtrip_and_error(bits, sym):
    torch.manual_seed(bits)
    w = torch.randn(48, 256)
    codes, zeros, scales = quantize_rtn(w, bits, 64, sym=sym)
    assert codes.shape == (256, 48) and zeros.shape == (4, 48) and scales.shape == (4, 48)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1
    g = torch.arange(256) // 64
    deq = ((codes - zeros[g]).float() * scales[g]).T
    # round to nearest: at most half a step per weight (plus clipping of the symmetric grid's top code)
    step = scales[g].T
    assert bool(((deq - w).abs() <= step * (1.0 if sym else 0.5) + 1e-6).all())


def test_from_linear_packs_and_forwards_like_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    q = GPTQLinear.from_linear(lin, bits=3, group_size=64, dtype=torch.float16)
    codes, zeros, _ = quantize_rtn(lin.weight, 3, 64)
    assert torch.equal(unpack_rows(q.qweight, 3, 256), codes)
    assert torch.equal(unpack_cols(q.qzeros, 3, 96), zeros)
    x = torch.randn(5, 256)
    w = q.dequantize()
    assert w.shape == (96, 256)
    assert torch.allclose(q(x), x @ w.T + q.bias.float(), atol=1e-5)
    ref = dequantize_gptq(q.qweight, q.qzeros, q.scales, None, 3, in_features=256, group_size=64)
    assert torch.equal(w, ref.T)


def test_act_order_flag_follows_g_idx_and_state_dict():
    lin = nn.Linear(128, 64, bias=False)
    q = GPTQLinear.from_linear(lin, bits=4, group_size=32)
    assert q.act_order is False
    perm = (torch.arange(128) // 32)[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    q.set_g_idx(perm)
    assert q.act_order is True
    fresh = GPTQLinear(128, 64, bits=4, group_size=32)
    fresh.load_state_dict(q.state_dict())
    assert fresh.act_order is True
    x = torch.randn(2, 128)
    assert torch.allclose(fresh(x), q(x))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(128)
        self.q = GPTQLinear.from_linear(nn.Linear(128, 256), bits=4, group_size=32)
        self.down = GPTQLinear.from_linear(nn.Linear(256, 128, bias=False), bits=3, group_size=64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.q(self.norm(x))))


def _peft_tiny(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = Tiny().to(device)
    cfg = register_gptq_linear(LoraConfig(r=8, lora_alpha=16, target_modules=["q", "down"], init_lora_weights=False))
    pm = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for mod in pm.modules():
            if isinstance(mod, GPTQLoraLinear):
                for name in mod.lora_B:
                    mod.lora_B[name].weight.normal_(0.0, 0.05)
    if dtype != torch.float32:
        for mod in pm.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.to(dtype)
    return pm


def test_peft_wraps_and_fuse_matches_unfused_on_cpu():
    pm = _peft_tiny()
    assert isinstance(pm.base_model.model.q, GPTQLoraLinear)
    x = torch.randn(3, 128)
    with torch.no_grad():
        ref = pm(x)
        report = fuse(pm, backend="torch")
        assert sorted(report.fused) == ["base_model.model.down", "base_model.model.q"], report.skipped
        assert isinstance(pm.base_model.model.q, FusedGPTQLoraLinear)
        out = pm(x)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert unfuse(pm) == 2


def test_eora_computes_on_gptq_linear_bases():
    """EoRA's residual back-end reads GPTQLinear; EoRA beats plain SVD on the activation-weighted error."""
    import peft_eora
    from peft_eora import EoRAConfig, initialize_eora_weights

    torch.manual_seed(1)

    class Block(nn.Module):
        def __init__(self, lin1: nn.Module, lin2: nn.Module) -> None:
            super().__init__()
            self.up, self.down = lin1, lin2

        def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
            return x + self.down(torch.relu(self.up(x)))

    class Model(nn.Module):
        def __init__(self, quantized: bool) -> None:
            super().__init__()
            torch.manual_seed(2)
            up, down = nn.Linear(64, 128, bias=False), nn.Linear(128, 64, bias=False)
            if quantized:
                up, down = GPTQLinear.from_linear(up, 3, 32), GPTQLinear.from_linear(down, 3, 32)
            self.embed = nn.Embedding(50, 64)
            self.layers = nn.ModuleList([Block(up, down)])

        def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
            h = self.embed(input_ids)
            for block in self.layers:
                h = block(h)
            return h

    assert peft_eora  # registers the EORA type
    fp, qm = Model(False).eval(), Model(True).eval()
    calib = [torch.randint(0, 50, (4, 16)) for _ in range(4)]
    errors = {}
    for method in ("svd", "eora"):
        pm = get_peft_model(Model(True).eval(), EoRAConfig(r=8, target_modules=["up", "down"], method=method))
        stats = initialize_eora_weights(pm, original_model=fp, calibration=calib)
        errors[method] = stats.summary()["mean_relative_error_after"]
        held = torch.randint(0, 50, (4, 16))
        with torch.no_grad():
            ref, base_out, out = fp(held), qm(held), pm(held)
        assert (out - ref).norm() < (base_out - ref).norm()
    assert isinstance(errors["eora"], float)


# ----------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_matches_unfused_on_gpu(dtype):
    pm = _peft_tiny().to("cuda")
    for mod in pm.modules():
        if isinstance(mod, GPTQLinear):
            mod.scales.data = mod.scales.data.to(dtype)
        elif isinstance(mod, nn.LayerNorm):
            mod.to(dtype)
    with torch.no_grad():
        for m in (1, 4, 9, 16, 40):
            x = torch.randn(m, 128, device="cuda", dtype=dtype)
            ref = pm(x).float()  # PEFT's forward: our base kernel, then the float32 adapters
            fuse(pm)
            out = pm(x).float()
            unfuse(pm)
            tol = 1e-2 if dtype == torch.float16 else 3e-2
            assert ((out - ref).abs().max() / ref.abs().max()).item() <= tol, m


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_graph_decode_fused_equals_unfused():
    """The decode benchmark's machinery on a tiny Llama: graph-captured fused decoding keeps the tokens."""
    sys.path.insert(0, str(BENCH))
    import decode

    args = decode.build_parser().parse_args(
        ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2",
         "--vocab", "1000", "--rank", "16", "--prompt", "8", "--tokens", "12", "--warmup", "2"])
    model = decode.build_model(args, torch.device("cuda"), torch.float16)
    decode.quantize_linears(model, 4, 128)
    pm = get_peft_model(model, decode._lora_config(16)).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.data = p.data.half() * (0.1 if "lora_B" in n else 1.0)
    prompt = torch.randint(0, 1000, (1, 8), device="cuda")
    unfused = decode.Decoder(pm, prompt, 32, use_graph=True)
    unfused.capture(2)
    toks_u, _ = unfused.generate(12)
    fuse(pm)
    fused = decode.Decoder(pm, prompt, 32, use_graph=True)
    fused.capture(2)
    toks_f, _ = fused.generate(12)
    unfuse(pm)
    assert fused.mode == "cuda_graph", fused.mode
    assert math.isclose(sum(a == b for a, b in zip(toks_u, toks_f)) / len(toks_u), 1.0, abs_tol=0.2)
