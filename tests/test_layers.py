"""The harness's import graph has no cycle, and each layer imports only its own layer and the ones below it.

The graph is read from the source with `ast`, so it holds every import a module can make: at module level,
inside functions, relative ones resolved, and modules named in a string for importlib (the methods registry's
lazy `"module:Class"` map, `python -m harness.worker`). Importing `harness.methods.base` first runs
`harness/methods/__init__.py`, so it is an import of the package `harness.methods` too, unless the importer
is inside that package already.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "harness"

# Lowest first. A module may import modules of its own layer and of layers below it, never of one above. A name
# is a module's first part below `harness`: `measure` is harness.measure and every module in it. The package's
# own `__init__` sits below every layer. A runner that needs no pytest belongs with the worker.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matrix spec and leaf types", ("cache", "config", "corpus", "figure", "hardware", "metrics", "tolerances",
                                    "values")),
    ("models and their files", ("compressed", "embedded", "exl2", "exl2_convert", "gguf", "gguf_model",
                                "llmcompressor_oneshot", "models", "quant", "roofline")),
    ("measurements and methods", ("evaluate", "measure", "methods", "runtimes")),
    ("the matrix file read and checked against the methods", ("matrix",)),
    ("results", ("history", "results")),
    ("baselines", ("baselines", "report")),
    ("gate", ("calibration", "gate")),
    ("runner", ("isolation", "runner", "worker")),
    ("front ends", ("cli", "plugin")),
)

# A string that is exactly a module path, with an optional `:attribute` (the methods registry's entries).
_MODULE_STRING = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?::[A-Za-z_]\w*)?$")


@dataclass(frozen=True)
class Import:
    """One edge of the graph: `source` imports `target`, at `path` (from the package's parent):`line`.

    `loading` is the module whose import runs the package `target` first, if that is how the edge arises.
    """

    source: str
    target: str
    path: Path
    line: int
    loading: str | None = None

    def __str__(self) -> str:
        how = f" (loading {self.loading})" if self.loading else ""
        return f"{self.path}:{self.line}: {self.source} imports {self.target}{how}"


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package at `root`, by dotted name; a package is named by its `__init__.py`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def _resolve(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute name of what `from ... import` reads from, relative levels resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    # `from . import x` in a package's __init__ means the package itself; in a module, the module's package.
    drop = node.level - 1 if path.name == "__init__.py" else node.level
    if drop >= len(base):
        raise ValueError(f"{path}:{node.lineno}: relative import goes beyond the top-level package")
    base = base[: len(base) - drop]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path], shown: Path) -> list[Import]:
    """Every import of `module` (at any depth of its source) whose target is a module of `modules`.

    `shown` is the path that messages give for the file.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()

    def known(name: str) -> str | None:
        # `import harness.measure.device` loads that module; a name inside a module is an import of the module.
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(node, module, shown)
            # `from harness import embedded` imports the module harness.embedded; `from x import name`, x.
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.match(node.value)
            if match and match.group(1) in modules:
                targets = [match.group(1)]
        for target in targets:
            resolved = known(target)
            if resolved is None or resolved == module:
                continue
            found.add(Import(module, resolved, shown, node.lineno))
            package = resolved.rpartition(".")[0]
            while package and not f"{module}.".startswith(f"{package}."):
                found.add(Import(module, package, shown, node.lineno, loading=resolved))
                package = package.rpartition(".")[0]
    return sorted(found, key=lambda edge: (edge.line, edge.target))


def import_graph(root: Path, package: str) -> dict[str, list[Import]]:
    """The package's modules, each with the imports it makes of the package's other modules."""
    modules = modules_of(root, package)
    return {module: imports_of(module, path, modules, path.relative_to(root.parent))
            for module, path in modules.items()}


def find_cycle(graph: dict[str, list[Import]]) -> list[Import] | None:
    """One import cycle of the graph, as the edges that close it, or None when the graph has none."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        # Depth first with explicit stacks: `nodes` from `start` to the module being read, `path` the edges
        # between them, `on_path` where each module of `nodes` starts in `path`.
        nodes, path, on_path = [start], [], {start: 0}
        pending = [iter(graph[start])]
        while pending:
            edge = next(pending[-1], None)
            if edge is None:
                pending.pop()
                finished = nodes.pop()
                del on_path[finished]
                done.add(finished)
                if path:
                    path.pop()
            elif edge.target in on_path:
                return path[on_path[edge.target]:] + [edge]
            elif edge.target not in done and edge.target in graph:
                path.append(edge)
                nodes.append(edge.target)
                on_path[edge.target] = len(path)
                pending.append(iter(graph[edge.target]))
    return None


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> int | None:
    """The index of the layer `module` belongs to (-1 for the top-level package), or None when in none."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    for index, (_, names) in enumerate(layers):
        if parts[1] in names:
            return index
    return None


def layer_violations(graph: dict[str, list[Import]],
                     layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> list[str]:
    """Every module in no layer, and every import of a higher layer, each as a line naming file and line."""
    problems = []
    for module in sorted(graph):
        if layer_of(module, layers) is None:
            problems.append(f"{module} is in no layer: add {module.split('.')[1]!r} to LAYERS in {__file__}")
    for module in sorted(graph):
        low = layer_of(module, layers)
        for edge in graph[module]:
            high = layer_of(edge.target, layers)
            if low is not None and high is not None and high > low:
                problems.append(f"{edge}: layer {layers[low][0]!r} imports the higher layer {layers[high][0]!r}")
    return problems


def describe(cycle: list[Import]) -> str:
    """A cycle as the chain of its imports, one per line."""
    chain = " -> ".join([cycle[0].source, *(edge.target for edge in cycle)])
    return chain + "\n" + "\n".join(f"  {edge}" for edge in cycle)


def test_the_harness_has_no_import_cycle():
    cycle = find_cycle(import_graph(HARNESS, "harness"))
    assert cycle is None, f"import cycle: {describe(cycle)}"


def test_each_layer_imports_only_its_own_and_lower_layers():
    problems = layer_violations(import_graph(HARNESS, "harness"))
    assert not problems, "\n".join(problems)


def test_every_name_in_the_layers_is_a_harness_module():
    modules = {module.split(".")[1] for module in modules_of(HARNESS, "harness") if "." in module}
    named = [name for _, names in LAYERS for name in names]
    assert len(named) == len(set(named)), "a name appears in two layers"
    assert sorted(set(named) - modules - {"runner"}) == []


def test_the_graph_holds_function_level_relative_and_registry_imports():
    graph = import_graph(HARNESS, "harness")
    targets = {module: {edge.target for edge in edges} for module, edges in graph.items()}
    assert "harness.embedded" in targets["harness.models"]  # `from harness import embedded` inside a function
    assert "harness.methods.gguf" in targets["harness.methods"]  # the registry's "module:Class" string
    assert "harness.worker" in targets["harness.isolation"]  # `python -m harness.worker`
    assert "harness.measure.consistency" in targets["harness.worker"]  # `from harness.measure import consistency`


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_cycle_through_a_function_level_relative_import(tmp_path):
    root = _package(tmp_path / "pkg", {
        "__init__.py": "",
        "spec.py": "import os\n",
        "sub/__init__.py": "from . import low\n",
        "sub/low.py": "def f():\n    from ..high import g\n    return g\n",
        "high.py": "from pkg.spec import os\nfrom .sub.low import f\n",
    })
    graph = import_graph(root, "pkg")
    assert {edge.target for edge in graph["pkg.sub"]} == {"pkg.sub.low"}
    assert {edge.target for edge in graph["pkg.high"]} == {"pkg.spec", "pkg.sub", "pkg.sub.low"}
    cycle = find_cycle(graph)
    assert cycle is not None
    assert describe(cycle) == (
        "pkg.high -> pkg.sub -> pkg.sub.low -> pkg.high\n"
        "  pkg/high.py:2: pkg.high imports pkg.sub (loading pkg.sub.low)\n"
        "  pkg/sub/__init__.py:1: pkg.sub imports pkg.sub.low\n"
        "  pkg/sub/low.py:2: pkg.sub.low imports pkg.high"
    )


def test_the_checker_names_an_upward_import_and_a_module_in_no_layer(tmp_path):
    root = _package(tmp_path / "pkg", {
        "__init__.py": "",
        "spec.py": "def f():\n    import pkg.front as front\n    return front\n",
        "front.py": "",
        "loose.py": "from pkg import spec\n",
    })
    graph = import_graph(root, "pkg")
    assert find_cycle(graph) is None
    layers = (("spec", ("spec",)), ("front ends", ("front",)))
    assert layer_violations(graph, layers) == [
        f"pkg.loose is in no layer: add 'loose' to LAYERS in {__file__}",
        "pkg/spec.py:2: pkg.spec imports pkg.front: layer 'spec' imports the higher layer 'front ends'",
    ]


def test_the_checker_finds_a_cycle_through_a_package_that_an_import_runs_first(tmp_path):
    root = _package(tmp_path / "pkg", {
        "__init__.py": "",
        "sub/__init__.py": "from . import a\n",
        "sub/a.py": "from pkg import other\n",
        "sub/b.py": "",
        "other.py": "import pkg.sub.b\n",
    })
    graph = import_graph(root, "pkg")
    assert sorted(map(str, graph["pkg.other"])) == ["pkg/other.py:1: pkg.other imports pkg.sub (loading pkg.sub.b)",
                                                    "pkg/other.py:1: pkg.other imports pkg.sub.b"]
    assert {edge.target for edge in graph["pkg.sub.a"]} == {"pkg.other"}  # pkg itself is already loaded
    cycle = find_cycle(graph)
    assert cycle is not None
    assert {(edge.source, edge.target) for edge in cycle} == {("pkg.sub", "pkg.sub.a"), ("pkg.sub.a", "pkg.other"),
                                                               ("pkg.other", "pkg.sub")}


def test_a_relative_import_beyond_the_package_is_refused(tmp_path):
    root = _package(tmp_path / "pkg", {"__init__.py": "from .. import other\n"})
    with pytest.raises(ValueError, match=r"^pkg/__init__\.py:1: relative import goes beyond the top-level package$"):
        import_graph(root, "pkg")
