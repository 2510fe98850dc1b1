"""The floors of the code (docs/layout.md): every import, lazy or not, points down or
sideways, and only the codec knows the positions of the Lua functions' keys and replies
(the bench's frozen library, bench data, is called by the bench itself)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("charging", "producer", "worker")
# Lowest first. A module may import modules of its own floor and the floors below.
FLOORS = [
    ("contract", ("charging",)),
    ("clients and worker", ("producer", "worker")),
    ("app", ("charging.app",)),
    ("tools", ("charging.tools",)),
    ("roof", ("charging.cli", "charging.__main__")),
]
CODEC = "charging.codec"
# The bench's frozen library (charging/tools/bench/baseline.lua) is not the product's
# contract: the one FCALL of it sits beside it, and reads no reply.
FROZEN_CALLER = "charging.tools.bench.baseline"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def floor(module: str) -> int:
    """The floor of the longest prefix that names module."""
    best, level = -1, -1
    for number, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), number
    return level


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import of the project's own modules, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.append((node.lineno, name if name in MODULES else node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def test_every_module_has_a_floor():
    assert all(floor(module) >= 0 for module in MODULES)
    assert len(MODULES) > 40, "the walk found too few modules"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    tree = ast.parse(MODULES[module].read_text())
    upward = [f"line {line}: {name} ({FLOORS[floor(name)][0]})"
              for line, name in imported(tree) if floor(name) > floor(module)]
    assert not upward, f"{module} ({FLOORS[floor(module)][0]}) imports upward: {upward}"


def test_the_floor_check_catches_a_lazy_upward_import():
    tree = ast.parse("def f():\n    from charging.tools.bench.run import run_bench\n")
    [(_, name)] = imported(tree)
    assert floor(name) > floor("charging.app.cli")


@pytest.mark.parametrize("module", sorted(set(MODULES) - {CODEC}))
def test_only_the_codec_knows_the_lua_contract(module):
    """No FCALL and no indexing of a reply outside the codec: positions live in one place."""
    tree = ast.parse(MODULES[module].read_text())
    fcalls = [node.lineno for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr == "fcall"]
    indexed = [node.lineno for node in ast.walk(tree)
               if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
               and isinstance(node.value, ast.Name) and "repl" in node.value.id]
    allowed = 1 if module == FROZEN_CALLER else 0
    assert len(fcalls) <= allowed, f"{module} calls fcall on lines {fcalls}; go through charging.codec"
    assert not indexed, f"{module} indexes a reply on lines {indexed}; parse it with charging.codec"


def test_the_wheel_installs_no_generic_top_level_packages():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]) == sorted(PACKAGES)
    assert any(dep.startswith("numpy") for dep in project["project"]["optional-dependencies"]["bench"])


def test_bench_without_its_extra_says_how_to_install_it_in_one_line(tmp_path):
    """numpy hidden as if the [bench] extra were not installed."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['numpy'] = None; sys.argv = ['charging', 'bench', '--quick']\n"
              "from charging.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: charging bench needs numpy, which comes with the bench extra: pip install 'redis-charging[bench]'"]


def test_lua_holds_the_product_only():
    """The bench's frozen library is bench data: it sits in the bench's package, which the
    wheel carries with the bench's modules, and lua/ keeps the one library the engine loads."""
    assert sorted(path.name for path in (ROOT / "lua").iterdir()) == ["charging.lua"]
    assert (ROOT / "charging" / "tools" / "bench" / "baseline.lua").is_file()
