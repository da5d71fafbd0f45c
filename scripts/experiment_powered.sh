#!/usr/bin/env bash
# Does 2D-DPO beat DPO when the base model has room to improve?
# (docs/experiments.md, "A powered experiment").
#
#   scripts/experiment_powered.sh                 # the whole experiment
#   RERUN=dpo:2 scripts/experiment_powered.sh     # train and evaluate one run again, beside the first
#   MODEL=path/to/hf-model DEVICE=cuda EVAL_N=400 LEVEL_N=400 scripts/experiment_powered.sh
#
# 1. levels: the base model answers LEVEL_N held-out problems of every
#    arithmetic level greedily; the experiment runs at LEVEL (auto: the level
#    whose accuracy is nearest 40% among those within 25-60%).
# 2. pairs: K answers to each of PROMPTS training problems of that level,
#    every segment scored by the checker, the best answer against the worst
#    (`dpo2d iterate --scorer check:arithmetic`; that round also trains
#    2d-dpo with the first seed).
# 3. runs: dpo, 1d-dpo and 2d-dpo on the same pairs with the same settings,
#    one run per seed in SEEDS (the seed sets the data order, dropout and the
#    LoRA initialisation), and 2d-dpo with ABLATION_WEIGHTS (correctness-heavy).
# 4. every model answers the same EVAL_N held-out problems of the level
#    greedily; scripts/experiment_powered.py writes the tables.
#
# A rerun does only what is missing (every stage's time is kept in
# $OUT/timings.tsv).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/powered}
MODEL=${MODEL:-smollm2}
DEVICE=${DEVICE:-cpu}
LEVELS=${LEVELS:-1 2 3 4 5 6}
LEVEL_N=${LEVEL_N:-400}
LEVEL=${LEVEL:-auto}
PROMPTS=${PROMPTS:-256}
K=${K:-8}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
EVAL_N=${EVAL_N:-400}
SEEDS=${SEEDS:-1 2 3}
LOSSES=${LOSSES:-dpo 1d-dpo 2d-dpo}
ABLATION_WEIGHTS=${ABLATION_WEIGHTS:-0.1,0.6,0.1,0.1,0.1}
LR=${LR:-5e-5}
BETA=${BETA:-0.1}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-8}
GEN_BATCH=${GEN_BATCH:-32}
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN=target/release/dpo2d
fi
mkdir -p "$OUT"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
echo "machine: $cpu, $(nproc) threads; device $DEVICE" > "$OUT/machine.txt"

# Runs a stage once, keeping its wall time: stage NAME DONE_FILE COMMAND...
stage() {
    local name=$1 done=$2
    shift 2
    [ -e "$done" ] && return 0
    echo "$(date +%T) $name" >&2
    local t0
    t0=$(date +%s)
    "$@"
    printf '%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" >> "$OUT/timings.tsv"
}

evaluate() { # ID MODEL_PATH LEVEL N
    "$BIN" eval --bench "arithmetic-$3" --limit "$4" --max-new-tokens "$MAX_NEW_TOKENS" --batch-size "$GEN_BATCH" \
        --device "$DEVICE" --no-progress --cache "$OUT/eval-cache.sqlite" --model-path "$2" --model-id "$1" \
        -o "$OUT/eval/$1" > /dev/null
}

# 1. The base model's accuracy per level.
for l in $LEVELS; do
    stage "level $l: base model, $LEVEL_N problems" "$OUT/eval/base-level-$l/results.json" evaluate "base-level-$l" "$MODEL" "$l" "$LEVEL_N"
done
if [ "$LEVEL" = auto ]; then
    LEVEL=$(python3 scripts/experiment_powered.py "$OUT" --pick-level $LEVELS)
fi
echo "level $LEVEL" >&2

# 2 + the first 2d-dpo run: sample, check, pair, train.
lora=(--use-lora true --lora-r 16 --lora-alpha 32 --lora-target-modules all-linear --lora-dropout 0.05 --save-merged false)
train_opts=(--learning-rate "$LR" --beta "$BETA" --num-train-epochs "$EPOCHS" --max-steps 0
    --per-device-train-batch-size "$BATCH" --lr-scheduler-type cosine --warmup-ratio 0.1
    --max-length 320 --max-prompt-length 128 --logging-steps 1 --save-steps 8 --save-total-limit 1 "${lora[@]}")
