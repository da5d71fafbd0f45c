#!/usr/bin/env bash
# Does 2D-DPO train a better model than DPO? A task a program can grade:
# multi-step arithmetic word problems (docs/experiments.md).
#
# From SmolLM2-135M-Instruct: sample K=4 answers to $PROMPTS training
# problems, score every segment with the arithmetic checker (`dpo2d iterate
# --scorer check:arithmetic`), pair best against worst, and train dpo,
# 1d-dpo and 2d-dpo on those same pairs with the same steps and seed; then a
# second iterate round from the 2d-dpo policy. Every model answers the same
# $EVAL_N held-out problems greedily; the table gives the share of right final
# answers with a 95% bootstrap interval. A rerun does only what is missing.
#
#   scripts/experiment_arithmetic.sh
#   LR=2e-6 OUT=runs/exp-lr2e-6 FROM=runs/experiment-arithmetic SECOND_ROUND=0 scripts/experiment_arithmetic.sh
#
# FROM: start from the round-1 samples and scores (and the base model's
# cached answers) of an earlier run with the same prompts and sampling, so
# that other training settings are compared on the same data without
# sampling again. SECOND_ROUND=0: no second iterate round.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/experiment-arithmetic}
PROMPTS=${PROMPTS:-64}
EPOCHS=${EPOCHS:-2}
LR=${LR:-5e-6}
BETA=${BETA:-0.1}
EVAL_N=${EVAL_N:-200}
SECOND_ROUND=${SECOND_ROUND:-1}
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN=target/release/dpo2d
fi
mkdir -p "$OUT"
start=$(date +%s)
if [ -n "${FROM:-}" ] && [ ! -e "$OUT/2d-dpo/iterate.json" ]; then
    mkdir -p "$OUT/2d-dpo/round-1"
    cp "$FROM/2d-dpo/iterate.json" "$OUT/2d-dpo/"
    cp "$FROM/2d-dpo/round-1/samples.jsonl" "$FROM/2d-dpo/round-1/scored.jsonl" "$OUT/2d-dpo/round-1/"
    [ -e "$FROM/eval-cache.sqlite" ] && sqlite3 "$FROM/eval-cache.sqlite" ".backup '$OUT/eval-cache.sqlite'" 2>/dev/null \
        || cp "$FROM/eval-cache.sqlite" "$OUT/eval-cache.sqlite"
fi

train_opts=(--learning-rate "$LR" --beta "$BETA" --num-train-epochs "$EPOCHS" --max-steps 0
    --per-device-train-batch-size 4 --lr-scheduler-type cosine --warmup-ratio 0.1
    --max-length 384 --max-prompt-length 128 --logging-steps 1 --save-steps 4 --save-total-limit 1 --seed 42)
iterate=("$BIN" iterate --no-progress --model smollm2 --prompts "arithmetic:$PROMPTS" --scorer check:arithmetic
    --max-new-tokens 160 --sampling-batch-size 16 --loss 2d-dpo "${train_opts[@]}" --output-dir "$OUT/2d-dpo")

# Round 1: sample, score, pair, train 2d-dpo.
"${iterate[@]}" --rounds 1 > /dev/null
pairs="$OUT/2d-dpo/round-1/pairs.jsonl"

# The baselines, on the same pairs, with the same settings.
for loss in dpo 1d-dpo; do
    if [ ! -f "$OUT/$loss/train_results.json" ]; then
        resume=()
        ls -d "$OUT/$loss"/checkpoint-* > /dev/null 2>&1 && resume=(--resume)
        "$BIN" train --no-progress --model smollm2 --train-file "$pairs" --loss "$loss" "${train_opts[@]}" \
            --output-dir "$OUT/$loss" --overwrite-output-dir "${resume[@]}" > /dev/null
    fi
done

# Round 2 of iterate from the 2d-dpo policy.
[ "$SECOND_ROUND" = 1 ] && "${iterate[@]}" --rounds 2 > /dev/null

evaluate() { # id model
    "$BIN" eval --bench arithmetic --limit "$EVAL_N" --max-new-tokens 192 --batch-size 32 --no-progress \
        --cache "$OUT/eval-cache.sqlite" --model-path "$2" --model-id "$1" -o "$OUT/eval-$1" > /dev/null
}
evaluate base smollm2
evaluate dpo "$OUT/dpo/final"
evaluate 1d-dpo "$OUT/1d-dpo/final"
evaluate 2d-dpo "$OUT/2d-dpo/round-1/train/final"
[ "$SECOND_ROUND" = 1 ] && evaluate 2d-dpo-round-2 "$OUT/2d-dpo/round-2/train/final"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
echo "finished in $(( $(date +%s) - start )) s (whatever an earlier run had done is not counted again) on $cpu ($(nproc) threads)"
echo "PROMPTS=$PROMPTS EPOCHS=$EPOCHS LR=$LR BETA=$BETA EVAL_N=$EVAL_N SECOND_ROUND=$SECOND_ROUND"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def results(name):
    return json.load(open(f"{out}/eval-{name}/results.json"))["summary"]
def train_metric(path, key):
    recs = [json.loads(l) for l in open(path)]
    vals = [r[key] for r in recs if key in r]
    return vals[-1] if vals else float("nan")
import os
rounds = {r: json.load(open(f"{out}/2d-dpo/round-{r}/round.json")) for r in (1, 2) if os.path.exists(f"{out}/2d-dpo/round-{r}/round.json")}
print()
print("| model | trained on | held-out final answers right, % (95% CI) | held-out answer score 0-4 (95% CI) | mean answer chars | final train loss | rewards/accuracies |")
print("|---|---|---|---|---|---|---|")
rows = [
    ("SmolLM2-135M-Instruct", "base", "-", None),
    ("dpo", "dpo", "round-1 pairs", f"{out}/dpo/metrics.jsonl"),
    ("1d-dpo", "1d-dpo", "round-1 pairs", f"{out}/1d-dpo/metrics.jsonl"),
    ("2d-dpo", "2d-dpo", "round-1 pairs", f"{out}/2d-dpo/round-1/train/metrics.jsonl"),
    ("2d-dpo, 2nd iterate round", "2d-dpo-round-2", "round-2 pairs (sampled from 2d-dpo)", f"{out}/2d-dpo/round-2/train/metrics.jsonl"),
]
for label, name, data, metrics in rows:
    if not os.path.exists(f"{out}/eval-{name}/results.json"):
        continue
    s = results(name)
    h, c = s["headline"], s["checked_score"]
    loss = acc = "-"
    if metrics:
        loss = f"{train_metric(metrics, 'loss'):.4f}"
        acc = f"{train_metric(metrics, 'rewards/accuracies'):.2f}"
    print(f"| {label} | {data} | {h['mean']:.1f} ({h['low']:.1f}-{h['high']:.1f}) | {c['mean']:.2f} ({c['low']:.2f}-{c['high']:.2f}) | {s['mean_answer_chars']:.0f} | {loss} | {acc} |")
print()
print("| iterate round | prompts | pairs | no pair | mean answer score | chosen | rejected |")
print("|---|---|---|---|---|---|---|")
for r, x in rounds.items():
    print(f"| {r} | {x['prompts']} | {x['pairs']} | {x['ties']} | {x['mean_score']:.3f} | {x['chosen_mean_score']:.3f} | {x['rejected_mean_score']:.3f} |")
PY
