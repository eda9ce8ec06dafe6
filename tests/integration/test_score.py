"""The Ray Data scoring job (jobs/score.py) on the session's local Ray, with tiny models.

One module-scoped run on the built-in tasks feeds most checks; the idempotency, reliability,
GPU-request and real-data checks make their own (small) runs. The maths is tested in
tests/unit (difficulty, losses); here we test the wiring: rows in = rows out, the table agrees
with the core functions, and a dead actor loses nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from jobs import __main__ as cli
from jobs import runtime, score
from pocl_ray import difficulty, models, scores, tasks
from pocl_ray.data import TokenizedExample, load_records, split_train_eval
from pocl_ray.run_dir import data_fingerprint
from pocl_ray.signals import score_batch
from tests import tiny
from tests.tiny import TINY, tiny_cfg

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
DOLLY = ROOT.parent / "shared" / "data" / "dolly-train.jsonl"
TOPK = 4
CACHE_COLUMNS = ["teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logz"]


def train_ids(cfg) -> list[str]:
    """The training split's ids, straight from the core loader and split."""
    source = cfg.data.source
    if source == "builtin":
        source = Path(cfg.run.output_dir) / "data" / "tasks.jsonl"
    loaded = load_records(source, limit=cfg.data.limit, on_bad_record=cfg.data.on_bad_record)
    train, _ = split_train_eval(loaded.records, cfg.data.eval_fraction, seed=cfg.run.seed)
    return [r.sample_id for r in train]


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("score") / "run"
    cfg = tiny_cfg(out, f"scoring.teacher_topk={TOPK}")
    score.main(cfg)
    return cfg, out


@pytest.mark.timeout(240)
def test_row_accounting(tiny_run):
    cfg, out = tiny_run
    table = tiny.read_scores(out)
    c = tiny.read_manifest(out)["counts"]
    assert c["read"] == cfg.data.builtin_size and c["rejected"] == 0
    assert c["accepted"] + c["rejected"] == c["read"]
    assert c["scored"] + c["held_out"] + c["rejected"] == c["read"]
    assert c["scored"] == c["train"] == len(table) > 0 and c["held_out"] > 0
    assert table["sample_id"].is_unique
    assert sorted(table["sample_id"]) == sorted(train_ids(cfg))


def test_accounting_check_names_each_violation():
    counts = dict(read=5, accepted=5, rejected=0, held_out=1, scored=4)
    assert scores.accounting_problems(counts, ["a", "b", "c", "d"], ["a", "b", "c", "d"]) == []
    text = " ".join(scores.accounting_problems(counts, ["a", "a", "c", "x"], ["a", "b", "c", "d"]))
    assert "more than once" in text and "never scored" in text and "not training samples" in text


@pytest.mark.timeout(60)
def test_ranks_equal_core_fuse_of_the_tables_own_signals(tiny_run):
    cfg, out = tiny_run
    table = tiny.read_scores(out)
    signals = cfg.scoring.signals
    assert table["difficulty_rank"].tolist() == list(range(1, len(table) + 1))  # easiest first
    again = difficulty.fuse(table[["sample_id", *signals]], signals, k=cfg.scoring.fusion_k)
    for col in [f"rank_{s}" for s in signals] + ["rrf", "difficulty_rank"]:
        np.testing.assert_array_equal(table[col].to_numpy(), again[col].to_numpy(), err_msg=col)
    sizes = difficulty.stage_sizes(len(table), cfg.curriculum.num_stages)
    staged = difficulty.assign_stages(again, sizes)
    np.testing.assert_array_equal(table["stage"].to_numpy(), staged["stage"].to_numpy())
    manifest = tiny.read_manifest(out)
    assert manifest["stage_sizes"] == sizes
    assert manifest["signals"] == signals
    assert -1.0 <= manifest["measurer_quality"]["fused"] <= 1.0
    assert set(manifest["measurer_quality"]["signals"]) == set(signals)
    assert set(manifest["key"]["models"]) == {"tokenizer", "teacher", "student_init", "scorer"}
    assert manifest["ray"]["version"]


