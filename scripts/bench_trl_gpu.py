#!/usr/bin/env python3
"""Side-by-side DPO training speed on one GPU: `dpo2d train --device cuda --bf16`
vs TRL's DPOTrainer, on random-weight Qwen2 checkpoints written from config
alone (no download) and the same synthetic pairs.

Workloads (pick with --workloads):

* a: Qwen2-0.5B shape, full fine-tuning, batch 8;
* b: Qwen2-7B shape, LoRA r16 (alpha 32) on q,k,v,o, batch 4;
* tiny: a 2-layer Qwen2 for a dry run of this script (also on a CPU).

Both tools: sigmoid DPO, beta 0.1, the same pairs in file order, the same
batch and number of optimizer steps, bf16 with f32 master weights (TRL:
`bf16=True` on f32 weights for full fine-tuning, bf16 base weights for
LoRA; SDPA attention), gradient checkpointing off for both unless
--gradient-checkpointing (then on for both), TRL's
default of computing the reference log-probs inside every step.

Measured (the same way for both):

* tokens: prompt + chosen + prompt + rejected tokens of every pair through the
  chat template (TRL's way of counting; padding not counted);
* train seconds: TRL's `trainer.train()`; dpo2d's reported `train_runtime`
  (which includes its reference pass). tokens/s = tokens / train seconds;
* peak GPU memory: the process's largest GPU memory as NVML reports it,
  polled every 50 ms (TRL's `torch.cuda.max_memory_reserved` beside it);
* model FLOP/s: 6 x parameters x tokens for full fine-tuning (4 x for LoRA,
  whose frozen weights take no weight gradient) plus the reference forward
  (2 x parameters x tokens), over train seconds; MFU against --peak-tflops.
* the first steps' losses of both tools, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trl as common  # noqa: E402

WORKLOADS = {
    "a": dict(name="Qwen2-0.5B shape, full fine-tuning", batch=8, lora=False,
              config=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "b": dict(name="Qwen2-7B shape, LoRA r16 on q,k,v,o", batch=4, lora=True,
              config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "tiny": dict(name="tiny Qwen2 (dry run)", batch=2, lora=False,
                 config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=5120, tie_word_embeddings=True)),
}
WORDS = 5000
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def parse_args(argv=None):
    env = os.environ
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dpo2d", default=env.get("DPO2D_BIN", "target-cuda/release/dpo2d"), help="dpo2d built with --features cuda")
    p.add_argument("--workloads", default=env.get("WORKLOADS", "a,b"))
    p.add_argument("--steps", type=int, default=int(env.get("STEPS", 20)))
    p.add_argument("--prompt-words", type=int, default=123, help="words per prompt (+5 template tokens: 128)")
    p.add_argument("--response-words", type=int, default=244, help="words per response (+1 end-of-turn token: 245)")
    p.add_argument("--device", default=env.get("DEVICE", "cuda"), help="cuda, or cpu for a dry run")
    p.add_argument("--tools", default=env.get("TOOLS", "trl,dpo2d"))
    p.add_argument("--gradient-checkpointing", action="store_true", default=env.get("GC") == "1",
                   help="recompute activations in backward, in both tools (GC=1)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 peak for MFU (H100/H200 dense: about 790 measured)")
    p.add_argument("--workdir", default=env.get("BENCH_DIR", "runs/bench-trl-gpu"))
    p.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--pairs", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------- checkpoint ----


def write_tokenizer(model_dir: Path) -> None:
    """A word-level tokenizer (w0..w4999, one token per word) with ChatML."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(specials + ["user", "assistant", "system"] + [f"w{i}" for i in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "[UNK]", "bos_token": None, "model_max_length": 4096, "chat_template": CHATML}, indent=1))
    (model_dir / "chat_template.jinja").write_text(CHATML)


def write_checkpoint(model_dir: Path, workload: dict, device: str) -> int:
    """Random Qwen2 weights (bf16 safetensors) from the config; returns the parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (model_dir / "model.safetensors.index.json").exists() or (model_dir / "model.safetensors").exists():
        cfg = json.loads((model_dir / "dpo2d-bench.json").read_text())
        return cfg["parameters"]
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(max_position_embeddings=4096, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      bos_token_id=None, eos_token_id=2, pad_token_id=0, **workload["config"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, max_shard_size="5GB")
    write_tokenizer(model_dir)
    (model_dir / "dpo2d-bench.json").write_text(json.dumps({"parameters": n}))
    del model
    return n


def write_pairs(path: Path, n: int, prompt_words: int, response_words: int) -> None:
    """n synthetic pairs of random words, 2-D format (one segment per response)."""
    import random

    rng = random.Random(0)
    words = lambda k: " ".join(f"w{rng.randrange(WORDS)}" for _ in range(k))  # noqa: E731
    scores = lambda v: {a: (4 if a == "safety" else v) for a in ("helpfulness", "correctness", "safety", "completeness", "clarity")}  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            row = {"id": f"synthetic-{i}", "prompt": words(prompt_words),
                   "chosen": {"segments": [{"text": words(response_words), "scores": scores(4)}]},
                   "rejected": {"segments": [{"text": words(response_words), "scores": scores(1)}]}}
            f.write(json.dumps(row) + "\n")


def load_tokenizer(model_dir):
    """The word-level tokenizer as written (AutoTokenizer would pick Qwen2's own class from config.json)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def count_tokens(model_dir: Path, pairs: list[dict]) -> dict:
    """prompt + chosen + prompt + rejected tokens through the chat template, as TRL feeds them."""
    tok = load_tokenizer(model_dir)
    ids = lambda msgs, gen: tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]  # noqa: E731
    total = prompt = 0
    for pair in pairs:
        p = len(ids(pair["prompt"], True))
        for side in ("chosen", "rejected"):
            total += len(ids(pair["prompt"] + pair[side], False))
            prompt += p
    return {"tokens": total, "prompt_tokens": prompt, "response_tokens": total - prompt}


