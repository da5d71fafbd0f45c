#!/usr/bin/env python3
"""Matrix-product speed, dpo2d (candle + gemm) vs PyTorch, on this machine.

Runs `dpo2d bench --gemm`, which times every f32 product of one training
step of the model (forward and backward, the shapes of SmolLM2 by default)
with the model's own layouts, then times `torch.matmul` on the same shapes
and layouts with the same number of threads, and prints both side by side
with the CPU's peak f32 rate (cores x GHz x FLOP per cycle; 64 for two
AVX-512 FMA units, override with --flops-per-cycle).

    BENCH_VENV=.venv-bench scripts/bench_trl.sh   # once, for the venv with torch
    .venv-bench/bin/python scripts/bench_gemm.py [--dpo2d target/release/dpo2d] [--model smollm2]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time


def torch_seconds(torch, s, min_secs=0.3):
    a = torch.randn(s["batch"], s["m"], s["k"])
    if s["rhs_t"]:
        b = torch.randn(s["batch"], s["n"], s["k"]).transpose(1, 2)
    else:
        b = torch.randn(s["batch"], s["k"], s["n"])
    if s["batch"] == 1:
        a, b = a[0], b[0]
    torch.matmul(a, b)
    t0 = time.perf_counter()
    torch.matmul(a, b)
    once = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int((min_secs / 5) / once + 0.999))
    per_call = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        per_call.append((time.perf_counter() - t) / reps)
    return statistics.median(per_call)


def cpu_ghz():
    try:
        mhz = [float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else None
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dpo2d", default="target/release/dpo2d")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--flops-per-cycle", type=int, default=64, help="f32 FLOP per core per cycle (64: two AVX-512 FMA units)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "gemm.json")
        subprocess.run([args.dpo2d, "bench", "--gemm", "--model", args.model, "--gemm-tokens", str(args.tokens), "--json", out],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        ours = json.load(open(out))
    ghz = cpu_ghz()
    peak = args.threads * ghz * args.flops_per_cycle if ghz else None
    print(f"CPU: {ours['cpu']}, {args.threads} threads, {ghz} GHz nominal; "
          f"peak f32 {peak:.0f} GFLOP/s ({args.flops_per_cycle} FLOP/cycle/core); torch {torch.__version__}\n" if peak else "")
    print("| product | batch x m x k x n | per step | dpo2d GFLOP/s | torch GFLOP/s | dpo2d / torch |")
    print("|---|---|---|---|---|---|")
    tot_f = tot_ours = tot_torch = 0.0
    for row in ours["products"]:
        s = row["shape"]
        flops = 2.0 * s["batch"] * s["m"] * s["k"] * s["n"]
        tt = torch_seconds(torch, s)
        print(f"| {s['name']} | {s['batch']} x {s['m']} x {s['k']} x {s['n']} | {s['count']} | "
              f"{flops / row['seconds'] / 1e9:.1f} | {flops / tt / 1e9:.1f} | {tt / row['seconds']:.2f}x |")
        tot_f += flops * s["count"]
        tot_ours += row["seconds"] * s["count"]
        tot_torch += tt * s["count"]
    print(f"| one step's products, weighted | | | {tot_f / tot_ours / 1e9:.1f} ({tot_ours:.2f} s) | "
          f"{tot_f / tot_torch / 1e9:.1f} ({tot_torch:.2f} s) | {tot_torch / tot_ours:.2f}x |")
    if peak:
        print(f"\nshare of peak: dpo2d {100 * tot_f / tot_ours / 1e9 / peak:.0f}%, torch {100 * tot_f / tot_torch / 1e9 / peak:.0f}%")


if __name__ == "__main__":
    main()
