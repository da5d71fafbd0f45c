#!/usr/bin/env bash
# Checks the TRL bridge (python/dpo2d-trl) against `dpo2d train`, on the CPU,
# with SmolLM2-135M-Instruct and the shipped data. Exits non-zero on any failure.
#
#   scripts/test_trl_bridge.sh
#   DPO2D=path/to/dpo2d MODEL_DIR=path/to/smollm2 scripts/test_trl_bridge.sh
#
# Steps:
#   1. a Python virtual environment with pinned torch, transformers, TRL, PEFT,
#      datasets, accelerate and pytest (reused when already there), and the
#      bridge installed into it with `pip install -e python/dpo2d-trl`;
#   2. pytest: the loss against hand-computed values, the data reader,
#      tokenization and segment alignment, the sampler, the collator;
#   3. tokenization of the whole shipped data set: the bridge's data
#      fingerprint (a hash of every prompt, chosen and rejected token id) equals
#      the one `dpo2d train` writes into trainer_state.json, for 2-D data with a
#      seeded held-out split and the default lengths, for plain TRL pairs, and
#      for the parity run's lengths; the bridge's seeded epoch order equals the
#      order in dpo2d's checkpoint;
#   4. parity: 5 steps of 2d-dpo (batch 2, file order, fp32, no dropout) with
#      `dpo2d train`, with the bridge in 1 process, and with the bridge in 2
#      processes (`torchrun --nproc_per_node 2`, gloo, per-device batch 1).
#      Step 1 (before any update): loss, rewards, log-probs, NLL, segment pairs
#      and gradient norm within 1e-4 relative; steps 2-5 within 1e-3 (rewards:
#      1e-3 absolute, as they are small differences of large log-probs);
#   5. step 1 with another reference model (dpo2d's model after step 4, so the
#      rewards are not 0): 2d-dpo in 1 process (file order) and 1d-dpo in 2
#      processes (dpo2d's seeded random order), within 1e-4 relative;
#   6. dpo2d reads what the bridge writes: `dpo2d logprobs` of the bridge's
#      final/ (full fine-tuning), of a LoRA adapter (trained with gradient
#      checkpointing) and of its merged model equal transformers' and PEFT's.
#
# CI does not run this script (torch alone is larger than CI should download).
#
# Environment (defaults in brackets):
#   BENCH_VENV [.venv-bench]  virtual environment to create or reuse (as scripts/bench_trl.sh)
#   PYTHON     [python3]      interpreter used to create it (3.10 or newer)
#   DPO2D                     dpo2d binary (default: `cargo build --release`, target/release/dpo2d)
#   MODEL_DIR                 SmolLM2-135M-Instruct as a Hugging Face directory (default: `dpo2d model fetch smollm2`)
#   WORK_DIR [runs/test-trl-bridge]  runs, logs and summary.txt
#   THREADS  [nproc]          CPU threads per run (halved per process for the 2-process runs)
#   KEEP_WEIGHTS [0]          1: keep the runs' model weights (about 6 GB; by default each run's
#                             weights are deleted once the checks that read them are done)
set -euo pipefail

cd "$(dirname "$0")/.."

BENCH_VENV=${BENCH_VENV:-.venv-bench}
PYTHON=${PYTHON:-python3}
WORK_DIR=${WORK_DIR:-runs/test-trl-bridge}
THREADS=${THREADS:-$(nproc)}

source scripts/torch_env.sh
torch_env bridge peft==0.21.2 pytest
echo "[bridge] installing python/dpo2d-trl (editable)"
"$PY" -m pip install -q --no-deps -e python/dpo2d-trl
dpo2d_and_model bridge

