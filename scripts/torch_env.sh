# Sourced by the scripts that run PyTorch beside dpo2d (bench_trl.sh,
# test_trl_bridge.sh): one pinned Python environment, one dpo2d binary, one
# SmolLM2 directory.
#
#   torch_env TAG [EXTRA...]  create or reuse $BENCH_VENV [.venv-bench] with the
#                             pins below and EXTRA (also pip requirements);
#                             sets PY. TAG prefixes the progress lines.
#   dpo2d_and_model TAG       sets DPO2D (default: `cargo build --release`) and
#                             MODEL_DIR (default: `dpo2d model fetch smollm2`).
#
# PYTHON [python3] is the interpreter that creates the environment.

# Versions the scripts were run with (CPU use; the default wheel of torch).
TORCH_PINS=(torch==2.15.0 transformers==5.24.0 trl==1.16.0 datasets==5.2.0 accelerate==1.15.0)

torch_env() {
    local tag=$1
    shift
    BENCH_VENV=${BENCH_VENV:-.venv-bench}
    PY="$BENCH_VENV/bin/python"
    if [ ! -x "$PY" ]; then
        echo "[$tag] creating virtual environment $BENCH_VENV"
        "${PYTHON:-python3}" -m venv "$BENCH_VENV"
    fi
    # Reinstall unless TRL is the pinned one and every extra imports.
    local missing=0 extra
    for extra in "$@"; do
        "$PY" -c "import ${extra%%[=<>]*}" >/dev/null 2>&1 || missing=1
    done
    if [ "$("$PY" -c 'import trl; print(trl.__version__)' 2>/dev/null)" != "1.16.0" ] || [ $missing = 1 ]; then
        echo "[$tag] installing ${TORCH_PINS[*]} $*"
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q "${TORCH_PINS[@]}" "$@"
    fi
}

dpo2d_and_model() {
    local tag=$1
    if [ -z "${DPO2D:-}" ]; then
        echo "[$tag] building dpo2d (release)"
        cargo build --release --quiet
        DPO2D=target/release/dpo2d
    fi
    if [ -z "${MODEL_DIR:-}" ]; then
        echo "[$tag] fetching SmolLM2-135M-Instruct"
        # The command prints the converted Hugging Face directory on its last line.
        MODEL_DIR=$("$DPO2D" model fetch smollm2 | tail -n 1)
    fi
    if [ ! -f "$MODEL_DIR/config.json" ]; then
        echo "error: '$MODEL_DIR' is not a Hugging Face model directory" >&2
        exit 1
    fi
}
