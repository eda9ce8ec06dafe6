"""The built-in task set: seeded, distinct, every calibrated (family, level, size) cell
evenly, correct answers, and readable by the core loader."""

import json
import re
from collections import Counter

import pytest

from pocl_ray import tasks
from pocl_ray.data import build_prompt, load_records, sample_id

FAMILIES = {"copy", "reverse", "sort", "count", "add"}
CELLS = len(tasks.level_cells())
N = 10 * CELLS  # 10 per (family, level, size) cell


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


def test_every_cell_evenly(records):
    cells = Counter((r["category"], r["level"], r["size"]) for r in records)
    assert set(cells) == set(tasks.level_cells())
    assert set(cells.values()) == {10}
    assert {r["category"] for r in records} == FAMILIES
    assert {r["level"] for r in records} == {1, 2, 3, 4, 5}
    # order is shuffled, not grouped by family
    first = [r["category"] for r in records[:25]]
    assert len(set(first)) > 1


def test_levels_are_bands_shared_by_families():
    """Every level has several families and every family several levels (the calibrated
    bands of bench/calibrate_tasks.py), and each size has exactly one level in its family."""
    families_per_level = Counter(lvl for levels in tasks.LEVEL_SIZES.values() for lvl in levels)
    assert set(families_per_level) == {1, 2, 3, 4, 5}
    assert min(families_per_level.values()) >= 2
    assert all(len(levels) >= 2 for levels in tasks.LEVEL_SIZES.values())
    for family, levels in tasks.LEVEL_SIZES.items():
        sizes = [s for group in levels.values() for s in group]
        assert len(sizes) == len(set(sizes)), family
        assert set(sizes) <= set(tasks.CALIBRATION_SIZES[family]), family


def test_grid_cells_cover_every_calibration_size():
    cells = tasks.grid_cells()
    assert {(f, s) for f, _, s in cells} == {
        (f, s) for f, sizes in tasks.CALIBRATION_SIZES.items() for s in sizes
    }
    rows = tasks.generate(3 * len(cells), seed=2, cells=cells)
    assert Counter((r["category"], r["size"]) for r in rows) == {(f, s): 3 for f, _, s in cells}


def test_dolly_schema_with_level(records):
    for r in records:
        assert set(r) == {"instruction", "context", "response", "category", "level", "size"}
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


def test_symbols_and_lengths_by_size(records):
    for r in records:
        symbols, size = r["context"].split(" "), r["size"]
        assert size in tasks.LEVEL_SIZES[r["category"]][r["level"]]
        if r["category"] in ("copy", "reverse"):
            assert len(symbols) == size
            assert all(len(s) == 1 and "a" <= s <= "z" for s in symbols)
        elif r["category"] == "sort":
            assert len(symbols) == size
            assert all(len(s) == 1 and s.isdigit() for s in symbols)
        elif r["category"] == "count":
            assert len(symbols) == size
            assert set(symbols) <= set("abcd")


def test_add_operands_have_the_widths_of_their_size():
    recs = [r for r in tasks.generate(1000, seed=0) if r["category"] == "add"]
    for r in recs:
        a, b = r["context"].split(" + ")
        assert not (len(a) > 1 and a[0] == "0") and not (len(b) > 1 and b[0] == "0")
        assert (len(a), len(b)) == tasks.ADD_WIDTHS[r["size"]]
    assert {r["size"] for r in recs} == {s for g in tasks.LEVEL_SIZES["add"].values() for s in g}


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
        assert rec.extra == {"category": raw["category"], "level": raw["level"],
                             "size": raw["size"]}  # fmt: skip
        assert rec.prompt == build_prompt(raw["instruction"], raw["context"])
    # strict mode accepts them too
    assert load_records(path).n_accepted == N


def test_write_jsonl_keeps_unicode(tmp_path):
    rows = [{"instruction": "Répète ✓", "context": "日本", "response": "ok"}]
    path = tasks.write_jsonl(rows, tmp_path / "u.jsonl")
    assert "✓" in path.read_text(encoding="utf-8")
    assert load_records(path).records[0].instruction == "Répète ✓"


def test_asking_for_more_distinct_tasks_than_exist_raises(monkeypatch):
    # one family at one size: 8 letters, 2 positions -> exactly 64 distinct items
    monkeypatch.setattr(tasks, "LEVEL_SIZES", {"copy": {1: (2,)}})
    assert len(tasks.generate(64)) == 64
    with pytest.raises(ValueError, match="only 64 distinct"):
        tasks.generate(65)
