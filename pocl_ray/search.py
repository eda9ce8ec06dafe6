"""Hyperparameter search over the curriculum, the pure part (docs/tune.md).

- the space file: dotted config keys -> one distribution each (`space:`), and how to search
  (`search:`, `SearchSettings`), checked before anything starts (`read_space`);
- the one rule for a sampled point (`trial_config`): the base config with the point applied
  goes through the config validator, then its plan must fit the scored data; a point that
  fails either is an "invalid" trial (reported, never trained);
- a trial's budget: the training samples its plan visits (`planned_samples`), the clock
  on which early stopping compares trials;
- the results table, the best config and the comparison with the plain-KD reference.
The Ray side (Tune domains, the trial function, searcher and scheduler) is ray_tune.py.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml

from pocl_ray import curriculum, difficulty
from pocl_ray.config import (
    Config,
    ConfigError,
    bounds,
    build_section,
    coerce_field,
    from_dict,
)

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHABLE = ("curriculum.", "loss.", "optim.", "student.dropout")
"""What a distill run trains with (ray_train.run_settings). Every other key shapes the inputs
all trials share (one scores table, one teacher, one starting student) or is set per trial
(run, scaling), so it cannot vary between trials."""
METRIC_MODES = {"dev_loss": "min", "dev_rougeL": "max"}
"""The dev metrics a trial reports, and which way is better."""
CLOCK = "samples"
"""ASHA's time attribute: training samples consumed (rows visited, summed over workers)."""
SAME_BUDGET = 0.01
"""Budgets within this fraction of each other count as the same: the KD reference's epochs
are the curriculum's sample visits / n rounded (pocl-method.md §9), a few samples off."""
TRIAL_ACTOR_CPU = 0.01
"""CPUs of a trial's own actor: it only waits on its workers (Tune refuses 0)."""


@dataclass(kw_only=True)
class SearchSettings:
    """How to search (the `search:` block of a space file)."""

    num_samples: int = 8
    """Points sampled from the space; a space with grids runs every grid point this many
    times (Tune's rule). The KD reference comes on top."""
    metric: Literal["dev_loss", "dev_rougeL"] = "dev_loss"
    """dev_loss: the student's token-mean CE on the held-out split (lower is better);
    dev_rougeL: greedy ROUGE-L F1 x 100 of its answers there (higher is better; costs one
    generation pass per report). The mode follows from the metric."""
    searcher: Literal["random", "optuna"] = "random"
    """random: Tune's random / grid sampling; optuna: TPE (`pip install optuna`; no grids)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop trials that trail at a rung of the samples clock; fifo: run every trial."""
    grace: float = 0.25
    """ASHA's first rung, as a fraction of the base config's budget (its samples visits)."""
    reduction_factor: float = 2.0
    """ASHA: rungs at grace x rf^k; a trial is stopped below the 1 - 1/rf quantile there."""
    kd_reference: bool = True
    """Also run the base config as plain KD (curriculum.mode=none) as one extra trial."""
    max_concurrent: int | None = None
    """Trials at once (null = as many as the cluster fits)."""
    seed: int = 0
    """Seed of the searcher's sampling."""

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]

    def problems(self) -> list[str]:
        out = bounds("search", self, at_least={"num_samples": 1},
                     above={"grace": 0, "reduction_factor": 1})  # fmt: skip
        if self.max_concurrent is not None and self.max_concurrent < 1:
            out.append(f"search.max_concurrent: got {self.max_concurrent}; use >= 1 or null")
        return out


@dataclass(frozen=True, kw_only=True)
class Param:
    """One searched key: `kind` in KINDS; `values` the choices / grid points, or the bounds
    (low, high) of uniform / loguniform / randint (randint includes high)."""

    key: str
    kind: str
    values: tuple


@dataclass(frozen=True, kw_only=True)
class Space:
    params: tuple[Param, ...]
    settings: SearchSettings

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def trials(self) -> int:
        """Sampled trials, without the KD reference."""
        grid = math.prod(len(p.values) for p in self.params if p.kind == "grid")
        return self.settings.num_samples * grid


# ---------------------------------------------------------------- reading a space file


