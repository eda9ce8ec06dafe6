"""Ray Train adapter: the distillation worker function, its curriculum data, its checkpoints.

The maths lives in the core: the plan, the batches of every step and which rank gets which
rows (`curriculum`), the step itself (`train_step.train_step`), the losses (`losses`). This
module moves rows to workers, wires DDP, and saves / restores the run. Ray-specific lines are
marked `# ray:`.

Data path (driver side, `stage_datasets`): for every stage s and rank r, a Ray dataset of the
rows rank r trains on in stage s, in training order: the core `stage_batches` gives the global
batch of every planned step (each epoch reshuffled from (seed, stage, epoch)), `worker_share`
cuts it between the ranks, and a `map_batches` task cuts those rows out of the scores table,
which sits once in the object store. Each row carries its step and slot, so a worker groups
rows into steps exactly, and a resumed worker skips the steps already taken. With one worker
and the same seed, the worker sees exactly the batches of the plain loop (`run_curriculum`).
The split is the plan's, not `streaming_split`'s: which rank trains on which row must not depend
on scheduling, or a resumed run could not continue exactly.

Worker side (`train_fn`): rebuilds the config (the one place a worker does), loads the student
and the frozen teacher, restores the latest checkpoint if there is one, wraps the student with
`prepare_model` (DDP: gloo on CPU, NCCL on GPU) and runs the curriculum from the saved position.
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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray  # ray: this module is an adapter; the core never imports ray
import ray.train
import ray.train.torch
import safetensors.torch
import torch
import torch.distributed as dist

from pocl_ray import curriculum, models
from pocl_ray.config import Config, from_dict, to_dict
from pocl_ray.data import IGNORE_INDEX, TokenizedExample, collate
from pocl_ray.train_step import (
    TOPK_CACHE,
    DataParallel,
    make_optimizer,
    mean_ce,
    on_policy_spec,
    response_tokens,
    seed_training,
    topk_targets,
    train_step,
)

STATE_FORMAT = 1
CKPT_PREFIX = "ckpt_"
DEV_DATASET = "dev"
TRAIN_COLUMNS = ["sample_id", "prompt_length", "input_ids", "labels", "bucket"]
TOPK_COLUMNS = list(TOPK_CACHE)
"""The scores table's top-K cache columns (ids, log-probs, tail log-partitions)."""


def stage_dataset_name(stage: int, rank: int) -> str:
    return f"stage_{stage}_rank_{rank}"


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
        table: object ref of the training table (`TRAIN_COLUMNS`, row i = table row i).
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


def dev_dataset(examples: Sequence[TokenizedExample]) -> ray.data.Dataset:
    """The held-out examples for the plateau trigger (every worker reads all of them)."""
    ds = ray.data.from_pandas(
        pd.DataFrame(
            {
                "sample_id": [e.sample_id for e in examples],
                "prompt_length": [e.prompt_length for e in examples],
                "input_ids": [list(e.input_ids) for e in examples],
                "labels": [list(e.labels) for e in examples],
            }
        )
    )
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
        "curriculum": c["curriculum"],
        "loss": c["loss"],
        "optim": c["optim"],
        "student_dropout": cfg.student.dropout,
    }


def settings_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Every leaf that differs between two settings dicts, as 'key: old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (by global step), or None."""
    if not run_dir.is_dir():
        return None
    found = sorted(
        (p for p in run_dir.glob(f"{CKPT_PREFIX}*") if (p / "state.json").exists()),
        key=lambda p: p.name,
    )
    return found[-1] if found else None


def read_state(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / "state.json").read_text(encoding="utf-8"))


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


