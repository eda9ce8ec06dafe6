"""Scoring throughput: the Ray Data job's actor pool vs a plain single-process loop.

Not a test. In ONE run, over the same rows, batches and saved models:
  plain-1t  core `score_batch` over the batches in this process, torch on 1 thread
  plain     the same with torch's default thread count
  ray xN    `pocl_ray.ray_data.scored_dataset` with N actors (1 CPU, 1 thread each)
Ray start-up (`ray.init`) is timed on its own. Each Ray configuration runs twice: on one
batch per actor (the fixed cost: actors start, load their models, score one batch) and on all
rows; the steady state is (all rows - those batches) / (the difference in time), after one
unreported warm-up run (Ray's first worker start is slower than later ones). Models are
randomly initialised from config sizes (no download, no teacher training): throughput does
not depend on the weights, except that random models never emit EOS and so always generate
max_new_tokens (the worst case).

    python bench/bench_score.py                 # print the table
    python bench/bench_score.py --write         # also update BENCHMARKS.md
    python bench/bench_score.py --sizes tiny --actors 1 2 --rows 1200
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from pocl_ray import (  # noqa: E402
    artifacts,  # noqa: E402
    models,
    ray_data,
)
from pocl_ray.config import load_config, to_dict  # noqa: E402
from pocl_ray.data import example_from_row  # noqa: E402
from pocl_ray.run_dir import RunDir  # noqa: E402
from pocl_ray.signals import score_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Scoring (Ray Data vs plain loop)"
# name -> (config overrides on configs/demo.yaml, built-in records generated)
SIZES = {
    "tiny": ([], 1200),  # the demo's own models, signals and batch size
    "medium": (
        [
            "student.hidden_size=512",
            "student.num_layers=8",
            "student.num_heads=8",
            "scoring.signals=[rouge,nll]",  # the paper's two: no teacher
            "scoring.batch_size=32",
        ],
        300,
    ),
}


def describe(cfg) -> str:
    sc, st, te = cfg.scoring, cfg.student, cfg.teacher
    teacher = (
        f"teacher {te.hidden_size}x{te.num_layers}, "
        if {"teacher_nll", "kd_gap"} & set(sc.signals)
        else ""
    )
    return (
        f"{teacher}student (scorer) {st.hidden_size}x{st.num_layers} GPT-2, signals "
        f"{', '.join(sc.signals)}, batch {sc.batch_size}, max_new_tokens {sc.max_new_tokens}"
    )


def prepare(size: str, rows: int | None, out: Path):
    """Config, tokenised rows and saved models for one size (untimed)."""
    rows = rows or SIZES[size][1]
    overrides = [f"data.builtin_size={rows}", f"run.output_dir={out / size}"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides + SIZES[size][0])
    run = Path(cfg.run.output_dir)
    train = artifacts.read_inputs(cfg, RunDir(run)).train
    tok = artifacts.tokenizer(cfg, RunDir(run), train)
    examples = artifacts.tokenize(cfg, tok, train)
    paths = {"tokenizer": str(run / "tokenizer"), "teacher": None}
    torch.manual_seed(0)
    scorer = models.build_tiny(cfg.student, tok, cfg.data.max_length)
    paths["scorer"] = str(models.save_model(scorer, tok, run / "scorer"))
    teacher = None
    if {"teacher_nll", "kd_gap"} & set(cfg.scoring.signals):
        teacher = models.build_tiny(cfg.teacher, tok, cfg.data.max_length)
        paths["teacher"] = str(models.save_model(teacher, tok, run / "teacher"))
    n_params = models.count_parameters(scorer)
    table = ray_data.example_rows(examples, [r.references for r in train])
    return cfg, tok, table, paths, scorer, teacher, n_params


def plain_loop(cfg, tok, table, scorer, teacher, threads: int) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for batch in ray_data.scoring_blocks(table, cfg.scoring.batch_size):  # the pool's batches
        examples = [example_from_row(row) for _, row in batch.iterrows()]
        score_batch(
            examples,
            list(batch["references"]),
            signals=cfg.scoring.signals,
            scorer=scorer.eval(),
            teacher=teacher.eval() if teacher is not None else None,
            tokenizer=tok,
            max_new_tokens=cfg.scoring.max_new_tokens,
        )
    total = time.perf_counter() - t0
    torch.set_num_threads(before)
    return {"total_s": total, "rows_per_s": len(table) / total}


def ray_pool(cfg, table, paths, actors: int, warm_up: bool = False) -> dict:
    """Two runs of the pool: on one batch per actor (the fixed cost: actors start, load their
    models, score one batch each) and on all rows; steady state = the extra rows over the
    extra time. `warm_up`: only the first run, unreported."""
    from dataclasses import replace

    cfg = replace(cfg, scoring=replace(cfg.scoring, num_actors=actors, cpus_per_actor=1.0))

    def timed(rows) -> float:
        t0 = time.perf_counter()
        n = len(
            ray_data.score_rows(
                rows,
                config=to_dict(cfg),
                sig=cfg.scoring,
                paths=paths,
                max_new_tokens=cfg.scoring.max_new_tokens,
            )
        )
        assert n == len(rows), f"{n} rows scored for {len(rows)} in"
        return time.perf_counter() - t0

    small = table.iloc[: actors * cfg.scoring.batch_size]
    first = timed(small)
    if warm_up:
        return {}
    total = timed(table)
    steady = (len(table) - len(small)) / (total - first) if total > first else float("nan")
    return {"total_s": total, "rows_per_s": len(table) / total, "first_s": first, "steady": steady}


def run(args) -> str:
    lines = []
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.num_cpus, dashboard_host="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_init = time.perf_counter() - t0
    print(f"ray.init: {ray_init:.1f} s", flush=True)
    rows_out = []
    described = {}
    warmed = False
    try:
        for size in args.sizes:
            cfg, tok, table, paths, scorer, teacher, n_params = prepare(size, args.rows, args.out)
            n = len(table)
            print(f"{size}: {n} rows, scorer {n_params / 1e6:.2f}M params", flush=True)
            described[size] = describe(cfg)
            plain1 = plain_loop(cfg, tok, table, scorer, teacher, threads=1)
            print(f"  plain 1 thread: {plain1}", flush=True)
            plain = plain_loop(cfg, tok, table, scorer, teacher, threads=torch.get_num_threads())
            print(f"  plain {torch.get_num_threads()} threads: {plain}", flush=True)
            label = f"{size} ({n_params / 1e6:.2f}M)"
            rows_out.append((label, n, "plain loop, 1 thread", plain1, None))
            rows_out.append(
                (label, n, f"plain loop, {torch.get_num_threads()} threads", plain, None)
            )
            if not warmed:  # once: start Ray's worker pool and fill the file cache
                ray_pool(cfg, table.iloc[: cfg.scoring.batch_size], paths, 1, warm_up=True)
                warmed = True
            for k in args.actors:
                r = ray_pool(cfg, table, paths, k)
                print(f"  ray {k} actor(s): {r}", flush=True)
                rows_out.append((label, n, f"Ray Data, {k} actor(s)", r, plain1))
    finally:
        ray.shutdown()
    load1 = os.getloadavg()[0]
    lines.append(
        "| scorer (params) | rows | how | total s | rows/s | fixed cost s | steady rows/s "
        "| vs plain 1 thread |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for label, n, how, r, base in rows_out:
        first = f"{r['first_s']:.1f}" if "first_s" in r else "-"
        steady = f"{r['steady']:.1f}" if "steady" in r else "-"
        ratio = f"{r['rows_per_s'] / base['rows_per_s']:.2f}x" if base else "-"
        lines.append(
            f"| {label} | {n} | {how} | {r['total_s']:.1f} | {r['rows_per_s']:.1f} | {first} "
            f"| {steady} | {ratio} |"
        )
    lines.append("")
    for size, text in described.items():
        lines.append(f"- {size}: {text}.")
    lines.append(
        f"- `ray.init` (local, {args.num_cpus} logical CPUs, dashboard on 127.0.0.1): "
        f"{ray_init:.1f} s, not included above. Machine: {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, ray {ray.__version__}; load average {load0:.1f} before, "
        f"{load1:.1f} after (other work on the machine inflates every number alike)."
    )
    return "\n".join(lines)


def write_section(body: str, command: str) -> Path:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = (
        f"{SECTION}\n\nMeasured with `{command}` ({time.strftime('%Y-%m-%d')}).\n"
        "Each size: the same rows (built-in tasks, training split), the same batches (sorted "
        "by length), the same saved models (random init), in one process run.\n\n"
        f"{body}\n\n"
        "Reading: Ray's fixed costs (`ray.init` once, then actor start and model load in every "
        "run) dominate small jobs on 2 cores, so the plain loop wins end to end on the tiny "
        "models. The pool's steady state matches or beats the plain loop, and two "
        "single-thread actors scale better than one two-thread process as the scorer grows: "
        "Ray pays off when rows x per-row cost is large next to the fixed cost, and with more "
        "cores, nodes or GPUs. The steady-state figure is a difference of two runs: read it as "
        "+-20 % on this shared machine.\n"
    )
    if SECTION in text:  # replace this section only; keep the others
        head, rest = text.split(SECTION, 1)
        nxt = rest.find("\n## ")
        text = head + section + ("\n" + rest[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    p.add_argument("--actors", nargs="+", type=int, default=[1, 2])
    p.add_argument("--rows", type=int, default=None, help="built-in records (default per size)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_score"))
    p.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = p.parse_args()
    body = run(args)
    print(body)
    if args.write:
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        print(f"wrote {write_section(body, command)}")


if __name__ == "__main__":
    main()
