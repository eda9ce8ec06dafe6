"""`pocl-ray distill CONFIG [key=value ...]`: curriculum distillation on Ray Train.

Reads the scoring job's table (`run.output_dir/scores/`; runs the scoring job first when there
is none), checks it was made from this run's data and config, builds the curriculum's stage
datasets and trains the student with a `TorchTrainer` (`pocl_ray.ray_train.train_fn`), with
checkpoints at every stage boundary and every `run.checkpoint_every` steps. Running the same
`run.name` again resumes from the latest checkpoint. Outputs in `run.output_dir`: `student/`
(Hugging Face folder with its tokenizer), `metrics.jsonl`, `stages.json`, `summary.json`,
`events.jsonl`, `tensorboard/`. See docs/distill.md. Also runnable as
`python -m jobs.distill CONFIG ...` (e.g. under `ray job submit`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import score
from pocl_ray import curriculum, difficulty, models
from pocl_ray.config import Config, ScalingConfig, save_resolved, to_dict
from pocl_ray.data import split_train_eval, tokenize_records
from pocl_ray.plain import get_teacher, load_task_records

log = logging.getLogger("pocl_ray.distill")

CONTROLLER_FAILURE_LIMIT = 2
"""Ray Train controller failures tolerated (its default, -1, retries forever)."""


class DistillJobError(RuntimeError):
    """The distillation job cannot run or finish; the message says why and what to do."""


class ResourceRequestError(DistillJobError):
    """The workers ask for CPUs / GPUs the cluster does not have."""


def check_resources(scaling: ScalingConfig, cluster: Mapping[str, float]) -> None:
    """Raise ResourceRequestError when the worker group can never be placed on `cluster`.

    Ray would wait forever for a GPU that is not there (ray-notes.md), so this runs before
    any other work. Local mode (num_workers 0) runs in this process: only the GPU is checked.
    """
    gpus = cluster.get("GPU", 0.0)
    if scaling.use_gpu and gpus == 0:
        raise ResourceRequestError(
            f"scaling.use_gpu=true but this Ray cluster has no GPU (resources: {_fmt(cluster)}); "
            "set scaling.use_gpu=false to train on CPUs, or connect to a cluster with GPUs "
            "(RAY_ADDRESS=... or `ray job submit`)"
        )
    n = max(scaling.num_workers, 1)
    per_gpu = scaling.resources_per_worker.get("GPU", 1.0 if scaling.use_gpu else 0.0)
    if per_gpu * n > gpus:
        raise ResourceRequestError(
            f"training needs {n} workers x {per_gpu:g} GPU = {per_gpu * n:g} GPUs; the "
            f"cluster has {gpus:g}; lower scaling.num_workers"
        )
    if scaling.num_workers == 0:
        return
    per_cpu = scaling.resources_per_worker.get("CPU", 1.0)
    cpus = cluster.get("CPU", 0.0)
    if per_cpu * n > cpus:
        raise ResourceRequestError(
            f"training needs {n} workers x {per_cpu:g} CPU = {per_cpu * n:g} CPUs; the cluster "
            f"has {cpus:g}; lower scaling.num_workers or set "
            "scaling.resources_per_worker={CPU: 0.5}"
        )


def _fmt(resources: Mapping[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(keep.items())) or "none"


# ---------------------------------------------------------------- the scores table


def model_folders(cfg: Config) -> dict[str, str]:
    """Where the scoring job put (or found) each model: the same rule as jobs/score.py."""
    out = Path(cfg.run.output_dir)
    return {
        "tokenizer": cfg.tokenizer.name_or_path
        or cfg.teacher.name_or_path
        or str(out / "tokenizer"),
        "teacher": cfg.teacher.name_or_path or str(out / "teacher"),
        "student_init": cfg.student.name_or_path or str(out / "student_init"),
    }


def _leaves(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            line
            for k in sorted(set(a) | set(b))
            for line in _leaves(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        ]
    return [] if a == b else [f"{prefix}: the table was made with {a!r}, this config has {b!r}"]


def table_problems(
    cfg: Config, manifest: dict[str, Any], fingerprint: str, folders: dict[str, str]
) -> list[str]:
    """Why the scores table does not fit this run (empty = it fits).

    Compared: the format, every hashed config field that shapes the table except the stage
    cut (distillation re-derives its stages from the ranks, so num_stages / fractions may
    differ), the data fingerprint, and the model folders' content ids.
    """
    if manifest.get("format_version") != score.FORMAT_VERSION:
        return [f"table format {manifest.get('format_version')}, expected {score.FORMAT_VERSION}"]
    ours = score.hashed_config(cfg)
    theirs = manifest["hashed_config"]
    out = _leaves(
        {k: v for k, v in theirs.items() if k != "stages"},
        {k: v for k, v in ours.items() if k != "stages"},
        "",
    )
    if manifest["data_fingerprint"] != fingerprint:
        out.append(
            f"data: fingerprint {manifest['data_fingerprint']} in the table, {fingerprint} now "
            "(the records changed)"
        )
    for name, folder in folders.items():
        recorded = (manifest["models"].get(name) or {}).get("id")
        if recorded is not None and score.model_id(folder) != recorded:
            out.append(f"{name}: {folder} changed since scoring (id {recorded} in the table)")
    return out


def ensure_table(cfg: Config) -> dict[str, Any]:
    """The manifest of `run.output_dir/scores/`, running the scoring job first when missing."""
    out = Path(cfg.run.output_dir)
    if not (out / "scores" / "manifest.json").exists():
        print(
            f"distill: no scores table in {out / 'scores'}; running the scoring job first "
            "(`pocl-ray score` with this config)",
            flush=True,
        )
        score.main(cfg)
    return score.read_manifest(out)


def training_table(cfg: Config, out: Path, *, cached: bool) -> pa.Table:
    """The table's training columns, in its row order, plus each row's difficulty bucket."""
    from pocl_ray.ray_train import TOPK_COLUMNS

    cols = ["sample_id", "difficulty_rank", "prompt_length", "input_ids", "labels"]
    table = pq.read_table(
        out / "scores" / score.TABLE_DIR, columns=cols + (TOPK_COLUMNS if cached else [])
    )
    sizes = difficulty.stage_sizes(
        table.num_rows, cfg.curriculum.num_stages, cfg.curriculum.fractions
    )
    ranks = table.column("difficulty_rank").to_numpy()
    buckets = curriculum.difficulty_buckets(ranks, sizes)
    return table.append_column("bucket", pa.array(buckets, pa.int64()))


# ---------------------------------------------------------------- the job


def main(cfg: Config, *, fault: dict[str, Any] | None = None) -> Path:
    """Run the distillation job; returns `run.output_dir`.

    Args:
        cfg: the run config.
        fault: tests only: {"step": N, "marker": path[, "rank": r]} makes a worker exit hard
            at global step N once (see `ray_train._maybe_fault`).

    Raises:
        ResourceRequestError: the workers ask for CPUs / GPUs the cluster does not have.
        DistillJobError: the scores table does not fit, the checkpoint was written with other
            settings, or training failed after `run.max_failures` restarts.
    """
    run = cfg.run
    out = Path(run.output_dir).resolve()
    storage = Path(run.storage_path).resolve() if run.storage_path else out / "ray"
    # Workers change directory into the run folder: every path they see is absolute.
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(run, output_dir=str(out), storage_path=str(storage))
    )
    started = score.connect_ray(cfg)
    try:
        return _run(cfg, fault=fault)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(cfg: Config, *, fault: dict[str, Any] | None) -> Path:
    import ray
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from pocl_ray import ray_train

    t_start = time.perf_counter()
    check_resources(cfg.scaling, ray.cluster_resources())  # before any work: would hang
    out = Path(cfg.run.output_dir)
    cur, world = cfg.curriculum, max(cfg.scaling.num_workers, 1)
    cached = cfg.loss.teacher_source == "cache"

    manifest = ensure_table(cfg)
    loaded = load_task_records(cfg, out)
    folders = model_folders(cfg)
    if problems := table_problems(cfg, manifest, score.data_fingerprint(loaded), folders):
        raise DistillJobError(
            f"the scores table in {out / 'scores'} does not match this run:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nrun `pocl-ray score` with the same config and overrides to rescore (it "
            "replaces the table), or use another run.output_dir"
        )
    if cached and not manifest.get("teacher_topk"):
        raise DistillJobError(
            f"loss.teacher_source=cache but the table in {out / 'scores'} has no teacher top-K; "
            "run `pocl-ray score` with scoring.teacher_topk=K"
        )
    table = training_table(cfg, out, cached=cached)
    n = table.num_rows
    if n != manifest["counts"]["scored"]:
        raise DistillJobError(
            f"{out / 'scores'} holds {n} rows but its manifest says {manifest['counts']['scored']}"
            "; run `pocl-ray score --force`"
        )
    tok = ray_train.load_tokenizer(cfg, folders["tokenizer"])
    train, held = split_train_eval(loaded.records, cfg.data.eval_fraction, seed=cfg.run.seed)
    lengths = dict(max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length)
    plan = curriculum.stage_table(
        cur, n=n, batch_size=cfg.optim.batch_size * world, loss_alpha=cfg.loss.alpha
    )
    if not cached and any(p.kd_ratio > 0 for p in plan) and not Path(folders["teacher"]).exists():
        # student-only signals: scoring never needed the teacher; train / load it now
        get_teacher(cfg, tok, tokenize_records(train, tok, **lengths).examples, out)

    order = curriculum.stage_order(
        table.column("difficulty_rank").to_numpy(),
        table.column("sample_id").to_pylist(),
        mode=cur.mode,
        seed=cfg.run.seed,
    )
    subsets = curriculum.stage_subsets(order, [p.size for p in plan])
    datasets = ray_train.stage_datasets(
        ray.put(table.drop_columns(["difficulty_rank"])),  # ray: the table, once
        plan,
        subsets,
        seed=cfg.run.seed,
        shuffle=cur.shuffle,
        batch_size=cfg.optim.batch_size,
        world_size=world,
    )
    if cur.plateau_patience:
        dev = tokenize_records(held, tok, **lengths).examples[: cfg.eval.max_examples]
        if not dev:
            raise DistillJobError(
                "curriculum.plateau_patience needs held-out data to evaluate on: set "
                "data.eval_fraction > 0"
            )
        datasets[ray_train.DEV_DATASET] = ray_train.dev_dataset(dev)

    table_key = {
        "config_hash": manifest["config_hash"],
        "data_fingerprint": manifest["data_fingerprint"],
        "models": {k: score.model_id(v) for k, v in folders.items() if Path(v).exists()},
    }
    settings = ray_train.run_settings(cfg, n=n, world_size=world, table_key=table_key)
    key = ray_train.settings_key(settings)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    latest = ray_train.latest_checkpoint(run_dir) if cfg.scaling.num_workers else None
    print(f"distill: plan for {n} samples, global batch {cfg.optim.batch_size * world}:")
    print(curriculum.format_plan(plan), flush=True)
    if latest is not None:
        state = ray_train.read_state(latest)
        if state["settings_key"] != key:
            raise DistillJobError(
                f"run {cfg.run.name!r} in {run_dir} was started with other settings:\n"
                + "\n".join(
                    f"  - {c}" for c in ray_train.settings_changes(state["settings"], settings)
                )
                + "\nrestore them to resume it, or start a new run with another run.name"
            )
        pos = state["position"]
        if pos["done"] and (out / "student" / "config.json").exists():
            print(
                f"distill: run {cfg.run.name!r} is already complete ({latest.name}); nothing to "
                f"train. Student: {out / 'student'}; use another run.name to train again"
            )
            return out
        print(
            f"distill: resuming run {cfg.run.name!r} from {latest}: stage {pos['stage']}, epoch "
            f"{pos['epoch']}, step {pos['step_in_epoch']} of the epoch (global step "
            f"{pos['global_step']}, {pos['samples_consumed']} samples consumed)",
            flush=True,
        )
    save_resolved(cfg, out)

    resources = dict(cfg.scaling.resources_per_worker)
    job = {
        "n": n,
        "num_buckets": len(difficulty.stage_sizes(n, cur.num_stages, cur.fractions)),
        "pad_id": tok.pad_token_id,
        "eos_ids": list(models.eos_token_ids(None, tok)),
        "tokenizer": folders["tokenizer"],
        "teacher": folders["teacher"],
        "student_init": folders["student_init"],
        "settings": settings,
        "settings_key": key,
        "threads": ray_train.threads_per_worker(resources) if cfg.scaling.num_workers else 0,
        "fault": fault,
        "local_mode": cfg.scaling.num_workers == 0,
    }
    ray_train.quiet_logs()  # local mode runs the loop in this process
    trainer = TorchTrainer(
        ray_train.train_fn,
        train_loop_config={"config": to_dict(cfg), "job": job},  # the one crossing into workers
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources or None,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.run.max_failures,
                controller_failure_limit=CONTROLLER_FAILURE_LIMIT,
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # print() stays print(): Ray Train's print-to-logger patch shows each line twice
            worker_runtime_env={
                "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}
            },
        ),
        datasets=datasets,
        # every dataset is already one rank's shard, cut by the plan (ray_train module doc)
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    t_fit = time.perf_counter()
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise DistillJobError(
            f"training failed (after up to run.max_failures={cfg.run.max_failures} restarts): "
            f"{_last_lines(str(e))}\nthe latest checkpoint in {run_dir} is kept: run the same "
            "command again to resume from it"
        ) from e
    _print_summary(
        cfg, out, world, fit_s=time.perf_counter() - t_fit, total_s=time.perf_counter() - t_start
    )
    return out


def _last_lines(text: str, n: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _print_summary(cfg: Config, out: Path, world: int, *, fit_s: float, total_s: float) -> None:
    import json

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    how = "local mode" if cfg.scaling.num_workers == 0 else f"{world} worker(s)"
    loss = summary["final_stage_loss"]
    print(
        f"distill: done in {total_s:.0f} s ({how}; training {fit_s:.0f} s): "
        f"{summary['stages']} stages, {summary['steps']} steps, {summary['samples']} samples, "
        f"final-stage loss {loss:.4f}, {summary['tokens_per_s']:.0f} tok/s\n"
        f"  student -> {out / 'student'}; metrics.jsonl, stages.json, summary.json, "
        f"tensorboard/ in {out}"
    )


if __name__ == "__main__":
    from pocl_ray.cli import main as cli_main

    sys.exit(cli_main(["distill", *sys.argv[1:]]))
