"""The one place where peft-eora adapts PEFT internals (checked against peft 0.21.2).

PEFT's public ``register_peft_method`` only accepts names already in the closed enum
``peft.utils.peft_types.PeftType`` and refuses a second tuner with the prefix ``lora_``. EoRA *is*
LoRA at inference time (same ``lora_A``/``lora_B`` modules, same state-dict keys, so the adapter
stays readable by LoRA tooling), so we:

1. add a real ``PeftType.EORA`` member to the enum (so ``PeftType("EORA")`` and ``.value`` work
   everywhere PEFT uses them), and
2. insert EoRA into the three lookup tables that ``register_peft_method`` fills (config, tuner,
   prefix), keeping the ``lora_`` prefix.

PEFT has no hook for how a model is saved or pushed (atomic writes, the EoRA model card), so
:func:`patch_peft_model` wraps ``PeftModel.save_pretrained``/``push_to_hub`` at class level:
models without an EoRA adapter keep PEFT's behaviour unchanged.

Float EoRA adapters are saved as plain LoRA (``peft_type: "LORA"``) with their EoRA fields in a
separate ``eora_config.json``, so that tools without peft-eora load them. PEFT picks the config
class from ``peft_type`` alone, so :func:`patch_config_loading` wraps
``PeftConfigMixin.from_pretrained`` (what ``PeftModel.from_pretrained``, ``load_adapter`` and
transformers' ``load_adapter`` call): for a folder that is an EoRA adapter it returns the EoRA
config, so the tuner is EoRA's (base check, metadata); every other adapter loads unchanged.

While an adapter is computed, :func:`only_active` makes it the only active one on every LoRA
layer through PEFT's private ``_active_adapter`` (``set_adapter`` would also change
``requires_grad``).

``import peft_eora`` imports none of this (nor PEFT, torch or transformers): :func:`when_peft_ready`
runs the wiring as soon as PEFT is imported — at once if it already is, else from an import
hook that watches ``peft`` and ``peft_eora.*`` imports and removes itself afterwards.

``tests/test_registration.py`` fails loudly if a PEFT release changes any of this.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.abc
import inspect
import logging
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from peft.utils.peft_types import PeftType
    from torch import nn

logger = logging.getLogger(__name__)

EORA_NAME = "EORA"
_ORIGINAL: dict[str, Callable[..., Any]] = {}


def _extend_peft_type(name: str = EORA_NAME) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the (closed) enum if needed."""
    from peft.utils.peft_types import PeftType

    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # Set the class attribute before the member maps know the name: EnumType.__setattr__
    # refuses to rebind existing members.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(config_cls: type, model_cls: type, config_aliases: tuple[str, ...] = ()) -> PeftType:
    """Make PEFT's ``get_peft_model``/``PeftConfig``/``PeftModel`` know the EoRA method.

    ``config_aliases`` are further ``peft_type`` strings of saved adapter configs that load as
    ``config_cls`` (PEFT looks the saved string up in its config table; nothing else sees them).
    """
    from peft import mapping

    peft_type = _extend_peft_type()
    current = mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if current is not None and current is not model_cls:
        raise RuntimeError(f"Another tuner ({current!r}) is already registered as PEFT type {peft_type.value}.")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    for alias in config_aliases:
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[alias] = config_cls
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    logger.debug("registered PEFT method %s -> %s", peft_type.value, model_cls.__name__)
    return peft_type


def peft_save_pretrained(model: Any, save_directory: str, **kwargs: Any) -> None:
    """PEFT's own ``PeftModel.save_pretrained`` (bypassing :func:`patch_peft_model`)."""
    from peft import PeftModel

    _ORIGINAL.get("save_pretrained", PeftModel.save_pretrained)(model, save_directory, **kwargs)


