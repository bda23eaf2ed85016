#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA extension, run the GPU tests, the kernel and
# end-to-end decode benchmarks, the EoRA-at-scale benchmark (fixed ridge and the default
# damping="auto", then two blocks of it under torch.profiler), the linear-algebra probe (with the int4
# adapter fitting), an Nsight Compute probe of the fused kernel, a 1.1B shape offloaded, the factor
# step's memory, and four blocks of a 128-expert MoE (last: cut first when time runs short).
# JSON results and one log go to a single folder (default: $OUT, else benchmarks/results/gpu).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]                 # everything, within 9 min (H200: ~8-9 min)
#   GPU_CHECK_STEPS="build tests kernel" bash benchmarks/gpu_check.sh /tmp/out   # a subset
#
# Steps run in the order below, the kernel issue's first; each step's limit is cut to what is left of
# GPU_CHECK_DEADLINE seconds (default 540) and a step is skipped (summary.txt says so) when less is left than
# it needs to report anything (its own minimum: a scale step spends ~25 s building its model before it
# measures), so the whole command ends within 9 minutes and a short lease still brings back the first figures.
# Give the command itself a limit of at least DEADLINE + 20 s: a step cut at the deadline gets SIGTERM,
# then SIGKILL 10 s later, and still writes what it measured (scale.py, linalg.py) and its summary line.
#
# Wheels placed in .whl/ (`bash benchmarks/gpu_wheels.sh` downloads the peft and transformers versions
# of this checkout's .venv; carry ".whl") are installed into a scratch folder first; the repository's src/
# is put on PYTHONPATH, so nothing is installed into the machine's environment. Without peft importable
# nothing can run: the command stops at once and summary.txt says why. Every step has its own time limit
# and the run goes on after a failed step; summary.txt lists each step's exit code and seconds. A failed
# build turns the CUDA extension off for the later steps (each would rebuild it for a minute and fail).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
: > "$LOG"
: > "$SUMMARY"
STEPS="${GPU_CHECK_STEPS:-build tests kernel decode scale scale_auto profile linalg ncu offload factor_memory moe}"
PY="${PYTHON:-python3}"

