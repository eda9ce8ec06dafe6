"""Ray Data adapter: difficulty scoring and evaluation generation with pools of stateful
actors (`map_batches`).

The maths lives in the core (`pocl_ray.signals.score_batch`); this module only moves rows to
actors and back. Ray-specific lines are marked `# ray:`.

- `scoring_dataset` turns tokenised rows into a Ray dataset whose blocks are exactly one scoring
  batch each, sorted by length then sample id: batch composition (and so padding, hence every
  float) depends only on the set of rows, never on file order or on Ray's scheduling.
- `ScorerActor` loads the scorer (and the teacher when a signal or the top-K cache needs it)
  ONCE from saved folders (safetensors), then scores one batch per call.
- `scored_dataset` maps the dataset through a pool of those actors; `score_rows` runs it and
  collects one pandas row per input row on the driver.

Evaluation (jobs/evaluate.py; second half of this module): `generation_dataset` cuts
(set, example, seed) rows into deterministic batches, `GeneratorActor` loads every evaluated
model once and generates + scores each batch with each model (core `generate`, `rouge_l`,
`exact_match`; sampling seeded per row by `RowSampler`), `generate_rows` collects the answers.

The config crosses into the actors as a plain dict (`config.to_dict`) and is rebuilt with
`config.from_dict` in exactly one place per actor class: `ScorerActor.__init__` and
`GeneratorActor.__init__`.
"""

from __future__ import annotations

import hashlib
import logging
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
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging as hf_logging

from pocl_ray import models
from pocl_ray.config import (
    Config,
    EvalConfig,
    ModelConfig,
    ScoringConfig,
    TokenizerConfig,
    from_dict,
)
from pocl_ray.data import Record, TokenizedExample, prompt_batch
from pocl_ray.evaluation import exact_match, generate, rouge_l
from pocl_ray.signals import score_batch
from pocl_ray.train_step import TOPK_IDS, TOPK_LOGPROBS, TOPK_TAIL

MAX_ACTOR_RESTARTS = 3
"""A scoring actor that dies (OOM, preemption, node loss) is restarted this many times."""
MAX_TASK_RETRIES = 3
"""A batch whose actor died is retried on the restarted actor this many times."""


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
            "response_truncated": [e.response_truncated for e in examples],
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
        max_new_tokens: int,
        num_threads: int = 1,
        fault: dict[str, Any] | None = None,
    ):
        cfg: Config = from_dict(config, source="scoring actor config")
        self.max_new_tokens = max_new_tokens
        torch.set_num_threads(num_threads)
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per model and actor
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
                response_truncated=bool(cut),
            )
            for sid, ids, labels, plen, cut in zip(
                batch["sample_id"],
                batch["input_ids"],
                batch["labels"],
                batch["prompt_length"],
                batch["response_truncated"],
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
            max_new_tokens=self.max_new_tokens,
            topk=self.scoring.teacher_topk,
            cache_taus=self.scoring.cache_taus,
        )
        out = pd.DataFrame({"sample_id": [e.sample_id for e in examples], **got.signals})
        if got.cache is not None:
            # bytes cross Ray Data unchanged; the driver rebuilds the arrays (`decode_topk`)
            for i, name in enumerate((TOPK_IDS, TOPK_LOGPROBS, TOPK_TAIL)):
                out[name] = [row[i].tobytes() for row in got.cache]
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
    max_new_tokens: int,
    fault: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """`ds` mapped through a pool of `ScorerActor`s (lazy: nothing runs until consumed).
    max_new_tokens: the rouge answers' budget (`evaluation.new_token_budget`)

    Output rows: sample_id, one float column per signal, and with teacher_topk > 0 the three
    cache columns as raw bytes (see `decode_topk`), in no particular order.
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
                max_new_tokens=max_new_tokens,
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


def decode_topk(
    ids: bytes, logprobs: bytes, tail: bytes, k: int, j: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row's cache from the actor's bytes: (R, k) int32 ids, (R, k) float16 log-probs,
    (R, j) float32 tail log-partitions (core `signals.teacher_topk`)."""
    return (
        np.frombuffer(ids, dtype=np.int32).reshape(-1, k),
        np.frombuffer(logprobs, dtype=np.float16).reshape(-1, k),
        np.frombuffer(tail, dtype=np.float32).reshape(-1, j),
    )