def patch_peft_model(
    owns: Callable[[Any, Optional[list[str]]], bool],
    save_pretrained: Callable[..., Any],
    push_to_hub: Callable[..., Any],
) -> None:
    """Route ``PeftModel.save_pretrained``/``push_to_hub`` to ``save_pretrained(model, directory, **kw)``
    and ``push_to_hub(model, repo_id, **kw)`` when ``owns(model, selected_adapters)`` is true.

    Other models keep PEFT's behaviour unchanged. Idempotent.
    """
    from peft import PeftModel

    if getattr(PeftModel.save_pretrained, "_peft_eora", False):
        return
    original_save = PeftModel.save_pretrained
    original_push = PeftModel.push_to_hub
    _ORIGINAL.update(save_pretrained=original_save, push_to_hub=original_push)
    save_signature = inspect.signature(original_save)

    @functools.wraps(original_save)
    def save_pretrained_(self, save_directory, *args, **kwargs):
        bound = save_signature.bind(self, save_directory, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        extra = arguments.pop("kwargs", {})
        if not owns(self, arguments.get("selected_adapters")):
            return original_save(self, save_directory, *args, **kwargs)
        save_directory = arguments.pop("save_directory")
        save_pretrained(self, save_directory, **arguments, **extra)

    @functools.wraps(original_push)
    def push_to_hub_(self, repo_id, *args, **kwargs):
        if args or not owns(self, None):
            return original_push(self, repo_id, *args, **kwargs)
        return push_to_hub(self, repo_id, **kwargs)

    save_pretrained_._peft_eora = True  # type: ignore[attr-defined]
    push_to_hub_._peft_eora = True  # type: ignore[attr-defined]
    PeftModel.save_pretrained = save_pretrained_
    PeftModel.push_to_hub = push_to_hub_


def patch_add_adapter(peft_type: Any, join_lora_model: Callable[[Any, str, Any], None]) -> None:
    """Let one ``PeftModel`` hold LoRA and ``peft_type`` (EoRA) adapters side by side. Idempotent.

    PEFT refuses adapters of another ``peft_type`` than the model's first (``add_adapter``, so also
    ``load_adapter``). An EoRA adapter *is* a LoRA adapter at inference time and EoRA's tuner is a
    ``LoraModel``, so: a LoRA adapter joins an EoRA model as it would a LoRA one; an EoRA adapter joins a
    LoRA model after ``join_lora_model(peft_model, adapter_name, config)``, which raises where it needs EoRA's
    tuner and does what EoRA's tuner would do first (check the base fingerprint).
    """
    from peft import PeftModel
    from peft.utils import PeftType

    current = PeftModel.add_adapter
    if getattr(current, "_peft_eora", False):
        return
    pair = {PeftType.LORA, peft_type}

    @functools.wraps(current)
    def add_adapter(self, adapter_name, peft_config, *args, **kwargs):
        for key, value in _LOAD_OVERRIDES.get().items():  # load_adapter(..., allow_base_mismatch=True)
            if hasattr(peft_config, key):
                setattr(peft_config, key, value)
        kept = getattr(self, "peft_type", None)
        if kept == peft_config.peft_type or {kept, peft_config.peft_type} != pair:
            return current(self, adapter_name, peft_config, *args, **kwargs)
        if kept == PeftType.LORA and adapter_name not in self.peft_config:
            join_lora_model(self, adapter_name, peft_config)
        self.peft_type = peft_config.peft_type  # PEFT compares the two; nothing else reads it here
        try:
            return current(self, adapter_name, peft_config, *args, **kwargs)
        finally:
            self.peft_type = kept

    add_adapter._peft_eora = True  # type: ignore[attr-defined]
    PeftModel.add_adapter = add_adapter


#: the ``autocast_adapter_dtype`` of the ``PeftModel(...)`` / ``add_adapter`` call running now (PEFT hands the tuner
#: no such argument; EoRA's tuner computes factors before PEFT's own cast and reads it here)
AUTOCAST_ADAPTER_DTYPE: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_eora_autocast", default=True)


def patch_autocast_flag() -> None:
    """Make ``autocast_adapter_dtype`` of ``get_peft_model``/``PeftModel(...)``/``add_adapter`` visible to the tuner
    (:data:`AUTOCAST_ADAPTER_DTYPE`). Idempotent."""
    from peft import PeftModel

    def flagged(current: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(current)

        @functools.wraps(current)
        def wrapped(self, *args, **kwargs):
            try:
                flag = signature.bind(self, *args, **kwargs).arguments.get("autocast_adapter_dtype", True)
            except TypeError:  # a wrong call: PEFT's own error follows
                flag = True
            token = AUTOCAST_ADAPTER_DTYPE.set(bool(flag))
            try:
                return current(self, *args, **kwargs)
            finally:
                AUTOCAST_ADAPTER_DTYPE.reset(token)

        wrapped._peft_eora_autocast = True  # type: ignore[attr-defined]
        return wrapped

    for attr in ("__init__", "add_adapter"):
        if not getattr(getattr(PeftModel, attr), "_peft_eora_autocast", False):
            setattr(PeftModel, attr, flagged(getattr(PeftModel, attr)))


def patch_weighted_adapter(after: Callable[[Any, list, list, str, str], None]) -> None:
    """Run ``after(tuner, adapters, weights, adapter_name, combination_type)`` once PEFT's
    ``LoraModel.add_weighted_adapter`` made a new adapter (EoRA's tuner is a ``LoraModel``, and EoRA adapters join
    LoRA models: one patch serves both). Idempotent."""
    from peft.tuners.lora import LoraModel

    current = LoraModel.add_weighted_adapter
    if getattr(current, "_peft_eora", False):
        return
    signature = inspect.signature(current)

    @functools.wraps(current)
    def add_weighted_adapter(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        name = bound.arguments["adapter_name"]
        existed = name in self.peft_config  # PEFT returns without a word then
        result = current(self, *args, **kwargs)
        if not existed and name in self.peft_config:
            after(self, list(bound.arguments["adapters"]), list(bound.arguments["weights"]), name,
                  bound.arguments["combination_type"])
        return result

    add_weighted_adapter._peft_eora = True  # type: ignore[attr-defined]
    LoraModel.add_weighted_adapter = add_weighted_adapter


#: config fields given to the ``load_adapter`` call running now, set on the config it loads
_LOAD_OVERRIDES: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("peft_eora_load_overrides", default={})


def patch_load_adapter(keywords: tuple[str, ...]) -> None:
    """Let ``PeftModel.load_adapter(..., <keyword>=value)`` set config fields, as ``PeftModel.from_pretrained``
    does (PEFT hands ``load_adapter``'s config loader only the Hub download options). Idempotent; needs
    :func:`patch_add_adapter`, which applies them."""
    from peft import PeftModel

    current = PeftModel.load_adapter
    if getattr(current, "_peft_eora", False):
        return

    @functools.wraps(current)
    def load_adapter(self, *args, **kwargs):
        overrides = {k: kwargs.pop(k) for k in keywords if k in kwargs}
        token = _LOAD_OVERRIDES.set(overrides)
        try:
            return current(self, *args, **kwargs)
        finally:
            _LOAD_OVERRIDES.reset(token)

    load_adapter._peft_eora = True  # type: ignore[attr-defined]
    PeftModel.load_adapter = load_adapter


def patch_hotswap(peft_type: Any, prepare: Callable[[Any, Any, str, dict], dict]) -> None:
    """Let PEFT's ``hotswap_adapter`` swap ``peft_type`` (EoRA) adapters as it swaps LoRA ones (the same config keys
    must agree, and ``adapter_bits``); ``prepare(model, config, adapter_name, state_dict)`` runs first on such an
    adapter and returns the state dict to swap in (EoRA: the base checked, int8/int4 codes unpacked). Idempotent."""
    from peft.utils import PeftType, hotswap

    hotswap.CONFIG_KEYS_TO_CHECK.setdefault(
        peft_type, [*hotswap.CONFIG_KEYS_TO_CHECK.get(PeftType.LORA, []), "adapter_bits"])
    current = hotswap.hotswap_adapter_from_state_dict
    if getattr(current, "_peft_eora", False):
        return

    @functools.wraps(current)
    def hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config, *args, **kwargs):
        if getattr(config, "peft_type", None) == peft_type:
            state_dict = prepare(model, config, adapter_name, state_dict)
        return current(model, state_dict, adapter_name, config, *args, **kwargs)

    hotswap_adapter_from_state_dict._peft_eora = True  # type: ignore[attr-defined]
    hotswap.hotswap_adapter_from_state_dict = hotswap_adapter_from_state_dict


def patch_config_loading(config_cls: type, is_own_adapter: Callable[..., bool]) -> None:
    """Make ``PeftConfig.from_pretrained``/``LoraConfig.from_pretrained`` return ``config_cls.from_pretrained(...)``
    for adapters where ``is_own_adapter(model_id, subfolder, **kwargs)`` is true.

    Only the classes ``config_cls`` derives from are redirected (a ``LoraConfig`` subclass of
    someone else's keeps its behaviour). Idempotent.
    """
    from peft.config import PeftConfigMixin

    current = PeftConfigMixin.__dict__["from_pretrained"]
    if getattr(current.__func__, "_peft_eora", False):
        return
    original = current.__func__
    redirected = {c for c in config_cls.__mro__ if c is not config_cls}

    @functools.wraps(original)
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        if cls in redirected and is_own_adapter(pretrained_model_name_or_path, subfolder, **kwargs):
            return config_cls.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        return original(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    from_pretrained._peft_eora = True  # type: ignore[attr-defined]
    PeftConfigMixin.from_pretrained = classmethod(from_pretrained)


@contextlib.contextmanager
def only_active(model: nn.Module, adapter_name: str) -> Iterator[None]:
    """Make ``adapter_name`` the only active adapter of every LoRA layer while the block runs.

        >>> with only_active(peft_model.base_model.model, "gsm8k"):
        ...     logits = peft_model(input_ids).logits      # as if "gsm8k" were the only adapter

    The active adapters are restored afterwards (``requires_grad`` is left alone, unlike
    ``set_adapter``, hence PEFT's private ``_active_adapter``). Layers without ``adapter_name``
    contribute nothing meanwhile. EoRA computes each adapter inside this.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(layer, layer._active_adapter) for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = adapter_name
        yield
    finally:
        for layer, active in saved:
            layer._active_adapter = active


@contextlib.contextmanager
def adapters_off(layers: list[nn.Module]) -> Iterator[None]:
    """The LoRA ``layers`` compute their base layer alone while the block runs (restored after).

        >>> with adapters_off(lora_layers):     # zero updates: the same outputs, without their products
        ...     model(input_ids)

    ``disable_adapters``' setter would also change ``requires_grad``, hence PEFT's private
    ``_disable_adapters``."""
    saved = [(layer, layer._disable_adapters) for layer in layers]
    try:
        for layer, _ in saved:
            layer._disable_adapters = True
        yield
    finally:
        for layer, state in saved:
            layer._disable_adapters = state


def refuse_merged(model: nn.Module, what: str) -> None:
    """A clear error where ``model`` has merged LoRA layers: ``what`` reads the base weights, and a merged product
    would be taken for part of the base (a wrong residual, a false base mismatch). Not unmerged here: in half
    precision (or on a re-quantizing base) an unmerge does not give the base back exactly."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = sorted({a for m in model.modules() if isinstance(m, BaseTunerLayer) and m.merged
                     for a in m.merged_adapters})
    if merged:
        raise ValueError(
            f"{what} needs the base weights, but adapter(s) {', '.join(merged)} are merged into them. Call "
            "model.unmerge_adapter() first (a float32 base comes back exactly; in half precision reload the base)."
        )


def writable_fields(config: Any) -> dict[str, Any]:
    """The dataclass fields of ``config`` a computation may write, copied (containers deep-copied); the original
    model and calibration data, only read, are left out."""
    import copy
    import dataclasses

    return {f.name: copy.deepcopy(v) if isinstance(v := getattr(config, f.name), (dict, list, set)) else v
            for f in dataclasses.fields(config) if f.name not in ("original_model", "calibration")}


@contextlib.contextmanager
def kept_on_failure(model: nn.Module, config: Any, adapter_name: str) -> Iterator[None]:
    """If the block fails, ``adapter_name``'s layers (the modules a rank allocation replaces, ranks, scalings) and
    the ``config`` fields a computation writes are put back as they were, and with them the factors where the
    adapter held computed or loaded ones (a recompute zeroes them as it goes): the statistics never describe
    other weights. A new adapter's factors are left as the zero update computing starts from."""
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_B]
    held = any(m.lora_B[adapter_name].weight.device.type != "meta" and bool(m.lora_B[adapter_name].weight.detach().any())
               for m in layers)
    fields = writable_fields(config)
    with torch.no_grad():
        saved = [(m, m.lora_A[adapter_name], m.lora_B[adapter_name], m.r[adapter_name], m.lora_alpha[adapter_name],
                  m.scaling[adapter_name],
                  (m.lora_A[adapter_name].weight.detach().cpu().clone(),
                   m.lora_B[adapter_name].weight.detach().cpu().clone()) if held else None) for m in layers]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for m, mod_a, mod_b, r, alpha, scaling, weights in saved:
                m.lora_A[adapter_name], m.lora_B[adapter_name] = mod_a, mod_b  # a rank allocation replaces them
                m.r[adapter_name], m.lora_alpha[adapter_name], m.scaling[adapter_name] = r, alpha, scaling
                if weights is not None:
                    mod_a.weight.copy_(weights[0])
                    mod_b.weight.copy_(weights[1])
                elif mod_b.weight.device.type != "meta":
                    mod_b.weight.zero_()
        for key, value in fields.items():
            setattr(config, key, value)
        if held:
            logger.warning("computing adapter %r failed: its earlier factors are kept", adapter_name)
        raise


