"""Fused GPTQ + low-rank kernel benchmark: every figure side by side in one run (JSON out).

Per layer shape (in × out), decode batch M, GPTQ width and rank r it times, every variant
captured in a CUDA graph over enough weight copies to defeat the L2 cache (GPU time, not
Python overhead):

* anchors (no adapter): ``fp16_linear`` — ``F.linear`` on the unquantized fp16 weight
  (cuBLAS), and ``int4_tinygemm`` — stock torch's int4 GEMM (``torch._weight_int4pack_mm``,
  bf16 activations, group 128), the fastest 4-bit kernel every CUDA build of torch ships;
* ``base`` — our CUDA kernel without the low-rank term (``base_v3``: its default variant, untuned);
* ``unfused`` — what PEFT does: ``base``, then ``lora_B(lora_A(x))·scaling`` and the add;
* ``fused`` — ``torch.ops.peft_eora.gptq_lora_linear`` as users get it (the launch variant chosen
  per shape, ``device_figures.cuda_variants``), ``fused_v3`` the default variant alone (one
  launch, untuned); ``fused_int8`` with int8
  adapters; ``fused_two_pass`` (the two-launch CUDA variant); ``fused_triton`` (the Triton
  fallback for GPUs without nvcc, at the tiling its tuner kept: ``device_figures.triton_tilings``
  lists every candidate's time per call shape), ``base_triton`` (its GEMM alone) and
  ``fused_triton_default`` (the untuned tiling);
* the kernel's version-2 paths, each alone, for attribution: ``fused_lora_in_epilogue`` (the
  whole B·t on the last K slice, B read from L2, instead of the rank split over the K slices
  with B staged in shared memory) and ``base_prefetch_first_only`` / ``fused_prefetch_first_only``
  (L2 asked for a unit's weights up front only for a CTA's first unit when it shares phase 1,
  instead of at the start of every unit).

plus the bytes each fused call must move, the floor they set at the device-to-device copy
bandwidth measured in the same run, and the achieved GB/s; the issue's goals are evaluated
under ``goals``. The end-to-end decode benchmark (``benchmarks/decode.py``) runs after the
layers unless ``--no-e2e``.

    python benchmarks/kernel.py --out kernel.json           # GPU (H100/H200: ~2 min)
    python benchmarks/kernel.py --smoke                     # CPU: tiny shapes, checks the code paths

Without a GPU (and without ``--smoke``) it prints ``{"status": "skipped", "reason": ...}`` and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
from bench_common import environ  # noqa: E402

logger = logging.getLogger("peft_eora.benchmarks.kernel")

GOAL_SHAPES = ("4096x4096", "4096x14336", "14336x4096")


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


def _random_words(rows: int, cols: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Random int32 words (any word is a valid packing of codes)."""
    return torch.randint(-(2**31), 2**31 - 1, (rows, cols), generator=gen, dtype=torch.int64, device=device).to(
        torch.int32
    )


