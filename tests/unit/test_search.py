"""The pure part of `pocl-ray tune` (pocl_ray/search.py): space files and their errors, the one
rule for sampled points, budgets, the results table, the best config and the KD comparison.
The Ray side is tests/integration/test_tune.py."""

import math
from pathlib import Path

import pytest
import yaml

from jobs import runtime
from jobs.__main__ import main
from pocl_ray import search
from pocl_ray.config import ConfigError, ScalingConfig, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        search.parse_space(data)
    return e.value.problems


def space(**params) -> search.Space:
    return search.parse_space({"space": params, "search": {"num_samples": 1}})


# ---------------------------------------------------------------- space files


def test_the_shipped_spaces_are_valid():
    for path in sorted((ROOT / "tune_spaces").glob("*.yaml")):
        sp = search.read_space(path)
        assert sp.params and sp.settings.num_samples >= 1, path
    curriculum = search.read_space(ROOT / "tune_spaces" / "curriculum.yaml")
    assert set(curriculum.keys) == {
        "curriculum.num_stages", "curriculum.interval", "curriculum.tau_min",
        "curriculum.tau_max", "curriculum.kd_ratio_start", "optim.lr",
    }  # fmt: skip


def test_every_distribution_is_read_with_the_field_type():
    sp = search.parse_space({"space": {
        "curriculum.num_stages": {"randint": [2, 5]},
        "curriculum.interval": {"grid": [1, "2"]},
        "curriculum.tau_max": {"uniform": [1.5, 3]},
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
        "loss.kind": {"choice": ["fkl", "srkl"]},
        "curriculum.fractions": {"choice": [None, [0.5, 1.0]]},
    }, "search": {"num_samples": 3, "metric": "dev_rougeL"}})  # fmt: skip
    by_key = {p.key: p for p in sp.params}
    assert by_key["curriculum.num_stages"].values == (2, 5)
    assert by_key["curriculum.interval"].values == (1, 2)  # coerced to int, as a config would
    assert by_key["curriculum.tau_max"].values == (1.5, 3.0)
    assert by_key["curriculum.fractions"].values == (None, [0.5, 1.0])
    assert sp.trials() == 3 * 2  # each grid point num_samples times
    assert sp.settings.mode == "max"


def test_an_unknown_key_is_named_with_a_suggestion():
    (p,) = problems_of({"space": {"curriculum.num_stage": {"choice": [2, 3]}}})
    assert p.startswith("curriculum.num_stage: unknown key")
    assert "did you mean 'curriculum.num_stages'" in p


@pytest.mark.parametrize(
    ("key", "spec", "words"),
    [
        ("curriculum.num_stages", {"choise": [2, 3]}, "write one distribution"),
        ("curriculum.num_stages", {"choice": [2], "grid": [3]}, "write one distribution"),
        ("curriculum.num_stages", [2, 3], "write one distribution"),
        ("curriculum.num_stages", {"uniform": [2, 4]}, "use randint or choice"),
        ("curriculum.tau_max", {"randint": [1, 3]}, "use uniform, loguniform or choice"),
        ("loss.kind", {"uniform": [0, 1]}, "use choice or grid"),
        ("optim.lr", {"loguniform": [0, 1e-3]}, "both bounds must be > 0"),
        ("optim.lr", {"uniform": [1e-3, 1e-4]}, "low must be below high"),
        ("optim.lr", {"uniform": [1e-3]}, "give [low, high]"),
        ("curriculum.num_stages", {"randint": [2, 4.5]}, "give [low, high]"),
        ("curriculum.num_stages", {"choice": []}, "non-empty list"),
        ("curriculum.num_stages", {"choice": ["many"]}, "expected int"),
        ("loss.kind", {"grid": ["fkl", "kl"]}, "allowed 'fkl'"),
        ("scoring.signals", {"choice": [["nll"]]}, "cannot be searched"),
        ("run.seed", {"grid": [0, 1]}, "cannot be searched"),
        ("scaling.num_workers", {"grid": [1, 2]}, "cannot be searched"),
        ("curriculum", {"choice": [1]}, "is a section"),
        ("optim.lr.x", {"choice": [1]}, "is a field, not a section"),
    ],
)
def test_a_bad_distribution_is_named(key, spec, words):
    problems = problems_of({"space": {key: spec}})
    assert len(problems) == 1 and problems[0].startswith(key.split(".x")[0]), problems
    assert words in problems[0], problems


def test_every_problem_is_listed_at_once():
    problems = problems_of({
        "space": {"curriculum.num_stage": {"choice": [2]}, "optim.lr": {"grid": [1e-3]}},
        "search": {"num_samplez": 2, "metric": "accuracy", "grace": 0, "searcher": "optuna"},
        "extra": 1,
    })  # fmt: skip
    text = "\n".join(problems)
    for words in ("extra: unknown top-level key", "search.num_samplez: unknown key",
                  "search.metric: got 'accuracy'", "search.grace: got 0",
                  "curriculum.num_stage: unknown key", "Optuna samples"):  # fmt: skip
        assert words in text, text


