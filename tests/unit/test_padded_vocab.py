"""Teacher and student whose padded vocabulary sizes differ (Qwen2.5-7B: 152,064 rows;
Qwen2.5-0.5B: 151,936; one 151,665-token tokenizer), with tiny Qwen2 models: scoring, the
top-K cache and a training step compare the shared rows and never index past either head."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from pocl_ray.config import LossConfig, OptimConfig
from pocl_ray.curriculum import Position
from pocl_ray.data import collate, tokenize_records
from pocl_ray.losses import per_token_kd
from pocl_ray.models import freeze_teacher
from pocl_ray.signals import score_batch, signal_mask
from pocl_ray.train_step import loss_terms, make_optimizer, topk_targets, train_step

TAUS = [1.0, 2.0]


def qwen2(tok, extra_rows: int, seed: int, hidden: int = 32):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok) + extra_rows, hidden_size=hidden,
                      intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def pair(task_records, task_tok):
    teacher = freeze_teacher(qwen2(task_tok, 64, seed=1, hidden=64))  # like 152,064
    student = qwen2(task_tok, 16, seed=0)  # like 151,936
    records = task_records[:6]
    examples = tokenize_records(records, task_tok, max_prompt_length=96, max_length=128).examples
    return teacher, student, task_tok, records, examples


def test_scoring_compares_the_shared_rows_and_caches_real_tokens_only(pair):
    teacher, student, tok, records, examples = pair
    out = score_batch(examples, [r.references for r in records],
                      signals=["nll", "teacher_nll", "kd_gap"], scorer=student, teacher=teacher,
                      tokenizer=tok, max_new_tokens=2, topk=8, cache_taus=TAUS)  # fmt: skip
    assert all(math.isfinite(v) for vs in out.signals.values() for v in vs)
    assert max(int(ids.max()) for ids, _, _ in out.cache) < len(tok)
    # kd_gap is KL over the first min(Vt, Vs) rows: the student's head is the smaller one
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        z_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = signal_mask(batch["labels"], examples, tok.eos_token_id)
    vs = z_s.shape[-1]
    per = per_token_kd(z_s[:, :-1], z_t[:, :-1, :vs], kind="fkl", temperature=1.0)
    gap = (per * mask).sum(-1) / mask.sum(-1)  # by hand: the masked mean per row
    assert gap.tolist() == pytest.approx(out.signals["kd_gap"], rel=1e-5)


@pytest.mark.parametrize("source", ["online", "cache"])
def test_a_training_step_runs_on_the_shared_rows(pair, source):
    teacher, student, tok, _, examples = pair
    batch = collate(examples, tok.pad_token_id)
    pos = Position(stage=0, epoch=0, step_in_epoch=0, step_in_stage=0, global_step=0,
                   tau=2.0, kd_ratio=0.8, alpha=0.1, lr_mult=1.0)  # fmt: skip
    loss = LossConfig(kind="fkl", teacher_source=source)
    if source == "cache":
        with torch.no_grad():
            z = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out = score_batch(examples, [[""]] * len(examples), signals=["nll"], scorer=student,
                          teacher=teacher, tokenizer=tok, max_new_tokens=1, topk=8,
                          cache_taus=TAUS)  # fmt: skip
        batch.update(topk_targets(batch["labels"], out.cache, TAUS))
        assert z.logits.shape[-1] > student.config.vocab_size  # the cache came from the bigger head
    opt = make_optimizer(student, OptimConfig(lr=1e-3))
    before = [p.detach().clone() for p in student.parameters()]
    res = train_step(student, None if source == "cache" else teacher, opt, batch, pos=pos,
                     base_lr=1e-3, loss=loss, grad_clip=1.0)  # fmt: skip
    assert math.isfinite(res.loss) and res.kd > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    terms = loss_terms(student, None if source == "cache" else teacher, batch, tau=2.0,
                       kd_ratio=0.8, alpha=0.1, loss=loss)  # fmt: skip
    assert torch.isfinite(terms.total)
