"""Tests for pocl_ray.config: loading, type coercion, overrides, validation, round trips."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from pocl_ray.config import (
    KD_KINDS,
    SIGNALS,
    Config,
    ConfigError,
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScalingConfig,
    ScoringConfig,
    SFTConfig,
    TokenizerConfig,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_config,
    save_resolved,
    to_dict,
)

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"

SECTIONS = [
    "curriculum",
    "data",
    "eval",
    "loss",
    "optim",
    "run",
    "scaling",
    "scoring",
    "sft",
    "student",
    "teacher",
    "tokenizer",
]


def problems_of(data: dict) -> list[str]:
    """The problems `from_dict` reports for `data` (fails the test if it accepts it)."""
    with pytest.raises(ConfigError) as exc:
        from_dict(data)
    return exc.value.problems


def override_problems(overrides: list[str], path=None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    return exc.value.problems


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------- defaults and the demo file


def test_defaults_are_valid():
    cfg = Config()
    assert cfg.problems() == []
    assert from_dict({}) == cfg
    assert load_config(None) == cfg
    assert load_config(None, []) == cfg


def test_every_section_default_is_valid():
    for cls in (
        DataConfig,
        TokenizerConfig,
        SFTConfig,
        ScoringConfig,
        CurriculumConfig,
        LossConfig,
        OptimConfig,
        ScalingConfig,
        EvalConfig,
        RunConfig,
    ):
        assert cls().problems() == [], cls.__name__
    assert ModelConfig().problems("student") == []


def test_sections_are_keyword_only():
    with pytest.raises(TypeError):
        SFTConfig(3)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Config(DataConfig())  # type: ignore[misc]


def test_default_teacher_is_larger_than_student():
    cfg = Config()
    assert (cfg.teacher.hidden_size, cfg.teacher.num_layers) == (256, 4)
    assert (cfg.student.hidden_size, cfg.student.num_layers) == (128, 2)


def test_demo_yaml_loads():
    # every value in the file arrives in the config, typed (floats such as 2.0e-3 included)
    raw = yaml.safe_load(DEMO.read_text())
    cfg = load_config(DEMO)
    for section, values in raw.items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == pytest.approx(value) if isinstance(value, float) else got == value
    assert cfg.scoring.signals == ["nll", "teacher_nll"]  # the best pair (docs/scoring.md)
    assert isinstance(cfg.sft.lr, float)
    assert cfg.eval.decoding == "greedy" and cfg.eval.seeds == [10]
    assert cfg.loss.scale_by_tau_sq is True
    assert cfg.run.name == "demo"
    # keys the file leaves out keep their defaults
    assert cfg.loss.alpha == LossConfig().alpha
    assert cfg.scaling == ScalingConfig()


# ---------------------------------------------------------------- round trips


def _nondefault_config() -> Config:
    return load_config(
        DEMO,
        [
            "tokenizer.name_or_path=some/tokenizer",
            "data.limit=100",
            "data.format=jsonl",
            "student.intermediate_size=96",
            "student.dtype=bfloat16",
            "curriculum.fractions=[0.25,0.5,0.75,1.0]",
            "curriculum.taus=[1,1.25,1.5,2]",
            "curriculum.alphas=[0.1,0.2,0.3,0.4]",
            "curriculum.plateau_patience=3",
            "loss.kind=skl",
            "loss.chunk_size=1024",
            "optim.lr=1e-4",
            "optim.min_lr=1e-7",
            "scaling.resources_per_worker={CPU: 2, custom: 0.5}",
            "scaling.use_gpu=true",
            "eval.max_examples=50",
            "run.storage_path=/tmp/ray-storage",
        ],
    )


@pytest.mark.parametrize("which", ["default", "demo", "nondefault"])
def test_dict_round_trip(which):
    cfg = {"default": Config, "demo": lambda: load_config(DEMO), "nondefault": _nondefault_config}[
        which
    ]()
    d = to_dict(cfg)
    assert set(d) == set(SECTIONS)
    assert from_dict(d) == cfg
    # to_dict gives plain data, not dataclasses
    assert isinstance(d["curriculum"], dict) and isinstance(d["teacher"], dict)


@pytest.mark.parametrize("which", ["default", "demo", "nondefault"])
def test_yaml_round_trip(which):
    cfg = {"default": Config, "demo": lambda: load_config(DEMO), "nondefault": _nondefault_config}[
        which
    ]()
    text = dump_yaml(cfg)
    back = from_dict(yaml.safe_load(text))
    assert back == cfg
    assert isinstance(back.optim.lr, float) and isinstance(back.optim.min_lr, float)


def test_nondefault_config_values():
    cfg = _nondefault_config()
    assert cfg.curriculum.taus == [1.0, 1.25, 1.5, 2.0]
    assert all(isinstance(t, float) for t in cfg.curriculum.taus)
    assert cfg.scaling.resources_per_worker == {"CPU": 2.0, "custom": 0.5}
    assert cfg.loss.kind == "skl"
    assert cfg.optim.lr == pytest.approx(1e-4)


def test_save_resolved_writes_config_yaml(tmp_path):
    cfg = _nondefault_config()
    run_dir = tmp_path / "runs" / "nested" / "r1"
    target = save_resolved(cfg, run_dir)
    assert target == run_dir / "config.yaml"
    assert target.is_file()
    assert load_config(target) == cfg
    # writing again overwrites in place
    assert save_resolved(cfg, run_dir) == target
    assert load_config(target) == cfg


def test_save_resolved_defaults_to_run_output_dir(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(DEMO, [f"run.output_dir={out}"])
    target = save_resolved(cfg)
    assert target == out / "config.yaml"
    assert load_config(target) == cfg


# ---------------------------------------------------------------- overrides and type coercion


def test_override_int_and_nested_sections():
    cfg = load_config(DEMO, ["sft.epochs=7", "teacher.hidden_size=192", "student.num_layers=3"])
    assert cfg.sft.epochs == 7 and type(cfg.sft.epochs) is int
    assert cfg.teacher.hidden_size == 192
    assert cfg.student.num_layers == 3
    # untouched fields keep the file's values
    raw = yaml.safe_load(DEMO.read_text())
    assert cfg.teacher.num_layers == raw["teacher"]["num_layers"]
    assert cfg.student.hidden_size == raw["student"]["hidden_size"]


@pytest.mark.parametrize(
    "text, expected", [("1e-4", 1e-4), ("3.0e-3", 3e-3), ("0.5", 0.5), ("2", 2.0)]
)
def test_override_float(text, expected):
    cfg = load_config(None, [f"sft.lr={text}"])
    assert type(cfg.sft.lr) is float
    assert cfg.sft.lr == pytest.approx(expected)


def test_float_1e_minus_4_in_yaml_file(tmp_path):
    text = "optim:\n  lr: 1e-4\n  min_lr: 1e-6\nsft:\n  lr: 2e-3\n"
    # the premise: PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
    assert yaml.safe_load(text)["optim"]["lr"] == "1e-4"
    cfg = load_config(write(tmp_path, text))
    assert type(cfg.optim.lr) is float and cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.min_lr == pytest.approx(1e-6)
    assert cfg.sft.lr == pytest.approx(2e-3)


def test_int_in_yaml_file_for_float_field(tmp_path):
    cfg = load_config(write(tmp_path, "eval:\n  temperature: 2\n"))
    assert cfg.eval.temperature == 2.0 and type(cfg.eval.temperature) is float


@pytest.mark.parametrize(
    "text, expected",
    [
        ("true", True),
        ("false", False),
        ("yes", True),
        ("no", False),
        ("True", True),
        ("FALSE", False),
        ("1", True),
        ("0", False),
    ],
)
def test_override_bool(text, expected):
    cfg = load_config(None, [f"scaling.use_gpu={text}", f"loss.scale_by_tau_sq={text}"])
    assert cfg.scaling.use_gpu is expected
    assert cfg.loss.scale_by_tau_sq is expected


def test_bool_yes_no_in_yaml_file(tmp_path):
    cfg = load_config(write(tmp_path, "scaling:\n  use_gpu: yes\nloss:\n  scale_by_tau_sq: no\n"))
    assert cfg.scaling.use_gpu is True
    assert cfg.loss.scale_by_tau_sq is False


@pytest.mark.parametrize("text", ["maybe", "2", "on"])
def test_override_bad_bool(text):
    problems = override_problems([f"scaling.use_gpu={text}"])
    assert problems == [f"scaling.use_gpu: got {text!r}; expected bool"]


def test_bool_field_rejects_yaml_int_and_int_field_rejects_yaml_bool():
    problems = problems_of({"scaling": {"use_gpu": 2}, "sft": {"epochs": True}})
    assert "scaling.use_gpu: got 2; expected bool" in problems
    assert "sft.epochs: got True; expected int" in problems


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sft.epochs=abc", "sft.epochs: got 'abc'; expected int"),
        ("sft.epochs=2.5", "sft.epochs: got '2.5'; expected int"),
        ("sft.lr=fast", "sft.lr: got 'fast'; expected float"),
    ],
)
def test_override_bad_scalar(override, expected):
    assert override_problems([override]) == [expected]


@pytest.mark.parametrize("text", ["null", "None", "NULL", "none"])
def test_override_null_for_optional_fields(text):
    base = load_config(None, ["data.limit=5", "tokenizer.name_or_path=tok", "eval.max_examples=9"])
    assert base.data.limit == 5 and base.tokenizer.name_or_path == "tok"
    data = apply_overrides(
        to_dict(base),
        [
            f"data.limit={text}",
            f"tokenizer.name_or_path={text}",
            f"eval.max_examples={text}",
            f"curriculum.taus={text}",
            f"run.storage_path={text}",
        ],
    )
    cfg = from_dict(data)
    assert cfg.data.limit is None
    assert cfg.tokenizer.name_or_path is None
    assert cfg.eval.max_examples is None
    assert cfg.curriculum.taus is None
    assert cfg.run.storage_path is None


def test_yaml_null_for_optional_field(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  limit: null\nloss:\n  chunk_size: ~\n"))
    assert cfg.data.limit is None and cfg.loss.chunk_size is None


def test_override_optional_int_value():
    cfg = load_config(None, ["data.limit=40", "loss.chunk_size=128"])
    assert cfg.data.limit == 40 and type(cfg.data.limit) is int
    assert cfg.loss.chunk_size == 128


def test_null_for_required_str_field_is_rejected():
    assert problems_of({"run": {"name": None}}) == ["run.name: got None; expected str"]


def test_override_comma_list():
    cfg = load_config(None, ["scoring.signals=rouge,nll", "eval.seeds=1,2,3"])
    assert cfg.scoring.signals == ["rouge", "nll"]
    assert cfg.eval.seeds == [1, 2, 3] and all(type(s) is int for s in cfg.eval.seeds)


def test_override_single_item_list():
    cfg = load_config(None, ["scoring.signals=kd_gap"])
    assert cfg.scoring.signals == ["kd_gap"]


def test_override_flow_list():
    cfg = load_config(None, ["curriculum.num_stages=3", "curriculum.taus=[1,1.5,2]"])
    assert cfg.curriculum.taus == [1.0, 1.5, 2.0]
    assert all(type(t) is float for t in cfg.curriculum.taus)
    cfg = load_config(None, ["scoring.signals=[teacher_nll, kd_gap]"])
    assert cfg.scoring.signals == ["teacher_nll", "kd_gap"]


def test_override_list_with_1e_minus_4_items():
    cfg = load_config(
        None, ["loss.kind=srkl", "curriculum.num_stages=2", "curriculum.alphas=[1e-4,0.5]"]
    )
    assert cfg.curriculum.alphas == pytest.approx([1e-4, 0.5])


def test_comma_list_float_fractions():
    cfg = load_config(None, ["curriculum.num_stages=2", "curriculum.fractions=0.5,1"])
    assert cfg.curriculum.fractions == [0.5, 1.0]


def test_override_bad_list_item_names_index():
    problems = override_problems(["curriculum.num_stages=3", "curriculum.taus=[1,x,2]"])
    assert problems == ["curriculum.taus[1]: got 'x'; expected float"]


def test_yaml_list_of_wrong_items():
    problems = problems_of({"eval": {"seeds": [1, "two"]}})
    assert problems == ["eval.seeds[1]: got 'two'; expected int"]


def test_override_dict():
    cfg = load_config(None, ["scaling.resources_per_worker={CPU: 1}"])
    assert cfg.scaling.resources_per_worker == {"CPU": 1.0}
    assert type(cfg.scaling.resources_per_worker["CPU"]) is float


def test_yaml_dict_field(tmp_path):
    cfg = load_config(
        write(tmp_path, "scaling:\n  resources_per_worker:\n    CPU: 2\n    GPU: 0.5\n")
    )
    assert cfg.scaling.resources_per_worker == {"CPU": 2.0, "GPU": 0.5}


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "scaling.resources_per_worker={CPU: lots}",
            "scaling.resources_per_worker.CPU: got 'lots'; expected float",
        ),
        (
            "scaling.resources_per_worker=CPU",
            "scaling.resources_per_worker: got 'CPU'; expected a mapping",
        ),
    ],
)
def test_override_bad_dict(override, expected):
    assert override_problems([override]) == [expected]


@pytest.mark.parametrize("kind", KD_KINDS)
def test_override_literal_accepts_each_kind(kind):
    assert load_config(None, [f"loss.kind={kind}"]).loss.kind == kind


@pytest.mark.parametrize(
    "override, expected",
    [
        ("loss.kind=kl", "loss.kind: got 'kl'; allowed 'fkl', 'rkl', 'jsd', 'tvd', 'skl', 'srkl'"),
        ("curriculum.mode=easy", "curriculum.mode: got 'easy'; allowed 'pocl', 'random', 'anti'"),
        ("eval.decoding=beam", "eval.decoding: got 'beam'; allowed 'sample', 'greedy'"),
        ("student.arch=bert", "student.arch: got 'bert'; allowed 'gpt2', 'llama'"),
        ("data.format=csv", "data.format: got 'csv'; allowed 'auto'"),
        ("teacher.dtype=fp8", "teacher.dtype: got 'fp8'; allowed 'float32'"),
    ],
)
def test_override_bad_literal(override, expected):
    problems = override_problems([override])
    assert len(problems) == 1
    assert problems[0].startswith(expected)


def test_override_literal_values():
    cfg = load_config(
        None,
        [
            "curriculum.mode=anti",
            "curriculum.interval_unit=steps",
            "curriculum.lr_policy=continuous",
            "eval.decoding=greedy",
            "student.arch=llama",
            "data.on_bad_record=skip",
        ],
    )
    assert cfg.curriculum.mode == "anti"
    assert cfg.curriculum.interval_unit == "steps"
    assert cfg.curriculum.lr_policy == "continuous"
    assert cfg.eval.decoding == "greedy"
    assert cfg.student.arch == "llama"
    assert cfg.data.on_bad_record == "skip"


def test_override_str_field_keeps_text_and_equals_sign():
    cfg = load_config(None, ["run.name=a=b", "data.source=/data/x.jsonl"])
    assert cfg.run.name == "a=b"
    assert cfg.data.source == "/data/x.jsonl"


def test_str_field_accepts_yaml_number():
    cfg = from_dict({"run": {"name": 123}})
    assert cfg.run.name == "123"


def test_later_override_wins_and_beats_file():
    cfg = load_config(DEMO, ["sft.epochs=3", "sft.epochs=4"])
    assert cfg.sft.epochs == 4
    assert load_config(DEMO).sft.epochs == yaml.safe_load(DEMO.read_text())["sft"]["epochs"]


def test_override_creates_missing_section():
    # no file: the section does not exist yet in the data
    cfg = load_config(None, ["optim.warmup_steps=10"])
    assert cfg.optim.warmup_steps == 10
    assert cfg.optim.lr == OptimConfig().lr


def test_apply_overrides_does_not_mutate_input():
    data = {"sft": {"epochs": 3}, "run": {"seed": 1}}
    out = apply_overrides(data, ["sft.epochs=9", "optim.lr=1e-3"])
    assert data == {"sft": {"epochs": 3}, "run": {"seed": 1}}
    assert out == {"sft": {"epochs": "9"}, "run": {"seed": 1}, "optim": {"lr": "1e-3"}}


@pytest.mark.parametrize("item", ["sft.epochs", "nothing", ""])
def test_override_without_equals(item):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [item])
    assert exc.value.problems == [f"override {item!r}: expected dotted.key=value"]
    assert "command line" in str(exc.value)


def test_override_into_non_section_from_file():
    with pytest.raises(ConfigError) as exc:
        load_config(DEMO, ["run.seed.x=1"])
    assert exc.value.problems == ["override 'run.seed.x=1': seed is not a section"]


def test_override_into_non_section_with_defaults():
    # run.seed is not in the data yet, so the override builds a mapping that then fails
    # type validation as an int field
    problems = override_problems(["run.seed.x=1"])
    assert len(problems) == 1
    assert problems[0].startswith("run.seed: got {'x': '1'}; expected int")


def test_override_section_to_scalar():
    problems = override_problems(["sft=3"])
    assert problems == ["sft: got '3'; expected a mapping of keys"]


def test_override_into_empty_yaml_section(tmp_path):
    path = write(tmp_path, "run:\nsft:\n  epochs: 3\n")
    assert load_config(path).run == RunConfig()  # an empty section is fine on its own
    cfg = load_config(path, ["run.seed=5"])
    assert cfg.run.seed == 5


def test_partial_teacher_section_keeps_teacher_defaults():
    cfg = load_config(None, ["teacher.dtype=float16"])
    assert cfg.teacher.dtype == "float16"
    assert cfg.teacher.hidden_size == Config().teacher.hidden_size == 256
    assert cfg.teacher.num_layers == Config().teacher.num_layers == 4


@pytest.mark.parametrize(
    "override", ["curriculum.taus=[1,2", "scaling.resources_per_worker={CPU: 1"]
)
def test_malformed_flow_value_is_config_error(override):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert override.split("=")[0] in str(exc.value)


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key():
    problems = problems_of({"trainer": {"x": 1}})
    assert problems == [f"trainer: unknown key; allowed keys: {', '.join(SECTIONS)}"]


def test_unknown_key_in_section():
    problems = problems_of({"optim": {"learning_rate": 1e-3}})
    assert problems == [
        "optim.learning_rate: unknown key; allowed keys: "
        "autocast, batch_size, grad_clip, gradient_checkpointing, lr, min_lr, warmup_steps, "
        "weight_decay"
    ]


def test_unknown_key_via_override():
    problems = override_problems(["sft.epoch=3"])
    assert problems == [
        "sft.epoch: unknown key; did you mean 'epochs'? "
        "allowed keys: batch_size, epochs, lr, student_epochs"
    ]


def test_unknown_key_in_model_section_uses_section_name():
    problems = problems_of({"teacher": {"n_layers": 3}})
    assert len(problems) == 1 and problems[0].startswith("teacher.n_layers: unknown key;")
    assert "num_layers" in problems[0] and "hidden_size" in problems[0]


def test_unknown_key_does_not_drop_known_keys():
    with pytest.raises(ConfigError) as exc:
        from_dict({"sft": {"epochs": 0, "epochz": 5}})
    assert (
        "sft.epochz: unknown key; did you mean 'epochs'? "
        "allowed keys: batch_size, epochs, lr, student_epochs" in exc.value.problems
    )
    assert "sft.epochs: got 0; must be >= 1" in exc.value.problems


# ---------------------------------------------------------------- every validation rule

# (id, data, substrings the problem must contain, exact number of problems)
RULES = [
    # data
    ("data.limit", {"data": {"limit": 0}}, ["data.limit: got 0"], 1),
    ("data.builtin_size", {"data": {"builtin_size": 9}}, ["data.builtin_size: got 9"], 1),
    ("data.eval_fraction=1", {"data": {"eval_fraction": 1.0}}, ["data.eval_fraction: got 1.0"], 1),
    (
        "data.eval_fraction<0",
        {"data": {"eval_fraction": -0.1}},
        ["data.eval_fraction: got -0.1"],
        1,
    ),
    (
        "data.max_prompt_length",
        {"data": {"max_prompt_length": 15}},
        ["data.max_prompt_length: got 15"],
        1,
    ),
    (
        "data.max_length",
        {"data": {"max_prompt_length": 256, "max_length": 256}},
        ["data.max_length: got 256", "data.max_prompt_length (256)"],
        1,
    ),
    # tokenizer
    ("tokenizer.vocab<64", {"tokenizer": {"vocab_size": 63}}, ["tokenizer.vocab_size: got 63"], 1),
    (
        "tokenizer.vocab>65536",
        {"tokenizer": {"vocab_size": 65537}},
        ["tokenizer.vocab_size: got 65537"],
        1,
    ),
    # teacher / student (ModelConfig with the section's prefix)
    ("student.hidden_size", {"student": {"hidden_size": 0}}, ["student.hidden_size: got 0"], 1),
    ("teacher.num_layers", {"teacher": {"num_layers": 0}}, ["teacher.num_layers: got 0"], 1),
    # num_heads 0: the divisibility rule is skipped, only one problem
    ("student.num_heads", {"student": {"num_heads": 0}}, ["student.num_heads: got 0"], 1),
    (
        "teacher.divisible",
        {"teacher": {"hidden_size": 130, "num_heads": 4}},
        ["teacher.hidden_size: got 130", "teacher.num_heads (4)"],
        1,
    ),
    (
        "student.intermediate_size",
        {"student": {"intermediate_size": 0}},
        ["student.intermediate_size: got 0"],
        1,
    ),
    # sft
    ("sft.epochs", {"sft": {"epochs": 0}}, ["sft.epochs: got 0"], 1),
    ("sft.lr", {"sft": {"lr": 0.0}}, ["sft.lr: got 0.0"], 1),
    ("sft.batch_size", {"sft": {"batch_size": 0}}, ["sft.batch_size: got 0"], 1),
    # scoring
    ("scoring.signals=[]", {"scoring": {"signals": []}}, ["scoring.signals: got []"], 1),
    (
        "scoring.signals unknown",
        {"scoring": {"signals": ["rouge", "bleu"]}},
        ["scoring.signals: unknown signal 'bleu'"],
        1,
    ),
    (
        "scoring.signals dup",
        {"scoring": {"signals": ["nll", "nll"]}},
        ["scoring.signals: got ['nll', 'nll']", "at most once"],
        1,
    ),
    ("scoring.fusion_k", {"scoring": {"fusion_k": 0}}, ["scoring.fusion_k: got 0"], 1),
    (
        "scoring.max_new_tokens",
        {"scoring": {"max_new_tokens": 0}},
        ["scoring.max_new_tokens: got 0"],
        1,
    ),
    ("scoring.batch_size", {"scoring": {"batch_size": -1}}, ["scoring.batch_size: got -1"], 1),
    ("scoring.num_actors", {"scoring": {"num_actors": 0}}, ["scoring.num_actors: got 0"], 1),
    ("scoring.cpus_per_actor", {"scoring": {"cpus_per_actor": -1}}, ["cpus_per_actor"], 1),
    ("scoring.gpus_per_actor", {"scoring": {"gpus_per_actor": -0.5}}, ["gpus_per_actor"], 1),
    (
        "scoring.teacher_topk",
        {"scoring": {"teacher_topk": -1}},
        ["scoring.teacher_topk: got -1"],
        1,
    ),
    (
        "scoring.cache_taus",
        {"scoring": {"cache_taus": [1.0, 0.5, 2.0]}},
        ["scoring.cache_taus: got [1.0, 0.5, 2.0]", "increasing"],
        1,
    ),
    ("scoring.cache_taus zero", {"scoring": {"cache_taus": [0.0, 1.0]}}, ["cache_taus"], 1),
    # curriculum
    (
        "curriculum.num_stages",
        {"curriculum": {"num_stages": 0}},
        ["curriculum.num_stages: got 0"],
        1,
    ),
    ("curriculum.interval", {"curriculum": {"interval": 0}}, ["curriculum.interval: got 0"], 1),
    (
        "curriculum.fractions len",
        {"curriculum": {"fractions": [0.5, 1.0]}},
        ["curriculum.fractions: got 2 values", "num_stages (4)"],
        1,
    ),
    (
        "curriculum.fractions not increasing",
        {"curriculum": {"fractions": [0.25, 0.25, 0.75, 1.0]}},
        ["curriculum.fractions: got [0.25, 0.25, 0.75, 1.0]", "increasing"],
        1,
    ),
    (
        "curriculum.fractions zero",
        {"curriculum": {"fractions": [0.0, 0.5, 0.75, 1.0]}},
        ["curriculum.fractions: got [0.0, 0.5, 0.75, 1.0]", "(0, 1]"],
        1,
    ),
    (
        "curriculum.fractions last",
        {"curriculum": {"fractions": [0.1, 0.2, 0.3, 0.9]}},
        ["curriculum.fractions: last value is 0.9"],
        1,
    ),
    (
        "curriculum.taus len",
        {"curriculum": {"taus": [1.0, 2.0]}},
        ["curriculum.taus: got 2 values; need 4"],
        1,
    ),
    (
        "curriculum.taus nonpositive",
        {"curriculum": {"taus": [1.0, 0.0, 1.5, 2.0]}},
        ["curriculum.taus: got [1.0, 0.0, 1.5, 2.0]", "> 0"],
        1,
    ),
    (
        "curriculum.tau_min zero",
        {"curriculum": {"tau_min": 0.0}},
        ["curriculum.tau_min/tau_max: got 0.0/2.0"],
        1,
    ),
    (
        "curriculum.tau_min>tau_max",
        {"curriculum": {"tau_min": 3.0, "tau_max": 2.0}},
        ["curriculum.tau_min/tau_max: got 3.0/2.0"],
        1,
    ),
    (
        "curriculum.kd_ratio_start",
        {"curriculum": {"kd_ratio_start": 1.5}},
        ["curriculum.kd_ratio_start: got 1.5"],
        1,
    ),
    (
        "curriculum.kd_ratio_end",
        {"curriculum": {"kd_ratio_end": -0.1}},
        ["curriculum.kd_ratio_end: got -0.1"],
        1,
    ),
    (
        "curriculum.alphas len",
        {"loss": {"kind": "skl"}, "curriculum": {"alphas": [0.1]}},
        ["curriculum.alphas: got 1 values; need 4"],
        1,
    ),
    (
        "curriculum.alphas range",
        {"loss": {"kind": "srkl"}, "curriculum": {"alphas": [0.1, 0.2, 0.3, 1.5]}},
        ["curriculum.alphas: got [0.1, 0.2, 0.3, 1.5]", "0..1"],
        1,
    ),
    (
        "curriculum.plateau_patience",
        {"curriculum": {"plateau_patience": 0}},
        ["curriculum.plateau_patience: got 0"],
        1,
    ),
    (
        "curriculum.eval_every",
        {"curriculum": {"eval_every": -1}},
        ["curriculum.eval_every: got -1"],
        1,
    ),
    # loss
    ("loss.alpha", {"loss": {"alpha": 1.5}}, ["loss.alpha: got 1.5"], 1),
    ("loss.beta", {"loss": {"beta": -0.1}}, ["loss.beta: got -0.1"], 1),
    (
        "loss.on_policy_ratio",
        {"loss": {"on_policy_ratio": 2}},
        ["loss.on_policy_ratio: got 2.0"],
        1,
    ),
    ("loss.chunk_size", {"loss": {"chunk_size": 0}}, ["loss.chunk_size: got 0"], 1),
    # optim
    ("optim.lr", {"optim": {"lr": 0.0, "min_lr": 0.0}}, ["optim.lr: got 0.0"], 1),
    (
        "optim.min_lr>lr",
        {"optim": {"lr": 1e-4, "min_lr": 1e-3}},
        ["optim.min_lr: got 0.001", "optim.lr (0.0001)"],
        1,
    ),
    ("optim.min_lr<0", {"optim": {"min_lr": -1e-7}}, ["optim.min_lr: got -1e-07"], 1),
    ("optim.weight_decay", {"optim": {"weight_decay": -0.1}}, ["optim.weight_decay: got -0.1"], 1),
    ("optim.batch_size", {"optim": {"batch_size": 0}}, ["optim.batch_size: got 0"], 1),
    ("optim.grad_clip", {"optim": {"grad_clip": 0}}, ["optim.grad_clip: got 0.0"], 1),
    ("optim.warmup_steps", {"optim": {"warmup_steps": -1}}, ["optim.warmup_steps: got -1"], 1),
    # scaling
    ("scaling.num_workers", {"scaling": {"num_workers": -1}}, ["scaling.num_workers: got -1"], 1),
    (
        "scaling.resources_per_worker",
        {"scaling": {"resources_per_worker": {"CPU": 1, "GPU": -1}}},
        ["scaling.resources_per_worker.GPU: got -1.0"],
        1,
    ),
    # eval
    ("eval.seeds", {"eval": {"seeds": []}}, ["eval.seeds: got []"], 1),
    ("eval.temperature", {"eval": {"temperature": 0}}, ["eval.temperature: got 0.0"], 1),
    ("eval.top_p=0", {"eval": {"top_p": 0}}, ["eval.top_p: got 0.0"], 1),
    ("eval.top_p>1", {"eval": {"top_p": 1.5}}, ["eval.top_p: got 1.5"], 1),
    ("eval.top_k", {"eval": {"top_k": -1}}, ["eval.top_k"], 1),
    ("eval.no_repeat_ngram_size", {"eval": {"no_repeat_ngram_size": -1}}, ["no_repeat_ngram"], 1),
    ("eval.max_new_tokens", {"eval": {"max_new_tokens": 0}}, ["eval.max_new_tokens: got 0"], 1),
    ("eval.max_examples", {"eval": {"max_examples": 0}}, ["eval.max_examples: got 0"], 1),
    # run
    ("run.output_dir", {"run": {"output_dir": ""}}, ["run.output_dir: empty"], 1),
    ("run.name empty", {"run": {"name": ""}}, ["run.name: got ''"], 1),
    ("run.name slash", {"run": {"name": "a/b"}}, ["run.name: got 'a/b'"], 1),
    ("run.checkpoint_every", {"run": {"checkpoint_every": -1}}, ["run.checkpoint_every"], 1),
    ("run.log_every", {"run": {"log_every": 0}}, ["run.log_every"], 1),
    # cross-section rules in Config.problems
    (
        "mode none needs stages",
        {"curriculum": {"mode": "none", "num_stages": 0}},
        ["curriculum.mode none", "num_stages >= 1"],
        2,  # plus curriculum.num_stages itself
    ),
    (
        "alphas need skl",
        {"loss": {"kind": "fkl"}, "curriculum": {"alphas": [0.1, 0.1, 0.1, 0.1]}},
        ["curriculum.alphas: set, but loss.kind is 'fkl'"],
        1,
    ),
    (
        "kd_gap needs a scorer other than the teacher",
        {"scoring": {"scorer": "teacher", "signals": ["nll", "kd_gap"]}},
        ["scoring.signals: kd_gap with scoring.scorer 'teacher'", "always 0"],
        1,
    ),
    ("student.dropout", {"student": {"dropout": 1.0}}, ["student.dropout: got 1.0"], 1),
    ("teacher.dropout", {"teacher": {"dropout": -0.1}}, ["teacher.dropout: got -0.1"], 1),
]


@pytest.mark.parametrize("data, parts, count", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_validation_rule(data, parts, count):
    problems = problems_of(data)
    matching = [p for p in problems if all(part in p for part in parts)]
    assert len(matching) == 1, problems
    assert len(problems) == count, problems


# values at the edge of each range that must still pass
VALID_EDGES = [
    {"data": {"eval_fraction": 0.0, "limit": 1, "builtin_size": 10}},
    {"data": {"max_prompt_length": 16, "max_length": 17}},
    {"tokenizer": {"vocab_size": 64}},
    {"tokenizer": {"vocab_size": 65536}},
    {"tokenizer": {"name_or_path": "some/tok", "vocab_size": 1}},  # size only checked when training
    {"student": {"hidden_size": 12, "num_heads": 3, "num_layers": 1, "intermediate_size": 1}},
    {"scoring": {"signals": list(SIGNALS), "cpus_per_actor": 0, "gpus_per_actor": 0}},
    {"scoring": {"fusion_k": 1, "teacher_topk": 0, "num_actors": 1}},
    {"curriculum": {"num_stages": 1, "fractions": [1.0], "taus": [0.5], "interval": 1}},
    {"curriculum": {"fractions": [0.25, 0.5, 0.75, 1.0], "tau_min": 1.5, "tau_max": 1.5}},
    {"curriculum": {"kd_ratio_start": 0.0, "kd_ratio_end": 1.0, "plateau_patience": 1}},
    {"loss": {"kind": "skl"}, "curriculum": {"alphas": [0.0, 0.5, 0.5, 1.0]}},
    {"loss": {"alpha": 0.0, "beta": 1.0, "on_policy_ratio": 1.0, "chunk_size": 1}},
    {"optim": {"lr": 1e-4, "min_lr": 1e-4, "weight_decay": 0, "warmup_steps": 0}},
    {"optim": {"min_lr": 0.0}},
    {"scaling": {"num_workers": 0, "resources_per_worker": {"CPU": 0}}},
    {"eval": {"top_p": 1.0, "top_k": 0, "no_repeat_ngram_size": 0, "max_examples": 1}},
    {"run": {"checkpoint_every": 0, "log_every": 1, "name": "x"}},
    {"curriculum": {"mode": "none", "num_stages": 1}},
    {"scoring": {"scorer": "teacher", "signals": ["nll", "rouge", "teacher_nll"]}},
    {"student": {"dropout": 0.0}, "teacher": {"dropout": 0.99}},
]


@pytest.mark.parametrize("data", VALID_EDGES, ids=[str(i) for i in range(len(VALID_EDGES))])
def test_validation_edge_values_pass(data):
    cfg = from_dict(data)
    for section, values in data.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize("override", ["sft.lr=nan", "optim.grad_clip=nan", "eval.temperature=nan"])
def test_nan_is_rejected(override):
    problems = override_problems([override])
    assert any(override.split("=")[0] in p for p in problems)


def test_nan_rejected_where_range_is_two_sided():
    # NaN is refused at type coercion, before any range check
    problems = override_problems(["loss.alpha=nan"])
    assert problems == ["loss.alpha: got 'nan'; expected a finite number"]


# ---------------------------------------------------------------- all problems at once


def test_all_problems_listed_at_once():
    data = {
        "sft": {"epochs": "many"},  # type error
        "optim": {"learning_rate": 1e-3},  # unknown key
        "data": {"eval_fraction": 2.0},  # range error
        "curriculum": {"alphas": [0.1, 0.1, 0.1, 0.1]},  # cross-field (loss.kind is fkl)
    }
    with pytest.raises(ConfigError) as exc:
        from_dict(data, source="my.yaml")
    problems = exc.value.problems
    assert len(problems) == 4, problems
    assert any(p.startswith("sft.epochs: got 'many'; expected int") for p in problems)
    assert any(p.startswith("optim.learning_rate: unknown key") for p in problems)
    assert any(p.startswith("data.eval_fraction: got 2.0") for p in problems)
    assert any(p.startswith("curriculum.alphas: set, but loss.kind is 'fkl'") for p in problems)
    text = str(exc.value)
    assert text.startswith("4 problem(s) in my.yaml:")
    for p in problems:
        assert f"  - {p}" in text


def test_type_error_keeps_default_and_other_checks_still_run():
    with pytest.raises(ConfigError) as exc:
        from_dict({"sft": {"epochs": "x", "lr": -1.0}, "optim": {"batch_size": "big"}})
    # sections are built in set order, so compare without order
    assert sorted(exc.value.problems) == [
        "optim.batch_size: got 'big'; expected int",
        "sft.epochs: got 'x'; expected int",
        "sft.lr: got -1.0; must be > 0",
    ]


def test_type_error_in_file_and_range_error_in_override(tmp_path):
    path = write(tmp_path, "eval:\n  temperature: hot\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["eval.top_p=2", "run.log_every=0"])
    problems = exc.value.problems
    assert "eval.temperature: got 'hot'; expected float" in problems
    assert "eval.top_p: got 2.0; allowed (0, 1]" in problems
    assert any("run.log_every" in p for p in problems)
    assert len(problems) == 3
    assert f"{path} + overrides" in str(exc.value)


def test_bad_literal_does_not_hide_other_problems():
    problems = problems_of({"loss": {"kind": "kl", "beta": 5}})
    assert len(problems) == 2
    assert problems[0].startswith("loss.kind: got 'kl'")
    assert problems[1] == "loss.beta: got 5.0; allowed 0..1"


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"eval": {"seeds": 5}}, "eval.seeds: got 5; expected a list"),
        ({"scoring": {"signals": 7}}, "scoring.signals: got 7; expected a list"),
    ],
)
def test_wrong_type_for_list_field_reports_one_problem(data, problem):
    assert problems_of(data) == [problem]


# ---------------------------------------------------------------- files


def test_bad_yaml_file(tmp_path):
    path = write(tmp_path, "sft:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith(f"{path} is not valid YAML")
    assert str(path) in str(exc.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert len(exc.value.problems) == 1
    assert exc.value.problems[0].startswith(f"cannot read {path}")
    assert "check the path" in exc.value.problems[0]


def test_top_level_list(tmp_path):
    path = write(tmp_path, "- data\n- sft\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.problems == [f"{path}: top level must be a mapping of sections"]


def test_top_level_scalar(tmp_path):
    path = write(tmp_path, "hello\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.problems == [f"{path}: top level must be a mapping of sections"]


def test_empty_file_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing here\n")) == Config()


def test_from_dict_top_level_not_mapping():
    problems = problems_of([1, 2])  # type: ignore[arg-type]
    assert problems == ["config: got [1, 2]; expected a mapping of keys"]


def test_section_not_mapping_in_file(tmp_path):
    path = write(tmp_path, "optim: 0.001\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.problems == ["optim: got 0.001; expected a mapping of keys"]


def test_config_error_is_value_error():
    err = ConfigError(["a: bad", "b: worse"], "x.yaml")
    assert isinstance(err, ValueError)
    assert err.problems == ["a: bad", "b: worse"]
    assert str(err) == "2 problem(s) in x.yaml:\n  - a: bad\n  - b: worse"


def test_dataclass_fields_match_sections():
    assert sorted(f.name for f in dataclasses.fields(Config)) == SECTIONS


def test_scoring_dtype_is_optional_and_checked():
    assert load_config(None, []).scoring.dtype is None  # the models' own dtype
    assert load_config(None, ["scoring.dtype=bfloat16"]).scoring.dtype == "bfloat16"
    (problem,) = override_problems(["scoring.dtype=int8"])
    assert problem.startswith("scoring.dtype: got 'int8'") and "'bfloat16'" in problem


def test_pipeline_runs_are_checked():
    assert load_config(None, []).run.pipeline_runs == ["pocl", "kd", "sft"]
    assert load_config(None, ["run.pipeline_runs=[pocl]"]).run.pipeline_runs == ["pocl"]
    for bad in ("[pocl,pocl]", "[]", "[pocl,dpo]"):
        (problem,) = override_problems([f"run.pipeline_runs={bad}"])
        assert problem.startswith("run.pipeline_runs: got") and "each once" in problem


def test_optim_autocast_is_checked():
    assert load_config(None, []).optim.autocast is None
    assert load_config(None, ["optim.autocast=bfloat16"]).optim.autocast == "bfloat16"
    (problem,) = override_problems(["optim.autocast=fp8"])
    assert problem.startswith("optim.autocast: got 'fp8'")


def test_locations_are_absolute_for_local_folders(tmp_path, monkeypatch):
    """Ray Train workers change directory: the model and tokenizer locations handed to them
    are absolute for a folder that exists here, and hub names stay names."""
    from pocl_ray.run_dir import Locations, RunDir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "teacher").mkdir(parents=True)
    cfg = load_config(None, ["run.output_dir=runs/x", "teacher.name_or_path=models/teacher",
                             "student.name_or_path=HuggingFaceTB/SmolLM2-135M"])  # fmt: skip
    where = Locations.of(cfg, RunDir.of(cfg))
    folder = str(tmp_path / "models" / "teacher")
    assert where.teacher == where.tokenizer == folder  # the teacher's tokenizer
    assert where.student_init == "HuggingFaceTB/SmolLM2-135M"


def test_pipeline_seeds_are_checked():
    assert load_config(None, []).run.pipeline_seeds == 1
    (problem,) = override_problems(["run.pipeline_seeds=0"])
    assert problem.startswith("run.pipeline_seeds: got 0; use 1 or more")


def test_rescore_needs_pocl_a_student_signal_and_train_workers():
    assert load_config(None, ["curriculum.rescore=true"]).curriculum.rescore
    (problem,) = override_problems(["curriculum.rescore=true", "curriculum.mode=random"])
    assert "needs curriculum.mode pocl (got 'random')" in problem
    (problem,) = override_problems(["curriculum.rescore=true", "scoring.signals=[teacher_nll]"])
    assert "do not depend on it; add nll, rouge or kd_gap" in problem
    (problem,) = override_problems(["curriculum.rescore=true", "scoring.scorer=teacher"])
    assert "scorer 'teacher'" in problem
    (problem,) = override_problems(["curriculum.rescore=true", "scaling.num_workers=0"])
    assert "needs scaling.num_workers >= 1" in problem
