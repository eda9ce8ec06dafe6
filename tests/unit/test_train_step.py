"""One optimisation step and the plain curriculum loop, on tiny models built in-process.

The loop is checked against the pure schedule functions of `curriculum`: every logged row's
stage, τ, λ and LR must be what `position_at` says for that step.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pocl_ray import curriculum
from pocl_ray.config import (
    Config,
    CurriculumConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from pocl_ray.data import IGNORE_INDEX, collate, tokenize_records
from pocl_ray.loop import batches, mean_ce, run_curriculum, sft
from pocl_ray.models import build_tiny, freeze_teacher, head_selectable
from pocl_ray.train_step import (
    loss_terms,
    make_optimizer,
    response_logits,
    shifted,
    train_step,
)

MAX_PROMPT, MAX_LEN = 96, 128
BATCH = 16


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(task_records, task_tok):
    """Built-in records → tokenizer → tokenised examples (no download)."""
    records, tok = task_records, task_tok
    examples = tokenize_records(
        records, tok, max_prompt_length=MAX_PROMPT, max_length=MAX_LEN
    ).examples
    return SimpleNamespace(tok=tok, examples=examples, pad=tok.pad_token_id)


def tiny(env, arch: str = "gpt2", seed: int = 0, dropout: float | None = None):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, dropout=dropout)
    return build_tiny(cfg, env.tok, MAX_LEN)


@pytest.fixture(scope="module")
def teacher(env):
    return freeze_teacher(tiny(env, "llama", seed=1))


def response_len(example) -> int:
    return sum(label != IGNORE_INDEX for label in example.labels)


def make_cfg(*, lr=3e-3, min_lr=3e-5, warmup=0, **cur) -> Config:
    base = dict(
        mode="pocl",
        num_stages=2,
        interval=1,
        interval_unit="epochs",
        tau_min=1.0,
        tau_max=2.0,
        kd_ratio_start=0.7,
        kd_ratio_end=1.0,
        lr_policy="per_stage",
    )
    base.update(cur)
    return Config(
        curriculum=CurriculumConfig(**base),
        loss=LossConfig(kind="fkl", scale_by_tau_sq=True),
        optim=OptimConfig(lr=lr, min_lr=min_lr, batch_size=BATCH, warmup_steps=warmup),
        run=RunConfig(seed=0),
    )


def plan_of(cfg: Config, n: int):
    return curriculum.stage_table(
        cfg.curriculum, n=n, batch_size=cfg.optim.batch_size, loss_alpha=cfg.loss.alpha
    )


def param_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------- shifted / loss_terms


def compute_losses(*args, **kwargs):
    """(total, ce, kd, tokens) of `loss_terms`, the shape these tests compare."""
    t = loss_terms(*args, **kwargs)
    return t.total, t.ce, t.kd, t.tokens


def test_shifted_aligns_logits_at_t_with_label_at_t_plus_1():
    b, length, v = 2, 5, 7
    logits = torch.arange(b * length * v, dtype=torch.float32).reshape(b, length, v)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    out_logits, targets, mask = shifted(logits, labels)
    assert out_logits.shape == (b, length - 1, v)
    assert targets.shape == mask.shape == (b, length - 1)
    for t in range(length - 1):
        # position t of the output is the prediction made at input position t ...
        assert torch.equal(out_logits[:, t], logits[:, t])
        # ... and its target is the token at t + 1
        assert torch.equal(targets[:, t], labels[:, t + 1])
    assert mask.tolist() == [[False, True, True, True], [True, True, False, False]]
    assert mask.dtype == torch.bool


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_response_logits_run_the_head_only_at_response_positions(env, arch):
    model = tiny(env, arch).eval()
    batch = collate(env.examples[:5], env.pad)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full, targets, mask = shifted(model(**inputs).logits, batch["labels"])
        seen = []
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out))
        logits, got_targets, rows = response_logits(model, batch)
    assert head_selectable(model)
    n = int(mask.sum())
    assert seen[-1].shape == (n, full.shape[-1])  # the head computed N rows, not B × L
    assert torch.allclose(logits, full[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(got_targets, targets[mask])
    assert torch.equal(rows, mask.nonzero()[:, 0])


class PostProcessed(torch.nn.Module):
    """A model whose logits are not per position after its head (each position's logits get
    the batch's mean added): selecting positions before the head would change them."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        logits = self.inner(**kwargs).logits
        return SimpleNamespace(logits=logits + logits.mean(dim=-2, keepdim=True))


def test_response_logits_fall_back_to_the_full_forward_when_selection_is_not_exact(env):
    model = PostProcessed(tiny(env, "llama")).eval()
    batch = collate(env.examples[:3], env.pad)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        full, targets, mask = shifted(model(**inputs).logits, batch["labels"])
        logits, got_targets, _ = response_logits(model, batch)
    assert not head_selectable(model)
    assert torch.equal(logits, full[mask])
    assert torch.equal(got_targets, targets[mask])


def count_calls(module) -> list:
    head_selectable(module)  # its one-time self-check runs the model; count real steps only
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def hand_ce(logits, examples) -> torch.Tensor:
    """Mean CE over every response token, one position at a time."""
    total, n = 0.0, 0
    for b, e in enumerate(examples):
        for t in range(e.prompt_length, len(e.input_ids)):
            target = torch.tensor([e.input_ids[t]])
            total = total + F.cross_entropy(logits[b, t - 1][None].double(), target)
            n += 1
    return total / n


def hand_fkl(s_logits, t_logits, examples, tau) -> torch.Tensor:
    """Mean KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) over response positions, × τ²."""
    total, n = 0.0, 0
    for b, e in enumerate(examples):
        for t in range(e.prompt_length, len(e.input_ids)):
            log_p = torch.log_softmax(t_logits[b, t - 1].double() / tau, -1)
            log_q = torch.log_softmax(s_logits[b, t - 1].double() / tau, -1)
            total = total + (log_p.exp() * (log_p - log_q)).sum()
            n += 1
    return total / n * tau**2


def test_compute_losses_lambda_0_is_ce_only_and_skips_teacher(env):
    student = tiny(env, "gpt2")
    teacher = freeze_teacher(tiny(env, "llama", seed=1))
    calls = count_calls(teacher)
    exs = env.examples[:4]
    batch = collate(exs, env.pad)
    total, ce, kd, tokens = compute_losses(
        student, teacher, batch, tau=2.0, kd_ratio=0.0, alpha=0.1, loss=LossConfig()
    )
    assert calls == []  # the teacher was never run
    assert kd.item() == 0.0
    assert total.item() == pytest.approx(ce.item(), abs=0)
    assert tokens == sum(response_len(e) for e in exs)
    with torch.no_grad():
        logits = student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
    assert ce.item() == pytest.approx(hand_ce(logits, exs).item(), rel=1e-5)
    # the loss is attached to the student's graph
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # no teacher at all gives the same numbers
    total2, ce2, kd2, _ = compute_losses(
        student, None, batch, tau=2.0, kd_ratio=0.0, alpha=0.1, loss=LossConfig()
    )
    assert (total2.item(), ce2.item(), kd2.item()) == (total.item(), ce.item(), 0.0)


@pytest.mark.parametrize("scale", [True, False])
def test_compute_losses_lambda_1_is_kd_loss(env, scale):
    student = tiny(env, "gpt2")
    teacher = freeze_teacher(tiny(env, "llama", seed=1))
    calls = count_calls(teacher)
    exs = env.examples[4:8]
    batch = collate(exs, env.pad)
    tau = 2.0
    loss_cfg = LossConfig(kind="fkl", scale_by_tau_sq=scale)
    total, ce, kd, _ = compute_losses(
        student, teacher, batch, tau=tau, kd_ratio=1.0, alpha=0.1, loss=loss_cfg
    )
    assert len(calls) == 1
    assert total.item() == pytest.approx(kd.item(), rel=1e-6)
    assert ce.item() > 0
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = hand_fkl(student(**inputs).logits, teacher(**inputs).logits, exs, tau)
    if not scale:
        expected = expected / tau**2
    assert kd.item() == pytest.approx(expected.item(), rel=1e-4)
    assert kd.item() > 0


def test_compute_losses_mixes_ce_and_kd(env):
    student = tiny(env, "gpt2")
    teacher = freeze_teacher(tiny(env, "llama", seed=1))
    batch = collate(env.examples[:3], env.pad)
    total, ce, kd, _ = compute_losses(
        student, teacher, batch, tau=1.5, kd_ratio=0.3, alpha=0.1, loss=LossConfig()
    )
    assert total.item() == pytest.approx(0.7 * ce.item() + 0.3 * kd.item(), rel=1e-6)


# ---------------------------------------------------------------- train_step


def position(lr_mult: float, tau: float = 2.0, kd_ratio: float = 0.7) -> curriculum.Position:
    return curriculum.Position(
        stage=0,
        epoch=0,
        step_in_epoch=0,
        step_in_stage=0,
        global_step=0,
        tau=tau,
        kd_ratio=kd_ratio,
        alpha=0.1,
        lr_mult=lr_mult,
    )


def test_make_optimizer_decays_matrices_only(env):
    model = tiny(env, "llama")
    opt = make_optimizer(model, OptimConfig(weight_decay=0.01))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.01 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) not in decay}
    assert names and all(("norm" in n or n.endswith(".bias")) for n in names)  # no decay
    assert "model.embed_tokens.weight" not in names
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_run_curriculum_trains_with_dropout_from_a_seeded_rng(env, teacher, split64, dropout):
    """The plain loop trains in train mode (dropout on when the model has it), with its RNG
    seeded from run.seed: two runs give the same log, and dropout changes the losses."""
    cfg = make_cfg(interval=1, num_stages=1)
    runs = []
    for _ in range(2):
        student = tiny(env, "gpt2", dropout=dropout)
        student.eval()  # as transformers hands a loaded model over
        torch.manual_seed(999 + len(runs))  # whatever the caller's RNG held
        rows = run_curriculum(student, teacher, split64.examples, split64.ranks, cfg,
                              pad_id=env.pad)  # fmt: skip
        runs.append([r["loss"] for r in rows])
        assert student.training
    assert runs[0] == runs[1]
    if dropout:
        without = run_curriculum(tiny(env, "gpt2"), teacher, split64.examples, split64.ranks,
                                 cfg, pad_id=env.pad)  # fmt: skip
        assert [r["loss"] for r in without] != runs[0]