imports() { PYTHONPATH="$1:$PWD/src:${PYTHONPATH:-}" "$PY" -c "import peft, transformers, peft_eora" >> "$LOG" 2>&1; }
SITE=""
if ls .whl/*.whl > /dev/null 2>&1; then
  # every wheel carried; where the machine's other packages are too old for the carried transformers, peft alone
  for wheels in ".whl/*.whl" ".whl/peft-*.whl"; do
    rm -rf /tmp/pe_site
    # shellcheck disable=SC2086
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pe_site $wheels \
        >> "$LOG" 2>&1 && imports /tmp/pe_site; then
      SITE=/tmp/pe_site
      echo "installed: $(cd /tmp/pe_site && ls -d *.dist-info | tr '\n' ' ')" >> "$SUMMARY"
      break
    fi
  done
fi
if [ -z "$SITE" ] && ! imports ""; then
  echo "stopped: peft (or transformers) cannot be imported here. Run 'bash benchmarks/gpu_wheels.sh' on the dev" \
    "machine and carry .whl (see $LOG)" | tee -a "$SUMMARY"
  exit 3
fi
export PYTHONPATH="$PWD/src:${SITE:+$SITE:}${PYTHONPATH:-}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PEFT_EORA_BUILD_DIR="${PEFT_EORA_BUILD_DIR:-/tmp/pe_build}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers, peft, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'triton', triton.__version__)"
} >> "$SUMMARY" 2>&1

DEADLINE="${GPU_CHECK_DEADLINE:-540}"
LAST_RC=0
step() {  # step NAME LIMIT_S MIN_S CMD...   (skipped with under MIN_S seconds left)
  local name=$1 limit=$2 need=$3
  shift 3
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$need" ]; then
    echo "$name skipped: ${left}s left of the ${DEADLINE}s deadline (needs ${need}s)" | tee -a "$SUMMARY"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "===== $name: $*" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  LAST_RC=$rc
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$SUMMARY"
}

step build 300 60 "$PY" -c "from peft_eora.kernels import cuda_ext; m = cuda_ext.build_extension(); print('built', m.__name__)"
if [ "$LAST_RC" -ne 0 ]; then
  export PEFT_EORA_DISABLE_CUDA=1
  echo "build failed: the CUDA extension is off for the later steps (PEFT_EORA_DISABLE_CUDA=1)" | tee -a "$SUMMARY"
fi
TESTS=$(ls tests/test_kernels.py tests/test_gptq_linear.py tests/test_scale.py tests/test_topeig.py 2> /dev/null)
# the Triton tuner off in the tests (each compiles every tiling once): test_gpu_triton_every_tiling checks them all
step tests 240 30 env PEFT_EORA_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m gpu -p no:cacheprovider $TESTS
# the layer table, written after each row (a cut run keeps its rows); the end-to-end decode is its own step
step kernel 300 30 "$PY" benchmarks/kernel.py --no-e2e --out "$OUT_DIR/kernel.json"
step decode 150 45 "$PY" benchmarks/decode.py --out "$OUT_DIR/decode.json"
step scale 240 90 "$PY" benchmarks/scale.py --gpu-8b --out "$OUT_DIR/scale.json"
# the same at the default damping="auto" (ridge chosen per layer on held-out windows)
step scale_auto 240 90 "$PY" benchmarks/scale.py --gpu-8b --damping auto --out "$OUT_DIR/scale_auto.json"
# where those seconds go, operator by operator: two blocks of the 8B shape at auto under torch.profiler
# (each operator charged to the phase it ran in: block forwards, covariance, factors, ...)
step profile 120 45 "$PY" benchmarks/scale.py --hidden 4096 --intermediate 14336 --layers 2 --heads 32 --kv-heads 8 \
  --vocab 128256 --samples 64 --seq-len 1024 --batch-size 8 --damping auto --profile --out "$OUT_DIR/scale_profile.json"
# the linear algebra behind those (eigh, Cholesky, the top-r iteration and its small eigh; ~60 s;
# its JSON is written after each size, so a cut run keeps the 4096 row)
step linalg 120 30 "$PY" benchmarks/linalg.py --out "$OUT_DIR/linalg.json"
# Nsight Compute on the fused kernel (duration, DRAM throughput, occupancy; v3 vs its v2 paths), where ncu exists
if command -v ncu > /dev/null 2>&1; then
  step ncu 150 60 bash -c "ncu --clock-control none -k regex:gptq_lora_kernel --metrics gpu__time_duration.sum,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,\
launch__registers_per_thread,launch__grid_size --csv --log-file \"$OUT_DIR/ncu.csv\" \"$PY\" benchmarks/ncu_probe.py \
--order \"$OUT_DIR/ncu_order.json\" && \"$PY\" benchmarks/ncu_probe.py --parse \"$OUT_DIR/ncu.csv\" \
--order \"$OUT_DIR/ncu_order.json\" --out \"$OUT_DIR/ncu.json\""
else
  case " $STEPS " in *" ncu "*) echo "ncu skipped: no ncu on PATH" | tee -a "$SUMMARY" ;; esac
fi
# a 1.1B shape kept on the CPU, its blocks visiting the GPU one at a time, its originals read a block
# ahead from safetensors shards it has just written (the read path of a real checkpoint; the page cache is warm)
step offload 180 60 "$PY" benchmarks/scale.py --offload --hidden 2048 --intermediate 5632 --layers 16 --heads 16 \
  --kv-heads 16 --vocab 32000 --samples 64 --seq-len 1024 --original-dir /tmp/pe_orig_1b --out "$OUT_DIR/scale_offload.json"
# the factor step of the 8B down_proj alone: GPU memory it adds over its inputs (the fixed ridge then
# rounds the factors to int8 as adapter_bits=8 does: that phase's peak apart). The dead-channel case
# first (it alone runs the in-place eigh routes on cuSOLVER), each run on its own (one failing or cut
# short does not lose the others)
step factor_memory 120 30 bash -c "r=0; \"$PY\" benchmarks/factor_memory.py --device cuda --dead-channels 16 \
--out \"$OUT_DIR/factor_memory_auto_dead16.json\" || r=1; \"$PY\" benchmarks/factor_memory.py --device cuda \
--out \"$OUT_DIR/factor_memory_auto.json\" || r=1; \"$PY\" benchmarks/factor_memory.py --device cuda --damping 0.01 \
--adapter-bits 8 --out \"$OUT_DIR/factor_memory_fixed.json\" || r=1; exit \$r"
# four blocks of a Qwen3-30B-A3B shape (128 routed experts, top 8, one linear each as gptqmodel makes them) at
# damping="auto": seconds per block of the staged expert collection and of ~390 small factor steps per block
step moe 150 60 "$PY" benchmarks/scale.py --hidden 2048 --intermediate 6144 --layers 4 --heads 32 --kv-heads 4 \
  --vocab 32000 --experts 128 --top-k 8 --moe-intermediate 768 --samples 64 --seq-len 1024 --damping auto \
  --out "$OUT_DIR/scale_moe.json"
echo "total $SECONDS s" | tee -a "$SUMMARY"
