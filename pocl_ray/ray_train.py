"""Ray Train adapter: the stage datasets, the distill and SFT worker functions, checkpoints,
and the one TorchTrainer build. Ray-specific lines are marked `# ray:`.

The maths lives in the core: the plan, the rows of every step and which rank gets which
(`curriculum`), the stage loop (`loop.train_stage`, the plain loop's own), the step
(`train_step`). This module moves rows to workers, wires DDP, and saves / restores the run.

Data path (driver side, `stage_datasets`): for every stage s and rank r, a Ray dataset of the
rows rank r trains on in stage s, in training order: the core `stage_batches` gives the global
batch of every planned step (each epoch reshuffled from (seed, stage, epoch)), `worker_share`
cuts it between the ranks, and a `map_batches` task cuts those rows out of the scores table,
which sits once in the object store. Each row carries its step and slot, so a worker groups
rows into steps exactly, and a resumed worker skips the steps already taken. The split is the
plan's, not `streaming_split`'s: which rank trains on which row must not depend on
scheduling, or a resumed run could not continue exactly.

Worker side (`train_fn`): restore -> stages -> save (docs/distill.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import ray  # ray: this module is an adapter; the core never imports ray
import ray.train
import ray.train.torch
import safetensors.torch
import torch
import torch.distributed as dist

from pocl_ray import artifacts, curriculum, difficulty, models, scores, storage
from pocl_ray.config import Config, from_dict, to_dict
from pocl_ray.data import TokenizedExample, example_from_row
from pocl_ray.evaluation import greedy_rouge_l
from pocl_ray.loop import (
    Hooks,
    StageProgress,
    Step,
    log_row,
    mean_ce,
    seed_training,
    sft,
    train_stage,
)
from pocl_ray.run_dir import Locations, RunDir, changes, read_manifest, train_storage
from pocl_ray.scores import TOPK_CACHE, TRAIN_COLUMNS, column_values
from pocl_ray.train_step import DataParallel, make_optimizer, table_batch, training_mode

STATE_FORMAT = 2
RUN_LOG_FILES = ("metrics.jsonl", "events.jsonl", "stages.json", "tensorboard")
CKPT_PREFIX = "ckpt_"
DEV_DATASET = "dev"
CONTROLLER_FAILURE_LIMIT = 2
"""Ray Train controller failures tolerated (its default, -1, retries forever)."""


def stage_dataset_name(stage: int, rank: int) -> str:
    return f"stage_{stage}_rank_{rank}"


# ---------------------------------------------------------------- the one TorchTrainer build


def build_trainer(
    fn: Callable[[dict], None],
    loop_config: dict,
    cfg: Config,
    *,
    name: str,
    datasets: dict[str, ray.data.Dataset],
    plan_sharded: bool,
    max_failures: int,
    keep_checkpoints: int | None = None,
    callbacks: Sequence[Any] = (),
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of every Train job (distill, SFT, Tune trials).

    loop_config: {"config": to_dict(cfg), ...}: the one place the config crosses into workers.
    plan_sharded: every dataset is already one rank's rows in plan order (distill), so Train
        must neither split nor reorder them; otherwise Train splits "train" between workers.
    """
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    resources = dict(cfg.scaling.resources_per_worker)
    if plan_sharded:
        data_config = ray.train.DataConfig(  # ray:
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        )
    else:
        data_config = ray.train.DataConfig()
    return TorchTrainer(
        fn,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources or None,
            accelerator_type=cfg.scaling.accelerator_type,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=train_storage(cfg),
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures, controller_failure_limit=CONTROLLER_FAILURE_LIMIT
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks) or None,
            # print() stays print(): Ray Train's print-to-logger patch shows each line twice
            worker_runtime_env={
                "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}
            },
        ),
        datasets=datasets,
        dataset_config=data_config,
    )


def threads_per_worker(cfg: Config) -> int:
    """torch threads for a worker: floor of its CPUs (at least 1); 0 = leave it (local mode,
    the loop runs in the driver)."""
    if cfg.scaling.num_workers == 0:
        return 0
    return max(1, math.floor(cfg.scaling.resources_per_worker.get("CPU", 1.0)))


# ---------------------------------------------------------------- driver side: the stage data


def _take_rows(index: pd.DataFrame, table: ray.ObjectRef) -> pa.Table:
    """Cut the indexed rows out of the scores table (in the object store), keeping the order."""
    rows = ray.get(table).take(pa.array(index["row"].to_numpy(), pa.int64()))  # ray: zero-copy
    rows = rows.append_column("step", pa.array(index["step"].to_numpy(), pa.int64()))
    return rows.append_column("slot", pa.array(index["slot"].to_numpy(), pa.int64()))


