"""Reading preference pairs: dpo2d's 2-D JSONL and plain TRL pairs.

The same files `dpo2d train` reads (docs/data-format.md): one pair per line,
UTF-8, plain or gzip-compressed (recognised from the first bytes), blank lines
and a leading byte order mark ignored. A pair is

    {"id": ..., "prompt": "text" | [{"role", "content"}, ...],
     "chosen": "text" | {"segments": [{"text": ..., "scores": {...}}, ...]},
     "rejected": (same)}

Every line is checked as dpo2d checks it; a problem is reported as
``file:line: place: reason [code]`` with dpo2d's codes. In strict mode every
problem of the file is collected and raised together (:class:`InvalidData`);
with ``skip_invalid`` bad lines are dropped and counted.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

ASPECTS = ("helpfulness", "correctness", "safety", "completeness", "clarity")
ROLES = ("system", "user", "assistant")

# What a data line must carry (dpo2d's `Requirement`).
PLAIN, SEGMENTED, SCORED = "plain", "segmented", "scored"

# dpo2d's default limits (`dpo2d validate --max-segments/--max-chars/--max-prompt-chars`).
MAX_SEGMENTS = 512
MAX_RESPONSE_CHARS = 100_000
MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 256


@dataclass
class Segment:
    text: str
    # Raw 0..4 scores in aspect order, or None for an unscored segment.
    scores: tuple[int, int, int, int, int] | None = None


@dataclass
class Response:
    """Plain text (``segments is None``) or a list of segments."""

    text: str
    segments: list[Segment] | None = None

    @property
    def is_scored(self) -> bool:
        return bool(self.segments) and all(s.scores is not None for s in self.segments)


@dataclass
class Pair:
    prompt: list[dict[str, str]]  # chat messages; a text prompt is one user turn
    chosen: Response
    rejected: Response
    id: Any = None
    line: int = 0  # 1-based line in its file

    @property
    def is_scored(self) -> bool:
        return self.chosen.is_scored and self.rejected.is_scored


@dataclass
class Problem:
    line: int
    code: str
    message: str

    def render(self, path: str) -> str:
        return f"{path}:{self.line}: {self.message} [{self.code}]"


class InvalidData(ValueError):
    """A file with invalid lines (strict mode); ``problems`` lists them all."""

    def __init__(self, path: str, problems: list[Problem], max_listed: int = 20):
        self.path, self.problems = path, problems
        lines = [p.render(path) for p in problems[:max_listed]]
        if len(problems) > max_listed:
            lines.append(f"... and {len(problems) - max_listed} more")
        counts: dict[str, int] = {}
        for p in problems:
            counts[p.code] = counts.get(p.code, 0) + 1
        lines.append("problems by code: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        super().__init__(f"{path}: {len({p.line for p in problems})} invalid line(s)\n" + "\n".join(lines))


@dataclass
class Loaded:
    pairs: list[Pair]
    skipped: list[Problem] = field(default_factory=list)


def _raw_lines(path: str) -> Iterable[tuple[int, bytes]]:
    if path == "-":
        import sys

        stream: Any = sys.stdin.buffer
    else:
        f = open(path, "rb")
        magic = f.read(2)
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f) if magic == b"\x1f\x8b" else f
    for number, raw in enumerate(stream, 1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        yield number, raw.rstrip(b"\r\n")


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


class _Checker:
    def __init__(self, line: int, requirement: str):
        self.line, self.requirement = line, requirement
        self.problems: list[Problem] = []

    def add(self, code: str, message: str) -> None:
        self.problems.append(Problem(self.line, code, message))

    # -- prompt ---------------------------------------------------------
    def prompt(self, v: Any) -> list[dict[str, str]] | None:
        before = len(self.problems)
        if v is None:
            self.add("missing-field", "prompt: missing")
            return None
        if isinstance(v, str):
            if not v.strip():
                self.add("empty-prompt", "prompt: empty")
            self._len("prompt", len(v), MAX_PROMPT_CHARS)
            return [{"role": "user", "content": v}] if len(self.problems) == before else None
        if isinstance(v, list):
            msgs = self._messages(v)
            return msgs if len(self.problems) == before else None
        self.add("wrong-type", f"prompt: must be a string or a list of messages, found {_type_name(v)}")
        return None

    def _messages(self, items: list) -> list[dict[str, str]] | None:
        if not items:
            self.add("empty-prompt", "prompt: empty message list")
            return None
        if len(items) > MAX_MESSAGES:
            self.add("too-many-messages", f"prompt: {len(items)} messages, more than the limit of {MAX_MESSAGES}")
        out, chars = [], 0
        for i, m in enumerate(items):
            at = f"prompt[{i}]"
            if not isinstance(m, dict):
                self.add("wrong-type", f"{at}: a message must be an object with role and content, found {_type_name(m)}")
                continue
            role = self._string(m, at, "role")
            if role is not None and role not in ROLES:
                self.add("bad-role", f"{at}.role: {role!r} is not one of system, user, assistant")
                role = None
            content = self._string(m, at, "content")
            if content is not None and not content.strip():
                self.add("empty-message", f"{at}.content: empty")
                content = None
            if role == "system" and i > 0:
                self.add("bad-role", f"{at}.role: a system message may only come first")
            if role is not None and content is not None:
                chars += len(content)
                out.append({"role": role, "content": content})
        last = items[-1].get("role") if isinstance(items[-1], dict) else None
        if isinstance(last, str) and last != "user":
            self.add(
                "history-not-ending-with-user",
                f"prompt: the history must end with a user turn, the last message is {last!r}",
            )
        self._len("prompt", chars, MAX_PROMPT_CHARS)
        return out

    def _string(self, obj: dict, at: str, key: str) -> str | None:
        v = obj.get(key)
        if isinstance(v, str):
            return v
        if key not in obj:
            self.add("missing-field", f"{at}.{key}: missing")
        else:
            self.add("wrong-type", f"{at}.{key}: must be a string, found {_type_name(v)}")
        return None

    def _len(self, at: str, chars: int, limit: int) -> None:
        if chars > limit:
            self.add("too-long", f"{at}: {chars} characters, more than the limit of {limit}")

    # -- responses ------------------------------------------------------
    def response(self, side: str, v: Any) -> Response | None:
        before = len(self.problems)
        if v is None:
            self.add("missing-field", f"{side}: missing")
            return None
        if isinstance(v, str):
            if not v.strip():
                self.add("empty-response", f"{side}: empty")
            elif self.requirement != PLAIN:
                if self.requirement == SCORED:
                    need = "the 2-D losses need segments with scores (run `dpo2d segment`, then `dpo2d annotate`)"
                else:
                    need = "segments are required (run `dpo2d segment`)"
                self.add("not-segmented", f"{side}: plain text, but {need}")
            self._len(side, len(v), MAX_RESPONSE_CHARS)
            return Response(v) if len(self.problems) == before else None
        if isinstance(v, dict):
            segs = self._segments(side, v)
            if segs is None or len(self.problems) != before:
                return None
            return Response("".join(s.text for s in segs), segs)
        self.add("wrong-type", f"{side}: must be a string or {{\"segments\": [...]}}, found {_type_name(v)}")
        return None

    def _segments(self, side: str, o: dict) -> list[Segment] | None:
        segs = o.get("segments")
        if "segments" not in o:
            self.add("missing-field", f'{side}.segments: missing (a response is a string or {{"segments": [...]}})')
            return None
        if not isinstance(segs, list):
            self.add("wrong-type", f"{side}.segments: must be a list, found {_type_name(segs)}")
            return None
        if not segs:
            self.add("no-segments", f"{side}.segments: empty list")
            return None
        if len(segs) > MAX_SEGMENTS:
            self.add("too-many-segments", f"{side}.segments: {len(segs)} segments, more than the limit of {MAX_SEGMENTS}")
        out, unscored, chars = [], [], 0
        for k, s in enumerate(segs):
            at = f"{side}.segments[{k}]"
            if not isinstance(s, dict):
                self.add("wrong-type", f"{at}: a segment must be an object with text (and scores), found {_type_name(s)}")
                continue
            text = self._string(s, at, "text")
            if text is not None and not text.strip():
                self.add("empty-segment", f"{at}.text: empty or only whitespace")
                text = None
            scores = None
            if s.get("scores") is None:
                unscored.append(k)
            else:
                scores = self._scores(f"{at}.scores", s["scores"])
            if text is not None:
                chars += len(text)
                out.append(Segment(text, scores))
        if unscored and len(unscored) < len(segs):
            self.add("partly-scored", f"{side}: segment(s) {', '.join(map(str, unscored))} have no scores while the others do")
        elif unscored and self.requirement == SCORED:
            self.add(
                "unscored",
                f"{side}: segments have no scores, but the 2-D losses need every segment scored (run `dpo2d annotate`)",
            )
        self._len(side, chars, MAX_RESPONSE_CHARS)
        return out

    def _scores(self, at: str, v: Any) -> tuple[int, int, int, int, int] | None:
        if not isinstance(v, dict):
            self.add("wrong-type", f"{at}: must be an object with the five aspects, found {_type_name(v)}")
            return None
        before = len(self.problems)
        for k in v:
            if k not in ASPECTS:
                self.add(
                    "unknown-aspect",
                    f'{at}: unknown aspect "{k}" (the aspects are helpfulness, correctness, safety, completeness, clarity)',
                )
        out = []
        for a in ASPECTS:
            if a not in v:
                self.add("missing-aspect", f"{at}.{a}: missing")
                continue
            x = v[a]
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                self.add("wrong-type", f"{at}.{a}: must be a number, found {_type_name(x)}")
                continue
            if isinstance(x, float) and not x.is_integer():
                self.add("score-not-integer", f"{at}.{a}: {x} is not a whole number")
                continue
            x = int(x)
            if not 0 <= x <= 4:
                self.add("score-out-of-range", f"{at}.{a}: {x} is outside 0..4")
                continue
            if a == "safety" and x not in (0, 4):
                self.add("safety-not-binary", f"{at}.safety: {x} is not allowed (safety is 0 = fail or 4 = pass)")
                continue
            out.append(x)
        return tuple(out) if len(self.problems) == before else None  # type: ignore[return-value]


def parse_pair(obj: Any, line: int = 0, requirement: str = PLAIN) -> tuple[Pair | None, list[Problem]]:
    """Check one parsed JSON line; the pair, or None and the problems."""
    c = _Checker(line, requirement)
    if not isinstance(obj, dict):
        c.add("not-an-object", f"a line must be a JSON object, found {_type_name(obj)}")
        return None, c.problems
    pid = obj.get("id")
    if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, (str, int, float)):
            c.add("bad-id", f"id: must be a string or a number, found {_type_name(pid)}")
        elif pid == "":
            c.add("bad-id", "id: empty string")
    prompt = c.prompt(obj.get("prompt"))
    chosen = c.response("chosen", obj.get("chosen"))
    rejected = c.response("rejected", obj.get("rejected"))
    if chosen is not None and rejected is not None and chosen.text == rejected.text:
        c.add("identical-responses", "chosen and rejected have the same text (no preference to learn)")
    if c.problems or prompt is None or chosen is None or rejected is None:
        return None, c.problems
    return Pair(prompt, chosen, rejected, pid, line), []


def load_pairs(path: str | os.PathLike, requirement: str = PLAIN, skip_invalid: bool = False) -> Loaded:
    """Every pair of a JSONL file (see the module documentation)."""
    path = os.fspath(path)
    pairs: list[Pair] = []
    problems: list[Problem] = []
    seen_ids: dict[Any, int] = {}
    for number, raw in _raw_lines(path):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(number, "not-utf8", "the line is not UTF-8 text"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(Problem(number, "invalid-json", f"not JSON: {e.msg} at column {e.colno}"))
            continue
        pair, probs = parse_pair(obj, number, requirement)
        if pair is not None and pair.id is not None:
            key = (type(pair.id) is str, pair.id)
            if key in seen_ids:
                probs = [Problem(number, "duplicate-id", f"id: {pair.id!r} was already used on line {seen_ids[key]}")]
                pair = None
            else:
                seen_ids[key] = number
        if pair is None:
            problems.extend(probs)
        else:
            pairs.append(pair)
    if problems and not skip_invalid:
        raise InvalidData(path, problems)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return Loaded(pairs, problems)


def require_scored(pairs: list[Pair], loss_type: str) -> None:
    """The 2-D losses refuse plain or unscored pairs, as `dpo2d train` does."""
    if not all(p.is_scored for p in pairs):
        raise ValueError(
            f"loss_type {loss_type} needs segment-level 5-aspect scores, but the data has plain (TRL-shaped) or "
            "unscored responses; segment and annotate it first (`dpo2d segment`, `dpo2d annotate`), or train with "
            "a response-level loss such as --loss-type dpo"
        )
