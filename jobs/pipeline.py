"""`pocl-ray pipeline CONFIG [key=value ...]` and `pocl-ray demo [key=value ...]`: the whole
pipeline on one Ray instance.

    teacher SFT (jobs.sft; skipped for a pretrained teacher) → score (jobs.score) → distil
    with the configured curriculum (`pocl/`), the plain-KD control (`kd/`, curriculum.mode
    none) and the SFT control (`sft/`, mode none with λ = 0), all at equal compute from the
    same starting student → evaluate the teacher and the three students (jobs.evaluate) →
    report (report/index.html)

Every step reuses its output when it is already there, so re-running is fast. Each distillation
writes its outputs (student/, metrics.jsonl, stages.json, summary.json, tensorboard/) into
`run.output_dir`, and the pipeline moves them into its own folder: the two runs share the
teacher, tokenizer, starting student and scores table.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from jobs import distill, evaluate, score, sft
from pocl_ray import difficulty, report
from pocl_ray.config import Config, save_resolved

RUNS = {
    "pocl": "POCL student",
    "kd": "KD student (no curriculum)",
    "sft": "SFT student (no teacher)",
}
"""The pipeline's distillation runs: the configured curriculum, and at equal compute from the
same starting student the plain-KD control (curriculum mode none) and the SFT control (mode
none with λ = 0: cross-entropy only, the teacher never loaded)."""
DISTILL_OUTPUTS = ("student", "metrics.jsonl", "stages.json", "summary.json", "events.jsonl",
                   "tensorboard")  # fmt: skip


def _with(cfg: Config, section: str, **changes) -> Config:
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}
    )


def run_config(cfg: Config, name: str) -> Config:
    """The config of pipeline run `name` (see RUNS)."""
    cur = {
        "pocl": {},
        "kd": {"mode": "none"},
        "sft": {"mode": "none", "kd_ratio_start": 0.0, "kd_ratio_end": 0.0},
    }[name]
    return _with(_with(cfg, "curriculum", **cur), "run", name=f"{cfg.run.name}-{name}")


def distil_into(cfg: Config, name: str) -> Path:
    """Run jobs.distill for pipeline run `name` and move its outputs into run.output_dir/name."""
    out = Path(cfg.run.output_dir)
    dest = out / name
    if (dest / "student" / "config.json").exists():
        print(f"pipeline: {name}: reusing {dest / 'student'}", flush=True)
        return dest
    run_cfg = run_config(cfg, name)
    cur = run_cfg.curriculum
    print(
        f"pipeline: {name}: distilling (curriculum.mode={cur.mode}, "
        f"lambda {cur.kd_ratio_start:g}->{cur.kd_ratio_end:g})",
        flush=True,
    )
    distill.main(run_cfg)
    dest.mkdir(parents=True, exist_ok=True)
    for item in DISTILL_OUTPUTS:
        if (out / item).exists():
            shutil.rmtree(dest / item, ignore_errors=True)
            shutil.move(str(out / item), str(dest / item))
    print(f"pipeline: {name}: outputs moved to {dest}/ (student/, metrics.jsonl, ...)", flush=True)
    return dest


def build_report(cfg: Config) -> Path:
    """report/ from the scores table, both runs' metrics and the eval results."""
    out = Path(cfg.run.output_dir)
    scores = score.read_scores(out)
    cur = cfg.curriculum
    sizes = difficulty.stage_sizes(len(scores), cur.num_stages, cur.fractions)
    runs = {RUNS[n]: pd.read_json(out / n / "metrics.jsonl", lines=True) for n in RUNS}
    results = evaluate.read_results(out)
    per_seed = results[results["stat"] == "seed"]
    if per_seed.empty:  # greedy decoding: one pass, only mean rows
        per_seed = results[results["stat"] == "mean"]
    return report.build_report(
        out / "report", scores=scores, sizes=sizes, runs=runs, results=per_seed,
        schedule_run=RUNS["pocl"],
    )  # fmt: skip


def main(cfg: Config) -> Path:
    """Run every step (reusing finished ones); print the comparison table; return the report."""
    t0 = time.perf_counter()
    out = Path(cfg.run.output_dir).resolve()
    cfg = _with(cfg, "run", output_dir=str(out))
    save_resolved(cfg, out)
    started = score.connect_ray(cfg)
    try:
        if cfg.teacher.name_or_path is None:
            sft.main(cfg, target="teacher")
        score.main(cfg)
        for name in RUNS:
            distil_into(cfg, name)
        teacher = cfg.teacher.name_or_path or str(out / "teacher")
        models = [f"teacher={teacher}"] + [f"{n}={out / n / 'student'}" for n in RUNS]
        evaluate.main(_with(cfg, "eval", models=models), show_table=False)
    finally:
        if started:
            import ray

            ray.shutdown()
    index = build_report(cfg)
    results = evaluate.read_results(out)
    print("\n" + evaluate.format_table(results, cfg.eval))
    print(
        "one training run per student: the gaps between pocl, kd and sft above are single "
        "runs, not a comparison (training-seed noise is not measured here)"
    )
    summary = {n: json.loads((out / n / "summary.json").read_text()) for n in RUNS}
    steps = ", ".join(f"{n} {s['steps']} steps" for n, s in summary.items())
    print(f"\npipeline: done in {time.perf_counter() - t0:.0f} s ({steps})")
    print(f"report: {index}")
    return index


if __name__ == "__main__":
    from pocl_ray.cli import main as cli_main

    sys.exit(cli_main(["pipeline", *sys.argv[1:]]))
