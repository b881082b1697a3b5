"""The code's shape, checked: no import cycle in ntp_rl, a config schema that imports nothing of
the project, and no function too long to read."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ntp_rl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every ntp_rl module a file imports, at the top or inside a function (a lazy import is still a dependency)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from ntp_rl.config import schema` imports the submodule when it is one
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) - {name} for name, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}  # module -> "open" while on the search's stack, "done" after
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [module, target] if target in stack else [module, target])
            elif target not in state:
                visit(target, stack + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_can_fail(tmp_path):
    """A lazy import counts, and a cycle through it is found."""
    (tmp_path / "a.py").write_text("def f():\n    from ntp_rl.b import g\n")
    (tmp_path / "b.py").write_text("import ntp_rl.a\n")
    known = {"ntp_rl.a", "ntp_rl.b"}
    graph = {"ntp_rl.a": imports_of(tmp_path / "a.py", known), "ntp_rl.b": imports_of(tmp_path / "b.py", known)}
    assert graph == {"ntp_rl.a": {"ntp_rl.b"}, "ntp_rl.b": {"ntp_rl.a"}}
    assert find_cycles(graph) == [["ntp_rl.a", "ntp_rl.b", "ntp_rl.a"]]


def test_the_config_schema_is_a_leaf():
    graph = import_graph()
    assert graph["ntp_rl.config.schema"] == set(), "the schema must import nothing of ntp_rl"


def test_no_function_is_too_long_to_read():
    too_long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
