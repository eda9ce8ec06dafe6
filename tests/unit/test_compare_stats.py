"""The statistics behind `pocl-ray compare`: per-seed scores, mean ± sd, paired differences
against KD with a 95 % t-interval, and the verdict."""

import math

import pandas as pd
import pytest

from pocl_ray import compare


def seed_scores(rows: dict[str, list[float]], set_name: str = "heldout") -> pd.DataFrame:
    return pd.DataFrame(
        [{"method": m, "train_seed": i, "set": set_name, "rougeL": v}
         for m, values in rows.items() for i, v in enumerate(values)]
    )  # fmt: skip


def test_t_quantiles_are_the_table_values_or_wider():
    assert compare.t_quantile(1) == 12.706 and compare.t_quantile(2) == 4.303
    assert compare.t_quantile(11) == 2.228  # df 10's value: wider than t(11) = 2.201
    assert compare.t_quantile(100) == 2.042
    with pytest.raises(ValueError):
        compare.t_quantile(0)


def test_paired_interval_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, n 3 -> half width 4.303 / sqrt(3)
    scores = seed_scores({"kd": [10, 20, 30], "pocl": [11, 22, 33]})
    (p,) = compare.paired(scores, "kd")
    half = 4.303 / math.sqrt(3)
    assert (p.method, p.set, p.n) == ("pocl", "heldout", 3)
    assert p.mean == pytest.approx(2) and (p.low, p.high) == pytest.approx((2 - half, 2 + half))
    assert p.verdict == "no difference at this budget"  # 2 - 2.48 < 0


def test_verdicts_follow_the_interval_not_the_mean():
    better = compare.paired(seed_scores({"kd": [10, 20, 30, 40], "p": [12, 22, 32, 42.5]}), "kd")
    worse = compare.paired(seed_scores({"kd": [10, 20, 30, 40], "p": [8, 18, 28, 37.5]}), "kd")
    noisy = compare.paired(seed_scores({"kd": [10, 20, 30, 40], "p": [20, 10, 40, 35]}), "kd")
    one = compare.paired(seed_scores({"kd": [10], "p": [90]}), "kd")
    none = "no difference at this budget"
    got = [better[0].verdict, worse[0].verdict, noisy[0].verdict, one[0].verdict]
    assert got == ["better", "worse", none, none]
    assert math.isnan(one[0].low)  # one seed: no interval, whatever the gap


def test_pairs_only_seeds_both_methods_have():
    scores = seed_scores({"kd": [10, 20, 30], "pocl": [11, 21]})
    (p,) = compare.paired(scores, "kd")
    assert p.n == 2 and p.mean == pytest.approx(1)


def test_summary_and_text():
    seeds = seed_scores({"kd": [15, 35], "pocl": [17, 37]})
    table = compare.summary(seeds)
    assert table.set_index("method").loc["kd", "mean"] == 25
    assert table.set_index("method").loc["kd", "sd"] == pytest.approx(math.sqrt(200))
    text = compare.format_table(table, compare.paired(seeds, "kd"), "kd", "ROUGE-L")
    assert "25.00 ± 14.14 (n=2)" in text and "pocl     heldout      +2.00 [+2.00, +2.00]" in text
    assert "better" in text  # identical +2 on both seeds: a zero-width interval above 0
    one = compare.summary(seed_scores({"kd": [15]}))
    assert "15.00 ± n/a (n=1)" in compare.format_table(one, [], "kd", "ROUGE-L")


def test_methods_list_puts_kd_first_and_refuses_unknown_names():
    from jobs.compare import parse_methods
    from pocl_ray.config import ConfigError

    assert parse_methods("pocl,random") == ["kd", "pocl", "random"]
    assert parse_methods("anti,kd") == ["kd", "anti"]
    for bad in ("pocl,curriculum", "pocl,pocl", ""):
        with pytest.raises(ConfigError, match="--methods"):
            parse_methods(bad)
