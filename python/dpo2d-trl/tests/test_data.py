"""The data reader: dpo2d's 2-D pairs and plain TRL pairs, and dpo2d's checks."""

import gzip
import json
from pathlib import Path

import pytest

from dpo2d_trl.data import PLAIN, SCORED, SEGMENTED, InvalidData, load_pairs, parse_pair, require_scored

REPO = Path(__file__).resolve().parents[3]
S4 = {"helpfulness": 4, "correctness": 4, "safety": 4, "completeness": 4, "clarity": 4}


def two_d(**over):
    pair = {
        "id": "p-1",
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": {"segments": [{"text": "It is 4. ", "scores": S4}, {"text": "Simple.", "scores": dict(S4, clarity=3)}]},
        "rejected": {"segments": [{"text": "It is 5.", "scores": dict(S4, correctness=0)}]},
    }
    pair.update(over)
    return pair


def write(tmp_path, rows, name="d.jsonl", gz=False, bom=False):
    text = "".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows)
    if bom:
        text = "\ufeff" + text
    p = tmp_path / name
    p.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return p


def codes(obj, req=PLAIN):
    return sorted(p.code for p in parse_pair(obj, 1, req)[1])


def test_two_d_pair_is_read_with_segments_and_scores():
    pair, problems = parse_pair(two_d(), 3, SCORED)
    assert problems == []
    assert pair.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert pair.chosen.text == "It is 4. Simple."
    assert [s.scores for s in pair.chosen.segments] == [(4, 4, 4, 4, 4), (4, 4, 4, 4, 3)]
    assert pair.rejected.segments[0].scores == (4, 0, 4, 4, 4)
    assert pair.is_scored and pair.line == 3


def test_plain_trl_pair():
    pair, problems = parse_pair({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})
    assert problems == [] and pair.prompt == [{"role": "user", "content": "Hi?"}]
    assert pair.chosen.segments is None and not pair.is_scored
    # The 2-D losses need segments and scores.
    assert codes({"prompt": "Hi?", "chosen": "Hello.", "rejected": "No."}, SCORED) == ["not-segmented", "not-segmented"]
    with pytest.raises(ValueError, match="segment-level 5-aspect scores"):
        require_scored([pair], "2d-dpo")


@pytest.mark.parametrize(
    "over, code",
    [
        ({"prompt": ""}, "empty-prompt"),
        ({"prompt": [{"role": "assistant", "content": "x"}]}, "history-not-ending-with-user"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}]}, "bad-role"),
        ({"prompt": 3}, "wrong-type"),
        ({"id": ""}, "bad-id"),
        ({"chosen": {"segments": []}}, "no-segments"),
        ({"chosen": {"segments": [{"text": "  ", "scores": S4}]}}, "empty-segment"),
        ({"chosen": {"segments": [{"text": "a", "scores": dict(S4, safety=2)}]}}, "safety-not-binary"),
        ({"chosen": {"segments": [{"text": "a", "scores": dict(S4, helpfulness=5)}]}}, "score-out-of-range"),
        ({"chosen": {"segments": [{"text": "a", "scores": dict(S4, helpfulness=2.5)}]}}, "score-not-integer"),
        ({"chosen": {"segments": [{"text": "a", "scores": dict(S4, tone=1)}]}}, "unknown-aspect"),
        ({"chosen": {"segments": [{"text": "a", "scores": {"helpfulness": 1}}]}}, "missing-aspect"),
        ({"chosen": {"segments": [{"text": "a", "scores": S4}, {"text": "b"}]}}, "partly-scored"),
        ({"chosen": {"segments": [{"text": "It is 5.", "scores": S4}]}}, "identical-responses"),
        ({"rejected": None}, "missing-field"),
    ],
)
def test_problems_carry_dpo2d_codes(over, code):
    assert code in codes(two_d(**over))


def test_unscored_segments_are_refused_only_where_scores_are_required():
    obj = two_d(chosen={"segments": [{"text": "a"}]}, rejected={"segments": [{"text": "b"}]})
    assert codes(obj, SEGMENTED) == []
    assert codes(obj, SCORED) == ["unscored", "unscored"]
    # A score of 3.0 is accepted as 3.
    assert codes(two_d(rejected={"segments": [{"text": "x", "scores": dict(S4, clarity=3.0)}]}), SCORED) == []


def test_file_gzip_bom_blank_lines_and_strict_report(tmp_path):
    rows = [two_d(), "", two_d(id="p-2")]
    for kw in ({}, {"gz": True}, {"bom": True}):
        assert len(load_pairs(write(tmp_path, rows, **kw), SCORED).pairs) == 2
    bad = write(tmp_path, [two_d(), two_d(), "{not json", '"x"', two_d(id="p-3", prompt="")])
    with pytest.raises(InvalidData) as e:
        load_pairs(bad, SCORED)
    msg = str(e.value)
    assert "d.jsonl:2: id: 'p-1' was already used on line 1 [duplicate-id]" in msg
    assert "[invalid-json]" in msg and "[not-an-object]" in msg and "[empty-prompt]" in msg
    loaded = load_pairs(bad, SCORED, skip_invalid=True)
    assert len(loaded.pairs) == 1 and len({p.line for p in loaded.skipped}) == 4


def test_shipped_data():
    train = load_pairs(REPO / "data" / "train.jsonl", SCORED).pairs
    held = load_pairs(REPO / "data" / "heldout.jsonl", SCORED).pairs
    assert (len(train), len(held)) == (170, 24)
    assert all(p.is_scored for p in train + held)
    # Segments cover each response exactly.
    assert all(p.chosen.text == "".join(s.text for s in p.chosen.segments) for p in train)