def stage_datasets(
    table: ray.ObjectRef,
    plan: Sequence[curriculum.StagePlan],
    subsets: Sequence[Sequence[int]],
    *,
    seed: int,
    shuffle: bool,
    batch_size: int,
    world_size: int,
) -> dict[str, ray.data.Dataset]:
    """One lazy dataset per (stage, rank): the rows that rank trains on, step by step.

    Args:
        table: object ref of the training table (`scores.training_table`, row i = table row i).
        plan, subsets: the core plan and stage subsets (row indices into the table).
        seed, shuffle: as for `curriculum.epoch_order`.
        batch_size: per-worker batch; the plan's global batch is batch_size · world_size.
        world_size: number of workers (1 in local mode).

    Rows come out as the table's columns plus `step` (step within the stage) and `slot`
    (position in the rank's part of that step's batch). Nothing runs until a worker iterates.
    """
    out = {}
    for p in plan:
        steps = curriculum.stage_batches(
            p, subsets[p.stage], seed=seed, batch_size=batch_size * world_size, shuffle=shuffle
        )
        for rank in range(world_size):
            rows, step_of, slot = [], [], []
            for k, global_rows in enumerate(steps):
                share = curriculum.worker_share(global_rows, world_size, rank)
                rows += share
                step_of += [k] * len(share)
                slot += range(len(share))
            index = pd.DataFrame({"row": rows, "step": step_of, "slot": slot}, dtype="int64")
            block = max(1, batch_size * 16)
            blocks = [index.iloc[i : i + block] for i in range(0, len(index), block)] or [index]
            # ray: num_cpus=0: cutting rows from an object-store table is no work worth a CPU,
            # and Train workers may hold every CPU; a CPU-bound data task would then wait
            # forever (ray-notes.md, silent hangs). One task at a time per dataset: zero-CPU
            # tasks are otherwise unbounded and Ray starts a worker process for each.
            ds = ray.data.from_pandas(blocks).map_batches(
                _take_rows,
                fn_kwargs={"table": table},
                batch_format="pandas",
                batch_size=None,
                num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=1),
            )
            quiet(ds.context)
            out[stage_dataset_name(p.stage, rank)] = ds
    return out


def quiet(ctx: ray.data.DataContext) -> None:
    """Keep the stage data in order and the console free of per-stage Ray Data output."""
    ctx.execution_options.preserve_order = True  # exact batches need the rows in plan order
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def examples_dataset(examples: Sequence[TokenizedExample]) -> ray.data.Dataset:
    """Examples as a Ray dataset (the plateau trigger's dev split; the SFT rows)."""
    rows = [
        {"sample_id": e.sample_id, "input_ids": list(e.input_ids), "labels": list(e.labels),
         "prompt_length": e.prompt_length}
        for e in examples
    ]  # fmt: skip
    ds = ray.data.from_pandas(pd.DataFrame(rows))
    quiet(ds.context)
    return ds


# ---------------------------------------------------------------- settings and checkpoints


def run_settings(cfg: Config, *, n: int, world_size: int, table_key: dict[str, Any]) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: the data, the
    plan, the loss and the optimiser (not logging or checkpoint frequency)."""
    c = to_dict(cfg)
    return {
        "table": table_key,
        "n": n,
        "world_size": world_size,
        "seed": cfg.run.seed,
        "train_seed": cfg.run.training_seed,
        "curriculum": c["curriculum"],
        "loss": c["loss"],
        "optim": {k: v for k, v in c["optim"].items() if k not in RESUME_FREE_OPTIM},
        "student_dropout": cfg.student.dropout,
    }


RESUME_FREE_OPTIM = ("gradient_checkpointing",)
"""Optim keys a resumed run may change: they change memory, not the steps' results."""


def settings_changes(old: dict, new: dict) -> list[str]:
    """What differs between the settings a checkpoint was written with and a run's (`changes`
    lines); empty = it may resume. A key the checkpoint lacks (a config key added after it was
    written) counts as its default, which is what that run used; keys of RESUME_FREE_OPTIM
    are ignored on both sides."""
    defaults = to_dict(Config())
    filled = json.loads(json.dumps(old))  # a deep copy of plain JSON data
    filled.setdefault("train_seed", filled.get("seed"))  # before run.train_seed: run.seed
    filled["optim"] = {k: v for k, v in filled.get("optim", {}).items()
                       if k not in RESUME_FREE_OPTIM}  # fmt: skip
    for section in ("curriculum", "loss", "optim"):
        for key in new.get(section, {}):
            filled.setdefault(section, {}).setdefault(key, defaults[section].get(key))
    return changes(filled, new)


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The newest complete checkpoint folder of a run (by global step), or None; `run_dir`
    and the result are local paths or URIs (`storage.filesystem`)."""
    fs, base = storage.filesystem(str(run_dir))
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    is_ckpt = [i.type == pafs.FileType.Directory and i.base_name.startswith(CKPT_PREFIX)
               for i in infos]  # fmt: skip
    folders = sorted(i.path for i, yes in zip(infos, is_ckpt) if yes)
    for folder in reversed(folders):
        if fs.get_file_info(f"{folder}/state.json").type == pafs.FileType.File:
            name = folder.rsplit("/", 1)[-1]
            return storage.join(str(run_dir), name) if storage.is_uri(str(run_dir)) else folder
    return None


def read_state(ckpt_dir: str | Path) -> dict:
    """A checkpoint's state.json (a local folder or a URI)."""
    fs, base = storage.filesystem(str(ckpt_dir))
    with fs.open_input_stream(f"{base}/state.json") as f:
        return json.loads(f.read().decode("utf-8"))


# ---------------------------------------------------------------- driver side: one run's setup


class SetupError(RuntimeError):
    """A distill run cannot start with these inputs; the message says what to do (a job
    turns it into its exit code, a Tune trial into a failed trial)."""