# ---------------------------------------------------------------- memory ----


class GpuMemory:
    """Largest GPU memory (MiB) of one process, polled with NVML: the process's
    own figure where the driver reports it, else the device's used memory
    above what was in use when the process started (one job at a time)."""

    def __init__(self, pid: int):
        self.pid, self.own, self.device, self._stop = pid, 0.0, 0.0, threading.Event()
        self.util: list[int] = []
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.base = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        except Exception:  # no GPU (dry run)
            self.nvml = None
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self):
        while not self._stop.is_set() and self.nvml:
            try:
                used = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
                self.device = max(self.device, (used - self.base) / 2**20)
                if used - self.base > 2**30:  # the run's work has started (model on the GPU)
                    self.util.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
                for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                    if p.pid == self.pid and p.usedGpuMemory:
                        self.own = max(self.own, p.usedGpuMemory / 2**20)
            except Exception:
                pass
            time.sleep(0.05)

    def stop(self) -> float | None:
        self._stop.set()
        self.thread.join()
        if not self.nvml:
            return None
        return self.own or self.device


def run_child(cmd: list[str], log_path: Path) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        mem = GpuMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    peak = mem.stop()
    util = sum(mem.util) / len(mem.util) if mem.util else None
    return {"returncode": os.waitstatus_to_exitcode(status), "process_seconds": wall,
            "peak_gpu_mib": peak, "mean_gpu_utilization_pct": util, "peak_rss_mib": usage.ru_maxrss / 1024.0}


# ------------------------------------------------------------------- TRL ----


def trl_worker(a) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    gpu = a.device == "cuda"
    pairs = [json.loads(l) for l in open(a.pairs)]
    tok = load_tokenizer(a.model)
    dtype = torch.bfloat16 if (a.lora and gpu) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa")
    peft_config = None
    if a.lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 task_type="CAUSAL_LM")
    config = DPOConfig(
        output_dir=str(Path(a.out).parent / "trl-output"), per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=5e-7, beta=0.1, max_length=1024,
        bf16=gpu, fp16=False, gradient_checkpointing=a.gradient_checkpointing, use_cpu=not gpu, train_sampling_strategy="sequential",
        dataloader_num_workers=0, report_to="none", save_strategy="no", logging_steps=1, seed=42, disable_tqdm=True,
    )
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if gpu:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter())

    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                         peft_config=peft_config, callbacks=[StepTimer()])
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = trainer.train()
    t1 = time.perf_counter()
    Path(a.out).write_text(json.dumps({
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "train_seconds": t1 - t0, "global_step": out.global_step,
        "step_seconds": [y - x for x, y in zip([t0] + step_times[:-1], step_times)],
        "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if gpu else None,
        "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
    }, indent=1))


def run_trl(a, wl: dict, model_dir: Path, trl_pairs: Path, work: Path) -> dict:
    out = work / "trl-result.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", "--model", str(model_dir), "--pairs", str(trl_pairs),
           "--out", str(out), "--steps", str(a.steps), "--batch", str(wl["batch"]), "--device", a.device]
    if wl["lora"]:
        cmd.append("--lora")
    if a.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    print(f"[bench] TRL DPOTrainer: {a.steps} steps x {wl['batch']} pairs", flush=True)
    res = run_child(cmd, work / "trl.log")
    if res["returncode"] != 0 or not out.exists():
        return {**res, "error": common.tail(work / "trl.log")}
    d = json.loads(out.read_text())
    return {**res, "tool": "TRL DPOTrainer", "train_seconds": d["train_seconds"], "losses": d["losses"], "detail": d}


# ----------------------------------------------------------------- dpo2d ----


