"""The whole pipeline on a reduced config, on the session's local Ray: every artefact is
written, and a second run reuses every step."""

import json
import shutil

import pandas as pd
import pytest
import torch

from jobs import __main__ as cli
from jobs import pipeline
from pocl_ray import models, tasks
from pocl_ray.config import ModelConfig
from pocl_ray.data import load_records
from tests.tiny import tiny_cfg


@pytest.mark.timeout(900)
def test_pipeline_end_to_end_then_reuses_everything(ray_local, tmp_path, capsys, monkeypatch):
    cfg = tiny_cfg(tmp_path, "run.pipeline_seeds=2", "run.pipeline_runs=[pocl,kd,sft]")
    index = pipeline.main(cfg)
    first = capsys.readouterr().out
    cmp = "compare"
    for rel in ["teacher/model.safetensors", "scores/manifest.json", "student_init/config.json",
                f"{cmp}/pocl/seed0/student/model.safetensors",
                f"{cmp}/pocl/seed1/student/model.safetensors",
                f"{cmp}/kd/seed1/student/model.safetensors", f"{cmp}/pocl/seed0/metrics.jsonl",
                f"{cmp}/eval/results.csv", f"{cmp}/eval/generations.jsonl",
                f"{cmp}/seed_scores.csv", f"{cmp}/paired.csv", f"{cmp}/comparison.png",
                "report/index.html", "report/loss.png", "report/comparison.png",
                "report/eval.png", "report/difficulty.png", "report/schedule.png"]:  # fmt: skip
        assert (tmp_path / rel).exists(), rel
    assert index == tmp_path / "report" / "index.html"
    results = pd.read_csv(tmp_path / cmp / "eval" / "results.csv")
    students = {f"{m}.seed{k}" for m in ("pocl", "kd", "sft") for k in (0, 1)}
    assert set(results["model"]) == {"teacher", "start"} | students
    dev = json.loads((tmp_path / "dev_loss.json").read_text())
    assert set(dev["token_mean_ce"]) == {"start"} | students and dev["examples"] > 0
    ce = dev["token_mean_ce"]
    assert ce["pocl.seed0"] != ce["start"] and ce["pocl.seed0"] != ce["pocl.seed1"]  # seeds differ
    assert f"start {ce['start']:.4f}" in first
    assert f"pocl {(ce['pocl.seed0'] + ce['pocl.seed1']) / 2:.4f} ± " in first
    pocl = pd.read_json(tmp_path / cmp / "pocl" / "seed0" / "metrics.jsonl", lines=True)
    kd = pd.read_json(tmp_path / cmp / "kd" / "seed0" / "metrics.jsonl", lines=True)
    assert pocl["stage"].nunique() == cfg.curriculum.num_stages and kd["stage"].nunique() == 1
    visits = {m: json.loads((tmp_path / cmp / m / "seed0" / "summary.json").read_text())["samples"]
              for m in ("pocl", "kd", "sft")}  # fmt: skip
    assert len(set(visits.values())) == 1, visits  # equal sample visits
    assert "paired differences against kd" in first and "mean ± sd over training seeds" in first
    assert "pocl     heldout" in first and "the teacher: heldout" in first
    assert "too few for an interval" in first  # 2 seeds
    assert "report:" in first and "heldout" in first
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Comparison over training seeds" in page and "pocl.seed0" not in page  # pooled rows

    mtime = (tmp_path / cmp / "pocl" / "seed0" / "student" / "model.safetensors").stat().st_mtime_ns
    pipeline.main(cfg)
    second = capsys.readouterr().out
    assert "sft teacher: reusing" in second
    for m in ("pocl", "kd", "sft"):
        assert f"compare: {m} seed 1: reusing" in second
    assert first.count("ROUGE-L x100, mean ± sd") == 1  # the table, once
    assert (tmp_path / cmp / "pocl" / "seed0" / "student" / "model.safetensors").stat(
    ).st_mtime_ns == mtime

    # the same run directory as a URI: `pocl-ray report` pulls it, rebuilds, pushes back
    bucket = tmp_path.with_name(tmp_path.name + "-bucket")
    shutil.copytree(tmp_path, bucket)
    (bucket / "report" / "index.html").unlink()
    monkeypatch.setenv("POCL_RAY_CACHE", str(tmp_path / "cache"))
    assert cli.main(["report", f"file://{bucket}"]) == 0
    assert f"report: file://{bucket}/report/index.html (local copy:" in capsys.readouterr().out
    assert "pocl" in (bucket / "report" / "index.html").read_text()


@pytest.mark.timeout(600)
def test_pipeline_with_a_pretrained_teacher_folder_and_a_top1_cache(ray_local, tmp_path, capsys):
    """A real-model run: the teacher (and its tokenizer) come from a folder, not from the
    demo's SFT; the cache keeps K = 1 and scoring asks for more new tokens than the models
    have positions (clamped). The pipeline must evaluate that teacher and reach the end."""
    path = tasks.write_jsonl(tasks.generate(200, seed=5), tmp_path / "t.jsonl")
    records = load_records(path).records
    tok = models.train_tokenizer([r.prompt + r.references[0] for r in records], 512)
    torch.manual_seed(0)
    teacher = models.build_tiny(ModelConfig(hidden_size=32, num_layers=2, num_heads=2), tok, 128)
    folder = models.save_model(teacher, tok, tmp_path / "my-teacher")
    out = tmp_path / "run"
    cfg = tiny_cfg(
        out,
        f"teacher.name_or_path={folder}",
        f"tokenizer.name_or_path={folder}",
        "scoring.teacher_topk=1",
        "loss.teacher_source=cache",
        "scoring.max_new_tokens=256",
        "scaling.num_workers=0",  # Train local mode: the wiring is what is tested here
        "run.pipeline_runs=[pocl,sft]",  # a choice of runs: no kd/
    )
    pipeline.main(cfg)
    printed = capsys.readouterr().out
    assert not (out / "teacher").exists()  # nothing trained in its place
    results = pd.read_csv(out / "compare" / "eval" / "results.csv")
    assert set(results["model"]) == {"teacher", "start", "pocl.seed0", "sft.seed0"}
    assert not (out / "compare" / "kd").exists() and "compare: kd" not in printed
    manifest = json.loads((out / "compare" / "eval" / "manifest.json").read_text())
    assert manifest["models"]["teacher"]["path"] == str(folder)
    kd = pd.read_json(out / "compare" / "pocl" / "seed0" / "metrics.jsonl", lines=True)["kd"]
    assert (kd > 0).all()  # the K = 1 cache still teaches: a non-zero KD term
    sft = pd.read_json(out / "compare" / "sft" / "seed0" / "metrics.jsonl", lines=True)
    assert (sft["kd_ratio"] == 0).all() and (sft["kd"] == 0).all()
    assert "scoring.max_new_tokens=256 clamped to 32" in printed
    assert "paired differences against pocl" in printed  # no kd: the first run is the reference
    assert printed.count("ROUGE-L x100, mean ± sd") == 1  # the table, once
