"""The package's imports go one way: no module of llama/ imports, at any depth and in any
function, a module that imports it back. An import cycle makes the order of start-up matter and
hides which part depends on which.
Run: python3 -m pytest -q tests/test_layout.py
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llama"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set) -> set:
    """The package's modules that path imports anywhere in it (function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known and name != "llama"}


def import_graph() -> dict:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict):
    """One import cycle as [a, b, ..., a], or None (depth-first, colouring the modules)."""
    state, path = {}, []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for other in sorted(graph[name]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                cycle = visit(other)
                if cycle:
                    return cycle
        state[name] = "done"
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "llama.cli" in graph["llama.tools.plot"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The package's parts, lowest first: a module imports only from its own part or from a part
# below it. The top-level modules errors, cli, options and progress serve every part; prepare (join the
# job, load a stage, apply the run's transforms in order) serves training and serving alike;
# the tools sit above the runtime and are imported by no part of it.
LAYERS = ["errors", "cli", "options", "progress", "model", "formats", "tuning", "parallel",
          "prepare", "training", "serving", "tools"]


def layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    assert part in LAYERS, f"{module} belongs to no layer: add its part to LAYERS"
    return LAYERS.index(part)


def upward_imports(graph: dict) -> list:
    """[(importer, imported)] where a module imports from a part above its own."""
    return sorted((name, other) for name, others in graph.items() if name != "llama"
                  for other in others if layer_of(other) > layer_of(name))


def test_imports_only_go_down_the_layers():
    graph = import_graph()
    assert {layer_of(name) for name in graph if name != "llama"} == set(range(len(LAYERS)))
    assert upward_imports(graph) == [], "imports from a part above: " + ", ".join(
        f"{a} imports {b}" for a, b in upward_imports(graph))


def test_an_upward_import_is_found():
    graph = {"llama.model.quant": {"llama.training.data"}, "llama.training.data": set()}
    assert upward_imports(graph) == [("llama.model.quant", "llama.training.data")]


# ---- small where it is not the point ----

MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def code_lines(node) -> int:
    """A function's lines without its docstring (a script's docstring is its --help), classes
    and functions defined inside it included."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
            isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def oversized() -> list:
    found = []
    for path in [*PACKAGE.rglob("*.py"), *PACKAGE.parent.glob("*.py")]:
        text = path.read_text()
        name = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    code_lines(node) > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {code_lines(node)} lines")
    return found


def test_no_module_or_function_is_too_big_to_hold_in_mind():
    assert oversized() == []
