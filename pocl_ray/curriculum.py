"""The baby-step plan and its schedules (pocl-method.md sections 3, 4 and 9).

Everything here is a small pure function of (plan, position), so the Ray Train worker and the
plain single-process loop compute the same stage, subset, epoch order, τ, λ, α and LR multiplier
from nothing but the config, the scores table and the step counter (nanochat style). The one
stateful object is `PlateauTracker`, for the optional "advance on convergence" trigger.

The default path:
    plan = stage_table(cfg.curriculum, n=len(table), batch_size=global_batch, loss_alpha=...)
    order = stage_order(table.rank, table.sample_id, mode=cfg.curriculum.mode,
                        seed=cfg.run.training_seed)
    subsets = stage_subsets(order, [p.size for p in plan])
    for g in range(total_steps(plan)):
        pos = position_at(plan, g, lr_policy=..., warmup_steps=..., min_lr_ratio=min_lr / lr)
        rows = epoch_order(subsets[pos.stage], seed=..., stage=pos.stage, epoch=pos.epoch)
        batch = rows[pos.step_in_epoch * global_batch : (pos.step_in_epoch + 1) * global_batch]
With the plateau trigger the caller keeps (stage, step_in_stage) itself and calls
`stage_position` instead of `position_at` (see there).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pocl_ray.config import CurriculumConfig
from pocl_ray.difficulty import stage_sizes

Mode = Literal["pocl", "random", "anti", "none"]
LRPolicy = Literal["per_stage", "continuous"]
LR_POLICIES = ("per_stage", "continuous")
MODES = ("pocl", "random", "anti", "none")


# ---------------------------------------------------------------- the stage table


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One stage of the plan: which data, for how long, with which loss knobs."""

    stage: int
    fraction: float
    """size / n: the share of the training set in this stage's subset."""
    size: int
    """Samples in the stage's (cumulative, nested) subset."""
    epochs: int | None
    """Epochs over the subset (interval_unit epochs; mode none: the epochs begun, the last
    possibly partial), else None."""
    steps: int | None
    """Optimizer steps (interval_unit steps), else None."""
    tau: float
    kd_ratio: float
    alpha: float
    steps_per_epoch: int
    """ceil(size / global batch): the last, partial batch of an epoch is kept."""
    total_steps: int
    """Optimizer steps in this stage."""
    samples: int | None = None
    """Mode none (epochs unit): its sample visits, exactly the curriculum's; the last batch is
    cut short to end there (`stage_batches`). None: whole epochs / steps as planned."""


def _linear(start: float, end: float, s: int, num_stages: int) -> float:
    """Value at stage s of a linear ramp start → end over num_stages (one stage: start)."""
    if num_stages == 1:
        return start
    return start + (end - start) * s / (num_stages - 1)


