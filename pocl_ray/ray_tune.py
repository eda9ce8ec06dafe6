"""Ray Tune adapter: search spaces -> Tune domains, the trial function, the searcher and the
scheduler, the restore (docs/tune.md). Ray-specific lines are marked `# ray:`.

The rules are the core's (`search`: which points are valid, budgets, results), and a trial is
the distill run itself (`ray_train.prepare_distill`, `build_trainer`, `train_fn`). Train V2
inside Tune (ray-notes.md): a function trainable builds the TorchTrainer with Tune's report
callback and fits it; the trial's own actor takes a token CPU (`search.TRIAL_ACTOR_CPU`); a
`trial_dirname_creator` names the trial folders, and that name is also the trial's Train run
name and output folder, so a restored trial resumes its own Train checkpoints.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from ray import tune  # ray: this module is an adapter; the core never imports ray
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher

from pocl_ray import ray_train, search
from pocl_ray.config import Config, save_resolved, to_dict

RUNG_SPAN = 64
"""ASHA's rungs go up to RUNG_SPAN x the base budget; no trial is ever stopped for length
(stop_last_trials=False), so this only has to exceed every trial's budget."""


# ---------------------------------------------------------------- the space and the search


def domains(space: search.Space) -> dict[str, Any]:
    """The Tune param space: {"params": {key: domain}, "kd_reference": False}."""

    def domain(p: search.Param):
        if p.kind == "choice":
            return tune.choice(list(p.values))
        if p.kind == "grid":
            return tune.grid_search(list(p.values))
        if p.kind == "uniform":
            return tune.uniform(*p.values)
        if p.kind == "loguniform":
            return tune.loguniform(*p.values)
        return tune.randint(p.values[0], p.values[1] + 1)  # Tune's upper bound is exclusive

    return {"params": {p.key: domain(p) for p in space.params}, "kd_reference": False}


def reference_point(space: search.Space, base: Config) -> dict[str, Any]:
    """The KD reference as a point: the base config's own values (the trial then sets
    curriculum.mode=none, `search.trial_overrides`)."""
    values = to_dict(base)

    def get(key: str) -> Any:
        node = values
        for part in key.split("."):
            node = node[part]
        return node

    return {"params": {k: get(k) for k in space.keys}, "kd_reference": True}


def search_alg(space: search.Space, reference: dict | None, at_once: int):
    """random: Tune's variant generator (grids, random sampling), the reference as its first
    point; optuna: TPE, the reference handed out first by `ReferenceFirst`."""
    s = space.settings
    if s.searcher == "random":
        return BasicVariantGenerator(
            points_to_evaluate=[reference] if reference else None,
            random_state=s.seed,
            max_concurrent=at_once,
        )
    from ray.tune.search.optuna import OptunaSearch

    optuna = OptunaSearch(seed=s.seed)
    return ReferenceFirst(optuna, reference) if reference else optuna


def scheduler(settings: search.SearchSettings, base_budget: int) -> TrialScheduler:
    """ASHA on the samples clock (`search.CLOCK`): rungs at grace x rf^k samples, so trials
    of different lengths are compared after the same amount of training."""
    if settings.scheduler == "fifo":
        return FIFOScheduler()
    grace = max(1, math.ceil(settings.grace * base_budget))
    return ASHAScheduler(
        time_attr=search.CLOCK,
        grace_period=grace,
        reduction_factor=settings.reduction_factor,
        max_t=max(grace, base_budget) * RUNG_SPAN,
        stop_last_trials=False,
    )