def auxiliary_copies(wrapper: nn.Module) -> dict[str, list[Any]]:
    """What a ``modules_to_save`` / trainable-token wrapper (PEFT's ``AuxiliaryTrainingWrapper``) holds per adapter:
    name → its tensors (a module copy's parameters in name order, or the token delta)."""
    held: dict[str, list[Any]] = {}
    for name, copy in (getattr(wrapper, "modules_to_save", None) or {}).items():
        held.setdefault(name, []).extend(p for _, p in sorted(copy.named_parameters()))
    deltas = getattr(getattr(wrapper, "token_adapter", None), "trainable_tokens_delta", None) or {}
    for name, delta in deltas.items():
        held.setdefault(name, []).append(delta)
    return held


def remove_adapter_layers(model: nn.Module, adapter_name: str) -> None:
    """Undo PEFT's injection of ``adapter_name`` (its computation failed): LoRA layers and ``modules_to_save`` /
    trainable-token wrappers holding other adapters drop it, the others give the module they wrap back to their
    parent, so the model is as it was before (``requires_grad`` aside: see :func:`kept_requires_grad`)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            if adapter_name not in module.lora_A:
                continue
            others, inner = [a for a in module.lora_A if a != adapter_name], module.get_base_layer()
            drop = functools.partial(module.delete_adapter, adapter_name)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            held = auxiliary_copies(module)
            if adapter_name not in held:
                continue
            others, inner = [a for a in held if a != adapter_name], module.original_module
            # not the wrapper's active adapter (added, never activated): the active one stays as it is
            drop = functools.partial(module.delete_adapter, adapter_name, None)
        else:
            continue
        if others:
            drop()
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, inner)


@contextlib.contextmanager
def kept_requires_grad(model: nn.Module) -> Iterator[None]:
    """Every parameter's ``requires_grad`` put back if the block fails (PEFT freezes the base while injecting)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


