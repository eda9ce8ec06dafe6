"""The config fields the distillation job adds, and their validation (test_config.py style)."""

import json
from dataclasses import replace

import pytest

from pocl_ray.config import Config, ConfigError, from_dict, load_config, to_dict


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    return e.value.problems


def test_defaults():
    cfg = Config()
    assert cfg.loss.teacher_source == "online"
    assert cfg.loss.on_policy_ratio == 0.0 and cfg.loss.on_policy_max_new_tokens == 64
    assert cfg.curriculum.shuffle is True
    assert cfg.run.max_failures == 2 and cfg.run.keep_checkpoints == 3
    assert from_dict(to_dict(cfg)) == cfg


def test_overrides_coerce_the_new_fields():
    cfg = load_config(
        None,
        [
            "loss.teacher_source=cache",
            "scoring.teacher_topk=8",
            "curriculum.shuffle=false",
            "run.max_failures=-1",
            "run.keep_checkpoints=null",
            "loss.on_policy_max_new_tokens=5",
        ],
    )
    assert cfg.loss.teacher_source == "cache" and cfg.scoring.teacher_topk == 8
    assert cfg.curriculum.shuffle is False
    assert cfg.run.max_failures == -1 and cfg.run.keep_checkpoints is None
    assert cfg.loss.on_policy_max_new_tokens == 5


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        {
            "loss": {"teacher_source": "disk", "on_policy_max_new_tokens": 0},
            "run": {"max_failures": -2, "keep_checkpoints": 0},
            "curriculum": {"shuffle": "maybe"},
        }
    )
    text = "\n".join(problems)
    assert "loss.teacher_source: got 'disk'; allowed 'online', 'cache'" in text
    assert "loss.on_policy_max_new_tokens: got 0" in text
    assert "run.max_failures: got -2" in text
    assert "run.keep_checkpoints: got 0" in text
    assert "curriculum.shuffle: got 'maybe'" in text
    assert len(problems) == 5


def test_cache_needs_the_top_k_and_excludes_on_policy():
    problems = problems_of({"loss": {"teacher_source": "cache", "on_policy_ratio": 0.5}})
    assert any("scoring.teacher_topk" in p and "pocl-ray score" in p for p in problems)
    assert any(p.startswith("loss.on_policy_ratio: got 0.5") for p in problems)
    ok = from_dict({"loss": {"teacher_source": "cache"}, "scoring": {"teacher_topk": 4}})
    assert ok.loss.teacher_source == "cache"


def test_cache_needs_every_stage_temperature_on_the_cached_grid():
    base = {"loss": {"teacher_source": "cache"}, "scoring": {"teacher_topk": 4}}
    wide = dict(base, curriculum={"tau_min": 1.0, "tau_max": 4.0})
    problems = problems_of(wide)
    assert any(
        p.startswith("curriculum.tau_min/max") and "scoring.cache_taus" in p for p in problems
    )
    listed = dict(base, curriculum={"taus": [0.25, 1.0, 1.5, 2.0]})
    assert any(p.startswith("curriculum.taus") for p in problems_of(listed))
    grid = {"teacher_topk": 4, "cache_taus": [1.0, 2.0, 4.0]}
    assert from_dict(dict(wide, scoring=grid)).scoring.cache_taus == [1.0, 2.0, 4.0]
    from_dict(dict(listed, loss={"teacher_source": "online"}))  # online: no grid needed


def test_resume_settings_count_a_key_the_checkpoint_lacks_as_its_default():
    """A checkpoint written before a config key existed resumes when the run leaves the key at
    its default (what the old run did), and not when it sets another value."""
    from pocl_ray.ray_train import run_settings, settings_changes

    cfg = Config()
    new = run_settings(cfg, n=10, world_size=1, table_key={"t": 1})
    old = json.loads(json.dumps(new))
    del old["loss"]["chunk_size"], old["curriculum"]["shuffle"]  # keys "added later"
    assert settings_changes(old, new) == []
    changed = run_settings(replace(cfg, loss=replace(cfg.loss, chunk_size=16)), n=10,
                           world_size=1, table_key={"t": 1})  # fmt: skip
    assert settings_changes(old, changed) == ["loss.chunk_size: None -> 16"]
    # a real change is still one; memory-only optim keys are not, on either side
    old["optim"]["lr"] = 5.0
    old["optim"]["gradient_checkpointing"] = True
    assert settings_changes(old, new) == [f"optim.lr: 5.0 -> {cfg.optim.lr!r}"]


def test_train_seed_varies_training_only_and_old_checkpoints_resume():
    """run.train_seed changes what a run must resume with, not the scores table; a checkpoint
    from before the key (no train_seed) is a run.seed run."""
    from pocl_ray import scores
    from pocl_ray.ray_train import run_settings, settings_changes

    cfg = Config()
    seeded = replace(cfg, run=replace(cfg.run, train_seed=7))
    assert cfg.run.training_seed == 0 and seeded.run.training_seed == 7
    assert scores.config_hash(seeded) == scores.config_hash(cfg)  # the same table serves both
    new = run_settings(cfg, n=10, world_size=1, table_key={"t": 1})
    old = json.loads(json.dumps(new))
    del old["train_seed"]
    assert settings_changes(old, new) == []
    other = run_settings(seeded, n=10, world_size=1, table_key={"t": 1})
    assert settings_changes(new, other) == ["train_seed: 0 -> 7"]
