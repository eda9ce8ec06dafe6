"""Run configuration: kw-only dataclasses, YAML loading, dotted overrides, strict validation.

One YAML file describes a whole run. `load_config(path, overrides)` builds the dataclasses,
coercing values to the declared types, and collects *every* problem (unknown key, wrong type,
out-of-range value, inconsistent fields) before raising one `ConfigError` that lists them all.
The core never imports Ray; a config crosses into Ray workers as `to_dict(cfg)` and is rebuilt
with `from_dict` on the worker side.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal

import yaml

SIGNALS = ("rouge", "nll", "teacher_nll", "kd_gap")
KD_KINDS = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")


def bounds(
    section: str, obj: Any, *, at_least: dict[str, float], above: dict[str, float] | None = None
) -> list[str]:
    """`section.field: got v; must be >= m` for every field of `obj` below its minimum
    (`at_least`), `...; must be > m` for every field not above its bound (`above`)."""
    out = [
        f"{section}.{name}: got {getattr(obj, name)}; must be >= {low}"
        for name, low in at_least.items()
        if getattr(obj, name) < low
    ]
    out += [
        f"{section}.{name}: got {getattr(obj, name)}; must be > {low}"
        for name, low in (above or {}).items()
        if getattr(obj, name) <= low
    ]
    return out


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the training records come from and how they become token ids."""

    source: str = "builtin"
    """`builtin` (the generated task set), a JSONL/JSON/parquet file, a directory of them,
    or a Hugging Face datasets name (format: hf)."""
    format: Literal["auto", "jsonl", "json", "parquet", "dir", "hf"] = "auto"
    split: str = "train"
    """Split to read when format is hf."""
    limit: int | None = None
    """Read only the first `limit` records (None = all)."""
    builtin_size: int = 1200
    """Number of generated records when source is builtin."""
    eval_fraction: float = 0.1
    """Held-out share of the records (by sample id hash) for evaluation / plateau checks."""
    max_prompt_length: int = 256
    max_length: int = 512
    on_bad_record: Literal["error", "skip"] = "error"

    def problems(self) -> list[str]:
        out = []
        if self.limit is not None and self.limit < 1:
            out.append(f"data.limit: got {self.limit}; use a positive integer or null")
        if self.builtin_size < 10:
            out.append(f"data.builtin_size: got {self.builtin_size}; use at least 10")
        if not 0.0 <= self.eval_fraction < 1.0:
            out.append(f"data.eval_fraction: got {self.eval_fraction}; allowed 0 <= x < 1")
        if self.max_prompt_length < 16:
            out.append(f"data.max_prompt_length: got {self.max_prompt_length}; use >= 16")
        if self.max_length <= self.max_prompt_length:
            out.append(
                f"data.max_length: got {self.max_length}; must exceed data.max_prompt_length "
                f"({self.max_prompt_length}) to leave room for the response"
            )
        return out


@dataclass(kw_only=True)
class TokenizerConfig:
    name_or_path: str | None = None
    """A local tokenizer folder or hub name; null trains a BPE tokenizer on the task data."""
    vocab_size: int = 512
    """Vocabulary size of the in-process trained tokenizer."""

    def problems(self) -> list[str]:
        if self.name_or_path is None and not 64 <= self.vocab_size <= 65536:
            return [f"tokenizer.vocab_size: got {self.vocab_size}; allowed 64..65536"]
        return []


