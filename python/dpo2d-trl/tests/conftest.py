"""Shared fixtures: the tiny tokenizer of dpo2d's own alignment tests (align.rs)."""

import json

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?\n:é日本"
    vocab = {"<|im_start|>": 0, "<|im_end|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    merges = [(".", " "), (". ", "T"), ("é", "t"), ("日", "本"), ("h", "i")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i, s in enumerate(["<|im_start|>", "<|im_end|>"])
        ],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }  # fmt: skip
    t = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>")
    t.chat_template = CHATML
    return t


