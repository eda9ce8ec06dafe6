"""The Ray Tune search (jobs/tune.py, pocl_ray/ray_tune.py) on the session's local Ray, tiny
models. One module-scoped scoring run makes the table; each search runs in its own copy.

- a search with a grid of 4 points plus the KD reference: one point trains, one is stopped by
  ASHA on the samples clock, two are invalid; results.csv, the figure and a best config that
  `pocl-ray distill` accepts unchanged;
- a search whose driver is killed mid-way, then resumed with --resume: the finished trial is
  kept, the unfinished one continues from its Train checkpoint, every trial counted once.
Trials need real workers (Train local mode cannot run inside a Tune trial). The scheduler's
and the searcher wrapper's decisions are also tested directly (no cluster needed).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from jobs import score, tune
from pocl_ray import ray_train, ray_tune, search
from pocl_ray.config import dump_yaml, load_config
from tests import tiny

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scored(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "scored"
    score.main(tiny.tiny_cfg(out))
    return out


@pytest.fixture
def no_leaked_groups(ray_local):
    """A trial stopped by ASHA leaves its workers' placement group behind when Train's
    cleaner cannot reach a State API (this session's Ray has no dashboard; ray-notes.md):
    remove what is left after the test, so later tests get every CPU."""
    yield
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for pg_id, info in ray_local.util.placement_group_table().items():
        if info["state"] == "CREATED":
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))


def copy_run(scored: Path, dest: Path) -> Path:
    shutil.copytree(scored, dest)
    return dest


def write_space(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def events(folder: Path) -> list[str]:
    lines = (folder / "events.jsonl").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


# ---------------------------------------------------------------- a whole search


SEARCH = """\
space:
  optim.lr: {grid: [2.0e-3, 1.0e-5]}
  curriculum.tau_min: {grid: [1.0, 3.0]}      # 3.0 > tau_max 2.0: invalid
search:
  num_samples: 1
  grace: 0.1          # the first rung: after stage 1 (28 of 280 samples)
  max_concurrent: 1   # one at a time, so ASHA's decision does not depend on timing
"""


@pytest.mark.timeout(900)
def test_a_search_runs_stops_rejects_and_hands_back_a_config(
    scored, tmp_path, capsys, no_leaked_groups
):
    out = copy_run(scored, tmp_path / "run")
    space = write_space(tmp_path / "space.yaml", SEARCH)
    cfg = tiny.tiny_cfg(out)
    folder = tune.main(cfg, space=space)
    printed = capsys.readouterr().out

    table = pd.read_csv(folder / "results.csv")
    assert len(table) == 5 and table["trial"].is_unique
    rows = {(r["role"], str(r["optim.lr"]), str(r["curriculum.tau_min"])): r
            for _, r in table.iterrows()}  # fmt: skip
    ref = rows[("kd_reference", "(base)", "(base)")]
    good, slow = rows[("search", "0.002", "1.0")], rows[("search", "1e-05", "1.0")]
    assert (ref["status"], good["status"]) == ("done", "done")
    assert good["samples"] == good["budget"] == 280  # 4 stages of 1 epoch: 28+56+84+112
    assert ref["samples"] == ref["budget"] == 280  # mode none: the same visits, 2.5 epochs
    # ASHA, samples clock: at the first rung (28 samples) the slow point trails: stopped there
    assert slow["status"] == "stopped early" and slow["samples"] == 28 < slow["budget"]
    invalid = table[table["status"] == "invalid"]
    assert len(invalid) == 2 and invalid["problem"].str.contains("tau_min").all()
    assert not (folder / "trials" / invalid["trial"].iloc[0] / "student").exists()
    assert (folder / "trials" / good["trial"] / "student" / "config.json").exists()
    assert (folder / "metric_by_param.png").stat().st_size > 0
    assert f"{ref['trial']} *" in printed and "one run per config (no seed spread)" in printed
    assert "tune: done in" in printed and "-> " + str(folder / "results.csv") in printed

    # the best config: the good point on the base config, a new run name; distill's checks
    # (the table fits, the plan, nothing to resume under that name) accept it as it is.
    # (Training it would only repeat the good trial's run.)
    best = load_config(folder / "best_config.yaml")
    assert (best.optim.lr, best.curriculum.tau_min, best.run.name) == (2e-3, 1.0, "demo-tune-best")
    assert best.data == cfg.data and best.run.output_dir == str(out)
    setup = ray_train.prepare_distill(best, out=out)
    assert ray_train.latest_state(best, setup.job) is None
    assert search.planned_samples(best, setup.n, 1) == 280


# ---------------------------------------------------------------- interrupt and resume


RESUMABLE = """\
space:
  curriculum.tau_max: {grid: [1.5, 2.5]}
search:
  num_samples: 1
  scheduler: fifo
  kd_reference: false
  max_concurrent: 1
"""


def tune_statuses(experiment: Path) -> dict[str, str]:
    """Trial id -> status in Tune's saved experiment state ({} before the first save)."""
    found = sorted(experiment.glob("experiment_state-*.json"))
    if not found:
        return {}
    try:
        state = json.loads(found[-1].read_text())
    except json.JSONDecodeError:  # being rewritten
        return {}
    trials = [json.loads(t[0]) for t in state["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


@pytest.mark.timeout(900)
def test_an_interrupted_search_resumes_every_trial_once(ray_local, scored, tmp_path, capsys):
    out = copy_run(scored, tmp_path / "run")
    space = write_space(tmp_path / "space.yaml", RESUMABLE)
    cfg = tiny.tiny_cfg(out, "run.log_every=1")
    config = tmp_path / "config.yaml"
    config.write_text(dump_yaml(cfg), encoding="utf-8")
    experiment, train = out / "ray" / "tune" / "demo", out / "ray" / "tune" / "demo.train"

    # the search, in its own driver on this session's Ray, killed (SIGKILL) once the first
    # trial is finished (and saved as such) and the second has a checkpoint
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "jobs", "tune", str(config), "--space",
                               str(space)], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        done = [t for t, s in tune_statuses(experiment).items() if s == "TERMINATED"]
        # a checkpoint counts once Train has registered it (its run's snapshot lists it)
        snapshot = list(train.glob("trial_*_00001/checkpoint_manager_snapshot.json"))
        if done and snapshot and "ckpt_" in snapshot[0].read_text():
            break
        time.sleep(1)
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    driver.kill()
    driver.wait()
    first = out / "tune" / "trials" / f"trial_{done[0]}"
    kept = (first / "student" / "model.safetensors").stat().st_mtime_ns

    folder = tune.main(cfg, space=space, resume=True)
    printed = capsys.readouterr().out
    assert "resuming the search" in printed

    table = pd.read_csv(folder / "results.csv")
    assert len(table) == 2 and table["trial"].is_unique
    assert table["status"].tolist() == ["done", "done"]
    assert (table["samples"] == table["budget"]).all()
    trials = {t: folder / "trials" / t for t in table["trial"]}
    # kept: the finished trial was not trained again
    assert events(first).count("start") == 1 and "resume" not in events(first)
    assert (first / "student" / "model.safetensors").stat().st_mtime_ns == kept
    # resumed: the other one continued from its Train checkpoint, one trajectory of steps
    (second,) = [p for t, p in trials.items() if p != first]
    assert "resume" in events(second)
    rows = (second / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in rows]
    assert steps == list(range(len(steps))) and len(steps) == 19


@pytest.mark.timeout(600)
def test_ctrl_c_saves_the_search_and_says_how_to_resume(ray_local, scored, tmp_path, capsys):
    """Ctrl-C (SIGINT) in the driver: Tune saves the search, the job exits 130 with the
    --resume hint instead of a partial table; --resume then finishes every trial once."""
    out = copy_run(scored, tmp_path / "run")
    space = write_space(tmp_path / "space.yaml", RESUMABLE)
    cfg = tiny.tiny_cfg(out)
    config = tmp_path / "config.yaml"
    config.write_text(dump_yaml(cfg), encoding="utf-8")
    experiment = out / "ray" / "tune" / "demo"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, "-m", "jobs", "tune", str(config), "--space",
                               str(space)], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    train = out / "ray" / "tune" / "demo.train"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and driver.poll() is None:
        # the first trial done and the second one mid-run (a checkpoint registered)
        snapshot = list(train.glob("trial_*_00001/checkpoint_manager_snapshot.json"))
        if "TERMINATED" in tune_statuses(experiment).values() and snapshot and (
            "ckpt_" in snapshot[0].read_text()
        ):
            break
        time.sleep(1)
    assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=180) == 130, (tmp_path / "driver.log").read_text()[-3000:]
    text = (tmp_path / "driver.log").read_text()
    assert "with --resume to continue it" in text
    # no traceback of the job itself (Ray's actors may log their own, prefixed "(Actor pid=)")
    assert not any(line.startswith("Traceback") for line in text.splitlines()), text[-3000:]
    assert not (out / "tune" / "results.csv").exists()  # no partial table

    folder = tune.main(cfg, space=space, resume=True)
    capsys.readouterr()
    table = pd.read_csv(folder / "results.csv")
    assert len(table) == 2 and table["trial"].is_unique
    assert table["status"].tolist() == ["done", "done"]


