"""Nsight Compute probe of the fused CUDA kernel: duration, DRAM throughput and occupancy per variant.

Two modes. Run under ``ncu`` (GPU), it calls the op once per (shape, variant) after a warm-up call
each, at batch 1, r = 128, 4-bit g128, and writes the launch order; ``--parse`` then joins that order
with ncu's CSV into one JSON (the measured launch of each pair, not its warm-up):

    ncu --clock-control none -k regex:gptq_lora_kernel --metrics gpu__time_duration.sum,\\
        dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,\\
        launch__registers_per_thread,launch__grid_size --csv --log-file ncu.csv \\
        python benchmarks/ncu_probe.py --order ncu_order.json
    python benchmarks/ncu_probe.py --parse ncu.csv --order ncu_order.json --out ncu.json

Variants: ``base`` (no adapter), ``fused`` (the kernel's default launch variant, the per-shape tuner
off) and ``fused_v2_paths``
(its version-2 expand and prefetch, ``PEFT_EORA_CUDA_LORA_IN_EPILOGUE=1`` +
``PEFT_EORA_CUDA_PREFETCH_FIRST_ONLY=1``). ``benchmarks/gpu_check.sh`` runs both steps. Without a
GPU the first mode prints ``{"status": "skipped", ...}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environ, write_json_atomic  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
VARIANTS = ("base", "fused", "fused_v2_paths")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--order", required=True, help="launch order JSON (written when probing, read with --parse)")
    p.add_argument("--parse", metavar="CSV", help="join ncu's CSV with the launch order instead of probing")
    p.add_argument("--out", help="with --parse: write the joined JSON here (also printed)")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--bits", type=int, default=4)
    return p


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Call every (shape, variant) twice (warm-up, measured); return the launch order."""
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device: ncu profiles GPU kernels"}
    from kernel import _random_layer

    from peft_eora.kernels import ops

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    order: list[dict[str, Any]] = []
    for k, n in SHAPES:
        layer = _random_layer(k, n, args.rank, args.bits, 128, torch.float16, device, gen)
        x = torch.randn(1, k, generator=gen, device=device).half()
        for variant in VARIANTS:
            a, b = (None, None) if variant == "base" else (layer["a"], layer["b"])
            v2 = "1" if variant == "fused_v2_paths" else None
            # untuned: the tuner's own trial launches would be profiled too and break the join by order
            with environ({ops.ENV_LORA_IN_EPILOGUE: v2, ops.ENV_PREFETCH_FIRST_ONLY: v2, ops.ENV_CUDA_AUTOTUNE: "0"}):
                for role in ("warmup", "measured"):
                    ops.gptq_lora_linear_eager(x, layer["qweight"], layer["qzeros"], layer["scales"], None, None,
                                               a, b, None, None, bits=args.bits, group_size=128, scaling=2.0,
                                               backend="cuda")
                    torch.cuda.synchronize()
                    order.append(dict(shape=f"{k}x{n}", variant=variant, role=role))
        del layer
    return {"status": "ok", "rank": args.rank, "bits": args.bits, "batch": 1, "launches": order}


def _number(text: str) -> Any:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


#: ncu scales time units to the value unless run with ``--print-units base``: durations in ns either way
_TIME_UNITS_NS = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6, "s": 1e9,
                  "second": 1e9}


def _in_base_unit(value: Any, unit: str) -> Any:
    """``value`` in ns where ``unit`` is a time unit (ncu may report ``usecond``), else unchanged."""
    scale = _TIME_UNITS_NS.get(unit.strip())
    return value * scale if scale is not None and isinstance(value, float) else value


def parse(csv_path: str, order: dict[str, Any]) -> dict[str, Any]:
    """ncu's CSV (one row per launch and metric, launches in order) joined with the probe's order."""
    if order.get("status") != "ok":  # the probe did not run (no GPU): nothing to join
        return order
    metrics: dict[str, dict[str, Any]] = {}
    with open(csv_path, newline="") as fh:
        lines = [ln for ln in fh if ln.startswith('"')]  # drop ncu's own ==PROF== chatter
    for row in csv.DictReader(lines):
        entry = metrics.setdefault(row["ID"], {"kernel": row.get("Kernel Name", "")})
        entry[row["Metric Name"]] = _in_base_unit(_number(row["Metric Value"]), row.get("Metric Unit", ""))
    launches = [metrics[key] for key in sorted(metrics, key=int)]
    expected = order.get("launches", [])
    if len(launches) != len(expected):
        return {"status": "error", "reason": f"ncu profiled {len(launches)} launches, the probe made {len(expected)}"}
    rows = [dict(**meta, **m) for meta, m in zip(expected, launches) if meta["role"] == "measured"]
    for row in rows:
        row.pop("role")
    return {"status": "ok", "rank": order.get("rank"), "bits": order.get("bits"), "batch": order.get("batch"),
            "rows": rows}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parse:
        result = parse(args.parse, json.loads(Path(args.order).read_text()))
        text = json.dumps(result, indent=2)
        if args.out:
            write_json_atomic(args.out, text)
    else:
        result = probe(args)
        text = json.dumps(result, indent=2)
        write_json_atomic(args.order, text)
    print(text)
    return 0 if result["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
