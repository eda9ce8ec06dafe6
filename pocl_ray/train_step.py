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

import numpy as np
import torch
import torch.nn.functional as F

from pocl_ray import curriculum, models
from pocl_ray.config import Config, LossConfig, OptimConfig
from pocl_ray.data import IGNORE_INDEX, TokenizedExample, collate, prompt_batch
from pocl_ray.evaluation import new_token_budget
from pocl_ray.losses import (
    ce_loss,
    kd_loss,
    mixed_loss,
    per_token_kd,
    topk_kd_loss,
    topk_per_token_kd,
)

log = logging.getLogger("pocl_ray.train")


TOPK_IDS = "teacher_topk_ids"
"""Batch key (and scores-table column) of a cached teacher's top-K token ids, (B, L-1, K) long,
aligned with the shifted logits (see `topk_targets`); with it, TOPK_LOGPROBS, TOPK_TAIL and
TOPK_TAUS the KD term needs no teacher model (docs/distill.md)."""
TOPK_LOGPROBS = "teacher_topk_logprobs"
"""(B, L-1, K) float32: the teacher's T = 1 log-probabilities at those ids."""
TOPK_TAIL = "teacher_tail_logz"
"""(B, L-1, J) float32: log Σ over every other token of exp(log p / τ_j), per grid τ_j."""
TOPK_TAUS = "teacher_cache_taus"
"""(J,) float64: the grid τ_j of TOPK_TAIL (scoring.cache_taus); a batch key only."""
TOPK_CACHE = (TOPK_IDS, TOPK_LOGPROBS, TOPK_TAIL)
"""The per-position cache entries, in `losses.topk_kd_loss` argument order."""


@dataclass(kw_only=True)
class StepResult:
    loss: float
    ce: float
    kd: float
    tokens: int
    """Reference response tokens (the CE term's count)."""
    kd_tokens: int
    """Tokens the KD term averaged over (sampled ones on an on-policy step)."""
    grad_norm: float
    row_loss: list[float] | None = None
    """Per batch row: the sum of its tokens' mixed loss (1 − λ)·ce + λ·kd (with per_row)."""
    row_tokens: list[int] | None = None
    on_policy: bool = False


@dataclass(kw_only=True)
class LossTerms:
    """The loss of one batch: total = mixed_loss(ce, kd, λ), each a token mean."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    tokens: int
    """Tokens the CE term averages over (the reference responses)."""
    kd_tokens: int
    """Tokens the KD term averages over: the reference responses, or on an on-policy step the
    student's sampled responses (their counts differ per rank)."""
    row_loss: torch.Tensor | None = None
    """(B,) float32, no grad: each row's summed mixed loss over its response tokens."""
    row_tokens: torch.Tensor | None = None
    """(B,) long: each row's response tokens."""


@dataclass(kw_only=True)
class OnPolicy:
    """Make this step on-policy (pocl-method.md section 6): the student samples a response to
    each prompt of the batch and KD is computed on those responses."""

    seed: int
    """Sampling seed (`curriculum.on_policy_seed`), so a replayed step samples the same text."""
    max_new_tokens: int
    """Most tokens sampled per response, already clamped to the sequence budget
    (`evaluation.new_token_budget`)."""
    pad_id: int
    eos_ids: tuple[int, ...]
    """A sample ends at the first of these (`models.eos_token_ids`); empty = never early."""
    generator: torch.nn.Module | None = None
    """The model that samples, when the trained module wraps it (DDP's .module); None = the
    student itself."""


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices (linear and embedding weights), none
    on biases and norm weights (every 1-D parameter), as MiniLLM / DistiLLM do."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(decay_groups(model, optim.weight_decay), lr=optim.lr)


