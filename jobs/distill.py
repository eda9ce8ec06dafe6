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
from pocl_ray import artifacts, curriculum, models, rescore, scores, storage
from pocl_ray.config import Config, save_resolved, to_dict
from pocl_ray.run_dir import Locations, RunDir, absolute, read_manifest, train_storage


def main(cfg: Config, *, into: str | None = None, fault: dict[str, Any] | None = None) -> Path:
    """Run the distillation job; returns the folder of its outputs (`run.output_dir`).

    into: a subfolder of the run directory for the outputs (`pocl-ray pipeline` and `compare`
        keep one per trained student); the scores table and models still come from the run.
    fault: tests only: {"step": N, "marker": path[, "rank": r]} makes a worker exit hard at
        global step N once (`ray_train._maybe_fault`).
    """
    cfg = absolute(cfg)
    sig = cfg.scoring  # rescore rounds run the scoring pool between stages
    pool = sig.num_actors * sig.cpus_per_actor if cfg.curriculum.rescore else 0
    cpus = max(cfg.scaling.num_workers, pool)
    with storage.synced(cfg.run.output_dir), runtime.ray_session(cpus=cpus):
        runtime.preflight(runtime.worker_request(cfg.scaling), runtime.cluster_resources())
        return _run(cfg, into, fault)


def _run(cfg: Config, into: str | None, fault: dict[str, Any] | None) -> Path:
    t_start = time.perf_counter()
    run = RunDir.of(cfg)
    out = run.root / into if into else run.root
    world = max(cfg.scaling.num_workers, 1)

    # 2.-4. the scores table (checked against this run's inputs), the plan and the stage
    # datasets, the checkpoint to resume: `ray_train.prepare_distill`, shared with Tune trials
    if read_manifest(run.scores) is None:
        print(f"distill: no scores table in {run.scores}; running the scoring job first "
              "(`pocl-ray score` with this config)", flush=True)  # fmt: skip
        score.main(cfg)
    setup, latest = _setup(cfg, out, fault)
    print(f"distill: plan for {setup.n} samples, global batch {cfg.optim.batch_size * world}:")
    print(curriculum.format_plan(setup.plan), flush=True)
    if _already_done(cfg, out, latest):
        return out
    save_resolved(cfg, out)

    # 5. train
    from pocl_ray import ray_train

    ray_train.quiet_logs()  # local mode runs the loop in this process
    t_fit = time.perf_counter()
    if cfg.curriculum.rescore:
        _train_rescored(cfg, out, fault, setup, latest)
    else:
        _fit(cfg, setup)
    if storage.is_uri(cfg.run.output_dir):  # rank 0 wrote the student on its own node
        storage.pull(cfg.run.output_dir, run.root)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    how = "local mode" if cfg.scaling.num_workers == 0 else f"{world} worker(s)"
    print(
        f"distill: done in {time.perf_counter() - t_start:.0f} s ({how}; training "
        f"{time.perf_counter() - t_fit:.0f} s): {summary['stages']} stages, {summary['steps']} "
        f"steps, {summary['samples']} samples, final-stage loss "
        f"{summary['final_stage_loss']:.4f}, {summary['tokens_per_s']:.0f} tok/s -> "
        f"{out / 'student'} (metrics.jsonl, stages.json, summary.json, tensorboard/)"
    )
    return out


def _setup(cfg: Config, out: Path, fault, rounds=()) -> tuple[Any, dict | None]:
    """`ray_train.prepare_distill` and the latest checkpoint's state, or a JobError."""
    from pocl_ray import ray_train

    try:
        setup = ray_train.prepare_distill(cfg, out=out, fault=fault, rounds=rounds)
        return setup, ray_train.latest_state(cfg, setup.job)
    except ray_train.SetupError as e:
        raise runtime.JobError(str(e)) from e


