"""Calibrate the built-in task set's levels: how hard is each (family, size) for the demo's
models? Not a test; the measurement behind `pocl_ray.tasks.LEVEL_SIZES` (docs/scoring.md).

In one process, no Ray: generate `--per-cell` training items for every size of every family
in `tasks.CALIBRATION_SIZES` (plus 25 held-out items per cell from another seed), train the
demo teacher and the demo student on them by SFT (`configs/demo.yaml` sizes, `sft.epochs`
each, as the demo trains its teacher), and print each cell's held-out response NLL (nats per
token, EOS included) under both. A cell's difficulty is the mean of the two; levels 1..5 are
then bands of that difficulty, the same bands for every family.

    python bench/calibrate_tasks.py                  # the table, about 3 minutes on 2 cores
    python bench/calibrate_tasks.py --seeds 0 1      # the mean over two training seeds
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pocl_ray import artifacts, data, models, tasks
from pocl_ray.config import load_config, with_section
from pocl_ray.run_dir import RunDir
from pocl_ray.signals import score_batch

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
HELD_PER_CELL = 25


def cell_nll(model, tok, examples, refs, batch: int = 64) -> list[float]:
    """Mean response NLL of each example under `model` (the measurer's `nll` signal)."""
    out: list[float] = []
    for i in range(0, len(examples), batch):
        got = score_batch(examples[i : i + batch], refs[i : i + batch], signals=["nll"],
                          scorer=model, teacher=None, tokenizer=tok, max_new_tokens=1)  # fmt: skip
        out += got.signals["nll"]
    return out


def measure(seed: int, per_cell: int, epochs: int | None, root: Path) -> pd.DataFrame:
    cells = tasks.grid_cells()
    train_rows = tasks.generate(per_cell * len(cells), seed=seed, cells=cells)
    held_rows = tasks.generate(HELD_PER_CELL * len(cells), seed=1000 + seed, cells=cells)
    seen = {(r["context"], r["instruction"]) for r in train_rows}
    held_rows = [r for r in held_rows if (r["context"], r["instruction"]) not in seen]
    path = tasks.write_jsonl(train_rows, root / f"train{seed}.jsonl")
    where = root / f"run{seed}"
    cfg = load_config(DEMO, [f"data.source={path}", "data.eval_fraction=0",
                             f"run.output_dir={where}", f"run.seed={seed}"])  # fmt: skip
    if epochs is not None:
        cfg = with_section(cfg, "sft", epochs=epochs)
    run = RunDir(cfg.run.output_dir)
    train = data.load_records(path).records
    tok = artifacts.tokenizer(cfg, run, train)
    train_ex = artifacts.tokenize(cfg, tok, train)
    held = data.load_records(tasks.write_jsonl(held_rows, root / f"held{seed}.jsonl")).records
    held_ex, refs = artifacts.tokenize(cfg, tok, held), [r.references for r in held]
    table = pd.DataFrame([r.extra for r in held])
    for name in ("teacher", "student"):
        t0 = time.perf_counter()
        model = artifacts.new_teacher(cfg, tok) if name == "teacher" else artifacts.new_student(
            cfg, tok)  # fmt: skip
        artifacts.run_sft(cfg, model, train_ex, tok, epochs=cfg.sft.epochs)
        model.eval()
        with torch.no_grad():
            table[name] = cell_nll(model, tok, held_ex, refs)
        print(f"seed {seed}: {name} ({models.count_parameters(model)} parameters) trained and "
              f"measured in {time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--per-cell", type=int, default=32, help="training items per cell")
    ap.add_argument("--epochs", type=int, default=None, help="SFT epochs (default: the demo's)")
    ap.add_argument("--out", default=None, help="write the per-cell table to this CSV")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        tables = [measure(s, args.per_cell, args.epochs, Path(tmp)) for s in args.seeds]
    held = pd.concat(tables)
    cell = held.groupby(["category", "size"])[["teacher", "student"]].mean()
    cell["difficulty"] = cell.mean(axis=1)
    cell["level_now"] = [
        next((lvl for lvl, s in tasks.LEVEL_SIZES.get(f, {}).items() if size in s), None)
        for f, size in cell.index
    ]
    pd.set_option("display.width", 160)
    print(cell.round(3).to_string())
    if args.out:
        cell.to_csv(args.out)


if __name__ == "__main__":
    main()
