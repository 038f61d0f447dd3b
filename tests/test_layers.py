"""The layers of the code (docs/architecture.md): a module imports only from its own layer or
lower ones, and no modules import each other in a cycle. Every import counts, those inside
functions too: an import moved into a function to dodge a cycle is still a dependency.

    kernel    sim's specs, registries, plug-ins, config, models, data, the recorded view,
              checkpoints, records
    plug-ins  defenses, strategies
    attacks   attacks
    app       sim's Flower apps, the cloud, the client, the attack stage, the report, the CLI,
              sweeps; benchmarks and examples
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sim", "defenses", "strategies", "attacks", "benchmarks", "examples")
KERNEL = {"sim", "sim.spec", "sim.registry", "sim.plugins", "sim.config", "sim.models", "sim.decoders",
          "sim.data", "sim.view", "sim.checkpoint", "sim.records", "sim.memory", "sim.progress"}
LAYERS = {"kernel": 0, "defenses": 1, "strategies": 1, "attacks": 2, "sim": 3, "benchmarks": 3, "examples": 3}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> int:
    return LAYERS["kernel"] if module in KERNEL else LAYERS[module.split(".")[0]]


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in it (``from a import b`` counts as
    ``a.b`` when that is a module, else as ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


GRAPH = {m: imports(p, set(modules())) - {m} for m, p in modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_goes_up_a_layer(module):
    up = sorted(d for d in GRAPH[module] if layer(d) > layer(module))
    assert not up, f"{module} (layer {layer(module)}) imports higher layers: {up}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            # a package imports its own modules to register them: not a cycle of design
            if dep.startswith(module + "."):
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a kernel module that imports the app is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sim.run import main\n")
    assert "sim.run" in imports(bad, set(GRAPH)) and layer("sim.run") > layer("sim.config")