def stage_table(
    cur: CurriculumConfig, *, n: int, batch_size: int, loss_alpha: float = 0.1
) -> list[StagePlan]:
    """The per-stage plan for `n` training samples and a global batch of `batch_size`.

    Modes pocl / random / anti share this table (same nested sizes, same τ/λ ramp); they differ
    only in which samples fill each subset (`stage_order`).

    Mode `none` is the compute-matched plain-KD control (pocl-method.md section 9): one stage
    over all n samples at the curriculum's first temperature (taus[0], else tau_min) and
    λ = kd_ratio_end (1.0 in the paper: pure KD, like the paper's KD baselines) and its first
    α (alphas[0], else loss_alpha), with the curriculum's compute:
    - unit epochs: exactly the curriculum's sample visits, interval · Σ_s size_s: whole epochs
      over all n, then part of one more (its last batch cut short; paper: 19.997 epochs, the
      sizes being floors of f_s · n; a tiny run with interval 1 and 4 stages: 2.5 epochs);
    - unit steps: the curriculum's total steps, num_stages · interval.
    """
    if problems := cur.problems():
        raise ValueError("invalid curriculum config: " + "; ".join(problems))
    if n < 1:
        raise ValueError(f"n: got {n}; the curriculum needs at least one training sample")
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}; must be >= 1")
    num_stages = cur.num_stages
    sizes = stage_sizes(n, num_stages, cur.fractions)
    if cur.mode == "none":
        return [_plain_stage(cur, sizes, n=n, batch_size=batch_size, loss_alpha=loss_alpha)]
    plan = []
    for s, size in enumerate(sizes):
        steps_per_epoch = math.ceil(size / batch_size)
        by_epochs = cur.interval_unit == "epochs"
        plan.append(
            StagePlan(
                stage=s,
                fraction=size / n,
                size=size,
                epochs=cur.interval if by_epochs else None,
                steps=None if by_epochs else cur.interval,
                tau=cur.taus[s] if cur.taus else _linear(cur.tau_min, cur.tau_max, s, num_stages),
                kd_ratio=_linear(cur.kd_ratio_start, cur.kd_ratio_end, s, num_stages),
                alpha=cur.alphas[s] if cur.alphas else loss_alpha,
                steps_per_epoch=steps_per_epoch,
                total_steps=cur.interval * steps_per_epoch if by_epochs else cur.interval,
            )
        )
    return plan


def _plain_stage(
    cur: CurriculumConfig, sizes: list[int], *, n: int, batch_size: int, loss_alpha: float
) -> StagePlan:
    """The single stage of mode `none` (see `stage_table`)."""
    steps_per_epoch = math.ceil(n / batch_size)
    samples = None
    if cur.interval_unit == "epochs":
        samples = cur.interval * sum(sizes)
        full, rest = divmod(samples, n)
        epochs, steps = full + (rest > 0), None
        total = full * steps_per_epoch + math.ceil(rest / batch_size)
    else:
        epochs, steps = None, cur.interval * len(sizes)
        total = steps
    return StagePlan(
        stage=0,
        fraction=1.0,
        size=n,
        epochs=epochs,
        steps=steps,
        tau=cur.taus[0] if cur.taus else cur.tau_min,
        kd_ratio=cur.kd_ratio_end,
        alpha=cur.alphas[0] if cur.alphas else loss_alpha,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        samples=samples,
    )


def total_steps(plan: Sequence[StagePlan]) -> int:
    """Optimizer steps in the whole plan."""
    return sum(p.total_steps for p in plan)


def stage_start_steps(plan: Sequence[StagePlan]) -> list[int]:
    """Planned global step at which each stage begins: [0, T_0, T_0 + T_1, ...]."""
    starts = [0]
    for p in plan[:-1]:
        starts.append(starts[-1] + p.total_steps)
    return starts


