"""The demo config shrunk for tests: tiny models, a small task set, one epoch per stage."""

from pathlib import Path

from pocl_ray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
TINY = [
    "data.builtin_size=135",  # 112 training rows: the step and sample counts the tests name
    "teacher.hidden_size=32",
    "teacher.num_layers=2",
    "teacher.num_heads=2",
    "student.hidden_size=16",
    "student.num_layers=1",
    "student.num_heads=2",
    "sft.epochs=1",
    "sft.student_epochs=1",
    "scoring.max_new_tokens=4",
    "scoring.batch_size=16",
    "eval.max_new_tokens=4",
    "curriculum.interval=1",  # 4 stages of 1 epoch
    "scoring.signals=[rouge,nll,teacher_nll,kd_gap]",  # every signal's path, not the demo's two
    "run.pipeline_seeds=1",
]


def tiny_cfg(out: Path, *extra: str) -> Config:
    return load_config(DEMO, [*TINY, f"run.output_dir={out}", *extra])


def read_scores(out: Path):
    """The scores table of run directory `out` (pandas, easiest first)."""
    from pocl_ray.run_dir import RunDir
    from pocl_ray.scores import read_scores as read

    return read(RunDir(Path(out)))


def read_manifest(out: Path) -> dict:
    """The scores manifest of run directory `out`."""
    from pocl_ray.run_dir import read_manifest as read

    return read(Path(out) / "scores")