@pytest.mark.timeout(60)
def test_signals_match_the_plain_loop(tiny_run):
    """The actors compute what core score_batch computes in this process."""
    cfg, out = tiny_run
    table = tiny.read_scores(out).set_index("sample_id")
    torch.set_num_threads(1)
    tok = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))
    student = models.load_pretrained(out / "student_init", cfg.student).eval()
    teacher = models.load_pretrained(out / "teacher", cfg.teacher).eval()
    rows = table.head(24)
    examples = [
        TokenizedExample(
            sample_id=sid,
            input_ids=list(map(int, r["input_ids"])),
            labels=list(map(int, r["labels"])),
            prompt_length=int(r["prompt_length"]),
            prompt_truncated=False,
            response_truncated=False,
        )
        for sid, r in rows.iterrows()
    ]
    got = score_batch(
        examples,
        [list(r) for r in rows["references"]],
        signals=cfg.scoring.signals,
        scorer=student,
        teacher=teacher,
        tokenizer=tok,
        max_new_tokens=cfg.scoring.max_new_tokens,
    ).signals
    for s in ("nll", "teacher_nll", "kd_gap"):
        np.testing.assert_allclose(rows[s].to_numpy(), got[s], rtol=1e-4, atol=1e-5, err_msg=s)
    assert np.mean(rows["rouge"].to_numpy() == np.asarray(got["rouge"])) >= 0.9


@pytest.mark.timeout(60)
def test_teacher_topk_cache_shapes(tiny_run):
    cfg, out = tiny_run
    table = tiny.read_scores(out)
    teacher = models.load_pretrained(out / "teacher", cfg.teacher).eval()
    taus = cfg.scoring.cache_taus
    for _, row in table.head(5).iterrows():
        ids = np.stack(row["teacher_topk_ids"])
        logprobs = np.stack(row["teacher_topk_logprobs"])
        tail = np.stack(row["teacher_tail_logz"])
        assert ids.shape == logprobs.shape == (row["response_tokens"], TOPK)
        assert tail.shape == (row["response_tokens"], len(taus))
        assert (ids.dtype, logprobs.dtype, tail.dtype) == (np.int32, np.float16, np.float32)
        assert (np.diff(logprobs.astype(np.float32), axis=1) <= 0).all()  # sorted, best first
        # recompute: the teacher's top-K at each position before a response token
        labels = np.asarray(row["labels"])
        with torch.no_grad():
            z = teacher(input_ids=torch.tensor([list(row["input_ids"])])).logits[0, :-1]
        at = np.nonzero(labels[1:] != -100)[0]
        logp = torch.log_softmax(z[at].double(), dim=-1)
        want_vals, want_ids = logp.topk(TOPK, dim=-1)
        np.testing.assert_allclose(logprobs.astype(np.float32), want_vals.numpy(), atol=1e-2)
        assert (ids == want_ids.numpy()).mean() >= 0.95  # near-ties may swap order
        # top-K mass + tail mass = 1 at T = 1 (the grid holds 1.0)
        head = np.logaddexp.reduce(logprobs.astype(np.float64), axis=1)
        total = np.logaddexp(head, tail[:, taus.index(1.0)])
        np.testing.assert_allclose(total, 0.0, atol=5e-3)
    manifest = tiny.read_manifest(out)
    assert manifest["teacher_topk"] == TOPK and manifest["cache_taus"] == taus
    assert manifest["format_version"] == scores.FORMAT_VERSION == 2


