"""student.init=teacher_layers: a student made of the teacher's embeddings, chosen blocks,
final norm and head (models.student_from_teacher), for GPT-2, Llama and Qwen2 layouts; the
config rule; and the starting student a run builds and reuses (artifacts.student_init)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from pocl_ray import artifacts, models, tasks
from pocl_ray.config import ConfigError, ModelConfig
from pocl_ray.run_dir import RunDir
from tests import tiny


@pytest.fixture(scope="module")
def tok():
    texts = [r["instruction"] + "\n" + r["response"] for r in tasks.generate(200)]
    return models.train_tokenizer(texts, vocab_size=256)


def teacher_of(arch: str, tok, layers: int = 4):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, hidden_size=32, num_layers=layers, num_heads=2)
    return models.freeze_teacher(models.build_tiny(cfg, tok, 64))


def qwen2_teacher(vocab: int, layers: int = 4):
    """A tiny Qwen2: per-layer attention kinds (`layer_types`), grouped KV heads."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
    return models.freeze_teacher(AutoModelForCausalLM.from_config(cfg))


def blocks(model):
    name, _ = models.decoder_blocks(model)
    return model.get_submodule(name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_all_layers_make_the_teacher_again(arch, tok):
    teacher = teacher_of(arch, tok)
    student = models.student_from_teacher(teacher, [0, 1, 2, 3]).eval()
    ids = torch.randint(0, len(tok), (2, 12))
    assert torch.equal(student(ids).logits, teacher(ids).logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_chosen_blocks_are_copied_in_order_with_embeddings_norm_and_head(arch, tok):
    teacher = qwen2_teacher(len(tok)) if arch == "qwen2" else teacher_of(arch, tok)
    student = models.student_from_teacher(teacher, [3, 1])
    assert models.decoder_blocks(student)[1] == 2 == student.config.num_hidden_layers
    for new, old in enumerate([3, 1]):
        s, t = blocks(student)[new].state_dict(), blocks(teacher)[old].state_dict()
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(student.get_output_embeddings().weight,
                       teacher.get_output_embeddings().weight)  # fmt: skip
    rest = {k: v for k, v in teacher.state_dict().items()
            if not k.startswith(models.decoder_blocks(teacher)[0] + ".")}  # fmt: skip
    mine = student.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in rest.items())  # final norm, positions, ...
    if arch == "qwen2":
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in (3, 1)]
    assert all(p.requires_grad for p in student.parameters())  # the teacher is frozen
    assert student.config.vocab_size == teacher.config.vocab_size


def test_layer_choice_every_kth_or_listed_and_out_of_range_named():
    assert models.teacher_layer_choice(30, None, 3) == list(range(0, 30, 3))
    assert models.teacher_layer_choice(4, [0, 3], 2) == [0, 3]
    with pytest.raises(ValueError, match=r"student.layers: \[4\] out of range.*4 blocks"):
        models.teacher_layer_choice(4, [0, 4], 2)


def test_config_rules_for_teacher_layers():
    with pytest.raises(ConfigError) as e:
        tiny.tiny_cfg(tiny.ROOT / "unused", "student.init=teacher_layers",
                      "student.name_or_path=gpt2", "student.layers=[1,1]",
                      "teacher.init=teacher_layers", "student.layer_step=0")  # fmt: skip
    text = str(e.value)
    for words in ("drop one of them", "distinct block indices", "teacher.init: teacher_layers "
                  "is for the student only", "student.layer_step: got 0"):  # fmt: skip
        assert words in text, text


def test_a_run_builds_the_layered_student_once_and_rebuilds_on_a_new_choice(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = tiny.tiny_cfg(out, "student.init=teacher_layers", "student.layers=[1]",
                        "sft.student_epochs=0")  # fmt: skip
    run = RunDir(out)
    inputs = artifacts.read_inputs(cfg, run)
    tok = artifacts.tokenizer(cfg, run, inputs.train)
    train_ex = artifacts.tokenize(cfg, tok, inputs.train)
    path = artifacts.student_init(cfg, run, tok, train_ex, inputs.fingerprint)
    teacher = models.load_pretrained(run.teacher, cfg.teacher)  # trained on the way
    student = models.load_pretrained(path, cfg.student)
    assert student.config.num_hidden_layers == 1
    assert torch.equal(blocks(student)[0].attn.c_attn.weight, blocks(teacher)[1].attn.c_attn.weight)
    caplog.set_level("INFO", logger="pocl_ray.inputs")
    artifacts.student_init(cfg, run, tok, train_ex, inputs.fingerprint)
    assert "student_init: reusing" in caplog.text
    other = tiny.tiny_cfg(out, "student.init=teacher_layers", "student.layers=[0]",
                          "sft.student_epochs=0")  # fmt: skip
    artifacts.student_init(other, run, tok, train_ex, inputs.fingerprint)
    rebuilt = models.load_pretrained(path, cfg.student)
    assert torch.equal(blocks(rebuilt)[0].attn.c_attn.weight, blocks(teacher)[0].attn.c_attn.weight)