first=${SEEDS%% *}
pairs_dir="$OUT/level-$LEVEL/pairs"
stage "pairs: $PROMPTS prompts x $K samples, and 2d-dpo seed $first" "$pairs_dir/round-1/round.json" \
    "$BIN" iterate --no-progress --model "$MODEL" --device "$DEVICE" --prompts "arithmetic-$LEVEL:$PROMPTS" \
    --scorer check:arithmetic --samples-per-prompt "$K" --max-new-tokens "$MAX_NEW_TOKENS" \
    --sampling-batch-size "$GEN_BATCH" --rounds 1 --loss-type 2d-dpo "${train_opts[@]}" --seed "$first" \
    --output-dir "$pairs_dir"
pairs="$pairs_dir/round-1/pairs.jsonl"

# 3. The runs. A run's output directory (run_dir in experiment_powered.py
# follows the same rule): run_dir NAME SEED.
first_dir="$pairs_dir/round-1/train"
run_dir() {
    if [ "$1" = 2d-dpo ] && [ "$2" = "$first" ]; then echo "$first_dir"; else echo "$OUT/level-$LEVEL/$1-seed-$2"; fi
}
train() { # LOSS SEED DIR [WEIGHTS]
    local extra=() resume=()
    [ -n "${4:-}" ] && extra=(--aspect-weights "$4")
    ls -d "$3"/checkpoint-* > /dev/null 2>&1 && resume=(--resume)
    "$BIN" train --no-progress --model "$MODEL" --device "$DEVICE" --train-file "$pairs" --loss-type "$1" "${train_opts[@]}" \
        --seed "$2" "${extra[@]}" --output-dir "$3" --overwrite-output-dir "${resume[@]}" > /dev/null
}
runs=()
for seed in $SEEDS; do
    for loss in $LOSSES; do runs+=("$loss:$loss:$seed:"); done
    runs+=("2d-dpo-correctness:2d-dpo:$seed:$ABLATION_WEIGHTS")
done

if [ -n "${RERUN:-}" ]; then
    # Train one run again in a directory of its own and evaluate it: its row
    # should be the first one's.
    IFS=: read -r name seed <<< "$RERUN"
    for r in "${runs[@]}"; do
        IFS=: read -r n loss s w <<< "$r"
        [ "$n" = "$name" ] && [ "$s" = "$seed" ] || continue
        dir="$OUT/level-$LEVEL/rerun-$n-seed-$s"
        stage "rerun $n seed $s: train" "$dir/train_results.json" train "$loss" "$s" "$dir" "$w"
        stage "rerun $n seed $s: evaluate" "$OUT/eval/rerun-$n-seed-$s/results.json" evaluate "rerun-$n-seed-$s" "$dir/final" "$LEVEL" "$EVAL_N"
        python3 scripts/experiment_powered.py "$OUT" --level "$LEVEL" --first-seed "$first" --compare "$n-seed-$s" "rerun-$n-seed-$s"
        exit 0
    done
    echo "RERUN=$RERUN: expected NAME:SEED with NAME one of $LOSSES 2d-dpo-correctness and SEED one of $SEEDS" >&2
    exit 2
fi

for r in "${runs[@]}"; do
    IFS=: read -r n loss s w <<< "$r"
    dir=$(run_dir "$n" "$s")
    [ "$dir" = "$first_dir" ] || stage "$n seed $s: train" "$dir/train_results.json" train "$loss" "$s" "$dir" "$w"
done

# 4. Every model on the same held-out problems.
stage "base: evaluate" "$OUT/eval/base/results.json" evaluate base "$MODEL" "$LEVEL" "$EVAL_N"
for r in "${runs[@]}"; do
    IFS=: read -r n loss s w <<< "$r"
    stage "$n seed $s: evaluate" "$OUT/eval/$n-seed-$s/results.json" evaluate "$n-seed-$s" "$(run_dir "$n" "$s")/final" "$LEVEL" "$EVAL_N"
done

echo "PROMPTS=$PROMPTS K=$K LEVEL=$LEVEL LEVEL_N=$LEVEL_N EVAL_N=$EVAL_N SEEDS='$SEEDS' LR=$LR BETA=$BETA EPOCHS=$EPOCHS BATCH=$BATCH MAX_NEW_TOKENS=$MAX_NEW_TOKENS" > "$OUT/settings.txt"
python3 scripts/experiment_powered.py "$OUT" --level "$LEVEL" --first-seed "$first" --seeds $SEEDS | tee "$OUT/tables.md"
