"""The ``peft_eora::gptq_lora_linear`` custom operator (``torch.library``), dispatching CUDA → Triton → torch.

    >>> import torch
    >>> from peft_eora.kernels import ops
    >>> y = torch.ops.peft_eora.gptq_lora_linear(
    ...     x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_b, None, None,
    ...     bits=4, group_size=128, scaling=1.0)  # doctest: +SKIP

computes ``x·dequant(W) + scaling·(x·Aᵀ)·Bᵀ + bias`` (see
:func:`~peft_eora.kernels.reference.gptq_lora_linear_reference` for the exact contract;
``lora_a``/``lora_b`` may be None for the plain quantized GEMM). The op has a fake (meta)
implementation, so ``torch.compile(fullgraph=True)`` traces through it, and its CUDA path is
a single kernel launch with no host synchronisation, so it can be captured in CUDA graphs.
It is inference-only (no autograd formula).

Backend choice (``backend="auto"``, or the ``PEFT_EORA_BACKEND`` environment variable):

* CUDA tensors: the JIT-built CUDA kernel for decode batches (≤ 16 rows, ``in % 32 == 0``, ``out % 4 == 0``,
  float16/bfloat16), else the Triton kernel, else dequantize + matmul in torch;
* CPU tensors: torch, or the Triton kernel in the interpreter when asked for
  (``backend="triton"`` with ``TRITON_INTERPRET=1`` set before Triton was imported).

An explicitly requested backend that cannot run raises ``RuntimeError`` with the reason.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Optional

import torch
from torch import Tensor

from . import cuda_ext
from .reference import check_bits, gptq_lora_linear_torch
from .tuning import Tuner

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "CUDA_TUNER",
    "ENV_BACKEND",
    "ENV_CUDA_AUTOTUNE",
    "ENV_LORA_IN_EPILOGUE",
    "ENV_PREFETCH_FIRST_ONLY",
    "ENV_TWO_PASS",
    "gptq_lora_linear",
    "gptq_lora_linear_eager",
    "requested_backend",
    "select_backend",
    "triton_available",
    "cuda_kernel_supports",
]

BACKENDS: tuple[str, ...] = ("auto", "cuda", "triton", "torch")
ENV_BACKEND = "PEFT_EORA_BACKEND"
#: ``1`` makes the CUDA path use two launches (A·x, then GEMV + B·t) instead of the in-kernel barrier.
ENV_TWO_PASS = "PEFT_EORA_CUDA_TWO_PASS"
#: ``1`` keeps the whole low-rank expand B·t in the last K slice's epilogue (the kernel's version 2)
#: instead of splitting the rank over the K slices with B staged in shared memory (side-by-side timing).
ENV_LORA_IN_EPILOGUE = "PEFT_EORA_CUDA_LORA_IN_EPILOGUE"
#: ``1`` asks L2 for a unit's weights up front only where the kernel's version 2 did (the first unit
#: of a CTA sharing phase 1) instead of at the start of every unit (side-by-side timing).
ENV_PREFETCH_FIRST_ONLY = "PEFT_EORA_CUDA_PREFETCH_FIRST_ONLY"
#: ``0`` turns off the choice of the CUDA kernel's launch variant per call shape (see ``CUDA_TUNER``):
#: every call then takes the default (one launch, the version-3 paths).
ENV_CUDA_AUTOTUNE = "PEFT_EORA_CUDA_AUTOTUNE"
# kOpt* flags of cuda/gptq_lora_kernel.cuh
_OPT_TWO_PASS = 1
_OPT_LORA_IN_EPILOGUE = 2
_OPT_PREFETCH_FIRST_ONLY = 4
_OPT_NAMES = {_OPT_TWO_PASS: "two_pass", _OPT_LORA_IN_EPILOGUE: "lora_in_epilogue",
              _OPT_PREFETCH_FIRST_ONLY: "prefetch_first_only"}
#: Launch variants timed at the first call of each shape (all compute the same result up to the
#: order of the low-rank sums): with an adapter, the default, each version-2 path, both, and the
#: two-launch mode; without one, the two L2 prefetch policies.
CUDA_VARIANTS_LORA = (0, _OPT_LORA_IN_EPILOGUE, _OPT_PREFETCH_FIRST_ONLY,
                      _OPT_LORA_IN_EPILOGUE | _OPT_PREFETCH_FIRST_ONLY, _OPT_TWO_PASS)
CUDA_VARIANTS_BASE = (0, _OPT_PREFETCH_FIRST_ONLY)


def describe_options(options: int) -> str:
    """``"default"`` or the kernel option flags joined by ``+`` (e.g. ``"lora_in_epilogue"``)."""
    return "+".join(name for bit, name in _OPT_NAMES.items() if options & bit) or "default"


#: The CUDA kernel's per-shape variant choice (``CUDA_TUNER.report(...)`` lists what it chose).
CUDA_TUNER = Tuner("CUDA GPTQ", ENV_CUDA_AUTOTUNE, 0, describe=describe_options)
CUDA_TUNING_KEY = ("device", "dtype", "m", "n", "k", "rank", "bits", "group_size", "act_order", "lora_bits")
CUDA_MAX_M = 16
CUDA_MAX_RANK = (256 - 2) * 8

_workspaces: dict[int, Tensor] = {}
# Every workspace ever handed to a kernel stays alive: a CUDA graph captured with an older
# (smaller) one keeps its pointer, so growing must never free it.
_retired_workspaces: list[Tensor] = []
_ws_lock = threading.Lock()
#: int32 words allocated at least (covers M = 16, r = 256 with the maximal K splits).
_WS_MIN_INTS = 256 + 4096 + 16 * 256 * 32 + 1024 * 16 * 32


@functools.lru_cache(maxsize=1)
def _cpu_triton_usable() -> bool:
    from . import triton_gptq_lora

    problem = triton_gptq_lora.interpreter_problem()
    if problem is not None:  # said once per process
        logger.warning("Triton on CPU is off, the torch path runs instead: %s", problem)
    return problem is None


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on ``device`` (GPU build, or the interpreter on CPU)."""
    try:
        from . import triton_gptq_lora
    except Exception as exc:  # triton missing or broken
        logger.debug("Triton unavailable: %s", exc)
        return False
    if device.type == "cpu":
        return triton_gptq_lora.interpreter_active() and _cpu_triton_usable()
    return device.type == "cuda"


