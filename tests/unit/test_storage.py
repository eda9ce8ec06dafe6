"""Run directories as URIs (pocl_ray/storage.py): validation, the mirror, pull / push.

Two "nodes" are two mirror roots (POCL_RAY_CACHE) of one file:// URI: a real pyarrow
filesystem, no server. The S3 round trip is tests/integration/test_object_storage.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pocl_ray import storage
from pocl_ray.config import ConfigError, load_config
from pocl_ray.ray_train import latest_checkpoint, read_state
from pocl_ray.run_dir import RunDir, absolute
from tests.tiny import DEMO


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("s3://AKIAXXXX:wJalrSECRET@bucket/runs/x", "carries credentials"),
        ("s3://bucket/runs/x?secret_key=wJalrSECRET", "carries credentials"),
        ("s3://bucket/runs/x?access_key=AKIA&region=eu", "carries credentials"),
        ("ftp://host/runs/x", "unknown scheme 'ftp'"),
        ("s3://bucket", "names a bucket only"),
    ],
)
def test_bad_run_uris_are_refused_without_echoing_a_secret(uri, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [f"run.output_dir={uri}"])
    assert "run.output_dir" in str(e.value) and fragment in str(e.value)
    assert "wJalrSECRET" not in str(e.value) and "AKIA" not in str(e.value)


def test_good_uris_validate_and_stay_uris_in_the_resolved_config(tmp_path, monkeypatch):
    monkeypatch.setenv("POCL_RAY_CACHE", str(tmp_path / "cache"))
    cfg = absolute(load_config(DEMO, ["run.output_dir=s3://bucket/runs/demo"]))
    assert cfg.run.output_dir == "s3://bucket/runs/demo"
    assert cfg.run.storage_path == "s3://bucket/runs/demo/ray"  # Ray Train writes there
    root = RunDir.of(cfg).root
    assert root.is_relative_to(tmp_path / "cache") and root.name.startswith("demo-")
    assert storage.mirror_of("s3://bucket/runs/demo/") == root  # one mirror per run
    assert storage.mirror_of("s3://bucket/other/demo") != root
    local = absolute(load_config(DEMO, [f"run.output_dir={tmp_path}/r",
                                        "run.storage_path=gs://b/ckpt"]))  # fmt: skip
    assert local.run.storage_path == "gs://b/ckpt" and RunDir.of(local).root == tmp_path / "r"


def test_redact_drops_user_info_and_query_values():
    assert storage.redact("s3://k:s@b/p?x=1&secret=2") == "s3://b/p?x=...&secret=..."
    assert not storage.is_uri("runs/demo") and storage.is_uri("file:///tmp/x")


def _node(monkeypatch, tmp_path: Path, name: str, uri: str) -> Path:
    """Switch to "node" `name`: its own mirror root; returns its mirror of `uri`."""
    monkeypatch.setenv("POCL_RAY_CACHE", str(tmp_path / name))
    storage.mirror_of(uri).mkdir(parents=True, exist_ok=True)
    return storage.mirror_of(uri)


def test_push_then_pull_moves_only_changes_and_deletions(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/bucket/run"
    a = _node(monkeypatch, tmp_path, "a", uri)
    (a / "scores" / "table").mkdir(parents=True)
    (a / "scores" / "table" / "part-0.parquet").write_bytes(b"rows")
    (a / "scores" / "manifest.json").write_text('{"n": 1}')
    (a / ".scores.tmp-1").mkdir()  # a scratch folder: never synced
    (a / ".scores.tmp-1" / "x").write_text("half")
    (a / "ray").mkdir()  # Ray Train storage: never synced
    (a / "ray" / "ckpt").write_text("c")
    assert storage.push(a, uri) == 2
    remote = tmp_path / "bucket" / "run"
    assert sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()) == [
        "scores/manifest.json", "scores/table/part-0.parquet"]  # fmt: skip
    assert storage.push(a, uri) == 0  # nothing changed

    b = _node(monkeypatch, tmp_path, "b", uri)
    assert storage.pull(uri, b) == 2
    assert (b / "scores" / "table" / "part-0.parquet").read_bytes() == b"rows"
    assert storage.pull(uri, b) == 0

    # node a replaces the table (new part name) and rewrites the manifest
    a = _node(monkeypatch, tmp_path, "a", uri)
    (a / "scores" / "table" / "part-0.parquet").unlink()
    (a / "scores" / "table" / "part-1.parquet").write_bytes(b"new rows")
    (a / "scores" / "manifest.json").write_text('{"n": 2, "more": true}')
    assert storage.push(a, uri) == 2
    assert not (remote / "scores" / "table" / "part-0.parquet").exists()

    b = _node(monkeypatch, tmp_path, "b", uri)
    (b / "notes.txt").write_text("only here, not pushed yet")
    assert storage.pull(uri, b) == 2
    assert not (b / "scores" / "table" / "part-0.parquet").exists()  # deleted there
    assert json.loads((b / "scores" / "manifest.json").read_text()) == {"n": 2, "more": True}
    assert (b / "notes.txt").exists()  # a change here is kept, not overwritten


def test_pull_paths_fetches_only_the_folders_a_worker_loads(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/bucket/run"
    a = _node(monkeypatch, tmp_path, "a", uri)
    for folder in ("teacher", "student_init", "eval"):
        (a / folder).mkdir(parents=True)
        (a / folder / "config.json").write_text(folder)
    storage.push(a, uri)
    b = _node(monkeypatch, tmp_path, "b", uri)
    storage.pull_paths(uri, [str(b / "teacher"), "HuggingFaceTB/SmolLM2-135M", None])
    assert (b / "teacher" / "config.json").read_text() == "teacher"
    assert not (b / "student_init").exists() and not (b / "eval").exists()
    storage.pull_paths(str(tmp_path / "local-run"), [str(b / "eval")])  # local: nothing
    assert not (b / "eval").exists()


def test_a_file_changed_here_is_pushed_even_at_the_same_size(tmp_path, monkeypatch):
    uri = f"file://{tmp_path}/bucket/run"
    a = _node(monkeypatch, tmp_path, "a", uri)
    (a / "summary.json").write_text("aaaa")
    storage.push(a, uri)
    (a / "summary.json").write_text("bbbb")
    os.utime(a / "summary.json", ns=(1, 2))  # another mtime, same size
    assert storage.push(a, uri) == 1
    assert (tmp_path / "bucket" / "run" / "summary.json").read_text() == "bbbb"


def test_latest_checkpoint_reads_a_uri(tmp_path):
    run = tmp_path / "ray" / "demo"
    for step, complete in ((4, True), (8, True), (12, False)):  # 12: state.json not written
        folder = run / f"ckpt_{step:08d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "state.json").write_text(json.dumps({"position": {"global_step": step}}))
    latest = latest_checkpoint(f"file://{run}")
    assert latest == f"file://{run}/ckpt_00000008"
    assert read_state(latest)["position"]["global_step"] == 8
    assert latest_checkpoint(tmp_path / "none") is None


def test_a_failed_transfer_names_the_uri_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("POCL_RAY_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "readonly"
    target.mkdir()
    (target / "run").write_text("a file where the run folder should be")
    local = storage.mirror_of(f"file://{target}/run")
    local.mkdir(parents=True)
    (local / "x.txt").write_text("x")
    with pytest.raises(storage.StorageError, match="run.*check the credentials"):
        storage.push(local, f"file://{target}/run")
