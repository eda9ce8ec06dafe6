"""The import rules of architecture.md ("Boundaries"), read from the source (AST), plus the one
entry point: `pocl-ray` and `python -m jobs` are the same command and run each module once.

- pocl_ray never imports jobs;
- a job imports another job only to call its `main` (jobs.runtime is shared by all);
- no import cycle among the project's modules (module-level and function-level imports alike:
  a cycle through a lazy import is still a tangle).
"""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pocl_ray", "jobs")
SHARED = {"jobs.runtime"}
"""Job modules every job may use freely."""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {
        module_name(p): ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).glob("*.py"))
    }


def imported(tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules a module imports anywhere in its body: `import a.b`, `from a import b`
    (b a module when a.b is one), `from a.b import c`."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    out.add(f"{node.module}.{a.name}")
                elif node.module in known:
                    out.add(node.module)
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imported(tree, known) - {name} for name, tree in trees.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source():
    edges = graph()
    assert "jobs.runtime" in edges["jobs.score"] and "pocl_ray.scores" in edges["jobs.score"]
    assert "pocl_ray.config" in edges["pocl_ray.loop"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_anywhere():
    assert find_cycle(graph()) is None


def test_pocl_ray_never_imports_jobs():
    bad = {m: sorted(d for d in deps if d.startswith("jobs")) for m, deps in graph().items()
           if m.startswith("pocl_ray")}  # fmt: skip
    assert {m: d for m, d in bad.items() if d} == {}


def test_a_job_uses_another_job_only_through_its_main():
    trees = modules()
    jobs = {m for m in trees if m.startswith("jobs.") and m not in SHARED | {"jobs.__main__"}}
    problems = []
    for name in sorted(jobs):
        tree = trees[name]
        aliases = {}  # local name -> other job module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "jobs":
                aliases |= {a.asname or a.name: f"jobs.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module in jobs - {name}:
                problems.append(f"{name}: from {node.module} import ...")
        others = {k: v for k, v in aliases.items() if v in jobs and v != name}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in others and node.attr != "main":
                    problems.append(f"{name}: {node.value.id}.{node.attr}")
    assert problems == []


def test_the_command_is_python_m_jobs():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"pocl-ray": "jobs.__main__:main"}
    demo = str(ROOT / "configs" / "demo.yaml")
    via_m = subprocess.run([sys.executable, "-m", "jobs", "validate", demo], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert via_m.returncode == 0 and via_m.stdout.strip().endswith("valid")
    script = Path(sys.executable).with_name("pocl-ray")
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e . puts it there)")
    via_script = subprocess.run([str(script), "validate", demo], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
    assert (via_script.returncode, via_script.stdout) == (0, via_m.stdout)


def test_python_m_jobs_runs_each_module_once():
    """`python -m jobs` runs jobs/__main__.py as __main__; nothing may import it again as
    jobs.__main__ (a second copy of every global), and no file may be loaded twice."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['jobs', 'validate', 'configs/demo.yaml']\n"
        "try:\n"
        "    runpy.run_module('jobs', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "import jobs.score, jobs.distill, jobs.evaluate, jobs.sft, jobs.pipeline\n"
        "files = [getattr(m, '__file__', None) for m in list(sys.modules.values())]\n"
        "ours = [f for f in files if f and ('/jobs/' in f or '/pocl_ray/' in f)]\n"
        "assert len(ours) == len(set(ours)), sorted(f for f in ours if ours.count(f) > 1)\n"
        "assert 'jobs.__main__' not in sys.modules\n"
        "print('once', len(ours))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].startswith("once")