def cuda_kernel_supports(
    x: Tensor, bits: int, lora_a: Optional[Tensor], lora_bits: int, out_features: Optional[int] = None
) -> Optional[str]:
    """None if the CUDA kernel handles this call, else the reason it does not."""
    if x.device.type != "cuda":
        return "x is not on a CUDA device"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16/bfloat16 activations, got {x.dtype}"
    capability = _capability(x.device)
    if capability is not None and capability < (8, 0):  # mma.m16n8k16 and cp.async: Ampere and newer
        return f"the CUDA kernel needs compute capability 8.0 or newer (Ampere+), this GPU has {capability[0]}.{capability[1]}"
    rows = x.numel() // max(1, x.shape[-1])
    if rows < 1 or rows > CUDA_MAX_M:
        return f"the CUDA kernel handles 1..{CUDA_MAX_M} rows (decode), got {rows}"
    if x.shape[-1] % 32:
        return f"the CUDA kernel needs in_features % 32 == 0, got {x.shape[-1]}"
    if bits not in (2, 3, 4, 8):
        return f"unsupported bits={bits}"
    if out_features is not None and out_features % 4:
        return f"the CUDA kernel needs out_features % 4 == 0 (16-byte loads of 4 columns), got {out_features}"
    if lora_a is not None and not 1 <= lora_a.shape[0] <= CUDA_MAX_RANK:
        return f"the CUDA kernel handles ranks 1..{CUDA_MAX_RANK}, got {lora_a.shape[0]}"
    if lora_bits not in (16, 8, 4):
        return f"unsupported lora_bits={lora_bits}"
    rank = lora_a.shape[0] if lora_a is not None else 0
    need, limit = cuda_smem_bytes(rows, rank, lora_bits), _smem_optin(x.device)
    if limit and need > limit:  # sm_86/89 (99 KB) at ranks above ~1190: the launch would fail
        return f"rank {rank} at {rows} rows needs {need} bytes of shared memory, this GPU allows {limit}"
    return None


