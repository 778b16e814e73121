"""The package's shape: no module imports, directly or through others, a module that imports it, and
ARCHITECTURE.md names every module on the floor its imports put it (read with `ast`, nothing imported)."""

import ast
import re

from conftest import REPO

PACKAGE = REPO / "happysad"


def imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its text, lazy imports inside functions included}."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("happysad"):
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("happysad.")}
        graph[name] = found & modules - {name}
    return graph


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """1 for a module that imports none of the package, else one above the highest it imports."""
    floor: dict[str, int] = {}

    def of(name: str, path: tuple[str, ...] = ()) -> int:
        assert name not in path, "import cycle: " + " -> ".join((*path, name))
        if name not in floor:
            floor[name] = 1 + max((of(n, (*path, name)) for n in graph[name]), default=0)
        return floor[name]

    for name in sorted(graph):
        of(name)
    return floor


def test_no_module_imports_one_that_imports_it():
    floors(imports())  # raises on the first cycle, naming it


def test_architecture_md_puts_every_module_on_its_floor():
    text = (REPO / "ARCHITECTURE.md").read_text()
    written = {m: int(f) for f, names in re.findall(r"^### Floor (\d+): (.+)$", text, re.M) for m in re.findall(r"`(\w+)\.py`", names)}
    assert written == floors(imports())
