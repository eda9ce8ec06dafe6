"""The measurer's agreement with the built-in tasks' true level, per signal and fused, as the
score job prints it and the report shows it."""

import pandas as pd

from pocl_ray import report
from pocl_ray.scores import format_quality, measurer_quality


def table() -> pd.DataFrame:
    level = [1, 1, 2, 2, 3, 3, 4, 4]
    return pd.DataFrame({
        "level": level,
        "difficulty_rank": [1, 2, 3, 4, 5, 6, 7, 8],   # orders the levels perfectly
        "rank_nll": [8, 7, 6, 5, 4, 3, 2, 1],           # exactly backwards
        "rank_rouge": [4.5] * 8,                        # constant: no correlation
    })  # fmt: skip


def test_each_signal_and_the_fusion_are_reported_in_one_line():
    quality = measurer_quality(table(), ["nll", "rouge"])
    assert quality["fused"] > 0.97 and quality["signals"]["nll"] < -0.97
    assert quality["signals"]["rouge"] is None
    line = format_quality(quality)
    assert line.startswith("fused 0.976 (by signal: nll -0.976, rouge n/a)")


def test_no_levels_no_quality():
    assert measurer_quality(table().drop(columns="level"), ["nll"]) is None


def test_the_report_figure_is_drawn_when_a_signal_is_constant(tmp_path):
    path = report.plot_agreement(table(), tmp_path / "agreement.png")
    assert path.stat().st_size > 1000