@pytest.mark.parametrize("frozen", [True, False])
def test_train_step_sets_lr_and_updates_only_the_student(env, frozen):
    student = tiny(env, "gpt2")
    teacher = tiny(env, "llama", seed=1)
    if frozen:
        freeze_teacher(teacher)
    else:
        teacher.eval()  # trainable parameters, but it must still get no gradients
    optimizer = make_optimizer(student, OptimConfig(lr=1.0))
    batch = collate(env.examples[:4], env.pad)
    with torch.no_grad():
        expected, _, _, tokens = compute_losses(
            student, teacher, batch, tau=2.0, kd_ratio=0.7, alpha=0.1, loss=LossConfig()
        )
    s_before, t_before = param_snapshot(student), param_snapshot(teacher)

    res = train_step(
        student,
        teacher,
        optimizer,
        batch,
        pos=position(lr_mult=0.25),
        base_lr=4e-3,
        loss=LossConfig(),
        grad_clip=1.0,
    )

    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1e-3)] * 2
    assert res.loss == pytest.approx(expected.item(), rel=1e-5)
    assert res.tokens == tokens
    assert res.grad_norm > 0
    # AdamW's first step moves each weight by about lr · sign(grad): the largest move is the LR
    moves = [(student.get_parameter(k) - v).abs().max().item() for k, v in s_before.items()]
    assert max(moves) == pytest.approx(1e-3, rel=0.02)
    for k, v in t_before.items():
        p = teacher.get_parameter(k)
        assert torch.equal(p, v), k
        assert p.grad is None, k


