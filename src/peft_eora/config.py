"""``EoRAConfig``: a ``LoraConfig`` whose A/B are computed from the compression residual.

    >>> from peft import get_peft_model
    >>> from peft_eora import EoRAConfig, CalibrationConfig
    >>> config = EoRAConfig(
    ...     r=64,
    ...     original_model="HuggingFaceTB/SmolLM2-135M-Instruct",  # path or Hub id, safetensors
    ...     calibration=CalibrationConfig(dataset="builtin:c4", num_samples=128, seq_len=512),
    ... )
    >>> model = get_peft_model(quantized_model, config)  # computes the EoRA factors

Everything in the config is JSON-serialisable. It is saved as two files beside the adapter
weights: ``adapter_config.json``, a plain LoRA config that every LoRA tool reads, and
``eora_config.json`` with the EoRA fields (see :mod:`peft_eora.adapter_format`). In-memory
original models and calibration batches go through the Python API instead
(:func:`peft_eora.initialize_eora_weights`).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft import LoraConfig

from .adapter_format import read as read_saved_config
from .adapter_format import write_split
from .decompose import DEFAULT_EIG_RTOL, METHODS
from .safe_files import check_adapter_weights

#: Ridge damping chosen by measurement (benchmarks/recovery.py): see the README's table.
#: ``damping`` default: chosen per layer on held-out calibration windows (see README "Damping").
DEFAULT_DAMPING = "auto"
#: The fixed ridge used where ``"auto"`` cannot hold windows out (fewer than 2 windows, or the
#: held-out ones all padding) and for the statistics pass of rank allocation.
FIXED_DAMPING = 0.01


_SOURCE_KEYS = ("dataset", "subset", "split", "column", "template", "weight", "data_files")


@dataclass
class CalibrationSource:
    """One more source of calibration text for :attr:`CalibrationConfig.mix`.

    Same meaning as the fields of :class:`CalibrationConfig`; ``weight`` is this source's share
    of the windows relative to the others (the main source's is ``CalibrationConfig.weight``).
    """

    dataset: str
    subset: Optional[str] = None
    split: str = "train"
    column: str = "text"
    template: Optional[str] = None
    weight: float = 1.0
    data_files: Optional[Union[str, list[str], dict[str, Any]]] = None

    def __post_init__(self) -> None:
        self.dataset = _as_path_or_id(self.dataset, "CalibrationSource.dataset")
        _check_weight(self.weight, self.dataset)


def _as_path_or_id(value: Any, field_name: str) -> Any:
    """A ``str``/``os.PathLike`` field as the ``str`` saved in the adapter's JSON; anything else one error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"{field_name} takes a path or Hub id (it is saved with the adapter), not a {type(value).__name__}. In-memory "
        "data and tokenizers go to peft_eora.initialize_eora_weights(peft_model, original_model=..., "
        "calibration=<tokens, batches or DataLoader>, tokenizer=...)."
    )


