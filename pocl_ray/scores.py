"""The scores table: its schema, how it is built, written, read and checked.

`scores/table/part-00000.parquet` holds one row per training sample, easiest first:
sample_id, difficulty_rank, stage, rrf, one column per signal and its rank (rank_<signal>),
response_tokens, prompt_length, level (built-in tasks only), input_ids, labels, references,
and with scoring.teacher_topk = K > 0 the teacher cache (`TOPK_CACHE`, one entry per
response token). `scores/manifest.json` says what the table was made from (docs/scoring.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pocl_ray import curriculum, difficulty
from pocl_ray.config import POOL_EXECUTION_KEYS, Config, ScoringConfig, to_dict
from pocl_ray.data import IGNORE_INDEX, Record, TokenizedExample
from pocl_ray.run_dir import RunDir, differences, hash_json, model_id, now_utc, versions

FORMAT_VERSION = 2
TABLE_DIR = "table"
TABLE_FILE = "part-00000.parquet"
EXECUTION_KEYS = POOL_EXECUTION_KEYS
"""Scoring settings left out of the config hash (`config.POOL_EXECUTION_KEYS`)."""
TEACHER_SIGNALS = ("teacher_nll", "kd_gap")

TOPK_IDS = "teacher_topk_ids"
"""Cache column: the teacher's top-K token ids per response token, (R, K) int32 per row."""
TOPK_LOGPROBS = "teacher_topk_logprobs"
"""Cache column: the teacher's T = 1 log-probabilities at those ids, (R, K) float16."""
TOPK_TAIL = "teacher_tail_logz"
"""Cache column: log Σ_{i ∉ top-K} p_i^(1/τ_j) per grid τ_j (scoring.cache_taus), (R, J)
float32: what the loss needs for the teacher's remaining mass at any τ on the grid."""
TOPK_CACHE = (TOPK_IDS, TOPK_LOGPROBS, TOPK_TAIL)
TRAIN_COLUMNS = ["sample_id", "prompt_length", "input_ids", "labels"]
"""What distillation reads of each row (plus the cache when it trains from it)."""


def needs_teacher(scoring: ScoringConfig) -> bool:
    """Whether scoring loads the teacher (a teacher signal, the cache, or as scorer)."""
    return (
        any(s in TEACHER_SIGNALS for s in scoring.signals)
        or scoring.teacher_topk > 0
        or scoring.scorer == "teacher"
    )


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
        "teacher": {k: v for k, v in d["teacher"].items() if k != "dropout"},
        "student": {k: v for k, v in d["student"].items() if k != "dropout"},
        "scoring": {k: v for k, v in d["scoring"].items() if k not in EXECUTION_KEYS},
        "stages": {"num_stages": cfg.curriculum.num_stages, "fractions": cfg.curriculum.fractions},
        "seed": cfg.run.seed,
    }


def config_hash(cfg: Config) -> str:
    return hash_json(hashed_config(cfg))


def table_key(cfg: Config, fingerprint: str, models: Mapping[str, str | None]) -> dict[str, Any]:
    """What a table is made from: the config hash, the data fingerprint, and the content id
    of each model folder it used (name -> folder, None for one it did not need)."""
    return {
        "config_hash": config_hash(cfg),
        "data_fingerprint": fingerprint,
        "models": {name: model_id(path) if path else None for name, path in models.items()},
    }


# ---------------------------------------------------------------- building the table


def accounting_problems(
    counts: dict[str, int], scored_ids: Sequence[str], train_ids: Sequence[str]
) -> list[str]:
    """Every violated rule of "each record read is rejected, held out, or scored exactly
    once", with a few example ids (empty = the books balance)."""
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
    return problems


def build_table(
    scored: pd.DataFrame, train: list[Record], train_ex: list[TokenizedExample], cfg: Config
) -> pd.DataFrame:
    """Join the signals to the tokenised rows, fuse globally, tag stages; easiest first."""
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


