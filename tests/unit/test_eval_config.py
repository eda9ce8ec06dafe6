"""The evaluation job's config fields: eval.sets, eval.models and the actor-pool settings."""

import pytest

from pocl_ray.config import HELDOUT, ConfigError, EvalConfig, load_config, named_entry


def problems_of(**fields) -> list[str]:
    return EvalConfig(**fields).problems()


def test_defaults_are_the_paper_protocol_on_the_held_out_split():
    ev = EvalConfig()
    assert ev.problems() == []
    assert (ev.decoding, ev.temperature, ev.top_p, ev.top_k) == ("sample", 1.0, 1.0, 0)
    assert (ev.no_repeat_ngram_size, ev.max_new_tokens) == (6, 256)
    assert ev.seeds == [10, 20, 30, 40, 50]
    assert ev.sets == [HELDOUT] and ev.models == []
    assert (ev.batch_size, ev.num_actors, ev.cpus_per_actor, ev.gpus_per_actor) == (16, 1, 1, 0)


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("dolly=/data/dollyeval.jsonl", ("dolly", "/data/dollyeval.jsonl")),
        ("/work/shared/data/selfinst.jsonl", ("selfinst", "/work/shared/data/selfinst.jsonl")),
        ("runs/demo/teacher", ("teacher", "runs/demo/teacher")),
        ("runs/demo/teacher/", ("teacher", "runs/demo/teacher/")),
        (" pocl = runs/demo/pocl ", ("pocl", "runs/demo/pocl")),
        ("heldout", (HELDOUT, "")),
        ("a=b=c.jsonl", ("a", "b=c.jsonl")),  # only the first '=' separates
    ],
)
def test_named_entry(entry, expected):
    assert named_entry(entry) == expected


def test_sets_and_models_from_yaml_lists_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "eval:\n  sets: [heldout, dolly=/d/dollyeval.jsonl]\n"
        "  models:\n    - teacher=runs/demo/teacher\n    - runs/demo/student_init\n"
    )
    cfg = load_config(path)
    assert cfg.eval.sets == ["heldout", "dolly=/d/dollyeval.jsonl"]
    assert [named_entry(m) for m in cfg.eval.models] == [
        ("teacher", "runs/demo/teacher"),
        ("student_init", "runs/demo/student_init"),
    ]
    # on the command line: a flow list, or comma separated; the key=value split is on the
    # first '=' only, so name=path entries survive
    cfg = load_config(None, ["eval.models=[a=x/a,b=x/b]", "eval.sets=heldout,s=/d/s.jsonl"])
    assert cfg.eval.models == ["a=x/a", "b=x/b"]
    assert cfg.eval.sets == ["heldout", "s=/d/s.jsonl"]
    cfg = load_config(None, ["eval.num_actors=2", "eval.cpus_per_actor=0.5"])
    assert (cfg.eval.num_actors, cfg.eval.cpus_per_actor) == (2, 0.5)


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"sets": []}, "eval.sets: got []; give at least one set"),
        ({"sets": ["heldout=/x.jsonl"]}, "the name 'heldout' is reserved"),
        ({"sets": ["a=/x.jsonl", "a=/y.jsonl"]}, "eval.sets[1]: name 'a' is used twice"),
        ({"sets": ["/d/x.jsonl", "/e/x.jsonl"]}, "name 'x' is used twice"),
        ({"sets": ["name="]}, "eval.sets[0]: got 'name='; expected name=path"),
        ({"sets": ["=/x.jsonl"]}, "eval.sets[0]: name '' of '=/x.jsonl'"),
        ({"sets": ["bad name=/x.jsonl"]}, "name 'bad name'"),
        ({"models": ["heldout"]}, "eval.models[0]: got 'heldout'; expected name=path"),
        ({"models": ["t=a", "t=b"]}, "eval.models[1]: name 't' is used twice"),
        ({"seeds": [10, 10]}, "eval.seeds: got [10, 10]; each seed at most once"),
        ({"seeds": [-1]}, "eval.seeds: got [-1]; seeds must be >= 0"),
        ({"batch_size": 0}, "eval.batch_size: got 0; must be >= 1"),
        ({"num_actors": 0}, "eval.num_actors: got 0; must be >= 1"),
        ({"gpus_per_actor": -1.0}, "eval.cpus_per_actor / gpus_per_actor: must be >= 0"),
    ],
)
def test_problems_name_the_field_and_the_fix(fields, expected):
    problems = problems_of(**fields)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["eval.sets=[a=/x,a=/y]", "eval.models=[m=]", "eval.num_actors=0"])
    assert len(exc.value.problems) == 3


def test_dtype_is_a_choice():
    with pytest.raises(ConfigError, match="eval.dtype: got 'fp8'"):
        load_config(None, ["eval.dtype=fp8"])
    assert load_config(None, ["eval.dtype=bfloat16"]).eval.dtype == "bfloat16"
