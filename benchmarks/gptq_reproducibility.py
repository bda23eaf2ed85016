"""Is gptqmodel's GPTQ reproducible on this machine? Quantize the same model several times, each in
a fresh process, and compare every saved tensor bit for bit (JSON).

    python benchmarks/gptq_reproducibility.py                        # 2 SmolLM2 layers, 3 runs per mode
    python benchmarks/gptq_reproducibility.py --modes default one-thread --runs 4 --out /tmp/repro.json

Modes (set in the child process before torch or gptqmodel is imported):

- ``default``: as ``quantize_gptq`` runs it (gptqmodel's CPU pool of 2 workers; torch's intra-op
  threads = cores).
- ``one-thread``: ``OMP_NUM_THREADS=MKL_NUM_THREADS=1`` and ``torch.set_num_threads(1)``: every
  torch op runs on one thread, whatever gptqmodel's pool does.
- ``serial-modules``: gptqmodel's pool runs the modules of a layer one after the other
  (``DeviceThreadPool.submit`` → ``submit_serial``), torch threads as in ``default``.

A mode is reproducible when all its runs give one hash per tensor. The report names, per mode,
the tensors that differ and the first layer where they do, and each run's digest (the same digest
in two modes: thread count and module order do not change the result). ``--reference DIR``
also hashes an existing checkpoint (e.g. the cached one the recovery tables use) and says which
runs reproduce it bit for bit:

    python benchmarks/gptq_reproducibility.py --layers 0 --samples 128 --modes default --runs 2 \
        --reference ~/.cache/peft_eora/models/smollm2-135m-instruct-float16-gptq-w3g128
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_json_atomic  # noqa: E402

MODES = ("default", "one-thread", "serial-modules")
logger = logging.getLogger("gptq_reproducibility")


def _child(mode: str, out_dir: str, layers: int, bits: int, samples: int, seq_len: int) -> None:
    """Quantize once in this process and print {tensor name: sha256} as JSON."""
    if mode == "one-thread":
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    if mode == "one-thread":
        torch.set_num_threads(1)
    from peft_eora.embedded import export_original
    from peft_eora.quantize import quantize_gptq
    from peft_eora.quantize.gptqmodel_run import import_gptqmodel

    import_gptqmodel()
    if mode == "serial-modules":
        from gptqmodel.utils.threadx import DeviceThreadPool

        DeviceThreadPool.submit = DeviceThreadPool.submit_serial
    src = export_original(torch.float16, num_layers=layers)
    start = time.perf_counter()
    folder = quantize_gptq(src, bits=bits, group_size=128, num_samples=samples, seq_len=seq_len, out_dir=out_dir)
    seconds = time.perf_counter() - start
    hashes = hash_checkpoint(folder)
    print("RESULT " + json.dumps({"hashes": hashes, "seconds": round(seconds, 1), "threads": torch.get_num_threads()}))


def hash_checkpoint(folder: str | Path) -> dict[str, str]:
    """{tensor name: sha256 prefix of its bytes} over every safetensors file of ``folder``."""
    import torch
    from safetensors import safe_open

    hashes: dict[str, str] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                hashes[name] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return hashes


def digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def _run_child(mode: str, args: argparse.Namespace, folder: Path, timeout: float) -> Optional[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--child", mode, str(folder), "--layers", str(args.layers), "--bits",
           str(args.bits), "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        logger.warning("%s: timed out after %.0f s", mode, timeout)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    logger.warning("%s: failed (rc %d): %s", mode, proc.returncode, proc.stderr[-2000:])
    return None


def _layer_of(name: str) -> int:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return -1


def compare(runs: list[dict[str, str]]) -> dict[str, Any]:
    """Which tensors differ between runs (bit for bit), and where the first difference appears."""
    names = sorted(runs[0])
    differing = [n for n in names if len({r.get(n) for r in runs}) > 1]
    layers = sorted({_layer_of(n) for n in differing})
    distinct = len({digest(r) for r in runs})
    return {
        "runs": len(runs),
        "identical_runs": distinct == 1,
        "distinct_checkpoints": distinct,
        "tensors": len(names),
        "differing_tensors": len(differing),
        "first_differing_layer": layers[0] if layers else None,
        "differing_examples": differing[:8],
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of SmolLM2-135M kept (0: all 30)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per quantization run")
    p.add_argument("--reference", default=None, help="an existing checkpoint folder to compare every run with")
    p.add_argument("--out", default=None)
    p.add_argument("--child", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child[0], args.child[1], args.layers or None, args.bits, args.samples, args.seq_len)
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    from peft_eora.quantize.checkpoints import machine_metadata

    report: dict[str, Any] = {
        "model": f"SmolLM2-135M-Instruct, {args.layers or 30} layers, fp16 export",
        "gptq": f"gptqmodel, {args.bits}-bit g128, {args.samples}x{args.seq_len} C4 tokens",
        "machine": machine_metadata(),
        "modes": {},
    }
    reference = hash_checkpoint(Path(args.reference).expanduser()) if args.reference else None
    if reference is not None:
        report["reference"] = {"folder": args.reference, "digest": digest(reference), "tensors": len(reference)}
    for mode in args.modes:
        results = []
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                res = _run_child(mode, args, Path(tmp) / "q", args.timeout)
            if res is None:
                break
            logger.info("%s run %d: %.1f s", mode, i + 1, res["seconds"])
            results.append(res)
        entry: dict[str, Any] = {"seconds": [r["seconds"] for r in results],
                                 "torch_threads": results[0]["threads"] if results else None,
                                 "digests": [digest(r["hashes"]) for r in results]}
        if reference is not None:
            entry["reproduces_reference"] = [r["hashes"] == reference for r in results]
            entry["vs_reference"] = [compare([reference, r["hashes"]]) for r in results]
        if len(results) == args.runs:
            entry.update(compare([r["hashes"] for r in results]))
        else:
            entry["error"] = f"{len(results)} of {args.runs} runs finished"
        report["modes"][mode] = entry
    text = json.dumps(report, indent=2)
    if args.out:
        write_json_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
