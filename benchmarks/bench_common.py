"""Small pieces the benchmarks share: JSON entry point, atomic JSON writes, scratch folders, default dtype,
peak RSS, peak live CPU tensors.

    >>> from bench_common import json_main
    >>> def run(argv): return {"status": "ok"}
    >>> json_main(build_parser, run)      # parses -v/--out, logs to stderr, JSON to stdout and --out  # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch


class Terminated(BaseException):
    """SIGTERM during a measurement (a time limit, as ``gpu_check.sh``'s ``timeout`` sends): the figures so far are
    reported. A BaseException, so the library's ``except Exception`` blocks (probes, fallbacks) let it by."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread for the block's duration (no-op when called from
    another thread: only the main thread may set signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def scratch_dir(prefix: str) -> Path:
    """A new temporary folder, removed when the process exits (normally, on an error or on Ctrl-C)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def json_main(build_parser: Callable[[], Any], run: Callable[[Optional[list[str]]], dict[str, Any]],
              argv: Optional[list[str]] = None) -> int:
    """Run ``run(argv)`` with library chatter sent to stderr; print its JSON and write it to ``--out``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, stream=sys.stderr)
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        res = run(argv)
    text = json.dumps(res, indent=2)
    if getattr(args, "out", None):
        write_json_atomic(args.out, text)
    real_stdout.write(text + "\n")
    real_stdout.flush()
    return 0


@contextlib.contextmanager
def environ(values: dict[str, Optional[str]]) -> Iterator[None]:
    """Set (or, for ``None``, remove) environment variables inside the block; restore them after."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` torch's default floating dtype (models built in it directly)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class PeakRSS:
    """Peak resident memory of this process while the context is open (Linux).

    The kernel's high-water mark (``VmHWM``) is reset on entry by writing ``5`` to
    ``/proc/self/clear_refs`` and read on exit, so the figure is the true peak RSS of the step
    (model, original weights read so far, activations, covariances), not a sampled estimate.
    ``rise_mib`` is that peak minus the RSS at entry.
    """

    def __enter__(self) -> "PeakRSS":
        Path("/proc/self/clear_refs").write_text("5")
        self.start_mib = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_mib = _status_mib("VmHWM")
        self.rise_mib = self.peak_mib - self.start_mib


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


class LiveTensorPeak:
    """Peak bytes of CPU tensor storage created inside the context and alive at once: on a CPU, what
    ``torch.cuda.max_memory_allocated`` minus the memory at entry reads on a GPU (the allocator's
    cache and the heap's retained pages, which make ``VmHWM`` noisy, left out).

    A ``TorchDispatchMode`` sees every op of this thread: each new storage an op returns is counted
    until it is freed (``weakref.finalize``); views and in-place results are not new. Not counted:
    work in other threads (``decompose.DAMPING_WORKERS=1`` keeps the factor step in this one) and
    scratch an op frees before returning (LAPACK workspaces). With ``label`` (e.g. the phase running),
    ``by_label`` holds the most bytes alive while each label was current; ``at_peak`` lists the
    tensors of at least ``inventory_bytes`` alive at the peak (``(bytes, "op shape dtype")``, largest
    first; refreshed whenever the peak grows by 1 %)::

        with LiveTensorPeak() as live:
            step()
        live.peak_bytes, live.at_peak[:3]
    """

    def __init__(self, label: Optional[Callable[[], str]] = None, inventory_bytes: int = 16 << 20) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        owner = self
        self.live: dict[int, int] = {}
        self.what: dict[int, str] = {}  # storages of at least inventory_bytes: the op that made them
        self.inventory_bytes = inventory_bytes
        self.at_peak: list[tuple[int, str]] = []
        self._inventoried = 0
        self.current = self.peak_bytes = 0
        self.label = label
        self.by_label: dict[str, int] = {}
        self._lock = threading.Lock()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
                out = func(*args, **(kwargs or {}))
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        owner._count(t.untyped_storage(), inputs,
                                     lambda t=t: f"{func.__name__} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
                return out

        self._mode = _Mode()

    def _count(self, storage: Any, inputs: set[int], what: Callable[[], str] = lambda: "?") -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in inputs:
            return
        with self._lock:
            if key in self.live:
                return
            self.live[key] = size
            if size >= self.inventory_bytes:
                self.what[key] = what()
            self.current += size
            self.peak_bytes = max(self.peak_bytes, self.current)
            if self.current == self.peak_bytes and self.current >= 1.01 * self._inventoried:
                self._inventoried = self.current
                self.at_peak = sorted(((self.live[k], w) for k, w in self.what.items()), reverse=True)
            if self.label is not None:
                name = self.label()
                self.by_label[name] = max(self.by_label.get(name, 0), self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            self.current -= self.live.pop(key, 0)
            self.what.pop(key, None)

    def __enter__(self) -> "LiveTensorPeak":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
