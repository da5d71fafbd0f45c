#!/usr/bin/env python3
"""Side-by-side DPO training speed: `dpo2d train --loss dpo` vs TRL's DPOTrainer.

Both tools run the same workload one after the other on this machine: the
same model (full fine-tuning, f32, CPU), the first STEPS*BATCH pairs of the
data file in file order, the same batch size, maximum lengths, learning rate
and beta, and the same number of optimizer steps. Each tool runs in its own
child process, so its peak resident memory can be read on its own.

Measurement rules (the same for both tools):

* tokens: prompt + chosen + prompt + rejected tokens of every pair, after
  truncation, counted once with the model's tokenizer (transformers) and the
  model's chat template, the way TRL tokenizes a conversational pair. Padding
  is not counted.
* train seconds: the training run without model loading and without saving:
  for TRL the `trainer.train()` call (reference log-probs are computed inside
  every step, because TRL's default is `precompute_ref_log_probs=False`); for
  dpo2d the `train_runtime` it reports, which includes its reference log-prob
  precompute. tokens/s = tokens / train seconds.
* process seconds: wall time of the whole child process (interpreter start,
  imports, model loading, tokenization, training, exit), reported beside it.
* CPU seconds: user + system time of the child (wait4 rusage); tokens per
  CPU second is shown beside tokens/s because it is much less disturbed by
  other jobs competing for the cores.
* peak RSS: the child's maximum resident set size (wait4 rusage).

Run `scripts/bench_trl.sh`, which sets up the Python environment, builds
dpo2d and fetches the model, or call this script directly with --model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (f32 safetensors + tokenizer)")
    p.add_argument("--data", default="data/train.jsonl", help="2-D preference pairs (JSONL)")
    p.add_argument("--dpo2d", default=env.get("DPO2D_BIN", "target/release/dpo2d"), help="dpo2d binary")
    p.add_argument("--steps", type=int, default=int(env.get("STEPS", 30)))
    p.add_argument("--batch", type=int, default=int(env.get("BATCH", 2)))
    p.add_argument("--max-length", type=int, default=int(env.get("MAX_LENGTH", 256)))
    p.add_argument("--max-prompt-length", type=int, default=int(env.get("MAX_PROMPT_LENGTH", 128)))
    p.add_argument("--learning-rate", type=float, default=float(env.get("LR", 5e-7)))
    p.add_argument("--beta", type=float, default=float(env.get("BETA", 0.1)))
    p.add_argument("--threads", type=int, default=int(env.get("THREADS", os.cpu_count() or 1)))
    p.add_argument("--tools", default=env.get("TOOLS", "trl,dpo2d"), help="comma list, run in this order")
    p.add_argument("--workdir", default=env.get("BENCH_DIR", "runs/bench-trl"))
    p.add_argument("--json", default=None, help="result file (default: WORKDIR/results.json)")
    p.add_argument("--dpo2d-arg", action="append", default=[], help="extra argument for dpo2d train (repeatable)")
    # Internal: the TRL child process.
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- pairs ----


def as_messages(prompt) -> list[dict]:
    """A prompt string becomes one user turn; a message list is kept as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError(f"prompt is neither a string nor a list of role/content messages: {prompt!r:.80}")


def response_text(resp) -> str:
    """Concatenate a response's segment texts (they cover the response exactly)."""
    if isinstance(resp, str):
        return resp
    if isinstance(resp, dict) and "segments" in resp:
        return "".join(seg["text"] for seg in resp["segments"])
    if isinstance(resp, dict) and "text" in resp:
        return resp["text"]
    raise ValueError(f"unknown response form: {resp!r:.80}")


def load_pairs(path: Path, n: int) -> tuple[list[str], list[dict]]:
    """The first n lines of the data file (raw, for dpo2d) and TRL's conversational form."""
    raw, trl = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(raw) == n:
                break
            try:
                row = json.loads(line)
                trl.append({
                    "prompt": as_messages(row["prompt"]),
                    "chosen": [{"role": "assistant", "content": response_text(row["chosen"])}],
                    "rejected": [{"role": "assistant", "content": response_text(row["rejected"])}],
                })
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"error: {path}:{lineno}: {e}")
            raw.append(line if line.endswith("\n") else line + "\n")
    if len(raw) < n:
        sys.exit(f"error: {path} has {len(raw)} pairs, the benchmark needs STEPS*BATCH = {n}")
    return raw, trl


