"""The KD loss family (pocl-method.md section 5) and the CE mix; pure functions of tensors.

Conventions shared by every function here:
- logits are already aligned: position t predicts token t+1; ``mask`` selects response tokens;
- p = softmax(z_T / tau) is the teacher, q = softmax(z_S / tau) the student;
- maths in float32 whatever the input dtype, mixtures in log space;
- reduction = sum of per-token losses over masked positions / number of masked positions, and
  exactly 0.0 (still attached to the student's graph) when no position is masked.
"""

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

KDKind = Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-entry terms of KL(a ‖ b) from log-probabilities. (N, V), (N, V) -> (N, V)"""
    return log_a.exp() * (log_a - log_b)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w·a + (1−w)·b) from log-probabilities. (N, V), (N, V) -> (N, V)

    A zero weight would put log(0) = -inf into logaddexp; return the other input instead.
    """
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


# Each kind maps (log p, log q, alpha, beta) to per-entry terms whose sum over V is the loss.
def _fkl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _kl_terms(log_p, log_q)


def _rkl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _kl_terms(log_q, log_p)


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    log_m = _log_mix(log_p, log_q, 1.0 - beta)
    return beta * _kl_terms(log_q, log_m) + (1.0 - beta) * _kl_terms(log_p, log_m)


def _tvd(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs()


def _skl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _kl_terms(log_p, _log_mix(log_p, log_q, alpha))


def _srkl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _kl_terms(log_q, _log_mix(log_p, log_q, 1.0 - alpha))


_PER_ENTRY: dict[str, Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]] = {
    "fkl": _fkl,
    "rkl": _rkl,
    "jsd": _jsd,
    "tvd": _tvd,
    "skl": _skl,
    "srkl": _srkl,
}


def _check_kd_args(kind: str, temperature: float, alpha: float, beta: float) -> None:
    if kind not in _PER_ENTRY:
        raise ValueError(f"kind={kind!r} is not a KD loss; choose one of {sorted(_PER_ENTRY)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")


def per_token_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kind: KDKind,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.9,
) -> torch.Tensor:
    """Unreduced KD loss per position, without the τ² factor.

    Args:
        student_logits: (..., Vs) student logits z_S, any float dtype.
        teacher_logits: (..., Vt) teacher logits z_T, same leading shape.
        kind: which divergence (pocl-method.md section 5).
        temperature: τ, divides both logits.
        alpha: skew weight of skl / srkl.
        beta: mixture weight of jsd.

    Returns:
        (...) float32 loss per position.

    Vocabularies of different padded sizes are cut to the shared prefix min(Vs, Vt). A vocab
    entry where either logit is ±inf (a masked-out token) contributes 0 to every kind, as in
    torchtune's kd_losses: with the same -inf entries in both, the result equals dropping those
    entries. A +inf logit still makes the softmax of its whole row undefined (NaN).
    """
    _check_kd_args(kind, temperature, alpha, beta)
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    z_s = student_logits[..., :vocab].float() / temperature
    z_t = teacher_logits[..., :vocab].float() / temperature
    infinite = z_s.isinf() | z_t.isinf()
    # Infinite entries get log-prob 0 before any arithmetic so every intermediate stays finite:
    # otherwise -inf − -inf = NaN appears, and masking the result afterwards still lets
    # 0 · NaN = NaN through the backward pass. Their terms are then zeroed explicitly.
    log_p = F.log_softmax(z_t, dim=-1).masked_fill(infinite, 0.0)
    log_q = F.log_softmax(z_s, dim=-1).masked_fill(infinite, 0.0)
    terms = _PER_ENTRY[kind](log_p, log_q, alpha, beta)
    return terms.masked_fill(infinite, 0.0).sum(-1)