def _save_checkpoint(
    *,
    rank: int,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    metrics: dict,
) -> None:
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
        columns = TRAIN_COLUMNS + (TOPK_COLUMNS if cached else [])
        self._batches = iter(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow"))
        self._rows: Iterator[dict] = self._unpack(columns)
        self._next: dict | None = None
        self._start = start
        self._last = (-1, -1)

    def _unpack(self, columns: list[str]) -> Iterator[dict]:
        for batch in self._batches:
            cols = {c: _column(batch.column(c)) for c in [*columns, "step", "slot"]}
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


def _column(col: pa.ChunkedArray) -> list:
    """Python values of one column; the cache's lists of fixed-size lists become (R, K) (or
    (R, J)) numpy arrays of the stored dtype."""
    if pa.types.is_list(col.type) and pa.types.is_fixed_size_list(col.type.value_type):
        k = col.type.value_type.list_size
        return [
            np.asarray(row.values.flatten().to_numpy(zero_copy_only=False)).reshape(-1, k)
            for row in col.combine_chunks()
        ]
    return col.to_pylist()


def _batch(
    rows: list[dict], pad_id: int, cache_taus: list[float] | None, device: torch.device
) -> dict:
    """Collate a rank's rows; a rank with no rows this step gets one all-masked row, so it
    still runs forward and backward with DDP (with zero tokens and zero loss).

    cache_taus: the cache's grid (scoring.cache_taus) when the teacher is the table's top-K
    cache (`topk_targets`), None when it is not."""
    examples = [
        TokenizedExample(
            sample_id=r["sample_id"],
            input_ids=r["input_ids"],
            labels=r["labels"],
            prompt_length=r["prompt_length"],
            prompt_truncated=False,
            response_truncated=False,
        )
        for r in rows
    ] or [
        TokenizedExample(
            sample_id="",
            input_ids=[pad_id, pad_id],
            labels=[IGNORE_INDEX, IGNORE_INDEX],
            prompt_length=2,
            prompt_truncated=False,
            response_truncated=False,
        )
    ]
    batch = collate(examples, pad_id)
    if cache_taus is not None:
        empty = (np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float16))
        cache = [tuple(r[c] for c in TOPK_COLUMNS) for r in rows] or [
            (*empty, np.zeros((0, len(cache_taus)), np.float32))
        ]
        batch.update(topk_targets(batch["labels"], cache, cache_taus))
    return {k: v.to(device) for k, v in batch.items()}


def _dev_examples(shard) -> list[TokenizedExample]:
    out = []
    for batch in shard.iter_batches(batch_size=None, batch_format="pyarrow"):
        cols = {c: batch.column(c).to_pylist() for c in batch.column_names}
        for i in range(batch.num_rows):
            out.append(
                TokenizedExample(
                    sample_id=cols["sample_id"][i],
                    input_ids=cols["input_ids"][i],
                    labels=cols["labels"][i],
                    prompt_length=cols["prompt_length"][i],
                    prompt_truncated=False,
                    response_truncated=False,
                )
            )
    return out


# ---------------------------------------------------------------- worker side: collectives


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

    def __init__(self, out: Path, *, resume_step: int | None):
        from tensorboardX import SummaryWriter

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

    def close(self) -> None:
        self.tb.close()


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


# ---------------------------------------------------------------- worker side: the loop


def _new_progress(num_buckets: int) -> dict:
    """Per-stage sums (across ranks once reduced): what the stage summary is made of."""
    return {
        "sums": [0.0] * 7,  # loss·tokens, ce·tokens, kd·tokens, tokens, rows, on-policy steps, s
        "bucket_loss": [0.0] * num_buckets,
        "bucket_tokens": [0.0] * num_buckets,
        "bucket_rows": [0.0] * num_buckets,
    }


def _reduce_progress(progress: dict, world: int, rank: int, device: torch.device) -> dict:
    """Sum the ranks' stage sums; rank 0 keeps the total, the others restart from 0."""
    keys = ("sums", "bucket_loss", "bucket_tokens", "bucket_rows")
    flat = [v for k in keys for v in progress[k]]
    total = _all_sum(flat, world, device)
    if rank != 0:
        total = [0.0] * len(total)
    out, i = {}, 0
    for k in keys:
        out[k] = total[i : i + len(progress[k])]
        i += len(progress[k])
    return out


