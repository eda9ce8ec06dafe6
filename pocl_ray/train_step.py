"""One optimisation step and the plain single-process curriculum loop.

The loop here is the reference semantics: the Ray Train job runs the same steps (same batch
order, same τ/λ/LR per step) with the data coming from Ray Data shards instead of a list.
The LR is a pure function of the curriculum position (curriculum.stage_position), so the
"LR scheduler state" is the position itself.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pocl_ray import curriculum
from pocl_ray.config import Config, LossConfig, OptimConfig
from pocl_ray.data import TokenizedExample, collate
from pocl_ray.losses import ce_loss, kd_loss, mixed_loss

log = logging.getLogger("pocl_ray.train")


@dataclass(kw_only=True)
class StepResult:
    loss: float
    ce: float
    kd: float
    tokens: int
    grad_norm: float


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=optim.lr,
        weight_decay=optim.weight_decay,
    )


def shifted(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align for next-token prediction: logits at t predict labels at t+1.

    logits (B, L, V), labels (B, L) → logits (B, L-1, V), labels (B, L-1), mask (B, L-1).
    """
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != -100


def compute_losses(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    *,
    tau: float,
    kd_ratio: float,
    alpha: float,
    loss: LossConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(total, ce, kd, response tokens) for one batch; KD is skipped when λ = 0 or no teacher."""
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits, targets, mask = shifted(out.logits, batch["labels"])
    ce = ce_loss(logits, targets, mask)
    if teacher is None or kd_ratio == 0.0:
        kd = torch.zeros((), dtype=torch.float32, device=ce.device)
    else:
        with torch.no_grad():
            t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        kd = kd_loss(
            logits,
            t_out.logits[:, :-1],
            mask,
            kind=loss.kind,
            temperature=tau,
            scale_by_tau_sq=loss.scale_by_tau_sq,
            alpha=alpha,
            beta=loss.beta,
            chunk_size=loss.chunk_size,
        )
    return mixed_loss(ce, kd, kd_ratio), ce, kd, int(mask.sum())


def train_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    *,
    pos: curriculum.Position,
    base_lr: float,
    loss: LossConfig,
    grad_clip: float,
) -> StepResult:
    """Student forward, teacher forward (no grad), CE + KD at the stage's τ and λ, clip, step."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * pos.lr_mult
    total, ce, kd, tokens = compute_losses(
        student, teacher, batch, tau=pos.tau, kd_ratio=pos.kd_ratio, alpha=pos.alpha, loss=loss
    )
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    optimizer.step()
    return StepResult(
        loss=total.item(), ce=ce.item(), kd=kd.item(), tokens=tokens, grad_norm=float(norm)
    )


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
    for idx in batches(range(len(examples)), batch_size):
        batch = collate([examples[i] for i in idx], pad_id)
        logits, targets, mask = shifted(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
        )
        n = int(mask.sum())
        total += ce_loss(logits, targets, mask).item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


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
    shuffle: bool = True,
) -> list[dict]:
    """Run the whole curriculum of `cfg` over in-memory examples; returns the per-step log.

    `difficulty_rank[i]` is example i's rank (1 = easiest). Each log row holds step, stage,
    epoch, step_in_epoch, tau, kd_ratio, lr, loss, ce, kd, tokens, tokens_per_s.
    """
    cur, opt_cfg = cfg.curriculum, cfg.optim
    plan = curriculum.stage_table(
        cur, n=len(examples), batch_size=opt_cfg.batch_size, loss_alpha=cfg.loss.alpha
    )
    order = curriculum.stage_order(
        difficulty_rank, [e.sample_id for e in examples], mode=cur.mode, seed=cfg.run.seed
    )
    subsets = curriculum.stage_subsets(order, [p.size for p in plan])
    min_ratio = opt_cfg.min_lr / opt_cfg.lr
    student.train()
    history: list[dict] = []
    optimizer = make_optimizer(student, opt_cfg)
    steps_done = 0
    for p in plan:
        if p.stage > 0 and curriculum.resets_optimizer(cur.lr_policy):
            optimizer = make_optimizer(student, opt_cfg)
        tracker = curriculum.PlateauTracker(cur.plateau_patience) if cur.plateau_patience else None
        stage_steps = _run_stage(
            student,
            teacher,
            optimizer,
            examples,
            subsets[p.stage],
            plan,
            p,
            cfg,
            pad_id=pad_id,
            min_ratio=min_ratio,
            steps_before=steps_done,
            history=history,
            on_step=on_step,
            shuffle=shuffle,
            tracker=tracker,
            dev_examples=dev_examples,
        )
        steps_done += stage_steps
    return history


