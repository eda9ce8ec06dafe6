"""Two Ray nodes on this machine, in network namespaces the test creates and removes
(ray-notes.md): a head in namespace A (10.250.0.1) and a worker in B (10.250.0.2), joined by
a veth pair; token authentication on with a private token; Ray's traffic stays on that pair
and on each namespace's loopback, never on the machine's interface. The distill job runs with
two Ray Train workers that can only fit one per node, and trains exactly as two workers on
one node do. Then node B dies mid-job and comes back, for a distill job and a scoring job,
each submitted through the Jobs API (`JobSubmissionClient`, as `ray job submit` does).

Needs root and `ip` (skipped with the reason otherwise). Every process started here runs in
one of the two namespaces and is stopped by PID (`ip netns pids`), never `ray stop`.
Finding: gloo picks the address its hostname resolves to (127.0.0.1 inside a namespace), so
each node is started with GLOO_SOCKET_IFNAME (docs/cluster.md).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs import distill, score
from tests import tiny
from tests.tiny import TINY

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
NODES = {"A": ("10.250.0.1", "pva"), "B": ("10.250.0.2", "pvb")}
PREFIX = f"pocl{os.getpid() % 10000}"  # namespace names of this test run only


def ns(name: str) -> str:
    return f"{PREFIX}{name}"


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


def can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2)"
    return None


def make_namespaces() -> None:
    run("ip", "netns", "add", ns("A"))
    run("ip", "netns", "add", ns("B"))
    run("ip", "link", "add", f"{PREFIX}va", "type", "veth", "peer", "name", f"{PREFIX}vb")
    for node, dev in (("A", f"{PREFIX}va"), ("B", f"{PREFIX}vb")):
        run("ip", "link", "set", dev, "netns", ns(node))
        run("ip", "-n", ns(node), "addr", "add", f"{NODES[node][0]}/24", "dev", dev)
        run("ip", "-n", ns(node), "link", "set", dev, "up")
        run("ip", "-n", ns(node), "link", "set", "lo", "up")


def node_pids(node: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns(node)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def remove_namespaces() -> None:
    for node in ("A", "B"):
        for pid in node_pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(1)
    for node in ("A", "B"):
        subprocess.run(["ip", "netns", "del", ns(node)], capture_output=True)


def node_env(tmp: Path, device: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}  # fmt: skip
    env.update(HOME=str(tmp / "home"), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(tmp / "token"), RAY_USAGE_STATS_ENABLED="0",
               GLOO_SOCKET_IFNAME=device)  # fmt: skip
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # this venv's `ray`
    return env


def short_dir(tmp: Path) -> Path:
    """Ray's temp dir must be short (its socket paths have a 107-byte limit): /tmp/pocl-XXXX,
    recorded in tmp/ray_tmp so the fixture removes it."""
    mark = tmp / "ray_tmp"
    if not mark.exists():
        mark.write_text(tempfile.mkdtemp(prefix="pocl-", dir="/tmp"))
    return Path(mark.read_text())


def wait_for_head(tmp: Path, timeout_s: float = 90) -> None:
    log = tmp / "nodeA.log"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Ray runtime started" in text:
            return
        if "Error" in text and "Traceback" in text:
            raise AssertionError(f"the head did not start:\n{text[-3000:]}")
        time.sleep(1)
    raise AssertionError(f"the head did not start in {timeout_s} s: {log}")


def start_node(tmp: Path, node: str) -> subprocess.Popen:
    ip, _ = NODES[node]
    device = f"{PREFIX}v{node.lower()}"
    # one worker_slot per node: a worker asking for one can only go one per node
    common = ["--node-ip-address", ip, "--num-cpus=2", '--resources={"worker_slot": 1}',
              f"--temp-dir={short_dir(tmp) / node}", "--disable-usage-stats",
              "--block"]  # fmt: skip
    if node == "A":
        args = ["ray", "start", "--head", "--port=6379", "--dashboard-host", ip, *common]
    else:
        args = ["ray", "start", f"--address={NODES['A'][0]}:6379", *common]
    log = (tmp / f"node{node}.log").open("w")
    return subprocess.Popen(["ip", "netns", "exec", ns(node), *args], env=node_env(tmp, device),
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


DRIVER_CHECK = r"""
import json, time, ray
ray.init(address="10.250.0.1:6379", log_to_driver=False)
deadline = time.time() + 90
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(1)
print(json.dumps(sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])))
"""

WORKER_NODES = r"""
import json, ray
from ray.util.state import list_actors
ray.init(address="10.250.0.1:6379", log_to_driver=False)
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
print(json.dumps(sorted({ips.get(a.node_id, "?") for a in actors})))
"""


SUBMIT = r"""
import json, sys, time
from ray.job_submission import JobSubmissionClient