def _summary(p: curriculum.StagePlan, progress: dict, *, steps: int, ended_by: str) -> dict:
    loss, ce, kd, tokens, rows, on_policy, seconds = progress["sums"]
    buckets = [
        {
            "bucket": b,
            "rows": int(progress["bucket_rows"][b]),
            "tokens": int(progress["bucket_tokens"][b]),
            "loss": (
                progress["bucket_loss"][b] / progress["bucket_tokens"][b]
                if progress["bucket_tokens"][b]
                else None
            ),
        }
        for b in range(len(progress["bucket_rows"]))
    ]
    return {
        "stage": p.stage,
        "size": p.size,
        "fraction": p.fraction,
        "tau": p.tau,
        "kd_ratio": p.kd_ratio,
        "alpha": p.alpha,
        "planned_steps": p.total_steps,
        "steps": steps,
        "epochs": steps / p.steps_per_epoch,
        "ended_by": ended_by,
        "samples": int(rows),
        "tokens": int(tokens),
        "loss": loss / tokens if tokens else float("nan"),
        "ce": ce / tokens if tokens else float("nan"),
        "kd": kd / tokens if tokens else float("nan"),
        "on_policy_steps": int(on_policy),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "buckets": buckets,
    }


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


def _position(plan, stage: int, step_in_stage: int, global_step: int, samples: int) -> dict:
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


