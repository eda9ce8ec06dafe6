"""The run inputs every job starts from, made once and reused: the records and their split,
the tokenizer, the tokenised examples, the demo teacher and the starting student.

Each is a pure function of the config and the run directory (`run_dir.RunDir`); a job calls
the ones it needs, and a folder that already holds the right thing is reused.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pocl_ray import data, models, tasks
from pocl_ray.config import Config, to_dict
from pocl_ray.data import LoadResult, Record, TokenizedExample
from pocl_ray.loop import sft
from pocl_ray.run_dir import Locations, RunDir, data_fingerprint, hash_json, model_id

log = logging.getLogger("pocl_ray.inputs")


@dataclass(kw_only=True)
class Inputs:
    """The configured data, read once: every record, the train / held-out split, and the
    identity of the content (`run_dir.data_fingerprint`)."""

    loaded: LoadResult
    train: list[Record]
    held: list[Record]
    fingerprint: str

    @property
    def counts(self) -> dict[str, int]:
        return {
            "read": self.loaded.n_read,
            "accepted": self.loaded.n_accepted,
            "rejected": len(self.loaded.rejected),
            "train": len(self.train),
            "held_out": len(self.held),
        }


def read_inputs(cfg: Config, run: RunDir) -> Inputs:
    """Read the configured data through the core loader (builtin tasks are written to
    `<run>/data/tasks.jsonl` first) and split off the held-out share by sample-id hash."""
    source = cfg.data.source
    if source == "builtin":
        generated = tasks.generate(cfg.data.builtin_size, cfg.run.seed)
        source = tasks.write_jsonl(generated, run.data / "tasks.jsonl")
    loaded = data.load_records(
        source,
        format=cfg.data.format,
        split=cfg.data.split,
        limit=cfg.data.limit,
        on_bad_record=cfg.data.on_bad_record,
        rejects_path=run.root / "rejects.jsonl",
    )
    train, held = data.split_train_eval(loaded.records, cfg.data.eval_fraction, seed=cfg.run.seed)
    return Inputs(loaded=loaded, train=train, held=held, fingerprint=data_fingerprint(loaded))


def tokenizer(cfg: Config, run: RunDir, train: list[Record]):
    """The run's tokenizer (`Locations`): the configured one, or one trained on the training
    split and saved to `<run>/tokenizer/` (reused when it is there)."""
    path = Locations.of(cfg, run).tokenizer
    if Path(path) == run.tokenizer and not (run.tokenizer / "tokenizer.json").exists():
        texts = [r.prompt + r.references[0] for r in train]
        models.train_tokenizer(texts, cfg.tokenizer.vocab_size).save_pretrained(path)
    return models.load_tokenizer(path, trust_remote_code=cfg.teacher.trust_remote_code)


def tokenize(cfg: Config, tok, records: list[Record]) -> list[TokenizedExample]:
    """Records -> training examples with the configured prompt and sequence lengths."""
    lengths = dict(max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length)
    return data.tokenize_records(records, tok, **lengths).examples


def run_sft(cfg: Config, model, examples, tok, *, epochs: int, on_epoch=None) -> list[float]:
    """The core `sft` with the run's `sft.lr`, `sft.batch_size` and seed."""
    return sft(
        model,
        examples,
        epochs=epochs,
        lr=cfg.sft.lr,
        batch_size=cfg.sft.batch_size,
        pad_id=tok.pad_token_id,
        seed=cfg.run.seed,
        on_epoch=on_epoch,
        autocast=cfg.optim.autocast,
        gradient_checkpointing=cfg.optim.gradient_checkpointing,
    )


def new_teacher(cfg: Config, tok) -> torch.nn.Module:
    """The teacher before SFT: pretrained, or tiny with a seeded init (the demo teacher)."""
    if cfg.teacher.name_or_path:
        return models.load_pretrained(cfg.teacher.name_or_path, cfg.teacher)
    torch.manual_seed(cfg.run.seed)
    return models.build_tiny(cfg.teacher, tok, cfg.data.max_length)


def teacher(cfg: Config, run: RunDir, tok, train_ex) -> torch.nn.Module:
    """The frozen teacher: pretrained (teacher.name_or_path), the demo teacher in
    `<run>/teacher/`, or (neither there) a tiny one trained here by SFT and saved there."""
    path = Locations.of(cfg, run).teacher
    if cfg.teacher.name_or_path or (Path(path) / "config.json").exists():
        if not cfg.teacher.name_or_path:
            log.info("teacher: reusing %s", path)
        return models.freeze_teacher(models.load_pretrained(path, cfg.teacher))
    model = new_teacher(cfg, tok)
    log.info(
        "teacher: none in %s yet; training a tiny one by SFT (%d params, %d epochs)",
        path,
        models.count_parameters(model),
        cfg.sft.epochs,
    )
    run_sft(
        cfg,
        model,
        train_ex,
        tok,
        epochs=cfg.sft.epochs,
        on_epoch=lambda e, loss: log.info("teacher SFT epoch %d: loss %.4f", e + 1, loss),
    )
    models.save_model(model, tok, path)
    return models.freeze_teacher(model)


