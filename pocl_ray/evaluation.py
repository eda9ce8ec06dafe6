"""Generation settings and the metrics of the MiniLLM / DistiLLM / POCL protocol (§7):
ROUGE-L F1 x 100 with rouge-score (Porter stemming), max over references; plus exact match.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache

import torch
from rouge_score import rouge_scorer

from pocl_ray.data import prompt_batch
from pocl_ray.models import eos_token_ids


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 x 100 of `prediction`, the maximum over `references`."""
    scorer = _scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)


def normalise_answer(text: str) -> str:
    """The answer normalisation of S-NI's exact match (SQuAD's): lower case, punctuation
    removed, the articles a / an / the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 when the prediction equals any reference after `normalise_answer`, else 0."""
    pred = normalise_answer(prediction)
    return 100.0 if any(pred == normalise_answer(r) for r in references) else 0.0


def new_token_budget(max_new_tokens: int, *, positions: int | None, max_prompt_length: int) -> int:
    """New tokens one generation may add: `max_new_tokens`, clamped so that the longest
    allowed prompt plus the answer fits in `positions` (None = no limit).

    The one rule for every place the project generates (scoring's ROUGE answers, on-policy
    samples, evaluation): prompts are cut to data.max_prompt_length by the tokenizer, answers
    to what is left. It depends only on the settings, never on a batch's prompts, so an
    answer does not depend on which rows share its batch.

    Raises:
        ValueError: no room is left for even one new token.
    """
    if positions is None:
        return max_new_tokens
    room = positions - max_prompt_length
    if room < 1:
        raise ValueError(
            f"the model has {positions} positions and prompts may be "
            f"data.max_prompt_length={max_prompt_length} tokens: no room for an answer; lower "
            "data.max_prompt_length"
        )
    return min(max_new_tokens, room)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    decoding: str = "greedy",
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    no_repeat_ngram_size: int = 0,
    batch_size: int = 32,
) -> list[str]:
    """Decode a response for each tokenised prompt (left-padded batches), seeded.

    `decoding="sample"` with the defaults is the paper protocol (T = 1, top-p 1, top-k 0);
    callers pass no_repeat_ngram_size=6 for it. Returns the decoded text after the prompt,
    with special tokens removed.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_ids = list(eos_token_ids(model, tokenizer)) or None
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts_ids), batch_size):
        chunk = prompts_ids[start : start + batch_size]
        input_ids, attention_mask = prompt_batch([list(p) for p in chunk], tokenizer.pad_token_id)
        kwargs = dict(do_sample=decoding == "sample")
        if decoding == "sample":
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        gen = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            no_repeat_ngram_size=no_repeat_ngram_size,
            eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
        new = gen[:, input_ids.shape[1] :]
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    return out


def score_predictions(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Mean ROUGE-L and exact match (both x 100) over examples."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = max(len(predictions), 1)
    return {
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
    }