def train_fn(loop_config: dict) -> None:
    """The Ray Train worker function (also run in the driver in local mode).

    loop_config: {"config": to_dict(cfg), "job": plain data from jobs/distill.py (paths, table
    size, settings, bucket count, test fault)}.
    """
    cfg = from_dict(loop_config["config"], source="distill worker config")  # the one rebuild
    job = loop_config["job"]
    quiet_logs(worker_process=not job["local_mode"])
    cur, opt = cfg.curriculum, cfg.optim
    ctx = ray.train.get_context()  # ray:
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = ray.train.torch.get_device()  # ray:
    out = Path(cfg.run.output_dir)
    cached = cfg.loss.teacher_source == "cache"
    pad_id = job["pad_id"]

    plan = curriculum.stage_table(
        cur, n=job["n"], batch_size=opt.batch_size * world, loss_alpha=cfg.loss.alpha
    )
    min_ratio = opt.min_lr / opt.lr
    student = models.load_pretrained(job["student_init"], cfg.student)
    teacher = None
    if not cached and any(p.kd_ratio > 0 for p in plan):
        teacher = models.freeze_teacher(models.load_pretrained(job["teacher"], cfg.teacher))
        teacher.to(device)
        if device.type == "cuda" and cfg.teacher.dtype == "float32":  # half on GPU: frozen
            teacher.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    ckpt = ray.train.get_checkpoint()  # ray: the latest reported checkpoint, on any restart
    state, saved_opt, rng = None, None, None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = read_state(Path(d))
            if state["settings_key"] != job["settings_key"]:
                raise RuntimeError(
                    "the checkpoint was written with other settings: "
                    + "; ".join(settings_changes(state["settings"], job["settings"]))
                )
            safetensors.torch.load_model(student, str(Path(d) / "student.safetensors"))
            saved_opt = torch.load(Path(d) / "optimizer.pt", weights_only=True)
            rng = torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=True)
    # transformers loads in eval mode: without this, dropout would be off in every Ray run
    # while the plain loop trains with it
    student.train()
    model = ray.train.torch.prepare_model(student)  # ray: DDP when world > 1; to device

    position = state["position"] if state else _position(plan, 0, 0, 0, 0)
    summaries: list[dict] = state["summaries"] if state else []
    log = None
    if rank == 0:
        log = RunLog(out, resume_step=position["global_step"] if state else None)
        if state:
            log.event("resume", position=position, checkpoint=ckpt.path, world_size=world)
        else:
            log.event("start", world_size=world, plan_steps=curriculum.total_steps(plan))
    if position["done"]:
        if rank == 0:
            print(f"distill: run {cfg.run.name!r} is already complete; nothing to train")
            _finish(cfg, job, student, summaries, log, started=time.perf_counter(), steps=0)
        return

    optimizer = make_optimizer(student, opt)
    resets = curriculum.resets_optimizer(cur.lr_policy)
    if saved_opt is not None and not (resets and position["step_in_stage"] == 0):
        optimizer.load_state_dict(saved_opt)
    dev = []
    if cur.plateau_patience:
        dev = _dev_examples(ray.train.get_dataset_shard(DEV_DATASET))  # ray:
    if rng is not None:
        _set_rng_state(rng)
    else:
        seed_training(cfg.run.seed, rank)
    eos_ids = tuple(dict.fromkeys([*job["eos_ids"], *models.eos_token_ids(student)]))
    parallel = DataParallel(world_size=world, all_sum=lambda v: _all_sum(v, world, device))

    started = time.perf_counter()
    steps_run = 0
    stage, k0 = position["stage"], position["step_in_stage"]
    global_step, samples = position["global_step"], position["samples_consumed"]
    tracker = None
    while stage < len(plan):
        p = plan[stage]
        steps_before = global_step - k0
        if k0 == 0:
            if stage > 0 and resets:
                optimizer = make_optimizer(student, opt)
            progress = _new_progress(job["num_buckets"])
            tracker = curriculum.PlateauTracker(cur.plateau_patience) if dev else None
        else:  # restored mid-stage: rank 0 holds the ranks' summed progress so far
            progress = state["progress"] if rank == 0 else _new_progress(job["num_buckets"])
            if dev:
                tracker = curriculum.PlateauTracker(cur.plateau_patience)
                tracker.load_state_dict(state["plateau"])
        shard = ray.train.get_dataset_shard(stage_dataset_name(stage, rank))  # ray:
        rows_of = StepRows(shard, start=k0, cached=cached, batch_size=opt.batch_size)
        ended_by, window_t, window_tokens = "interval", time.perf_counter(), 0.0
        k = k0
        while k < p.total_steps:
            pos = curriculum.stage_position(
                plan,
                stage,
                k,
                lr_policy=cur.lr_policy,
                warmup_steps=opt.warmup_steps,
                min_lr_ratio=min_ratio,
                steps_before_stage=steps_before,
            )
            _maybe_fault(job.get("fault"), pos.global_step, rank)
            t0 = time.perf_counter()
            rows = rows_of.take(k)
            batch = _batch(rows, pad_id, cfg.scoring.cache_taus if cached else None, device)
            n_here = response_tokens(batch)
            seed = curriculum.on_policy_seed(
                cfg.run.seed, pos.global_step, cfg.loss.on_policy_ratio
            )
            res = train_step(
                model,
                teacher,
                optimizer,
                batch,
                pos=pos,
                base_lr=opt.lr,
                loss=cfg.loss,
                grad_clip=opt.grad_clip,
                data_parallel=parallel,
                per_row=seed is None,
                on_policy=None
                if seed is None
                else on_policy_spec(cfg, seed, pad_id, eos_ids, student),
            )
            seconds = time.perf_counter() - t0
            n_all, ce_sum, kd_sum, kd_tokens, rows_all = _all_sum(
                [n_here, res.ce * n_here, res.kd * res.kd_tokens, res.kd_tokens, len(rows)],
                world,
                device,
            )
            sums = progress["sums"]
            for i, v in enumerate((res.loss * n_here, res.ce * n_here, res.kd * n_here, n_here)):
                sums[i] += v
            sums[4] += len(rows)
            sums[5] += res.on_policy
            sums[6] += seconds / world  # summed over ranks: the mean step time
            for r, row in enumerate(rows):
                b = int(row["bucket"])
                progress["bucket_rows"][b] += 1
                if res.row_loss is not None:
                    progress["bucket_loss"][b] += res.row_loss[r]
                    progress["bucket_tokens"][b] += res.row_tokens[r]
            k += 1
            global_step += 1
            samples += int(rows_all)
            steps_run += 1
            window_tokens += n_all
            if global_step % cfg.run.log_every == 0 or k == p.total_steps:
                # global token means, each term over its own tokens (as the gradient is);
                # one worker logs its own float32 values, bit for bit the plain loop's
                ce_mean = ce_sum / n_all if world > 1 and n_all else res.ce
                kd_mean = kd_sum / kd_tokens if world > 1 and kd_tokens else res.kd
                lam = pos.kd_ratio
                loss_mean = (1 - lam) * ce_mean + lam * kd_mean if world > 1 else res.loss
                if log is not None:
                    now = time.perf_counter()
                    log.step(
                        {
                            "step": pos.global_step,
                            "stage": stage,
                            "epoch": pos.epoch,
                            "step_in_epoch": pos.step_in_epoch,
                            "step_in_stage": pos.step_in_stage,
                            "tau": pos.tau,
                            "kd_ratio": pos.kd_ratio,
                            "alpha": pos.alpha,
                            "lr": opt.lr * pos.lr_mult,
                            "loss": loss_mean,
                            "ce": ce_mean,
                            "kd": kd_mean,
                            "tokens": int(n_all),
                            "samples": samples,
                            "on_policy": res.on_policy,
                            "tokens_per_s": window_tokens / max(now - window_t, 1e-9),
                            "step_seconds": seconds,
                            "elapsed_s": now - started,
                        }
                    )
                    window_t, window_tokens = now, 0.0
            evaluate = (cur.eval_every and k % cur.eval_every == 0) or (
                not cur.eval_every and k % p.steps_per_epoch == 0
            )
            if tracker is not None and evaluate:
                fired = tracker.update(mean_ce(student, dev, pad_id))
                if _from_rank0(fired, world, device):
                    ended_by = "plateau"
                    break
            if cfg.run.checkpoint_every and global_step % cfg.run.checkpoint_every == 0:
                if k < p.total_steps:  # a stage boundary checkpoints below anyway
                    reduced = _reduce_progress(progress, world, rank, device)
                    progress = reduced
                    _save_checkpoint(
                        rank=rank,
                        student=student,
                        optimizer=optimizer,
                        state=_state(
                            job,
                            _position(plan, stage, k, global_step, samples),
                            summaries,
                            progress,
                            tracker,
                            lr=opt.lr * pos.lr_mult,
                        ),  # fmt: skip
                        metrics={"step": global_step, "stage": stage, "loss": res.loss},
                    )
                    if log is not None:
                        log.event("checkpoint", global_step=global_step, stage=stage)
        rows_of.close()
        reduced = _reduce_progress(progress, world, rank, device)
        summaries.append(_summary(p, reduced, steps=k, ended_by=ended_by))
        if log is not None:
            log.stages(summaries)
            log.event("stage_end", stage=stage, steps=k, ended_by=ended_by)
            print(stage_line(summaries[-1], len(plan)), flush=True)
        # next: the following stage (a plateau in the last stage ends training, as planned)
        stage, k0 = stage + 1, 0
        _save_checkpoint(
            rank=rank,
            student=student,
            optimizer=optimizer,
            state=_state(
                job,
                _position(plan, stage, 0, global_step, samples),
                summaries,
                _new_progress(job["num_buckets"]),
                None,
                lr=None,
            ),  # fmt: skip
            metrics={"step": global_step, "stage": stage - 1, "loss": summaries[-1]["loss"]},
        )
    if rank == 0:
        _finish(cfg, job, student, summaries, log, started=started, steps=steps_run)


