"""Run directories on object storage: `run.output_dir` may be a URI (s3://, gs://, file://).

A job works in a local copy of the run directory (its mirror, `mirror_of`) and keeps it in
step with the URI through pyarrow's filesystems:

- the driver of every job pulls before it starts and pushes what changed when it ends, also
  when it fails, so finished outputs are kept (`synced`);
- a Ray worker or actor pulls the folders it loads (`pull_paths`), on whatever node it runs;
- rank 0 of a distillation pushes its files at every checkpoint and at the end.
Ray Train's checkpoints go straight to `<URI>/ray` (Ray writes them through pyarrow itself).

Only changed files move: `.pocl-sync.json` in the mirror records each file's size and time
on both sides at the last transfer. (S3 times have 1-second resolution: a rewrite of the same
size within the same second by another machine is not seen by a pull; jobs do not do that,
one writer per file.) A push uploads manifests and model configs last, so a
reader that finds `manifest.json` or `config.json` finds the files they describe.

Credentials come from the environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an
instance role; GOOGLE_APPLICATION_CREDENTIALS; AWS_ENDPOINT_URL for an S3-compatible server);
a URI that carries them is refused by config validation (`uri_problems`), and no message
here prints more than `redact(uri)`.

pyarrow only: the core never imports Ray.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger("pocl_ray.storage")

SCHEMES = ("s3", "gs", "gcs", "file", "hdfs", "viewfs", "abfs", "abfss")
"""The URI schemes `pyarrow.fs.FileSystem.from_uri` opens."""
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "signature")
"""A query parameter whose name holds one of these carries a credential."""
NOT_SYNCED = ("ray",)
"""Top-level folders of the mirror that never move: Ray Train / Tune storage."""
COMMIT_FILES = ("manifest.json", "recipe.txt", "summary.json", "config.json")
"""Uploaded after the other files of a push (what readers check for completeness)."""
STATE_FILE = ".pocl-sync.json"
LOCK_FILE = ".pocl-sync.lock"


class StorageError(RuntimeError):
    """A transfer to or from object storage failed; the message names the URI (redacted),
    the file, and what to check."""


def is_uri(text: str | None) -> bool:
    """True for `scheme://...` (object storage or file://), False for a local path."""
    return bool(text) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(text)) is not None