def format_plan(plan: Sequence[StagePlan]) -> str:
    """A small fixed-width table of the plan, for logs and the CLI."""
    header = ("stage", "fraction", "size", "epochs", "steps/ep", "steps", "tau", "lambda", "alpha")
    rows = [header]
    for p in plan:
        rows.append(
            (
                str(p.stage),
                f"{p.fraction:.3f}",
                str(p.size),
                "-" if p.epochs is None else str(p.epochs),
                str(p.steps_per_epoch),
                str(p.total_steps),
                f"{p.tau:.4g}",
                f"{p.kd_ratio:.4g}",
                f"{p.alpha:.4g}",
            )
        )
    rows.append(("total", "", "", "", "", str(total_steps(plan)), "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# ---------------------------------------------------------------- which samples, in which order


def stage_order(
    difficulty_rank: Sequence[int] | np.ndarray,
    sample_ids: Sequence[str],
    *,
    mode: Mode,
    seed: int,
) -> list[int]:
    """Row indices from the first sample to enter the curriculum to the last. (N,), (N,) -> [N]

    pocl and none: ascending difficulty_rank (easiest first); anti: exactly the pocl order
    reversed (hardest first); random: a seeded permutation of the rows sorted by sample id.
    Ties in rank are broken by sample id, and random starts from the id order, so the result
    names the same samples in the same order whatever the row order of the input. Rows with
    equal ids keep their input order; equal ids mean identical samples, so that is harmless.
    """
    ranks = np.asarray(difficulty_rank)
    if ranks.ndim != 1 or len(ranks) != len(sample_ids):
        raise ValueError(
            f"difficulty_rank has shape {ranks.shape} but there are {len(sample_ids)} sample ids; "
            "pass one rank per sample"
        )
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; allowed {', '.join(map(repr, MODES))}")
    rows = range(len(sample_ids))
    if mode == "random":
        by_id = sorted(rows, key=lambda i: sample_ids[i])
        perm = np.random.default_rng(seed).permutation(len(by_id))
        return [by_id[j] for j in perm]
    easiest_first = sorted(rows, key=lambda i: (ranks[i], sample_ids[i]))
    return easiest_first[::-1] if mode == "anti" else easiest_first


def stage_subsets(order: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Stage s = the first sizes[s] entries of `order`; nested because sizes increase."""
    if any(b < a for a, b in itertools.pairwise(sizes)) or (sizes and sizes[-1] > len(order)):
        raise ValueError(
            f"sizes: got {list(sizes)}; need non-decreasing sizes of at most {len(order)}"
        )
    return [list(order[:k]) for k in sizes]


def rescored_order(
    order: Sequence[int], sizes: Sequence[int], rounds: Sequence[Sequence[int]]
) -> list[int]:
    """`order` after re-ranking rounds (`curriculum.rescore`). Round r (1-based, made after
    stage r - 1) lists the rows outside stage r - 1 easiest first; the first sizes[r - 1] rows
    stay where they are, so every stage still contains the one before it."""
    out = list(order)
    for r, reranked in enumerate(rounds, start=1):
        kept = sizes[r - 1]
        if sorted(reranked) != sorted(out[kept:]):
            raise ValueError(
                f"rescore round {r}: it ranks {len(reranked)} rows, but the rows after stage "
                f"{r - 1} are {len(out) - kept} others; the round belongs to another run"
            )
        out = out[:kept] + list(reranked)
    return out


def epoch_order(
    subset: Sequence[int], *, seed: int, stage: int, epoch: int, shuffle: bool = True
) -> list[int]:
    """The stage's subset in the order of this epoch: reshuffled every epoch (pocl-method.md
    section 4), a pure function of (seed, stage, epoch) so a resumed run sees the same batches.
    """
    if not shuffle:
        return list(subset)
    perm = np.random.default_rng([seed, stage, epoch]).permutation(len(subset))
    return [subset[i] for i in perm]


def stage_batches(
    p: StagePlan, subset: Sequence[int], *, seed: int, batch_size: int, shuffle: bool = True
) -> list[list[int]]:
    """The global batch of every planned step of stage `p`, in order: entry k is the batch of
    step_in_stage k. Each epoch is `epoch_order` cut into batches of `batch_size` (the last,
    partial batch kept), exactly the batches `train_step.run_curriculum` takes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}; must be >= 1")
    out: list[list[int]] = []
    epoch = 0
    while len(out) < p.total_steps:
        idx = epoch_order(subset, seed=seed, stage=p.stage, epoch=epoch, shuffle=shuffle)
        for start in range(0, len(idx), batch_size):
            if len(out) == p.total_steps:
                break
            out.append(list(idx[start : start + batch_size]))
        epoch += 1
    if p.samples is not None:  # mode none: end at exactly the curriculum's sample visits
        extra = sum(map(len, out)) - p.samples
        out[-1] = out[-1][: len(out[-1]) - extra]
    return out


def worker_share(rows: Sequence[int], world_size: int, rank: int) -> list[int]:
    """Rank `rank`'s part of one global batch: contiguous, sizes differing by at most one.

    A full batch of world_size · b rows gives every rank b rows; a partial last batch of r
    rows gives the first r mod world_size ranks one row more (and a rank nothing when
    r < world_size: it then takes part in the step with no tokens).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: got {rank}; world_size {world_size} has ranks 0..{world_size - 1}")
    base, extra = divmod(len(rows), world_size)
    start = rank * base + min(rank, extra)
    return list(rows[start : start + base + (rank < extra)])


def difficulty_buckets(
    difficulty_rank: Sequence[int] | np.ndarray, sizes: Sequence[int]
) -> np.ndarray:
    """Bucket of each sample: the first stage whose (easiest-first) subset holds it. (N,) -> (N,)

    With cumulative `sizes` of the pocl partition, bucket 0 = the easiest sizes[0] samples,
    bucket b = ranks sizes[b-1]+1 .. sizes[b]. Used to report the training loss per difficulty
    bucket whatever the curriculum mode.
    """
    ranks = np.asarray(difficulty_rank)
    if len(ranks) and (ranks.min() < 1 or ranks.max() > sizes[-1]):
        raise ValueError(f"difficulty_rank must lie in 1..{sizes[-1]}")
    return np.searchsorted(np.asarray(sizes), ranks, side="left")


def on_policy_seed(seed: int, step: int, ratio: float) -> int | None:
    """Whether global step `step` is an on-policy step (probability `ratio`, pocl-method.md
    section 6): the sampling seed for it, or None. A pure function of (seed, step), so a
    resumed run makes the same choices and samples the same responses.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio: got {ratio}; allowed 0..1")
    if ratio == 0.0:
        return None
    rng = np.random.default_rng([seed, 0x6F6E, step])
    if rng.random() >= ratio:
        return None
    return int(rng.integers(2**31))


# ---------------------------------------------------------------- step → position, LR


@dataclass(frozen=True, kw_only=True)
class Position:
    """Where one optimizer step is in the plan, and the knobs to use for it."""

    stage: int
    epoch: int
    """Epoch within the stage (0-based); in unit steps the last epoch may be partial."""
    step_in_epoch: int
    """Batch index within the epoch order."""
    step_in_stage: int
    global_step: int
    tau: float
    kd_ratio: float
    alpha: float
    lr_mult: float
    """Multiply the base LR by this for the step."""


def cosine_lr_mult(t: int, total: int, min_ratio: float = 0.0, warmup: int = 0) -> float:
    """LR multiplier at step t of a `total`-step schedule: linear warmup, then cosine decay.

    Warmup: (t + 1) / warmup for t < warmup (nanochat: the first step is not at LR 0).
    Then min_ratio + (1 − min_ratio) · ½ · (1 + cos(π · u / U)), u = t − warmup, U = total −
    warmup, so the first decay step is at 1.0 and the floor is approached, never reached.
    A warmup longer than the schedule leaves it warming up to the end.
    """
    if not 0 <= t < total:
        raise ValueError(f"t: got {t}; a {total}-step schedule has steps 0..{total - 1}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio: got {min_ratio}; allowed 0..1")
    if t < warmup:
        return (t + 1) / warmup
    u, span = t - warmup, total - warmup
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * u / span))


