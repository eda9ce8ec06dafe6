"""Rank fusion and stage partition, against hand-worked numbers and a naive formulation."""

from fractions import Fraction
from itertools import pairwise

import numpy as np
import pandas as pd
import pytest

from pocl_ray.difficulty import SIGNAL_DIRECTION, assign_stages, fuse, stage_sizes


def hand_table() -> pd.DataFrame:
    # Rows deliberately not in id order. rouge ties a/c, nll ties b/d.
    return pd.DataFrame(
        {
            "sample_id": ["c", "a", "d", "b"],
            "rouge": [0.5, 0.5, 0.9, 0.2],
            "nll": [3.0, 1.0, 2.0, 2.0],
            "extra": ["x", "y", "z", "w"],
        }
    )


def test_fuse_hand_worked_example_with_ties():
    out = fuse(hand_table(), ["rouge", "nll"], k=60)
    # rouge, higher = easier: d (0.9) = 1; a, c (0.5) share ranks 2, 3 -> 2.5; b (0.2) = 4.
    assert out["rank_rouge"].tolist() == [2.5, 2.5, 1.0, 4.0]
    # nll, lower = easier: a (1.0) = 1; b, d (2.0) share ranks 2, 3 -> 2.5; c (3.0) = 4.
    assert out["rank_nll"].tolist() == [4.0, 1.0, 2.5, 2.5]
    # c: 1/62.5 + 1/64 = 0.016 + 0.015625; a: 1/62.5 + 1/61; d: 1/61 + 1/62.5; b: 1/64 + 1/62.5.
    expected_rrf = [0.031625, 0.016 + 1 / 61, 1 / 61 + 0.016, 0.031625]
    np.testing.assert_allclose(out["rrf"], expected_rrf, rtol=1e-12)
    # a and d tie on rrf (a first by id), then b and c tie (b first by id).
    assert out["difficulty_rank"].tolist() == [4, 1, 2, 3]
    assert out["difficulty_rank"].dtype == np.int64


def test_fuse_keeps_rows_columns_and_input():
    table = hand_table()
    table.index = [10, 7, 3, 99]
    out = fuse(table, ["rouge", "nll"])
    assert out.index.tolist() == [10, 7, 3, 99]
    pd.testing.assert_frame_equal(out[table.columns], table)
    assert "rrf" not in table.columns  # the input is not modified


def test_single_signal_directions():
    table = hand_table()
    by_rouge = fuse(table, ["rouge"])
    assert by_rouge["difficulty_rank"].tolist() == [3, 2, 1, 4]  # d, then a/c tie by id, b
    by_nll = fuse(table, ["nll"])
    assert by_nll["difficulty_rank"].tolist() == [4, 1, 3, 2]  # a, then b/d tie by id, c


def test_same_ranks_in_other_signal_order_tie_exactly():
    # Ranks a (1, 2, 3), b (2, 3, 1), c (3, 1, 2): equal RRF. With k = 2, summing the terms in
    # signal order gives a a lower float score than b and c, and would put a last.
    table = pd.DataFrame(
        {
            "sample_id": ["c", "b", "a"],
            "nll": [0.3, 0.2, 0.1],
            "teacher_nll": [0.1, 0.3, 0.2],
            "kd_gap": [0.2, 0.1, 0.3],
        }
    )
    out = fuse(table, ["nll", "teacher_nll", "kd_gap"], k=2)
    assert out["rrf"].nunique() == 1
    assert out["difficulty_rank"].tolist() == [3, 2, 1]


def naive_fuse(table: pd.DataFrame, signals: list[str], k: int) -> tuple[dict, dict, dict]:
    """Loops over samples; exact rational scores so every tie is a true tie."""
    rows = table.to_dict("records")
    ranks = {s: {} for s in signals}
    for s in signals:
        higher_easier = SIGNAL_DIRECTION[s] == "higher_easier"
        for row in rows:
            easier = equal = 0
            for other in rows:
                if other[s] == row[s]:
                    equal += 1
                elif (other[s] > row[s]) == higher_easier:
                    easier += 1
            ranks[s][row["sample_id"]] = easier + (equal + 1) / 2
    rrf = {
        row["sample_id"]: sum(
            Fraction(1) / (k + Fraction(ranks[s][row["sample_id"]])) for s in signals
        )
        for row in rows
    }
    ordered = sorted(rrf, key=lambda sid: (-rrf[sid], sid))
    difficulty = {sid: i + 1 for i, sid in enumerate(ordered)}
    return ranks, rrf, difficulty


@pytest.mark.parametrize("signals", [["rouge", "nll"], ["nll", "teacher_nll", "kd_gap", "rouge"]])
@pytest.mark.parametrize("k", [1, 60])
def test_fuse_matches_naive_on_random_table_with_ties(signals, k):
    rng = np.random.default_rng(0)
    n = 50
    table = pd.DataFrame(
        {
            "sample_id": [f"id{j:03d}" for j in rng.permutation(n)],
            # few distinct values -> many ties
            "rouge": rng.integers(0, 5, n) / 4,
            "nll": rng.integers(0, 6, n) * 0.5,
            "teacher_nll": rng.integers(0, 4, n) * 0.25,
            "kd_gap": rng.integers(0, 3, n) * 0.1,
        }
    )
    out = fuse(table, signals, k=k)
    ranks, rrf, difficulty = naive_fuse(table, signals, k)
    ids = table["sample_id"].tolist()
    for s in signals:
        assert out[f"rank_{s}"].tolist() == [ranks[s][sid] for sid in ids]
    np.testing.assert_allclose(out["rrf"], [float(rrf[sid]) for sid in ids], rtol=1e-12)
    assert out["difficulty_rank"].tolist() == [difficulty[sid] for sid in ids]
    assert sorted(out["difficulty_rank"]) == list(range(1, n + 1))