def read_space(path: str | Path) -> Space:
    """The space file at `path`, checked; raise one ConfigError listing every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError([f"cannot read {path}: {e.strerror}; check the path"], str(path)) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{path} is not valid YAML: {e}"], str(path)) from e
    return parse_space(data, source=str(path))


def parse_space(data: Any, source: str = "space") -> Space:
    """A space from plain data: {"space": {key: {kind: args}}, "search": {...}}."""
    if not isinstance(data, dict):
        raise ConfigError(["top level must be a mapping with `space:` (and `search:`)"], source)
    problems = [f"{k}: unknown top-level key; allowed: space, search"
                for k in data if k not in ("space", "search")]  # fmt: skip
    settings, more = build_section(SearchSettings, data.get("search"), "search")
    problems += more + settings.problems()
    if settings.searcher == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append("search.searcher: optuna is not installed; pip install "
                        "'pocl-ray[tune]' (optuna>=3), or use searcher: random")  # fmt: skip
    space = data.get("space")
    if not isinstance(space, dict) or not space:
        problems.append("space: name at least one dotted config key with a distribution, "
                        "e.g. curriculum.num_stages: {choice: [2, 3, 4]}")  # fmt: skip
        space = {}
    params = []
    for key, spec in space.items():
        param, more = _param(str(key), spec)
        problems += more
        if param is not None:
            params.append(param)
            if param.kind == "grid" and settings.searcher == "optuna":
                problems.append(f"{key}: grid with search.searcher optuna; Optuna samples, "
                                "it cannot run a grid: use choice")  # fmt: skip
    if problems:
        raise ConfigError(problems, source)
    return Space(params=tuple(params), settings=settings)


def _param(key: str, spec: Any) -> tuple[Param | None, list[str]]:
    """One `key: {kind: args}` entry, checked against the config field it names."""
    tp, _, problems = coerce_field(key, None)
    if problems and tp is None:
        return None, problems  # unknown key or a section: the rest would only repeat it
    if not key.startswith(SEARCHABLE):
        return None, [
            f"{key}: cannot be searched: every trial shares the scores table, teacher and "
            f"starting student, and run / scaling are set per trial; search keys under "
            f"curriculum., loss., optim. or student.dropout"
        ]
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        return None, [f"{key}: got {spec!r}; write one distribution, e.g. {{choice: [a, b]}}, "
                      f"{{uniform: [low, high]}}; kinds: {', '.join(KINDS)}"]  # fmt: skip
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return _listed(key, kind, args)
    return _ranged(key, kind, args, tp)


def _listed(key: str, kind: str, args: Any) -> tuple[Param | None, list[str]]:
    if not isinstance(args, list) or not args:
        return None, [f"{key}: {kind} got {args!r}; give a non-empty list of values"]
    values, problems = [], []
    for v in args:
        _, value, more = coerce_field(key, v)
        problems += [f"{p} (a {kind} value)" for p in more]
        values.append(value)
    return (None if problems else Param(key=key, kind=kind, values=tuple(values))), problems


def _ranged(key: str, kind: str, args: Any, tp: Any) -> tuple[Param | None, list[str]]:
    base = _base_type(tp)
    want = int if kind == "randint" else float
    if base is not want:
        use = {int: "randint or choice", float: "uniform, loguniform or choice"}.get(
            base, "choice or grid"
        )
        name = getattr(base, "__name__", str(base))
        return None, [f"{key}: {kind} samples {want.__name__}s but the key holds {name}; "
                      f"use {use}"]  # fmt: skip
    numbers = isinstance(args, list) and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args
    )
    ok = numbers and len(args) == 2
    if not ok or (kind == "randint" and not all(isinstance(a, int) for a in args)):
        return None, [f"{key}: {kind} got {args!r}; give [low, high] as two {want.__name__}s"]
    low, high = args
    if low > high or (kind != "randint" and low == high):
        return None, [f"{key}: {kind} got [{low}, {high}]; low must be below high"]
    if kind == "loguniform" and low <= 0:
        return None, [f"{key}: loguniform got [{low}, {high}]; both bounds must be > 0"]
    return Param(key=key, kind=kind, values=(want(low), want(high))), []


def _base_type(tp: Any) -> Any:
    """int / float / ... of a field type, without Optional."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


# ---------------------------------------------------------------- one trial


def set_key(data: dict, key: str, value: Any) -> None:
    """Set dotted `key` in a nested config dict, in place."""
    *sections, name = key.split(".")
    for s in sections:
        if data.get(s) is None:  # absent, or an empty `section:` in the YAML
            data[s] = {}
        data = data[s]
    data[name] = value


