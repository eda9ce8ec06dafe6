"""Ray Data adapter: difficulty scoring and evaluation generation on pools of stateful actors
(`map_batches`). Ray-specific lines are marked `# ray:`.

The maths lives in the core (`signals.score_batch`; `evaluation.generate`, `rouge_l`,
`exact_match`); this module moves rows to actors and back:
- `scoring_blocks` cuts tokenised rows into blocks of exactly one scoring batch, sorted by
  length then sample id: batch composition (so padding, so every float) depends only on the
  set of rows, never on file order or on Ray's scheduling; `ScorerActor` loads the scorer
  (and the teacher) once and scores one batch per call;
- `generation_blocks` does the same for (set, example, seed) rows; `GeneratorActor` loads
  every evaluated model once and answers each row with each (sampling seeded per row);
- `actor_pool` is the one pool builder both use; `answer_blocks` runs the blocks through a
  pool and gathers the rows, starting a new pool for the blocks a lost node left unanswered.

The config crosses into the actors as a plain dict (`config.to_dict`) and is rebuilt with
`config.from_dict` in exactly one place per actor class (its `__init__`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import ray  # ray: this module is an adapter; the core never imports ray
import torch
from transformers.utils import logging as hf_logging

from pocl_ray import models, storage
from pocl_ray.config import Config, EvalConfig, ModelConfig, ScoringConfig, from_dict
from pocl_ray.data import Record, TokenizedExample, example_from_row
from pocl_ray.evaluation import (
    exact_match,
    generate,
    rouge_l,
    row_seed,
    sample_generate,
)
from pocl_ray.scores import encode_cache
from pocl_ray.signals import score_batch

log = logging.getLogger("pocl_ray.ray_data")

MAX_ACTOR_RESTARTS = 3
"""An actor that dies (OOM, preemption, node loss) is restarted this many times."""
MAX_TASK_RETRIES = 3
"""A batch whose actor died is retried on the restarted actor this many times."""


def actor_pool(
    ds: ray.data.Dataset,
    actor: type,
    constructor: dict[str, Any],
    *,
    batch_size: int,
    num_actors: int,
    cpus: float,
    gpus: float,
    accelerator_type: str | None = None,
    resources: dict[str, float] | None = None,
) -> ray.data.Dataset:
    """`ds` mapped through a fixed pool of `num_actors` stateful `actor`s, each with `cpus` /
    `gpus` (of `accelerator_type`, and custom `resources`) and torch on floor(cpus) threads
    (lazy: nothing runs until consumed)."""
    gpu = {"num_gpus": gpus} if gpus > 0 else {}
    if accelerator_type:
        gpu["accelerator_type"] = accelerator_type
    if resources:
        gpu["resources"] = dict(resources)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts / max_task_retries and flags every
        # other remote arg as deprecated. Without them Ray Data restarts dead actors and
        # retries their batches forever, so a batch that always kills its actor would loop
        # silently; finite limits make it fail. (pyproject pins ray < 2.61.)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(  # ray: a fixed-size pool of stateful actors
            actor,
            fn_constructor_kwargs={**constructor, "num_threads": max(1, math.floor(cpus))},
            batch_size=batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=cpus,
            max_restarts=MAX_ACTOR_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
            **gpu,
        )


def section_pool(
    section: ScoringConfig | EvalConfig, actor: type, constructor: dict[str, Any]
) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """`actor_pool` sized and placed by config section `section` (scoring or eval)."""
    return lambda ds: actor_pool(
        ds, actor, constructor, batch_size=section.batch_size, num_actors=section.num_actors,
        cpus=section.cpus_per_actor, gpus=section.gpus_per_actor,
        accelerator_type=section.accelerator_type, resources=section.resources,
    )  # fmt: skip


POOL_ATTEMPTS = 3
"""Pools started in all for one table: after a failure of the cluster (a node lost with an
actor on it: Ray Data gives up on `ActorUnavailableError`), a new pool answers the blocks
that have no output yet."""
CLUSTER_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                  ray.exceptions.NodeDiedError)  # fmt: skip


def answer_blocks(
    blocks: list[pd.DataFrame],
    pool: Callable[[ray.data.Dataset], ray.data.Dataset],
    *,
    key: list[str],
    what: str,
) -> pd.DataFrame:
    """Every block through `pool` (one block = one actor call, answered whole or not at
    all), gathered on the driver as each is done (in no particular order), so an answered
    block no longer depends on the node that made it. When the pool fails for a reason of
    the cluster, the answered blocks are kept and a new pool answers the others, up to
    POOL_ATTEMPTS pools: no row is lost or answered twice (`key`: the columns that name an
    input row in the output). Any other error is raised at once."""
    done: list[pd.DataFrame] = []
    left = blocks
    for attempt in range(1, POOL_ATTEMPTS + 1):
        try:
            ds = pool(ray.data.from_pandas(left))  # ray:
            done.extend(ds.iter_batches(batch_size=None, batch_format="pandas"))
            break
        except CLUSTER_ERRORS as e:
            done, left = _keep_answered(done, left, key)
            if attempt == POOL_ATTEMPTS:
                raise
            log.warning(
                "%s: the pool failed (%s: %s); %d of %d batches are answered and kept; a new "
                "pool answers the %d left (pool %d of %d)", what, type(e).__name__,
                str(e).splitlines()[0][:200], len(blocks) - len(left), len(blocks), len(left),
                attempt + 1, POOL_ATTEMPTS,
            )  # fmt: skip
    return pd.concat(done, ignore_index=True)


def _keep_answered(
    done: list[pd.DataFrame], blocks: list[pd.DataFrame], key: list[str]
) -> tuple[list[pd.DataFrame], list[pd.DataFrame]]:
    """(outputs of the fully answered blocks, the blocks not fully answered)."""
    answered = set(pd.concat(done)[key].itertuples(index=False)) if done else set()
    left = [b for b in blocks if not set(b[key].itertuples(index=False)) <= answered]
    redo = set().union(*(set(b[key].itertuples(index=False)) for b in left)) if left else set()
    kept = [d[[k not in redo for k in d[key].itertuples(index=False)]] for d in done]
    return [d for d in kept if len(d)], left


def sorted_blocks(rows: pd.DataFrame, keys: dict[str, pd.Series], size: int) -> list[pd.DataFrame]:
    """`rows` sorted by `keys` (stable) and cut into blocks of `size` rows: as a Ray dataset
    with map_batches(batch_size=size) each actor call gets exactly one block, and which rows
    share a batch depends only on the set of rows."""
    order = pd.DataFrame({k: v.to_numpy() for k, v in keys.items()})
    order = order.sort_values(list(keys), kind="stable")
    rows = rows.iloc[order.index.to_numpy()].reset_index(drop=True)
    return [rows.iloc[i : i + size] for i in range(0, len(rows), size)]


def _device(gpus: float) -> torch.device:
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- scoring


def example_rows(
    examples: Sequence[TokenizedExample], references: Sequence[Sequence[str]]
) -> pd.DataFrame:
    """The columns the scoring actors need, one row per example."""
    return pd.DataFrame(
        {
            "sample_id": [e.sample_id for e in examples],
            "input_ids": [list(e.input_ids) for e in examples],
            "labels": [list(e.labels) for e in examples],
            "prompt_length": [e.prompt_length for e in examples],
            "response_truncated": [e.response_truncated for e in examples],
            "references": [list(r) for r in references],
        }
    )


def scoring_blocks(rows: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """The scoring batches: rows sorted by (length, sample_id), so little padding."""
    keys = {"n": rows["input_ids"].map(len), "id": rows["sample_id"]}
    return sorted_blocks(rows, keys, batch_size)




class ScorerActor:
    """Holds the scorer (and teacher) for the whole run; `__call__` scores one batch.

    Args:
        config: `to_dict(cfg)` of the run config; rebuilt and validated here.
        paths: saved folders (or hub names): `tokenizer`, `scorer`, and `teacher` (or None).
        max_new_tokens: the rouge answers' budget (`evaluation.answer_budget`).
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
        max_new_tokens: int,
        num_threads: int = 1,
        fault: dict[str, Any] | None = None,
    ):
        cfg: Config = from_dict(config, source="scoring actor config")
        storage.pull_paths(cfg.run.output_dir, paths.values())  # a run on object storage
        torch.set_num_threads(num_threads)
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per model and actor
        self.scoring, self.max_new_tokens, self.fault = cfg.scoring, max_new_tokens, fault
        self.device = _device(cfg.scoring.gpus_per_actor)
        self.tokenizer = models.load_tokenizer(
            paths["tokenizer"], trust_remote_code=cfg.teacher.trust_remote_code
        )
        self.teacher = None
        if paths["teacher"]:
            self.teacher = self._load(paths["teacher"], cfg.teacher)
        if cfg.scoring.scorer == "teacher":
            self.scorer = self.teacher
        else:
            self.scorer = self._load(paths["scorer"], cfg.student)
        self.calls = 0

    def _load(self, path: str, model_cfg: ModelConfig) -> torch.nn.Module:
        dtype = self.scoring.dtype or model_cfg.dtype  # scoring.dtype overrides for scoring
        model = models.load_pretrained(path, dataclasses.replace(model_cfg, dtype=dtype))
        return models.freeze_teacher(model).to(self.device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        self.calls += 1
        self._maybe_die()
        examples = [example_from_row(row) for _, row in batch.iterrows()]
        references = [[str(r) for r in refs] for refs in batch["references"]]
        got = score_batch(
            examples,
            references,
            signals=self.scoring.signals,
            scorer=self.scorer,
            teacher=self.teacher,
            tokenizer=self.tokenizer,
            max_new_tokens=self.max_new_tokens,
            topk=self.scoring.teacher_topk,
            cache_taus=self.scoring.cache_taus,
        )
        out = pd.DataFrame({"sample_id": [e.sample_id for e in examples], **got.signals})
        if got.cache is not None:
            for name, column in encode_cache(got.cache).items():
                out[name] = column
        return out

    def _maybe_die(self) -> None:
        if self.fault is None or self.calls != self.fault["batch"]:
            return
        marker = Path(self.fault["marker"])
        if marker.exists():
            return
        marker.write_text(f"actor pid {os.getpid()} exited on batch {self.calls}\n")
        os._exit(1)


def score_rows(
    rows: pd.DataFrame,
    *,
    config: dict[str, Any],
    sig: ScoringConfig,
    paths: dict[str, str | None],
    max_new_tokens: int,
    fault: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Score every row (`example_rows`) on the pool of `sig` (the config's scoring section),
    in `scoring_blocks`: sample_id, one float column per signal, and with teacher_topk > 0
    the cache columns as bytes (`scores.decode_cache`)."""
    constructor = {"config": config, "paths": paths, "max_new_tokens": max_new_tokens,
                   "fault": fault}  # fmt: skip
    pool = section_pool(sig, ScorerActor, constructor)
    blocks = scoring_blocks(rows, sig.batch_size)
    return answer_blocks(blocks, pool, key=["sample_id"], what="scoring")


# ---------------------------------------------------------------- evaluation


def generation_rows(sets: dict[str, Sequence[Record]], seeds: Sequence[int]) -> pd.DataFrame:
    """One row per (set, example, seed): the record's fields the actors need.

    Columns: set, index (0-based position in its set), sample_id, seed, instruction, input,
    prompt, references (list of str), source, line.
    """
    rows = [
        {
            "set": name,
            "index": i,
            "sample_id": r.sample_id,
            "seed": int(seed),
            "instruction": r.instruction,
            "input": r.input,
            "prompt": r.prompt,
            "references": list(r.references),
            "source": r.source,
            "line": r.line,
        }
        for name, records in sets.items()
        for i, r in enumerate(records)
        for seed in seeds
    ]
    return pd.DataFrame(rows)


def generation_blocks(rows: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """One block per generation batch, rows sorted by (prompt characters, set, sample_id,
    seed): prompts of similar length share a batch, an example's seeds sit side by side."""
    keys = {"n": rows["prompt"].map(len), "set": rows["set"], "id": rows["sample_id"],
            "seed": rows["seed"]}  # fmt: skip
    return sorted_blocks(rows, keys, batch_size)


def _padding_false_alarm(record: logging.LogRecord) -> bool:
    """Drop transformers' "input_ids may be padded" warning. It fires when a batch has no
    left padding (transformers then drops the all-ones attention mask) and a finished row
    feeds its pad token back: the mask would be all ones anyway, so nothing is wrong."""
    return "input_ids may be padded" not in record.getMessage()


class GeneratorActor:
    """Holds every evaluated model (and its tokenizer) for the whole run; `__call__` answers
    one batch of (set, example, seed) rows with each model and scores the answers.

    Args:
        config: `to_dict(cfg)` of the run config; rebuilt and validated here (the eval section
            gives the decoding settings).
        model_specs: name -> {"path": model folder or hub name, "tokenizer": its tokenizer
            folder or name, "ids": the row column holding the prompt ids in that tokenizer,
            "cut": the row column saying whether that prompt was cut to fit,
            "max_new_tokens": its answer budget (`evaluation.answer_budget`)}.
        num_threads: torch intra-op threads in this actor (match its CPU request).
    """

    def __init__(
        self, *, config: dict[str, Any], model_specs: dict[str, dict[str, Any]], num_threads: int
    ):
        cfg: Config = from_dict(config, source="generation actor config")
        wanted = [p for s in model_specs.values() for p in (s["path"], s["tokenizer"])]
        storage.pull_paths(cfg.run.output_dir, wanted)  # a run on object storage
        torch.set_num_threads(num_threads)
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per model and actor
        logging.getLogger("transformers.modeling_utils").addFilter(_padding_false_alarm)
        self.eval = cfg.eval
        device = _device(cfg.eval.gpus_per_actor)
        load_cfg = ModelConfig(dtype=cfg.eval.dtype)
        self.models: dict[str, tuple[torch.nn.Module, Any, dict[str, Any]]] = {}
        tokenizers: dict[str, Any] = {}
        for name, spec in model_specs.items():
            path = spec["tokenizer"]
            if path not in tokenizers:  # models sharing a tokenizer share one instance
                tokenizers[path] = models.load_tokenizer(path)
            model = models.freeze_teacher(models.load_pretrained(spec["path"], load_cfg))
            self.models[name] = (model.to(device), tokenizers[path], spec)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """batch: rows of `generation_rows` plus the prompt-id columns -> one row per
        (model, input row): model, set, index, sample_id, seed, prediction, rougeL,
        exact_match, prompt_tokens, prompt_truncated."""
        ev = self.eval
        references = [[str(r) for r in refs] for refs in batch["references"]]
        seeds = [int(s) for s in batch["seed"]]
        out = []
        for name, (model, tok, spec) in self.models.items():
            prompts = [[int(t) for t in ids] for ids in batch[spec["ids"]]]
            common = dict(max_new_tokens=spec["max_new_tokens"],
                          no_repeat_ngram_size=ev.no_repeat_ngram_size)  # fmt: skip
            if ev.decoding == "greedy":
                preds = generate(model, tok, prompts, batch_size=len(prompts), **common)
            else:
                row_seeds = [row_seed(s, sid) for s, sid in zip(seeds, batch["sample_id"])]
                preds = sample_generate(model, tok, prompts, row_seeds, temperature=ev.temperature,
                                        top_p=ev.top_p, top_k=ev.top_k, **common)  # fmt: skip
            out.append(
                pd.DataFrame(
                    {
                        "model": name,
                        "set": batch["set"].to_numpy(),
                        "index": batch["index"].to_numpy(),
                        "sample_id": batch["sample_id"].to_numpy(),
                        "seed": seeds,
                        "prediction": preds,
                        "rougeL": [rouge_l(p, r) for p, r in zip(preds, references)],
                        "exact_match": [exact_match(p, r) for p, r in zip(preds, references)],
                        "prompt_tokens": [len(p) for p in prompts],
                        "prompt_truncated": batch[spec["cut"]].astype(bool).to_numpy(),
                    }
                )
            )
        return pd.concat(out, ignore_index=True)


def generate_rows(
    rows: pd.DataFrame,
    *,
    config: dict[str, Any],
    ev: EvalConfig,
    model_specs: dict[str, dict[str, Any]],
) -> pd.DataFrame:
    """Answer every row (`generation_rows` plus the prompt-id columns) with every model on
    the pool of `ev` (the config's eval section), in `generation_blocks`: one row per
    (model, row)."""
    pool = section_pool(ev, GeneratorActor, {"config": config, "model_specs": model_specs})
    blocks = generation_blocks(rows, ev.batch_size)
    return answer_blocks(blocks, pool, key=["set", "index", "seed"], what="eval")

