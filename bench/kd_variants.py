"""Which loss lowers the held-out CE of a real student? Short runs from one starting student.

Not a test. From a scored run of the SmolLM2 preset (its `student_init/` and scores table with
the top-20 cache), train a copy of the starting student for --steps steps of 8 random table
rows (seed 0, the same rows for every variant), AdamW at --lr, bf16 autocast, with one loss:

  ce          cross-entropy on the reference only (more SFT)
  cache:T     KD at temperature T against the cached top-20 (`losses.topk_kd_loss`), λ = 1
  online:T    KD at temperature T against the teacher run on the batch (`losses.kd_loss`)

and print the held-out CE (the first 60 held-out records) every 50 steps and at the end.
docs/models.md ("Why τ stays at 1 here") has what it found.

    python bench/kd_variants.py runs/smollm2-dolly cache:1 --steps 150
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pocl_ray import artifacts, loop, models
from pocl_ray.config import load_config
from pocl_ray.losses import ce_loss, kd_loss, topk_kd_loss
from pocl_ray.run_dir import RunDir
from pocl_ray.scores import TOPK_CACHE, arrow_rows
from pocl_ray.train_step import shifted, table_batch

BATCH, DEV = 8, 60


def table_rows(run: RunDir, n: int) -> list[dict]:
    table = pq.read_table(run.scores / "table")
    pick = sorted(np.random.default_rng(0).choice(table.num_rows, n, replace=False).tolist())
    table = table.take(pick)
    rows = arrow_rows(table)
    random.Random(0).shuffle(rows)
    return rows


def loss_of(variant: str, tau: float, student, teacher, batch, taus) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits, targets, mask = shifted(out.logits.float(), batch["labels"])
    if variant == "ce":
        return ce_loss(logits, targets, mask)
    if variant == "cache":
        cache = [batch[k] for k in TOPK_CACHE]
        return topk_kd_loss(logits, *cache, taus, mask, kind="fkl", temperature=tau)
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return kd_loss(logits, t[:, :-1], mask, kind="fkl", temperature=tau)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a scored run directory of configs/smollm2-dolly.yaml")
    ap.add_argument("variant", help="ce, cache:T or online:T")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variant, _, tau = args.variant.partition(":")
    tau = float(tau or 1.0)
    run = RunDir(Path(args.run).resolve())
    cfg = load_config(run.root / "config.yaml")
    tok = models.load_tokenizer(cfg.teacher.name_or_path)
    dev = artifacts.tokenize(cfg, tok, artifacts.read_inputs(cfg, run).held)[:DEV]
    teacher = models.load_pretrained(cfg.teacher.name_or_path, cfg.teacher).eval()
    student = models.load_pretrained(run.root / "student_init", cfg.student)
    taus = list(cfg.scoring.cache_taus)
    start = loop.mean_ce(student, dev, tok.pad_token_id, 8)
    print(f"{args.variant}: held-out CE at step 0: {start:.4f}", flush=True)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    rows, t0 = table_rows(run, BATCH * args.steps), time.perf_counter()
    student.train()
    for step in range(args.steps):
        part = rows[step * BATCH : (step + 1) * BATCH]
        batch = table_batch(part, tok.pad_token_id, taus)
        loss = loss_of(variant, tau, student, teacher, batch, taus)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            ce = loop.mean_ce(student, dev, tok.pad_token_id, 8)
            student.train()
            print(f"{args.variant}: held-out CE at step {step + 1}: {ce:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
