"""The import graph of stereo_kd_core and stereo_kd_ros, read from the code (ast, nothing imported):
no two modules import each other (directly or in a loop), no import runs from a lower layer up to a
higher one (DESIGN.md), the ROS layer uses only the seam, geometry and the data readers, and no
product file exceeds 600 lines (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stereo_kd_core", "stereo_kd_ros")
MAX_LINES = 600

# DESIGN.md's layers, bottom (0) to top; a module may import its own layer and those below.
# The most specific prefix wins; a module that none names fails the test until it gets a layer.
CORE_LAYERS = {
    "stereo_kd_core.models": 0, "stereo_kd_core.geometry": 0, "stereo_kd_core.rectification": 0,
    "stereo_kd_core.row_alignment": 0,
    "stereo_kd_core.metrics": 0, "stereo_kd_core.backend_choice": 0,
    "stereo_kd_core.checkpoint": 1, "stereo_kd_core.registry": 1, "stereo_kd_core.teachers": 1,
    # the seam (the package's __init__ exports it), its backends and its loader; distillation
    "stereo_kd_core": 2, "stereo_kd_core.estimator_base": 2, "stereo_kd_core.sgbm_estimator": 2,
    "stereo_kd_core.network_estimator": 2, "stereo_kd_core.onnx_runtime": 2, "stereo_kd_core.estimator": 2,
    "stereo_kd_core.distill": 2,
    "stereo_kd_core.data": 3, "stereo_kd_core.viz": 3,
    "stereo_kd_core.train": 4, "stereo_kd_core.evaluate": 4, "stereo_kd_core.export": 4,
    "stereo_kd_core.quantize": 4, "stereo_kd_core.bench": 4,
    "stereo_kd_core.cli": 5, "stereo_kd_core.__main__": 5,
    "stereo_kd_ros": 5,  # beside the command line
}
ROS_MAY_USE_UP_TO = 3  # stereo_kd_ros uses the seam, geometry and the data readers: nothing above `data`


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `path` imports, at module level or inside functions. `from a import b`
    counts as importing a.b when that is a module, and a itself (whose __init__ runs)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def layer_of(module: str) -> int | None:
    for prefix in sorted(CORE_LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return CORE_LAYERS[prefix]
    return None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None:
            problems.append(f"{module} has no layer: add it to CORE_LAYERS (DESIGN.md)")
            continue
        for target in sorted(targets):
            target_layer = layer_of(target)
            if target_layer is None:
                continue  # reported as a module of its own
            if target_layer > layer:
                problems.append(f"{module} (layer {layer}) imports {target} (layer {target_layer}): upward")
            elif (module.startswith("stereo_kd_ros") and target.startswith("stereo_kd_core")
                  and target_layer > ROS_MAY_USE_UP_TO):
                problems.append(f"{module} imports {target}: the ROS layer uses only the seam, geometry and "
                                "the data readers")
    return problems


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_run_downwards():
    assert layering_violations(import_graph()) == []


def test_no_product_file_over_600_lines():
    long = {str(path.relative_to(REPO)): n for path in project_modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_finds_cycles_and_upward_imports():
    """The checks themselves catch what they claim to (a loop of three, an upward import)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    upward = {"stereo_kd_core.models.dsnet": {"stereo_kd_core.train.trainer"}, "stereo_kd_core.train.trainer": set()}
    assert layering_violations(upward) == [
        "stereo_kd_core.models.dsnet (layer 0) imports stereo_kd_core.train.trainer (layer 4): upward"]
    ros = {"stereo_kd_ros.player": {"stereo_kd_core.evaluate"}, "stereo_kd_core.evaluate": set()}
    assert "the ROS layer uses only" in layering_violations(ros)[0]
