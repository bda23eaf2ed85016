"""Registers, spills and stack of every instantiation of the fused CUDA kernel, read off ptxas (JSON).

No GPU needed: nvcc compiles ``cuda/gptq_lora_kernel.cuh`` for every activation dtype, code width
and batch variant the extension builds (``__half``/``__nv_bfloat16`` × 2/3/4/8 bits × ``MAXM`` 8/16)
with ``-Xptxas -v`` and this parses what ptxas reports. The register count bounds how many CTAs an
SM holds at once (``ctas_per_sm_by_registers``; the kernel asks for 4 per SM, 2 for 8-bit codes,
in its ``__launch_bounds__``), and spills put local-memory traffic in the loop — both explain what
Nsight Compute later measures on a GPU (``ncu_probe.py``: registers, warps active).

    python benchmarks/kernel_resources.py --out kernel_resources.json        # sm_90, all 16 (~40 s)
    python benchmarks/kernel_resources.py --arch 80 --bits 4 --dtypes half   # a subset
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
CUDA_DIR = REPO / "cuda"
DTYPES = {"half": "__half", "bfloat16": "__nv_bfloat16"}
BITS = (2, 3, 4, 8)
MAXM = (8, 16)
THREADS = 128  # kThreads in gptq_lora_kernel.cuh
REGISTERS_PER_SM = 65536
MAX_CTAS_PER_SM = 16  # 64 resident warps / 4 warps per CTA (sm_80, sm_90)

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
# mangled name of gptq_lora_kernel<T, BITS, MAXM>: ...I6__halfLi4ELi8EE... / ...I13__nv_bfloat16Li4ELi16EE...
_ARGS = re.compile(r"gptq_lora_kernelI(?:\d+)(__half|__nv_bfloat16)Li(\d+)ELi(\d+)EE")


def _source(dtypes: list[str], bits: list[int], maxm: list[int]) -> str:
    lines = ['#include "gptq_lora_kernel.cuh"', "namespace peft_eora {"]
    lines += [f"template __global__ void gptq_lora_kernel<{DTYPES[d]}, {b}, {m}>(const Params);"
              for d in dtypes for b in bits for m in maxm]
    return "\n".join(lines + ["}  // namespace peft_eora", ""])


def ctas_per_sm(registers: int) -> int:
    """Resident CTAs of :data:`THREADS` threads an SM's register file allows (registers are
    allocated per warp in units of 256, i.e. per thread rounded up to 8)."""
    per_thread = -(-registers // 8) * 8
    return min(MAX_CTAS_PER_SM, REGISTERS_PER_SM // (per_thread * THREADS))


def parse(ptxas_output: str) -> list[dict[str, Any]]:
    """One row per compiled entry: dtype, bits, max_m, registers, spills, stack, static smem."""
    rows: list[dict[str, Any]] = []
    row: Optional[dict[str, Any]] = None
    entry = properties = None  # the entry being compiled; whose properties the next lines give
    for line in ptxas_output.splitlines():
        if (m := _ENTRY.search(line)) is not None:
            entry = properties = m.group(1)
            args = _ARGS.search(entry)
            row = None
            if args is not None:
                dtype = "half" if args.group(1) == "__half" else "bfloat16"
                row = dict(dtype=dtype, bits=int(args.group(2)), max_m=int(args.group(3)), arch=f"sm_{m.group(2)}")
                rows.append(row)
        elif (m := _PROPERTIES.search(line)) is not None:
            properties = m.group(1)  # a called function's frame is not the kernel's
        elif row is not None and properties == entry and (m := _FRAME.search(line)) is not None:
            row.update(stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
        elif row is not None and (m := _USED.search(line)) is not None:
            row["registers"] = int(m.group(1))
            row["ctas_per_sm_by_registers"] = ctas_per_sm(row["registers"])
            s = _SMEM.search(line)
            row["static_smem_bytes"] = int(s.group(1)) if s else 0
    return sorted(rows, key=lambda r: (r["dtype"], r["bits"], r["max_m"]))


def run(arch: str, dtypes: list[str], bits: list[int], maxm: list[int]) -> dict[str, Any]:
    try:  # the extension's own search (CUDA_HOME, then PATH)
        from peft_eora.kernels.cuda_ext import find_nvcc
        nvcc = find_nvcc() or shutil.which("nvcc")
    except ImportError:
        nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {"status": "skipped", "reason": "nvcc not found"}
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel_resources.cu"
        src.write_text(_source(dtypes, bits, maxm))
        cmd = [nvcc, "-std=c++20", "-O3", f"-arch=sm_{arch}", "-I", str(CUDA_DIR), "-Xptxas", "-v", "-c", str(src),
               "-o", str(Path(tmp) / "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"status": "error", "command": " ".join(cmd), "stderr": proc.stderr[-4000:]}
    rows = parse(proc.stderr + proc.stdout)
    return {"status": "ok", "nvcc": version, "arch": f"sm_{arch}", "threads_per_cta": THREADS,
            "spilling": [f"{r['dtype']} {r['bits']}-bit max_m={r['max_m']}" for r in rows if r.get("spill_store_bytes")],
            "kernels": rows}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90", help="compute capability without the dot (90: H100/H200)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--bits", nargs="+", type=int, default=list(BITS), choices=BITS)
    p.add_argument("--max-m", nargs="+", type=int, default=list(MAXM), choices=MAXM)
    p.add_argument("--out")
    args = p.parse_args(argv)
    res = run(args.arch, args.dtypes, args.bits, args.max_m)
    text = json.dumps(res, indent=2)
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_common import write_json_atomic

        write_json_atomic(args.out, text)
    print(text)
    return 0 if res["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
