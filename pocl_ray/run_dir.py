"""The run directory: where every job reads and writes, and the provenance that decides
whether an output can be reused (content ids, hashes, manifests, atomic replace).

One run directory (`run.output_dir`) holds a whole pipeline:

    config.yaml        the resolved config of the last job
    data/tasks.jsonl   the generated task set (data.source builtin)
    tokenizer/         the tokenizer trained on the data (no pretrained one configured)
    teacher/           the demo teacher (no teacher.name_or_path)
    student_init/      the starting student (no student.name_or_path) + recipe.txt
    scores/            the scores table (table/*.parquet) + manifest.json
    eval/              results.csv, generations.jsonl, manifest.json
    report/            figures and index.html
    ray/               Ray Train storage (run.storage_path null)

A URI output_dir (s3://, gs://, file://) is worked on in a local mirror of it that jobs and
workers keep in step with the URI (`storage`); its Ray Train storage is `<URI>/ray`.
Where a model or tokenizer comes from (a configured name, or this folder) is decided here
and only here (`Locations`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocl_ray import storage
from pocl_ray.config import Config
from pocl_ray.data import LoadResult


class RunDir:
    """The folders of one run directory (the module docstring lists what each holds)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.data = self.root / "data"
        self.tokenizer = self.root / "tokenizer"
        self.teacher = self.root / "teacher"
        self.student_init = self.root / "student_init"
        self.scores = self.root / "scores"
        self.eval = self.root / "eval"
        self.report = self.root / "report"

    @classmethod
    def of(cls, cfg: Config) -> RunDir:
        """The run directory of `cfg`: run.output_dir, or this node's mirror of a URI."""
        out = cfg.run.output_dir
        return cls(storage.mirror_of(out) if storage.is_uri(out) else Path(out))

    def storage(self, cfg: Config) -> Path:
        """Local Ray Train / Tune storage: run.storage_path, else `<root>/ray` (a URI
        storage: `train_storage`)."""
        return Path(cfg.run.storage_path).resolve() if cfg.run.storage_path else self.root / "ray"


def train_storage(cfg: Config) -> str:
    """Ray Train storage as Ray takes it: run.storage_path, else `<output_dir>/ray` (a local
    folder or a URI)."""
    out, store = cfg.run.output_dir, cfg.run.storage_path
    if store:
        return store if storage.is_uri(store) else str(Path(store).resolve())
    return storage.join(out, "ray") if storage.is_uri(out) else str(Path(out).resolve() / "ray")


def absolute(cfg: Config) -> Config:
    """The config with absolute run locations (run.output_dir, run.storage_path): Ray
    workers change directory, so every path they are given must be absolute. URIs stay."""
    out = cfg.run.output_dir
    paths = {"output_dir": out if storage.is_uri(out) else str(Path(out).resolve()),
             "storage_path": train_storage(cfg)}  # fmt: skip
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **paths))


@dataclass(frozen=True, kw_only=True)
class Locations:
    """Where the run's models come from: a configured name or path, else the run folder."""

    tokenizer: str
    teacher: str
    student_init: str

    @classmethod
    def of(cls, cfg: Config, run: RunDir) -> Locations:
        """The one rule: tokenizer.name_or_path, else the teacher's own tokenizer (a pretrained
        teacher brings one), else `<run>/tokenizer/` (trained on the data); the teacher from
        teacher.name_or_path or `<run>/teacher/`; the starting student from
        student.name_or_path or `<run>/student_init/`.

        A folder that exists here is given as an absolute path: Ray Train workers change
        directory (a relative `models/SmolLM2-135M-Instruct` was otherwise looked up on the
        hub by the worker that saves the student). Hub names are left as they are."""
        return cls(
            tokenizer=_here(cfg.tokenizer.name_or_path or cfg.teacher.name_or_path
                            or str(run.tokenizer)),  # fmt: skip
            teacher=_here(cfg.teacher.name_or_path or str(run.teacher)),
            student_init=_here(cfg.student.name_or_path or str(run.student_init)),
        )


def _here(where: str) -> str:
    """`where` made absolute when it is a local file or folder, else as given (a hub name)."""
    return str(Path(where).resolve()) if Path(where).exists() else where


# ---------------------------------------------------------------- identities


def sha(text: str) -> str:
    """16 hex digits of sha256(text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def hash_json(value: Any) -> str:
    """`sha` of a JSON document with sorted keys (a config section, a recipe, a key)."""
    return sha(json.dumps(value, sort_keys=True))


def data_fingerprint(loaded: LoadResult) -> str:
    """Hash of every accepted record's id, references and extra fields (sorted by id, so file
    order does not matter), plus the read and rejected counts."""
    h = hashlib.sha256(f"{loaded.n_read}:{len(loaded.rejected)}".encode())
    for r in sorted(loaded.records, key=lambda r: r.sample_id):
        item = [r.sample_id, list(r.references), r.extra]
        h.update(json.dumps(item, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()[:16]


def model_id(path: str | Path) -> str:
    """Content hash of a saved model or tokenizer folder (its *.safetensors and *.json files);
    `name:<path>` for a hub name, which cannot be hashed without downloading it."""
    folder = Path(path)
    if not folder.is_dir():
        return f"name:{path}"
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".json"):
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every leaf that differs between two nested dicts: (dotted key, old, new), sorted."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            leaf
            for k in sorted(set(old) | set(new))
            for leaf in differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        ]
    return [] if old == new else [(prefix, old, new)]


def changes(old: Any, new: Any) -> list[str]:
    """`differences` as `key: old -> new` lines."""
    return [f"{key}: {a!r} -> {b!r}" for key, a, b in differences(old, new)]


# ---------------------------------------------------------------- manifests and reuse


def versions() -> dict[str, str]:
    """The library versions a manifest records."""
    import platform

    import pyarrow
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
    }


def now_utc() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")



def read_manifest(folder: Path) -> dict[str, Any] | None:
    """`folder/manifest.json`, or None when there is none."""
    path = folder / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """`folder/manifest.json` (strict JSON: a NaN or inf is an error, not a silent null)."""
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def reuse_verdict(
    folder: Path,
    key: dict[str, Any],
    *,
    format_version: int,
    complete: Callable[[dict[str, Any]], str | None],
) -> tuple[bool, str]:
    """(True, why) when `folder` holds a finished output made from the same inputs.

    key: what the output was made from (config hash, data and model ids, ...), stored in the
        manifest under "key"; any leaf that differs is named.
    complete: given the old manifest, the reason the files are missing or partial, or None.
    """
    old = read_manifest(folder)
    if old is None:
        return False, f"no {folder.name}/ yet"
    if old.get("format_version") != format_version:
        return False, f"the existing {folder.name}/ has format {old.get('format_version')}"
    changed = changes(old.get("key"), key)
    if changed:
        return False, "inputs changed: " + "; ".join(changed)
    missing = complete(old)
    if missing:
        return False, missing
    return True, "its inputs match (config hash, data and model ids)"


def scratch_dir(final: Path) -> Path:
    """An empty folder beside `final` to write into before `replace_dir`."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder in; readers never see a half-written one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
