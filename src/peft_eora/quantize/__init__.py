"""Compress a checkpoint (GPTQ or AWQ with gptqmodel; compressed-tensors W4A16/W8A16; bitsandbytes,
HQQ, torchao on the fly) and load the result back through transformers.

gptqmodel and the other libraries are optional and imported lazily (``import peft_eora`` never
imports them)::

    >>> from peft_eora.embedded import export_original
    >>> from peft_eora.quantize import quantize_gptq, quantize_awq, load_quantized, load_and_quantize
    >>> q4 = quantize_gptq(export_original(), bits=4)        # minutes on CPU; cached afterwards
    >>> model = load_quantized(q4)                            # TorchLinear modules on CPU
    >>> a4 = quantize_awq(export_original(), bits=4)          # AwqTorchLinear; see awq_smoothed_original
    >>> nf4 = load_and_quantize(export_original(torch.float32), "bnb-nf4")   # seconds, not cached

Calibration (GPTQ, AWQ): the shipped C4 sample (``data/c4_validation_256.jsonl``), documents
tokenised without special tokens in file order, joined with EOS and cut into consecutive
windows of ``seq_len`` tokens (deterministic; no randomness involved). Quantization settings
are gptqmodel's defaults apart from ``bits`` and ``group_size`` (override any via ``**kw``);
GPTQ weights are quantized from float32 (gptqmodel's own CPU default would first cast them to
bfloat16), AWQ weights from float16 (its kernels need it). Everything that defines the
checkpoint is recorded in ``peft_eora_quantize.json`` next to it.

One module per concern: :mod:`.gptq`, :mod:`.awq`, :mod:`.compressed_tensors` and
:mod:`.on_the_fly` quantize; :mod:`.loading` loads GPTQ/AWQ checkpoints; :mod:`.calibration`,
:mod:`.checkpoints` and :mod:`.gptqmodel_run` are what the gptqmodel quantizers share.

Output goes to ``cache_dir()/models/<name>-<gptq|awq>-w<bits>g<group>`` (plus ``-n<N>x<L>`` when
the calibration size differs from the default 128×512), written to a temporary sibling folder
and renamed into place; gptqmodel's offload files go to another temporary sibling folder that is
removed afterwards, never into the working directory.
"""


from .awq import (
    AWQ_SCALES_FILE,
    awq_float32_forward_,
    awq_original,
    awq_smoothed_original,
    quantize_awq,
    read_awq_scales,
    smooth_state_dict,
)
from .awq_recover import recover_awq_scales
from .calibration import C4_SAMPLE, DEFAULT_NUM_SAMPLES, DEFAULT_SEQ_LEN, calibration_metadata, gptq_calibration
from .checkpoints import META_FILE, _versions, awq_dir, gptq_dir  # noqa: F401  (_versions: used by prune)
from .compressed_tensors import quantize_compressed_tensors
from .gptq import quantize_gptq
from .gptqmodel_run import INSTALL_HINT, import_gptqmodel, scrub_offload_path
from .loading import load_quantized, upcast_unquantized
from .on_the_fly import ON_THE_FLY, load_and_quantize

__all__ = [
    "AWQ_SCALES_FILE",
    "C4_SAMPLE",
    "DEFAULT_NUM_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "INSTALL_HINT",
    "META_FILE",
    "calibration_metadata",
    "import_gptqmodel",
    "gptq_calibration",
    "gptq_dir",
    "quantize_gptq",
    "awq_dir",
    "quantize_awq",
    "read_awq_scales",
    "smooth_state_dict",
    "awq_smoothed_original",
    "awq_original",
    "recover_awq_scales",
    "load_quantized",
    "awq_float32_forward_",
    "quantize_compressed_tensors",
    "ON_THE_FLY",
    "load_and_quantize",
    "upcast_unquantized",
    "scrub_offload_path",
]
