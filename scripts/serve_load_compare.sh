#!/usr/bin/env bash
# `dpo2d serve` under load, this checkout against an earlier one, side by
# side on this machine: each server in turn (alternating, ROUNDS rounds) runs
# scripts/load_serve.py with the same settings, and the table below gives
# every run. The default baseline is d842474, the last statically batched
# server (a request arriving while a batch decodes waits for the whole batch).
#
#   scripts/serve_load_compare.sh [BASE_REV]     # default d842474; writes runs/serve-load/
#
# Environment: ROUNDS [2], PORT [8095],
# LOAD_ARGS ["--requests 128 --concurrency 64 --max-tokens 12 --stalled 40"],
# SERVE_ARGS (extra `dpo2d serve` options for both), NEW_ARGS / BASE_ARGS
# (for one side only), BIN / BASE_BIN (built binaries instead of building).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_REV=${1:-d842474}
ROUNDS=${ROUNDS:-2}
PORT=${PORT:-8095}
LOAD_ARGS=${LOAD_ARGS:-"--requests 128 --concurrency 64 --max-tokens 12 --stalled 40"}
OUT=runs/serve-load
mkdir -p "$OUT"
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN=target/release/dpo2d
fi
if [ -z "${BASE_BIN:-}" ]; then
    # The baseline builds in a worktree of its own, with a target directory
    # of its own (kept for the next run).
    tree="$OUT/base-$BASE_REV"
    [ -d "$tree" ] || git worktree add --detach "$tree" "$BASE_REV" > /dev/null
    (cd "$tree" && CARGO_TARGET_DIR="$PWD/../target-$BASE_REV" cargo build --release --quiet --bin dpo2d)
    BASE_BIN="$OUT/target-$BASE_REV/release/dpo2d"
fi

# run LABEL BINARY ARGS...: one server, one load test; prints the JSON line.
run() {
    local label=$1 bin=$2
    shift 2
    "$bin" serve --model smollm2 --port "$PORT" "$@" > "$OUT/serve-$label.log" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
        kill -0 "$pid" 2> /dev/null || { cat "$OUT/serve-$label.log" >&2; exit 1; }
        sleep 0.5
    done
    # shellcheck disable=SC2086
    python3 scripts/load_serve.py --url "http://127.0.0.1:$PORT/v1" $LOAD_ARGS
    kill -INT "$pid"
    wait "$pid" || true
}

RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
for round in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086
    for side in base new; do
        if [ "$side" = base ]; then
            line=$(run base "$BASE_BIN" ${SERVE_ARGS:-} ${BASE_ARGS:-})
            label="$BASE_REV"
        else
            line=$(run new "$BIN" ${SERVE_ARGS:-} ${NEW_ARGS:-})
            label="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates src || echo +changes)"
        fi
        echo "$line" | python3 -c "import json,sys; d=json.load(sys.stdin); d.update(server='$label', round=$round); print(json.dumps(d))" | tee -a "$RESULTS"
    done
done

LOAD_ARGS="$LOAD_ARGS" python3 - "$RESULTS" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
print(f"\n{cpu}, {os.cpu_count()} CPUs; load test: {os.environ.get('LOAD_ARGS', '')}\n")
print("| server | round | answered | p50 | p99 | completion tokens/s |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['server']} | {r['round']} | {r['answered']} of {r['requests']} | {r['p50_s']} s | {r['p99_s']} s | {r['tokens_per_s']} |")
EOF
