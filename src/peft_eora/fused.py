"""Swap PEFT's GPTQ LoRA layers for a fused quantized-GEMM + low-rank forward, and back.

    >>> from peft_eora.fused import fuse, unfuse
    >>> report = fuse(peft_model)         # in place; CUDA -> Triton -> torch by availability
    >>> report.fused[:2], report.skipped  # doctest: +SKIP
    >>> with torch.no_grad():
    ...     out = peft_model.generate(**inputs)  # doctest: +SKIP
    >>> unfuse(peft_model)                # the original PEFT modules, exactly, are back

``fuse`` replaces every ``peft.tuners.lora.gptq.GPTQLoraLinear`` (what EoRA/LoRA adapters on a
GPTQ model become) whose base is a plain-GPTQ gptqmodel module (``TorchLinear`` or
``TritonV2Linear``: the packed layout is read directly, gptqmodel is not called) or this
package's own :class:`~peft_eora.kernels.gptq_linear.GPTQLinear`, and which has
exactly one active vanilla-LoRA adapter, by a :class:`FusedGPTQLoraLinear`. That subclass
shares the original's submodules and parameters (same ``state_dict`` keys, ``.to()`` moves
both) and computes ``base(x) + lora_B(lora_A(x))·scaling`` with one call of
``torch.ops.peft_eora.gptq_lora_linear``. Anything else is left alone and logged with the
reason (``report.skipped``). Bases that gptqmodel repacks for its GPU kernels (Marlin,
ExLlama, ...) are skipped: load the checkpoint with the ``torch`` or ``triton`` gptqmodel
backend to fuse it.

On CPU with ``backend="auto"`` fused layers keep PEFT's forward (the op's CPU path is the
float32 reference, slower than gptqmodel's CPU kernel); pass ``backend="torch"``/``"triton"`` to
force the op there. At call time a fused layer also falls back to the plain PEFT forward
whenever the fused op would not compute the same thing: gradients needed (the op has no
backward: use ``torch.no_grad()``, as ``generate`` does), dropout active (training mode),
adapters disabled, another adapter set active, or extra forward arguments (EoRA's mixed-batch
``adapter_names``: the fused twin of its layer keeps that forward). Because it *is* a ``GPTQLoraLinear``,
PEFT's ``disable_adapter()``/``set_adapter()``/``set_scale()`` keep working on fused models, and hooks are
shared with the original layer. The tensors the op reads are re-derived whenever their sources are
replaced or changed in place (identity, storage, version) or the scaling changes; after writes through
``.data`` (PEFT's ``hotswap_adapter``) call ``fuse(model)`` again. Under ``torch.compile`` only the scaling is
checked (storage and version are not traceable): where the op reads copies of the factors (``adapter_bits``
8/4, or activations in another dtype than the factors, the usual bf16 model with float32 adapters), a compiled
model keeps the copies it was traced with after in-place changes to the adapter or the base; call
``fuse(model)`` again after such changes, and the compiled model re-reads them.

Tolerance: against the unfused PEFT model the fused output differs only by rounding: the
kernels dequantize in float32 (gptqmodel's ``TorchLinear`` in the scales' float16) and the
LoRA factors are used in the activation dtype (PEFT runs them in their own, often float32).
Asserted on CPU (``tests/test_fused.py``): max error ≤ 1e-3·max|y| for float32 activations
(observed ~2e-7), ≤ 1e-2·max|y| for float16 (observed ~6e-4, one output ulp). ``adapter_bits=8``/``4`` swaps in int8/int4 factors with float32 scales
(:mod:`peft_eora.kernels.lowbit`), which changes the result by the factor quantization error.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from peft.tuners.lora.gptq import GPTQLoraLinear
from torch import nn

from .kernels import ops as _ops  # registers torch.ops.peft_eora.gptq_lora_linear
from .kernels.gptq_linear import GPTQLinear, tensor_stamp
from .kernels.lowbit import quantize_lora_pair
from .kernels.reference import SUPPORTED_BITS, packed_len
from .layer import MixedBatchGPTQLoraLinear, plain_adapter

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BASES",
    "FuseReport",
    "FusedGPTQLoraLinear",
    "FusedMixedBatchGPTQLoraLinear",
    "fuse",
    "unfuse",
    "fused_modules",
    "base_layer_reason",
]

#: gptqmodel classes whose in-memory tensors are the plain GPTQ layout with "v2" zeros.
DEFAULT_BASES: tuple[str, ...] = ("TorchLinear", "TritonV2Linear")

# nn.Module bookkeeping that must be per-instance (copied, not shared) between the
# original PEFT layer and its fused twin. The hook dicts are shared instead: a hook belongs to "the
# layer", so one registered (or removed through its handle) before, during or after fusing acts on both.
_MODULE_INTERNALS = (
    "_parameters",
    "_buffers",
    "_non_persistent_buffers_set",
    "_modules",
)
#: The most rows (tokens) a call of a fused layer with backend "auto" sends to the fused op: the decode regime the
#: kernels are built for (the CUDA kernel's own limit). Larger calls, prefill, take PEFT's forward.
FUSED_MAX_ROWS = _ops.CUDA_MAX_M

_FUSED_ATTRS = ("_fused_original", "_fused_adapter", "_fused_backend", "_fused_adapter_bits", "_fused_meta",
                "_fused_cache", "_capture_warned", "_fused_captured")


def _capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s stream is being captured into a CUDA graph (never asked while torch.compile traces: dynamo
    cannot trace the query, and a compiled graph's capture comes after its eager warm-up)."""
    return not torch.compiler.is_compiling() and x.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass
class FuseReport:
    """What :func:`fuse` did: qualified names fused, and skipped names with the reason."""

    fused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.fused)


@dataclass(frozen=True)
class _BaseMeta:
    bits: int
    in_features: int
    out_features: int
    group_size: int
    zero_offset: int
    act_order: bool


def _gptqmodel_class_name(module: nn.Module) -> Optional[str]:
    cls = type(module)
    return cls.__name__ if cls.__module__.startswith("gptqmodel.") else None


def base_layer_reason(base: nn.Module, supported: Iterable[str] = DEFAULT_BASES) -> Optional[str]:
    """None if the fused op can read ``base``'s packed tensors directly, else why not."""
    name = _gptqmodel_class_name(base)
    ours = isinstance(base, GPTQLinear)
    if not ours and (name is None or name not in tuple(supported)):
        return (f"base layer {type(base).__name__} is neither a GPTQLinear nor a plain-GPTQ gptqmodel module "
                f"({', '.join(supported)})")
    bits = getattr(base, "bits", None)
    if bits not in SUPPORTED_BITS:
        return f"unsupported bits={bits}"
    if getattr(base, "planar", False):
        return "planar (gptq_p) packing is not supported"
    if getattr(base, "pack_dtype", torch.int32) != torch.int32:
        return f"pack_dtype {getattr(base, 'pack_dtype', None)} is not int32"
    if getattr(base, "adapter", None):
        return "base layer carries its own gptqmodel adapter"
    if getattr(base, "had_K", None) is not None or getattr(base, "online_full_had", False):
        return "base layer applies an online Hadamard rotation"
    for attr in ("qweight", "qzeros", "scales", "g_idx"):
        if not isinstance(getattr(base, attr, None), torch.Tensor):
            return f"base layer has no {attr} tensor"
    k, n = base.in_features, base.out_features
    if tuple(base.qweight.shape) != (packed_len(k, bits), n) or base.qweight.dtype != torch.int32:
        return f"qweight {tuple(base.qweight.shape)} is not the GPTQ layout for {k}x{n} at {bits} bits"
    if base.g_idx.numel() != k:
        return f"g_idx has {base.g_idx.numel()} entries for in_features={k}"
    if base.qzeros.shape[0] != base.scales.shape[0] or base.qzeros.shape[1] < packed_len(n, bits):
        return f"qzeros {tuple(base.qzeros.shape)} does not match scales {tuple(base.scales.shape)}"
    return None