def resets_optimizer(lr_policy: LRPolicy) -> bool:
    """Whether a new stage starts with a fresh AdamW (the authors' recipe: per_stage)."""
    if lr_policy not in LR_POLICIES:
        raise ValueError(f"lr_policy: got {lr_policy!r}; allowed {', '.join(LR_POLICIES)}")
    return lr_policy == "per_stage"


def stage_position(
    plan: Sequence[StagePlan],
    stage: int,
    step_in_stage: int,
    *,
    lr_policy: LRPolicy,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    steps_before_stage: int | None = None,
) -> Position:
    """Position of step `step_in_stage` of `stage`, for callers that track the stage themselves
    (the plateau trigger can end a stage early, so the global step no longer determines it).

    steps_before_stage: steps actually taken before this stage, for `global_step` (None = the
    planned count, i.e. no stage was cut short). The LR schedule always follows the *plan*:
    per_stage restarts at each stage anyway; continuous is indexed by planned stage start +
    step_in_stage, so when a stage is cut short its remaining planned steps are skipped in the
    LR schedule too, and the next stage starts at the LR it would have had on schedule.
    """
    if not 0 <= stage < len(plan):
        raise ValueError(f"stage: got {stage}; the plan has stages 0..{len(plan) - 1}")
    p = plan[stage]
    if not 0 <= step_in_stage < p.total_steps:
        raise ValueError(
            f"step_in_stage: got {step_in_stage}; stage {stage} has steps 0..{p.total_steps - 1}"
        )
    planned_start = stage_start_steps(plan)[stage]
    if resets_optimizer(lr_policy):
        lr_mult = cosine_lr_mult(step_in_stage, p.total_steps, min_lr_ratio, warmup_steps)
    else:
        t = planned_start + step_in_stage
        lr_mult = cosine_lr_mult(t, total_steps(plan), min_lr_ratio, warmup_steps)
    before = planned_start if steps_before_stage is None else steps_before_stage
    return Position(
        stage=stage,
        epoch=step_in_stage // p.steps_per_epoch,
        step_in_epoch=step_in_stage % p.steps_per_epoch,
        step_in_stage=step_in_stage,
        global_step=before + step_in_stage,
        tau=p.tau,
        kd_ratio=p.kd_ratio,
        alpha=p.alpha,
        lr_mult=lr_mult,
    )


