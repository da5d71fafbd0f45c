#!/usr/bin/env python3
"""Reads a dpo2d reward model with transformers, as docs/reward-model.md's
Python sketch does, and compares its rounded predictions with `dpo2d rm
score`'s on the same segments.

    dpo2d rm score --model RM_DIR -i pairs.jsonl -o scored.jsonl
    python3 scripts/rm_python_check.py RM_DIR scored.jsonl

Needs torch and transformers. Prints each differing score and the count of
equal ones; exits non-zero if any differs.
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer


def main() -> None:
    path, scored_file = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(path)
    rm = AutoModelForTokenClassification.from_pretrained(path)

    def predict(prompt_text: str, segments: list[str]) -> list[dict[str, float]]:
        """The docs' sketch: the logits at the last token of each segment."""
        prompt = [{"role": "user", "content": prompt_text}]
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        answer = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "".join(segments)}], tokenize=False)[len(text):]
        enc = tok(text + answer, return_offsets_mapping=True, add_special_tokens=False)
        with torch.no_grad():
            logits = rm(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
        ends, at = [], len(text)
        for i, s in enumerate(segments):
            at += len(s)
            stop = at if i < len(segments) - 1 else len(text + answer)
            ends.append(max(j for j, (a, _) in enumerate(enc["offset_mapping"]) if a < stop))
        return [dict(zip(rm.config.id2label.values(), logits[e].tolist())) for e in ends]

    same = total = 0
    for line in open(scored_file):
        pair = json.loads(line)
        for side in ("chosen", "rejected"):
            segs = pair[side]["segments"]
            for seg, raw in zip(segs, predict(pair["prompt"], [s["text"] for s in segs])):
                for aspect, v in raw.items():
                    # dpo2d rm score's rounding: 0..4, safety pass (4) from 2 up, else 0.
                    got = (4 if v >= 2 else 0) if aspect == "safety" else int(min(4, max(0, round(v))))
                    want = seg["scores"][aspect]
                    total += 1
                    same += got == want
                    if got != want:
                        print(f"differs: {aspect}: transformers {v:.3f} -> {got}, dpo2d {want}")
    print(f"{same}/{total} rounded scores equal")
    sys.exit(0 if same == total else 1)


if __name__ == "__main__":
    main()