def _base_meta(base: nn.Module) -> _BaseMeta:
    k = int(base.in_features)
    group_size = int(getattr(base, "group_size", -1))
    if group_size <= 0:
        group_size = k
    trivial = torch.equal(
        base.g_idx.detach().to("cpu", torch.long), torch.arange(k, dtype=torch.long) // group_size
    )
    # Modules that REQUIRES_FORMAT_V2 keep true zero points in memory (converted on load);
    # others keep the checkpoint's v1 zeros (stored minus one) unless converted.
    v2 = getattr(type(base), "REQUIRES_FORMAT_V2", False)
    if not v2 and hasattr(base, "qzero_format"):
        v2 = base.qzero_format() == 2
    return _BaseMeta(
        bits=int(base.bits),
        in_features=k,
        out_features=int(base.out_features),
        group_size=group_size,
        zero_offset=0 if v2 else 1,
        act_order=not trivial,
    )


def _own_tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>`` without ``nn.Module.__getattr__``'s cost (a parameter, buffer or plain attribute)."""
    t = module._buffers.get(name)  # GPTQ layers keep their packed tensors as buffers
    if t is None:
        t = module._parameters.get(name)
        if t is None:
            t = module.__dict__.get(name)
            return t if isinstance(t, torch.Tensor) else None
    return t


def _stamps(sources: tuple[Optional[torch.Tensor], ...]) -> list:
    """Each source's :func:`~peft_eora.kernels.gptq_linear.tensor_stamp` (None for an absent one)."""
    return [None if t is None else tensor_stamp(t) for t in sources]