def _fit(cfg: Config, setup, **job: Any) -> None:
    """One Ray Train run of `ray_train.train_fn` (`job` overrides entries of setup.job)."""
    import ray

    from pocl_ray import ray_train

    trainer = ray_train.build_trainer(
        ray_train.train_fn,
        {"config": to_dict(cfg), "job": {**setup.job, **job}},
        cfg,
        name=cfg.run.name,
        datasets=setup.datasets,
        plan_sharded=True,
        max_failures=cfg.run.max_failures,
        keep_checkpoints=cfg.run.keep_checkpoints,
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        last = "\n".join(str(e).strip().splitlines()[-6:])
        raise runtime.JobError(
            f"training failed (after up to run.max_failures={cfg.run.max_failures} restarts): "
            f"{last}\nthe latest checkpoint in "
            f"{storage.redact(storage.join(train_storage(cfg), cfg.run.name))} is kept: run "
            "the same command again to resume from it"
        ) from e


def _train_rescored(cfg: Config, out: Path, fault, setup, latest: dict | None) -> None:
    """curriculum.rescore: one Train run per stage, each ending at its stage's checkpoint;
    between them a scoring round re-ranks the samples not used yet (`_rescore_round`).
    Rounds already on disk are reused, so an interrupted run resumes on the same stages."""
    stages = len(setup.plan)
    trained = False  # the first fit of a command that finds a checkpoint is a resume
    for stage in range(stages):
        done = latest is not None and (latest["position"]["done"]
                                       or latest["position"]["stage"] > stage)  # fmt: skip
        if not done:
            print(f"distill: rescore: training stage {stage + 1} of {stages}", flush=True)
            continues = f"rescore round {stage}" if trained else None
            _fit(cfg, setup, stop_after=stage, continues=continues)
            trained = True
            if storage.is_uri(cfg.run.output_dir):  # rank 0 saved the student on its node
                storage.pull(cfg.run.output_dir, RunDir.of(cfg).root)
        if stage + 1 == stages:
            return
        if _takes_the_rest(cfg, setup, stage + 1):
            continue  # a round would change no sample and (shuffled) no batch
        rounds = rescore.read_rounds(out, stage + 1)
        if len(rounds) < stage + 1:
            rounds.append(_rescore_round(cfg, out, setup, rounds, stage))
        setup, latest = _setup(cfg, out, fault, rounds)


def _takes_the_rest(cfg: Config, setup, stage: int) -> bool:
    """Stage `stage` uses every sample and shuffles them: re-ranking the rest before it
    changes nothing (with curriculum.shuffle false it would change the batches' order)."""
    return cfg.curriculum.shuffle and setup.plan[stage].size == setup.n


def _rescore_round(cfg: Config, out: Path, setup, rounds: list[list[str]], stage: int) -> list[str]:
    """Score the samples no stage up to `stage` has used with the student at its end, on the
    scoring actors; fuse, write round stage + 1, return its ids easiest first."""
    from pocl_ray import ray_data

    t0, sig, run = time.perf_counter(), cfg.scoring, RunDir.of(cfg)
    inputs = artifacts.read_inputs(cfg, run)
    where = Locations.of(cfg, run)
    tok = models.load_tokenizer(where.tokenizer, trust_remote_code=cfg.teacher.trust_remote_code)
    examples = {e.sample_id: e for e in artifacts.tokenize(cfg, tok, inputs.train)}
    refs = {r.sample_id: r.references for r in inputs.train}
    sizes = [p.size for p in setup.plan]
    todo = rescore.unseen(setup.job["order_ids"], sizes, stage)
    rows = ray_data.example_rows([examples[i] for i in todo], [refs[i] for i in todo])
    student = str(rescore.student_folder(out, stage))
    paths = {"tokenizer": where.tokenizer, "scorer": student,
             "teacher": where.teacher if scores.needs_teacher(sig) else None}  # fmt: skip
    scored = ray_data.score_rows(rows, config=to_dict(cfg), sig=sig, paths=paths,
                                 max_new_tokens=runtime.scoring_budget(cfg, student))  # fmt: skip
    if sorted(scored["sample_id"]) != sorted(todo):
        raise runtime.JobError(f"rescore round {stage + 1}: {len(scored)} rows came back for "
                               f"{len(todo)} samples; nothing was written")  # fmt: skip
    ids = rescore.write_round(out, stage + 1, scored, sig.signals, sig.fusion_k)
    before = {sample_id: i for i, sample_id in enumerate(todo)}
    rho = scores.spearman([before[i] for i in ids], range(len(ids)))
    k = sizes[stage + 1] - sizes[stage]  # the samples the next stage adds
    swapped = len(set(ids[:k]) - set(todo[:k]))
    print(f"distill: rescore round {stage + 1}: {len(todo)} samples not used yet scored with "
          f"the student after stage {stage + 1} in {time.perf_counter() - t0:.1f} s; Spearman "
          f"{rho:.2f} with the previous order; {swapped} of the {k} samples stage {stage + 2} "
          f"adds changed -> {rescore.round_path(out, stage + 1)}", flush=True)  # fmt: skip
    return ids


def _already_done(cfg: Config, out: Path, latest: dict | None) -> bool:
    """Say how the run continues from its latest checkpoint's state: True when it is
    complete (its student in `out`)."""
    if latest is None:
        return False
    pos, ckpt = latest["position"], storage.redact(latest["checkpoint"])
    if pos["done"] and (out / "student" / "config.json").exists():
        print(
            f"distill: run {cfg.run.name!r} is already complete ({ckpt.rsplit('/', 1)[-1]}); "
            f"nothing to train. Student: {out / 'student'}; use another run.name to "
            "train again"
        )
        return True
    print(
        f"distill: resuming run {cfg.run.name!r} from {ckpt}: stage {pos['stage']}, epoch "
        f"{pos['epoch']}, step {pos['step_in_epoch']} of the epoch (global step "
        f"{pos['global_step']}, {pos['samples_consumed']} samples consumed)",
        flush=True,
    )
    return False