def _random_layer(k: int, n: int, r: int, bits: int, group: int, dtype: torch.dtype, device: torch.device,
                  gen: torch.Generator) -> dict[str, Any]:
    """Random packed GPTQ tensors and LoRA factors (float and int8) on ``device``."""
    from peft_eora.kernels.lowbit import quantize_lora_pair

    groups = math.ceil(k / group)
    layer = dict(
        qweight=_random_words(k * bits // 32, n, device, gen),
        qzeros=_random_words(groups, math.ceil(n * bits / 32), device, gen),
        scales=(torch.rand(groups, n, generator=gen, device=device) * 0.01 + 1e-3).to(dtype),
    )
    a = torch.randn(r, k, generator=gen, device=device) / math.sqrt(k)
    b = torch.randn(n, r, generator=gen, device=device) * 0.02
    layer["a"], layer["b"] = a.to(dtype), b.to(dtype)
    qa, qb = quantize_lora_pair(a, b, 8)
    layer["a8"], layer["b8"], layer["sa8"], layer["sb8"] = qa.data, qb.data, qa.scale, qb.scale
    return layer


def layer_bytes(k: int, n: int, bits: int, group: int, r: int, m: int, lora_bits: int = 16) -> int:
    """Bytes one fused call must read and write: packed weights, scales (fp16), zeros, A, B, x, y."""
    groups = math.ceil(k / group)
    weights = k * n * bits // 8 + groups * n * 2 + groups * math.ceil(n * bits / 32) * 4
    lora = (r * k + n * r) * (2 if lora_bits == 16 else 1) + ((r + n) * 4 if lora_bits != 16 else 0)
    return weights + lora + m * k * 2 + m * n * 2


def _time_gpu(fn: Callable[[int], Any], copies: int, iters: int, use_graph: bool = True) -> float:
    """Microseconds per call, cycling ``fn(i)`` over ``copies`` weight sets (CUDA graph replay)."""
    torch.cuda.synchronize()
    for i in range(copies):  # warm-up (JIT build, workspace allocation)
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
        reps = max(3, iters // copies)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        del graph
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


def copy_bandwidth_gbs(device: torch.device, mib: int = 1024) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s), mean of 10 copies."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del src, dst
    return 2 * n * 4 / seconds / 1e9


# ----------------------------------------------------------------------------------------------
# anchors: fp16 cuBLAS and stock-torch int4 (tinygemm)


def _anchor_fp16(k: int, n: int, copies: int, device: torch.device, gen: torch.Generator) -> list[torch.Tensor]:
    return [(torch.randn(n, k, generator=gen, device=device) * 0.02).half() for _ in range(copies)]


def _anchor_int4(k: int, n: int, copies: int, device: torch.device, gen: torch.Generator,
                 group: int = 128) -> Optional[list[tuple[torch.Tensor, torch.Tensor]]]:
    """tinygemm-packed int4 weights and bf16 scales/zeros, or None when this torch has none."""
    if device.type != "cuda" or not hasattr(torch, "_weight_int4pack_mm"):
        return None
    out = []
    for _ in range(copies):
        w = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int32, device=device).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(w, 8)
        sz = torch.empty(k // group, n, 2, device=device, dtype=torch.bfloat16)
        sz[..., 0].uniform_(1e-3, 1e-2, generator=gen)
        sz[..., 1].uniform_(-1e-2, 1e-2, generator=gen)
        out.append((packed, sz))
    return out


# ----------------------------------------------------------------------------------------------
# layer benchmark


def bench_layers(args: argparse.Namespace, device: torch.device,
                 rows: Optional[list[dict[str, Any]]] = None, meta: Optional[dict[str, Any]] = None,
                 on_row: Optional[Callable[[], None]] = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Time every shape × bits × rank × batch; ``rows``/``meta`` (filled in place) and ``on_row`` (called after each
    row) let the caller write what is measured so far (a run cut by a time limit keeps its rows)."""
    from peft_eora.kernels import ops
    from peft_eora.kernels.triton_gptq_lora import ENV_AUTOTUNE, interpreter_active, tuning_report

    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    rows = rows if rows is not None else []
    meta = meta if meta is not None else {}
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if cuda else 0
    meta["l2_bytes"] = l2
    if cuda:
        meta["copy_gbs"] = copy_bandwidth_gbs(device)
    base_backend = "cuda" if cuda else "torch"
    triton_ok = cuda or (args.smoke_triton and interpreter_active())

    def copies_for(nbytes: int) -> int:
        return min(args.max_copies, max(2, math.ceil(3 * l2 / nbytes))) if cuda else 2

    def timed(fn: Callable[[int], Any], copies: int) -> dict[str, Any]:
        try:
            if cuda:
                return dict(us=_time_gpu(fn, copies, args.iters))
            return dict(us=_time_cpu(fn, copies, args.iters))
        except Exception as exc:  # keep the rest of the table
            logger.warning("timing failed: %s", exc)
            return dict(error=f"{type(exc).__name__}: {exc}"[:300])

    for k, n in args.shapes:
        # anchors: independent of bits and rank
        c16 = copies_for(k * n * 2)
        dense = _anchor_fp16(k, n, c16, device, gen) if cuda else [torch.randn(n, k, generator=gen, device=device)
                                                                   for _ in range(2)]
        c4 = copies_for(k * n // 2)
        int4 = _anchor_int4(k, n, c4, device, gen) if k % 1024 == 0 else None
        anchors: dict[int, dict[str, Any]] = {}
        for m in args.batches:
            x16 = torch.randn(m, k, generator=gen, device=device).to(dtype)
            xbf = x16.to(torch.bfloat16)
            a = dict(fp16_linear=timed(lambda i: torch.nn.functional.linear(x16, dense[i % len(dense)]), len(dense)))
            if int4 is not None:
                a["int4_tinygemm"] = timed(lambda i: torch._weight_int4pack_mm(xbf, int4[i][0], 128, int4[i][1]), c4)
            anchors[m] = a
        del dense, int4
        if cuda:
            torch.cuda.empty_cache()
        for bits in args.bits:
            for r in args.ranks:
                copies = copies_for(k * n * bits // 8)
                layers = [_random_layer(k, n, r, bits, args.group_size, dtype, device, gen) for _ in range(copies)]
                for m in args.batches:
                    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
                    scaling = 2.0
                    kw = dict(bits=bits, group_size=args.group_size)

                    def base(i: int, backend: str = base_backend) -> torch.Tensor:
                        L = layers[i]
                        return ops.gptq_lora_linear_eager(x, L["qweight"], L["qzeros"], L["scales"], None, None, None,
                                                          None, None, None, backend=backend, **kw)

                    def unfused(i: int) -> torch.Tensor:
                        L = layers[i]
                        lora = torch.nn.functional.linear(torch.nn.functional.linear(x, L["a"]), L["b"]) * scaling
                        return base(i) + lora

                    def fused(i: int, backend: str = base_backend, lora_bits: int = 16) -> torch.Tensor:
                        L = layers[i]
                        if lora_bits == 8:
                            a_, b_, sa, sb = L["a8"], L["b8"], L["sa8"], L["sb8"]
                        else:
                            a_, b_, sa, sb = L["a"], L["b"], None, None
                        return ops.gptq_lora_linear_eager(x, L["qweight"], L["qzeros"], L["scales"], None, None, a_, b_,
                                                          sa, sb, lora_bits=lora_bits, scaling=scaling, backend=backend,
                                                          **kw)

                    row: dict[str, Any] = dict(shape=f"{k}x{n}", in_features=k, out_features=n, rank=r, batch=m,
                                               bits=bits, group_size=args.group_size,
                                               dtype=str(dtype).replace("torch.", ""), weight_copies=copies)
                    # correctness on this exact data: fused vs the torch path (dequantize + matmul)
                    ref = fused(0, backend="torch").float()
                    scale_ref = max(ref.abs().max().item(), 1e-6)
                    row["fused_rel_err_vs_torch"] = (fused(0).float() - ref).abs().max().item() / scale_ref
                    triton_here = triton_ok and bits in args.triton_bits
                    if triton_here:
                        try:
                            row["triton_rel_err_vs_torch"] = (
                                (fused(0, backend="triton").float() - ref).abs().max().item() / scale_ref)
                        except Exception as exc:
                            row["triton_error"] = f"{type(exc).__name__}: {exc}"[:300]
                    t: dict[str, Any] = dict(anchors[m])
                    t["base"] = timed(base, copies)
                    t["unfused"] = timed(unfused, copies)
                    t["fused"] = timed(fused, copies)
                    t["fused_int8"] = timed(lambda i: fused(i, lora_bits=8), copies)
                    if cuda:
                        with environ({ops.ENV_CUDA_AUTOTUNE: "0"}):  # the default variant, untuned
                            t["base_v3"] = timed(base, copies)
                            t["fused_v3"] = timed(fused, copies)
                        with environ({ops.ENV_TWO_PASS: "1"}):
                            t["fused_two_pass"] = timed(fused, copies)
                        with environ({ops.ENV_LORA_IN_EPILOGUE: "1"}):
                            t["fused_lora_in_epilogue"] = timed(fused, copies)
                        with environ({ops.ENV_PREFETCH_FIRST_ONLY: "1"}):
                            t["base_prefetch_first_only"] = timed(base, copies)
                            t["fused_prefetch_first_only"] = timed(fused, copies)
                    if triton_here and "triton_error" not in row:
                        t["fused_triton"] = timed(lambda i: fused(i, backend="triton"), copies)
                        t["base_triton"] = timed(lambda i: base(i, backend="triton"), copies)
                        if cuda:  # the tiling used without the tuner
                            with environ({ENV_AUTOTUNE: "0"}):
                                t["fused_triton_default"] = timed(lambda i: fused(i, backend="triton"), copies)
                    row["timings_us"] = {name: v.get("us") for name, v in t.items()}
                    errors = {name: v["error"] for name, v in t.items() if "error" in v}
                    if errors:
                        row["timing_errors"] = errors
                    row["bytes_fused"] = layer_bytes(k, n, bits, args.group_size, r, m)
                    row["bytes_fused_int8"] = layer_bytes(k, n, bits, args.group_size, r, m, lora_bits=8)
                    us = row["timings_us"]
                    if cuda and us.get("fused"):
                        row["floor_us_fused"] = row["bytes_fused"] / (meta["copy_gbs"] * 1e3)
                        row["achieved_gbs_fused"] = row["bytes_fused"] / (us["fused"] * 1e3)
                        row["bandwidth_fraction_fused"] = row["achieved_gbs_fused"] / meta["copy_gbs"]
                    rows.append(row)
                    if on_row is not None:
                        on_row()
                    logger.info("%s b%d r=%d M=%d: %s", row["shape"], bits, r, m,
                                {k2: round(v, 2) for k2, v in us.items() if v})
                del layers
                if cuda:
                    torch.cuda.empty_cache()
    if cuda:  # the launch variant the CUDA path kept per call shape, with every candidate's µs
        meta["cuda_variants"] = ops.CUDA_TUNER.report(ops.CUDA_TUNING_KEY)
    if triton_ok:  # the tiling the Triton tuner kept per call shape, with every candidate's µs
        meta["triton_tilings"] = tuning_report()
    return rows, meta


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, evaluated on the measured rows (None where a figure is missing)."""
    by = {(r["shape"], r["bits"], r["rank"], r["batch"]): r for r in rows}
    out: dict[str, Any] = {"batch1_r128": {}, "batch4_16_r128": {}, "triton": {}}
    for (shape, bits, rank, m), row in sorted(by.items()):
        if rank != 128:
            continue
        us = row["timings_us"]
        key = f"{shape}_b{bits}"
        if m == 1:
            g = dict(
                fused_over_int4=_ratio(us.get("fused"), us.get("int4_tinygemm")),
                unfused_over_fused=_ratio(us.get("unfused"), us.get("fused")),
                fp16_over_fused=_ratio(us.get("fp16_linear"), us.get("fused")),
                bandwidth_fraction=row.get("bandwidth_fraction_fused"),
                int8_fused_over_int4=_ratio(us.get("fused_int8"), us.get("int4_tinygemm")),
                int8_unfused_over_fused=_ratio(us.get("unfused"), us.get("fused_int8")),
                int8_fp16_over_fused=_ratio(us.get("fp16_linear"), us.get("fused_int8")),
                # what each v3 change of the CUDA kernel buys (> 1: v3 faster than its v2 path)
                v2_expand_over_v3=_ratio(us.get("fused_lora_in_epilogue"), us.get("fused_v3")),
                v2_prefetch_over_v3_fused=_ratio(us.get("fused_prefetch_first_only"), us.get("fused_v3")),
                v2_prefetch_over_v3_base=_ratio(us.get("base_prefetch_first_only"), us.get("base_v3")),
                # what the per-shape variant choice buys over the default variant (>= 1 up to noise)
                v3_over_tuned_fused=_ratio(us.get("fused_v3"), us.get("fused")),
            )
            g["met"] = dict(
                fused_le_1_25x_int4=None if g["fused_over_int4"] is None else g["fused_over_int4"] <= 1.25,
                ge_1_3x_faster_than_unfused=None if g["unfused_over_fused"] is None else g["unfused_over_fused"] >= 1.3,
                ge_1_6x_faster_than_fp16=None if g["fp16_over_fused"] is None else g["fp16_over_fused"] >= 1.6,
                bandwidth_ge_60pct=None if g["bandwidth_fraction"] is None else g["bandwidth_fraction"] >= 0.6,
            )
            out["batch1_r128"][key] = g
        else:
            one = by.get((shape, bits, rank, 1))
            f1 = one["timings_us"].get("fused") if one else None
            g = dict(fused_over_batch1=_ratio(us.get("fused"), f1),
                     fp16_over_fused=_ratio(us.get("fp16_linear"), us.get("fused")))
            g["met"] = dict(
                le_1_5x_batch1=None if g["fused_over_batch1"] is None else g["fused_over_batch1"] <= 1.5,
                faster_than_fp16=None if g["fp16_over_fused"] is None else g["fp16_over_fused"] > 1.0,
            )
            out["batch4_16_r128"][f"{key}_M{m}"] = g
        tri = _ratio(us.get("fused_triton"), us.get("fused"))
        if tri is not None:
            out["triton"][f"{key}_M{m}"] = dict(
                triton_over_fused=tri, met=tri <= 1.5,
                triton_base_over_cuda_base=_ratio(us.get("base_triton"), us.get("base")),
                default_tiling_over_tuned=_ratio(us.get("fused_triton_default"), us.get("fused_triton")))
    return out


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the JSON here (also printed)")
    p.add_argument("--shapes", type=_parse_shapes, default=_parse_shapes(",".join(GOAL_SHAPES)),
                   help="comma-separated in x out layer shapes")
    p.add_argument("--ranks", type=_ints, default=[128])
    p.add_argument("--batches", type=_ints, default=[1, 4, 16])
    p.add_argument("--bits", type=_ints, default=[4, 3], help="GPTQ code widths to time (comma-separated)")
    p.add_argument("--triton-bits", type=_ints, default=[4],
                   help="GPTQ widths at which the Triton fallback is timed (each width compiles its tilings)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--max-copies", type=int, default=48, help="weight copies cycled to defeat L2")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end decode benchmark")
    p.add_argument("--e2e-args", default="", help="extra arguments for benchmarks/decode.py (quoted string)")
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
        args.shapes, args.ranks, args.batches, args.iters, args.bits = [(256, 128)], [8], [1, 2], 3, [4, 3]
        args.triton_bits = [4, 3]
        args.group_size = 64
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
    from bench_common import Terminated, sigterm_raises, write_json_atomic

    def save(status: str) -> str:
        result["status"] = status
        result["goals"] = goals(result["layers"])
        result["layers_seconds"] = round(time.perf_counter() - t0, 1)
        text = json.dumps(result, indent=2)
        if args.out:
            write_json_atomic(args.out, text)
        return text

    t0 = time.perf_counter()
    result["layers"], result["device_figures"] = [], {}
    with sigterm_raises():  # a time limit's SIGTERM: the rows so far are kept (they are also written after each)
        try:
            bench_layers(args, device, result["layers"], result["device_figures"], on_row=lambda: save("partial"))
        except Terminated:
            logger.warning("SIGTERM after %d rows: writing them", len(result["layers"]))
            return save("timed_out")
        save("partial")
        if args.e2e:
            import decode

            try:
                e2e_argv = (["--smoke"] if args.smoke else []) + [a for a in args.e2e_args.split() if a]
                result["e2e"] = decode.run(e2e_argv)
            except Terminated:
                result["e2e"] = dict(error="timed out (SIGTERM)")
                return save("timed_out")
            except Exception as exc:
                logger.warning("end-to-end benchmark failed", exc_info=True)
                result["e2e"] = dict(error=f"{type(exc).__name__}: {exc}")
    return save("ok")


if __name__ == "__main__":
    sys.exit(main())
