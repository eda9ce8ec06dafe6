"""The plain single-process pipeline (no Ray): the reference the Ray jobs reproduce.

built-in tasks → teacher SFT → difficulty signals + RRF → distil (plain KD and POCL, same
initial student, same compute) → greedy evaluation on the held-out split.
Each step's output lands in `run.output_dir`; the teacher is reused when it is already there.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from transformers.utils import logging as hf_logging

from pocl_ray import curriculum, difficulty, models, report, tasks
from pocl_ray.config import Config, load_config, save_resolved
from pocl_ray.data import LoadResult, Record, load_records, split_train_eval, tokenize_records
from pocl_ray.evaluation import generate, new_token_budget, score_predictions
from pocl_ray.signals import score_batch
from pocl_ray.train_step import run_curriculum, sft

log = logging.getLogger("pocl_ray.plain")


def load_task_records(cfg: Config, out: Path) -> LoadResult:
    """Read the configured data through the core loader; builtin tasks are written first."""
    source = cfg.data.source
    if source == "builtin":
        source = tasks.write_jsonl(
            tasks.generate(cfg.data.builtin_size, cfg.run.seed), out / "data" / "tasks.jsonl"
        )
    return load_records(
        source,
        format=cfg.data.format,
        split=cfg.data.split,
        limit=cfg.data.limit,
        on_bad_record=cfg.data.on_bad_record,
        rejects_path=out / "rejects.jsonl",
    )


def get_tokenizer(cfg: Config, train: list[Record], out: Path):
    """The configured pretrained tokenizer, or one trained on the training split and saved."""
    if cfg.tokenizer.name_or_path or cfg.teacher.name_or_path:
        return models.load_tokenizer(cfg.tokenizer, cfg.teacher)
    path = out / "tokenizer"
    if (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    texts = [r.prompt + r.references[0] for r in train]
    tok = models.train_tokenizer(texts, cfg.tokenizer.vocab_size)
    tok.save_pretrained(str(path))
    return tok


def get_teacher(cfg: Config, tok, train_ex, out: Path) -> torch.nn.Module:
    """A pretrained teacher, or the demo teacher: reused from `out/teacher` or trained by SFT."""
    if cfg.teacher.name_or_path:
        return models.freeze_teacher(models.load_pretrained(cfg.teacher.name_or_path, cfg.teacher))
    path = out / "teacher"
    if (path / "config.json").exists():
        log.info("teacher: reusing %s", path)
        return models.freeze_teacher(models.load_pretrained(path, cfg.teacher))
    torch.manual_seed(cfg.run.seed)
    teacher = models.build_tiny(cfg.teacher, tok, cfg.data.max_length)
    log.info(
        "teacher: none in %s yet; training a tiny one by SFT (%d params, %d epochs)",
        path,
        models.count_parameters(teacher),
        cfg.sft.epochs,
    )
    run_sft(
        cfg,
        teacher,
        train_ex,
        tok,
        epochs=cfg.sft.epochs,
        on_epoch=lambda e, loss: log.info("teacher SFT epoch %d: loss %.4f", e + 1, loss),
    )
    models.save_model(teacher, tok, path)
    return models.freeze_teacher(teacher)


def run_sft(cfg: Config, model, examples, tok, *, epochs: int, on_epoch=None) -> list[float]:
    """The core `sft` with the run's `sft.lr`, `sft.batch_size` and seed."""
    return sft(
        model,
        examples,
        epochs=epochs,
        lr=cfg.sft.lr,
        batch_size=cfg.sft.batch_size,
        pad_id=tok.pad_token_id,
        seed=cfg.run.seed,
        on_epoch=on_epoch,
    )


def new_student(cfg: Config, tok) -> torch.nn.Module:
    """The student's starting checkpoint: pretrained, or tiny with a seeded init."""
    if cfg.student.name_or_path:
        return models.load_pretrained(cfg.student.name_or_path, cfg.student)
    torch.manual_seed(cfg.run.seed + 1)
    return models.build_tiny(cfg.student, tok, cfg.data.max_length)


def starting_student(cfg: Config, tok, train_ex) -> torch.nn.Module:
    """`new_student`, then `sft.student_epochs` of SFT for a tiny one (its starting checkpoint)."""
    student = new_student(cfg, tok)
    if cfg.student.name_or_path is None and cfg.sft.student_epochs:
        log.info("student: %d epochs of SFT for its starting checkpoint", cfg.sft.student_epochs)
        run_sft(cfg, student, train_ex, tok, epochs=cfg.sft.student_epochs)
    return student


def score_difficulty(cfg: Config, train, train_ex, scorer, teacher, tok) -> pd.DataFrame:
    """Signals for every training example, fused into ranks and stages (core functions)."""
    sig = cfg.scoring
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
    student = new_student(cfg, tok)
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


def spearman(a, b) -> float:
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def run_plain(cfg: Config) -> pd.DataFrame:
    """The whole plain pipeline; returns (and prints) the comparison table."""
    t_start = time.perf_counter()
    hf_logging.disable_progress_bar()  # per-shard bars are noise for tiny models
    out = Path(cfg.run.output_dir)
    save_resolved(cfg, out)
    loaded = load_task_records(cfg, out)
    train, held = split_train_eval(loaded.records, cfg.data.eval_fraction, seed=cfg.run.seed)
    log.info(
        "data: %d read, %d accepted, %d rejected; %d train / %d held out",
        loaded.n_read,
        loaded.n_accepted,
        len(loaded.rejected),
        len(train),
        len(held),
    )
    tok = get_tokenizer(cfg, train, out)
    lengths = dict(max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length)
    train_ex = tokenize_records(train, tok, **lengths).examples
    held_ex = tokenize_records(held, tok, **lengths).examples
    teacher = get_teacher(cfg, tok, train_ex, out)

    init = starting_student(cfg, tok, train_ex)
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
