"""Just-in-time build of the fused GPTQ + low-rank CUDA kernel (``torch.utils.cpp_extension.load``).

Nothing is compiled at install time: the first CUDA call builds ``cuda/gptq_lora*.cu`` and
``cuda/bindings.cpp`` with ninja + nvcc (the four per-bit-width units in parallel) for the
visible GPU (or ``TORCH_CUDA_ARCH_LIST``) and caches the result (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``; override with ``PEFT_EORA_BUILD_DIR``). The extension name carries a hash
of the sources and of the torch, CUDA and Python versions, so edited sources (or another torch) rebuild and
unchanged ones load in milliseconds. Builders of one extension take turns (a file lock that dies with its
process), and the ``lock`` file of a build that was killed is removed instead of blocking later builds.

Sources are looked up in ``$PEFT_EORA_CUDA_SRC`` (for wheels / custom installs), then in the
repository's top-level ``cuda/`` directory (``src/peft_eora/../../cuda``), then in
``peft_eora/_cuda`` next to the package. ``PEFT_EORA_DISABLE_CUDA=1`` turns the extension off.

    >>> from peft_eora.kernels import cuda_ext
    >>> cuda_ext.is_available()          # False without a GPU, nvcc or ninja  # doctest: +SKIP
    >>> ext = cuda_ext.load_extension()  # raises CudaExtensionUnavailable with the reason  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import contextlib
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CudaExtensionUnavailable",
    "ENV_SOURCE_DIR",
    "ENV_BUILD_DIR",
    "ENV_DISABLE",
    "SOURCES",
    "HEADERS",
    "source_dir",
    "find_nvcc",
    "check_toolchain",
    "nvcc_flags",
    "build_extension",
    "load_extension",
    "is_available",
]

ENV_SOURCE_DIR = "PEFT_EORA_CUDA_SRC"
ENV_BUILD_DIR = "PEFT_EORA_BUILD_DIR"
ENV_DISABLE = "PEFT_EORA_DISABLE_CUDA"
#: Translation units handed to the compiler.
SOURCES: tuple[str, ...] = (
    "gptq_lora.cu", "gptq_lora_b2.cu", "gptq_lora_b3.cu", "gptq_lora_b4.cu", "gptq_lora_b8.cu", "bindings.cpp",
)
#: Headers they include (part of the source hash).
HEADERS: tuple[str, ...] = ("gptq_lora_kernel.cuh", "gptq_lora_launch.cuh")
_ABI_VERSION = 3

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failure: Optional[str] = None


class CudaExtensionUnavailable(RuntimeError):
    """The CUDA extension cannot be built or loaded here (the message says why)."""


def _candidate_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    dirs = []
    env = os.environ.get(ENV_SOURCE_DIR)
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(here.parents[3] / "cuda")  # <repo>/src/peft_eora/kernels/cuda_ext.py -> <repo>/cuda
    dirs.append(here.parents[1] / "_cuda")  # packaged copy inside a wheel
    return dirs


def source_dir() -> Path:
    """Directory holding the CUDA sources; raises :class:`CudaExtensionUnavailable` if none does."""
    needed = SOURCES + HEADERS
    tried = _candidate_dirs()
    for d in tried:
        if all((d / f).is_file() for f in needed):
            return d
    raise CudaExtensionUnavailable(
        f"CUDA sources {', '.join(needed)} not found in {', '.join(map(str, tried))}; set {ENV_SOURCE_DIR}"
    )


def find_nvcc() -> Optional[str]:
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc`` (torch's notion of it), else the one on ``PATH``."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - broken torch install
        CUDA_HOME = None
    if CUDA_HOME:
        cand = Path(CUDA_HOME) / "bin" / "nvcc"
        if cand.is_file():
            return str(cand)
    return shutil.which("nvcc")


def check_toolchain() -> None:
    """Raise :class:`CudaExtensionUnavailable` naming the missing piece (ninja, nvcc)."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise CudaExtensionUnavailable("ninja is required to build the CUDA kernel: pip install ninja")
    if find_nvcc() is None:
        raise CudaExtensionUnavailable(
            "nvcc not found: install the CUDA toolkit and set CUDA_HOME (needed to build the CUDA kernel)"
        )


def nvcc_flags() -> list[str]:
    """Flags for the device code (fp32 accumulation: no fast-math)."""
    flags = ["-O3", "-std=c++20", "-lineinfo"]
    if os.environ.get("PEFT_EORA_PTXAS_VERBOSE"):
        flags.append("-Xptxas=-v")
    return flags


def _source_hash(src: Path) -> str:
    # the torch, CUDA and Python versions too: a build for one torch does not load into another (undefined
    # symbols), and two environments sharing one cache folder must not take each other's build
    runtime = f"abi{_ABI_VERSION} torch{torch.__version__} cuda{torch.version.cuda} py{sys.version_info[:2]}"
    h = hashlib.sha256(runtime.encode())
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    return h.hexdigest()[:10]


