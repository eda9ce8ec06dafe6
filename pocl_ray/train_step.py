"""One optimisation step: the loss of a batch (online teacher, cached top-K, or on-policy
samples), the data-parallel loss scaling, backward, clip, AdamW step. The loop over steps is
`loop.train_stage`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pocl_ray import curriculum
from pocl_ray.config import LossConfig, OptimConfig
from pocl_ray.data import IGNORE_INDEX, TokenizedExample, collate, example_from_row, prompt_batch
from pocl_ray.losses import (
    ce_loss,
    kd_loss,
    mixed_loss,
    topk_kd_loss,
    topk_per_token_kd,
)
from pocl_ray.models import head_at, head_positions, head_selectable
from pocl_ray.scores import TOPK_CACHE, TOPK_IDS, TOPK_LOGPROBS, TOPK_TAIL

TOPK_TAUS = "teacher_cache_taus"
"""Batch key of the cache's grid temperatures, (J,) float64 (scoring.cache_taus); the other
cache keys are the table's columns (`scores.TOPK_CACHE`), (B, L-1, ...) aligned with the
shifted logits (`topk_targets`)."""


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


def mixed_precision(model: torch.nn.Module, dtype: str | None):
    """torch.autocast at `dtype` (optim.autocast) on the model's device, or nothing: the
    forward's matmuls run at that precision while the float32 weights stay the master copy."""
    if dtype is None:
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def training_mode(model: torch.nn.Module, gradient_checkpointing: bool = False) -> None:
    """`model.train()`, with transformers' gradient checkpointing on or off as asked
    (optim.gradient_checkpointing; non-reentrant, which DDP and frozen inputs allow)."""
    model.train()
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    # transformers 5 renamed gradient_* to activation_checkpointing_* (the old names warn)
    renamed = hasattr(inner, "activation_checkpointing_enable")
    if gradient_checkpointing:
        if not getattr(inner, "supports_gradient_checkpointing", False):
            raise ValueError(f"optim.gradient_checkpointing: {type(inner).__name__} does not "
                             "support it; set it to false")  # fmt: skip
        kwargs = {"use_reentrant": False}
        if renamed:
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif checkpointing(inner):
        (inner.activation_checkpointing_disable if renamed
         else inner.gradient_checkpointing_disable)()  # fmt: skip


def checkpointing(model: torch.nn.Module) -> bool:
    """Whether a transformers model recomputes activations in backward (`training_mode`)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def shifted(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align for next-token prediction: logits at t predict labels at t+1.

    logits (B, L, V), labels (B, L) → logits (B, L-1, V), labels (B, L-1), mask (B, L-1).
    """
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != -100


