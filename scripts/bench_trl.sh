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

# Versions this benchmark was run with (CPU use; the default wheel of torch).
PINS=(torch==2.15.0 transformers==5.24.0 trl==1.16.0 datasets==5.2.0 accelerate==1.15.0)

if [ ! -x "$BENCH_VENV/bin/python" ]; then
    echo "[bench] creating virtual environment $BENCH_VENV"
    "$PYTHON" -m venv "$BENCH_VENV"
fi
if ! "$BENCH_VENV/bin/python" -m pip show -q trl >/dev/null 2>&1 \
    || [ "$("$BENCH_VENV/bin/python" -c 'import trl; print(trl.__version__)' 2>/dev/null)" != "1.16.0" ]; then
    echo "[bench] installing ${PINS[*]}"
    "$BENCH_VENV/bin/python" -m pip install -q --upgrade pip
    "$BENCH_VENV/bin/python" -m pip install -q "${PINS[@]}"
fi

echo "[bench] building dpo2d (release)"
cargo build --release --quiet
DPO2D=target/release/dpo2d

if [ -z "${MODEL_DIR:-}" ]; then
    echo "[bench] fetching SmolLM2-135M-Instruct"
    # The command prints the converted Hugging Face directory on its last line.
    MODEL_DIR=$("$DPO2D" model fetch smollm2 | tail -n 1)
fi
if [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "error: '$MODEL_DIR' is not a Hugging Face model directory" >&2
    exit 1
fi

echo "[bench] load before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
exec "$BENCH_VENV/bin/python" scripts/bench_trl.py --model "$MODEL_DIR" --dpo2d "$DPO2D" "$@"
