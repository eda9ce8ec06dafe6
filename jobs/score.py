"""`pocl-ray score CONFIG [key=value ...] [--force]`: difficulty scoring on Ray Data.

1. Start or join Ray; check that the actor pool fits the cluster.
2. Read the data and split off the held-out share; the tokenizer; tokenise the training split.
3. The models: the demo teacher (trained first when missing and needed), the starting student;
   reuse the existing table when it was made from the same inputs (unless --force).
4. Score every training row on a pool of Ray actors (one forward per model and batch).
5. Check every row is scored exactly once, fuse the signals globally, write
   `scores/table/part-00000.parquet` and `scores/manifest.json` (atomically).
See docs/scoring.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from jobs import runtime
from pocl_ray import artifacts, scores, storage
from pocl_ray.config import Config, save_resolved, to_dict
from pocl_ray.run_dir import (
    Locations,
    RunDir,
    replace_dir,
    reuse_verdict,
    scratch_dir,
    write_manifest,
)

log = logging.getLogger("pocl_ray.score")


def main(cfg: Config, *, force: bool = False, fault: dict[str, Any] | None = None) -> Path:
    """Run the scoring job; returns the `scores/` folder.

    force: rescore even when a matching table exists.
    fault: tests only: passed to every `ScorerActor` (see its docstring).
    """
    sig = cfg.scoring
    with storage.synced(cfg.run.output_dir), \
            runtime.ray_session(cpus=sig.num_actors * sig.cpus_per_actor):
        pool = runtime.pool_request("scoring", sig.num_actors, sig.cpus_per_actor,
                                    sig.gpus_per_actor, sig.accelerator_type,
                                    sig.resources)  # fmt: skip
        runtime.preflight(pool, runtime.cluster_resources())
        return _run(cfg, force=force, fault=fault)


def _run(cfg: Config, *, force: bool, fault: dict[str, Any] | None) -> Path:

    from pocl_ray import ray_data

    t_start, sig, run = time.perf_counter(), cfg.scoring, RunDir.of(cfg)
    save_resolved(cfg, run.root)

    # 2. inputs
    inputs = artifacts.read_inputs(cfg, run)
    counts = inputs.counts
    log.info("data: %d read, %d accepted, %d rejected; scoring the %d training records "
             "(%d held out)", *counts.values())  # fmt: skip
    if not inputs.train:
        raise runtime.JobError(
            "no training records left after holding out data.eval_fraction="
            f"{cfg.data.eval_fraction} of {len(inputs.loaded.records)}; lower it or add data"
        )
    tok = artifacts.tokenizer(cfg, run, inputs.train)
    train_ex = artifacts.tokenize(cfg, tok, inputs.train)
    if sig.teacher_topk > len(tok):
        raise runtime.JobError(f"scoring.teacher_topk={sig.teacher_topk} exceeds the "
                               f"vocabulary ({len(tok)} tokens); lower it")  # fmt: skip

    # 3. models, and reuse
    where = Locations.of(cfg, run)
    teacher = None
    if scores.needs_teacher(sig):
        artifacts.teacher(cfg, run, tok, train_ex)  # trains the demo teacher when missing
        teacher = where.teacher
    student_init = artifacts.student_init(cfg, run, tok, train_ex, inputs.fingerprint)
    paths = {"tokenizer": where.tokenizer, "teacher": teacher, "student_init": student_init}
    paths["scorer"] = teacher if sig.scorer == "teacher" else student_init
    key = scores.table_key(cfg, inputs.fingerprint, paths)

    def complete(old: dict) -> str | None:
        rows = scores.table_rows(run)
        return None if rows == old["counts"]["scored"] else "its table is missing or partial"

    reuse, why = reuse_verdict(run.scores, key, format_version=scores.FORMAT_VERSION,
                               complete=complete)  # fmt: skip
    if reuse and not force:
        print(f"scores: reusing the existing table in {run.scores} ({why}); --force rescores")
        return run.scores
    if force or not (run.scores / "manifest.json").exists():
        log.info("scores: %s; scoring into %s", "--force given" if force else why, run.scores)
    else:
        log.warning("scores: %s; rescoring and replacing %s", why, run.scores)

    # 4. score on the actor pool
    t0 = time.perf_counter()
    budget = runtime.scoring_budget(cfg, paths["scorer"])
    rows = ray_data.example_rows(train_ex, [r.references for r in inputs.train])
    scored = ray_data.score_rows(
        rows,
        config=to_dict(cfg),  # the one place the config crosses into Ray workers
        sig=sig,
        paths={k: paths[k] for k in ("tokenizer", "scorer", "teacher")},
        max_new_tokens=budget,
        fault=fault,
    )
    scoring_s = time.perf_counter() - t0

    # 5. accounting, the table, the manifest
    counts["scored"] = len(scored)
    ids = [e.sample_id for e in train_ex]
    if problems := scores.accounting_problems(counts, scored["sample_id"].tolist(), ids):
        raise runtime.JobError("row accounting failed; the scores table was NOT written:\n"
                               + "\n".join(f"  - {p}" for p in problems))  # fmt: skip
    table = scores.build_table(scored, inputs.train, train_ex, cfg)
    tmp = scratch_dir(run.scores)
    (tmp / scores.TABLE_DIR).mkdir()
    arrow = scores.to_arrow(table, sig.signals, sig.teacher_topk, sig.cache_taus)
    pq.write_table(arrow, tmp / scores.TABLE_DIR / scores.TABLE_FILE)
    resources = runtime.cluster_resources()
    manifest = scores.manifest(
        cfg, table, key=key, paths=paths, counts=counts, answer_tokens=budget,
        seconds={"scoring": scoring_s, "total": time.perf_counter() - t_start},
        ray={"version": runtime.ray_version(),
             "cluster_resources": {k: resources[k] for k in ("CPU", "GPU") if k in resources}},
    )  # fmt: skip
    write_manifest(tmp, manifest)
    replace_dir(tmp, run.scores)
    quality, means = manifest["measurer_quality"], manifest["signal_means"]
    rho = "" if quality is None else f"; Spearman(rank, true level) {quality['fused']:.3f}"
    print(
        f"scores: {len(table)} rows in {scoring_s:.1f} s ({len(table) / scoring_s:.1f} rows/s); "
        f"means {' '.join(f'{s}={v:.3f}' for s, v in means.items())}{rho} -> {run.scores}"
    )
    if quality is not None:  # built-in tasks: how well each signal orders the true levels
        print(f"scores: Spearman rho with the true level: {scores.format_quality(quality)}")
    return run.scores