def run_dpo2d(a, wl: dict, model_dir: Path, raw_pairs: Path, work: Path) -> dict:
    out_dir, cache = work / "dpo2d-output", work / "dpo2d-cache"
    for d in (out_dir, cache):
        shutil.rmtree(d, ignore_errors=True)
    cmd = [a.dpo2d, "train", "--loss", "dpo", "--model", str(model_dir), "--train-file", str(raw_pairs),
           "--output-dir", str(out_dir), "--cache-dir", str(cache), "--no-progress", "--device", a.device,
           "--per-device-train-batch-size", str(wl["batch"]), "--gradient-accumulation-steps", "1",
           "--max-steps", str(a.steps), "--max-length", "1024", "--max-prompt-length", "512",
           "--learning-rate", "5e-7", "--beta", "0.1", "--sft-weight", "0", "--logging-steps", "1", "--seed", "42",
           "--train-sampling-strategy", "sequential", "--pairs-per-forward", str(wl["batch"]),
           "--save-steps", str(10 * a.steps)]
    if a.device == "cuda":
        cmd += ["--bf16", "true"]
    if a.gradient_checkpointing:
        cmd += ["--gradient-checkpointing", "true"]
    if wl["lora"]:
        # TRL's run saves nothing; dpo2d writes the adapter only (no 15 GB merged copy).
        cmd += ["--use-lora", "true", "--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0",
                "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj", "--save-merged", "false"]
    print(f"[bench] dpo2d train --loss dpo: {a.steps} steps x {wl['batch']} pairs", flush=True)
    res = run_child(cmd, work / "dpo2d.log")
    if res["returncode"] != 0:
        return {**res, "error": common.tail(work / "dpo2d.log"), "command": cmd}
    summary = common.read_dpo2d_results(out_dir)
    history = summary.pop("_history")
    return {**res, "tool": "dpo2d train", "train_seconds": float(summary.get("train_runtime") or res["process_seconds"]),
            "losses": [r["loss"] for r in history if "loss" in r and "train_runtime" not in r], "command": cmd}


# ------------------------------------------------------------------ main ----


def bench(a, key: str, root: Path) -> dict:
    wl = WORKLOADS[key]
    work = root / key
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = root / f"model-{key}"
    params = write_checkpoint(model_dir, wl, a.device)
    print(f"[bench] {wl['name']}: {params / 1e6:.0f}M parameters, checkpoint in {time.perf_counter() - t0:.0f} s", flush=True)
    n = a.steps * wl["batch"]
    raw = work / "pairs.jsonl"
    write_pairs(raw, n, a.prompt_words, a.response_words)
    _, trl_pairs = common.load_pairs(raw, n)
    trl_path = work / "pairs-trl.jsonl"
    trl_path.write_text("".join(json.dumps(p) + "\n" for p in trl_pairs))
    tokens = count_tokens(model_dir, trl_pairs)
    runs = {}
    for tool in a.tools.split(","):
        runs[tool] = (run_trl if tool == "trl" else run_dpo2d)(a, wl, model_dir, trl_path if tool == "trl" else raw, work)
    flops_per_token = (4 if wl["lora"] else 6) * params + 2 * params
    for r in runs.values():
        if "train_seconds" in r:
            r["tokens_per_second"] = tokens["tokens"] / r["train_seconds"]
            r["model_tflops"] = flops_per_token * tokens["tokens"] / r["train_seconds"] / 1e12
            r["mfu"] = r["model_tflops"] / a.peak_tflops
    return {"workload": key, "name": wl["name"], "parameters": params, "batch": wl["batch"], "steps": a.steps,
            "tokens": tokens, "runs": runs}


def report(results: list[dict], a) -> str:
    lines = []
    for res in results:
        lines += [f"\n### ({res['workload']}) {res['name']}: {res['parameters'] / 1e6:.0f}M parameters, batch {res['batch']}, "
                  f"{res['steps']} steps, {res['tokens']['tokens']} tokens",
                  "", "| tool | train s | tokens/s | model TFLOP/s | MFU | peak GPU MiB | GPU busy | first losses |", "|---|---|---|---|---|---|---|---|"]
        for tool, r in res["runs"].items():
            if "error" in r:
                lines.append(f"| {tool} | failed | | | | | | |")
                continue
            mem = f"{r['peak_gpu_mib']:,.0f}" if r.get("peak_gpu_mib") else "n/a"
            losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
            busy = f"{r['mean_gpu_utilization_pct']:.0f}%" if r.get("mean_gpu_utilization_pct") is not None else "n/a"
            lines.append(f"| {r['tool']} | {r['train_seconds']:.1f} | {r['tokens_per_second']:,.0f} | {r['model_tflops']:.1f} | "
                         f"{100 * r['mfu']:.1f}% | {mem} | {busy} | {losses} |")
        t, d = res["runs"].get("trl", {}), res["runs"].get("dpo2d", {})
        if "tokens_per_second" in t and "tokens_per_second" in d:
            mem = (f", peak memory {d['peak_gpu_mib'] / t['peak_gpu_mib']:.2f}x"
                   if d.get("peak_gpu_mib") and t.get("peak_gpu_mib") else "")
            lines.append(f"| ratio dpo2d / TRL | | **{d['tokens_per_second'] / t['tokens_per_second']:.2f}x** | | | {mem.lstrip(', ')} | | |")
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    if a.trl_worker:
        return trl_worker(a)
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    gpu = "none"
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    results = []
    for key in a.workloads.split(","):
        results.append(bench(a, key, root))
        (root / "results.json").write_text(json.dumps({"gpu": gpu, "results": results}, indent=1))
        print(report(results[-1:], a), flush=True)
    print(f"\nGPU: {gpu}\n" + report(results, a))


if __name__ == "__main__":
    main()