@dataclass(kw_only=True)
class ModelConfig:
    """A causal LM: a pretrained one (`name_or_path`) or a tiny one built from these sizes."""

    name_or_path: str | None = None
    """Local folder or hub name for AutoModelForCausalLM; null builds a tiny model."""
    arch: Literal["gpt2", "llama"] = "gpt2"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None
    """MLP width (default 4 x hidden_size)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    dropout: float | None = None
    """Dropout probability while training (attention, residual, embedding); null = the
    model's own (a pretrained GPT-2 has 0.1), 0.0 for a tiny model built from config."""
    init: Literal["auto", "teacher_layers"] = "auto"
    """auto: `name_or_path` when set, else a tiny model of the sizes above; teacher_layers
    (student only): the teacher's embeddings, the blocks `layers`, its final norm and head
    (the sizes above are ignored; docs/models.md)."""
    layers: list[int] | None = None
    """teacher_layers: the teacher blocks to keep, in order (0-based); null = every
    `layer_step`-th block from the first."""
    layer_step: int = 2
    """teacher_layers without `layers`: keep blocks 0, step, 2 x step, ..."""

    def problems(self, prefix: str) -> list[str]:
        out = []
        if self.init == "teacher_layers":
            if prefix != "student":
                out.append(f"{prefix}.init: teacher_layers is for the student only; use auto")
            if self.name_or_path is not None:
                out.append(f"{prefix}.init: teacher_layers builds the student from the teacher, "
                           f"but {prefix}.name_or_path is set too; drop one of them")  # fmt: skip
        if self.layers is not None and (
            not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers)
        ):
            out.append(f"{prefix}.layers: got {self.layers}; give distinct block indices >= 0, "
                       "or null for every layer_step-th block")  # fmt: skip
        if self.layer_step < 1:
            out.append(f"{prefix}.layer_step: got {self.layer_step}; must be >= 1")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            out.append(f"{prefix}.dropout: got {self.dropout}; allowed 0 <= x < 1, or null")
        for name in ("hidden_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                out.append(f"{prefix}.{name}: got {getattr(self, name)}; must be >= 1")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            out.append(
                f"{prefix}.hidden_size: got {self.hidden_size}; must be divisible by "
                f"{prefix}.num_heads ({self.num_heads})"
            )
        if self.intermediate_size is not None and self.intermediate_size < 1:
            out.append(f"{prefix}.intermediate_size: got {self.intermediate_size}; must be >= 1")
        return out


@dataclass(kw_only=True)
class SFTConfig:
    """Supervised fine-tuning of the demo teacher (and the SFT-student baseline)."""

    epochs: int = 12
    lr: float = 1e-3
    batch_size: int = 32
    student_epochs: int = 0
    """SFT epochs of a tiny student before scoring: its "starting checkpoint" (the paper starts
    from a pretrained student; a random one would make the student-based signals noise)."""

    def problems(self) -> list[str]:
        return bounds(
            "sft", self, at_least={"epochs": 1, "batch_size": 1, "student_epochs": 0},
            above={"lr": 0},
        )  # fmt: skip


@dataclass(kw_only=True)
class ScoringConfig:
    signals: list[str] = field(default_factory=lambda: ["rouge", "nll"])
    """Any of rouge, nll (scorer-based), teacher_nll, kd_gap (teacher-based)."""
    fusion_k: int = 60
    scorer: str = "student"
    """`student` (its starting checkpoint, as in the paper), `teacher`, or a model path."""
    max_new_tokens: int = 256
    batch_size: int = 16
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    accelerator_type: str | None = None
    """GPU model each actor needs (e.g. A10G, A100, H100: Ray's `accelerator_type:NAME` node
    resource); null = any. Needs gpus_per_actor > 0 (docs/cluster.md)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each actor needs (e.g. {scorer_node: 1}); CPU and GPU have their
    own keys."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """Precision of the models' bodies while scoring (null = each model's own `dtype`). The
    signals and the top-K cache are always computed from float32 logits; bfloat16 makes the
    forwards about 3x faster on CPUs with AVX-512 BF16 or AMX (docs/scoring.md)."""
    teacher_topk: int = 0
    """Store the teacher's top-K log-probabilities per response token (0 = off)."""
    cache_taus: list[float] = field(
        default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0]
    )
    """Temperatures at which the top-K cache stores the teacher's tail log-partition (positive,
    increasing); a cached-teacher KD at τ between grid points interpolates (docs/distill.md)."""

    def problems(self) -> list[str]:
        out = []
        if not self.signals:
            out.append(f"scoring.signals: got []; choose one or more of {list(SIGNALS)}")
        for s in self.signals:
            if s not in SIGNALS:
                out.append(f"scoring.signals: unknown signal {s!r}; allowed {list(SIGNALS)}")
        if len(set(self.signals)) != len(self.signals):
            out.append(f"scoring.signals: got {self.signals}; each signal at most once")
        out += bounds(
            "scoring", self,
            at_least={"fusion_k": 1, "max_new_tokens": 1, "batch_size": 1, "num_actors": 1,
                      "teacher_topk": 0},
        )  # fmt: skip
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            out.append("scoring.cpus_per_actor / gpus_per_actor: must be >= 0")
        out += placement_problems("scoring", self.accelerator_type, self.gpus_per_actor > 0,
                                  "gpus_per_actor > 0", self.resources)  # fmt: skip
        taus = self.cache_taus
        if not taus or any(t <= 0 for t in taus) or any(a >= b for a, b in zip(taus, taus[1:])):
            out.append(
                f"scoring.cache_taus: got {taus}; give one or more positive temperatures in "
                "increasing order, e.g. [0.5, 1.0, 1.5, 2.0, 3.0]"
            )
        return out


