"""The uncompressed reference weights, read one tensor at a time.

    >>> from peft_eora.original import OriginalWeights
    >>> ref = OriginalWeights.open("path/to/fp16-checkpoint")    # or a Hub id (cached / online)
    >>> ref.shape("model.layers.0.mlp.up_proj")
    (1536, 576)
    >>> w = ref.get("model.layers.0.mlp.up_proj")               # float32, loaded lazily

A checkpoint directory is read with ``safetensors.safe_open`` so a second full model never
sits in memory; an in-memory ``nn.Module`` is also accepted (:meth:`OriginalWeights.from_module`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from .residual.base import is_conv1d

logger = logging.getLogger(__name__)


#: :meth:`OriginalWeights.prefetch` reads ahead (a checkpoint on disk). ``PEFT_EORA_PREFETCH=0``: off.
PREFETCH = os.environ.get("PEFT_EORA_PREFETCH", "1") != "0"


class ModelMismatchError(ValueError):
    """The original model does not match the compressed one."""


#: safetensors dtypes of an unquantized original's weights
_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
#: tensors that only a quantized checkpoint holds beside (or instead of) its ``weight``
_QUANTIZED_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".qweight", ".weight_packed", ".SCB")


def _quantized_original(source: str, found: list[str]) -> ModelMismatchError:
    return ModelMismatchError(
        f"The original model {source} is itself quantized ({', '.join(found[:3])}"
        f"{f', … {len(found)} in all' if len(found) > 3 else ''}): its weights are codes, not the uncompressed weights "
        "the residual W_original − W_compressed needs. Pass the unquantized release (float16/bfloat16/float32)."
    )


def hub_snapshot(repo_id: str, revision: Optional[str] = None, tokenizer: bool = False) -> Path:
    """The local snapshot (cached, else downloaded) of a Hub checkpoint's safetensors weights and JSON configs.

        >>> hub_snapshot("meta-llama/Llama-3.1-8B")      # ~/.cache/huggingface/hub/models--…/snapshots/<sha>

    ``tokenizer=True`` adds the tokenizer files. The second copy of the weights Mistral's repos hold
    (``consolidated*.safetensors``) is skipped.
    """
    from huggingface_hub import snapshot_download

    patterns = ["*.safetensors", "*.json"] + (["*.model", "*.txt", "*.jinja"] if tokenizer else [])
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=["consolidated*"]))


class OriginalWeights:
    """Name → weight lookup over a safetensors checkpoint or a module (``name`` without ``.weight``)."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        loader: Callable[[str], torch.Tensor],
        source: str,
        reads_from_disk: bool = False,
        aliases: Optional[dict[str, str]] = None,
        transposed: Iterable[str] = (),
        sampler: Optional[Callable[[list[str], int], Iterable[tuple[str, torch.Tensor]]]] = None,
    ) -> None:
        self._aliases = aliases or {}  # a second name → the stored one (checkpoint_aliases): one tensor, not two
        # stored as (in, out), as transformers' Conv1D (GPT-2) keeps them: read as (out, in), as a linear's
        self._transposed = frozenset(transposed)
        self._shapes = {n: (tuple(reversed(s)) if self._aliases.get(n, n) in self._transposed else s)
                        for n, s in shapes.items()}
        self._loader = loader
        # (keys, rows) -> (key, the first rows of its stored weight) each, without reading them whole (see digest())
        self._sampler = sampler if sampler is not None else (lambda keys, rows: ((k, loader(k)[:rows]) for k in keys))
        self.source = source
        self._kept: dict[str, dict[str, torch.Tensor]] = {}  # key -> device -> tensor, see keeping()
        self._unreadable: frozenset[str] = frozenset()  # keys whose weight cannot be read (see from_module)
        self.reads_from_disk = reads_from_disk  # the loader reads a checkpoint: prefetch() reads ahead
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: dict[str, Future] = {}  # key -> the loader's result, see prefetch()

    @classmethod
    def open(cls, source: Union[str, Path, nn.Module], revision: Optional[str] = None) -> "OriginalWeights":
        """Open a checkpoint folder, a Hub id (downloaded/cached safetensors) or wrap a module."""
        if isinstance(source, OriginalWeights):
            return source
        if isinstance(source, nn.Module):
            return cls.from_module(source)
        path = Path(str(source)).expanduser()
        if path.is_file():  # a shard or a single weights file: the folder holds the index, config and the rest
            hint = (" GGUF files are quantized (not an original); pass the folder of the float checkpoint."
                    if path.suffix.lower() == ".gguf" else f" Pass its folder, {path.parent}.")
            raise ModelMismatchError(f"The original model {source!r} is a file, not a checkpoint folder.{hint}")
        if not path.is_dir():
            try:
                path = hub_snapshot(str(source), revision=revision)
            except Exception as exc:
                raise ModelMismatchError(
                    f"Could not open the original model {source!r}: not a local folder and not available from the "
                    f"Hub cache ({type(exc).__name__}: {exc}). Pass the folder of the uncompressed checkpoint."
                ) from exc
        return cls.from_safetensors_dir(path)

    @classmethod
    def from_safetensors_dir(cls, path: Path) -> "OriginalWeights":
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelMismatchError(
                f"No *.safetensors files in {path}. EoRA reads the original weights from safetensors; convert the "
                "checkpoint with `model.save_pretrained(dir)` first."
            )
        index = path / "model.safetensors.index.json"
        weight_map: dict[str, str] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelMismatchError(f"{index} is not a safetensors index (no weight_map): {exc}") from exc
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelMismatchError(
                    f"The original checkpoint {path} is incomplete: its index points at {len(missing)} missing shard(s) "
                    f"({', '.join(missing[:3])}). Download or copy the whole checkpoint first."
                )
        key_file: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        renamed: dict[str, str] = {}  # module name → the checkpoint's name for it
        quantized: list[str] = []  # weights stored as codes (float8, integers) or beside quantization scales
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        if key.endswith(".weight"):
                            name = key[: -len(".weight")]
                            key_file[name] = f
                            tensor_slice = st.get_slice(key)
                            shapes[name] = tuple(tensor_slice.get_shape())
                            dtype = tensor_slice.get_dtype()
                            if dtype not in _FLOAT_DTYPES:
                                quantized.append(f"{key} ({dtype})")
                        elif key.endswith(_QUANTIZED_SUFFIXES):
                            quantized.append(key)
            except Exception as exc:  # truncated or corrupted shard
                raise ModelMismatchError(f"Cannot read {f} of the original checkpoint ({type(exc).__name__}: {exc}).") from exc
        if quantized:
            raise _quantized_original(str(path), quantized)
        skeleton = model_skeleton(path)  # the empty model of its config: its names and layer kinds
        for name, stored in checkpoint_aliases(path, list(key_file), skeleton).items():  # transformers' renames
            if name not in key_file:
                key_file[name], shapes[name] = key_file[stored], shapes[stored]
                renamed[name] = stored
        transposed = conv1d_names(path, [n for n in key_file if n not in renamed], skeleton)
        listed = [k for k, f in weight_map.items() if k.endswith(".weight") and k[: -len(".weight")] not in key_file]
        if listed:
            raise ModelMismatchError(
                f"The original checkpoint {path} is inconsistent: its index lists {len(listed)} weight(s) that no shard "
                f"holds ({', '.join(listed[:3])}). Download or copy the checkpoint again."
            )

        def load(name: str) -> torch.Tensor:
            with safe_open(str(key_file[name]), framework="pt") as st:
                return st.get_tensor(renamed.get(name, name) + ".weight")

        def sample(names: list[str], rows: int) -> Iterator[tuple[str, torch.Tensor]]:
            by_file: dict[Path, list[str]] = {}
            for name in names:  # each shard opened once (a MoE has thousands of experts' weights)
                by_file.setdefault(key_file[name], []).append(name)
            for f, group in by_file.items():
                with safe_open(str(f), framework="pt") as st:
                    for name in group:
                        yield name, st.get_slice(renamed.get(name, name) + ".weight")[:rows]

        return cls(shapes, load, str(path), reads_from_disk=True, aliases=renamed, transposed=transposed,
                   sampler=sample)

    @classmethod
    def from_module(cls, module: nn.Module) -> "OriginalWeights":
        """Wrap an in-memory model: its ``*.weight`` parameters (a ``Conv1D``'s read as ``(out, in)``), and the
        experts that transformers keeps fused in 3-D parameters under the names of one linear per expert
        (:func:`fused_expert_weights`)."""
        if any(hasattr(m, "lora_A") and hasattr(m, "get_base_layer") for m in module.modules()):
            raise ModelMismatchError(
                f"The original model ({type(module).__name__}) carries PEFT adapter layers, whose weights are not the "
                "plain linears EoRA reads. Pass model.merge_and_unload() (the adapted model as the original) or "
                "model.unload() (the model without its adapters)."
            )
        weights: dict[str, Callable[[], torch.Tensor]] = fused_expert_weights(module)
        weights.update({n[: -len(".weight")]: p.detach for n, p in module.named_parameters() if n.endswith(".weight")})
        quantized = [f"{n} ({p.dtype})" for n, p in module.named_parameters()
                     if n.endswith(".weight") and (not p.is_floating_point() or p.element_size() == 1)]
        quantized += [n for n, _ in module.named_buffers() if n.endswith(_QUANTIZED_SUFFIXES)]
        if quantized:
            raise _quantized_original(type(module).__name__, quantized)
        shapes = {n: tuple(get().shape) for n, get in weights.items()}
        convs = [n for n, m in module.named_modules() if is_conv1d(m) and n in weights]
        ref = cls(shapes, lambda n: weights[n](), type(module).__name__, transposed=convs)
        # weights accelerate offloaded (left on meta) cannot be read from the module: refused by check(), that is
        # before any work, for the layers EoRA reads (an offloaded embedding or LM head does not matter)
        ref._unreadable = frozenset(n for n, get in weights.items() if get().device.type == "meta")
        return ref

    def digest(self, names: Iterable[str], rows: int = 2) -> str:
        """A digest of the first ``rows`` rows (as stored) of each of ``names``' weights: tells two originals of one
        architecture apart (a resumed run must read the interrupted one's) without reading them whole::

            ref.digest([t.name for t in targets])      # e.g. "3f0c…" (16 hex digits)
        """
        keys = {name: self.resolve(name) for name in sorted(set(names))}
        wanted = sorted({k for k in keys.values() if k is not None and k not in self._unreadable})
        samples = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in self._sampler(wanted, rows)}
        h = hashlib.sha256()
        for name, key in keys.items():
            h.update(name.encode())
            if key in samples:
                h.update(str(tuple(samples[key].shape)).encode() + samples[key].numpy().tobytes())
        return h.hexdigest()[:16]

    def resolve(self, name: str) -> Optional[str]:
        """The checkpoint's name for module ``name`` (tolerating a leading ``model.``-style prefix difference)."""
        if name in self._shapes:
            return name
        candidates = [k for k in self._shapes if k.endswith("." + name) or name.endswith("." + k)]
        stored = {self._aliases.get(k, k) for k in candidates}  # an alias and its stored name: one tensor
        return candidates[0] if len(stored) == 1 else None

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        key = self.resolve(name)
        return None if key is None else self._shapes[key]

    def get(self, name: str, device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """Weight of module ``name`` as float32 on ``device`` (treat it as read-only)."""
        key = self.resolve(name)
        if key is None:
            raise ModelMismatchError(f"The original model {self.source} has no weight for {name}.")
        kept = self._kept.get(key)
        where = str(torch.device(device) if device is not None else "cpu")
        if kept is not None and where in kept:
            return kept[where]
        pending = self._pending.pop(key, None)
        stored = pending.result() if pending is not None else self._loader(key)
        # moved in its own dtype, converted where it lands: torch converts a blocking CPU → GPU copy
        # on the CPU first, and a bf16 checkpoint would cross the bus as float32 (twice the bytes)
        weight = stored.to(device=device).to(torch.float32)
        if self._aliases.get(key, key) in self._transposed:
            weight = weight.T.contiguous()
        if kept is not None:
            kept[where] = weight
        return weight

    @contextmanager
    def keeping(self, names: Iterable[str]) -> Iterator[None]:
        """Inside, :meth:`get` reads each of ``names`` once and hands the same tensor back after that;
        they are dropped on exit. For weights needed twice close together (a query projection's own
        residual, then as the key projection's logit-weighting partner)::

            with ref.keeping(["model.layers.0.self_attn.q_proj"]):
                ...
        """
        keys = {key for key in (self.resolve(n) for n in names) if key is not None} - self._kept.keys()
        self._kept.update({key: {} for key in keys})
        try:
            yield
        finally:
            for key in keys:
                del self._kept[key]

    def prefetch(self, names: Iterable[str]) -> None:
        """Start reading ``names`` from the checkpoint in a background thread, so that the disk reads
        overlap the caller's compute; :meth:`get` then takes them from there. Weights in memory (a
        module) need no reading ahead: a no-op there, and with :data:`PREFETCH` off::

            ref.prefetch(names_of_the_next_block)      # while this block is computed
            ...
            w = ref.get(name_of_the_next_block)        # waits for its read only if not done yet

        Read ahead as stored (e.g. bfloat16, the file's pages in memory); :meth:`cancel_prefetch` drops
        what is not taken.
        """
        if not (PREFETCH and self.reads_from_disk):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peft_eora_original")
        for key in (self.resolve(n) for n in names):
            if key is not None and key not in self._pending:
                self._pending[key] = self._pool.submit(self._read, key)

    def _read(self, key: str) -> torch.Tensor:
        """The stored tensor with its bytes read in: safetensors hands back a view of the memory-mapped
        file, whose pages come off the disk only when first touched, so one byte of every page is
        touched here (the pages are those the later copy reads: no second copy in memory)."""
        t = self._loader(key)
        if t.device.type == "cpu" and t.is_contiguous() and t.numel():
            t.reshape(-1).view(torch.uint8)[:: mmap.PAGESIZE].sum()
        return t

    def cancel_prefetch(self) -> None:
        """Drop the reads started by :meth:`prefetch` that no :meth:`get` took (those under way finish
        in the background and are discarded); the reading thread ends."""
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _fused_sibling(self, name: str) -> Optional[str]:
        """A stored weight of ``name``'s parent module whose name holds ``name``'s projection among others
        (``mlp.gate_up_proj`` for ``mlp.gate_proj``, ``attn.qkv_proj``/``Wqkv`` for ``attn.q_proj``), if any."""
        parent, _, leaf = name.rpartition(".")
        stem = leaf.lower().removesuffix("_proj")
        for other, shape in self._shapes.items():
            o_parent, _, o_leaf = other.rpartition(".")
            if o_parent != parent or o_leaf == leaf or len(shape) != 2:  # a sibling matrix, not a norm's vector
                continue
            fused_projection = o_leaf.lower().endswith("_proj") and stem in o_leaf.lower()[: -len("_proj")].split("_")
            fused_qkv = len(stem) == 1 and stem in "qkv" and "qkv" in o_leaf.lower()
            if (fused_projection and o_leaf.count("_") > 1) or fused_qkv:
                return other
        return None

    def check(self, name: str, expected: tuple[int, int]) -> None:
        """Raise :class:`ModelMismatchError` unless the original has ``name`` with shape ``expected``."""
        if self.resolve(name) in self._unreadable:
            raise ModelMismatchError(
                f"The in-memory original {self.source} has the weight of {name} offloaded by accelerate (on the meta "
                "device), which cannot be read from the module. Pass the original checkpoint's folder (or Hub id) as "
                "original_model instead: it is read a block at a time."
            )
        shape = self.shape(name)
        if shape is None:
            hint = ""
            if ".experts." in name and self.reads_from_disk:
                hint = (" If the checkpoint names its experts in a way transformers' conversion mapping for this model "
                        "does not cover, pass the original loaded in memory instead "
                        "(AutoModelForCausalLM.from_pretrained): its fused experts are read under the per-expert names.")
            elif ".experts." in name:
                hint = (" Fused expert parameters are read as experts.gate_up_proj (experts × 2·inter × hidden, gate "
                        "rows first) and experts.down_proj (experts × hidden × inter); other layouts are not.")
            elif self.reads_from_disk and (fused := self._fused_sibling(name)) is not None:
                hint = (f" The checkpoint stores {fused}, which looks like this projection fused with its siblings "
                        "(transformers splits it when loading this model): pass the original loaded in memory "
                        "(original_model=AutoModelForCausalLM.from_pretrained(...)), which holds the split weights.")
            raise ModelMismatchError(
                f"The original model ({self.source}) has no weight for module {name} of the compressed model: the "
                f"two models do not match. Pass the uncompressed checkpoint the compressed model was made from.{hint}"
            )
        if tuple(shape) != tuple(expected):
            hint = ""
            if tuple(shape) == tuple(reversed(expected)):
                hint = (" It holds the transpose: a checkpoint storing this layer (in, out), as transformers' Conv1D "
                        "does, is read so only where its config.json names a model type whose code uses Conv1D.")
            raise ModelMismatchError(
                f"Shape mismatch for {name}: original ({self.source}) has {tuple(shape)}, compressed model has "
                f"{tuple(expected)}. Pass the uncompressed checkpoint the compressed model was made from.{hint}"
            )


def model_skeleton(path: Path) -> Optional[nn.Module]:
    """An empty model (weights on ``meta``) of the class that ``config.json`` in ``path`` names: what
    transformers would build to load the checkpoint, for its weights' names and layer kinds. None without
    a ``config.json`` whose model type this transformers knows (a folder's own code never runs), or where
    the model cannot be built."""
    try:
        model_type = json.loads((path / "config.json").read_text())["model_type"]
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:  # remote code or another transformers
            return None
    except Exception:  # noqa: BLE001 - no config.json or no model_type: nothing known
        logger.debug("no model skeleton for %s", path, exc_info=True)
        return None
    try:
        import transformers
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
        model_class = next((c for c in named if isinstance(c, type) and issubclass(c, nn.Module)), None)
        if model_class is None:
            mapping = AutoModelForCausalLM._model_mapping
            model_class = mapping[type(config)] if type(config) in mapping else AutoModel._model_mapping[type(config)]
        with init_empty_weights(include_buffers=True):  # fused expert tensors too: nothing allocated
            return model_class(config)
    except Exception as exc:  # noqa: BLE001 - a config this transformers cannot build
        logger.info("no empty %s built from %s (%s: %s): its checkpoint names are read as stored", model_type, path,
                    type(exc).__name__, exc)
        return None


def conv1d_names(path: Path, names: list[str], skeleton: Optional[nn.Module]) -> set[str]:
    """The checkpoint's weights ``names`` (without ``.weight``) that belong to ``Conv1D`` modules (GPT-2 and
    its kin store those ``(in, out)``), found on ``skeleton``, the empty model of its config
    (:func:`model_skeleton`). Empty where none could be built; for a model type whose code uses ``Conv1D``
    that is warned about, since a square one would then be read untransposed."""
    if skeleton is None:
        try:
            model_type = json.loads((path / "config.json").read_text())["model_type"]
        except Exception:  # noqa: BLE001
            return set()
        if model_type in ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"):
            logger.warning("%s: a %s checkpoint stores some weights (in, out) (transformers' Conv1D), but no empty "
                           "model could be built to tell which: they are read as stored.", path, model_type)
        return set()
    from transformers.pytorch_utils import Conv1D

    convs = {n for n, m in skeleton.named_modules() if isinstance(m, Conv1D)}
    return {k for k in names if any(c == k or c.endswith("." + k) or k.endswith("." + c) for c in convs)}


def fused_expert_weights(module: nn.Module) -> dict[str, Callable[[], torch.Tensor]]:
    """Each expert's weights, named as the linears gptqmodel's loader (``defuser``) makes of them.

    transformers 5 keeps a mixture of experts' weights as ``experts.gate_up_proj`` (experts × 2·inter ×
    hidden: the gate's rows, then the up projection's) and ``experts.down_proj`` (experts × hidden ×
    inter); a quantized model holds one linear per expert instead, ``experts.{e}.gate_proj``,
    ``.up_proj`` and ``.down_proj``. Other layouts (transposed, interleaved, with biases, as in gpt-oss)
    are not recognised: their names stay missing, which :meth:`OriginalWeights.check` reports.
    """
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for prefix, sub in module.named_modules():
        gate_up, down = getattr(sub, "gate_up_proj", None), getattr(sub, "down_proj", None)
        if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
                and gate_up.ndim == down.ndim == 3):
            continue
        experts, two_inter, hidden = gate_up.shape
        inter = two_inter // 2
        if (getattr(sub, "is_transposed", False) or two_inter % 2 or getattr(sub, "gate_up_proj_bias", None) is not None
                or tuple(down.shape) != (experts, hidden, inter)):
            continue
        base = f"{prefix}." if prefix else ""
        for e in range(experts):
            out[f"{base}{e}.gate_proj"] = lambda gu=gate_up, e=e, i=inter: gu.detach()[e, :i]
            out[f"{base}{e}.up_proj"] = lambda gu=gate_up, e=e, i=inter: gu.detach()[e, i:]
            out[f"{base}{e}.down_proj"] = lambda d=down, e=e: d.detach()[e]
    return out