def count_tokens(model_dir: str, pairs: list[dict], max_length: int, max_prompt_length: int) -> dict:
    """Count prompt+chosen+prompt+rejected tokens as TRL feeds them.

    TRL tokenizes prompt (with the generation prompt) and prompt+response with
    the chat template, takes the response as the part after the common prefix,
    and truncates prompt+response to max_length keeping the start. TRL 1.x has
    no max_prompt_length; the count of prompts longer than it is reported so a
    difference in truncation between the tools is visible.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def ids(msgs, gen):
        return list(tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"])

    total = prompt_total = response_total = 0
    truncated = long_prompts = 0
    for pair in pairs:
        p = ids(pair["prompt"], True)
        if len(p) > max_prompt_length:
            long_prompts += 1
        for side in ("chosen", "rejected"):
            full = ids(pair["prompt"] + pair[side], False)
            k = 0
            while k < min(len(p), len(full)) and p[k] == full[k]:
                k += 1
            n = len(full)
            if n > max_length:
                truncated += 1
                n = max_length
            total += n
            prompt_total += min(k, n)
            response_total += n - min(k, n)
    return {
        "tokens": total,
        "prompt_tokens": prompt_total,
        "response_tokens": response_total,
        "sequences_truncated": truncated,
        "prompts_over_max_prompt_length": long_prompts,
    }


# ------------------------------------------------------------ processes ----


def run_child(cmd: list[str], log_path: Path, env: dict) -> dict:
    """Run a child process, its output to a log file; wall seconds, exit code and peak RSS."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Linux reports ru_maxrss in KiB.
    # CPU seconds (user + system) are far less sensitive than wall time to
    # other jobs competing for the cores, so they are reported beside it.
    return {
        "returncode": proc.returncode,
        "process_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,
    }


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------ TRL ----


def trl_worker(args: argparse.Namespace) -> None:
    """Child process: train with TRL's DPOTrainer and write timings as JSON."""
    t_start = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    t_imported = time.perf_counter()
    pairs = [json.loads(l) for l in open(args.pairs, encoding="utf-8")]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t_loaded = time.perf_counter()

    config = DPOConfig(
        output_dir=str(Path(args.out).parent / "trl-output"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.learning_rate,
        beta=args.beta,
        max_length=args.max_length,
        # Full fine-tuning in f32 on CPU; TRL's DPOConfig defaults bf16 and
        # gradient checkpointing to on, so both are turned off explicitly.
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=42,
        disable_tqdm=True,
    )
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter())

    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    t_init = time.perf_counter()
    out = trainer.train()
    t_trained = time.perf_counter()

    fed = 0
    for row in trainer.train_dataset:
        for side in ("chosen_ids", "rejected_ids"):
            fed += min(len(row["prompt_ids"]) + len(row[side]), args.max_length)
    result = {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "import_seconds": t_imported - t_start,
        "load_seconds": t_loaded - t_imported,
        "trainer_init_seconds": t_init - t_loaded,
        "train_seconds": t_trained - t_init,
        "train_runtime": out.metrics.get("train_runtime"),
        "global_step": out.global_step,
        "step_seconds": [b - a for a, b in zip([t_init] + step_times[:-1], step_times)],
        "tokens_in_trainer_dataset": fed,
        "pairs_in_trainer_dataset": len(trainer.train_dataset),
        "config": {
            "precompute_ref_log_probs": config.precompute_ref_log_probs,
            "loss_type": list(config.loss_type),
            "optim": str(config.optim),
            "lr_scheduler_type": str(config.lr_scheduler_type),
            "warmup_steps": config.warmup_steps,
            "weight_decay": config.weight_decay,
            "max_grad_norm": config.max_grad_norm,
            "truncation_mode": config.truncation_mode,
            "disable_dropout": config.disable_dropout,
        },
        "log_history": trainer.state.log_history,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


def run_trl(args, workdir: Path, trl_pairs_path: Path, n_pairs: int) -> dict:
    out = workdir / "trl-result.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable, os.path.abspath(__file__), "--trl-worker",
        "--model", args.model, "--pairs", str(trl_pairs_path), "--out", str(out),
        "--steps", str(args.steps), "--batch", str(args.batch),
        "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
        "--learning-rate", repr(args.learning_rate), "--beta", repr(args.beta),
        "--threads", str(args.threads),
    ]
    log = workdir / "trl.log"
    print(f"[bench] TRL DPOTrainer: {args.steps} steps x {args.batch} pairs (log: {log})", flush=True)
    res = run_child(cmd, log, thread_env(args.threads))
    if res["returncode"] != 0 or not out.exists():
        sys.exit(f"error: the TRL run failed (exit {res['returncode']}); last lines of {log}:\n{tail(log)}")
    detail = json.loads(out.read_text())
    if detail["global_step"] != args.steps:
        sys.exit(f"error: TRL ran {detail['global_step']} steps, expected {args.steps}")
    if detail["pairs_in_trainer_dataset"] != n_pairs:
        sys.exit(f"error: TRL kept {detail['pairs_in_trainer_dataset']} of {n_pairs} pairs")
    res.update({
        "tool": "TRL DPOTrainer",
        "train_seconds": detail["train_seconds"],
        "steps": detail["global_step"],
        "detail": detail,
    })
    return res


