"""Core pieces the Ray Train job is built on, tested without Ray: which rows each step and each
rank trains on, the cached-teacher and on-policy losses, per-row losses, and the loss scaling
that makes data-parallel workers compute the global batch's gradient."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pocl_ray import curriculum
from pocl_ray.config import CurriculumConfig, LossConfig, ModelConfig, OptimConfig
from pocl_ray.data import IGNORE_INDEX, TokenizedExample, collate, tokenize_records
from pocl_ray.loop import mean_ce, sft
from pocl_ray.models import build_tiny, freeze_teacher
from pocl_ray.scores import TOPK_IDS, TOPK_LOGPROBS, TOPK_TAIL, arrow_rows, encode_cache, to_arrow
from pocl_ray.signals import teacher_topk
from pocl_ray.train_step import (
    TOPK_TAUS,
    DataParallel,
    OnPolicy,
    cut_at_eos,
    loss_terms,
    make_optimizer,
    on_policy_batch,
    on_policy_terms,
    rank_loss,
    shifted,
    table_batch,
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
        tail = np.full((r, 3), -2.0, np.float32)
        rows.append((ids.astype(np.int32), np.full((r, 2), -1.0, np.float16), tail))
    got = topk_targets(batch["labels"], rows, [1.0, 1.5, 2.0])
    ids, logprobs, tail = got[TOPK_IDS], got[TOPK_LOGPROBS], got[TOPK_TAIL]
    assert ids.shape == (*mask.shape, 2) and logprobs.dtype == torch.float32
    assert tail.shape == (*mask.shape, 3) and tail.dtype == torch.float32
    assert got[TOPK_TAUS].tolist() == [1.0, 1.5, 2.0]
    assert torch.equal(ids[..., 0][mask], targets[mask])  # entry j predicts response token j
    assert (logprobs[mask] == -1.0).all() and (tail[mask] == -2.0).all()
    assert (ids[~mask] == 0).all() and (logprobs[~mask] == 0).all() and (tail[~mask] == 0).all()
    with pytest.raises(ValueError, match="response tokens"):
        topk_targets(batch["labels"], [tuple(x[:-1] for x in r) for r in rows], [1.0, 1.5, 2.0])
    with pytest.raises(ValueError, match="cache_taus"):
        topk_targets(batch["labels"], rows, [1.0, 2.0])


def cache_rows(batch) -> list:
    """A made-up top-2 cache for each row of a collated batch (ids, log-probs, tail)."""
    _, targets, mask = shifted(torch.zeros(*batch["labels"].shape, 1), batch["labels"])
    rows = []
    for b in range(len(mask)):
        r = int(mask[b].sum())
        ids = np.stack([targets[b][mask[b]].numpy(), np.arange(r)], axis=1).astype(np.int32)
        logprobs = np.linspace(-3, -1, 2 * r).reshape(r, 2).astype(np.float16)
        rows.append((ids, logprobs, np.full((r, 2), -2.5, np.float32)))
    return rows


def test_table_rows_make_the_batch_a_step_trains_on(env):
    """Scores-table rows (as stored: Arrow, the cache as fixed-size lists) read back with
    `scores.arrow_rows` give `table_batch` the same batch as collate + topk_targets."""
    examples = env.examples[:3]
    batch = collate(examples, env.tok.pad_token_id)
    cache, taus = cache_rows(batch), [1.0, 2.0]
    frame = pd.DataFrame({
        "sample_id": [e.sample_id for e in examples], "difficulty_rank": [0, 1, 2],
        "stage": [0, 0, 1], "rrf": [0.1, 0.2, 0.3],
        "response_tokens": [sum(x != IGNORE_INDEX for x in e.labels) for e in examples],
        "prompt_length": [e.prompt_length for e in examples],
        "input_ids": [list(e.input_ids) for e in examples],
        "labels": [list(e.labels) for e in examples],
        "references": [["r"] for _ in examples],
        **encode_cache(cache),
    })  # fmt: skip
    rows = arrow_rows(to_arrow(frame, [], topk=2, cache_taus=taus))
    got = table_batch(rows, env.tok.pad_token_id, taus)
    want = dict(batch, **topk_targets(batch["labels"], cache, taus))
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    plain = table_batch(rows, env.tok.pad_token_id, None)
    assert set(plain) == set(batch)
    empty = table_batch([], env.tok.pad_token_id, taus)  # a rank with no rows this step
    assert empty["input_ids"].shape[0] == 1 and (empty["labels"] == IGNORE_INDEX).all()
    assert empty[TOPK_IDS].shape[0] == 1


def test_cache_with_the_whole_vocabulary_is_the_online_kd(env):
    """K = V: the cached-teacher loss is exactly the online one (docs/distill.md)."""
    batch = collate(env.examples[:4], env.tok.pad_token_id)
    with torch.no_grad():
        t = env.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    z = t.logits[:, :-1]
    _, _, mask = shifted(t.logits, batch["labels"])
    taus = [1.0, 1.5, 2.0]
    rows = teacher_topk(z, mask, k=z.shape[-1], cache_taus=taus)
    # the stored float16 log-probs, recomputed in float32 here: the loss itself is exact
    logp = torch.log_softmax(z.float(), dim=-1)
    rows = [
        (ids, logp[b][mask[b]].gather(-1, torch.from_numpy(ids).long()).numpy(), tail)
        for b, (ids, _, tail) in enumerate(rows)
    ]
    cached = dict(batch, **topk_targets(batch["labels"], rows, taus))
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


def rank_grad(model, terms_of_rank, kd_ratio, world, ce_all, kd_all) -> torch.Tensor:
    model.zero_grad()
    rank_loss(terms_of_rank, kd_ratio, world_size=world, ce_tokens_all=ce_all,
              kd_tokens_all=kd_all).backward()  # fmt: skip
    return grads(model).clone()


def test_token_weighted_loss_scale_makes_workers_average_to_the_global_gradient(env):
    """What DDP does with `rank_loss`: the mean over ranks of its gradients is the gradient of
    the token mean over the whole global batch, also when the halves hold different token
    counts."""
    knobs = dict(tau=1.0, kd_ratio=0.7, alpha=0.1, loss=fkl())
    full = collate(env.examples[:6], env.tok.pad_token_id)
    env.student.zero_grad()
    loss_terms(env.student, env.teacher, full, **knobs).total.backward()
    want = grads(env.student).clone()
    halves = [collate(h, env.tok.pad_token_id) for h in (env.examples[:1], env.examples[1:6])]
    terms = [loss_terms(env.student, env.teacher, b, **knobs) for b in halves]
    ce_all = sum(t.tokens for t in terms)
    kd_all = sum(t.kd_tokens for t in terms)
    got = sum(rank_grad(env.student, t, 0.7, 2, ce_all, kd_all) for t in terms) / 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def sampled_rows(env, rows: range, keep: int, pad: int) -> dict[str, torch.Tensor]:
    """A stand-in for the student's samples: each row's prompt and the first `keep` tokens of
    its reference, labelled as on_policy_batch labels sampled tokens."""
    examples = []
    for e in (env.examples[i] for i in rows):
        ids = e.input_ids[: e.prompt_length + keep]
        examples.append(
            TokenizedExample(sample_id="", input_ids=ids,
                             labels=[IGNORE_INDEX] * e.prompt_length + ids[e.prompt_length :],
                             prompt_length=e.prompt_length, prompt_truncated=False,
                             response_truncated=False)
        )  # fmt: skip
    return collate(examples, pad)


def test_on_policy_ranks_average_to_the_one_process_gradient(env):
    """On-policy KD is a mean over the SAMPLED tokens, whose counts differ per rank: two ranks
    weighting CE and KD each by its own token share give the one-process gradient on the same
    global batch; the old single factor (reference tokens only) does not."""
    pad = env.tok.pad_token_id
    knobs = dict(tau=1.5, kd_ratio=0.6, alpha=0.1, loss=fkl(), pad_id=pad)
    refs = [collate(env.examples[i : i + n], pad) for i, n in ((0, 1), (1, 3))]
    samples = [sampled_rows(env, range(0, 1), 2, pad), sampled_rows(env, range(1, 4), 9, pad)]
    env.student.zero_grad()
    full_ref = collate(env.examples[0:4], pad)
    full_sampled = collate([*_as_examples(samples[0]), *_as_examples(samples[1])], pad)
    on_policy_terms(env.student, env.teacher, full_ref, full_sampled, **knobs).total.backward()
    want = grads(env.student).clone()
    terms = [
        on_policy_terms(env.student, env.teacher, r, s, **knobs) for r, s in zip(refs, samples)
    ]
    assert terms[0].kd_tokens != terms[1].kd_tokens  # the case that matters
    ce_all, kd_all = sum(t.tokens for t in terms), sum(t.kd_tokens for t in terms)
    got = sum(rank_grad(env.student, t, 0.6, 2, ce_all, kd_all) for t in terms) / 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    old = 0  # the former rule: total · world · ref_tokens_here / ref_tokens_all
    for r, smp in zip(refs, samples):
        t = on_policy_terms(env.student, env.teacher, r, smp, **knobs)
        env.student.zero_grad()
        (t.total * 2 * t.tokens / ce_all).backward()
        old = old + grads(env.student) / 2
    assert not torch.allclose(old, want, rtol=1e-2, atol=1e-6)


def _as_examples(batch: dict[str, torch.Tensor]) -> list[TokenizedExample]:
    out = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        labels = batch["labels"][b, :n].tolist()
        plen = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
        out.append(TokenizedExample(sample_id="", input_ids=batch["input_ids"][b, :n].tolist(),
                                    labels=labels, prompt_length=plen, prompt_truncated=False,
                                    response_truncated=False))  # fmt: skip
    return out


def test_train_step_data_parallel_scales_the_gradient_not_the_reported_loss(env):
    batch = collate(env.examples[:4], env.tok.pad_token_id)
    plan = curriculum.stage_table(CurriculumConfig(num_stages=1, interval=1), n=4, batch_size=4)
    pos = curriculum.position_at(plan, 0, lr_policy="per_stage")
    reported = []
    # one rank holding all tokens / a rank whose peers hold 3x its tokens (world 2)
    for parallel in (None, DataParallel(world_size=2, all_sum=lambda v: [4 * x for x in v])):
        torch.manual_seed(0)
        model = build_tiny(ModelConfig(hidden_size=16, num_layers=1, num_heads=2), env.tok,
                           MAX_LEN)  # fmt: skip
        opt = make_optimizer(model, OptimConfig(lr=1e-3))
        res = train_step(
            model, env.teacher, opt, batch, pos=pos, base_lr=0.0, loss=fkl(), grad_clip=1e9,
            data_parallel=parallel,
        )  # fmt: skip
        reported.append((res.loss, res.grad_norm))
    assert reported[0][0] == reported[1][0]
    assert math.isclose(reported[1][1], 0.5 * reported[0][1], rel_tol=1e-5)


# ---------------------------------------------------------------- on-policy (pocl-method.md §6)


def test_on_policy_batch_labels_the_sampled_tokens_at_their_own_positions(env):
    batch = collate(env.examples[:4], env.tok.pad_token_id)
    eos, pad = env.tok.eos_token_id, env.tok.pad_token_id
    kw = dict(pad_id=pad, eos_ids=(eos,), max_new_tokens=6, seed=5)
    out = on_policy_batch(env.student, batch, **kw)
    again = on_policy_batch(env.student, batch, **kw)
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


def test_on_policy_batch_ends_a_sample_at_any_eos_of_a_set(env):
    """Llama-3 / Qwen2.5 list several EOS ids (and some models none): a sample ends at the
    first member of the set, and nothing after it is labelled or attended."""
    batch = collate(env.examples[:4], env.tok.pad_token_id)
    pad = env.tok.pad_token_id
    free = on_policy_batch(env.student, batch, pad_id=pad, eos_ids=(), max_new_tokens=6, seed=5)
    plen = env.examples[0].prompt_length
    first = int(free["input_ids"][0, plen])  # row 0's first sampled token
    eos_set = (env.tok.eos_token_id, first)
    out = on_policy_batch(env.student, batch, pad_id=pad, eos_ids=eos_set, max_new_tokens=6,
                          seed=5)  # fmt: skip
    n0 = int(out["attention_mask"][0].sum())
    assert n0 == plen + 1 and out["labels"][0, plen] == first  # ended at once, EOS kept
    assert (out["labels"][0, n0:] == IGNORE_INDEX).all()
    for b, ex in enumerate(env.examples[:4]):
        n = int(out["attention_mask"][b].sum())
        sampled = out["input_ids"][b, ex.prompt_length : n].tolist()
        assert not set(sampled[:-1]) & set(eos_set)  # cut at the FIRST member
        assert (out["labels"][b, n:] == IGNORE_INDEX).all()
    assert cut_at_eos([5, 7, 2, 7, 3], (3, 7)) == [5, 7]
    assert cut_at_eos([5, 6], (3, 7)) == [5, 6] and cut_at_eos([5, 6], ()) == [5, 6]


def test_on_policy_loss_has_no_ce_on_generated_text(env):
    batch = collate(env.examples[:3], env.tok.pad_token_id)
    pad = env.tok.pad_token_id
    sampled = on_policy_batch(env.student, batch, pad_id=pad, eos_ids=(env.tok.eos_token_id,),
                              max_new_tokens=5, seed=1)  # fmt: skip
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
    spec = OnPolicy(seed=9, max_new_tokens=4, pad_id=env.tok.pad_token_id,
                    eos_ids=(env.tok.eos_token_id,))  # fmt: skip
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
    rows = teacher_topk(z[:, :-1], mask, k=8, cache_taus=[1.0, 2.0])
    cached = dict(batch)
    cached.update(
        {k: v.to(dev) for k, v in topk_targets(batch_cpu["labels"], rows, [1.0, 2.0]).items()}
    )
    from_cache = loss_terms(student, None, cached, **knobs, per_row=True)
    assert torch.isfinite(from_cache.total) and from_cache.row_loss.device.type == "cuda"

    opt = make_optimizer(student, OptimConfig(lr=1e-3))
    spec = OnPolicy(seed=3, max_new_tokens=4, pad_id=env.tok.pad_token_id,
                    eos_ids=(env.tok.eos_token_id,))  # fmt: skip
    before = torch.cuda.get_rng_state()
    res = train_step(student, teacher, opt, batch, pos=pos, base_lr=1e-3, loss=fkl(),
                     grad_clip=1.0, on_policy=spec)  # fmt: skip
    assert res.on_policy and math.isfinite(res.loss)
    assert torch.equal(torch.cuda.get_rng_state(), before)  # sampling left the CUDA RNG alone
    res = train_step(
        student,
        teacher,
        opt,
        batch,
        pos=pos,
        base_lr=1e-3,
        loss=fkl(),
        grad_clip=1.0,
        per_row=True,
        data_parallel=DataParallel(world_size=2, all_sum=lambda v: [2 * x for x in v]),
    )
    assert math.isfinite(res.loss) and len(res.row_loss) == 6
    # the plateau trigger's dev loss and SFT take CPU batches and move them to the model
    dev_ce = mean_ce(student, env.examples[:6], env.tok.pad_token_id)
    assert math.isfinite(dev_ce)
    assert dev_ce == pytest.approx(mean_ce(student.cpu(), env.examples[:6], env.tok.pad_token_id),
                                   rel=1e-3)  # fmt: skip
    student.to(dev)
    losses = sft(student, env.examples[:6], epochs=2, lr=1e-3, batch_size=3,
                 pad_id=env.tok.pad_token_id)  # fmt: skip
    assert all(math.isfinite(x) for x in losses)
    assert next(student.parameters()).device.type == "cuda"
