"""The shipped presets (configs/*.yaml) validate with `pocl-ray validate` (no download: hub
names are only read at run time), and the paper preset says what pocl-method.md §9 says."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import __main__ as cli
from pocl_ray.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def test_the_presets_are_there():
    names = {p.stem for p in PRESETS}
    assert {"demo", "gpt2-dolly", "opt-dolly", "qwen-dolly"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_validates(path, capsys):
    assert cli.main(["validate", str(path)]) == 0
    assert f"{path}: valid" in capsys.readouterr().out


def test_the_paper_preset_is_the_paper_setup():
    cfg = load_config(CONFIGS / "gpt2-dolly.yaml")
    assert (cfg.teacher.name_or_path, cfg.student.name_or_path) == ("gpt2-xl", "gpt2")
    assert cfg.optim.lr == 1e-4
    assert cfg.optim.batch_size * cfg.scaling.num_workers == 64  # global batch
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 256)
    cur = cfg.curriculum
    assert (cur.num_stages, cur.interval, cur.interval_unit) == (4, 8, "epochs")
    assert (cur.tau_min, cur.tau_max, cur.kd_ratio_start, cur.kd_ratio_end) == (1, 2, 0.7, 1)
    assert cfg.teacher.dtype in ("bfloat16", "float16") and cfg.scaling.use_gpu


def test_no_preset_runs_remote_code():
    for path in PRESETS:
        cfg = load_config(path)
        assert not (cfg.teacher.trust_remote_code or cfg.student.trust_remote_code), path
