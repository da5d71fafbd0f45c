#!/usr/bin/env python3
"""Where a `dpo2d train` step spends its time on the CPU, from a sampling profile.

Runs `perf record` (software cpu-clock event, DWARF call chains) on a short
`dpo2d train --loss dpo` run of the benchmark workload of scripts/bench_trl.sh,
then sorts every sample taken during the optimizer steps (`Trainer::step` on
the main thread; worker threads' samples by the main thread's phase at that
moment) into op kinds by its call chain, and prints a Markdown table: the
share of the steps' wall time x threads in each kind, plus the idle share
(threads x wall seconds - sampled CPU seconds).

    scripts/profile_cpu.py --model DIR [--dpo2d target/release/dpo2d] [--steps 8]

Needs `perf` (Debian: linux-perf). Samples: 99 Hz per thread by default.
"""
import argparse
import bisect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# How a sample is sorted: matrix products by their leaf frames, wherever they
# run; a pool thread waiting for work; then the context the sample ran in
# (the optimizer, the log-probs' own element-wise work); then the kind of
# the first frame from the leaf up that matches.
GEMM = ("matrix products (gemm: linear layers, attention, lm_head)", re.compile(r"gemm|MatMul"))
CONTEXTS = [
    ("optimizer (AdamW, gradient norm)", re.compile(r"kernels::adamw|optim::")),
    ("log-probs (logsumexp, label pick, logit gradient)", re.compile(r"kernels::logprobs|label_logprobs")),
]
KINDS = [
    ("page faults (kernel zeroing fresh pages)", r"clear_page|do_huge_pmd|handle_mm_fault|folio_zero"),
    ("allocator (mimalloc)", r"(^|[^a-z])_?mi_|mi_malloc|mi_free|__rust_alloc|__rust_dealloc"),
    ("RMSNorm", r"kernels::rms_norm|ops::rms_norm"),
    ("RoPE", r"kernels::rope|ops::rope"),
    ("attention softmax", r"kernels::softmax|ops::softmax|masked_softmax"),
    ("SwiGLU", r"kernels::swiglu|silu"),
    ("gradient accumulation (ours)", r"kernels::add"),
    ("copies (memcpy, strided copies, cat)", r"memcpy|memmove|copy_strided|copy2d|Tensor::cat|index_add|index_select"),
    ("other candle element-wise ops and reductions", r"candle_core::cpu_backend|binary_map|unary_map|ReduceIndex|ReduceSum|Affine|memset|cmp|where_cond"),
]
COMPILED = [(k, re.compile(p)) for k, p in KINDS]
# candle's backward gives every tensor of the graph a zeroed gradient buffer
# and adds each incoming gradient to it, on the calling thread; composed
# backward formulas (ops without a fused kernel) land here too.
BACKPROP = "candle element-wise in the backward pass (zeroed gradient buffers, gradient adds, composed backward formulas)"
BACKPROP_LEAF = re.compile(r"binary_map|memset|zeros|unary_map")
# A thread with nothing to do: rayon's and candle's pools waiting for work.
IDLE = ("thread pools waiting for work (spinning, parking)",
        re.compile(r"rayon_core::sleep|wait_until|crossbeam|futex|sched_yield|BarrierPool|spin_loop|__schedule|"
                   r"finish_task_switch|_raw_spin_unlock|do_syscall|entry_SYSCALL|syscall_return|asm_sysvec"))
PLUMBING = re.compile(r"rayon|std::thread|core::ops::function|__clone|start_thread|StackJob|join_context|bridge|plumbing|"
                      r"core::iter|alloc::vec|FnMut|FnOnce")
# Work that rayon ran with our closure inlined into its plumbing, on a pool thread.
POOL_WORK = "fused kernels run by pool threads (closure inlined)"


def classify(frames):
    if any(GEMM[1].search(f) for f in frames[:3]):
        return GEMM[0]
    if frames and IDLE[1].search(frames[0]):
        return IDLE[0]
    text = " ".join(frames)
    if BACKPROP_LEAF.search(frames[0] if frames else "") and "backprop" in text:
        return BACKPROP
    for kind, rx in CONTEXTS:
        if rx.search(text):
            return kind
    for f in frames:
        for kind, rx in COMPILED:
            if rx.search(f):
                return kind
        if IDLE[1].search(f):
            return POOL_WORK
    return POOL_WORK if any(PLUMBING.search(f) for f in frames) else "other"


