"""`pocl-ray score CONFIG [key=value ...] [--force]`: the difficulty scoring job on Ray Data.

Reads the configured data through the core loader, scores the TRAIN split (the eval split
stays held out) on a pool of Ray actors, fuses the signals globally with the core `fuse` and
`assign_stages`, and writes `run.output_dir/scores/`:
    table/part-00000.parquet   one row per training sample, easiest first
    manifest.json              config hash, data fingerprint, model ids, counts, timings, ...
See docs/scoring.md. Also runnable as `python -m jobs.score CONFIG ...` (e.g. through
`ray job submit --working-dir . -- python -m jobs.score configs/demo.yaml`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

from pocl_ray import difficulty, models
from pocl_ray.config import Config, ScoringConfig, save_resolved, to_dict
from pocl_ray.data import IGNORE_INDEX, LoadResult, Record, TokenizedExample, split_train_eval
from pocl_ray.data import tokenize_records as core_tokenize
from pocl_ray.evaluation import new_token_budget
from pocl_ray.plain import (
    get_teacher,
    get_tokenizer,
    load_task_records,
    spearman,
    starting_student,
)

log = logging.getLogger("pocl_ray.score")

FORMAT_VERSION = 2
"""2: the top-K cache holds T = 1 log-probabilities and the tail log-partitions (1: logits)."""
TABLE_DIR = "table"
TABLE_FILE = "part-00000.parquet"
EXECUTION_KEYS = ("batch_size", "num_actors", "cpus_per_actor", "gpus_per_actor")
"""Scoring settings that change where and how fast scores are computed, not their values
(beyond float round-off): they are left out of the config hash."""


class ScoreJobError(RuntimeError):
    """The scoring job cannot finish correctly; the message says why and what to do."""


class AccountingError(ScoreJobError):
    """Rows were lost or duplicated between reading and the scores table."""


class ResourceRequestError(ScoreJobError):
    """The scoring actors ask for CPUs / GPUs the cluster does not have."""


TEACHER_SIGNALS = ("teacher_nll", "kd_gap")


def needs_teacher(scoring: ScoringConfig) -> bool:
    """Whether the actors must load the teacher (a teacher signal, the cache, or as scorer)."""
    return (
        any(s in TEACHER_SIGNALS for s in scoring.signals)
        or scoring.teacher_topk > 0
        or scoring.scorer == "teacher"
    )


def check_resources(scoring: ScoringConfig, cluster: Mapping[str, float]) -> None:
    """Raise ResourceRequestError when the actor pool can never be placed on `cluster`.

    Args:
        scoring: the scoring section (num_actors, cpus_per_actor, gpus_per_actor).
        cluster: `ray.cluster_resources()` of the connected cluster.

    Ray would queue such actors forever without an error (ray-notes.md), so this is checked
    before any model is loaded or trained. On an autoscaling cluster the check sees the nodes
    that are up now: start the GPU workers first (docs/scoring.md).
    """
    n = scoring.num_actors
    gpus = cluster.get("GPU", 0.0)
    if scoring.gpus_per_actor > 0 and gpus == 0:
        raise ResourceRequestError(
            f"scoring.gpus_per_actor={scoring.gpus_per_actor:g} but this Ray cluster has no GPU "
            f"(resources: {_fmt(cluster)}); set scoring.gpus_per_actor=0 to score on CPUs, or "
            "connect to a cluster with GPUs (RAY_ADDRESS=... or `ray job submit`)"
        )
    if scoring.gpus_per_actor * n > gpus:
        raise ResourceRequestError(
            f"scoring needs {n} actors x {scoring.gpus_per_actor:g} GPU = "
            f"{n * scoring.gpus_per_actor:g} GPUs; the cluster has {gpus:g}; lower "
            "scoring.num_actors or scoring.gpus_per_actor"
        )
    cpus = cluster.get("CPU", 0.0)
    if scoring.cpus_per_actor * n > cpus:
        raise ResourceRequestError(
            f"scoring needs {n} actors x {scoring.cpus_per_actor:g} CPU = "
            f"{n * scoring.cpus_per_actor:g} CPUs; the cluster has {cpus:g}; lower "
            "scoring.num_actors or scoring.cpus_per_actor"
        )


def _fmt(resources: Mapping[str, float]) -> str:
    parts = [f"{k}={resources[k]:g}" for k in ("CPU", "GPU") if k in resources]
    if "memory" in resources:
        parts.append(f"memory={resources['memory'] / 2**30:.1f} GiB")
    return ", ".join(parts) or "none"


# ---------------------------------------------------------------- identities


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def hashed_config(cfg: Config) -> dict[str, Any]:
    """The parts of the config that can change the scores table.

    Left out: data.source (the data fingerprint identifies the content), sft and the models'
    dropout (they only shape the teacher and the starting student, which their model ids
    identify), the execution keys of `scoring`, and every later stage (loss, optim, eval, ...).
    """
    d = to_dict(cfg)
    return {
        "data": {k: v for k, v in d["data"].items() if k != "source"},
        "tokenizer": d["tokenizer"],
        # dropout is a training knob (scoring runs in eval mode); a changed value that shapes
        # the starting student changes its content id instead
        "teacher": {k: v for k, v in d["teacher"].items() if k != "dropout"},
        "student": {k: v for k, v in d["student"].items() if k != "dropout"},
        "scoring": {k: v for k, v in d["scoring"].items() if k not in EXECUTION_KEYS},
        "stages": {
            "num_stages": cfg.curriculum.num_stages,
            "fractions": cfg.curriculum.fractions,
        },
        "seed": cfg.run.seed,
    }


def config_hash(cfg: Config) -> str:
    return sha(json.dumps(hashed_config(cfg), sort_keys=True))


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


# ---------------------------------------------------------------- models on disk


def student_recipe(cfg: Config, tokenizer_id: str, fingerprint: str) -> str:
    """Hash of everything that defines the tiny starting student: its sizes, the seed, the
    tokenizer, and (for its `sft.student_epochs` of SFT) the data and the SFT settings."""
    d = to_dict(cfg)
    recipe = {
        "student": d["student"],
        "seed": cfg.run.seed,
        "tokenizer": tokenizer_id,
        "max_length": cfg.data.max_length,
        "sft": None,
    }
    if cfg.sft.student_epochs:
        recipe["sft"] = {
            "epochs": cfg.sft.student_epochs,
            "lr": cfg.sft.lr,
            "batch_size": cfg.sft.batch_size,
            "data": {k: v for k, v in d["data"].items() if k != "source"},
            "data_fingerprint": fingerprint,
        }
    return sha(json.dumps(recipe, sort_keys=True))


def save_student_init(cfg: Config, tok, train_ex, out: Path, recipe: str) -> str:
    """The starting student as a saved folder: the scorer by default (the paper's choice), and
    where distillation starts. A pretrained student is used from its own path.

    The core `starting_student` builds it (seeded init, then `sft.student_epochs` of SFT);
    `student_init/recipe.txt` records the `student_recipe` it was made with, so a later run
    reuses the folder only when nothing that defines the student changed.
    """
    if cfg.student.name_or_path:
        return cfg.student.name_or_path
    path = out / "student_init"
    stamp = path / "recipe.txt"
    if (path / "config.json").exists() and stamp.exists():
        if stamp.read_text(encoding="utf-8").strip() == recipe:
            log.info("student_init: reusing %s", path)
            return str(path)
        log.warning(
            "student_init: %s was made with other settings (student sizes, seed, tokenizer or "
            "student SFT changed); rebuilding it",
            path,
        )
    student = starting_student(cfg, tok, train_ex)
    shutil.rmtree(path, ignore_errors=True)
    models.save_model(student, tok, path)
    stamp.write_text(recipe + "\n", encoding="utf-8")
    log.info(
        "student_init: saved the starting student (%d params, %d epochs of SFT) to %s",
        models.count_parameters(student),
        cfg.sft.student_epochs,
        path,
    )
    return str(path)


def model_paths(cfg: Config, tok, train_ex, out: Path, fingerprint: str) -> dict[str, str | None]:
    """Folders the actors load (the teacher is trained first when the demo has none yet)."""
    tokenizer = cfg.tokenizer.name_or_path or cfg.teacher.name_or_path or str(out / "tokenizer")
    teacher = None
    if needs_teacher(cfg.scoring):
        get_teacher(cfg, tok, train_ex, out)  # trains and saves the demo teacher when missing
        teacher = cfg.teacher.name_or_path or str(out / "teacher")
    recipe = student_recipe(cfg, model_id(tokenizer), fingerprint)
    student_init = save_student_init(cfg, tok, train_ex, out, recipe)
    scorer = {"student": student_init, "teacher": teacher}.get(cfg.scoring.scorer)
    return {
        "tokenizer": tokenizer,
        "teacher": teacher,
        "student_init": student_init,
        "scorer": scorer or cfg.scoring.scorer,
    }


def answer_budget(cfg: Config, scorer: str) -> int:
    """New tokens of the ROUGE signal's answers: scoring.max_new_tokens clamped to the
    scorer's positions left after the longest allowed prompt (`evaluation.new_token_budget`,
    the rule of every generation), with one notice line when clamped."""
    sig = cfg.scoring
    if "rouge" not in sig.signals:
        return sig.max_new_tokens
    remote = (cfg.teacher if sig.scorer == "teacher" else cfg.student).trust_remote_code
    hf_cfg = transformers.AutoConfig.from_pretrained(scorer, trust_remote_code=remote)
    positions = models.max_positions(hf_cfg)
    try:
        budget = new_token_budget(
            sig.max_new_tokens, positions=positions, max_prompt_length=cfg.data.max_prompt_length
        )
    except ValueError as e:
        raise ScoreJobError(f"scoring: the scorer {scorer}: {e}") from e
    if budget < sig.max_new_tokens:
        print(
            f"scores: scoring.max_new_tokens={sig.max_new_tokens} clamped to {budget}: the "
            f"scorer has {positions} positions and prompts may be data.max_prompt_length="
            f"{cfg.data.max_prompt_length} tokens",
            flush=True,
        )
    return budget


# ---------------------------------------------------------------- accounting and the table


def check_accounting(
    counts: dict[str, int], scored_ids: Sequence[str], train_ids: Sequence[str]
) -> None:
    """Every record read is either rejected, held out, or scored exactly once.

    Raises:
        AccountingError: listing every violated rule, with a few example ids.
    """
    problems = []
    if counts["accepted"] + counts["rejected"] != counts["read"]:
        problems.append(
            f"accepted {counts['accepted']} + rejected {counts['rejected']} != "
            f"read {counts['read']}"
        )
    if counts["scored"] + counts["held_out"] + counts["rejected"] != counts["read"]:
        problems.append(
            f"scored {counts['scored']} + held out {counts['held_out']} + rejected "
            f"{counts['rejected']} != read {counts['read']}"
        )
    ids = pd.Series(list(scored_ids), dtype=object)
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        problems.append(f"{len(dup)} sample ids scored more than once, e.g. {dup[:3]}")
    missing = sorted(set(train_ids) - set(ids))
    if missing:
        problems.append(f"{len(missing)} training samples never scored, e.g. {missing[:3]}")
    extra = sorted(set(ids) - set(train_ids))
    if extra:
        problems.append(f"{len(extra)} scored ids are not training samples, e.g. {extra[:3]}")
    if problems:
        raise AccountingError(
            "row accounting failed; the scores table was NOT written:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def build_table(
    scored: pd.DataFrame, train: list[Record], train_ex: list[TokenizedExample], cfg: Config
) -> pd.DataFrame:
    """Join the actors' signals to the tokenised rows, fuse globally, tag stages; easiest first."""
    sig = cfg.scoring
    base = pd.DataFrame(
        {
            "sample_id": [e.sample_id for e in train_ex],
            "response_tokens": [sum(t != IGNORE_INDEX for t in e.labels) for e in train_ex],
            "prompt_length": [e.prompt_length for e in train_ex],
            "input_ids": [e.input_ids for e in train_ex],
            "labels": [e.labels for e in train_ex],
            "references": [list(r.references) for r in train],
        }
    )
    if any("level" in r.extra for r in train):
        base["level"] = pd.array([r.extra.get("level") for r in train], dtype="Int64")
    table = base.merge(scored, on="sample_id", how="left", validate="one_to_one")
    table = difficulty.fuse(table, sig.signals, k=sig.fusion_k)
    sizes = difficulty.stage_sizes(len(table), cfg.curriculum.num_stages, cfg.curriculum.fractions)
    table = difficulty.assign_stages(table, sizes)
    return table.sort_values("difficulty_rank").reset_index(drop=True)