@dataclass(kw_only=True)
class CurriculumConfig:
    """The baby-step plan (pocl-method.md sections 3 and 4)."""

    mode: Literal["pocl", "random", "anti", "none"] = "pocl"
    """pocl = easiest first; random = same nested sizes, random order; anti = hardest first;
    none = plain KD on all data for the same total sample visits."""
    num_stages: int = 4
    fractions: list[float] | None = None
    """Cumulative subset fractions, increasing, last 1.0 (null = paper: 1/S, 2/S, ...)."""
    interval: int = 8
    interval_unit: Literal["epochs", "steps"] = "epochs"
    tau_min: float = 1.0
    tau_max: float = 2.0
    taus: list[float] | None = None
    """Explicit per-stage temperatures (overrides tau_min/tau_max)."""
    kd_ratio_start: float = 0.7
    kd_ratio_end: float = 1.0
    alphas: list[float] | None = None
    """Explicit per-stage skew alpha for skl/srkl (null = loss.alpha in every stage)."""
    lr_policy: Literal["per_stage", "continuous"] = "per_stage"
    """per_stage = fresh AdamW + cosine decay each stage (the authors' recipe)."""
    plateau_patience: int | None = None
    """Advance early when the dev loss has not improved for this many evaluations (null = off)."""
    eval_every: int = 0
    """Steps between dev evaluations for the plateau trigger (0 = once per epoch)."""
    shuffle: bool = True
    """Reshuffle the stage's subset every epoch from (training seed, stage, epoch); false =
    the subset's own order every epoch (for comparisons and tests)."""
    rescore: bool = False
    """At each stage boundary, score the samples no stage has used yet with the current
    student (the scoring job's signals and actors) and re-rank them; the samples already
    used stay, so the stages stay nested. Mode pocl only (docs/distill.md)."""

    def problems(self) -> list[str]:
        out = []
        s = self.num_stages
        if s < 1:
            out.append(f"curriculum.num_stages: got {s}; must be >= 1")
        if self.interval < 1:
            out.append(f"curriculum.interval: got {self.interval}; must be >= 1")
        if self.fractions is not None:
            f = self.fractions
            if len(f) != s:
                out.append(
                    f"curriculum.fractions: got {len(f)} values; need num_stages ({s}) values"
                )
            if any(not 0 < x <= 1 for x in f) or any(b <= a for a, b in zip(f, f[1:])):
                out.append(f"curriculum.fractions: got {f}; need increasing values in (0, 1]")
            if f and f[-1] != 1.0:
                out.append(f"curriculum.fractions: last value is {f[-1]}; it must be 1.0")
        if self.taus is not None:
            if len(self.taus) != s:
                out.append(f"curriculum.taus: got {len(self.taus)} values; need {s}")
            if any(t <= 0 for t in self.taus):
                out.append(f"curriculum.taus: got {self.taus}; temperatures must be > 0")
        if not 0 < self.tau_min <= self.tau_max:
            out.append(
                f"curriculum.tau_min/tau_max: got {self.tau_min}/{self.tau_max}; "
                "need 0 < tau_min <= tau_max"
            )
        for name in ("kd_ratio_start", "kd_ratio_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append(f"curriculum.{name}: got {getattr(self, name)}; allowed 0..1")
        if self.alphas is not None:
            if len(self.alphas) != s:
                out.append(f"curriculum.alphas: got {len(self.alphas)} values; need {s}")
            if any(not 0 <= a <= 1 for a in self.alphas):
                out.append(f"curriculum.alphas: got {self.alphas}; allowed 0..1")
        if self.plateau_patience is not None and self.plateau_patience < 1:
            out.append(
                f"curriculum.plateau_patience: got {self.plateau_patience}; use >= 1 or null"
            )
        if self.eval_every < 0:
            out.append(f"curriculum.eval_every: got {self.eval_every}; must be >= 0")
        return out


@dataclass(kw_only=True)
class LossConfig:
    kind: Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"] = "fkl"
    scale_by_tau_sq: bool = True
    alpha: float = 0.1
    """Skew of skl / srkl."""
    beta: float = 0.9
    """Mixture weight of jsd."""
    chunk_size: int | None = None
    """Rows per chunk of the memory-lean KD loss (loss and gradient chunk by chunk, nothing
    N x V kept but the gradient); null = 16 rows from a 32k vocabulary, the plain path below."""
    on_policy_ratio: float = 0.0
    """Probability per step that the student samples the batch's responses and KD is computed
    on them (pocl-method.md section 6); 0 = off."""
    on_policy_max_new_tokens: int = 64
    """Most tokens the student samples per response on an on-policy step."""
    teacher_source: Literal["online", "cache"] = "online"
    """online = run the teacher on every batch; cache = the teacher's top-K logits stored by
    the scoring job (scoring.teacher_topk): KD on that support only (docs/distill.md)."""

    def problems(self) -> list[str]:
        out = []
        for name in ("alpha", "beta", "on_policy_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                out.append(f"loss.{name}: got {getattr(self, name)}; allowed 0..1")
        if self.chunk_size is not None and self.chunk_size < 1:
            out.append(f"loss.chunk_size: got {self.chunk_size}; use >= 1 or null")
        if self.on_policy_max_new_tokens < 1:
            out.append(
                f"loss.on_policy_max_new_tokens: got {self.on_policy_max_new_tokens}; must be >= 1"
            )
        return out


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-7
    """Floor of the cosine decay."""
    weight_decay: float = 0.01
    batch_size: int = 8
    """Per-worker micro-batch size."""
    grad_clip: float = 1.0
    warmup_steps: int = 0
    autocast: Literal["bfloat16", "float16"] | None = None
    """Mixed precision for every student training step (distillation and the SFT of the
    starting student): forward passes under torch.autocast at this dtype; weights, gradients
    and AdamW state stay float32 and the losses are computed in float32 (docs/distill.md)."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them, for
    every student training step: less memory for longer sequences or bigger batches, at about
    one more forward pass of time (transformers' gradient_checkpointing_enable)."""

    def problems(self) -> list[str]:
        out = bounds(
            "optim", self, at_least={"weight_decay": 0, "batch_size": 1, "warmup_steps": 0},
            above={"lr": 0, "grad_clip": 0},
        )  # fmt: skip
        if not 0 <= self.min_lr <= self.lr:
            out.insert(1, f"optim.min_lr: got {self.min_lr}; allowed 0..optim.lr ({self.lr})")
        return out


@dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = 1
    """Ray Train workers (0 = Train local mode in the driver)."""
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    accelerator_type: str | None = None
    """GPU model each worker needs (e.g. A10G, A100); null = any. Needs use_gpu."""

    def problems(self) -> list[str]:
        out = []
        if self.num_workers < 0:
            out.append(f"scaling.num_workers: got {self.num_workers}; must be >= 0")
        for k, v in self.resources_per_worker.items():
            if v < 0:
                out.append(f"scaling.resources_per_worker.{k}: got {v}; must be >= 0")
        out += placement_problems("scaling", self.accelerator_type, self.use_gpu,
                                  "use_gpu: true", {})  # fmt: skip
        return out


POOL_EXECUTION_KEYS = (
    "batch_size", "num_actors", "cpus_per_actor", "gpus_per_actor", "accelerator_type", "resources",
)  # fmt: skip
"""Keys of an actor-pool section (scoring, eval) that change where and how fast its work runs,
not its results (beyond float round-off of padding): left out of the config hashes."""


_ACCELERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def placement_problems(
    section: str, accelerator: str | None, has_gpu: bool, gpu_fix: str, custom: dict
) -> list[str]:
    """An accelerator type without GPUs, a malformed one, and custom resources that are
    negative or named CPU / GPU (those have their own keys)."""
    out = []
    if accelerator is not None and not _ACCELERATOR.fullmatch(accelerator):
        out.append(f"{section}.accelerator_type: got {accelerator!r}; use a GPU model name "
                   "such as A10G, A100 or H100")  # fmt: skip
    elif accelerator is not None and not has_gpu:
        out.append(f"{section}.accelerator_type: {accelerator} asks for a GPU model but no GPU "
                   f"is requested; set {section}.{gpu_fix} or remove accelerator_type")  # fmt: skip
    for k, v in custom.items():
        if k in ("CPU", "GPU"):
            out.append(f"{section}.resources.{k}: use {section}.cpus_per_actor / gpus_per_actor")
        elif v < 0:
            out.append(f"{section}.resources.{k}: got {v}; must be >= 0")
    return out


HELDOUT = "heldout"
"""The eval-set name of the held-out split of the configured data (`data.eval_fraction`)."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def named_entry(entry: str) -> tuple[str, str]:
    """`name=path` -> (name, path); a bare `path` is named after its last component without
    the suffix (`data/dollyeval.jsonl` -> `dollyeval`, `runs/demo/teacher` -> `teacher`).
    The bare entry `heldout` is the held-out split and has no path: (`heldout`, "")."""
    if "=" in entry:
        name, path = entry.split("=", 1)
        return name.strip(), path.strip()
    entry = entry.strip()
    if entry == HELDOUT:
        return HELDOUT, ""
    return PurePath(entry).stem, entry


def _named_problems(key: str, entries: list[str], what: str) -> list[str]:
    """Problems of a list of `name=path` entries (empty part, bad or duplicate name)."""
    out, seen = [], set()
    for i, entry in enumerate(entries):
        name, path = named_entry(entry)
        where = f"eval.{key}[{i}]"
        if key == "sets" and name == HELDOUT and path:
            out.append(
                f"{where}: got {entry!r}; the name {HELDOUT!r} is reserved for the held-out "
                f"split of the configured data; give this {what} another name"
            )
            continue
        if not path and not (key == "sets" and name == HELDOUT):
            out.append(f"{where}: got {entry!r}; expected name=path or a path to a {what}")
            continue
        if not _NAME.fullmatch(name):
            out.append(
                f"{where}: name {name!r} of {entry!r}; use letters, digits, '_', '.', '-' "
                f"(write name=path to choose one)"
            )
            continue
        if name in seen:
            out.append(f"{where}: name {name!r} is used twice; names must be unique")
        seen.add(name)
    return out


@dataclass(kw_only=True)
class EvalConfig:
    """The evaluation job (pocl-method.md section 7; docs/evaluate.md)."""

    decoding: Literal["sample", "greedy"] = "sample"
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    """Sampling seeds, one decoding pass each (greedy decodes once and ignores them)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    max_new_tokens: int = 256
    max_examples: int | None = None
    """Evaluate the first `max_examples` examples of each set (null = all)."""
    sets: list[str] = field(default_factory=lambda: [HELDOUT])
    """Eval sets: `name=path` or a bare path (named after its file stem); `heldout` is the
    held-out split of the configured data (`data.eval_fraction`)."""
    models: list[str] = field(default_factory=list)
    """Models to evaluate: `name=path` or a bare path (named after its folder) of a
    save_pretrained folder or hub name; a relative path missing from the working directory is
    looked up under run.output_dir. Empty = the run's teacher."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype the evaluated models are loaded in."""
    batch_size: int = 16
    """Rows (example x seed) per generation batch."""
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    accelerator_type: str | None = None
    """GPU model each actor needs (e.g. A10G); null = any. Needs gpus_per_actor > 0."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each actor needs; CPU and GPU have their own keys."""

    def problems(self) -> list[str]:
        out = []
        if not self.seeds:
            out.append("eval.seeds: got []; give at least one seed")
        if any(s < 0 for s in self.seeds):
            out.append(f"eval.seeds: got {self.seeds}; seeds must be >= 0")
        if len(set(self.seeds)) != len(self.seeds):
            out.append(f"eval.seeds: got {self.seeds}; each seed at most once")
        if self.temperature <= 0:
            out.append(f"eval.temperature: got {self.temperature}; must be > 0")
        if not 0 < self.top_p <= 1:
            out.append(f"eval.top_p: got {self.top_p}; allowed (0, 1]")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            out.append("eval.top_k / no_repeat_ngram_size: must be >= 0")
        if self.max_new_tokens < 1:
            out.append(f"eval.max_new_tokens: got {self.max_new_tokens}; must be >= 1")
        if self.max_examples is not None and self.max_examples < 1:
            out.append(f"eval.max_examples: got {self.max_examples}; use >= 1 or null")
        if not self.sets:
            out.append(f"eval.sets: got []; give at least one set (e.g. [{HELDOUT}])")
        out += _named_problems("sets", self.sets, "JSONL/JSON/parquet eval file")
        out += _named_problems("models", self.models, "save_pretrained model folder")
        for name in ("batch_size", "num_actors"):
            if getattr(self, name) < 1:
                out.append(f"eval.{name}: got {getattr(self, name)}; must be >= 1")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            out.append("eval.cpus_per_actor / gpus_per_actor: must be >= 0")
        out += placement_problems("eval", self.accelerator_type, self.gpus_per_actor > 0,
                                  "gpus_per_actor > 0", self.resources)  # fmt: skip
        return out


PIPELINE_RUNS = ("pocl", "kd", "sft")
"""The distillation runs `pocl-ray pipeline` knows (jobs/pipeline.py)."""


def _location_problems(key: str, where: str | None) -> list[str]:
    """A run location is a local path or a URI without credentials (`storage.uri_problems`)."""
    from pocl_ray import storage

    return storage.uri_problems(key, where) if storage.is_uri(where) else []


@dataclass(kw_only=True)
class RunConfig:
    output_dir: str = "runs/demo"
    """A local folder, or a URI (s3://, gs://, file://) worked on through a local mirror
    (pocl_ray/storage.py; credentials from the environment only)."""
    name: str = "demo"
    seed: int = 0
    """The data split, the built-in tasks, the demo models; the scores table is made for it."""
    train_seed: int | None = None
    """Training randomness only (dropout, each epoch's shuffle, the random curriculum order,
    on-policy draws); null = run.seed. Varying it reuses the scores table and the starting
    student: it is what `pocl-ray compare --seeds` varies."""
    storage_path: str | None = None
    """Ray Train/Tune storage, a local folder or a URI (null = <output_dir>/ray)."""
    checkpoint_every: int = 0
    """Steps between checkpoints besides stage boundaries (0 = stage boundaries only)."""
    log_every: int = 10
    max_failures: int = 2
    """Distillation: worker-group failures to recover from, each from the latest checkpoint
    (-1 = no limit)."""
    keep_checkpoints: int | None = 3
    """Distillation: checkpoints kept in storage, newest first (null = all)."""
    pipeline_runs: list[str] = field(default_factory=lambda: list(PIPELINE_RUNS))
    """`pocl-ray pipeline`: the distillations to run, any of pocl (the configured curriculum),
    kd (plain-KD control) and sft (CE-only control), each at the same compute."""
    pipeline_seeds: int = 1
    """`pocl-ray pipeline`: training seeds per distillation (as `pocl-ray compare --seeds`);
    with 2 or more the table gives mean ± sd and paired intervals against kd."""

    @property
    def training_seed(self) -> int:
        return self.seed if self.train_seed is None else self.train_seed

    def problems(self) -> list[str]:
        out = []
        runs = self.pipeline_runs
        if not runs or len(set(runs)) != len(runs) or set(runs) - set(PIPELINE_RUNS):
            out.append(f"run.pipeline_runs: got {runs}; give one or more of "
                       f"{list(PIPELINE_RUNS)}, each once")  # fmt: skip
        if self.pipeline_seeds < 1:
            out.append(f"run.pipeline_seeds: got {self.pipeline_seeds}; use 1 or more "
                       "(3 or more for an interval)")  # fmt: skip
        if not self.output_dir:
            out.append("run.output_dir: empty; give a directory")
        out += _location_problems("run.output_dir", self.output_dir)
        out += _location_problems("run.storage_path", self.storage_path)
        if not self.name or "/" in self.name:
            out.append(f"run.name: got {self.name!r}; use a non-empty name without '/'")
        if self.checkpoint_every < 0 or self.log_every < 1:
            out.append("run.checkpoint_every must be >= 0 and run.log_every >= 1")
        if self.max_failures < -1:
            out.append(f"run.max_failures: got {self.max_failures}; use >= 0, or -1")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            out.append(f"run.keep_checkpoints: got {self.keep_checkpoints}; use >= 1 or null")
        return out


@dataclass(kw_only=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(hidden_size=256, num_layers=4, num_heads=4)
    )
    student: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def problems(self) -> list[str]:
        out = []
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if isinstance(section, ModelConfig):
                out += section.problems(f.name)
            else:
                out += section.problems()
        s = self.curriculum.num_stages
        if self.curriculum.mode == "none" and s < 1:
            out.append("curriculum.mode none still needs num_stages >= 1 to size its budget")
        if self.loss.kind not in ("skl", "srkl") and self.curriculum.alphas is not None:
            out.append(
                f"curriculum.alphas: set, but loss.kind is {self.loss.kind!r}; "
                "alphas only apply to skl / srkl"
            )
        out += _rescore_problems(self)
        if self.scoring.scorer == "teacher" and "kd_gap" in self.scoring.signals:
            out.append(
                "scoring.signals: kd_gap with scoring.scorer 'teacher' compares the teacher "
                "with itself (always 0, so it ranks nothing); drop kd_gap or score with the "
                "student (scoring.scorer=student)"
            )
        if self.loss.teacher_source == "cache":
            if self.scoring.teacher_topk == 0:
                out.append(
                    "loss.teacher_source: 'cache' needs the teacher's top-K in the scores "
                    "table; set scoring.teacher_topk (e.g. 20) and run `pocl-ray score` again"
                )
            if self.loss.on_policy_ratio > 0:
                out.append(
                    f"loss.on_policy_ratio: got {self.loss.on_policy_ratio} with "
                    "loss.teacher_source 'cache'; the cache only covers the reference "
                    "responses, so on-policy KD needs loss.teacher_source=online"
                )
            cur, grid = self.curriculum, self.scoring.cache_taus
            taus = cur.taus if cur.taus is not None else [cur.tau_min, cur.tau_max]
            if grid and any(not min(grid) <= t <= max(grid) for t in taus):
                field_name = "curriculum.taus" if cur.taus is not None else "curriculum.tau_min/max"
                out.append(
                    f"{field_name}: stage temperatures {taus} leave the cached grid "
                    f"scoring.cache_taus=[{min(grid)} .. {max(grid)}] (loss.teacher_source "
                    "'cache' reads the teacher's tail at each stage τ from that grid); widen "
                    "scoring.cache_taus to cover them and rescore, or narrow the temperatures"
                )
        return out


def _rescore_problems(cfg: Config) -> list[str]:
    """curriculum.rescore needs a curriculum to re-rank, a student-based signal to change and
    the stage-end checkpoints that each round continues from."""
    if not cfg.curriculum.rescore:
        return []
    out = []
    if cfg.curriculum.mode != "pocl":
        out.append(f"curriculum.rescore: true needs curriculum.mode pocl (got "
                   f"{cfg.curriculum.mode!r}); it re-ranks the easy-to-hard order")  # fmt: skip
    student_signals = [s for s in cfg.scoring.signals if s in ("rouge", "nll", "kd_gap")]
    if cfg.scoring.scorer != "student" or not student_signals:
        out.append("curriculum.rescore: true re-scores with the current student, but the "
                   f"signals {cfg.scoring.signals} (scorer {cfg.scoring.scorer!r}) do not "
                   "depend on it; add nll, rouge or kd_gap with scoring.scorer=student")
    if cfg.scaling.num_workers == 0:
        out.append("curriculum.rescore: true needs scaling.num_workers >= 1: each round "
                   "continues from the stage-end checkpoint, which Train local mode does not "
                   "keep")  # fmt: skip
    return out


# ---------------------------------------------------------------- building from plain data


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_BAD = object()
"""Returned by `_coerce` for a value it could not convert (the problem is recorded); the field
then keeps its default, so range checks still run on sane values."""


def _parse_flow(value: str, path: str, problems: list[str]) -> Any:
    """A `[..]` / `{..}` command-line value, parsed as YAML flow syntax."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        problems.append(f"{path}: cannot parse {value!r}; write e.g. [1, 2] or {{CPU: 1}}")
        return _BAD


def _coerce(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Convert `value` to type `tp` (YAML / command-line forms), or record a problem and
    return `_BAD`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, args[0], path, problems)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        problems.append(f"{path}: got {value!r}; allowed {', '.join(map(repr, allowed))}")
        return _BAD
    if origin is list:
        return _coerce_list(value, typing.get_args(tp)[0], path, problems)
    if origin is dict:
        return _coerce_dict(value, typing.get_args(tp)[1], path, problems)
    return _coerce_scalar(value, tp, path, problems)


def _coerce_list(value: Any, item_tp: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, str):
        is_flow = value.strip().startswith("[")
        value = _parse_flow(value, path, problems) if is_flow else value.split(",")
        if value is _BAD:
            return _BAD
    if not isinstance(value, list):
        problems.append(f"{path}: got {value!r}; expected a list")
        return _BAD
    items = [_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return _BAD if any(v is _BAD for v in items) else items


def _coerce_dict(value: Any, val_tp: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, str):
        value = _parse_flow(value, path, problems)
        if value is _BAD:
            return _BAD
    if not isinstance(value, dict):
        problems.append(f"{path}: got {value!r}; expected a mapping")
        return _BAD
    items = {str(k): _coerce(v, val_tp, f"{path}.{k}", problems) for k, v in value.items()}
    return _BAD if any(v is _BAD for v in items.values()) else items


def _coerce_scalar(value: Any, tp: type, path: str, problems: list[str]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        number = _to_float(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            problems.append(f"{path}: got {value!r}; expected a finite number")
            return _BAD
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{path}: got {value!r}; expected {_type_name(tp)}")
    return _BAD


def _to_float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _build(cls: type, data: Any, path: str, problems: list[str], base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping. Missing keys keep the values of `base` (default:
    `cls()`), so a partial `teacher:` section keeps the teacher's own defaults."""
    base = cls() if base is None else base
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'}: got {data!r}; expected a mapping of keys")
        return base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.append(f"{where}: unknown key; {hint}allowed keys: {', '.join(sorted(names))}")
    kwargs = {}
    for name in (n for n in names if n in data):  # declaration order: a stable report
        where = f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], data[name], where, problems, getattr(base, name))
            continue
        value = _coerce(data[name], hints[name], where, problems)
        if value is not _BAD:
            kwargs[name] = value
    return dataclasses.replace(base, **kwargs)


