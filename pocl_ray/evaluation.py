"""Evaluation (pocl-method.md section 7): the metrics (ROUGE-L F1 x 100 with rouge-score,
Porter stemming, max over references; exact match), generation (greedy, or sampling seeded
per (seed, sample) so an answer does not depend on its batch), the answer budget, the eval
sets and models of a run, and the results tables. The evaluation job (jobs/evaluate.py)
and the Ray actors (ray_data.GeneratorActor) are built from these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rouge_score import rouge_scorer
from transformers import AutoConfig, LogitsProcessor, LogitsProcessorList

from pocl_ray.config import (
    HELDOUT,
    POOL_EXECUTION_KEYS,
    Config,
    EvalConfig,
    named_entry,
    to_dict,
)
from pocl_ray.data import (
    LoadResult,
    Record,
    TokenizedExample,
    load_records,
    prompt_batch,
    tokenize_record,
)
from pocl_ray.models import eos_token_ids, load_tokenizer, max_positions
from pocl_ray.run_dir import Locations, RunDir, data_fingerprint, now_utc, versions

log = logging.getLogger("pocl_ray.evaluate")

FORMAT_VERSION = 1
RESULTS_FILE = "results.csv"
GENERATIONS_FILE = "generations.jsonl"
EXECUTION_KEYS = POOL_EXECUTION_KEYS
"""Eval settings left out of the config hash (`config.POOL_EXECUTION_KEYS`)."""
METRICS = ("rougeL", "exact_match")
RESULT_COLUMNS = ["model", "set", "stat", "seed", "n_examples", "n_seeds", "rougeL", "exact_match"]


class EvalInputError(ValueError):
    """An eval set, model or tokenizer that cannot be used; the message says what to do."""


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 x 100 of `prediction`, the maximum over `references`."""
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def normalise_answer(text: str) -> str:
    """The answer normalisation of S-NI's exact match (SQuAD's): lower case, punctuation
    removed, the articles a / an / the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 when the prediction equals any reference after `normalise_answer`, else 0."""
    pred = normalise_answer(prediction)
    return 100.0 if any(pred == normalise_answer(r) for r in references) else 0.0


def new_token_budget(max_new_tokens: int, *, positions: int | None, max_prompt_length: int) -> int:
    """New tokens one generation may add: `max_new_tokens`, clamped so that the longest
    allowed prompt plus the answer fits in `positions` (None = no limit).

    The one rule for every place the project generates (scoring's ROUGE answers, on-policy
    samples, evaluation): prompts are cut to data.max_prompt_length by the tokenizer, answers
    to what is left. It depends only on the settings, never on a batch's prompts, so an
    answer does not depend on which rows share its batch.

    Raises:
        ValueError: no room is left for even one new token.
    """
    if positions is None:
        return max_new_tokens
    room = positions - max_prompt_length
    if room < 1:
        raise ValueError(
            f"the model has {positions} positions and prompts may be "
            f"data.max_prompt_length={max_prompt_length} tokens: no room for an answer; lower "
            "data.max_prompt_length"
        )
    return min(max_new_tokens, room)


