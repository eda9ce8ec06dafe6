"""`pocl-ray pipeline CONFIG [key=value ...]` and `pocl-ray demo [key=value ...]`: every job
in order on one Ray instance, then the report.

1. SFT of the demo teacher (`jobs.sft`; skipped for a pretrained teacher).
2. Scoring (`jobs.score`): the scores table and the starting student.
3. The distillations of `run.pipeline_runs`, each with `run.pipeline_seeds` training seeds,
   from the same starting student at equal sample visits (`jobs.compare`, into
   `compare/<method>/seed<k>/`): the configured curriculum (pocl), the plain-KD control (kd,
   curriculum mode none) and the SFT control (sft, mode none with λ = 0: CE only).
4. Evaluation of the teacher, the starting student and the trained students (`compare/eval/`).
5. The comparison (`compare/`: mean ± sd, paired intervals against kd, verdicts), the report
   (`report/index.html`) and each student's held-out CE (`dev_loss.json`), printed once.
Every step reuses its output when it is already there, so re-running is fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from jobs import compare, runtime
from pocl_ray import artifacts, loop, models, report, storage
from pocl_ray.compare import REFERENCE, SEP
from pocl_ray.config import Config, save_resolved, with_section
from pocl_ray.run_dir import Locations, RunDir


def reference(names: list[str]) -> str:
    """The run the others are compared with: plain KD when it runs, else the first."""
    return REFERENCE if REFERENCE in names else names[0]


def dev_losses(cfg: Config, run: RunDir, students: dict[tuple[str, int], Path]) -> str:
    """Each student's token-mean response CE on the held-out split (`dev_loss.json`), and a
    line with each method's mean ± sd over its training seeds."""
    inputs = artifacts.read_inputs(cfg, run)
    tok = models.load_tokenizer(Locations.of(cfg, run).tokenizer)
    dev = artifacts.tokenize(cfg, tok, inputs.held)[: cfg.eval.max_examples]
    if not dev:
        return "dev loss: no held-out data (data.eval_fraction = 0)"
    folders = {"start": Path(Locations.of(cfg, run).student_init)}
    folders |= {f"{m}{SEP}{k}": p / "student" for (m, k), p in students.items()}
    losses = {}
    for name, folder in folders.items():
        model = models.load_pretrained(folder, cfg.student)
        losses[name] = loop.mean_ce(model, dev, tok.pad_token_id, batch_size=8)
    (run.root / "dev_loss.json").write_text(json.dumps(
        {"examples": len(dev), "token_mean_ce": losses}, indent=2) + "\n")  # fmt: skip
    by_method = pd.Series(losses).groupby(lambda n: n.split(SEP)[0], sort=False)
    shown = ", ".join(f"{m} {v.mean():.4f}" + (f" ± {v.std():.4f}" if len(v) > 1 else "")
                      for m, v in by_method)  # fmt: skip
    return f"dev loss (held-out response CE, {len(dev)} examples): {shown}"


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
    names, seeds = list(cfg.run.pipeline_runs), cfg.run.pipeline_seeds
    print(f"pipeline: {', '.join(names)} x {seeds} training seed(s) from one starting student "
          "and one scores table, at equal sample visits", flush=True)  # fmt: skip
    with runtime.ray_session(cpus=cfg.scoring.num_actors * cfg.scoring.cpus_per_actor):
        out = compare.main(cfg, methods=names, seeds=seeds, teacher=True,
                           reference=reference(names), show=False)  # fmt: skip
    students = {(m, k): out / m / f"seed{k}" for k in range(seeds) for m in names}
    text = (out / "comparison.txt").read_text(encoding="utf-8").rstrip()
    index = report.pipeline_report(cfg, run, names)
    dev_line = dev_losses(cfg, run, students)  # before the table: its log lines stay above it
    print("\n" + text)
    print(dev_line)
    if seeds < 3:
        print(f"{seeds} training seed(s) per method: too few for an interval, so the gaps above "
              "are not a comparison; set run.pipeline_seeds to 3 or more")  # fmt: skip
    summary = json.loads((students[(names[0], 0)] / "summary.json").read_text())
    print(f"\npipeline: done in {time.perf_counter() - t0:.0f} s ({len(students)} students, "
          f"{summary['steps']} steps and {summary['samples']} sample visits each); "
          f"report: {index}")  # fmt: skip
    return index
