"""Tokenization of preference pairs exactly as `dpo2d train` does it
(crates/dpo2d-train/src/align.rs), and the token span of every segment.

* The prompt is rendered with the model's chat template and a generation
  prompt, then encoded without extra special tokens.
* Each response is encoded on its own as ``response text + end-of-turn
  text`` (the template's text after an assistant message, e.g.
  ``"<|im_end|>\\n"``); all of these tokens are labels.
* A token belongs to the segment in which its first character lies (the
  tokenizer's offsets); the end-of-turn tokens belong to the last segment; a
  segment in which no token starts is dropped and the others renumbered.
* Truncation (TRL semantics): the prompt is cut to ``max_prompt_length``
  keeping its end (and, if it alone would fill ``max_length``, further to
  half of ``max_length``); then each response is cut to ``max_length - prompt
  length`` keeping its start; segments left without tokens are dropped.

TRL's own tokenization differs (prompt and completion rendered together and
split at their common prefix, one ``max_length`` cut over the whole
sequence), so it is not used.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from .data import Pair, Response

NO_SEGMENT = -1
_PROBE = "\u0001dpo2d-probe-answer\u0001"


@dataclass
class TokenizedResponse:
    ids: list[int]
    # Segment index of each token into ``scores`` (NO_SEGMENT for plain responses).
    token_segments: list[int]
    # Raw 0..4 scores of each kept segment, in order; empty for plain responses.
    scores: list[tuple[int, int, int, int, int]] = field(default_factory=list)


@dataclass
class TokenizedPair:
    index: int
    prompt: list[int]
    chosen: TokenizedResponse
    rejected: TokenizedResponse
    prompt_truncated: bool = False
    response_truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen.ids) + len(self.rejected.ids)

    @property
    def has_scores(self) -> bool:
        return bool(self.chosen.scores) and bool(self.rejected.scores)


@dataclass
class AlignReport:
    pairs: int = 0
    truncated_pairs: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    dropped_segments: int = 0

    def __str__(self) -> str:
        return (
            f"{self.pairs} pairs tokenized; {self.truncated_pairs} cut to fit (prompts cut: {self.truncated_prompts}, "
            f"responses cut: {self.truncated_responses}); {self.dropped_segments} segments dropped"
        )


def _compact(raw_seg: list[int], scores: list) -> tuple[list[int], list, int]:
    """Renumber segments so that only those owning tokens remain."""
    mapping: dict[int, int] = {}
    kept: list = []
    ids = []
    for s in raw_seg:
        if s not in mapping:
            mapping[s] = len(kept)
            kept.append(scores[s])
        ids.append(mapping[s])
    return ids, kept, len(scores) - len(kept)


def _truncate_response(r: TokenizedResponse, n: int) -> int:
    """Keep the first ``n`` tokens; drop the segments left without tokens."""
    del r.ids[n:]
    del r.token_segments[n:]
    if not r.scores:
        return 0
    used = max((s + 1 for s in r.token_segments if s != NO_SEGMENT), default=0)
    dropped = len(r.scores) - used
    del r.scores[used:]
    return dropped


class Aligner:
    """Tokenizes pairs with one Hugging Face tokenizer and its chat template."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # The `tokenizers` object: ids and offsets exactly as the Rust crate gives them.
        self.backend = tokenizer.backend_tokenizer
        probe = self.render([{"role": "user", "content": "probe question"}, {"role": "assistant", "content": _PROBE}], False)
        at = probe.rfind(_PROBE)
        if at < 0:
            raise ValueError("chat template does not reproduce the assistant message text")
        self.suffix = probe[at + len(_PROBE) :]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, text: str):
        return self.backend.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.encode(self.render(messages, True)).ids)

    def response(self, r: Response) -> tuple[TokenizedResponse, int]:
        """Tokens of a response and the segment each belongs to (before truncation)."""
        if r.segments is None:
            texts, scores = [r.text], [None]
        else:
            texts, scores = [s.text for s in r.segments], [s.scores for s in r.segments]
        scored = bool(texts) and all(s is not None for s in scores)
        bounds, at = [], 0
        for t in texts:
            bounds.append((at, at + len(t)))
            at += len(t)
        body_len = at
        enc = self.encode("".join(texts) + self.suffix)
        ids = list(enc.ids)
        if not ids:
            raise ValueError("response and end-of-turn text tokenize to nothing")
        last = len(texts) - 1
        raw_seg = []
        for start, _ in enc.offsets:
            seg = last
            if start < body_len:
                for k, (a, b) in enumerate(bounds):
                    if a <= start < b:
                        seg = k
                        break
            raw_seg.append(seg)
        if not scored:
            return TokenizedResponse(ids, [NO_SEGMENT] * len(ids), []), 0
        token_segments, kept, dropped = _compact(raw_seg, scores)
        return TokenizedResponse(ids, token_segments, kept), dropped

    def pair(self, index: int, pair: Pair, max_length: int, max_prompt_length: int) -> tuple[TokenizedPair, int]:
        prompt = self.prompt_ids(pair.prompt)
        chosen, d1 = self.response(pair.chosen)
        rejected, d2 = self.response(pair.rejected)
        dropped = d1 + d2
        prompt_truncated = False
        if max_prompt_length > 0 and len(prompt) > max_prompt_length:
            prompt = prompt[len(prompt) - max_prompt_length :]
            prompt_truncated = True
        if len(prompt) + 1 > max_length:
            keep = max(max_length // 2, 1)
            prompt = prompt[len(prompt) - keep :]
            prompt_truncated = True
        room = max_length - len(prompt)
        response_truncated = False
        for side in (chosen, rejected):
            if len(side.ids) > room:
                dropped += _truncate_response(side, room)
                response_truncated = True
        return TokenizedPair(index, prompt, chosen, rejected, prompt_truncated, response_truncated), dropped

    def pairs(self, pairs: list[Pair], max_length: int, max_prompt_length: int) -> tuple[list[TokenizedPair], AlignReport]:
        if max_length < 2:
            raise ValueError("max_length must be at least 2")
        rep = AlignReport()
        out = []
        for i, p in enumerate(pairs):
            try:
                t, dropped = self.pair(i, p, max_length, max_prompt_length)
            except ValueError as e:
                raise ValueError(f"pair {i + 1} (line {p.line}): {e}") from e
            rep.pairs += 1
            rep.truncated_prompts += t.prompt_truncated
            rep.truncated_responses += t.response_truncated
            rep.truncated_pairs += t.prompt_truncated or t.response_truncated
            rep.dropped_segments += dropped
            out.append(t)
        return out, rep


def fingerprint(*sets: list[TokenizedPair]) -> str:
    """dpo2d's data fingerprint (``trainer_state.json``'s ``data_fingerprint``):
    SHA-256 over the token ids of every pair of every set, lengths included,
    first 16 hex digits. Equal fingerprints mean equal prompt, chosen and
    rejected token ids for every pair."""
    h = hashlib.sha256()
    for s in sets:
        h.update(struct.pack("<Q", len(s)))
        for p in s:
            for part in (p.prompt, p.chosen.ids, p.rejected.ids):
                h.update(struct.pack("<Q", len(part)))
                h.update(struct.pack(f"<{len(part)}I", *part))
    return h.hexdigest()[:16]