# ---------------------------------------------------------------- a failed trial


FAILING = """\
space:
  optim.lr: {grid: [2.0e-3, 1.0e-3]}
search:
  num_samples: 1
  scheduler: fifo
  kd_reference: false
  max_concurrent: 1   # the first trial meets the fault; the second runs after it
"""


@pytest.mark.timeout(600)
def test_a_failed_trial_is_recorded_and_the_search_goes_on(scored, tmp_path, capsys):
    out = copy_run(scored, tmp_path / "run")
    space = write_space(tmp_path / "space.yaml", FAILING)
    marker = tmp_path / "killed"
    cfg = tiny.tiny_cfg(out, "run.max_failures=0")  # Train gives up at once: the trial fails
    folder = tune.main(cfg, space=space, fault={"step": 3, "marker": str(marker)})
    printed = capsys.readouterr().out
    assert marker.exists(), "the fault never fired: the test proved nothing"

    table = pd.read_csv(folder / "results.csv")
    assert len(table) == 2 and table["trial"].is_unique
    failed, done = table[table["status"] == "failed"], table[table["status"] == "done"]
    assert len(failed) == 1 and len(done) == 1, table.to_string()
    assert failed["problem"].str.len().item() > 0  # the error's last line
    # its last report (stage 1) stays on record, but it never counts as the best
    assert failed["samples"].item() < failed["budget"].item()
    assert done["samples"].item() == done["budget"].item() == 280
    assert "failed (recorded; the search goes on)" in printed
    best = load_config(folder / "best_config.yaml")  # from the trial that ran
    assert best.optim.lr == float(done["optim.lr"].item())