# ---------------------------------------------------------------- dpo2d ----


def dpo2d_version(binary: str) -> str:
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_dpo2d_results(out_dir: Path) -> dict:
    """dpo2d's own summary: train_results.json, else the last metrics.jsonl record with train_runtime."""
    found: dict = {}
    metrics = out_dir / "metrics.jsonl"
    history = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            if line.strip():
                try:
                    history.append(json.loads(line))
                except ValueError:
                    pass
        for rec in history:
            if "train_runtime" in rec:
                found = rec
    results = out_dir / "train_results.json"
    if results.exists():
        found = {**found, **json.loads(results.read_text())}
    found["_history"] = history
    return found


def run_dpo2d(args, workdir: Path, raw_pairs_path: Path) -> dict:
    if not Path(args.dpo2d).exists():
        sys.exit(f"error: dpo2d binary {args.dpo2d} not found (build it with `cargo build --release`)")
    out_dir = workdir / "dpo2d-output"
    # A fresh cache, so the reference log-probs are computed (and timed) in this run.
    cache_dir = workdir / "dpo2d-cache"
    for d in (out_dir, cache_dir):
        if d.exists():
            shutil.rmtree(d)
    cmd = [
        args.dpo2d, "train", "--loss", "dpo",
        "--model", args.model,
        "--train-file", str(raw_pairs_path),
        "--output-dir", str(out_dir),
        "--cache-dir", str(cache_dir),
        "--no-progress",
        "--per-device-train-batch-size", str(args.batch),
        "--gradient-accumulation-steps", "1",
        "--max-steps", str(args.steps),
        "--max-length", str(args.max_length),
        "--max-prompt-length", str(args.max_prompt_length),
        "--learning-rate", repr(args.learning_rate),
        "--beta", repr(args.beta),
        # TRL's default loss is plain sigmoid DPO, without an SFT term.
        "--sft-weight", "0",
        "--logging-steps", "1",
        "--seed", "42",
        # The same batches as TRL's sequential sampler: the pairs in file order.
        "--train-sampling-strategy", "sequential",
        *args.dpo2d_arg,
    ]
    log = workdir / "dpo2d.log"
    print(f"[bench] dpo2d train --loss dpo: {args.steps} steps x {args.batch} pairs (log: {log})", flush=True)
    res = run_child(cmd, log, thread_env(args.threads))
    if res["returncode"] != 0:
        sys.exit(f"error: the dpo2d run failed (exit {res['returncode']}); command: {' '.join(cmd)}\n"
                 f"last lines of {log}:\n{tail(log)}")
    summary = read_dpo2d_results(out_dir)
    history = summary.pop("_history")
    runtime = summary.get("train_runtime")
    steps = summary.get("global_step") or max((r.get("step", 0) for r in history), default=None)
    res.update({
        "tool": "dpo2d train",
        "command": cmd,
        "steps": steps,
        "detail": {"version": dpo2d_version(args.dpo2d), "summary": summary, "log_history": history},
    })
    if runtime is None:
        # Without dpo2d's own train_runtime the whole process is the only honest figure.
        res["train_seconds"] = res["process_seconds"]
        res["train_seconds_source"] = "process (dpo2d reported no train_runtime)"
    else:
        res["train_seconds"] = float(runtime)
        res["train_seconds_source"] = "dpo2d train_runtime"
    if steps is not None and steps != args.steps:
        sys.exit(f"error: dpo2d ran {steps} steps, expected {args.steps}")
    return res


