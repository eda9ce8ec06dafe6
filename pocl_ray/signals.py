"""Per-sample difficulty signals computed with models (pocl-method.md §2).

Pure functions of models and tokenised examples: the Ray Data scoring actors call
`score_batch` on each block, and the plain demo calls it on the whole set.
- rouge: ROUGE-L F1 of the scorer's greedy answer vs the references (higher = easier)
- nll: the scorer's mean response NLL (lower = easier)
- teacher_nll: the teacher's mean response NLL (lower = easier)
- kd_gap: mean per-token KL(teacher || student) at T = 1 on the reference (lower = easier)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pocl_ray.data import TokenizedExample, collate
from pocl_ray.evaluation import generate, rouge_l
from pocl_ray.losses import per_token_kd
from pocl_ray.train_step import shifted


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values, mask (B, L) → (B,) mean over each row's masked positions."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def response_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) mean token NLL of each reference response (prompt and padding masked)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits, targets, mask = shifted(out.logits.float(), batch["labels"])
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets.clamp(min=0), reduction="none"
    )
    return _per_sample_mean(nll, mask)


@torch.no_grad()
def kd_gap(
    teacher: torch.nn.Module, student: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """(B,) mean per-token KL(teacher || student) at T = 1 over each response."""
    ids, att = batch["input_ids"], batch["attention_mask"]
    s_logits, _, mask = shifted(student(input_ids=ids, attention_mask=att).logits, batch["labels"])
    t_logits = teacher(input_ids=ids, attention_mask=att).logits[:, :-1]
    kl = per_token_kd(s_logits, t_logits, kind="fkl", temperature=1.0, alpha=0.1, beta=0.9)
    return _per_sample_mean(kl, mask)


def score_batch(
    examples: Sequence[TokenizedExample],
    references: Sequence[Sequence[str]],
    *,
    signals: Sequence[str],
    scorer: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tokenizer,
    max_new_tokens: int,
) -> dict[str, list[float]]:
    """Every requested signal for one batch of examples, as plain lists aligned with it."""
    device = next(scorer.parameters()).device  # actors may hold the models on a GPU
    batch = {k: v.to(device) for k, v in collate(list(examples), tokenizer.pad_token_id).items()}
    out: dict[str, list[float]] = {}
    if "nll" in signals:
        out["nll"] = response_nll(scorer, batch).tolist()
    if "teacher_nll" in signals:
        out["teacher_nll"] = response_nll(_need(teacher, "teacher_nll"), batch).tolist()
    if "kd_gap" in signals:
        out["kd_gap"] = kd_gap(_need(teacher, "kd_gap"), scorer, batch).tolist()
    if "rouge" in signals:
        prompts = [e.input_ids[: e.prompt_length] for e in examples]
        answers = generate(
            scorer, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts)
        )
        out["rouge"] = [rouge_l(a, refs) for a, refs in zip(answers, references)]
    return out


def _need(teacher: torch.nn.Module | None, signal: str) -> torch.nn.Module:
    if teacher is None:
        raise ValueError(f"signal {signal!r} needs a teacher model; none was given")
    return teacher
