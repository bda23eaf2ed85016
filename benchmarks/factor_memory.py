"""Peak memory of one layer's factor step beyond its inputs (JSON).

The factor step of the largest layer (the Llama-3-8B ``down_proj``: 4096 × 14336, so 14336² input
covariances) sets the peak memory of an EoRA run on top of the model. This times
``eora_factors_auto`` (``--damping auto``, the default) or ``eora_factors`` at a fixed ridge on a
random residual and well-conditioned random covariances, and reports the peak memory it adds over
its inputs, also in units of one ``in × in`` float64 matrix::

    python benchmarks/factor_memory.py                          # the 8B down_proj on the CPU (~3 min)
    python benchmarks/factor_memory.py --damping 0.01 --device cuda --out mem.json
    python benchmarks/factor_memory.py --dead-channels 16        # an ill-conditioned H: the eigh routes

CPU: the process's high-water mark (Linux ``/proc/self/status``, reset first) and the most tensor
bytes alive at once (``tensor_peak_over_inputs_gib``, :class:`bench_common.LiveTensorPeak`: no heap
pages, no LAPACK workspaces); CUDA: ``torch.cuda.max_memory_allocated``. ``--dead-channels k``: the
first ``k`` input channels never fire, so ``H`` is singular and the routes that decompose it run.
Inputs: ``H_fit``, ``H_val`` (float32) and the residual; at a fixed ridge the step also builds
``H_fit + H_val`` (float32), as a single covariance would be. ``--adapter-bits 8`` (or 4) then
rounds the factors as ``EoRAConfig(adapter_bits=8)`` does (``fit_lowbit_factors`` against the
pair at the chosen ridge), the peak of each phase reported apart::

    python benchmarks/factor_memory.py --adapter-bits 8 --damping 0.01
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import LiveTensorPeak, PeakRSS, json_main  # noqa: E402


def _covariance(n: int, seed: int, device: torch.device, dead: int = 0) -> torch.Tensor:
    """A full-rank, strongly anisotropic ``n × n`` covariance, cheap to build: a low-rank part shared
    by every ``seed`` (so fit and held-out tokens agree, and a finite ridge wins), a smaller one of
    this seed's own, and the identity."""
    shared = torch.randn(n, 256, generator=torch.Generator().manual_seed(0)) * 10
    own = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed + 1)) * 10
    U = torch.cat([shared, own], dim=1).to(device)
    H = U @ U.T
    H.diagonal().add_(1.0)
    if dead:
        H[:dead] = 0
        H[:, :dead] = 0
    return H


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--in-features", type=int, default=14336)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--damping", default="auto", help="'auto' or a fixed ridge")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dead-channels", type=int, default=0, help="input channels that never fire (H singular)")
    p.add_argument("--adapter-bits", type=int, default=16, choices=(16, 8, 4),
                   help="then round the factors as EoRAConfig(adapter_bits=...) does: fit_lowbit_factors "
                        "against the covariance at the chosen ridge, aimed at the residual")
    p.add_argument("--out", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)

    from peft_eora import decompose
    from peft_eora.decompose import eora_factors, eora_factors_auto
    from peft_eora.factor_quant import fit_lowbit_factors

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return {"status": "skipped", "reason": "--device cuda needs a CUDA device"}
    if device.type == "cpu" and not Path("/proc/self/status").exists():
        return {"status": "skipped", "reason": "the CPU high-water mark needs Linux /proc"}
    n = args.in_features
    H_fit, H_val = _covariance(n, 0, device, args.dead_channels), _covariance(n, 1, device, args.dead_channels)
    delta = (torch.randn(args.out_features, n, generator=torch.Generator().manual_seed(2)) * 0.01).to(device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss = PeakRSS() if device.type == "cpu" else contextlib.nullcontext()
    live = None
    if device.type == "cpu":
        decompose.DAMPING_WORKERS = 1  # the ridges scored in this thread, where LiveTensorPeak sees them
        live = LiveTensorPeak(label=lambda: phase)
    phase = "factors"
    start = time.perf_counter()
    round_seconds = None
    with rss, live if live is not None else contextlib.nullcontext():
        if args.damping == "auto":
            factors, choice = eora_factors_auto(delta, H_fit, H_val, args.rank)
            chosen: Any = choice.damping
        else:
            chosen = float(args.damping)
            factors = eora_factors(delta, H_fit + H_val, args.rank, damping=chosen)
        rounded: tuple[torch.Tensor, ...] = ()
        cuda_phases: dict[str, float] = {}
        if args.adapter_bits != 16:  # as compensate does: against the pair at the chosen ridge (none: plain SVD)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                cuda_phases["factors"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
            phase, t0 = "round", time.perf_counter()
            svd = chosen == float("inf")
            rounded = fit_lowbit_factors(factors.A, factors.B, None if svd else (H_fit, H_val), args.adapter_bits,
                                         target=delta, damping=0.0 if svd else chosen)
            round_seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if cuda_phases:  # the rounding's peak over the inputs (the factors, a few MiB, included)
            cuda_phases["round"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        over = max([torch.cuda.max_memory_allocated(device) - base] + [v * 2**30 for v in cuda_phases.values()])
    else:
        over = rss.rise_mib * 2**20
    seconds = time.perf_counter() - start
    result = {
        "status": "ok",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "shape": [args.out_features, n],
        "rank": args.rank,
        "damping": args.damping,
        "chosen_damping": chosen if chosen != float("inf") else "inf (plain SVD)",
        "seconds": round(seconds, 1),
        "dead_channels": args.dead_channels,
        "adapter_bits": args.adapter_bits,
        "round_seconds": None if round_seconds is None else round(round_seconds, 1),
        "peak_over_inputs_gib": round(over / 2**30, 3),
        "tensor_peak_over_inputs_gib": round(live.peak_bytes / 2**30, 4) if live is not None else None,
        "tensor_in_x_in_float64_units": round(live.peak_bytes / (n * n * 8), 2) if live is not None else None,
        "in_x_in_float64_units": round(over / (n * n * 8), 2),
        # the most tensor bytes alive in each phase (CPU) or each phase's peak (CUDA, with --adapter-bits)
        "peak_by_phase_gib": ({k: round(v / 2**30, 4) for k, v in live.by_label.items()} if live is not None
                              else {k: round(v, 3) for k, v in cuda_phases.items()} or None),
        "finite": all(bool(torch.isfinite(t).all()) for t in (factors.A, factors.B, *rounded)),
    }
    return result


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(build_parser, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
