"""Resumable EoRA runs: a folder that holds every finished block's factors and the next inputs.

    >>> ckpt = Checkpoint("eora-run", signature, resume=True)   # signature: what must match to resume
    >>> ckpt.done                        # -1, or the last block whose factors are saved
    >>> ckpt.save_block(3, {"model.layers.3.mlp.up_proj": (A, B)}, stats)
    >>> ckpt.save_inputs(4, hidden_states)      # block 4's inputs, one tensor per calibration batch
    >>> ckpt.commit(3)                   # block 3 now counts as done

Layout: ``manifest.json`` (the commit point: format version, the run's signature, ``done``),
``rank_plan.json`` (with rank allocation: the per-layer ranks of the spectrum pass, reused on resume),
``block_XXXX.safetensors`` (``<module>.lora_A`` / ``.lora_B`` float32 factors and their stats
in the metadata) and ``inputs_XXXX.safetensors`` (hidden states entering block XXXX). Every
file is written to a temporary name and renamed into place, and the manifest is rewritten
only after the files it points to exist, so a run killed at any instant (SIGKILL included)
leaves a folder from which :func:`peft_eora.initialize_eora_weights` resumes after the last
committed block; the resumed factors equal an uninterrupted run's. Inputs of older blocks are
deleted once a later block is committed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the signature covers the original and the batch shapes
MANIFEST = "manifest.json"
PLAN = "rank_plan.json"  # the rank allocation's plan (a spectrum pass over every block), kept for a resumed run
LOCK = ".lock"  # held (flock) by the run using the folder, released when it ends or dies


class CheckpointMismatchError(ValueError):
    """The checkpoint folder holds another run (other model, data or settings)."""


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    from .safe_files import _fsync

    _fsync(str(path))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Checkpoint:
    """A run's checkpoint folder (see the module doc). ``signature`` is JSON-serialisable."""

    def __init__(self, path: Union[str, Path], signature: dict[str, Any], resume: bool = True) -> None:
        self.path = Path(path).expanduser()
        self.signature = json.loads(json.dumps(signature, sort_keys=True))
        self.done = -1
        manifest = self.path / MANIFEST
        self.plan: Optional[dict[str, Any]] = None  # the saved rank plan of a resumed run (see save_plan)
        self._lock = self._acquire()  # before anything is read or removed: one run per folder
        try:
            self._open(manifest, resume)
        except BaseException:  # refused: the lock goes now, not when a kept traceback lets this object go
            self.close()
            raise

    def _open(self, manifest: Path, resume: bool) -> None:
        """Resume the folder's run, or start this one there (see ``__init__``)."""
        data = json.loads(manifest.read_text()) if manifest.exists() else None
        if data is not None and int(data.get("done", -1)) < 0 and not (
                resume and data.get("version") == FORMAT_VERSION and data.get("signature") == self.signature):
            # a run that finished no block (it failed validation, or ran out of memory in block 0): nothing to keep
            # but the rank plan of the same run resumed, and its signature (the ranks or batch size it failed with)
            # must not block the corrected run
            logger.info("%s holds a run that finished no block: starting it afresh", self.path)
            data = None
        if data is not None:
            if not resume:
                raise FileExistsError(
                    f"The checkpoint folder {self.path} already holds a run (done through block {data.get('done')}). "
                    "Resume it (resume=True, CLI --resume), or pass an empty or new folder."
                )
            if data.get("version") != FORMAT_VERSION:
                raise CheckpointMismatchError(
                    f"{self.path} was written by checkpoint format {data.get('version')}, this version reads "
                    f"{FORMAT_VERSION}; start a new folder."
                )
            diff = sorted(k for k in set(data["signature"]) | set(self.signature)
                          if data["signature"].get(k) != self.signature.get(k))
            if diff:
                raise CheckpointMismatchError(
                    f"The checkpoint in {self.path} was made by another run: it differs in {', '.join(diff)}. Resume "
                    "with the same model, calibration data and settings, or start a new folder."
                )
            self.done = int(data["done"])
            if (self.path / PLAN).exists():
                self.plan = json.loads((self.path / PLAN).read_text())
            logger.info("resuming from %s: blocks 0..%d are done", self.path, self.done)
            self._drop_partial_writes()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            for stale in self.path.glob("block_*.safetensors"):  # an uncommitted first block of an earlier run
                stale.unlink()
            (self.path / PLAN).unlink(missing_ok=True)
            self._drop_partial_writes()
            self._write_manifest()

    def _acquire(self) -> Any:
        """Hold the folder's lock for this run (an advisory ``flock``, released by :meth:`close` or when the process
        dies, SIGKILL included), so that a second run in the folder (a duplicated job) is refused instead of taking
        over a live run's files. None where ``fcntl`` does not exist (Windows): no lock."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return None
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "a+")  # noqa: SIM115 - held for the run's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise FileExistsError(
                f"Another run is using the checkpoint folder {self.path} (it holds the folder's lock): let it finish, "
                "or pass another folder."
            ) from None
        return handle

    def close(self) -> None:
        """Release the folder's lock (the run is over)."""
        if getattr(self, "_lock", None) is not None:  # absent when __init__ was refused the lock
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _drop_partial_writes(self) -> None:
        """Remove the temporary files of writes a killed run left unfinished: only once this run owns the folder
        (its lock held, resuming it or starting it), so that a mistaken second run never deletes a live run's
        files."""
        for partial in self.path.glob(".*.tmp"):
            partial.unlink(missing_ok=True)

    # -- writing --------------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        data = {"version": FORMAT_VERSION, "signature": self.signature, "done": self.done}
        _atomic_write_bytes(self.path / MANIFEST, json.dumps(data, indent=1, sort_keys=True).encode())

    def save_plan(self, plan: dict[str, Any]) -> None:
        """Keep the rank allocation's plan (JSON-serialisable), so that a resumed run skips its spectrum pass."""
        self.plan = json.loads(json.dumps(plan))
        _atomic_write_bytes(self.path / PLAN, json.dumps(self.plan, indent=1, sort_keys=True).encode())

    def save_block(self, index: int, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   stats: list[dict[str, Any]]) -> None:
        """Write block ``index``'s factors (float32) and per-module stats (not committed yet)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, (a, b) in factors.items():
            tensors[f"{name}.lora_A"] = a.float()
            tensors[f"{name}.lora_B"] = b.float()
        _atomic_save_tensors(self.path / f"block_{index:04d}.safetensors", tensors,
                             metadata={"stats": json.dumps(stats)})

    def save_inputs(self, index: int, hidden: list[torch.Tensor]) -> None:
        """Write the hidden states entering block ``index`` (one tensor per calibration batch)."""
        _atomic_save_tensors(self.path / f"inputs_{index:04d}.safetensors",
                             {f"batch.{i}": h for i, h in enumerate(hidden)})

    def commit(self, index: int) -> None:
        """Mark blocks ``0..index`` done (their files are in place) and drop older inputs."""
        self.done = index
        self._write_manifest()
        for old in self.path.glob("inputs_*.safetensors"):
            if int(old.stem.split("_")[1]) <= index:
                old.unlink(missing_ok=True)

    # -- reading --------------------------------------------------------------------------------
    def load_block(self, index: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[dict[str, Any]]]:
        from safetensors import safe_open

        path = self.path / f"block_{index:04d}.safetensors"
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with safe_open(str(path), framework="pt") as st:
            stats = json.loads((st.metadata() or {}).get("stats", "[]"))
            names = sorted({k.rsplit(".", 1)[0] for k in st.keys()})
            for name in names:
                factors[name] = (st.get_tensor(f"{name}.lora_A"), st.get_tensor(f"{name}.lora_B"))
        return factors, stats

    def load_inputs(self, index: int) -> list[torch.Tensor]:
        from safetensors import safe_open

        path = self.path / f"inputs_{index:04d}.safetensors"
        if not path.exists():
            raise CheckpointMismatchError(f"{path} is missing: the checkpoint folder is incomplete; start a new one.")
        with safe_open(str(path), framework="pt") as st:
            return [st.get_tensor(f"batch.{i}") for i in range(len(st.keys()))]
