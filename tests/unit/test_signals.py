"""Per-sample difficulty signals against hand computations on tiny models."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pocl_ray.config import ModelConfig
from pocl_ray.data import collate, tokenize_record, tokenize_records
from pocl_ray.evaluation import generate, rouge_l
from pocl_ray.models import build_tiny, freeze_teacher, head_selectable
from pocl_ray.signals import (
    ResponseLogits,
    kd_gap,
    response_nll,
    score_batch,
    signal_mask,
)

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
    # and one whose response was cut (it lost its EOS and one more token)
    long = exs[1]
    cut = tokenize_record(
        records[picked[1]],
        tok,
        max_prompt_length=long.prompt_length,
        max_length=len(long.input_ids) - 2,
    )
    assert cut.response_truncated and cut.input_ids[-1] != tok.eos_token_id
    exs.append(cut)
    refs.append(records[picked[1]].references)
    assert all(e.input_ids[-1] == tok.eos_token_id for e in exs[:-1])
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


def signal_span(example, eos_id) -> range:
    """The response positions the signals average: all but an appended (not cut) EOS."""
    end = len(example.input_ids)
    if not example.response_truncated and example.input_ids[-1] == eos_id:
        end -= 1
    return range(example.prompt_length, end)


def hand_nll(model, example, span=None) -> float:
    """Mean CE of the response tokens, the example alone (no padding), one token at a time."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    span = span or range(example.prompt_length, len(example.input_ids))
    losses = [F.cross_entropy(logits[t - 1][None], ids[0, t][None]).item() for t in span]
    return sum(losses) / len(losses)


