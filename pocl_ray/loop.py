"""The curriculum loop: one stage of steps (shared by the plain loop and the Ray Train worker),
the typed stage progress, the plain single-process loop built on them, and SFT.

`train_stage` is the loop both paths run: the plain loop (`run_curriculum`) feeds it batches
cut from in-memory examples, the Ray worker feeds it its shard's rows and hooks in what
only it needs (the cross-rank sums, logging on rank 0, checkpoints). So a one-worker Ray run
takes exactly the plain loop's steps. The LR is a pure function of the curriculum position
(`curriculum.stage_position`): the position is the whole LR-scheduler state.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pocl_ray import curriculum, difficulty, models
from pocl_ray.config import Config
from pocl_ray.data import TokenizedExample, collate
from pocl_ray.evaluation import new_token_budget
from pocl_ray.losses import ce_loss
from pocl_ray.train_step import (
    DataParallel,
    OnPolicy,
    StepResult,
    decay_groups,
    make_optimizer,
    mixed_precision,
    response_logits,
    train_step,
    training_mode,
)

log = logging.getLogger("pocl_ray.train")
SFT_LOG_EVERY = 25
"""`sft` logs its step and loss every this many steps."""


# ---------------------------------------------------------------- stage progress


@dataclass(kw_only=True)
class StageProgress:
    """What a stage summary is made of: sums over one stage's steps, this rank's until
    `reduced` sums them over all ranks. Token-weighted, so summed sums stay exact."""

    num_buckets: int
    # sums of token-weighted values: CE · its tokens (the reference response tokens), KD · its
    # tokens (reference ones, or the student's samples on on-policy steps), and those counts
    ce_sum: float = 0.0
    kd_sum: float = 0.0
    tokens: float = 0.0
    kd_tokens: float = 0.0
    rows: float = 0.0  # samples visited
    on_policy_steps: float = 0.0  # counted once per step, not once per rank
    seconds: float = 0.0  # Σ step seconds / world size: summed over ranks, the mean step time
    bucket_loss: list[float] = field(default_factory=list)
    """Per difficulty bucket: Σ of its rows' summed mixed loss."""
    bucket_tokens: list[float] = field(default_factory=list)
    bucket_rows: list[float] = field(default_factory=list)

    def __post_init__(self):
        for name in ("bucket_loss", "bucket_tokens", "bucket_rows"):
            if not getattr(self, name):
                setattr(self, name, [0.0] * self.num_buckets)

    def add(self, res: StepResult, buckets: Sequence[int], seconds: float, world: int) -> None:
        """One step of this rank: its result, its rows' difficulty buckets, its time."""
        self.ce_sum += res.ce * res.tokens
        self.kd_sum += res.kd * res.kd_tokens
        self.tokens += res.tokens
        self.kd_tokens += res.kd_tokens
        self.rows += len(buckets)
        self.on_policy_steps += res.on_policy / world  # every rank counts the same step
        self.seconds += seconds / world
        for r, b in enumerate(buckets):
            self.bucket_rows[b] += 1
            if res.row_loss is not None:
                self.bucket_loss[b] += res.row_loss[r]
                self.bucket_tokens[b] += res.row_tokens[r]

    def _flat(self) -> list[float]:
        scalars = [self.ce_sum, self.kd_sum, self.tokens, self.kd_tokens, self.rows]
        scalars += [self.on_policy_steps, self.seconds]
        return scalars + self.bucket_loss + self.bucket_tokens + self.bucket_rows

    def reduced(self, all_sum: Callable[[list[float]], list[float]]) -> StageProgress:
        """The sums over every rank (`all_sum` = an all-reduce; identity on one process)."""
        flat, n = all_sum(self._flat()), self.num_buckets
        return StageProgress(
            num_buckets=n,
            ce_sum=flat[0],
            kd_sum=flat[1],
            tokens=flat[2],
            kd_tokens=flat[3],
            rows=flat[4],
            on_policy_steps=flat[5],
            seconds=flat[6],
            bucket_loss=flat[7 : 7 + n],
            bucket_tokens=flat[7 + n : 7 + 2 * n],
            bucket_rows=flat[7 + 2 * n :],
        )

    def gather(self, all_sum: Callable[[list[float]], list[float]], *, keep: bool) -> None:
        """In place: the sums over every rank where `keep` (rank 0), zero elsewhere, so a
        checkpoint holds the stage so far once and every rank goes on adding to it."""
        total = self.reduced(all_sum)  # every rank takes part in the all-reduce
        if not keep:
            total = StageProgress(num_buckets=self.num_buckets)
        for name, value in vars(total).items():
            setattr(self, name, value)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> StageProgress:
        return cls(**state)

    def summary(self, p: curriculum.StagePlan, *, steps: int, ended_by: str) -> dict:
        """The stage summary of stages.json (docs/distill.md)."""
        ce = self.ce_sum / self.tokens if self.tokens else float("nan")
        kd = self.kd_sum / self.kd_tokens if self.kd_tokens else 0.0
        buckets = [
            {
                "bucket": b,
                "rows": int(self.bucket_rows[b]),
                "tokens": int(self.bucket_tokens[b]),
                "loss": self.bucket_loss[b] / self.bucket_tokens[b]
                if self.bucket_tokens[b]
                else None,
            }
            for b in range(self.num_buckets)
        ]
        return {
            "stage": p.stage,
            "size": p.size,
            "fraction": p.fraction,
            "tau": p.tau,
            "kd_ratio": p.kd_ratio,
            "alpha": p.alpha,
            "planned_steps": p.total_steps,
            "steps": steps,
            "epochs": steps / p.steps_per_epoch,
            "ended_by": ended_by,
            "samples": int(self.rows),
            "tokens": int(self.tokens),
            "loss": (1 - p.kd_ratio) * ce + p.kd_ratio * kd,
            "ce": ce,
            "kd": kd,
            "on_policy_steps": round(self.on_policy_steps),
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "buckets": buckets,
        }


