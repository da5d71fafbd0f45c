#!/usr/bin/env bash
# GPU side-by-side: dpo2d train --device cuda --bf16 vs TRL's DPOTrainer on one GPU
# (scripts/bench_trl_gpu.py says what is measured). Needs torch, transformers, peft,
# trl and datasets in python3, and a dpo2d built with `--features cuda`.
#   WORKLOADS=a,b STEPS=20 scripts/bench_trl_gpu.sh [--dpo2d BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
exec python3 scripts/bench_trl_gpu.py "$@"
