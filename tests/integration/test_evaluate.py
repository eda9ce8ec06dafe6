"""The evaluation job (jobs/evaluate.py) on the session's local Ray, with tiny saved models.

Two tiny random models with large weights (their answers depend on the prompt and on the
seed) are saved once: a GPT-2 with its tokenizer, and a Llama without one (it must fall back
to the run's `tokenizer/`). Three job runs feed the checks: sampling with 1 actor, the same
with 2 actors and another batch size, and greedy through the CLI. The metric maths is also
tested without Ray in tests/unit/test_evaluation.py; here we test the wiring: every answer
is scored with rouge-score itself, results.csv is exactly the aggregate of generations.jsonl,
seeds are per (seed, sample) and do not depend on the actor pool.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from rouge_score import rouge_scorer

from jobs import __main__ as cli
from jobs import evaluate, runtime
from pocl_ray import evaluation, models, tasks
from pocl_ray.config import ModelConfig, load_config
from pocl_ray.data import load_records, tokenize_records
from pocl_ray.evaluation import RowSampler, generate, row_seed, sample_generate

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"
MAX_LEN = 128
NEW_TOKENS = 8
SEEDS = [10, 20]
BASE = [
    "data.builtin_size=120",
    "data.max_prompt_length=96",
    f"data.max_length={MAX_LEN}",
    "eval.max_examples=5",
    f"eval.max_new_tokens={NEW_TOKENS}",
    "eval.no_repeat_ngram_size=6",
]


def lively(arch: str, tok, seed: int):
    """A tiny random causal LM with large weights: its answers depend on the prompt."""
    torch.manual_seed(seed)
    model = models.build_tiny(
        ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2), tok, MAX_LEN
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def _has_words(text: str) -> bool:
    return any(ch.isascii() and ch.isalnum() for ch in text)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Saved models, the run's tokenizer, and a MiniLLM-schema eval file with `output` lists
    whose references are built from the GPT-2's own greedy answers (so exact match and
    multi-reference max have known, non-trivial values)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    records = load_records(tasks.write_jsonl(tasks.generate(200, seed=3), root / "t.jsonl"))
    records = records.records
    tok = models.train_tokenizer([r.prompt + r.references[0] for r in records], 512)
    gpt, llama = lively("gpt2", tok, 0), lively("llama", tok, 1)
    models.save_model(gpt, tok, root / "gpt")
    llama.save_pretrained(root / "llama", safe_serialization=True)  # no tokenizer files

    # greedy answers of the GPT-2, straight from the core (the job must reproduce them)
    cands = records[:40]
    ex = tokenize_records(cands, tok, max_prompt_length=96, max_length=MAX_LEN).examples
    prompts = [e.input_ids[: e.prompt_length] for e in ex]
    answers = generate(gpt, tok, prompts, max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=6)
    usable = [(r, a) for r, a in zip(cands, answers) if len(a.split()) >= 2 and _has_words(a)]
    assert len(usable) >= 3, answers
    (r0, a0), (r1, a1), (r2, _) = usable[:3]
    half = " ".join(a1.split()[: max(1, len(a1.split()) // 2)]) + " plus other words"
    mini = [
        # the answer itself is the 2nd reference: exact match 100, ROUGE-L 100
        {"instruction": r0.instruction, "input": r0.input, "output": ["nothing alike", a0]},
        # a partial overlap beats an unrelated first reference: the max is the 2nd one
        {"instruction": r1.instruction, "input": r1.input, "output": ["zzz qqq", half]},
        {"instruction": r2.instruction, "input": r2.input, "output": "a single reference"},
    ]
    mini_path = root / "mini.jsonl"
    mini_path.write_text("".join(json.dumps(m) + "\n" for m in mini), encoding="utf-8")
    return SimpleNamespace(
        root=root,
        gpt=root / "gpt",
        llama=root / "llama",
        mini=mini_path,
        greedy={r0.prompt: a0, r1.prompt: a1},
        tok=tok,
        gpt_model=gpt,
    )


def args_for(a, out: Path, *extra: str) -> list[str]:
    """Overrides for a run in `out`, whose `tokenizer/` (the run's own) serves the Llama."""
    if not (out / "tokenizer").exists():
        a.tok.save_pretrained(str(out / "tokenizer"))
    return [
        *BASE,
        f"run.output_dir={out}",
        f"eval.models=[gpt={a.gpt},llama={a.llama}]",
        f"eval.sets=[heldout,mini={a.mini}]",
        *extra,
    ]


def run_job(a, out: Path, *extra: str) -> pd.DataFrame:
    cfg = load_config(DEMO, args_for(a, out, *extra))
    evaluate.main(cfg)
    return evaluation.read_generations(out)


@pytest.fixture(scope="module")
def sampled(ray_local, assets):
    """Sampling (the paper's decoding at 8 new tokens), 2 seeds, 2 models, 2 sets, 1 actor."""
    out = assets.root / "sampled"
    extra = ["eval.decoding=sample", f"eval.seeds={SEEDS}", "eval.batch_size=4"]
    g = run_job(assets, out, *extra, "eval.num_actors=1")
    return SimpleNamespace(out=out, g=g, extra=extra)


def _key(g: pd.DataFrame) -> pd.DataFrame:
    return g.sort_values(["model", "set", "sample_id", "seed"]).reset_index(drop=True)


# ---------------------------------------------------------------- sampled runs


@pytest.mark.timeout(180)
def test_every_answer_is_there_once_and_scored_with_rouge_score(sampled, assets):
    g = sampled.g
    n_heldout = 5  # 120 built-in records, 10 % held out, eval.max_examples=5
    assert len(g) == 2 * (n_heldout + 3) * len(SEEDS)  # models x examples x seeds
    assert not g.duplicated(["model", "set", "sample_id", "seed"]).any()
    assert set(g["model"]) == {"gpt", "llama"} and set(g["set"]) == {"heldout", "mini"}
    assert sorted(set(g["seed"])) == SEEDS
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for row in g.itertuples(index=False):
        expected = max(
            scorer.score(ref, row.prediction)["rougeL"].fmeasure for ref in row.references
        )
        assert row.rougeL == pytest.approx(100 * expected, abs=1e-9)
        norm = " ".join(row.prediction.split()).lower()
        em = any(norm == " ".join(r.split()).lower() for r in row.references)
        assert row.exact_match == (100.0 if em else 0.0)
    # the MiniLLM-schema file kept its reference lists
    mini = g[(g["set"] == "mini")].drop_duplicates("sample_id").sort_values("index")
    assert [len(r) for r in mini["references"]] == [2, 2, 1]
    assert all(p.endswith("### Response:\n") for p in g["prompt"])


@pytest.mark.timeout(60)
def test_seeds_change_sampled_answers(sampled):
    g = sampled.g
    wide = g.pivot_table(
        index=["model", "set", "sample_id"], columns="seed", values="prediction", aggfunc="first"
    )
    differ = (wide[SEEDS[0]] != wide[SEEDS[1]]).mean()
    assert differ > 0.5, wide


@pytest.mark.timeout(60)
def test_results_csv_is_the_aggregate_of_generations(sampled, assets):
    res = evaluation.read_results(sampled.out)
    g = sampled.g
    assert list(res.columns) == evaluation.RESULT_COLUMNS
    assert len(res) == 2 * 2 * (len(SEEDS) + 2)  # models x sets x (seed rows + mean + sd)
    for (model, name), part in g.groupby(["model", "set"]):
        rows = res[(res["model"] == model) & (res["set"] == name)]
        per_seed = part.groupby("seed")[["rougeL", "exact_match"]].mean()
        seed_rows = rows[rows["stat"] == "seed"].set_index("seed")
        assert list(seed_rows.index) == SEEDS
        assert (seed_rows["n_examples"] == part["sample_id"].nunique()).all()
        for metric in ("rougeL", "exact_match"):
            assert seed_rows[metric].to_numpy() == pytest.approx(
                per_seed[metric].to_numpy(), abs=1e-5
            )
            mean = rows[rows["stat"] == "mean"][metric].item()
            sd = rows[rows["stat"] == "sd"][metric].item()
            assert mean == pytest.approx(per_seed[metric].mean(), abs=1e-5)
            assert sd == pytest.approx(per_seed[metric].std(ddof=1), abs=1e-5)
        assert rows[rows["stat"] != "seed"]["seed"].isna().all()
        assert (rows[rows["stat"] != "seed"]["n_seeds"] == len(SEEDS)).all()
    manifest = json.loads((sampled.out / "eval" / "manifest.json").read_text())
    assert manifest["models"]["llama"]["tokenizer"] == str(sampled.out / "tokenizer")
    assert manifest["models"]["gpt"]["tokenizer"] == str(assets.gpt)  # its own


@pytest.mark.timeout(240)
def test_same_seeds_give_the_same_answers_with_two_actors_and_other_batches(sampled, assets):
    out = assets.root / "sampled_2actors"
    extra = ["eval.decoding=sample", f"eval.seeds={SEEDS}"]
    g2 = run_job(assets, out, *extra, "eval.num_actors=2", "eval.batch_size=3")
    a, b = _key(sampled.g), _key(g2)
    pd.testing.assert_frame_equal(a, b)
    res1, res2 = evaluation.read_results(sampled.out), evaluation.read_results(out)
    pd.testing.assert_frame_equal(res1, res2)


def test_sampler_rows_do_not_depend_on_their_batch(assets):
    tok, model = assets.tok, assets.gpt_model
    recs = load_records(assets.root / "t.jsonl").records[:6]
    ex = tokenize_records(recs, tok, max_prompt_length=96, max_length=MAX_LEN).examples
    prompts = [e.input_ids[: e.prompt_length] for e in ex]
    seeds = [row_seed(10, e.sample_id) for e in ex]
    kw = dict(max_new_tokens=NEW_TOKENS, no_repeat_ngram_size=6)
    batched = sample_generate(model, tok, prompts, seeds, **kw)
    alone = [sample_generate(model, tok, [p], [s], **kw)[0] for p, s in zip(prompts, seeds)]
    reversed_ = sample_generate(model, tok, prompts[::-1], seeds[::-1], **kw)[::-1]
    assert batched == alone == reversed_
    other = sample_generate(model, tok, prompts, [row_seed(20, e.sample_id) for e in ex], **kw)
    assert other != batched


def test_row_sampler_respects_top_k_and_top_p():
    torch.manual_seed(0)
    scores = torch.randn(4, 50) * 3
    for top_k, top_p in ((3, 1.0), (0, 0.5), (5, 0.3)):
        sampler = RowSampler(range(4), temperature=1.0, top_k=top_k, top_p=top_p)
        allowed = torch.ones_like(scores, dtype=torch.bool)
        if top_k:
            allowed &= scores >= scores.topk(top_k).values[:, -1:]
        if top_p < 1:  # on the distribution left by top-k, as transformers does
            probs = scores.masked_fill(~allowed, -math.inf).softmax(-1)
            order = probs.argsort(-1, descending=True)
            before = probs.gather(-1, order).cumsum(-1) - probs.gather(-1, order)
            keep = torch.zeros_like(allowed).scatter(-1, order, before < top_p)
            allowed &= keep
        for _ in range(20):
            out = sampler(None, scores)
            chosen = out.argmax(-1)
            assert (out == 0).sum(-1).tolist() == [1, 1, 1, 1]
            assert allowed.gather(-1, chosen[:, None]).all()
    # T = 1, no top-k / top-p: the empirical distribution follows softmax
    sampler = RowSampler([7], temperature=1.0, top_k=0, top_p=1.0)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    picks = [sampler(None, logits).argmax(-1).item() for _ in range(2000)]
    assert sum(picks) / len(picks) == pytest.approx(0.75, abs=0.04)


# ---------------------------------------------------------------- greedy, CLI, reuse, errors


@pytest.mark.timeout(240)
def test_greedy_through_the_cli_matches_the_core_and_is_reused(ray_local, assets, capsys):
    out = assets.root / "greedy"
    argv = ["evaluate", str(DEMO), *args_for(assets, out, "eval.decoding=greedy")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "greedy" in printed and "heldout (n=5)" in printed and "mini (n=3)" in printed
    assert "gpt " in printed and "llama " in printed
    g = evaluation.read_generations(out)
    assert g["seed"].isna().all() and len(g) == 2 * (5 + 3)  # one pass, no seeds
    gpt = g[(g["model"] == "gpt") & (g["set"] == "mini")].sort_values("index")
    # the same answers as the core's greedy `generate` on the same prompts
    matched = [r.prediction for r in gpt.itertuples(index=False) if r.prompt in assets.greedy]
    assert matched == list(assets.greedy.values())
    first, second = gpt.iloc[0], gpt.iloc[1]
    assert first["exact_match"] == 100.0 and first["rougeL"] == pytest.approx(100.0)
    assert 0 < second["rougeL"] < 100  # the max over references: the partial overlap
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    unrelated = scorer.score("zzz qqq", second["prediction"])["rougeL"].fmeasure
    assert second["rougeL"] > 100 * unrelated
    res = evaluation.read_results(out)
    sd = res[res["stat"] == "sd"]
    assert sd["rougeL"].isna().all() and (res["n_seeds"] == 1).all()
    # a second call with only execution settings changed reuses the results
    assert cli.main([*argv, "eval.num_actors=2", "eval.batch_size=2"]) == 0
    assert "reusing the results" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_gpu_request_without_gpu_fails_fast(ray_local, assets, capsys):
    out = assets.root / "gpu"
    argv = ["evaluate", str(DEMO), *args_for(assets, out, "eval.gpus_per_actor=1")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "eval.gpus_per_actor=1 but this Ray cluster has no GPU" in err
    assert not (out / "eval").exists()


def test_missing_model_and_no_room_for_an_answer_fail_before_ray(assets, tmp_path, capsys):
    cfg = load_config(DEMO, args_for(assets, tmp_path, f"eval.models=[x={tmp_path / 'none'}]"))
    with pytest.raises(runtime.JobError, match="model 'x': cannot read a model config"):
        evaluate.main(cfg)
    # more new tokens than positions left: clamped (the generation rule)
    budget = evaluation.answer_budget(str(assets.gpt), max_new_tokens=256, max_prompt_length=96)
    assert budget == (MAX_LEN - 96, MAX_LEN)
    # prompts that may fill every position: no room at all, refused
    cfg = load_config(DEMO, args_for(assets, tmp_path, "data.max_prompt_length=128",
                                     "data.max_length=256"))  # fmt: skip
    with pytest.raises(runtime.JobError, match="no room for an answer"):
        evaluate.main(cfg)
    cfg = load_config(DEMO, [*args_for(assets, tmp_path), "eval.models=[]"])
    with pytest.raises(runtime.JobError, match="eval.models is empty"):
        evaluate.main(cfg)
    assert not (tmp_path / "eval").exists()