@pytest.mark.parametrize(
    ("signals", "k", "edit", "match"),
    [
        (["bleu"], 60, None, "unknown signals.*'bleu'.*allowed"),
        ([], 60, None, "signals is empty"),
        (["nll", "nll"], 60, None, "twice"),
        (["kd_gap"], 60, None, "lacks columns.*kd_gap"),
        (["nll"], 0, None, "k=0"),
        (["rouge"], 60, "nan", "NaN.*'a'.*'d'"),
        (["rouge"], 60, "duplicate", "duplicate sample ids.*'a'"),
    ],
)
def test_fuse_errors(signals, k, edit, match):
    table = hand_table()
    if edit == "nan":
        table.loc[[1, 2], "rouge"] = np.nan
    if edit == "duplicate":
        table.loc[0, "sample_id"] = "a"
    with pytest.raises(ValueError, match=match):
        fuse(table, signals, k=k)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (11_435, [2858, 5716, 8574, 11435]),  # the paper's numbers
        (8, [2, 4, 6, 8]),
        (5, [1, 2, 3, 5]),
        (3, [1, 1, 1, 3]),  # floor rule gives 0, 0, 0: each stage keeps the easiest sample
        (1, [1, 1, 1, 1]),
    ],
)
def test_stage_sizes_paper_rule(n, expected):
    assert stage_sizes(n, 4) == expected


def test_stage_sizes_one_stage_is_everything():
    assert stage_sizes(7, 1) == [7]


@pytest.mark.parametrize(
    ("n", "fractions", "expected"),
    [
        (100, [0.1, 0.3, 1.0], [10, 30, 100]),
        (100, [0.29, 0.58, 1.0], [29, 58, 100]),  # 0.29·100 is 28.999… in binary floats
        (11_435, [0.25, 0.5, 0.75, 1.0], [2858, 5717, 8576, 11435]),
        (2, [0.25, 0.5, 0.75, 1.0], [1, 1, 1, 2]),
    ],
)
def test_stage_sizes_with_fractions(n, fractions, expected):
    assert stage_sizes(n, len(fractions), fractions) == expected


@pytest.mark.parametrize(
    ("n", "num_stages", "fractions", "match"),
    [
        (0, 4, None, "at least one sample"),
        (10, 0, None, "num_stages"),
        (10, 3, [0.5, 1.0], "2 fractions given for num_stages=3"),
        (10, 2, [0.5, 0.9], "end at 1.0"),
        (10, 3, [0.5, 0.5, 1.0], "strictly increasing"),
        (10, 3, [0.6, 0.4, 1.0], "strictly increasing"),
        (10, 2, [0.0, 1.0], r"\(0, 1\]"),
        (10, 2, [0.5, 1.5], r"\(0, 1\]"),
    ],
)
def test_stage_sizes_errors(n, num_stages, fractions, match):
    with pytest.raises(ValueError, match=match):
        stage_sizes(n, num_stages, fractions)


@pytest.mark.parametrize("num_stages", [1, 2, 4, 7])
def test_stage_sizes_invariants(num_stages):
    for n in range(1, 40):
        sizes = stage_sizes(n, num_stages)
        assert len(sizes) == num_stages and sizes[-1] == n and min(sizes) >= 1
        assert all(a <= b for a, b in pairwise(sizes))


def test_assign_stages_hand_example():
    ranked = fuse(hand_table(), ["rouge", "nll"])  # difficulty_rank 4, 1, 2, 3
    out = assign_stages(ranked, [1, 2, 4])
    assert out["stage"].tolist() == [2, 0, 1, 2]
    assert out["stage"].dtype == np.int64
    assert "stage" not in ranked.columns


def test_assign_stages_with_repeated_sizes():
    table = pd.DataFrame({"sample_id": ["x", "y", "z"], "difficulty_rank": [3, 1, 2]})
    out = assign_stages(table, stage_sizes(3, 4))  # [1, 1, 1, 3]
    assert out["stage"].tolist() == [3, 0, 3]


@pytest.mark.parametrize("num_stages", [1, 3, 4])
def test_stages_are_nested_cumulative_subsets(num_stages):
    rng = np.random.default_rng(1)
    n = 37
    table = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "nll": rng.random(n)})
    sizes = stage_sizes(n, num_stages)
    staged = assign_stages(fuse(table, ["nll"]), sizes)
    previous: set[str] = set()
    for s, size in enumerate(sizes):
        subset = staged[staged["stage"] <= s]
        assert len(subset) == size
        # the subset is exactly the `size` easiest samples, and contains every earlier subset
        assert set(subset["difficulty_rank"]) == set(range(1, size + 1))
        assert previous <= set(subset["sample_id"])
        previous = set(subset["sample_id"])


def test_assign_stages_errors():
    ranked = fuse(hand_table(), ["nll"])
    with pytest.raises(ValueError, match="difficulty_rank"):
        assign_stages(hand_table(), [4])
    with pytest.raises(ValueError, match="table length 4"):
        assign_stages(ranked, [1, 3])
    with pytest.raises(ValueError, match="non-decreasing"):
        assign_stages(ranked, [3, 2, 4])
