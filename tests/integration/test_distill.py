"""The Ray Train distillation job (jobs/distill.py) on the session's local Ray, tiny models.

One module-scoped scoring run makes the table; every test trains in its own copy of that run
directory. Most runs use Train local mode (num_workers=0, in this process); four use real
worker processes: one worker (equal to the plain loop), two workers (DDP), a worker killed
mid-stage (restarted by FailureConfig), and an interrupted run re-run under the same name.
The maths is tested in tests/unit (test_distill_core.py); here we test the wiring.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from jobs import __main__ as cli
from jobs import distill, runtime, score
from pocl_ray import artifacts, curriculum, difficulty, models
from pocl_ray.data import TokenizedExample, collate, example_from_row, tokenize_records
from pocl_ray.loop import run_curriculum, seed_training
from pocl_ray.ray_train import latest_checkpoint, read_state
from pocl_ray.run_dir import RunDir
from pocl_ray.scores import TOPK_CACHE
from pocl_ray.train_step import loss_terms, topk_targets
from tests import tiny

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
BATCH = 16  # optim.batch_size of the demo config
# 2 + 4 + 6 + 7 = 19 steps of 16 rows. Dropout on (like a pretrained GPT-2 student): the
# equality tests below then also prove that Ray trains in train mode with the plain loop's RNG.
EXTRA = ["scoring.teacher_topk=4", "run.log_every=1", "student.dropout=0.1"]


def tiny_cfg(out: Path, *extra: str):
    return tiny.tiny_cfg(out, *EXTRA, *extra)


@pytest.fixture(scope="module")
def scored(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "scored"
    score.main(tiny_cfg(out))
    return out


def copy_run(scored: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(scored, out)
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def events(out: Path, kind: str) -> list[dict]:
    lines = (out / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def plan_of(cfg, n: int, world: int = 1):
    return curriculum.stage_table(
        cfg.curriculum, n=n, batch_size=cfg.optim.batch_size * world, loss_alpha=cfg.loss.alpha
    )


def table_examples(out: Path) -> tuple[list[TokenizedExample], list[int]]:
    table = tiny.read_scores(out)
    examples = [example_from_row(row) for _, row in table.iterrows()]
    return examples, table["difficulty_rank"].tolist()


def plain_history(out: Path, cfg) -> list[dict]:
    """The core plain loop (run_curriculum) on the same table, models and seed."""
    examples, ranks = table_examples(out)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))
    student = models.load_pretrained(out / "student_init", cfg.student)
    teacher = models.freeze_teacher(models.load_pretrained(out / "teacher", cfg.teacher))
    return run_curriculum(student, teacher, examples, ranks, cfg, pad_id=tok.pad_token_id)


def same_steps(rows: list[dict], ref: list[dict], rtol: float = 0.0) -> None:
    assert [r["step"] for r in rows] == [h["step"] for h in ref]
    for key in ("loss", "ce", "kd"):
        got, want = np.array([r[key] for r in rows]), np.array([h[key] for h in ref])
        if rtol == 0.0:
            assert got.tolist() == want.tolist(), key  # bit for bit
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, err_msg=key)


def tensorboard_tags(folder: Path) -> set[str]:
    """Scalar tags in TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
            tags |= {v.tag for v in event.summary.value}
            i += 12 + length + 4
    return tags


# ---------------------------------------------------------------- local mode


