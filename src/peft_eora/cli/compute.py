"""``peft-eora compute``: compute one EoRA (or SVD) adapter and save it.

    peft-eora compute --embedded --rank 64 --num-samples 32 --out eora-w3-r64
    peft-eora compute --original ORIG --compressed PRUNED --rank 32 --method svd --out a

Also the helpers ``sweep`` shares: the :class:`~peft_eora.EoRAConfig` of the options
(:func:`eora_config`) and the computation itself (:func:`compute_adapter`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any, Optional, Union

from .models import (
    EMBEDDED,
    _quant_method,
    checkpoint_parameter_count,
    count_lora_parameters,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from .options import CLIError, add_calibration, add_eora, add_model_pair, output_folder

logger = logging.getLogger("peft_eora.cli")

_REGEX_CHARS = set("*?()[]|\\^$+{}")


def add_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``compute`` verb's parser (a subparser of ``peft-eora``)."""
    p = subparsers.add_parser(
        "compute", parents=[common], help="Compute an EoRA adapter and save it (PeftModel.save_pretrained).",
        description="Compute EoRA (or SVD) factors of the compression residual and save them as a PEFT adapter.",
    )  # fmt: skip
    add_model_pair(p)
    add_eora(p, sweep=False)
    add_calibration(p)
    p.add_argument("--out", required=True, help="Adapter folder to write (created or updated atomically).")
    add_run(p)
    p.set_defaults(handler=run)
    return p


def add_run(parser: argparse.ArgumentParser) -> None:
    """How the computation runs: offload, resumable checkpoints."""
    group = parser.add_argument_group("running at scale")
    group.add_argument(
        "--offload", action="store_true",
        help="Keep the compressed model on the CPU; its decoder blocks visit the GPU one at a time (for models "
        "larger than the GPU). Default: a model loaded on the CPU of a GPU machine is offloaded when its layers allow.",
    )  # fmt: skip
    group.add_argument(
        "--checkpoint-dir", default=None,
        help="Write each finished block's factors and the next block's inputs here (atomically), so an interrupted "
        "run can continue with --resume.",
    )  # fmt: skip
    group.add_argument(
        "--resume", action="store_true",
        help="Continue the run saved in --checkpoint-dir (same model, calibration and settings) instead of refusing a "
        "non-empty folder.",
    )  # fmt: skip
    group.add_argument(
        "--forward-dtype", choices=["auto", "model", "bfloat16", "float16"], default=None,
        help="Precision of the calibration forwards: 'model' (default: the model's own dtype), 'bfloat16'/'float16' "
        "(autocast; covariances stay float32), 'auto' (bfloat16 for a float32 model on a CPU/GPU with native "
        "bfloat16 matmuls; ~2x faster block forwards on a 135M model, perplexities within 0.1 %%).",
    )  # fmt: skip


def calibration_summary(calibration) -> dict[str, Any]:
    """The calibration settings as JSON-ready data (the tokenizer left out)."""
    return {k: v for k, v in dataclasses.asdict(calibration).items() if k != "tokenizer"}


def target_modules(values: Optional[list[str]], option: str = "--target-modules") -> Union[list[str], str, None]:
    """``--target-modules`` (or ``--exclude-modules``): a list of suffixes (comma-separated allowed) or one
    regular expression."""
    if not values:
        return None
    if len(values) == 1 and _REGEX_CHARS & set(values[0]):
        try:
            re.compile(values[0])
        except re.error as exc:
            raise CLIError(f"{option} {values[0]!r} is not a valid regular expression ({exc}); give module names "
                           "(q_proj,v_proj) or a regex such as '.*proj'.") from exc
        return values[0]
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not names:
        raise CLIError(f"{option}: no module name given.")
    return names


def models_from_args(args: argparse.Namespace) -> tuple[str, str]:
    """(original, compressed) model specs from ``--original``/``--compressed``/``--embedded``."""
    original = args.original or (EMBEDDED if args.embedded else None)
    compressed = args.compressed or ("gptq-w3g128" if args.embedded else None)
    if original is None or compressed is None:
        missing = " and ".join(n for n, v in (("--original", original), ("--compressed", compressed)) if v is None)
        raise CLIError(f"{missing} required (or --embedded for the embedded SmolLM2 and its GPTQ 3-bit version).")
    return original, compressed


def calibration_from_args(args: argparse.Namespace):
    """The :class:`~peft_eora.CalibrationConfig` of the calibration options."""
    from ..config import CalibrationConfig

    try:
        return CalibrationConfig(
            dataset=args.dataset, subset=args.subset, split=args.split, column=args.column, template=args.template,
            data_files={args.split: args.data_files} if getattr(args, "data_files", None) else None,
            mix=args.mix, num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
        )  # fmt: skip
    except (TypeError, ValueError) as exc:  # a --mix value of the wrong type (its keys were checked when parsed)
        raise CLIError(str(exc)) from exc


def check_calibration(calibration, tokenizer) -> None:
    """Load and tokenize the calibration data before any model is loaded (fails fast, one error)."""
    from ..calibration import load_calibration_tokens

    tokens = load_calibration_tokens(calibration, tokenizer)
    logger.info("Calibration: %d × %d tokens from %s", tokens.shape[0], tokens.shape[1], calibration.dataset)


