"""Choosing among interchangeable kernel variants by timing them once per call shape on the GPU.

Both fused backends have variants that compute the same result in another order (the Triton
tilings, the CUDA kernel's launch options). Which is fastest depends on the GPU and the shape, so
the first call of each shape runs every candidate once, drops those that fail or whose output
differs from the default's by more than rounding, times the rest (replayed from a CUDA graph, so
host-side Python does not count, with L2 flushed before every call), and keeps the fastest for the
rest of the process (as ``triton.autotune`` does)::

    >>> tuner = Tuner("cuda", env="PEFT_EORA_CUDA_AUTOTUNE", default=0)
    >>> options = tuner.select(key, [0, 2, 4], run=lambda opt: launch(x, options=opt))  # doctest: +SKIP

A call inside CUDA graph capture whose shape is not tuned yet (nothing may synchronise there) takes
the default, and so does every call while the tuner's environment variable is ``0``.
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

__all__ = ["Tuner", "agrees", "bench_us"]

#: A candidate's output may differ from the default's by rounding (another summation order), not
#: more: per activation dtype, the largest difference relative to max|default| and the relative
#: Frobenius distance (which catches a dropped or garbled term that stays under the largest value).
_MAX_RTOL = {torch.float16: 2.0**-8, torch.bfloat16: 2.0**-5}
# bfloat16: two orders of rounding (weights cast before tl.dot or not, the output) differ by ~2^-8.5
_FRO_RTOL = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7}
_FP32_RTOL = 1e-4
_FLUSH_BYTES = 256 << 20  # when the L2 size is unknown


def agrees(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``out`` equals ``ref`` (float32) up to the rounding of ``dtype`` outputs, and the figures."""
    diff = out.detach().float() - ref
    scale = max(ref.abs().max().item(), 1e-30)
    norm = max(ref.norm().item(), 1e-30)
    worst, fro = diff.abs().max().item() / scale, diff.norm().item() / norm
    ok = worst <= _MAX_RTOL.get(dtype, _FP32_RTOL) and fro <= _FRO_RTOL.get(dtype, _FP32_RTOL)  # NaN: False
    return ok, f"max {worst:.3g}, frobenius {fro:.3g} of the default's output"


def bench_us(fn: Callable[[], Any], reps: int = 20, warmup: int = 3) -> float:
    """Median GPU microseconds of one call of ``fn`` as a captured CUDA graph replays it (its host-side
    Python not counted, as in a graph-captured decode), with L2 flushed before each call (zeroing
    twice its size; on a GPU too full for that buffer, unflushed). A call that cannot be captured
    raises: decode runs in graphs, so such a variant must not be chosen."""
    device = torch.cuda.current_device()
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    try:
        flush: Optional[torch.Tensor] = torch.empty(2 * l2 if l2 > 0 else _FLUSH_BYTES, dtype=torch.uint8,
                                                    device=device)
    except torch.cuda.OutOfMemoryError:
        logger.debug("no room for an L2 flush buffer: timing without flushing")
        flush = None
    for _ in range(warmup):
        fn()
    # captured by hand on a private stream (torch.cuda.graph would also empty the allocator's cache
    # and, if capture fails, leave its capture stream current); the stream context is restored either way
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            fn()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    call = graph.replay
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    del graph
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


class Tuner:
    """Per-key choice among ``candidates`` (first call times them, later calls reuse the choice).

    ``describe`` names a candidate in logs and :meth:`report`; ``env`` set to ``0`` turns tuning off.
    """

    def __init__(self, name: str, env: str, default: Any, describe: Callable[[Any], str] = str) -> None:
        self.name, self.env, self.default, self.describe = name, env, default, describe
        self._chosen: dict[Hashable, Any] = {}
        self._times: dict[Hashable, dict[str, Optional[float]]] = {}
        self._captured: set[Hashable] = set()
        self._lock = threading.Lock()

    def enabled(self) -> bool:
        return os.environ.get(self.env, "1").strip().lower() not in ("0", "false", "no", "off")

    def clear(self) -> None:
        """Forget every choice (the next call of each shape tunes again)."""
        with self._lock:
            self._chosen.clear()
            self._times.clear()
            self._captured.clear()

    def chosen(self, key: Hashable) -> Optional[Any]:
        return self._chosen.get(key)

    def select(self, key: Hashable, candidates: Sequence[Any], run: Callable[[Any], torch.Tensor],
               bench: Optional[Callable[[Callable[[], Any]], float]] = None,
               device: Optional[torch.device] = None) -> Any:
        """The candidate for ``key``; ``run(candidate)`` executes the call (on ``device``, whose
        streams the timing uses) and returns its output. Inside CUDA graph capture an untuned key
        gets the default for that call (not remembered: the next eager call tunes)."""
        if not self.enabled():
            return self.default
        choice = self._chosen.get(key)
        if choice is not None:
            return choice
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            if key not in self._captured:
                self._captured.add(key)
                logger.info("%s kernel: first call of %s inside CUDA graph capture: default variant there",
                            self.name, key)
            return self.default
        with self._lock:
            if key in self._chosen:
                return self._chosen[key]
            choice = self.default
            if len(candidates) > 1:
                on_device = (torch.cuda.device(device) if device is not None and device.type == "cuda"
                             else contextlib.nullcontext())
                with on_device:
                    choice = self._tune(key, candidates, run, bench or bench_us)
                if choice is None:  # no reference to judge by: the default now, tuning again next call
                    return self.default
            self._chosen[key] = choice
        return choice

    def _tune(self, key: Hashable, candidates: Iterable[Any], run: Callable[[Any], torch.Tensor],
              bench: Callable[[Callable[[], Any]], float]) -> Any:
        """The fastest agreeing candidate, or None where the default's own output gives no reference."""
        try:
            out = run(self.default)
            dtype = out.dtype
            ref = out.detach().to(torch.float32, copy=True)  # run() may hand back one buffer for every candidate
            if not bool(torch.isfinite(ref).all()):  # e.g. a first input that overflows: judge nothing by it
                raise RuntimeError("the default variant's output is not finite")
        except Exception as exc:  # e.g. no memory left for the copy: this call goes on untuned
            logger.warning("%s kernel: %s not tuned (%s); default variant", self.name, key, exc)
            return None
        times: dict[str, Optional[float]] = {}
        best: Optional[float] = None
        choice = self.default
        for cand in candidates:
            label = self.describe(cand)
            try:
                ok, figures = agrees(run(cand), ref, dtype)
                if not ok:
                    raise RuntimeError(f"output differs by more than rounding: {figures}")
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
        with self._lock:
            chosen, times = list(self._chosen.items()), dict(self._times)
        return [dict({n: (v if isinstance(v, (int, float, bool, str)) else str(v)) for n, v in zip(key_names, key)},
                     choice=self.describe(c), candidates_us=times.get(key))
                for key, c in chosen]