def _state(job, position, summaries, progress, tracker, *, lr) -> dict:
    return {
        "format": STATE_FORMAT,
        "settings_key": job["settings_key"],
        "settings": job["settings"],
        "position": position,
        # The LR is a pure function of the position (curriculum.stage_position): this is the
        # whole LR-scheduler state; next_lr is recorded for people reading the file.
        "lr_scheduler": {"policy": job["settings"]["curriculum"]["lr_policy"], "last_lr": lr},
        "plateau": None if tracker is None else tracker.state_dict(),
        "progress": progress,
        "summaries": summaries,
    }


def _finish(cfg: Config, job: dict, student, summaries, log, *, started: float, steps: int):
    """Rank 0: the student as a Hugging Face folder with its tokenizer, and summary.json."""
    out = Path(cfg.run.output_dir)
    tok = load_tokenizer(cfg, job["tokenizer"])
    models.save_model(student, tok, out / "student")
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
        "steps_this_attempt": steps,
        "seconds_this_attempt": time.perf_counter() - started,
        "student": str(out / "student"),
        "stage_summaries": summaries,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if log is not None:
        log.event("done", steps=summary["steps"])
        log.close()


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


def load_tokenizer(cfg: Config, path: str):
    """The run's tokenizer: pretrained as configured, or the one the scoring job saved."""
    if cfg.tokenizer.name_or_path or cfg.teacher.name_or_path:
        return models.load_tokenizer(cfg.tokenizer, cfg.teacher)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def threads_per_worker(resources: dict[str, float]) -> int:
    """torch threads for a worker holding `resources` (at least 1)."""
    return max(1, math.floor(resources.get("CPU", 1.0)))