def eora_config(args: argparse.Namespace, rank: int, method: str, original: Union[Path, str], calibration):
    """The :class:`~peft_eora.EoRAConfig` of the options, for one rank and method."""
    from ..config import EoRAConfig

    kwargs: dict[str, Any] = {}
    if args.damping is not None:
        kwargs["damping"] = args.damping
    if getattr(args, "forward_dtype", None) is not None:
        kwargs["forward_dtype"] = args.forward_dtype
    if getattr(args, "value_weighting", None) is not None:
        kwargs["value_weighting"] = args.value_weighting
    if getattr(args, "logit_weighting", None) is not None:
        kwargs["logit_weighting"] = args.logit_weighting
    if getattr(args, "exclude_modules", None):
        kwargs["exclude_modules"] = target_modules(args.exclude_modules, "--exclude-modules")
    return EoRAConfig(
        r=rank,
        method=method,
        target_modules=target_modules(args.target_modules),
        original_model=str(original),
        calibration=calibration if method == "eora" else None,
        **kwargs,
    )


def check_run_options(args: argparse.Namespace, device: str) -> None:
    """``--offload`` and ``--resume`` against the device and ``--checkpoint-dir``: before any model is made or loaded."""
    if getattr(args, "offload", False) and not device.startswith("cuda"):
        raise CLIError("--offload moves decoder blocks to the GPU: it needs --device cuda (or auto on a GPU machine).")
    if getattr(args, "resume", False) and not getattr(args, "checkpoint_dir", None):
        raise CLIError("--resume continues the run in --checkpoint-dir: give the folder.")


def compute_adapter(args: argparse.Namespace, compressed: Union[Path, str], config, device: str, tokenizer):
    """Load the compressed model, inject the adapter and compute its factors; (PeftModel, seconds)."""
    from peft import get_peft_model

    from ..model import initialize_eora_weights

    check_run_options(args, device)
    offload = bool(getattr(args, "offload", False))
    # offloaded, the model sits on the CPU but computes on the GPU: in the GPU's dtype (float16 for auto)
    qmodel = load_model(compressed, "cpu" if offload else device, args.dtype, dtype_device=device)
    start = time.perf_counter()
    # Inject first (init_eora=False: a zero update), then compute with this command's batch size and
    # progress setting; initialize_eora_weights runs the same computation get_peft_model would.
    config.init_eora = False
    model = get_peft_model(qmodel, config)
    initialize_eora_weights(
        model,
        original_model=config.original_model,
        calibration=config.calibration,
        tokenizer=tokenizer,
        batch_size=args.calib_batch_size,
        progress=not args.no_progress,
        execution_device=device if offload else None,  # else where --device put it (a CPU run stays on the CPU)
        checkpoint_dir=getattr(args, "checkpoint_dir", None),
        resume=bool(getattr(args, "resume", False)),
    )
    # for inference (the CLI evaluates and saves it): PEFT leaves a new model in training mode, which some
    # inference-only kernels (gptqmodel's AVX512 AWQ CPU kernel) refuse to be put back into after an evaluation
    return model.eval(), time.perf_counter() - start


def _local(spec: Union[Path, str]) -> Path:
    """A model folder: a Hub id's cached (or downloaded) snapshot, its weights, configs and tokenizer files."""
    from ..original import hub_snapshot

    return spec if isinstance(spec, Path) else hub_snapshot(spec, tokenizer=True)


def residual_original(original: Union[Path, str], compressed: Union[Path, str]) -> Union[Path, str]:
    """The original the residual is taken against: for an AWQ model, the original in AWQ's coordinates (its
    scales recorded or recovered, :func:`peft_eora.quantize.awq_original`); else ``original`` itself."""
    if _quant_method(compressed) != "awq":
        return original
    from ..quantize import awq_original

    return awq_original(_local(compressed), _local(original))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compute one adapter and save it to ``--out``."""
    original_spec, compressed_spec = models_from_args(args)
    out = output_folder(args.out, "--out")
    calibration = calibration_from_args(args)
    device = pick_device(args.device)  # these refuse before a model is quantized, smoothed or loaded
    check_run_options(args, device)
    original = resolve_model(original_spec, "Original")
    compressed = resolve_model(compressed_spec, "Compressed")
    original = residual_original(original, compressed)
    config = eora_config(args, args.rank, args.method, original, calibration)
    tokenizer = load_tokenizer(original, compressed)
    if args.method == "eora":
        check_calibration(calibration, tokenizer)
    model, seconds = compute_adapter(args, compressed, config, device, tokenizer)
    model.save_pretrained(str(out))
    stats = model.peft_config["default"].eora_stats
    logger.info("Saved the %s r=%d adapter to %s (%.1f s)", args.method, args.rank, out, seconds)
    return {
        "adapter": str(out),
        "original": str(original),
        "compressed": str(compressed),
        "method": args.method,
        "rank": args.rank,
        "lora_parameters": count_lora_parameters(model),
        "original_parameters": checkpoint_parameter_count(original),
        "seconds": round(seconds, 2),
        "eora_stats": stats,
    }
