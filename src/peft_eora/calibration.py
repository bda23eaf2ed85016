"""Calibration data: from a spec (Hub id, local files, shipped sample) or user batches to token windows.

    >>> from peft_eora.calibration import load_calibration_tokens
    >>> from peft_eora import CalibrationConfig
    >>> tokens = load_calibration_tokens(CalibrationConfig("builtin:c4", num_samples=8, seq_len=256), tokenizer)
    >>> tokens.shape
    torch.Size([8, 256])

Any of these can be passed where calibration data is expected (see :func:`as_batches`): a
:class:`~peft_eora.config.CalibrationConfig`, an ``(n, seq_len)`` tensor of token ids, an
iterable (list, ``DataLoader``) of tensors or of dicts with ``input_ids`` (and optionally
``attention_mask``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import CalibrationConfig, CalibrationSource

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_DATASETS = {
    "builtin:c4": DATA_DIR / "c4_validation_256.jsonl",
    "builtin:gsm8k": DATA_DIR / "gsm8k_train_512.jsonl",
}
#: How a built-in set without a ``text`` column becomes text (the perplexity convention of GSM8K).
BUILTIN_TEMPLATES = {"builtin:gsm8k": "{question}\n{answer}"}
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}

Batch = dict[str, torch.Tensor]
CalibrationData = Union[CalibrationConfig, torch.Tensor, Iterable[Any]]


class CalibrationError(ValueError):
    """Calibration data is missing, empty or too short."""


def _text_folder(path: Path) -> bool:
    """Whether a dataset folder holds only ``.txt`` data files (read by paragraph, as a single ``.txt`` file is)."""
    suffixes = {
        f.suffix.lower()
        for f in path.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
        and f.suffix.lower() in _FILE_BUILDERS
    }
    return suffixes == {".txt"}


def load_documents(source: Union[CalibrationConfig, CalibrationSource]) -> list[Any]:
    """Documents of one source: its ``column`` (text or token-id lists) or its ``template`` filled per row."""
    import datasets

    name = source.dataset
    path = BUILTIN_DATASETS.get(name, Path(name).expanduser())
    try:
        if path.exists():
            if path.is_dir():
                extra = {"sample_by": "paragraph"} if _text_folder(path) else {}
                ds = datasets.load_dataset(str(path), source.subset, split=source.split, **extra)
            else:
                builder = _FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise CalibrationError(
                        f"Calibration file {path} has an unsupported extension; use one of {sorted(_FILE_BUILDERS)}."
                    )
                if path.stat().st_size == 0:
                    raise CalibrationError(f"Calibration file {path} is empty: it needs documents to calibrate on.")
                # a text file's rows are its paragraphs (blank-line separated), not its lines: the rows are
                # shuffled and EOS-joined, which would cut hard-wrapped documents into unrelated fragments
                extra = {"sample_by": "paragraph"} if builder == "text" else {}
                ds = datasets.load_dataset(builder, data_files={source.split: str(path)}, split=source.split, **extra)
        elif name.startswith("builtin:"):
            raise CalibrationError(f"Unknown built-in calibration set {name!r}; choose one of {sorted(BUILTIN_DATASETS)}.")
        else:
            files = {"data_files": source.data_files} if source.data_files is not None else {}
            ds = datasets.load_dataset(name, source.subset, split=source.split, **files)
    except CalibrationError:
        raise
    except Exception as exc:  # datasets raises many types; give one actionable message
        reason = str(exc).strip() or type(exc).__name__
        if path.exists():
            raise CalibrationError(
                f"Could not read the calibration {'folder' if path.is_dir() else 'file'} {path} (split "
                f"{source.split!r}): {reason}. Check that it is a dataset folder or a valid "
                f"{'/'.join(sorted(_FILE_BUILDERS))} file with a {source.column!r} column (or set column=/template=)."
            ) from exc
        raise CalibrationError(
            f"Could not load calibration dataset {name!r} (split {source.split!r}): {reason}. Pass a local file, "
            f"one of {sorted(BUILTIN_DATASETS)}, or a Hub id that is cached (offline) / reachable."
        ) from exc
    template = source.template
    if template is None and source.column not in ds.column_names:
        template = BUILTIN_TEMPLATES.get(name)
    if template is not None:
        try:  # a row missing a value it names is skipped, not rendered as "None"
            rows = [template.format(**row) for row in ds if not any(row[k] is None for k in _fields(template, row))]
        except (KeyError, IndexError, ValueError) as exc:
            raise CalibrationError(
                f"Calibration template {template!r} does not fit dataset {name!r} ({exc!r}); its columns are "
                f"{ds.column_names}. Name columns as {{column}}."
            ) from exc
    elif source.column not in ds.column_names:
        raise CalibrationError(
            f"Calibration dataset {name!r} has no column {source.column!r}; its columns are {ds.column_names}. "
            "Set column=, or template= to combine columns."
        )
    else:
        rows = ds[source.column]
    for r in rows:
        if r is not None and not _is_document(r):
            raise CalibrationError(
                f"Calibration dataset {name!r} (column {source.column!r}) holds {type(r).__name__} values such as "
                f"{str(r)[:60]!r}: each row must be a text or a flat list of token ids. Pick another column= or "
                "a template=."
            )
    rows = [r for r in rows if r is not None and (r.strip() if isinstance(r, str) else len(r) > 0)]
    if not rows:
        raise CalibrationError(f"Calibration dataset {name!r} (column {source.column!r}) is empty (or blank).")
    return rows


def _fields(template: str, row: Mapping[str, Any]) -> list[str]:
    """The columns ``template`` names (``{question}`` → ``question``) that ``row`` has."""
    import string

    return [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template)
            if f and f.split(".")[0].split("[")[0] in row]


def _is_document(row: Any) -> bool:
    """A text, or a flat sequence of integer token ids."""
    if isinstance(row, str):
        return True
    return isinstance(row, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in row)


def share_windows(weights: list[float], total: int) -> list[int]:
    """Split ``total`` windows in proportion to ``weights`` (largest remainder; ties to the earlier source)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def load_calibration_tokens(spec: CalibrationConfig, tokenizer=None) -> torch.Tensor:
    """``(num_samples, seq_len)`` token windows from the spec's source(s).

    Each source's documents are shuffled with ``spec.seed``, tokenised, joined with EOS and cut
    into its share of the windows; with ``mix``, the windows of all sources are then shuffled
    together (seeded), so every part of the data (e.g. damping='auto''s held-out windows) sees
    the mixture.
    """
    sources = spec.sources
    counts = share_windows([s.weight for s in sources], spec.num_samples)
    for source, count in zip(sources, counts):
        if count == 0:
            logger.warning(
                "Calibration source %r gets no window of the %d (its weight %g of %g): it is left out. Raise "
                "num_samples or its weight to use it.", source.dataset, spec.num_samples, source.weight,
                sum(s.weight for s in sources),
            )
    parts = [
        _windows(source, count, spec.seq_len, spec.seed, tokenizer, mixed=len(sources) > 1)
        for source, count in zip(sources, counts)
        if count > 0
    ]
    tokens = torch.cat(parts)
    if len(sources) > 1:
        order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(spec.seed))
        tokens = tokens[order]
    return tokens


