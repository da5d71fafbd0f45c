#!/usr/bin/env bash
# Local judges, measured: `dpo2d serve --model smollm2` (or any server at
# JUDGE_URL, e.g. llama-server) as the judge of
#   (a) `annotate` of data/heldout.jsonl (24 hand-scored pairs), ratings read
#       from the text and from the log-probabilities, each compared with the
#       hand scores (`annotate compare`: agreement and Spearman's rho);
#   (b) `eval --bench mt-bench --limit 8` (SmolLM2 answering, the judge grading);
#   (c) one `iterate --scorer judge:URL` round on 8 prompts.
# For each: the share of readable judgements and the wall time. Results in
# OUT_DIR/summary.txt.
#
#   scripts/local_judge.sh [OUT_DIR]                      # default runs/local-judge
#   JUDGE_URL=http://127.0.0.1:8080/v1 JUDGE_MODEL=x scripts/local_judge.sh runs/llama-judge
#
# Environment: DPO2D (default: `cargo build --release`), PORT [8093],
# JUDGE_URL / JUDGE_MODEL (a running server instead of starting dpo2d serve),
# CONCURRENCY [4], PARTS [a,b,c].
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/local-judge}
PORT=${PORT:-8093}
CONCURRENCY=${CONCURRENCY:-4}
PARTS=${PARTS:-a,b,c}
if [ -z "${DPO2D:-}" ]; then
    cargo build --release --quiet
    DPO2D=target/release/dpo2d
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
note "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"

SERVER_PID=""
if [ -z "${JUDGE_URL:-}" ]; then
    "$DPO2D" serve --model smollm2 --port "$PORT" --served-model-name smollm2 > "$OUT/serve.log" 2>&1 &
    SERVER_PID=$!
    trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null' EXIT
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
        sleep 1
    done
    JUDGE_URL="http://127.0.0.1:$PORT/v1"
    JUDGE_MODEL=smollm2
fi
JUDGE=(--judge-base-url "$JUDGE_URL" --judge-model "${JUDGE_MODEL:-smollm2}" --judge-concurrency "$CONCURRENCY" --judge-timeout 900)
note "judge: $JUDGE_URL (${JUDGE_MODEL:-smollm2})"

# The seconds go to fd 3, apart from the command's own output and its redirections.
timed() { local t0=$SECONDS; "$@"; echo $((SECONDS - t0)) >&3; }

if [[ ,$PARTS, == *,a,* ]]; then
    for from in text logprobs; do
        out="$OUT/heldout.$from.jsonl"
        secs=$(timed "$DPO2D" annotate data/heldout.jsonl -o "$out" "${JUDGE[@]}" --judge-rating-from "$from" \
            --cache "$OUT/annotate.$from.sqlite" --failed-out "$OUT/heldout.$from.failed.jsonl" --no-progress 2> "$OUT/annotate.$from.log" 3>&1 > /dev/null | tail -n 1)
        note ""
        note "(a) annotate, ratings from $from: $secs s"
        grep -E "^(aspect|helpfulness|correctness|safety|completeness|clarity|pairs:|requests:|failed attempts)" "$OUT/annotate.$from.log" | tee -a "$SUMMARY"
        if [ -s "$out" ]; then
            note "agreement with the hand scores (data/heldout.jsonl):"
            "$DPO2D" annotate compare data/heldout.jsonl "$out" | tee -a "$SUMMARY"
        fi
    done
fi

if [[ ,$PARTS, == *,b,* ]]; then
    secs=$(timed "$DPO2D" eval --bench mt-bench --limit 8 --model-path smollm2 --max-new-tokens 256 "${JUDGE[@]}" \
        -o "$OUT/eval" --cache "$OUT/eval.sqlite" --no-progress 3>&1 > "$OUT/eval.report.md" 2> "$OUT/eval.log" | tail -n 1)
    note ""
    note "(b) eval mt-bench --limit 8: $secs s"
    python3 - "$OUT/eval/results.json" <<'PY' | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1]))
recs = r["records"]
grades = sum(x.get("grade") is not None for x in recs)
aspects = sum(all(a is not None for a in x.get("aspects", [])) for x in recs)
print(f"readable grades: {grades}/{len(recs)}; readable aspect ratings (all five): {aspects}/{len(recs)}")
print(f"headline: {r['summary'].get('headline')}")
PY
fi

if [[ ,$PARTS, == *,c,* ]]; then
    python3 - data/heldout.jsonl "$OUT/prompts.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][:8]
with open(sys.argv[2], "w") as f:
    for r in rows:
        f.write(json.dumps({"prompt": r["prompt"]}) + "\n")
PY
    rm -rf "$OUT/iterate"
    secs=$(timed "$DPO2D" iterate --model smollm2 --prompts "$OUT/prompts.jsonl" --scorer "judge:$JUDGE_URL" \
        --judge-model "${JUDGE_MODEL:-smollm2}" --judge-concurrency "$CONCURRENCY" --judge-timeout 900 \
        --samples-per-prompt 4 --max-new-tokens 96 --rounds 1 --max-steps 2 --preset quickstart \
        --output-dir "$OUT/iterate" --no-progress 3>&1 > "$OUT/iterate.md" 2> "$OUT/iterate.log" | tail -n 1) || true
    note ""
    note "(c) iterate, one round on 8 prompts (K=4): $secs s"
    grep -hE "could not be judged|failed" "$OUT/iterate.log" | head -3 | tee -a "$SUMMARY" || true
    cat "$OUT/iterate.md" | tee -a "$SUMMARY"
fi
