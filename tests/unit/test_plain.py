"""The plain single-process pipeline end to end on a tiny config, and its report."""

import pandas as pd
import pytest

from jobs.__main__ import main
from pocl_ray.plain import run_plain
from tests.tiny import tiny_cfg


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    cfg = tiny_cfg(out)
    return out, cfg, run_plain(cfg)


@pytest.mark.timeout(300)
def test_plain_pipeline_writes_every_artefact(plain_run):
    out, cfg, result = plain_run
    assert list(result.index) == ["teacher", "KD student", "POCL student"]
    assert result.to_numpy().min() >= 0 and result.to_numpy().max() <= 100
    for name in ["config.yaml", "scores.parquet", "results.csv", "metrics_none.jsonl",
                 "metrics_pocl.jsonl", "teacher/model.safetensors", "tokenizer/tokenizer.json",
                 "student_pocl/model.safetensors", "student_none/model.safetensors",
                 "report/index.html"]:  # fmt: skip
        assert (out / name).exists(), name
    scores = pd.read_parquet(out / "scores.parquet")
    assert sorted(scores["difficulty_rank"]) == list(range(1, len(scores) + 1))
    assert set(cfg.scoring.signals) <= set(scores.columns)
    pocl = pd.read_json(out / "metrics_pocl.jsonl", lines=True)
    assert sorted(pocl["stage"].unique()) == list(range(cfg.curriculum.num_stages))
    assert pocl.groupby("stage")["tau"].first().is_monotonic_increasing


@pytest.mark.timeout(120)
def test_report_rebuilds_from_the_run_dir(plain_run, capsys):
    out, _, _ = plain_run
    for png in (out / "report").glob("*.png"):
        png.unlink()
    assert main(["report", str(out)]) == 0
    pngs = {p.name for p in (out / "report").glob("*.png")}
    assert pngs == {"difficulty.png", "agreement.png", "schedule.png", "loss.png", "eval.png"}
    index = (out / "report" / "index.html").read_text()
    assert all(name in index for name in pngs)
    assert "POCL student" in index
    assert "report/index.html" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_teacher_is_reused_on_a_second_run(plain_run, caplog):
    out, cfg, _ = plain_run
    before = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="pocl_ray.inputs"):
        run_plain(cfg)
    assert "teacher: reusing" in caplog.text
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == before