def redact(uri: str) -> str:
    """The URI without user info or query values (safe to print)."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{k}=..." for k, _ in urllib.parse.parse_qsl(parts.query))
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, query, ""))


def uri_problems(key: str, text: str) -> list[str]:
    """Config problems of a URI setting (`key`): an unknown scheme, or credentials in it."""
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        return [f"{key}: unknown scheme {scheme!r}; use s3://, gs://, file:// (or another "
                f"pyarrow filesystem: {', '.join(SCHEMES)}) or a local path"]  # fmt: skip
    parts = urllib.parse.urlsplit(text)
    secret_query = any(
        w in k.lower() for k, _ in urllib.parse.parse_qsl(parts.query) for w in SECRET_WORDS
    )
    if "@" in parts.netloc or secret_query:
        return [f"{key}: {redact(text)} carries credentials in the URI; remove them and give "
                "them through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an "
                "instance role, GOOGLE_APPLICATION_CREDENTIALS; docs/cluster.md)"]  # fmt: skip
    if not parts.path.strip("/") and scheme != "file":
        return [f"{key}: {redact(text)} names a bucket only; add a folder, e.g. "
                f"{scheme}://bucket/runs/demo"]  # fmt: skip
    return []


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) of a URI or a local path."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot open {redact(location)}: {e}") from e
    return fs, path.rstrip("/")


def cache_root() -> Path:
    """Where mirrors live: POCL_RAY_CACHE, else ~/.cache/pocl-ray. Ray workers find the
    driver's model folders under the same path, so it must be the same on every node (it is
    when the nodes run one image as one user)."""
    return Path(os.environ.get("POCL_RAY_CACHE") or Path.home() / ".cache" / "pocl-ray")


def mirror_of(uri: str) -> Path:
    """The local working copy of run directory `uri` on this node."""
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]
    return cache_root() / "mirror" / f"{tail}-{digest}"


# ---------------------------------------------------------------- transfers


@contextmanager
def _locked(local: Path) -> Iterator[dict]:
    """The mirror's sync state, under an exclusive lock (workers of one node share a
    mirror); written back when the block ends."""
    local.mkdir(parents=True, exist_ok=True)
    with open(local / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = local / STATE_FILE
        state = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        try:
            yield state
        finally:
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")
            tmp.replace(path)


def _synced_name(rel: str) -> bool:
    parts = rel.split("/")
    return parts[0] not in NOT_SYNCED and not any(p.startswith(".") for p in parts)


def _in_scope(rel: str, only: Iterable[str] | None) -> bool:
    return only is None or any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in only)


def _local_stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _remote_files(fs: pafs.FileSystem, base: str) -> dict[str, list[int]]:
    """rel path -> [size, mtime_ns] of every file under `base` (none when it is absent)."""
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            rel = info.path[len(base) :].lstrip("/")
            out[rel] = [info.size, info.mtime_ns or 0]
    return out


def pull(uri: str, local: Path, only: Iterable[str] | None = None) -> int:
    """Bring `local` up to date with `uri` (files under `only`, rel paths; None = all):
    download what is new or changed there, delete here what was deleted there. A file
    changed here and not there is kept (it is pushed next). Returns the files downloaded."""
    only = None if only is None else list(only)
    fs, base = filesystem(uri)
    try:
        remote = _remote_files(fs, base)
    except OSError as e:
        raise StorageError(f"cannot list {redact(uri)}: {e}; check the credentials and "
                           "endpoint in the environment (docs/cluster.md)") from e  # fmt: skip
    n = 0
    with _locked(local) as state:
        for rel, info in sorted(remote.items()):
            if not (_synced_name(rel) and _in_scope(rel, only)):
                continue
            rec, here = state.get(rel), local / rel
            if rec and rec["remote"] == info and _local_stat(here) is not None:
                continue
            _copy(fs, f"{base}/{rel}", pafs.LocalFileSystem(), str(here), uri)
            state[rel] = {"remote": info, "local": _local_stat(here)}
            n += 1
        for rel in [r for r in state if r not in remote and _in_scope(r, only)]:
            here = local / rel
            if _local_stat(here) == state[rel]["local"]:  # unchanged here: deleted there
                here.unlink(missing_ok=True)
            del state[rel]
    return n


def push(local: Path, uri: str) -> int:
    """Upload every file of `local` that changed since the last transfer (manifests and
    model configs last), and delete there what was deleted here. Returns the files uploaded."""
    fs, base = filesystem(uri)
    n = 0
    with _locked(local) as state:
        files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
        files = [r for r in files if _synced_name(r)]
        changed = [r for r in files if state.get(r, {}).get("local") != _local_stat(local / r)]
        changed.sort(key=lambda r: (r.rsplit("/", 1)[-1] in COMMIT_FILES, r))
        for rel in changed:
            _copy(pafs.LocalFileSystem(), str(local / rel), fs, f"{base}/{rel}", uri)
            info = fs.get_file_info(f"{base}/{rel}")
            state[rel] = {"remote": [info.size, info.mtime_ns or 0],
                          "local": _local_stat(local / rel)}  # fmt: skip
            n += 1
        present = set(files)
        for rel in [r for r in state if r not in present and _synced_name(r)]:
            try:
                fs.delete_file(f"{base}/{rel}")
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StorageError(f"cannot delete {rel} in {redact(uri)}: {e}") from e
            del state[rel]
    return n


def _copy(src_fs, src: str, dst_fs, dst: str, uri: str) -> None:
    try:
        if isinstance(dst_fs, pafs.LocalFileSystem):
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except OSError as e:
        raise StorageError(f"copying {src} -> {dst} ({redact(uri)}): {e}; check the "
                           "credentials and endpoint in the environment") from e  # fmt: skip


# ---------------------------------------------------------------- what jobs and workers call


@contextmanager
def synced(output_dir: str) -> Iterator[None]:
    """A job's driver: pull the run directory before the block, push it after (also after
    a failure, so what finished is kept). Nothing for a local output_dir."""
    if not is_uri(output_dir):
        yield
        return
    local = mirror_of(output_dir)
    got = pull(output_dir, local)
    log.info("storage: %s: %d file(s) pulled into %s", redact(output_dir), got, local)
    try:
        yield
    except BaseException:
        try:
            sent = push(local, output_dir)
            log.warning("storage: the job failed; %d finished file(s) pushed to %s", sent,
                        redact(output_dir))  # fmt: skip
        except StorageError as e:
            log.error("storage: the job failed and its outputs could not be pushed: %s", e)
        raise
    sent = push(local, output_dir)
    log.info("storage: %d file(s) pushed to %s", sent, redact(output_dir))


def pull_paths(output_dir: str, paths: Iterable[str | None]) -> None:
    """A worker or actor: pull the parts of the run directory that `paths` (model folders,
    files) point into; paths elsewhere (hub names, local models) are left alone."""
    if not is_uri(output_dir):
        return
    local = mirror_of(output_dir)
    only = []
    for p in paths:
        if p and Path(p).is_absolute() and Path(p).resolve().is_relative_to(local):
            only.append(Path(p).resolve().relative_to(local).as_posix())
    if only:
        pull(output_dir, local, None if "." in only else only)


def push_run(output_dir: str) -> None:
    """A worker that wrote into the run directory (rank 0): push this node's mirror."""
    if is_uri(output_dir):
        push(mirror_of(output_dir), output_dir)