@pytest.mark.timeout(120)
def test_local_mode_follows_the_plan_and_equals_the_plain_loop(scored, tmp_path):
    out = copy_run(scored, tmp_path)
    cfg = tiny_cfg(out, "scaling.num_workers=0")
    distill.main(cfg)
    n = tiny.read_manifest(out)["counts"]["scored"]
    plan = plan_of(cfg, n)
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(curriculum.total_steps(plan)))
    for r in rows:  # stage boundaries, tau / lambda / LR per step: the core plan's
        pos = curriculum.position_at(
            plan, r["step"], lr_policy="per_stage", min_lr_ratio=cfg.optim.min_lr / cfg.optim.lr
        )
        assert (r["stage"], r["epoch"], r["step_in_epoch"]) == (
            pos.stage,
            pos.epoch,
            pos.step_in_epoch,
        )
        assert (r["tau"], r["kd_ratio"]) == (pos.tau, pos.kd_ratio)
        assert r["lr"] == pytest.approx(cfg.optim.lr * pos.lr_mult)
    # subset sizes: stage s visits its subset once (interval 1 epoch), buckets 0..s only
    sizes = difficulty.stage_sizes(n, cfg.curriculum.num_stages)
    bucket_sizes = np.diff([0, *sizes]).tolist()
    stages = json.loads((out / "stages.json").read_text())
    for s, summary in enumerate(stages):
        assert summary["samples"] == plan[s].size and summary["steps"] == plan[s].total_steps
        assert [b["rows"] for b in summary["buckets"]] == [
            size if b <= s else 0 for b, size in enumerate(bucket_sizes)
        ]
        assert all((b["loss"] is None) == (b["rows"] == 0) for b in summary["buckets"])
    assert rows[-1]["samples"] == sum(p.size for p in plan)
    same_steps(rows, plain_history(out, cfg))  # same semantics, Ray or not

    # the student is a plain Hugging Face folder that generates
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    prompt = tok("### Instruction:\nAdd 2 and 3.\n\n### Response:\n", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > prompt["input_ids"].shape[1]
    assert {"train/loss", "train/tau", "train/lr", "stage_loss/bucket_0"} <= tensorboard_tags(
        out / "tensorboard"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == curriculum.total_steps(plan) and summary["stages"] == 4


@pytest.mark.timeout(120)
def test_on_policy_steps_follow_the_seeded_coin_and_equal_the_plain_loop(scored, tmp_path):
    out = copy_run(scored, tmp_path)
    cfg = tiny_cfg(
        out, "scaling.num_workers=0", "loss.on_policy_ratio=0.5", "loss.on_policy_max_new_tokens=4"
    )
    distill.main(cfg)
    rows = metrics(out)
    coin = [curriculum.on_policy_seed(0, r["step"], 0.5) is not None for r in rows]
    assert [r["on_policy"] for r in rows] == coin and 0 < sum(coin) < len(coin)
    stages = json.loads((out / "stages.json").read_text())
    assert sum(s["on_policy_steps"] for s in stages) == sum(coin)
    same_steps(rows, plain_history(out, cfg))


@pytest.mark.timeout(120)
def test_plateau_trigger_ends_stages_like_the_plain_loop(scored, tmp_path):
    out = copy_run(scored, tmp_path)
    extra = ["curriculum.mode=random", "curriculum.interval=3", "curriculum.plateau_patience=1"]
    cfg = tiny_cfg(out, "scaling.num_workers=0", "curriculum.eval_every=2", *extra)
    distill.main(cfg)
    # the plain loop with the same held-out examples (the data split of the core)
    held = artifacts.read_inputs(cfg, RunDir(out)).held
    tok = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))
    dev = tokenize_records(held, tok, max_prompt_length=96, max_length=128).examples
    examples, ranks = table_examples(out)
    ref = run_curriculum(
        models.load_pretrained(out / "student_init", cfg.student),
        models.freeze_teacher(models.load_pretrained(out / "teacher", cfg.teacher)),
        examples,
        ranks,
        cfg,
        pad_id=tok.pad_token_id,
        dev_examples=dev,
    )
    rows = metrics(out)
    same_steps(rows, ref)
    assert [r["stage"] for r in rows] == [h["stage"] for h in ref]
    stages = json.loads((out / "stages.json").read_text())
    assert any(s["ended_by"] == "plateau" and s["steps"] < s["planned_steps"] for s in stages)


