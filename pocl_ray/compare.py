"""Comparisons of training methods over training seeds: the statistics a verdict rests on.

One score per (method, training seed, eval set) — the mean ROUGE-L over the set's examples
and decoding seeds — is the unit: the spread between training seeds is what a single run
cannot show. Against a reference method (KD), each seed's difference is paired (same seed,
same starting student, same table, same sample visits), and the verdict comes from the 95 %
t-interval of the mean paired difference, never from one run:

    better   the whole interval is above 0
    worse    the whole interval is below 0
    no difference at this budget   the interval covers 0 (or fewer than 2 seeds)

Pure pandas / numpy: the core never imports Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip
"""Two-sided 95 % quantiles of Student's t by degrees of freedom; between entries the next
lower entry's (a little wider: conservative), above 30 the value at 30."""


REFERENCE = "kd"
"""The method every other is paired with (plain KD), when it runs."""
SEP = ".seed"
"""Evaluated students are named `<method>.seed<k>`."""


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of t with `df` degrees of freedom (conservative between table
    entries)."""
    if df < 1:
        raise ValueError(f"t quantile needs >= 1 degree of freedom, got {df}")
    return T_975[max(d for d in T_975 if d <= df)]


@dataclass(frozen=True)
class Paired:
    """The paired difference of one method against the reference on one eval set."""

    method: str
    set: str
    n: int
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.n < 2 or math.isnan(self.low):
            return "no difference at this budget"
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        return "no difference at this budget"


def summary(seed_scores: pd.DataFrame, metric: str = "rougeL") -> pd.DataFrame:
    """Mean, sd and seed count per (method, set) of per-seed rows (method, train_seed, set,
    `metric`: one score per trained student and eval set)."""
    grouped = seed_scores.groupby(["method", "set"], sort=False)[metric]
    out = grouped.agg(mean="mean", sd="std", seeds="count").reset_index()
    return out


def paired(
    seed_scores: pd.DataFrame, reference: str, metric: str = "rougeL"
) -> list[Paired]:
    """Each method's per-seed difference from `reference` on each set (seeds both have),
    with the 95 % t-interval of its mean."""
    wide = seed_scores.pivot_table(index=["set", "train_seed"], columns="method", values=metric)
    out = []
    for method in [m for m in wide.columns if m != reference]:
        for set_name, rows in wide.groupby(level="set"):
            diff = (rows[method] - rows[reference]).dropna().to_numpy()
            out.append(_interval(method, str(set_name), diff))
    return out


def _interval(method: str, set_name: str, diff: np.ndarray) -> Paired:
    n = len(diff)
    mean = float(diff.mean()) if n else float("nan")
    if n < 2:
        return Paired(method, set_name, n, mean, float("nan"), float("nan"))
    half = t_quantile(n - 1) * float(diff.std(ddof=1)) / math.sqrt(n)
    return Paired(method, set_name, n, mean, mean - half, mean + half)


def format_table(table: pd.DataFrame, pairs: list[Paired], reference: str, metric: str) -> str:
    """The comparison as text: mean ± sd per method and set, then each paired difference
    against the reference with its interval and verdict."""
    lines = [f"{metric} x100, mean ± sd over training seeds:"]
    sets = list(dict.fromkeys(table["set"]))
    width = max([10, *(len(str(m)) + 2 for m in table["method"])])
    lines.append("method".ljust(width) + "".join(s.rjust(22) for s in sets))
    for method, rows in table.groupby("method", sort=False):
        cells = []
        for s in sets:
            row = rows[rows["set"] == s]
            if row.empty:
                cells.append("-".rjust(22))
                continue
            r = row.iloc[0]
            sd = "n/a" if math.isnan(r["sd"]) else f"{r['sd']:.2f}"
            cells.append(f"{r['mean']:.2f} ± {sd} (n={int(r['seeds'])})".rjust(22))
        lines.append(str(method).ljust(width) + "".join(cells))
    lines.append(f"\npaired differences against {reference} (same training seed), 95 % t-interval:")
    for p in pairs:
        interval = "n/a" if math.isnan(p.low) else f"[{p.low:+.2f}, {p.high:+.2f}]"
        name = p.method.ljust(width - 2)
        lines.append(f"  {name} {p.set:<12} {p.mean:+.2f} {interval} over {p.n} seed(s): "
                     f"{p.verdict}")  # fmt: skip
    return "\n".join(lines)
