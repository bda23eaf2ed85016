#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels gpu_check.sh installs on the GPU machine: the peft and
# transformers versions of this checkout's .venv (that machine has torch, triton and accelerate but no peft,
# and no network). Then carry it:  run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".whl"]).
#
#   bash benchmarks/gpu_wheels.sh          # needs the package registry (pip download)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
versions=$("$PY" - <<'PYEOF'
from importlib.metadata import version
print(f"peft=={version('peft')} transformers=={version('transformers')}")
PYEOF
)
rm -rf .whl
mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform any -d .whl $versions
ls -l .whl
