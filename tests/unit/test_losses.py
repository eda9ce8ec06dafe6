"""The KD losses against a naive float64 per-token formulation, plus their properties."""

import pytest
import torch
import torch.nn.functional as F

from pocl_ray.losses import (
    LEAN_VOCAB,
    cached_teacher_log_probs,
    ce_loss,
    kd_loss,
    mixed_loss,
    per_token_kd,
    tail_log_partition,
    topk_kd_loss,
)

KINDS = ["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
NEG_INF = float("-inf")


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum()  # xlogy: 0·log 0 = 0


def naive_token(s: torch.Tensor, t: torch.Tensor, kind: str, tau: float, alpha: float, beta: float):
    """One position, probability space, written straight from pocl-method.md section 5."""
    p = torch.softmax(t.double() / tau, dim=-1)
    q = torch.softmax(s.double() / tau, dim=-1)
    if kind == "fkl":
        return _kl(p, q)
    if kind == "rkl":
        return _kl(q, p)
    if kind == "jsd":
        m = (1 - beta) * p + beta * q
        return beta * _kl(q, m) + (1 - beta) * _kl(p, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum()
    if kind == "skl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    assert kind == "srkl"
    return _kl(q, (1 - alpha) * p + alpha * q)


def naive_kd(s, t, mask, *, kind, tau=1.0, scale=True, alpha=0.1, beta=0.9):
    vocab = min(s.shape[-1], t.shape[-1])
    s, t = s[..., :vocab].reshape(-1, vocab), t[..., :vocab].reshape(-1, vocab)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i, selected in enumerate(mask.reshape(-1).tolist()):
        if selected:
            total = total + naive_token(s[i], t[i], kind, tau, alpha, beta)
            count += 1
    return total / count * (tau**2 if scale else 1.0)


def make_inputs(seed: int, shape=(2, 5), vs=11, vt=11, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vs, generator=gen) * scale
    t = torch.randn(*shape, vt, generator=gen) * scale
    mask = torch.rand(*shape, generator=gen) > 0.4
    mask.view(-1)[0] = True  # at least one response token
    return s, t, mask


def value_and_grads(fn, s, t):
    s, t = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    value = fn(s, t)
    grad_s, grad_t = torch.autograd.grad(value, (s, t))
    return value, grad_s, grad_t


def assert_same_value_and_grads(fn_a, fn_b, s, t, **tol):
    for a, b in zip(value_and_grads(fn_a, s, t), value_and_grads(fn_b, s, t), strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), **tol)


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("tau", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_naive_values_and_grads(kind, tau, scale):
    s, t, mask = make_inputs(seed=KINDS.index(kind))
    kw = {"kind": kind, "alpha": 0.2, "beta": 0.7}
    assert_same_value_and_grads(
        lambda s, t: kd_loss(s, t, mask, temperature=tau, scale_by_tau_sq=scale, **kw),
        lambda s, t: naive_kd(s.double(), t.double(), mask, tau=tau, scale=scale, **kw),
        s,
        t,
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_identical_inputs(kind, tau):
    s, _, mask = make_inputs(seed=1)
    loss = kd_loss(s, s.clone(), mask, kind=kind, temperature=tau)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fkl_and_rkl_equal_kl_div(tau):
    s, t, _ = make_inputs(seed=2)
    mask = torch.ones(s.shape[:-1], dtype=torch.bool)
    log_q = F.log_softmax(s / tau, -1).reshape(-1, s.shape[-1])
    log_p = F.log_softmax(t / tau, -1).reshape(-1, t.shape[-1])
    # kl_div(input, target) = KL(target ‖ input); batchmean = sum / number of tokens.
    fkl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * tau**2
    rkl = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * tau**2
    torch.testing.assert_close(kd_loss(s, t, mask, kind="fkl", temperature=tau), fkl)
    torch.testing.assert_close(kd_loss(s, t, mask, kind="rkl", temperature=tau), rkl)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_is_zero_at_both_beta_ends(beta):
    # m = (1−β)p + βq: β = 0 gives m = p and loss KL(p‖p); β = 1 gives m = q and KL(q‖q).
    s, t, mask = make_inputs(seed=3)
    loss = kd_loss(s.requires_grad_(), t, mask, kind="jsd", beta=beta)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(grad).all()


def test_jsd_near_beta_ends_approaches_kl():
    # To first order jsd ≈ β·KL(q‖p) near β = 0 and ≈ (1−β)·KL(p‖q) near β = 1.
    s, t, mask = make_inputs(seed=4, scale=1.0)
    eps = 1e-3
    near_zero = kd_loss(s, t, mask, kind="jsd", beta=eps) / eps
    near_one = kd_loss(s, t, mask, kind="jsd", beta=1 - eps) / eps
    torch.testing.assert_close(near_zero, kd_loss(s, t, mask, kind="rkl"), rtol=2e-2, atol=0)
    torch.testing.assert_close(near_one, kd_loss(s, t, mask, kind="fkl"), rtol=2e-2, atol=0)


def test_jsd_half_is_symmetric():
    s, t, mask = make_inputs(seed=5)
    forward = kd_loss(s, t, mask, kind="jsd", beta=0.5)
    backward = kd_loss(t, s, mask, kind="jsd", beta=0.5)
    torch.testing.assert_close(forward, backward)


def test_skew_kl_limits():
    s, t, mask = make_inputs(seed=6)
    skl_0 = kd_loss(s, t, mask, kind="skl", alpha=0.0)
    srkl_0 = kd_loss(s, t, mask, kind="srkl", alpha=0.0)
    torch.testing.assert_close(skl_0, kd_loss(s, t, mask, kind="fkl"))
    torch.testing.assert_close(srkl_0, kd_loss(s, t, mask, kind="rkl"))
    assert kd_loss(s, t, mask, kind="skl", alpha=1.0).item() == 0.0
    assert kd_loss(s, t, mask, kind="srkl", alpha=1.0).item() == 0.0


@pytest.mark.parametrize("tau", [1.5, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_tau_squared_factor(kind, tau):
    s, t, mask = make_inputs(seed=7)
    scaled = kd_loss(s, t, mask, kind=kind, temperature=tau, scale_by_tau_sq=True)
    plain = kd_loss(s, t, mask, kind=kind, temperature=tau, scale_by_tau_sq=False)
    torch.testing.assert_close(scaled, plain * tau**2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_changes_value(kind):
    s, t, mask = make_inputs(seed=8)
    at_1 = kd_loss(s, t, mask, kind=kind, temperature=1.0, scale_by_tau_sq=False)
    at_2 = kd_loss(s, t, mask, kind=kind, temperature=2.0, scale_by_tau_sq=False)
    assert abs(at_1.item() - at_2.item()) > 1e-3


def student_value_and_grad(fn, s):
    s = s.detach().clone().requires_grad_()
    value = fn(s)
    return value, torch.autograd.grad(value, s)[0]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind, chunk_size):
    """The memory-lean path (the teacher a constant, as in training) against plain autograd."""
    s, t, mask = make_inputs(seed=9, shape=(3, 4))
    kw = {"kind": kind, "temperature": 1.5}
    lean = student_value_and_grad(lambda s: kd_loss(s, t, mask, chunk_size=chunk_size, **kw), s)
    plain = student_value_and_grad(lambda s: kd_loss(s, t, mask, **kw), s)
    for a, b in zip(lean, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_large_vocabulary_takes_the_lean_path_and_matches_the_plain_one():
    s, t, mask = make_inputs(seed=10, shape=(2, 3), vs=LEAN_VOCAB, vt=LEAN_VOCAB + 64)
    kw = {"kind": "fkl", "temperature": 2.0}
    lean = student_value_and_grad(lambda s: kd_loss(s, t, mask, **kw), s)
    plain = student_value_and_grad(lambda s: naive_kd(s, t, mask, tau=2.0, kind="fkl"), s)
    for a, b in zip(lean, plain, strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-8)


def test_lean_keeps_only_the_gradient_for_backward_and_no_row_copy():
    """Saved for backward: one buffer the student logits' size (the gradient itself); every
    other tensor made is chunk-sized: no masked copy of the logits (N x V) at all."""
    s, t, _ = make_inputs(seed=22, shape=(4, 16), vs=50, vt=50)
    s.requires_grad_()
    mask = torch.ones(4, 16, dtype=torch.bool)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x,
                                                  lambda x: x):  # fmt: skip
        loss = kd_loss(s, t, mask, kind="jsd", chunk_size=4)
    assert sorted(saved)[-1] == s.numel() and sorted(saved)[-2] <= 4 * 50
    loss.backward()
    torch.testing.assert_close(
        s.grad, torch.autograd.grad(kd_loss(s, t, mask, kind="jsd"), s)[0], rtol=1e-5, atol=1e-7
    )


def test_per_position_losses_add_up_to_the_loss():
    s, t, mask = make_inputs(seed=23, shape=(3, 4))
    for chunk in (None, 2):
        loss, per = kd_loss(s, t, mask, kind="srkl", temperature=2.0, chunk_size=chunk,
                            per_position_out=True)  # fmt: skip
        assert per.shape == (int(mask.sum()),) and not per.requires_grad
        torch.testing.assert_close(per.sum() / mask.sum(), loss.detach())


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_nothing_masked_gives_exact_zero_with_grad(kind, chunk_size):
    s, t, _ = make_inputs(seed=10)
    s[..., 0] = NEG_INF  # the guard must not sum -inf logits into 0·inf = NaN
    s.requires_grad_()
    mask = torch.zeros(s.shape[:-1], dtype=torch.bool)
    loss = kd_loss(s, t, mask, kind=kind, chunk_size=chunk_size)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and (s.grad == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_vocab_cut_to_shared_prefix(kind):
    s, t, mask = make_inputs(seed=11, vs=9, vt=13)
    padded_teacher = kd_loss(s, t, mask, kind=kind)
    torch.testing.assert_close(padded_teacher, kd_loss(s, t[..., :9], mask, kind=kind))
    padded_student = kd_loss(t, s, mask, kind=kind)
    torch.testing.assert_close(padded_student, kd_loss(t[..., :9], s, mask, kind=kind))


@pytest.mark.parametrize("kind", KINDS)
def test_shared_neg_inf_entries_equal_dropping_them(kind):
    s, t, mask = make_inputs(seed=12)
    dropped = torch.tensor([1, 4, 8])
    kept = torch.tensor([i for i in range(s.shape[-1]) if i not in dropped.tolist()])
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., dropped], t_inf[..., dropped] = NEG_INF, NEG_INF
    with_inf = value_and_grads(lambda s, t: kd_loss(s, t, mask, kind=kind), s_inf, t_inf)
    without = value_and_grads(
        lambda s, t: kd_loss(s[..., kept], t[..., kept], mask, kind=kind), s_inf, t_inf
    )
    for a, b in zip(with_inf, without, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_only_neg_inf_stays_finite(kind):
    s, t, mask = make_inputs(seed=13)
    t[..., 2] = NEG_INF
    value, grad_s, _ = value_and_grads(lambda s, t: kd_loss(s, t, mask, kind=kind), s, t)
    assert torch.isfinite(value) and torch.isfinite(grad_s).all()


def test_fkl_with_teacher_neg_inf_is_exact():
    # p = 0 at a -inf teacher entry, and 0·log(0/q) = 0: forward KL needs no approximation.
    s, t, mask = make_inputs(seed=14)
    t[..., 2] = NEG_INF
    expected = naive_kd(s.double(), t.double(), mask, kind="fkl").float()
    torch.testing.assert_close(kd_loss(s, t, mask, kind="fkl"), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_give_float32_result(kind):
    s, t, mask = make_inputs(seed=15)
    s16, t16 = s.bfloat16(), t.bfloat16()
    loss = kd_loss(s16, t16, mask, kind=kind, temperature=1.5)
    assert loss.dtype == torch.float32
    expected = kd_loss(s16.float(), t16.float(), mask, kind=kind, temperature=1.5)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        loss, kd_loss(s, t, mask, kind=kind, temperature=1.5), rtol=0.05, atol=1e-3
    )


def test_per_token_kd_shape_and_reduction():
    s, t, mask = make_inputs(seed=16)
    per_token = per_token_kd(s, t, kind="fkl", temperature=2.0)
    assert per_token.shape == mask.shape and per_token.dtype == torch.float32
    expected = per_token[mask].mean() * 4.0
    torch.testing.assert_close(kd_loss(s, t, mask, kind="fkl", temperature=2.0), expected)


def test_ce_loss_matches_cross_entropy():
    s, _, mask = make_inputs(seed=17)
    labels = torch.randint(0, s.shape[-1], mask.shape, generator=torch.Generator().manual_seed(0))
    labels[~mask] = -100  # whatever sits at unmasked positions must not matter
    ours_s, reference_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = ce_loss(ours_s, labels, mask)
    reference = F.cross_entropy(reference_s.reshape(-1, s.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(ours, reference)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours_s.grad, reference_s.grad)
    bf16 = ce_loss(s.bfloat16(), labels, mask)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, reference.detach(), rtol=0.05, atol=1e-2)


def test_ce_loss_nothing_masked():
    s, _, _ = make_inputs(seed=18)
    s.requires_grad_()
    mask = torch.zeros(s.shape[:-1], dtype=torch.bool)
    loss = ce_loss(s, torch.zeros(mask.shape, dtype=torch.long), mask)
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all()


def test_mixed_loss():
    ce, kd = torch.tensor(2.0), torch.tensor(6.0)
    assert mixed_loss(ce, kd, 0.0).item() == 2.0
    assert mixed_loss(ce, kd, 1.0).item() == 6.0
    torch.testing.assert_close(mixed_loss(ce, kd, 0.25), torch.tensor(0.75 * 2.0 + 0.25 * 6.0))
    with pytest.raises(ValueError, match="kd_ratio"):
        mixed_loss(ce, kd, 1.5)


# ---------------------------------------------------------------- cached teacher: top-K + rest

GRID = [0.5, 1.0, 1.5, 2.0, 3.0]


def make_cache(t: torch.Tensor, k: int, taus=GRID):
    """What the scoring job stores, computed here in float64 straight from the definition:
    top-k ids, T = 1 log-probs there, and log Σ_{i ∉ top-k} p_i^(1/τ_j) per grid τ_j."""
    logp = torch.log_softmax(t.double(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    outside = torch.ones_like(logp, dtype=torch.bool).scatter(-1, ids, False)
    tail = torch.stack(
        [torch.logsumexp((logp / tau).masked_fill(~outside, NEG_INF), dim=-1) for tau in taus],
        dim=-1,
    )
    return ids, values.float(), tail.float()


def naive_bucket_kd(s, t, ids, mask, *, kind, tau, scale=True, alpha=0.1, beta=0.9):
    """The K + 1 bucket divergence from FULL teacher logits: p, q at τ over the vocabulary,
    summed into the top-k buckets and one rest bucket, then the naive divergence (float64)."""
    p = torch.softmax(t.double() / tau, dim=-1)
    q = torch.softmax(s.double() / tau, dim=-1)

    def buckets(x):
        head = x.gather(-1, ids)
        return torch.cat([head, (x.sum(-1) - head.sum(-1)).clamp(min=0)[..., None]], dim=-1)

    # naive_token takes logits; log of a distribution at temperature 1 gives it back
    log_p, log_q = buckets(p).log(), buckets(q).log()
    return naive_kd(log_q, log_p, mask, kind=kind, tau=1.0, scale=False, alpha=alpha, beta=beta) * (
        tau**2 if scale else 1.0
    )


@pytest.mark.parametrize("tau", [1.5, 4 / 3])  # on the grid, between grid points
@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_full_vocabulary_equals_kd_loss(kind, tau):
    """K = V: the rest bucket is empty (tail -inf everywhere) and the loss is `kd_loss`,
    values and gradients, with no NaN from the empty bucket."""
    s, t, mask = make_inputs(seed=19)
    ids, logprobs, tail = make_cache(t, s.shape[-1])
    assert torch.isinf(tail).all()

    def cached(s, t):
        return topk_kd_loss(s, ids, logprobs, tail, GRID, mask, kind=kind, temperature=tau)

    def online(s, t):
        return kd_loss(s, t, mask, kind=kind, temperature=tau)

    value, grad_s, _ = value_and_grads(lambda s, t: cached(s, t) + 0 * t.sum(), s, t)
    assert torch.isfinite(grad_s).all()
    want, want_grad, _ = value_and_grads(online, s, t)
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_s, want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_with_one_token_sees_the_students_other_mass(kind):
    """K = 1: the student's mass off the teacher's top token is in the rest bucket, so the
    loss is not zero and every logit gets a gradient (the old renormalised loss gave 0)."""
    s, t, mask = make_inputs(seed=20)
    ids, logprobs, tail = make_cache(t, 1)
    s.requires_grad_()
    loss = topk_kd_loss(s, ids, logprobs, tail, GRID, mask, kind=kind, temperature=1.0)
    assert loss.item() > 1e-3
    (grad,) = torch.autograd.grad(loss, s)
    off_support = torch.ones_like(grad, dtype=torch.bool).scatter(-1, ids, False)
    rows = mask[..., None].expand_as(grad)
    assert (grad[off_support & rows].abs() > 0).all()
    assert (grad[~rows] == 0).all()  # unmasked positions untouched


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_on_grid_equals_the_bucketed_full_teacher(kind, tau):
    s, t, mask = make_inputs(seed=22)
    ids, logprobs, tail = make_cache(t, 4)
    loss = topk_kd_loss(s, ids, logprobs, tail, GRID, mask, kind=kind, temperature=tau)
    want = naive_bucket_kd(s, t, ids, mask, kind=kind, tau=tau)
    torch.testing.assert_close(loss, want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [1.25, 4 / 3, 5 / 3, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_between_grid_points_is_close(kind, tau):
    """Interpolating the tail log-partition in β = 1/τ: close to the exact bucket loss."""
    s, t, mask = make_inputs(seed=23)
    ids, logprobs, tail = make_cache(t, 4)
    loss = topk_kd_loss(s, ids, logprobs, tail, GRID, mask, kind=kind, temperature=tau)
    want = naive_bucket_kd(s, t, ids, mask, kind=kind, tau=tau)
    torch.testing.assert_close(loss, want.float(), rtol=1e-2, atol=1e-4)


def test_tail_interpolation_is_exact_on_the_grid_and_an_upper_bound_between():
    _, t, _ = make_inputs(seed=24, scale=3.0)
    ids, _, tail = make_cache(t, 3)
    fine = torch.linspace(0.5, 3.0, 26).tolist()
    exact = make_cache(t, 3, taus=fine)[2]
    for j, tau in enumerate(fine):
        got = tail_log_partition(tail, GRID, tau)
        if tau in GRID or any(abs(tau - g) < 1e-9 for g in GRID):
            torch.testing.assert_close(got, exact[..., j])
        # F is convex in β: the chord between grid points lies above it
        assert (got >= exact[..., j] - 1e-5).all()
    with pytest.raises(ValueError, match="outside the cached grid"):
        tail_log_partition(tail, GRID, 3.5)
    with pytest.raises(ValueError, match="increasing"):
        tail_log_partition(tail, [1.0, 0.5, 2.0, 3.0, 4.0], 1.0)


def test_cached_teacher_buckets_are_a_distribution_and_empty_tail_stays_finite():
    _, t, _ = make_inputs(seed=25)
    for k in (1, 4, t.shape[-1]):
        _, logprobs, tail = make_cache(t, k)
        for tau in (0.5, 4 / 3, 2.0):
            log_p = cached_teacher_log_probs(logprobs, tail, GRID, tau)
            assert not torch.isnan(log_p).any()
            torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(log_p.shape[:-1]))
            if k == t.shape[-1]:
                assert (log_p[..., -1] == NEG_INF).all()


@pytest.mark.parametrize("kind", KINDS)
def test_topk_chunked_equals_unchunked_and_nothing_masked_is_zero(kind):
    s, t, mask = make_inputs(seed=26)
    ids, logprobs, tail = make_cache(t, 3)

    def loss(s, t, chunk_size=None, mask=mask):
        return (
            topk_kd_loss(
                s,
                ids,
                logprobs,
                tail,
                GRID,
                mask,
                kind=kind,
                temperature=1.5,
                chunk_size=chunk_size,
            )
            + 0 * t.sum()
        )

    lean = student_value_and_grad(lambda s: loss(s, t, chunk_size=2), s)
    for a, b in zip(lean, student_value_and_grad(lambda s: loss(s, t), s), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    s = s.clone().requires_grad_()
    zero = topk_kd_loss(
        s, ids, logprobs, tail, GRID, torch.zeros_like(mask), kind=kind, temperature=1.5
    )
    assert zero.item() == 0.0 and zero.requires_grad
    zero.backward()
    assert (s.grad == 0).all()


def test_topk_with_fp16_log_probs_is_close():
    """The scoring job stores the top-K log-probs in float16: near 0 they are precise."""
    s, t, mask = make_inputs(seed=27)
    ids, logprobs, tail = make_cache(t, 4)
    full = topk_kd_loss(s, ids, logprobs, tail, GRID, mask, kind="fkl", temperature=2.0)
    half = topk_kd_loss(s, ids, logprobs.half(), tail, GRID, mask, kind="fkl", temperature=2.0)
    torch.testing.assert_close(half, full, rtol=2e-3, atol=1e-4)


def test_bad_arguments_raise():
    s, t, mask = make_inputs(seed=21)
    with pytest.raises(ValueError, match="kind"):
        kd_loss(s, t, mask, kind="kl")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, mask, kind="fkl", temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        kd_loss(s, t, mask, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="bool"):
        kd_loss(s, t, mask.long(), kind="fkl")
    with pytest.raises(ValueError, match="leading shapes"):
        kd_loss(s, t[:1], mask, kind="fkl")
    with pytest.raises(ValueError, match="chunk_size"):
        kd_loss(s, t, mask, kind="fkl", chunk_size=0)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_lean_path_with_masked_out_tokens_equals_the_plain_one(kind):
    """-inf logits (a masked-out token) take the autograd route inside the lean path."""
    s, t, mask = make_inputs(seed=31, shape=(2, 5))
    s[..., 3] = NEG_INF
    t[..., 3] = NEG_INF
    kw = {"kind": kind, "temperature": 2.0}
    lean = student_value_and_grad(lambda s: kd_loss(s, t, mask, chunk_size=2, **kw), s)
    plain = student_value_and_grad(lambda s: kd_loss(s, t, mask, **kw), s)
    for a, b in zip(lean, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
