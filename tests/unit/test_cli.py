"""Tests for the `pocl-ray` command line (jobs/__main__.py): the validate subcommand."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.__main__ import main
from pocl_ray.config import from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"

# three distinct mistakes: a type error, an unknown key and an out-of-range value
THREE_MISTAKES = """\
sft:
  epochs: many
optim:
  learning_rate: 0.001
data:
  eval_fraction: 1.5
"""
MISTAKE_FIELDS = ["sft.epochs", "optim.learning_rate", "data.eval_fraction"]


@pytest.fixture
def bad_config(tmp_path) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(THREE_MISTAKES, encoding="utf-8")
    return p


@pytest.fixture
def one_mistake(tmp_path) -> Path:
    p = tmp_path / "one.yaml"
    p.write_text("data:\n  eval_fraction: 1.5\nsft:\n  epochs: 3\n", encoding="utf-8")
    return p


def test_validate_lists_all_three_mistakes(bad_config, capsys):
    rc = main(["validate", str(bad_config)])
    out, err = capsys.readouterr()
    assert rc != 0
    assert rc == 2
    for name in MISTAKE_FIELDS:
        assert name in err, err
    assert "3 problem(s)" in err
    assert str(bad_config) in err
    assert "valid" not in out


def test_validate_valid_config(capsys):
    rc = main(["validate", str(DEMO)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == f"{DEMO}: valid\n"
    assert "error" not in err


def test_validate_print_outputs_resolved_yaml(capsys):
    rc = main(["validate", str(DEMO), "sft.epochs=5", "--print"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert err.strip() == f"{DEMO}: valid"
    data = yaml.safe_load(out)
    assert data["sft"]["epochs"] == 5
    assert from_dict(data) == load_config(DEMO, ["sft.epochs=5"])


def test_validate_print_stdout_is_pure_yaml(capsys):
    assert main(["validate", str(DEMO), "--print"]) == 0
    out, _ = capsys.readouterr()
    assert from_dict(yaml.safe_load(out)) == load_config(DEMO)


def test_validate_without_print_prints_no_yaml(capsys):
    assert main(["validate", str(DEMO)]) == 0
    out, _ = capsys.readouterr()
    assert "curriculum:" not in out


def test_override_fixes_invalid_config(one_mistake, capsys):
    assert main(["validate", str(one_mistake)]) == 2
    _, err = capsys.readouterr()
    assert "data.eval_fraction" in err
    rc = main(["validate", str(one_mistake), "data.eval_fraction=0.2", "--print"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = yaml.safe_load("\n".join(out.splitlines()[:-1]))
    assert data["data"]["eval_fraction"] == pytest.approx(0.2)
    assert data["sft"]["epochs"] == 3  # the file's other values are kept


def test_override_breaks_valid_config(capsys):
    rc = main(["validate", str(DEMO), "sft.lr=-1", "optim.lr=1e-4"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "sft.lr: got -1.0" in err
    assert "optim.min_lr" not in err  # 3e-6 <= 1e-4: the float override was applied
    assert "+ overrides" in err


def test_override_float_1e_minus_4_applied(capsys):
    rc = main(["validate", str(DEMO), "optim.lr=1e-4", "optim.min_lr=1e-4", "--print"])
    out, _ = capsys.readouterr()
    assert rc == 0
    data = yaml.safe_load("\n".join(out.splitlines()[:-1]))
    assert data["optim"]["lr"] == pytest.approx(1e-4)
    assert isinstance(data["optim"]["lr"], float)


def test_override_without_equals(capsys):
    rc = main(["validate", str(DEMO), "sft.epochs"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "override 'sft.epochs': expected dotted.key=value" in err


def test_unknown_override_key(capsys):
    rc = main(["validate", str(DEMO), "sft.epoch=3"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "sft.epoch: unknown key; did you mean 'epochs'?" in err


def test_missing_config_file(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    rc = main(["validate", str(path)])
    _, err = capsys.readouterr()
    assert rc == 2
    assert f"cannot read {path}" in err


def test_bad_yaml_config_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [\n", encoding="utf-8")
    rc = main(["validate", str(path)])
    _, err = capsys.readouterr()
    assert rc == 2
    assert f"{path} is not valid YAML" in err


def test_malformed_list_override_gives_clean_error(capsys):
    rc = main(["validate", str(DEMO), "curriculum.taus=[1,2"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "curriculum.taus" in err


def test_no_subcommand_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: pocl-ray" in capsys.readouterr().err


def test_demo_validates_its_overrides_before_any_work(capsys, tmp_path):
    # a bad override stops `demo` (the Ray pipeline) before Ray or any model starts
    rc = main(["demo", f"run.output_dir={tmp_path}", "curriculum.num_stages=x"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert "curriculum.num_stages" in err
    assert not any(tmp_path.iterdir())


def test_module_entry_point_reports_all_mistakes(bad_config):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", "validate", str(bad_config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    for name in MISTAKE_FIELDS:
        assert name in output, output
    assert "Traceback" not in output
