"""The whole pipeline on a reduced config, on the session's local Ray: every artefact is
written, and a second run reuses every step."""

import pandas as pd
import pytest

from jobs import pipeline
from tests.tiny import tiny_cfg


@pytest.mark.timeout(600)
def test_pipeline_end_to_end_then_reuses_everything(ray_local, tmp_path, capsys):
    cfg = tiny_cfg(tmp_path)
    index = pipeline.main(cfg)
    first = capsys.readouterr().out
    for rel in ["teacher/model.safetensors", "scores/manifest.json", "student_init/config.json",
                "pocl/student/model.safetensors", "kd/student/model.safetensors",
                "pocl/metrics.jsonl", "kd/metrics.jsonl", "eval/results.csv",
                "eval/generations.jsonl", "report/index.html", "report/loss.png",
                "report/eval.png", "report/difficulty.png", "report/schedule.png"]:  # fmt: skip
        assert (tmp_path / rel).exists(), rel
    assert index == tmp_path / "report" / "index.html"
    results = pd.read_csv(tmp_path / "eval" / "results.csv")
    assert set(results["model"]) == {"teacher", "pocl", "kd"}
    pocl = pd.read_json(tmp_path / "pocl" / "metrics.jsonl", lines=True)
    kd = pd.read_json(tmp_path / "kd" / "metrics.jsonl", lines=True)
    assert pocl["stage"].nunique() == cfg.curriculum.num_stages and kd["stage"].nunique() == 1
    assert "report:" in first and "heldout" in first

    mtime = (tmp_path / "pocl" / "student" / "model.safetensors").stat().st_mtime_ns
    pipeline.main(cfg)
    second = capsys.readouterr().out
    assert "sft teacher: reusing" in second
    assert "pocl: reusing" in second and "kd: reusing" in second
    assert (tmp_path / "pocl" / "student" / "model.safetensors").stat().st_mtime_ns == mtime