def spearman(a, b) -> float:
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def measurer_quality(table: pd.DataFrame, signals: Sequence[str]) -> dict[str, Any] | None:
    """Spearman ρ of the fused rank and of each signal's rank with the tasks' true level
    (built-in tasks only; None otherwise). A constant signal has no correlation: None."""
    if "level" not in table.columns or not table["level"].notna().all():
        return None

    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "fused": finite(spearman(table["difficulty_rank"], table["level"])),
        "signals": {s: finite(spearman(table[f"rank_{s}"], table["level"])) for s in signals},
    }


def format_quality(quality: dict[str, Any]) -> str:
    """`measurer_quality` in one line: fused, then each signal (n/a = constant)."""

    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    each = ", ".join(f"{s} {show(v)}" for s, v in quality["signals"].items())
    return f"fused {show(quality['fused'])} (by signal: {each})"


# ---------------------------------------------------------------- the cache codec


def encode_cache(rows: Sequence[tuple[np.ndarray, ...]]) -> dict[str, list[bytes]]:
    """Per-row cache arrays (ids, log-probs, tail) as raw bytes per column: they cross Ray
    Data unchanged, and `decode_cache` rebuilds the arrays with their dtypes."""
    return {name: [row[i].tobytes() for row in rows] for i, name in enumerate(TOPK_CACHE)}