# ---------------------------------------------------------------- one stage


@dataclass(kw_only=True)
class Step:
    """One planned step's data on this rank: the collated batch (on the model's device) and
    each row's difficulty bucket (no rows: a rank left empty by a small last batch)."""

    batch: dict[str, torch.Tensor]
    buckets: list[int]


@dataclass(kw_only=True)
class Hooks:
    """What a caller adds to `train_stage` (the Ray worker: cross-rank sums, a plateau
    verdict shared by every rank, logging and checkpoints after a step, a test fault)."""

    data_parallel: DataParallel | None = None
    agree: Callable[[bool], bool] = lambda fired: fired
    before_step: Callable[[curriculum.Position], None] = lambda pos: None
    after_step: Callable[[curriculum.Position, StepResult, Step, float], None] = lambda *a: None


def evaluates_dev(cur, steps_taken: int, p: curriculum.StagePlan) -> bool:
    """Whether the plateau trigger evaluates after `steps_taken` steps of stage `p`:
    every `eval_every` steps, or at every epoch end when eval_every is 0."""
    every = cur.eval_every or p.steps_per_epoch
    return steps_taken % every == 0


def train_stage(
    model: torch.nn.Module,
    module: torch.nn.Module,
    teacher: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    step_data: Callable[[int], Step],
    *,
    cfg: Config,
    plan: Sequence[curriculum.StagePlan],
    stage: int,
    start: int,
    steps_before: int,
    progress: StageProgress,
    tracker: curriculum.PlateauTracker | None,
    dev: Sequence[TokenizedExample],
    pad_id: int,
    eos_ids: Sequence[int],
    hooks: Hooks,
) -> tuple[int, str]:
    """Train steps `start`.. of stage `stage`; returns (steps taken, "interval" | "plateau").

    model: what is trained (DDP-wrapped on several ranks); module: the student itself, which
    samples on-policy responses and is evaluated for the plateau trigger.
    step_data(k): the batch of step k of the stage on this rank.
    steps_before: global steps taken before this stage (the plateau may cut stages short).
    """
    cur, opt = cfg.curriculum, cfg.optim
    p = plan[stage]
    world = hooks.data_parallel.world_size if hooks.data_parallel else 1
    for k in range(start, p.total_steps):
        pos = curriculum.stage_position(
            plan,
            stage,
            k,
            lr_policy=cur.lr_policy,
            warmup_steps=opt.warmup_steps,
            min_lr_ratio=opt.min_lr / opt.lr,
            steps_before_stage=steps_before,
        )
        hooks.before_step(pos)
        t0 = time.perf_counter()
        step = step_data(k)
        seed = curriculum.on_policy_seed(cfg.run.training_seed, pos.global_step,
                                         cfg.loss.on_policy_ratio)  # fmt: skip
        res = train_step(
            model,
            teacher,
            optimizer,
            step.batch,
            pos=pos,
            base_lr=opt.lr,
            loss=cfg.loss,
            grad_clip=opt.grad_clip,
            data_parallel=hooks.data_parallel,
            per_row=seed is None,
            on_policy=None if seed is None else on_policy_spec(cfg, seed, pad_id, eos_ids, module),
            autocast=opt.autocast,
        )
        seconds = time.perf_counter() - t0
        progress.add(res, step.buckets, seconds, world)
        hooks.after_step(pos, res, step, seconds)
        if tracker is not None and evaluates_dev(cur, k + 1, p):
            if hooks.agree(tracker.update(mean_ce(module, dev, pad_id))):
                log.info("stage %d: dev CE plateaued at step %d of the stage", stage, k + 1)
                return k + 1, "plateau"
    return p.total_steps, "interval"


