#!/usr/bin/env bash
# Side-by-side DPO training speed of `dpo2d train --loss dpo` and TRL's
# DPOTrainer (PyTorch on CPU) on the same workload, on this machine.
#
#   scripts/bench_trl.sh            # default settings below
#   STEPS=10 scripts/bench_trl.sh   # a shorter run
#
# Steps: create a Python virtual environment with pinned PyTorch, transformers,
# TRL, datasets and accelerate; build dpo2d in release mode; fetch and convert
# SmolLM2-135M-Instruct with `dpo2d model fetch smollm2`; run
# scripts/bench_trl.py, which trains with each tool in turn (TRL first) and
# prints tokens/s, peak memory and the ratio. Results: $BENCH_DIR/results.json.
#
# Environment (defaults in brackets):
#   BENCH_VENV [.venv-bench]  virtual environment to create or reuse
#   PYTHON     [python3]      interpreter used to create it (3.10 or newer)
#   STEPS [30] BATCH [2] MAX_LENGTH [256] MAX_PROMPT_LENGTH [128]
#   LR [5e-7] BETA [0.1] THREADS [nproc]
#   TOOLS [trl,dpo2d]         which tools to run, in this order
#   BENCH_DIR [runs/bench-trl] working directory (pairs, logs, results)
#   MODEL_DIR                 skip the fetch and use this Hugging Face directory
set -euo pipefail

cd "$(dirname "$0")/.."

BENCH_VENV=${BENCH_VENV:-.venv-bench}
PYTHON=${PYTHON:-python3}
export STEPS=${STEPS:-30} BATCH=${BATCH:-2} MAX_LENGTH=${MAX_LENGTH:-256}
export MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-128} LR=${LR:-5e-7} BETA=${BETA:-0.1}
export THREADS=${THREADS:-$(nproc)} TOOLS=${TOOLS:-trl,dpo2d} BENCH_DIR=${BENCH_DIR:-runs/bench-trl}

source scripts/torch_env.sh
torch_env bench
# The benchmark always times the dpo2d built from this checkout.
DPO2D=""
dpo2d_and_model bench

echo "[bench] load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
exec "$PY" scripts/bench_trl.py --model "$MODEL_DIR" --dpo2d "$DPO2D" "$@"
