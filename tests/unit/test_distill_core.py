"""Core pieces the Ray Train job is built on, tested without Ray: which rows each step and each
rank trains on, the cached-teacher and on-policy losses, per-row losses, and the loss scaling
that makes data-parallel workers compute the global batch's gradient."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pocl_ray import curriculum
from pocl_ray.config import CurriculumConfig, LossConfig, ModelConfig, OptimConfig
from pocl_ray.data import IGNORE_INDEX, collate, tokenize_records
from pocl_ray.models import build_tiny, freeze_teacher
from pocl_ray.train_step import (
    TOPK_IDS,
    TOPK_LOGITS,
    OnPolicy,
    loss_terms,
    make_optimizer,
    on_policy_batch,
    on_policy_terms,
    response_tokens,
    shifted,
    topk_targets,
    train_step,
)

MAX_LEN = 128


@pytest.fixture(scope="module")
def env(task_records, task_tok):
    examples = tokenize_records(
        task_records[:24], task_tok, max_prompt_length=96, max_length=MAX_LEN
    ).examples
    torch.manual_seed(0)
    student = build_tiny(ModelConfig(hidden_size=16, num_layers=1, num_heads=2), task_tok, MAX_LEN)
    torch.manual_seed(1)
    teacher = freeze_teacher(
        build_tiny(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), task_tok, MAX_LEN)
    )
    return SimpleNamespace(tok=task_tok, examples=examples, student=student, teacher=teacher)


def fkl(**kw) -> LossConfig:
    return LossConfig(kind="fkl", scale_by_tau_sq=True, **kw)


# ---------------------------------------------------------------- rows per step and per rank


@pytest.mark.parametrize("unit, interval", [("epochs", 2), ("steps", 5)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_stage_batches_are_the_epoch_orders_cut_into_batches(unit, interval, shuffle):
    cur = CurriculumConfig(num_stages=2, interval=interval, interval_unit=unit)
    plan = curriculum.stage_table(cur, n=23, batch_size=4)
    p = plan[1]
    subset = list(range(100, 100 + p.size))
    got = curriculum.stage_batches(p, subset, seed=3, batch_size=4, shuffle=shuffle)
    assert len(got) == p.total_steps
    for k, rows in enumerate(got):
        epoch, i = divmod(k, p.steps_per_epoch)
        order = curriculum.epoch_order(subset, seed=3, stage=1, epoch=epoch, shuffle=shuffle)
        assert rows == order[i * 4 : (i + 1) * 4]
        pos = curriculum.stage_position(plan, 1, k, lr_policy="per_stage")
        assert (pos.epoch, pos.step_in_epoch) == (epoch, i)


@pytest.mark.parametrize("n, world", [(16, 2), (7, 2), (1, 2), (10, 3), (5, 1)])
def test_worker_share_partitions_a_batch_in_order(n, world):
    rows = list(range(100, 100 + n))
    shares = [curriculum.worker_share(rows, world, r) for r in range(world)]
    assert sum(shares, []) == rows  # nothing lost, nothing twice, order kept
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError):
        curriculum.worker_share(rows, world, world)


def test_difficulty_buckets_follow_the_stage_sizes():
    sizes = [2, 5, 9]
    ranks = np.arange(1, 10)
    assert curriculum.difficulty_buckets(ranks, sizes).tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    with pytest.raises(ValueError):
        curriculum.difficulty_buckets([0, 1], sizes)


def test_on_policy_seed_is_a_pure_function_with_the_given_rate():
    draws = [curriculum.on_policy_seed(7, s, 0.3) for s in range(2000)]
    assert draws == [curriculum.on_policy_seed(7, s, 0.3) for s in range(2000)]
    rate = sum(d is not None for d in draws) / len(draws)
    assert 0.25 < rate < 0.35
    assert all(curriculum.on_policy_seed(7, s, 0.0) is None for s in range(50))
    assert all(curriculum.on_policy_seed(7, s, 1.0) is not None for s in range(50))


# ---------------------------------------------------------------- cached teacher (top-K)


def test_topk_targets_align_with_the_shifted_response_positions(env):
    batch = collate(env.examples[:3], env.tok.pad_token_id)
    _, targets, mask = shifted(torch.zeros(*batch["labels"].shape, 1), batch["labels"])
    rows = []
    for b in range(3):
        r = int(mask[b].sum())
        ids = np.stack([targets[b][mask[b]].numpy(), np.zeros(r, np.int64)], axis=1)
        rows.append((ids.astype(np.int32), np.ones((r, 2), np.float16)))
    ids, logits = topk_targets(batch["labels"], rows)
    assert ids.shape == (*mask.shape, 2) and logits.dtype == torch.float32
    assert torch.equal(ids[..., 0][mask], targets[mask])  # entry j predicts response token j
    assert (ids[~mask] == 0).all() and (logits[~mask] == 0).all()
    with pytest.raises(ValueError, match="response tokens"):
        topk_targets(batch["labels"], [(r[0][:-1], r[1][:-1]) for r in rows])


def test_cache_with_the_whole_vocabulary_is_the_online_kd(env):
    """K = V: the cached-teacher loss is exactly the online one (docs/distill.md)."""
    batch = collate(env.examples[:4], env.tok.pad_token_id)
    with torch.no_grad():
        t = env.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    z = t.logits[:, :-1]
    _, _, mask = shifted(t.logits, batch["labels"])
    vals, ids = z.topk(z.shape[-1], dim=-1)
    rows = [(ids[b][mask[b]].numpy(), vals[b][mask[b]].numpy()) for b in range(4)]
    cached = dict(batch)
    cached[TOPK_IDS], cached[TOPK_LOGITS] = topk_targets(batch["labels"], rows)
    knobs = dict(tau=1.5, kd_ratio=0.8, alpha=0.1, loss=fkl())
    online = loss_terms(env.student, env.teacher, batch, **knobs)
    from_cache = loss_terms(env.student, None, cached, **knobs, per_row=True)
    torch.testing.assert_close(from_cache.kd, online.kd, rtol=1e-5, atol=1e-6)
    sums = from_cache.row_loss.sum() / from_cache.tokens
    torch.testing.assert_close(sums, from_cache.total.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(from_cache.total, online.total, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        loss_terms(env.student, env.teacher, cached, **knobs)


# ---------------------------------------------------------------- per-row losses, loss scale


@pytest.mark.parametrize("kd_ratio", [0.0, 0.7, 1.0])
def test_per_row_losses_add_up_to_the_batch_loss(env, kd_ratio):
    batch = collate(env.examples[:5], env.tok.pad_token_id)
    t = loss_terms(
        env.student, env.teacher, batch, tau=2.0, kd_ratio=kd_ratio, alpha=0.1,
        loss=fkl(chunk_size=7), per_row=True,
    )  # fmt: skip
    assert t.row_tokens.tolist() == [
        sum(x != IGNORE_INDEX for x in e.labels[1:]) for e in env.examples[:5]
    ]
    torch.testing.assert_close(t.row_loss.sum() / t.tokens, t.total.detach(), rtol=1e-5, atol=0)
    one = collate(env.examples[2:3], env.tok.pad_token_id)  # a row alone: its own token mean
    alone = loss_terms(env.student, env.teacher, one, tau=2.0, kd_ratio=kd_ratio, alpha=0.1,
                       loss=fkl())  # fmt: skip
    torch.testing.assert_close(t.row_loss[2] / t.row_tokens[2], alone.total.detach(), rtol=1e-4,
                               atol=1e-6)  # fmt: skip


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_token_weighted_loss_scale_makes_workers_average_to_the_global_gradient(env):
    """What DDP does with the ray_train loss scale: mean over ranks of the gradients of
    scale_r · loss_r, scale_r = world · tokens_r / tokens_all, is the gradient of the token
    mean over the whole global batch, also when the halves hold different token counts."""
    knobs = dict(tau=1.0, kd_ratio=0.7, alpha=0.1, loss=fkl())
    full = collate(env.examples[:6], env.tok.pad_token_id)
    env.student.zero_grad()
    loss_terms(env.student, env.teacher, full, **knobs).total.backward()
    want = grads(env.student).clone()
    halves = [env.examples[:1], env.examples[1:6]]
    total_tokens = sum(response_tokens(collate(h, env.tok.pad_token_id)) for h in halves)
    got = 0
    for h in halves:
        b = collate(h, env.tok.pad_token_id)
        env.student.zero_grad()
        scale = 2 * response_tokens(b) / total_tokens
        (loss_terms(env.student, env.teacher, b, **knobs).total * scale).backward()
        got = got + grads(env.student) / 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_train_step_loss_scale_scales_the_gradient_not_the_reported_loss(env):
    batch = collate(env.examples[:4], env.tok.pad_token_id)
    plan = curriculum.stage_table(CurriculumConfig(num_stages=1, interval=1), n=4, batch_size=4)
    pos = curriculum.position_at(plan, 0, lr_policy="per_stage")
    reported = []
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        model = build_tiny(ModelConfig(hidden_size=16, num_layers=1, num_heads=2), env.tok,
                           MAX_LEN)  # fmt: skip
        opt = make_optimizer(model, OptimConfig(lr=1e-3))
        res = train_step(
            model, env.teacher, opt, batch, pos=pos, base_lr=0.0, loss=fkl(), grad_clip=1e9,
            loss_scale=scale,
        )  # fmt: skip
        reported.append((res.loss, res.grad_norm))
    assert reported[0][0] == reported[1][0]
    assert math.isclose(reported[1][1], 3 * reported[0][1], rel_tol=1e-5)


# ---------------------------------------------------------------- on-policy (pocl-method.md §6)


def test_on_policy_batch_labels_the_sampled_tokens_at_their_own_positions(env):
    batch = collate(env.examples[:4], env.tok.pad_token_id)
    eos, pad = env.tok.eos_token_id, env.tok.pad_token_id
    out = on_policy_batch(env.student, batch, pad_id=pad, max_new_tokens=6, max_length=MAX_LEN,
                          seed=5)  # fmt: skip
    again = on_policy_batch(env.student, batch, pad_id=pad, max_new_tokens=6, max_length=MAX_LEN,
                            seed=5)  # fmt: skip
    assert all(torch.equal(out[k], again[k]) for k in out)  # seeded
    for b, ex in enumerate(env.examples[:4]):
        ids, labels = out["input_ids"][b].tolist(), out["labels"][b].tolist()
        n = int(out["attention_mask"][b].sum())
        plen = ex.prompt_length
        assert ids[:plen] == ex.input_ids[:plen]  # the same prompt
        assert labels[:plen] == [IGNORE_INDEX] * plen  # no loss on the prompt
        sampled = ids[plen:n]
        assert 1 <= len(sampled) <= 6
        assert labels[plen:n] == sampled  # label at t is the token at t: `shifted` aligns
        assert eos not in sampled[:-1]  # cut after the first EOS
        assert all(x == IGNORE_INDEX for x in labels[n:])
    # after the shift, the logits at the last prompt position predict the first sample
    _, targets, mask = shifted(torch.zeros(*out["labels"].shape, 1), out["labels"])
    plen = env.examples[0].prompt_length
    assert mask[0, plen - 1] and targets[0, plen - 1] == out["input_ids"][0, plen]
    assert not mask[0, plen - 2]


def test_on_policy_loss_has_no_ce_on_generated_text(env):
    batch = collate(env.examples[:3], env.tok.pad_token_id)
    pad = env.tok.pad_token_id
    sampled = on_policy_batch(env.student, batch, pad_id=pad, max_new_tokens=5,
                              max_length=MAX_LEN, seed=1)  # fmt: skip
    knobs = dict(tau=1.0, alpha=0.1, loss=fkl())
    on = on_policy_terms(env.student, env.teacher, batch, sampled, pad_id=pad, kd_ratio=0.6,
                         **knobs)  # fmt: skip
    off = loss_terms(env.student, env.teacher, batch, kd_ratio=0.6, **knobs)
    gen = loss_terms(env.student, env.teacher, sampled, kd_ratio=1.0, **knobs)
    torch.testing.assert_close(on.ce, off.ce, rtol=1e-5, atol=1e-6)  # CE: references only
    torch.testing.assert_close(on.kd, gen.kd, rtol=1e-5, atol=1e-6)  # KD: the samples only
    assert on.tokens == off.tokens
    torch.testing.assert_close(on.total, 0.4 * on.ce + 0.6 * on.kd)


def test_on_policy_step_leaves_the_global_rng_alone(env):
    batch = collate(env.examples[:2], env.tok.pad_token_id)
    plan = curriculum.stage_table(CurriculumConfig(num_stages=1, interval=1), n=2, batch_size=2)
    pos = curriculum.position_at(plan, 0, lr_policy="per_stage")
    opt = torch.optim.SGD(env.student.parameters(), lr=0.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    spec = OnPolicy(seed=9, max_new_tokens=4, max_length=MAX_LEN, pad_id=env.tok.pad_token_id)
    res = train_step(env.student, env.teacher, opt, batch, pos=pos, base_lr=0.0, loss=fkl(),
                     grad_clip=1.0, on_policy=spec)  # fmt: skip
    assert res.on_policy and res.row_loss is None
    assert torch.equal(torch.get_rng_state(), before)
    assert math.isfinite(res.loss)


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_worker_step_on_gpu_with_a_half_precision_teacher(env):
    """What a GPU worker runs: fp32 student, frozen bf16 teacher, online / cached / on-policy
    steps with per-row losses; the result matches the CPU step."""
    dev = torch.device("cuda")
    batch_cpu = collate(env.examples[:6], env.tok.pad_token_id)
    batch = {k: v.to(dev) for k, v in batch_cpu.items()}
    plan = curriculum.stage_table(CurriculumConfig(num_stages=1, interval=1), n=6, batch_size=6)
    pos = curriculum.position_at(plan, 0, lr_policy="per_stage")
    student = build_tiny(ModelConfig(hidden_size=16, num_layers=1, num_heads=2), env.tok, MAX_LEN)
    teacher = freeze_teacher(
        build_tiny(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), env.tok, MAX_LEN)
    )
    knobs = dict(tau=2.0, kd_ratio=0.8, alpha=0.1, loss=fkl())
    cpu = loss_terms(student, teacher, batch_cpu, **knobs)
    student.to(dev)
    teacher.to(dev).to(torch.bfloat16)
    gpu = loss_terms(student, teacher, batch, **knobs, per_row=True)
    assert gpu.row_loss.device.type == "cuda"
    torch.testing.assert_close(gpu.ce.cpu(), cpu.ce, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu.kd.cpu(), cpu.kd, rtol=5e-2, atol=1e-3)  # bf16 teacher
    torch.testing.assert_close(gpu.row_loss.sum().cpu() / gpu.tokens, gpu.total.detach().cpu(),
                               rtol=1e-4, atol=1e-6)  # fmt: skip

    with torch.no_grad():  # the cache path on the GPU
        z = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    vals, ids = z[:, :-1].float().topk(8, dim=-1)
    rows = [(ids[b][mask[b]].cpu().numpy(), vals[b][mask[b]].cpu().numpy()) for b in range(6)]
    cached = dict(batch)
    t_ids, t_logits = topk_targets(batch_cpu["labels"], rows)
    cached[TOPK_IDS], cached[TOPK_LOGITS] = t_ids.to(dev), t_logits.to(dev)
    from_cache = loss_terms(student, None, cached, **knobs, per_row=True)
    assert torch.isfinite(from_cache.total) and from_cache.row_loss.device.type == "cuda"

    opt = make_optimizer(student, OptimConfig(lr=1e-3))
    spec = OnPolicy(seed=3, max_new_tokens=4, max_length=MAX_LEN, pad_id=env.tok.pad_token_id)
    before = torch.cuda.get_rng_state()
    res = train_step(student, teacher, opt, batch, pos=pos, base_lr=1e-3, loss=fkl(),
                     grad_clip=1.0, on_policy=spec)  # fmt: skip
    assert res.on_policy and math.isfinite(res.loss)
    assert torch.equal(torch.cuda.get_rng_state(), before)  # sampling left the CUDA RNG alone
    res = train_step(student, teacher, opt, batch, pos=pos, base_lr=1e-3, loss=fkl(),
                     grad_clip=1.0, per_row=True, loss_scale=0.5)  # fmt: skip
    assert math.isfinite(res.loss) and len(res.row_loss) == 6
