"""Security defaults that need a running Ray: the local Ray our commands start binds to
loopback, and credentials in the environment never reach a run's files or its logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import score
from tests import tiny
from tests.tiny import tiny_cfg

ROOT = Path(__file__).resolve().parents[2]
SENTINEL = "pocl-test-secret-7f3a9c"
CREDENTIALS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS")  # fmt: skip


@pytest.mark.timeout(180)
def test_the_local_ray_of_a_job_binds_to_loopback():
    """`runtime.ray_session` without RAY_ADDRESS starts its own Ray: every node address is
    127.0.0.1 (ray-notes.md), so nothing listens for peers on the machine's interface. In a
    fresh interpreter, as the CLI runs it (this process may hold the tests' Ray)."""
    code = (
        "from jobs import runtime\n"
        "runtime.local_ray_env()  # before ray is imported, as the CLI does\n"
        "import ray\n"
        "with runtime.ray_session(cpus=1):\n"
        "    print(sorted({n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']}))\n"
    )
    unset = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # the CLI's own setting
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=150)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['127.0.0.1']"


@pytest.mark.timeout(240)
def test_credentials_in_the_environment_never_reach_outputs_or_logs(
    ray_local, tmp_path, monkeypatch, capsys, caplog
):
    for name in CREDENTIALS:
        monkeypatch.setenv(name, f"{SENTINEL}-{name}")
    out = tmp_path / "run"
    with caplog.at_level("DEBUG"):
        score.main(tiny_cfg(out, "data.limit=30", "scoring.signals=[nll]"))
    assert tiny.read_manifest(out)["counts"]["scored"] > 0  # the job really ran
    leaked = [str(p.relative_to(out)) for p in out.rglob("*")
              if p.is_file() and SENTINEL.encode() in p.read_bytes()]  # fmt: skip
    assert leaked == []
    seen = capsys.readouterr()
    assert SENTINEL not in seen.out + seen.err + caplog.text
