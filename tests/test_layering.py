"""The package layers point one way (DESIGN §3): core → operators → methods → pipeline → cli.

Every import statement of every module (module level and inside functions) is read from its ``ast``
and resolved to a module of this repository; an import of a higher layer, an import of ``priors``
from ctrecon outside the one lazy hook, or a cycle between modules fails the test.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Rank of each layer; a module may import its own layer and lower ones. ``priors`` builds on the
#: Gaussian methods and is used by the pipeline only through the hook below.
LAYERS = {"ctrecon.core": 0, "ctrecon.operators": 1, "ctrecon.methods": 2, "priors": 2,
          "ctrecon.pipeline": 3, "ctrecon.cli": 4}
#: The one place where ctrecon (below the CLI) reaches the learned priors, lazily.
PRIOR_HOOK = "ctrecon.methods.gaussians.init"


def repository_modules() -> dict:
    """Module name → source path for every module of the ctrecon and priors packages."""
    modules = {}
    for package in ("ctrecon", "priors"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = repository_modules()


def imported_modules(name: str, path: Path) -> set:
    """Repository modules that ``name`` imports anywhere in its source (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in MODULES:  # "a.b.func" → "a.b"
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def layer_of(module: str):
    """(layer name, rank) of a module, or None for the package roots (``ctrecon``, ``priors`` facades)."""
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if layer_of(m) is None and m not in ("ctrecon", "priors")]
    assert not unplaced, f"modules outside the layers of DESIGN §3: {unplaced}"


def test_imports_point_down():
    upward = []
    for module, targets in GRAPH.items():
        source = layer_of(module)
        for target in targets:
            destination = layer_of(target)
            if source is None or destination is None:
                continue
            if destination == "priors" and source.startswith("ctrecon") and source != "ctrecon.cli" \
                    and module != PRIOR_HOOK:
                upward.append(f"{module} -> {target} (ctrecon reaches priors only through {PRIOR_HOOK})")
            elif LAYERS[destination] > LAYERS[source]:
                upward.append(f"{module} ({source}) -> {target} ({destination})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_the_package_facades_import_nothing_eagerly():
    """``import ctrecon`` stays cheap: the facade names its exports as strings and imports them on use."""
    assert GRAPH["ctrecon"] == set(), GRAPH["ctrecon"]


def strongly_connected_components(graph: dict) -> list:
    """Tarjan's algorithm (iterative); components with more than one module, or a self loop."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_no_import_cycles():
    # A package's __init__ re-exporting its submodules is not a cycle of logic: drop the edges from a
    # package to its own children before looking.
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in GRAPH.items()}
    cycles = strongly_connected_components(graph)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder_finds_cycles(graph, expected):
    assert strongly_connected_components(graph) == expected


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from ctrecon.core import errors\n    from .units import hu_to_unit\n")
    assert imported_modules("ctrecon.core.probe", source) == {"ctrecon.core", "ctrecon.core.errors",
                                                                "ctrecon.core.units"}
