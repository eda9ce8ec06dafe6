"""Tests for pocl_ray.curriculum: the stage table, sample orders and step → position maps."""

import dataclasses
import itertools
import math

import numpy as np
import pytest

from pocl_ray import curriculum
from pocl_ray.config import CurriculumConfig
from pocl_ray.curriculum import (
    PlateauTracker,
    Position,
    StagePlan,
    cosine_lr_mult,
    epoch_order,
    format_plan,
    position_at,
    resets_optimizer,
    stage_batches,
    stage_order,
    stage_position,
    stage_start_steps,
    stage_subsets,
    stage_table,
    total_steps,
)

PAPER_N = 11_435
PAPER_SIZES = [2858, 5716, 8574, 11435]


def paper_plan(**kw) -> list[StagePlan]:
    return stage_table(CurriculumConfig(**kw), n=PAPER_N, batch_size=64)


# ---------------------------------------------------------------- stage table


def test_paper_stage_table():
    plan = paper_plan()
    assert [p.stage for p in plan] == [0, 1, 2, 3]
    assert [p.size for p in plan] == PAPER_SIZES
    assert [p.fraction for p in plan] == pytest.approx([s / PAPER_N for s in PAPER_SIZES])
    assert [p.tau for p in plan] == pytest.approx([1.0, 4 / 3, 5 / 3, 2.0])
    assert [p.kd_ratio for p in plan] == pytest.approx([0.7, 0.8, 0.9, 1.0])
    assert [p.alpha for p in plan] == [0.1] * 4
    assert [p.epochs for p in plan] == [8] * 4
    assert [p.steps for p in plan] == [None] * 4
    spe = [math.ceil(s / 64) for s in PAPER_SIZES]
    assert [p.steps_per_epoch for p in plan] == spe == [45, 90, 134, 179]
    assert [p.total_steps for p in plan] == [8 * x for x in spe]
    assert total_steps(plan) == 8 * sum(spe)
    assert stage_start_steps(plan) == [0, 360, 1080, 2152]


def test_explicit_taus_and_alphas():
    plan = stage_table(
        CurriculumConfig(taus=[0.5, 1.0, 3.0], alphas=[0.1, 0.2, 0.3], num_stages=3),
        n=30,
        batch_size=4,
        loss_alpha=0.9,
    )
    assert [p.tau for p in plan] == [0.5, 1.0, 3.0]
    assert [p.alpha for p in plan] == [0.1, 0.2, 0.3]
    assert [p.size for p in plan] == [10, 20, 30]


def test_loss_alpha_used_without_alphas():
    plan = stage_table(CurriculumConfig(), n=100, batch_size=8, loss_alpha=0.25)
    assert [p.alpha for p in plan] == [0.25] * 4


def test_single_stage_uses_ramp_starts():
    cur = CurriculumConfig(num_stages=1, tau_min=1.5, tau_max=2.0)
    (p,) = stage_table(cur, n=10, batch_size=3)
    assert (p.size, p.fraction, p.tau, p.kd_ratio) == (10, 1.0, 1.5, 0.7)
    assert p.steps_per_epoch == 4  # the partial last batch is kept


def test_custom_fractions_and_steps_unit():
    cur = CurriculumConfig(
        num_stages=2, fractions=[0.3, 1.0], interval=5, interval_unit="steps", tau_max=3.0
    )
    plan = stage_table(cur, n=20, batch_size=4)
    assert [p.size for p in plan] == [6, 20]
    assert [p.steps_per_epoch for p in plan] == [2, 5]
    assert [(p.epochs, p.steps, p.total_steps) for p in plan] == [(None, 5, 5), (None, 5, 5)]
    assert [p.tau for p in plan] == [1.0, 3.0]


def test_none_mode_paper_is_twenty_epochs_over_all_data():
    cur_plan = paper_plan()
    (p,) = paper_plan(mode="none")
    assert (p.stage, p.size, p.fraction, p.epochs, p.steps) == (0, PAPER_N, 1.0, 20, None)
    assert (p.tau, p.kd_ratio, p.alpha) == (1.0, 1.0, 0.1)
    assert p.steps_per_epoch == 179
    assert p.total_steps == 20 * 179  # 19.997 epochs: the 20th ends 36 samples early
    # exactly the curriculum's sample visits
    assert p.samples == sum(q.epochs * q.size for q in cur_plan) == 228_664