def to_arrow(
    table: pd.DataFrame, signals: Sequence[str], topk: int, cache_taus: Sequence[float] = ()
) -> pa.Table:
    """The scores table with explicit types (int32 token ids; the top-K cache as int32 ids,
    float16 log-probs and float32 tail log-partitions, one fixed-size list per token)."""
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(table["sample_id"].tolist(), pa.string()),
        "difficulty_rank": pa.array(table["difficulty_rank"].to_numpy(), pa.int64()),
        "stage": pa.array(table["stage"].to_numpy(), pa.int64()),
        "rrf": pa.array(table["rrf"].to_numpy(), pa.float64()),
    }
    for s in signals:
        cols[s] = pa.array(table[s].to_numpy(dtype=np.float64), pa.float64())
    for s in signals:
        cols[f"rank_{s}"] = pa.array(table[f"rank_{s}"].to_numpy(), pa.float64())
    cols["response_tokens"] = pa.array(table["response_tokens"].to_numpy(), pa.int32())
    cols["prompt_length"] = pa.array(table["prompt_length"].to_numpy(), pa.int32())
    if "level" in table.columns:
        cols["level"] = pa.array(table["level"].tolist(), pa.int64())
    cols["input_ids"] = pa.array(table["input_ids"].tolist(), pa.list_(pa.int32()))
    cols["labels"] = pa.array(table["labels"].tolist(), pa.list_(pa.int32()))
    cols["references"] = pa.array(table["references"].tolist(), pa.list_(pa.string()))
    if topk > 0:
        from pocl_ray.ray_data import decode_topk
        from pocl_ray.train_step import TOPK_CACHE

        j = len(cache_taus)
        rows = [decode_topk(*parts, topk, j) for parts in zip(*(table[c] for c in TOPK_CACHE))]
        offsets = np.concatenate([[0], np.cumsum([len(r[0]) for r in rows])]).astype(np.int32)
        types = (pa.int32(), pa.float16(), pa.float32())
        for part, (name, typ, width) in enumerate(zip(TOPK_CACHE, types, (topk, topk, j))):
            flat = np.concatenate([r[part].reshape(-1) for r in rows])
            values = pa.FixedSizeListArray.from_arrays(pa.array(flat, typ), width)
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.table(cols)


