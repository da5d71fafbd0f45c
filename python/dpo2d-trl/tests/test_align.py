"""Tokenization and segment alignment, on the same tiny tokenizer as dpo2d's
own tests of align.rs (a character-level BPE with a merge that crosses a
sentence boundary, ChatML special tokens and multi-byte characters)."""

import torch

from dpo2d_trl.align import Aligner, fingerprint
from dpo2d_trl.data import Pair, Response, Segment
from dpo2d_trl.trainer import DataCollatorFor2D, tokenized_dataset


def seg(text, h):
    return Segment(text, (h, 4, 4, h, 3))


def pair(chosen, rejected):
    return Pair([{"role": "user", "content": "hi"}], Response("".join(s.text for s in chosen), chosen),
                Response("".join(s.text for s in rejected), rejected))  # fmt: skip


def pieces(tok, ids):
    return [tok.convert_ids_to_tokens(i) for i in ids]


def test_prompt_and_suffix_tokens(tok):
    a = Aligner(tok)
    assert a.suffix == "<|im_end|>\n"
    t, _ = a.pair(0, pair([seg("ab", 4)], [seg("cd", 0)]), 1000, 1000)
    assert pieces(tok, t.prompt)[:1] == ["<|im_start|>"]
    assert t.prompt == tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    # "a", "b", "<|im_end|>", "\n": all labels, all in the only segment.
    assert len(t.chosen.ids) == 4 and t.chosen.ids[2] == 1
    assert t.chosen.token_segments == [0, 0, 0, 0]


def test_boundary_inside_token_goes_to_segment_where_it_starts(tok):
    a = Aligner(tok)
    t, _ = a.pair(0, pair([seg("Ab.", 4), seg(" Tx.", 1)], [seg("c", 0)]), 1000, 1000)
    assert pieces(tok, t.chosen.ids) == ["A", "b", ". T", "x", ".", "<|im_end|>", "\n"]
    assert t.chosen.token_segments == [0, 0, 0, 1, 1, 1, 1]
    # A segment that only holds the tail of a straddling token is dropped.
    t, dropped = a.pair(0, pair([seg("Ab.", 4), seg(" T", 1), seg("x", 2)], [seg("c", 0)]), 1000, 1000)
    assert dropped == 1
    assert t.chosen.token_segments == [0, 0, 0, 1, 1, 1]
    assert t.chosen.scores[1][0] == 2


def test_multibyte_offsets(tok):
    a = Aligner(tok)
    t, _ = a.pair(0, pair([seg("日本.", 4), seg("été", 1), seg("!", 3)], [seg("é", 0)]), 1000, 1000)
    assert pieces(tok, t.chosen.ids) == ["日本", ".", "ét", "é", "!", "<|im_end|>", "\n"]
    assert t.chosen.token_segments == [0, 0, 1, 1, 2, 2, 2]
    assert [s[0] for s in t.chosen.scores] == [4, 1, 3]


def test_truncation_keeps_prompt_end_and_response_start(tok):
    a = Aligner(tok)
    p = pair([seg("abc", 4), seg("def", 1), seg("ghi", 2)], [seg("x", 0)])
    full = a.prompt_ids(p.prompt)
    t, dropped = a.pair(0, p, max_length=8, max_prompt_length=4)
    assert t.prompt_truncated and t.response_truncated
    assert t.prompt == full[-4:]
    assert t.chosen.ids == tok("abcd", add_special_tokens=False)["input_ids"]
    assert t.chosen.token_segments == [0, 0, 0, 1]
    assert [s[0] for s in t.chosen.scores] == [4, 1] and dropped == 1
    assert len(t.rejected.ids) == 3
    _, rep = a.pairs([p, pair([seg("a", 1)], [seg("b", 1)])], 8, 4)
    assert (rep.pairs, rep.truncated_pairs, rep.truncated_responses, rep.dropped_segments) == (2, 2, 1, 1)
    # A prompt that alone fills max_length is cut to half of it.
    t, _ = a.pair(0, p, max_length=6, max_prompt_length=0)
    assert len(t.prompt) == 3 and len(t.chosen.ids) == 3


def test_plain_responses_have_no_segments(tok):
    a = Aligner(tok)
    p = Pair([{"role": "user", "content": "hi"}], Response("ab"), Response("c"))
    t, _ = a.pair(0, p, 1000, 1000)
    assert not t.has_scores and set(t.chosen.token_segments) == {-1}


def test_fingerprint_changes_with_any_token(tok):
    a = Aligner(tok)
    t, _ = a.pairs([pair([seg("ab", 4)], [seg("cd", 0)])], 1000, 1000)
    f = fingerprint(t, [])
    assert len(f) == 16 and f == fingerprint(t, [])
    t[0].chosen.ids[0] += 1
    assert fingerprint(t, []) != f
    assert fingerprint([], t) != fingerprint(t, [])


def test_collator_layout(tok):
    a = Aligner(tok)
    t, _ = a.pairs([pair([seg("ab", 4), seg("c", 1)], [seg("d", 0)]), pair([seg("e", 2)], [seg("fg", 3)])], 1000, 1000)
    ds = tokenized_dataset(t)
    b = DataCollatorFor2D(pad_token_id=1)([ds[0], ds[1]])
    n_prompt = len(t[0].prompt)
    assert b["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    assert b["input_ids"][0, : n_prompt + len(t[0].chosen.ids)].tolist() == t[0].prompt + t[0].chosen.ids
    assert b["input_ids"][2, : n_prompt + len(t[0].rejected.ids)].tolist() == t[0].prompt + t[0].rejected.ids
    assert b["completion_mask"][0].tolist()[: n_prompt + 1] == [0] * n_prompt + [1]
    assert b["segment_ids"][0, n_prompt:].tolist()[: len(t[0].chosen.ids)] == t[0].chosen.token_segments
    assert (b["segment_ids"][0, :n_prompt] == -1).all()
    assert b["segment_counts"].tolist() == [2, 1, 1, 1]
    assert b["segment_scores"][0, 1].tolist() == [1, 4, 4, 1, 3]
    assert b["attention_mask"].sum().item() == sum(p.num_tokens for p in t)
    assert set(DataCollatorFor2D(1, with_segments=False)([ds[0]])) == {"input_ids", "attention_mask", "completion_mask"}
    assert b["input_ids"].dtype == torch.long