def test_train_step_clips_gradients(env):
    student = tiny(env, "gpt2")
    optimizer = make_optimizer(student, OptimConfig(lr=1e-3))
    res = train_step(
        student,
        None,
        optimizer,
        collate(env.examples[:4], env.pad),
        pos=position(lr_mult=1.0, kd_ratio=0.0),
        base_lr=1e-3,
        loss=LossConfig(),
        grad_clip=1e-3,
    )
    after = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in student.parameters()])
    ).item()
    assert res.grad_norm > 1e-2  # reported before clipping
    assert after == pytest.approx(1e-3, rel=1e-3)


def test_batches_keep_the_last_partial_batch():
    assert batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches([], 3) == []


def test_mean_ce_is_token_weighted_and_restores_mode(env):
    model = tiny(env, "gpt2")
    model.train()
    exs = env.examples[:5]
    value = mean_ce(model, exs, env.pad, batch_size=2)
    assert model.training
    with torch.no_grad():
        per = []
        for e in exs:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits
            per.append((hand_ce(logits, [e]).item(), response_len(e)))
    expected = sum(v * n for v, n in per) / sum(n for _, n in per)
    assert value == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- run_curriculum


@pytest.fixture(scope="module")
def split64(env):
    """32 examples with the shortest responses and 32 with the longest, and ranks that make the
    short ones the easiest: stage 0 of a 2-stage pocl plan must train on exactly the short ones.
    """
    by_len = sorted(env.examples, key=response_len)
    short, long = by_len[:32], by_len[-32:]
    assert max(map(response_len, short)) < min(map(response_len, long))
    examples = long + short  # file order must not matter: the ranks decide
    ranks = list(range(33, 65)) + list(range(1, 33))
    return SimpleNamespace(examples=examples, ranks=ranks, short=short, long=long)


