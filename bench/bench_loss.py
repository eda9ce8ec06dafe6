"""KD loss memory and time at a real vocabulary: the authors' formulation against ours.

    python bench/bench_loss.py            # print the table
    python bench/bench_loss.py --write    # also update BENCHMARKS.md

Each method runs forward + backward of the KD term 3 times on the same inputs (V = 50,257 as
GPT-2, 8 x 512 tokens, float32, τ = 2) in each of REPEATS fresh processes: the extra peak
memory is a process's peak RSS after the runs minus its RSS with the inputs made (Linux
ru_maxrss; median and range over the processes), the time is the best run. Methods:

- authors: DistiLLM / POCL `forward_kl` (softmax of the teacher, log-softmax of the student,
  an inf mask, the product summed; a cross-entropy form: the teacher's entropy is left out,
  which changes the value, not the gradient), written here from their code;
- plain: our `kd_loss` on the plain autograd path (the default before the lean path);
- lean: our default from V >= 32k: loss and gradient chunk by chunk in one pass
  (`losses.lean_sum`), LEAN_CHUNK_ROWS (16) rows per chunk; lean-32 / lean-64 / lean-256: the
  same with loss.chunk_size=32 / 64 / 256.

Equality is checked on a smaller input (2 x 64 tokens, same V): value (after the τ² factor
and the teacher-entropy constant) and gradient of every method against the authors'.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pocl_ray import losses  # noqa: E402

V, SHAPE, TAU = 50257, (8, 512), 2.0
METHODS = ("authors", "plain", "lean", "lean-32", "lean-64", "lean-256")
REPEATS = 5


def authors_forward_kl(logits, teacher_logits, mask, tau):
    """DistiLLM's forward_kl (distillm/losses.py), with the temperature as POCL applies it."""
    teacher_probs = F.softmax(teacher_logits / tau, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(logits)
    logprobs = F.log_softmax(logits / tau, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_probs * logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = mask.view(-1).float()
    return -torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)


def run(method: str, s, t, mask):
    if method == "authors":
        return authors_forward_kl(s, t, mask, TAU)
    if method == "plain":
        losses.LEAN_VOCAB = 1 << 30  # the plain path at any vocabulary
        return losses.kd_loss(s, t, mask, kind="fkl", temperature=TAU)
    chunk = {"lean-32": 32, "lean-64": 64, "lean-256": 256}.get(method)
    return losses.kd_loss(s, t, mask, kind="fkl", temperature=TAU, chunk_size=chunk)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def measure(method: str) -> dict:
    """In this (fresh) process: extra peak memory and best time of `method`."""
    torch.manual_seed(0)
    s = torch.randn(*SHAPE, V).mul_(2).requires_grad_()  # in place: no transient peak
    t = torch.randn(*SHAPE, V).mul_(2)
    mask = torch.ones(SHAPE, dtype=torch.bool)
    small = (s.detach()[:1, :8].clone().requires_grad_(), t[:1, :8], mask[:1, :8])
    run(method, *small).backward()  # load kernels, allocator warm-up
    base = current_rss_gib()
    assert rss_gib() - base < 0.05, "a transient peak before the run would hide the method's"
    times = []
    for _ in range(3):
        s.grad = None
        t0 = time.perf_counter()
        run(method, s, t, mask).backward()
        times.append(time.perf_counter() - t0)
    return {"extra_gib": rss_gib() - base, "seconds": min(times)}


def equality() -> dict:
    """Every method's value and gradient against the authors' on 2 x 64 tokens."""
    torch.manual_seed(1)
    s0, t = torch.randn(2, 64, V) * 2, torch.randn(2, 64, V) * 2
    mask = torch.ones(2, 64, dtype=torch.bool)
    p = F.softmax(t / TAU, dim=-1)
    entropy = -(p * F.log_softmax(t / TAU, dim=-1)).sum(-1).mean()
    out = {}
    ref_val = ref_grad = None
    for method in METHODS:
        s = s0.clone().requires_grad_()
        value = run(method, s, t, mask)
        value.backward()
        if method == "authors":  # cross-entropy form, no τ²: KL = (CE - H(p)) · τ²
            value, grad = (value.detach() - entropy) * TAU**2, s.grad * TAU**2
            ref_val, ref_grad = value, grad
            continue
        out[method] = {
            "value_rel": abs(float(value.detach()) - float(ref_val)) / abs(float(ref_val)),
            "grad_rel": float((s.grad - ref_grad).norm() / ref_grad.norm()),
        }
    return out


def table(results: dict, eq: dict) -> str:
    one = SHAPE[0] * SHAPE[1] * V * 4 / 2**30
    a = results["authors"]
    lines = [
        f"V = {V:,}, {SHAPE[0]} x {SHAPE[1]} tokens, float32, τ = {TAU:g}, forward + backward; "
        f"one N x V float32 tensor = {one:.2f} GiB; memory: median (range) of {REPEATS} "
        "processes with MALLOC_MMAP_THRESHOLD_=4 MiB, time: best of {REPEATS} x 3 runs",
        "",
        "| method | extra peak memory | vs authors | time | vs authors "
        "| value / grad vs authors (rel) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for m in METHODS:
        r = results[m]
        eqs = "(reference)" if m == "authors" else (
            f"{eq[m]['value_rel']:.1e} / {eq[m]['grad_rel']:.1e}")  # fmt: skip
        lo, hi = r["extra_range"]
        lines.append(
            f"| {m} | {r['extra_gib']:.2f} GiB ({lo:.2f}–{hi:.2f}; "
            f"{r['extra_gib'] / one:.2f} x N x V) | "
            f"{r['extra_gib'] / a['extra_gib']:.2f}x | {r['seconds']:.2f} s | "
            f"{r['seconds'] / a['seconds']:.2f}x | {eqs} |"
        )
    return "\n".join(lines)


def write(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    start, end = "<!-- bench_loss -->", "<!-- /bench_loss -->"
    page = path.read_text(encoding="utf-8")
    block = (f"{start}\n## KD loss memory at V = 50,257 (`python bench/bench_loss.py --write`)"
             f"\n\n{text}\n{end}")  # fmt: skip
    if start in page:
        page = page[: page.index(start)] + block + page[page.index(end) + len(end) :]
    else:
        page = page.rstrip() + "\n\n" + block + "\n"
    path.write_text(page, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    results = {}
    # glibc returns a freed block to the system only above its mmap threshold, and it moves
    # that threshold as the process runs: the same method then peaks 0.8 or 1.3 GiB from run
    # to run. A fixed threshold makes every method's peak its live tensors; median of 3.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    for m in METHODS:
        runs = []
        for _ in range(REPEATS):
            out = subprocess.run([sys.executable, __file__, "--one", m], capture_output=True,
                                 text=True, check=True, env=env)  # fmt: skip
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[m] = {
            "extra_gib": statistics.median(r["extra_gib"] for r in runs),
            "extra_range": (min(r["extra_gib"] for r in runs), max(r["extra_gib"] for r in runs)),
            "seconds": min(r["seconds"] for r in runs),
        }
        print(f"{m}: {results[m]}", flush=True)
    text = table(results, equality())
    print(text)
    if args.write:
        write(text)


if __name__ == "__main__":
    main()
