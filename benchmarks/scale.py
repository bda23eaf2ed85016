"""EoRA at scale: time, memory and a per-phase breakdown for a random-weight Llama shape (JSON).

Builds a Llama of the given shape with random weights (no download), keeps its decoder
linears on the host as the "original", compresses the model in place (round-to-nearest
``--bits``/``--group-size``: ``--format dense`` fake-quantizes the float weights, so the dense
residual back-end applies, as in issue #16's first measurement; ``--format gptq`` packs them into
:class:`~peft_eora.kernels.gptq_linear.GPTQLinear`), and times ``initialize_eora_weights`` at rank
``--rank`` on random calibration tokens through the public API. Reported: wall seconds, seconds
per phase (block forwards, covariance accumulation, decompositions, factors, original-weight
reads, residuals, offload moves, checkpoint writes; GPU work synchronised at phase edges), peak
GPU memory against the model's own, peak host memory (VmHWM), and the mean relative error. Stopped
by SIGTERM (``timeout``, as ``gpu_check.sh`` runs it) during the EoRA step, it still reports what it
measured so far, with ``status: "timed_out"``.

    python benchmarks/scale.py                                 # CPU: the SmolLM2-135M shape, 16k tokens
    python benchmarks/scale.py --gpu-8b --out scale.json       # GPU: Llama-3-8B shape, 64 x 1024 tokens
    python benchmarks/scale.py --gpu-8b --offload              # model on the CPU, blocks visit the GPU
    python benchmarks/scale.py --cpu-8b-block --damping auto   # CPU: one 8B block, tensor memory over the model
    python benchmarks/scale.py --original-dir /tmp/orig --drop-caches   # originals read from disk, cold
    python benchmarks/scale.py --smoke                         # seconds: a 2-block toy (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import LiveTensorPeak, PeakRSS, Terminated, default_dtype, json_main, sigterm_raises  # noqa: E402

logger = logging.getLogger("peft_eora.benchmarks.scale")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--samples", type=int, default=32, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=None,
                   help="quantization group (0: one per row; default: 128, or the largest of 64/32 dividing "
                        "hidden and intermediate, e.g. 64 for the default SmolLM2-135M shape's 576)")
    p.add_argument("--format", choices=("dense", "gptq"), default="dense")
    p.add_argument("--damping", default="0.01", help="a number or 'auto'")
    p.add_argument("--adapter-bits", type=int, choices=(16, 8, 4), default=16,
                   help="EoRAConfig.adapter_bits (8/4: factors rounded as fitted, factor_quant.fit_lowbit_factors)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--forward-dtype", choices=("auto", "model", "bfloat16", "float16"), default=None,
                   help="EoRAConfig.forward_dtype (autocast of the calibration forwards; default: the model's dtype)")
    p.add_argument("--device", default=None, help="where the model is built: cpu or cuda (default: cuda if present)")
    p.add_argument("--offload", action="store_true", help="build the model on the CPU, compute on the GPU")
    p.add_argument("--checkpoint-dir", default=None, help="also write a resumable checkpoint there (timed)")
    p.add_argument("--gpu-8b", action="store_true", help="the Llama-3-8B shape, 64 x 1024 tokens, on the GPU")
    p.add_argument("--cpu-8b-block", action="store_true",
                   help="one decoder block of the Llama-3-8B shape, 64 x 1024 tokens, bfloat16, on the CPU with "
                        "per-group forwards: its tensor_peak_gib estimates the 8B run's peak GPU memory over the model (~12 min)")
    p.add_argument("--per-group-forwards", action="store_true",
                   help="on CPU, work as on a GPU (one forward per group, no parked batches; ridges scored one "
                        "at a time) and count the live CPU tensors (tensor_peak_gib: a GPU's peak over the model)")
    p.add_argument("--original-dir", default=None,
                   help="write the originals there as safetensors (one shard per block, the model's dtype; kept "
                        "if already written for this shape) and read them from disk, as from a real checkpoint")
    p.add_argument("--drop-caches", action="store_true",
                   help="with --original-dir: drop the page cache before the EoRA step (Linux, root), a cold read")
    p.add_argument("--no-prefetch", action="store_true",
                   help="read each original weight when needed instead of a block ahead (OriginalWeights.prefetch)")
    p.add_argument("--profile", action="store_true",
                   help="run the EoRA step under torch.profiler and report the operators that took the most "
                        "self time on the device (CPU without one): where block forwards and factors spend it "
                        "(the step's own timings then include the profiler's overhead)")
    p.add_argument("--experts", type=int, default=0,
                   help="replace every block's MLP by this many routed experts, one linear each (as gptqmodel's "
                        "loader makes of a MoE; --moe-intermediate wide, --top-k per token)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-intermediate", type=int, default=None, help="an expert's width (default: --intermediate)")
    p.add_argument("--stage-bytes", type=int, default=None,
                   help="compensate.STAGE_BYTES: covariance bytes one stage of experts may hold (0: one forward "
                        "per expert group, as before stages)")
    p.add_argument("--smoke", action="store_true", help="a 2-block toy on CPU (checks the code paths)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _host_peak_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20




def _write_originals(originals: dict[str, torch.Tensor], path: Path, signature: str) -> Path:
    """``originals`` as safetensors shards in ``path``, one per decoder block (``model.layers.<i>``)
    and an index, as ``save_pretrained`` lays out a sharded checkpoint; kept where ``path`` already
    holds the originals of the same ``signature`` (shape, dtype, build device and seed of the
    random weights: an earlier run of the same model), else written over."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            if json.loads(index.read_text())["metadata"].get("scale_py") == signature:
                return path
        except (ValueError, KeyError, AttributeError):
            pass
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    by_block: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in originals.items():
        block = name.split(".layers.", 1)[1].split(".", 1)[0]
        by_block.setdefault(block, {})[name + ".weight"] = w.contiguous()
    weight_map = {}
    for block, tensors in sorted(by_block.items(), key=lambda kv: int(kv[0])):
        fname = f"model-{int(block) + 1:05d}-of-{len(by_block):05d}.safetensors"
        save_file(tensors, str(path / fname))
        weight_map.update({k: fname for k in tensors})
    index.write_text(json.dumps({"metadata": {"scale_py": signature}, "weight_map": weight_map}))
    return path


