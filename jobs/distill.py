"""`pocl-ray distill CONFIG [key=value ...]`: curriculum distillation on Ray Train.

1. Start or join Ray; check that the worker group fits the cluster.
2. Read the scores table (running the scoring job first when there is none) and check it
   was made from this run's data, config and models.
3. Build the plan and one dataset per (stage, worker) from the table.
4. Resume: the same `run.name` continues from its latest checkpoint (settings must match).
5. Train: `ray_train.train_fn` on every worker. Outputs in `run.output_dir`: `student/`,
   `metrics.jsonl`, `stages.json`, `summary.json`, `events.jsonl`, `tensorboard/`.
See docs/distill.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jobs import runtime, score
from pocl_ray import artifacts, curriculum, difficulty, models, scores
from pocl_ray.config import Config, save_resolved, to_dict
from pocl_ray.run_dir import Locations, RunDir, absolute, changes, read_manifest


def main(cfg: Config, *, fault: dict[str, Any] | None = None) -> Path:
    """Run the distillation job; returns `run.output_dir`.

    fault: tests only: {"step": N, "marker": path[, "rank": r]} makes a worker exit hard at
        global step N once (`ray_train._maybe_fault`).
    """
    cfg = absolute(cfg)
    with runtime.ray_session(cpus=cfg.scaling.num_workers):
        runtime.preflight(runtime.worker_request(cfg.scaling), runtime.cluster_resources())
        return _run(cfg, fault)


def _run(cfg: Config, fault: dict[str, Any] | None) -> Path:
    import ray

    from pocl_ray import ray_train

    t_start = time.perf_counter()
    run, cur = RunDir(Path(cfg.run.output_dir)), cfg.curriculum
    world, cached = max(cfg.scaling.num_workers, 1), cfg.loss.teacher_source == "cache"

    # 2. the scores table, checked against this run's inputs
    if read_manifest(run.scores) is None:
        print(f"distill: no scores table in {run.scores}; running the scoring job first "
              "(`pocl-ray score` with this config)", flush=True)  # fmt: skip
        score.main(cfg)
    manifest, inputs = read_manifest(run.scores), artifacts.read_inputs(cfg, run)
    where = Locations.of(cfg, run)
    folders = {"tokenizer": where.tokenizer, "teacher": where.teacher,
               "student_init": where.student_init}  # fmt: skip
    existing = {k: v for k, v in folders.items() if Path(v).exists()}
    key_now = scores.table_key(cfg, inputs.fingerprint, existing)
    if problems := scores.table_problems(cfg, manifest, key_now):
        raise runtime.JobError(
            f"the scores table in {run.scores} does not match this run:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nrun `pocl-ray score` with the same config and overrides to rescore (it "
            "replaces the table), or use another run.output_dir"
        )
    if cached and not manifest["teacher_topk"]:
        raise runtime.JobError(
            f"loss.teacher_source=cache but the table in {run.scores} has no teacher top-K; "
            "run `pocl-ray score` with scoring.teacher_topk=K"
        )
    table = scores.training_table(cfg, run, cached=cached)
    n = table.num_rows
    tok = models.load_tokenizer(where.tokenizer, trust_remote_code=cfg.teacher.trust_remote_code)

    # 3. the plan and the stage datasets
    plan = curriculum.stage_table(
        cur, n=n, batch_size=cfg.optim.batch_size * world, loss_alpha=cfg.loss.alpha
    )
    if not cached and any(p.kd_ratio > 0 for p in plan) and "teacher" not in existing:
        # student-only signals: scoring never needed the teacher; train or load it now
        artifacts.teacher(cfg, run, tok, artifacts.tokenize(cfg, tok, inputs.train))
    ranks, ids = table.column("difficulty_rank").to_numpy(), table.column("sample_id").to_pylist()
    order = curriculum.stage_order(ranks, ids, mode=cur.mode, seed=cfg.run.seed)
    datasets = ray_train.stage_datasets(
        ray.put(table.drop_columns(["difficulty_rank"])),  # ray: the table, once
        plan,
        curriculum.stage_subsets(order, [p.size for p in plan]),
        seed=cfg.run.seed,
        shuffle=cur.shuffle,
        batch_size=cfg.optim.batch_size,
        world_size=world,
    )
    if cur.plateau_patience:
        dev = artifacts.tokenize(cfg, tok, inputs.held)[: cfg.eval.max_examples]
        if not dev:
            raise runtime.JobError("curriculum.plateau_patience needs held-out data to "
                                   "evaluate on: set data.eval_fraction > 0")  # fmt: skip
        datasets[ray_train.DEV_DATASET] = ray_train.examples_dataset(dev)

    # 4. resume the same run.name, or start it
    table_key = {**key_now, "config_hash": manifest["key"]["config_hash"]}
    settings = ray_train.run_settings(cfg, n=n, world_size=world, table_key=table_key)
    key = ray_train.settings_key(settings)
    print(f"distill: plan for {n} samples, global batch {cfg.optim.batch_size * world}:")
    print(curriculum.format_plan(plan), flush=True)
    if _already_done(cfg, run, settings, key):
        return run.root
    save_resolved(cfg, run.root)

    # 5. train
    job = {
        "n": n,
        "num_buckets": len(difficulty.stage_sizes(n, cur.num_stages, cur.fractions)),
        "pad_id": tok.pad_token_id,
        "eos_ids": list(models.eos_token_ids(None, tok)),
        "tokenizer": where.tokenizer,
        "teacher": where.teacher,
        "student_init": where.student_init,
        "settings": settings,
        "settings_key": key,
        "threads": ray_train.threads_per_worker(cfg),
        "fault": fault,
        "local_mode": cfg.scaling.num_workers == 0,
    }
    ray_train.quiet_logs()  # local mode runs the loop in this process
    trainer = ray_train.build_trainer(
        ray_train.train_fn,
        {"config": to_dict(cfg), "job": job},
        cfg,
        name=cfg.run.name,
        datasets=datasets,
        plan_sharded=True,
        max_failures=cfg.run.max_failures,
        keep_checkpoints=cfg.run.keep_checkpoints,
    )
    t_fit = time.perf_counter()
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        last = "\n".join(str(e).strip().splitlines()[-6:])
        raise runtime.JobError(
            f"training failed (after up to run.max_failures={cfg.run.max_failures} restarts): "
            f"{last}\nthe latest checkpoint in {run.storage(cfg) / cfg.run.name} is kept: run "
            "the same command again to resume from it"
        ) from e
    summary = json.loads((run.root / "summary.json").read_text(encoding="utf-8"))
    how = "local mode" if cfg.scaling.num_workers == 0 else f"{world} worker(s)"
    print(
        f"distill: done in {time.perf_counter() - t_start:.0f} s ({how}; training "
        f"{time.perf_counter() - t_fit:.0f} s): {summary['stages']} stages, {summary['steps']} "
        f"steps, {summary['samples']} samples, final-stage loss "
        f"{summary['final_stage_loss']:.4f}, {summary['tokens_per_s']:.0f} tok/s -> "
        f"{run.root / 'student'} (metrics.jsonl, stages.json, summary.json, tensorboard/)"
    )
    return run.root


def _already_done(cfg: Config, run: RunDir, settings: dict, key: str) -> bool:
    """Say how the run continues: True when it is complete; raise when its checkpoint was
    written with other settings."""
    from pocl_ray import ray_train

    if cfg.scaling.num_workers == 0:  # local mode keeps no checkpoints
        return False
    latest = ray_train.latest_checkpoint(run.storage(cfg) / cfg.run.name)
    if latest is None:
        return False
    state = ray_train.read_state(latest)
    if state["settings_key"] != key:
        raise runtime.JobError(
            f"run {cfg.run.name!r} in {latest.parent} was started with other settings:\n"
            + "\n".join(f"  - {c}" for c in changes(state["settings"], settings))
            + "\nrestore them to resume it, or start a new run with another run.name"
        )
    pos = state["position"]
    if pos["done"] and (run.root / "student" / "config.json").exists():
        print(
            f"distill: run {cfg.run.name!r} is already complete ({latest.name}); nothing to "
            f"train. Student: {run.root / 'student'}; use another run.name to train again"
        )
        return True
    print(
        f"distill: resuming run {cfg.run.name!r} from {latest}: stage {pos['stage']}, epoch "
        f"{pos['epoch']}, step {pos['step_in_epoch']} of the epoch (global step "
        f"{pos['global_step']}, {pos['samples_consumed']} samples consumed)",
        flush=True,
    )
    return False
