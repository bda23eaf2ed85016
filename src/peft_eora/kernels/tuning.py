"""Choosing among interchangeable kernel variants by timing them once per call shape on the GPU.

Both fused backends have variants that compute the same result in another order (the Triton
tilings, the CUDA kernel's launch options). Which is fastest depends on the GPU and the shape, so
the first call of each shape runs every candidate once, drops those that fail or whose output
differs from the default's by more than rounding, times the rest with L2 flushed before every
call, and keeps the fastest for the rest of the process (as ``triton.autotune`` does)::

    >>> tuner = Tuner("cuda", env="PEFT_EORA_CUDA_AUTOTUNE", default=0)
    >>> options = tuner.select(key, [0, 2, 4], run=lambda opt: launch(x, options=opt))  # doctest: +SKIP

A first call inside CUDA graph capture (nothing may synchronise there) takes the default, and
so does every call while the tuner's environment variable is ``0``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import threading
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["Tuner", "bench_us"]

#: A candidate's output may differ from the default's by rounding (another summation order), not more.
RTOL, ATOL = 1e-2, 1e-3
_FLUSH_BYTES = 256 << 20  # when the L2 size is unknown


def bench_us(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> float:
    """Median GPU microseconds of ``fn()`` (CUDA events), with L2 flushed before each call (by
    zeroing twice its size; on a GPU too full for that buffer, without flushing)."""
    device = torch.cuda.current_device()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    try:
        flush: Optional[torch.Tensor] = torch.empty(2 * l2 if l2 > 0 else _FLUSH_BYTES, dtype=torch.uint8,
                                                    device=device)
    except torch.cuda.OutOfMemoryError:
        logger.debug("no room for an L2 flush buffer: timing without flushing")
        flush = None
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


class Tuner:
    """Per-key choice among ``candidates`` (first call times them, later calls reuse the choice).

    ``describe`` names a candidate in logs and :meth:`report`; ``env`` set to ``0`` turns tuning off.
    """

    def __init__(self, name: str, env: str, default: Any, describe: Callable[[Any], str] = str) -> None:
        self.name, self.env, self.default, self.describe = name, env, default, describe
        self._chosen: dict[Hashable, Any] = {}
        self._times: dict[Hashable, dict[str, Optional[float]]] = {}
        self._lock = threading.Lock()

    def enabled(self) -> bool:
        return os.environ.get(self.env, "1").strip().lower() not in ("0", "false", "no", "off")

    def clear(self) -> None:
        """Forget every choice (the next call of each shape tunes again)."""
        with self._lock:
            self._chosen.clear()
            self._times.clear()

    def chosen(self, key: Hashable) -> Optional[Any]:
        return self._chosen.get(key)

    def select(self, key: Hashable, candidates: Sequence[Any], run: Callable[[Any], torch.Tensor],
               bench: Optional[Callable[[Callable[[], Any]], float]] = None,
               device: Optional[torch.device] = None) -> Any:
        """The candidate for ``key``; ``run(candidate)`` executes the call (on ``device``, whose
        streams the timing uses) and returns its output."""
        if not self.enabled():
            return self.default
        choice = self._chosen.get(key)
        if choice is not None:
            return choice
        with self._lock:
            if key in self._chosen:
                return self._chosen[key]
            choice = self.default
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                logger.info("%s kernel: first call of %s inside CUDA graph capture, default variant", self.name, key)
            elif len(candidates) > 1:
                on_device = (torch.cuda.device(device) if device is not None and device.type == "cuda"
                             else contextlib.nullcontext())
                with on_device:
                    choice = self._tune(key, candidates, run, bench or bench_us)
            self._chosen[key] = choice
        return choice

    def _tune(self, key: Hashable, candidates: Iterable[Any], run: Callable[[Any], torch.Tensor],
              bench: Callable[[Callable[[], Any]], float]) -> Any:
        ref = run(self.default).float()
        tol = RTOL * ref.abs().max().item() + ATOL
        times: dict[str, Optional[float]] = {}
        best: Optional[float] = None
        choice = self.default
        for cand in candidates:
            label = self.describe(cand)
            try:
                err = (run(cand).float() - ref).abs().max().item()
                if not err <= tol:  # NaN too
                    raise RuntimeError(f"output differs from the default's by {err:.3g} (> {tol:.3g})")
                times[label] = bench(lambda cand=cand: run(cand))
            except Exception as exc:  # e.g. out of shared memory / registers on this GPU
                logger.warning("%s kernel: variant %s skipped for %s: %s", self.name, label, key, exc)
                times[label] = None
                continue
            if best is None or times[label] < best:
                best, choice = times[label], cand
        self._times[key] = times
        logger.debug("%s kernel: %s -> %s (%s)", self.name, key, self.describe(choice), times)
        return choice

    def report(self, key_names: Sequence[str]) -> list[dict[str, Any]]:
        """One entry per tuned key: its fields (named by ``key_names``), the choice, every candidate's µs."""
        return [dict({n: (v if isinstance(v, (int, float, bool, str)) else str(v)) for n, v in zip(key_names, key)},
                     choice=self.describe(c), candidates_us=self._times.get(key))
                for key, c in self._chosen.items()]
