"""The house rule: a stage never imports another stage; what two stages share lives in a shared
package (common/, data/, model/), and only pipeline/ puts stages together."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "components")
SHARED = {"common", "data", "model"}


def _stages() -> list[str]:
    return sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and d not in SHARED
                  and not d.startswith("__"))


def _imported(path: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_stage_imports_another_stage():
    stages = _stages()
    assert {"select_subset", "preprocess", "train", "evaluate", "register", "predict"} <= set(stages)
    crossings = []
    for stage in stages:
        for folder, _, files in os.walk(os.path.join(ROOT, stage)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    for module in _imported(path):
                        parts = module.split(".")
                        if parts[0] == "components" and len(parts) > 1 and parts[1] in stages and parts[1] != stage:
                            crossings.append(f"{os.path.relpath(path, ROOT)} imports {module}")
    assert not crossings, "\n".join(crossings)


def test_shared_packages_import_no_stage():
    stages = _stages()
    for pkg in SHARED:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in (f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                bad = [m for m in _imported(path) if m.split(".")[:2][-1] in stages and m.startswith("components.")]
                assert not bad, f"{path} imports stage modules {bad}"


def test_no_two_modules_import_each_other():
    """No import cycle among our modules (a function-level import counts too: a cycle is a knot
    in what a module means, whenever it is tied)."""
    modules = {}
    for top in ("components", "pipeline"):
        base = os.path.join(ROOT, "..", top)
        for folder, _, files in os.walk(base):
            for name in (f for f in files if f.endswith(".py")):
                rel = os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, ".."))[:-3].replace(os.sep, ".")
                modules[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    graph = {m: {i for i in _imported(p) if i in modules and i != m} for m, p in modules.items()}
    cycles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert not cycles, cycles
