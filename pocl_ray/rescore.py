"""Re-scoring between stages (`curriculum.rescore`): the files of each round and the
re-ranking. The distill job drives it (jobs/distill.py): train a stage, score the samples no
stage has used yet with the student as it is then, re-rank them, train the next stage.

Files, in the run's output folder:
  rescore/student_stage<s>/  the student at the end of stage s (what round s + 1 scores with)
  rescore/round<r>.parquet   round r (after stage r - 1): sample_id, every signal, the
                             difficulty_rank among the scored samples, easiest first
Every round is kept; a resumed run reads them back, so it trains on the same stages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pocl_ray import difficulty


def folder(out: str | Path) -> Path:
    return Path(out) / "rescore"


def student_folder(out: str | Path, stage: int) -> Path:
    return folder(out) / f"student_stage{stage}"


def round_path(out: str | Path, r: int) -> Path:
    return folder(out) / f"round{r}.parquet"


def read_rounds(out: str | Path, upto: int) -> list[list[str]]:
    """The sample ids of rounds 1..upto, each easiest first; stops at the first missing one."""
    rounds = []
    for r in range(1, upto + 1):
        path = round_path(out, r)
        if not path.exists():
            break
        rounds.append(pd.read_parquet(path, columns=["sample_id"])["sample_id"].tolist())
    return rounds


def unseen(order_ids: Sequence[str], sizes: Sequence[int], stage: int) -> list[str]:
    """The samples that no stage up to `stage` has used (the curriculum order's tail)."""
    return list(order_ids[sizes[stage] :])


def write_round(
    out: str | Path, r: int, scored: pd.DataFrame, signals: Sequence[str], k: int
) -> list[str]:
    """Fuse round r's signals (reciprocal rank fusion over the scored samples only), write
    round<r>.parquet atomically, return its sample ids easiest first."""
    table = difficulty.fuse(scored[["sample_id", *signals]].copy(), signals, k=k)
    table = table.sort_values("difficulty_rank", kind="stable").reset_index(drop=True)
    table.insert(1, "round", r)
    path = round_path(out, r)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return table["sample_id"].tolist()
