"""The in-process tokenizer, tiny model construction, saving and loading (no download)."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from pocl_ray import tasks
from pocl_ray.config import ModelConfig
from pocl_ray.models import (
    EOS,
    PAD,
    build_tiny,
    count_parameters,
    eos_token_ids,
    freeze_teacher,
    load_pretrained,
    max_positions,
    save_model,
    train_tokenizer,
)

MAX_POSITIONS = 64


@pytest.fixture(scope="module")
def tok():
    texts = [
        r["instruction"] + "\n" + r["context"] + "\n" + r["response"] for r in tasks.generate(300)
    ]
    return train_tokenizer(texts, vocab_size=512)


def tiny_cfg(arch: str, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, **kw)


def tiny(tok, arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_tiny(tiny_cfg(arch), tok, MAX_POSITIONS)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_splits_digits_one_per_token(tok):
    assert tok.tokenize("2024") == ["2", "0", "2", "4"]
    ids = tok("12 + 345 = 357", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    digits = [p.strip() for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("12345357")  # every digit its own token, none merged
    assert all(len(d) == 1 for d in digits)


@pytest.mark.parametrize(
    "text",
    [
        "Write the letters in reverse order.\n\n### Response:\na b c",
        "héllo wörld — naïve café",
        "日本語のテキスト ✓ 🚀 emoji",
        "  leading and trailing spaces  \ttab\r\n",
        "Ω≈ç√∫ 12345 ünïcödé",
    ],
)
def test_tokenizer_round_trips_any_text(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == text


def test_tokenizer_special_tokens(tok):
    assert tok.eos_token == EOS and tok.pad_token == PAD
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.eos_token_id != tok.pad_token_id
    assert {tok.eos_token_id, tok.pad_token_id} <= set(range(len(tok)))
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS
    # each special token is one id, and plain text never contains them
    assert tok(EOS, add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert tok.eos_token_id not in tok("some text", add_special_tokens=False)["input_ids"]
    assert len(tok) <= 512


def test_tokenizer_is_deterministic():
    texts = [r["context"] + " " + r["response"] for r in tasks.generate(100, seed=1)]
    a, b = train_tokenizer(texts, 300), train_tokenizer(texts, 300)
    assert a.get_vocab() == b.get_vocab()


# ---------------------------------------------------------------- build_tiny


def test_build_tiny_gpt2_sizes(tok):
    model = tiny(tok, "gpt2")
    assert isinstance(model, transformers.GPT2LMHeadModel)
    c = model.config
    v, h, n_pos = len(tok), 32, MAX_POSITIONS
    assert (c.vocab_size, c.n_embd, c.n_layer, c.n_head, c.n_positions) == (v, h, 2, 2, n_pos)
    assert model.get_input_embeddings().weight.shape == (v, h)
    assert model.get_output_embeddings().weight.shape == (v, h)
    assert len(model.transformer.h) == 2
    per_layer = (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (2 * h) + (h * 4 * h + 4 * h)
    per_layer += 4 * h * h + h
    expected = v * h + n_pos * h + 2 * per_layer + 2 * h  # lm_head tied to the embedding
    assert count_parameters(model) == expected
    # no dropout anywhere: the forward pass is deterministic in train mode
    ids = torch.tensor([[5, 6, 7, 8]])
    model.train()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_build_tiny_llama_sizes(tok):
    model = tiny(tok, "llama")
    assert isinstance(model, transformers.LlamaForCausalLM)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (len(tok), 32, 2)
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 2)
    assert c.intermediate_size == 4 * 32
    assert c.max_position_embeddings == MAX_POSITIONS
    assert model.model.layers[0].mlp.up_proj.weight.shape == (128, 32)
    assert model.get_input_embeddings().weight.shape == (len(tok), 32)
    custom = build_tiny(tiny_cfg("llama", intermediate_size=48), tok, MAX_POSITIONS)
    assert custom.model.layers[0].mlp.up_proj.weight.shape == (48, 32)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_build_tiny_special_ids(tok, arch):
    model = tiny(tok, arch)
    for conf in (model.config, model.generation_config):
        assert conf.eos_token_id == tok.eos_token_id
        assert conf.pad_token_id == tok.pad_token_id
        assert conf.bos_token_id == tok.bos_token_id
    logits = model(torch.tensor([[tok.eos_token_id, tok.pad_token_id]])).logits
    assert logits.shape == (1, 2, len(tok))


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_model_loads_with_plain_transformers(tok, arch, tmp_path):
    model = tiny(tok, arch).eval()
    out = save_model(model, tok, tmp_path / "m")
    assert out == tmp_path / "m"
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]

    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(loaded) is type(model)
    ids = torch.tensor([tok("Add the two numbers.\n3 + 4", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.generation_config.eos_token_id == tok.eos_token_id

    tok2 = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Sort the digits: 9 1 5 ✓"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert (tok2.eos_token, tok2.pad_token) == (EOS, PAD)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_load_pretrained_with_dtype(tok, tmp_path, dtype):
    model = tiny(tok, "gpt2").eval()
    out = save_model(model, tok, tmp_path / "m")
    loaded = load_pretrained(out, tiny_cfg("gpt2", dtype=dtype))
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    assert {p.dtype for p in loaded.parameters()} == {want}
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        ref = model(ids).logits
        got = loaded(ids).logits.float()
    assert torch.allclose(got, ref, atol=0 if dtype == "float32" else 0.05)


def test_freeze_teacher(tok):
    model = tiny(tok, "llama")
    model.train()
    out = freeze_teacher(model)
    assert out is model
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_trust_remote_code_defaults_to_false(tok, tmp_path):
    assert ModelConfig().trust_remote_code is False
    # a plain local folder loads with the default (no remote code needed)
    out = save_model(tiny(tok, "gpt2"), tok, tmp_path / "plain")
    assert isinstance(load_pretrained(out, ModelConfig()), transformers.GPT2LMHeadModel)

    # a folder whose config asks for custom code: with trust_remote_code False it must refuse
    # before ever importing that code (which would leave a marker file)
    custom = tmp_path / "custom"
    save_model(tiny(tok, "gpt2"), tok, custom)
    marker = tmp_path / "remote_code_ran"
    (custom / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class CustomConfig(GPT2Config):\n    model_type = 'pocl_custom_test'\n"
        "class CustomModel(GPT2LMHeadModel):\n    config_class = CustomConfig\n"
    )
    conf = json.loads((custom / "config.json").read_text())
    conf["model_type"] = "pocl_custom_test"
    conf["auto_map"] = {
        "AutoConfig": "modeling_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (custom / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_pretrained(custom, ModelConfig())
    assert not Path(marker).exists()


def test_trust_remote_code_when_asked_runs_the_code_with_a_warning(tok, tmp_path, caplog):
    out = save_model(tiny(tok, "gpt2"), tok, tmp_path / "plain")
    with caplog.at_level("WARNING", logger="pocl_ray.models"):
        load_pretrained(out, ModelConfig(trust_remote_code=True))
    assert "trust_remote_code is true for" in caplog.text and str(out) in caplog.text


def test_no_unpickling_anywhere_in_the_code():
    """Weights load with safetensors; every torch.load says weights_only=True; nothing of ours
    unpickles (Tune's searcher state is JSON)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    found = []
    for path in [*root.glob("pocl_ray/*.py"), *root.glob("jobs/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True"
                       for k in node.keywords)  # fmt: skip
            if name == "torch.load" and not safe:
                found.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.loads"):
                found.append(f"{path.name}:{node.lineno} {name}")
    assert found == []


# ---------------------------------------------------------------- dropout, EOS ids


def test_dropout_tiny_builds_and_overrides_a_saved_model(tok, tmp_path):
    assert tiny(tok, "gpt2").config.resid_pdrop == 0.0  # tiny default: none
    model = build_tiny(tiny_cfg("gpt2", dropout=0.2), tok, MAX_POSITIONS)
    assert (model.config.resid_pdrop, model.config.attn_pdrop) == (0.2, 0.2)
    save_model(model, tok, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", tiny_cfg("gpt2"))
    assert loaded.config.resid_pdrop == 0.2 and not loaded.training  # its own; eval mode
    off = load_pretrained(tmp_path / "m", tiny_cfg("gpt2", dropout=0.0))
    assert (off.config.resid_pdrop, off.config.embd_pdrop, off.config.attn_pdrop) == (0, 0, 0)
    llama = build_tiny(tiny_cfg("llama", dropout=0.1), tok, MAX_POSITIONS)
    assert llama.config.attention_dropout == 0.1


def test_eos_token_ids_merge_the_tokenizer_and_the_model(tok):
    model = tiny(tok, "llama")
    assert eos_token_ids(model, tok) == (tok.eos_token_id,)
    model.generation_config.eos_token_id = [7, tok.eos_token_id, 9]  # Llama-3 style list
    assert eos_token_ids(model, tok) == (tok.eos_token_id, 7, 9)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    assert eos_token_ids(model) == ()
    assert eos_token_ids(None, tok) == (tok.eos_token_id,)


def test_max_positions_reads_either_config_name(tok):
    assert max_positions(tiny(tok, "gpt2").config) == MAX_POSITIONS
    assert max_positions(tiny(tok, "llama").config) == MAX_POSITIONS