def _check_weight(weight: float, dataset: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (0 <= weight < float("inf")):
        raise ValueError(f"Calibration weight of {dataset!r} must be a finite number ≥ 0, got {weight!r}.")


@dataclass
class CalibrationConfig:
    """Where calibration text comes from and how it is cut into samples.

    ``dataset`` is a Hub dataset id (loaded with ``datasets.load_dataset``), a local file
    (``.jsonl``/``.json``/``.txt``/``.parquet``/``.csv``) or folder, or a sample shipped with the
    package: ``"builtin:c4"`` (256 C4 documents) or ``"builtin:gsm8k"`` (512 GSM8K training
    problems, each ``"{question}\\n{answer}"``). ``column`` holds text or lists of token ids;
    ``template`` (e.g. ``"Question: {question}\\nAnswer: {answer}"``) builds the text from
    several columns instead. ``data_files`` names the files of a Hub dataset to read (only those are
    downloaded: ``allenai/c4``'s ``validation`` split alone would download every shard of the corpus).
    Documents are shuffled with ``seed``, tokenised, joined with the EOS token and cut into ``num_samples``
    windows of ``seq_len`` tokens.

    ``mix`` adds sources (:class:`CalibrationSource` or dicts with the same keys); the windows
    are shared out by ``weight`` (largest remainder), each window cut from one source, and the
    windows shuffled together with ``seed``. The paper's task calibration, half task data and
    half C4::

        CalibrationConfig("builtin:c4", num_samples=64, mix=[{"dataset": "builtin:gsm8k"}])
    """

    dataset: str = field(
        default="builtin:c4", metadata={"help": "Hub id, local file/folder, 'builtin:c4' or 'builtin:gsm8k'."}
    )
    subset: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name (Hub datasets)."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    column: str = field(default="text", metadata={"help": "Column with text or token ids."})
    num_samples: int = field(default=128, metadata={"help": "Number of calibration windows."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per calibration window."})
    seed: int = field(default=0, metadata={"help": "Shuffle seed for documents."})
    tokenizer: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer path/id; defaults to the original model's."}
    )
    template: Optional[str] = field(
        default=None, metadata={"help": "Format string over a row's columns, e.g. '{question}\\n{answer}'."}
    )
    weight: float = field(default=1.0, metadata={"help": "Share of the windows from this source when mixing."})
    data_files: Optional[Union[str, list[str], dict[str, Any]]] = field(
        default=None,
        metadata={"help": "Files of a Hub dataset to read (datasets.load_dataset's data_files): only those are "
                          "downloaded, e.g. one C4 shard instead of the whole corpus."},
    )
    mix: Optional[list[Union[CalibrationSource, dict[str, Any]]]] = field(
        default=None, metadata={"help": "Further sources (dataset, subset, split, column, template, weight)."}
    )

    def __post_init__(self) -> None:
        self.dataset = _as_path_or_id(self.dataset, "CalibrationConfig.dataset")
        self.tokenizer = _as_path_or_id(self.tokenizer, "CalibrationConfig.tokenizer")
        for name in ("num_samples", "seq_len", "seed"):
            value = getattr(self, name)
            try:
                if isinstance(value, bool):
                    raise TypeError
                setattr(self, name, operator.index(value))  # numpy integers too, saved as plain ints
            except TypeError:
                raise ValueError(f"CalibrationConfig.{name} must be an integer, got {value!r}.") from None
        if self.num_samples <= 0 or self.seq_len <= 1:
            raise ValueError(
                f"Calibration needs num_samples ≥ 1 and seq_len ≥ 2, got num_samples={self.num_samples}, "
                f"seq_len={self.seq_len}."
            )
        _check_weight(self.weight, self.dataset)
        if not self.mix and self.weight <= 0:
            raise ValueError(f"CalibrationConfig.weight is {self.weight}: the only source needs a positive weight.")
        if self.mix:
            sources = []
            for entry in self.mix:
                if isinstance(entry, dict):
                    unknown = sorted(set(entry) - set(_SOURCE_KEYS))
                    if unknown or "dataset" not in entry:
                        raise ValueError(
                            f"CalibrationConfig.mix entries take the keys {list(_SOURCE_KEYS)} (dataset required), "
                            f"got {sorted(entry)}."
                        )
                    entry = CalibrationSource(**entry)
                elif not isinstance(entry, CalibrationSource):
                    raise ValueError(f"CalibrationConfig.mix entries must be dicts or CalibrationSource, got {entry!r}.")
                sources.append(entry)
            self.mix = sources
            if sum(s.weight for s in self.sources) <= 0:
                raise ValueError("CalibrationConfig: every source has weight 0; give at least one a positive weight.")

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.seq_len

    @property
    def sources(self) -> list[CalibrationSource]:
        """The main source followed by the ``mix`` sources."""
        main = CalibrationSource(
            dataset=self.dataset, subset=self.subset, split=self.split, column=self.column,
            template=self.template, weight=self.weight, data_files=self.data_files,
        )  # fmt: skip
        return [main, *(self.mix or [])]


#: Fields that steer one run or one load and are never written to adapter_config.json.
_RUN_CHOICES = ("allow_base_mismatch", "execution_device", "checkpoint_dir", "resume", "forward_dtype")

#: Values of ``EoRAConfig.forward_dtype``.
FORWARD_DTYPES = ("auto", "model", "bfloat16", "float16")

#: Values of ``EoRAConfig.value_weighting`` (see :mod:`peft_eora.value_weighting`).
VALUE_WEIGHTINGS = ("attention", "tokens")

#: Values of ``EoRAConfig.logit_weighting`` (see :mod:`peft_eora.logit_weighting`) and its default.
LOGIT_WEIGHTINGS = ("queries_and_keys", "keys", "none")
DEFAULT_LOGIT_WEIGHTING = "queries_and_keys"


#: ``init_lora_weights`` values that compute their own factors (from the base or from data) and, all but EVA,
#: rewrite the base weights: they cannot be combined with EoRA's factors.
_OTHER_INITS = ("pissa", "olora", "corda", "loftq", "eva", "orthogonal", "mica", "lora_ga")
#: LoRA variants whose layers compute something else than ``x + s·B·A·x`` (or run another forward), with the value
#: that leaves each off: EoRA's factors fit only the plain form (DoRA is refused on its own, below)
_VARIANTS = {
    "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None, "velora_config": None,
    "kasa_config": None, "monteclora_config": None, "arrow_config": None, "layer_replication": None,
    "megatron_config": None,
}


@dataclass
class EoRAConfig(LoraConfig):
    """LoRA config whose adapters are initialised by EoRA (arXiv 2410.21271).

    On top of ``LoraConfig`` (``r``, ``target_modules``, ``rank_pattern``, …):

    - ``original_model``: path or Hub id of the uncompressed checkpoint (safetensors).
    - ``calibration``: a :class:`CalibrationConfig` (or its dict form).
    - ``method``: ``"eora"`` (default) or ``"svd"`` (plain SVD of the residual, the baseline).
    - ``damping``: ``"auto"`` (default): per layer, the δ in ``(0, 0.01, 0.1, 0.3, 1, 3, inf)``
      (``inf`` = plain SVD of the residual) whose factors, fitted on half of the calibration
      windows, best predict the other half (every 2nd window); then refitted on all windows.
      The chosen δ are in ``eora_stats``; with a single window it warns and uses 0.01. Or a
      ridge ``δ ≥ 0`` added as ``δ·mean(diag H)·I`` to each input covariance.
    - ``rank_allocation``: ``"uniform"`` (every layer gets ``r``/``rank_pattern``) or
      ``"spectrum"``: per-layer ranks bought greedily by ``(s_k² / ‖W·Xᵀ‖²_F) / (in + out)``
      (``s_k``: the layer's projected residual spectrum; the ratio is what the k-th rank removes
      from its squared relative output error), within the parameter count of the configured
      ranks (or ``rank_budget`` parameters), each in ``[rank_min, rank_max]`` (default 1 and
      ``min(out, in) − 1``). ``"spectrum_absolute"`` ranks by ``s_k² / (in + out)`` (measured
      worse: it piles ranks onto layers with large activations). Costs one extra uncompensated
      statistics pass; the ranks end up in ``rank_pattern`` (and ``alpha_pattern``, keeping each
      layer's scale) and the budget in ``rank_budget``, so saved adapters reload and export as usual.
    - ``value_weighting``: ``"attention"`` (default): a value projection's residual is weighted by
      the covariance of its attention-averaged inputs ``P̄·X`` (the error that reaches the attention
      output), not by every token once (``"tokens"``); see :mod:`peft_eora.value_weighting`.
    - ``logit_weighting``: ``"queries_and_keys"`` (default): a key projection's output channels are
      weighted by the energy of the queries that read them, a query projection's by the keys (their
      errors reach the model only through the attention logits); ``"keys"``: keys only; ``"none"``:
      every output channel alike. See :mod:`peft_eora.logit_weighting`.
    - ``eig_rtol``: eigenvalues below ``eig_rtol·λ_max`` are dropped.
    - ``sequential``: compute the modules of a block in execution order, each group seeing
      inputs from the already-compensated groups before it (else one pass per block).
    - ``adapter_bits``: 16 (float factors), 8 or 4 (factors fitted onto int8/int4 grids against
      the layer's activations and saved as codes; see :mod:`peft_eora.adapter_quant`).
    - run choices (never saved): ``execution_device`` (``"auto"``: a model on the CPU of a GPU
      machine visits the GPU one decoder block at a time), ``checkpoint_dir`` + ``resume``
      (each finished block is saved atomically; an interrupted run continues where it stopped),
      ``forward_dtype`` (the calibration forwards' precision, see the field's help).

    ``lora_alpha`` defaults to ``r`` (scaling 1). ``target_modules=None`` targets every linear
    layer inside the decoder blocks whose type has a residual back-end.
    """

    r: int = field(default=64, metadata={"help": "EoRA rank."})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "LoRA alpha; defaults to r (scaling 1)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout for further fine-tuning (0 = off)."})
    original_model: Optional[str] = field(
        default=None, metadata={"help": "Path or Hub id of the uncompressed model (safetensors)."}
    )
    calibration: Optional[Union[CalibrationConfig, dict[str, Any]]] = field(
        default=None, metadata={"help": "Calibration data spec (CalibrationConfig or its dict)."}
    )
    method: Literal["eora", "svd"] = field(default="eora", metadata={"help": "'eora' or 'svd' (baseline)."})
    damping: Union[float, str] = field(
        default=DEFAULT_DAMPING,
        metadata={
            "help": "Relative ridge added to H, or 'auto' (the default: chosen per layer on held-out calibration "
            "windows among 0 … 3 and plain SVD; with a single window, the fixed ridge 0.01)."
        },
    )
    rank_allocation: Literal["uniform", "spectrum", "spectrum_absolute"] = field(
        default="uniform",
        metadata={
            "help": "'uniform' (r / rank_pattern), 'spectrum' (per-layer ranks under a parameter budget, by relative "
            "output-error reduction) or 'spectrum_absolute' (by absolute output-error reduction)."
        },
    )
    rank_budget: Optional[int] = field(
        default=None,
        metadata={"help": "rank_allocation='spectrum': total LoRA parameters; default: those of the configured ranks."},
    )
    rank_min: Optional[int] = field(
        default=None, metadata={"help": "rank_allocation='spectrum': smallest rank per layer (default 1)."}
    )
    rank_max: Optional[int] = field(
        default=None,
        metadata={"help": "rank_allocation='spectrum': largest rank per layer (default min(out, in) − 1)."},
    )
    value_weighting: Literal["attention", "tokens"] = field(
        default="attention",
        metadata={
            "help": "How a value projection's residual is weighted: 'attention' (default) by the covariance of the "
            "attention-averaged inputs P̄·X, i.e. by the attention each token receives (most goes to the first "
            "token); 'tokens': every token once, like the other layers (see peft_eora.value_weighting)."
        },
    )
    logit_weighting: Literal["queries_and_keys", "keys", "none"] = field(
        default=DEFAULT_LOGIT_WEIGHTING,
        metadata={
            "help": "Output weighting of query/key projections by the attention logits they feed: "
            "'queries_and_keys' (default) weights each rotary pair of a key head by the energy of the queries "
            "reading it and each pair of a query head by its keys; 'keys': keys only; 'none': every output channel "
            "alike (see peft_eora.logit_weighting)."
        },
    )
    eig_rtol: float = field(default=DEFAULT_EIG_RTOL, metadata={"help": "Relative eigenvalue cut-off."})
    sequential: bool = field(default=True, metadata={"help": "Compensate groups within a block in order."})
    adapter_bits: int = field(
        default=16,
        metadata={
            "help": "Storage of the factors: 16 keeps them in float; 8 or 4 fits A and B onto a symmetric "
            "int8/int4 grid against each layer's activations (GPTQ-style) and saves codes + scales "
            "(see peft_eora.adapter_quant)."
        },
    )
    init_eora: bool = field(
        default=True,
        metadata={
            "help": "Compute the EoRA factors when the adapter is created. Set to False once computed, so "
            "that loading a saved adapter never recomputes."
        },
    )
    eora_stats: Optional[dict[str, Any]] = field(
        default=None, metadata={"help": "Filled in after computing: timings, token count, per-module errors."}
    )
    base_fingerprint: Optional[dict[str, Any]] = field(
        default=None,
        metadata={"help": "Fingerprint of the quantized base the factors were computed against (checked on load)."},
    )
    fine_tuned: bool = field(
        default=False,
        metadata={
            "help": "Set when the adapter is saved with factors that moved since EoRA computed them (fine-tuning): "
            "eora_stats then describe the EoRA initialisation, not the saved factors."
        },
    )
    execution_device: Optional[str] = field(
        default="auto",
        metadata={
            "help": "Run choice, never saved: where decoder blocks compute. 'auto': on the model's own devices, except "
            "that a model sitting on the CPU of a machine with a GPU visits the GPU one block at a time (offload); "
            "None: always on the model's devices; or a device such as 'cuda', 'cuda:1', 'cpu'."
        },
    )
    checkpoint_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Run choice, never saved: folder where each finished block's factors and the next block's inputs "
            "are written atomically, so an interrupted run can resume (see resume)."
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Run choice, never saved: continue the run held in checkpoint_dir (else it must be empty)."},
    )
    forward_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "Run choice, never saved: precision of the calibration forwards through the decoder blocks. "
            "None / 'model': the model's own dtype; 'bfloat16' / 'float16': autocast to it (the input covariances "
            "still accumulate in float32); 'auto': bfloat16 when the model computes in float32 on a device with "
            "native bfloat16 matmuls (CPUs with AVX512-BF16/AMX, CUDA), else the model's own."
        },
    )
    allow_base_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Load onto a base whose fingerprint differs, with a warning. A loading choice: never saved; pass "
            "it as PeftModel.from_pretrained(model, path, allow_base_mismatch=True)."
        },
    )

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = self.r
        init = self.init_lora_weights
        if init is False:
            raise ValueError(
                "EoRAConfig(init_lora_weights=False) is not supported: it starts lora_B random, so an adapter not yet "
                "computed would change the model's outputs. EoRA computes lora_A/lora_B itself: leave "
                "init_lora_weights at its default."
            )
        if isinstance(init, str) and init.lower().startswith(_OTHER_INITS):
            raise ValueError(
                f"EoRAConfig(init_lora_weights={init!r}) is not supported: EoRA computes lora_A/lora_B itself, and "
                f"{init!r} would compute other factors (and PiSSA, OLoRA, CorDA and LoftQ also rewrite the base weights, "
                "so the residual and the base fingerprint would no longer be the compressed model's). Leave "
                "init_lora_weights at its default; fine-tune from the EoRA init afterwards if you wish."
            )
        super().__post_init__()
        from ._peft_compat import _extend_peft_type

        self.peft_type = _extend_peft_type()
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**self.calibration)
        # the config is saved with the adapter (and PEFT deep-copies it): in-memory models and data go to the API
        if self.original_model is not None and not isinstance(self.original_model, (str, os.PathLike)):
            raise TypeError(
                f"EoRAConfig.original_model takes the uncompressed checkpoint's path or Hub id (saved with the adapter), "
                f"not a {type(self.original_model).__name__}. For an in-memory model: get_peft_model(model, "
                "EoRAConfig(...)) without it, then peft_eora.initialize_eora_weights(peft_model, original_model=..., "
                "calibration=...)."
            )
        if isinstance(self.original_model, os.PathLike):
            self.original_model = os.fspath(self.original_model)
        if self.calibration is not None and not isinstance(self.calibration, CalibrationConfig):
            raise TypeError(
                f"EoRAConfig.calibration takes a CalibrationConfig (or its dict), not a {type(self.calibration).__name__}."
                " Token tensors, datasets and DataLoaders go to peft_eora.initialize_eora_weights(peft_model, "
                "original_model=..., calibration=...)."
            )
        if self.method not in METHODS:
            raise ValueError(f"EoRAConfig.method must be one of {METHODS}, got {self.method!r}.")
        self._check_damping_and_allocation()
        self._check_forward_dtype()
        if self.value_weighting not in VALUE_WEIGHTINGS:
            raise ValueError(f"EoRAConfig.value_weighting must be one of {VALUE_WEIGHTINGS}, got {self.value_weighting!r}.")
        if self.logit_weighting not in LOGIT_WEIGHTINGS:
            raise ValueError(f"EoRAConfig.logit_weighting must be one of {LOGIT_WEIGHTINGS}, got {self.logit_weighting!r}.")
        if self.use_dora:
            raise ValueError("EoRA initialises plain LoRA factors; DoRA (use_dora=True) is not supported.")
        variants = [f"{k}={getattr(self, k)!r}" for k, off in _VARIANTS.items() if getattr(self, k, off) not in (off, [], {})]
        if variants:
            raise ValueError(
                f"EoRA computes plain LoRA factors (x + s·B·A·x on every token); {', '.join(variants)} makes another "
                "layer, which those factors do not fit (the adapter would do nothing or fail mid-computation). Leave "
                "it unset; fine-tune from the EoRA init with a LoRA variant afterwards if you wish."
            )
        from .adapter_quant import check_bits

        self.adapter_bits = check_bits(self.adapter_bits)

    def _check_forward_dtype(self) -> None:
        if self.forward_dtype is not None and self.forward_dtype not in FORWARD_DTYPES:
            raise ValueError(f"EoRAConfig.forward_dtype must be None or one of {FORWARD_DTYPES}, got {self.forward_dtype!r}.")

    def _check_damping_and_allocation(self) -> None:
        d = self.damping
        if isinstance(d, str):
            if d != "auto":
                raise ValueError(f"EoRAConfig.damping must be a number ≥ 0 or 'auto', got the string {d!r}.")
        elif isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 <= d < float("inf")):
            raise ValueError(f"EoRAConfig.damping must be a finite number ≥ 0 or 'auto', got {d!r}.")
        if self.rank_allocation not in ("uniform", "spectrum", "spectrum_absolute"):
            raise ValueError(
                "EoRAConfig.rank_allocation must be 'uniform', 'spectrum' or 'spectrum_absolute', got "
                f"{self.rank_allocation!r}."
            )
        for key in ("rank_budget", "rank_min", "rank_max"):
            value = getattr(self, key)
            if value is None:
                continue
            if self.rank_allocation == "uniform":
                raise ValueError(f"EoRAConfig.{key} only applies with rank_allocation='spectrum' (or 'spectrum_absolute').")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EoRAConfig.{key} must be a positive integer, got {value!r}.")
        if self.rank_min is not None and self.rank_max is not None and self.rank_max < self.rank_min:
            raise ValueError(f"EoRAConfig.rank_max ({self.rank_max}) is smaller than rank_min ({self.rank_min}).")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for key in _RUN_CHOICES:  # how a run was executed or loaded, not properties of the adapter
            data.pop(key, None)
        return data

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` (plain LoRA) and ``eora_config.json`` (EoRA fields) into ``save_directory``.

            >>> config.save_pretrained("eora-adapter")

        Float adapters get ``peft_type: "LORA"``, so stock PEFT, transformers and lm-eval load
        them; int8/int4 adapters get :data:`~peft_eora.adapter_format.QUANTIZED_PEFT_TYPE`.
        ``PeftModel.save_pretrained`` calls this.
        """
        super().save_pretrained(save_directory, **kwargs)
        write_split(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any):
        """Load a saved EoRA config (``PeftModel.from_pretrained`` calls this), local or from the Hub.

            >>> EoRAConfig.from_pretrained("me/smollm2-gptq4-eora", revision="<commit sha>")

        Reads ``adapter_config.json`` and ``eora_config.json`` (or the single file of adapters
        in the first, single-file layout). Also checks the adapter weights: ``adapter_model.safetensors``
        must be intact (a truncated or corrupted file raises :class:`peft_eora.AdapterFileError`
        naming it) and a pickle file is never loaded. ``allow_base_mismatch=True`` is honoured as
        a loading keyword; ``kwargs`` may hold Hub download options (``revision``, ``token``, …).
        """
        allow_base_mismatch = kwargs.pop("allow_base_mismatch", None)
        data = read_saved_config(pretrained_model_name_or_path, subfolder, **kwargs)
        _, class_kwargs, _ = cls._split_kwargs(kwargs)
        config = cls.from_peft_type(**cls.check_kwargs(**{**class_kwargs, **data}))
        if allow_base_mismatch is not None:
            config.allow_base_mismatch = bool(allow_base_mismatch)
        check_adapter_weights(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return config