# ---------------------------------------------------------------- decisions, without a cluster


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def test_asha_compares_trials_at_the_same_samples_not_iterations():
    asha = ray_tune.scheduler(search.SearchSettings(grace=0.25, reduction_factor=2), 400)
    asha.set_search_properties("dev_loss", "min")
    short, long_, late = FakeTrial("short"), FakeTrial("long"), FakeTrial("late")
    for t in (short, long_, late):
        asha.on_trial_add(None, t)

    def result(trial, samples, loss, iteration):
        return asha.on_trial_result(None, trial, {search.CLOCK: samples, "dev_loss": loss,
                                                  "training_iteration": iteration})  # fmt: skip

    cont, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    # first rung at 0.25 x 400 = 100 samples: a 2-stage trial gets there in one report...
    assert result(short, 100, 2.0, iteration=1) == cont
    # ...a 4-stage trial in its second: not compared at 50 samples, only at the rung
    assert result(long_, 50, 9.0, iteration=1) == cont
    assert result(long_, 120, 2.5, iteration=2) == stop  # worse than `short` at 100 samples
    assert result(late, 110, 1.5, iteration=7) == cont
    assert asha._brackets[0]._rungs[-1][0] == 100


class Counting(Searcher):
    """A stand-in for Optuna: numbered points; records what it is told."""

    def __init__(self):
        super().__init__(metric="dev_loss", mode="min")
        self.n, self.told = 0, []

    def suggest(self, trial_id):
        self.n += 1
        return {"params": {"optim.lr": self.n}, "kd_reference": False}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.told.append((trial_id, result, error))

    def save(self, path):
        Path(path).write_bytes(pickle.dumps((self.n, self.told)))

    def restore(self, path):
        self.n, self.told = pickle.loads(Path(path).read_bytes())