def from_dict(data: dict, source: str = "config") -> Config:
    """Build and validate a Config from plain data; raise one ConfigError listing every problem."""
    problems: list[str] = []
    # A field whose value has the wrong type keeps its default, so the range and consistency
    # checks below still run and the user sees every problem in one go.
    cfg = _build(Config, data, "", problems)
    problems += cfg.problems()
    if problems:
        raise ConfigError(problems, source)
    return cfg


def build_section(cls: type, data: Any, path: str) -> tuple[Any, list[str]]:
    """A kw-only dataclass outside `Config` (e.g. a Tune search's settings) built from plain
    data with the same coercion and unknown-key reports; returns it with the problems found
    (its own range checks are the caller's)."""
    problems: list[str] = []
    return _build(cls, data, path, problems), problems


def coerce_field(key: str, value: Any) -> tuple[Any, Any, list[str]]:
    """(declared type, `value` coerced to it, problems) of the Config field at dotted `key`:
    an unknown key (with a did-you-mean), a section where a field is needed, a value of the
    wrong type. Range and consistency checks stay with the whole config (`from_dict`)."""
    cls, parts, problems = Config, key.split("."), []
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        where = ".".join(parts[: i + 1])
        if part not in hints:
            close = difflib.get_close_matches(part, list(hints), n=1)
            hint = f"did you mean {'.'.join([*parts[:i], close[0]])!r}? " if close else ""
            return None, None, [f"{where}: unknown key; {hint}allowed: {', '.join(hints)}"]
        tp = hints[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(tp):
            return None, None, [f"{where}: is a field, not a section; {key} does not exist"]
        cls = tp
    if dataclasses.is_dataclass(tp):
        return None, None, [f"{key}: is a section; name one of its keys ({key}.<key>)"]
    coerced = _coerce(value, tp, key, problems)
    return tp, None if coerced is _BAD else coerced, problems


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError([f"override {item!r}: expected dotted.key=value"], "command line")
    key, value = item.split("=", 1)
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of `data` with each `dotted.key=value` set (values parsed as YAML scalars
    later, by type coercion). Unknown keys are caught by validation."""
    data = _deep_copy(data)
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:  # absent, or an empty `section:` in the YAML
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r}: {k} is not a section"], "command line")
        node[keys[-1]] = value
    return data


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (None = all defaults), apply overrides, validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError([f"cannot read {path}: {e.strerror}; check the path"], source) from e
        except yaml.YAMLError as e:
            raise ConfigError([f"{path} is not valid YAML: {e}"], source) from e
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: top level must be a mapping of sections"], source)
    data = apply_overrides(data, overrides or [])
    return from_dict(data, source + (" + overrides" if overrides else ""))


def with_section(cfg: Config, section: str, **changes: Any) -> Config:
    """`cfg` with fields of one section replaced (no re-validation: for code, not users)."""
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)}
    )


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: Config, run_dir: str | Path | None = None) -> Path:
    """Write the resolved config as `config.yaml` into the run directory."""
    out = Path(run_dir or cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "config.yaml"
    target.write_text(dump_yaml(cfg), encoding="utf-8")
    return target
