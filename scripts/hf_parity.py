#!/usr/bin/env python3
"""Reference values from Hugging Face transformers for the parity test.

Computes, on a Hugging Face model directory (the SmolLM2 directory that
`dpo2d model fetch smollm2` writes), the token ids of a few texts and the
per-token log-probabilities of a few chat conversations, and writes them as
JSON (tests/fixtures/smollm2_parity.json). tests/real_model.rs checks that
dpo2d reproduces them.

    python3 scripts/hf_parity.py --model-dir "$(dpo2d model fetch smollm2)" \
        --gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out tests/fixtures/smollm2_parity.json

With --gguf, the tokenizer that transformers itself rebuilds from the GGUF
file must give the same ids as the directory's tokenizer.json.
Needs: torch, transformers (and gguf for --gguf).
"""
import argparse
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "Hello world! How are you today?",
    "In 2024 there were 366 days; pi is about 3.14159 and 1234567890 has ten digits.",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🚀🎉👍🏽.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "  leading spaces,\n\n\ttabs and\r\nwindows newlines   ",
    "def f(x):\n    return x ** 2  # square\n",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Give me three tips for staying focused while studying."},
     {"role": "assistant", "content": "1. Put your phone in another room.\n2. Work in 25-minute blocks.\n3. Keep water nearby."}],
    [{"role": "user", "content": "Translate 'good morning' into French and German."},
     {"role": "assistant", "content": "French: « Bonjour ». German: „Guten Morgen“."}],
]

PAIRS = [
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Name a prime number larger than 10.", "response": "11 is a prime number larger than 10."},
]


def seq_logprobs(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    out = [0.0] + [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--gguf", help="original GGUF file, to cross-check the tokenizer")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    model.eval()

    if a.gguf:
        ref = AutoTokenizer.from_pretrained(os.path.dirname(a.gguf), gguf_file=os.path.basename(a.gguf))
        for t in TEXTS:
            x = tok(t, add_special_tokens=False).input_ids
            y = ref(t, add_special_tokens=False).input_ids
            if x != y:
                raise SystemExit(f"tokenizer.json and transformers' GGUF tokenizer disagree on {t!r}:\n{x}\n{y}")

    out = {
        "transformers_version": transformers.__version__,
        "tokenize": [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids} for t in TEXTS],
        "chats": [],
        "pairs": [],
    }
    for msgs in CHATS:
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        out["chats"].append({"messages": msgs, "text": text, "ids": ids, "logprobs": seq_logprobs(model, ids)})
    for p in PAIRS:
        prompt = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True)
        pids = tok(prompt, add_special_tokens=False).input_ids
        rids = tok(p["response"], add_special_tokens=False).input_ids
        lps = seq_logprobs(model, pids + rids)
        out["pairs"].append({**p, "response_ids": rids, "response_logprobs": lps[len(pids):]})
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    pids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(pids, max_new_tokens=24, do_sample=False)
    out["greedy"] = {"prompt": msgs[0]["content"], "completion": tok.decode(gen[0][pids.shape[1]:], skip_special_tokens=True)}

    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