def checkpoint_aliases(path: Path, names: list[str], skeleton: Optional[nn.Module] = None) -> dict[str, str]:
    """Module names transformers gives the checkpoint's weights ``names`` (without ``.weight``), where
    they differ: ``{module name: checkpoint name}``, from the model type's conversion mapping (its
    renames, e.g. Mixtral's ``block_sparse_moe`` → ``mlp``), with experts merged into fused parameters
    named as one linear per expert, as gptqmodel's loader and :func:`fused_expert_weights` name them
    (``experts.{e}.w1`` → ``experts.{e}.gate_proj``, ``w3`` → ``up_proj``, ``w2`` → ``down_proj``); then,
    for names still as stored, from the mapping transformers builds for the empty model of the config
    (``skeleton``: class-specific and per-submodel renames, e.g. a vision-language checkpoint's
    ``model.layers`` → ``model.language_model.layers``). Empty without a ``config.json``, a mapping, or
    the transformers API this reads."""
    out: dict[str, str] = {}
    try:
        model_type = json.loads((path / "config.json").read_text())["model_type"]
        from transformers import conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        get = getattr(conversion_mapping, "orig_get_checkpoint_conversion_mapping",  # before defuser's patch
                      conversion_mapping.get_checkpoint_conversion_mapping)
        mappings = [get(model_type) or []]
    except Exception:  # noqa: BLE001 - no config, or another transformers: names as stored
        return out
    if skeleton is not None and hasattr(conversion_mapping, "get_model_conversion_mapping"):
        try:
            mappings.append(conversion_mapping.get_model_conversion_mapping(skeleton))
        except Exception:  # noqa: BLE001 - e.g. transforms transformers finds in conflict: the model type's only
            logger.debug("no model conversion mapping for %s", path, exc_info=True)
    for mapping in mappings:
        try:
            found = _aliases(names, [m for m in mapping if isinstance(m, WeightRenaming)],
                             [m for m in mapping if isinstance(m, WeightConverter)], _apply_renamings, _apply_converter)
        except Exception:  # noqa: BLE001 - a transformers whose transforms behave otherwise: names as stored
            logger.debug("checkpoint names of %s kept as stored", path, exc_info=True)
            continue
        for alias, name in found.items():
            out.setdefault(alias, name)
    return out