def decode_cache(
    ids: bytes, logprobs: bytes, tail: bytes, k: int, j: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's cache from its bytes: (R, k) int32 ids, (R, k) float16 log-probs, (R, j)
    float32 tail log-partitions (core `signals.teacher_topk`)."""
    return (
        np.frombuffer(ids, dtype=np.int32).reshape(-1, k),
        np.frombuffer(logprobs, dtype=np.float16).reshape(-1, k),
        np.frombuffer(tail, dtype=np.float32).reshape(-1, j),
    )


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
        j = len(cache_taus)
        rows = [decode_cache(*parts, topk, j) for parts in zip(*(table[c] for c in TOPK_CACHE))]
        offsets = np.concatenate([[0], np.cumsum([len(r[0]) for r in rows])]).astype(np.int32)
        types = (pa.int32(), pa.float16(), pa.float32())
        for part, (name, typ, width) in enumerate(zip(TOPK_CACHE, types, (topk, topk, j))):
            flat = np.concatenate([r[part].reshape(-1) for r in rows])
            values = pa.FixedSizeListArray.from_arrays(pa.array(flat, typ), width)
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets), values)
    return pa.table(cols)


def column_values(col: pa.Array | pa.ChunkedArray) -> list:
    """Python values of one column; the cache's lists of fixed-size lists (`to_arrow`) become
    (R, K) (or (R, J)) numpy arrays of the stored dtype."""
    if pa.types.is_list(col.type) and pa.types.is_fixed_size_list(col.type.value_type):
        k = col.type.value_type.list_size
        rows = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        return [
            np.asarray(row.values.flatten().to_numpy(zero_copy_only=False)).reshape(-1, k)
            for row in rows
        ]
    return col.to_pylist()


def arrow_rows(table: pa.Table | pa.RecordBatch) -> list[dict[str, Any]]:
    """The table's rows as dicts of `column_values` (what `train_step.table_batch` takes)."""
    cols = {c: column_values(table.column(c)) for c in table.column_names}
    return [{c: v[i] for c, v in cols.items()} for i in range(table.num_rows)]


# ---------------------------------------------------------------- reading it back


def read_scores(run: RunDir, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The scores table of a run directory, easiest first (pandas)."""
    return pd.read_parquet(run.scores / TABLE_DIR, columns=list(columns) if columns else None)


def table_rows(run: RunDir) -> int:
    """Rows in the table file (0 when it is missing)."""
    path = run.scores / TABLE_DIR / TABLE_FILE
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def training_table(cfg: Config, run: RunDir, *, cached: bool) -> pa.Table:
    """The training columns in table order, plus `difficulty_rank` and each row's difficulty
    bucket (its stage in the pocl partition, whatever the curriculum mode)."""
    cols = TRAIN_COLUMNS + ["difficulty_rank"] + (list(TOPK_CACHE) if cached else [])
    table = pq.read_table(run.scores / TABLE_DIR, columns=cols)
    cur = cfg.curriculum
    sizes = difficulty.stage_sizes(table.num_rows, cur.num_stages, cur.fractions)
    buckets = curriculum.difficulty_buckets(table.column("difficulty_rank").to_numpy(), sizes)
    return table.append_column("bucket", pa.array(buckets, pa.int64()))


def table_problems(cfg: Config, manifest: dict[str, Any], key_now: dict[str, Any]) -> list[str]:
    """Why the scores table does not fit this run (empty = it fits).

    Compared: the format, every hashed config field that shapes the table except the stage
    cut (distillation re-derives its stages from the ranks, so num_stages / fractions may
    differ), the data fingerprint, and the model folders' content ids (`key_now`: the
    manifest's key recomputed from the inputs as they are now).
    """
    if manifest.get("format_version") != FORMAT_VERSION:
        return [f"table format {manifest.get('format_version')}, expected {FORMAT_VERSION}"]
    ours = {k: v for k, v in hashed_config(cfg).items() if k != "stages"}
    theirs = {k: v for k, v in manifest["hashed_config"].items() if k != "stages"}
    out = [
        f"{key}: the table was made with {a!r}, this config has {b!r}"
        for key, a, b in differences(theirs, ours)
    ]
    key = manifest["key"]
    if key["data_fingerprint"] != key_now["data_fingerprint"]:
        out.append(
            f"data: fingerprint {key['data_fingerprint']} in the table, "
            f"{key_now['data_fingerprint']} now (the records changed)"
        )
    for name, recorded in key["models"].items():
        now = key_now["models"].get(name)
        if recorded is not None and now is not None and now != recorded:
            out.append(f"{name}: changed since scoring (id {recorded} in the table, {now} now)")
    return out


def manifest(
    cfg: Config,
    table: pd.DataFrame,
    *,
    key: dict[str, Any],
    paths: Mapping[str, str | None],
    counts: dict[str, int],
    answer_tokens: int,
    seconds: dict[str, float],
    ray: dict[str, Any],
) -> dict[str, Any]:
    """`scores/manifest.json`: what the table was made from (the reuse `key`, the hashed
    config, the model paths), what it holds (counts, stage sizes, signal means, the measurer's
    agreement with the true level), and how it was made (timings, Ray, versions)."""
    sig = cfg.scoring
    return {
        "format_version": FORMAT_VERSION,
        "created": now_utc(),
        "key": key,
        "model_paths": dict(paths),
        "signals": list(sig.signals),
        "teacher_topk": sig.teacher_topk,
        "cache_taus": list(sig.cache_taus) if sig.teacher_topk > 0 else None,
        "answer_tokens": answer_tokens,
        "stage_sizes": difficulty.stage_sizes(
            len(table), cfg.curriculum.num_stages, cfg.curriculum.fractions
        ),
        "counts": counts,
        "signal_means": {s: float(table[s].mean()) for s in sig.signals},
        "measurer_quality": measurer_quality(table, sig.signals),
        "table": {"path": TABLE_DIR, "files": [TABLE_FILE], "rows": len(table)},
        "timings_s": {k: round(v, 3) for k, v in seconds.items()},
        "throughput_rows_per_s": round(len(table) / seconds["scoring"], 2),
        "ray": {
            **ray,
            "num_actors": sig.num_actors,
            "cpus_per_actor": sig.cpus_per_actor,
            "gpus_per_actor": sig.gpus_per_actor,
            "batch_size": sig.batch_size,
        },
        "versions": versions(),
        "hashed_config": hashed_config(cfg),
        "config": to_dict(cfg),
    }
