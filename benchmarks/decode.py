"""End-to-end greedy decode tokens/s: fp16 model vs 4-bit GPTQ + r=128 adapters, PEFT unfused vs fused.

A Llama with random weights (default: the Llama-3-8B shape — 32 blocks, hidden 4096,
intermediate 14336, 8 KV heads, vocabulary 128256) decodes greedily, batch 1:

* ``fp16`` — the unquantized model;
* ``gptq_base`` — every decoder linear replaced by a 4-bit g128 :class:`GPTQLinear`
  (round-to-nearest with this package's own packing: no gptqmodel needed), no adapter;
* ``peft_unfused`` — LoRA adapters of rank r on all seven linears of every block, PEFT's own
  forward (base kernel, then ``lora_B(lora_A(x))`` in the adapters' dtype, float32 as PEFT
  creates them for integer bases, and the add); ``peft_unfused_fp16`` — the same with the
  adapters cast to float16;
* ``fused`` — ``peft_eora.fuse`` (one kernel per linear); ``fused_int8`` — with int8 adapters;
  ``fused_v2_paths`` — the CUDA kernel with its version-2 paths (whole B·t on the last K slice,
  L2 prefetch of the first unit only), for comparison.

Each step (one token) is captured once in a CUDA graph over a static KV cache and replayed,
so the figures are GPU time per token, not Python overhead (``--eager`` times the Python loop
instead; the graph falls back to it, and says so, if capture fails). The static cache is read
in full at every step (no attention mask), the same for every variant.

    python benchmarks/decode.py --out decode.json       # GPU, ~1-2 min on an H200
    python benchmarks/decode.py --smoke                 # CPU: a tiny model, eager, checks the code paths
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import default_dtype, environ, json_main  # noqa: E402

logger = logging.getLogger("peft_eora.benchmarks.decode")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the JSON here (also printed)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefilled eagerly)")
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens timed")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--eager", action="store_true", help="time the Python decode loop instead of a CUDA graph")
    p.add_argument("--variants", default="fp16,gptq_base,peft_unfused,peft_unfused_fp16,fused,fused_int8,"
                                          "fused_v2_paths")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (eager): checks the code paths")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=max(2048, args.prompt + args.tokens + args.warmup + 8),
                       rope_theta=500000.0, tie_word_embeddings=False)




def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Random-weight Llama in ``dtype`` on ``device`` (small init so fp16 activations stay finite)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = _config(args)
    cfg.initializer_range = 0.02
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(cfg)
    return model.eval()


def quantize_linears(model: torch.nn.Module, bits: int, group_size: int) -> int:
    """Replace every decoder linear by a round-to-nearest :class:`GPTQLinear` in place; returns how many."""
    from peft_eora.kernels.gptq_linear import GPTQLinear

    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                lin = getattr(parent, name, None)
                if isinstance(lin, torch.nn.Linear):
                    setattr(parent, name, GPTQLinear.from_linear(lin, bits, group_size))
                    del lin
                    count += 1
    return count


class Decoder:
    """Greedy batch-1 decoding over a static KV cache; one step is captured in a CUDA graph."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, max_len: int, use_graph: bool) -> None:
        from transformers import StaticCache

        self.model = model
        self.device = prompt.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.prompt = prompt
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.use_graph = use_graph and self.device.type == "cuda"
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.mode = "eager"

    @torch.no_grad()
    def _step(self) -> None:
        logits = self.model(input_ids=self.tok, past_key_values=self.cache, cache_position=self.pos,
                            use_cache=True).logits
        self.tok.copy_(logits[:, -1:].argmax(-1))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self) -> None:
        self.cache.reset()
        n = self.prompt.shape[1]
        pos = torch.arange(n, device=self.device)
        logits = self.model(input_ids=self.prompt, past_key_values=self.cache, cache_position=pos,
                            use_cache=True).logits
        self.tok.copy_(logits[:, -1:].argmax(-1))
        self.pos.fill_(n)

    @torch.no_grad()
    def capture(self, warmup: int) -> None:
        self.prefill()
        for _ in range(warmup):  # eager warm-up: JIT builds, workspaces, allocator
            self._step()
        if not self.use_graph:
            return
        torch.cuda.synchronize()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self.graph = graph
            self.mode = "cuda_graph"
        except Exception as exc:  # e.g. a host sync inside the forward
            logger.warning("CUDA graph capture failed (%s): timing the eager loop", exc)
            self.graph = None
            self.mode = f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:160]})"
            torch.cuda.synchronize()

    @torch.no_grad()
    def generate(self, steps: int) -> tuple[list[int], float]:
        """(token ids, seconds) of ``steps`` greedy steps after a fresh prefill."""
        self.prefill()
        out = []
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        toks = []
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            toks.append(self.tok.clone())
        sync()
        seconds = time.perf_counter() - t0
        out = [int(t) for t in torch.cat(toks).flatten().tolist()]
        return out, seconds


def measure(model: torch.nn.Module, args: argparse.Namespace, prompt: torch.Tensor) -> dict[str, Any]:
    dec = Decoder(model, prompt, args.prompt + args.tokens + args.warmup + 8, use_graph=not args.eager)
    dec.capture(args.warmup)
    tokens, seconds = dec.generate(args.tokens)
    res = dict(tok_s=args.tokens / seconds, ms_per_token=seconds * 1e3 / args.tokens, mode=dec.mode,
               first_tokens=tokens[:8])
    if torch.cuda.is_available() and prompt.device.type == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del dec
    gc.collect()
    return res


