"""`pocl-ray compare` end to end on the tiny config: two methods x two training seeds from one
scores table and one starting student, one evaluation, the table with intervals."""

import json

import pandas as pd
import pytest

from jobs import __main__ as cli
from tests.tiny import DEMO, TINY


@pytest.mark.timeout(900)
def test_compare_two_methods_over_two_seeds(ray_local, tmp_path, capsys):
    args = ["compare", str(DEMO), *TINY, f"run.output_dir={tmp_path}", "--methods", "pocl",
            "--seeds", "2"]  # fmt: skip
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "compare"
    scores = pd.read_csv(out / "seed_scores.csv")
    assert sorted(set(zip(scores["method"], scores["train_seed"]))) == [
        ("kd", 0), ("kd", 1), ("pocl", 0), ("pocl", 1)]  # fmt: skip
    summaries = {(m, k): json.loads((out / m / f"seed{k}" / "summary.json").read_text())
                 for m in ("kd", "pocl") for k in (0, 1)}  # fmt: skip
    assert len({s["samples"] for s in summaries.values()}) == 1  # the same sample visits
    losses = {key: [json.loads(x)["loss"] for x in (out / key[0] / f"seed{key[1]}" /
                                                     "metrics.jsonl").read_text().splitlines()]
              for key in summaries}  # fmt: skip
    assert losses[("pocl", 0)] != losses[("pocl", 1)]  # the training seed changes training
    assert losses[("pocl", 0)] != losses[("kd", 0)]  # and so does the curriculum
    paired = pd.read_csv(out / "paired.csv")
    assert list(paired["method"]) == ["pocl"] * paired["set"].nunique()
    assert set(paired["verdict"]) <= {"better", "worse", "no difference at this budget"}
    assert "mean ± sd over training seeds" in printed and "paired differences against kd" in printed
    assert "the starting student:" in printed and (out / "comparison.png").stat().st_size > 1000

    assert cli.main(args) == 0  # a second run trains nothing
    again = capsys.readouterr().out
    assert again.count("reusing") >= 4 and "distilling" not in again


def test_unknown_method_is_a_usage_error(tmp_path, capsys):
    args = ["compare", str(DEMO), f"run.output_dir={tmp_path}", "--methods", "pocl,bogus"]
    assert cli.main(args) == 2
    assert "--methods" in capsys.readouterr().err