class ReferenceFirst(Searcher):
    """Hands out the KD reference's point once, then the inner searcher's points. The
    reference is no point of the space, so its results never reach the inner searcher; an
    invalid trial reaches it as a failed one (no value to learn from)."""

    def __init__(self, searcher: Searcher, reference: dict):
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.reference = searcher, reference
        self.reference_id: str | None = None

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        self._metric, self._mode = metric, mode
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        if self.reference_id is None:
            self.reference_id = trial_id
            return copy.deepcopy(self.reference)
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id != self.reference_id and "invalid" not in result:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error=False):
        if trial_id == self.reference_id:
            return
        if result and "invalid" in result:
            result, error = None, True
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        """Tune saves the searcher with the experiment: the inner state plus which trial is
        the reference (a restored search must not hand it out again)."""
        self.searcher.save(checkpoint_path)
        inner = Path(checkpoint_path).read_bytes()
        # JSON, not pickle: our own state never executes code when read back (the inner
        # searcher's bytes are Ray's own format, restored by Ray's searcher)
        state = {"inner": base64.b64encode(inner).decode(), "reference_id": self.reference_id}
        Path(checkpoint_path).write_text(json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        try:
            state = json.loads(Path(checkpoint_path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RuntimeError(
                f"{checkpoint_path}: searcher state in the older pickle format, which this "
                "version does not unpickle (it could run code); start the search again "
                "without --resume"
            ) from e
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "inner.pkl").write_bytes(base64.b64decode(state["inner"]))
            self.searcher.restore(str(Path(d) / "inner.pkl"))
        self.reference_id = state["reference_id"]


# ---------------------------------------------------------------- one trial


def trial_dirname(trial: Trial) -> str:
    return search.trial_dirname(trial.trial_id, trial.config["kd_reference"])


def trial_fn(point: dict, *, base: dict, setup: dict) -> None:
    """One Tune trial: the distill run of the base config with `point` applied.

    base: the base config as a plain dict (run.storage_path: the trials' Train storage).
    setup: {"n": scored samples, "metric": the dev metric, "trials_dir": outputs folder,
        "fault": tests only, the distill job's `fault`}.
    An invalid point reports its problems and trains nothing (`search.trial_config`); a
    valid one trains into `<trials_dir>/<trial>/`, reporting at every checkpoint.
    """
    name = Path(tune.get_context().get_trial_dir()).name  # ray: = trial_dirname
    reference = point["kd_reference"]
    overrides = search.trial_overrides(point["params"], reference=reference)
    cfg, problems = search.trial_config(base, overrides, n=setup["n"], name=name)
    if cfg is None:
        invalid = {"invalid": "; ".join(problems), setup["metric"]: math.nan, search.CLOCK: 0}
        tune.report(invalid | {"plan_complete": False})  # ray:
        return
    out = Path(setup["trials_dir"]) / name
    ray_train.quiet_logs(worker_process=True)
    prepared = ray_train.prepare_distill(
        cfg, out=out, dev_metric=setup["metric"], fault=setup.get("fault")
    )
    save_resolved(cfg, out)
    trainer = ray_train.build_trainer(
        ray_train.train_fn,
        {"config": to_dict(cfg), "job": prepared.job},
        cfg,
        name=name,
        datasets=prepared.datasets,
        plan_sharded=True,
        max_failures=cfg.run.max_failures,
        keep_checkpoints=cfg.run.keep_checkpoints,
        callbacks=[TuneReportCallback()],  # ray: rank 0's reports become the trial's results
    )
    trainer.fit()  # raises when training fails: Tune records the trial as failed


def trainable(base: dict, setup: dict):
    """`trial_fn` with its fixed arguments; its own actor only waits on the workers."""
    fn = tune.with_parameters(trial_fn, base=base, setup=setup)  # ray:
    return tune.with_resources(fn, {"cpu": search.TRIAL_ACTOR_CPU})  # ray:


# ---------------------------------------------------------------- the search


def new_tuner(
    space: search.Space,
    fn,
    *,
    reference: dict | None,
    base_budget: int,
    at_once: int,
    experiment: Path,
) -> tune.Tuner:
    """A fresh search stored in `experiment` (a folder: its parent is Tune's storage)."""
    s = space.settings
    alg = search_alg(space, reference, at_once)
    return tune.Tuner(
        fn,
        param_space=domains(space),
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=alg,
            scheduler=scheduler(s, base_budget),
            num_samples=s.num_samples + (1 if reference else 0),
            # the variant generator limits itself; a Searcher gets a ConcurrencyLimiter
            max_concurrent_trials=None if isinstance(alg, BasicVariantGenerator) else at_once,
            trial_dirname_creator=trial_dirname,
            trial_name_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=str(experiment.parent),
            failure_config=tune.FailureConfig(max_failures=0),  # a failed trial stays failed
            callbacks=[ProgressLines(s.metric)],
            verbose=0,
        ),
    )


class ProgressLines(tune.Callback):
    """One console line per trial event (Tune's own status tables are off)."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_start(self, iteration, trials, trial, **info):
        point = trial.config["params"]
        what = "plain KD, base config" if trial.config["kd_reference"] else ", ".join(
            f"{k}={search.short_value(v)}" for k, v in point.items()
        )
        print(f"tune: {trial} started ({what})", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "invalid" in result:
            print(f"tune: {trial} invalid, not trained: {result['invalid']}", flush=True)
            return
        print(f"tune: {trial} {self.metric} {result[self.metric]:.4f} at {result[search.CLOCK]} "
              f"samples (stage {result['stage']})", flush=True)  # fmt: skip

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if "invalid" not in last:
            how = "ran its plan" if last.get("plan_complete") else "stopped by the scheduler"
            print(f"tune: {trial} {how}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"tune: {trial} failed (recorded; the search goes on)", flush=True)


def can_restore(experiment: Path) -> bool:
    return tune.Tuner.can_restore(str(experiment))


def restored_tuner(experiment: Path, fn) -> tune.Tuner:
    """The search in `experiment` with its finished trials kept and its unfinished ones
    resumed (each from its Train checkpoints); failed trials stay failed."""
    return tune.Tuner.restore(str(experiment), trainable=fn, resume_unfinished=True)


def records(grid: tune.ResultGrid) -> list[search.TrialRecord]:
    """What Tune kept of every trial, as the core's records."""
    out = []
    for r in grid:
        if r.config is None:  # a trial that never started (an interrupted search)
            continue
        out.append(
            search.TrialRecord(
                trial=Path(r.path).name,
                reference=r.config["kd_reference"],
                point=r.config["params"],
                result=dict(r.metrics or {}),
                error=None if r.error is None else str(r.error),
            )
        )
    return out


def fit(tuner: tune.Tuner) -> tuple[list[search.TrialRecord], bool]:
    """Run (or continue) the search: (the trials' records, whether Ctrl-C interrupted it).

    Tune ends a search on SIGINT after saving its state, and returns normally: nothing in the
    results says so. So our own SIGINT handler notes it and hands the stop to Tune's other
    stop signal (SIGUSR1); a second Ctrl-C acts as usual. Ray Train's progress lines stay
    quiet in this process."""
    ray_train.quiet_logs()
    interrupted = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(sig, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)
        os.kill(os.getpid(), signal.SIGUSR1)  # ray: Tune's graceful stop (state saved)

    if main:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ray: ours instead of Tune's
        signal.signal(signal.SIGINT, on_sigint)
    try:
        grid = tuner.fit()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
    return records(grid), interrupted.is_set()