@pytest.mark.parametrize(
    "lr_policy, warmup", [("per_stage", 0), ("continuous", 0), ("per_stage", 2)]
)
def test_logged_rows_follow_the_plan(env, teacher, split64, lr_policy, warmup):
    cfg = make_cfg(interval=2, lr_policy=lr_policy, warmup=warmup)
    plan = plan_of(cfg, 64)
    seen = []
    rows = run_curriculum(
        tiny(env, "gpt2"),
        teacher,
        split64.examples,
        split64.ranks,
        cfg,
        pad_id=env.pad,
        on_step=seen.append,
    )
    # 2 stages of 32 and 64 samples, batch 16, 2 epochs each: 2·2 + 4·2 steps
    assert len(rows) == curriculum.total_steps(plan) == 12
    assert seen == rows
    for g, row in enumerate(rows):
        pos = curriculum.position_at(
            plan,
            g,
            lr_policy=lr_policy,
            warmup_steps=warmup,
            min_lr_ratio=cfg.optim.min_lr / cfg.optim.lr,
        )
        assert row["step"] == g
        assert (row["stage"], row["epoch"], row["step_in_epoch"]) == (
            pos.stage,
            pos.epoch,
            pos.step_in_epoch,
        )
        assert row["tau"] == pos.tau
        assert row["kd_ratio"] == pos.kd_ratio
        assert row["lr"] == pytest.approx(cfg.optim.lr * pos.lr_mult, rel=1e-12)
        assert row["loss"] > 0 and row["ce"] > 0 and row["kd"] > 0
        assert math.isfinite(row["loss"]) and row["tokens_per_s"] > 0
    # the τ / λ ramps of the design: τ 1 → 2, λ 0.7 → 1.0 over 2 stages
    assert {(r["stage"], r["tau"], r["kd_ratio"]) for r in rows} == {(0, 1.0, 0.7), (1, 2.0, 1.0)}
    # λ = 1 in the last stage: the logged loss is the KD term alone
    for r in rows:
        if r["stage"] == 1:
            assert r["loss"] == pytest.approx(r["kd"], rel=1e-6)


