"""The layering rule of docs/ARCHITECTURE.md, read from the code's own imports.

Every module of sait_tf belongs to a layer; a module may import only from its own layer or
a lower one, and the imports form no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sait_tf"

# Lowest first; a module's layer is that of the longest prefix listed (docs/ARCHITECTURE.md).
LAYERS = {
    "sait_tf.runtime": 0,
    "sait_tf.labels": 1, "sait_tf.images": 1, "sait_tf.losses": 1, "sait_tf.metrics": 1,
    "sait_tf.cli": 1,
    "sait_tf.data": 2, "sait_tf.models": 2,
    "sait_tf.evaluate": 3, "sait_tf.visualize": 3, "sait_tf.quality": 3, "sait_tf.run_dir": 3,
    "sait_tf.export": 4, "sait_tf.translate": 4, "sait_tf.predict": 4,
    "sait_tf.train": 5,
    "sait_tf.serving": 6, "sait_tf.tools": 6,
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not prefixes:
        raise AssertionError(f"{module} has no layer in LAYERS (docs/ARCHITECTURE.md)")
    return LAYERS[max(prefixes, key=len)]


def imports_of(path: pathlib.Path) -> set[str]:
    """The sait_tf modules ``path`` imports (``from sait_tf.x import y`` counts as x.y when
    x.y is a module, else x); imports inside functions and ``importlib.import_module`` of a
    literal name count too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return {name for name in found if name in MODULES} - {module_name(path)}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_only_to_the_same_or_a_lower_layer(module):
    upward = sorted(target for target in GRAPH[module]
                    if layer_of(target) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports from higher layers: {upward}"


def test_the_imports_form_no_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, path + [target])
        state[module] = "closed"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_rule_is_not_vacuous():
    """The reader finds the imports it must: a wrong parser would pass the two tests above."""
    assert "sait_tf.runtime.checkpoints" in GRAPH["sait_tf.run_dir"]
    assert "sait_tf.train.loop" in GRAPH["sait_tf.train.segmentation"]
    assert layer_of("sait_tf.train.loop") > layer_of("sait_tf.run_dir")