def response_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's logits at the response positions only, their targets and batch rows:
    (N, V), (N,), (N,) with N the batch's response tokens, in `shifted` order (row-major).

    The head runs only there when `head_selectable`; otherwise the full forward is sliced,
    with the same result.
    """
    targets, mask = batch["labels"][:, 1:], batch["labels"][:, 1:] != IGNORE_INDEX
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if head_selectable(model):
        with head_at(model, head_positions(mask)):
            logits = model(**inputs).logits
    else:
        logits = model(**inputs).logits[:, :-1][mask]
    return logits, targets[mask], mask.nonzero()[:, 0]


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
    # logits only at the N response tokens (`response_logits`): every term below is a mean
    # over them, so the rest of the (B, L, V) logits would only cost time and memory
    logits, targets, rows = response_logits(student, batch)
    n = len(targets)
    everywhere = torch.ones(n, dtype=torch.bool, device=logits.device)
    ce = ce_loss(logits, targets, everywhere)
    kd_kwargs = dict(
        kind=loss.kind,
        temperature=tau,
        scale_by_tau_sq=loss.scale_by_tau_sq,
        alpha=alpha,
        beta=loss.beta,
    )
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    cache = [batch[k][mask] for k in TOPK_CACHE] if cached else None
    kd_per_token = None
    if kd_ratio == 0.0 or (teacher is None and not cached):
        kd = torch.zeros((), dtype=torch.float32, device=ce.device)
    elif cached:
        taus = batch[TOPK_TAUS].tolist()
        kd = topk_kd_loss(logits, *cache, taus, everywhere, **kd_kwargs,
                          chunk_size=loss.chunk_size)  # fmt: skip
    else:
        with torch.no_grad():
            t_logits, _, _ = response_logits(teacher, batch)
        # per_row: the per-token KD comes with the loss (no second pass, no row copies)
        kd, kd_per_token = kd_loss(logits, t_logits, everywhere, **kd_kwargs,
                                   chunk_size=loss.chunk_size, per_position_out=True)  # fmt: skip
    terms = LossTerms(total=mixed_loss(ce, kd, kd_ratio), ce=ce, kd=kd, tokens=n, kd_tokens=n)
    if per_row:
        terms.row_loss = _row_loss(
            logits,
            cache if kd_ratio > 0.0 else None,
            targets,
            rows,
            mask.shape[0],
            tau=tau,
            kd_ratio=kd_ratio,
            alpha=alpha,
            loss=loss,
            cache_taus=batch[TOPK_TAUS].tolist() if cached else None,
            kd_per_token=kd_per_token if kd_ratio > 0.0 else None,
        )
        terms.row_tokens = mask.sum(dim=1)
    return terms


@torch.no_grad()
def _row_loss(
    logits: torch.Tensor,
    cache: list[torch.Tensor] | None,
    targets: torch.Tensor,
    rows: torch.Tensor,
    num_rows: int,
    *,
    tau: float,
    kd_ratio: float,
    alpha: float,
    loss: LossConfig,
    cache_taus: list[float] | None = None,
    kd_per_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's summed per-token (1 − λ)·ce + λ·kd (τ² as configured). (N, V) -> (num_rows,)

    logits, targets, rows: the response tokens' logits, labels and batch rows
    (`response_logits`). The same per-token terms `ce_loss` and `kd_loss` / `topk_kd_loss`
    average, so the rows' sums give back the batch loss; no gradient, KD in chunks of
    loss.chunk_size tokens. cache: the cached teacher's (top-K ids, log-probs, tail) at the
    same tokens, whose grid is cache_taus; kd_per_token: the online KD per token (× τ² as
    configured), from `kd_loss`.
    """
    per_token = (1.0 - kd_ratio) * F.cross_entropy(logits.float(), targets, reduction="none")
    if cache is not None:
        knobs = dict(kind=loss.kind, temperature=tau, alpha=alpha, beta=loss.beta)
        chunk = loss.chunk_size or 4096
        parts = [
            topk_per_token_kd(
                logits[i : i + chunk], *(c[i : i + chunk] for c in cache), cache_taus, **knobs
            )  # fmt: skip
            for i in range(0, len(logits), chunk)
        ]
        kd = torch.cat(parts or [per_token.new_zeros(0)])
        per_token = per_token + kd_ratio * kd * (tau**2 if loss.scale_by_tau_sq else 1.0)
    if kd_per_token is not None:
        per_token = per_token + kd_ratio * kd_per_token
    out = torch.zeros(num_rows, dtype=torch.float32, device=per_token.device)
    return out.index_add_(0, rows, per_token)


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Response tokens the loss of `batch` averages over (labels after the shift)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


EMPTY_EXAMPLE = TokenizedExample(
    sample_id="", input_ids=[0, 0], labels=[IGNORE_INDEX] * 2, prompt_length=2,
    prompt_truncated=False, response_truncated=False,
)  # fmt: skip
"""What a data-parallel rank with no rows this step trains on: all masked, so it still runs
forward and backward with DDP, with zero tokens and zero loss."""


def table_batch(
    rows: Sequence[Mapping[str, Any]], pad_id: int, cache_taus: Sequence[float] | None
) -> dict[str, torch.Tensor]:
    """Scores-table rows as one collated batch; with cache_taus (scoring.cache_taus: the
    teacher is the table's top-K cache) the cache placed by `topk_targets`. No rows: one
    `EMPTY_EXAMPLE` with an empty cache."""
    batch = collate([example_from_row(r) for r in rows] or [EMPTY_EXAMPLE], pad_id)
    if cache_taus is not None:
        empty = (np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float16))
        cache = [tuple(r[c] for c in TOPK_CACHE) for r in rows] or [
            (*empty, np.zeros((0, len(cache_taus)), np.float32))
        ]
        batch.update(topk_targets(batch["labels"], cache, cache_taus))
    return batch


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
    autocast: str | None = None,
) -> StepResult:
    """Student forward, teacher forward (no grad), CE + KD at the stage's τ and λ, clip, step.

    data_parallel: this rank's part in a data-parallel step; the loss backpropagated is then
        `rank_loss` (the reported loss stays this rank's own token means).
    per_row: also return each row's summed loss and token count (`loss_terms`).
    on_policy: make this step on-policy (`on_policy_terms`; per-row results are then None).
    autocast: run the forward passes under `mixed_precision` at this dtype (optim.autocast).
    """
    for group in optimizer.param_groups:
        group["lr"] = base_lr * pos.lr_mult
    knobs = dict(tau=pos.tau, kd_ratio=pos.kd_ratio, alpha=pos.alpha, loss=loss)
    with mixed_precision(student, autocast):
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
            terms = on_policy_terms(student, teacher, batch, sampled, pad_id=on_policy.pad_id,
                                    **knobs)  # fmt: skip
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