mkdir -p "$WORK_DIR"
SUMMARY="$WORK_DIR/summary.txt"
: > "$SUMMARY"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
HALF=$(( THREADS > 1 ? THREADS / 2 : 1 ))
FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }
check() {  # name, command...: run, record pass/fail, keep going
    local name=$1; shift
    if "$@" >> "$SUMMARY" 2>&1; then note "PASS $name"; else note "FAIL $name"; FAILED=1; fi
}
dpo2d_train() {  # output name, options...: dpo2d train, fp32 on the CPU, reference alongside the policy
    local out="$WORK_DIR/$1"; shift
    RAYON_NUM_THREADS=$THREADS "$DPO2D" train --model "$MODEL_DIR" --no-progress --overwrite-output-dir \
        --precompute-ref-log-probs false --output-dir "$out" "$@" > "$out.log" 2>&1 \
        || { echo "error: dpo2d train failed, see $out.log" >&2; tail -n 20 "$out.log" >&2; exit 1; }
}
bridge_train() {  # output name, processes, options...: the bridge, 1 process or torchrun
    local out="$WORK_DIR/$1" procs=$2; shift 2
    local launch=("$PY" -m dpo2d_trl)
    if [ "$procs" -gt 1 ]; then launch=("$BENCH_VENV/bin/torchrun" --standalone --nproc_per_node "$procs" -m dpo2d_trl); fi
    OMP_NUM_THREADS=$(( procs > 1 ? HALF : THREADS )) "${launch[@]}" train --model "$MODEL_DIR" --device cpu \
        --no-progress --overwrite-output-dir --output-dir "$out" "$@" > "$out.log" 2>&1 \
        || { echo "error: bridge train failed, see $out.log" >&2; tail -n 30 "$out.log" >&2; exit 1; }
}
prune() {  # drop the weights and optimizer state of finished runs (several GB in all); KEEP_WEIGHTS=1 keeps them
    if [ "${KEEP_WEIGHTS:-0}" != 1 ]; then
        for run in "$@"; do
            find "$WORK_DIR/$run" -type f \( -name '*.safetensors' -o -name '*.pt' -o -name '*.pth' -o -name '*.bin' \) -delete
        done
    fi
}
state_field() { "$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))[sys.argv[2]]))' "$@"; }

note "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
note "versions: $("$PY" -c 'import torch, transformers, trl, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}")'); $("$DPO2D" --version)"

echo "[bridge] 1/6 pytest"
check "pytest" "$PY" -m pytest -q python/dpo2d-trl/tests

echo "[bridge] 2/6 tokenization of the shipped data against dpo2d train"
fingerprint_matches() {  # label, trainer_state.json, tokenize options...
    local label=$1 state=$2; shift 2
    local want got
    want=$(state_field "$state" data_fingerprint | tr -d '"')
    got=$("$PY" -m dpo2d_trl tokenize --model "$MODEL_DIR" "$@" | sed -n 's/^data_fingerprint: //p')
    echo "$label: dpo2d $want, bridge $got"
    [ "$want" = "$got" ]
}
# 2-D data, the default lengths (1024 / 512), a seeded 10% held-out split, dpo2d's seeded order.
dpo2d_train data-2d --train-file data/train.jsonl --eval-split 0.1 --seed 7 --train-sampling-strategy random \
    --max-steps 2 --save-steps 1 --per-device-train-batch-size 1 --logging-steps 1
check "tokens of 2-D data, held-out split (train.jsonl, eval_split 0.1, seed 7)" fingerprint_matches "2-D split" \
    "$WORK_DIR/data-2d/checkpoint-1/trainer_state.json" --train-file data/train.jsonl --eval-split 0.1 --seed 7
order_matches() {
    "$PY" - "$WORK_DIR/data-2d/checkpoint-1/trainer_state.json" <<'EOF'
import json, sys
from dpo2d_trl.sampler import epoch_order
order = json.load(open(sys.argv[1]))["data_order"]
mine = epoch_order(len(order), 7, 0)
print(f"epoch 0 order of {len(order)} pairs: dpo2d {order[:8]}..., bridge {mine[:8]}...")
sys.exit(order != mine)
EOF
}
check "seeded data order (random, seed 7)" order_matches
# Plain TRL pairs: every pair of train.jsonl and heldout.jsonl with its responses as text.
"$PY" - data/train.jsonl data/heldout.jsonl > "$WORK_DIR/plain.jsonl" <<'EOF'
import json, sys
for path in sys.argv[1:]:
    for line in open(path, encoding="utf-8"):
        if line.strip():
            p = json.loads(line)
            text = lambda r: "".join(s["text"] for s in r["segments"])
            print(json.dumps({"prompt": p["prompt"], "chosen": text(p["chosen"]), "rejected": text(p["rejected"])}))
EOF
dpo2d_train data-plain --train-file "$WORK_DIR/plain.jsonl" --loss-type dpo --max-steps 1 --per-device-train-batch-size 1
check "tokens of plain TRL pairs (train + heldout)" fingerprint_matches "plain" \
    "$WORK_DIR/data-plain/final/trainer_state.json" --train-file "$WORK_DIR/plain.jsonl" --loss-type dpo