@pytest.mark.parametrize("mode", ["pocl", "anti"])
def test_stage_0_trains_exactly_on_its_subset(env, teacher, split64, mode):
    """The tokens of each step identify the samples: every stage-0 epoch covers exactly the
    easiest (pocl) or hardest (anti) half, and the last stage covers everything."""
    cfg = make_cfg(interval=2, mode=mode)
    rows = run_curriculum(
        tiny(env, "gpt2"), teacher, split64.examples, split64.ranks, cfg, pad_id=env.pad
    )
    subset = split64.short if mode == "pocl" else split64.long
    for stage, expected_samples in ((0, subset), (1, split64.examples)):
        for epoch in range(2):
            got = sum(r["tokens"] for r in rows if (r["stage"], r["epoch"]) == (stage, epoch))
            assert got == sum(map(response_len, expected_samples)), (stage, epoch)


def test_loss_decreases_on_a_repeated_easy_dataset(env, teacher):
    easy = sorted(env.examples, key=response_len)[:8] * 8
    cfg = make_cfg(
        interval=4, tau_min=1.0, tau_max=1.0, kd_ratio_start=0.5, kd_ratio_end=0.5, lr=1e-2
    )
    rows = run_curriculum(tiny(env, "gpt2"), teacher, easy, list(range(1, 65)), cfg, pad_id=env.pad)
    assert len(rows) == 4 * 2 + 4 * 4
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, losses
    assert rows[-1]["ce"] < rows[0]["ce"]


def test_mode_none_is_one_plain_stage(env, teacher, split64):
    cfg = make_cfg(mode="none", interval=1, tau_min=1.5, tau_max=2.0, kd_ratio_end=0.9)
    plan = plan_of(cfg, 64)
    rows = run_curriculum(
        tiny(env, "gpt2"), teacher, split64.examples, split64.ranks, cfg, pad_id=env.pad
    )
    # budget: the curriculum's 1 · (32 + 64) = 96 sample visits: 1.5 epochs, 4 + 2 steps
    assert len(rows) == curriculum.total_steps(plan) == 6
    assert {r["stage"] for r in rows} == {0}
    assert {r["tau"] for r in rows} == {1.5}
    assert {r["kd_ratio"] for r in rows} == {0.9}
    assert plan[0].samples == 96 and {r["epoch"] for r in rows} == {0, 1}
    # the whole first epoch covers all 64 samples
    got = sum(r["tokens"] for r in rows if r["epoch"] == 0)
    assert got == sum(map(response_len, split64.examples))


def test_per_stage_lr_restarts_continuous_does_not(env, teacher, split64):
    def lrs(policy):
        cfg = make_cfg(interval=2, lr_policy=policy, lr=1e-3, min_lr=1e-5)
        rows = run_curriculum(
            tiny(env, "gpt2"), teacher, split64.examples, split64.ranks, cfg, pad_id=env.pad
        )
        starts = [i for i, r in enumerate(rows) if r["step_in_epoch"] == r["epoch"] == 0]
        return [r["lr"] for r in rows], starts

    per_stage, starts = lrs("per_stage")
    assert starts == [0, 4]
    for s in starts:
        assert per_stage[s] == pytest.approx(1e-3, rel=1e-12)
    # strictly decaying inside each stage
    for a, b in ((0, 4), (4, len(per_stage))):
        assert all(x > y for x, y in zip(per_stage[a : b - 1], per_stage[a + 1 : b]))

    continuous, starts = lrs("continuous")
    assert continuous[0] == pytest.approx(1e-3, rel=1e-12)
    assert continuous[starts[1]] < 0.9e-3
    assert all(x > y for x, y in zip(continuous, continuous[1:]))


