"""Adapter files on disk: atomic writes, safetensors validation, no pickle.

    >>> with atomic_directory("eora-adapter") as tmp:    # appears complete or not at all
    ...     write_files(tmp)
    >>> check_safetensors("eora-adapter/adapter_model.safetensors")   # header, or AdapterFileError
    >>> check_adapter_weights("me/smollm2-gptq4-eora", revision="main")   # local folder or Hub repo

Nothing here knows about EoRA configs or models: saving (:mod:`peft_eora.saving`), export
(:mod:`peft_eora.export`) and loading (:class:`peft_eora.config.EoRAConfig`) build on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]

#: File names of a PEFT adapter folder (the values of ``peft.utils.constants``, without importing peft).
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME = "adapter_model.bin"
README_NAME = "README.md"
#: EoRA's own settings beside a LoRA ``adapter_config.json`` (see :mod:`peft_eora.adapter_format`).
EORA_CONFIG_NAME = "eora_config.json"


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated, corrupted, or in a format peft-eora refuses (pickle)."""


# bytes per element of the safetensors dtypes (sub-byte and exotic types are not size-checked)
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
_REPAIR_HINT = "Save the adapter again (model.save_pretrained) or download it again (force_download=True)."


def check_safetensors(path: PathLike) -> dict[str, Any]:
    """Validate a safetensors file without loading it; return its header.

    Checks the header length, that the header is JSON, that every tensor's byte range matches its
    dtype and shape, and that the data section has exactly the announced size (catches truncated
    downloads and partial writes). Raises :class:`AdapterFileError` naming the file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            raw = f.read(n) if n is not None and 0 < n <= min(size - 8, _MAX_HEADER) else None
    except OSError as exc:
        raise AdapterFileError(f"Cannot read the adapter weights {path}: {exc}") from exc
    if n is None or raw is None:
        raise AdapterFileError(
            f"{path} is truncated or not a safetensors file ({size} bytes; header length field "
            f"{'missing' if n is None else n}). {_REPAIR_HINT}"
        )
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise AdapterFileError(f"{path} has a corrupted safetensors header ({exc}). {_REPAIR_HINT}") from exc
    data_size = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterFileError(f"{path}: corrupted safetensors entry for tensor {name!r}. {_REPAIR_HINT}") from exc
        itemsize = _DTYPE_SIZES.get(dtype)
        if not (0 <= begin <= stop) or (itemsize is not None and numel * itemsize != stop - begin):
            raise AdapterFileError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) has inconsistent byte offsets [{begin}, {stop}]; "
                f"the file is corrupted. {_REPAIR_HINT}"
            )
        end = max(end, stop)
    if end != data_size:
        state = "truncated" if end > data_size else "corrupted (trailing bytes)"
        raise AdapterFileError(
            f"{path} is {state}: its tensors need {end} bytes of data but the file holds {data_size}. {_REPAIR_HINT}"
        )
    return header


def _pickle_refused(where: str) -> AdapterFileError:
    return AdapterFileError(
        f"{where} holds only {WEIGHTS_NAME} (a pickle file) and no {SAFETENSORS_WEIGHTS_NAME}. peft-eora never loads "
        "pickle files, which can run arbitrary code; save the adapter with safetensors (the default of "
        "model.save_pretrained)."
    )


def hub_download_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``kwargs`` that ``huggingface_hub.hf_hub_download`` takes (``revision``,
    ``token``, ``cache_dir``, …), without those naming the file (``repo_id``, ``filename``, ``subfolder``)."""
    import inspect

    from huggingface_hub import hf_hub_download

    accepted = set(inspect.signature(hf_hub_download).parameters) - {"repo_id", "filename", "subfolder", "local_dir"}
    return {k: v for k, v in kwargs.items() if k in accepted}


def resolve_file(model_id: PathLike, filename: str, subfolder: Optional[str] = None, **kwargs: Any) -> Optional[str]:
    """Path of ``filename`` in a local adapter folder or a Hub repo (downloaded), ``None`` if it is not there.

        >>> resolve_file("me/smollm2-gptq4-eora", "eora_config.json", revision="main")

    ``kwargs`` may hold ``hf_hub_download`` arguments; others are ignored. Offline, a file that is
    not cached counts as absent.
    """
    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        path = os.path.join(local, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return hf_hub_download(model_id, filename, subfolder=subfolder, **hub_download_kwargs(kwargs))
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
        return None
    except HFValidationError:  # a local path that is not there (a wrong folder or subfolder): PEFT says so itself
        return None


def read_json(model_id: PathLike, filename: str, subfolder: Optional[str] = None, **kwargs: Any) -> Optional[dict]:
    """The JSON object in ``filename`` of a local folder or Hub repo (see :func:`resolve_file`), or ``None``.

    Raises :class:`AdapterFileError` naming the file when it is not a JSON object.
    """
    path = resolve_file(model_id, filename, subfolder, **kwargs)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterFileError(f"Cannot read {path}: {exc}. {_REPAIR_HINT}") from exc
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(data).__name__}, not an object. {_REPAIR_HINT}")
    return data


