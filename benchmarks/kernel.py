"""Fused GPTQ + low-rank kernel benchmark (JSON on stdout or ``--out``).

Per layer shape (in × out), rank r and decode batch M it times, with the weights cycled over
enough copies to defeat the L2 cache and every variant captured in a CUDA graph (so the numbers
are GPU time, not Python overhead; ``eager_us`` is also reported):

* ``base``      — the quantized GEMM alone (our CUDA kernel with no LoRA term);
* ``unfused``   — what PEFT does: base, then ``lora_B(lora_A(x)) * scaling`` and the add;
* ``fused``     — ``torch.ops.peft_eora.gptq_lora_linear`` (one launch);
* ``fused_int8``/``fused_two_pass``/``fused_triton`` — quantized adapters, the two-launch
  CUDA variant, and the Triton fallback.

plus end-to-end greedy decode tokens/s of a small random-weight Llama whose decoder linears
are gptqmodel GPTQ modules (4-bit, group 128) with a LoRA/EoRA adapter: quantized base only,
PEFT unfused, and ``peft_eora.fused.fuse``. Goal on H100: fused ≤ 1.25× base at M = 1,
r = 128, and ≥ 1.3× faster than unfused (reported under ``goals``).

    python benchmarks/kernel.py --out kernel.json           # GPU
    python benchmarks/kernel.py --smoke                     # CPU: tiny shapes, checks the code paths

Without a GPU (and without ``--smoke``) it prints ``{"status": "skipped", "reason": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator, Optional

import torch

logger = logging.getLogger("peft_eora.benchmarks.kernel")


# ----------------------------------------------------------------------------------------------
# helpers


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        k, n = item.lower().split("x")
        shapes.append((int(k), int(n)))
    return shapes


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


@contextlib.contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _random_layer(k: int, n: int, r: int, bits: int, group: int, dtype: torch.dtype, device: torch.device,
                  gen: torch.Generator) -> dict[str, Any]:
    """Random packed GPTQ tensors (any int32 word is a valid packing) and LoRA factors."""
    from peft_eora.kernels.lowbit import quantize_lora_pair

    groups = math.ceil(k / group)
    words = lambda rows, cols: torch.randint(-(2**31), 2**31 - 1, (rows, cols), generator=gen,  # noqa: E731
                                             dtype=torch.int64).to(torch.int32)
    layer = dict(
        qweight=words(k * bits // 32, n).to(device),
        qzeros=words(groups, math.ceil(n * bits / 32)).to(device),
        scales=(torch.rand(groups, n, generator=gen) * 0.01 + 1e-3).to(device, dtype),
    )
    a = torch.randn(r, k, generator=gen) / math.sqrt(k)
    b = torch.randn(n, r, generator=gen) * 0.02
    layer["a"], layer["b"] = a.to(device, dtype), b.to(device, dtype)
    qa, qb = quantize_lora_pair(a, b, 8)
    layer["a8"], layer["b8"], layer["sa8"], layer["sb8"] = (t.to(device) for t in (qa.data, qb.data, qa.scale,
                                                                                  qb.scale))
    return layer


def _time_gpu(fn: Callable[[int], Any], copies: int, iters: int, use_graph: bool) -> float:
    """Microseconds per call, cycling ``fn(i)`` over ``copies`` weight sets."""
    torch.cuda.synchronize()
    for i in range(copies):  # warm-up (JIT build, autotune, workspace allocation)
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if use_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(copies):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(copies):
                fn(i)
        graph.replay()
        torch.cuda.synchronize()
        reps = max(1, iters // copies)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / (reps * copies)
    start.record()
    for it in range(iters):
        fn(it % copies)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _time_cpu(fn: Callable[[int], Any], copies: int, iters: int) -> float:
    fn(0)
    t0 = time.perf_counter()
    for it in range(iters):
        fn(it % copies)
    return (time.perf_counter() - t0) * 1e6 / iters


# ----------------------------------------------------------------------------------------------
# layer benchmark


def bench_layers(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from peft_eora.kernels import ops
    from peft_eora.kernels.triton_gptq_lora import interpreter_active

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    base_backend = "cuda" if device.type == "cuda" else "torch"
    triton_ok = device.type == "cuda" or interpreter_active()
    for k, n in args.shapes:
        layer_bytes = k * n * args.bits // 8
        copies = max(2, math.ceil(3 * l2 / layer_bytes)) if device.type == "cuda" else 2
        copies = min(copies, args.max_copies)
        for r in args.ranks:
            layers = [_random_layer(k, n, r, args.bits, args.group_size, dtype, device, gen) for _ in range(copies)]
            for m in args.batches:
                x = torch.randn(m, k, generator=gen).to(device, dtype)
                scaling = 2.0

                def base(i: int, backend: str = base_backend) -> torch.Tensor:
                    L = layers[i]
                    return ops.gptq_lora_linear_eager(x, L["qweight"], L["qzeros"], L["scales"], None, None, None,
                                                      None, None, None, bits=args.bits, group_size=args.group_size,
                                                      backend=backend)

                def unfused(i: int) -> torch.Tensor:
                    L = layers[i]
                    y = base(i)
                    lora = torch.nn.functional.linear(torch.nn.functional.linear(x, L["a"]), L["b"]) * scaling
                    return y + lora

                def fused(i: int, backend: str = base_backend, lora_bits: int = 16) -> torch.Tensor:
                    L = layers[i]
                    if lora_bits == 8:
                        a, b, sa, sb = L["a8"], L["b8"], L["sa8"], L["sb8"]
                    else:
                        a, b, sa, sb = L["a"], L["b"], None, None
                    return ops.gptq_lora_linear_eager(x, L["qweight"], L["qzeros"], L["scales"], None, None, a, b,
                                                      sa, sb, bits=args.bits, group_size=args.group_size,
                                                      lora_bits=lora_bits, scaling=scaling, backend=backend)

                variants: dict[str, Callable[[int], torch.Tensor]] = {
                    "base": base,
                    "unfused": unfused,
                    "fused": fused,
                    "fused_int8": lambda i: fused(i, lora_bits=8),
                }
                if triton_ok and (device.type == "cuda" or args.smoke_triton):
                    variants["fused_triton"] = lambda i: fused(i, backend="triton")
                row: dict[str, Any] = dict(in_features=k, out_features=n, rank=r, batch=m, bits=args.bits,
                                           group_size=args.group_size, dtype=str(dtype).replace("torch.", ""),
                                           weight_copies=copies)
                # correctness guard: fused vs unfused on this exact data
                ref, got = unfused(0).float(), fused(0).float()
                row["max_abs_err_vs_unfused"] = (got - ref).abs().max().item()
                row["max_abs_ref"] = ref.abs().max().item()
                timings: dict[str, Any] = {}
                for name, fn in variants.items():
                    try:
                        if device.type == "cuda":
                            timings[name] = dict(graph_us=_time_gpu(fn, copies, args.iters, True),
                                                 eager_us=_time_gpu(fn, copies, max(20, args.iters // 4), False))
                        else:
                            timings[name] = dict(wall_us=_time_cpu(fn, copies, args.iters))
                    except Exception as exc:  # keep the rest of the table
                        timings[name] = dict(error=f"{type(exc).__name__}: {exc}")
                if device.type == "cuda":
                    with _env(ops.ENV_TWO_PASS, "1"):
                        try:
                            timings["fused_two_pass"] = dict(graph_us=_time_gpu(fused, copies, args.iters, True))
                        except Exception as exc:
                            timings["fused_two_pass"] = dict(error=f"{type(exc).__name__}: {exc}")
                row["timings"] = timings
                key = "graph_us" if device.type == "cuda" else "wall_us"
                t = {name: v.get(key) for name, v in timings.items()}
                if t.get("base") and t.get("fused") and t.get("unfused"):
                    row["fused_over_base"] = t["fused"] / t["base"]
                    row["unfused_over_fused"] = t["unfused"] / t["fused"]
                rows.append(row)
                logger.info("layer %dx%d r=%d M=%d: %s", k, n, r, m, {k2: round(v, 2) for k2, v in t.items() if v})
            del layers
    return rows


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at batch 1, r = 128: fused ≤ 1.25× base and unfused/fused ≥ 1.3."""
    out = {}
    for row in rows:
        if row["batch"] == 1 and row["rank"] == 128 and "fused_over_base" in row:
            key = f"{row['in_features']}x{row['out_features']}"
            out[key] = dict(
                fused_over_base=row["fused_over_base"],
                unfused_over_fused=row["unfused_over_fused"],
                met=row["fused_over_base"] <= 1.25 and row["unfused_over_fused"] >= 1.3,
            )
    return out


