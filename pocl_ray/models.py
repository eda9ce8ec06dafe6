"""Teacher / student models and the tokenizer: pretrained (local path or hub name) or tiny,
built from config sizes with no download.

Security: `trust_remote_code` is passed only as the config says (default False), and weights
are read with safetensors (`use_safetensors=True`), never by unpickling.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from pocl_ray.config import ModelConfig

log = logging.getLogger("pocl_ray.models")

EOS = "<|endoftext|>"
PAD = "<|pad|>"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` in-process (no download).

    Digits are split one per token before BPE: arithmetic tasks stay learnable by tiny models
    when "123" is three tokens rather than one merged symbol. Byte level means any UTF-8 text
    encodes without an unknown token.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS, unk_token=None
    )


def warn_remote_code(path: str | Path) -> None:
    """trust_remote_code runs Python shipped with the model: say so each time it is on."""
    log.warning(
        "trust_remote_code is true for %s: the model's own Python code will run in this "
        "process; use it only for a source you trust",
        path,
    )


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """A tokenizer from a folder (a pretrained model's, or the one `train_tokenizer` saved)
    or a hub name. Without a pad token it pads with EOS (GPT-2 style; masks keep it harmless)."""
    if trust_remote_code:
        warn_remote_code(path)
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {path!s} has no eos_token; set one in its config")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_tiny(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast, max_positions: int
) -> PreTrainedModel:
    """A randomly initialised causal LM of the configured sizes (no download), with the
    tokenizer's vocabulary and special token ids."""
    inter = cfg.intermediate_size or 4 * cfg.hidden_size
    dropout = cfg.dropout or 0.0
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.arch == "gpt2":
        hf_cfg = GPT2Config(
            **ids,
            n_positions=max_positions,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=inter,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
    else:
        hf_cfg = LlamaConfig(
            **ids,
            max_position_embeddings=max_positions,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            intermediate_size=inter,
            attention_dropout=dropout,
        )
    model = AutoModelForCausalLM.from_config(hf_cfg)
    set_special_tokens(model, tokenizer)
    return model


def set_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """Make generation stop at EOS and pad with the tokenizer's pad id."""
    for conf in (model.config, model.generation_config):
        conf.eos_token_id = tokenizer.eos_token_id
        conf.pad_token_id = tokenizer.pad_token_id
        conf.bos_token_id = tokenizer.bos_token_id


DROPOUT_KEYS = (
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout",  # GPT-2
    "attention_dropout", "hidden_dropout", "dropout", "activation_dropout",  # Llama, OPT, ...
)  # fmt: skip
"""Config fields that hold a dropout probability, across the supported families."""


def load_pretrained(path: str | Path, cfg: ModelConfig) -> PreTrainedModel:
    """Load a causal LM from a local folder or hub name, safetensors only.

    transformers returns it in eval mode: a caller that trains it must call `.train()`.
    With `cfg.dropout` set, every dropout field of its config is overridden.
    """
    kwargs = {}
    if cfg.trust_remote_code:
        warn_remote_code(path)
    if cfg.dropout is not None:
        hf_cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
        for key in DROPOUT_KEYS:
            if isinstance(getattr(hf_cfg, key, None), float):
                setattr(hf_cfg, key, cfg.dropout)
        kwargs["config"] = hf_cfg
    return AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=DTYPES[cfg.dtype],
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
        **kwargs,
    )


def decoder_blocks(model: PreTrainedModel) -> tuple[str, int]:
    """The qualified name of the model's list of decoder blocks (`transformer.h` in GPT-2,
    `model.layers` in Llama / Qwen2, `model.decoder.layers` in OPT) and its length."""
    n = model.config.get_text_config().num_hidden_layers
    found = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and name]  # fmt: skip
    if len(found) != 1:
        raise ValueError(
            f"cannot tell the decoder blocks of {type(model).__name__} apart (module lists of "
            f"length {n}: {found or 'none'}); use student.init=auto with a student of its own"
        )
    return found[0], n


def teacher_layer_choice(n: int, layers: Sequence[int] | None, step: int) -> list[int]:
    """The teacher blocks a student keeps: `layers` as given, else every `step`-th from the
    first (0, step, 2 x step, ...). Raises ValueError naming the field when one is out of range."""
    chosen = list(layers) if layers is not None else list(range(0, n, step))
    if bad := [i for i in chosen if i >= n]:
        raise ValueError(
            f"student.layers: {bad} out of range; the teacher has {n} blocks (0..{n - 1})"
        )
    return chosen


def student_from_teacher(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A student made of the teacher's embeddings, the blocks `layers` (in that order, numbered
    anew), its final norm and head, in float32: the usual initialisation of a distillation
    student. Vocabulary and special tokens are the teacher's by construction."""
    prefix, _ = decoder_blocks(teacher)
    hf_cfg = copy.deepcopy(teacher.config)
    hf_cfg.num_hidden_layers = len(layers)
    if isinstance(getattr(hf_cfg, "layer_types", None), list):  # per-layer attention kinds
        hf_cfg.layer_types = [hf_cfg.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(index) not in renumber:
                continue
            key = f"{prefix}.{renumber[int(index)]}.{rest}"
        state[key] = value.detach().to(torch.float32, copy=True)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {k for k in missing if student.config.tie_word_embeddings and "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"student from teacher layers: weights that do not fit (missing "
            f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})"
        )
    student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def max_positions(hf_config) -> int | None:
    """The positions a model can attend over (`max_position_embeddings`, GPT-2's
    `n_positions`), or None when its config sets no limit."""
    return getattr(hf_config.get_text_config(), "max_position_embeddings", None)


