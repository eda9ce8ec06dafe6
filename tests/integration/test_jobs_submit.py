"""`ray job submit` as users do it (docs/jobs.md): a head node started with `ray start` with
token authentication on, bound to loopback, and the scoring job sent through the Jobs API with
the repository as its working directory.

Everything here runs in subprocesses with their own environment: the pytest process never
calls `ray.init` (the session's `ray_local` belongs to the other tests) and its environment is
never changed. Every process gets HOME=<tmp>, so the user's ~/.ray (and its auth_token) is
neither read nor written. The head has its own temp dir (RAY_TMPDIR) and ports, talks only to
127.0.0.1 (checked once with `strace -f -e connect` over the whole test), and is stopped by
its PID (never `ray stop`, which stops every Ray process of the user).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tiny
from tests.tiny import TINY

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
UPLOAD_LIMIT_MIB = 5.0  # the repository's code, configs and docs: about 0.7 MiB
NOT_UPLOADED = (".git", ".venv", "runs", ".pytest_cache", ".ruff_cache", "pocl_ray.egg-info")
# Variables of the caller that would point a client or the head elsewhere.
STRIPPED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH")  # fmt: skip

# The client side, in its own process: the token loader and RayConfig are cached per process
# (and a local `ray.init` in this process may already have switched them).
CLIENT = r"""
import json, sys, time
from ray.job_submission import JobSubmissionClient

address, mode = sys.argv[1], sys.argv[2]
if mode == "connect":
    try:
        JobSubmissionClient(address)
    except Exception as e:
        print(json.dumps({"refused": True, "error": f"{type(e).__name__}: {e}"}))
    else:
        print(json.dumps({"refused": False}))
    sys.exit(0)

working_dir, deadline_s, entrypoint = sys.argv[3], float(sys.argv[4]), sys.argv[5]
client = JobSubmissionClient(address)
t0 = time.monotonic()
job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": working_dir})
status = client.get_job_status(job_id)
while not status.is_terminal() and time.monotonic() - t0 < deadline_s:
    time.sleep(1)
    status = client.get_job_status(job_id)
if not status.is_terminal():
    client.stop_job(job_id)
info = client.get_job_info(job_id)
print(json.dumps({
    "job_id": job_id, "status": status.value, "message": info.message,
    "seconds": round(time.monotonic() - t0, 1), "logs": client.get_job_logs(job_id),
}))
"""


@dataclass
class Head:
    address: str
    """The Jobs API (the dashboard), http://127.0.0.1:PORT."""
    temp_dir: Path
    token_file: Path
    home: Path
    log: Path
    proc: subprocess.Popen

    def env(self, *, token: bool = True, **extra: str) -> dict[str, str]:
        """A client's environment: with the token (RAY_AUTH_MODE=token and the token file)
        or without RAY_AUTH_MODE (the token file still named: the usual mistake)."""
        env = base_env(self.home)
        env["RAY_AUTH_TOKEN_PATH"] = str(self.token_file)
        if token:
            env["RAY_AUTH_MODE"] = "token"
        env.update(extra)
        return env


def base_env(home: Path) -> dict[str, str]:
    """This environment minus any Ray address or auth setting, with a private HOME, the venv
    first on PATH (as after `source .venv/bin/activate`: the job's `python` is the venv's),
    and a single-node Ray bound to 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED}
    env["HOME"] = str(home)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (ephemeral range, so outside Ray's worker ports)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_token(path: Path) -> None:
    """A fresh 256-bit token (what `ray get-auth-token --generate` makes), readable only by
    the owner from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def wait_for_dashboard(head: Head, timeout_s: float) -> None:
    """Until the Jobs API answers at all (401 counts: the server is up and wants a token)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            pytest.fail(f"ray start exited with {head.proc.returncode}:\n{head.log.read_text()}")
        try:
            urllib.request.urlopen(f"{head.address}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    log = head.log.read_text()
    pytest.fail(f"the head's dashboard did not answer in {timeout_s:.0f} s:\n{log}")


def session_pids(head: Head) -> list[int]:
    """Live processes of this head: its process session (start_new_session) or a command line
    naming its temp dir."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if state[0] == "Z":  # a zombie holds nothing
            continue
        if int(state[3]) == head.proc.pid or str(head.temp_dir) in cmdline:
            pids.append(int(p.name))
    return pids


