#!/usr/bin/env python3
"""The loss and gradient norm of the first training step, computed in float64
and in float32 with transformers, to tell the rounding of two float32 runs
(dpo2d's and the bridge's) from a real difference. Each line gives the
gradient's norm summed in float64 and the norm torch's `clip_grad_norm_`
computes (what transformers logs as `grad_norm`).

    python python/dpo2d-trl/tools/grad_norm_f64.py --model DIR --train-file data/train.jsonl \
        --batch 2 --max-length 256 --max-prompt-length 128

The batch is the first `--batch` pairs of the file (file order, as
`--train-sampling-strategy sequential`); the reference is the starting
policy unless `--ref-model` is given.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo2d_trl.align import Aligner
from dpo2d_trl.data import SCORED, load_pairs
from dpo2d_trl.loss import two_d_loss
from dpo2d_trl.trainer import DataCollatorFor2D, DPO2DTrainer, tokenized_dataset


def token_logps(model, batch, fused: bool) -> torch.Tensor:
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = ids.masked_fill(cm == 0, -100)
    if fused:
        return DPO2DTrainer._token_logps(model, ids, am, labels)
    logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[:, :-1]
    target = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * (target != -100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ref-model")
    p.add_argument("--train-file", required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=512)
    p.add_argument("--loss-type", default="2d-dpo")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--sft-weight", type=float, default=0.1)
    a = p.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    pairs = load_pairs(a.train_file, SCORED).pairs[: a.batch]
    ds = tokenized_dataset(Aligner(tok).pairs(pairs, a.max_length, a.max_prompt_length)[0])
    batch = DataCollatorFor2D(tok.pad_token_id if tok.pad_token_id is not None else 0)([ds[i] for i in range(len(ds))])
    counts, scores = batch["segment_counts"].tolist(), batch["segment_scores"].tolist()
    sc = [[tuple(s) for s in scores[i][: counts[i]]] for i in range(len(counts))]
    seg, mask = batch["segment_ids"][:, 1:], batch["completion_mask"][:, 1:]
    b = len(pairs)
    variants = [(torch.float64, False, "float64, logits"), (torch.float32, False, "float32, logits"), (torch.float32, True, "float32, TRL fused LM head")]
    for dtype, fused, name in variants:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype)
        ref = AutoModelForCausalLM.from_pretrained(a.ref_model, dtype=dtype) if a.ref_model else model
        if fused:
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(model)
            if ref is not model:
                add_fused_lm_head(ref)
        with torch.no_grad():
            ref_lp = token_logps(ref, batch, fused)
        lp = token_logps(model, batch, fused)
        out = two_d_loss(a.loss_type, lp[:b], lp[b:], ref_lp[:b], ref_lp[b:], mask[:b], mask[b:], seg[:b], seg[b:],
                         sc[:b], sc[b:], beta=a.beta, sft_weight=a.sft_weight)  # fmt: skip
        out.loss.backward()
        grads = [q for q in model.parameters() if q.grad is not None]
        norm = torch.sqrt(sum((q.grad.double() ** 2).sum() for q in grads)).item()
        # What transformers logs as grad_norm: torch's clip_grad_norm_, summed in the gradients' dtype.
        logged = torch.nn.utils.clip_grad_norm_(grads, float("inf")).item()
        print(f"{name:<28} loss {out.loss.item():.10f}  grad_norm {norm:.8f} (summed in float64)  "
              f"{logged:.8f} (clip_grad_norm_)", flush=True)


if __name__ == "__main__":
    main()