def trial_overrides(point: Mapping[str, Any], *, reference: bool) -> dict[str, Any]:
    """The keys a trial changes in the base config: the sampled point, or for the KD
    reference only the mode (plain KD at the base config's budget)."""
    return {"curriculum.mode": "none"} if reference else dict(point)


def trial_config(
    base: dict, overrides: Mapping[str, Any], *, n: int, name: str
) -> tuple[Config | None, list[str]]:
    """The trial's config, or None with the problems that make it invalid.

    The one rule: `from_dict` of the base config dict with the overrides applied (every
    range and consistency check, e.g. tau_min <= tau_max), then `plan_problems` for the
    `n` scored samples. run.name becomes the trial's `name` (its Train run).
    """
    data = copy.deepcopy(base)
    for key, value in overrides.items():
        set_key(data, key, value)
    set_key(data, "run.name", name)
    try:
        cfg = from_dict(data, source=f"trial {name}")
    except ConfigError as e:
        return None, e.problems
    problems = plan_problems(cfg, n)
    return (None if problems else cfg), problems


def plan_problems(cfg: Config, n: int) -> list[str]:
    """Why the plan of `cfg` does not fit `n` training samples: every stage must add samples
    (more stages than the data allows, or fractions that round to the same size, do not)."""
    cur = cfg.curriculum
    sizes = difficulty.stage_sizes(n, cur.num_stages, cur.fractions)
    if cur.mode == "none" or all(a < b for a, b in zip(sizes, sizes[1:])):
        return []
    return [f"curriculum.num_stages={cur.num_stages}"
            + (f" with fractions {cur.fractions}" if cur.fractions else "")
            + f": stage sizes {sizes} for {n} samples; every stage must add samples "
            "(fewer stages, or more data)"]  # fmt: skip


def planned_samples(cfg: Config, n: int, world: int) -> int:
    """Training samples the plan of `cfg` visits (rows, summed over `world` workers): the
    trial's budget. A plateau trigger may end stages sooner."""
    batch = cfg.optim.batch_size * world
    plan = curriculum.stage_table(cfg.curriculum, n=n, batch_size=batch, loss_alpha=cfg.loss.alpha)
    total = 0
    for p in plan:
        if p.samples is not None:  # mode none: the curriculum's visits, its last batch cut
            total += p.samples
            continue
        epochs, rest = divmod(p.total_steps, p.steps_per_epoch)
        total += epochs * p.size + rest * batch  # a partial epoch never reaches the last batch
    return total


def trial_dirname(trial_id: str, reference: bool) -> str:
    """A trial's folder and Train run name (Tune's own names embed every parameter)."""
    return f"{'kd_reference' if reference else 'trial'}_{trial_id}"


# ---------------------------------------------------------------- results


@dataclass(kw_only=True)
class TrialRecord:
    """What Tune kept of one trial: its point, its last reported result, its error."""

    trial: str
    reference: bool
    point: dict[str, Any]
    result: dict[str, Any]
    error: str | None = None


def status(rec: TrialRecord) -> str:
    """done | stopped early (by the scheduler) | invalid | failed | no result."""
    if "invalid" in rec.result:
        return "invalid"
    if rec.error:
        return "failed"
    if rec.result.get("plan_complete"):
        return "done"
    return "stopped early" if CLOCK in rec.result else "no result"


def results_table(
    records: Sequence[TrialRecord], space: Space, *, budgets: Mapping[str, int | None]
) -> pd.DataFrame:
    """One row per trial, best first (NaN last): trial, role, status, the metric, samples
    consumed, the planned budget, wall seconds, each searched key, the problem text."""
    metric = space.settings.metric
    rows = []
    for r in records:
        problem = r.result.get("invalid") or (r.error.strip().splitlines()[-1] if r.error else "")
        row = {
            "trial": r.trial,
            "role": "kd_reference" if r.reference else "search",
            "status": status(r),
            metric: r.result.get(metric, float("nan")),
            "samples": r.result.get(CLOCK),
            "budget": budgets.get(r.trial),
            "wall_s": r.result.get("time_total_s"),
        }
        row |= {k: ("(base)" if r.reference else r.point.get(k)) for k in space.keys}
        rows.append(row | {"problem": problem})
    columns = ["trial", "role", "status", metric, "samples", "budget", "wall_s", *space.keys,
               "problem"]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns)
    table[metric] = pd.to_numeric(table[metric], errors="coerce")
    table[[CLOCK, "budget"]] = table[[CLOCK, "budget"]].astype("Int64")  # counts, or missing
    asc = space.settings.mode == "min"
    return table.sort_values(metric, ascending=asc, na_position="last", kind="stable").reset_index(
        drop=True
    )