def _lora_config(rank: int):
    from peft import LoraConfig

    from peft_eora.kernels.gptq_linear import register_gptq_linear

    return register_gptq_linear(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LINEARS),
                                           init_lora_weights=False, lora_dropout=0.0))


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark and return its results (see the module doc)."""
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 2, 128, 256, 4, 2, 512
        args.rank, args.prompt, args.tokens, args.warmup, args.group_size = 8, 8, 4, 1, 64
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device (use --smoke for a CPU check of the code paths)"}
    else:
        device = torch.device("cuda")
    from peft import get_peft_model

    from peft_eora.fused import fuse, unfuse

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    variants = [v for v in args.variants.split(",") if v]
    t_start = time.perf_counter()
    res: dict[str, Any] = dict(
        status="ok", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        model=dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                   kv_heads=args.kv_heads, vocab=args.vocab),
        bits=args.bits, group_size=args.group_size, rank=args.rank, prompt_tokens=args.prompt,
        decode_tokens=args.tokens, batch=1, results={},
    )
    model = build_model(args, device, dtype)
    res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=gen).to(device)
    out = res["results"]
    if "fp16" in variants:
        out["fp16"] = measure(model, args, prompt)
        logger.info("fp16: %s", out["fp16"])
    t0 = time.perf_counter()
    res["quantized_linears"] = quantize_linears(model, args.bits, args.group_size)
    res["quantize_seconds"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "gptq_base" in variants:
        out["gptq_base"] = measure(model, args, prompt)
    peft_model = get_peft_model(model, _lora_config(args.rank)).eval()
    backend = "auto" if device.type == "cuda" else "torch"
    if "peft_unfused" in variants:
        res["peft_adapter_dtype"] = str(next(p.dtype for n, p in peft_model.named_parameters() if "lora_A" in n))
        out["peft_unfused"] = measure(peft_model, args, prompt)
    if "peft_unfused_fp16" in variants:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.data = p.data.to(dtype)
        out["peft_unfused_fp16"] = measure(peft_model, args, prompt)
    if "fused" in variants:
        report = fuse(peft_model, backend=backend, adapter_bits=16)
        res["fused_layers"] = len(report.fused)
        res["fuse_skipped"] = dict(list(report.skipped.items())[:3])
        out["fused"] = measure(peft_model, args, prompt)
        unfuse(peft_model)
    if "fused_int8" in variants:
        fuse(peft_model, backend=backend, adapter_bits=8)
        out["fused_int8"] = measure(peft_model, args, prompt)
        unfuse(peft_model)
    if "fused_v2_paths" in variants and device.type == "cuda":  # the CUDA kernel's version-2 paths, for comparison
        from peft_eora.kernels import ops

        fuse(peft_model, backend=backend, adapter_bits=16)
        with environ({ops.ENV_LORA_IN_EPILOGUE: "1", ops.ENV_PREFETCH_FIRST_ONLY: "1"}):
            out["fused_v2_paths"] = measure(peft_model, args, prompt)
        unfuse(peft_model)
    if device.type == "cuda":  # the launch variant the fused layers' CUDA path kept per shape
        from peft_eora.kernels import ops

        res["cuda_variants"] = {f"{e['k']}x{e['n']}_M{e['m']}_r{e['rank']}_l{e['lora_bits']}": e["choice"]
                                for e in ops.CUDA_TUNER.report(ops.CUDA_TUNING_KEY)}
    tok = {k: v["tok_s"] for k, v in out.items()}
    ratios = {}
    if tok.get("fused") and tok.get("peft_unfused"):
        ratios["fused_over_peft_unfused"] = tok["fused"] / tok["peft_unfused"]
    if tok.get("fused") and tok.get("peft_unfused_fp16"):
        ratios["fused_over_peft_unfused_fp16"] = tok["fused"] / tok["peft_unfused_fp16"]
    if tok.get("fused") and tok.get("fp16"):
        ratios["fused_over_fp16"] = tok["fused"] / tok["fp16"]
    if tok.get("fused") and tok.get("fused_v2_paths"):
        ratios["fused_over_fused_v2_paths"] = tok["fused"] / tok["fused_v2_paths"]
    if tok.get("fused_int8") and tok.get("fp16"):
        ratios["fused_int8_over_fp16"] = tok["fused_int8"] / tok["fp16"]
    res["ratios"] = ratios
    res["goals_met"] = dict(
        fused_ge_1_3x_peft_unfused=ratios.get("fused_over_peft_unfused", 0) >= 1.3 if ratios else None,
        fused_ge_1_3x_peft_unfused_fp16_adapters=(ratios.get("fused_over_peft_unfused_fp16", 0) >= 1.3
                                                  if "fused_over_peft_unfused_fp16" in ratios else None),
        fused_ge_1_5x_fp16=ratios.get("fused_over_fp16", 0) >= 1.5 if "fused_over_fp16" in ratios else None,
    )
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    return res


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