def hand_kl(teacher, student, example, span=None) -> float:
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        t_logits, s_logits = teacher(input_ids=ids).logits[0], student(input_ids=ids).logits[0]
    total = 0.0
    span = span or range(example.prompt_length, len(example.input_ids))
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
    ).signals
    assert set(out) == set(ALL)
    n = len(env.examples)
    for name, values in out.items():
        assert isinstance(values, list) and len(values) == n, name
        assert all(isinstance(v, float) for v in values), name
    batch = collate(env.examples, env.tok.pad_token_id)
    mask = signal_mask(batch["labels"], env.examples, env.tok.eos_token_id)
    assert out["nll"] == pytest.approx(response_nll(student, batch, mask).tolist(), rel=1e-6)
    assert out["teacher_nll"] == pytest.approx(
        response_nll(teacher, batch, mask).tolist(), rel=1e-6
    )
    assert out["kd_gap"] == pytest.approx(kd_gap(teacher, student, batch, mask).tolist(), rel=1e-6)
    assert out["nll"] != out["teacher_nll"]
    # rouge: greedy answers with no repeated 6-gram (the authors' setting)
    prompts = [e.input_ids[: e.prompt_length] for e in env.examples]
    answers = generate(student, env.tok, prompts, max_new_tokens=4, no_repeat_ngram_size=6)
    expected = [rouge_l(a, r) for a, r in zip(answers, env.references)]
    assert out["rouge"] == pytest.approx(expected)
    assert all(0.0 <= v <= 100.0 for v in out["rouge"])


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nll_signals_leave_out_the_appended_eos(env, student, teacher, which):
    """nll / teacher_nll / kd_gap average every response token but the EOS the tokenizer
    appended; a response that was cut has no EOS and keeps its last token."""
    model = student if which == "student" else teacher
    got = score_batch(
        env.examples,
        env.references,
        signals=["nll", "teacher_nll", "kd_gap"],
        scorer=model,
        teacher=teacher,
        tokenizer=env.tok,
        max_new_tokens=4,
    ).signals
    eos = env.tok.eos_token_id
    spans = [signal_span(e, eos) for e in env.examples]
    assert [len(s) for s in spans[:-1]] == [
        len(e.input_ids) - e.prompt_length - 1 for e in env.examples[:-1]
    ]
    assert len(spans[-1]) == len(env.examples[-1].input_ids) - env.examples[-1].prompt_length
    want = [hand_nll(model, e, s) for e, s in zip(env.examples, spans)]
    assert got["nll"] == pytest.approx(want, rel=1e-5)
    want = [hand_nll(teacher, e, s) for e, s in zip(env.examples, spans)]
    assert got["teacher_nll"] == pytest.approx(want, rel=1e-5)
    want = [hand_kl(teacher, model, e, s) for e, s in zip(env.examples, spans)]
    assert got["kd_gap"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def count_forwards(model, monkeypatch, rows: int) -> list[int]:
    """Count the runs of `model`'s decoder body on a batch of `rows` rows (a one-element
    list, updated in place). The body is what costs; the model's forward calls it (and its
    one-time head self-check runs it on 2 rows)."""
    calls = [0]
    body = model.base_model
    inner = body.forward

    def counted(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls[0] += ids is not None and ids.shape[0] == rows
        return inner(*args, **kwargs)

    monkeypatch.setattr(body, "forward", counted)
    return calls


def test_score_batch_runs_the_teacher_once(env, student, teacher, monkeypatch):
    """All four signals plus the cache: one teacher forward, one scorer forward besides
    generation (rouge's greedy decoding runs the scorer step by step)."""
    t_calls = count_forwards(teacher, monkeypatch, len(env.examples))
    out = score_batch(
        env.examples,
        env.references,
        signals=ALL,
        scorer=student,
        teacher=teacher,
        tokenizer=env.tok,
        max_new_tokens=4,
        topk=3,
        cache_taus=[1.0, 2.0],
    )
    assert t_calls == [1]
    assert set(out.signals) == set(ALL) and len(out.cache) == len(env.examples)
    s_calls = count_forwards(student, monkeypatch, len(env.examples))
    score_batch(
        env.examples,
        env.references,
        signals=["nll", "teacher_nll", "kd_gap"],
        scorer=student,
        teacher=teacher,
        tokenizer=env.tok,
        max_new_tokens=4,
        topk=3,
        cache_taus=[1.0, 2.0],
    )
    assert t_calls == [2] and s_calls == [1]


def test_a_teacher_scorer_reuses_the_teachers_forward(env, teacher, monkeypatch):
    calls = count_forwards(teacher, monkeypatch, len(env.examples))
    out = score_batch(
        env.examples,
        env.references,
        signals=["nll", "teacher_nll"],
        scorer=teacher,
        teacher=teacher,
        tokenizer=env.tok,
        max_new_tokens=4,
        topk=2,
        cache_taus=[1.0],
    )
    assert calls == [1]
    assert out.signals["nll"] == out.signals["teacher_nll"]


@pytest.mark.parametrize("k", [1, 5])
def test_cache_rows_equal_a_direct_computation(env, student, teacher, k):
    """Each example's cache row, computed alone (no padding) from the definition."""
    taus = [0.5, 1.0, 4 / 3, 2.0]
    got = score_batch(
        env.examples,
        env.references,
        signals=["nll"],
        scorer=student,
        teacher=teacher,
        tokenizer=env.tok,
        max_new_tokens=4,
        topk=k,
        cache_taus=taus,
    ).cache
    for example, (ids, logprobs, tail) in zip(env.examples, got, strict=True):
        r = len(example.input_ids) - example.prompt_length  # every response token, EOS too
        assert ids.shape == logprobs.shape == (r, k) and tail.shape == (r, len(taus))
        assert (ids.dtype, logprobs.dtype, tail.dtype) == (np.int32, np.float16, np.float32)
        with torch.no_grad():
            z = teacher(input_ids=torch.tensor([example.input_ids])).logits[0].double()
        logp = torch.log_softmax(z[example.prompt_length - 1 : -1], dim=-1)
        want_vals, want_ids = logp.topk(k, dim=-1)
        assert (ids == want_ids.numpy()).all()
        np.testing.assert_allclose(logprobs.astype(np.float64), want_vals.numpy(), rtol=1e-3,
                                   atol=1e-3)  # fmt: skip
        outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, want_ids, False)
        want_tail = torch.stack(
            [torch.logsumexp((logp / t).masked_fill(~outside, -torch.inf), -1) for t in taus], -1
        )
        np.testing.assert_allclose(tail, want_tail.numpy(), rtol=1e-4, atol=1e-4)
        # top-K mass + tail mass = 1 at T = 1
        total = np.logaddexp(
            np.logaddexp.reduce(logprobs.astype(np.float64), axis=1), tail[:, taus.index(1.0)]
        )
        np.testing.assert_allclose(total, 0.0, atol=2e-3)


def test_cache_of_the_whole_vocabulary_has_an_empty_tail(env, student, teacher):
    v = teacher.config.vocab_size
    (ids, logprobs, tail), *_ = score_batch(
        env.examples[:1],
        env.references[:1],
        signals=["nll"],
        scorer=student,
        teacher=teacher,
        tokenizer=env.tok,
        max_new_tokens=4,
        topk=v,
        cache_taus=[1.0, 2.0],
    ).cache
    assert ids.shape[1] == v and np.isneginf(tail).all()
    assert (np.sort(ids, axis=1) == np.arange(v)).all()


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
    assert list(out.signals) == ["nll"] and len(out.signals["nll"]) == len(env.examples)
    assert out.cache is None


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


def test_the_cache_needs_a_teacher(env, student):
    with pytest.raises(ValueError, match="top-K cache"):
        score_batch(
            env.examples,
            env.references,
            signals=["nll"],
            scorer=student,
            teacher=None,
            tokenizer=env.tok,
            max_new_tokens=4,
            topk=2,
            cache_taus=[1.0],
        )


# ---------------------------------------------------------------- ResponseLogits


def response_positions(env):
    batch = collate(env.examples, env.tok.pad_token_id)
    return batch, (batch["labels"][:, 1:] != -100).nonzero()


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_response_logits_equal_the_full_forward(env, student, teacher, which):
    """The head applied at the response positions only gives the full forward's logits."""
    model = student if which == "student" else teacher
    batch, positions = response_positions(env)
    assert head_selectable(model, raw=True)  # GPT-2 and Llama: the cheap path is taken
    got = ResponseLogits(model, batch, positions)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    want = want.logits[:, :-1][tuple(positions.T)]
    n = len(positions)
    chunks = torch.cat([got.chunk(slice(i, i + 5)) for i in range(0, n, 5)])
    assert chunks.dtype == torch.float32 and chunks.shape == want.shape
    torch.testing.assert_close(chunks, want, rtol=1e-5, atol=1e-5)


class SoftCapped(torch.nn.Module):
    """A causal LM whose logits are NOT head(base(x)): it soft-caps them (as Gemma 2 does)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


def test_a_model_that_post_processes_logits_takes_the_full_forward(env, student):
    model = SoftCapped(student).eval()
    batch, positions = response_positions(env)
    # per position, so training may select positions before the head; scoring applies the
    # head itself, so it must see the soft-capping and take the full forward
    assert head_selectable(model) and not head_selectable(model, raw=True)
    got = ResponseLogits(model, batch, positions).chunk(slice(None))
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(got, want.logits[:, :-1][tuple(positions.T)].float())
    assert got.abs().max() <= 3.0


def test_a_bfloat16_body_gives_float32_logits_close_to_float32(env, teacher):
    """scoring.dtype=bfloat16: the body at bfloat16, the head and every signal in float32."""
    batch, positions = response_positions(env)
    low = copy.deepcopy(teacher).to(torch.bfloat16)
    got = ResponseLogits(low, batch, positions).chunk(slice(None))
    want = ResponseLogits(teacher, batch, positions).chunk(slice(None))
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    common = dict(signals=["nll", "teacher_nll", "kd_gap"], tokenizer=env.tok, max_new_tokens=4)
    a = score_batch(env.examples, env.references, scorer=low, teacher=low, **common).signals
    b = score_batch(env.examples, env.references, scorer=teacher, teacher=teacher, **common)
    np.testing.assert_allclose(a["nll"], b.signals["nll"], rtol=0.02)
    assert max(abs(x) for x in a["kd_gap"]) == 0.0  # the same model: no gap at any precision


@pytest.mark.parametrize("where", ["none", "teacher", "both", "student"])
def test_kd_gap_per_position_handles_masked_vocabulary_entries(where):
    """-inf logits (masked tokens) take the general rule; finite chunks the fast product."""
    from pocl_ray.losses import per_token_kd
    from pocl_ray.signals import _per_position_kl

    torch.manual_seed(0)
    s, t = torch.randn(6, 50) * 3, torch.randn(6, 50) * 3
    if where in ("teacher", "both"):
        t[:, 40:] = -torch.inf
    if where in ("student", "both"):
        s[:, 45:] = -torch.inf
    got = _per_position_kl(s.log_softmax(-1), t.log_softmax(-1), s, t)
    want = per_token_kd(s, t, kind="fkl", temperature=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.isfinite().all()