# ================================================================ evaluation: batch generation
#
# Rows are (set, example, seed); `GeneratorActor` loads every evaluated model once and, for
# each batch of rows, generates with each model and scores the answer with the core metrics.
# Sampling is seeded per (seed, sample), not per batch or per actor: every row samples from
# its own torch.Generator (`RowSampler`), so a row's answer does not depend on which rows
# share its batch, on the batch size, on the number of actors or on Ray's scheduling.

GREEDY_SEED = -1
"""The `seed` of a greedy row: greedy decodes each example once and uses no randomness."""


def row_seed(seed: int, sample_id: str) -> int:
    """The generator seed of one (eval seed, sample): 63 bits of sha256(f"{seed}:{sample_id}").

    It does not depend on the model, so every model draws the same random numbers for the same
    example and seed (common random numbers: model differences are not sampling noise)."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class RowSampler(LogitsProcessor):
    """Samples each row's next token with that row's own generator (T, top-k, top-p).

    It is the last logits processor of a `do_sample=False` generate call: it returns scores
    that are 0 at the sampled token and -inf elsewhere, so generate's greedy step (argmax)
    takes exactly the sampled token. Processors before it (no-repeat-ngram) have already set
    banned tokens to -inf. Warping follows transformers' own order and rules: temperature,
    then top-k (0 = off), then top-p (1 = off, the most likely token always kept).

    Args:
        seeds: one generator seed per row of the batch (`row_seed`).
    """

    def __init__(self, seeds: Sequence[int], *, temperature: float, top_k: int, top_p: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """scores: (B, V) next-token scores -> (B, V): 0 at each row's sample, -inf elsewhere."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows for {len(self.generators)} row seeds")
        scores = scores.float() / self.temperature
        if self.top_k > 0:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p < 1.0:
            ascending, order = torch.sort(scores, descending=False)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)
        probs = scores.softmax(-1).cpu()  # the generators live on the CPU
        chosen = torch.stack(
            [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)]
        ).to(scores.device)
        return torch.full_like(scores, -math.inf).scatter_(1, chosen, 0.0)


@torch.no_grad()
def sample_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts_ids: Sequence[Sequence[int]],
    row_seeds: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Sampled answers for one batch of tokenised prompts, row i seeded with row_seeds[i].

    The batch is left-padded (the core `prompt_batch`) and decoded in one generate call; the
    result of a row depends only on its prompt and its seed (up to float round-off of the
    padding). Returns the decoded text after each prompt, special tokens removed.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids, attention_mask = prompt_batch([list(p) for p in prompts_ids], tokenizer.pad_token_id)
    sampler = RowSampler(row_seeds, temperature=temperature, top_k=top_k, top_p=top_p)
    gen = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,  # the sampler picks the token; argmax then takes it
        logits_processor=LogitsProcessorList([sampler]),
        no_repeat_ngram_size=no_repeat_ngram_size,
        eos_token_id=list(models.eos_token_ids(model, tokenizer)) or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.batch_decode(gen[:, input_ids.shape[1] :], skip_special_tokens=True)


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