prune data-2d data-plain

echo "[bridge] 3/6 parity: 5 steps of 2d-dpo, dpo2d and the bridge in 1 process"
PARITY=(--train-file data/train.jsonl --loss-type 2d-dpo --beta 0.1 --sft-weight 0.1 --learning-rate 5e-6
        --max-steps 5 --train-sampling-strategy sequential --seed 42 --max-length 256 --max-prompt-length 128
        --logging-steps 1 --gradient-accumulation-steps 1)
dpo2d_train dpo2d-2d "${PARITY[@]}" --per-device-train-batch-size 2
check "tokens at the parity run's lengths (256 / 128)" fingerprint_matches "parity lengths" \
    "$WORK_DIR/dpo2d-2d/final/trainer_state.json" --train-file data/train.jsonl --max-length 256 --max-prompt-length 128
bridge_train bridge-2d-1p 1 "${PARITY[@]}" --per-device-train-batch-size 2
compare() {  # A, B, steps, rtol, atol [keys]
    local keys=()
    if [ -n "${6:-}" ]; then keys=(--keys "$6"); fi
    "$PY" -m dpo2d_trl compare "$WORK_DIR/$1/metrics.jsonl" "$WORK_DIR/$2/metrics.jsonl" --steps "$3" --rtol "$4" --atol "$5" "${keys[@]}"
}
LOSS_KEYS=loss,logps/chosen,logps/rejected,nll_loss,segments/pairs,grad_norm
REWARD_KEYS=rewards/chosen,rewards/rejected,rewards/margins,rewards/accuracies
check "dpo2d vs bridge (1 process), step 1, 1e-4" compare dpo2d-2d bridge-2d-1p 1 1e-4 1e-6
check "dpo2d vs bridge (1 process), steps 2-5, 1e-3" compare dpo2d-2d bridge-2d-1p 2,3,4,5 1e-3 0 "$LOSS_KEYS"
check "dpo2d vs bridge (1 process), steps 2-5 rewards, 1e-3 absolute" compare dpo2d-2d bridge-2d-1p 2,3,4,5 0 1e-3 "$REWARD_KEYS"

echo "[bridge] 4/6 parity: the bridge in 2 processes (torchrun, gloo), per-device batch 1"
bridge_train bridge-2d-2p 2 "${PARITY[@]}" --per-device-train-batch-size 1
check "bridge 1 process x batch 2 vs 2 processes x batch 1, step 1, 1e-4" compare bridge-2d-1p bridge-2d-2p 1 1e-4 1e-6
check "bridge 1 process vs 2 processes, steps 2-5, 1e-3" compare bridge-2d-1p bridge-2d-2p 2,3,4,5 1e-3 0 "$LOSS_KEYS"
check "bridge 1 process vs 2 processes, steps 2-5 rewards, 1e-3 absolute" compare bridge-2d-1p bridge-2d-2p 2,3,4,5 0 1e-3 "$REWARD_KEYS"
check "dpo2d vs bridge (2 processes), step 1, 1e-4" compare dpo2d-2d bridge-2d-2p 1 1e-4 1e-6
prune bridge-2d-2p

echo "[bridge] 5/6 step 1 against another reference model (rewards not 0)"
REF=(--ref-model "$WORK_DIR/dpo2d-2d/final" --train-file data/train.jsonl --beta 0.1 --sft-weight 0.1
     --learning-rate 5e-6 --max-steps 1 --max-length 256 --max-prompt-length 128 --logging-steps 1)
dpo2d_train dpo2d-ref-2d "${REF[@]}" --loss-type 2d-dpo --per-device-train-batch-size 2 --train-sampling-strategy sequential
bridge_train bridge-ref-2d-1p 1 "${REF[@]}" --loss-type 2d-dpo --per-device-train-batch-size 2 --train-sampling-strategy sequential
check "2d-dpo, reference = dpo2d's model after 5 steps: dpo2d vs bridge (1 process), 1e-4" compare dpo2d-ref-2d bridge-ref-2d-1p 1 1e-4 1e-6
# In dpo2d's seeded random order: the first global micro-batch is the same 2 pairs, split over the ranks.
dpo2d_train dpo2d-ref-1d "${REF[@]}" --loss-type 1d-dpo --per-device-train-batch-size 2 --train-sampling-strategy random --seed 11
bridge_train bridge-ref-1d-2p 2 "${REF[@]}" --loss-type 1d-dpo --per-device-train-batch-size 1 --train-sampling-strategy random --seed 11
check "1d-dpo, same reference, random order (seed 11): dpo2d vs bridge (2 processes x batch 1), 1e-4" compare dpo2d-ref-1d bridge-ref-1d-2p 1 1e-4 1e-6
prune dpo2d-2d dpo2d-ref-2d bridge-ref-2d-1p dpo2d-ref-1d bridge-ref-1d-2p