# --------------------------------------------------------------------------------------------
# Wiring once PEFT is imported
# --------------------------------------------------------------------------------------------

_LOCK = threading.RLock()
_STATE: dict[str, Any] = {"done": False, "running": False, "result": None, "callback": None}


def _initializing(module: Any) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _ready(loaded: Any = None) -> bool:
    """PEFT is fully imported and no ``peft_eora`` submodule is half-way through its import
    (``loaded``: a module whose code has just run, complete although its import has not returned yet)."""
    peft = sys.modules.get("peft")
    if peft is None or (peft is not loaded and _initializing(peft)):
        return False
    return not any(
        name.startswith("peft_eora.") and module is not loaded and _initializing(module)
        for name, module in list(sys.modules.items())
    )


def install_now(callback: Callable[[], Any]) -> Any:
    """Run ``callback`` once (imports PEFT if needed) and return its result; later calls return the same."""
    with _LOCK:
        if _STATE["done"] or _STATE["running"]:
            return _STATE["result"]
        _STATE["running"] = True
        try:
            _STATE["result"] = callback()
            _STATE["done"] = True
        finally:
            _STATE["running"] = False
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]
        return _STATE["result"]


def _maybe_install(loaded: Any = None) -> None:
    callback = _STATE["callback"]
    if callback is not None and not _STATE["done"] and not _STATE["running"] and _ready(loaded):
        install_now(callback)


def when_peft_ready(callback: Callable[[], Any]) -> None:
    """Run ``callback()`` as soon as PEFT is imported and no ``peft_eora`` module is half-imported.

    Right away if that holds now; otherwise after the import of ``peft`` or of a ``peft_eora``
    submodule that makes it hold (a config module that imports PEFT registers once it is complete).
    """
    _STATE["callback"] = callback
    if _ready():
        install_now(callback)
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``peft`` and ``peft_eora.*`` with the other finders and runs :func:`_maybe_install` after each loads."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "peft" and not fullname.startswith("peft_eora."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module") and not isinstance(spec.loader, _ThenInstall):
            spec.loader = _ThenInstall(spec.loader)
        return spec


class _ThenInstall:
    """A loader that runs the wrapped loader, then :func:`_maybe_install`; everything else is the wrapped loader's."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _maybe_install(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
