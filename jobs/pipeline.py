"""`pocl-ray pipeline CONFIG [key=value ...]` and `pocl-ray demo [key=value ...]`: every job
in order on one Ray instance, then the report.

1. SFT of the demo teacher (`jobs.sft`; skipped for a pretrained teacher).
2. Scoring (`jobs.score`): the scores table and the starting student.
3. The distillations of `run.pipeline_runs` from the same starting student at equal compute
   (`jobs.distill`): the configured curriculum (`pocl/`), the plain-KD control (`kd/`,
   curriculum mode none) and the SFT control (`sft/`, mode none with λ = 0: CE only).
4. Evaluation of the teacher, the starting student and the trained students (`jobs.evaluate`).
5. The report (`report/index.html`), the comparison table and each student's held-out CE
   (`dev_loss.json`), printed once.
Every step reuses its output when it is already there, so re-running is fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jobs import distill, evaluate, runtime, score, sft
from pocl_ray import artifacts, evaluation, loop, models, report, storage
from pocl_ray.config import Config, save_resolved, with_section
from pocl_ray.run_dir import Locations, RunDir

RUNS = {
    "pocl": {},
    "kd": {"mode": "none"},
    "sft": {"mode": "none", "kd_ratio_start": 0.0, "kd_ratio_end": 0.0},
}
"""Each pipeline run's curriculum changes to the configured config."""



def distil_into(cfg: Config, name: str) -> Path:
    """Run jobs.distill for pipeline run `name` with its outputs in run.output_dir/name (the
    runs share the teacher, tokenizer, starting student and scores table)."""
    run = RunDir.of(cfg)
    dest = run.root / name
    if (dest / "student" / "config.json").exists():
        print(f"pipeline: {name}: reusing {dest / 'student'}", flush=True)
        return dest
    run_cfg = with_section(cfg, "curriculum", **RUNS[name])
    run_cfg = with_section(run_cfg, "run", name=f"{cfg.run.name}-{name}")
    cur = run_cfg.curriculum
    print(f"pipeline: {name}: distilling (curriculum.mode={cur.mode}, "
          f"lambda {cur.kd_ratio_start:g}->{cur.kd_ratio_end:g})", flush=True)  # fmt: skip
    return distill.main(run_cfg, into=name)


def dev_losses(cfg: Config, run: RunDir, students: dict[str, Path]) -> str:
    """Each student's token-mean response CE on the held-out split (`dev_loss.json`), and a
    line saying how far training moved it from the starting student."""
    inputs = artifacts.read_inputs(cfg, run)
    tok = models.load_tokenizer(Locations.of(cfg, run).tokenizer)
    dev = artifacts.tokenize(cfg, tok, inputs.held)[: cfg.eval.max_examples]
    if not dev:
        return "dev loss: no held-out data (data.eval_fraction = 0)"
    losses = {}
    for name, folder in students.items():
        model = models.load_pretrained(folder, cfg.student)
        losses[name] = loop.mean_ce(model, dev, tok.pad_token_id, batch_size=8)
    (run.root / "dev_loss.json").write_text(json.dumps(
        {"examples": len(dev), "token_mean_ce": losses}, indent=2) + "\n")  # fmt: skip
    moved = ", ".join(f"{n} {v:.4f}" for n, v in losses.items())
    return f"dev loss (held-out response CE, {len(dev)} examples): {moved}"


def main(cfg: Config) -> Path:
    """Run every step (reusing finished ones); print the comparison table; return the report."""
    with storage.synced(cfg.run.output_dir):  # each job pushes what it made, too
        return _main(cfg)


def _main(cfg: Config) -> Path:
    t0 = time.perf_counter()
    if not storage.is_uri(cfg.run.output_dir):
        cfg = with_section(cfg, "run", output_dir=str(Path(cfg.run.output_dir).resolve()))
    run = RunDir.of(cfg)
    save_resolved(cfg, run.root)
    with runtime.ray_session(cpus=cfg.scoring.num_actors * cfg.scoring.cpus_per_actor):
        if cfg.teacher.name_or_path is None:
            sft.main(cfg, target="teacher")
        score.main(cfg)
        names = list(cfg.run.pipeline_runs)
        for name in names:
            distil_into(cfg, name)
        where = Locations.of(cfg, run)
        students = {"start": Path(where.student_init),
                    **{n: run.root / n / "student" for n in names}}  # fmt: skip
        specs = [f"teacher={where.teacher}", *(f"{n}={p}" for n, p in students.items())]
        evaluate.main(with_section(cfg, "eval", models=specs), show_table=False)
    index = report.pipeline_report(cfg, run, names)
    dev_line = dev_losses(cfg, run, students)  # before the table: its log lines stay above it
    print("\n" + evaluation.format_table(evaluation.read_results(run.root), cfg.eval))
    print(dev_line)
    if len(names) > 1:
        print(f"one training run per student: the gaps between {', '.join(names)} above are "
              "single runs, not a comparison (training-seed noise is not measured here)")
    summary = {n: json.loads((run.root / n / "summary.json").read_text()) for n in names}
    steps = ", ".join(f"{n} {s['steps']} steps" for n, s in summary.items())
    print(f"\npipeline: done in {time.perf_counter() - t0:.0f} s ({steps}); report: {index}")
    return index