def eos_token_ids(model: PreTrainedModel | None = None, tokenizer=None) -> tuple[int, ...]:
    """Every id that ends a generated answer: the tokenizer's EOS and the model's
    (generation_config and config; each may be an int, a list, or None: Llama-3 and Qwen2.5
    list several), in a stable order."""
    found: list[int] = []
    sources = [] if tokenizer is None else [tokenizer.eos_token_id]
    if model is not None:
        sources += [model.generation_config.eos_token_id, model.config.eos_token_id]
    for value in sources:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in found:
                found.append(int(i))
    return tuple(found)


def freeze_teacher(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients: the teacher is never trained during distillation."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_model(model: PreTrainedModel, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors) with its tokenizer: loads with plain transformers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the head at chosen positions


_SELECTABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def head_at(model: torch.nn.Module, positions: torch.Tensor | None):
    """Within the block, the model's output head sees only hidden[positions] (a (B, L) bool),
    so `model(...).logits` is (N, V) for the N selected positions in row-major order.

    A forward pre-hook on the head, so the call still goes through the model's (and DDP's)
    forward; positions None leaves the model alone. Real vocabularies make the head the
    costliest layer of a small student (49k × 576 for SmolLM2), and responses are about a
    quarter of a padded batch, so this skips ~3/4 of its work and of the logits' memory.
    """
    if positions is None:
        yield
        return
    head = _unwrapped(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0][positions], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def head_selectable(model: torch.nn.Module, *, raw: bool = False) -> bool:
    """Whether `head_at` gives exactly the full forward's logits at the selected positions
    (anything a model does after its head must be per position); with raw, also whether those
    logits are the head's output unchanged, as `head_inputs` callers need (a model that
    soft-caps or scales its logits is selectable, not raw). Checked once per model on a 2 × 6
    input: a self-check, not a list of families."""
    inner = _unwrapped(model)
    if inner not in _SELECTABLE:
        _SELECTABLE[inner] = _check_head(inner)
    selectable, is_raw = _SELECTABLE[inner]
    return selectable and (is_raw or not raw)


def force_full_head(model: torch.nn.Module, on: bool = True) -> None:
    """Make `head_selectable` answer False for this model (on) or check it again (off):
    benchmarks time the full-forward path against the selection on the same model."""
    inner = _unwrapped(model)
    if on:
        _SELECTABLE[inner] = (False, False)
    else:
        _SELECTABLE.pop(inner, None)


def _check_head(inner: torch.nn.Module) -> tuple[bool, bool]:
    """(selectable, raw) of `head_selectable`, in eval mode and at the model's own dtype."""
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return False, False
    device = next(inner.parameters()).device
    ids = torch.arange(12, device=device).reshape(2, 6) % inner.config.vocab_size
    attn = torch.ones_like(ids)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[0, 2:5], positions[1, 0] = True, True
    outputs: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, _args, out: outputs.append(out))
    was = inner.training
    inner.eval()  # dropout off: the two forwards must be comparable
    try:  # and no caller's autocast: it would round both forwards alike and hide differences
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            full = inner(input_ids=ids, attention_mask=attn).logits[positions]
            with head_at(inner, positions):
                part = inner(input_ids=ids, attention_mask=attn).logits
    finally:
        hook.remove()
        inner.train(was)
    tol = 1e-4 if full.dtype == torch.float32 else 1e-2  # bf16 kernels may round per shape
    selectable = full.shape == part.shape and torch.allclose(full, part, rtol=tol, atol=tol)
    raw = part.shape == outputs[-1].shape and torch.allclose(part, outputs[-1].to(part.dtype))
    return selectable, selectable and raw


def head_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, L-1) shifted response mask -> (B, L) positions whose logits the loss uses (the
    logits at t predict the label at t + 1; the last position predicts nothing)."""
    return torch.nn.functional.pad(mask, (0, 1), value=False)


@contextlib.contextmanager
def head_inputs(model: torch.nn.Module, positions: torch.Tensor):
    """Within the block, the output head's inputs at `positions` (a (B, L) bool) are kept in
    the yielded list, (N, d) in row-major order, and the head itself runs on no rows: for a
    caller that applies the head itself (scoring: in float32, a chunk of positions at a time,
    after a bfloat16 body). Exact where `head_selectable`."""
    kept: list[torch.Tensor] = []

    def keep(_m, args):
        kept.append(args[0][positions])
        return (kept[-1][:0], *args[1:])

    handle = _unwrapped(model).get_output_embeddings().register_forward_pre_hook(keep)
    try:
        yield kept
    finally:
        handle.remove()
