#!/usr/bin/env bash
# The worked example of docs/evaluation.md: SmolLM2-135M-Instruct before and
# after `dpo2d quickstart`, on --limit slices of MT-Bench, AlpacaEval and
# Arena-Hard, judged by `dpo2d serve` of the base model itself (a 135M judge
# is a smoke test of the loop, not a measurement of quality), and on 200
# held-out arithmetic problems checked by a program. Everything is cached in
# $OUT/cache.sqlite: a rerun only does what is missing.
#
#   scripts/eval_example.sh            # LIMIT=20 questions per set (ARENA_LIMIT=5 for Arena-Hard)
#   LIMIT=5 scripts/eval_example.sh    # quicker
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT:-20}
PORT=${PORT:-8765}
OUT=${OUT:-runs/eval-example}
cargo build --release --quiet
BIN=target/release/dpo2d
mkdir -p "$OUT"
[ -d runs/quickstart/final ] || "$BIN" quickstart

"$BIN" serve --model smollm2 --port "$PORT" --served-model-name smollm2-judge 2> "$OUT/serve.log" &
SERVE=$!
trap 'kill -INT $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 1
done

# A CPU judge is slow: no request is given up on for taking long.
judge=(--base-url "http://127.0.0.1:$PORT/v1" --model smollm2-judge --max-tokens 128 --timeout 1800)
common=(--max-new-tokens 128 --concurrency 16 --cache "$OUT/cache.sqlite" "${judge[@]}")
start=$(date +%s)
# Arena-Hard's baseline answers make judge prompts of thousands of tokens:
# a smaller slice of it keeps the example within an hour on two cores.
for bench in mt-bench alpaca-eval arena-hard; do
    limit=$LIMIT
    [ "$bench" = arena-hard ] && limit=${ARENA_LIMIT:-5}
    "$BIN" eval --bench "$bench" --limit "$limit" --model-path smollm2 --model-id before "${common[@]}" -o "$OUT/$bench-before" > /dev/null
    "$BIN" eval --bench "$bench" --limit "$limit" --model-path runs/quickstart/final --model-id after "${common[@]}" -o "$OUT/$bench-after" > /dev/null
    "$BIN" eval compare "$OUT/$bench-before" "$OUT/$bench-after" --plot "$OUT/$bench-aspects.png" > "$OUT/$bench-compare.md"
done
# The two models head to head, the base model as the baseline.
"$BIN" eval --bench alpaca-eval --limit "$LIMIT" --model-path runs/quickstart/final --model-id after \
    --baseline-path smollm2 --baseline-id before "${common[@]}" -o "$OUT/alpaca-eval-after-vs-before" > /dev/null
# Without a judge: 200 held-out arithmetic word problems, checked by a program.
"$BIN" eval --bench arithmetic --model-path smollm2 --model-id before --limit 200 --max-new-tokens 192 --batch-size 16 \
    --cache "$OUT/cache.sqlite" -o "$OUT/arithmetic-before" > /dev/null
"$BIN" eval --bench arithmetic --model-path runs/quickstart/final --model-id after --limit 200 --max-new-tokens 192 --batch-size 16 \
    --cache "$OUT/cache.sqlite" -o "$OUT/arithmetic-after" > /dev/null
"$BIN" eval compare "$OUT/arithmetic-before" "$OUT/arithmetic-after" > "$OUT/arithmetic-compare.md"
echo "evaluated in $(( $(date +%s) - start )) s on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) ($(nproc) threads)"
for f in "$OUT"/*-compare.md "$OUT/alpaca-eval-after-vs-before/report.md"; do
    echo; cat "$f"
done
