"""`pocl-ray tune CONFIG --space tune_spaces/NAME.yaml [key=value ...] [--resume]`: a Ray Tune
search over the curriculum; every trial is a distill run on the same scores table.

1. Read the space file and check it (before Ray): unknown keys, bad distributions, settings.
2. Start or join Ray; check that one trial fits the cluster, and how many fit at once.
3. The shared inputs, once: the scores table (the scoring job, or the matching table reused)
   and the models, checked against the base config as every trial will be.
4. Search: Tune trials = distill runs (`ray_tune.trial_fn`), ASHA on the samples clock, plus
   the plain-KD reference; `--resume` continues an interrupted search.
5. Outputs in `run.output_dir/tune/`: results.csv, best_config.yaml, metric_by_param.png,
   trials/<trial>/; the table (best first) and one summary line.
See docs/tune.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from jobs import runtime, score
from pocl_ray import report, search, storage
from pocl_ray.config import Config, ConfigError, dump_yaml, to_dict
from pocl_ray.run_dir import RunDir, absolute, changes


def main(
    cfg: Config, *, space: str | Path, resume: bool = False, fault: dict | None = None
) -> Path:
    """Run (or with `resume`, continue) the search; returns `run.output_dir/tune`.
    fault: tests only (the distill job's worker fault, in whichever trial reaches it first)."""
    sp = search.read_space(space)  # 1. a bad space stops here, before Ray (exit code 2)
    cfg = absolute(cfg)
    if problems := _problems(cfg):
        raise ConfigError(problems, "the tune job")
    one = runtime.trial_request(cfg.scaling)
    with runtime.ray_session(cpus=one.cpus):
        cluster = runtime.cluster_resources()
        runtime.preflight(one, cluster)  # 2. a trial that can never be placed would hang
        at_once = min(runtime.trials_at_once(one, cluster), sp.settings.max_concurrent or 1 << 16,
                      sp.trials() + sp.settings.kd_reference)  # fmt: skip
        return _run(cfg, sp, Path(space), resume=resume, at_once=at_once, fault=fault)


def _run(
    cfg: Config, sp: search.Space, space_file: Path, *, resume: bool, at_once: int, fault
) -> Path:
    from pocl_ray import ray_train, ray_tune

    t_start, s = time.perf_counter(), sp.settings
    run = RunDir.of(cfg)
    out, experiment = run.root / "tune", run.storage(cfg) / "tune" / cfg.run.name

    # 3. the shared inputs, once: no trial scores
    score.main(cfg)
    try:
        check = ray_train.prepare_distill(cfg, out=out, dev_metric=s.metric, check_only=True)
    except ray_train.SetupError as e:
        raise runtime.JobError(str(e)) from e
    n, world = check.n, max(cfg.scaling.num_workers, 1)
    identity = {"space": yaml.safe_load(space_file.read_text(encoding="utf-8")),
                "config": to_dict(cfg), "n": n}  # fmt: skip
    _check_resume(out, experiment, identity, resume=resume, can=ray_tune.can_restore)

    # 4. the search
    base = to_dict(cfg)  # the trials' Train runs live beside the search in storage
    base["run"]["storage_path"] = str(experiment.with_name(f"{cfg.run.name}.train"))
    setup = {"n": n, "metric": s.metric, "trials_dir": str(out / "trials"), "fault": fault}
    fn = ray_tune.trainable(base, setup)
    budget = search.planned_samples(cfg, n, world)
    reference = ray_tune.reference_point(sp, cfg) if s.kd_reference else None
    print(f"tune: {sp.trials()} trial(s){' + the KD reference' if reference else ''}, up to "
          f"{at_once} at once; metric {s.metric} ({s.mode}) on {n} scored samples; base budget "
          f"{budget} samples ({cfg.curriculum.num_stages} stages); scheduler {s.scheduler}"
          + (f" (first rung at {s.grace:g} x budget)" if s.scheduler == "asha" else "")
          + f" -> {out}", flush=True)  # fmt: skip
    if resume:
        print(f"tune: resuming the search in {experiment}", flush=True)
        tuner = ray_tune.restored_tuner(experiment, fn)
    else:
        tuner = ray_tune.new_tuner(sp, fn, reference=reference, base_budget=budget,
                                   at_once=at_once, experiment=experiment)  # fmt: skip
    records, interrupted = ray_tune.fit(tuner)
    if interrupted:  # Ctrl-C: Tune saved the search; the table would be a partial one
        raise runtime.Interrupted(
            f"the search was interrupted (Ctrl-C); its state is saved in {experiment}: run "
            "the same command with --resume to continue it"
        )

    # 5. the outputs
    budgets = {}
    for r in records:
        overrides = search.trial_overrides(r.point, reference=r.reference)
        trial_cfg, _ = search.trial_config(base, overrides, n=n, name=r.trial)
        budgets[r.trial] = trial_cfg and search.planned_samples(trial_cfg, n, world)
    table = search.results_table(records, sp, budgets=budgets)
    table.to_csv(out / "results.csv", index=False)
    logs = [p.key for p in sp.params if p.kind == "loguniform"]
    report.plot_search(table, sp.keys, s.metric, out / "metric_by_param.png", log_keys=logs)
    report.link_search(run)
    best = search.best_row(table, s.metric)
    if best is not None:
        best_cfg = search.best_config(to_dict(cfg), sp, best, name=f"{cfg.run.name}-tune-best")
        header = (f"# best trial {best['trial']} of the search in {experiment} ({s.metric} "
                  f"{best[s.metric]:.4f}); train it: pocl-ray distill <this file>\n")  # fmt: skip
        (out / "best_config.yaml").write_text(header + dump_yaml(best_cfg), encoding="utf-8")
    print("\n" + search.format_table(table, sp))
    print("\n".join(search.comparison(table, s.metric, s.mode)))
    counts = table["status"].value_counts().to_dict()
    print(f"\ntune: done in {time.perf_counter() - t_start:.0f} s ({len(table)} trials: "
          + ", ".join(f"{v} {k}" for k, v in counts.items()) + f") -> {out / 'results.csv'}, "
          + ("best_config.yaml, " if best is not None else "")
          + "metric_by_param.png, trials/")  # fmt: skip
    return out


def _problems(cfg: Config) -> list[str]:
    """What a search needs of the base config beyond a valid config."""
    out = []
    if cfg.data.eval_fraction == 0:
        out.append("data.eval_fraction: got 0; a search ranks trials by a dev metric on the "
                   "held-out split: set it > 0 (e.g. 0.1)")  # fmt: skip
    if cfg.scaling.num_workers == 0:
        out.append("scaling.num_workers: got 0; Train local mode cannot run inside a Tune trial "
                   "(Ray refuses ray.train calls in a Tune session): use >= 1")  # fmt: skip
    if cfg.curriculum.rescore:
        out.append("curriculum.rescore: true is not searched yet (a trial trains its stages in "
                   "one run, with no scoring rounds between them); set it false for the "
                   "search and compare it after with `pocl-ray compare --methods "
                   "pocl,pocl_rescore`")  # fmt: skip
    for key in ("output_dir", "storage_path"):
        if storage.is_uri(getattr(cfg.run, key)):
            out.append(f"run.{key}: a search does not run on object storage yet (its trials "
                       "write to local folders); use a local path, or a shared mount (NFS, "
                       "a FUSE-mounted bucket) on a cluster")  # fmt: skip
    return out


def _check_resume(out: Path, experiment: Path, identity: dict, *, resume: bool, can) -> None:
    """A new search needs a free name; --resume needs the same search (config, space, data)."""
    saved = out / "search.json"
    if resume:
        if not can(experiment):
            raise ConfigError([f"--resume: no search to resume in {experiment}; run without "
                               "--resume to start it"], "command line")  # fmt: skip
        old = json.loads(saved.read_text(encoding="utf-8")) if saved.exists() else {}
        if diff := changes(old.get(experiment.name, {}), identity):
            raise ConfigError([f"--resume: the search in {experiment} was started with other "
                               "settings:", *diff, "restore them, or start a new search with "
                               "another run.name"], "command line")  # fmt: skip
        return
    if can(experiment):
        raise ConfigError([f"a search named {experiment.name!r} exists in {experiment}: add "
                           "--resume to continue it, or use another run.name"],
                          "command line")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads(saved.read_text(encoding="utf-8")) if saved.exists() else {}
    saved.write_text(json.dumps(old | {experiment.name: identity}, indent=1), encoding="utf-8")