@pytest.mark.timeout(120)
def test_teacher_cache_feeds_each_row_its_own_top_k(scored, tmp_path):
    out = copy_run(scored, tmp_path)
    cfg = tiny_cfg(out, "scaling.num_workers=0", "loss.teacher_source=cache")
    distill.main(cfg)
    rows = metrics(out)
    assert all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in rows)
    # step 0 by hand: the plan's first batch, the table's cache for those rows, the core loss
    table = tiny.read_scores(out)
    examples, ranks = table_examples(out)
    plan = plan_of(cfg, len(examples))
    order = curriculum.stage_order(ranks, table["sample_id"].tolist(), mode="pocl", seed=0)
    subset = curriculum.stage_subsets(order, [p.size for p in plan])[0]
    first = curriculum.stage_batches(plan[0], subset, seed=0, batch_size=BATCH)[0]
    tok = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))
    batch = collate([examples[i] for i in first], tok.pad_token_id)
    cache = [tuple(np.stack(table[c][i]) for c in TOPK_CACHE) for i in first]
    batch.update(topk_targets(batch["labels"], cache, cfg.scoring.cache_taus))
    student = models.load_pretrained(out / "student_init", cfg.student).train()
    seed_training(cfg.run.seed)  # the worker trains with dropout, seeded like this
    want = loss_terms(student, None, batch, tau=1.0, kd_ratio=0.7, alpha=0.1, loss=cfg.loss)
    assert rows[0]["kd"] == pytest.approx(want.kd.item(), rel=1e-6)
    assert rows[0]["loss"] == pytest.approx(want.total.item(), rel=1e-6)


# ---------------------------------------------------------------- refusals (no training)


@pytest.mark.timeout(60)
def test_gpu_requested_without_gpu_fails_fast(ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        *tiny.TINY,
        *EXTRA,
        f"run.output_dir={out}",
        "scaling.use_gpu=true",
        "scaling.num_workers=1",
    ]
    assert cli.main(["distill", str(DEMO), *args]) == 2
    err = capsys.readouterr().err
    assert "no GPU" in err and "scaling.use_gpu=false" in err
    assert not out.exists()  # refused before any work


@pytest.mark.timeout(60)
def test_a_table_made_for_other_settings_is_refused(scored, tmp_path):
    out = copy_run(scored, tmp_path)
    with pytest.raises(runtime.JobError) as e:
        distill.main(tiny_cfg(out, "teacher.hidden_size=64", "teacher.num_heads=4"))
    text = str(e.value)
    assert "teacher.hidden_size: the table was made with 32, this config has 64" in text
    assert "pocl-ray score" in text
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.timeout(60)
def test_missing_table_runs_the_scoring_job_first(ray_local, tmp_path, monkeypatch, capsys):
    calls = []

    class Stop(Exception):
        pass

    def fake_score(cfg):
        calls.append(cfg.run.output_dir)
        raise Stop

    monkeypatch.setattr(score, "main", fake_score)
    with pytest.raises(Stop):
        distill.main(tiny_cfg(tmp_path / "empty", "scaling.num_workers=0"))
    assert calls == [str((tmp_path / "empty").resolve())]
    assert "no scores table" in capsys.readouterr().out


# ---------------------------------------------------------------- real workers


