#!/usr/bin/env bash
# A judge fleet, measured: `dpo2d annotate` of data/heldout.jsonl (24 pairs,
# 120 judgements) against one local judge server and against two, each run
# from an empty cache with the same flags (--concurrency is per server). The
# servers are `dpo2d serve --model smollm2` (or, with LLAMA_SERVER=path,
# llama-server with SmolLM2's GGUF, LLAMA_GGUF or the one `dpo2d model fetch`
# downloaded). Prints the wall time, judgements per
# second and each server's share of the requests; results in OUT_DIR/summary.txt.
#
#   scripts/fleet_bench.sh [OUT_DIR]          # default runs/fleet-bench
#
# On a machine with few cores the servers share them, so two servers cannot
# be twice as fast here; the run shows how the requests spread and what the
# fleet costs or gains on this machine. Environment: DPO2D (default: `cargo
# build --release`), PORTS ["8094 8095"], CONCURRENCY [4].
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fleet-bench}
read -r -a PORTS <<< "${PORTS:-8094 8095}"
CONCURRENCY=${CONCURRENCY:-4}
if [ -z "${DPO2D:-}" ]; then
    cargo build --release --quiet
    DPO2D=target/release/dpo2d
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
note "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"

PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null' EXIT
for port in "${PORTS[@]}"; do
    if [ -n "${LLAMA_SERVER:-}" ]; then
        # `dpo2d model fetch smollm2` keeps the downloaded GGUF under the cache's downloads/.
        gguf=${LLAMA_GGUF:-$(find "${DPO2D_CACHE:-$HOME/.cache/dpo2d}" -name 'SmolLM2-135M-Instruct*.gguf' | head -n 1)}
        "$LLAMA_SERVER" -m "$gguf" --host 127.0.0.1 --port "$port" -c 8192 --parallel "$CONCURRENCY" --no-repack > "$OUT/server.$port.log" 2>&1 &
    else
        "$DPO2D" serve --model smollm2 --port "$port" --served-model-name smollm2 > "$OUT/server.$port.log" 2>&1 &
    fi
    PIDS+=($!)
done
for port in "${PORTS[@]}"; do
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && break
        sleep 1
    done
done
note "servers: ${LLAMA_SERVER:-dpo2d serve --model smollm2} on ports ${PORTS[*]}; --concurrency $CONCURRENCY per server"

run() {
    local name=$1
    shift
    local urls=()
    for port in "$@"; do urls+=(--base-url "http://127.0.0.1:$port/v1"); done
    rm -f "$OUT/$name".*
    local t0 t1
    t0=$(date +%s.%N)
    "$DPO2D" annotate data/heldout.jsonl -o "$OUT/$name.jsonl" --model smollm2 "${urls[@]}" --concurrency "$CONCURRENCY" \
        --timeout 900 --no-progress 2> "$OUT/$name.log"
    t1=$(date +%s.%N)
    local judged
    judged=$(grep -E "^(helpfulness|correctness|safety|completeness|clarity) " "$OUT/$name.log" | awk '{s += $2} END {print s}')
    note ""
    note "$name: $(python3 -c "import sys; t = float(sys.argv[2]) - float(sys.argv[1]); print(f'{t:.1f} s, {sys.argv[3]} judgements, {int(sys.argv[3]) / t:.2f} judgements/s')" "$t0" "$t1" "$judged")"
    grep -E "^(requests:|pairs:|  server )" "$OUT/$name.log" | tee -a "$SUMMARY"
}

run one-server "${PORTS[0]}"
run two-servers "${PORTS[@]}"