def _apply_renamings(key: str, renamings: list) -> str:
    """``key`` through every renaming in turn, as transformers loads a checkpoint (each transform's own
    ``rename_source_key``: the module-level helpers around it changed names between transformers 5 releases)."""
    for renaming in renamings:
        key, _ = renaming.rename_source_key(key)
    return key


def _apply_converter(key: str, converters: list) -> tuple[str, Optional[str]]:
    """``key`` through the first converter that matches it: ``(new key, the source pattern matched)``, else
    ``(key, None)``."""
    for converter in converters:
        renamed, pattern = converter.rename_source_key(key)
        if pattern is not None:
            return renamed, pattern
    return key, None


#: The operations of a converter that only stacks per-expert tensors (and concatenates gate and up).
_STACKING = {"MergeModulelist", "Concatenate"}


def _aliases(names: list[str], renamings: list, converters: list, rename: Callable, convert: Callable
             ) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        key = rename(f"{name}.weight", renamings)
        fused, pattern = convert(key, converters)
        if not key.endswith(".weight"):
            continue
        if pattern is None:
            if key != f"{name}.weight":
                out.setdefault(key[: -len(".weight")], name)
            continue
        converter = next((c for c in converters if pattern in c.source_patterns), None)
        head, sep, tail = key.partition(".experts.")
        index = tail.split(".", 1)[0]
        target = fused.rsplit(".", 1)[-1]  # gate_up_proj (gate and up stacked) or down_proj
        sources = len(converter.source_patterns) if converter is not None else 0
        if (converter is None or not sep or not index.isdigit()
                or {type(op).__name__ for op in converter.operations} - _STACKING
                or (target, sources) not in (("gate_up_proj", 2), ("down_proj", 1))):
            continue
        layer = ("gate_proj", "up_proj")[converter.source_patterns.index(pattern)] if target == "gate_up_proj" \
            else "down_proj"
        out.setdefault(f"{head}.experts.{index}.{layer}", name)
    return {alias: name for alias, name in out.items() if alias != name}