class FusedGPTQLoraLinear(GPTQLoraLinear):
    """A ``GPTQLoraLinear`` whose forward runs the fused GPTQ + low-rank op (see module docs).

    Built by :func:`fuse` (never directly): it shares submodules, parameters, hooks and PEFT adapter
    dictionaries with the original layer, which it keeps for :func:`unfuse`.
    """

    _fused_original: GPTQLoraLinear
    _fused_adapter: str
    _fused_backend: str
    _fused_adapter_bits: int
    _fused_meta: _BaseMeta
    _fused_cache: dict

    @classmethod
    def from_peft(
        cls, layer: GPTQLoraLinear, adapter: str, backend: str = "auto", adapter_bits: int = 16
    ) -> "FusedGPTQLoraLinear":
        """Twin of ``layer`` (not registered anywhere yet) computing ``adapter`` through the fused op."""
        new = cls.__new__(cls)
        state = dict(layer.__dict__)
        for key in _MODULE_INTERNALS:
            if key in state:
                state[key] = type(state[key])(state[key])  # per-instance copy (same entries)
        new.__dict__.update(state)
        object.__setattr__(new, "_fused_original", layer)
        new._bind(adapter, backend, adapter_bits)
        return new

    def _bind(self, adapter: str, backend: str, adapter_bits: int) -> None:
        """Compute ``adapter`` with ``backend`` and ``adapter_bits`` from now on (nothing cached)."""
        object.__setattr__(self, "_fused_adapter", adapter)
        object.__setattr__(self, "_fused_backend", backend)
        object.__setattr__(self, "_fused_adapter_bits", int(adapter_bits))
        object.__setattr__(self, "_fused_meta", _base_meta(self.get_base_layer()))
        object.__setattr__(self, "_fused_cache", {})
        object.__setattr__(self, "_capture_warned", False)
        if "_fused_captured" not in self.__dict__:  # kept across re-binds: a graph captured before may still replay
            object.__setattr__(self, "_fused_captured", {})

    @property
    def original(self) -> GPTQLoraLinear:
        """The PEFT layer this one replaced (restored by :func:`unfuse`)."""
        return self._fused_original

    def refresh(self) -> None:
        """Drop the cached dtype/device copies and re-read the base layer's layout.

        Rarely needed: every call checks that the tensors it copied are still the layer's (same objects,
        storage and version) and that the adapter's scaling is unchanged, so training steps, loaded
        state dicts, ``set_scale`` and swapped adapters are picked up. Only writes through ``.data``
        (``p.data.copy_(...)``, as PEFT's ``hotswap_adapter`` does) bypass the version counter.
        """
        self._fused_cache.clear()
        object.__setattr__(self, "_fused_meta", _base_meta(self.get_base_layer()))

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.lora_A]  # as fuse() counts them

    def _can_fuse_call(self, x: torch.Tensor) -> bool:
        name = self._fused_adapter
        if self.disable_adapters or self.merged or self._active() != [name]:
            return False
        if name in getattr(self, "lora_variant", {}):
            return False
        dropout = self.lora_dropout[name]
        if self.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or self.lora_A[name].weight.requires_grad or self.lora_B[name].weight.requires_grad
        ):
            return False
        if x.shape[-1] != self._fused_meta.in_features:
            return False
        if _ops.requested_backend(self._fused_backend) != "auto":
            return True  # a backend chosen by the caller is used for every call
        # On CPU the fused op only has the float32 reference path, slower than gptqmodel's own
        # CPU kernel; above FUSED_MAX_ROWS rows (prefill) the CUDA kernel does not apply and the Triton one would
        # stream the whole weight once per 16 rows: PEFT's forward there (the base's own kernel, same result).
        return x.device.type != "cpu" and x.numel() // x.shape[-1] <= FUSED_MAX_ROWS

    def _sources(self) -> tuple[Optional[torch.Tensor], ...]:
        """The tensors the cached copies are made from (read off the modules' own dicts: this runs every call)."""
        base = self._modules["base_layer"]
        name = self._fused_adapter
        lora_a = self._modules["lora_A"]._modules.get(name)
        lora_b = self._modules["lora_B"]._modules.get(name)
        if lora_a is None or lora_b is None:  # the adapter was deleted: nothing to stamp
            return (None,) * 8
        get = _own_tensor
        return (get(base, "qweight"), get(base, "qzeros"), get(base, "scales"), get(base, "g_idx"), get(base, "bias"),
                lora_a._parameters.get("weight"), lora_b._parameters.get("weight"), lora_b._parameters.get("bias"))

    def _cached(self, x: torch.Tensor) -> Optional[dict[str, Any]]:
        """The prepared copies for ``x``'s dtype and device if the layer's tensors are unchanged since, else None."""
        cached = self._fused_cache.get((x.dtype, x.device))
        if cached is not None and float(self.scaling[self._fused_adapter]) == cached["scaling"] and (
            torch.compiler.is_compiling()  # data_ptr/_version are not traceable: the scaling is (a float)
            or _stamps(self._sources()) == cached["stamps"]
        ):
            return cached  # the same tensors (the entry holds them: ids stay theirs), unchanged since
        return None

    def _prepared(self, x: torch.Tensor) -> dict[str, Any]:
        cached = self._cached(x)
        if cached is not None:
            return cached
        key = (x.dtype, x.device)
        scaling = float(self.scaling[self._fused_adapter])
        # g_idx may have changed since fuse(), before the first call too (an act-order checkpoint loaded into the
        # skeleton): the layout is re-read on every miss
        object.__setattr__(self, "_fused_meta", _base_meta(self.get_base_layer()))
        self._fused_cache.clear()  # one live copy: dtype/device or the layer's tensors changed
        meta = self._fused_meta
        base = self.get_base_layer()
        name = self._fused_adapter
        dev = x.device
        compute = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        sources = self._sources()
        lora_a = self.lora_A[name].weight.detach()
        lora_b = self.lora_B[name].weight.detach()
        bias = base.bias.detach().to(dev, torch.float32) if getattr(base, "bias", None) is not None else None
        if self.lora_B[name].bias is not None:  # lora_bias=True: folded into the output bias
            lb = self.lora_B[name].bias.detach().to(dev, torch.float32) * scaling
            bias = lb if bias is None else bias + lb
        prepared: dict[str, Any] = dict(
            qweight=base.qweight.detach().to(dev).contiguous(),
            qzeros=base.qzeros.detach().to(dev).contiguous(),
            scales=base.scales.detach().to(dev, compute).contiguous(),
            g_idx=base.g_idx.detach().to(dev, torch.int32).contiguous() if meta.act_order else None,
            bias=bias.to(compute) if bias is not None else None,
            scaling=scaling,
            sources=sources,
            stamps=None if torch.compiler.is_compiling() else _stamps(sources),  # traced: rebuilt once when eager
        )
        if self._fused_adapter_bits == 16:
            prepared.update(
                lora_a=lora_a.to(dev, compute).contiguous(), lora_b=lora_b.to(dev, compute).contiguous(),
                lora_a_scale=None, lora_b_scale=None,
            )
        else:
            qa, qb = quantize_lora_pair(lora_a, lora_b, self._fused_adapter_bits)
            prepared.update(
                lora_a=qa.data.to(dev), lora_b=qb.data.to(dev),
                lora_a_scale=qa.scale.to(dev), lora_b_scale=qb.scale.to(dev),
            )
        self._fused_cache[key] = prepared
        return prepared

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not self._can_fuse_call(x):
            return super().forward(x, *args, **kwargs)
        capturing = _capturing(x)
        if capturing and self._cached(x) is None:
            # copies made (and a kernel workspace zeroed) inside CUDA graph capture only exist once the graph
            # replays: later eager calls would read them unset. This graph keeps PEFT's forward; a layer called
            # eagerly once before capture (the usual warm-up) is captured fused.
            if not self._capture_warned:
                object.__setattr__(self, "_capture_warned", True)
                logger.warning("fused layer first called inside CUDA graph capture: captured with PEFT's forward; "
                               "run one eager forward before capturing to capture the fused kernel")
            return super().forward(x, *args, **kwargs)
        p = self._prepared(x)
        if capturing:  # the graph holds p's addresses: p outlives a later miss that replaces it in the cache
            self._fused_captured[id(p)] = p
        meta = self._fused_meta
        # eager: call the op body directly (no dispatcher round trip); traced: the custom op
        op = torch.ops.peft_eora.gptq_lora_linear if torch.compiler.is_compiling() else _ops.gptq_lora_linear_eager
        return op(
            x, p["qweight"], p["qzeros"], p["scales"], p["g_idx"], p["bias"],
            p["lora_a"], p["lora_b"], p["lora_a_scale"], p["lora_b_scale"],
            bits=meta.bits, group_size=meta.group_size, lora_bits=self._fused_adapter_bits,
            scaling=p["scaling"], zero_offset=meta.zero_offset, backend=self._fused_backend,
        )

    def extra_repr(self) -> str:
        m = self._fused_meta
        return (
            f"fused: adapter={self._fused_adapter!r}, bits={m.bits}, group_size={m.group_size}, "
            f"act_order={m.act_order}, adapter_bits={self._fused_adapter_bits}, backend={self._fused_backend!r}"
        )


