"""Compile the Triton kernels ahead of time for a GPU architecture, without a GPU (used by test_kernels).

    python tests/triton_aot.py 90        # prints {"compiled": n, "failures": [...]} as JSON

Run it in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces the JIT functions).
Every tiling the tuner may pick is compiled at the decode shapes for 4-bit float16 and 3-bit bfloat16
weights, with and without an adapter, and act-order where the tiling applies, and its epilogue.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from peft_eora.kernels import triton_gptq_lora as tg  # noqa: E402


def _signature(fn, types: dict[str, str], consts: dict) -> ASTSource:
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    return ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})


def compile_all(arch: int) -> dict:
    target = GPUTarget("cuda", arch, 32)
    done, failures = 0, []
    for cfg in tg.CANDIDATES:
        m = 1 if cfg.gemv else 16
        for bits, dt in ((4, "fp16"), (3, "bf16")):  # both widths' code paths, both half dtypes
            for act_order in (False, True):
                if not cfg.applies(m, act_order):
                    continue
                for lora in (True, False):
                    pl = tg.plan(m, 4096, 4096, 128 if lora else 0, 128, act_order, 132, False, cfg)
                    consts = dict(BITS=bits, HAS_GIDX=act_order, HAS_BIAS=False, FINAL=not lora, HAS_LORA=lora,
                                  LORA_BITS=16, DOT_FP32=False, A_GROUP=0, FACTOR_ZEROS=pl["factor_zeros"],
                                  DEFER=pl["defer"], BLOCK_M=pl["block_m"], BLOCK_N=pl["block_n"],
                                  BLOCK_K=pl["block_k"], BLOCK_R=pl["block_r"], BLOCK_KA=pl["block_ka"])
                    ptr = "*" + dt
                    types = dict(x_ptr=ptr, qw_ptr="*i32", qz_ptr="*i32", sc_ptr=ptr, gidx_ptr="*i32", bias_ptr=ptr,
                                 out_ptr=ptr, part_ptr=ptr if not lora else "*fp32", a_ptr=ptr, tpart_ptr="*fp32",
                                 ascale_ptr="*fp32")
                    what = f"{cfg.name} b{bits} {dt}{' act-order' if act_order else ''}{' lora' if lora else ''}"
                    try:
                        triton.compile(_signature(tg._partials_kernel, types, consts), target=target,
                                       options=dict(num_warps=pl["num_warps"], num_stages=pl["num_stages"]))
                        done += 1
                    except Exception as exc:  # report every failure, not the first
                        failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        for dt in ("fp16", "bf16"):
            consts = dict(HAS_LORA=True, LORA_BITS=16, HAS_BIAS=True, A_GROUPED=False, BLOCK_M=1 if cfg.gemv else 16,
                          BLOCK_N=cfg.epilogue_block_n, BLOCK_R=cfg.epilogue_block_r)
            ptr = "*" + dt
            types = dict(part_ptr="*fp32", tpart_ptr="*fp32", b_ptr=ptr, ascale_ptr="*fp32", bscale_ptr="*fp32",
                         bias_ptr=ptr, out_ptr=ptr, scaling="fp32")
            try:
                triton.compile(_signature(tg._epilogue_kernel, types, consts), target=target, options=dict(num_warps=4))
                done += 1
            except Exception as exc:
                failures.append(f"epilogue {cfg.name} {dt}: {type(exc).__name__}: {str(exc)[:300]}")
    return dict(compiled=done, failures=failures)


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)))
