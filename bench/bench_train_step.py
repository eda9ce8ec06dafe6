"""Training-step time with the output head at every position vs at the response tokens only.

Not a test. The SmolLM2 preset's student (configs/smollm2-dolly.yaml: 5 of the teacher's 30
blocks; V = 49,152) takes real training steps (`train_step.train_step`, AdamW, bf16 autocast as
the preset) on batches of 8 tokenised Dolly records, alternating the two ways so that drift on
this shared machine hits both alike:

  full:     the head over all B x L positions, the loss slicing the response tokens out
            (what the code did before: forced here through the fallback of `response_logits`)
  response: the head over the N response tokens only (`train_step.head_at`, the default)

Two step kinds: `ce` (the SFT of the starting student, λ = 0) and `kd` (λ = 1 against the
cached teacher top-20 when --run names a scored run directory, else skipped). Also checks
that both ways give the same loss on the same batch (rel).

Needs the converted teacher (docs/models.md), then
    python bench/bench_train_step.py [--steps 6] [--run runs/smollm2-dolly] [--write]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from pocl_ray import artifacts, curriculum, models, train_step
from pocl_ray.config import LossConfig, OptimConfig, load_config
from pocl_ray.data import collate
from pocl_ray.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training step: output head at response tokens only (SmolLM2 student)"
BATCH = 8


def batches(cfg, tok, run_dir: str | None, steps: int):
    """`steps` batches of 8 records in file order; with the cached top-20 of run_dir's table
    when it has one (the table's rows, else the records)."""
    if run_dir:
        import pyarrow.parquet as pq

        from pocl_ray.scores import arrow_rows

        table = pq.read_table(RunDir(Path(run_dir)).scores / "table").slice(0, steps * BATCH)
        rows, taus = arrow_rows(table), cfg.scoring.cache_taus
        return [
            train_step.table_batch(rows[i : i + BATCH], tok.pad_token_id, taus)
            for i in range(0, len(rows), BATCH)
        ]
    run = RunDir(ROOT / "runs" / "bench-train-step")
    inputs = artifacts.read_inputs(cfg, run)
    examples = artifacts.tokenize(cfg, tok, inputs.train[: steps * BATCH])
    return [
        collate(examples[i : i + BATCH], tok.pad_token_id) for i in range(0, len(examples), BATCH)
    ]


def step(student, opt, batch, *, kd_ratio: float, tau: float) -> tuple[float, float]:
    pos = curriculum.Position(stage=0, epoch=0, step_in_epoch=0, step_in_stage=0, global_step=0,
                              tau=tau, kd_ratio=kd_ratio, alpha=0.1, lr_mult=1.0)  # fmt: skip
    if kd_ratio == 0.0:
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    t0 = time.perf_counter()
    res = train_step.train_step(student, None, opt, batch, pos=pos, base_lr=1e-4,
                                loss=LossConfig(), grad_clip=1.0, autocast="bfloat16")  # fmt: skip
    return time.perf_counter() - t0, res.loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--run", help="a scored run directory of the preset (for the kd steps)")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs" / "smollm2-dolly.yaml")
    tok = models.load_tokenizer(str(ROOT / cfg.teacher.name_or_path))
    teacher = models.load_pretrained(str(ROOT / cfg.teacher.name_or_path), cfg.teacher)
    base = models.student_from_teacher(teacher, cfg.student.layers)
    del teacher
    data = batches(cfg, tok, args.run, args.steps + 1)
    kinds = {"ce": 0.0} | ({"kd": 1.0} if args.run else {})
    lines = []
    for kind, kd_ratio in kinds.items():
        times = {"full": [], "response": []}
        students = {}
        for way in times:
            students[way] = copy.deepcopy(base)
            students[way].train()
            models.force_full_head(students[way], way == "full")
        opts = {w: train_step.make_optimizer(s, OptimConfig(lr=1e-4)) for w, s in students.items()}
        losses = {}
        for i, batch in enumerate(data):
            for way in times:  # alternate: drift hits both alike
                seconds, loss = step(students[way], opts[way], batch, kd_ratio=kd_ratio, tau=2.0)
                losses.setdefault(way, []).append(loss)
                if i:  # the first step warms up
                    times[way].append(seconds)
        rel = max(abs(a - b) / abs(a) for a, b in zip(losses["full"], losses["response"]))
        med = {w: statistics.median(t) for w, t in times.items()}
        lines.append(f"| {kind} | {med['full']:.2f} s | {med['response']:.2f} s | "
                     f"{med['full'] / med['response']:.2f}x | {rel:.1e} |")  # fmt: skip
        print(lines[-1], flush=True)
    table = "\n".join(
        [
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch on 2 "
            f"threads, bf16 autocast, batch {BATCH}, {args.steps} timed steps each (median), "
            "alternating; the loss difference is the largest relative one over the steps "
            "(the two students take the same steps, so it includes the drift of bf16 "
            "training); ce: the first Dolly records in file order, kd: the scores table's "
            "first rows (easiest first) with their cached top-20, τ = 2",
            "",
            "| step | head everywhere | head at response tokens | speed-up | loss rel diff |",
            "|---|---|---|---|---|",
            *lines,
        ]
    )
    print(table)
    if args.write:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        block = f"{SECTION} (`python bench/bench_train_step.py --write`)\n\n{table}\n"
        if SECTION in text:
            start = text.index(SECTION)
            end = text.find("\n## ", start + 1)
            text = text[:start] + block + (text[end:] if end != -1 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + block
        path.write_text(text)


if __name__ == "__main__":
    main()