@dataclass(kw_only=True)
class DistillSetup:
    """What one distill run (the distill job, or one Tune trial) trains with."""

    n: int
    plan: list[curriculum.StagePlan]
    datasets: dict[str, ray.data.Dataset]
    job: dict
    """`train_fn`'s plain data (paths, table size, settings and their key, ...)."""


def prepare_distill(
    cfg: Config,
    *,
    out: Path,
    dev_metric: str | None = None,
    fault: dict | None = None,
    check_only: bool = False,
    rounds: Sequence[Sequence[str]] = (),
) -> DistillSetup:
    """Check the scores table against this run, build the plan and one dataset per (stage,
    rank). The distill job and every Tune trial start here.

    out: where rank 0 writes the run's outputs (the job: run.output_dir; a trial: its own
        folder). The shared inputs (scores table, models) are always read from run.output_dir.
    dev_metric: `dev_loss` or `dev_rougeL`, reported with every checkpoint (Tune trials);
        None computes nothing (plain distill pays nothing).
    fault: tests only (`_maybe_fault`).
    check_only: check the inputs and the plan, build no dataset (a search's driver, once for
        all trials, before any starts).
    rounds: `curriculum.rescore`: the sample ids of each re-ranking round so far, easiest
        first (`rescore.read_rounds`); they reorder the samples after each stage.
    Raises SetupError when the table or the data does not fit the run.
    """
    run = RunDir.of(cfg)
    cur, cached = cfg.curriculum, cfg.loss.teacher_source == "cache"
    world = max(cfg.scaling.num_workers, 1)
    manifest, inputs = read_manifest(run.scores), artifacts.read_inputs(cfg, run)
    if manifest is None:
        raise SetupError(f"no scores table in {run.scores}; run `pocl-ray score` first")
    where = Locations.of(cfg, run)
    folders = {"tokenizer": where.tokenizer, "teacher": where.teacher,
               "student_init": where.student_init}  # fmt: skip
    existing = {k: v for k, v in folders.items() if Path(v).exists()}
    key_now = scores.table_key(cfg, inputs.fingerprint, existing)
    if problems := scores.table_problems(cfg, manifest, key_now):
        raise SetupError(
            f"the scores table in {run.scores} does not match this run:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nrun `pocl-ray score` with the same config and overrides to rescore (it "
            "replaces the table), or use another run.output_dir"
        )
    if cached and not manifest["teacher_topk"]:
        raise SetupError(
            f"loss.teacher_source=cache but the table in {run.scores} has no teacher top-K; "
            "run `pocl-ray score` with scoring.teacher_topk=K"
        )
    table = scores.training_table(cfg, run, cached=cached)
    n = table.num_rows
    tok = models.load_tokenizer(where.tokenizer, trust_remote_code=cfg.teacher.trust_remote_code)
    plan = curriculum.stage_table(
        cur, n=n, batch_size=cfg.optim.batch_size * world, loss_alpha=cfg.loss.alpha
    )
    if not cached and any(p.kd_ratio > 0 for p in plan) and "teacher" not in existing:
        # student-only signals: scoring never needed the teacher; train or load it now
        artifacts.teacher(cfg, run, tok, artifacts.tokenize(cfg, tok, inputs.train))
    ranks, ids = table.column("difficulty_rank").to_numpy(), table.column("sample_id").to_pylist()
    order = curriculum.stage_order(ranks, ids, mode=cur.mode, seed=cfg.run.training_seed)
    if rounds:
        row = {sample_id: i for i, sample_id in enumerate(ids)}
        sizes = [p.size for p in plan]
        try:
            order = curriculum.rescored_order(order, sizes, [[row[i] for i in r] for r in rounds])
        except (KeyError, ValueError) as e:
            raise SetupError(f"{out / 'rescore'}: {e}; delete that folder and the run's "
                             "checkpoints to start the run again") from e  # fmt: skip
    datasets = {} if check_only else stage_datasets(
        ray.put(table.drop_columns(["difficulty_rank"])),  # ray: the table, once
        plan,
        curriculum.stage_subsets(order, [p.size for p in plan]),
        seed=cfg.run.training_seed,
        shuffle=cur.shuffle,
        batch_size=cfg.optim.batch_size,
        world_size=world,
    )  # fmt: skip
    references = {}
    if cur.plateau_patience or dev_metric:
        dev = artifacts.tokenize(cfg, tok, inputs.held)[: cfg.eval.max_examples]
        if not dev:
            why = "curriculum.plateau_patience" if cur.plateau_patience else f"the {dev_metric}"
            raise SetupError(f"{why} needs held-out data to evaluate on: set "
                             "data.eval_fraction > 0")  # fmt: skip
        if not check_only:
            datasets[DEV_DATASET] = examples_dataset(dev)
        if dev_metric == "dev_rougeL":
            refs = {r.sample_id: list(r.references) for r in inputs.held}
            references = {e.sample_id: refs[e.sample_id] for e in dev}
    table_key = {**key_now, "config_hash": manifest["key"]["config_hash"]}
    settings = run_settings(cfg, n=n, world_size=world, table_key=table_key)
    key = settings_key(settings)
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
        "threads": threads_per_worker(cfg),
        "fault": fault,
        "local_mode": cfg.scaling.num_workers == 0,
        "out": str(out),
        # curriculum.rescore: the order (the driver scores its tail), the stage this fit ends
        "order_ids": [ids[i] for i in order] if cur.rescore else None,
        "stop_after": None,
        "continues": None,  # curriculum.rescore: why this fit starts from a stage end
        "dev_metric": dev_metric,
        "dev_references": references,
    }
    return DistillSetup(n=n, plan=plan, datasets=datasets, job=job)