def cuda_smem_bytes(rows: int, rank: int, lora_bits: int) -> int:
    """Dynamic shared memory of the CUDA kernel's launch for ``rows`` rows at ``rank`` (mirrors ``smem_bytes`` in
    ``cuda/gptq_lora_kernel.cuh``: per-warp sums of the 8- or 16-row variant, the rows' ``t = A·x``, the B stage)."""
    maxm = 8 if rows <= 8 else 16
    t_floats = (rows * max(rank, 0) + 3) & ~3
    row_bytes = 2 * rank if lora_bits == 16 else (rank if lora_bits == 8 else (rank + 1) // 2)
    stage = 0
    if rank > 0 and rank % 8 == 0 and row_bytes % 16 == 0:
        stage = 32 * (min(row_bytes, 16384 // 32) + 16)
    return (4 * maxm * 32 + t_floats) * 4 + stage


@functools.lru_cache(maxsize=16)
def _capability_of(index: Optional[int]) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))  # type: ignore[return-value]


def _capability(device: torch.device) -> Optional[tuple[int, int]]:
    """The compute capability of a CUDA ``device`` (None where it cannot be read: no check to apply)."""
    try:
        return _capability_of(device.index if device.index is not None else torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - no driver here (tests that stand in for a GPU)
        return None


@functools.lru_cache(maxsize=None)
def _smem_optin(device: torch.device) -> int:
    """The opt-in shared memory per block of a CUDA ``device`` (0 where unknown)."""
    try:
        return int(getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0))
    except Exception:  # noqa: BLE001 - no CUDA here: no limit to apply
        return 0


def requested_backend(backend: str = "auto") -> str:
    """The backend asked for: ``backend``, or for ``"auto"`` the one ``$PEFT_EORA_BACKEND`` names (``"auto"``
    when it is unset or empty)."""
    return backend if backend != "auto" else (os.environ.get(ENV_BACKEND, "auto") or "auto")


def select_backend(
    x: Tensor, bits: int, lora_a: Optional[Tensor], lora_bits: int, requested: str = "auto",
    out_features: Optional[int] = None,
) -> str:
    """Resolve ``requested`` (or ``$PEFT_EORA_BACKEND``) to ``"cuda"``, ``"triton"`` or ``"torch"``."""
    requested = requested_backend(requested)
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}: expected one of {BACKENDS}")
    if requested == "torch":
        return "torch"
    if requested in ("auto", "cuda"):
        reason = cuda_kernel_supports(x, bits, lora_a, lora_bits, out_features)
        if reason is None:
            try:
                cuda_ext.load_extension()
                return "cuda"
            except cuda_ext.CudaExtensionUnavailable as exc:
                reason = str(exc)
        if requested == "cuda":
            raise RuntimeError(f"backend='cuda' requested but unusable: {reason}")
        logger.debug("CUDA kernel not used: %s", reason)
    if requested in ("auto", "triton"):
        if requested == "auto" and x.shape[-1] % 32:  # the Triton kernel's K runs are 32 rows: it would refuse
            logger.debug("Triton kernel not used: in_features %d is not a multiple of 32", x.shape[-1])
            return "torch"
        if x.device.type == "cuda" or requested == "triton":
            if triton_available(x.device):
                return "triton"
            if requested == "triton":
                hint = " or TRITON_INTERPRET=1 was not set before Triton was imported" if x.device.type == "cpu" else ""
                raise RuntimeError(f"backend='triton' requested but unusable: Triton is missing{hint}")
    return "torch"


class WorkspaceNotReady(RuntimeError):
    """The CUDA kernel's workspace would have to be made inside CUDA graph capture (see :func:`_workspace`)."""


_warned_capture_fallback = False