# ----------------------------------------------------------------------------------------------
# end-to-end decode


def _gptq_module(kind: str, k: int, n: int, bits: int, group: int, dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator) -> torch.nn.Module:
    if kind == "tritonv2":
        from gptqmodel.nn_modules.qlinear.tritonv2 import TritonV2Linear as Cls
    else:
        from gptqmodel.nn_modules.qlinear.torch import TorchLinear as Cls
    m = Cls(bits=bits, group_size=group, sym=True, desc_act=False, in_features=k, out_features=n, bias=False)
    groups = math.ceil(k / group)
    m.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, m.qweight.shape, generator=gen, dtype=torch.int64)
                    .to(torch.int32))
    m.qzeros.copy_(torch.full(m.qzeros.shape, 0x88888888 - 2**32, dtype=torch.int64).to(torch.int32))  # zero = 8
    m.scales.copy_(torch.rand(groups, n, generator=gen) * 0.002 + 1e-4)
    m = m.to(device)
    m.scales.data = m.scales.data.to(dtype)
    m.eval()
    return m


def bench_e2e(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Greedy decode tokens/s: quantized base, PEFT unfused, fused."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_eora.fused import fuse, unfuse

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if args.smoke:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
        prompt, steps = 8, 4
    else:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.e2e_layers,
                          num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                          max_position_embeddings=2048)
        prompt, steps = 32, args.e2e_tokens
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    kind = args.e2e_base
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in names:
                lin = getattr(parent, name, None)
                if isinstance(lin, torch.nn.Linear):
                    setattr(parent, name, _gptq_module(kind, lin.in_features, lin.out_features, args.bits,
                                                       args.group_size, dtype, device, gen))
    peft_model = get_peft_model(model, LoraConfig(r=args.e2e_rank, lora_alpha=args.e2e_rank,
                                                  target_modules=list(names), init_lora_weights=False)).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=gen).to(device)

    @torch.no_grad()
    def decode() -> float:
        out = peft_model(input_ids=ids, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = peft_model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - t0)

    res: dict[str, Any] = dict(model=dict(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                                          layers=cfg.num_hidden_layers, vocab=cfg.vocab_size),
                               base_module=kind, rank=args.e2e_rank, prompt_tokens=prompt, decode_tokens=steps)
    decode()  # warm-up
    with peft_model.disable_adapter():
        res["base_only_tok_s"] = decode()
    res["unfused_tok_s"] = decode()
    report = fuse(peft_model)
    res["fused_layers"] = len(report.fused)
    res["skipped_layers"] = dict(list(report.skipped.items())[:3])
    decode()  # warm-up (JIT build on first use)
    res["fused_tok_s"] = decode()
    unfuse(peft_model)
    if res["unfused_tok_s"]:
        res["fused_speedup_vs_unfused"] = res["fused_tok_s"] / res["unfused_tok_s"]
    return res


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the JSON here (also printed)")
    p.add_argument("--shapes", type=_parse_shapes, default=_parse_shapes("4096x4096,4096x11008"),
                   help="comma-separated in x out layer shapes")
    p.add_argument("--ranks", type=_ints, default=[64, 128])
    p.add_argument("--batches", type=_ints, default=[1, 4, 16])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--max-copies", type=int, default=64, help="weight copies cycled to defeat L2")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end decode benchmark")
    p.add_argument("--e2e-layers", type=int, default=8)
    p.add_argument("--e2e-tokens", type=int, default=128)
    p.add_argument("--e2e-rank", type=int, default=128)
    p.add_argument("--e2e-base", choices=("tritonv2", "torch"), default="tritonv2",
                   help="gptqmodel module holding the quantized weights (the unfused baseline's kernel)")
    p.add_argument("--smoke", action="store_true", help="CPU run on tiny shapes (checks the code paths)")
    p.add_argument("--smoke-triton", action="store_true", help="with --smoke: also time Triton in the interpreter")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; JSON goes to stdout (libraries' chatter is redirected to stderr)."""
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        text = _run(argv)
    real_stdout.write(text + "\n")
    real_stdout.flush()
    return 0


def _run(argv: Optional[list[str]]) -> str:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    if args.smoke:
        args.shapes, args.ranks, args.batches, args.iters = [(256, 128)], [8], [1, 2], 3
        args.e2e_base = "torch"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        result = {"status": "skipped", "reason": "no CUDA device: this benchmark times GPU kernels (use --smoke "
                                                  "for a CPU check of the code paths)"}
        return json.dumps(result)
    else:
        device = torch.device("cuda")
    import peft_eora.kernels  # noqa: F401  (registers the op)

    result: dict[str, Any] = dict(
        status="ok",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        smoke=bool(args.smoke),
    )
    result["layers"] = bench_layers(args, device)
    result["goals"] = goals(result["layers"])
    if args.e2e:
        try:
            result["e2e"] = bench_e2e(args, device)
        except Exception as exc:
            logger.warning("end-to-end benchmark failed", exc_info=True)
            result["e2e"] = dict(error=f"{type(exc).__name__}: {exc}")
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
