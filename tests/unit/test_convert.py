"""`pocl-ray convert-gguf`: a GGUF file written here with the `gguf` package (a tiny Llama and
its byte-level BPE tokenizer, laid out as llama.cpp's converter writes them) becomes a Hugging
Face folder whose logits and tokenizer equal the original's."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from jobs import __main__ as cli
from pocl_ray import convert, models, tasks
from pocl_ray.config import ModelConfig

LLAMA_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def rope_permute(w, n_head: int):
    """llama.cpp stores Q and K rows interleaved for its rotary kernel (convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def write_gguf(model, tok, path) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    special = {tok.eos_token_id, tok.pad_token_id}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                       for i in range(len(tokens))])  # fmt: skip
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    for key, value in model.state_dict().items():
        v = value.detach().float().numpy()
        if key in TOP_NAMES:
            w.add_tensor(TOP_NAMES[key], v)
            continue
        _, _, i, *rest = key.split(".")  # model.layers.<i>.<part>.weight
        part = ".".join(rest[:-1])
        if part == "self_attn.q_proj":
            v = rope_permute(v, c.num_attention_heads)
        elif part == "self_attn.k_proj":
            v = rope_permute(v, c.num_key_value_heads)
        w.add_tensor(f"blk.{i}.{LLAMA_NAMES[part]}.weight", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    texts = [r["instruction"] + "\n" + r["response"] for r in tasks.generate(200)]
    tok = models.train_tokenizer(texts, vocab_size=512)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", hidden_size=32, num_layers=2, num_heads=2)
    model = models.build_tiny(cfg, tok, 64).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, tok, path)
    return model, tok, path


def test_the_converted_folder_has_the_same_logits_and_tokenizer(original, tmp_path, capsys):
    model, tok, path = original
    assert cli.main(["convert-gguf", str(path), str(tmp_path / "hf")]) == 0
    assert f"wrote {tmp_path / 'hf'}" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").exists()
    converted = models.load_pretrained(tmp_path / "hf", ModelConfig(name_or_path="x"))
    tok2 = models.load_tokenizer(tmp_path / "hf")
    assert "quantization_config" not in converted.config.to_dict()
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, model(ids).logits)
    text = "Sort 3 1 2, then add 45+67."
    assert tok2.get_vocab() == tok.get_vocab() and tok2(text).input_ids == tok(text).input_ids
    assert tok2.eos_token == tok.eos_token


def test_a_folder_with_one_gguf_is_found_and_a_second_run_refused(original, tmp_path, capsys):
    _, _, path = original
    assert convert.find_gguf(path.parent) == path
    convert.convert_gguf(path.parent, tmp_path / "hf")
    assert cli.main(["convert-gguf", str(path), str(tmp_path / "hf")]) == 2
    assert "already holds a model" in capsys.readouterr().err


def test_bad_sources_are_named(tmp_path, capsys):
    assert cli.main(["convert-gguf", "no-such-package-xyz", str(tmp_path / "o")]) == 2
    assert "no such file, folder or installed package" in capsys.readouterr().err
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(convert.ConvertError, match="exactly one .gguf file, found 2"):
        convert.find_gguf(tmp_path)
