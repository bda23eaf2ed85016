"""EoRA on the embedded SmolLM2-135M-Instruct: quantize (cached), compensate, compare.

    python examples/demo.py                 # 3-bit GPTQ g128, r=64   (make demo)
    python examples/demo.py --bits 4 --rank 128 --out my-adapter

Steps: the embedded GGUF is dequantized once to an fp16 checkpoint (the "original"), GPTQ-
quantized with gptqmodel (cached under ~/.cache/peft_eora), loaded through transformers, and
compensated by ``get_peft_model(qmodel, EoRAConfig(...))``. Perplexity is measured on held-out
WikiText-2 text shipped with the package (calibration uses a shipped C4 sample), then the
adapter is saved and a short greedy generation is printed. Runs offline on a CPU.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_eora import CalibrationConfig, EoRAConfig
from peft_eora.embedded import export_original
from peft_eora.eval import load_text
from peft_eora.eval.perplexity import make_windows, perplexity_on_windows
from peft_eora.quantize import load_quantized, quantize_gptq

PROMPT = "The capital of France is"


def generate(model, tokenizer, prompt: str = PROMPT, tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=3, choices=(2, 3, 4, 8), help="GPTQ bits (group size 128)")
    parser.add_argument("--rank", type=int, default=64, help="EoRA rank r")
    parser.add_argument("--method", default="eora", choices=("eora", "svd"), help="'svd' = plain-SVD baseline")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows (C4 sample)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration / evaluation window")
    parser.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 windows for perplexity")
    parser.add_argument("--out", default="eora-adapter", help="where to save the adapter")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("demo")

    original_dir = export_original(torch.float16)
    quantized_dir = quantize_gptq(original_dir, bits=args.bits, group_size=128)
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    text = load_text("wikitext2")
    # the windows measured (the text may hold fewer than asked for)
    windows = make_windows(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]), args.seq_len,
                           args.eval_windows)

    def ppl(model) -> float:
        return perplexity_on_windows(model, windows)

    # CPU: fp32 compute (bf16 matmuls are ~30x slower without bf16 units); the GPTQ layers keep their
    # fp16 scales and dequantize exactly as their kernel does. On a GPU, use dtype=torch.float16.
    original = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32).eval()
    ppl_fp = ppl(original)
    gen_fp = generate(original, tokenizer)
    del original

    qmodel = load_quantized(quantized_dir, dtype=torch.float16, compute_dtype=torch.float32)
    ppl_q = ppl(qmodel)
    gen_q = generate(qmodel, tokenizer)

    config = EoRAConfig(
        r=args.rank,
        method=args.method,
        original_model=str(original_dir),
        calibration=CalibrationConfig(dataset="builtin:c4", num_samples=args.calib_samples, seq_len=args.seq_len),
    )
    start = time.perf_counter()
    model = get_peft_model(qmodel, config)
    seconds = time.perf_counter() - start
    ppl_e = ppl(model)
    gen_e = generate(model, tokenizer)
    model.save_pretrained(args.out)

    tokens = config.calibration.num_tokens
    log.info("saved the adapter to %s", args.out)
    print(f"\nSmolLM2-135M-Instruct, GPTQ {args.bits}-bit g128, {args.method} r={args.rank}")
    used = f"calibration: {tokens} C4 tokens; " if args.method == "eora" else "no calibration data (plain SVD); "
    print(f"{used}{args.method} computed in {seconds:.1f} s")
    print(f"WikiText-2 perplexity ({windows.shape[0]}×{windows.shape[1]} tokens, held out):")
    print(f"  original (fp16 weights)   {ppl_fp:8.3f}")
    print(f"  GPTQ {args.bits}-bit               {ppl_q:8.3f}")
    print(f"  GPTQ {args.bits}-bit + {args.method:<4} r={args.rank:<4} {ppl_e:8.3f}")
    gap = ppl_q - ppl_fp
    if gap > 0:
        print(f"  gap recovered: {100 * (ppl_q - ppl_e) / gap:.1f} %")
    print(f"\n{PROMPT!r} →")
    print(f"  original : {gen_fp!r}\n  quantized: {gen_q!r}\n  + {args.method}   : {gen_e!r}")


if __name__ == "__main__":
    main()
