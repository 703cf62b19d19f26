"""The house: imports flow one way, private APIs of other libraries live in one module, rooms stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "launcher"
MAX_LINES = 500
# Rooms allowed past MAX_LINES, each with the reason.
LARGE_ROOMS: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The launcher modules ``name`` imports anywhere in its file, deferred imports inside functions included (a
    deferred import is still a dependency: it only hides a circle until the function runs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from launcher.data import stream`` imports the module launcher.data.stream
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_imports_flow_one_way():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    # A package's __init__ re-exports its rooms; a room importing a sibling through the package is an edge to it.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_deferred_circle(tmp_path):
    """The circle check above can fail: a deferred import that closes a circle is found."""
    (tmp_path / "a.py").write_text("import launcher.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from launcher import a\n")
    known = {"launcher.a", "launcher.b", "launcher"}
    assert imports_of("launcher.a", tmp_path / "a.py", known) == {"launcher.b"}
    assert imports_of("launcher.b", tmp_path / "b.py", known) == {"launcher.a"}


# Reaching into another library's internals, or replacing its functions for the whole process.
PRIVATE = [
    "_set_pg_timeout",
    "_shutdown_workers",
    "_option_string_actions",
    "_zero3_consolidated_16bit_state_dict",
    "HF_UPDATE_DOWNLOAD_COUNTS =",
    "__class__ =",
    "sys.argv =",
    "torch.load =",
    "torch.save =",
    "layer.forward =",
    "._attn_implementation",
]


@pytest.mark.parametrize("needle", PRIVATE)
def test_private_apis_live_only_in_compat(needle):
    users = [
        str(path.relative_to(PACKAGE.parent))
        for name, path in modules().items()
        if name != "launcher.compat" and needle in path.read_text()
    ]
    assert not users, f"{needle!r} outside launcher/compat.py: {users}"


def test_no_room_is_larger_than_it_should_be():
    big = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(PACKAGE.parent)) not in LARGE_ROOMS
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_only_the_engine_package_branches_on_the_engine():
    """``parallel.engine`` is read outside ``launcher/engine/`` only to pick the engine's plan or to print it."""
    offenders = []
    for name, path in modules().items():
        if name.startswith("launcher.engine") or name.startswith("launcher.config"):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if ".engine ==" in line or ".engine !=" in line or "stage3" in line or "zero_optimization" in line:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {line.strip()}")
    assert not offenders, "engine decisions outside launcher/engine/:\n" + "\n".join(offenders)
