"""`pocl-ray sft CONFIG [key=value ...] [--target teacher|student]`: supervised fine-tuning
(CE only) on Ray Train.

1. The destination: `--target teacher` (default) trains the demo teacher into
   `run.output_dir/teacher/` (what `pocl-ray score` and `distill` then load); `--target
   student` trains a student from its seeded init into `run.output_dir/student_sft/`. A
   folder that already holds a model is reused (delete it to retrain).
2. Start or join Ray; check that the worker group fits the cluster.
3. Read and tokenise the training split; train with `ray_train.sft_fn` on every worker (the
   core `loop.sft` on the worker's share of the rows, the model wrapped for DDP).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from jobs import runtime
from pocl_ray import artifacts, models, storage
from pocl_ray.config import Config, save_resolved, to_dict
from pocl_ray.run_dir import Locations, RunDir, absolute

Target = Literal["teacher", "student"]
FOLDERS = {"teacher": "teacher", "student": "student_sft"}


def main(cfg: Config, *, target: Target = "teacher") -> Path:
    """Train `target` by SFT unless its folder already holds a model; returns the folder."""
    cfg = absolute(cfg)
    run = RunDir.of(cfg)
    dest = run.root / FOLDERS[target]
    with storage.synced(cfg.run.output_dir):
        if (dest / "config.json").exists():
            print(f"sft {target}: reusing {dest} (delete it to retrain)", flush=True)
            return dest
        with runtime.ray_session(cpus=cfg.scaling.num_workers):
            runtime.preflight(runtime.worker_request(cfg.scaling), runtime.cluster_resources())
            return _run(cfg, run, target, dest)


def _run(cfg: Config, run: RunDir, target: Target, dest: Path) -> Path:
    from pocl_ray import ray_train

    t0 = time.perf_counter()
    save_resolved(cfg, run.root)
    inputs = artifacts.read_inputs(cfg, run)
    tok = artifacts.tokenizer(cfg, run, inputs.train)
    examples = artifacts.tokenize(cfg, tok, inputs.train)
    tiny_student = target == "student" and cfg.student.init == "auto"
    size = models.count_parameters(artifacts.new_student(cfg, tok)) if tiny_student else 0
    print(
        f"sft {target}: {len(examples)} training rows, {cfg.sft.epochs} epochs, "
        f"{max(cfg.scaling.num_workers, 1)} worker(s)"
        + (f", student of {size} parameters" if size else "")
        + f" -> {dest}",
        flush=True,
    )
    ray_train.quiet_logs()
    loop_config = {
        "config": to_dict(cfg),  # the one crossing into workers
        "target": target,
        "tokenizer": Locations.of(cfg, run).tokenizer,
        "teacher": Locations.of(cfg, run).teacher,  # a teacher-layers student is made of it
        "dest": str(dest),
        "threads": ray_train.threads_per_worker(cfg),
    }
    trainer = ray_train.build_trainer(
        ray_train.sft_fn,
        loop_config,
        cfg,
        name=f"{cfg.run.name}-sft-{target}",
        datasets={"train": ray_train.examples_dataset(examples)},
        plan_sharded=False,
        max_failures=0,
    )
    trainer.fit()
    if storage.is_uri(cfg.run.output_dir):  # rank 0 may have saved it on another node
        storage.pull(cfg.run.output_dir, run.root, [FOLDERS[target]])
    print(f"sft {target}: saved {dest} in {time.perf_counter() - t0:.0f} s", flush=True)
    return dest