echo "[bridge] 6/6 dpo2d reads the bridge's outputs: full weights, a LoRA adapter, the merged model"
# LoRA with gradient checkpointing; a large learning rate so that one step moves the adapters
# (the check below requires log-probs that differ from the base model's).
bridge_train bridge-lora 1 --train-file data/train.jsonl --loss-type 2d-dpo --use-lora true --lora-r 8 \
    --lora-dropout 0 --gradient-checkpointing true --learning-rate 1e-2 --per-device-train-batch-size 2 \
    --max-steps 1 --max-length 128 --max-prompt-length 64 --logging-steps 1
"$PY" - data/heldout.jsonl > "$WORK_DIR/rows.jsonl" <<'EOF'
import json, sys
for line in list(open(sys.argv[1], encoding="utf-8"))[:3]:
    p = json.loads(line)
    print(json.dumps({"prompt": p["prompt"], "response": "".join(s["text"] for s in p["chosen"]["segments"])}))
EOF
same_logprobs() {  # model dir, base model of an adapter (or nothing): dpo2d logprobs vs transformers (+ PEFT)
    local model=$1 base=${2:-}
    RAYON_NUM_THREADS=$THREADS "$DPO2D" logprobs --model "$model" --input "$WORK_DIR/rows.jsonl" --with-end-of-turn \
        -o "$WORK_DIR/logprobs.jsonl" > /dev/null 2>&1 || { echo "dpo2d logprobs failed on $model"; return 1; }
    "$PY" - "$model" "$base" "$WORK_DIR/rows.jsonl" "$WORK_DIR/logprobs.jsonl" <<'EOF'
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from dpo2d_trl.align import Aligner
from dpo2d_trl.data import Response
model_dir, base, rows, theirs = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(model_dir)
if base:
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), model_dir)
else:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
a = Aligner(tok)
moved = 0.0
got = {}
for line in open(theirs, encoding="utf-8"):
    r = json.loads(line)
    got.setdefault(r["row"], []).append((r["id"], r["logprob"]))
worst = 0.0
for i, line in enumerate(open(rows, encoding="utf-8")):
    row = json.loads(line)
    prompt = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    p, r = a.prompt_ids(prompt), a.response(Response(row["response"]))[0].ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) + len(r) - 1].gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
    if [t for t, _ in got[i]] != r:
        sys.exit(f"row {i}: token ids differ")
    worst = max(worst, max(abs(x - y) for (_, x), y in zip(got[i], lp.tolist())))
    if base:  # the adapter must change the model, or the check would not see it ignored
        with model.disable_adapter(), torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
        lb = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) + len(r) - 1].gather(-1, torch.tensor(r).unsqueeze(-1)).squeeze(-1)
        moved = max(moved, (lp - lb).abs().max().item())
print(f"{model_dir}: {sum(len(v) for v in got.values())} tokens, same ids, largest log-prob difference {worst:.2e}"
      + (f"; the adapter moves log-probs by up to {moved:.2e}" if base else ""))
sys.exit(1 if worst > 1e-3 or (base and moved < 1e-2) else 0)
EOF
}
check "dpo2d logprobs of the bridge's full fine-tuned final/ = transformers' (1e-3)" same_logprobs "$WORK_DIR/bridge-2d-1p/final"
check "dpo2d logprobs of the bridge's LoRA adapter final/ = PEFT's (1e-3)" same_logprobs "$WORK_DIR/bridge-lora/final" "$MODEL_DIR"
check "dpo2d logprobs of the bridge's final/merged/ = transformers' (1e-3)" same_logprobs "$WORK_DIR/bridge-lora/final/merged"
prune bridge-2d-1p bridge-lora

echo
grep -E '^(PASS|FAIL|machine|versions)' "$SUMMARY"
echo "details: $SUMMARY"
if [ "$FAILED" -ne 0 ]; then
    echo "test_trl_bridge: FAILED"
    exit 1
fi
echo "test_trl_bridge: all checks passed"
