"""Per-sample difficulty signals against hand computations on tiny models."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pocl_ray.config import ModelConfig
from pocl_ray.data import collate, tokenize_records
from pocl_ray.evaluation import generate, rouge_l
from pocl_ray.models import build_tiny, freeze_teacher
from pocl_ray.signals import kd_gap, response_nll, score_batch

MAX_LEN = 128
ALL = ["rouge", "nll", "teacher_nll", "kd_gap"]


@pytest.fixture(scope="module")
def env(task_records, task_tok):
    records, tok = task_records, task_tok
    examples = tokenize_records(records, tok, max_prompt_length=96, max_length=MAX_LEN).examples
    # six examples of clearly different lengths, so the batch has real right padding
    by_len = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    picked = [by_len[0], by_len[-1], by_len[1], by_len[len(by_len) // 2], by_len[-2], by_len[2]]
    exs = [examples[i] for i in picked]
    refs = [records[i].references for i in picked]
    assert len({len(e.input_ids) for e in exs}) > 2
    return SimpleNamespace(tok=tok, examples=exs, references=refs)


def tiny(tok, arch: str, seed: int):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2)
    return build_tiny(cfg, tok, MAX_LEN).eval()


@pytest.fixture(scope="module")
def student(env):
    return tiny(env.tok, "gpt2", seed=0)


@pytest.fixture(scope="module")
def teacher(env):
    return freeze_teacher(tiny(env.tok, "llama", seed=1))


def hand_nll(model, example) -> float:
    """Mean CE of the response tokens, the example alone (no padding), one token at a time."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    losses = [
        F.cross_entropy(logits[t - 1][None], ids[0, t][None]).item()
        for t in range(example.prompt_length, len(example.input_ids))
    ]
    return sum(losses) / len(losses)


def hand_kl(teacher, student, example) -> float:
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        t_logits, s_logits = teacher(input_ids=ids).logits[0], student(input_ids=ids).logits[0]
    total = 0.0
    span = range(example.prompt_length, len(example.input_ids))
    for t in span:
        log_p = torch.log_softmax(t_logits[t - 1].double(), -1)
        log_q = torch.log_softmax(s_logits[t - 1].double(), -1)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
    return total / len(span)


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_response_nll_equals_hand_loop(env, student, teacher, which):
    model = student if which == "student" else teacher
    nll = response_nll(model, collate(env.examples, env.tok.pad_token_id))
    assert nll.shape == (len(env.examples),)
    expected = [hand_nll(model, e) for e in env.examples]
    assert nll.tolist() == pytest.approx(expected, rel=1e-5)


def test_response_nll_averages_only_unmasked_labels(env, student):
    """A label set to -100 drops out of the mean: masking the first response label removes
    exactly that token's term."""
    e = env.examples[0]
    batch = collate([e], env.tok.pad_token_id)
    base = response_nll(student, batch).item()
    labels = batch["labels"].clone()
    labels[0, e.prompt_length] = -100
    fewer = response_nll(student, dict(batch, labels=labels)).item()
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        logits = student(input_ids=ids).logits[0]
    n = len(e.input_ids) - e.prompt_length
    first = F.cross_entropy(logits[e.prompt_length - 1][None], ids[0, e.prompt_length][None]).item()
    assert fewer == pytest.approx((base * n - first) / (n - 1), rel=1e-5)


def test_kd_gap_is_zero_for_the_same_model(env, student):
    batch = collate(env.examples, env.tok.pad_token_id)
    gap = kd_gap(student, copy.deepcopy(student), batch)
    assert gap.shape == (len(env.examples),)
    assert gap.abs().max().item() < 1e-5


def test_kd_gap_is_kl_teacher_student(env, student, teacher):
    batch = collate(env.examples, env.tok.pad_token_id)
    gap = kd_gap(teacher, student, batch)
    assert (gap > 0).all()
    expected = [hand_kl(teacher, student, e) for e in env.examples]
    assert gap.tolist() == pytest.approx(expected, rel=1e-4)
    # KL(teacher ‖ student): the argument order matters
    reverse = kd_gap(student, teacher, batch)
    assert not torch.allclose(gap, reverse, rtol=1e-3)


def test_score_batch_returns_every_signal(env, student, teacher):
    out = score_batch(
        env.examples,
        env.references,
        signals=ALL,
        scorer=student,
        teacher=teacher,
        tokenizer=env.tok,
        max_new_tokens=4,
    )
    assert set(out) == set(ALL)
    n = len(env.examples)
    for name, values in out.items():
        assert isinstance(values, list) and len(values) == n, name
        assert all(isinstance(v, float) for v in values), name
    batch = collate(env.examples, env.tok.pad_token_id)
    assert out["nll"] == pytest.approx(response_nll(student, batch).tolist(), rel=1e-6)
    assert out["teacher_nll"] == pytest.approx(response_nll(teacher, batch).tolist(), rel=1e-6)
    assert out["kd_gap"] == pytest.approx(kd_gap(teacher, student, batch).tolist(), rel=1e-6)
    assert out["nll"] != out["teacher_nll"]
    prompts = [e.input_ids[: e.prompt_length] for e in env.examples]
    answers = generate(student, env.tok, prompts, max_new_tokens=4)
    expected = [rouge_l(a, r) for a, r in zip(answers, env.references)]
    assert out["rouge"] == pytest.approx(expected)
    assert all(0.0 <= v <= 100.0 for v in out["rouge"])


def test_score_batch_only_requested_signals(env, student):
    out = score_batch(
        env.examples,
        env.references,
        signals=["nll"],
        scorer=student,
        teacher=None,
        tokenizer=env.tok,
        max_new_tokens=4,
    )
    assert list(out) == ["nll"] and len(out["nll"]) == len(env.examples)


@pytest.mark.parametrize("signal", ["teacher_nll", "kd_gap"])
def test_teacher_signals_need_a_teacher(env, student, signal):
    with pytest.raises(ValueError, match=signal):
        score_batch(
            env.examples,
            env.references,
            signals=["nll", signal],
            scorer=student,
            teacher=None,
            tokenizer=env.tok,
            max_new_tokens=4,
        )
