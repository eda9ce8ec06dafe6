"""Ray Data adapter: difficulty scoring with a pool of stateful actors (`map_batches`).

The maths lives in the core (`pocl_ray.signals.score_batch`); this module only moves rows to
actors and back. Ray-specific lines are marked `# ray:`.

- `scoring_dataset` turns tokenised rows into a Ray dataset whose blocks are exactly one scoring
  batch each, sorted by length then sample id: batch composition (and so padding, hence every
  float) depends only on the set of rows, never on file order or on Ray's scheduling.
- `ScorerActor` loads the scorer (and the teacher when a signal or the top-K cache needs it)
  ONCE from saved folders (safetensors), then scores one batch per call.
- `scored_dataset` maps the dataset through a pool of those actors; `score_rows` runs it and
  collects one pandas row per input row on the driver.

The config crosses into the actors as a plain dict (`config.to_dict`) and is rebuilt with
`config.from_dict` in exactly one place: `ScorerActor.__init__`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray  # ray: this module is an adapter; the core never imports ray
import torch

from pocl_ray import models
from pocl_ray.config import Config, ModelConfig, ScoringConfig, from_dict
from pocl_ray.data import IGNORE_INDEX, TokenizedExample, collate
from pocl_ray.signals import score_batch

MAX_ACTOR_RESTARTS = 3
"""A scoring actor that dies (OOM, preemption, node loss) is restarted this many times."""
MAX_TASK_RETRIES = 3
"""A batch whose actor died is retried on the restarted actor this many times."""
TOPK_IDS = "teacher_topk_ids"
TOPK_LOGITS = "teacher_topk_logits"


# ---------------------------------------------------------------- rows → dataset


def example_rows(
    examples: Sequence[TokenizedExample], references: Sequence[Sequence[str]]
) -> pd.DataFrame:
    """The columns the actors need, one row per example (a plain pandas DataFrame)."""
    return pd.DataFrame(
        {
            "sample_id": [e.sample_id for e in examples],
            "input_ids": [list(e.input_ids) for e in examples],
            "labels": [list(e.labels) for e in examples],
            "prompt_length": [e.prompt_length for e in examples],
            "references": [list(r) for r in references],
        }
    )


def scoring_batches(rows: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Rows sorted by (length, sample_id) and cut into batches of `batch_size` rows.

    Similar lengths share a batch (little padding), and which rows share a batch depends only
    on the set of rows: every run pads each row the same way, so the scores are reproducible.
    """
    order = pd.DataFrame(
        {"n": rows["input_ids"].map(len).to_numpy(), "id": rows["sample_id"].to_numpy()}
    ).sort_values(["n", "id"], kind="stable")
    rows = rows.iloc[order.index.to_numpy()].reset_index(drop=True)
    return [rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def scoring_dataset(rows: pd.DataFrame, batch_size: int) -> ray.data.Dataset:
    """A Ray dataset with one block per scoring batch (see `scoring_batches`)."""
    # ray: one block per batch; with map_batches(batch_size=batch_size) each call gets one block
    return ray.data.from_pandas(scoring_batches(rows, batch_size))


# ---------------------------------------------------------------- the actor


def teacher_topk(
    teacher: torch.nn.Module, batch: dict[str, torch.Tensor], k: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The teacher's top-k next-token logits at every response position.

    Args:
        teacher: a causal LM.
        batch: from `collate` (right padded): input_ids, attention_mask, labels (B, L).
        k: how many entries to keep per position.

    Returns:
        B pairs (ids, logits), each of shape (R_b, k), R_b = that row's response tokens:
        row j holds the distribution that predicts the j-th response token (the logits at the
        position before it), ids int32, raw T = 1 logits float16, sorted by logit descending.
    """
    with torch.no_grad():
        logits = teacher(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits[:, :-1]
        mask = (batch["labels"][:, 1:] != IGNORE_INDEX).cpu()
        values, ids = logits.float().topk(k, dim=-1)
    values, ids = values.cpu(), ids.cpu()
    return [
        (ids[b][mask[b]].to(torch.int32).numpy(), values[b][mask[b]].to(torch.float16).numpy())
        for b in range(ids.shape[0])
    ]


class ScorerActor:
    """Holds the scorer (and teacher) for the whole run; `__call__` scores one batch.

    Args:
        config: `to_dict(cfg)` of the run config; rebuilt and validated here.
        paths: saved folders (or hub names): `tokenizer`, `scorer`, and `teacher` (or None).
        num_threads: torch intra-op threads in this actor (match its CPU request).
        fault: tests only: {"batch": N, "marker": path} makes the actor exit hard on its N-th
            batch when `marker` does not exist yet (creating it first), so the restarted actor
            carries on.
    """

    def __init__(
        self,
        *,
        config: dict[str, Any],
        paths: dict[str, str | None],
        num_threads: int = 1,
        fault: dict[str, Any] | None = None,
    ):
        cfg: Config = from_dict(config, source="scoring actor config")
        torch.set_num_threads(num_threads)
        self.scoring = cfg.scoring
        self.device = torch.device(
            "cuda" if cfg.scoring.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        )
        self.tokenizer = _load_tokenizer(cfg, paths["tokenizer"])
        self.teacher = None
        if paths.get("teacher"):
            self.teacher = self._load(paths["teacher"], cfg.teacher)
        if cfg.scoring.scorer == "teacher":
            self.scorer = self.teacher
        else:
            self.scorer = self._load(paths["scorer"], cfg.student)
        self.fault = fault
        self.calls = 0

    def _load(self, path: str, model_cfg: ModelConfig) -> torch.nn.Module:
        model = models.load_pretrained(path, model_cfg)
        return models.freeze_teacher(model).to(self.device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        self.calls += 1
        self._maybe_die()
        examples = [
            TokenizedExample(
                sample_id=sid,
                input_ids=[int(t) for t in ids],
                labels=[int(t) for t in labels],
                prompt_length=int(plen),
                prompt_truncated=False,
                response_truncated=False,
            )
            for sid, ids, labels, plen in zip(
                batch["sample_id"], batch["input_ids"], batch["labels"], batch["prompt_length"]
            )
        ]
        references = [[str(r) for r in refs] for refs in batch["references"]]
        got = score_batch(
            examples,
            references,
            signals=self.scoring.signals,
            scorer=self.scorer,
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            max_new_tokens=self.scoring.max_new_tokens,
        )
        out = pd.DataFrame({"sample_id": [e.sample_id for e in examples], **got})
        if self.scoring.teacher_topk > 0:
            collated = collate(examples, self.tokenizer.pad_token_id)
            collated = {k: v.to(self.device) for k, v in collated.items()}
            pairs = teacher_topk(self.teacher, collated, self.scoring.teacher_topk)
            # bytes cross Ray Data unchanged; the driver rebuilds (R, K) arrays with the dtypes
            out[TOPK_IDS] = [ids.tobytes() for ids, _ in pairs]
            out[TOPK_LOGITS] = [vals.tobytes() for _, vals in pairs]
        return out

    def _maybe_die(self) -> None:
        if self.fault is None or self.calls != self.fault["batch"]:
            return
        marker = Path(self.fault["marker"])
        if marker.exists():
            return
        marker.write_text(f"actor pid {os.getpid()} exited on batch {self.calls}\n")
        os._exit(1)


def _load_tokenizer(cfg: Config, path: str | None):
    """The run's tokenizer: pretrained as configured, or the one the driver trained and saved."""
    if cfg.tokenizer.name_or_path or cfg.teacher.name_or_path:
        return models.load_tokenizer(cfg.tokenizer, cfg.teacher)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


# ---------------------------------------------------------------- running the pool


def scored_dataset(
    ds: ray.data.Dataset,
    *,
    config: dict[str, Any],
    paths: dict[str, str | None],
    scoring: ScoringConfig,
    fault: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """`ds` mapped through a pool of `ScorerActor`s (lazy: nothing runs until consumed).

    Output rows: sample_id, one float column per signal, and with teacher_topk > 0 the two
    top-K columns as raw bytes (see `decode_topk`), in no particular order.
    """
    gpu = {"num_gpus": scoring.gpus_per_actor} if scoring.gpus_per_actor > 0 else {}
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts / max_task_retries and flags every
        # other remote arg as deprecated. Without them Ray Data restarts dead actors and
        # retries their batches forever, so a batch that always kills its actor would loop
        # silently; finite limits make it fail. (pyproject pins ray < 2.61.)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(  # ray: a fixed-size pool of stateful actors
            ScorerActor,
            fn_constructor_kwargs=dict(
                config=config,
                paths=paths,
                num_threads=max(1, math.floor(scoring.cpus_per_actor)),
                fault=fault,
            ),
            batch_size=scoring.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=scoring.num_actors),
            num_cpus=scoring.cpus_per_actor,
            max_restarts=MAX_ACTOR_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
            **gpu,
        )


def score_rows(ds: ray.data.Dataset, **kwargs: Any) -> pd.DataFrame:
    """Run `scored_dataset(ds, **kwargs)` and collect it on the driver: one row per input row."""
    return scored_dataset(ds, **kwargs).to_pandas()


def decode_topk(ids: bytes, logits: bytes, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (R, k) int32 ids and float16 logits of one row, from the actor's bytes."""
    return (
        np.frombuffer(ids, dtype=np.int32).reshape(-1, k),
        np.frombuffer(logits, dtype=np.float16).reshape(-1, k),
    )
