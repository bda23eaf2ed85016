"""Small, fast models for tests that do not need a real quantization back-end."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def fake_quantize_(model: torch.nn.Module, bits: int = 3, group_size: int = 32) -> torch.nn.Module:
    """Round every linear inside the decoder blocks to ``bits`` (asymmetric, per group) in place."""
    qmax = 2**bits - 1
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                w = module.weight
                g = w.reshape(w.shape[0], -1, group_size)
                lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                scale = (hi - lo).clamp_min(1e-8) / qmax
                q = ((g - lo) / scale).round().clamp(0, qmax)
                module.weight.copy_((q * scale + lo).reshape_as(w))
    return model


def tiny_llama_pair(seed: int = 0, layers: int = 2) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random tiny Llama (the "original") and a 3-bit fake-quantized copy (a dense base)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=49152,  # SmolLM2 tokenizer ids fit
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    original = LlamaForCausalLM(cfg).eval()
    quantized = fake_quantize_(copy.deepcopy(original))
    return original, quantized
