#!/usr/bin/env bash
# Checks a CUDA build of dpo2d on a GPU machine (scripts/gpu_check.py says what).
#   cargo build --release --features cuda   (docs/gpu.md)
#   scripts/gpu_check.sh [--model SMOLLM2_DIR_OR_GGUF] [--dpo2d BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
exec python3 scripts/gpu_check.py "$@"