def _drop_caches() -> bool:
    """Drop the page cache (``/proc/sys/vm/drop_caches``, root on Linux): the originals are then
    read from the disk. False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


class RoutedExperts(torch.nn.Module):
    """A MoE block with one linear per expert (the layout gptqmodel quantizes and EoRA compensates):
    softmax router, top-k experts per token, SwiGLU experts; an expert no token is routed to is not called."""

    def __init__(self, hidden: int, inter: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, experts, bias=False)  # the router (kept in float, not targeted)
        self.experts = torch.nn.ModuleList(
            torch.nn.ModuleDict({"gate_proj": torch.nn.Linear(hidden, inter, bias=False),
                                 "up_proj": torch.nn.Linear(hidden, inter, bias=False),
                                 "down_proj": torch.nn.Linear(inter, hidden, bias=False)}) for _ in range(experts))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        weights, chosen = torch.softmax(self.gate(flat).float(), -1).topk(self.top_k, -1)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():
            tokens, slot = torch.where(chosen == e)
            ex = self.experts[e]
            y = ex["down_proj"](torch.nn.functional.silu(ex["gate_proj"](flat[tokens])) * ex["up_proj"](flat[tokens]))
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(out.dtype))
        return out.view_as(h)


def _fake_quantize_(weight: torch.Tensor, bits: int, group_size: int) -> None:
    """Round-to-nearest asymmetric quantization of ``weight`` (out × in) in place, per input group."""
    out_f, in_f = weight.shape
    g = group_size if group_size > 0 else in_f
    w = weight.data.float().reshape(out_f, in_f // g, g)
    lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = (torch.round(w / scale) + zero).clamp(0, qmax)
    weight.data.copy_(((q - zero) * scale).reshape(out_f, in_f).to(weight.dtype))


class EigenCalls:
    """Counts and times the eigensolvers of the factor step while active (a benchmark-only wrapper
    of ``decompose._eigh``/``_eigh_`` and ``topeig.top_eigh``): calls and seconds per matrix width,
    and the iterative solver's products, Rayleigh–Ritz steps and warm starts. On CUDA each call is synchronised
    before and after (the seconds are the solver's own). A wrapped call made inside another (``_eigh_``
    falling back to ``_eigh``) is not counted again."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.rows: dict[str, dict[str, Any]] = {}
        self._inside = threading.local()  # the ridge-scoring threads count their own calls
        self._lock = threading.Lock()

    def _wrap(self, kind: str, fn: Any) -> Any:
        def wrapped(A: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if getattr(self._inside, "active", False):
                return fn(A, *args, **kwargs)
            self._inside.active = True
            try:
                return self._counted(kind, fn, A, *args, **kwargs)
            finally:
                self._inside.active = False

        return wrapped

    def _counted(self, kind: str, fn: Any, A: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        info: dict[str, Any] = {}
        if kind == "top_eigh":  # the caller's own info (the Ritz block it reuses) still filled
            if kwargs.get("info") is None:
                kwargs["info"] = info
            info = kwargs["info"]
            warm = kwargs.get("start") is not None
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(A, *args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        with self._lock:
            row = self.rows.setdefault(f"{kind} {A.shape[0]}", dict(calls=0, seconds=0.0))
            row["calls"] += 1
            row["seconds"] += seconds
            for k in ("products", "steps"):
                if k in info:
                    row[k] = row.get(k, 0) + info[k]
            if kind == "top_eigh" and warm:  # started from a neighbour's Ritz block
                row["warm_starts"] = row.get("warm_starts", 0) + 1
            if kind == "top_eigh" and out is None:
                row["fell_back"] = row.get("fell_back", 0) + 1
        return out

    def __enter__(self) -> "EigenCalls":
        from peft_eora import decompose, topeig

        self._saved = [(decompose, "_eigh", decompose._eigh), (decompose, "_eigh_", decompose._eigh_),
                       (topeig, "top_eigh", topeig.top_eigh)]
        decompose._eigh = self._wrap("eigh", decompose._eigh)
        decompose._eigh_ = self._wrap("eigh", decompose._eigh_)
        topeig.top_eigh = self._wrap("top_eigh", topeig.top_eigh)
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, name, fn in self._saved:
            setattr(mod, name, fn)

    def summary(self) -> dict[str, dict[str, Any]]:
        return {k: {kk: round(vv, 3) if isinstance(vv, float) else vv for kk, vv in v.items()}
                for k, v in sorted(self.rows.items())}


def _profiler(cuda: bool) -> Any:
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(activities=activities)


def _phase_times_profiled(sync: bool) -> Any:
    """A :class:`~peft_eora.walker.PhaseTimes` whose phases are also profiler ranges, so each
    operator is charged to the innermost phase it ran in."""
    from peft_eora.walker import PhaseTimes

    class ProfiledPhaseTimes(PhaseTimes):
        @contextlib.contextmanager
        def phase(self, name: str, device: Optional[torch.device] = None) -> Any:
            with super().phase(name, device), torch.profiler.record_function(PHASE_PREFIX + name):
                yield

    return ProfiledPhaseTimes(sync=sync)


PHASE_PREFIX = "phase:"


def _device_us(e: Any) -> float:
    """An event's self device time in µs (``self_device_time_total``; ``self_cuda_time_total`` before torch 2.4)."""
    value = getattr(e, "self_device_time_total", None)
    if value is None:
        value = getattr(e, "self_cuda_time_total", 0.0)
    return float(value or 0.0)


DIRECT_KERNELS = "(kernels launched by the phase itself)"


def _top_operators(profiler: Any, cuda: bool, top: int = 12) -> dict[str, Any]:
    """Per phase, the operators with the most self time, in ms: device time where there is a device
    (``self_ms``), and the host's own time beside it (``self_cpu_ms``: latency-bound calls such as a
    small ``eigh`` or a synchronising ``.tolist()`` show there). Where the seconds of each phase go,
    e.g. matrix products against copies and conversions. Kernels launched with no operator between
    them and the phase (custom extensions) count as :data:`DIRECT_KERNELS`. Operators of the CPU's
    parked batches run in worker threads, outside any phase's range: they count as "outside phases"
    (``--per-group-forwards`` keeps them in the main thread, as on a GPU)."""
    table: dict[str, dict[str, list[float]]] = {}
    for e in profiler.events():
        # CPU-side operators only: their self device time already holds their kernels' (the kernels'
        # own events, outside the CPU tree, would count it twice)
        if getattr(e, "device_type", torch.autograd.DeviceType.CPU) != torch.autograd.DeviceType.CPU:
            continue
        dev, cpu = (_device_us(e) if cuda else 0.0), float(e.self_cpu_time_total)
        node, name = e, e.name
        if e.name.startswith(PHASE_PREFIX):  # the range itself: only the kernels it launched directly
            cpu, name = 0.0, DIRECT_KERNELS
        else:
            node = e.cpu_parent
        if dev <= 0 and cpu <= 0:
            continue
        phase = "outside phases"
        while node is not None:
            if node.name.startswith(PHASE_PREFIX):
                phase = node.name[len(PHASE_PREFIX):]
                break
            node = node.cpu_parent
        cell = table.setdefault(phase, {}).setdefault(name, [0.0, 0.0, 0])
        cell[0] += dev
        cell[1] += cpu
        cell[2] += 1
    rank = 0 if cuda else 1
    phases = {}
    for phase, ops in sorted(table.items(), key=lambda kv: -sum(v[rank] for v in kv[1].values())):
        total = sum(v[rank] for v in ops.values())
        ranked = sorted(ops.items(), key=lambda kv: (-kv[1][rank], -kv[1][1]))[:top]
        phases[phase] = dict(total_ms=round(total / 1e3, 1),
                             cpu_total_ms=round(sum(v[1] for v in ops.values()) / 1e3, 1),
                             operators=[dict(name=n, calls=int(v[2]), self_ms=round(v[rank] / 1e3, 2),
                                             self_cpu_ms=round(v[1] / 1e3, 2),
                                             share=round(v[rank] / total, 4) if total else None)
                                        for n, v in ranked])
    return dict(ranked_by="self device time" if cuda else "self CPU time", phases=phases)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 64, 160, 2, 4, 2, 300
        args.samples, args.seq_len, args.batch_size, args.rank, args.group_size = 8, 32, 4, 8, 32
        args.device = "cpu"
    if args.gpu_8b:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 4096, 14336, 32, 32, 8, 128256
        args.samples, args.seq_len, args.batch_size = 64, 1024, 8
        if not torch.cuda.is_available():
            return {"status": "skipped", "reason": "--gpu-8b needs a CUDA device"}
    if args.cpu_8b_block:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 4096, 14336, 1, 32, 8, 1000
        args.samples, args.seq_len, args.batch_size = 64, 1024, 8
        args.device, args.dtype, args.per_group_forwards = "cpu", args.dtype or "bfloat16", True
    widths = (args.hidden, args.intermediate, args.moe_intermediate or args.intermediate)
    if args.group_size is None:
        args.group_size = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 0)
    elif args.group_size > 0 and any(w % args.group_size for w in widths):
        raise SystemExit(f"--group-size {args.group_size} does not divide the layers' input widths "
                         f"(hidden {args.hidden}, intermediate {args.intermediate}); pick a divisor of both, or 0 (one group per row).")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    build_device = torch.device("cpu") if (args.offload or not cuda) else torch.device("cuda")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    damping: Any = args.damping if args.damping == "auto" else float(args.damping)

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_eora import EoRAConfig, compensate, decompose, initialize_eora_weights, merged_forward, walker
    from peft_eora import original as original_mod
    from peft_eora.kernels.gptq_linear import GPTQLinear
    from peft_eora.original import OriginalWeights
    from peft_eora.walker import PhaseTimes

    t_build = time.perf_counter()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(2048, args.seq_len), tie_word_embeddings=False)
    with torch.device(build_device), default_dtype(dtype):
        model = LlamaForCausalLM(cfg).eval()
        for layer in model.model.layers if args.experts else ():
            layer.mlp = RoutedExperts(args.hidden, args.moe_intermediate or args.intermediate, args.experts, args.top_k)
    stage_bytes = compensate.STAGE_BYTES  # restored at the end (run() may be called in-process)
    if args.stage_bytes is not None:
        compensate.STAGE_BYTES = args.stage_bytes
    # the "original": every decoder linear's weight, on the host
    originals: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LINEARS:
            originals[name] = mod.weight.detach().to("cpu", copy=True)
            if args.format == "dense":
                _fake_quantize_(mod.weight, args.bits, args.group_size)
            else:
                parent_name, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent_name), child,
                        GPTQLinear.from_linear(mod, args.bits, args.group_size, dtype=dtype))
    if args.original_dir:
        signature = (f"hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} heads={args.heads} "
                     f"kv_heads={args.kv_heads} vocab={args.vocab} dtype={dtype} built_on={build_device} seed=0"
                     + (f" experts={args.experts} top_k={args.top_k} moe_intermediate={args.moe_intermediate}"
                        if args.experts else ""))
        original = OriginalWeights.open(_write_originals(originals, Path(args.original_dir), signature))
        originals.clear()  # read back from disk only
    else:
        original = OriginalWeights({n: tuple(w.shape) for n, w in originals.items()}, lambda n: originals[n],
                                   "random-weight original")
    build_seconds = time.perf_counter() - t_build
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=gen)
    params_b = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    pm = get_peft_model(model, EoRAConfig(r=args.rank, target_modules=list(LINEARS), damping=damping,
                                          forward_dtype=args.forward_dtype, adapter_bits=args.adapter_bits))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model_gib = torch.cuda.memory_allocated() / 2**30
    else:
        model_gib = sum(p.numel() * p.element_size() for p in pm.parameters()) / 2**30
    times = _phase_times_profiled(cuda) if args.profile else PhaseTimes(sync=cuda)
    live = None
    if args.per_group_forwards and not cuda:
        walker.PARK_LIMIT_BYTES = 0
        merged_forward.ENABLED = False  # a GPU keeps the layers' own forwards
        decompose.DAMPING_WORKERS = 1  # the factor step stays in this thread, where LiveTensorPeak sees it
        live = LiveTensorPeak(label=lambda: "/".join(times.active) or "-")
    if args.no_prefetch:
        original_mod.PREFETCH = False
    dropped = _drop_caches() if (args.drop_caches and args.original_dir) else None
    rss = PeakRSS() if Path("/proc/self/clear_refs").exists() else None
    eig_calls = EigenCalls(cuda)
    profiler = _profiler(cuda) if args.profile else None
    with sigterm_raises():  # SIGTERM from here on raises Terminated: the report holds what was measured so far
        t0 = time.perf_counter()
        stats = None
        try:
            with rss if rss is not None else contextlib.nullcontext(), \
                    live if live is not None else contextlib.nullcontext(), eig_calls, \
                    profiler if profiler is not None else contextlib.nullcontext():
                stats = initialize_eora_weights(
                    pm, original_model=original, calibration=calib, batch_size=args.batch_size, progress=args.verbose,
                    execution_device="cuda" if (cuda and args.offload) else None, checkpoint_dir=args.checkpoint_dir,
                    times=times,
                )
                if cuda:
                    torch.cuda.synchronize()
        except Terminated:
            logger.warning("SIGTERM after %.1f s: reporting the phases measured so far", time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        summary = stats.summary() if stats is not None else {}
        res: dict[str, Any] = dict(
            status="ok" if stats is not None else "timed_out",
            device=torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu"),
            torch=torch.__version__,
            shape=dict(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, vocab=args.vocab,
                       **(dict(experts=args.experts, top_k=args.top_k, moe_intermediate=args.moe_intermediate
                               or args.intermediate) if args.experts else {})),
            stage_bytes=compensate.STAGE_BYTES, modules=len(stats.modules) if stats is not None else None,
            params_b=params_b,
            dtype=str(dtype).replace("torch.", ""), format=args.format, bits=args.bits, group_size=args.group_size,
            rank=args.rank, damping=damping, adapter_bits=args.adapter_bits, forward_dtype=args.forward_dtype,
            calibration_tokens=args.samples * args.seq_len, batch_size=args.batch_size,
            offload=bool(args.offload and cuda), build_seconds=round(build_seconds, 1),
            seconds=round(seconds, 2), phases=times.summary(),
            phase_counts=dict(sorted(times.counts.items())),  # e.g. block forwards done, on a timed-out run
            mean_relative_error=summary.get("mean_relative_error_after"),
            damping_counts=summary.get("damping_counts"),  # damping="auto": the ridges chosen ("inf": SVD)
            host_peak_gib=round(_host_peak_gib(), 2),
            # the host's high-water mark during the EoRA step over its resident memory at the start (model,
            # originals, calibration tokens; heap pages retained after frees count too, so it reads high)
            host_rise_gib=round(rss.rise_mib / 1024, 2) if rss is not None else None,
            # CPU tensors alive at once during the step, at most: the CPU's reading of gpu_peak_over_model_gib
            tensor_peak_gib=round(live.peak_bytes / 2**30, 2) if live is not None else None,
            tensor_peak_by_phase_gib={k: round(v / 2**30, 2) for k, v in sorted(live.by_label.items(), key=lambda kv: -kv[1])}
            if live is not None else None,
            # the largest of them alive at that peak: "GiB op shape dtype"
            tensor_peak_top=[f"{b / 2**30:.3f} {w}" for b, w in live.at_peak[:16]] if live is not None else None,
            per_group_forwards=bool(args.per_group_forwards),
            # originals read from safetensors on disk (--original-dir), a block ahead unless --no-prefetch;
            # page cache dropped first (--drop-caches; None: not asked or not allowed)
            originals_on_disk=bool(args.original_dir), prefetch=bool(args.original_dir) and not args.no_prefetch,
            page_cache_dropped=dropped,
            # the factor step's eigensolvers per matrix width: full eigh, and the top-r iteration
            # (peft_eora.topeig) with its products and Rayleigh–Ritz steps; seconds included in "factors"
            eigensolvers=eig_calls.summary(),
        )
        if profiler is not None:
            try:
                res["profile"] = _top_operators(profiler, cuda)
            except Terminated:  # the profile's own parsing ran out of time: the rest still goes out
                res["profile"] = {"status": "timed_out"}
                res["status"] = "timed_out"
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            res.update(gpu_model_gib=round(model_gib, 2), gpu_peak_gib=round(peak, 2),
                       gpu_peak_over_model_gib=round(peak - model_gib, 2))
            if args.gpu_8b and stats is not None:
                res["goals"] = dict(le_60_s=seconds <= 60.0, peak_le_model_plus_4_gib=(peak - model_gib) <= 4.0)
        compensate.STAGE_BYTES = stage_bytes
        return res


def main(argv: Optional[list[str]] = None) -> int:
    return json_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
