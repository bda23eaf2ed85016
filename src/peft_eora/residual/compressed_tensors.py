"""compressed-tensors layers (the checkpoint format of llm-compressor and vLLM): an ``nn.Linear``
carrying a ``quantization_scheme`` that compressed-tensors attached at load.

transformers loads such checkpoints *compressed* (``weight_packed``/``weight_scale``, no
``weight``) and registers a hook that decompresses every layer on the model's first forward;
from then on each layer multiplies by its decompressed ``weight`` (the quantization grid values,
no further fake-quantization). So the weight the kernel computes with is the compressor's own
``decompress`` of the stored tensors, which this back-end calls on the layer's tensors without
changing them. :func:`CompressedTensorsBackend.prepare_model` runs that decompression hook up
front, because EoRA runs the decoder blocks directly (the hook sits on the whole model).

Weight-only schemes are supported (int4/int8 ``pack-quantized`` and ``naive-quantized``, FP8
weight-only ``float-quantized``, any compressor that decompresses to ``weight``). Schemes that
also quantize the *activations* (``W8A8``, ``FP8_DYNAMIC``, ``NVFP4``) are not matched: no single
weight matrix describes their forward. compressed-tensors is imported only when a layer of its
kind is dequantized.

    >>> model = AutoModelForCausalLM.from_pretrained(ct_checkpoint)        # W4A16, pack-quantized
    >>> w = CompressedTensorsBackend().dequantize(model.model.layers[0].mlp.down_proj)   # (576, 1536)
"""

from __future__ import annotations

import torch
from torch import nn


def _scheme(module: nn.Module) -> object | None:
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or not type(scheme).__module__.startswith("compressed_tensors."):
        return None
    return scheme


def quantizes_activations(module: nn.Module) -> bool:
    """True for compressed-tensors layers whose forward also (fake-)quantizes its input or output."""
    scheme = _scheme(module)
    return scheme is not None and (
        getattr(scheme, "input_activations", None) is not None or getattr(scheme, "output_activations", None) is not None
    )


def has_transform(module: nn.Module) -> bool:
    """True where compressed-tensors attached a transform (QuIP / SpinQuant rotations from a ``transform_config``):
    the weight is stored rotated and a hook rotates the layer's input online, so its weight alone is not its
    forward."""
    return any(type(m).__module__.startswith("compressed_tensors.transform") for m in module.children())


class CompressedTensorsBackend:
    name = "compressed-tensors"
    description = ("nn.Linear with a compressed-tensors weight-only scheme (W4A16/W8A16 pack- or naive-quantized, "
                   "FP8 weight-only), compressed or decompressed")

    def matches(self, module: nn.Module) -> bool:
        scheme = _scheme(module)
        return (isinstance(module, nn.Linear) and scheme is not None and getattr(scheme, "weights", None) is not None
                and not quantizes_activations(module) and not has_transform(module))

    def refusal(self, module: nn.Module) -> str | None:
        if quantizes_activations(module):
            return ("its compressed-tensors scheme quantizes the activations too (e.g. W8A8, FP8_DYNAMIC, NVFP4), so no "
                    "single weight matrix describes its forward; use a weight-only scheme (W4A16, W8A16)")
        if _scheme(module) is not None and has_transform(module):
            return ("its checkpoint applies a compressed-tensors transform (QuIP / SpinQuant rotation): the weight is "
                    "stored rotated and the input rotated online, so the weight alone does not describe its forward")
        return None

    @torch.no_grad()
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        from compressed_tensors.quantization import QuantizationStatus

        status = getattr(module, "quantization_status", None)
        shape = (int(module.out_features), int(module.in_features))
        if status == QuantizationStatus.COMPRESSED:
            w = _decompressed_weight(module)
        elif status == QuantizationStatus.DECOMPRESSED:
            w = module.weight  # the forward skips weight fake-quantization once decompressed
        else:  # initialized / calibration / frozen: the forward fake-quantizes the float weight each call
            from compressed_tensors.quantization.lifecycle.forward import forward_quantize

            scheme = _scheme(module)
            w = forward_quantize(module, module.weight.detach(), "weight", scheme.weights)  # type: ignore[union-attr]
        if tuple(w.shape) != shape:
            raise ValueError(f"compressed-tensors decompressed a weight of shape {tuple(w.shape)} for a "
                             f"{shape[1]}→{shape[0]} layer.")
        return w.detach().float().contiguous()

    def fingerprint_tensors(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """The decompressed weight: one value whether the layer is still compressed or not."""
        return [("weight", self.dequantize(module))]

    def prepare_model(self, model: nn.Module) -> None:
        """Decompress a model that transformers loaded compressed, as its first forward would."""
        run_decompress_hooks(model)


def _decompressed_weight(module: nn.Module) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.utils import get_direct_state_dict

    scheme = _scheme(module)
    fmt = CompressionFormat(scheme.format or infer_module_format(type(module), scheme))  # type: ignore[union-attr]
    compressor = BaseCompressor.get_value_from_registry(fmt.value)
    # copies: the layer's own tensors stay exactly as they are (decompress is documented not to modify them)
    state = {k: (v.detach().clone() if v is not None else None) for k, v in get_direct_state_dict(module).items()}
    return compressor.decompress(state, scheme)["weight"]


def run_decompress_hooks(model: nn.Module) -> bool:
    """Run compressed-tensors' decompress-on-first-forward hook now, if ``model`` (or a model
    inside it) still carries it; returns True when something was decompressed."""
    done = False
    for sub in model.modules():
        handle = getattr(sub, "ct_decompress_hook", None)
        if handle is None:
            continue
        hook = sub._forward_pre_hooks.get(handle.id)
        if hook is None:
            continue
        hook(sub, ())  # the library's own hook: decompresses every layer, then removes itself
        done = True
    return done