def test_none_mode_takes_the_first_stage_temperature_and_alpha_when_listed():
    cur = CurriculumConfig(mode="none", taus=[1.3, 1.6, 1.8, 2.0], alphas=[0.2, 0.3, 0.4, 0.5])
    (p,) = stage_table(cur, n=40, batch_size=4, loss_alpha=0.1)
    assert (p.tau, p.alpha) == (1.3, 0.2)
    (p,) = stage_table(CurriculumConfig(mode="none", tau_min=1.2), n=40, batch_size=4)
    assert (p.tau, p.alpha) == (1.2, 0.1)


@pytest.mark.parametrize("n, batch", [(4, 2), (5, 2), (112, 8), (113, 7)])
def test_none_mode_visits_exactly_the_curriculums_samples(n, batch):
    """Plain KD trains on as many samples as the curriculum, to the sample: whole epochs over
    all n, then the start of one more, its last batch cut (n = 4: 2.5 epochs, not 3)."""
    pocl = stage_table(CurriculumConfig(interval=1), n=n, batch_size=batch)
    (p,) = stage_table(CurriculumConfig(mode="none", interval=1), n=n, batch_size=batch)
    visits = sum(q.epochs * q.size for q in pocl)
    batches = stage_batches(p, list(range(n)), seed=0, batch_size=batch)
    assert len(batches) == p.total_steps and sum(map(len, batches)) == visits == p.samples
    assert all(len(b) > 0 for b in batches)
    for q in pocl:  # the curriculum's own stages keep whole epochs
        got = stage_batches(q, list(range(q.size)), seed=0, batch_size=batch)
        assert q.samples is None and sum(map(len, got)) == q.epochs * q.size


def test_none_mode_steps_unit_matches_curriculum_steps():
    kw = dict(interval=7, interval_unit="steps")
    curriculum = stage_table(CurriculumConfig(**kw), n=50, batch_size=8)
    (p,) = stage_table(CurriculumConfig(mode="none", **kw), n=50, batch_size=8)
    assert p.total_steps == p.steps == total_steps(curriculum) == 28
    assert p.epochs is None


def test_control_modes_share_the_table():
    base = paper_plan()
    for mode in ("random", "anti"):
        assert paper_plan(mode=mode) == base