def on_policy_spec(
    cfg: Config,
    seed: int,
    pad_id: int,
    eos_ids: Sequence[int],
    generator: torch.nn.Module | None = None,
) -> OnPolicy:
    """The on-policy settings of `cfg` for one step with sampling seed `seed`: samples fit
    the training sequence budget (data.max_length) after the longest allowed prompt."""
    return OnPolicy(
        seed=seed,
        max_new_tokens=new_token_budget(
            cfg.loss.on_policy_max_new_tokens,
            positions=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
        ),
        pad_id=pad_id,
        eos_ids=tuple(eos_ids),
        generator=generator,
    )


def seed_training(seed: int, rank: int = 0) -> None:
    """Seed torch's global RNG (dropout) at the start of training, from the run seed and the
    data-parallel rank: the plain loop and a Ray worker of rank 0 draw the same masks."""
    torch.manual_seed(int(np.random.SeedSequence([seed, 0x64726F70, rank]).generate_state(1)[0]))


def log_row(pos: curriculum.Position, res: StepResult, base_lr: float, seconds: float) -> dict:
    """One metrics row of a step (the Ray worker adds its cross-rank fields)."""
    return {
        "step": pos.global_step,
        "stage": pos.stage,
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "step_in_stage": pos.step_in_stage,
        "tau": pos.tau,
        "kd_ratio": pos.kd_ratio,
        "alpha": pos.alpha,
        "lr": base_lr * pos.lr_mult,
        "loss": res.loss,
        "ce": res.ce,
        "kd": res.kd,
        "tokens": res.tokens,
        "on_policy": res.on_policy,
        "tokens_per_s": res.tokens / max(seconds, 1e-9),
    }


# ---------------------------------------------------------------- the plain loop