@pytest.mark.timeout(180)
def test_one_worker_equals_the_plain_loop(scored, tmp_path):
    out = copy_run(scored, tmp_path)
    cfg = tiny_cfg(
        out, "scaling.num_workers=1", "curriculum.shuffle=false", "run.keep_checkpoints=null"
    )
    distill.main(cfg)
    same_steps(metrics(out), plain_history(out, cfg))
    # a checkpoint at every stage boundary, each saying where the next stage starts
    plan = plan_of(cfg, tiny.read_manifest(out)["counts"]["scored"])
    ends = np.cumsum([p.total_steps for p in plan]).tolist()
    ckpts = sorted((out / "ray" / cfg.run.name).glob("ckpt_*"))
    assert [int(c.name.split("_")[1]) for c in ckpts] == ends
    for s, c in enumerate(ckpts):
        assert {"student.safetensors", "optimizer.pt", "rng_rank0.pt", "state.json"} <= {
            f.name for f in c.iterdir()
        }
        pos = read_state(c)["position"]
        assert (pos["stage"], pos["step_in_stage"], pos["global_step"]) == (s + 1, 0, ends[s])
        assert pos["samples_consumed"] == sum(p.size for p in plan[: s + 1])
    assert read_state(ckpts[-1])["position"]["done"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("extra", [[], ["optim.gradient_checkpointing=true"]],
                         ids=["plain", "gradient_checkpointing"])  # fmt: skip
def test_two_worker_ddp_trains_the_global_batch(scored, tmp_path, extra):
    """DDP on two workers = the plain loop on the global batch; with gradient checkpointing
    on the workers too (recomputed activations, same gradients)."""
    out = copy_run(scored, tmp_path)
    # dropout off: two ranks draw their masks from two RNG streams, the plain loop from one
    cfg = tiny_cfg(out, "scaling.num_workers=2", "student.dropout=0.0", *extra)
    distill.main(cfg)
    n = tiny.read_manifest(out)["counts"]["scored"]
    plan = plan_of(cfg, n, world=2)  # global batch 2 x 16
    rows = metrics(out)
    assert len(rows) == curriculum.total_steps(plan) < curriculum.total_steps(plan_of(cfg, n))
    assert rows[-1]["samples"] == sum(p.size for p in plan)
    last = Path(latest_checkpoint(out / "ray" / cfg.run.name))
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {f.name for f in last.iterdir()}
    # token-weighted DDP gradients = the plain loop's on the global batch (up to float sums)
    ref = plain_history(out, tiny_cfg(out, f"optim.batch_size={2 * BATCH}", "student.dropout=0"))
    same_steps(rows, ref, rtol=1e-4)
    assert AutoModelForCausalLM.from_pretrained(out / "student") is not None


@pytest.mark.timeout(200)
def test_worker_killed_mid_stage_restarts_at_the_saved_position(scored, tmp_path):
    out = copy_run(scored, tmp_path)
    cfg = tiny_cfg(
        out,
        "scaling.num_workers=1",
        "run.checkpoint_every=3",
        "run.max_failures=1",
        "run.keep_checkpoints=null",
    )
    marker = tmp_path / "killed"
    # stages take steps 0-1, 2-5, 6-11, 12-18; checkpoints after steps 3 and 9 are mid-stage
    distill.main(cfg, fault={"step": 10, "marker": str(marker)})
    assert marker.exists(), "the fault hook never fired: the test proved nothing"
    saved = read_state(out / "ray" / cfg.run.name / "ckpt_00000009")["position"]
    assert (saved["stage"], saved["step_in_stage"], saved["global_step"]) == (2, 3, 9)
    (resume,) = events(out, "resume")
    assert resume["position"] == saved and resume["checkpoint"].endswith("ckpt_00000009")
    rows = {r["step"]: r for r in metrics(out)}
    assert sorted(rows) == list(range(19))  # every step once in the final trajectory
    first = rows[saved["global_step"]]  # the first step trained after the restart
    assert (first["stage"], first["epoch"], first["step_in_epoch"]) == (
        saved["stage"],
        saved["epoch"],
        saved["step_in_epoch"],
    )
    assert first["samples"] == saved["samples_consumed"] + BATCH
    # weights, optimizer moments and data order all continued exactly
    same_steps([rows[s] for s in sorted(rows)], plain_history(out, cfg))


@pytest.mark.timeout(240)
def test_rerunning_the_same_name_resumes_instead_of_restarting(scored, tmp_path, capsys):
    out = copy_run(scored, tmp_path)
    cfg = tiny_cfg(out, "scaling.num_workers=1", "run.checkpoint_every=4", "run.max_failures=0")
    with pytest.raises(runtime.JobError, match="run the same command again"):
        distill.main(cfg, fault={"step": 10, "marker": str(tmp_path / "killed")})
    latest = Path(latest_checkpoint(out / "ray" / cfg.run.name))
    assert latest.name == "ckpt_00000008"  # stage 2, step 2 of its 6
    capsys.readouterr()

    distill.main(cfg)  # the same command again
    printed = capsys.readouterr().out
    assert (
        "resuming run 'demo' from" in printed
        and "ckpt_00000008: stage 2, epoch 0, step 2" in printed
    )
    (resume,) = events(out, "resume")
    assert resume["position"]["global_step"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 19 and summary["steps_this_attempt"] == 19 - 8  # not restarted
    assert sorted(r["step"] for r in metrics(out)) == list(range(19))
    same_steps(metrics(out), plain_history(out, cfg))

    distill.main(cfg)  # a finished run: nothing to train
    assert "already complete" in capsys.readouterr().out
    # memory-only settings may change between attempts (an older checkpoint lacks the key)
    distill.main(tiny_cfg(out, "scaling.num_workers=1", "optim.gradient_checkpointing=true"))
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(runtime.JobError, match=r"optim.lr: 0.002 -> 0.001"):
        distill.main(tiny_cfg(out, "scaling.num_workers=1", "optim.lr=1e-3"))


@pytest.mark.timeout(400)
def test_rescore_reranks_the_rest_at_each_stage_and_resumes_on_the_same_stages(
    scored, tmp_path, capsys
):
    """curriculum.rescore: after each stage the samples not used yet are scored with the
    student as it is then and re-ranked; used samples stay (nested stages). An interrupted
    run reuses the rounds on disk, so it trains on the same stages."""
    import pandas as pd

    from pocl_ray import rescore

    out = copy_run(scored, tmp_path)
    cfg = tiny_cfg(out, "scaling.num_workers=1", "curriculum.rescore=true",
                   "run.max_failures=0", "run.keep_checkpoints=null")  # fmt: skip
    # stages take steps 0-1, 2-5, 6-11, 12-18: the fault hits stage 3 after rounds 1 and 2
    with pytest.raises(runtime.JobError, match="run the same command again"):
        distill.main(cfg, fault={"step": 8, "marker": str(tmp_path / "killed")})
    paths = [rescore.round_path(out, r) for r in (1, 2, 3)]
    assert paths[0].exists() and paths[1].exists() and not paths[2].exists()  # see below
    stamps = [p.stat().st_mtime_ns for p in paths[:2]]
    first = capsys.readouterr().out
    assert "rescore round 1:" in first and "rescore round 2:" in first

    distill.main(cfg)  # the same command again
    printed = capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in paths[:2]] == stamps  # reused, not rescored
    assert "rescore round" not in printed  # the last stage takes every sample: no round 3
    assert not paths[2].exists()
    assert sorted(r["step"] for r in metrics(out)) == list(range(19))
    assert len(events(out, "resume")) == 1 and len(events(out, "continue")) == 2 + 1

    # nested stages: round r ranks exactly the samples outside stage r - 1
    table = tiny.read_scores(out)
    sizes = [p.size for p in plan_of(cfg, len(table))]
    order = table.sort_values(["difficulty_rank", "sample_id"])["sample_id"].tolist()
    moved = 0
    for r, path in enumerate(paths[:2], start=1):
        got = pd.read_parquet(path)
        assert sorted(got["sample_id"]) == sorted(order[sizes[r - 1]:])
        assert got["difficulty_rank"].tolist() == list(range(1, len(got) + 1))  # easiest first
        moved += got["sample_id"].tolist() != order[sizes[r - 1]:]
        order = order[: sizes[r - 1]] + got["sample_id"].tolist()
        # the student's signals changed with training; the teacher's did not
        merged = got.merge(table, on="sample_id", suffixes=("", "_start"))
        assert not np.allclose(merged["nll"], merged["nll_start"])
        np.testing.assert_allclose(merged["teacher_nll"], merged["teacher_nll_start"], rtol=1e-5)
    assert moved >= 1, "no round changed the order: the test proved nothing"
    # stage 1 trained on the scores table's order, as plain pocl; later stages on the rounds'
    rows, ref = metrics(out), plain_history(out, tiny_cfg(out, "scaling.num_workers=1"))
    same_steps(rows[:2], ref[:2], rtol=1e-5)
    assert [r["loss"] for r in rows[2:]] != [h["loss"] for h in ref[2:]]
