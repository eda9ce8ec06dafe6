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
LEVELS = (1, 2, 3, 4, 5)


def _letters(rng: random.Random, k: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(k)]


def _digits(rng: random.Random, k: int) -> list[int]:
    return [rng.randrange(10) for _ in range(k)]


def _copy(rng: random.Random, level: int) -> tuple[str, str, str]:
    w = _letters(rng, level + 1)
    return "Repeat the letters exactly.", " ".join(w), " ".join(w)


def _reverse(rng: random.Random, level: int) -> tuple[str, str, str]:
    w = _letters(rng, level + 1)
    return "Write the letters in reverse order.", " ".join(w), " ".join(reversed(w))


def _sort(rng: random.Random, level: int) -> tuple[str, str, str]:
    d = _digits(rng, level + 1)
    return (
        "Sort the digits from smallest to largest.",
        " ".join(map(str, d)),
        " ".join(map(str, sorted(d))),
    )


def _count(rng: random.Random, level: int) -> tuple[str, str, str]:
    target = rng.choice("abc")
    w = [rng.choice("abcd") for _ in range(2 * level + 1)]
    instruction = f"How many times does the letter {target} appear?"
    return instruction, " ".join(w), str(w.count(target))


# (digits of a, digits of b) per level: more digits, more carries, longer answers
ADD_WIDTHS = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2), 5: (3, 3)}


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _add(rng: random.Random, level: int) -> tuple[str, str, str]:
    da, db = ADD_WIDTHS[level]
    a, b = _number(rng, da), _number(rng, db)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


FAMILIES: dict[str, Callable[[random.Random, int], tuple[str, str, str]]] = {
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "add": _add,
}


def generate(n: int, seed: int = 0) -> list[dict]:
    """`n` records, families and levels spread evenly, order shuffled, fully seeded.

    Duplicates (same instruction, context and response) are re-drawn so every record has a
    distinct sample id.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, str, str]] = set()
    out = []
    cells = [(f, lvl) for f in FAMILIES for lvl in LEVELS]
    exhausted: set[tuple[str, int]] = set()
    i = 0
    while len(out) < n:
        if len(exhausted) == len(cells):
            raise ValueError(f"only {len(out)} distinct built-in tasks exist; ask for fewer")
        family, level = cells[i % len(cells)]
        i += 1
        if (family, level) in exhausted:
            continue
        # small cells (2 letters from 8) run out of new items: after 200 failed draws in a
        # row, treat the cell as exhausted and let the others fill the rest
        for _ in range(200):
            item = FAMILIES[family](rng, level)
            if item not in seen:
                break
        else:
            exhausted.add((family, level))
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