def check_adapter_weights(model_id: PathLike, subfolder: Optional[str] = None, **kwargs: Any) -> Optional[str]:
    """Locate and validate ``adapter_model.safetensors`` of a local adapter directory or Hub repo.

        >>> check_adapter_weights("eora-adapter")   # "eora-adapter/adapter_model.safetensors"

    Returns the checked file path, or ``None`` when there are no weights at all (PEFT reports
    that itself). Raises :class:`AdapterFileError` for a damaged file or a pickle-only adapter.
    ``kwargs`` may hold ``hf_hub_download`` arguments (``revision``, ``token``, ``cache_dir``...).
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    model_id = os.fspath(model_id)
    local = os.path.join(model_id, subfolder) if subfolder else model_id
    if os.path.isdir(local):
        weights = os.path.join(local, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(weights):
            check_safetensors(weights)
            return weights
        if os.path.isfile(os.path.join(local, WEIGHTS_NAME)):
            raise _pickle_refused(local)
        return None
    hf_kwargs = hub_download_kwargs(kwargs)
    try:
        weights = hf_hub_download(model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hf_kwargs)
    except RemoteEntryNotFoundError:
        pickle_name = f"{subfolder}/{WEIGHTS_NAME}" if subfolder else WEIGHTS_NAME
        api = HfApi()
        if api.file_exists(model_id, pickle_name, revision=hf_kwargs.get("revision"), token=hf_kwargs.get("token")):
            raise _pickle_refused(f"The Hub repo {model_id}") from None
        return None
    except LocalEntryNotFoundError:  # offline and not cached: PEFT raises its own error next
        return None
    check_safetensors(weights)
    return weights


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # directories on some filesystems
        pass
    finally:
        os.close(fd)


def _commit_order(rel: str) -> tuple[int, str]:
    """Weights first, then other files (``eora_config.json``), then the config, the model card last."""
    name = os.path.basename(rel)
    rank = 0 if name.endswith(".safetensors") else 2 if name == CONFIG_NAME else 3 if name == README_NAME else 1
    return rank, rel


@contextmanager
def atomic_directory(target: PathLike, stale: Iterable[str] = ()) -> Iterator[str]:
    """Write a directory atomically: yield a temporary directory beside ``target``, then move it in.

        >>> with atomic_directory("out", stale=["eora_config.json"]) as tmp:
        ...     write_files(tmp)

    If ``target`` does not exist (or is empty) the temporary directory is renamed onto it, so it
    appears complete or not at all. If it holds files, each written file replaces its namesake
    with ``os.replace`` (weights first, config and card last) and other files are kept, but for
    the ``stale`` ones (paths relative to ``target`` that no longer describe what is written, e.g.
    an EoRA sidecar beside a plain-LoRA adapter), which are removed first unless written anew; the
    files replaced or removed are set aside until the last rename, so an exception at any point
    (in the body, or a rename failing half-way) leaves ``target`` as it was. Only a process killed
    during the renames can leave old and new files side by side.
    """
    # a symlink to a folder is saved into the folder it names (a rename onto the link itself fails)
    target = os.path.realpath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"Cannot save into {target}: it is a file, not a directory.")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    try:
        yield tmp
        files = sorted(
            (os.path.relpath(os.path.join(root, f), tmp) for root, _, names in os.walk(tmp) for f in names),
            key=_commit_order,
        )
        mode = _file_mode()
        for rel in files:
            _chmod(os.path.join(tmp, rel), mode)  # safetensors writes 0600; the folder's files are ordinary ones
            _fsync(os.path.join(tmp, rel))
        if not os.path.isdir(target) or not os.listdir(target):
            os.replace(tmp, target)  # atomic; replaces an empty directory
        else:
            removed = sorted(set(map(os.path.normpath, stale)) - set(map(os.path.normpath, files)))
            _merge_into(target, tmp, [(rel, False) for rel in removed] + [(rel, True) for rel in files])
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(target)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _merge_into(target: str, tmp: str, moves: list[tuple[str, bool]]) -> None:
    """Per ``(rel, new)``: move ``tmp/rel`` onto ``target/rel`` (``new``) or remove ``target/rel``, in order.
    What they replace or remove waits in ``tmp/.replaced/`` until the last move; on an exception every
    move done is undone, newest first."""
    aside = os.path.join(tmp, ".replaced")
    done: list[tuple[str, Optional[str], bool]] = []  # (dest, its old file set aside or None, new file moved in)
    made: list[str] = []
    try:
        for i, (rel, new) in enumerate(moves):
            dest = os.path.join(target, rel)
            old: Optional[str] = None
            if os.path.lexists(dest):
                old = os.path.join(aside, str(i))
                os.makedirs(aside, exist_ok=True)
                os.replace(dest, old)
            done.append((dest, old, False))
            if new:
                folder = os.path.dirname(dest)
                missing = []
                while not os.path.isdir(folder):
                    missing.append(folder)
                    folder = os.path.dirname(folder)
                for folder in reversed(missing):  # outermost first
                    os.mkdir(folder)
                    made.append(folder)
                os.replace(os.path.join(tmp, rel), dest)
                done[-1] = (dest, old, True)
    except BaseException:
        for dest, old, moved in reversed(done):
            with contextlib.suppress(OSError):
                if moved:
                    os.remove(dest)
                if old is not None:
                    os.replace(old, dest)
        for folder in reversed(made):  # the adapter folders this save created, empty again
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _file_mode() -> int:
    """The mode a new file gets from ``open()`` under the process's umask (e.g. 0644 under 022)."""
    try:  # Linux: read without setting it (setting it is process-wide, another thread could create a file meanwhile)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        with _UMASK_LOCK:
            mask = os.umask(0o022)
            os.umask(mask)
    return 0o666 & ~mask


def _chmod(path: str, mode: int) -> None:
    with contextlib.suppress(OSError):  # filesystems without modes (some FUSE or object-store mounts): keep theirs
        os.chmod(path, mode)


_UMASK_LOCK = threading.Lock()


def atomic_write(path: PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """Write ``path`` atomically through ``write(temporary_path)``: a temporary file in the same folder, then a rename;
    the result gets the umask's mode (a temporary file is private, 0600), and an error leaves nothing behind.

        >>> atomic_write("sweep.png", lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        _chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`).

        >>> atomic_write_text("results/sweep.md", table)
    """
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