def _workspace(device: torch.device, ints: int) -> Tensor:
    """Per-device int32 workspace of the in-kernel barrier (zero-initialised; the kernel resets it).

    Sized by the caller for the largest batch (:data:`CUDA_MAX_M`), so it grows only for a wider rank.
    Never made inside CUDA graph capture: zeroing it there would only be recorded, and an eager call
    after would find it unset (the fused layers run PEFT's forward in a capture they were not warmed up for)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ws = _workspaces.get(index)
    if ws is None or ws.numel() < ints:
        if torch.cuda.is_current_stream_capturing():
            raise WorkspaceNotReady(
                "peft_eora's CUDA kernel needs its workspace made before CUDA graph capture: call the layer (or "
                "gptq_lora_linear with this rank) once eagerly on this device with a decode batch (≤ "
                f"{CUDA_MAX_M} rows) before capturing."
            )
        with _ws_lock:
            ws = _workspaces.get(index)
            if ws is None or ws.numel() < ints:
                if ws is not None:
                    _retired_workspaces.append(ws)
                ws = torch.zeros(max(ints, _WS_MIN_INTS), dtype=torch.int32, device=torch.device("cuda", index))
                _workspaces[index] = ws
    return ws


def _aligned(t: Optional[Tensor], alignment: int = 16) -> Optional[Tensor]:
    """Contiguous and ``alignment``-byte aligned (the kernel's vector loads), copying only when needed."""
    if t is None:
        return None
    if not t.is_contiguous() or t.data_ptr() % alignment:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _run_cuda(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor], bias: Optional[Tensor],
    lora_a: Optional[Tensor], lora_b: Optional[Tensor], lora_a_scale: Optional[Tensor],
    lora_b_scale: Optional[Tensor], bits: int, group_size: int, lora_bits: int, scaling: float, zero_offset: int,
) -> Tensor:
    ext = cuda_ext.load_extension()
    in_features = x.shape[-1]
    x2 = _aligned(x.reshape(-1, in_features))
    if scales.dtype != x.dtype:
        scales = scales.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if lora_a is not None and lora_bits == 16:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    lora_a, lora_b = _aligned(lora_a), _aligned(lora_b)
    if g_idx is not None:
        g_idx = _aligned(g_idx.to(torch.int32))
    rank = lora_a.shape[0] if lora_a is not None else 0
    ws = _workspace(x.device, ext.workspace_ints(CUDA_MAX_M, rank, scales.shape[1]))  # any batch: no regrowth
    forced = (
        (_OPT_TWO_PASS if _env_flag(ENV_TWO_PASS) else 0)
        | (_OPT_LORA_IN_EPILOGUE if _env_flag(ENV_LORA_IN_EPILOGUE) else 0)
        | (_OPT_PREFETCH_FIRST_ONLY if _env_flag(ENV_PREFETCH_FIRST_ONLY) else 0)
    )
    qweight, qzeros, scales = _aligned(qweight), qzeros.contiguous(), _aligned(scales, 8)

    def launch(options: int) -> Tensor:
        return ext.gptq_lora_forward(
            x2, qweight, qzeros, scales, g_idx, int(group_size), bias, lora_a, lora_b, lora_a_scale, lora_b_scale,
            int(bits), int(lora_bits), float(scaling), int(zero_offset), ws, options,
        )

    options = forced
    if not forced:  # an option set in the environment is used as it is; else the variant tuned per shape
        key = (x.device.index, x.dtype, x2.shape[0], scales.shape[1], in_features, rank, bits, group_size,
               g_idx is not None, lora_bits)  # named by CUDA_TUNING_KEY
        options = CUDA_TUNER.select(key, CUDA_VARIANTS_LORA if rank else CUDA_VARIANTS_BASE, launch, device=x.device)
    out = launch(options)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _check_args(
    x: Tensor, qweight: Tensor, qzeros: Tensor, scales: Tensor, lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    bits: int, lora_bits: int,
) -> None:
    check_bits(bits)
    if lora_bits not in (16, 8, 4):
        raise ValueError(f"unsupported lora_bits={lora_bits}: expected 16, 8 or 4")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if scales.dim() != 2 or qweight.dim() != 2 or qweight.shape[1] != scales.shape[1]:
        raise ValueError(f"qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} disagree on out_features")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must both be given or both be None")
    if lora_b is not None and lora_b.shape[0] != scales.shape[1]:
        raise ValueError(f"lora_b has {lora_b.shape[0]} rows, expected out_features={scales.shape[1]}")
    if lora_a is not None:  # the kernels read these extents without bounds (a wrong one reads past the storage)
        rank, k = lora_a.shape[0], x.shape[-1]
        packed = lora_bits == 4  # two int4 codes per byte along the last dimension
        want_a, want_b = (rank, (k + 1) // 2 if packed else k), (scales.shape[1], (rank + 1) // 2 if packed else rank)
        if lora_a.dim() != 2 or tuple(lora_a.shape) != want_a:
            raise ValueError(f"lora_a is {tuple(lora_a.shape)}, expected (rank, in_features{'/2' if packed else ''}) = "
                             f"{want_a}")
        if lora_b.dim() != 2 or tuple(lora_b.shape) != want_b:
            raise ValueError(f"lora_b is {tuple(lora_b.shape)}, expected (out_features, rank{'/2' if packed else ''}) = "
                             f"{want_b}")


def gptq_lora_linear_eager(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Optional[Tensor],
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    lora_a_scale: Optional[Tensor],
    lora_b_scale: Optional[Tensor],
    bits: int,
    group_size: int = -1,
    lora_bits: int = 16,
    scaling: float = 1.0,
    zero_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    """Body of the custom op, callable directly in eager mode (skips the dispatcher, ~µs per call).

    Use ``torch.ops.peft_eora.gptq_lora_linear`` under ``torch.compile``/tracing.
    """
    _check_args(x, qweight, qzeros, scales, lora_a, lora_b, bits, lora_bits)
    if lora_a is None:
        lora_a_scale = lora_b_scale = None
    chosen = select_backend(x, bits, lora_a, lora_bits, backend, out_features=scales.shape[1])
    args = (x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_b, lora_a_scale, lora_b_scale)
    kwargs = dict(bits=bits, group_size=group_size, lora_bits=lora_bits, scaling=scaling, zero_offset=zero_offset)
    if chosen == "cuda":
        try:
            return _run_cuda(*args, **kwargs)
        except WorkspaceNotReady:
            # first CUDA call of this device/rank inside a capture (an eager prefill of more than 16 rows ran
            # another backend): "auto" captures the next backend instead; "cuda" was asked for (here or by
            # $PEFT_EORA_BACKEND), so it is an error
            if requested_backend(backend) != "auto":
                raise
            global _warned_capture_fallback
            if not _warned_capture_fallback:
                _warned_capture_fallback = True
                logger.warning("CUDA kernel first called inside CUDA graph capture: captured with the %s backend; "
                               "run one eager decode step before capturing to capture the CUDA kernel",
                               "triton" if triton_available(x.device) else "torch")
            chosen = "triton" if triton_available(x.device) else "torch"
    if chosen == "triton":
        from .triton_gptq_lora import gptq_lora_linear_triton

        return gptq_lora_linear_triton(*args, **kwargs)
    if lora_a is None:  # torch path without LoRA: a zero-rank factor pair
        in_features = x.shape[-1]
        lora_a = x.new_zeros((0, in_features), dtype=torch.float32)
        lora_b = x.new_zeros((scales.shape[1], 0), dtype=torch.float32)
        kwargs["lora_bits"] = 16
        args = (x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_b, None, None)
    return gptq_lora_linear_torch(*args, **kwargs)


@torch.library.custom_op("peft_eora::gptq_lora_linear", mutates_args=())
def gptq_lora_linear(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Optional[Tensor],
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    lora_a_scale: Optional[Tensor],
    lora_b_scale: Optional[Tensor],
    bits: int,
    group_size: int = -1,
    lora_bits: int = 16,
    scaling: float = 1.0,
    zero_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    """``x·dequant(W_gptq) + scaling·(x·Aᵀ)·Bᵀ + bias`` through the best available backend."""
    return gptq_lora_linear_eager(
        x, qweight, qzeros, scales, g_idx, bias, lora_a, lora_b, lora_a_scale, lora_b_scale,
        bits, group_size, lora_bits, scaling, zero_offset, backend,
    )


@gptq_lora_linear.register_fake
def _gptq_lora_linear_fake(
    x: Tensor,
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Optional[Tensor],
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    lora_a_scale: Optional[Tensor],
    lora_b_scale: Optional[Tensor],
    bits: int,
    group_size: int = -1,
    lora_bits: int = 16,
    scaling: float = 1.0,
    zero_offset: int = 0,
    backend: str = "auto",
) -> Tensor:
    _check_args(x, qweight, qzeros, scales, lora_a, lora_b, bits, lora_bits)
    return x.new_empty((*x.shape[:-1], scales.shape[1]))
