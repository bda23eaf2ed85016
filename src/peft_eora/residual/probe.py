"""Any other gptqmodel quantized linear, read through its own forward.

gptqmodel loads GPTQ/AWQ checkpoints into the fastest kernel it finds: Marlin, Machete or ExLlama on a
GPU, ``TorchAtenLinear`` on a CPU. Those repack the checkpoint's buffers into their own layouts (at load
time or on the first forward), and some rotate the input first (QuaRot/SpinQuant Hadamard checkpoints,
ParoQuant), so the stored buffers do not say what the layer multiplies by. Its forward does, for a layer
that is linear in its input::

    W[:, j] = f(e_j)        (bias left out; e_j the j-th unit row)

This back-end feeds the identity matrix through the forward, a block of rows at a time, in the dtype the
layer's inputs had in the calibration walk (:attr:`~peft_eora.compensate.Target.input_dtype`; else the
model's activation dtype: the kernel rounds as it does in the model), then checks the read: a heavy-tailed
random batch must give ``x·Wᵀ`` within 1 %. A kernel that quantizes activations too (W4A8, FP8 inputs)
fails the check, and the known ones are refused up front. The read costs one ``in × in`` product per
layer (210 layers of SmolLM2-135M: 1.8-4.3 s on 2 CPU cores, against 0.5-0.8 s from the buffers)::

    >>> qmodel = AutoModelForCausalLM.from_pretrained("…-GPTQ-4bit", device_map="cuda")   # Marlin
    >>> model = get_peft_model(qmodel, EoRAConfig(r=128, original_model=fp_dir, calibration=data))

Kernels whose buffers keep the checkpoint layout are read exactly from those buffers by the ``gptq`` and
``awq`` back-ends instead (checked first).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import UnsupportedModuleError
from .gptq import has_gptqmodel_base, own_adapter

#: gptqmodel class-name prefixes of kernels that quantize the activations as well (QQQ's W4A8, the W4A FP8 and NVFP4
#: kernels): no weight matrix describes their forward
ACTIVATION_QUANT_PREFIXES = ("QQQ", "W4A")
#: the identity is fed this many bytes of float32 output at a time
PROBE_BYTES = 256 << 20
#: the read is accepted when the check batch's relative error is at most this: the output's rounding to half precision
#: (0.24 % in bfloat16 for TorchAtenLinear) and half-precision accumulation pass, while 8-bit activations fail
#: (per-token int8: 2.6-4.3 %, per-token FP8 e4m3: 2.1-2.6 % for 256-4096 inputs; tests/test_probe_backend.py)
TOLERANCE = 1e-2


def repacks_on_first_forward(module: nn.Module) -> bool:
    """gptqmodel's CPU kernels that rewrite their buffers for the dtype of their first inputs and refuse any other
    after it (``TorchAtenLinear``, ``TorchCpuAvx512Linear``: ``_cpu_transformed``; ``TorchFusedLinear``:
    ``linear_mode``; and their AWQ twins)."""
    return has_gptqmodel_base(module, "BaseQuantLinear") and (
        hasattr(module, "_cpu_transformed") or hasattr(module, "linear_mode"))


def quantizes_activations(module: nn.Module) -> bool:
    """Whether ``module`` is one of gptqmodel's kernels known to quantize their input as well."""
    return any(c.__module__.startswith("gptqmodel.") and c.__name__.startswith(ACTIVATION_QUANT_PREFIXES)
               for c in type(module).__mro__)


