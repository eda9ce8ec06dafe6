"""The core never imports Ray (architecture.md): import every core module with ray blocked."""

import subprocess
import sys

CORE = [
    "config", "data", "models", "losses", "difficulty", "curriculum", "train_step",
    "evaluation", "signals", "tasks", "plain",
]  # fmt: skip

BLOCK = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"core module imported {name}")
sys.meta_path.insert(0, Block())
import importlib
for m in sys.argv[1:]:
    importlib.import_module("pocl_ray." + m)
assert not any(k == "ray" or k.startswith("ray.") for k in sys.modules), "ray got imported"
print("ok")
"""


def test_core_modules_import_without_ray():
    out = subprocess.run(
        [sys.executable, "-c", BLOCK, *CORE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_blocker_really_blocks():
    # the guard must fail when a module does import ray, or the test above proves nothing
    out = subprocess.run(
        [sys.executable, "-c", BLOCK.replace('"pocl_ray." + m', "m"), "ray"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "imported ray" in out.stderr
