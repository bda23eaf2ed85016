"""``GPTQLinear``: a plain-GPTQ linear layer computed by this package's kernels (no gptqmodel needed).

It holds the tensors of gptqmodel's plain GPTQ modules in the same layout (``qweight``,
``qzeros`` with true "v2" zero points, ``scales``, ``g_idx``; see
:mod:`peft_eora.kernels.reference`), so everything that reads those — the fused op,
:func:`peft_eora.fuse`, the EoRA residual — reads this one too. Its forward is the fused op
without a low-rank term (the CUDA kernel on GPU, the torch reference on CPU).

    >>> import torch
    >>> from peft_eora.kernels.gptq_linear import GPTQLinear
    >>> lin = torch.nn.Linear(256, 128, bias=False)
    >>> q = GPTQLinear.from_linear(lin, bits=4, group_size=64)     # round-to-nearest, asymmetric
    >>> y = q(torch.randn(2, 256))
    >>> tuple(y.shape)
    (2, 128)

PEFT wraps it in ``GPTQLoraLinear`` (the class gptqmodel layers get) once it is registered on
the LoRA config: ``register_gptq_linear(lora_config)``. EoRA configs need no registration.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .reference import check_bits, dequantize_gptq, pack_cols, pack_rows, packed_len, trivial_g_idx

__all__ = ["GPTQLinear", "quantize_rtn", "register_gptq_linear"]


@torch.no_grad()
def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of ``weight`` (out × in) per group of ``group_size`` inputs.

    Returns ``(codes (in, out) int32, zeros (groups, out) int32, scales (groups, out) float32)``
    with ``W[o, k] ≈ scales[g, o]·(codes[k, o] − zeros[g, o])``, ``g = k // group_size``.
    """
    check_bits(bits)
    out_f, in_f = weight.shape
    if group_size <= 0:
        group_size = in_f
    if in_f % group_size:
        raise ValueError(f"in_features={in_f} is not a multiple of group_size={group_size}")
    groups = in_f // group_size
    w = weight.detach().float().reshape(out_f, groups, group_size)
    qmax = (1 << bits) - 1
    if sym:
        amax = w.abs().amax(-1).clamp_min(1e-8)
        scale = 2 * amax / qmax
        zero = torch.full_like(scale, float((qmax + 1) // 2))
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, qmax)
    codes = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, qmax)
    return (codes.reshape(out_f, in_f).T.to(torch.int32).contiguous(), zero.T.to(torch.int32).contiguous(),
            scale.T.contiguous())


def tensor_stamp(t: torch.Tensor) -> tuple[int, int, int]:
    """Which tensor, which storage, which in-place version: equal stamps, equal contents, short of writes through
    ``.data`` (they bypass the version counter) and of in-place writes to inference-mode tensors (version 0 here:
    they track none)."""
    return (id(t), t.data_ptr(), 0 if t.is_inference() else t._version)


class GPTQLinear(nn.Module):
    """Plain GPTQ layer (gptqmodel's in-memory layout, v2 zeros) computed by the fused op.

    Buffers: ``qweight`` (packed ``in``·bits/32 × out), ``qzeros`` (groups × packed out),
    ``scales`` (groups × out, the compute dtype), ``g_idx`` (in), optional ``bias``.
    """

    REQUIRES_FORMAT_V2 = True  # zero points are stored as they are (no v1 "minus one")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128, bias: bool = False,
                 dtype: torch.dtype = torch.float16, device: Optional[torch.device] = None) -> None:
        super().__init__()
        check_bits(bits)
        if in_features % 32:
            raise ValueError(f"GPTQLinear needs in_features % 32 == 0, got {in_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.infeatures, self.outfeatures = self.in_features, self.out_features  # PEFT's QuantLinear probe
        self.bits = int(bits)
        self.group_size = int(group_size) if group_size > 0 else self.in_features
        groups = math.ceil(self.in_features / self.group_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(packed_len(in_features, bits), out_features, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(groups, packed_len(out_features, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, **kw))
        self.register_buffer("g_idx", trivial_g_idx(in_features, self.group_size, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)
        self.backend = "auto"

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128, sym: bool = False,
                    dtype: Optional[torch.dtype] = None) -> "GPTQLinear":
        """Quantize ``linear`` round-to-nearest (on its device) into a new layer."""
        weight = linear.weight
        dtype = dtype or (weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16)
        layer = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
                    dtype=dtype, device=weight.device)
        codes, zeros, scales = quantize_rtn(weight, bits, layer.group_size, sym=sym)
        layer.qweight.copy_(pack_rows(codes, bits))
        layer.qzeros.copy_(pack_cols(zeros, bits))
        layer.scales.copy_(scales.to(dtype))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.to(dtype))
        return layer

    @torch.no_grad()
    def set_g_idx(self, g_idx: torch.Tensor) -> None:
        """Install an act-order permutation of the groups (``g_idx[k]`` is row k's group)."""
        self.g_idx.copy_(g_idx.to(self.g_idx))
        self._refresh_act_order()

    @property
    def act_order(self) -> bool:
        """Whether ``g_idx`` is not ``k // group_size``: re-derived whenever ``g_idx`` was replaced or written in place
        since (however it was loaded: state dict, accelerate's ``set_module_tensor_to_device``, a buffer copy)."""
        g = self._buffers["g_idx"]
        seen = self.__dict__.get("_act_order_seen")  # (g_idx, its stamp, act order): g_idx held, so ids stay its
        if seen is None or seen[0] is not g or seen[1] != tensor_stamp(g):
            trivial = torch.arange(self.in_features, device=g.device) // self.group_size
            self.__dict__["_act_order_seen"] = (g, tensor_stamp(g), not torch.equal(g.long(), trivial))
        return self.__dict__["_act_order_seen"][2]

    def _refresh_act_order(self) -> None:
        self.__dict__.pop("_act_order_seen", None)

    @torch.no_grad()
    def dequantize(self, activation_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight the kernels compute with, ``(out, in)`` float32; ``activation_dtype``: that of the inputs, whose
        half dtype the scales are cast to on CUDA (as :meth:`forward` does: bfloat16 inputs, bfloat16 scales)."""
        compute = self._compute_dtype(activation_dtype) if activation_dtype is not None else self.scales.dtype
        return dequantize_gptq(self.qweight, self.qzeros, self.scales.to(compute), self.g_idx, self.bits,
                               in_features=self.in_features, group_size=self.group_size).T.contiguous()

    def _compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.qweight.device.type != "cuda":
            return torch.float32
        # the activations' half dtype (a bfloat16 x cast to float16 scales could overflow), as fuse() does
        return dtype if dtype in (torch.float16, torch.bfloat16) else self.scales.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import ops

        dtype = x.dtype
        compute = self._compute_dtype(dtype)
        y = ops.gptq_lora_linear_eager(
            x.to(compute), self.qweight, self.qzeros, self.scales.to(compute),
            self.g_idx if self.act_order else None, self.bias.to(compute) if self.bias is not None else None,
            None, None, None, None, bits=self.bits, group_size=self.group_size, backend=self.backend,
        )
        return y.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


def register_gptq_linear(config: Any) -> Any:
    """Let stock PEFT LoRA wrap :class:`GPTQLinear` in its ``GPTQLoraLinear``; returns ``config``.

        >>> from peft import LoraConfig
        >>> cfg = register_gptq_linear(LoraConfig(r=8, target_modules=["q_proj"]))
    """
    from peft.tuners.lora.gptq import GPTQLoraLinear

    config._register_custom_module({GPTQLinear: GPTQLoraLinear})
    return config