def answer_budget(
    model_path: str,
    *,
    max_new_tokens: int,
    max_prompt_length: int,
    trust_remote_code: bool = False,
) -> tuple[int, int | None]:
    """(`new_token_budget` for the model saved at `model_path`, its positions); reads only
    the model's config. Raises OSError / ValueError when there is no loadable config there,
    ValueError when no room is left for an answer."""
    hf_cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    positions = max_positions(hf_cfg)
    budget = new_token_budget(
        max_new_tokens, positions=positions, max_prompt_length=max_prompt_length
    )
    return budget, positions


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    decoding: str = "greedy",
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """Decode a response for each tokenised prompt (left-padded batches), seeded.

    `decoding="sample"` with the defaults is the paper protocol (T = 1, top-p 1, top-k 0);
    callers pass no_repeat_ngram_size=6 for it. Returns the decoded text after the prompt,
    with special tokens removed.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_ids = list(eos_token_ids(model, tokenizer)) or None
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[start : start + batch_size]
        input_ids, attention_mask = prompt_batch([list(p) for p in chunk], tokenizer.pad_token_id)
        kwargs = dict(do_sample=decoding == "sample")
        if decoding == "sample":
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        new = gen[:, input_ids.shape[1] :]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    return out


def score_predictions(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Mean ROUGE-L and exact match (both x 100) over examples."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = max(len(predictions), 1)
    return {
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
    }


def greedy_rouge_l(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[TokenizedExample],
    references: Sequence[Sequence[str]],
    *,
    max_new_tokens: int,
) -> float:
    """Mean ROUGE-L x 100 of the model's greedy answers to the examples' prompts (a Tune
    trial's dev metric; the evaluation job is the full protocol)."""
    prompts = [e.input_ids[: e.prompt_length] for e in examples]
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return score_predictions(answers, references)["rougeL"]


# ---------------------------------------------------------------- seeded sampling


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
        eos_token_id=list(eos_token_ids(model, tokenizer)) or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.train(was_training)
    return tokenizer.batch_decode(gen[:, input_ids.shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- eval sets and models


@dataclass(kw_only=True)
class EvalSet:
    name: str
    path: str
    """The file read, or `heldout:<data.source>` for the held-out split."""
    records: list[Record]
    """The examples evaluated (the first eval.max_examples of the set)."""
    available: int
    """Examples in the whole set."""
    rejected: int


def load_sets(cfg: Config, held: list[Record], rejects_dir: Path) -> list[EvalSet]:
    """Read every configured eval set with the core loader (both schemas, `output` lists).

    `heldout` is the held-out split of the configured data (`held`: `artifacts.read_inputs`,
    exactly the records the scoring job left out).
    Files are read with `data.on_bad_record`; skipped records go to
    `eval/rejects-<set>.jsonl`.
    """
    ev = cfg.eval
    sets = []
    for entry in ev.sets:
        name, path = named_entry(entry)
        if name == HELDOUT:
            if not held:
                raise EvalInputError(
                    f"eval set {HELDOUT!r} is empty: data.eval_fraction="
                    f"{cfg.data.eval_fraction} holds no record out; raise data.eval_fraction "
                    "or evaluate on a file (eval.sets=[name=path])"
                )
            records, rejected, path = held, 0, f"{HELDOUT}:{cfg.data.source}"
        else:
            loaded = load_records(
                path,
                on_bad_record=cfg.data.on_bad_record,
                rejects_path=rejects_dir / f"rejects-{name}.jsonl",
            )
            records, rejected = loaded.records, len(loaded.rejected)
        chosen = records[: ev.max_examples] if ev.max_examples else records
        sets.append(
            EvalSet(
                name=name,
                path=path,
                records=list(chosen),
                available=len(records),
                rejected=rejected,
            )
        )
    return sets


def set_fingerprint(s: EvalSet) -> str:
    """Hash of the evaluated examples (ids, references, extra fields; the core fingerprint)."""
    return data_fingerprint(LoadResult(records=s.records, n_read=len(s.records), rejected=[]))


def _resolve(path: str, out: Path) -> str:
    """`path` when it exists here, else `run.output_dir/path` when that exists, else `path`
    unchanged (a hub name)."""
    if Path(path).exists() or not (out / path).exists():
        return path
    return str(out / path)


def model_entries(cfg: Config, run: RunDir) -> dict[str, str]:
    """name -> model folder (or hub name) of every model to evaluate, in config order.
    Empty `eval.models` = the run's teacher (`run_dir.Locations`)."""
    out = run.root
    if not cfg.eval.models:
        teacher = Locations.of(cfg, run).teacher
        if not cfg.teacher.name_or_path and not (run.teacher / "config.json").exists():
            raise EvalInputError(
                f"eval.models is empty and there is no teacher in {run.teacher}: run "
                "`pocl-ray score` (it trains the demo teacher) or list the models, e.g. "
                "eval.models=[teacher=runs/demo/teacher,student=runs/demo/student_init]"
            )
        return {"teacher": teacher}
    return {name: _resolve(path, out) for name, path in map(named_entry, cfg.eval.models)}


def tokenizer_path(cfg: Config, model_path: str, run: RunDir) -> str:
    """The model's own tokenizer (the project saves one into every model folder), else the
    run's (`run_dir.Locations`). A hub model brings its own."""
    folder = Path(model_path)
    if not folder.is_dir():
        return model_path
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        return model_path
    run_tok = Locations.of(cfg, run).tokenizer
    if Path(run_tok) != run.tokenizer or (run.tokenizer / "tokenizer.json").exists():
        return run_tok
    raise EvalInputError(
        f"model folder {model_path} has no tokenizer and the run has none "
        f"(tokenizer.name_or_path is null, {run.tokenizer} is missing): save the tokenizer "
        "with the model (pocl_ray.models.save_model does) or set tokenizer.name_or_path"
    )


def prompt_columns(
    sets: Sequence[EvalSet], specs: dict[str, dict[str, Any]], cfg: Config
) -> dict[str, dict[int, tuple[list[int], bool]]]:
    """Tokenise every prompt once per distinct tokenizer (cut to data.max_prompt_length):
    column key -> {id(record) -> (prompt ids, cut)}. Fills each spec's `ids` / `cut` column
    names.

    Done on the driver so a prompt that cannot fit fails here with its file and line
    (core DataError), not inside an actor."""
    columns: dict[str, dict[int, tuple[list[int], bool]]] = {}
    keys: dict[str, str] = {}
    budget = cfg.data.max_prompt_length
    for spec in specs.values():
        group = spec["tokenizer"]
        if group not in keys:
            key = f"t{len(keys)}"
            keys[group] = key
            tok = load_tokenizer(group)
            fitted = {}
            for s in sets:
                for r in s.records:
                    ex = tokenize_record(r, tok, max_prompt_length=budget, max_length=budget + 1)
                    fitted[id(r)] = (ex.input_ids[: ex.prompt_length], ex.prompt_truncated)
            columns[key] = fitted
            n_cut = sum(cut for _, cut in fitted.values())
            if n_cut:
                log.warning(
                    "eval: %d of %d prompts cut to data.max_prompt_length=%d tokens for "
                    "tokenizer %s",
                    n_cut,
                    len(fitted),
                    budget,
                    group,
                )
        spec["ids"], spec["cut"] = f"ids_{keys[group]}", f"cut_{keys[group]}"
    return columns


# ---------------------------------------------------------------- results


def hashed_config(cfg: Config) -> dict[str, Any]:
    """The settings that can change the answers: `eval.*` except the execution keys and the
    set / model lists (identified by content below), and data.max_prompt_length."""
    ev = {
        k: v
        for k, v in to_dict(cfg)["eval"].items()
        if k not in (*EXECUTION_KEYS, "sets", "models")
    }
    if cfg.eval.decoding == "greedy":  # seeds and the sampling knobs do not change greedy
        for k in ("seeds", "temperature", "top_p", "top_k"):
            ev.pop(k)
    return {"eval": ev, "max_prompt_length": cfg.data.max_prompt_length}


def results_table(
    generations: pd.DataFrame, model_order: Sequence[str], set_order: Sequence[str]
) -> pd.DataFrame:
    """The results.csv layout from per-sample generations (see docs/evaluate.md).

    Per model x set: one `stat=seed` row per decoding pass (metrics averaged over examples),
    then `stat=mean` and `stat=sd` rows over those passes (sd: sample standard deviation,
    ddof=1; empty with a single pass). `seed` is empty on greedy and mean / sd rows.
    """
    g = generations.astype({"seed": "Int64", "rougeL": "float64", "exact_match": "float64"})
    per_seed = (
        g.groupby(["model", "set", "seed"], sort=False, dropna=False)
        .agg(
            n_examples=("sample_id", "size"),
            rougeL=("rougeL", "mean"),
            exact_match=("exact_match", "mean"),
        )
        .reset_index()
    )
    rows = []
    for model in model_order:
        for name in set_order:
            part = per_seed[(per_seed["model"] == model) & (per_seed["set"] == name)]
            part = part.sort_values("seed", kind="stable")
            n_ex, n_seeds = int(part["n_examples"].iloc[0]), len(part)
            for r in part.itertuples(index=False):
                rows.append([model, name, "seed", r.seed, r.n_examples, 1, r.rougeL, r.exact_match])
            means = [part[m].mean() for m in METRICS]
            sds = [part[m].std(ddof=1) for m in METRICS]  # NaN with a single pass
            rows.append([model, name, "mean", pd.NA, n_ex, n_seeds, *means])
            rows.append([model, name, "sd", pd.NA, n_ex, n_seeds, *sds])
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return table.astype({"seed": "Int64", "rougeL": "float64", "exact_match": "float64"})


def read_results(out_dir: str | Path, folder: str = "eval") -> pd.DataFrame:
    """results.csv of a run directory's `folder` (seed as nullable Int64)."""
    return pd.read_csv(Path(out_dir) / folder / RESULTS_FILE, dtype={"seed": "Int64"})


def read_generations(out_dir: str | Path) -> pd.DataFrame:
    """generations.jsonl of a run directory, one row per generated answer."""
    return pd.read_json(Path(out_dir) / "eval" / GENERATIONS_FILE, lines=True, dtype=False)


def format_table(results: pd.DataFrame, ev: EvalConfig) -> str:
    """model x set: `ROUGE-L mean ± sd (exact match mean)`, models and sets in file order."""
    mean = results[results["stat"] == "mean"]
    sd = results[results["stat"] == "sd"].set_index(["model", "set"])
    sets = list(dict.fromkeys(mean["set"]))
    n_of = dict(zip(mean["set"], mean["n_examples"]))
    cells: dict[str, list[str]] = {}
    for r in mean.itertuples(index=False):
        s = sd.loc[(r.model, r.set), "rougeL"]
        spread = "" if pd.isna(s) else f" ± {s:.2f}"
        cells.setdefault(r.model, []).append(f"{r.rougeL:.2f}{spread} ({r.exact_match:.1f})")
    heads = ["model", *(f"{s} (n={n_of[s]})" for s in sets)]
    body = [[m, *c] for m, c in cells.items()]
    widths = [max(len(row[i]) for row in [heads, *body]) for i in range(len(heads))]
    line = "  ".join
    if ev.decoding == "greedy":
        how = f"greedy (one decoding pass: no spread), {ev.max_new_tokens} new tokens"
    else:
        how = (
            f"sampling T={ev.temperature:g} top-p={ev.top_p:g} top-k={ev.top_k}, "
            f"no-repeat-ngram {ev.no_repeat_ngram_size}, {ev.max_new_tokens} new tokens, "
            f"{len(ev.seeds)} seeds ({','.join(map(str, ev.seeds))})"
        )
    text = [
        f"ROUGE-L F1 x100, mean ± sd over seeds (exact match %) — {how}",
        line(h.ljust(w) for h, w in zip(heads, widths)),
        *(line(c.ljust(w) for c, w in zip(row, widths)) for row in body),
    ]
    return "\n".join(t.rstrip() for t in text)


def decode_seeds(ev: EvalConfig) -> list[int]:
    """The decoding passes: every seed when sampling, one pass (GREEDY_SEED) when greedy."""
    return [GREEDY_SEED] if ev.decoding == "greedy" else list(ev.seeds)


def answers_table(
    got: pd.DataFrame, rows: pd.DataFrame, model_order: Sequence[str], set_order: Sequence[str]
) -> pd.DataFrame:
    """The actors' answers joined to their rows (prompt, references), in (model, set, example,
    seed) order, with plain dtypes and an empty seed on greedy rows.

    Raises:
        EvalInputError: answers were lost or duplicated (nothing must be written then).
    """
    expected = len(rows) * len(model_order)
    ids = ["model", "set", "sample_id", "seed"]
    if len(got) != expected or got.duplicated(ids).any():
        raise EvalInputError(
            f"expected {expected} answers ({len(rows)} rows x {len(model_order)} models), got "
            f"{len(got)} with {int(got.duplicated(ids).sum())} duplicates; nothing was written"
        )
    got = got.astype(  # Ray hands back pyarrow-backed columns
        {
            **{c: str for c in ("model", "set", "sample_id", "prediction")},
            **{c: "int64" for c in ("index", "seed", "prompt_tokens")},
            **{c: "float64" for c in METRICS},
            "prompt_truncated": bool,
        }
    )
    base = rows[["set", "sample_id", "seed", "prompt", "references"]]
    g = got.merge(base, on=["set", "sample_id", "seed"], how="left", validate="many_to_one")
    rank_m = {m: i for i, m in enumerate(model_order)}
    rank_s = {s: i for i, s in enumerate(set_order)}
    g = g.assign(_m=g["model"].map(rank_m), _s=g["set"].map(rank_s), _seed=g["seed"])
    g = g.sort_values(["_m", "_s", "index", "_seed"], kind="stable")
    g = g.drop(columns=["_m", "_s", "_seed"]).reset_index(drop=True)
    g["seed"] = g["seed"].astype("Int64").mask(g["seed"] == GREEDY_SEED)
    return g


def write_generations(path: Path, g: pd.DataFrame) -> None:
    fields = [
        "model",
        "set",
        "seed",
        "sample_id",
        "index",
        "prompt",
        "prediction",
        "references",
        "rougeL",
        "exact_match",
        "prompt_tokens",
        "prompt_truncated",
    ]
    with path.open("w", encoding="utf-8") as f:
        for row in g[fields].itertuples(index=False):
            item = dict(zip(fields, row))
            item["seed"] = None if pd.isna(item["seed"]) else int(item["seed"])
            item["index"] = int(item["index"])
            item["references"] = [str(x) for x in item["references"]]
            item["rougeL"], item["exact_match"] = float(item["rougeL"]), float(item["exact_match"])
            item["prompt_tokens"] = int(item["prompt_tokens"])
            item["prompt_truncated"] = bool(item["prompt_truncated"])
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def manifest(
    cfg: Config, key: dict, sets: Sequence[EvalSet], specs: dict[str, dict[str, Any]], *,
    rows: int, answers: int, seconds: float, ray_version: str,
) -> dict[str, Any]:
    """`eval/manifest.json`: what was evaluated (the reuse key, models, sets), how
    (decoding), how much and how fast."""
    ev = cfg.eval
    return {
        "format_version": FORMAT_VERSION,
        "created": now_utc(),
        "key": key,
        "models": {
            n: {k: s[k] for k in ("path", "tokenizer", "max_new_tokens")} for n, s in specs.items()
        },  # fmt: skip
        "sets": {
            s.name: {
                "path": s.path,
                "evaluated": len(s.records),
                "available": s.available,
                "rejected": s.rejected,
            }
            for s in sets
        },  # fmt: skip
        "decoding": {
            "decoding": ev.decoding,
            "seeds": None if ev.decoding == "greedy" else list(ev.seeds),
            "temperature": ev.temperature,
            "top_p": ev.top_p,
            "top_k": ev.top_k,
            "no_repeat_ngram_size": ev.no_repeat_ngram_size,
            "max_new_tokens": ev.max_new_tokens,
            "seeding": "per (seed, sample): sha256(f'{seed}:{sample_id}') -> torch.Generator",
        },  # fmt: skip
        "counts": {"rows": rows, "answers": answers},
        "timings_s": {"generate": round(seconds, 3)},
        "throughput_answers_per_s": round(answers / seconds, 2),
        "ray": {
            "version": ray_version,
            "num_actors": ev.num_actors,
            "cpus_per_actor": ev.cpus_per_actor,
            "gpus_per_actor": ev.gpus_per_actor,
            "batch_size": ev.batch_size,
        },  # fmt: skip
        "versions": versions(),
        "config": to_dict(cfg),
    }
