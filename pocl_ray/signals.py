"""Per-sample difficulty signals computed with models (pocl-method.md §2), and the teacher's
top-K cache.

Pure functions of models and tokenised examples: the Ray Data scoring actors call
`score_batch` on each block, and the plain demo calls it on the whole set.
- rouge: ROUGE-L F1 of the scorer's greedy answer vs the references (higher = easier)
- nll: the scorer's mean response NLL (lower = easier)
- teacher_nll: the teacher's mean response NLL (lower = easier)
- kd_gap: mean per-token KL(teacher || student) at T = 1 on the reference (lower = easier)
The three NLL-type signals leave out the EOS the tokenizer appended (`signal_mask`). One
`score_batch` call runs each model forward once: the teacher's logits give teacher_nll,
kd_gap and the cache, the scorer's give nll and kd_gap, and a scorer that is the teacher
reuses the teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pocl_ray.data import IGNORE_INDEX, TokenizedExample, collate
from pocl_ray.evaluation import generate, rouge_l
from pocl_ray.losses import per_token_kd

ROUGE_NO_REPEAT_NGRAM = 6
"""The rouge signal's greedy answers never repeat a 6-gram (the authors' setting)."""
CACHE_CHUNK_ROWS = 1024
"""Response positions processed at a time by `teacher_topk` (bounds its (rows, V) temporaries)."""

CacheRow = tuple[np.ndarray, np.ndarray, np.ndarray]
"""One example's cache: ids (R, K) int32, log-probs (R, K) float16, tail (R, J) float32."""


@dataclass(kw_only=True)
class ScoredBatch:
    """What `score_batch` computed for one batch, aligned with its examples."""

    signals: dict[str, list[float]]
    """One list per requested signal."""
    cache: list[CacheRow] | None = None
    """Per example, the teacher's top-K cache (`teacher_topk`); None unless topk > 0."""