def _run_stage(
    student,
    teacher,
    optimizer,
    examples,
    subset,
    plan,
    p,
    cfg,
    *,
    pad_id,
    min_ratio,
    steps_before,
    history,
    on_step,
    shuffle,
    tracker,
    dev_examples,
) -> int:
    """Train one stage; returns the steps taken (fewer than planned if the plateau fired)."""
    cur, opt_cfg = cfg.curriculum, cfg.optim
    step_in_stage = 0
    for epoch in range(math.ceil(p.total_steps / p.steps_per_epoch)):
        idx = curriculum.epoch_order(
            subset, seed=cfg.run.seed, stage=p.stage, epoch=epoch, shuffle=shuffle
        )
        for batch_idx in batches(idx, opt_cfg.batch_size):
            if step_in_stage == p.total_steps:
                return step_in_stage
            pos = curriculum.stage_position(
                plan,
                p.stage,
                step_in_stage,
                lr_policy=cur.lr_policy,
                warmup_steps=opt_cfg.warmup_steps,
                min_lr_ratio=min_ratio,
                steps_before_stage=steps_before,
            )
            t0 = time.perf_counter()
            batch = collate([examples[i] for i in batch_idx], pad_id)
            res = train_step(
                student,
                teacher,
                optimizer,
                batch,
                pos=pos,
                base_lr=opt_cfg.lr,
                loss=cfg.loss,
                grad_clip=opt_cfg.grad_clip,
            )
            row = _log_row(pos, res, opt_cfg.lr, time.perf_counter() - t0)
            history.append(row)
            if on_step is not None:
                on_step(row)
            step_in_stage += 1
            if cur.eval_every and step_in_stage % cur.eval_every == 0:
                if _plateaued(tracker, student, dev_examples, pad_id, p.stage, step_in_stage):
                    return step_in_stage
        if not cur.eval_every:  # 0 = evaluate once per epoch
            if _plateaued(tracker, student, dev_examples, pad_id, p.stage, step_in_stage):
                return step_in_stage
    return step_in_stage


def _plateaued(tracker, student, dev_examples, pad_id: int, stage: int, step: int) -> bool:
    """One dev evaluation for the plateau trigger (False when the trigger is off)."""
    if tracker is None or not dev_examples:
        return False
    if tracker.update(mean_ce(student, dev_examples, pad_id)):
        log.info("stage %d: dev CE plateaued at step %d of the stage; advancing", stage, step)
        return True
    return False


def _log_row(pos: curriculum.Position, res: StepResult, base_lr: float, seconds: float) -> dict:
    return {
        "step": pos.global_step,
        "stage": pos.stage,
        "epoch": pos.epoch,
        "step_in_epoch": pos.step_in_epoch,
        "tau": pos.tau,
        "kd_ratio": pos.kd_ratio,
        "lr": base_lr * pos.lr_mult,
        "loss": res.loss,
        "ce": res.ce,
        "kd": res.kd,
        "tokens": res.tokens,
        "tokens_per_s": res.tokens / max(seconds, 1e-9),
    }


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
) -> list[float]:
    """Supervised fine-tuning (CE only), cosine LR decay to 0; returns the mean loss per epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = epochs * steps_per_epoch
    model.train()
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
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits, targets, mask = shifted(out.logits, batch["labels"])
            loss = ce_loss(logits, targets, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            epoch_loss += loss.item()
            step += 1
        losses.append(epoch_loss / steps_per_epoch)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return losses