class FusedMixedBatchGPTQLoraLinear(FusedGPTQLoraLinear, MixedBatchGPTQLoraLinear):
    """The fused twin of EoRA's mixed-batch layer: ``adapter_names=[...]`` keeps working (PEFT's forward)."""


#: the class of PEFT layer → the class of its fused twin (a subclass of both)
_FUSED_CLASS: dict[type, type[FusedGPTQLoraLinear]] = {
    GPTQLoraLinear: FusedGPTQLoraLinear,
    MixedBatchGPTQLoraLinear: FusedMixedBatchGPTQLoraLinear,
}


def _parent(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    if "." not in qualified:
        return model, qualified
    parent_name, child = qualified.rsplit(".", 1)
    return model.get_submodule(parent_name), child


def fuse(
    model: nn.Module,
    *,
    backend: str = "auto",
    adapter_bits: Optional[int] = None,
    supported_bases: Iterable[str] = DEFAULT_BASES,
) -> FuseReport:
    """Replace fusable GPTQ LoRA/EoRA layers of ``model`` in place; returns a :class:`FuseReport`.

    ``backend``: ``"auto"`` (CUDA → Triton → torch), or force ``"cuda"``/``"triton"``/``"torch"``.
    ``adapter_bits``: 16 keeps the factors in the activation dtype; 8/4 uses int8/int4
    per-channel copies (quantized once, at the first call per dtype/device). ``None`` (default)
    takes each adapter's ``EoRAConfig.adapter_bits`` (16 for other LoRA configs): factors that
    EoRA already rounded onto that grid are read back as the very same codes.

    Layers fused before are bound again to the adapter active now and to these settings (after
    ``set_adapter("other")``, call ``fuse`` again to fuse ``other``); they are listed in ``fused``.
    """
    if backend not in _ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {_ops.BACKENDS}")
    if adapter_bits is not None and adapter_bits not in (16, 8, 4):
        raise ValueError(f"unsupported adapter_bits={adapter_bits}: expected 16, 8 or 4")
    configs = getattr(model, "peft_config", {}) or {}
    supported = tuple(supported_bases)
    report = FuseReport()
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, GPTQLoraLinear):
            continue
        reason = base_layer_reason(module.get_base_layer(), supported)
        adapter = None
        if reason is None:
            reason, adapter = plain_adapter(module)
        if reason is None and not isinstance(module, FusedGPTQLoraLinear) and type(module) not in _FUSED_CLASS:
            reason = f"{type(module).__name__} overrides PEFT's GPTQLoraLinear, and the fused twin would drop its forward"
        if reason is not None:
            report.skipped[name] = reason
            logger.info("not fusing %s: %s", name, reason)
            continue
        targets.append((name, module, adapter))
    for name, module, adapter in targets:
        bits = adapter_bits if adapter_bits is not None else int(getattr(configs.get(adapter), "adapter_bits", 16))
        if isinstance(module, FusedGPTQLoraLinear):  # fused before: bound again (another adapter may be active now)
            module._bind(adapter, backend, bits)
        else:
            parent, child = _parent(model, name)
            setattr(parent, child, _FUSED_CLASS[type(module)].from_peft(module, adapter, backend, bits))
        report.fused.append(name)
    logger.info("fused %d GPTQ LoRA layer(s), skipped %d", len(report.fused), len(report.skipped))
    if not report.fused and not report.skipped:
        warnings.warn(
            "fuse() found no GPTQ LoRA layer to fuse: the fused path serves adapters on GPTQ bases (gptqmodel's "
            "layers or peft_eora's GPTQLinear); other bases keep PEFT's forward.", UserWarning, stacklevel=2,
        )
    return report


def unfuse(model: nn.Module) -> int:
    """Put the original PEFT layers back (with the adapter state changed meanwhile); returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, FusedGPTQLoraLinear)]
    for name, fused in targets:
        original = fused._fused_original
        for key, value in fused.__dict__.items():  # carry adapter state (active adapter, enabled, mode)
            if key in _MODULE_INTERNALS or key in _FUSED_ATTRS:
                continue
            original.__dict__[key] = value
        parent, child = _parent(model, name)
        setattr(parent, child, original)
    if targets:
        logger.info("unfused %d layer(s)", len(targets))
    return len(targets)


def fused_modules(model: nn.Module) -> dict[str, FusedGPTQLoraLinear]:
    """Fused layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedGPTQLoraLinear)}