def _targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted labels (B, L-1) and their response mask (B, L-1): logits at t predict t+1."""
    targets = batch["labels"][:, 1:]
    return targets, targets != IGNORE_INDEX


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L-1, V) next-token logits aligned with `_targets`."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
        :, :-1
    ]


def signal_mask(
    labels: torch.Tensor, examples: Sequence[TokenizedExample], eos_id: int | None
) -> torch.Tensor:
    """(B, L) labels → (B, L-1) bool: the response positions the NLL-type signals average over.

    Every response label except the EOS the tokenizer appended (`data.tokenize_record`): the
    final label, when it is `eos_id` and the example's response was not cut, as in the
    authors' code. A response of EOS alone keeps it (a mean over nothing would be undefined).
    """
    targets, mask = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    out = mask.clone()
    if eos_id is None:
        return out
    for b, example in enumerate(examples):
        at = mask[b].nonzero()[:, 0]
        if len(at) > 1 and not example.response_truncated and int(targets[b, at[-1]]) == eos_id:
            out[b, at[-1]] = False
    return out


def _masked_mean(per_position, mask: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """(B,) mean over each row's masked positions of per_position(*rows), evaluated on the
    masked positions only, CACHE_CHUNK_ROWS at a time: never a (B, L, V) temporary, nothing
    computed for prompt or padding positions (most of a batch's logits)."""
    positions = mask.nonzero()
    values = torch.cat(
        [per_position(*(t[tuple(chunk.T)] for t in tensors))
         for chunk in positions.split(CACHE_CHUNK_ROWS)]  # fmt: skip
        or [torch.zeros(0, device=mask.device)]
    )
    sums = torch.zeros(mask.shape[0], dtype=torch.float32, device=mask.device)
    sums.index_add_(0, positions[:, 0], values.float())
    return sums / mask.sum(-1).clamp(min=1)


def mean_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, V), (B, L), (B, L) bool → (B,) mean token NLL over each row's masked positions."""

    def nll(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(rows.float(), target, reduction="none")

    return _masked_mean(nll, mask, logits, targets)


def mean_kd_gap(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """(B, L, V) twice, (B, L) bool → (B,) mean per-token KL(teacher ‖ student) at T = 1."""

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not (s.isfinite().all() and t.isfinite().all()):  # masked-out tokens: the full rule
            return per_token_kd(s, t, kind="fkl", temperature=1.0)
        vocab = min(s.shape[-1], t.shape[-1])
        log_q = torch.log_softmax(s[:, :vocab].float(), dim=-1)
        log_p = torch.log_softmax(t[:, :vocab].float(), dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    return _masked_mean(kl, mask, student_logits, teacher_logits)


@torch.no_grad()
def response_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) mean token NLL of each reference response (prompt and padding masked).

    mask: (B, L-1) the positions to average (default: every response label)."""
    targets, response = _targets(batch)
    return mean_nll(_logits(model, batch), targets, response if mask is None else mask)


@torch.no_grad()
def kd_gap(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) mean per-token KL(teacher || student) at T = 1 over each response.

    mask: (B, L-1) the positions to average (default: every response label)."""
    _, response = _targets(batch)
    mask = response if mask is None else mask
    return mean_kd_gap(_logits(student, batch), _logits(teacher, batch), mask)


@torch.no_grad()
def teacher_topk(
    teacher_logits: torch.Tensor, mask: torch.Tensor, *, k: int, cache_taus: Sequence[float]
) -> list[CacheRow]:
    """The teacher's top-K cache at every response position (docs/scoring.md).

    Args:
        teacher_logits: (B, L-1, V) the teacher's next-token logits, aligned with the shifted
            labels (position t predicts label t + 1).
        mask: (B, L-1) bool, True at response positions (every one, EOS included: training
            uses them all).
        k: entries kept per position.
        cache_taus: J grid temperatures τ_j (scoring.cache_taus).

    Returns:
        Per row b, with R_b its response positions, in order (entry j predicts the j-th
        response token):
        ids (R_b, k) int32, the top-k token ids, sorted by probability descending;
        log-probs (R_b, k) float16, the teacher's T = 1 log-probabilities z − logsumexp(z)
        at those ids (near 0 for likely tokens, where float16 is precise);
        tail (R_b, J) float32, F_j = log Σ_{i ∉ top-k} exp(log p_i / τ_j), the log-partition
        of every other token at each grid temperature (-inf when k = V).
    """
    if not cache_taus:
        raise ValueError("the top-K cache needs at least one grid temperature (cache_taus)")
    rows = teacher_logits[mask]
    ids_out, logp_out, tail_out = [], [], []
    for chunk in rows.split(CACHE_CHUNK_ROWS):
        logp = torch.log_softmax(chunk.float(), dim=-1)
        values, ids = logp.topk(k, dim=-1)
        rest = logp.scatter(-1, ids, -torch.inf)
        tail = torch.stack([torch.logsumexp(rest / tau, dim=-1) for tau in cache_taus], dim=-1)
        ids_out.append(ids.to(torch.int32).cpu())
        logp_out.append(values.to(torch.float16).cpu())
        tail_out.append(tail.cpu())
    counts = mask.sum(dim=1).tolist()
    per_row = [
        torch.cat(parts).split(counts) if parts else [torch.zeros(0, width)] * len(counts)
        for parts, width in ((ids_out, k), (logp_out, k), (tail_out, len(cache_taus)))
    ]
    return [
        (ids.numpy().astype(np.int32), logp.numpy().astype(np.float16), tail.numpy())
        for ids, logp, tail in zip(*per_row, strict=True)
    ]


def score_batch(
    examples: Sequence[TokenizedExample],
    references: Sequence[Sequence[str]],
    *,
    signals: Sequence[str],
    scorer: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tokenizer,
    max_new_tokens: int,
    topk: int = 0,
    cache_taus: Sequence[float] = (),
) -> ScoredBatch:
    """Every requested signal for one batch, and with topk > 0 the teacher's top-K cache.

    The batch is built on the scorer's device; the teacher must be on the same device.
    Each model runs forward once: the teacher's logits serve teacher_nll, kd_gap and the
    cache; the scorer's serve nll and kd_gap (the teacher's when the scorer is the teacher).
    rouge generates greedily with no repeated 6-gram (ROUGE_NO_REPEAT_NGRAM).
    """
    device = next(scorer.parameters()).device  # actors may hold the models on a GPU
    if teacher is not None and next(teacher.parameters()).device != device:
        raise ValueError(
            f"the teacher is on {next(teacher.parameters()).device} but the scorer on {device}; "
            "score_batch builds the batch on the scorer's device: put both on one device"
        )
    batch = {k: v.to(device) for k, v in collate(list(examples), tokenizer.pad_token_id).items()}
    targets, response = _targets(batch)
    mask = signal_mask(batch["labels"], examples, tokenizer.eos_token_id)
    t_logits = s_logits = None
    teacher_uses = [s for s in ("teacher_nll", "kd_gap") if s in signals]
    if topk > 0:
        teacher_uses.append("the top-K cache")
    if teacher_uses:
        t_logits = _logits(_need(teacher, teacher_uses[0]), batch)
    if "nll" in signals or "kd_gap" in signals:
        s_logits = (
            t_logits if scorer is teacher and t_logits is not None else _logits(scorer, batch)
        )
    out: dict[str, list[float]] = {}
    if "nll" in signals:
        out["nll"] = mean_nll(s_logits, targets, mask).tolist()
    if "teacher_nll" in signals:
        out["teacher_nll"] = mean_nll(t_logits, targets, mask).tolist()
    if "kd_gap" in signals:
        out["kd_gap"] = mean_kd_gap(s_logits, t_logits, mask).tolist()
    if "rouge" in signals:
        prompts = [e.input_ids[: e.prompt_length] for e in examples]
        answers = generate(
            scorer,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=ROUGE_NO_REPEAT_NGRAM,
            batch_size=len(prompts),
        )
        out["rouge"] = [rouge_l(a, refs) for a, refs in zip(answers, references)]
    cache = None
    if topk > 0:  # the tokenizer's tokens only: a padded teacher head has rows no model uses
        real = t_logits[..., : min(t_logits.shape[-1], len(tokenizer))]
        cache = teacher_topk(real, response, k=topk, cache_taus=cache_taus)
    return ScoredBatch(signals=out, cache=cache)


def _need(teacher: torch.nn.Module | None, use: str) -> torch.nn.Module:
    if teacher is None:
        raise ValueError(f"{use!r} needs a teacher model; none was given")
    return teacher