def test_stage_table_rejects_bad_inputs():
    with pytest.raises(ValueError, match="n: got 0"):
        stage_table(CurriculumConfig(), n=0, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        stage_table(CurriculumConfig(), n=10, batch_size=0)
    with pytest.raises(ValueError, match="curriculum.taus"):
        stage_table(CurriculumConfig(taus=[1.0]), n=10, batch_size=2)


def test_format_plan():
    text = format_plan(paper_plan())
    lines = text.splitlines()
    assert len(lines) == 6  # header, 4 stages, total
    assert lines[0].split() == [
        "stage",
        "fraction",
        "size",
        "epochs",
        "steps/ep",
        "steps",
        "tau",
        "lambda",
        "alpha",
    ]
    assert lines[2].split() == ["1", "0.500", "5716", "8", "90", "720", "1.333", "0.8", "0.1"]
    assert lines[-1].split() == ["total", str(total_steps(paper_plan()))]
    none = format_plan(stage_table(CurriculumConfig(interval_unit="steps"), n=9, batch_size=2))
    assert none.splitlines()[1].split()[3] == "-"


# ---------------------------------------------------------------- orders and subsets


def _data(n: int = 40, seed: int = 3):
    rng = np.random.default_rng(seed)
    ranks = rng.permutation(n)
    ids = [f"id{v:05d}" for v in rng.permutation(10 * n)[:n]]
    return ranks, ids


def test_pocl_and_none_ascending_anti_descending():
    ranks, ids = _data()
    for mode in ("pocl", "none"):
        order = stage_order(ranks, ids, mode=mode, seed=0)
        assert [ranks[i] for i in order] == sorted(ranks)
    anti = stage_order(ranks, ids, mode="anti", seed=0)
    assert [ranks[i] for i in anti] == sorted(ranks, reverse=True)


def test_rank_ties_break_by_sample_id():
    ranks = [1, 0, 1, 0]
    ids = ["d", "c", "a", "b"]
    assert [ids[i] for i in stage_order(ranks, ids, mode="pocl", seed=0)] == list("bcad")
    assert [ids[i] for i in stage_order(ranks, ids, mode="anti", seed=0)] == list("dacb")


def test_random_is_seeded_and_independent_of_row_order():
    ranks, ids = _data()
    first = [ids[i] for i in stage_order(ranks, ids, mode="random", seed=7)]
    shuffle = np.random.default_rng(99).permutation(len(ids))
    ranks2, ids2 = ranks[shuffle], [ids[i] for i in shuffle]
    second = [ids2[i] for i in stage_order(ranks2, ids2, mode="random", seed=7)]
    assert first == second
    again = [ids[i] for i in stage_order(ranks, ids, mode="random", seed=7)]
    assert again == first
    other = [ids[i] for i in stage_order(ranks, ids, mode="random", seed=8)]
    assert other != first and sorted(other) == sorted(first)
    # Not the curriculum order in disguise.
    assert first != [ids[i] for i in stage_order(ranks, ids, mode="pocl", seed=7)]


def test_pocl_independent_of_row_order():
    ranks, ids = _data()
    shuffle = np.random.default_rng(5).permutation(len(ids))
    a = [ids[i] for i in stage_order(ranks, ids, mode="pocl", seed=0)]
    b = [
        ids[shuffle[i]]
        for i in stage_order(ranks[shuffle], [ids[j] for j in shuffle], mode="pocl", seed=0)
    ]
    assert a == b


@pytest.mark.parametrize("mode", ["pocl", "random", "anti", "none"])
def test_subsets_nested_for_every_mode(mode):
    ranks, ids = _data(n=37)
    plan = stage_table(CurriculumConfig(mode="pocl"), n=37, batch_size=4)
    order = stage_order(ranks, ids, mode=mode, seed=1)
    assert sorted(order) == list(range(37))
    subsets = stage_subsets(order, [p.size for p in plan])
    assert [len(s) for s in subsets] == [9, 18, 27, 37]
    for small, big in itertools.pairwise(subsets):
        assert big[: len(small)] == small
    assert sorted(subsets[-1]) == list(range(37))


def test_pocl_first_stage_holds_the_easiest():
    ranks, ids = _data(n=20)
    subsets = stage_subsets(stage_order(ranks, ids, mode="pocl", seed=0), [5, 20])
    assert sorted(ranks[i] for i in subsets[0]) == [0, 1, 2, 3, 4]
    anti = stage_subsets(stage_order(ranks, ids, mode="anti", seed=0), [5, 20])
    assert sorted(ranks[i] for i in anti[0]) == [15, 16, 17, 18, 19]


def test_order_and_subset_errors():
    with pytest.raises(ValueError, match="one rank per sample"):
        stage_order([0, 1], ["a"], mode="pocl", seed=0)
    with pytest.raises(ValueError, match="mode"):
        stage_order([0], ["a"], mode="easy", seed=0)
    with pytest.raises(ValueError, match="non-decreasing"):
        stage_subsets([0, 1, 2], [2, 1])
    with pytest.raises(ValueError, match="at most 3"):
        stage_subsets([0, 1, 2], [2, 4])


def test_epoch_order():
    subset = [7, 3, 11, 20, 5, 9, 14, 2, 30, 1]
    e0 = epoch_order(subset, seed=0, stage=1, epoch=0)
    assert sorted(e0) == sorted(subset)
    assert epoch_order(subset, seed=0, stage=1, epoch=0) == e0
    assert epoch_order(subset, seed=0, stage=1, epoch=1) != e0
    assert epoch_order(subset, seed=0, stage=2, epoch=0) != e0
    assert epoch_order(subset, seed=1, stage=1, epoch=0) != e0
    assert epoch_order(subset, seed=0, stage=1, epoch=3, shuffle=False) == subset


# ---------------------------------------------------------------- LR schedule


def test_cosine_lr_mult_by_hand():
    assert cosine_lr_mult(0, 10) == 1.0
    assert cosine_lr_mult(5, 10, 0.0) == pytest.approx(0.5)
    assert cosine_lr_mult(5, 10, 0.2) == pytest.approx(0.6)
    assert cosine_lr_mult(0, 10, 1e-3) == 1.0
    assert cosine_lr_mult(9, 10) == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)))
    assert cosine_lr_mult(0, 1) == 1.0