def best_row(table: pd.DataFrame, metric: str) -> pd.Series | None:
    """The best searched trial that ran its whole plan (the table is sorted best first);
    stopped, failed and invalid trials and the KD reference never count."""
    done = table[(table["role"] == "search") & (table["status"] == "done")]
    done = done[done[metric].notna()]
    return None if done.empty else done.iloc[0]


def best_config(base: dict, space: Space, row: pd.Series, *, name: str) -> Config:
    """The complete config of the best trial: the base config with its point, named `name`
    (a new run.name, so `pocl-ray distill` trains it afresh instead of resuming a trial)."""
    data = copy.deepcopy(base)
    for key in space.keys:
        set_key(data, key, _plain(row[key]))
    set_key(data, "run.name", name)
    return from_dict(data, source=f"best trial {row['trial']}")


def _plain(value: Any) -> Any:
    """A pandas / numpy scalar as a plain Python value (YAML and the config want those)."""
    return value.item() if hasattr(value, "item") else value


def comparison(table: pd.DataFrame, metric: str, mode: str) -> list[str]:
    """The lines that say how the best curriculum compares with the KD reference."""
    ref = table[(table["role"] == "kd_reference") & (table["status"] == "done")]
    best = best_row(table, metric)
    if best is None:
        return ["no searched trial ran its whole plan: no best config"]
    line = f"best: {best['trial']} {metric} {best[metric]:.4f} ({int(best['samples'])} samples)"
    if ref.empty:
        return [line + "; no KD reference in this search (search.kd_reference)"]
    r = ref.iloc[0]
    gap = (r[metric] - best[metric]) * (1 if mode == "min" else -1)
    side = "the curriculum's" if gap > 0 else "plain KD's" if gap < 0 else "neither's"
    lines = [
        line + f"; KD reference {r[metric]:.4f} ({int(r['samples'])} samples): a gap of "
        f"{abs(gap):.4f} in {side} favour"
    ]
    if not same_budget(int(best["samples"]), int(r["samples"])):
        ref_budget = int(r["samples"])
        near = table["samples"].map(lambda x: pd.notna(x) and same_budget(int(x), ref_budget))
        same = table[(table["role"] == "search") & (table["status"] == "done") & near]
        lines.append(
            f"  budgets differ ({int(best['samples'])} vs {int(r['samples'])} samples): "
            "only trials at the reference's budget compare with it"
            + (f"; the best of those: {same.iloc[0]['trial']} {same.iloc[0][metric]:.4f}"
               if not same.empty else "; none ran at that budget")  # fmt: skip
        )
    lines.append(
        "  one run per config (no seed spread): not evidence that either beats the other; "
        "rerun both with several run.train_seed values (mean ± sd) before saying so"
    )
    return lines


def same_budget(a: int, b: int) -> bool:
    """Two sample budgets that compare (within SAME_BUDGET of the larger)."""
    return abs(a - b) <= SAME_BUDGET * max(a, b)


def format_table(table: pd.DataFrame, space: Space) -> str:
    """The printed results table (best first; the KD reference row marked)."""
    metric = space.settings.metric
    short = {k: k.split(".")[-1] for k in space.keys}
    header = ["trial", "status", metric, "samples", "budget", "wall s", *short.values()]
    rows = [header]
    for _, r in table.iterrows():
        rows.append([
            r["trial"] + (" *" if r["role"] == "kd_reference" else ""),
            r["status"],
            "-" if pd.isna(r[metric]) else f"{r[metric]:.4f}",
            "-" if pd.isna(r["samples"]) else str(int(r["samples"])),
            "-" if pd.isna(r["budget"]) else str(int(r["budget"])),
            "-" if pd.isna(r["wall_s"]) else f"{r['wall_s']:.0f}",
            *(short_value(r[k]) for k in space.keys),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("* the KD reference: the base config as plain KD (curriculum.mode=none); "
                 f"compare only at equal budgets (within {SAME_BUDGET:.0%})")  # fmt: skip
    return "\n".join(lines)


def short_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
