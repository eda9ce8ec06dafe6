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
from pocl_ray.models import head_inputs, head_selectable

ROUGE_NO_REPEAT_NGRAM = 6
"""The rouge signal's greedy answers never repeat a 6-gram (the authors' setting)."""
CACHE_CHUNK_ROWS = 1024
"""Response positions processed at a time by `teacher_topk` (bounds its (rows, V) temporaries)."""
SIGNAL_CHUNK_ROWS = 256
"""Response positions per chunk in `position_signals`: a few (256, V) float32 temporaries."""

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


@torch.no_grad()
def response_nll(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B,) mean token NLL of each reference response (prompt and padding masked), by the
    same path as `score_batch`.

    mask: (B, L-1) the positions to average (default: every response label)."""
    return _mean_signal("nll", model, None, batch, mask)


@torch.no_grad()
def kd_gap(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B,) mean per-token KL(teacher || student) at T = 1 over each response, by the same
    path as `score_batch`.

    mask: (B, L-1) the positions to average (default: every response label)."""
    return _mean_signal("kd_gap", student, teacher, batch, mask)


def _mean_signal(name: str, scorer, teacher, batch, mask: torch.Tensor | None) -> torch.Tensor:
    targets, response = _targets(batch)
    mask = response if mask is None else mask
    positions = mask.nonzero()
    s_logits = ResponseLogits(scorer, batch, positions)
    t_logits = None if teacher is None else ResponseLogits(teacher, batch, positions)
    values, _ = position_signals(s_logits, t_logits, targets[tuple(positions.T)], wanted=[name])
    every = torch.ones(len(positions), dtype=torch.bool, device=mask.device)
    return _row_means(values[name], positions[:, 0], every, mask)


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
    _check_taus(cache_taus)
    parts = [
        topk_rows(torch.log_softmax(chunk.float(), dim=-1), k=k, cache_taus=cache_taus)
        for chunk in teacher_logits[mask].split(CACHE_CHUNK_ROWS)
    ]
    return split_cache(parts, mask.sum(dim=1).tolist(), k=k, width=len(cache_taus))


def _check_taus(cache_taus: Sequence[float]) -> None:
    if not cache_taus:
        raise ValueError("the top-K cache needs at least one grid temperature (cache_taus)")