def shifted(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align for next-token prediction: logits at t predict labels at t+1.

    logits (B, L, V), labels (B, L) → logits (B, L-1, V), labels (B, L-1), mask (B, L-1).
    """
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != -100


def loss_terms(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    *,
    tau: float,
    kd_ratio: float,
    alpha: float,
    loss: LossConfig,
    per_row: bool = False,
) -> LossTerms:
    """CE + KD of one batch at the stage's τ, λ, α; with per_row also each row's loss.

    Teacher: `teacher` run on the batch (online), or the cached top-K in the batch
    (`topk_targets`: `topk_kd_loss`, the KD over the teacher's top-K tokens plus one bucket
    for all the others), or none (KD = 0).
    """
    cached = TOPK_IDS in batch
    if cached and teacher is not None:
        raise ValueError("give either a teacher model or a cached top-K in the batch, not both")
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits, targets, mask = shifted(out.logits, batch["labels"])
    ce = ce_loss(logits, targets, mask)
    kd_kwargs = dict(
        kind=loss.kind,
        temperature=tau,
        scale_by_tau_sq=loss.scale_by_tau_sq,
        alpha=alpha,
        beta=loss.beta,
    )
    t_logits = None
    if kd_ratio == 0.0 or (teacher is None and not cached):
        kd = torch.zeros((), dtype=torch.float32, device=ce.device)
    elif cached:
        cache, taus = [batch[k] for k in TOPK_CACHE], batch[TOPK_TAUS].tolist()
        kd = topk_kd_loss(logits, *cache, taus, mask, **kd_kwargs, chunk_size=loss.chunk_size)
    else:
        with torch.no_grad():
            t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t_logits = t_out.logits[:, :-1]
        kd = kd_loss(logits, t_logits, mask, **kd_kwargs, chunk_size=loss.chunk_size)
    n = int(mask.sum())
    terms = LossTerms(total=mixed_loss(ce, kd, kd_ratio), ce=ce, kd=kd, tokens=n, kd_tokens=n)
    if per_row:
        kd_rows = None  # the KD inputs per masked token: (student rows, *teacher rows)
        if kd_ratio > 0.0 and cached:
            kd_rows = (logits[mask], *(batch[k][mask] for k in TOPK_CACHE))
        elif kd_ratio > 0.0 and t_logits is not None:
            kd_rows = (logits[mask], t_logits[mask])
        terms.row_loss = _row_loss(
            logits,
            kd_rows,
            targets,
            mask,
            tau=tau,
            kd_ratio=kd_ratio,
            alpha=alpha,
            loss=loss,
            cache_taus=batch[TOPK_TAUS].tolist() if cached else None,
        )
        terms.row_tokens = mask.sum(dim=1)
    return terms


@torch.no_grad()
def _row_loss(
    logits: torch.Tensor,
    kd_rows: tuple[torch.Tensor, ...] | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    kd_ratio: float,
    alpha: float,
    loss: LossConfig,
    cache_taus: list[float] | None = None,
) -> torch.Tensor:
    """Each row's summed per-token (1 − λ)·ce + λ·kd (τ² as configured). (B, L, V) -> (B,)

    The same per-token terms `ce_loss` and `kd_loss` / `topk_kd_loss` average, so the rows'
    sums over the batch tokens give back the batch loss; no gradient, KD in chunks of
    loss.chunk_size tokens. kd_rows: the KD inputs at the masked tokens, (student logits,
    teacher logits) online or (student logits, top-K ids, log-probs, tail) for a cached
    teacher whose grid is cache_taus; None when λ = 0 or there is no teacher.
    """
    rows = mask.nonzero()[:, 0]
    per_token = (1.0 - kd_ratio) * F.cross_entropy(
        logits[mask].float(), targets[mask], reduction="none"
    )
    if kd_rows is not None:
        knobs = dict(kind=loss.kind, temperature=tau, alpha=alpha, beta=loss.beta)
        chunk = loss.chunk_size or 4096
        parts = []
        for i in range(0, len(kd_rows[0]), chunk):
            piece = [x[i : i + chunk] for x in kd_rows]
            if cache_taus is None:
                parts.append(per_token_kd(*piece, **knobs))
            else:
                parts.append(topk_per_token_kd(*piece, cache_taus, **knobs))
        kd = torch.cat(parts or [per_token.new_zeros(0)])
        per_token = per_token + kd_ratio * kd * (tau**2 if loss.scale_by_tau_sq else 1.0)
    out = torch.zeros(mask.shape[0], dtype=torch.float32, device=per_token.device)
    return out.index_add_(0, rows, per_token)


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Response tokens the loss of `batch` averages over (labels after the shift)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def topk_targets(
    labels: torch.Tensor,
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    cache_taus: Sequence[float],
) -> dict[str, torch.Tensor]:
    """Place each row's cached teacher top-K at the shifted positions it belongs to.

    Args:
        labels: (B, L) long, as from `collate` (IGNORE_INDEX on prompt and padding).
        rows: per batch row, (ids (R_b, K), log-probs (R_b, K), tail (R_b, J)): entry j is the
            teacher's cache for the row's j-th response token (docs/scoring.md).
        cache_taus: the J grid temperatures of the tail (scoring.cache_taus).

    Returns:
        The batch entries TOPK_IDS (B, L-1, K) long, TOPK_LOGPROBS (B, L-1, K) float32,
        TOPK_TAIL (B, L-1, J) float32, aligned with `shifted` logits (position t holds the
        entry that predicts labels[t + 1]; zeros where masked out), and TOPK_TAUS (J,).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    k = max((np.shape(ids)[1] for ids, _, _ in rows if np.size(ids)), default=1)
    j = len(cache_taus)
    out = {
        TOPK_IDS: torch.zeros((*mask.shape, k), dtype=torch.long),
        TOPK_LOGPROBS: torch.zeros((*mask.shape, k), dtype=torch.float32),
        TOPK_TAIL: torch.zeros((*mask.shape, j), dtype=torch.float32),
    }
    for b, row in enumerate(rows):
        at = mask[b].nonzero()[:, 0]
        if len(at) != len(row[0]):
            raise ValueError(
                f"row {b}: the cache has {len(row[0])} teacher positions but the row has "
                f"{len(at)} response tokens; the cache was made from other tokenised rows"
            )
        if len(at) and np.shape(row[2])[1] != j:
            raise ValueError(
                f"row {b}: the cached tail has {np.shape(row[2])[1]} temperatures but "
                f"cache_taus has {j}; the cache was made with other scoring.cache_taus"
            )
        if len(at):
            for key, values, dtype in zip(out, row, (np.int64, np.float32, np.float32)):
                out[key][b, at] = torch.from_numpy(np.array(values, dtype=dtype))
    out[TOPK_TAUS] = torch.tensor([float(t) for t in cache_taus], dtype=torch.float64)
    return out


# ---------------------------------------------------------------- on-policy (pocl-method.md §6)


def _pad_width(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Right-pad (B, L) to (B, width)."""
    return F.pad(x, (0, width - x.shape[1]), value=value)


@torch.no_grad()
def on_policy_batch(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    pad_id: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The batch's prompts with responses sampled from `model` (T = 1, top-k 0, top-p 1).

    Returns a training batch in the `collate` layout (right padded, on the batch's device):
    labels hold each sampled token at its own position, up to and including the first token
    of `eos_ids` (any of them: Llama-3 and Qwen2.5 end answers with one of several), nothing
    after it, IGNORE_INDEX on the prompt. `shifted` then pairs the logits at t with the token
    at t + 1 like for reference data, so no label is one position off (the bug of the
    authors' code). Sampling uses its own generator state seeded by `seed`; the global RNG is
    left as it was.
    """
    labels, ids = batch["labels"].cpu(), batch["input_ids"].cpu()
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    prompts = []
    for b in range(ids.shape[0]):
        response = (labels[b] != IGNORE_INDEX).nonzero()
        plen = int(response[0, 0]) if len(response) else lengths[b]
        prompts.append(ids[b, :plen].tolist())
    device = batch["input_ids"].device
    input_ids, attention = prompt_batch(prompts, pad_id)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=list(eos_ids) or None,
        )
    model.train(was_training)
    examples = []
    for b, prompt in enumerate(prompts):
        sampled = cut_at_eos(out[b, input_ids.shape[1] :].tolist(), eos_ids)
        examples.append(
            TokenizedExample(
                sample_id="",
                input_ids=prompt + sampled,
                labels=[IGNORE_INDEX] * len(prompt) + sampled,
                prompt_length=len(prompt),
                prompt_truncated=False,
                response_truncated=False,
            )
        )
    return {k: v.to(device) for k, v in collate(examples, pad_id).items()}


def cut_at_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    """`tokens` up to and including the first member of `eos_ids` (all of them if none)."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def on_policy_terms(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    sampled: dict[str, torch.Tensor],
    *,
    pad_id: int,
    tau: float,
    kd_ratio: float,
    alpha: float,
    loss: LossConfig,
) -> LossTerms:
    """(1 − λ)·CE on the reference responses + λ·KD on the student's own samples.

    One student forward over both (stacked, padded to one width), so DDP sees one forward and
    one backward per step; the teacher runs on the sampled rows only. No CE term touches
    student-generated text (pocl-method.md section 6).
    """
    n = batch["input_ids"].shape[0]
    width = max(batch["input_ids"].shape[1], sampled["input_ids"].shape[1])
    pad = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    both = {
        k: torch.cat([_pad_width(batch[k], width, v), _pad_width(sampled[k], width, v)])
        for k, v in pad.items()
    }
    out = student(input_ids=both["input_ids"], attention_mask=both["attention_mask"])
    logits, targets, mask = shifted(out.logits, both["labels"])
    ce = ce_loss(logits[:n], targets[:n], mask[:n])
    if teacher is None or kd_ratio == 0.0:
        kd = torch.zeros((), dtype=torch.float32, device=ce.device)
    else:
        with torch.no_grad():
            t_logits = teacher(
                input_ids=both["input_ids"][n:], attention_mask=both["attention_mask"][n:]
            ).logits[:, :-1]
        kd = kd_loss(
            logits[n:],
            t_logits,
            mask[n:],
            kind=loss.kind,
            temperature=tau,
            scale_by_tau_sq=loss.scale_by_tau_sq,
            alpha=alpha,
            beta=loss.beta,
            chunk_size=loss.chunk_size,
        )
    return LossTerms(
        total=mixed_loss(ce, kd, kd_ratio),
        ce=ce,
        kd=kd,
        tokens=int(mask[:n].sum()),
        kd_tokens=int(mask[n:].sum()),
    )


@dataclass(kw_only=True)
class DataParallel:
    """This rank's view of a data-parallel step (Ray Train / DDP): how many ranks average
    their gradients, and a sum across ranks (all-reduce) the core can call."""

    world_size: int
    all_sum: Callable[[list[float]], list[float]]


def rank_loss(
    terms: LossTerms,
    kd_ratio: float,
    *,
    world_size: int,
    ce_tokens_all: float,
    kd_tokens_all: float,
) -> torch.Tensor:
    """The loss one rank backpropagates so that DDP's gradient average is the gradient of the
    global token means: (1 − λ)·CE·w·n_ce/N_ce + λ·KD·w·n_kd/N_kd. () -> ()

    Each term is a mean over its own tokens (CE over the reference responses, KD over the
    sampled ones on an on-policy step), so each is weighted by its own share of the global
    count; one shared factor would be wrong whenever the ranks' sampled lengths differ.
    """
    ce_scale = world_size * terms.tokens / ce_tokens_all if ce_tokens_all else 0.0
    kd_scale = world_size * terms.kd_tokens / kd_tokens_all if kd_tokens_all else 0.0
    return (1.0 - kd_ratio) * terms.ce * ce_scale + kd_ratio * terms.kd * kd_scale


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
    data_parallel: DataParallel | None = None,
    per_row: bool = False,
    on_policy: OnPolicy | None = None,
) -> StepResult:
    """Student forward, teacher forward (no grad), CE + KD at the stage's τ and λ, clip, step.

    data_parallel: this rank's part in a data-parallel step; the loss backpropagated is then
        `rank_loss` (the reported loss stays this rank's own token means).
    per_row: also return each row's summed loss and token count (`loss_terms`).
    on_policy: make this step on-policy (`on_policy_terms`; per-row results are then None).
    """
    for group in optimizer.param_groups:
        group["lr"] = base_lr * pos.lr_mult
    knobs = dict(tau=pos.tau, kd_ratio=pos.kd_ratio, alpha=pos.alpha, loss=loss)
    if on_policy is None:
        terms = loss_terms(student, teacher, batch, **knobs, per_row=per_row)
    else:
        sampled = on_policy_batch(
            on_policy.generator or student,
            batch,
            pad_id=on_policy.pad_id,
            eos_ids=on_policy.eos_ids,
            max_new_tokens=on_policy.max_new_tokens,
            seed=on_policy.seed,
        )
        terms = on_policy_terms(student, teacher, batch, sampled, pad_id=on_policy.pad_id, **knobs)
    backprop = terms.total
    if data_parallel is not None and data_parallel.world_size > 1:
        ce_all, kd_all = data_parallel.all_sum([terms.tokens, terms.kd_tokens])
        backprop = rank_loss(
            terms,
            pos.kd_ratio,
            world_size=data_parallel.world_size,
            ce_tokens_all=ce_all,
            kd_tokens_all=kd_all,
        )
    optimizer.zero_grad(set_to_none=True)
    backprop.backward()
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    optimizer.step()
    return StepResult(
        loss=terms.total.item(),
        ce=terms.ce.item(),
        kd=terms.kd.item(),
        tokens=terms.tokens,
        kd_tokens=terms.kd_tokens,
        grad_norm=float(norm),
        row_loss=None if terms.row_loss is None else terms.row_loss.tolist(),
        row_tokens=None if terms.row_tokens is None else terms.row_tokens.tolist(),
        on_policy=on_policy is not None,
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
    device = next(model.parameters()).device
    for idx in batches(range(len(examples)), batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
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
    shuffle: bool | None = None,
    eos_ids: Sequence[int] = (),
) -> list[dict]:
    """Run the whole curriculum of `cfg` over in-memory examples; returns the per-step log.

    `difficulty_rank[i]` is example i's rank (1 = easiest). Each log row holds step, stage,
    epoch, step_in_epoch, tau, kd_ratio, lr, loss, ce, kd, tokens, tokens_per_s.
    shuffle: reshuffle every epoch (None = cfg.curriculum.shuffle).
    eos_ids: the tokenizer's end-of-answer ids for on-policy samples (the student's own
        are added, `models.eos_token_ids`).
    """
    cur, opt_cfg = cfg.curriculum, cfg.optim
    shuffle = cur.shuffle if shuffle is None else shuffle
    plan = curriculum.stage_table(
        cur, n=len(examples), batch_size=opt_cfg.batch_size, loss_alpha=cfg.loss.alpha
    )
    order = curriculum.stage_order(
        difficulty_rank, [e.sample_id for e in examples], mode=cur.mode, seed=cfg.run.seed
    )
    subsets = curriculum.stage_subsets(order, [p.size for p in plan])
    min_ratio = opt_cfg.min_lr / opt_cfg.lr
    eos_ids = tuple(dict.fromkeys([*eos_ids, *models.eos_token_ids(student)]))
    student.train()
    seed_training(cfg.run.seed)
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
            eos_ids=eos_ids,
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
    eos_ids,
) -> int:
    """Train one stage; returns the steps taken (fewer than planned if the plateau fired)."""
    cur, opt_cfg = cfg.curriculum, cfg.optim
    device = next(student.parameters()).device
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
            batch = {k: v.to(device) for k, v in batch.items()}
            seed = curriculum.on_policy_seed(
                cfg.run.seed, pos.global_step, cfg.loss.on_policy_ratio
            )
            res = train_step(
                student,
                teacher,
                optimizer,
                batch,
                pos=pos,
                base_lr=opt_cfg.lr,
                loss=cfg.loss,
                grad_clip=opt_cfg.grad_clip,
                on_policy=None if seed is None else on_policy_spec(cfg, seed, pad_id, eos_ids),
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
    opt = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr)
    device = next(model.parameters()).device
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
            batch = {k: v.to(device) for k, v in batch.items()}
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