def read_scores(out_dir: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The scores table of a run directory, easiest first (pandas)."""
    path = Path(out_dir) / "scores" / TABLE_DIR
    return pd.read_parquet(path, columns=list(columns) if columns else None)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / "scores" / "manifest.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- idempotency


def _key(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "config_hash": manifest["config_hash"],
        "data_fingerprint": manifest["data_fingerprint"],
        "models": {k: v["id"] if v else None for k, v in manifest["models"].items()},
    }


def _reuse_verdict(scores: Path, key: dict[str, Any]) -> tuple[bool, str]:
    """(True, why) when `scores/` holds a complete table made from the same inputs."""
    path = scores / "manifest.json"
    if not path.exists():
        return False, "no scores table yet"
    old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("format_version") != FORMAT_VERSION:
        return False, f"the existing table has format {old.get('format_version')}"
    old_key = _key(old)
    changed = []
    for name in ("config_hash", "data_fingerprint"):
        if old_key[name] != key[name]:
            changed.append(f"{name} {old_key[name]} -> {key[name]}")
    for name in sorted(set(old_key["models"]) | set(key["models"])):
        a, b = old_key["models"].get(name), key["models"].get(name)
        if a != b:
            changed.append(f"model {name} {a} -> {b}")
    if changed:
        return False, "inputs changed: " + "; ".join(changed)
    table = scores / TABLE_DIR / TABLE_FILE
    if not table.exists() or pq.ParquetFile(table).metadata.num_rows != old["counts"]["scored"]:
        return False, f"{table} is missing or incomplete"
    return True, f"config hash {key['config_hash']} and data {key['data_fingerprint']} match"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished table in; readers never see a half-written `scores/`."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


# ---------------------------------------------------------------- Ray


def connect_ray(cfg: Config) -> bool:
    """Use the running Ray instance, the cluster in RAY_ADDRESS, or start a local one on
    loopback. Returns True when this call connected (so the job disconnects at the end)."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        # Read when ray is imported: the node address becomes 127.0.0.1 and every peer is
        # loopback (ray-notes.md). Single-node only, which a local Ray is.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    t0 = time.perf_counter()
    if not local:
        ray.init()
        log.info("ray: connected to %s", os.environ["RAY_ADDRESS"])
        return True
    sig = cfg.scoring
    # One logical CPU beyond the actors' so Ray Data's own tasks never starve (ray-notes.md).
    num_cpus = max(os.cpu_count() or 1, math.ceil(sig.num_actors * sig.cpus_per_actor) + 1)
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1")
    log.info(
        "ray: started a local instance (%d logical CPUs, dashboard on 127.0.0.1) in %.1f s",
        num_cpus,
        time.perf_counter() - t0,
    )
    return True


# ---------------------------------------------------------------- the job


def main(cfg: Config, *, force: bool = False, fault: dict[str, Any] | None = None) -> Path:
    """Run the scoring job; returns the `scores/` folder.

    Args:
        cfg: the run config.
        force: rescore even when a matching table exists.
        fault: tests only: passed to every `ScorerActor` (see its docstring).

    Raises:
        ResourceRequestError: the actors ask for CPUs/GPUs the cluster does not have.
        AccountingError: rows were lost or duplicated; nothing is written.
    """
    started = connect_ray(cfg)
    try:
        return _run(cfg, force=force, fault=fault)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(cfg: Config, *, force: bool, fault: dict[str, Any] | None) -> Path:
    import ray

    from pocl_ray import ray_data

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    sig = cfg.scoring
    resources = ray.cluster_resources()
    check_resources(sig, resources)  # before any work: a bad request would hang

    out = Path(cfg.run.output_dir)
    scores_dir = out / "scores"
    save_resolved(cfg, out)
    loaded = load_task_records(cfg, out)
    train, held = split_train_eval(loaded.records, cfg.data.eval_fraction, seed=cfg.run.seed)
    counts = {
        "read": loaded.n_read,
        "accepted": loaded.n_accepted,
        "rejected": len(loaded.rejected),
        "train": len(train),
        "held_out": len(held),
    }
    log.info(
        "data: %d read, %d accepted, %d rejected; scoring the %d training records (%d held out)",
        *(counts[k] for k in ("read", "accepted", "rejected", "train", "held_out")),
    )
    if not train:
        raise ScoreJobError(
            "no training records left after holding out data.eval_fraction="
            f"{cfg.data.eval_fraction} of {len(loaded.records)}; lower it or add data"
        )
    tok = get_tokenizer(cfg, train, out)
    lengths = dict(max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length)
    train_ex = core_tokenize(train, tok, **lengths).examples
    timings["load_tokenize_s"] = time.perf_counter() - t_start

    if sig.teacher_topk > len(tok):
        raise ScoreJobError(
            f"scoring.teacher_topk={sig.teacher_topk} exceeds the vocabulary ({len(tok)} "
            "tokens); lower it"
        )
    fingerprint = data_fingerprint(loaded)
    t0 = time.perf_counter()
    paths = model_paths(cfg, tok, train_ex, out, fingerprint)
    timings["models_s"] = time.perf_counter() - t0
    ids = {k: model_id(v) if v else None for k, v in paths.items()}
    key = {
        "config_hash": config_hash(cfg),
        "data_fingerprint": fingerprint,
        "models": ids,
    }
    reuse, why = _reuse_verdict(scores_dir, key)
    if reuse and not force:
        print(f"scores: reusing the existing table in {scores_dir} ({why}); --force rescores")
        return scores_dir
    if force:
        log.info("scores: --force given; rescoring into %s", scores_dir)
    elif (scores_dir / "manifest.json").exists():
        log.warning("scores: %s; rescoring and replacing %s", why, scores_dir)

    # ---- Ray: score the training rows on the actor pool
    t0 = time.perf_counter()
    rows = ray_data.example_rows(train_ex, [r.references for r in train])
    ds = ray_data.scoring_dataset(rows, sig.batch_size)
    scored = ray_data.score_rows(
        ds,
        config=to_dict(cfg),  # the one place the config crosses into Ray workers
        paths={k: paths[k] for k in ("tokenizer", "scorer", "teacher")},
        scoring=sig,
        max_new_tokens=answer_budget(cfg, str(paths["scorer"])),
        fault=fault,
    )
    timings["scoring_s"] = time.perf_counter() - t0
    counts["scored"] = len(scored)
    check_accounting(counts, scored["sample_id"].tolist(), [e.sample_id for e in train_ex])

    t0 = time.perf_counter()
    table = build_table(scored, train, train_ex, cfg)
    rho, rho_by_signal = None, None
    if "level" in table.columns and table["level"].notna().all():
        rho = _finite(spearman(table["difficulty_rank"], table["level"]))
        # per signal too: which measurer agrees with the generator's difficulty (a signal that
        # is constant, e.g. rouge of an untrained scorer, has no correlation: null)
        rho_by_signal = {
            s: _finite(spearman(table[f"rank_{s}"], table["level"])) for s in sig.signals
        }
        log.info(
            "measurer quality: Spearman(difficulty_rank, true level) = %s; per signal %s",
            None if rho is None else round(rho, 3),
            {s: None if v is None else round(v, 3) for s, v in rho_by_signal.items()},
        )
    means = {s: float(table[s].mean()) for s in sig.signals}
    tmp = out / f".scores.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / TABLE_DIR).mkdir(parents=True)
    arrow = to_arrow(table, sig.signals, sig.teacher_topk, sig.cache_taus)
    pq.write_table(arrow, tmp / TABLE_DIR / TABLE_FILE)
    timings["fuse_write_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **key,
        "models": {k: {"path": v, "id": ids[k]} if v else None for k, v in paths.items()},
        "signals": list(sig.signals),
        "fusion_k": sig.fusion_k,
        "scorer": sig.scorer,
        "teacher_topk": sig.teacher_topk,
        "cache_taus": list(sig.cache_taus) if sig.teacher_topk > 0 else None,
        "stage_sizes": difficulty.stage_sizes(
            len(table), cfg.curriculum.num_stages, cfg.curriculum.fractions
        ),
        "counts": counts,
        "signal_means": means,
        "spearman_rank_vs_level": rho,
        "spearman_signal_rank_vs_level": rho_by_signal,
        "table": {"path": TABLE_DIR, "files": [TABLE_FILE], "rows": len(table)},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "throughput_rows_per_s": round(len(table) / timings["scoring_s"], 2),
        "ray": {
            "version": ray.__version__,
            "num_actors": sig.num_actors,
            "cpus_per_actor": sig.cpus_per_actor,
            "gpus_per_actor": sig.gpus_per_actor,
            "batch_size": sig.batch_size,
            "cluster_resources": {k: resources[k] for k in ("CPU", "GPU") if k in resources},
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "pyarrow": pa.__version__,
        },
        "hashed_config": hashed_config(cfg),
        "config": to_dict(cfg),
    }
    (tmp / "manifest.json").write_text(
        json.dumps(manifest, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    replace_dir(tmp, scores_dir)
    mean_text = " ".join(f"{s}={v:.3f}" for s, v in means.items())
    rho_text = "" if rho is None else f"; Spearman(rank, level)={rho:.3f}"
    print(
        f"scores: {len(table)} rows in {timings['scoring_s']:.1f} s "
        f"({len(table) / timings['scoring_s']:.1f} rows/s); means {mean_text}{rho_text} "
        f"-> {scores_dir}"
    )
    return scores_dir


if __name__ == "__main__":
    from pocl_ray.cli import main as cli_main

    sys.exit(cli_main(["score", *sys.argv[1:]]))