def run_curriculum(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    examples: Sequence[TokenizedExample],
    difficulty_rank: Sequence[int],
    cfg: Config,
    *,
    pad_id: int,
    dev_examples: Sequence[TokenizedExample] = (),
    on_step: Callable[[dict], None] | None = None,
    on_stage: Callable[[dict], None] | None = None,
    eos_ids: Sequence[int] = (),
) -> list[dict]:
    """Run the whole curriculum of `cfg` over in-memory examples; returns the per-step log.

    `difficulty_rank[i]` is example i's rank (1 = easiest); it also gives each row's
    difficulty bucket for the stage summaries (`on_stage`, as in stages.json).
    eos_ids: the tokenizer's end-of-answer ids for on-policy samples (the student's own are
        added, `models.eos_token_ids`).
    """
    cur, opt = cfg.curriculum, cfg.optim
    n = len(examples)
    plan = curriculum.stage_table(cur, n=n, batch_size=opt.batch_size, loss_alpha=cfg.loss.alpha)
    ids = [e.sample_id for e in examples]
    order = curriculum.stage_order(difficulty_rank, ids, mode=cur.mode, seed=cfg.run.training_seed)
    subsets = curriculum.stage_subsets(order, [p.size for p in plan])
    sizes = difficulty.stage_sizes(n, cur.num_stages, cur.fractions)
    buckets = curriculum.difficulty_buckets(difficulty_rank, sizes).tolist()
    eos_ids = tuple(dict.fromkeys([*eos_ids, *models.eos_token_ids(student)]))
    device = next(student.parameters()).device
    training_mode(student, cfg.optim.gradient_checkpointing)
    seed_training(cfg.run.training_seed)
    history: list[dict] = []

    def record(pos, res, step, seconds):
        history.append(log_row(pos, res, opt.lr, seconds))
        if on_step is not None:
            on_step(history[-1])

    optimizer = make_optimizer(student, opt)
    steps_done = 0
    for p in plan:
        if p.stage > 0 and curriculum.resets_optimizer(cur.lr_policy):
            optimizer = make_optimizer(student, opt)
        batches = curriculum.stage_batches(
            p, subsets[p.stage], seed=cfg.run.training_seed, batch_size=opt.batch_size,
            shuffle=cur.shuffle,
        )

        def step_data(k: int, batches=batches) -> Step:
            batch = collate([examples[i] for i in batches[k]], pad_id)
            batch = {key: v.to(device) for key, v in batch.items()}
            return Step(batch=batch, buckets=[buckets[i] for i in batches[k]])

        progress = StageProgress(num_buckets=len(sizes))
        tracker = None
        if cur.plateau_patience and dev_examples:
            tracker = curriculum.PlateauTracker(cur.plateau_patience)
        steps, ended_by = train_stage(
            student,
            student,
            teacher,
            optimizer,
            step_data,
            cfg=cfg,
            plan=plan,
            stage=p.stage,
            start=0,
            steps_before=steps_done,
            progress=progress,
            tracker=tracker,
            dev=dev_examples,
            pad_id=pad_id,
            eos_ids=eos_ids,
            hooks=Hooks(after_step=record),
        )
        steps_done += steps
        if on_stage is not None:
            on_stage(progress.summary(p, steps=steps, ended_by=ended_by))
    return history


# ---------------------------------------------------------------- dev loss and SFT


def batches(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches of an epoch order; the last, partial batch is kept."""
    return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


@torch.no_grad()
def mean_ce(
    model: torch.nn.Module, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int = 64
) -> float:
    """Token-mean response cross-entropy over `examples` (the dev metric of the plateau trigger)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for idx in batches(range(len(examples)), batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        logits, targets, _ = response_logits(model, batch)
        n = len(targets)
        total += ce_loss(logits, targets, targets >= 0).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def sft(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    pad_id: int,
    seed: int = 0,
    weight_decay: float = 0.01,
    on_epoch: Callable[[int, float], None] | None = None,
    autocast: str | None = None,
    gradient_checkpointing: bool = False,
) -> list[float]:
    """Supervised fine-tuning (CE only), cosine LR decay to 0; returns the mean loss per epoch.
    autocast: forward passes under `mixed_precision` at this dtype (optim.autocast).
    gradient_checkpointing: `training_mode` (optim.gradient_checkpointing)."""
    opt = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr)
    device = next(model.parameters()).device
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    training_mode(model, gradient_checkpointing)
    losses = []
    step = 0
    for epoch in range(epochs):
        order = curriculum.epoch_order(list(range(len(examples))), seed=seed, stage=0, epoch=epoch)
        epoch_loss = 0.0
        for batch_idx in batches(order, batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * curriculum.cosine_lr_mult(
                    step, total, 0.0, warmup=min(20, total // 10)
                )
            batch = collate([examples[i] for i in batch_idx], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with mixed_precision(model, autocast):
                logits, targets, _ = response_logits(model, batch)
                loss = ce_loss(logits, targets, targets >= 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            epoch_loss += loss.item()
            step += 1
            if step % SFT_LOG_EVERY == 0 or step == total:  # long SFTs show they are moving
                log.info("sft: step %d/%d (epoch %d/%d) loss %.4f", step, total, epoch + 1,
                         epochs, loss.item())  # fmt: skip
        losses.append(epoch_loss / steps_per_epoch)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses
