"""mmbridge's own imports form no circle: read from the source with `ast` (every import, at module level or inside a
function), so a new module that imports back up into one that imports it fails here, not at a user's first run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mmbridge"


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the mmbridge modules it imports (a package's `__init__` is the package's own name)."""
    modules = {}
    for file in root.rglob("*.py"):
        name = ".".join(file.relative_to(root.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = file
    graph = {m: set() for m in modules}
    for name, file in modules.items():
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
    return found


def test_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_mmbridge_imports_form_no_circle():
    graph = import_graph()
    assert len(graph) > 100 and "mmbridge.train.trainer" in graph  # the whole package was read
    assert circles(graph) == []


# The declared layer order, written once: a module may import its own layer and the layers below it, never one
# above. The bottom holds what every layer shares (errors, the registries, loss normalisation, log settings).
LAYERS = ("bottom", "config", "data", "models", "objectives", "train", "tools", "cli")
BOTTOM = {
    "mmbridge",
    "mmbridge.core",
    "mmbridge.device",
    "mmbridge.registry",
    "mmbridge.loss_norm",
    "mmbridge.log_settings",
}
# packages by layer; LCL is one method across the layers, so its modules are placed one by one
PLACES = {
    "config": "config",
    "recipe_reference": "config",  # the recipe reference page, generated from the schema
    "machine": "bottom",
    "data": "data",
    "models": "models",
    "runs": "models",  # a run directory read back: its recipe, its model built and loaded
    "objectives": "objectives",
    "train": "train",
    "eval": "tools",
    "interop": "tools",
    "serve": "tools",
    "cli": "cli",
    "demo": "cli",
    "__main__": "cli",
    "lcl": "data",  # lcl/__init__, sequence, readers, data: documents laid out as sequences
    "lcl.model": "models",
    "lcl.loss": "objectives",
    "lcl.task": "train",
}


def layer_of(module: str) -> int:
    if module in BOTTOM:
        return 0
    parts = module.split(".")[1:]
    place = PLACES.get(".".join(parts[:2])) or PLACES[parts[0]]
    return LAYERS.index(place)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_an_import_up_the_layers_is_found():
    graph = {"mmbridge.data.x": {"mmbridge.models.y", "mmbridge.core"}, "mmbridge.models.y": {"mmbridge.data.x"}}
    assert upward_imports(graph) == ["mmbridge.data.x -> mmbridge.models.y"]
    assert layer_of("mmbridge.lcl.task") == LAYERS.index("train") and layer_of("mmbridge.lcl.readers") == 2


def test_every_import_keeps_the_layer_order():
    graph = import_graph()
    assert all(layer_of(m) >= 0 for m in graph)  # every module has a declared place
    assert upward_imports(graph) == []