def _windows(source: CalibrationSource, count: int, seq_len: int, seed: int, tokenizer, mixed: bool) -> torch.Tensor:
    rows = load_documents(source)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    need = count * seq_len
    eos = _separator(tokenizer)
    ids: list[int] = []
    for i in order:
        row = rows[i]
        if isinstance(row, str):
            if tokenizer is None:
                raise CalibrationError(
                    f"Calibration data {source.dataset!r} holds text but no tokenizer was given or found: set "
                    "CalibrationConfig(tokenizer=...), or pass tokenizer= to peft_eora.initialize_eora_weights (a column "
                    "of token-id lists needs none)."
                )
            ids.extend(tokenizer(row, add_special_tokens=False)["input_ids"])
        else:
            ids.extend(int(t) for t in row)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        share = " (its share of the mix)" if mixed else ""
        raise CalibrationError(
            f"Calibration data {source.dataset!r} has only {len(ids)} tokens but num_samples×seq_len{share} = "
            f"{count}×{seq_len} = {need} are needed; lower num_samples or seq_len, or add data."
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(count, seq_len)


def _separator(tokenizer: Any) -> Optional[int]:
    """The token joining two documents: EOS, else SEP or BOS (logged), else none (a warning: documents then run into
    each other)."""
    if tokenizer is None:
        return None
    for name in ("eos_token_id", "sep_token_id", "bos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, int):
            if name != "eos_token_id":
                logger.info("the tokenizer has no EOS token: calibration documents are joined with its %s",
                            name[: -len("_token_id")].upper())
            return token
    logger.warning("the tokenizer has no EOS, SEP or BOS token: calibration documents are joined with no separator")
    return None


def is_token_mapping(data: Any) -> bool:
    """A mapping with ``input_ids`` (a tokenizer's output), not the fields of a :class:`CalibrationConfig`."""
    return isinstance(data, Mapping) and not isinstance(data, CalibrationConfig) and "input_ids" in data


def text_rows(data: Any) -> Optional[list[Optional[str]]]:
    """The texts of ``data`` when it is calibration text, else ``None``: a list or tuple of strings,
    of mappings with a ``"text"`` field (and no ``"input_ids"``), a mapping ``{"text": [...]}``, or a
    ``datasets.Dataset`` with a ``"text"`` column and no ``"input_ids"`` one. Missing texts
    (``None``) stay ``None`` (dropped as blank)."""
    columns = getattr(data, "column_names", None)
    if isinstance(columns, list) and "text" in columns and "input_ids" not in columns:
        return list(data["text"])
    if isinstance(data, Mapping) and not isinstance(data, CalibrationConfig) and "text" in data \
            and "input_ids" not in data and isinstance(data["text"], (list, tuple, str)):
        return [data["text"]] if isinstance(data["text"], str) else list(data["text"])
    if not isinstance(data, (list, tuple)) or not data:
        return None
    if all(isinstance(t, str) or t is None for t in data) and any(isinstance(t, str) for t in data):
        return list(data)
    if all(isinstance(t, Mapping) and "text" in t and "input_ids" not in t for t in data):
        return [t["text"] for t in data]
    return None


def _text_batches(texts: list[Optional[str]], tokenizer: Any, batch_size: int,
                  max_tokens: Optional[int] = None) -> list[Batch]:
    """Each non-blank text one sample (tokenized with the tokenizer's special tokens, as a model
    reads it; its first ``max_tokens`` tokens), ``batch_size`` per batch, right-padded with id 0
    under an attention mask (what a hidden position holds changes nothing the covariances see)."""
    if tokenizer is None:
        raise CalibrationError(
            "Calibration text needs a tokenizer and none was given or found: pass tokenizer= to "
            "peft_eora.initialize_eora_weights, or tokenize the texts yourself."
        )
    from .eval.batching import right_pad  # eval reads this module's context_length: imported on use

    rows = []
    for t in texts:
        if t is None or not str(t).strip():
            continue
        ids = torch.as_tensor(tokenizer(str(t))["input_ids"]).reshape(-1)  # lists, or (1, L) tensors
        if ids.numel():
            rows.append(_token_ids(ids).tolist())
    long = sum(len(r) > max_tokens for r in rows) if max_tokens else 0
    if long:
        logger.warning("%d of %d calibration texts are longer than the model's context: their first %d tokens "
                       "are used", long, len(rows), max_tokens)
        rows = [r[:max_tokens] for r in rows]
    batches: list[Batch] = []
    for start in range(0, len(rows), batch_size):
        ids, mask = right_pad(rows[start:start + batch_size], 0, torch.device("cpu"))
        batches.append({"input_ids": ids} if bool(mask.all()) else {"input_ids": ids, "attention_mask": mask})
    return batches


def as_batches(data: CalibrationData, tokenizer=None, batch_size: int = 8,
               max_text_tokens: Optional[int] = None) -> list[Batch]:
    """Normalise any accepted calibration input to a list of ``{"input_ids", "attention_mask"?}``.

    A mapping with ``input_ids`` (a tokenizer's output) is one batch of rows, split by ``batch_size``;
    any other mapping holds the fields of a :class:`CalibrationConfig`. Texts (:func:`text_rows`: a
    list of strings, or a ``datasets.Dataset`` with a ``"text"`` column) are one sample each, as
    GPTQ quantizers take them, tokenized with ``tokenizer`` (at most ``max_text_tokens`` each)::

        >>> as_batches(["The capital of France is Paris.", "def f(x): return x"], tokenizer)  # doctest: +SKIP
    """
    texts = text_rows(data)
    if texts is not None:
        batches = _text_batches(texts, tokenizer, batch_size, max_text_tokens)
        if not batches:
            raise CalibrationError("The calibration data is empty: every text given is blank.")
        return batches
    if is_token_mapping(data):
        try:
            ids = torch.as_tensor(data["input_ids"])
        except (ValueError, TypeError) as exc:  # rows of different lengths
            raise CalibrationError(
                f"Calibration input_ids could not be made one tensor ({exc}): rows of different lengths need padding "
                "and an attention mask (tokenizer(texts, padding=True, return_tensors='pt')), or pass a list of "
                "batches."
            ) from exc
        mask = data.get("attention_mask")
        rows = ids.split(batch_size) if ids.ndim == 2 else [ids]
        masks = torch.as_tensor(mask).split(batch_size) if mask is not None and ids.ndim == 2 else [mask] * len(rows)
        data = [{"input_ids": r, "attention_mask": m} for r, m in zip(rows, masks)]
    elif isinstance(data, Mapping) and not isinstance(data, CalibrationConfig):
        data = CalibrationConfig(**data)
    if isinstance(data, CalibrationConfig):
        data = load_calibration_tokens(data, tokenizer)
    if isinstance(data, torch.Tensor):
        if data.ndim == 1:
            data = data[None]
        if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
            raise CalibrationError(f"Calibration token tensor must be (n, seq_len) and non-empty, got {tuple(data.shape)}.")
        return [{"input_ids": chunk} for chunk in _token_ids(data).split(batch_size)]
    if isinstance(data, (str, bytes)):
        raise CalibrationError("Pass a CalibrationConfig (e.g. CalibrationConfig(dataset=path)) rather than a bare string.")
    batches: list[Batch] = []
    for item in data:
        if isinstance(item, (list, tuple)) and len(item) == 1 and isinstance(item[0], torch.Tensor):
            item = item[0]  # DataLoader(TensorDataset(ids)) yields [ids]
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        elif isinstance(item, Mapping):
            if "input_ids" not in item:
                raise CalibrationError(f"Calibration batches need an 'input_ids' entry, got keys {sorted(item)}.")
            item = {k: v for k, v in item.items() if k in ("input_ids", "attention_mask")}
        else:
            raise CalibrationError(
                f"Unsupported calibration batch of type {type(item).__name__}: each batch must be a token-id tensor, "
                "a mapping with 'input_ids' (and 'attention_mask'), or a one-tensor tuple as DataLoader(TensorDataset(ids)) "
                "yields."
            )
        value = item["input_ids"]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            # PyTorch's default collate makes a batch of rows that are lists into one tensor per position
            raise CalibrationError(
                f"A calibration batch's input_ids is a list of {len(value)} tensors (of {tuple(value[0].shape)}): "
                "PyTorch's default collate makes that of rows that are Python lists, one tensor per position. Give "
                "the DataLoader tensor rows (dataset.with_format('torch'), or TensorDataset), or a collate_fn that "
                "stacks rows (transformers.DataCollatorWithPadding)."
            )
        try:
            ids = torch.as_tensor(value)
        except (ValueError, TypeError) as exc:
            raise CalibrationError(f"A calibration batch's input_ids could not be made one tensor ({exc}): pad its "
                                   "rows to one length and pass an attention mask.") from exc
        given = tuple(ids.shape)
        if ids.ndim == 1:
            ids = ids[None]
        elif ids.ndim == 3 and ids.shape[1] == 1:  # a DataLoader over tokenizer(text, return_tensors="pt") items
            ids = ids[:, 0]
        if ids.ndim != 2:
            _token_ids(ids)  # a float or negative tensor is said first
            raise CalibrationError(
                f"A calibration batch's input_ids must be (batch, seq_len), got {given}. Batches of "
                "tokenizer(..., return_tensors='pt') outputs stack a (1, seq_len) tensor per row: tokenize without "
                "return_tensors (or squeeze each row) before the DataLoader."
            )
        mask = None
        if item.get("attention_mask") is not None:
            mask = torch.as_tensor(item["attention_mask"])
            if mask.numel() != ids.numel():
                raise CalibrationError(
                    f"A calibration batch's attention_mask {tuple(mask.shape)} does not match its input_ids {given}: "
                    "give one mask entry per token."
                )
            mask = mask.reshape(ids.shape)
        ids = _token_ids(ids, None if mask is None else mask == 0)  # negative padding ids (hidden) become 0
        batch: Batch = {"input_ids": ids}
        if mask is not None and not bool(mask.all()):
            batch["attention_mask"] = mask.long()
        if ids.numel():
            batches.append(batch)
    if not batches:
        raise CalibrationError("The calibration data is empty: no batch with any token was given.")
    return batches


def _token_ids(ids: torch.Tensor, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``ids`` as int64 token ids; float or boolean tensors (not token ids) and negative ids are
    refused, except where ``hidden`` (a boolean mask of padding) hides them: those become id 0."""
    if ids.numel() == 0:  # nothing to check (empty data is said where batches are counted)
        return ids.long()
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise CalibrationError(f"Calibration token ids must be an integer tensor, got dtype {ids.dtype}.")
    negative = ids < 0
    if bool(negative.any()):
        real = negative if hidden is None else negative & ~hidden
        if bool(real.any()):
            raise CalibrationError(f"Calibration token ids must be ≥ 0, got {int(ids[real].min())}.")
        ids = ids.masked_fill(negative, 0)
    return ids.long()


def check_vocabulary(batches: list[Batch], vocab_size: Optional[int]) -> list[Batch]:
    """``batches`` with every token id inside the model's vocabulary: one clear error if a real token
    is outside it (else an index error deep in a forward), and padding (positions the attention mask
    hides) whose id is outside it set to id 0 in a copy (a pad token added to the tokenizer but not
    to the model's embeddings; what a hidden position holds changes nothing the covariances see).

        >>> batches = check_vocabulary(batches, model.config.vocab_size)  # doctest: +SKIP
    """
    if not vocab_size:
        return batches
    out = []
    for b in batches:
        ids, mask = b["input_ids"], b.get("attention_mask")
        outside = ids >= vocab_size
        if not bool(outside.any()):
            out.append(b)
            continue
        real = outside if mask is None else outside & mask.to(torch.bool)
        if bool(real.any()):
            raise CalibrationError(
                f"Calibration token id {int(ids[real].max())} is outside the model's vocabulary ({vocab_size} tokens): "
                "the ids come from another tokenizer. Tokenize with the model's own tokenizer."
            )
        logger.info("Calibration padding id %d is outside the model's %d-token vocabulary (a pad token the model has "
                    "no embedding for); the hidden positions are given id 0.", int(ids[outside].max()), vocab_size)
        out.append({**b, "input_ids": ids.masked_fill(outside, 0)})
    return out


def context_length(model: torch.nn.Module) -> Optional[int]:
    """The model's context length as its config names it (``None`` where it names none)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(batches: list[Batch], context: Optional[int], windows: bool = False) -> None:
    """One clear error if a calibration sequence is longer than the model's context (``context``
    positions; ``None``: the model names none): past it a learned position table ends in an index
    error deep in a forward, and rotary models see positions they were never trained on.
    ``windows``: the batches are a :class:`CalibrationConfig`'s windows (the fix is its ``seq_len``).

        >>> check_context(batches, model.config.max_position_embeddings)  # doctest: +SKIP
    """
    if not context:
        return
    longest = max((int(b["input_ids"].shape[-1]) for b in batches), default=0)
    if longest > context:
        fix = (f"lower CalibrationConfig(seq_len=...) to at most {context}" if windows
               else f"truncate the calibration sequences to at most {context} tokens")
        raise CalibrationError(
            f"Calibration sequences of {longest} tokens are longer than the model's context ({context} positions, "
            f"config.max_position_embeddings): {fix}."
        )


def count_tokens(batches: list[Batch]) -> int:
    """Number of real (unmasked) tokens in ``batches``."""
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