@contextlib.contextmanager
def _environ(name: str, value: Optional[str]):
    """``os.environ[name] = value`` while the block runs (nothing changed for None)."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _builder_lock(build_dir: str):
    """Hold ``build_dir``'s builder lock (an advisory ``flock``, released when the process ends or dies).

    torch's own ``lock`` file there outlives a build that was killed (SIGKILL, a timeout), and every later
    build then waits on it forever. A process holding this lock is the only builder, so a ``lock`` file
    found by it belongs to a dead one and is removed.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: torch's file lock alone
        yield
        return
    with open(os.path.join(build_dir, "peft_eora_builder.lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process building this extension: wait for it
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            logger.warning("removing %s, left by a build that did not finish (killed or interrupted)", stale)
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
        yield


_OLD_ARCH_NAMES = ("kepler", "maxwell", "pascal", "volta", "turing")


def _arch_list_for_build(value: Optional[str]) -> Optional[str]:
    """``TORCH_CUDA_ARCH_LIST`` without the architectures older than 8.0 (the kernel's ``mma.m16n8k16`` and
    ``cp.async`` need Ampere+, and one such entry fails the whole build); None when it is unset."""
    if value is None or not value.strip():
        return None
    kept = []
    for entry in value.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        number = entry.split("+")[0].rstrip("af")
        try:
            if float(number) < 8.0:
                continue
        except ValueError:
            if entry.lower() in _OLD_ARCH_NAMES:
                continue
        kept.append(entry)
    if not kept:
        raise CudaExtensionUnavailable(
            f"TORCH_CUDA_ARCH_LIST={value!r} names no architecture the kernel runs on: it needs compute capability 8.0 "
            "or newer (Ampere+); name one (e.g. 8.0 or 9.0) or leave the variable unset"
        )
    return ";".join(kept)


def build_extension(verbose: bool = False) -> ModuleType:
    """Compile (or reuse the cached build) and import the extension, without any GPU check.

    Needs nvcc and ninja; without a visible GPU set ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``).
    Raises :class:`CudaExtensionUnavailable` for a missing toolchain or sources; compiler
    errors propagate. Most callers want :func:`load_extension`.
    """
    check_toolchain()
    src = source_dir()
    from torch.utils.cpp_extension import load

    name = f"peft_eora_gptq_lora_{_source_hash(src)}"
    build_dir = os.environ.get(ENV_BUILD_DIR)
    if build_dir:
        build_dir = os.path.join(os.path.expanduser(build_dir), name)
    else:
        try:
            from torch.utils.cpp_extension import _get_build_directory  # torch's default folder for `name`

            build_dir = _get_build_directory(name, verbose)
        except ImportError:  # pragma: no cover - a torch without it: its own folder, unguarded
            build_dir = None
    if build_dir:
        os.makedirs(build_dir, exist_ok=True)
    logger.info("building/loading CUDA extension %s from %s (first build takes a few minutes)", name, src)
    arch_list = _arch_list_for_build(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    with _builder_lock(build_dir) if build_dir else contextlib.nullcontext(), _environ("TORCH_CUDA_ARCH_LIST", arch_list):
        module = load(
            name=name,
            sources=[str(src / f) for f in SOURCES],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3", "-std=c++20"],
            extra_cuda_cflags=nvcc_flags(),
            build_directory=build_dir,
            verbose=verbose,
        )
    if getattr(module, "ABI_VERSION", None) != _ABI_VERSION:
        raise CudaExtensionUnavailable(f"extension ABI {getattr(module, 'ABI_VERSION', None)} != {_ABI_VERSION}")
    return module


def load_extension(verbose: bool = False) -> ModuleType:
    """Build (first time) and import the extension; raises :class:`CudaExtensionUnavailable`.

    A failure is remembered for the process, so callers falling back to Triton pay for the
    attempt only once.
    """
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise CudaExtensionUnavailable(_failure)
        try:
            if os.environ.get(ENV_DISABLE, "0") not in ("", "0", "false", "False"):
                raise CudaExtensionUnavailable(f"disabled by {ENV_DISABLE}")
            if not torch.cuda.is_available():
                raise CudaExtensionUnavailable("no CUDA device is available")
            if torch.version.cuda is None:
                raise CudaExtensionUnavailable("this torch build has no CUDA support")
            _module = build_extension(verbose=verbose)
            return _module
        except CudaExtensionUnavailable as exc:
            _module = None
            _failure = str(exc)
            raise
        except Exception as exc:  # compiler or loader error: keep the first line, log the rest
            _module = None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _failure = f"building the CUDA extension failed: {first}"
            logger.debug("CUDA extension build failure", exc_info=True)
            raise CudaExtensionUnavailable(_failure) from exc


def is_available() -> bool:
    """True if the extension is (or can be) built and loaded; never raises."""
    try:
        load_extension()
        return True
    except CudaExtensionUnavailable as exc:
        logger.debug("CUDA kernel unavailable: %s", exc)
        return False


def _reset_for_tests() -> None:
    """Forget a cached module/failure (tests only)."""
    global _module, _failure
    with _lock:
        _module = None
        _failure = None