def latest_state(cfg: Config, job: dict) -> dict | None:
    """The state of the latest checkpoint of run `cfg.run.name` plus its `checkpoint` path
    (None: a fresh start; local mode keeps none); raise SetupError when it was written with
    other settings than `job`'s."""
    settings = job["settings"]
    if cfg.scaling.num_workers == 0:
        return None
    latest = latest_checkpoint(storage.join(train_storage(cfg), cfg.run.name))
    if latest is None:
        return None
    state = read_state(latest)
    if differ := settings_changes(state["settings"], settings):
        where = storage.redact(latest.rsplit("/", 1)[0])
        raise SetupError(
            f"run {cfg.run.name!r} in {where} was started with other settings:\n"
            + "\n".join(f"  - {c}" for c in differ)
            + "\nrestore them to resume it, or start a new run with another run.name"
        )
    return {**state, "checkpoint": str(latest)}


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def position(plan, stage: int, step_in_stage: int, global_step: int, samples: int) -> dict:
    """The saved curriculum position: the next step to take."""
    done = stage >= len(plan)
    spe = 1 if done else plan[stage].steps_per_epoch
    return {
        "stage": stage,
        "epoch": step_in_stage // spe,
        "step_in_epoch": step_in_stage % spe,
        "step_in_stage": step_in_stage,
        "global_step": global_step,
        "samples_consumed": samples,
        "steps_before_stage": global_step - step_in_stage,
        "done": done,
    }


@dataclass(kw_only=True)
class Restored:
    """What a checkpoint gives back besides the weights and RNG (already loaded)."""

    state: dict
    optimizer: dict


def _restore(job: dict, student: torch.nn.Module, rank: int) -> Restored | None:
    """Load the latest reported checkpoint into the student and the RNG; None on a fresh run."""
    ckpt = ray.train.get_checkpoint()  # ray: the latest reported checkpoint, on any restart
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state = read_state(Path(d))
        if differ := settings_changes(state["settings"], job["settings"]):
            raise RuntimeError(
                "the checkpoint was written with other settings: " + "; ".join(differ)
            )
        safetensors.torch.load_model(student, str(Path(d) / "student.safetensors"))
        optimizer = torch.load(Path(d) / "optimizer.pt", weights_only=True)
        _set_rng_state(torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=True))
    state["checkpoint"] = ckpt.path
    return Restored(state=state, optimizer=optimizer)


def _save_checkpoint(*, rank: int, student, optimizer, state: dict, metrics: dict) -> None:
    """Every rank reports one folder (Ray merges them): rank 0 adds weights, optimizer and
    state; each rank adds its RNG states."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch.save(_rng_state(), d / f"rng_rank{rank}.pt")
        if rank == 0:
            safetensors.torch.save_model(student, str(d / "student.safetensors"))
            torch.save(optimizer.state_dict(), d / "optimizer.pt")
            (d / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        ray.train.report(  # ray: a barrier across ranks; persists the merged folder
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"{CKPT_PREFIX}{state['position']['global_step']:08d}",
        )
    # ray: report() only queues the checkpoint; wait until the controller has registered it,
    # or a worker that dies right after would restart from an older one.
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )


# ---------------------------------------------------------------- worker side: rows → steps


class StepRows:
    """One rank's rows of one stage, grouped into the planned steps.

    The stage dataset yields rows in plan order, tagged (step, slot); `take(k)` returns the
    rows of step k (possibly none: a partial last batch may leave a rank without rows).
    Steps before `start` (already trained before a restart) are skipped.
    """

    def __init__(self, shard, *, start: int, cached: bool, batch_size: int):
        columns = [*TRAIN_COLUMNS, "bucket", *(TOPK_CACHE if cached else ())]
        self._batches = iter(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"))
        self._rows: Iterator[dict] = self._unpack(columns)
        self._next: dict | None = None
        self._start = start
        self._last = (-1, -1)

    def _unpack(self, columns: list[str]) -> Iterator[dict]:
        for batch in self._batches:
            cols = {c: column_values(batch.column(c)) for c in [*columns, "step", "slot"]}
            for i in range(batch.num_rows):
                yield {c: v[i] for c, v in cols.items()}

    def _peek(self) -> dict | None:
        while self._next is None:
            row = next(self._rows, None)
            if row is None:
                return None
            key = (row["step"], row["slot"])
            if key <= self._last:
                raise RuntimeError(
                    f"stage rows arrived out of order ({key} after {self._last}); the data "
                    "path must preserve order (DataContext.execution_options.preserve_order)"
                )
            self._last = key
            if row["step"] >= self._start:
                self._next = row
        return self._next

    def take(self, step: int) -> list[dict]:
        rows = []
        while (row := self._peek()) is not None and row["step"] == step:
            rows.append(row)
            self._next = None
        if row is not None and row["step"] < step:
            raise RuntimeError(f"rows of step {row['step']} were not consumed before step {step}")
        return rows

    def close(self) -> None:
        self._batches.close()


def _step(rows: list[dict], pad_id: int, cache_taus: list[float] | None, device) -> Step:
    """A rank's rows of one step as a `loop.Step`; cache_taus: the cache's grid
    (scoring.cache_taus) when the teacher is the table's top-K cache, else None."""
    batch = {k: v.to(device) for k, v in table_batch(rows, pad_id, cache_taus).items()}
    return Step(batch=batch, buckets=[int(r["bucket"]) for r in rows])


