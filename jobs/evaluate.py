"""`pocl-ray evaluate CONFIG [key=value ...] [--force]`: batch generation on Ray Data.

1. Inputs (no Ray yet): the eval sets (`heldout` = the run's held-out split), the models,
   their tokenizers and answer budgets; reuse the results when made from the same inputs.
2. Tokenise every prompt once per tokenizer (a bad prompt fails here, with its file and line).
3. Start or join Ray; check that the actor pool fits; answer every (set, example, seed) row
   with every model on one pool of actors (each loads every model once).
4. Check every answer is there once; write `eval/results.csv` (per seed, mean, sd),
   `eval/generations.jsonl` and `eval/manifest.json` (atomically); print the table.
The protocol of pocl-method.md section 7 by default. See docs/evaluate.md.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from jobs import runtime
from pocl_ray import artifacts, evaluation, run_dir, storage
from pocl_ray.config import HELDOUT, Config, named_entry, save_resolved, to_dict
from pocl_ray.run_dir import RunDir

log = logging.getLogger("pocl_ray.evaluate")


def main(
    cfg: Config, *, force: bool = False, show_table: bool = True, folder: str | None = None
) -> Path:
    """Run the evaluation job; returns its folder (`eval/` of the run directory).

    show_table: print the model x set table at the end (the pipeline prints its own).
    folder: another folder of the run directory for the results (`pocl-ray compare`).
    """
    with storage.synced(cfg.run.output_dir):
        return _main(cfg, force=force, show_table=show_table, folder=folder)


def _main(cfg: Config, *, force: bool, show_table: bool, folder: str | None) -> Path:
    run, ev = RunDir.of(cfg), cfg.eval
    if folder:
        run.eval = run.root / folder
    save_resolved(cfg, run.root)
    tmp = run_dir.scratch_dir(run.eval)
    try:
        # 1. inputs and reuse
        sets, specs = _inputs(cfg, run, tmp)
        key = {
            "config_hash": run_dir.hash_json(evaluation.hashed_config(cfg)),
            "models": {
                n: {
                    "id": run_dir.model_id(s["path"]),
                    "tokenizer_id": run_dir.model_id(s["tokenizer"]),
                }
                for n, s in specs.items()
            },
            "sets": {s.name: evaluation.set_fingerprint(s) for s in sets},
        }

        def complete(old: dict) -> str | None:
            files = (evaluation.RESULTS_FILE, evaluation.GENERATIONS_FILE)
            missing = [f for f in files if not (run.eval / f).exists()]
            return f"{', '.join(missing)} missing" if missing else None

        reuse, why = run_dir.reuse_verdict(run.eval, key, format_version=evaluation.FORMAT_VERSION,
                                   complete=complete)  # fmt: skip
        if reuse and not force:
            print(f"eval: reusing the results in {run.eval} ({why}); --force re-evaluates")
            if show_table:
                old = evaluation.read_results(run.eval.parent, run.eval.name)
                print(evaluation.format_table(old, ev))
            return run.eval
        # 2. prompts
        try:
            columns = evaluation.prompt_columns(sets, specs, cfg)
        except evaluation.EvalInputError as e:
            raise runtime.JobError(str(e)) from e
        # 3. Ray: answer on the actor pool
        with runtime.ray_session(cpus=ev.num_actors * ev.cpus_per_actor):
            runtime.preflight(
                runtime.pool_request("eval", ev.num_actors, ev.cpus_per_actor, ev.gpus_per_actor,
                                     ev.accelerator_type, ev.resources),  # fmt: skip
                runtime.cluster_resources(),
            )
            t0 = time.perf_counter()
            rows, got = _answer(cfg, sets, specs, columns)
            seconds, ray_version = time.perf_counter() - t0, runtime.ray_version()
        # 4. accounting, tables, files
        try:
            g = evaluation.answers_table(got, rows, list(specs), [s.name for s in sets])
        except evaluation.EvalInputError as e:
            raise runtime.JobError(str(e)) from e
        results = evaluation.results_table(g, list(specs), [s.name for s in sets])
        results.to_csv(tmp / evaluation.RESULTS_FILE, index=False, float_format="%.6f")
        evaluation.write_generations(tmp / evaluation.GENERATIONS_FILE, g)
        manifest = evaluation.manifest(cfg, key, sets, specs, rows=len(rows), answers=len(g),
                                       seconds=seconds, ray_version=ray_version)  # fmt: skip
        run_dir.write_manifest(tmp, manifest)
        run_dir.replace_dir(tmp, run.eval)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the results were swapped in
    print(f"eval: {len(g)} answers in {seconds:.1f} s ({len(g) / seconds:.1f}/s) -> {run.eval} "
          f"(results.csv, generations.jsonl)")  # fmt: skip
    if show_table:
        print(evaluation.format_table(results, ev))
    return run.eval


def _inputs(cfg: Config, run: RunDir, rejects_dir: Path):
    """The eval sets and, per model, its folder, tokenizer and answer budget."""
    wants_held = any(named_entry(e) == (HELDOUT, "") for e in cfg.eval.sets)
    held = artifacts.read_inputs(cfg, run).held if wants_held else []
    try:
        sets = evaluation.load_sets(cfg, held, rejects_dir)
        specs: dict[str, dict[str, Any]] = {}
        for name, path in evaluation.model_entries(cfg, run).items():
            specs[name] = {
                "path": path,
                "tokenizer": evaluation.tokenizer_path(cfg, path, run),
                "max_new_tokens": _budget(cfg, name, path),
            }
    except evaluation.EvalInputError as e:
        raise runtime.JobError(str(e)) from e
    n = 1 if cfg.eval.decoding == "greedy" else len(cfg.eval.seeds)
    log.info("eval: %d models (%s) x %d sets (%s) x %d decoding pass(es) = %d answers",
             len(specs), ", ".join(specs), len(sets),
             ", ".join(f"{s.name}={len(s.records)}" for s in sets), n,
             sum(len(s.records) for s in sets) * n * len(specs))  # fmt: skip
    return sets, specs


def _budget(cfg: Config, name: str, path: str) -> int:
    """Model `name`'s new tokens (`evaluation.answer_budget`), with a notice if clamped."""
    try:
        budget, positions = evaluation.answer_budget(
            path, max_new_tokens=cfg.eval.max_new_tokens,
            max_prompt_length=cfg.data.max_prompt_length,
        )  # fmt: skip
    except OSError as e:
        raise runtime.JobError(
            f"model {name!r}: cannot read a model config from {path!r} (not a folder here "
            f"nor under run.output_dir, and not a loadable hub name): {e}"
        ) from e
    except ValueError as e:
        raise runtime.JobError(f"model {name!r}: {e}") from e
    if budget < cfg.eval.max_new_tokens:
        print(f"eval: model {name!r} has {positions} positions: answers limited to {budget} new "
              f"tokens (eval.max_new_tokens={cfg.eval.max_new_tokens}, prompts up to "
              f"data.max_prompt_length={cfg.data.max_prompt_length})", flush=True)  # fmt: skip
    return budget


def _answer(cfg: Config, sets, specs, columns):
    """(rows, answers): one row per (set, example, seed), one answer per (model, row)."""
    from pocl_ray import ray_data

    seeds = evaluation.decode_seeds(cfg.eval)
    by_record = {(s.name, r.sample_id): r for s in sets for r in s.records}
    rows = ray_data.generation_rows({s.name: s.records for s in sets}, seeds)
    records = [by_record[(n, i)] for n, i in zip(rows["set"], rows["sample_id"])]
    for column, fitted in columns.items():
        rows[f"ids_{column}"] = [fitted[id(r)][0] for r in records]
        rows[f"cut_{column}"] = [fitted[id(r)][1] for r in records]
    got = ray_data.generate_rows(
        rows,
        config=to_dict(cfg),  # the one place the config crosses into Ray workers
        ev=cfg.eval,
        model_specs={
            n: {k: s[k] for k in ("path", "tokenizer", "ids", "cut", "max_new_tokens")}
            for n, s in specs.items()
        },  # fmt: skip
    )
    return rows, got
