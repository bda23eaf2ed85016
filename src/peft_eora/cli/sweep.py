"""``peft-eora sweep``: ranks × methods — compute, evaluate, write JSON, a markdown table and a plot.

    peft-eora sweep --embedded --ranks 16 32 64 128 --methods eora svd --ppl wikitext2 --out-dir sweep-w3
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from ..safe_files import atomic_write, atomic_write_text
from .compute import (
    calibration_from_args,
    calibration_summary,
    check_calibration,
    check_run_options,
    compute_adapter,
    eora_config,
    models_from_args,
    residual_original,
    target_modules,
)
from .evaluate import check_eval_inputs, evaluate, expected_metrics, flat_metrics
from .models import (
    checkpoint_parameter_count,
    count_lora_parameters,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from .options import CLIError, add_calibration, add_eora, add_evaluation, add_model_pair, output_folder

logger = logging.getLogger("peft_eora.cli")

SWEEP_FILES = ("sweep.json", "sweep.md", "sweep.png")


def add_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``sweep`` verb's parser (a subparser of ``peft-eora``)."""
    p = subparsers.add_parser(
        "sweep", parents=[common], help="Ranks × methods: compute, evaluate, write JSON + markdown table + plot.",
        description="For every method and rank: compute an adapter, evaluate it, and compare with the compressed and "
        "original models. Writes sweep.json, sweep.md and sweep.png into --out-dir.",
    )  # fmt: skip
    add_model_pair(p)
    add_eora(p, sweep=True)
    add_calibration(p)
    add_evaluation(p)
    p.add_argument("--out-dir", required=True, help="Folder for sweep.json, sweep.md, sweep.png and adapters/.")
    p.add_argument("--no-save-adapters", action="store_true", help="Do not keep the computed adapters.")
    p.add_argument("--skip-original", action="store_true", help="Do not evaluate the original (uncompressed) model.")
    p.add_argument(
        "--plot-metric", default=None,
        help="Metric to plot, e.g. 'ppl/wikitext2' or 'arc_easy/acc_norm' (default: the first one measured).",
    )  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="Skip the PNG plot (no matplotlib needed).")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every method × rank: compute, evaluate; write sweep.json, sweep.md, sweep.png."""
    original_spec, compressed_spec = models_from_args(args)
    check_eval_inputs(args)
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise CLIError("The sweep plot needs matplotlib: pip install 'peft-eora[plot]' (or pass --no-plot).") from exc
    expected = expected_metrics(args)
    if args.plot_metric is not None and args.plot_metric not in expected:
        raise CLIError(f"--plot-metric {args.plot_metric}: not measured by this sweep; choose from {expected}.")
    out_dir = output_folder(args.out_dir, "--out-dir")
    calibration = calibration_from_args(args)
    device = pick_device(args.device)  # these refuse before a model is quantized, smoothed or loaded
    check_run_options(args, device)
    original = resolve_model(original_spec, "Original")
    compressed = resolve_model(compressed_spec, "Compressed")
    # the adapters' residual reads this (an AWQ model's: the original in its coordinates); the "original" row
    # and the parameter count keep the original as given
    reference = residual_original(original, compressed)
    for method in args.methods:  # validates every option combination before any work
        eora_config(args, args.ranks[0], method, reference, calibration)
    tokenizer = load_tokenizer(original, compressed)
    if "eora" in args.methods:
        check_calibration(calibration, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_original = checkpoint_parameter_count(original)
    rows: list[dict[str, Any]] = []

    def summary(complete: bool) -> dict[str, Any]:
        return {
            "original": str(original), "compressed": str(compressed), "original_parameters": n_original,
            "calibration": calibration_summary(calibration),
            "methods": args.methods, "ranks": sorted(set(args.ranks)), "damping": args.damping,
            "target_modules": target_modules(args.target_modules), "complete": complete, "rows": rows,
        }  # fmt: skip

    def write(complete: bool) -> None:  # after every row: a run stopped part-way keeps what it measured
        atomic_write_text(out_dir / "sweep.json", json.dumps(summary(complete), indent=2, default=str) + "\n")
        atomic_write_text(out_dir / "sweep.md", sweep_markdown(rows))

    def record(label: str, kind: str, method: Optional[str], rank: int, model, params: int, seconds=None, adapter=None):
        logger.info("Evaluating %s", label)
        result = evaluate(model, tokenizer, args)
        rows.append({
            "label": label, "kind": kind, "method": method, "rank": rank, "lora_parameters": params,
            "lora_parameters_pct": 100.0 * params / n_original if n_original else None,
            "compute_seconds": None if seconds is None else round(seconds, 2), "adapter": adapter,
            "metrics": flat_metrics(result), "result": result,
        })  # fmt: skip
        write(complete=False)

    if not args.skip_original:
        model = load_model(original, device, args.dtype)
        record("original", "original", None, 0, model, 0)
        del model
    model = load_model(compressed, device, args.dtype)
    record("compressed", "compressed", None, 0, model, 0)
    del model
    runs = [(m, r) for m in args.methods for r in sorted(set(args.ranks))]
    for i, (method, rank) in enumerate(runs, 1):
        logger.info("[%d/%d] %s r=%d", i, len(runs), method, rank)
        config = eora_config(args, rank, method, reference, calibration)
        model, seconds = compute_adapter(args, compressed, config, device, tokenizer)
        adapter = None
        if not args.no_save_adapters:
            adapter = str(out_dir / "adapters" / f"{method}-r{rank}")
            model.save_pretrained(adapter)
        record(f"{method} r={rank}", "adapter", method, rank, model, count_lora_parameters(model), seconds, adapter)
        del model
        gc.collect()
    write(complete=True)
    files = {"json": str(out_dir / "sweep.json"), "markdown": str(out_dir / "sweep.md")}
    if not args.no_plot:
        metric = args.plot_metric or expected[0]
        sweep_plot(rows, metric, out_dir / "sweep.png")
        files["plot"] = str(out_dir / "sweep.png")
    logger.info("Sweep written to %s", out_dir)
    return {"files": files, "rows": [{k: v for k, v in r.items() if k != "result"} for r in rows]}


def sweep_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per model (original, compressed, each adapter), one column per metric."""
    metrics = list(rows[0]["metrics"]) if rows else []
    head = ["model", "rank", "LoRA params", "% of original"] + metrics
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        pct = row.get("lora_parameters_pct")
        cells = [
            row["label"],
            str(row["rank"]) if row["kind"] == "adapter" else "–",
            f"{row['lora_parameters']:,}",
            f"{pct:.2f} %" if pct is not None else "–",
        ]
        for m in metrics:
            value = row["metrics"].get(m)
            cells.append("–" if value is None else f"{value:.2f}" if m.startswith("ppl/") else f"{value:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_plot(rows: Sequence[dict[str, Any]], metric: str, path: Path) -> None:
    """PNG with two panels: ``metric`` vs rank and vs extra (LoRA) parameters, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in rows if r["kind"] == "adapter"})
    for ax, xkey, xlabel in ((axes[0], "rank", "rank r"), (axes[1], "lora_parameters", "extra (LoRA) parameters")):
        for method in methods:
            points = sorted((r[xkey], r["metrics"][metric]) for r in rows if r["method"] == method and metric in r["metrics"])
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        for row, style in ((r, s) for r in rows for k, s in (("original", "--"), ("compressed", ":")) if r["kind"] == k):
            if metric in row["metrics"]:
                ax.axhline(row["metrics"][metric], linestyle=style, color="grey", label=row["label"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    axes[0].legend()
    fig.suptitle(f"EoRA sweep: {metric}")
    fig.tight_layout()
    try:  # atomically, with the umask's mode as sweep.json gets (a temporary file is private)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")
    finally:
        plt.close(fig)
