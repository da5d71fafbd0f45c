#!/usr/bin/env bash
# Held-out reward accuracy after quickstart-sized runs of several losses on the
# shipped data (configs/quickstart.toml: SmolLM2-135M-Instruct, 12 steps of 4
# pairs, evaluation on data/heldout.jsonl at steps 0, 6 and 12).
#
#   scripts/compare_losses.sh                      # dpo, 1d-dpo, 2d-dpo
#   LOSSES="dpo 2d-dpo" MAX_STEPS=24 scripts/compare_losses.sh
#
# The reward of a response is beta x (its log-prob under the policy minus under
# the reference), summed over its tokens, for every loss alike; a held-out pair
# counts as correct when the chosen response's reward is the higher.
# Results: $OUT_DIR/<loss>/metrics.jsonl and $OUT_DIR/summary.tsv.
set -euo pipefail

cd "$(dirname "$0")/.."

LOSSES=${LOSSES:-"dpo 1d-dpo 2d-dpo"}
OUT_DIR=${OUT_DIR:-runs/compare-losses}
MAX_STEPS=${MAX_STEPS:-}

echo "[compare] building dpo2d (release)"
cargo build --release --quiet
DPO2D=target/release/dpo2d
"$DPO2D" model fetch smollm2 >/dev/null

mkdir -p "$OUT_DIR"
for loss in $LOSSES; do
    echo "[compare] training --loss $loss (log: $OUT_DIR/$loss.log)"
    extra=()
    [ -n "$MAX_STEPS" ] && extra+=(--max-steps "$MAX_STEPS")
    start=$(date +%s)
    "$DPO2D" train --preset quickstart --loss "$loss" --output-dir "$OUT_DIR/$loss" --overwrite-output-dir --no-progress "${extra[@]}" \
        > "$OUT_DIR/$loss.log" 2>&1 || { echo "error: the $loss run failed; see $OUT_DIR/$loss.log" >&2; exit 1; }
    echo "$(( $(date +%s) - start ))" > "$OUT_DIR/$loss.seconds"
done

python3 - "$OUT_DIR" $LOSSES <<'EOF'
import json, sys
from pathlib import Path

out, losses = Path(sys.argv[1]), sys.argv[2:]
rows = ["loss\tsteps\theld-out accuracy (step 0 -> last)\theld-out margin (step 0 -> last)\twall seconds"]
print(f"{'loss':8} {'steps':>5}  {'held-out accuracy':>24}  {'held-out margin':>24}  {'wall s':>6}")
for loss in losses:
    recs = [json.loads(l) for l in (out / loss / "metrics.jsonl").read_text().splitlines() if l.strip()]
    ev = [r for r in recs if "eval_rewards/accuracies" in r]
    if not ev:
        sys.exit(f"error: no evaluation records in {out / loss / 'metrics.jsonl'}")
    first, last = ev[0], ev[-1]
    acc = f"{first['eval_rewards/accuracies']:.3f} -> {last['eval_rewards/accuracies']:.3f}"
    mar = f"{first['eval_rewards/margins']:.4f} -> {last['eval_rewards/margins']:.4f}"
    secs = (out / f"{loss}.seconds").read_text().strip()
    print(f"{loss:8} {last['step']:>5}  {acc:>24}  {mar:>24}  {secs:>6}")
    rows.append(f"{loss}\t{last['step']}\t{acc}\t{mar}\t{secs}")
(out / "summary.tsv").write_text("\n".join(rows) + "\n")
EOF
echo "[compare] summary: $OUT_DIR/summary.tsv"
