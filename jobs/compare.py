"""`pocl-ray compare CONFIG [--methods kd,pocl,...] [--seeds N] [key=value ...]`:
the same distillation with several curricula, each with N training seeds, evaluated alike;
the verdict comes from paired differences against KD (pocl_ray/compare.py), never one run.

1. Score once (`jobs.score`): every student trains on the same table from the same starting
   student (and the SFT of the demo teacher first, as in the pipeline).
2. Distil each (method, seed) into `compare/<method>/seed<k>/` (reused when its student is
   there): pocl = the configured curriculum, kd = no curriculum (mode none), random / anti =
   the same stages in a random / hardest-first order, sft = mode none with λ = 0 (CE only),
   pocl_rescore = pocl with `curriculum.rescore` (the rest re-ranked at each stage end).
   Seed k sets `run.train_seed` = the run's training seed + k; the plan, so the number of
   sample visits, is the same for every method.
3. Evaluate every student and the starting one with one protocol (`jobs.evaluate`) into
   `compare/eval/`.
4. `compare/`: seed_scores.csv (one ROUGE-L per method, seed and set), summary.csv (mean, sd),
   paired.csv (difference against KD with its 95 % t-interval and verdict), comparison.txt
   and comparison.png; the table and verdicts are printed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pandas as pd

from jobs import distill, evaluate, runtime, score, sft
from pocl_ray import compare, evaluation, report, storage
from pocl_ray.compare import REFERENCE, SEP
from pocl_ray.config import Config, ConfigError, with_section
from pocl_ray.run_dir import Locations, RunDir

METHODS = {
    "pocl": {},
    "kd": {"mode": "none", "rescore": False},
    "random": {"mode": "random", "rescore": False},
    "anti": {"mode": "anti", "rescore": False},
    "sft": {"mode": "none", "kd_ratio_start": 0.0, "kd_ratio_end": 0.0, "rescore": False},
    "pocl_rescore": {"mode": "pocl", "rescore": True},
}
"""Each method's curriculum changes to the configured config (pocl: the configured one)."""
FOLDER = "compare"


