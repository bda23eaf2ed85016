"""The residual back-end protocol and registry."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


class UnsupportedModuleError(TypeError):
    """A targeted module has no residual back-end."""


@runtime_checkable
class ResidualBackend(Protocol):
    """Recognise one compression format and read its effective weight."""

    name: str
    description: str

    def matches(self, module: nn.Module) -> bool:
        """True if ``module`` is a layer of this format."""

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight the layer's forward uses, as an (out, in) float32 tensor."""


# Optional back-end method, looked up with hasattr (not part of the runtime-checked protocol):
#   fingerprint_tensors(module) -> list[(name, tensor)]
# the tensors the base fingerprint hashes for a layer whose kernel changes its stored layout after
# loading (bitsandbytes repacks lazily on CPU); without it, the layer's own tensors are hashed.
#   refusal(module) -> str | None
# for a layer of this library that the back-end deliberately does not handle, why (put into the
# UnsupportedModuleError), e.g. schemes that quantize activations too;
#   reads_forward = True (attribute)
# for a back-end that reads the weight through the layer's forward: dequantize(module, dtype=...) is then given the
# model's activation dtype (None where unknown);
#   prepare_model(model) -> None
# called on the whole model before PEFT wraps its layers (computing or loading an adapter): brings
# layers into the state their forward runs in (compressed-tensors decompresses on the first forward).


_REGISTRY: list[ResidualBackend] = []


def register_backend(backend: ResidualBackend, first: bool = False) -> None:
    """Add ``backend`` to the registry (checked in order; ``first`` puts it in front)."""
    if not isinstance(backend, ResidualBackend):
        raise TypeError(f"{backend!r} does not implement ResidualBackend (name, description, matches, dequantize).")
    if any(b.name == backend.name for b in _REGISTRY):
        raise ValueError(f"A residual back-end named {backend.name!r} is already registered.")
    _REGISTRY.insert(0, backend) if first else _REGISTRY.append(backend)


def registered() -> list[ResidualBackend]:
    """The registered back-ends, in lookup order."""
    return list(_REGISTRY)


def prepare_model(model: nn.Module) -> None:
    """Give every registered back-end with a ``prepare_model`` hook the model (before injection)."""
    for backend in _REGISTRY:
        hook = getattr(backend, "prepare_model", None)
        if hook is not None:
            hook(model)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear, its weight stored ``(in, out)``)."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in type(module).__mro__)


def is_supported(module: nn.Module) -> bool:
    return any(b.matches(module) for b in _REGISTRY)


def backend_for(module: nn.Module, name: str = "module") -> ResidualBackend:
    """The back-end for ``module``; raises :class:`UnsupportedModuleError` listing the formats."""
    for backend in _REGISTRY:
        if backend.matches(module):
            return backend
    reasons = [r for b in _REGISTRY if hasattr(b, "refusal") and (r := b.refusal(module))]
    why = f" ({reasons[0]})" if reasons else ""
    formats = "; ".join(f"{b.name} ({b.description})" for b in _REGISTRY)
    raise UnsupportedModuleError(
        f"{name} is a {type(module).__module__}.{type(module).__qualname__}, which no EoRA residual back-end "
        f"supports{why}. Supported formats: {formats}. Exclude it from target_modules or register a back-end with "
        f"peft_eora.residual.register_backend."
    )
