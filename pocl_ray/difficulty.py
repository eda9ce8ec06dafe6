"""Difficulty signals → ranks → reciprocal rank fusion → stages (pocl-method.md sections 2, 3).

Pure functions of DataFrames: one row per training sample, keyed by the `sample_id` column,
never by row position.
"""

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Literal

import numpy as np
import pandas as pd

Direction = Literal["higher_easier", "lower_easier"]

SIGNAL_DIRECTION: dict[str, Direction] = {
    "rouge": "higher_easier",
    "nll": "lower_easier",
    "teacher_nll": "lower_easier",
    "kd_gap": "lower_easier",
}


def _check_fuse_inputs(table: pd.DataFrame, signals: Sequence[str], k: int) -> None:
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if len(signals) == 0:
        raise ValueError(f"signals is empty; choose from {sorted(SIGNAL_DIRECTION)}")
    unknown = [s for s in signals if s not in SIGNAL_DIRECTION]
    if unknown:
        raise ValueError(f"unknown signals {unknown}; allowed: {sorted(SIGNAL_DIRECTION)}")
    if len(set(signals)) != len(signals):
        raise ValueError(f"signals {list(signals)} name a signal twice")
    missing = [c for c in ["sample_id", *signals] if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; it has {list(table.columns)}")
    duplicated = table["sample_id"][table["sample_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"duplicate sample ids (first few): {duplicated[:5]}")
    for signal in signals:
        nan_ids = table["sample_id"][table[signal].isna()].tolist()
        if nan_ids:
            raise ValueError(
                f"signal {signal!r} is NaN for {len(nan_ids)} samples, e.g. {nan_ids[:5]}"
            )


def fuse(table: pd.DataFrame, signals: Sequence[str], k: int = 60) -> pd.DataFrame:
    """Rank samples easiest-first per signal and fuse the ranks with RRF.

    Args:
        table: (n rows) with a str `sample_id` column and one numeric column per signal.
        signals: which signal columns to fuse; names from `SIGNAL_DIRECTION`.
        k: the RRF constant (paper: 60).

    Returns:
        A copy of `table`, rows in the input order, with added columns:
        `rank_<signal>` (float, 1-based, 1 = easiest, ties get their average rank),
        `rrf` = Σ_s 1 / (k + rank_s), and
        `difficulty_rank` (int, 1..n, 1 = easiest): rrf descending, then sample_id ascending,
        so equal scores are ordered by id and never by file order.
    """
    _check_fuse_inputs(table, signals, k)
    out = table.copy()
    for signal in signals:
        ascending = SIGNAL_DIRECTION[signal] == "lower_easier"
        out[f"rank_{signal}"] = out[signal].rank(method="average", ascending=ascending)
    terms = np.stack([1.0 / (k + out[f"rank_{s}"].to_numpy()) for s in signals], axis=1)
    # Summing each row's terms in sorted order makes samples with the same multiset of ranks
    # get bit-identical scores, so they tie exactly and the sample_id tie-break decides.
    out["rrf"] = np.sort(terms, axis=1).sum(axis=1)
    order = pd.DataFrame({"rrf": out["rrf"].to_numpy(), "sample_id": out["sample_id"].to_numpy()})
    easiest_first = order.sort_values(["rrf", "sample_id"], ascending=[False, True]).index
    ranks = np.empty(len(out), dtype=np.int64)
    ranks[easiest_first.to_numpy()] = np.arange(1, len(out) + 1)
    out["difficulty_rank"] = ranks
    return out


def stage_sizes(n: int, num_stages: int = 4, fractions: Sequence[float] | None = None) -> list[int]:
    """Cumulative subset sizes: stage s trains on the `sizes[s]` easiest samples.

    Args:
        n: number of samples (>= 1).
        num_stages: S, the number of stages (>= 1).
        fractions: None for the paper's rule, per = n // S and sizes[s] = (s + 1)·per with the
            last stage = n (n = 11,435, S = 4 gives 2858, 5716, 8574, 11435). Otherwise S
            strictly increasing fractions in (0, 1] ending at 1.0, with sizes[s] = floor(f_s·n).

    Returns:
        S non-decreasing sizes, the last equal to n. Every size is at least 1: when the floor
        rule gives 0 (small n, e.g. n = 3 with S = 4 gives 1, 1, 1, 3), the stage holds the single
        easiest sample instead of nothing.
    """
    if n < 1:
        raise ValueError(f"n={n}: there must be at least one sample")
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages} must be >= 1")
    if fractions is None:
        per = n // num_stages
        sizes = [(s + 1) * per for s in range(num_stages - 1)]
    else:
        _check_fractions(fractions, num_stages)
        # f·n in binary floats can land just under an integer (0.29 · 100 = 28.999...);
        # rounding away that noise keeps floor() from dropping a sample.
        sizes = [math.floor(round(f * n, 9)) for f in fractions[:-1]]
    return [max(size, 1) for size in sizes] + [n]


def _check_fractions(fractions: Sequence[float], num_stages: int) -> None:
    if len(fractions) != num_stages:
        raise ValueError(f"{len(fractions)} fractions given for num_stages={num_stages}")
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions {list(fractions)} must all lie in (0, 1]")
    if any(a >= b for a, b in pairwise(fractions)):
        raise ValueError(f"fractions {list(fractions)} must be strictly increasing")
    if fractions[-1] != 1.0:
        raise ValueError(
            f"fractions {list(fractions)} must end at 1.0 (the last stage is all data)"
        )


def assign_stages(table: pd.DataFrame, sizes: Sequence[int]) -> pd.DataFrame:
    """Tag each sample with the first stage whose subset contains it.

    Args:
        table: (n rows) with an int `difficulty_rank` column (1 = easiest), as from `fuse`.
        sizes: cumulative stage sizes, as from `stage_sizes(n, ...)`; sizes[-1] must equal n.

    Returns:
        A copy with an int `stage` column: the smallest 0-based s with difficulty_rank <= sizes[s].
        Stage s trains on all rows with stage <= s.
    """
    if "difficulty_rank" not in table.columns:
        raise ValueError("table lacks a difficulty_rank column; run fuse() first")
    if len(sizes) == 0 or sizes[-1] != len(table):
        raise ValueError(f"sizes {list(sizes)} must end at the table length {len(table)}")
    if any(a > b for a, b in pairwise(sizes)):
        raise ValueError(f"sizes {list(sizes)} must be non-decreasing")
    out = table.copy()
    # side="left" finds the first s with sizes[s] >= rank.
    out["stage"] = np.searchsorted(
        np.asarray(sizes), out["difficulty_rank"].to_numpy(), side="left"
    )
    return out