def _shard_examples(name: str) -> list[TokenizedExample]:
    shard = ray.train.get_dataset_shard(name)  # ray:
    return [example_from_row(r) for r in shard.iter_rows()]


def _all_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    """Sum across ranks (identity on one worker)."""
    if world == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _from_rank0(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# ---------------------------------------------------------------- worker side: logs


class RunLog:
    """Rank 0's files: metrics.jsonl, events.jsonl, stages.json, TensorBoard events.

    On a resume, metrics rows of the steps about to be trained again are dropped, and
    TensorBoard is told to purge them too, so the files describe one clean trajectory; the
    restart itself is recorded in events.jsonl.
    """

    def __init__(self, out: Path, *, resume_step: int | None, num_stages: int):
        from tensorboardX import SummaryWriter

        self.num_stages = num_stages
        out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out / "metrics.jsonl"
        self.events_path = out / "events.jsonl"
        self.stages_path = out / "stages.json"
        if resume_step is None:
            self.metrics_path.write_text("", encoding="utf-8")
            self.events_path.write_text("", encoding="utf-8")
        elif self.metrics_path.exists():
            keep = [
                line
                for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] < resume_step
            ]
            self.metrics_path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step)

    def step(self, row: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for key in ("loss", "ce", "kd", "tau", "kd_ratio", "lr", "tokens_per_s"):
            self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def event(self, kind: str, **fields: Any) -> None:
        with self.events_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")

    def stages(self, summaries: list[dict]) -> None:
        self.stages_path.write_text(json.dumps(summaries, indent=1) + "\n", encoding="utf-8")
        last = summaries[-1]
        for b in last["buckets"]:
            if b["loss"] is not None:
                self.tb.add_scalar(f"stage_loss/bucket_{b['bucket']}", b["loss"], last["stage"])
        self.tb.add_scalar("stage/loss", last["loss"], last["stage"])
        self.tb.flush()
        print(stage_line(last, self.num_stages), flush=True)

    def progress(self, stage: int, k: int, total: int, loss: float) -> None:
        """A line at each quarter of a stage (Ray Train draws no progress bar)."""
        if k in {math.ceil(total * q) for q in (0.25, 0.5, 0.75)} and k < total:
            print(
                f"stage {stage + 1}/{self.num_stages}: {k}/{total} steps ({100 * k // total}%), "
                f"step loss {loss:.4f}",
                flush=True,
            )

    def close(self) -> None:
        self.tb.close()


class NullLog:
    """The log of ranks other than 0: they write nothing."""

    def step(self, row: dict) -> None:
        pass

    def event(self, kind: str, **fields: Any) -> None:
        pass

    def stages(self, summaries: list[dict]) -> None:
        pass

    def progress(self, stage: int, k: int, total: int, loss: float) -> None:
        pass

    def close(self) -> None:
        pass


def stage_line(summary: dict, num_stages: int) -> str:
    """The one console line of a finished stage."""
    buckets = " ".join(
        f"b{b['bucket']}={b['loss']:.3f}" for b in summary["buckets"] if b["loss"] is not None
    )
    return (
        f"stage {summary['stage'] + 1}/{num_stages}: {summary['size']} samples "
        f"({100 * summary['fraction']:.0f}%), {summary['steps']}/{summary['planned_steps']} "
        f"steps ({summary['ended_by']}), tau {summary['tau']:.3g} lambda "
        f"{summary['kd_ratio']:.3g} | loss {summary['loss']:.4f} (ce {summary['ce']:.4f} "
        f"kd {summary['kd']:.4f}) by bucket {buckets} | {summary['tokens_per_s']:.0f} tok/s, "
        f"{summary['seconds']:.1f} s"
    )


# ---------------------------------------------------------------- the distill worker


class Worker:
    """One rank's run: its place in the cluster, its models, its position in the plan, its
    log; the per-step bookkeeping the stage loop calls back (`hooks`)."""

    def __init__(self, cfg: Config, job: dict):
        ctx = ray.train.get_context()  # ray:
        self.cfg, self.job = cfg, job
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()  # ray:
        self.plan = curriculum.stage_table(
            cfg.curriculum,
            n=job["n"],
            batch_size=cfg.optim.batch_size * self.world,
            loss_alpha=cfg.loss.alpha,
        )
        self.cached = cfg.loss.teacher_source == "cache"
        self.started = time.perf_counter()
        self.steps_run = 0

    def all_sum(self, values: list[float]) -> list[float]:
        return _all_sum(values, self.world, self.device)

    def load_models(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The starting student and, unless the cache or λ = 0 makes it useless, the frozen
        teacher (half precision on a GPU)."""
        cfg = self.cfg
        student = models.load_pretrained(self.job["student_init"], cfg.student)
        if self.cached or not any(p.kd_ratio > 0 for p in self.plan):
            return student, None
        teacher = models.freeze_teacher(models.load_pretrained(self.job["teacher"], cfg.teacher))
        teacher.to(self.device)
        if self.device.type == "cuda" and cfg.teacher.dtype == "float32":  # frozen: half is fine
            teacher.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        return student, teacher

    def start(self, restored: Restored | None) -> None:
        """Position, stage summaries and log from the checkpoint, or fresh."""
        state = restored.state if restored else None
        self.position = state["position"] if state else position(self.plan, 0, 0, 0, 0)
        self.summaries: list[dict] = state["summaries"] if state else []
        self.global_step = self.position["global_step"]
        self.samples = self.position["samples_consumed"]
        self.window = (time.perf_counter(), 0.0)
        if self.rank != 0:
            self.log = NullLog()
            return
        self.log = RunLog(
            Path(self.job["out"]),
            resume_step=self.global_step if state else None,
            num_stages=len(self.plan),
        )
        if state and self.job.get("continues"):  # a planned stop, not a failure
            self.log.event("continue", after=self.job["continues"], position=self.position)
        elif state:
            self.log.event("resume", position=self.position, checkpoint=state["checkpoint"],
                           world_size=self.world)  # fmt: skip
        else:
            steps = curriculum.total_steps(self.plan)
            self.log.event("start", world_size=self.world, plan_steps=steps)

    def hooks(self, stage: int, progress: StageProgress, tracker, save: Callable) -> Hooks:
        def after_step(pos, res, step: Step, seconds: float) -> None:
            n_all, ce_sum, kd_sum, kd_tokens, rows_all = self.all_sum(
                [res.tokens, res.ce * res.tokens, res.kd * res.kd_tokens, res.kd_tokens,
                 len(step.buckets)]
            )  # fmt: skip
            self.global_step += 1
            self.samples += int(rows_all)
            self.steps_run += 1
            t0, tokens = self.window
            self.window = (t0, tokens + n_all)
            k = pos.step_in_stage + 1
            total = self.plan[stage].total_steps
            if self.global_step % self.cfg.run.log_every == 0 or k == total:
                self._log(pos, res, step, n_all, ce_sum, kd_sum, kd_tokens, seconds)
            self.log.progress(stage, k, total, res.loss)
            every = self.cfg.run.checkpoint_every
            # (the last step of a stage: the stage boundary checkpoints anyway)
            if every and self.global_step % every == 0 and k < self.plan[stage].total_steps:
                save(stage, k, progress, tracker, lr=self.cfg.optim.lr * pos.lr_mult,
                     loss=res.loss)  # fmt: skip

        return Hooks(
            data_parallel=DataParallel(world_size=self.world, all_sum=self.all_sum),
            agree=lambda fired: _from_rank0(fired, self.world, self.device),
            before_step=lambda pos: _maybe_fault(self.job["fault"], pos.global_step, self.rank),
            after_step=after_step,
        )

    def _log(self, pos, res, step, n_all, ce_sum, kd_sum, kd_tokens, seconds) -> None:
        """One metrics row: global token means, each term over its own tokens (as the
        gradient is); one worker logs its own float32 values, bit for bit the plain loop's."""
        row = log_row(pos, res, self.cfg.optim.lr, seconds)
        if self.world > 1:
            row["ce"] = ce_sum / n_all if n_all else res.ce
            row["kd"] = kd_sum / kd_tokens if kd_tokens else res.kd
            row["loss"] = (1 - pos.kd_ratio) * row["ce"] + pos.kd_ratio * row["kd"]
        now = time.perf_counter()
        t0, tokens = self.window
        row.update(
            tokens=int(n_all),
            samples=self.samples,
            tokens_per_s=tokens / max(now - t0, 1e-9),
            step_seconds=seconds,
            elapsed_s=now - self.started,
        )
        self.window = (now, 0.0)
        self.log.step(row)


def train_fn(loop_config: dict) -> None:
    """The Ray Train distill worker (also run in the driver in local mode): restore ->
    train the remaining stages -> save.

    loop_config: {"config": to_dict(cfg), "job": plain data from `prepare_distill` (paths,
    table size, settings and their key, bucket count, eos ids, output folder, the dev metric
    to report, test fault)}.
    """
    cfg = from_dict(loop_config["config"], source="distill worker config")  # the one rebuild
    job = loop_config["job"]
    quiet_logs(worker_process=not job["local_mode"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    w = Worker(cfg, job)
    cur = cfg.curriculum
    # a run directory on object storage: this node's mirror gets the models (and rank 0 its
    # log files, which a resumed run continues)
    logs = [f"{job['out']}/{f}" for f in RUN_LOG_FILES] if w.rank == 0 else []
    storage.pull_paths(cfg.run.output_dir,
                       [job["tokenizer"], job["teacher"], job["student_init"], *logs])  # fmt: skip

    # 1. restore: weights, RNG, optimizer moments, position (or a fresh start)
    student, teacher = w.load_models()
    restored = _restore(job, student, w.rank)
    if restored is None:
        seed_training(cfg.run.training_seed, w.rank)
    # transformers loads in eval mode: dropout must be on, as in the plain loop
    training_mode(student, cfg.optim.gradient_checkpointing)
    model = ray.train.torch.prepare_model(student)  # ray: DDP when world > 1; to device
    w.start(restored)
    if w.position["done"]:
        if w.rank == 0:
            print(f"distill: run {cfg.run.name!r} is already complete; nothing to train")
            _finish(cfg, job, student, w)
        if job["dev_metric"]:  # a Tune trial restarted after its last report: report again
            ray.train.report(restored.state["metrics"])  # ray: every rank, once
        return
    optimizer = make_optimizer(student, cfg.optim)
    resets = curriculum.resets_optimizer(cur.lr_policy)
    if restored and not (resets and w.position["step_in_stage"] == 0):
        optimizer.load_state_dict(restored.optimizer)
    dev = _shard_examples(DEV_DATASET) if cur.plateau_patience or job["dev_metric"] else []
    tok = None
    if job["dev_metric"] == "dev_rougeL":
        remote = cfg.teacher.trust_remote_code
        tok = models.load_tokenizer(job["tokenizer"], trust_remote_code=remote)
    eos_ids = tuple(dict.fromkeys([*job["eos_ids"], *models.eos_token_ids(student)]))
    cache_taus = cfg.scoring.cache_taus if w.cached else None

    def save(stage, k, progress, tracker, *, lr, loss) -> None:
        if k > 0:  # mid-stage: rank 0 keeps the ranks' summed progress in the checkpoint
            progress.gather(w.all_sum, keep=w.rank == 0)
        metrics = {"step": w.global_step, "stage": stage, "loss": loss, "samples": w.samples,
                   "plan_complete": stage >= len(w.plan)}  # fmt: skip
        if job["dev_metric"] and w.rank == 0:  # Tune reads rank 0's metrics only
            metrics[job["dev_metric"]] = _dev_metric(job, cfg, student, dev, tok)
        state = {
            "format": STATE_FORMAT,
            "settings_key": job["settings_key"],
            "settings": job["settings"],
            "position": position(w.plan, stage, k, w.global_step, w.samples),
            "lr_scheduler": {"policy": cur.lr_policy, "last_lr": lr},  # LR = f(position)
            "plateau": None if tracker is None else tracker.state_dict(),
            "progress": progress.state_dict(),
            "summaries": w.summaries,
            "metrics": metrics,
        }
        _save_checkpoint(rank=w.rank, student=student, optimizer=optimizer, state=state,
                         metrics=metrics)  # fmt: skip
        w.log.event("checkpoint", global_step=w.global_step, stage=stage)
        if w.rank == 0:  # the log up to this checkpoint outlives this node
            storage.push_run(cfg.run.output_dir)

    # 2. the remaining stages, each from its first step (or the restored one)
    for stage in range(w.position["stage"], len(w.plan)):
        start = w.position["step_in_stage"] if stage == w.position["stage"] else 0
        fresh = StageProgress(num_buckets=job["num_buckets"])
        progress, tracker = fresh, None
        if start and restored and w.rank == 0:
            progress = StageProgress.from_state(restored.state["progress"])
        if cur.plateau_patience:
            tracker = curriculum.PlateauTracker(cur.plateau_patience)
            if start and restored:
                tracker.load_state_dict(restored.state["plateau"])
        if start == 0 and stage > 0 and resets:
            optimizer = make_optimizer(student, cfg.optim)
        rows = StepRows(ray.train.get_dataset_shard(stage_dataset_name(stage, w.rank)),  # ray:
                        start=start, cached=w.cached, batch_size=cfg.optim.batch_size)  # fmt: skip
        steps, ended_by = train_stage(
            model, student, teacher, optimizer,
            lambda k, rows=rows: _step(rows.take(k), job["pad_id"], cache_taus, w.device),
            cfg=cfg, plan=w.plan, stage=stage, start=start,
            steps_before=w.global_step - start, progress=progress, tracker=tracker, dev=dev,
            pad_id=job["pad_id"], eos_ids=eos_ids, hooks=w.hooks(stage, progress, tracker, save),
        )  # fmt: skip
        rows.close()
        w.summaries.append(
            progress.reduced(w.all_sum).summary(w.plan[stage], steps=steps, ended_by=ended_by)
        )
        w.log.stages(w.summaries)
        w.log.event("stage_end", stage=stage, steps=steps, ended_by=ended_by)
        # the next stage starts here (a plateau in the last stage ends training, as planned)
        save(stage + 1, 0, StageProgress(num_buckets=job["num_buckets"]), None, lr=None,
             loss=w.summaries[-1]["loss"])  # fmt: skip
        if stage == job.get("stop_after") and stage + 1 < len(w.plan):
            if w.rank == 0:  # curriculum.rescore: the driver scores the rest with it
                _save_for_rescore(cfg, job, student, stage)
            return

    # 3. save: the student as a Hugging Face folder, the summary
    if w.rank == 0:
        _finish(cfg, job, student, w)


def _dev_metric(job: dict, cfg: Config, student, dev: list[TokenizedExample], tok) -> float:
    """The Tune metric on the held-out split: token-mean CE, or greedy ROUGE-L x 100."""
    if job["dev_metric"] == "dev_loss":
        return mean_ce(student, dev, job["pad_id"])
    refs = [job["dev_references"][e.sample_id] for e in dev]
    return greedy_rouge_l(student, tok, dev, refs, max_new_tokens=cfg.eval.max_new_tokens)


def _maybe_fault(fault: dict | None, step: int, rank: int) -> None:
    """Tests only: exit hard at global step `fault['step']` on rank `fault.get('rank', 0)`,
    once (the marker file says it happened; the restarted worker carries on)."""
    if fault is None or step != fault["step"] or rank != fault.get("rank", 0):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"worker pid {os.getpid()} exited at global step {step}\n")
    os._exit(1)


def _save_for_rescore(cfg: Config, job: dict, student, stage: int) -> None:
    """Rank 0, at the end of `stage` of a rescore run: the student as it is now, for the
    driver's re-scoring round (`rescore.student_folder`)."""
    from pocl_ray import rescore

    tok = models.load_tokenizer(job["tokenizer"], trust_remote_code=cfg.teacher.trust_remote_code)
    models.save_model(student, tok, rescore.student_folder(job["out"], stage))
    storage.push_run(cfg.run.output_dir)


def _finish(cfg: Config, job: dict, student, w: Worker) -> None:
    """Rank 0: the student as a Hugging Face folder with its tokenizer, and summary.json."""
    out = Path(job["out"])
    tok = models.load_tokenizer(job["tokenizer"], trust_remote_code=cfg.teacher.trust_remote_code)
    models.save_model(student, tok, out / "student")
    summaries = w.summaries
    total_tokens = sum(s["tokens"] for s in summaries)
    train_s = sum(s["seconds"] for s in summaries)
    summary = {
        "run": cfg.run.name,
        "stages": len(summaries),
        "steps": sum(s["steps"] for s in summaries),
        "samples": sum(s["samples"] for s in summaries),
        "tokens": total_tokens,
        "final_stage_loss": summaries[-1]["loss"] if summaries else None,
        "train_seconds": train_s,
        "tokens_per_s": total_tokens / train_s if train_s else 0.0,
        "steps_this_attempt": w.steps_run,
        "seconds_this_attempt": time.perf_counter() - w.started,
        "student": str(out / "student"),
        "stage_summaries": summaries,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    w.log.event("done", steps=summary["steps"])
    w.log.close()
    storage.push_run(cfg.run.output_dir)


# ---------------------------------------------------------------- the SFT worker


def sft_fn(loop_config: dict) -> None:
    """Ray Train SFT worker: rebuild the config, train on this rank's share of "train" (the
    core `loop.sft`), rank 0 saves the model with its tokenizer to loop_config["dest"]."""
    from pocl_ray.artifacts import new_student, new_teacher

    cfg = from_dict(loop_config["config"], source="sft worker config")  # the one rebuild
    quiet_logs(worker_process=True)
    target, dest = loop_config["target"], loop_config["dest"]
    if loop_config["threads"]:
        torch.set_num_threads(loop_config["threads"])
    remote = cfg.teacher.trust_remote_code
    layered = target == "student" and cfg.student.init == "teacher_layers"
    needs = [loop_config["tokenizer"], loop_config["teacher"] if layered else None]
    storage.pull_paths(cfg.run.output_dir, needs)
    tok = models.load_tokenizer(loop_config["tokenizer"], trust_remote_code=remote)
    if target == "teacher":
        model = new_teacher(cfg, tok)
    else:  # a student made of teacher layers needs its teacher
        teacher = models.load_pretrained(loop_config["teacher"], cfg.teacher) if layered else None
        model = new_student(cfg, tok, teacher)
    model = ray.train.torch.prepare_model(model)  # ray: DDP when world > 1
    examples = _shard_examples("train")
    rank0 = ray.train.get_context().get_world_rank() == 0  # ray:

    def on_epoch(epoch: int, loss: float) -> None:
        if rank0:
            print(f"sft {target}: epoch {epoch + 1}/{cfg.sft.epochs} loss {loss:.4f}", flush=True)

    losses = sft(model, examples, epochs=cfg.sft.epochs, lr=cfg.sft.lr,
                 batch_size=cfg.sft.batch_size, pad_id=tok.pad_token_id, seed=cfg.run.seed,
                 on_epoch=on_epoch, autocast=cfg.optim.autocast,
                 gradient_checkpointing=cfg.optim.gradient_checkpointing)  # fmt: skip
    if rank0:
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        models.save_model(model.module if ddp else model, tok, dest)
        storage.push_run(cfg.run.output_dir)
    ray.train.report({"loss": losses[-1], "epochs": len(losses)})  # ray:


def quiet_logs(worker_process: bool = False) -> None:
    """One console line per stage: no per-dataset Ray Data lines, no weight-loading bars, and
    in a worker process none of Ray Train's INFO lines (one per checkpoint report otherwise;
    some are logged under the file name, not `ray.train`, so only the root level stops them).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if worker_process:
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # ERROR: Ray Data warns once that the (deliberately) disabled progress bars are disabled
    logging.getLogger("ray.data").setLevel(logging.ERROR)
