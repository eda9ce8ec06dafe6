"""The KD loss family (pocl-method.md section 5) and the CE mix; pure functions of tensors.

Conventions shared by every function here:
- logits are already aligned: position t predicts token t+1; ``mask`` selects response tokens;
- p = softmax(z_T / tau) is the teacher, q = softmax(z_S / tau) the student;
- maths in float32 whatever the input dtype, mixtures in log space;
- reduction = sum of per-token losses over masked positions / number of masked positions, and
  exactly 0.0 (still attached to the student's graph) when no position is masked.
"""

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def _masked_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows at masked positions. (..., Vs), (..., Vt), (...) -> (N, Vs), (N, Vt)"""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    lead_s, lead_t = student_logits.shape[:-1], teacher_logits.shape[:-1]
    if lead_s != mask.shape or lead_t != mask.shape:
        raise ValueError(
            f"leading shapes differ: student {tuple(lead_s)}, teacher {tuple(lead_t)}, "
            f"mask {tuple(mask.shape)}"
        )
    return student_logits[mask], teacher_logits[mask]


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
) -> torch.Tensor:
    """Token-mean KD loss over masked positions.

    Args:
        student_logits: (..., Vs) student logits, aligned with the teacher's.
        teacher_logits: (..., Vt) teacher logits.
        mask: (...) bool, True at response tokens.
        kind, temperature, alpha, beta: as in `per_token_kd`.
        scale_by_tau_sq: multiply by τ² (Hinton), for every kind alike, so that gradient
            magnitudes stay comparable across temperatures.
        chunk_size: evaluate the masked rows this many at a time, each chunk under activation
            checkpointing, so forward and backward hold O(chunk_size × V) float32 temporaries
            instead of O(N × V). Same value and gradients as the unchunked path.

    Returns:
        () float32 scalar: sum of per-token losses / number of masked tokens (× τ²).
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 or None")
    student, teacher = _masked_rows(student_logits, teacher_logits, mask)
    num_tokens = student.shape[0]
    if num_tokens == 0:
        # Summing the empty selection (not all logits, which may hold -inf) gives an exact 0.0
        # that keeps the graph connected, so backward() and DDP still see the student.
        return student.float().sum() * 0.0

    def chunk_sum(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kwargs = {"kind": kind, "temperature": temperature, "alpha": alpha, "beta": beta}
        return per_token_kd(s, t, **kwargs).sum()

    if chunk_size is None:
        total = chunk_sum(student, teacher)
    else:
        # preserve_rng_state=False: nothing inside is random, so skip saving RNG state.
        total = sum(
            checkpoint(chunk_sum, s, t, use_reentrant=False, preserve_rng_state=False)
            for s, t in zip(student.split(chunk_size), teacher.split(chunk_size), strict=True)
        )
    scale = temperature**2 if scale_by_tau_sq else 1.0
    return total * (scale / num_tokens)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: KDKind,
    temperature: float = 1.0,
    scale_by_tau_sq: bool = True,
    alpha: float = 0.1,
    beta: float = 0.9,
) -> torch.Tensor:
    """KD loss when the teacher is known only on its top-K tokens (e.g. cached at scoring time).

    Args:
        student_logits: (..., V) student logits.
        teacher_topk_ids: (..., K) long, the teacher's top-K token ids per position.
        teacher_topk_logits: (..., K) the teacher's logits at those ids.
        mask: (...) bool, True at response tokens.
        kind, temperature, scale_by_tau_sq, alpha, beta: as in `kd_loss`.

    Returns:
        () float32 scalar, reduced as in `kd_loss`.

    Approximation: both distributions are restricted to the teacher's top-K support and
    renormalised there (softmax over the K gathered logits at temperature τ). Student mass
    outside the support is ignored, so the loss neither rewards nor penalises it; with K = V
    this is exactly `kd_loss`, and for small K it is closest for peaked teachers.
    """
    if teacher_topk_ids.shape != teacher_topk_logits.shape:
        raise ValueError(
            f"top-k ids {tuple(teacher_topk_ids.shape)} and logits "
            f"{tuple(teacher_topk_logits.shape)} differ in shape"
        )
    student_on_support = student_logits.gather(-1, teacher_topk_ids)
    return kd_loss(
        student_on_support,
        teacher_topk_logits,
        mask,
        kind=kind,
        temperature=temperature,
        scale_by_tau_sq=scale_by_tau_sq,
        alpha=alpha,
        beta=beta,
    )


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