# ----------------------------------------------------------------- main ----


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": mem_gib, "loadavg_before": os.getloadavg()}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    args = parse_args()
    if args.trl_worker:
        trl_worker(args)
        return
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in tools:
        if t not in ("trl", "dpo2d"):
            sys.exit(f"error: unknown tool {t!r} in --tools (use trl, dpo2d)")
    if not Path(args.model, "config.json").exists():
        sys.exit(f"error: {args.model} is not a Hugging Face model directory (no config.json)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n_pairs = args.steps * args.batch
    raw, trl_pairs = load_pairs(Path(args.data), n_pairs)
    raw_path = workdir / "pairs-2d.jsonl"
    raw_path.write_text("".join(raw), encoding="utf-8")
    trl_path = workdir / "pairs-trl.jsonl"
    trl_path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in trl_pairs), encoding="utf-8")
    counts = count_tokens(args.model, trl_pairs, args.max_length, args.max_prompt_length)
    print(f"[bench] {n_pairs} pairs, {counts['tokens']} tokens (prompt {counts['prompt_tokens']}, "
          f"response {counts['response_tokens']}); truncated sequences: {counts['sequences_truncated']}, "
          f"prompts over max_prompt_length: {counts['prompts_over_max_prompt_length']}", flush=True)

    machine = machine_info()
    results = []
    for t in tools:
        r = run_trl(args, workdir, trl_path, n_pairs) if t == "trl" else run_dpo2d(args, workdir, raw_path)
        if t == "trl" and r["detail"]["tokens_in_trainer_dataset"] != counts["tokens"]:
            print(f"[bench] warning: TRL fed {r['detail']['tokens_in_trainer_dataset']} tokens, "
                  f"counted {counts['tokens']}", flush=True)
        r["loadavg_after"] = loadavg()
        r["pairs"] = n_pairs
        r["tokens"] = counts["tokens"]
        r["tokens_per_second"] = counts["tokens"] / r["train_seconds"]
        r["process_tokens_per_second"] = counts["tokens"] / r["process_seconds"]
        r["tokens_per_cpu_second"] = counts["tokens"] / r["cpu_seconds"]
        results.append(r)

    header = (f"{'tool':<16}{'steps':>6}{'pairs':>6}{'tokens':>8}{'train s':>9}{'tokens/s':>10}{'process s':>11}"
              f"{'CPU s':>8}{'tokens/CPU s':>14}{'peak RSS MiB':>14}")
    print()
    print(header)
    for r in results:
        print(f"{r['tool']:<16}{r['steps'] or 0:>6}{r['pairs']:>6}{r['tokens']:>8}{r['train_seconds']:>9.1f}"
              f"{r['tokens_per_second']:>10.1f}{r['process_seconds']:>11.1f}{r['cpu_seconds']:>8.1f}"
              f"{r['tokens_per_cpu_second']:>14.1f}{r['peak_rss_mib']:>14.0f}")
    ratio = None
    by = {r["tool"]: r for r in results}
    if "TRL DPOTrainer" in by and "dpo2d train" in by:
        d, t = by["dpo2d train"], by["TRL DPOTrainer"]
        ratio = {
            "tokens_per_second": d["tokens_per_second"] / t["tokens_per_second"],
            "process_tokens_per_second": d["process_tokens_per_second"] / t["process_tokens_per_second"],
            "peak_rss": d["peak_rss_mib"] / t["peak_rss_mib"],
            "tokens_per_cpu_second": d["tokens_per_cpu_second"] / t["tokens_per_cpu_second"],
        }
        print(f"\ndpo2d / TRL: tokens/s x{ratio['tokens_per_second']:.2f} (whole process x"
              f"{ratio['process_tokens_per_second']:.2f}, per CPU second x{ratio['tokens_per_cpu_second']:.2f}), "
              f"peak RSS x{ratio['peak_rss']:.2f}")
        target = ratio["tokens_per_second"] >= 1.5 and ratio["peak_rss"] <= 1.0
        print(f"target (>= 1.5x tokens/s, no more peak memory): {'met' if target else 'NOT met'}")
    if "dpo2d train" in by and by["dpo2d train"].get("train_seconds_source", "").startswith("process"):
        print("note: dpo2d reported no train_runtime; its train seconds are the whole process")

    out = {
        "settings": {
            "model": args.model, "data": args.data, "steps": args.steps, "batch": args.batch,
            "pairs": n_pairs, "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
            "learning_rate": args.learning_rate, "beta": args.beta, "threads": args.threads,
        },
        "machine": machine,
        "tokens": counts,
        "results": results,
        "ratio_dpo2d_over_trl": ratio,
    }
    json_path = Path(args.json) if args.json else workdir / "results.json"
    json_path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\n[bench] results written to {json_path}")


if __name__ == "__main__":
    main()