class ProbeBackend:
    name = "probe"
    reads_forward = True  # dequantize takes the activations' dtype
    description = ("any other gptqmodel quantized linear (Marlin, Machete, ExLlama, TorchAtenLinear, Hadamard-rotated, "
                   "ParoQuant, GGUF, ...), read through its forward and checked to be linear")

    def matches(self, module: nn.Module) -> bool:
        return (has_gptqmodel_base(module, "BaseQuantLinear") and isinstance(getattr(module, "in_features", None), int)
                and isinstance(getattr(module, "out_features", None), int) and self.refusal(module) is None)

    def refusal(self, module: nn.Module) -> str | None:
        if not has_gptqmodel_base(module, "BaseQuantLinear"):
            return None
        if quantizes_activations(module):
            return (f"gptqmodel's {type(module).__name__} quantizes the activations too (W4A8, FP8 or FP4 inputs), so "
                    "no weight matrix describes its forward; EoRA compensates weight-only compression (exclude these "
                    "layers from target_modules)")
        adapter = own_adapter(module)
        if adapter:
            return adapter
        if not hasattr(module, "qweight"):
            return (f"PEFT wraps gptqmodel's layers through their qweight, which {type(module).__name__} does not hold; "
                    "exclude these layers from target_modules")
        return None

    def dequantize(self, module: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The ``(out, in)`` float32 weight ``module``'s forward multiplies by, for inputs of ``dtype`` (the walk passes
        the dtype the layer's calibration inputs had; default: its bias's or scales' dtype, else float16)."""
        return read_through_forward(module, dtype or _natural_dtype(module))


def _natural_dtype(module: nn.Module) -> torch.dtype:
    for name in ("bias", "scales"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype.itemsize >= 2:
            return t.dtype
    return torch.float16


def _device(module: nn.Module) -> torch.device:
    from ..walker import device_of

    return device_of(module)


@torch.no_grad()
def read_through_forward(module: nn.Module, dtype: torch.dtype, check_rows: int = 16) -> torch.Tensor:
    """``(out, in)`` float32: ``module.forward`` applied to the identity in ``dtype`` (bias left out), checked on a
    heavy-tailed random batch; raises :class:`UnsupportedModuleError` where the forward fails or is not linear.

    ``module.forward``, not ``module(...)``: the walk's covariance taps (module hooks) must not see the probe;
    accelerate's offload wrapper, which replaces ``forward`` itself, still brings the weights in. A kernel already
    set up for one activation dtype (gptqmodel's CPU kernels repack on their first forward) is read in that one."""
    transformed = getattr(module, "_cpu_transform_dtype", None)
    if getattr(module, "_cpu_transformed", False) and isinstance(transformed, torch.dtype):
        dtype = transformed
    in_f, out_f = int(module.in_features), int(module.out_features)
    device = _device(module)
    forward = module.forward

    def run(x: torch.Tensor) -> torch.Tensor:
        try:
            return _output(forward(x), x.shape[0], out_f)
        except UnsupportedModuleError:
            raise
        except Exception as exc:  # noqa: BLE001 - any kernel failure: one error naming the layer
            raise UnsupportedModuleError(
                f"{type(module).__name__}'s forward failed on {dtype} inputs while EoRA read its weight through it "
                f"({type(exc).__name__}: {exc}). {_FIX}") from exc

    run(torch.zeros(1, in_f, dtype=dtype, device=device))  # its first forward, bias in place (a kernel may set up both)
    bias = getattr(module, "bias", None)
    has_bias = isinstance(bias, torch.Tensor)
    if has_bias:
        module.bias = None  # the kernels add the bias when they hold one: left out, f(e_j) is column j exactly
    try:
        weight = torch.empty(out_f, in_f, dtype=torch.float32, device=device)
        rows = max(1, min(in_f, PROBE_BYTES // (4 * max(in_f, out_f))))
        for start in range(0, in_f, rows):
            n = min(rows, in_f - start)
            eye = torch.zeros(n, in_f, dtype=dtype, device=device)
            eye[torch.arange(n, device=device), torch.arange(start, start + n, device=device)] = 1
            weight[:, start:start + n] = run(eye).T
            del eye
        gen = torch.Generator(device="cpu").manual_seed(in_f * 31 + out_f)
        x = torch.randn(check_rows, in_f, generator=gen)
        outliers = torch.randint(0, in_f, (check_rows, max(1, in_f // 64)), generator=gen)
        x.scatter_(1, outliers, x.gather(1, outliers) * 20)  # a few large inputs per row: what activation scales meet
        x = x.to(device=device, dtype=dtype)
        got = run(x)
        zero = run(torch.zeros(1, in_f, dtype=dtype, device=device))
    finally:
        if has_bias:
            module.bias = bias
    want = x.float() @ weight.T
    error = float((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float32).tiny))
    offset = float(zero.abs().max() / want.abs().max().clamp_min(torch.finfo(torch.float32).tiny))
    if not (error <= TOLERANCE and offset <= TOLERANCE) or not torch.isfinite(weight).all():
        raise UnsupportedModuleError(
            f"{type(module).__name__}'s forward is not x·Wᵀ for one matrix W in {dtype} (read through the identity, "
            f"a random batch differs by {error:.2e} relative, the zero input gives {offset:.2e}; up to {TOLERANCE:g} "
            f"is allowed): it quantizes or transforms its input non-linearly. {_FIX}"
        )
    return weight


_FIX = ("Load the checkpoint with a kernel EoRA reads from its buffers (GPTQ: backend='gptq_torch' or 'triton'; AWQ: "
        "'torch_awq'), or exclude the layer from target_modules.")


def _output(y: torch.Tensor, rows: int, out_f: int) -> torch.Tensor:
    y = y.reshape(-1, y.shape[-1]) if y.dim() != 2 else y
    if y.shape != (rows, out_f):
        raise UnsupportedModuleError(f"A forward of {rows} rows gave an output of shape {tuple(y.shape)}, not "
                                     f"({rows}, {out_f}): not a linear layer's forward.")
    return y.float()