@pytest.mark.timeout(180)
def test_idempotent_rerun_force_and_changed_config(tiny_run, tmp_path, capsys, caplog):
    _, src = tiny_run
    out = tmp_path / "run"
    shutil.copytree(src, out)  # keep the shared run untouched
    cfg = tiny_cfg(out, f"scoring.teacher_topk={TOPK}")
    manifest = out / "scores" / "manifest.json"
    before = tiny.read_scores(out)
    stamp = manifest.stat().st_mtime_ns

    score.main(cfg)  # same config and data: reused, not rescored
    assert "reusing the existing table" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns == stamp

    score.main(cfg, force=True)  # rescored: the same rankings, bit for bit
    assert "rows/s" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns != stamp
    after = tiny.read_scores(out)
    pd.testing.assert_frame_equal(
        before.drop(columns=CACHE_COLUMNS),
        after.drop(columns=CACHE_COLUMNS),
    )

    old_hash = json.loads(manifest.read_text())["key"]["config_hash"]
    changed = tiny_cfg(out, f"scoring.teacher_topk={TOPK}", "scoring.max_new_tokens=3")
    with caplog.at_level("WARNING", logger="pocl_ray.score"):
        score.main(changed)
    assert "inputs changed: config_hash" in caplog.text and "rescoring and replacing" in caplog.text
    new = json.loads(manifest.read_text())
    assert new["key"]["config_hash"] != old_hash
    assert new["config"]["scoring"]["max_new_tokens"] == 3
    # an execution-only setting is not part of the hash: reused
    score.main(tiny_cfg(out, f"scoring.teacher_topk={TOPK}", "scoring.max_new_tokens=3",
                        "scoring.batch_size=8"))  # fmt: skip
    assert "reusing the existing table" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_gpu_request_without_gpu_fails_fast(ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["score", str(DEMO), *TINY, f"run.output_dir={out}", "scoring.gpus_per_actor=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no GPU" in err and "scoring.gpus_per_actor=0" in err
    assert not out.exists()  # refused before any work (no data, no teacher training)


@pytest.mark.timeout(180)
def test_actors_go_where_their_custom_resource_is(ray_local, tmp_path, capsys):
    """scoring.resources reaches the actor pool: two actors holding 1 pocl_test_node each
    (the test Ray has 2) score the table; asking for 2 each is refused before any work."""
    out = tmp_path / "run"
    score.main(tiny_cfg(out, "data.limit=40", "scoring.signals=[nll]", "scoring.num_actors=2",
                        "scoring.resources={pocl_test_node: 1}"))  # fmt: skip
    assert len(tiny.read_scores(out)) == tiny.read_manifest(out)["counts"]["scored"] > 0
    refused = tmp_path / "refused"
    rc = cli.main(["score", str(DEMO), *TINY, f"run.output_dir={refused}", "scoring.num_actors=2",
                   "scoring.resources={pocl_test_node: 2}"])  # fmt: skip
    assert rc == 2 and "2 x 2 of the custom resource 'pocl_test_node'" in capsys.readouterr().err
    assert not refused.exists()


def test_resource_check_counts_the_whole_pool():
    pool = runtime.pool_request("scoring", 3, 2.0, 0.0)
    with pytest.raises(runtime.ResourceError, match="6 CPUs; the cluster has 4"):
        runtime.preflight(pool, {"CPU": 4.0})
    runtime.preflight(pool, {"CPU": 6.0})
    gpus = runtime.pool_request("scoring", 2, 1.0, 1.0)
    with pytest.raises(runtime.ResourceError, match="2 GPUs; the cluster has 1"):
        runtime.preflight(gpus, {"CPU": 8.0, "GPU": 1.0})


@pytest.mark.timeout(180)
def test_actor_killed_mid_run_loses_and_duplicates_nothing(ray_local, tmp_path):
    # messy input too: two bad records skipped, so scored + held out + rejected == read
    data = tmp_path / "tasks.jsonl"
    tasks.write_jsonl(tasks.generate(120, seed=3), data)
    with data.open("a") as f:
        f.write('{"instruction": "no response here"}\nnot json at all\n')
    out = tmp_path / "run"
    cfg = tiny_cfg(
        out,
        f"data.source={data}",
        "data.on_bad_record=skip",
        "scoring.num_actors=2",
        "scoring.batch_size=8",
    )
    marker = tmp_path / "killed"
    score.main(cfg, fault={"batch": 2, "marker": str(marker)})
    assert marker.exists(), "the fault hook never fired: the test proved nothing"
    table = tiny.read_scores(out)
    assert table["sample_id"].is_unique
    assert sorted(table["sample_id"]) == sorted(train_ids(cfg))
    c = tiny.read_manifest(out)["counts"]
    assert (c["read"], c["rejected"]) == (122, 2)
    assert c["scored"] + c["held_out"] + c["rejected"] == c["read"]


@pytest.mark.timeout(180)
def test_accounting_violation_exits_nonzero_and_writes_nothing(tiny_run, tmp_path, monkeypatch):
    _, src = tiny_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    from pocl_ray import ray_data

    real = ray_data.score_rows

    def duplicating(ds, **kwargs):
        got = real(ds, **kwargs)
        return pd.concat([got, got.head(1)], ignore_index=True)

    monkeypatch.setattr(ray_data, "score_rows", duplicating)
    stamp = (out / "scores" / "manifest.json").stat().st_mtime_ns
    args = ["score", str(DEMO), *TINY, f"run.output_dir={out}", f"scoring.teacher_topk={TOPK}"]
    assert cli.main([*args, "--force"]) == 3
    assert (out / "scores" / "manifest.json").stat().st_mtime_ns == stamp  # old table kept


@pytest.mark.timeout(180)
def test_dolly_train_data(ray_local, tmp_path):
    if not DOLLY.exists():
        pytest.skip(f"{DOLLY} not present (shared/data is beside the project checkout)")
    out = tmp_path / "run"
    cfg = tiny_cfg(out, f"data.source={DOLLY}", "data.limit=60", "scoring.signals=[rouge,nll]")
    score.main(cfg)
    table = tiny.read_scores(out)
    manifest = tiny.read_manifest(out)
    assert manifest["counts"]["read"] == 60
    assert len(table) == manifest["counts"]["scored"] == len(train_ids(cfg))
    assert "level" not in table.columns and manifest["measurer_quality"] is None
    assert manifest["key"]["models"]["teacher"] is None  # student signals only: no teacher
    assert (table["response_tokens"] > 0).all()


def test_fingerprint_ignores_file_order_and_hash_ignores_execution_keys(tmp_path):
    data = tmp_path / "a.jsonl"
    items = tasks.generate(30, seed=1)
    tasks.write_jsonl(items, data)
    first = data_fingerprint(load_records(data))
    tasks.write_jsonl(items[::-1], data)
    assert data_fingerprint(load_records(data)) == first
    tasks.write_jsonl([{**items[0], "response": "changed"}, *items[1:]], data)
    assert data_fingerprint(load_records(data)) != first

    base = scores.config_hash(tiny_cfg(tmp_path))
    assert scores.config_hash(tiny_cfg(tmp_path, "scoring.num_actors=4")) == base
    assert scores.config_hash(tiny_cfg(tmp_path / "elsewhere")) == base
    assert scores.config_hash(tiny_cfg(tmp_path, "student.dropout=0.3")) == base  # training only
    assert scores.config_hash(tiny_cfg(tmp_path, "scoring.fusion_k=10")) != base
    assert scores.config_hash(tiny_cfg(tmp_path, "student.hidden_size=32")) != base


@pytest.mark.timeout(180)
def test_joins_an_existing_cluster_via_ray_address(tiny_run, tmp_path):
    """What `ray job submit` does: the driver finds RAY_ADDRESS, joins that cluster (here the
    session's local Ray) instead of starting one, and leaves it running."""
    import os
    import subprocess
    import sys

    import ray

    _, src = tiny_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "jobs", "score", str(DEMO), *TINY, f"run.output_dir={out}",
           f"scoring.teacher_topk={TOPK}", "--force"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray: connected to" in done.stderr and "started a local instance" not in done.stderr
    assert "rows/s" in done.stdout
    assert ray.get(ray.put(1)) == 1  # the cluster outlives the job's driver
    pd.testing.assert_series_equal(
        tiny.read_scores(out)["sample_id"], tiny.read_scores(src)["sample_id"]
    )