address, working_dir, log_path, deadline_s, env_vars = sys.argv[1:6]
entrypoint = " ".join(sys.argv[6:])
client = JobSubmissionClient(address)
job_id = client.submit_job(entrypoint=entrypoint, runtime_env={
    "working_dir": working_dir, "env_vars": json.loads(env_vars)})
t0 = time.monotonic()
while True:  # the job's log, live, for the test to watch
    status = client.get_job_status(job_id)
    with open(log_path + ".tmp", "w") as f:
        f.write(client.get_job_logs(job_id))
    __import__("os").replace(log_path + ".tmp", log_path)
    if status.is_terminal() or time.monotonic() - t0 > float(deadline_s):
        break
    time.sleep(0.5)
if not status.is_terminal():
    client.stop_job(job_id)
print(json.dumps({"job_id": job_id, "status": status.value,
                  "message": client.get_job_info(job_id).message}))
"""


def submit(
    tmp: Path, log: Path, *job_args: str, deadline_s: int, env_vars: dict | None = None
) -> subprocess.Popen:
    """`python -m jobs ...` submitted through the Jobs API of the head (its dashboard on
    10.250.0.1, token auth) from a client in namespace A, the repository as the working
    directory; the job's log is copied to `log` every half second. The client prints the
    final status as JSON."""
    env = node_env(tmp, f"{PREFIX}va")
    entry = shlex.join(["python", "-m", "jobs", *job_args])
    return subprocess.Popen(
        ["ip", "netns", "exec", ns("A"), sys.executable, "-c", SUBMIT,
         f"http://{NODES['A'][0]}:8265", str(ROOT), str(log), str(deadline_s),
         json.dumps(env_vars or {}), entry],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finished(client: subprocess.Popen, log: Path, timeout_s: int) -> None:
    """Wait for the submitting client; the job must have SUCCEEDED."""
    out, err = client.communicate(timeout=timeout_s)
    assert client.returncode == 0, err[-3000:]
    result = json.loads(out.splitlines()[-1])
    assert result["status"] == "SUCCEEDED", f"{result}\n{log.read_text()[-4000:]}"


def ended_early(client: subprocess.Popen, log: Path) -> str:
    """What a job that ended before the node could be killed said."""
    out, err = client.communicate()
    return f"{out[-2000:]}\n{err[-2000:]}\n{log.read_text()[-4000:] if log.exists() else ''}"


def kill_node_b(tmp: Path) -> float:
    """Node B dies (raylet, its workers, everything in namespace B), comes back 5 s later;
    returns when it died."""
    killed = time.time()
    for pid in node_pids("B"):
        os.kill(pid, signal.SIGKILL)
    time.sleep(5)
    start_node(tmp, "B")
    return killed


def driver(tmp: Path, *args: str, timeout_s: int) -> subprocess.CompletedProcess:
    """A process in namespace A, joined to the cluster (as `ray job submit` would place the
    job's driver on the head)."""
    env = node_env(tmp, f"{PREFIX}va") | {"RAY_ADDRESS": f"{NODES['A'][0]}:6379",
                                           "PYTHONPATH": str(ROOT)}  # fmt: skip
    return subprocess.run(["ip", "netns", "exec", ns("A"), sys.executable, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout_s)  # fmt: skip


@pytest.fixture
def two_nodes(tmp_path):
    if why := can_make_namespaces():
        pytest.skip(why)
    (tmp_path / "home").mkdir()
    (tmp_path / "token").write_text(secrets.token_hex(32))
    (tmp_path / "token").chmod(0o600)
    make_namespaces()
    try:
        start_node(tmp_path, "A")
        wait_for_head(tmp_path)
        start_node(tmp_path, "B")
        out = driver(tmp_path, "-c", DRIVER_CHECK, timeout_s=150)
        assert out.returncode == 0, out.stderr[-3000:]
        assert json.loads(out.stdout.splitlines()[-1]) == ["10.250.0.1", "10.250.0.2"]
        yield tmp_path
    finally:
        remove_namespaces()
        if (tmp_path / "ray_tmp").exists():
            shutil.rmtree((tmp_path / "ray_tmp").read_text(), ignore_errors=True)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_distill_with_one_worker_per_node_trains_as_on_one_node(two_nodes, ray_local, tmp_path):
    """Two workers that each need the one `worker_slot` of a node: one per node, DDP over the
    veth pair. Step for step, the losses equal a 2-worker run on the single local node (same
    table, same starting student, same seed, 1 CPU and 1 torch thread per worker)."""
    run_dir = two_nodes / "run"
    common = [*TINY, "scaling.num_workers=2", "student.dropout=0.0", f"run.output_dir={run_dir}"]
    out = driver(two_nodes, "-m", "jobs", "score", "configs/demo.yaml", *common, timeout_s=240)
    assert out.returncode == 0, out.stderr[-3000:]
    local = tmp_path / "local"
    shutil.copytree(run_dir, local)  # the same scores table and starting student
    out = driver(two_nodes, "-m", "jobs", "distill", "configs/demo.yaml", *common,
                 "scaling.resources_per_worker={CPU: 1, worker_slot: 1}",
                 f"run.storage_path={two_nodes / 'storage'}", timeout_s=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    where = driver(two_nodes, "-c", WORKER_NODES, timeout_s=120)
    assert where.returncode == 0, where.stderr[-3000:]
    assert json.loads(where.stdout.splitlines()[-1]) == ["10.250.0.1", "10.250.0.2"]

    cfg = tiny.tiny_cfg(local, "scaling.num_workers=2", "student.dropout=0.0",
                        "scaling.resources_per_worker={CPU: 1}",
                        f"run.storage_path={tmp_path / 'storage_local'}")  # fmt: skip
    distill.main(cfg)
    two, one = metrics(run_dir), metrics(local)
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(two) > 0
    for key in ("loss", "ce", "kd"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key


def in_stage_two(log: Path) -> bool:
    """The workers' progress lines (streamed to the driver's log) show stage 2 under way."""
    return "stage 2/4: " in log.read_text(errors="replace") if log.exists() else False


@pytest.mark.timeout(900)
def test_losing_a_node_mid_stage_resumes_from_the_last_checkpoint(two_nodes, ray_local, tmp_path):
    """Node B dies mid-stage (every process in its namespace killed by PID), comes back, and
    the job carries on from the last checkpoint: no stage repeated or skipped, every step once
    in the final trajectory, the steps after the restart equal to an uninterrupted run's."""
    run_dir = two_nodes / "run"
    bigger = [*TINY, "data.builtin_size=480", "curriculum.interval=2", "run.log_every=1"]
    common = [*bigger, "scaling.num_workers=2", "student.dropout=0.0", f"run.output_dir={run_dir}"]
    out = driver(two_nodes, "-m", "jobs", "score", "configs/demo.yaml", *common, timeout_s=240)
    assert out.returncode == 0, out.stderr[-3000:]
    local = tmp_path / "local"
    shutil.copytree(run_dir, local)
    log = two_nodes / "distill.log"
    job_started = time.time()
    job = submit(two_nodes, log, "distill", "configs/demo.yaml", *common,
                 "scaling.resources_per_worker={CPU: 1, worker_slot: 1}",
                 "run.checkpoint_every=5", "run.max_failures=3", "run.keep_checkpoints=null",
                 f"run.storage_path={two_nodes / 'storage'}", deadline_s=600)  # fmt: skip
    deadline = time.time() + 300
    while not in_stage_two(log) and time.time() < deadline:
        assert job.poll() is None, ended_early(job, log)
        time.sleep(0.2)
    log_at_kill = log.read_text(errors="replace")
    killed = kill_node_b(two_nodes)
    finished(job, log, timeout_s=660)

    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    (at,) = [i for i, e in enumerate(events) if e["event"] == "resume"]
    saved = events[at]["position"]["global_step"]
    last = [e["global_step"] for e in events[:at] if e["event"] == "checkpoint"][-1]
    assert saved == last > 0  # carried on from the last checkpoint written before the loss
    rows = {r["step"]: r for r in metrics(run_dir)}
    total = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert sorted(rows) == list(range(total))  # every step once: none repeated, none skipped
    stages = [r["stage"] for r in (rows[s] for s in sorted(rows))]
    assert stages == sorted(stages)  # the curriculum never went back a stage

    cfg = tiny.tiny_cfg(local, "data.builtin_size=480", "curriculum.interval=2", "run.log_every=1",
                        "scaling.num_workers=2", "student.dropout=0.0",
                        "scaling.resources_per_worker={CPU: 1}",
                        f"run.storage_path={tmp_path / 'storage_local'}")  # fmt: skip
    distill.main(cfg)  # uninterrupted, on one node
    ref = {r["step"]: r for r in metrics(local)}
    assert sorted(ref) == sorted(rows)
    for key in ("loss", "ce", "kd"):
        got = [rows[s][key] for s in sorted(rows) if s >= saved]
        want = [ref[s][key] for s in sorted(ref) if s >= saved]
        assert got == pytest.approx(want, rel=1e-5), key
    progress = re.findall(r"stage 2/4: (\d+)/\d+ steps", log_at_kill)
    before = sum(1 for r in rows.values() if r["stage"] == 0) + int(progress[-1])
    print(
        f"timeline (Jobs API): node B killed {killed - job_started:.0f} s after submission, "
        f"at about step {before} (stage 2, step {progress[-1]} of it); resumed at step "
        f"{saved}, the last checkpoint (every 5 steps and at stage ends); "
        f"{before - saved} step(s) redone; {total} steps in all, each once in metrics.jsonl"
    )


def scored_rows(log: Path) -> tuple[int, int] | None:
    """(rows scored, rows in all) from the job's latest Ray Data progress line."""
    text = log.read_text(errors="replace") if log.exists() else ""
    found = re.findall(r"Total Progress: (\d+)/(\d+)", text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


@pytest.mark.timeout(900)
def test_losing_a_node_mid_table_scores_every_sample_once(two_nodes, ray_local, tmp_path):
    """Two scoring actors, one per node; node B dies while the table is being scored and comes
    back. The job finishes with every training sample in the table exactly once, each with
    the signals a single-node run gives it."""
    run_dir = two_nodes / "run"
    bigger = [*TINY, "data.builtin_size=960", "scoring.max_new_tokens=48"]  # about a minute
    log = two_nodes / "score.log"
    job_started = time.time()
    job = submit(two_nodes, log, "score", "configs/demo.yaml", *bigger, "scoring.num_actors=2",
                 "scoring.resources={worker_slot: 1}", f"run.output_dir={run_dir}",
                 deadline_s=600, env_vars={"RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "1"},
                 )  # fmt: skip
    deadline = time.time() + 400
    while time.time() < deadline:  # both actors up and some rows scored, most still to do
        got = scored_rows(log)
        if got and 0 < got[0] < got[1] * 0.6 and "Actors: 2" in log.read_text(errors="replace"):
            break
        assert job.poll() is None, ended_early(job, log)
        time.sleep(0.2)
    at_kill = scored_rows(log)
    killed = kill_node_b(two_nodes)
    finished(job, log, timeout_s=660)

    manifest, table = tiny.read_manifest(run_dir), tiny.read_scores(run_dir)
    ids = table["sample_id"].tolist()
    assert len(ids) == len(set(ids)) == manifest["counts"]["train"] > at_kill[0]  # each once

    local = tmp_path / "local"  # the same inputs, scored on the single local node
    shutil.copytree(run_dir, local)
    score.main(tiny.tiny_cfg(local, "data.builtin_size=960", "scoring.max_new_tokens=48",
                             "scoring.num_actors=2"), force=True)  # fmt: skip
    ref = tiny.read_scores(local).set_index("sample_id")
    got = table.set_index("sample_id").loc[ref.index]
    for name in manifest["signals"]:
        assert got[name].to_numpy() == pytest.approx(ref[name].to_numpy(), abs=1e-6), name
    text = log.read_text(errors="replace")
    recovery = [line for line in text.splitlines() if "the pool failed" in line]
    print(
        f"timeline (Jobs API, scoring): node B killed {killed - job_started:.0f} s after "
        f"submission with {at_kill[0]}/{at_kill[1]} rows scored; the job finished with all "
        f"{len(ids)} training samples once; recovery: {recovery or 'within the pool'}"
    )
