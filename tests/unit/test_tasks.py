"""The built-in task set: seeded, distinct, every family at every level, correct answers,
and readable by the core loader."""

import json
import re
from collections import Counter

import pytest

from pocl_ray import tasks
from pocl_ray.data import build_prompt, load_records, sample_id

FAMILIES = {"copy", "reverse", "sort", "count", "add"}
N = 250  # 10 per (family, level) cell


@pytest.fixture(scope="module")
def records():
    return tasks.generate(N, seed=0)


def test_generate_is_deterministic(records):
    assert tasks.generate(N, seed=0) == records
    other = tasks.generate(N, seed=1)
    assert other != records
    assert len(other) == N


def test_generate_sizes():
    for n in (1, 7, 25, 60):
        assert len(tasks.generate(n, seed=3)) == n
    assert tasks.generate(0) == []


def test_records_are_distinct(records):
    triples = [(r["instruction"], r["context"], r["response"]) for r in records]
    assert len(set(triples)) == N
    ids = [sample_id(build_prompt(r["instruction"], r["context"]), r["response"]) for r in records]
    assert len(set(ids)) == N


def test_every_family_and_level_evenly(records):
    cells = Counter((r["category"], r["level"]) for r in records)
    assert set(cells) == {(f, lvl) for f in FAMILIES for lvl in (1, 2, 3, 4, 5)}
    assert set(cells.values()) == {N // 25}
    # order is shuffled, not grouped by family
    first = [r["category"] for r in records[:25]]
    assert len(set(first)) > 1


def test_dolly_schema_with_level(records):
    for r in records:
        assert set(r) == {"instruction", "context", "response", "category", "level"}
        assert all(isinstance(r[k], str) for k in ("instruction", "context", "response"))
        assert r["instruction"] and r["context"] and r["response"]
        assert r["category"] in FAMILIES
        assert type(r["level"]) is int and 1 <= r["level"] <= 5
        # single spaces between symbols, no outer whitespace
        for k in ("context", "response"):
            assert r[k] == r[k].strip() and "  " not in r[k]


def expected_answer(r: dict) -> str:
    """Each family's answer recomputed from the instruction and context alone."""
    symbols = r["context"].split(" ")
    family = r["category"]
    if family == "copy":
        assert r["instruction"] == "Repeat the letters exactly."
        return " ".join(symbols)
    if family == "reverse":
        assert r["instruction"] == "Write the letters in reverse order."
        return " ".join(symbols[::-1])
    if family == "sort":
        assert r["instruction"] == "Sort the digits from smallest to largest."
        return " ".join(sorted(symbols, key=int))
    if family == "count":
        m = re.fullmatch(r"How many times does the letter ([a-z]) appear\?", r["instruction"])
        assert m, r["instruction"]
        return str(sum(s == m.group(1) for s in symbols))
    assert family == "add" and r["instruction"] == "Add the two numbers."
    m = re.fullmatch(r"(\d+) \+ (\d+)", r["context"])
    assert m, r["context"]
    return str(int(m.group(1)) + int(m.group(2)))


def test_answers_are_correct(records):
    for r in records:
        assert r["response"] == expected_answer(r), r


def test_symbols_and_lengths_by_level(records):
    for r in records:
        symbols, lvl = r["context"].split(" "), r["level"]
        if r["category"] in ("copy", "reverse"):
            assert len(symbols) == lvl + 1
            assert all(len(s) == 1 and "a" <= s <= "z" for s in symbols)
        elif r["category"] == "sort":
            assert len(symbols) == lvl + 1
            assert all(len(s) == 1 and s.isdigit() for s in symbols)
        elif r["category"] == "count":
            assert len(symbols) == 2 * lvl + 1
            assert set(symbols) <= set("abcd")


def test_add_operands_grow_with_level():
    """Level 1 is one digit + one digit, level 5 three digits + three digits, and the operands
    get strictly wider with every level in between."""
    recs = [r for r in tasks.generate(1000, seed=0) if r["category"] == "add"]
    widths: dict[int, set] = {}
    for r in recs:
        a, b = r["context"].split(" + ")
        assert not (len(a) > 1 and a[0] == "0") and not (len(b) > 1 and b[0] == "0")
        widths.setdefault(r["level"], set()).add((len(a), len(b)))
    assert widths[1] == {(1, 1)}
    assert widths[5] == {(3, 3)}
    assert all(len(w) == 1 for w in widths.values()), widths  # one width pair per level
    totals = [sum(next(iter(widths[lvl]))) for lvl in (1, 2, 3, 4, 5)]
    assert all(x < y for x, y in zip(totals, totals[1:])), widths


def test_write_jsonl_then_load_records(records, tmp_path):
    path = tasks.write_jsonl(records, tmp_path / "sub" / "tasks.jsonl")
    assert path == tmp_path / "sub" / "tasks.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    result = load_records(path, on_bad_record="skip")
    assert result.rejected == []
    assert result.n_read == result.n_accepted == N
    for rec, raw in zip(result.records, records):
        assert rec.instruction == raw["instruction"]
        assert rec.input == raw["context"]
        assert rec.references == (raw["response"],)
        assert rec.extra == {"category": raw["category"], "level": raw["level"]}
        assert rec.prompt == build_prompt(raw["instruction"], raw["context"])
    # strict mode accepts them too
    assert load_records(path).n_accepted == N


def test_write_jsonl_keeps_unicode(tmp_path):
    rows = [{"instruction": "Répète ✓", "context": "日本", "response": "ok"}]
    path = tasks.write_jsonl(rows, tmp_path / "u.jsonl")
    assert "✓" in path.read_text(encoding="utf-8")
    assert load_records(path).records[0].instruction == "Répète ✓"


def test_asking_for_more_distinct_tasks_than_exist_raises(monkeypatch):
    # one family at one level: 8 letters, 2 positions -> exactly 64 distinct items
    monkeypatch.setattr(tasks, "FAMILIES", {"copy": tasks._copy})
    monkeypatch.setattr(tasks, "LEVELS", (1,))
    assert len(tasks.generate(64)) == 64
    with pytest.raises(ValueError, match="only 64 distinct"):
        tasks.generate(65)