def parse(script_text):
    """Samples as (tid, time, [frames leaf first])."""
    out = []
    for block in script_text.split("\n\n"):
        lines = [l for l in block.splitlines() if l.strip()]
        if not lines:
            continue
        head = lines[0].split()
        try:
            tid, t = int(head[1]), float(head[2].rstrip(":"))
        except (IndexError, ValueError):
            continue
        frames = [l.strip().split(" ", 1)[1] if " " in l.strip() else l.strip() for l in lines[1:]]
        out.append((tid, t, frames))
    return out


def phase_of(frames):
    text = " ".join(frames)
    if "Trainer::step" in text:
        return "step"
    if "reference::" in text or "Precompute" in text:
        return "reference"
    return "other"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dpo2d", default="target/release/dpo2d")
    ap.add_argument("--data", default="data/train.jsonl")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--freq", type=int, default=99)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-first", action="store_true",
                    help="leave out the first optimizer step (fresh memory, warm-up): steady-state steps only")
    ap.add_argument("--label", default=None, help="column heading (default: the binary's name)")
    ap.add_argument("--dpo2d-arg", action="append", default=[])
    args = ap.parse_args()
    if not shutil.which("perf"):
        sys.exit("error: perf not found (Debian: apt-get install linux-perf)")
    work = Path(tempfile.mkdtemp(prefix="dpo2d-profile-"))
    pairs = work / "pairs.jsonl"
    with open(args.data) as f, open(pairs, "w") as out:
        for _ in range(args.steps * args.batch):
            out.write(f.readline())
    cmd = [args.dpo2d, "train", "--loss", "dpo", "--model", args.model, "--train-file", str(pairs),
           "--output-dir", str(work / "out"), "--cache-dir", str(work / "cache"), "--no-progress",
           "--per-device-train-batch-size", str(args.batch), "--max-steps", str(args.steps),
           "--sft-weight", "0", "--learning-rate", "5e-7", "--train-sampling-strategy", "sequential", *args.dpo2d_arg]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    data = work / "perf.data"
    subprocess.run(["perf", "record", "-q", "-F", str(args.freq), "-e", "cpu-clock", "--call-graph", "dwarf,16384",
                    "-o", str(data), "--", *cmd], env=env, check=True, stdout=subprocess.DEVNULL)
    text = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True, check=True).stdout
    samples = parse(text)
    # The process starts on its main thread: the first sample's thread.
    main_tid = min(samples, key=lambda s: s[1])[0]
    # The main thread's phase over time; other threads take the phase of the
    # main thread's nearest sample.
    timeline = sorted((t, phase_of(fr)) for tid, t, fr in samples if tid == main_tid)
    times = [t for t, _ in timeline]
    step_times = [t for t, p in timeline if p == "step"]
    if not step_times:
        sys.exit("error: no samples in Trainer::step")
    t0, t1 = step_times[0], step_times[-1]
    if args.skip_first:
        # The first step ends with its optimizer update: the main thread's
        # first run of samples in the optimizer.
        opt = CONTEXTS[0][1]
        main = [(t, " ".join(fr)) for tid, t, fr in sorted(samples, key=lambda s: s[1]) if tid == main_tid and t0 <= t]
        i = next((i for i, (_, text) in enumerate(main) if opt.search(text)), None)
        if i is None:
            sys.exit("error: no optimizer samples on the main thread to find the first step's end")
        while i < len(main) and opt.search(main[i][1]):
            i += 1
        if i >= len(main):
            sys.exit("error: the run has one step only; --skip-first needs more")
        t0 = main[i][0]
    counts = Counter()
    for tid, t, frames in samples:
        i = min(bisect.bisect_left(times, t), len(times) - 1)
        if timeline[i][1] != "step" or not (t0 <= t <= t1):
            continue
        counts[classify(frames)] += 1
    wall = t1 - t0
    cpu = sum(counts.values()) / args.freq
    capacity = wall * args.threads
    idle = max(capacity - cpu, 0.0)
    label = args.label or Path(args.dpo2d).name
    steps = args.steps - 1 if args.skip_first else args.steps
    print(f"\n{steps} steps of {args.batch} pairs, {wall:.1f} s of steps, {cpu:.1f} CPU s sampled "
          f"({cpu / wall:.2f} of {args.threads} threads busy), {sum(counts.values())} samples at {args.freq} Hz\n")
    print(f"| op kind | {label}: share of {args.threads} x wall |")
    print("|---|---|")
    for kind, n in counts.most_common():
        print(f"| {kind} | {100 * n / args.freq / capacity:.1f}% |")
    print(f"| idle threads (not sampled) | {100 * idle / capacity:.1f}% |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
