"""Ours vs gptqmodel's own EoRA (``GPTQModel.adapter.generate``), same model, rank and tokens.

    python benchmarks/gptqmodel_side_by_side.py                  # 2-layer SmolLM2, GPTQ 3-bit (CPU-sized)
    python benchmarks/gptqmodel_side_by_side.py --layers 0 --calib-samples 32 --seq-len 512   # full model

gptqmodel's EoRA only runs in bfloat16/float16 on CPU (its ``TorchLinear`` refuses float32).
On a CPU without AVX512-BF16/AMX, bfloat16 matmuls are ~30× slower than float32 and the full
30-layer model takes hours; with AVX512-BF16 it takes minutes, and ``benchmarks/recovery.py
--gptqmodel-ranks ...`` compares full-model perplexities. This script compares hidden-state errors
of the first ``--layers`` decoder layers of the embedded model, GPTQ 3-bit g128, in minutes on
either kind of CPU. Both adapters are evaluated the same way: loaded
onto the same quantized model, float32 compute, relative error of the last hidden state against
the original model on held-out C4 documents (not in the calibration set) and WikiText-2, and the
perplexity of the truncated model on WikiText-2 windows (comparative only: a 2-layer model is not
a language model). Our EoRA runs twice: float32 (our CPU default) and bfloat16 forwards (the
dtype gptqmodel uses), so the compute times compare like for like.

Writes ``benchmarks/results/gptqmodel_side_by_side.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import scratch_dir  # noqa: E402
from recovery import REPO, SHARED, measure, run_gptqmodel_eora  # noqa: E402

logger = logging.getLogger("side_by_side")


def hidden_error(model, reference: list[torch.Tensor], windows: torch.Tensor, batch_size: int) -> float:
    """Relative Frobenius error of the final hidden states against ``reference``."""
    num = den = 0.0
    with torch.no_grad():
        for i, ref in zip(range(0, len(windows), batch_size), reference):
            out = model(input_ids=windows[i : i + batch_size], output_hidden_states=True).hidden_states[-1].float()
            num += (out - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
    return (num / den) ** 0.5


def final_hidden(model, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=windows[i : i + batch_size], output_hidden_states=True).hidden_states[-1].float()
                for i in range(0, len(windows), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="first N decoder layers of the embedded model (0 = all)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-bf16", action="store_true", help="skip our bfloat16 run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gptqmodel_side_by_side"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_eora import CalibrationConfig, EoRAConfig, initialize_eora_weights
    from peft_eora.calibration import load_calibration_tokens
    from peft_eora.config import DEFAULT_DAMPING
    from peft_eora.embedded import export_original
    from peft_eora.eval import load_text, make_windows, perplexity_on_windows
    from peft_eora.quantize import load_quantized, quantize_gptq

    layers = args.layers or None
    dtype = torch.float32 if layers else torch.float16
    original_dir = export_original(dtype, num_layers=layers) if layers else export_original(dtype)
    qdir = (quantize_gptq(original_dir, bits=args.bits, group_size=128, num_samples=8, seq_len=64) if layers
            else quantize_gptq(original_dir, bits=args.bits, group_size=128))
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    spec = CalibrationConfig(dataset="builtin:c4", num_samples=args.calib_samples, seq_len=args.seq_len, seed=0)
    calib = load_calibration_tokens(spec, tokenizer)

    # held-out C4: documents of the 2k-document C4 sample in ../shared that are not in the shipped 256
    shipped = {json.loads(line)["text"] for line in
               (REPO / "src" / "peft_eora" / "data" / "c4_validation_256.jsonl").read_text().splitlines() if line.strip()}
    c4 = [json.loads(line)["text"] for line in (SHARED / "c4" / "c4_validation_2k.jsonl").read_text().splitlines()]
    held = "\n\n".join([t for t in c4 if t not in shipped][-60:])
    wiki = load_text(SHARED / "wikitext2" / "wiki.test.raw") if (SHARED / "wikitext2").exists() else load_text("wikitext2")
    sets = {}
    for name, text in (("c4_heldout", held), ("wikitext2", wiki)):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        sets[name] = make_windows(ids, args.seq_len, args.eval_windows)
    calib_set = {tuple(w.tolist()) for w in calib}
    overlap = sum(tuple(w.tolist()) in calib_set for w in sets["c4_heldout"])
    if overlap:
        raise SystemExit(f"{overlap} held-out windows are calibration windows; pick other documents")

    original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
    refs = {name: final_hidden(original, w, args.batch_size) for name, w in sets.items()}
    del original
    qmodel = load_quantized(qdir, dtype=torch.float16, compute_dtype=torch.float32)

    def evaluate(model) -> dict[str, float]:
        row = {f"{name}_rel_err": round(hidden_error(model, refs[name], w, args.batch_size), 5) for name, w in sets.items()}
        row["wikitext2_ppl"] = round(perplexity_on_windows(model, sets["wikitext2"], batch_size=args.batch_size, progress=False), 3)
        return row

    rows: list[dict[str, Any]] = [{"method": "gptq (no adapter)", **evaluate(qmodel)}]

    def ours(model):
        pm = get_peft_model(model, EoRAConfig(r=args.rank))
        initialize_eora_weights(pm, original_model=str(original_dir), calibration=calib, batch_size=args.batch_size,
                                progress=False)
        return pm

    for compute in [torch.float32] + ([] if args.no_bf16 else [torch.bfloat16]):
        # loading (and gptqmodel's kernel compilation) stays outside the timed step, as for gptqmodel's
        # own EoRA below, whose timing starts from paths on disk (it loads both models inside: not excluded)
        model = qmodel if compute == torch.float32 else load_quantized(qdir, dtype=torch.float16, compute_dtype=compute)
        if compute != torch.float32:
            model(input_ids=calib[:1, :8])  # warm-up: compile the bf16 kernel path
        pm, seconds, peak = measure(lambda: ours(model))
        if compute != torch.float32:  # evaluate the factors on the float32 model like the others
            weights = {k: v.float() for k, v in pm.state_dict().items() if ".lora_" in k}
            pm = get_peft_model(qmodel, EoRAConfig(r=args.rank))
            pm.load_state_dict(weights, strict=False)
        row = {"method": f"peft-eora ({str(compute).split('.')[-1]} forwards)", **evaluate(pm),
               "seconds": round(seconds, 1), "peak_rss_mib": round(peak)}
        rows.append(row)
        logger.info("%s", row)
        qmodel = pm.unload()

    work = scratch_dir("side-by-side-")
    path, seconds, peak = measure(lambda: run_gptqmodel_eora(original_dir, qdir, args.rank, calib, tokenizer, work))
    pm = PeftModel.from_pretrained(qmodel, path)
    rows.append({"method": "gptqmodel EoRA (bfloat16)", **evaluate(pm), "seconds": round(seconds, 1),
                 "peak_rss_mib": round(peak)})
    logger.info("%s", rows[-1])

    results = {
        "model": f"SmolLM2-135M-Instruct, first {args.layers or 30} decoder layers, GPTQ {args.bits}-bit g128 (gptqmodel)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_1min_end": round(os.getloadavg()[0], 2)},
        "rank": args.rank, "damping": DEFAULT_DAMPING,
        "calibration": {"data": "peft_eora/data/c4_validation_256.jsonl", "windows": int(calib.shape[0]),
                        "seq_len": args.seq_len, "tokens": int(calib.numel())},
        "evaluation": {n: {"windows": int(w.shape[0]), "seq_len": args.seq_len} for n, w in sets.items()},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    cols = ["c4_heldout_rel_err", "wikitext2_rel_err", "seconds", "peak_rss_mib"]  # ppl of 2 layers: JSON only
    md = [f"# peft-eora vs gptqmodel EoRA: {results['model']}", "",
          f"Rank {args.rank}, {calib.numel()} calibration tokens ({calib.shape[0]}×{args.seq_len}, shipped C4 sample); "
          f"machine: {platform.platform()}, {os.cpu_count()} CPUs. Errors: relative error of the final hidden state "
          "vs the original model (lower is better); all adapters evaluated on the same float32 model.", "",
          "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    md += ["| " + r["method"] + " | " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