def _check_masked_shapes(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> None:
    """(..., Vs), (..., Vt), (...) bool with the same leading shape, or ValueError."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    lead_s, lead_t = student_logits.shape[:-1], teacher_logits.shape[:-1]
    if lead_s != mask.shape or lead_t != mask.shape:
        raise ValueError(
            f"leading shapes differ: student {tuple(lead_s)}, teacher {tuple(lead_t)}, "
            f"mask {tuple(mask.shape)}"
        )


LEAN_VOCAB = 32768
"""From this vocabulary size on, `kd_loss` and `topk_kd_loss` run memory-lean by default."""
LEAN_CHUNK_ROWS = 16
"""Rows per chunk of the memory-lean path when loss.chunk_size is not set: a (16, V) float32
chunk (3 MiB at V = 50k) stays in a CPU's cache; measured against 32, 64 and 256 rows in
bench/bench_loss.py (BENCHMARKS.md)."""


class _LossAndGradByChunk(torch.autograd.Function):
    """A sum of per-position losses whose gradient with respect to the student logits is
    computed chunk by chunk during the forward pass and written into one buffer.

    Nothing the size of the logits is kept for backward except that buffer (the floor: the
    gradient itself). No copy of the masked rows is made: each chunk gathers its own rows by
    index, so the student and teacher logits are read in place, whatever their strides.
    """

    @staticmethod
    def forward(ctx, student_logits, positions, chunk_rows, loss_and_grad):
        # positions: (N, D) indices of the masked positions in the leading D dims;
        # loss_and_grad(rows, index) -> ((n,) float32 losses, (n, V) their gradient) for the
        # student rows (float32, a copy) at those positions
        grad = torch.zeros_like(student_logits)
        parts = []
        for chunk in positions.split(chunk_rows):
            index = tuple(chunk.T)
            per, g = loss_and_grad(student_logits.detach()[index].float(), index)
            grad[index] = g.to(grad.dtype)
            parts.append(per)
        per_pos = torch.cat(parts)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(per_pos)
        return per_pos.sum(), per_pos

    @staticmethod
    def backward(ctx, grad_total, _grad_per_position):
        (grad,) = ctx.saved_tensors
        # in place: the buffer is the gradient, and backward runs once (no retain_graph)
        return grad.mul_(grad_total), None, None, None


def by_autograd(per_position: Callable[[torch.Tensor, tuple], torch.Tensor]) -> Callable:
    """`loss_and_grad` for `lean_sum` from a differentiable per-position loss."""

    def loss_and_grad(rows: torch.Tensor, index: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        rows.requires_grad_(True)
        with torch.enable_grad():
            per = per_position(rows, index)
            (grad,) = torch.autograd.grad(per.sum(), rows)
        return per.detach(), grad

    return loss_and_grad


def fkl_loss_and_grad(student_rows: torch.Tensor, teacher_rows: torch.Tensor, tau: float):
    """Forward KL per row and its gradient in closed form, few temporaries: KL(p ‖ q) with
    p = softmax(z_T/τ), q = softmax(z_S/τ); d/dz_S = (q − p)/τ. Finite logits only.
    (n, Vs) float32 (consumed), (n, Vt) -> (n,), (n, Vs)"""
    vocab = min(student_rows.shape[-1], teacher_rows.shape[-1])
    log_q = student_rows.div_(tau)
    log_q = log_q.sub_(log_q[:, :vocab].logsumexp(-1, keepdim=True))
    log_p = teacher_rows[:, :vocab].float().div(tau)
    log_p = log_p.sub_(log_p.logsumexp(-1, keepdim=True))
    p = log_p.exp()
    per = (log_p.sub_(log_q[:, :vocab])).mul_(p).sum(-1)  # Σ p (log p − log q)
    grad = log_q.exp_()  # q, in the student rows' buffer
    grad[:, vocab:] = 0.0  # rows past the shared vocabulary take no part (as per_token_kd)
    grad[:, :vocab].sub_(p).div_(tau)
    return per, grad


def lean_sum(
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    loss_and_grad: Callable[[torch.Tensor, tuple], tuple[torch.Tensor, torch.Tensor]],
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ per-position losses over the masked positions, attached to the student logits;
    the (N,) per-position losses, detached) by `_LossAndGradByChunk`."""
    positions = mask.nonzero()
    return _LossAndGradByChunk.apply(student_logits, positions, chunk_rows, loss_and_grad)


def lean_rows(chunk_size: int | None, vocab: int) -> int | None:
    """Rows per chunk of the memory-lean path, or None for the plain one: loss.chunk_size
    when set, else LEAN_CHUNK_ROWS from LEAN_VOCAB on."""
    if chunk_size is not None:
        return chunk_size
    return LEAN_CHUNK_ROWS if vocab >= LEAN_VOCAB else None


def _kd_rows_fn(teacher_logits: torch.Tensor, kwargs: dict) -> Callable:
    """`loss_and_grad` of per_token_kd for `lean_sum`: forward KL in closed form where every
    logit of the chunk is finite, autograd otherwise (other kinds, masked-out tokens)."""
    generic = by_autograd(lambda s, index: per_token_kd(s, teacher_logits[index], **kwargs))

    def loss_and_grad(rows: torch.Tensor, index: tuple):
        teacher_rows = teacher_logits[index]
        if kwargs["kind"] == "fkl" and rows.isfinite().all() and teacher_rows.isfinite().all():
            return fkl_loss_and_grad(rows, teacher_rows, kwargs["temperature"])
        return generic(rows, index)

    return loss_and_grad


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: KDKind,
    temperature: float = 1.0,
    scale_by_tau_sq: bool = True,
    alpha: float = 0.1,
    beta: float = 0.9,
    chunk_size: int | None = None,
    per_position_out: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token-mean KD loss over masked positions.

    Args:
        student_logits: (..., Vs) student logits, aligned with the teacher's.
        teacher_logits: (..., Vt) teacher logits.
        mask: (...) bool, True at response tokens.
        kind, temperature, alpha, beta: as in `per_token_kd`.
        scale_by_tau_sq: multiply by τ² (Hinton), for every kind alike, so that gradient
            magnitudes stay comparable across temperatures.
        chunk_size: rows per chunk of the memory-lean path (`lean_sum`): loss and gradient
            are computed chunk by chunk in the forward pass, so besides the gradient buffer
            only O(chunk_size × V) float32 temporaries exist. None: the lean path with
            LEAN_CHUNK_ROWS rows from V >= LEAN_VOCAB, the plain autograd path below it.
            Same value and gradients either way (to float rounding).
        per_position_out: also return the (N,) per-position losses (× τ², detached), in
            mask.nonzero() order.

    Returns:
        () float32 scalar: sum of per-token losses / number of masked tokens (× τ²).
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 or None")
    _check_masked_shapes(student_logits, teacher_logits, mask)
    kwargs = {"kind": kind, "temperature": temperature, "alpha": alpha, "beta": beta}
    scale = temperature**2 if scale_by_tau_sq else 1.0
    num_tokens = int(mask.sum())
    rows = lean_rows(chunk_size, student_logits.shape[-1])
    if teacher_logits.requires_grad:  # the lean path treats the teacher as a constant
        rows = None
    if num_tokens and rows is not None:
        total, per = lean_sum(student_logits, mask, _kd_rows_fn(teacher_logits, kwargs), rows)
    else:
        student, teacher = student_logits[mask], teacher_logits[mask]
        if num_tokens == 0:
            # Summing the empty selection (not all logits, which may hold -inf) gives an exact
            # 0.0 that keeps the graph connected, so backward() and DDP still see the student.
            zero = student.float().sum() * 0.0
            return (zero, zero.detach().reshape(0)) if per_position_out else zero
        per = per_token_kd(student, teacher, **kwargs)
        total = per.sum()
    loss = total * (scale / num_tokens)
    return (loss, per.detach() * scale) if per_position_out else loss


# ---------------------------------------------------------------- teacher known on its top-K


def _check_cache_taus(cache_taus: Sequence[float], temperature: float) -> list[float]:
    taus = [float(t) for t in cache_taus]
    if not taus or any(t <= 0 for t in taus) or any(a >= b for a, b in zip(taus, taus[1:])):
        raise ValueError(f"cache_taus={taus} must be positive and strictly increasing")
    inside = taus[0] <= temperature <= taus[-1]
    if not (inside or _on_grid(taus[0], temperature) or _on_grid(taus[-1], temperature)):
        raise ValueError(
            f"temperature={temperature} is outside the cached grid [{taus[0]}, {taus[-1]}]; "
            "rescore with scoring.cache_taus covering every stage temperature"
        )
    return taus


def _on_grid(grid_tau: float, temperature: float) -> bool:
    # a stage τ computed as tau_min + (tau_max − tau_min)·s/(S−1) may differ from the grid
    # value in its last bits; that close, the exact column is the right one
    return math.isclose(grid_tau, temperature, rel_tol=1e-6)


def tail_log_partition(
    tail_logz: torch.Tensor, cache_taus: Sequence[float], temperature: float
) -> torch.Tensor:
    """F(β) = log Σ_{i ∉ top-K} exp(β · log p_i) at β = 1/temperature, from the cached grid.

    Args:
        tail_logz: (..., J) F at β_j = 1 / cache_taus[j] (the scoring job's cache).
        cache_taus: the J grid temperatures, positive and increasing.
        temperature: τ, within [cache_taus[0], cache_taus[-1]].

    Returns:
        (...) float32: the grid column when τ is on the grid, else linear interpolation in β
        between the two neighbouring grid points. F is convex in β, so the chord lies above
        it: the interpolated value over-estimates F by at most (Δβ)²/8 · max Var(log p_i)
        over the tilted tail distributions between the two points (docs/distill.md).
        -inf (an empty tail) stays -inf.
    """
    taus = _check_cache_taus(cache_taus, temperature)
    if tail_logz.shape[-1] != len(taus):
        raise ValueError(
            f"the cached tail has {tail_logz.shape[-1]} temperatures, cache_taus {len(taus)}"
        )
    tail = tail_logz.float()
    for j, t in enumerate(taus):
        if _on_grid(t, temperature):
            return tail[..., j]
    hi = next(j for j, t in enumerate(taus) if t > temperature)  # taus[hi-1] < τ < taus[hi]
    beta, beta_lo, beta_hi = 1.0 / temperature, 1.0 / taus[hi], 1.0 / taus[hi - 1]
    w = (beta - beta_lo) / (beta_hi - beta_lo)  # weight of column hi-1, strictly in (0, 1)
    # both weights > 0, so an empty tail (-inf in every column) gives -inf, never 0 · inf
    return w * tail[..., hi - 1] + (1.0 - w) * tail[..., hi]


def cached_teacher_log_probs(
    topk_logprobs: torch.Tensor,
    tail_logz: torch.Tensor,
    cache_taus: Sequence[float],
    temperature: float,
) -> torch.Tensor:
    """The teacher's log-probabilities at τ over K + 1 buckets: its top-K tokens, then the rest.

    Args:
        topk_logprobs: (..., K) the teacher's T = 1 log-probabilities log p_k at its top-K ids.
        tail_logz: (..., J) the cached tail log-partitions (`tail_log_partition`).
        cache_taus, temperature: as in `tail_log_partition`.

    Returns:
        (..., K + 1) float32: a_k − log Z and F − log Z, with a_k = log p_k / τ, F the tail
        log-partition at β = 1/τ and log Z = logaddexp(logsumexp_k a_k, F): exactly
        log softmax(z / τ) at the top-K ids and the log of its remaining mass, up to the
        storage precision and the interpolation of F. An empty tail gives -inf in the last bucket.
    """
    a = topk_logprobs.float() / temperature
    f = tail_log_partition(tail_logz, cache_taus, temperature)
    log_z = torch.logaddexp(torch.logsumexp(a, dim=-1), f)
    return torch.cat([a - log_z[..., None], (f - log_z)[..., None]], dim=-1)


def student_bucket_log_probs(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The student's log-probabilities at τ over the teacher's K + 1 buckets.

    Args:
        student_logits: (..., V) student logits.
        topk_ids: (..., K) long, the teacher's top-K ids (distinct per position).

    Returns:
        (..., K + 1) float32: log softmax(z_S / τ) over the full vocabulary gathered at the
        ids, then the log of the student's mass on every other token (logsumexp over the
        exact complement; -inf, with zero gradient, when the ids cover the vocabulary).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    head = log_q.gather(-1, topk_ids)
    rest = log_q.scatter(-1, topk_ids, -math.inf)
    # logsumexp by hand: torch's backward gives NaN (exp(-inf - -inf)) for an all -inf row,
    # which the ids covering the vocabulary produce; here every path stays finite
    shift = rest.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(shift.isfinite(), shift, torch.zeros_like(shift))
    total = (rest - shift).exp().sum(dim=-1)
    log_rest = torch.where(
        total > 0, total.clamp(min=torch.finfo(total.dtype).tiny).log(), -math.inf
    )
    return torch.cat([head, (log_rest + shift.squeeze(-1))[..., None]], dim=-1)


def topk_per_token_kd(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logz: torch.Tensor,
    cache_taus: Sequence[float],
    *,
    kind: KDKind,
    temperature: float = 1.0,
    alpha: float = 0.1,
    beta: float = 0.9,
) -> torch.Tensor:
    """Unreduced KD per position over the K + 1 buckets (top-K + rest), without τ².

    Shapes as in `topk_kd_loss` without the mask; returns (...) float32. The divergence is
    `per_token_kd` of the two bucket distributions at temperature 1 (both are already
    normalised log-probabilities at τ, so its log_softmax changes nothing).
    """
    _check_kd_args(kind, temperature, alpha, beta)
    student = student_bucket_log_probs(student_logits, topk_ids, temperature)
    teacher = cached_teacher_log_probs(topk_logprobs, tail_logz, cache_taus, temperature)
    return per_token_kd(student, teacher, kind=kind, temperature=1.0, alpha=alpha, beta=beta)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logz: torch.Tensor,
    cache_taus: Sequence[float],
    mask: torch.Tensor,
    *,
    kind: KDKind,
    temperature: float = 1.0,
    scale_by_tau_sq: bool = True,
    alpha: float = 0.1,
    beta: float = 0.9,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KD loss when the teacher is known through its cached top-K (docs/distill.md).

    Args:
        student_logits: (..., V) student logits.
        teacher_topk_ids: (..., K) long, the teacher's top-K token ids per position.
        teacher_topk_logprobs: (..., K) the teacher's T = 1 log-probabilities at those ids.
        teacher_tail_logz: (..., J) log Σ_{i ∉ top-K} exp(log p_i / τ_j) per grid temperature.
        cache_taus: the J grid temperatures τ_j (scoring.cache_taus), increasing.
        mask: (...) bool, True at response tokens.
        kind, temperature, scale_by_tau_sq, alpha, beta, chunk_size: as in `kd_loss`;
            temperature must lie within the grid.

    Returns:
        () float32 scalar, reduced as in `kd_loss`.

    The divergence is taken over K + 1 buckets: the teacher's top-K tokens and one "rest"
    bucket holding all other tokens, for both models (`student_bucket_log_probs`,
    `cached_teacher_log_probs`). The student's mass outside the teacher's top-K is therefore
    seen and penalised where the teacher has little; what is lost is only how each model
    spreads its mass inside the rest. With K = V it is exactly `kd_loss`.
    """
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"top-k ids {tuple(teacher_topk_ids.shape)} and log-probs "
            f"{tuple(teacher_topk_logprobs.shape)} differ in shape"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 or None")
    _check_kd_args(kind, temperature, alpha, beta)
    taus = _check_cache_taus(cache_taus, temperature)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    kwargs = {"kind": kind, "temperature": temperature, "alpha": alpha, "beta": beta}
    cache = (teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logz)
    num_tokens = int(mask.sum())
    rows = lean_rows(chunk_size, student_logits.shape[-1])
    if num_tokens and rows is not None:
        per_position = by_autograd(
            lambda s, index: topk_per_token_kd(s, *(c[index] for c in cache), taus, **kwargs)
        )
        total, _ = lean_sum(student_logits, mask, per_position, rows)
    else:
        student = student_logits[mask]
        if num_tokens == 0:
            return student.float().sum() * 0.0  # exact 0, still attached (see kd_loss)
        total = topk_per_token_kd(student, *(c[mask] for c in cache), taus, **kwargs).sum()
    scale = temperature**2 if scale_by_tau_sq else 1.0
    return total * (scale / num_tokens)


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over masked positions, in float32.

    Args:
        student_logits: (..., V) logits, aligned with labels.
        labels: (...) long, the next token at each position.
        mask: (...) bool, True at response tokens.

    Returns:
        () float32 scalar; exactly 0.0 (attached to the graph) when no position is masked.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    logits = student_logits[mask].float()
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels[mask], reduction="mean")


def mixed_loss(ce: torch.Tensor, kd: torch.Tensor, kd_ratio: float) -> torch.Tensor:
    """(1 − λ)·CE + λ·KD with λ = kd_ratio in [0, 1]. (), () -> ()"""
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio={kd_ratio} must be in [0, 1]")
    return (1.0 - kd_ratio) * ce + kd_ratio * kd
