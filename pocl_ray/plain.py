"""The plain single-process pipeline (no Ray): the reference the Ray jobs reproduce.

built-in tasks → teacher SFT → difficulty signals + RRF → distil (plain KD and POCL, same
initial student, same compute) → greedy evaluation on the held-out split.
Each step's output lands in `run.output_dir`; the teacher is reused when it is already there.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
from transformers.utils import logging as hf_logging

from pocl_ray import artifacts, curriculum, difficulty, models, report
from pocl_ray.config import Config, load_config, save_resolved
from pocl_ray.evaluation import generate, new_token_budget, score_predictions
from pocl_ray.loop import run_curriculum
from pocl_ray.run_dir import RunDir
from pocl_ray.scores import spearman
from pocl_ray.signals import score_batch

log = logging.getLogger("pocl_ray.plain")


def score_difficulty(cfg: Config, train, train_ex, scorer, teacher, tok) -> pd.DataFrame:
    """Signals for every training example, fused into ranks and stages (core functions)."""
    sig = cfg.scoring
    if sig.dtype is not None:  # scoring.dtype: score with copies at that precision
        same = scorer is teacher
        scorer = copy.deepcopy(scorer).to(models.DTYPES[sig.dtype])
        teacher = scorer if same else teacher and copy.deepcopy(teacher).to(scorer.dtype)
    budget = new_token_budget(
        sig.max_new_tokens,
        positions=models.max_positions(scorer.config),
        max_prompt_length=cfg.data.max_prompt_length,
    )
    cols: dict[str, list[float]] = {s: [] for s in sig.signals}
    for start in range(0, len(train_ex), sig.batch_size):
        part = slice(start, start + sig.batch_size)
        got = score_batch(
            train_ex[part],
            [r.references for r in train[part]],
            signals=sig.signals,
            scorer=scorer,
            teacher=teacher,
            tokenizer=tok,
            max_new_tokens=budget,
        )
        for s in sig.signals:
            cols[s] += got.signals[s]
    table = pd.DataFrame({"sample_id": [e.sample_id for e in train_ex], **cols})
    table["level"] = [r.extra.get("level") for r in train]
    table = difficulty.fuse(table, sig.signals, k=sig.fusion_k)
    sizes = difficulty.stage_sizes(len(table), cfg.curriculum.num_stages, cfg.curriculum.fractions)
    return difficulty.assign_stages(table, sizes)


def evaluate(model, tok, records, examples, cfg: Config) -> dict[str, float]:
    ev = cfg.eval
    prompts = [e.input_ids[: e.prompt_length] for e in examples]
    budget = new_token_budget(
        ev.max_new_tokens,
        positions=models.max_positions(model.config),
        max_prompt_length=cfg.data.max_prompt_length,
    )
    preds = generate(
        model,
        tok,
        prompts,
        max_new_tokens=budget,
        decoding=ev.decoding,
        seed=ev.seeds[0],
        temperature=ev.temperature,
        top_p=ev.top_p,
        top_k=ev.top_k,
        no_repeat_ngram_size=ev.no_repeat_ngram_size,
    )
    return score_predictions(preds, [r.references for r in records])


def distil(cfg: Config, mode: str, init_state, tok, teacher, train_ex, ranks, out: Path):
    """Distil a copy of the initial student with curriculum `mode`; log per step to JSONL."""
    run_cfg = replace(cfg, curriculum=replace(cfg.curriculum, mode=mode))
    student = artifacts.new_student(cfg, tok, teacher)
    student.load_state_dict(init_state)
    plan = curriculum.stage_table(
        run_cfg.curriculum,
        n=len(train_ex),
        batch_size=cfg.optim.batch_size,
        loss_alpha=cfg.loss.alpha,
    )
    log.info("distil %s: plan\n%s", mode, curriculum.format_plan(plan))
    path = out / f"metrics_{mode}.jsonl"
    t0 = time.perf_counter()
    with path.open("w") as f:
        history = run_curriculum(
            student,
            teacher,
            train_ex,
            ranks,
            run_cfg,
            pad_id=tok.pad_token_id,
            on_step=lambda row: f.write(json.dumps(row) + "\n"),
            eos_ids=models.eos_token_ids(None, tok),
        )
    log.info(
        "distil %s: %d steps in %.0f s, final loss %.4f",
        mode,
        len(history),
        time.perf_counter() - t0,
        history[-1]["loss"],
    )
    return student


def run_plain(cfg: Config) -> pd.DataFrame:
    """The whole plain pipeline; returns (and prints) the comparison table."""
    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()  # per-shard bars are noise for tiny models
    out = Path(cfg.run.output_dir)
    run = RunDir(out)
    save_resolved(cfg, out)
    inputs = artifacts.read_inputs(cfg, run)
    train, held = inputs.train, inputs.held
    log.info(
        "data: %d read, %d accepted, %d rejected; %d train / %d held out",
        *(inputs.counts[k] for k in ("read", "accepted", "rejected", "train", "held_out")),
    )
    tok = artifacts.tokenizer(cfg, run, train)
    train_ex = artifacts.tokenize(cfg, tok, train)
    held_ex = artifacts.tokenize(cfg, tok, held)
    teacher = artifacts.teacher(cfg, run, tok, train_ex)

    init = artifacts.starting_student(cfg, tok, train_ex, teacher)
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    scorer = teacher if cfg.scoring.scorer == "teacher" else init
    t0 = time.perf_counter()
    table = score_difficulty(cfg, train, train_ex, scorer, teacher, tok)
    table.to_parquet(out / "scores.parquet")
    log.info(
        "scores: %d samples in %.0f s -> %s",
        len(table),
        time.perf_counter() - t0,
        out / "scores.parquet",
    )
    if table["level"].notna().all():
        rho = spearman(table["difficulty_rank"], table["level"])
        log.info("measurer quality: Spearman(difficulty_rank, true level) = %.3f", rho)
    ranks = table["difficulty_rank"].tolist()

    rows = {"teacher": evaluate(teacher, tok, held, held_ex, cfg)}
    for mode, name in (("none", "KD student"), ("pocl", "POCL student")):
        student = distil(cfg, mode, init_state, tok, teacher, train_ex, ranks, out)
        rows[name] = evaluate(student, tok, held, held_ex, cfg)
        models.save_model(student, tok, out / f"student_{mode}")
    result = pd.DataFrame(rows).T[["exact_match", "rougeL"]].round(2)
    result.index.name = "model"
    result.to_csv(out / "results.csv")
    index = report_plain(out)
    print(f"\nHeld-out split: {len(held)} examples, {cfg.eval.decoding} decoding")
    print(result.to_string())
    print(f"\nReport: {index}")
    print(f"Artefacts in {out}/ (total {time.perf_counter() - t_start:.0f} s)")
    return result


PLAIN_RUNS = {"plain KD (mode none)": "metrics_none.jsonl", "POCL": "metrics_pocl.jsonl"}


def report_plain(run_dir: str | Path) -> Path:
    """(Re)build `run_dir/report/` from the files a plain demo run wrote."""
    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    scores = pd.read_parquet(run / "scores.parquet")
    sizes = difficulty.stage_sizes(len(scores), cfg.curriculum.num_stages, cfg.curriculum.fractions)
    runs = {name: pd.read_json(run / f, lines=True) for name, f in PLAIN_RUNS.items()}
    results = pd.read_csv(run / "results.csv").assign(set="heldout", seed=cfg.eval.seeds[0])
    return report.build_report(
        run / "report", scores=scores, sizes=sizes, runs=runs, results=results, schedule_run="POCL"
    )