def test_an_empty_or_missing_space_is_refused(tmp_path):
    assert "name at least one dotted config key" in problems_of({"search": {}})[0]
    with pytest.raises(ConfigError, match="cannot read"):
        search.read_space(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("space: [", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        search.read_space(tmp_path / "bad.yaml")


def test_a_bad_space_stops_the_cli_before_ray(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  curriculum.num_stage: {choice: [2, 3]}\n", encoding="utf-8")

    def no_ray(**_):
        raise AssertionError("Ray was started for a bad space")

    monkeypatch.setattr(runtime, "ray_session", no_ray)
    assert main(["tune", str(DEMO), "--space", str(bad), "run.output_dir=" + str(tmp_path)]) == 2
    assert "curriculum.num_stage: unknown key" in capsys.readouterr().err


def test_tune_refuses_local_mode_and_no_held_out_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "ray_session", lambda **_: pytest.fail("Ray started"))
    smoke = str(ROOT / "tune_spaces" / "smoke.yaml")
    args = ["tune", str(DEMO), "--space", smoke, f"run.output_dir={tmp_path}",
            "scaling.num_workers=0", "data.eval_fraction=0"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "scaling.num_workers: got 0" in err and "data.eval_fraction: got 0" in err


# ---------------------------------------------------------------- one trial


@pytest.fixture
def base() -> dict:
    return to_dict(load_config(DEMO, ["run.output_dir=/tmp/x"]))


def test_a_valid_point_becomes_the_trial_config(base):
    cfg, problems = search.trial_config(
        base, {"curriculum.num_stages": 3, "optim.lr": 1e-3}, n=100, name="trial_a"
    )
    assert problems == [] and cfg.curriculum.num_stages == 3 and cfg.optim.lr == 1e-3
    assert cfg.run.name == "trial_a" and base["run"]["name"] == "demo"  # base untouched
    ref, _ = search.trial_config(base, search.trial_overrides({"optim.lr": 1.0}, reference=True),
                                 n=100, name="kd")  # fmt: skip
    assert ref.curriculum.mode == "none" and ref.optim.lr == base["optim"]["lr"]


def test_an_impossible_point_is_invalid_with_its_problem(base):
    cfg, problems = search.trial_config(base, {"curriculum.tau_min": 3.0}, n=100, name="t")
    assert cfg is None and any("tau_min" in p for p in problems)
    cfg, problems = search.trial_config(base, {"curriculum.num_stages": 8}, n=5, name="t")
    assert cfg is None and "every stage must add samples" in problems[0]
    cfg, problems = search.trial_config(
        base, {"curriculum.num_stages": 2, "curriculum.fractions": [0.5, 1.0]}, n=5, name="t"
    )
    assert cfg is not None and problems == []
    assert search.trial_config(base, {"curriculum.num_stages": 8, "curriculum.mode": "none"},
                               n=5, name="t")[1] == []  # fmt: skip  (one stage of all data)


def test_the_budget_is_the_plans_sample_visits(base):
    cfg = load_config(DEMO, ["curriculum.interval=2"])
    n, batch = 100, cfg.optim.batch_size
    sizes = [25, 50, 75, 100]
    assert search.planned_samples(cfg, n, 1) == 2 * sum(sizes)
    steps = load_config(DEMO, ["curriculum.interval_unit=steps", "curriculum.interval=3"])
    # 3 steps a stage: stage 0 (25 rows, 2 batches of 16) is one epoch and one more batch;
    # the others (50, 75, 100 rows) take 3 full batches
    assert search.planned_samples(steps, n, 1) == (25 + batch) + 3 * (3 * batch)
    kd = load_config(DEMO, ["curriculum.interval=2", "curriculum.mode=none"])
    assert search.planned_samples(kd, n, 1) == 5 * n  # round(2 * 250 / 100) epochs


def test_one_trial_is_its_workers_and_a_token_cpu():
    req = runtime.trial_request(ScalingConfig(num_workers=2, resources_per_worker={"CPU": 2}))
    assert (req.cpus, req.gpus) == (4 + search.TRIAL_ACTOR_CPU, 0.0)
    assert runtime.trials_at_once(req, {"CPU": 9.0}) == 2
    gpu = runtime.trial_request(ScalingConfig(num_workers=2, use_gpu=True))
    assert runtime.trials_at_once(gpu, {"CPU": 16.0, "GPU": 3.0}) == 1
    with pytest.raises(runtime.ResourceError, match="one trial needs 1 x 4.01 CPU"):
        runtime.preflight(req, {"CPU": 3.0})


# ---------------------------------------------------------------- results


def records() -> list[search.TrialRecord]:
    def rec(trial, point, result, reference=False, error=None):
        return search.TrialRecord(trial=trial, reference=reference, point=point, result=result,
                                  error=error)  # fmt: skip

    done = {"plan_complete": True, "samples": 100, "time_total_s": 30.0}
    return [
        rec("kd_reference_0", {"optim.lr": 2e-3}, {**done, "dev_loss": 1.5}, reference=True),
        rec("trial_1", {"optim.lr": 1e-3}, {**done, "dev_loss": 1.4}),
        rec("trial_2", {"optim.lr": 1e-5}, {"samples": 25, "dev_loss": 1.2,
                                            "plan_complete": False}),  # fmt: skip
        rec("trial_3", {"optim.lr": -1.0}, {"invalid": "optim.lr: got -1.0", "samples": 0,
                                            "dev_loss": math.nan}),  # fmt: skip
        rec("trial_4", {"optim.lr": 5e-3}, {}, error="Traceback\n...\nRuntimeError: boom\n"),
        rec("trial_5", {"optim.lr": 3e-3}, {**done, "dev_loss": 1.45, "samples": 80}),
    ]


def test_the_results_table_sorts_marks_and_explains():
    sp = space(**{"optim.lr": {"loguniform": [1e-5, 1e-2]}})
    table = search.results_table(records(), sp, budgets={"trial_2": 100, "kd_reference_0": 100})
    assert table["trial"].tolist()[:4] == ["trial_2", "trial_1", "trial_5", "kd_reference_0"]
    status = dict(zip(table["trial"], table["status"]))
    assert status == {"kd_reference_0": "done", "trial_1": "done", "trial_2": "stopped early",
                      "trial_3": "invalid", "trial_4": "failed", "trial_5": "done"}  # fmt: skip
    problem = dict(zip(table["trial"], table["problem"]))
    assert problem["trial_3"] == "optim.lr: got -1.0" and problem["trial_4"] == "RuntimeError: boom"
    assert table.loc[table["role"] == "kd_reference", "optim.lr"].item() == "(base)"
    best = search.best_row(table, "dev_loss")
    assert best["trial"] == "trial_1"  # trial_2 is lower but was stopped at 25 samples
    printed = search.format_table(table, sp)
    assert "kd_reference_0 *" in printed and "compare only at equal budgets (within 1%)" in printed
    lines = search.comparison(table, "dev_loss", "min")
    assert "a gap of 0.1000 in the curriculum's favour" in lines[0]
    assert "one run per config (no seed spread)" in lines[-1]


def test_the_comparison_says_when_budgets_differ():
    sp = space(**{"optim.lr": {"loguniform": [1e-5, 1e-2]}})
    recs = [r for r in records() if r.trial in ("kd_reference_0", "trial_5")]
    lines = search.comparison(search.results_table(recs, sp, budgets={}), "dev_loss", "min")
    assert "budgets differ (80 vs 100 samples)" in lines[1]
    assert "none ran at that budget" in lines[1]


def test_budgets_a_few_samples_apart_compare():
    """The KD reference's epochs are rounded: 10780 against a curriculum's 10768 samples (the
    demo) is the same budget; 80 against 100 is not."""
    assert search.same_budget(10768, 10780) and not search.same_budget(80, 100)
    sp = space(**{"optim.lr": {"loguniform": [1e-5, 1e-2]}})
    recs = [r for r in records() if r.trial in ("kd_reference_0", "trial_5")]
    recs[[r.trial for r in recs].index("trial_5")].result["samples"] = 99
    lines = search.comparison(search.results_table(recs, sp, budgets={}), "dev_loss", "min")
    assert "a gap of 0.0500 in the curriculum's favour" in lines[0]
    assert not any("budgets differ" in line for line in lines)


def test_the_best_config_is_complete_and_runs_as_a_new_run(base, tmp_path):
    sp = space(**{"optim.lr": {"loguniform": [1e-5, 1e-2]},
                  "curriculum.num_stages": {"choice": [2, 3]}})  # fmt: skip
    result = {"plan_complete": True, "samples": 9, "dev_loss": 1.0}
    point = {"optim.lr": 1e-3, "curriculum.num_stages": 3}
    rec = search.TrialRecord(trial="trial_9", reference=False, point=point, result=result)
    row = search.best_row(search.results_table([rec], sp, budgets={}), "dev_loss")
    cfg = search.best_config(base, sp, row, name="demo-tune-best")
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    again = load_config(path)
    assert again == cfg and again.optim.lr == 1e-3 and again.curriculum.num_stages == 3
    assert again.run.name == "demo-tune-best" and again.run.output_dir == "/tmp/x"