def test_plateau_trigger_ends_stages_early(env, teacher, split64):
    """With an LR so small that the weights barely move, the dev CE never improves: the first
    evaluation sets the best, the second (after epoch 2) fires patience 1 in every stage."""
    dev = env.examples[-8:]
    kw = dict(interval=3, lr=1e-20, min_lr=0.0)
    planned = curriculum.total_steps(plan_of(make_cfg(**kw), 64))
    assert planned == 3 * 2 + 3 * 4

    model = tiny(env, "gpt2")
    before = param_snapshot(model)
    rows = run_curriculum(
        model,
        teacher,
        split64.examples,
        split64.ranks,
        make_cfg(plateau_patience=1, **kw),
        pad_id=env.pad,
        dev_examples=dev,
    )
    change = max((model.get_parameter(k) - v).abs().max().item() for k, v in before.items())
    assert change < 1e-15
    assert [r["stage"] for r in rows] == [0] * 4 + [1] * 8  # 2 of 3 epochs in each stage
    assert [r["step"] for r in rows] == list(range(12))  # global steps stay consecutive
    assert max(r["epoch"] for r in rows) == 1

    # without dev examples, or without patience, the full plan runs
    for extra in (dict(plateau_patience=1, dev=()), dict(plateau_patience=None, dev=dev)):
        cfg = make_cfg(plateau_patience=extra["plateau_patience"], **kw)
        full = run_curriculum(
            tiny(env, "gpt2"),
            teacher,
            split64.examples,
            split64.ranks,
            cfg,
            pad_id=env.pad,
            dev_examples=extra["dev"],
        )
        assert len(full) == planned


def test_plateau_eval_every_steps(env, teacher, split64):
    cfg = make_cfg(plateau_patience=1, eval_every=1, interval=3, lr=1e-20, min_lr=0.0)
    rows = run_curriculum(
        tiny(env, "gpt2"),
        teacher,
        split64.examples,
        split64.ranks,
        cfg,
        pad_id=env.pad,
        dev_examples=env.examples[-8:],
    )
    # evaluated after every step: best after step 1, no improvement after step 2 → advance
    assert sum(r["stage"] == 0 for r in rows) < 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_run_curriculum_is_deterministic(env, teacher, split64, shuffle):
    init = tiny(env, "gpt2")
    cfg = make_cfg(interval=1, shuffle=shuffle)
    runs = []
    for _ in range(2):
        model = copy.deepcopy(init)
        rows = run_curriculum(model, teacher, split64.examples, split64.ranks, cfg, pad_id=env.pad)
        runs.append(([(r["loss"], r["ce"], r["kd"], r["tokens"]) for r in rows], model))
    assert runs[0][0] == runs[1][0]
    for (k, a), b in zip(runs[0][1].named_parameters(), runs[1][1].parameters()):
        assert torch.equal(a, b), k
    # and training did happen
    assert not torch.equal(
        runs[0][1].get_parameter("transformer.h.0.mlp.c_fc.weight"),
        init.get_parameter("transformer.h.0.mlp.c_fc.weight"),
    )