def position_at(
    plan: Sequence[StagePlan],
    global_step: int,
    *,
    lr_policy: LRPolicy,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
) -> Position:
    """Position of the 0-based global step about to be taken, when stages run as planned.

    min_lr_ratio is optim.min_lr / optim.lr; warmup_steps applies per stage (per_stage) or once
    at the start (continuous).
    """
    end = total_steps(plan)
    if not 0 <= global_step < end:
        raise ValueError(f"global_step: got {global_step}; the plan has steps 0..{end - 1}")
    starts = stage_start_steps(plan)
    stage = bisect.bisect_right(starts, global_step) - 1
    return stage_position(
        plan,
        stage,
        global_step - starts[stage],
        lr_policy=lr_policy,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
    )


# ---------------------------------------------------------------- plateau trigger


class PlateauTracker:
    """Says when a dev metric has stopped improving, to advance to the next stage early.

    `update` returns True once the metric has gone `patience` consecutive evaluations without
    being strictly better than the best so far (and keeps returning True until an improvement
    or `reset`). Call `reset` at every stage change: a bigger subset starts a new comparison.
    In the last stage a True means there is nothing left to add: stop training.
    """

    def __init__(self, patience: int, mode: Literal["min", "max"] = "min"):
        if patience < 1:
            raise ValueError(f"patience: got {patience}; must be >= 1")
        if mode not in ("min", "max"):
            raise ValueError(f"mode: got {mode!r}; allowed 'min', 'max'")
        self.patience = patience
        self.mode = mode
        self.reset()

    def reset(self) -> None:
        self.best: float | None = None
        self.num_bad = 0

    def _improves(self, metric: float) -> bool:
        if math.isnan(metric):  # NaN compares False both ways; it must never become the best
            return False
        if self.best is None:
            return True
        return metric < self.best if self.mode == "min" else metric > self.best

    def update(self, metric: float) -> bool:
        """Record one evaluation; True when the plateau trigger fires."""
        metric = float(metric)
        if self._improves(metric):
            self.best, self.num_bad = metric, 0
        else:
            self.num_bad += 1
        return self.num_bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "num_bad": self.num_bad}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.num_bad = int(state["num_bad"])
