"""`python -m dpo2d_trl`: train with dpo2d's losses on TRL, check tokenization, compare runs.

    python -m dpo2d_trl train --model DIR --train-file data/train.jsonl --loss-type 2d-dpo ...
    python -m dpo2d_trl tokenize --model DIR --train-file data/train.jsonl   # report + dpo2d's data fingerprint
    python -m dpo2d_trl compare RUN_A/metrics.jsonl RUN_B/metrics.jsonl --steps 1 --rtol 1e-4

`train` takes `dpo2d train`'s option names (kebab or underscore spelling)
for the options both have, and runs under `torchrun` and `accelerate launch`
(DeepSpeed and FSDP come from accelerate's config file, or `--deepspeed`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from typing import Any

# dpo2d's defaults (crates/dpo2d-train/src/config.rs) for the options the bridge has.
DEFAULTS: dict[str, Any] = {
    "model": None,
    "ref_model": None,
    "train_file": None,
    "eval_file": None,
    "eval_split": 0.0,
    "output_dir": "runs/train-trl",
    "loss_type": "2d-dpo",
    "beta": 0.1,
    "sft_weight": 0.1,
    "aspect_weights": [0.3, 0.4, 0.1, 0.1, 0.1],
    "label_smoothing": 0.0,
    "learning_rate": 1e-6,
    "lr_scheduler_type": "linear",
    "warmup_ratio": 0.0,
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 3.0,
    "max_steps": 0,
    "seed": 42,
    "train_sampling_strategy": "random",
    "max_length": 1024,
    "max_prompt_length": 512,
    "logging_steps": 10,
    "eval_steps": 0,
    "save_steps": 500,
    "save_total_limit": 0,
    "save_merged": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "use_lora": False,
    "lora_r": 16,
    "lora_alpha": 32.0,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "skip_invalid": False,
}
# dpo2d options a config file may hold that the bridge does not use (ignored with a note).
IGNORED = {"task", "pairs_per_forward", "precompute_ref_log_probs", "skip_nonfinite_updates", "simpo_gamma", "tdpo_alpha"}
# dpo2d loss name -> TRL's DPOTrainer loss_type (the others are dpo2d's own or not in DPOTrainer).
TRL_LOSSES = {"dpo": "sigmoid", "ipo": "ipo"}
TRL_NATIVE = {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
}  # fmt: skip
NOT_IN_DPOTRAINER = {"kto", "orpo", "simpo", "tdpo1", "tdpo2"}
SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _weights(parts: list[str]) -> list[float]:
    vals = [p for s in parts for p in s.replace(",", " ").split()]
    try:
        return [float(v) for v in vals]
    except ValueError as e:
        raise SystemExit(f"error: --aspect-weights: {e}")


def _targets(v) -> list[str]:
    names = v if isinstance(v, list) else [x for x in str(v).replace(" ", ",").split(",") if x]
    if names == ["all-linear"]:
        return ["all-linear"]
    return [SHORT_TARGETS.get(n, n) for n in names]


def _flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """One option under dpo2d's kebab spelling and TRL's underscore spelling."""
    dest = name.replace("-", "_")
    spellings = [f"--{name}"] + ([f"--{dest}"] if dest != name else [])
    p.add_argument(*spellings, dest=dest, default=None, **kw)


def train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a policy with 2D-DPO (or a TRL loss) on TRL", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="TOML file with dpo2d training options (same names as the flags, underscores)")
    _flag(p, "model", help="policy: a Hugging Face model directory or hub id")
    _flag(p, "ref-model", help="reference model (default: a frozen copy of the starting policy)")
    _flag(p, "train-file", help="training pairs (dpo2d JSONL, 2-D or plain)")
    _flag(p, "eval-file", help="held-out pairs")
    _flag(p, "eval-split", type=float, help="share of the training pairs held out when no eval file (seeded as dpo2d)")
    _flag(p, "output-dir")
    p.add_argument("--loss-type", "--loss_type", "--loss", dest="loss_type", default=None,
                   help="2d-dpo, 1d-dpo (dpo2d's), dpo, ipo, or a TRL DPOTrainer loss_type")  # fmt: skip
    _flag(p, "beta", type=float)
    _flag(p, "sft-weight", type=float, help="weight of the SFT term on the chosen response")
    _flag(p, "aspect-weights", nargs="+", help="five weights: helpfulness,correctness,safety,completeness,clarity")
    _flag(p, "label-smoothing", type=float)
    _flag(p, "learning-rate", type=float)
    _flag(p, "lr-scheduler-type", choices=["cosine", "linear", "constant", "constant_with_warmup"])
    _flag(p, "warmup-ratio", type=float)
    _flag(p, "warmup-steps", type=int)
    _flag(p, "weight-decay", type=float)
    _flag(p, "adam-beta1", type=float)
    _flag(p, "adam-beta2", type=float)
    _flag(p, "adam-epsilon", type=float)
    _flag(p, "max-grad-norm", type=float)
    _flag(p, "per-device-train-batch-size", type=int)
    _flag(p, "per-device-eval-batch-size", type=int)
    _flag(p, "gradient-accumulation-steps", type=int)
    _flag(p, "num-train-epochs", type=float)
    _flag(p, "max-steps", type=int, help="optimizer updates (wins over num_train_epochs when > 0)")
    _flag(p, "seed", type=int)
    _flag(p, "train-sampling-strategy", choices=["random", "sequential"])
    _flag(p, "max-length", type=int)
    _flag(p, "max-prompt-length", type=int)
    _flag(p, "logging-steps", type=int)
    _flag(p, "eval-steps", type=int)
    _flag(p, "save-steps", type=int)
    _flag(p, "save-total-limit", type=int)
    _flag(p, "save-merged", type=_bool, nargs="?", const=True)
    _flag(p, "bf16", type=_bool, nargs="?", const=True)
    _flag(p, "gradient-checkpointing", type=_bool, nargs="?", const=True)
    _flag(p, "use-lora", type=_bool, nargs="?", const=True)
    _flag(p, "lora-r", type=int)
    _flag(p, "lora-alpha", type=float)
    _flag(p, "lora-dropout", type=float)
    _flag(p, "lora-target-modules", help="comma-separated, e.g. q_proj,v_proj or all-linear")
    _flag(p, "skip-invalid", type=_bool, nargs="?", const=True)
    # Run options (not part of the configuration), as dpo2d train's.
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from the latest checkpoint in output_dir, or PATH")
    p.add_argument("--overwrite-output-dir", "--overwrite_output_dir", action="store_true")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available); under torchrun/accelerate each rank takes its LOCAL_RANK GPU")
    p.add_argument("--no-progress", action="store_true")
    # Engine options the bridge adds.
    p.add_argument("--torch-dtype", "--torch_dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="dtype the weights are loaded in (float32: f32 master weights, bf16 autocast with --bf16)")  # fmt: skip
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (or use `accelerate launch --config_file`)")
    p.add_argument("--report-to", "--report_to", default="none", help="transformers' report_to (none, wandb, tensorboard, ...)")
    p.add_argument("--attn-implementation", "--attn_implementation", default=None, help="e.g. sdpa, flash_attention_2")
    return p


def resolve(ns: argparse.Namespace) -> dict[str, Any]:
    """defaults < --config file < flags; checks the values."""
    opts = dict(DEFAULTS)
    if ns.config:
        import tomllib

        with open(ns.config, "rb") as f:
            table = tomllib.load(f)
        for k, v in table.items():
            if k in IGNORED:
                print(f"note: {ns.config}: option {k!r} is dpo2d's own and not used by the TRL bridge", file=sys.stderr)
            elif k not in opts:
                raise SystemExit(f"error: {ns.config}: unknown option {k!r}")
            else:
                opts[k] = v
    for k in DEFAULTS:
        v = getattr(ns, k, None)
        if v is not None:
            opts[k] = v
    if isinstance(opts["aspect_weights"], (list, tuple)) and opts["aspect_weights"] and isinstance(opts["aspect_weights"][0], str):
        opts["aspect_weights"] = _weights(opts["aspect_weights"])
    opts["lora_target_modules"] = _targets(opts["lora_target_modules"])
    lt = opts["loss_type"]
    if lt in NOT_IN_DPOTRAINER:
        raise SystemExit(
            f"error: loss_type {lt} is not a loss of TRL's DPOTrainer; train it with `dpo2d train --loss-type {lt}` "
            "(or TRL's own trainer for it)"
        )
    if lt not in ("2d-dpo", "1d-dpo") and lt not in TRL_LOSSES and lt not in TRL_NATIVE:
        raise SystemExit(f"error: unknown loss type {lt!r}; expected 2d-dpo, 1d-dpo, dpo, ipo or a TRL DPOTrainer loss_type")
    if lt == "dpo" and opts["label_smoothing"] > 0:
        raise SystemExit("error: TRL's sigmoid loss has no label smoothing; use --loss-type robust (TRL's) for it")
    if not opts["model"]:
        raise SystemExit("error: --model is required (a Hugging Face model directory)")
    if not opts["train_file"]:
        raise SystemExit("error: no training data: set train_file (--train-file)")
    if opts["per_device_train_batch_size"] < 1 or opts["gradient_accumulation_steps"] < 1:
        raise SystemExit("error: per_device_train_batch_size and gradient_accumulation_steps must be at least 1")
    if not 0.0 <= opts["eval_split"] < 1.0:
        raise SystemExit(f"error: eval_split must be in [0, 1), got {opts['eval_split']}")
    if opts["max_steps"] == 0 and opts["num_train_epochs"] <= 0:
        raise SystemExit("error: set max_steps or num_train_epochs to a positive value")
    return opts


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _claim_output_dir(out: str, overwrite: bool, resuming: bool) -> None:
    """As dpo2d: a fresh run refuses a directory with an earlier run's outputs, unless told to replace them."""
    if resuming or not os.path.isdir(out):
        return
    old = [n for n in os.listdir(out) if n.startswith("checkpoint-") or n in ("final", "metrics.jsonl", "train_results.json")]
    if not old:
        return
    if not overwrite:
        raise SystemExit(
            f"error: output_dir {out} already holds a training run ({', '.join(sorted(old))}); continue it with --resume, "
            "choose another --output-dir, or replace it with --overwrite-output-dir"
        )
    if _is_main():
        for n in old:
            p = os.path.join(out, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def _latest_checkpoint(out: str) -> str | None:
    steps = []
    for n in os.listdir(out) if os.path.isdir(out) else []:
        if n.startswith("checkpoint-") and n[len("checkpoint-") :].isdigit():
            steps.append((int(n[len("checkpoint-") :]), os.path.join(out, n)))
    return max(steps)[1] if steps else None


def _trim_metrics(path: str, step: int) -> None:
    """On resume, metrics.jsonl keeps the records up to the checkpoint's step (as dpo2d does)."""
    if not os.path.isfile(path):
        return
    keep = [l for l in open(path, encoding="utf-8") if l.strip() and json.loads(l).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(keep)


def cmd_train(ns: argparse.Namespace) -> int:
    opts = resolve(ns)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import PLAIN, SCORED, load_pairs
    from .sampler import split_held_out
    from .trainer import DPO2DConfig, DPO2DTrainer, dpo2d_readable_config

    out = opts["output_dir"]
    resume = None
    if ns.resume:
        resume = _latest_checkpoint(out) if ns.resume == "latest" else ns.resume
        if resume is None:
            raise SystemExit(f"error: --resume: no checkpoint-* in {out}")
    _claim_output_dir(out, ns.overwrite_output_dir, resume is not None)
    os.makedirs(out, exist_ok=True)

    two_d = opts["loss_type"] in ("2d-dpo", "1d-dpo")
    requirement = SCORED if two_d else PLAIN
    loaded = load_pairs(opts["train_file"], requirement, opts["skip_invalid"])
    train_pairs, eval_pairs = loaded.pairs, []
    if loaded.skipped and _is_main():
        print(f"warning: skipped {len({p.line for p in loaded.skipped})} invalid line(s) of {opts['train_file']}", file=sys.stderr)
    if opts["eval_file"]:
        eval_pairs = load_pairs(opts["eval_file"], requirement, opts["skip_invalid"]).pairs
    elif opts["eval_split"] > 0:
        train_pairs, eval_pairs = split_held_out(train_pairs, opts["eval_split"], opts["seed"])

    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_cpu = device == "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[ns.torch_dtype]
    load_kw: dict[str, Any] = {"dtype": dtype}
    if ns.attn_implementation:
        load_kw["attn_implementation"] = ns.attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(opts["model"])
    model = AutoModelForCausalLM.from_pretrained(opts["model"], **load_kw)
    ref_model = AutoModelForCausalLM.from_pretrained(opts["ref_model"], **load_kw) if opts["ref_model"] else None

    peft_config = None
    if opts["use_lora"]:
        from peft import LoraConfig

        targets = opts["lora_target_modules"]
        peft_config = LoraConfig(
            r=opts["lora_r"],
            lora_alpha=opts["lora_alpha"],
            lora_dropout=opts["lora_dropout"],
            target_modules="all-linear" if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )

    lt = opts["loss_type"]
    trl_loss: dict[str, Any] = {}
    if not two_d:
        name = TRL_LOSSES.get(lt, lt)
        if opts["sft_weight"] > 0:
            trl_loss = {"loss_type": [name, "sft"], "loss_weights": [1.0, opts["sft_weight"]]}
        else:
            trl_loss = {"loss_type": [name]}
    has_eval = bool(eval_pairs)
    config = DPO2DConfig(
        output_dir=out,
        dpo2d_loss=lt if two_d else None,
        beta=opts["beta"],
        sft_weight=opts["sft_weight"],
        aspect_weights=opts["aspect_weights"],
        label_smoothing=opts["label_smoothing"],
        learning_rate=opts["learning_rate"],
        lr_scheduler_type=opts["lr_scheduler_type"],
        # transformers 5: one field, steps (>= 1) or a ratio of the run (< 1), as dpo2d's two.
        warmup_steps=opts["warmup_steps"] if opts["warmup_steps"] > 0 else opts["warmup_ratio"],
        weight_decay=opts["weight_decay"],
        adam_beta1=opts["adam_beta1"],
        adam_beta2=opts["adam_beta2"],
        adam_epsilon=opts["adam_epsilon"],
        max_grad_norm=opts["max_grad_norm"],
        per_device_train_batch_size=opts["per_device_train_batch_size"],
        per_device_eval_batch_size=opts["per_device_eval_batch_size"],
        gradient_accumulation_steps=opts["gradient_accumulation_steps"],
        num_train_epochs=opts["num_train_epochs"],
        max_steps=opts["max_steps"] if opts["max_steps"] > 0 else -1,
        seed=opts["seed"],
        train_sampling_strategy=opts["train_sampling_strategy"],
        max_length=opts["max_length"],
        max_prompt_length=opts["max_prompt_length"],
        logging_steps=opts["logging_steps"],
        eval_strategy="steps" if has_eval and opts["eval_steps"] > 0 else "no",
        eval_steps=opts["eval_steps"] if opts["eval_steps"] > 0 else None,
        eval_on_start=has_eval,
        save_strategy="steps" if opts["save_steps"] > 0 else "no",
        save_steps=opts["save_steps"] if opts["save_steps"] > 0 else 500,
        save_total_limit=opts["save_total_limit"] or None,
        bf16=opts["bf16"],
        **_checkpointing(DPO2DConfig, opts["gradient_checkpointing"]),
        use_cpu=use_cpu,
        deepspeed=ns.deepspeed,
        report_to=ns.report_to,
        disable_tqdm=ns.no_progress,
        dataloader_num_workers=0,
        # As dpo2d: reference log-probs computed once before training where the loss allows
        # (TRL keeps sequence sums, which its own losses need; the 2-D losses need them per token).
        precompute_ref_log_probs=not two_d,
        **trl_loss,
    )
    trainer = DPO2DTrainer(
        model,
        ref_model=ref_model,
        args=config,
        train_dataset=train_pairs,
        eval_dataset=eval_pairs or None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if _is_main():
        with open(os.path.join(out, "dpo2d_trl_config.json"), "w", encoding="utf-8") as f:
            json.dump(opts, f, indent=2)
        if resume:
            state = json.load(open(os.path.join(resume, "trainer_state.json"), encoding="utf-8"))
            _trim_metrics(os.path.join(out, "metrics.jsonl"), int(state.get("global_step", 0)))
        elif os.path.exists(os.path.join(out, "metrics.jsonl")):
            os.remove(os.path.join(out, "metrics.jsonl"))
    trainer.accelerator.wait_for_everyone()
    result = trainer.train(resume_from_checkpoint=resume)
    if has_eval and not (opts["eval_steps"] > 0 and trainer.state.global_step % opts["eval_steps"] == 0):
        trainer.evaluate()
    final = os.path.join(out, "final")
    trainer.save_model(final)
    trainer.save_metrics("train", result.metrics)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        dpo2d_readable_config(final)
        if opts["use_lora"] and opts["save_merged"]:
            _save_merged(opts["model"], final, os.path.join(final, "merged"), tokenizer)
            dpo2d_readable_config(os.path.join(final, "merged"))
    if _is_main():
        print(f"trained model: {final}")
    return 0


def _checkpointing(config_class, on: bool) -> dict[str, bool]:
    """transformers 5 calls it `activation_checkpointing` (`gradient_checkpointing` is a deprecated alias)."""
    fields = getattr(config_class, "__dataclass_fields__", {})
    return {"activation_checkpointing": on} if "activation_checkpointing" in fields else {"gradient_checkpointing": on}


def _save_merged(base: str, adapter_dir: str, out: str, tokenizer) -> None:
    """The adapters merged into the base weights (`final/merged/`), loaded afresh
    on the CPU so that it works whatever sharded the training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)


def cmd_tokenize(ns: argparse.Namespace) -> int:
    """Tokenize as `dpo2d train` does; print the report and dpo2d's data fingerprint."""
    from transformers import AutoTokenizer

    from .align import Aligner, fingerprint
    from .data import PLAIN, SCORED, load_pairs
    from .sampler import split_held_out

    req = SCORED if ns.loss_type in ("2d-dpo", "1d-dpo") else PLAIN
    a = Aligner(AutoTokenizer.from_pretrained(ns.model))
    train = load_pairs(ns.train_file, req, ns.skip_invalid).pairs
    evals = load_pairs(ns.eval_file, req, ns.skip_invalid).pairs if ns.eval_file else []
    if not ns.eval_file and ns.eval_split > 0:
        train, evals = split_held_out(train, ns.eval_split, ns.seed)
    t, rep = a.pairs(train, ns.max_length, ns.max_prompt_length)
    print(f"train: {rep}")
    e, rep = a.pairs(evals, ns.max_length, ns.max_prompt_length) if evals else ([], None)
    if rep:
        print(f"eval: {rep}")
    print(f"data_fingerprint: {fingerprint(t, e)}")
    if ns.dump:
        with open(ns.dump, "w", encoding="utf-8") as f:
            for p in t + e:
                f.write(json.dumps({"index": p.index, "prompt": p.prompt, "chosen": p.chosen.ids, "rejected": p.rejected.ids,
                                    "chosen_segments": p.chosen.token_segments, "rejected_segments": p.rejected.token_segments}) + "\n")  # fmt: skip
    return 0


def _read_metrics(path: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for line in open(path, encoding="utf-8"):
        if line.strip():
            r = json.loads(line)
            if any(k.startswith("eval_") for k in r):
                continue
            out.setdefault(int(r["step"]), {}).update(r)
    return out


COMPARED = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "nll_loss", "segments/pairs", "grad_norm"]  # fmt: skip


def close(a: float, b: float, rtol: float, atol: float) -> bool:
    return abs(a - b) <= max(rtol * max(abs(a), abs(b)), atol)


def cmd_compare(ns: argparse.Namespace) -> int:
    """Compare the training records of two metrics.jsonl files step by step."""
    a, b = _read_metrics(ns.a), _read_metrics(ns.b)
    keys = ns.keys.split(",") if ns.keys else COMPARED
    steps = [int(s) for s in ns.steps.split(",")] if ns.steps else sorted(set(a) & set(b))
    failed = 0
    print(f"{'step':>4}  {'metric':<20} {'A':>16} {'B':>16} {'|A-B|/max':>10}")
    for s in steps:
        if s not in a or s not in b:
            print(f"step {s}: missing in {'A' if s not in a else 'B'}")
            failed += 1
            continue
        for k in keys:
            if k not in a[s] or k not in b[s]:
                continue
            x, y = float(a[s][k]), float(b[s][k])
            rel = abs(x - y) / max(abs(x), abs(y)) if max(abs(x), abs(y)) > 0 else 0.0
            ok = close(x, y, ns.rtol, ns.atol) and math.isfinite(x) and math.isfinite(y)
            failed += not ok
            print(f"{s:>4}  {k:<20} {x:>16.8g} {y:>16.8g} {rel:>10.2e}{'' if ok else '  <-- over tolerance'}")
    print(f"{'FAILED' if failed else 'OK'}: {failed} value(s) over rtol {ns.rtol:g} (atol {ns.atol:g})")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpo2d_trl", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    train_parser(sub)
    t = sub.add_parser("tokenize", help="tokenize as dpo2d train does; print the report and the data fingerprint")
    t.add_argument("--model", required=True)
    t.add_argument("--train-file", "--train_file", required=True)
    t.add_argument("--eval-file", "--eval_file")
    t.add_argument("--eval-split", "--eval_split", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--loss-type", "--loss_type", "--loss", default="2d-dpo")
    t.add_argument("--max-length", "--max_length", type=int, default=1024)
    t.add_argument("--max-prompt-length", "--max_prompt_length", type=int, default=512)
    t.add_argument("--skip-invalid", "--skip_invalid", type=_bool, nargs="?", const=True, default=False)
    t.add_argument("--dump", help="write every tokenized pair (ids and segment ids) as JSONL")
    c = sub.add_parser("compare", help="compare two metrics.jsonl files step by step")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--steps", help="comma-separated steps (default: all steps both have)")
    c.add_argument("--keys", help=f"comma-separated metrics (default: {','.join(COMPARED)})")
    c.add_argument("--rtol", type=float, default=1e-4)
    c.add_argument("--atol", type=float, default=1e-6, help="absolute floor for values near 0")
    ns = p.parse_args(argv)
    return {"train": cmd_train, "tokenize": cmd_tokenize, "compare": cmd_compare}[ns.cmd](ns)


if __name__ == "__main__":
    sys.exit(main())