def generation_batches(rows: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """Rows sorted by (prompt characters, set, sample_id, seed), cut into `batch_size` rows.

    Prompts of similar length share a batch (little padding; an example's seeds sit side by
    side), and the batches depend only on the set of rows and the batch size.
    """
    order = pd.DataFrame(
        {
            "n": rows["prompt"].map(len).to_numpy(),
            "set": rows["set"].to_numpy(),
            "id": rows["sample_id"].to_numpy(),
            "seed": rows["seed"].to_numpy(),
        }
    ).sort_values(["n", "set", "id", "seed"], kind="stable")
    rows = rows.iloc[order.index.to_numpy()].reset_index(drop=True)
    return [rows.iloc[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def generation_dataset(rows: pd.DataFrame, batch_size: int) -> ray.data.Dataset:
    """A Ray dataset with one block per generation batch (see `generation_batches`)."""
    return ray.data.from_pandas(generation_batches(rows, batch_size))  # ray: one block a batch


def _padding_false_alarm(record: logging.LogRecord) -> bool:
    """Drop transformers' "input_ids may be padded" warning. It fires when a batch has no
    left padding (transformers then drops the all-ones attention mask) and a finished row
    feeds its pad token back: the mask would be all ones anyway, so nothing is wrong."""
    return "input_ids may be padded" not in record.getMessage()


class GeneratorActor:
    """Holds every evaluated model (and its tokenizer) for the whole run; `__call__` generates
    one batch of (set, example, seed) rows with each model and scores the answers.

    Args:
        config: `to_dict(cfg)` of the run config; rebuilt and validated here (the eval section
            gives the decoding settings).
        model_specs: name -> {"path": model folder or hub name, "tokenizer": its tokenizer
            folder or name, "ids": the row column holding the prompt ids in that tokenizer,
            "cut": the row column saying whether that prompt was cut to fit,
            "max_new_tokens": its answer budget (`evaluation.new_token_budget`)}.
        num_threads: torch intra-op threads in this actor (match its CPU request).
    """

    def __init__(
        self,
        *,
        config: dict[str, Any],
        model_specs: dict[str, dict[str, Any]],
        num_threads: int = 1,
    ):
        cfg: Config = from_dict(config, source="generation actor config")
        torch.set_num_threads(num_threads)
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per model and actor
        logging.getLogger("transformers.modeling_utils").addFilter(_padding_false_alarm)
        self.eval = cfg.eval
        self.device = torch.device(
            "cuda" if cfg.eval.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        )
        load_cfg = ModelConfig(dtype=cfg.eval.dtype)
        self.models: dict[str, tuple[torch.nn.Module, Any, dict[str, str]]] = {}
        tokenizers: dict[str, Any] = {}
        for name, spec in model_specs.items():
            path = spec["tokenizer"]
            if path not in tokenizers:  # models sharing a tokenizer share one instance
                tokenizers[path] = models.load_tokenizer(
                    TokenizerConfig(name_or_path=path), load_cfg
                )
            model = models.load_pretrained(spec["path"], load_cfg)
            model = models.freeze_teacher(model).to(self.device)
            self.models[name] = (model, tokenizers[path], spec)

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
            if ev.decoding == "greedy":
                preds = generate(
                    model,
                    tok,
                    prompts,
                    max_new_tokens=spec["max_new_tokens"],
                    decoding="greedy",
                    no_repeat_ngram_size=ev.no_repeat_ngram_size,
                    batch_size=len(prompts),
                )
            else:
                preds = sample_generate(
                    model,
                    tok,
                    prompts,
                    [row_seed(s, sid) for s, sid in zip(seeds, batch["sample_id"])],
                    max_new_tokens=spec["max_new_tokens"],
                    temperature=ev.temperature,
                    top_p=ev.top_p,
                    top_k=ev.top_k,
                    no_repeat_ngram_size=ev.no_repeat_ngram_size,
                )
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


def generated_dataset(
    ds: ray.data.Dataset,
    *,
    config: dict[str, Any],
    model_specs: dict[str, dict[str, Any]],
    ev: EvalConfig,
) -> ray.data.Dataset:
    """`ds` mapped through a pool of `GeneratorActor`s (lazy: nothing runs until consumed)."""
    gpu = {"num_gpus": ev.gpus_per_actor} if ev.gpus_per_actor > 0 else {}
    with warnings.catch_warnings():
        # see `scored_dataset`: finite restarts/retries, whose keyword form Ray 2.60 flags
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(  # ray: a fixed-size pool of stateful actors
            GeneratorActor,
            fn_constructor_kwargs=dict(
                config=config,
                model_specs=model_specs,
                num_threads=max(1, math.floor(ev.cpus_per_actor)),
            ),
            batch_size=ev.batch_size,
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=ev.num_actors),
            num_cpus=ev.cpus_per_actor,
            max_restarts=MAX_ACTOR_RESTARTS,
            max_task_retries=MAX_TASK_RETRIES,
            **gpu,
        )


def generate_rows(ds: ray.data.Dataset, **kwargs: Any) -> pd.DataFrame:
    """Run `generated_dataset(ds, **kwargs)` and collect it on the driver: one row per
    (model, input row), in no particular order."""
    return generated_dataset(ds, **kwargs).to_pandas()