def test_the_kd_reference_comes_first_and_never_teaches_the_searcher(tmp_path):
    reference = {"params": {"optim.lr": 0.002}, "kd_reference": True}
    alg = ray_tune.ReferenceFirst(Counting(), reference)
    assert alg.suggest("t0") == reference
    assert alg.suggest("t1")["params"] == {"optim.lr": 1}
    alg.on_trial_complete("t0", {"dev_loss": 1.0})
    alg.on_trial_complete("t1", {"invalid": "optim.lr: ...", "dev_loss": float("nan")})
    assert alg.searcher.told == [("t1", None, True)]  # the reference unseen, invalid = failed
    alg.save(str(tmp_path / "state.pkl"))
    again = ray_tune.ReferenceFirst(Counting(), reference)
    again.restore(str(tmp_path / "state.pkl"))
    assert again.suggest("t2")["params"] == {"optim.lr": 2}  # no second reference
    assert again.searcher.told == [("t1", None, True)]


def test_searcher_state_is_json_and_an_old_pickle_is_refused(tmp_path):
    """Our searcher state never unpickles: JSON on disk; a pickle from an older version is
    refused with what to do, not loaded."""
    import json
    import pickle

    alg = ray_tune.ReferenceFirst(Counting(), {"params": {}, "kd_reference": True})
    alg.save(str(tmp_path / "state.pkl"))
    assert json.loads((tmp_path / "state.pkl").read_text())["reference_id"] is None
    (tmp_path / "old.pkl").write_bytes(pickle.dumps({"inner": b"", "reference_id": None}))
    with pytest.raises(RuntimeError, match="older pickle format.*without --resume"):
        alg.restore(str(tmp_path / "old.pkl"))


def test_optuna_gets_the_space_and_the_reference_comes_first():
    """searcher: optuna builds Ray's OptunaSearch over the same domains; the KD reference is
    handed out first, then TPE's points inside the space."""
    pytest.importorskip("optuna")  # an optional extra: pocl-ray[tune]
    sp = search.parse_space({
        "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]},
                  "curriculum.num_stages": {"choice": [2, 3]}},
        "search": {"searcher": "optuna", "num_samples": 2},
    })  # fmt: skip
    reference = {"params": {"optim.lr": 2e-3, "curriculum.num_stages": 4}, "kd_reference": True}
    alg = ray_tune.search_alg(sp, reference, at_once=2)
    assert type(alg.searcher).__name__ == "OptunaSearch"
    assert alg.set_search_properties("dev_loss", "min", ray_tune.domains(sp))
    assert alg.suggest("t0") == reference
    for i in (1, 2):
        point = alg.suggest(f"t{i}")  # Tune merges it into the param space (kd_reference False)
        assert not point.get("kd_reference", False)
        assert 1e-4 <= point["params"]["optim.lr"] <= 1e-2
        assert point["params"]["curriculum.num_stages"] in (2, 3)
