"""The plain single-process pipeline end to end on a tiny config, and its report."""

import numpy as np
import pandas as pd
import pytest
import torch

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


def test_plain_scoring_at_bfloat16_keeps_the_callers_models(task_records, task_tok):
    """scoring.dtype makes the plain scorer use copies at that precision: the signals come
    out float and finite, close to float32's, and the caller's models stay float32."""
    from pocl_ray.config import load_config
    from pocl_ray.data import tokenize_records
    from pocl_ray.models import build_tiny
    from pocl_ray.plain import score_difficulty

    records = task_records[:24]
    examples = tokenize_records(records, task_tok, max_prompt_length=64, max_length=96).examples
    scorer = build_tiny(load_config(None, []).student, task_tok, 96).eval()
    teacher = build_tiny(load_config(None, []).teacher, task_tok, 96).eval()
    over = ["scoring.signals=[nll,kd_gap]", "curriculum.num_stages=2", "scoring.batch_size=8",
            "data.max_prompt_length=64", "data.max_length=96"]  # fmt: skip
    runs = {}
    for dtype in ("null", "bfloat16"):
        cfg = load_config(None, [*over, f"scoring.dtype={dtype}"])
        runs[dtype] = score_difficulty(cfg, records, examples, scorer, teacher, task_tok)
    assert next(scorer.parameters()).dtype == next(teacher.parameters()).dtype == torch.float32
    low, full = runs["bfloat16"].sort_values("sample_id"), runs["null"].sort_values("sample_id")
    assert np.isfinite(low["nll"]).all()
    np.testing.assert_allclose(low["nll"], full["nll"], rtol=0.05)
