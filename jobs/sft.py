"""`pocl-ray sft CONFIG [key=value ...] [--target teacher|student]`: supervised fine-tuning
(CE only) on Ray Train, over the same data path as distillation.

- `--target teacher` (default) trains the tiny teacher of the embedded default into
  `run.output_dir/teacher/` (what `pocl-ray score` and `distill` then load);
- `--target student` trains the SFT-student baseline (no teacher) into
  `run.output_dir/student_sft/`, starting from the same seeded init as the distilled students.
A folder that already holds a model is reused (delete it to retrain). The loop in each worker
is the core `train_step.sft` on that worker's equal share of the rows, with the model wrapped
for DDP by `ray.train.torch.prepare_model`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Literal

from jobs import score
from pocl_ray import models
from pocl_ray.config import Config, from_dict, save_resolved, to_dict
from pocl_ray.data import TokenizedExample, split_train_eval, tokenize_records
from pocl_ray.plain import get_tokenizer, load_task_records, new_student, run_sft

log = logging.getLogger("pocl_ray.sft")

Target = Literal["teacher", "student"]
FOLDERS = {"teacher": "teacher", "student": "student_sft"}


def _example(row: dict) -> TokenizedExample:
    return TokenizedExample(
        sample_id=row["sample_id"],
        input_ids=list(row["input_ids"]),
        labels=list(row["labels"]),
        prompt_length=int(row["prompt_length"]),
        prompt_truncated=False,
        response_truncated=False,
    )


def sft_worker(loop_config: dict) -> None:
    """Ray Train worker: rebuild the config, train on this rank's shard, rank 0 saves."""
    import ray.data
    import ray.train
    import torch
    from ray.train.torch import prepare_model
    from transformers import PreTrainedTokenizerFast

    from pocl_ray import ray_train

    cfg = from_dict(loop_config["config"])  # the one place the config is rebuilt in workers
    ray_train.quiet_logs(worker_process=True)
    ray_train.quiet(ray.data.DataContext.get_current())
    target: Target = loop_config["target"]
    torch.set_num_threads(loop_config["threads"])
    tok = PreTrainedTokenizerFast.from_pretrained(loop_config["tokenizer"])
    model_cfg = cfg.teacher if target == "teacher" else cfg.student
    # the same seeded init as plain.get_teacher / plain.new_student
    torch.manual_seed(cfg.run.seed if target == "teacher" else cfg.run.seed + 1)
    if model_cfg.name_or_path:
        model = models.load_pretrained(model_cfg.name_or_path, model_cfg)
    else:
        model = models.build_tiny(model_cfg, tok, cfg.data.max_length)
    model = prepare_model(model)
    rows = ray.train.get_dataset_shard("train").iter_rows()
    examples = [_example(r) for r in rows]
    rank0 = ray.train.get_context().get_world_rank() == 0

    def on_epoch(epoch: int, loss: float) -> None:
        if rank0:
            print(f"sft {target}: epoch {epoch + 1}/{cfg.sft.epochs} loss {loss:.4f}", flush=True)

    losses = run_sft(cfg, model, examples, tok, epochs=cfg.sft.epochs, on_epoch=on_epoch)
    if rank0:
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        models.save_model(model.module if ddp else model, tok, loop_config["dest"])
    ray.train.report({"loss": losses[-1], "epochs": len(losses)})


def main(cfg: Config, *, target: Target = "teacher") -> Path:
    """Train `target` by SFT unless its folder already holds a model; returns the folder."""
    out = Path(cfg.run.output_dir).resolve()
    storage = Path(cfg.run.storage_path).resolve() if cfg.run.storage_path else out / "ray"
    cfg = dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, output_dir=str(out), storage_path=str(storage))
    )
    dest = out / FOLDERS[target]
    if (dest / "config.json").exists():
        print(f"sft {target}: reusing {dest} (delete it to retrain)", flush=True)
        return dest
    started = score.connect_ray(cfg)
    try:
        return _run(cfg, target, out, dest)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(cfg: Config, target: Target, out: Path, dest: Path) -> Path:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.distill import check_resources
    from pocl_ray import ray_train

    check_resources(cfg.scaling, ray.cluster_resources())  # before any work: would hang
    t0 = time.perf_counter()
    save_resolved(cfg, out)
    loaded = load_task_records(cfg, out)
    train, _ = split_train_eval(loaded.records, cfg.data.eval_fraction, seed=cfg.run.seed)
    tok = get_tokenizer(cfg, train, out)
    lengths = dict(max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length)
    examples = tokenize_records(train, tok, **lengths).examples
    rows = [dataclasses.asdict(e) for e in examples]
    size = models.count_parameters(new_student(cfg, tok)) if target == "student" else None
    print(
        f"sft {target}: {len(rows)} training rows, {cfg.sft.epochs} epochs, "
        f"{max(cfg.scaling.num_workers, 1)} worker(s)"
        + (f", student of {size} parameters" if size else "")
        + f" -> {dest}",
        flush=True,
    )
    ray_train.quiet_logs()
    ray_train.quiet(ray.data.DataContext.get_current())
    resources = dict(cfg.scaling.resources_per_worker)
    trainer = TorchTrainer(
        sft_worker,
        train_loop_config={
            "config": to_dict(cfg),  # the one crossing into workers
            "target": target,
            "tokenizer": str(out / "tokenizer"),
            "dest": str(dest),
            "threads": ray_train.threads_per_worker(resources) if cfg.scaling.num_workers else 1,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources or None,
        ),
        run_config=ray.train.RunConfig(
            name=f"{cfg.run.name}-sft-{target}",
            storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
        datasets={"train": ray.data.from_items(rows)},
    )
    trainer.fit()
    print(f"sft {target}: saved {dest} in {time.perf_counter() - t0:.0f} s", flush=True)
    return dest


if __name__ == "__main__":
    from pocl_ray.cli import main as cli_main

    sys.exit(cli_main(["sft", *sys.argv[1:]]))
