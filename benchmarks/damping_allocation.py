"""Damping and rank-allocation study: fixed δ vs ``damping="auto"``, uniform vs spectrum ranks.

    python benchmarks/damping_allocation.py                       # 2-layer SmolLM2 GPTQ 3-bit (~2-4 min on 2 cores)
    python benchmarks/damping_allocation.py --model full --ranks 64 --calib-samples 32 --seq-len 512 \\
        --eval-seq-len 512 --eval-windows 16 --perplexity --out benchmarks/results/damping_allocation_full

Models: ``tiny`` is the test fixture (first 2 decoder layers of the embedded SmolLM2-135M-Instruct
exported in float32, GPTQ w3 g128 by gptqmodel on 8×64 C4 tokens; built and cached on first use);
``full`` is the whole SmolLM2-135M-Instruct (fp16 export, GPTQ w3 g128, as benchmarks/recovery.py).
Both are loaded with fp16 GPTQ scales and float32 compute.

Calibration: ``--calib-samples`` × ``--seq-len`` tokens from documents 0-127 of the shipped C4
validation sample (shuffled, seed 0): the same windows for every configuration. Metric: relative
error ``‖h − h_orig‖ / ‖h_orig‖`` of the decoder's final (normed) hidden states against the
original model's, on ``--eval-windows`` × ``--eval-seq-len`` tokens of: C4 documents 128-255
(in domain, never calibrated on), WikiText-2 test and GSM8K test (question + answer) (out of
domain; from ``../shared/data`` when present, else the shipped WikiText-2 head and no GSM8K).
``--perplexity`` adds perplexity on the same windows (meaningless for the 2-layer model).

Configurations, each at every ``--ranks`` r: GPTQ alone; plain SVD; EoRA with each fixed δ of
``--dampings`` (0 = textbook EoRA, no damping); EoRA ``damping="auto"``; and with each
``--allocations`` (``rank_allocation="spectrum"``/``"spectrum_absolute"``) at the parameter count
of uniform r (``--alloc-dampings``, plus SVD). Writes ``<out>.json`` and ``<out>.md``;
``seconds`` is wall-clock of the whole EoRA step (the allocation's statistics pass included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

logger = logging.getLogger("damping_allocation")

Damping = Union[float, str]


def parse_damping(text: str) -> Damping:
    return "auto" if text == "auto" else float(text)


def load_models(which: str) -> tuple[Path, Path]:
    """(original checkpoint dir, GPTQ 3-bit checkpoint dir), built and cached on first use."""
    from peft_eora.embedded import export_original
    from peft_eora.quantize import quantize_gptq

    if which == "tiny":  # the tests' fixture (tests/conftest.py): same cache entries
        original_dir = export_original(torch.float32, num_layers=2)
        return original_dir, quantize_gptq(original_dir, bits=3, group_size=128, num_samples=8, seq_len=64)
    original_dir = export_original(torch.float16)
    return original_dir, quantize_gptq(original_dir, bits=3, group_size=128)


def c4_split(workdir: Path) -> tuple[Path, Path]:
    """The shipped 256-document C4 sample split into calibration (docs 0-127) and held-out (128-255) files."""
    from peft_eora.eval.perplexity import BUILTIN_TEXTS

    lines = BUILTIN_TEXTS["c4"].read_text(encoding="utf-8").splitlines()
    calib, held = workdir / "c4_calib.jsonl", workdir / "c4_heldout.jsonl"
    calib.write_text("\n".join(lines[:128]) + "\n", encoding="utf-8")
    held.write_text("\n".join(lines[128:]) + "\n", encoding="utf-8")
    return calib, held


def eval_sets(tokenizer, held_c4: Path, seq_len: int, windows: int) -> dict[str, torch.Tensor]:
    from peft_eora.eval import load_text, make_windows

    wiki = SHARED / "wikitext2" / "wiki.test.raw"
    gsm = SHARED / "gsm8k" / "test.jsonl"
    sources = {"c4": load_text(held_c4), "wikitext2": load_text(wiki if wiki.exists() else "wikitext2")}
    if gsm.exists():
        sources["gsm8k"] = load_text(gsm, field="question+answer")
    else:
        logger.warning("no GSM8K text at %s: skipped", gsm)
    out = {}
    for name, text in sources.items():
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        out[name] = make_windows(ids, seq_len, windows)
    return out


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (no LM head) of a causal LM, a PeftModel or a LoraModel."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


@torch.no_grad()
def hidden(model: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    dec = decoder(model)
    return torch.cat([dec(input_ids=w).last_hidden_state.float() for w in windows.split(batch_size)])


def rel_errors(model, refs: dict[str, torch.Tensor], sets: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    return {name: round(float((hidden(model, w, batch_size) - refs[name]).norm() / refs[name].norm()), 5)
            for name, w in sets.items()}


def lora_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--dampings", type=parse_damping, nargs="*", default=[0.0, 1e-3, 1e-2, 1e-1, 1.0, "auto"],
                    help="fixed ridges and/or 'auto' for the uniform-rank EoRA rows")
    ap.add_argument("--alloc-dampings", type=parse_damping, nargs="*", default=[1e-2, "auto"],
                    help="dampings of the rank_allocation='spectrum' rows (empty: no allocation rows)")
    ap.add_argument("--allocations", nargs="+", default=["spectrum"], choices=["spectrum", "spectrum_absolute"],
                    help="rank_allocation values of the allocation rows")
    ap.add_argument("--rank-min", type=int, default=None, help="rank_min of the allocation rows")
    ap.add_argument("--no-svd", action="store_true", help="skip the plain-SVD rows")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--perplexity", action="store_true", help="also measure perplexity (full model)")
    ap.add_argument("--out", default=None, help="output path without suffix (default benchmarks/results/damping_allocation[_full])")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        "damping_allocation" if args.model == "tiny" else "damping_allocation_full")

    from bench_common import scratch_dir
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_eora import CalibrationConfig, EoRAConfig, initialize_eora_weights
    from peft_eora.calibration import load_calibration_tokens
    from peft_eora.quantize import load_quantized

    original_dir, qdir = load_models(args.model)
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    workdir = scratch_dir("peft-eora-damping-")
    calib_file, held_file = c4_split(workdir)
    calib = load_calibration_tokens(
        CalibrationConfig(dataset=str(calib_file), num_samples=args.calib_samples, seq_len=args.seq_len, seed=0), tokenizer
    )
    sets = eval_sets(tokenizer, held_file, args.eval_seq_len, args.eval_windows)
    original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
    refs = {name: hidden(original, w, args.batch_size) for name, w in sets.items()}
    ppl_ref = None
    if args.perplexity:
        from peft_eora.eval import perplexity_on_windows

        ppl_ref = {n: round(perplexity_on_windows(original, w, batch_size=args.batch_size, progress=False), 4)
                   for n, w in sets.items()}
    del original
    qmodel = load_quantized(qdir, dtype=torch.float16, compute_dtype=torch.float32)

    results: dict[str, Any] = {
        "model": {"tiny": "SmolLM2-135M-Instruct, first 2 decoder layers (float32 export), GPTQ w3 g128 (gptqmodel, 8x64 C4 tokens)",
                  "full": "SmolLM2-135M-Instruct (fp16 export), GPTQ w3 g128 (gptqmodel)"}[args.model],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_1min_start": round(os.getloadavg()[0], 2)},
        "calibration": {"data": "C4 validation sample, documents 0-127", "num_samples": args.calib_samples,
                        "seq_len": args.seq_len, "tokens": int(calib.numel())},
        "evaluation": {"metric": "relative error of the final hidden states vs the original model",
                       "sets": {n: list(w.shape) for n, w in sets.items()},
                       "c4": "documents 128-255 (in domain, held out)"},
        "perplexity_original": ppl_ref,
        "rows": [],
    }

    def measure(label: str, rank: Optional[int], cfg: Optional[dict[str, Any]]) -> None:
        nonlocal qmodel
        start = time.perf_counter()
        model, stats = qmodel, None
        if cfg is not None:
            # init_eora=False: computed once, below (with method="svd" get_peft_model would compute it already)
            model = get_peft_model(qmodel, EoRAConfig(r=rank, original_model=str(original_dir), init_eora=False, **cfg))
            stats = initialize_eora_weights(model, calibration=calib, batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {"config": label, "rank": rank, **(cfg or {}), "lora_params": lora_params(model),
                               "rel_error": rel_errors(model, refs, sets, args.batch_size),
                               "seconds": round(seconds, 2) if cfg is not None else None}
        if args.perplexity:
            from peft_eora.eval import perplexity_on_windows

            row["perplexity"] = {n: round(perplexity_on_windows(model, w, batch_size=args.batch_size, progress=False), 4)
                                 for n, w in sets.items()}
        if stats is not None:
            summary = model.peft_config["default"].eora_stats
            if "damping_counts" in summary:
                row["damping_counts"] = summary["damping_counts"]
                row["damping_per_module"] = summary["damping_per_module"]
            if "rank_allocation" in summary:
                row["allocation"] = summary["rank_allocation"]
                ranks = {m.name: m.rank for m in stats.modules}
                row["ranks"] = ranks
            qmodel = model.unload()
        results["rows"].append(row)
        logger.info("%s r=%s: %s (%.1f s)", label, rank, row["rel_error"], seconds)
        write(results, out)

    measure("gptq", None, None)
    for rank in args.ranks:
        if not args.no_svd:
            measure("svd", rank, {"method": "svd"})
        for d in args.dampings:
            measure(f"eora δ={d}" if d != "auto" else "eora auto", rank, {"damping": d})
        for alloc in args.allocations:
            if args.alloc_dampings and not args.no_svd:
                measure(f"svd + {alloc}", rank, {"method": "svd", "rank_allocation": alloc, "rank_min": args.rank_min})
            for d in args.alloc_dampings:
                label = f"eora δ={d} + {alloc}" if d != "auto" else f"eora auto + {alloc}"
                measure(label, rank, {"damping": d, "rank_allocation": alloc, "rank_min": args.rank_min})
    results["machine"]["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    write(results, out)


def write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sets = list(results["evaluation"]["sets"])
    ppl = results.get("perplexity_original") is not None
    head = ["config", "r", "LoRA params"] + [f"{s} rel. err." for s in sets]
    head += [f"{s} ppl" for s in sets] if ppl else []
    head += ["seconds", "notes"]
    lines = [
        f"# Damping and rank allocation: {results['model']}",
        "",
        f"Calibration: {results['calibration']['num_samples']}×{results['calibration']['seq_len']} tokens "
        f"({results['calibration']['data']}). Metric: {results['evaluation']['metric']} (lower is better); "
        f"sets {results['evaluation']['sets']}, C4 = {results['evaluation']['c4']}. "
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}, torch {results['machine']['torch']}.",
        "",
    ]
    if ppl:
        lines += [f"Original model perplexity: {results['perplexity_original']}", ""]
    if results.get("notes"):
        lines += [results["notes"], ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        notes = []
        if "damping_counts" in row:
            notes.append("δ chosen: " + ", ".join(f"{k}×{v}" for k, v in row["damping_counts"].items()))
        if "allocation" in row:
            a = row["allocation"]
            notes.append(f"ranks {a['min_rank']}–{a['max_rank']}, energy {a['configured_captured_energy']:.3f}→{a['captured_energy']:.3f}")
        cells = [row["config"], str(row["rank"] or "-"), f"{row['lora_params']:,}"]
        cells += [f"{row['rel_error'][s]:.4f}" for s in sets]
        cells += [f"{row['perplexity'][s]:.3f}" for s in sets] if ppl else []
        cells += [str(row["seconds"] if row["seconds"] is not None else "-"), "; ".join(notes)]
        lines.append("| " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