def topk_rows(
    logp: torch.Tensor, *, k: int, cache_taus: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V) float32 teacher log-probs → the cache of N positions (`teacher_topk`):
    ids (N, k) int32, log-probs (N, k) float16, tail (N, J) float32, on the CPU."""
    values, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, -torch.inf)
    return ids.to(torch.int32).cpu(), values.to(torch.float16).cpu(), _tails(rest, cache_taus).cpu()


def _tails(rest: torch.Tensor, cache_taus: Sequence[float]) -> torch.Tensor:
    """(N, V) log-probs with the top-K at -inf → (N, J) logsumexp(rest / τ_j) for every τ_j.

    The same values as `torch.logsumexp(rest / tau, -1)`, about 3x faster: the row maximum
    is taken once (max(rest / τ) = max(rest) / τ for τ > 0) and every pass runs in place in
    one buffer; with J = 9 grid temperatures this was the costliest part of the cache."""
    top = rest.amax(dim=-1, keepdim=True)
    safe = torch.where(top.isfinite(), top, torch.zeros_like(top))  # k = V: the tail is empty
    shifted = rest - safe
    buf = torch.empty_like(shifted)
    out = []
    for tau in cache_taus:
        torch.mul(shifted, 1.0 / tau, out=buf)
        out.append(buf.exp_().sum(dim=-1).log_() + safe[:, 0] / tau)
    return torch.stack(out, dim=-1) if out else torch.zeros(rest.shape[0], 0)


def split_cache(parts, counts: list[int], *, k: int, width: int) -> list[CacheRow]:
    """Chunks of `topk_rows` over row-major positions → one `CacheRow` per batch row."""
    per_row = [
        torch.cat(chunks).split(counts) if chunks else [torch.zeros(0, w)] * len(counts)
        for chunks, w in zip(zip(*parts) if parts else ([], [], []), (k, k, width), strict=True)
    ]
    return [
        (ids.numpy().astype(np.int32), logp.numpy().astype(np.float16), tail.numpy())
        for ids, logp, tail in zip(*per_row, strict=True)
    ]


# ---------------------------------------------------------------- one batch, every signal


class ResponseLogits:
    """A model's float32 next-token logits at chosen positions of one batch, a chunk at a
    time, from ONE forward pass.

    Where the logits are the head's output at each position (`models.head_selectable` with
    raw: GPT-2, Llama, Qwen2, OPT, ... but not models that soft-cap or scale logits), the body
    runs once at its own precision, the head's inputs at the requested positions are kept
    (`models.head_inputs`) and the head runs on them in float32, a chunk at a time: prompt
    and padding positions (most of a batch) never reach the (positions × V) head, and a
    bfloat16 body still gives float32 logits. Otherwise the full logits are computed once
    and the positions read from them.
    """

    def __init__(self, model, batch: dict[str, torch.Tensor], positions: torch.Tensor):
        self.rows = positions  # (N, 2) (row, position) pairs into the shifted (B, L-1) grid
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if head_selectable(model, raw=True):
            where = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            where[tuple(positions.T)] = True  # row-major, as positions (`nonzero`) are
            with head_inputs(model, where) as kept:
                model(**inputs, use_cache=False)
            self.hidden, self.logits = kept[0], None
            self.weight, self.bias = _head_params(model)
        else:
            self.logits = model(**inputs, use_cache=False).logits[:, :-1][tuple(positions.T)]

    def chunk(self, part: slice) -> torch.Tensor:
        """(n, V) float32 logits of positions[part]."""
        if self.logits is not None:
            return self.logits[part].float()
        return torch.nn.functional.linear(self.hidden[part].float(), self.weight, self.bias)


def _head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.float()
    return head.weight.float(), bias


def _per_position_kl(log_q, log_p, s, t) -> torch.Tensor:
    """KL(teacher ‖ student) per position at T = 1 from the chunk's log-softmaxes, falling
    back to the general rule for padded vocabularies of different sizes or masked tokens."""
    if s.shape[-1] != t.shape[-1]:
        return per_token_kd(s, t, kind="fkl", temperature=1.0)
    # Σ_v p·(log p − log q) as a batched dot product: no (n, V) product array to sum
    kl = torch.bmm(log_p.exp().unsqueeze(1), (log_p - log_q).unsqueeze(2))[:, 0, 0]
    # a ±inf or nan logit in either model makes its position's sum inf or nan (0 · ∞ = nan):
    # checking the n sums instead of both (n, V) chunks saved ~4 % of a SmolLM2 batch
    if not kl.isfinite().all():
        return per_token_kd(s, t, kind="fkl", temperature=1.0)
    return kl


@torch.no_grad()
def position_signals(
    s_logits: ResponseLogits | None,
    t_logits: ResponseLogits | None,
    targets: torch.Tensor,
    *,
    wanted: Sequence[str],
    topk: int = 0,
    cache_taus: Sequence[float] = (),
    vocab: int | None = None,
) -> tuple[dict[str, torch.Tensor], list]:
    """Per response position, nll (scorer), teacher_nll and kd_gap as requested, and the
    top-K cache chunks over the teacher's first `vocab` logits: one log-softmax per model and
    chunk of SIGNAL_CHUNK_ROWS positions serves every signal (never a (positions × V) array)."""
    n = len((s_logits or t_logits).rows)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    cache = []
    for start in range(0, n, SIGNAL_CHUNK_ROWS):
        part = slice(start, start + SIGNAL_CHUNK_ROWS)
        tgt = targets[part].unsqueeze(-1)
        t = t_logits.chunk(part) if t_logits is not None else None
        s = t if s_logits is t_logits else s_logits.chunk(part) if s_logits else None
        log_p = torch.log_softmax(t, dim=-1) if t is not None else None
        log_q = log_p if s is t else torch.log_softmax(s, dim=-1) if s is not None else None
        if "nll" in values:
            values["nll"].append(-log_q.gather(-1, tgt)[:, 0])
        if "teacher_nll" in values:
            values["teacher_nll"].append(-log_p.gather(-1, tgt)[:, 0])
        if "kd_gap" in values:
            values["kd_gap"].append(_per_position_kl(log_q, log_p, s, t))
        if topk > 0:
            real = log_p if vocab is None or vocab >= t.shape[-1] else (
                torch.log_softmax(t[:, :vocab], dim=-1))  # fmt: skip
            cache.append(topk_rows(real, k=topk, cache_taus=cache_taus))
    empty = torch.zeros(0)
    return {name: torch.cat(v) if v else empty for name, v in values.items()}, cache


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
    Each model runs forward once (`ResponseLogits`): the teacher's logits serve teacher_nll,
    kd_gap and the cache; the scorer's serve nll and kd_gap (the teacher's when the scorer
    is the teacher). rouge generates greedily with no repeated 6-gram (ROUGE_NO_REPEAT_NGRAM).
    """
    device = next(scorer.parameters()).device  # actors may hold the models on a GPU
    if teacher is not None and next(teacher.parameters()).device != device:
        raise ValueError(
            f"the teacher is on {next(teacher.parameters()).device} but the scorer on {device}; "
            "score_batch builds the batch on the scorer's device: put both on one device"
        )
    if topk > 0:
        _check_taus(cache_taus)
    batch = {k: v.to(device) for k, v in collate(list(examples), tokenizer.pad_token_id).items()}
    targets, response = _targets(batch)
    mask = signal_mask(batch["labels"], examples, tokenizer.eos_token_id)
    positions = response.nonzero()  # row-major: every response position (the cache uses all)
    teacher_uses = [s for s in ("teacher_nll", "kd_gap") if s in signals]
    if topk > 0:
        teacher_uses.append("the top-K cache")
    t_logits = s_logits = None
    if teacher_uses:
        t_logits = ResponseLogits(_need(teacher, teacher_uses[0]), batch, positions)
    if "nll" in signals or "kd_gap" in signals:
        same = scorer is teacher and t_logits is not None
        s_logits = t_logits if same else ResponseLogits(scorer, batch, positions)
    wanted = [s for s in ("nll", "teacher_nll", "kd_gap") if s in signals]
    out: dict[str, list[float]] = {}
    cache = None
    if wanted or topk > 0:
        per_position, parts = position_signals(
            s_logits, t_logits, targets[tuple(positions.T)], wanted=wanted, topk=topk,
            cache_taus=cache_taus, vocab=len(tokenizer),
        )  # fmt: skip
        counted = mask[tuple(positions.T)]  # the signals leave out the appended EOS
        for name, v in per_position.items():
            out[name] = _row_means(v, positions[:, 0], counted, mask).tolist()
        if topk > 0:
            counts = response.sum(dim=1).tolist()
            cache = split_cache(parts, counts, k=topk, width=len(cache_taus))
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
    return ScoredBatch(signals={s: out[s] for s in signals}, cache=cache)


def _row_means(values, rows, counted, mask) -> torch.Tensor:
    """(N,) per-position values → (B,) means over each row's counted positions."""
    sums = torch.zeros(mask.shape[0], dtype=torch.float32, device=mask.device)
    sums.index_add_(0, rows[counted], values[counted].float())
    return sums / mask.sum(-1).clamp(min=1)


def _need(teacher: torch.nn.Module | None, use: str) -> torch.nn.Module:
    if teacher is None:
        raise ValueError(f"{use!r} needs a teacher model; none was given")
    return teacher