def stop_head(head: Head) -> list[int]:
    """SIGTERM to `ray start --block` (it drains and stops its node), then SIGTERM / SIGKILL
    to anything of this head still alive. Returns the PIDs that outlived the graceful stop."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while (left := session_pids(head)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not (pids := session_pids(head)):
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    return left


@pytest.fixture
def token_head(tmp_path):
    """A head node on 127.0.0.1 with token auth on (a private token file), own temp dir and
    ports, 4 logical CPUs; stopped by PID afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    # Even with usage stats off, the dashboard asks the cloud metadata service which cloud it
    # is on (HTTP to 169.254.169.254, a DNS lookup of metadata.google.internal) unless it
    # finds the cluster config `ray up` leaves on a head: give it one, so that every packet
    # stays on loopback.
    (home / "ray_bootstrap_config.yaml").write_text("provider: {type: local}\n")
    token_file = tmp_path / "auth_token"
    write_token(token_file)
    # Ray's socket paths must stay under 107 bytes: a short temp dir, not pytest's tmp_path.
    # Given as RAY_TMPDIR, not --temp-dir: every process of the node inherits it and finds
    # this head's address file there (with --temp-dir, Ray Train's placement-group cleaner
    # looks in /tmp/ray and fails when other Ray instances run on this machine).
    temp_dir = Path(tempfile.mkdtemp(prefix="pocl-ray-head-", dir="/tmp"))
    gcs, dash, client, nm, om, metrics, agent_http, agent_grpc, env_agent, closed = free_ports(10)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--num-cpus=4", "--disable-usage-stats",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--port={gcs}",
        f"--ray-client-server-port={client}", f"--node-manager-port={nm}",
        f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", "--log-style=record", "--log-color=false",
    ]  # fmt: skip
    log = tmp_path / "head.log"
    env = base_env(home)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_TMPDIR=str(temp_dir))
    # SIGTERM drains the node first, up to 30 s, and a node that ran Ray Data never becomes
    # idle (its detached stats actor stays): skip the drain, there is nothing to hand over.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # With usage stats off, a `ray start` head still posts one "disabled" report to
    # https://usage-stats.ray.io/ (a DNS lookup at least): send it to a closed loopback port.
    env["RAY_USAGE_STATS_REPORT_URL"] = f"http://127.0.0.1:{closed}/"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    head = Head(f"http://127.0.0.1:{dash}", temp_dir, token_file, home, log, proc)
    try:
        wait_for_dashboard(head, timeout_s=120)
        yield head
    finally:
        outlived = stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not outlived, f"processes of the head outlived its SIGTERM: {outlived}"


def client(head: Head, env: dict[str, str], *args: str, timeout_s: float) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CLIENT, head.address, *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines, f"client failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return json.loads(lines[-1]) | {"stderr": r.stderr}


def uploaded_mib(head: Head) -> float:
    """The working-dir package's size as the head logged it when it stored it."""
    logs = head.temp_dir / "ray" / "session_latest" / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("dashboard*.log"))
    sizes = re.findall(r"Pushing file package 'gcs://_ray_pkg_\w+\.zip' \(([\d.]+)MiB\)", text)
    assert sizes, f"no 'Pushing file package' line in {logs}/dashboard*.log"
    return float(sizes[-1])


def uploaded_tree(head: Head) -> list[str]:
    """Top-level names of the unpacked working dir(s) the head received."""
    files = head.temp_dir / "ray" / "session_latest" / "runtime_resources" / "working_dir_files"
    return sorted({p.name for d in files.glob("_ray_pkg_*") if d.is_dir() for p in d.iterdir()})


@pytest.mark.timeout(420)
def test_scoring_job_submitted_to_a_token_auth_head(token_head, tmp_path):
    head = token_head
    assert re.search(r"Local node IP: 127\.0\.0\.1", head.log.read_text()), head.log.read_text()

    # Auth is really on: the token file alone (no RAY_AUTH_MODE=token) and a wrong token fail.
    with ThreadPoolExecutor(2) as pool:
        no_mode, wrong = pool.map(
            lambda env: client(head, env, "connect", timeout_s=60),
            [head.env(token=False), head.env(RAY_AUTH_TOKEN="0" * 64)],
        )
    assert no_mode["refused"], "a client without RAY_AUTH_MODE=token was let in"
    assert "Missing authentication token" in no_mode["error"], no_mode["error"]
    assert wrong["refused"], "a client with a wrong token was let in"
    assert "Invalid authentication token" in wrong["error"], wrong["error"]

    out = tmp_path / "run"  # absolute: the job runs in the head's copy of the working dir
    entrypoint = shlex.join(
        ["python", "-m", "jobs", "score", "configs/demo.yaml", *TINY, f"run.output_dir={out}"]
    )
    job = client(head, head.env(), "submit", str(ROOT), "240", entrypoint, timeout_s=300)
    logs = job["logs"]
    assert job["status"] == "SUCCEEDED", (
        f"job {job['job_id']} ended {job['status']} after {job['seconds']} s: {job['message']}\n"
        f"--- job logs ---\n{logs}\n--- client ---\n{job['stderr'][-4000:]}"
    )
    print(f"job {job['job_id']} SUCCEEDED in {job['seconds']} s")

    assert "ray: connected to" in logs, logs  # joined this head, did not start its own Ray
    assert "rows/s" in logs, logs
    table = tiny.read_scores(out)
    counts = tiny.read_manifest(out)["counts"]
    assert len(table) == counts["scored"] > 0

    size = uploaded_mib(head)
    print(f"working_dir upload: {size:.2f} MiB")
    assert size < UPLOAD_LIMIT_MIB, f"working_dir upload is {size:.2f} MiB; see .rayignore"
    tree = uploaded_tree(head)
    assert {"jobs", "pocl_ray", "configs"} <= set(tree), tree
    assert not set(NOT_UPLOADED) & set(tree), tree