def parse_methods(text: str) -> list[str]:
    """`kd,pocl,...` -> the method list (KD first: the reference), or a ConfigError."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError([f"--methods: got {text!r}; give each of {list(METHODS)} at most once"],
                          "the compare command")  # fmt: skip
    return [REFERENCE] + [m for m in names if m != REFERENCE]


def main(
    cfg: Config,
    *,
    methods: list[str],
    seeds: int,
    teacher: bool = False,
    reference: str = REFERENCE,
    show: bool = True,
) -> Path:
    """Train, evaluate and compare; returns the `compare/` folder.

    teacher: evaluate the teacher too (the pipeline's table has it); reference: the method
    the others are paired with; show: print the table (the pipeline prints it after its
    report)."""
    if seeds < 1:
        raise ConfigError([f"--seeds: got {seeds}; use 1 or more (3+ for an interval)"],
                          "the compare command")  # fmt: skip
    with storage.synced(cfg.run.output_dir):
        return _run(cfg, methods, seeds, teacher, reference, show)



def _run(cfg: Config, methods: list[str], seeds: int, teacher: bool, reference: str,
         show: bool) -> Path:  # fmt: skip
    t0, run = time.perf_counter(), RunDir.of(cfg)
    print(f"compare: {', '.join(methods)} x {seeds} training seed(s), the same table, starting "
          f"student and sample visits; against {reference}", flush=True)  # fmt: skip
    with runtime.ray_session(cpus=cfg.scoring.num_actors * cfg.scoring.cpus_per_actor):
        if cfg.teacher.name_or_path is None:
            sft.main(cfg, target="teacher")
        score.main(cfg)
        students = train_students(cfg, methods, seeds)
        evaluate_students(cfg, students, teacher=teacher)
    text = write(run, reference)
    if show:
        print("\n" + text)
    out = run.root / FOLDER
    print(f"\ncompare: done in {time.perf_counter() - t0:.0f} s -> {out} (comparison.txt, "
          "comparison.png, seed_scores.csv, paired.csv)")  # fmt: skip
    return out


def train_students(cfg: Config, methods: list[str], seeds: int) -> dict[tuple[str, int], Path]:
    """Every (method, training seed offset) student, seed by seed: an interrupted comparison
    has whole seeds of every method. Returns their folders."""
    return {(m, k): _distil(cfg, m, k) for k in range(seeds) for m in methods}


def evaluate_students(
    cfg: Config, students: dict[tuple[str, int], Path], *, teacher: bool = False
) -> None:
    """The starting student (and the teacher) and every trained one, with one protocol, into
    compare/eval/ (`<method>.seed<k>` names)."""
    where = Locations.of(cfg, RunDir.of(cfg))
    specs = [f"teacher={where.teacher}"] if teacher else []
    specs += [f"start={where.student_init}",
              *(f"{m}{SEP}{k}={p / 'student'}" for (m, k), p in students.items())]  # fmt: skip
    evaluate.main(with_section(cfg, "eval", models=specs), show_table=False,
                  folder=f"{FOLDER}/eval")  # fmt: skip


def _distil(cfg: Config, method: str, k: int) -> Path:
    """One student of `method` with training seed offset `k`, in compare/<method>/seed<k>/."""
    into = f"{FOLDER}/{method}/seed{k}"
    dest = RunDir.of(cfg).root / into
    if (dest / "student" / "config.json").exists():
        print(f"compare: {method} seed {k}: reusing {dest / 'student'}", flush=True)
        return dest
    seeded = with_section(cfg, "run", name=f"{cfg.run.name}-cmp-{method}-s{k}",
                   train_seed=cfg.run.training_seed + k)  # fmt: skip
    print(f"compare: {method} seed {k}: distilling (run.train_seed={seeded.run.train_seed})",
          flush=True)  # fmt: skip
    return distill.main(with_section(seeded, "curriculum", **METHODS[method]), into=into)


def seed_scores(results: pd.DataFrame) -> pd.DataFrame:
    """results.csv mean rows of `<method>.seed<k>` models -> method, train_seed, set, rougeL."""
    mean = results[(results["stat"] == "mean") & results["model"].str.contains(SEP, regex=False)]
    split = mean["model"].str.split(SEP, regex=False, expand=True)
    return pd.DataFrame({
        "method": split[0].to_numpy(),
        "train_seed": split[1].astype(int).to_numpy(),
        "set": mean["set"].to_numpy(),
        "rougeL": mean["rougeL"].to_numpy(),
    })  # fmt: skip


def write(run: RunDir, reference: str) -> str:
    """compare/: seed_scores.csv, summary.csv, paired.csv, comparison.txt and .png from the
    evaluation in compare/eval/; returns the text (the table, the verdicts, the references)."""
    out = run.root / FOLDER
    results = evaluation.read_results(run.root, f"{FOLDER}/eval")
    scores = seed_scores(results)
    table = compare.summary(scores)
    pairs = compare.paired(scores, reference)
    text = compare.format_table(table, pairs, reference, "ROUGE-L")
    means = results[results["stat"] == "mean"]
    for name, label in (("teacher", "the teacher"), ("start", "the starting student")):
        rows = means[means["model"] == name]
        if not rows.empty:
            text += f"\n{label}: " + ", ".join(
                f"{s} {v:.2f}" for s, v in zip(rows["set"], rows["rougeL"])
            )
    scores.to_csv(out / "seed_scores.csv", index=False, float_format="%.6f")
    table.to_csv(out / "summary.csv", index=False, float_format="%.6f")
    pd.DataFrame([{**dataclasses.asdict(p), "verdict": p.verdict} for p in pairs]).to_csv(
        out / "paired.csv", index=False, float_format="%.6f"
    )
    (out / "comparison.txt").write_text(text + "\n", encoding="utf-8")
    report.plot_comparison(scores, reference, out / "comparison.png")
    return text