def new_student(cfg: Config, tok, teacher: torch.nn.Module | None = None) -> torch.nn.Module:
    """The student before its starting checkpoint: pretrained, built from the `teacher`'s
    layers (student.init=teacher_layers), or tiny with a seeded init."""
    if cfg.student.name_or_path:
        return models.load_pretrained(cfg.student.name_or_path, cfg.student)
    if cfg.student.init == "teacher_layers":
        if teacher is None:
            raise ValueError("student.init=teacher_layers needs the teacher model")
        blocks = models.decoder_blocks(teacher)[1]
        chosen = models.teacher_layer_choice(blocks, cfg.student.layers, cfg.student.layer_step)
        log.info("student: %d of the teacher's %d blocks %s", len(chosen), blocks, chosen)
        return models.student_from_teacher(teacher, chosen)
    torch.manual_seed(cfg.run.seed + 1)
    return models.build_tiny(cfg.student, tok, cfg.data.max_length)


def starting_student(
    cfg: Config, tok, train_ex, teacher: torch.nn.Module | None = None
) -> torch.nn.Module:
    """`new_student`, then `sft.student_epochs` of SFT for one not pretrained (its starting
    checkpoint: the paper starts from a pretrained student; a random one makes student signals
    noise)."""
    student = new_student(cfg, tok, teacher)
    if cfg.student.name_or_path is None and cfg.sft.student_epochs:
        log.info("student: %d epochs of SFT for its starting checkpoint", cfg.sft.student_epochs)
        run_sft(cfg, student, train_ex, tok, epochs=cfg.sft.student_epochs)
    return student


def student_recipe(
    cfg: Config, tokenizer_id: str, fingerprint: str, teacher_id: str | None = None
) -> str:
    """Hash of everything that defines the starting student built here: its sizes (or its
    teacher and layers), the seed, the tokenizer, and (for its `sft.student_epochs` of SFT)
    the data and the SFT settings."""
    d = to_dict(cfg)
    recipe = {
        "student": d["student"],
        "teacher": teacher_id if cfg.student.init == "teacher_layers" else None,
        "seed": cfg.run.seed,
        "tokenizer": tokenizer_id,
        "max_length": cfg.data.max_length,
        "sft": None,
    }
    if cfg.sft.student_epochs:
        recipe["sft"] = {
            "epochs": cfg.sft.student_epochs,
            "lr": cfg.sft.lr,
            "batch_size": cfg.sft.batch_size,
            "data": {k: v for k, v in d["data"].items() if k != "source"},
            "data_fingerprint": fingerprint,
        }
    return hash_json(recipe)


def student_init(cfg: Config, run: RunDir, tok, train_ex, fingerprint: str) -> str:
    """The starting student's folder: the scorer by default (the paper's choice) and where
    distillation starts. A pretrained student is used from its own path.

    A tiny one is built by `starting_student` into `<run>/student_init/`, with the
    `student_recipe` it was made from in `recipe.txt`: a later run reuses the folder only
    when nothing that defines the student changed.
    """
    path = Locations.of(cfg, run).student_init
    if cfg.student.name_or_path:
        return path
    where = Locations.of(cfg, run)
    from_teacher = cfg.student.init == "teacher_layers"
    # the student is made of the teacher: it must exist first (the demo teacher is trained)
    source = teacher(cfg, run, tok, train_ex) if from_teacher else None
    teacher_id = model_id(where.teacher) if from_teacher else None
    recipe = student_recipe(cfg, model_id(where.tokenizer), fingerprint, teacher_id)
    stamp = run.student_init / "recipe.txt"
    if (run.student_init / "config.json").exists() and stamp.exists():
        if stamp.read_text(encoding="utf-8").strip() == recipe:
            log.info("student_init: reusing %s", path)
            return path
        log.warning(
            "student_init: %s was made with other settings (student sizes or teacher layers, "
            "seed, tokenizer or student SFT changed); rebuilding it",
            path,
        )
    student = starting_student(cfg, tok, train_ex, source)
    shutil.rmtree(path, ignore_errors=True)
    models.save_model(student, tok, path)
    stamp.write_text(recipe + "\n", encoding="utf-8")
    log.info(
        "student_init: saved the starting student (%d params, %d epochs of SFT) to %s",
        models.count_parameters(student),
        cfg.sft.student_epochs,
        path,
    )
    return path
