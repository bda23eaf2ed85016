"""Timings of the linear algebra EoRA spends its time in, at Llama-3-8B sizes (JSON out).

The choices in :mod:`peft_eora.decompose` (which decomposition, which precision) rest on
these figures: per matrix size, ``eigh`` and Cholesky in float64 and float32, the Gram
eigendecomposition behind the truncated SVD and its top-128 by subspace iteration
(:func:`peft_eora.topeig.top_eigh`, on a flat and a steep spectrum, and on a ridge between them
from a random start and from the two ends' Ritz blocks, as ``damping="auto"`` starts it), randomized SVD, the covariance product
``XᵀX`` over 64k calibration tokens in float32, TF32 and bf16-in/fp32-out, and what
``adapter_bits=4`` adds per layer: fitting an r = 128 pair to the int4 grid
(:func:`peft_eora.factor_quant.fit_lowbit_factors`, its column-by-column GPTQ loops) and one GPTQ
pass over ``A`` alone; a layer's statistics (weighted error before and after its factors) as two
calls and in one pass.

    python benchmarks/linalg.py --out linalg.json            # GPU (~30 s on an H200)
    python benchmarks/linalg.py --smoke                      # CPU, small sizes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    def run(fn: Callable[[], Any], reps: int) -> float:
        fn()  # warm-up (workspace, kernels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    return run


def _spd(n: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(2 * n, n, generator=gen, device=device, dtype=torch.float32)
    x = x * torch.logspace(0, -3, n, device=device)  # a decaying spectrum, like activations
    h = (x.T @ x).to(dtype)
    return h + 1e-2 * h.diagonal().mean() * torch.eye(n, device=device, dtype=dtype)


def probe(sizes: list[int], out_rows: int, tokens: int, device: torch.device, reps: int,
          save: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Timings per size (``res[str(n)]``); ``save(res)`` after each size, so a run stopped by its time
    limit keeps the sizes it finished."""
    from peft_eora import topeig
    from peft_eora.decompose import SCORE_TOL, CovarianceRoot, weighted_error, weighted_errors
    from peft_eora.factor_quant import fit_lowbit_factors, gptq_round
    from peft_eora.kernels.lowbit import factor_group_size

    gen = torch.Generator(device=device).manual_seed(0)
    t = _timer(device)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for n in sizes:
        row: dict[str, Any] = {}
        H64 = _spd(n, device, torch.float64, gen)
        H32 = H64.float()
        row["eigh_fp64_s"] = t(lambda: torch.linalg.eigh(H64), reps)
        row["eigh_fp32_s"] = t(lambda: torch.linalg.eigh(H32), reps)
        row["eigvalsh_fp64_s"] = t(lambda: torch.linalg.eigvalsh(H64), reps)
        row["cholesky_fp64_s"] = t(lambda: torch.linalg.cholesky_ex(H64), reps)
        row["cholesky_fp32_s"] = t(lambda: torch.linalg.cholesky_ex(H32), reps)
        L = torch.linalg.cholesky(H64)
        A = torch.randn(128, n, generator=gen, device=device, dtype=torch.float64)
        row["solve_triangular_r128_fp64_s"] = t(lambda: torch.linalg.solve_triangular(L.T, A.T, upper=True), reps)
        D = torch.randn(out_rows, n, generator=gen, device=device, dtype=torch.float64)
        row["residual_times_L_fp64_s"] = t(lambda: D @ L, reps)
        # a layer's statistics (its weighted error before and after r = 128 factors) from a Cholesky root:
        # two weighted_error calls against weighted_errors' one pass
        root = CovarianceRoot(S=L, shift=1e-2 * float(H64.diagonal().mean()))
        Bs = torch.randn(out_rows, 128, generator=gen, device=device, dtype=torch.float32) * 1e-2
        As = A.float()
        row["stats_two_calls_fp64_s"] = t(lambda: (weighted_error(D, root), weighted_error(D, root, Bs @ As)), reps)
        row["stats_one_pass_fp64_s"] = t(lambda: weighted_errors(D, root, Bs, As), reps)
        del root, Bs, As
        G = D @ D.T if out_rows <= n else D.T @ D
        row["gram_dim"] = G.shape[0]
        row["gram_eigh_fp64_s"] = t(lambda: torch.linalg.eigh(G), reps)
        row["gram_eigh_fp32_s"] = t(lambda: torch.linalg.eigh(G.float()), reps)
        # the truncated SVDs' top-r eigenpairs (r = 128 at 8B sizes) without a full eigh (peft_eora.topeig), on this
        # flat Gram (quantisation-noise-like) and on a steep one (activation-like column scales)
        Ds = D * torch.logspace(0, -3, n, device=device, dtype=torch.float64)
        Gs = Ds @ Ds.T if out_rows <= n else Ds.T @ Ds
        del Ds
        r_top = row["gram_top_rank"] = min(128, G.shape[0] // 4)
        bases = {}
        for tag, M in (("", G), ("_steep", Gs)):
            info: dict = {}
            found = topeig.top_eigh(M, r_top, info=info)
            bases[tag] = info["basis"]
            row[f"gram_top_eigh{tag}_products_steps"] = [info["products"], info["steps"]]
            row[f"gram_top_eigh{tag}_fp64_s"] = t(lambda: topeig.top_eigh(M, r_top), reps)
            # the CPU's products per Rayleigh–Ritz step (4) against the device default, and the step's
            # small eigh solved on the host (PEFT_EORA_TOPEIG_HOST_RR=1)
            row[f"gram_top_eigh{tag}_step4_fp64_s"] = t(lambda: topeig.top_eigh(M, r_top, step_products=4), reps)
            saved, topeig.HOST_RAYLEIGH_RITZ = topeig.HOST_RAYLEIGH_RITZ, True
            try:
                row[f"gram_top_eigh{tag}_host_rr_fp64_s"] = t(lambda: topeig.top_eigh(M, r_top), reps)
            finally:
                topeig.HOST_RAYLEIGH_RITZ = saved
            if tag:
                row[f"gram_eigh{tag}_fp64_s"] = t(lambda: torch.linalg.eigh(M), reps)
            if found is None:
                row[f"gram_top_eigh{tag}_converged"] = False
            else:
                ref = torch.linalg.eigvalsh(M).flip(0)[:r_top]
                row[f"gram_top_eigh{tag}_max_rel_err"] = float((found[0] - ref).abs().max() / ref[0])
        # damping="auto"'s ridge candidates: a mid ridge of the pencil steep + δ·flat (G₀ + δ·m·G₁) from a
        # random start and from the span of the two ends' Ritz blocks (decompose._RidgeStarts), and
        # from them to the looser bound that only scores a candidate (decompose.SCORE_TOL)
        if all(b is not None for b in bases.values()) and 2 * topeig.block_size(G.shape[0], r_top) <= G.shape[0]:
            Gm = Gs + (0.3 * float(Gs.trace() / G.trace())) * G
            start = torch.cat([bases["_steep"], bases[""]], dim=1)
            row["score_tol"] = SCORE_TOL
            for tag, kw in (("cold", {}), ("warm", {"start": start}), ("warm_score", {"start": start, "tol": SCORE_TOL})):
                info = {}
                topeig.top_eigh(Gm, r_top, info=info, **kw)
                row[f"gram_top_eigh_ridge_{tag}_products_steps"] = [info["products"], info["steps"]]
                row[f"gram_top_eigh_ridge_{tag}_fp64_s"] = t(lambda: topeig.top_eigh(Gm, r_top, **kw), reps)
            del Gm, start
        del Gs, bases
        # its Rayleigh–Ritz step: eigh of the block's q × q projection (q = 192 at r = 128), on the
        # device and on the host (a candidate for the latency-bound small eigh)
        q = topeig.block_size(G.shape[0], r_top)
        T = G[:q, :q].contiguous()
        row["rayleigh_ritz_dim"] = q
        row["small_eigh_fp64_s"] = t(lambda: torch.linalg.eigh(T), reps)
        row["small_eigh_fp64_host_s"] = t(lambda: torch.linalg.eigh(T.cpu()), reps)
        row["svd_lowrank_q160_niter4_fp64_s"] = t(lambda: torch.svd_lowrank(D, q=160, niter=4), reps)
        row["svd_lowrank_q160_niter4_fp32_s"] = t(lambda: torch.svd_lowrank(D.float(), q=160, niter=4), reps)
        X = torch.randn(tokens, n, generator=gen, device=device, dtype=torch.bfloat16)
        row["cov_tokens"] = tokens
        row["cov_fp32_s"] = t(lambda: X.float().T @ X.float(), reps)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        row["cov_tf32_s"] = t(lambda: X.float().T @ X.float(), reps)
        torch.backends.cuda.matmul.allow_tf32 = old
        try:
            row["cov_bf16_in_fp32_out_s"] = t(lambda: torch.mm(X.T, X, out_dtype=torch.float32), reps)
        except Exception as exc:  # older torch: no out_dtype
            row["cov_bf16_in_fp32_out_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        # adapter_bits=4: an r=128 pair (A: 128 × n, B: out_rows × 128) fitted to the int4 grid
        A32, B32 = A.float(), torch.randn(out_rows, 128, generator=gen, device=device)
        row["fit_lowbit_int4_r128_s"] = t(lambda: fit_lowbit_factors(A32, B32, H64, 4), 1)
        row["gptq_round_int4_A_r128_s"] = t(lambda: gptq_round(A32, H64, 4, factor_group_size("lora_A", 4, n)), 1)
        res[str(n)] = row
        if n == sizes[0]:  # a k/v projection's Gram matrix (out = in / 4: 1024² at 8B), under the
            # iteration's 2048 threshold today: eigh against top_eigh decides where that belongs
            Dk = D[: max(out_rows // 4, 8)]
            Gk = Dk @ Dk.T
            rk = min(128, Gk.shape[0] // 4)
            res["kv_gram"] = dict(dim=Gk.shape[0], rank=rk, eigh_fp64_s=t(lambda: torch.linalg.eigh(Gk), reps),
                                  top_eigh_fp64_s=t(lambda: topeig.top_eigh(Gk, rk), reps))
            del Dk, Gk
        if save is not None:
            save(res)
        del H64, H32, L, A, D, G, X, A32, B32, M, T
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import write_json_atomic

    def save(res: dict[str, Any]) -> None:  # a run cut short leaves a file that says so
        if args.out:
            write_json_atomic(args.out, json.dumps(dict(res, status="partial"), indent=2))

    if args.smoke:  # 160: a Gram matrix wide enough for two blocks
        res = probe([96, 160], 128, 512, torch.device("cpu"), 1, save)
    elif torch.cuda.is_available():
        res = probe([4096, 14336], 4096, 65536, torch.device("cuda"), args.reps, save)
    else:
        res = {"status": "skipped", "reason": "no CUDA device (use --smoke on CPU)"}
    res.setdefault("status", "ok")
    text = json.dumps(res, indent=2)
    if args.out:
        write_json_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
