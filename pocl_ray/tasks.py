"""The built-in task set of the embedded default: seeded instruction/response pairs with a known
difficulty level, in the Dolly schema (instruction, context, response, category) plus `level`.

Each family has levels 1 (easy) to 5 (hard); the level sets the length of what must be
transformed, so harder items need longer exact outputs. Items are written with single spaces
between symbols so that every symbol is its own token: tiny models can then learn the tasks
in minutes on a CPU, and the hard levels stay hard for a much smaller student.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

LETTERS = "abcdefgh"  # a small alphabet: tiny models learn the symbols fast


def _letters(rng: random.Random, k: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(k)]


def _digits(rng: random.Random, k: int) -> list[int]:
    return [rng.randrange(10) for _ in range(k)]


def _copy(rng: random.Random, size: int) -> tuple[str, str, str]:
    w = _letters(rng, size)
    return "Repeat the letters exactly.", " ".join(w), " ".join(w)


def _reverse(rng: random.Random, size: int) -> tuple[str, str, str]:
    w = _letters(rng, size)
    return "Write the letters in reverse order.", " ".join(w), " ".join(reversed(w))


def _sort(rng: random.Random, size: int) -> tuple[str, str, str]:
    d = _digits(rng, size)
    return (
        "Sort the digits from smallest to largest.",
        " ".join(map(str, d)),
        " ".join(map(str, sorted(d))),
    )


def _count(rng: random.Random, size: int) -> tuple[str, str, str]:
    target = rng.choice("abc")
    w = [rng.choice("abcd") for _ in range(size)]
    instruction = f"How many times does the letter {target} appear?"
    return instruction, " ".join(w), str(w.count(target))


# (digits of a, digits of b) per add size: more digits, more carries, longer answers
ADD_WIDTHS = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2), 5: (3, 3), 6: (4, 3)}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _add(rng: random.Random, size: int) -> tuple[str, str, str]:
    da, db = ADD_WIDTHS[size]
    a, b = _number(rng, da), _number(rng, db)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


FAMILIES: dict[str, Callable[[random.Random, int], tuple[str, str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "add": _add,
}


LEVEL_SIZES: dict[str, dict[int, tuple[int, ...]]] = {
    "copy": {1: (2, 3), 2: (4, 5), 3: (7, 9), 4: (6, 8)},
    "sort": {1: (2, 3), 2: (4, 5, 6)},
    "reverse": {2: (3, 4), 3: (2, 5, 6), 4: (7, 8, 9)},
    "count": {3: (3,), 4: (5,), 5: (7, 9, 11)},
    "add": {4: (2,), 5: (1, 3, 4, 5, 6)},
}
"""Each family's levels and the sizes that make them (symbols to copy, reverse or sort,
letters to count, or the row of ADD_WIDTHS). Calibrated, not assumed: a level is a band of
measured difficulty, the same bands for every family (`bench/calibrate_tasks.py`: mean
held-out response NLL of the demo's teacher and student after SFT on every size, 3 seeds;
level 1 < 0.35 nats, 2 < 0.7, 3 < 1.15, 4 < 1.7, 5 above). So a family spans only the levels
its sizes reach: sorting digits stays easy at any length, addition is hard at any width."""

CALIBRATION_SIZES: dict[str, tuple[int, ...]] = {
    "copy": tuple(range(2, 10)),
    "reverse": tuple(range(2, 10)),
    "sort": tuple(range(2, 11)),
    "count": tuple(range(3, 14, 2)),
    "add": tuple(ADD_WIDTHS),
}
"""Every size `bench/calibrate_tasks.py` measures (`grid`): the candidates for LEVEL_SIZES."""

Cell = tuple[str, int, int]
"""(family, level, size)."""


def level_cells() -> list[Cell]:
    return [(f, lvl, size) for f, levels in LEVEL_SIZES.items()
            for lvl, sizes in levels.items() for size in sizes]  # fmt: skip


def grid_cells() -> list[Cell]:
    """Every calibration size of every family; `level` is the size's index (1-based)."""
    return [
        (f, i + 1, size) for f, sizes in CALIBRATION_SIZES.items() for i, size in enumerate(sizes)
    ]


def generate(n: int, seed: int = 0, cells: list[Cell] | None = None) -> list[dict]:
    """`n` records spread evenly over `cells` (default: the levels of LEVEL_SIZES), order
    shuffled, fully seeded. Each record also carries its `size`.

    Duplicates (same instruction, context and response) are re-drawn so every record has a
    distinct sample id.
    """
    cells = level_cells() if cells is None else cells
    rng = random.Random(seed)
    seen: set[tuple[str, str, str]] = set()
    out = []
    exhausted: set[Cell] = set()
    i = 0
    while len(out) < n:
        if len(exhausted) == len(cells):
            raise ValueError(f"only {len(out)} distinct built-in tasks exist; ask for fewer")
        cell = cells[i % len(cells)]
        i += 1
        if cell in exhausted:
            continue
        family, level, size = cell
        # small cells (2 letters from 8) run out of new items: after 200 failed draws in a
        # row, treat the cell as exhausted and let the others fill the rest
        for _ in range(200):
            item = FAMILIES[family](rng, size)
            if item not in seen:
                break
        else:
            exhausted.add(cell)
            continue
        seen.add(item)
        instruction, context, response = item
        out.append(
            {
                "instruction": instruction,
                "context": context,
                "response": response,
                "category": family,
                "level": level,
                "size": size,
            }
        )
    rng.shuffle(out)
    return out


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """Write atomically: concurrent Tune trials rewrite the same file while others read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