def test_cosine_lr_mult_warmup():
    assert [cosine_lr_mult(t, 10, 0.0, warmup=4) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr_mult(4, 10, 0.0, warmup=4) == 1.0
    assert cosine_lr_mult(7, 10, 0.0, warmup=4) == pytest.approx(0.5)  # u = 3 of U = 6
    assert cosine_lr_mult(2, 3, 0.0, warmup=5) == pytest.approx(0.6)  # longer than schedule


def test_cosine_lr_mult_errors():
    with pytest.raises(ValueError, match="steps 0..9"):
        cosine_lr_mult(10, 10)
    with pytest.raises(ValueError):
        cosine_lr_mult(-1, 10)
    with pytest.raises(ValueError, match="min_ratio"):
        cosine_lr_mult(0, 10, 1.5)


def test_resets_optimizer():
    assert resets_optimizer("per_stage") is True
    assert resets_optimizer("continuous") is False
    with pytest.raises(ValueError, match="lr_policy"):
        resets_optimizer("cyclic")


# ---------------------------------------------------------------- step → position


def test_positions_at_paper_stage_boundaries_per_stage():
    plan = paper_plan()
    starts = stage_start_steps(plan)
    min_r = 1e-7 / 1e-4
    for s, p in enumerate(plan):
        first = position_at(plan, starts[s], lr_policy="per_stage", min_lr_ratio=min_r)
        assert (first.stage, first.epoch, first.step_in_epoch, first.step_in_stage) == (s, 0, 0, 0)
        assert first.global_step == starts[s]
        assert first.lr_mult == 1.0
        assert (first.tau, first.kd_ratio, first.alpha) == (p.tau, p.kd_ratio, p.alpha)
        last = position_at(
            plan, starts[s] + p.total_steps - 1, lr_policy="per_stage", min_lr_ratio=min_r
        )
        assert last.stage == s
        assert (last.epoch, last.step_in_epoch) == (7, p.steps_per_epoch - 1)
        assert last.step_in_stage == p.total_steps - 1
        expected = cosine_lr_mult(p.total_steps - 1, p.total_steps, min_r)
        assert last.lr_mult == pytest.approx(expected)
        assert min_r < last.lr_mult < 2e-3


def test_positions_continuous_policy_decreases_monotonically():
    plan = paper_plan()
    end = total_steps(plan)
    mults = [position_at(plan, g, lr_policy="continuous").lr_mult for g in range(end)]
    assert mults[0] == 1.0
    assert all(m < 1.0 for m in mults[1:])
    assert all(b < a for a, b in itertools.pairwise(mults))
    starts = stage_start_steps(plan)
    for s in range(1, 4):
        pos = position_at(plan, starts[s], lr_policy="continuous")
        assert pos.stage == s and pos.step_in_stage == 0
        assert pos.lr_mult == pytest.approx(cosine_lr_mult(starts[s], end))
        assert position_at(plan, starts[s] - 1, lr_policy="continuous").stage == s - 1


def test_positions_with_warmup():
    plan = stage_table(CurriculumConfig(num_stages=2, interval=2), n=20, batch_size=4)
    assert [p.total_steps for p in plan] == [6, 10]
    per = [position_at(plan, g, lr_policy="per_stage", warmup_steps=2).lr_mult for g in range(16)]
    assert per[0:3] == [0.5, 1.0, 1.0] and per[6:9] == [0.5, 1.0, 1.0]
    cont = [position_at(plan, g, lr_policy="continuous", warmup_steps=3).lr_mult for g in range(16)]
    assert cont[0:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert cont[6] == pytest.approx(cosine_lr_mult(6, 16, 0.0, 3)) and cont[6] < 1.0


def test_position_past_end_raises():
    plan = paper_plan()
    with pytest.raises(ValueError, match="global_step"):
        position_at(plan, total_steps(plan), lr_policy="per_stage")
    with pytest.raises(ValueError, match="global_step"):
        position_at(plan, -1, lr_policy="per_stage")
    with pytest.raises(ValueError, match="lr_policy"):
        position_at(plan, 0, lr_policy="cyclic")


BATCH = 3


def _naive_positions(plan: list[StagePlan]) -> list[tuple[int, int, int, int]]:
    """(stage, epoch, step_in_epoch, step_in_stage) of every step, by walking batches."""
    out = []
    for p in plan:
        in_stage = 0
        for epoch in itertools.count():
            if p.epochs is not None and epoch == p.epochs:
                break
            for k, _ in enumerate(range(0, p.size, BATCH)):  # one step per batch start
                if in_stage == p.total_steps:  # steps unit, or mode none's partial epoch
                    break
                out.append((p.stage, epoch, k, in_stage))
                in_stage += 1
            if in_stage == p.total_steps:
                break
    return out


@pytest.mark.parametrize("unit", ["epochs", "steps"])
@pytest.mark.parametrize("mode", ["pocl", "none"])
def test_position_matches_naive_walk(unit, mode):
    cur = CurriculumConfig(num_stages=3, interval=4, interval_unit=unit, mode=mode)
    plan = stage_table(cur, n=17, batch_size=BATCH)
    naive = _naive_positions(plan)
    assert len(naive) == total_steps(plan)
    for g, expected in enumerate(naive):
        pos = position_at(plan, g, lr_policy="per_stage")
        assert (pos.stage, pos.epoch, pos.step_in_epoch, pos.step_in_stage) == expected
        assert pos.global_step == g


def test_stage_position_after_early_stop():
    plan = paper_plan()
    starts = stage_start_steps(plan)
    # Stage 0 was cut short after 100 steps; stage 1 begins at actual global step 100.
    pos = stage_position(plan, 1, 0, lr_policy="continuous", steps_before_stage=100)
    assert pos.global_step == 100 and pos.stage == 1 and pos.step_in_stage == 0
    # The continuous LR follows the plan: the skipped steps of stage 0 are skipped in it too.
    assert pos.lr_mult == position_at(plan, starts[1], lr_policy="continuous").lr_mult
    fresh = stage_position(plan, 1, 0, lr_policy="per_stage", steps_before_stage=100)
    assert fresh.lr_mult == 1.0
    # Without steps_before_stage it equals the global-step path.
    g = starts[2] + 17
    assert stage_position(plan, 2, 17, lr_policy="continuous") == position_at(
        plan, g, lr_policy="continuous"
    )
    with pytest.raises(ValueError, match="step_in_stage"):
        stage_position(plan, 0, plan[0].total_steps, lr_policy="per_stage")
    with pytest.raises(ValueError, match="stage: got 4"):
        stage_position(plan, 4, 0, lr_policy="per_stage")


def test_position_is_frozen():
    pos = position_at(paper_plan(), 0, lr_policy="per_stage")
    assert isinstance(pos, Position)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pos.stage = 1


# ---------------------------------------------------------------- plateau trigger


def test_plateau_min_mode():
    t = PlateauTracker(patience=2)
    assert [t.update(x) for x in [3.0, 2.0, 2.5, 2.0, 1.0, 1.5, 1.5, 0.9]] == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
        False,
    ]
    assert t.best == 0.9


def test_plateau_max_mode_and_patience_one():
    t = PlateauTracker(patience=1, mode="max")
    assert [t.update(x) for x in [0.1, 0.2, 0.2, 0.3, 0.1]] == [False, False, True, False, True]


def test_plateau_keeps_firing_until_improvement_and_nan_is_no_improvement():
    t = PlateauTracker(patience=2)
    assert [t.update(x) for x in [1.0, float("nan"), 1.0, 1.0, 0.5]] == [
        False,
        False,
        True,
        True,
        False,
    ]
    t = PlateauTracker(patience=1)
    assert t.update(float("nan")) is True and t.best is None
    assert t.update(5.0) is False and t.best == 5.0


def test_plateau_reset_and_state_round_trip():
    t = PlateauTracker(patience=3)
    for x in [1.0, 2.0, 2.0]:
        t.update(x)
    state = t.state_dict()
    assert state == {"best": 1.0, "num_bad": 2}
    restored = PlateauTracker(patience=3)
    restored.load_state_dict(state)
    assert restored.update(1.5) is True
    t.reset()
    assert (t.best, t.num_bad) == (None, 0)
    assert t.update(100.0) is False


def test_plateau_rejects_bad_arguments():
    with pytest.raises(ValueError, match="patience"):
        PlateauTracker(patience=0)
    with pytest.raises(ValueError, match="mode"):
        PlateauTracker(patience=1, mode="up")


def test_module_does_not_import_ray():
    import subprocess
    import sys

    # nothing blocked: if the module (or anything it imports) pulls ray in, it shows up here
    code = "import sys, pocl_ray.curriculum; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_rescored_order_keeps_used_samples_and_reorders_the_rest():
    order = list(range(10))  # rows easiest first by the scores table
    sizes = [2, 5, 7, 10]
    got = curriculum.rescored_order(order, sizes, [[9, 8, 7, 6, 5, 4, 3, 2], [4, 3, 6, 5, 2]])
    # round 1 (after stage 1) keeps rows 0, 1; round 2 (after stage 2) keeps the first five
    assert got == [0, 1, 9, 8, 7, 4, 3, 6, 5, 2]
    stages = curriculum.stage_subsets(got, sizes)
    assert all(set(a) <= set(b) for a, b in zip(stages, stages[1:]))  # nested
    assert sorted(got) == order
    assert curriculum.rescored_order(order, sizes, []) == order


def test_a_round_for_other_rows_is_refused():
    with pytest.raises(ValueError, match="rescore round 1: it ranks 3 rows, but the rows after "
                                         "stage 0 are 8 others"):  # fmt: skip
        curriculum.rescored_order(list(range(10)), [2, 5, 7, 10], [[2, 3, 4]])
    with pytest.raises(ValueError, match="round 1"):
        curriculum.rescored_order(list(range(10)), [2, 5, 7, 10], [[0, 2, 3, 4, 5, 6, 7, 8]])