def test_sft_lowers_the_loss(env):
    model = tiny(env, "gpt2")
    seen = []
    losses = sft(
        model,
        env.examples[:32],
        epochs=4,
        lr=1e-2,
        batch_size=8,
        pad_id=env.pad,
        on_epoch=lambda e, loss: seen.append((e, loss)),
    )
    assert len(losses) == 4
    assert seen == list(enumerate(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert mean_ce(model, env.examples[:32], env.pad) < losses[0]


# ---------------------------------------------------------------- optim.autocast


def test_autocast_step_runs_the_matmuls_in_bfloat16_and_keeps_float32_state(env, teacher):
    """optim.autocast=bfloat16: the student's matmuls run in bfloat16 (seen in its logits),
    the loss is float32 and close to the float32 step's, and the master weights, their
    gradients and AdamW's state stay float32."""
    batch = collate(env.examples[:8], env.pad)
    results, students = {}, {}
    for autocast in (None, "bfloat16"):
        student = tiny(env, "gpt2")
        head_selectable(student)  # its one-time self-check runs the model (in float32)
        seen = []
        student.lm_head.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        optimizer = make_optimizer(student, OptimConfig(lr=1e-3))
        results[autocast] = train_step(student, teacher, optimizer, batch,
                                       pos=position(lr_mult=1.0), base_lr=1e-3, loss=LossConfig(),
                                       grad_clip=1.0, autocast=autocast)  # fmt: skip
        students[autocast] = (student, optimizer, seen)
    student, optimizer, seen = students["bfloat16"]
    assert seen == [torch.bfloat16] and students[None][2] == [torch.float32]
    assert results["bfloat16"].loss == pytest.approx(results[None].loss, rel=0.02)
    assert results["bfloat16"].loss != results[None].loss  # it did run at lower precision
    for p in student.parameters():
        assert p.dtype == p.grad.dtype == torch.float32
        assert optimizer.state[p]["exp_avg"].dtype == torch.float32


def test_sft_with_autocast_learns(env):
    """The SFT of the starting student under optim.autocast lowers its loss like float32."""
    losses = {}
    for autocast in (None, "bfloat16"):
        model = tiny(env, "gpt2")
        losses[autocast] = sft(model, env.examples[:32], epochs=3, lr=3e-3, batch_size=8,
                               pad_id=env.pad, autocast=autocast)  # fmt: skip
        assert next(model.parameters()).dtype == torch.float32
    assert losses["bfloat16"][-1] < 0.9 * losses["bfloat16"][0]
    assert losses["bfloat16"][-1] == pytest.approx(losses[None][-1], rel=0.05)


def test_sft_logs_its_progress(env, caplog, monkeypatch):
    """A long SFT (minutes on a real model) says where it is every SFT_LOG_EVERY steps."""
    import pocl_ray.loop as loop_module

    monkeypatch.setattr(loop_module, "SFT_LOG_EVERY", 2)
    with caplog.at_level("INFO", logger="pocl_ray.train"):
        sft(tiny(env, "gpt2"), env.examples[:40], epochs=1, lr=1e-3, batch_size=8, pad_id=env.pad)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sft: step")]
    assert [line.split()[2] for line in lines] == ["2/5", "4/5", "5/5"]


# ---------------------------------------------------------------- optim.gradient_checkpointing


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_step(env, teacher, arch):
    """Recomputing activations in backward changes memory, not results: the same loss and
    the same gradients (float32, no dropout) as a plain step, and it can be turned off."""
    from pocl_ray.train_step import checkpointing, training_mode

    batch = collate(env.examples[:8], env.pad)
    grads, losses = {}, {}
    for on in (False, True):
        student = tiny(env, arch)
        training_mode(student, gradient_checkpointing=on)
        assert checkpointing(student) == on
        optimizer = make_optimizer(student, OptimConfig(lr=1e-3))
        losses[on] = train_step(student, teacher, optimizer, batch, pos=position(lr_mult=1.0),
                                base_lr=1e-3, loss=LossConfig(), grad_clip=1e9).loss  # fmt: skip
        grads[on] = {k: p.grad.clone() for k, p in student.named_parameters()}
    training_mode(student, gradient_checkpointing=False)
    assert not checkpointing(student)
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_of_a_model_without_it_is_refused():
    from pocl_ray.train_step import training_mode

    with pytest.raises(ValueError, match="optim.gradient_checkpointing: Linear does not"):
        training_mode(torch.nn.Linear(2, 2), gradient_checkpointing=True)
