"""The import layers of vitcraft: every module imports on its own, and the imports between modules form no cycle.

The graph is read from the source with ``ast``: an edge A -> B for each
``import vitcraft.B``, ``from vitcraft.B import name`` or ``from vitcraft import B``
(``from vitcraft import name`` of a non-module is an edge to the package,
``vitcraft/__init__.py``). Imports under ``if TYPE_CHECKING:`` never run and are
left out. Module-level imports run when A is imported; function-level (lazy)
ones when the function first runs, and a lazy import that closes a cycle only
hides it. ``vitcraft.cli`` is the one exception: it is the top of the graph and
imports its subcommands lazily so that ``vitcraft --help`` starts fast.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vitcraft

PACKAGE = Path(vitcraft.__file__).parent
ENTRY_POINT = "vitcraft.__main__"  # `python -m vitcraft`: importing it runs the CLI (its one import is vitcraft.cli)
LAZY_TOP = "vitcraft.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The vitcraft modules (or packages) an import statement of module ``importer`` imports."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "vitcraft"]
    if node.level:  # relative: from the importer's package, up level - 1 more
        package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if base.split(".")[0] != "vitcraft":
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def read_imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, lazy, line) for every vitcraft import in vitcraft's source."""
    found = []

    def walk(name: str, node: ast.AST, lazy: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.extend((name, target, lazy, node.lineno) for target in targets(node, name) if target != name)
            return
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        children = node.orelse if isinstance(node, ast.If) and is_type_checking(node.test) \
            else ast.iter_child_nodes(node)
        for child in children:
            walk(name, child, lazy)

    for name, path in MODULES.items():
        walk(name, ast.parse(path.read_text(), str(path)), False)
    return found


IMPORTS = read_imports()


def graph(lazy_too: bool) -> dict[str, dict[str, str]]:
    """{importer: {imported: "file:line"}}, module-level imports only unless ``lazy_too`` (cli's never)."""
    edges: dict[str, dict[str, str]] = {name: {} for name in MODULES}
    for importer, imported, lazy, line in IMPORTS:
        if not lazy or (lazy_too and importer != LAZY_TOP):
            where = f"{MODULES[importer].relative_to(PACKAGE.parent)}:{line}{' (in a function)' if lazy else ''}"
            edges[importer].setdefault(imported, where)
    return edges


def find_cycle(edges: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, then "done"
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def describe(cycle: list[str], edges: dict[str, dict[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}   [{edges[a][b]}]" for a, b in zip(cycle, cycle[1:]))


def reachable(edges: dict[str, dict[str, str]], start: str) -> dict[str, list[str]]:
    """{module: a path start, ..., module} for every module ``start`` imports directly or indirectly."""
    paths, todo = {start: [start]}, [start]
    while todo:
        node = todo.pop()
        for nxt in sorted(edges.get(node, {})):
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                todo.append(nxt)
    del paths[start]
    return paths


# --------------------------------------------------------------------------- the tests
def test_the_graph_reader_sees_the_imports_it_must():
    """The reader finds the kinds of import the other tests rely on (else they could pass on an empty graph)."""
    eager, lazy = graph(lazy_too=False), graph(lazy_too=True)
    assert len(MODULES) > 30 and {"vitcraft", "vitcraft.variants", "vitcraft.variants.swin"} <= MODULES.keys()
    assert "vitcraft.errors" in eager["vitcraft.state_dict"]  # from vitcraft.errors import ...
    assert "vitcraft.ops" in eager["vitcraft.model"]  # from vitcraft import ops: the module, not the package
    assert "vitcraft.variants.swin" in eager["vitcraft.variants"]
    assert "vitcraft.plots" in lazy["vitcraft.train"] and "vitcraft.plots" not in eager["vitcraft.train"]
    assert any(importer == LAZY_TOP and is_lazy for importer, _, is_lazy, _ in IMPORTS)
    assert not lazy[LAZY_TOP].keys() - eager[LAZY_TOP].keys()  # cli's lazy imports are left out
    triangle = {"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}
    assert find_cycle(triangle) == ["a", "b", "c", "a"]
    assert find_cycle({**triangle, "c": {}}) is None


def test_every_vitcraft_import_names_a_module_that_exists():
    """A lazy import of a module that was renamed fails only when its function runs: catch it here."""
    missing = [f"{MODULES[importer].relative_to(PACKAGE.parent)}:{line}: {imported}"
               for importer, imported, _, line in IMPORTS if imported not in MODULES]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first, in a process of its own, so no import works only after another.

    A fresh interpreter per module spends seconds importing torch each time
    (over 2 minutes for all on 2 cores), so one interpreter imports torch,
    which every vitcraft import starts with (vitcraft/__init__ imports it),
    and forks a child per module; no vitcraft module is loaded before the fork.
    """
    script = """
import importlib, json, os, sys, traceback
import torch
assert not [m for m in sys.modules if m.split(".")[0] == "vitcraft"], "vitcraft was imported before the fork"
names, running, codes = sys.argv[1:], {}, {}
while names or running:
    while names and len(running) < len(os.sched_getaffinity(0)):  # a child per core at a time
        name = names.pop(0)
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                sys.stderr.write(f"--- import {name}\\n{traceback.format_exc()}")
                sys.stderr.flush()
                os._exit(1)
            os._exit(0)
        running[pid] = name
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps(codes))
"""
    names = sorted(set(MODULES) - {ENTRY_POINT})
    done = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    codes = json.loads(done.stdout.splitlines()[-1])
    assert sorted(codes) == names
    failed = [name for name, code in codes.items() if code != 0]
    assert not failed, f"these modules do not import on their own: {failed}\n{done.stderr}"


def test_module_level_imports_form_no_cycle():
    edges = graph(lazy_too=False)
    cycle = find_cycle(edges)
    assert cycle is None, "a cycle of module-level imports:\n" + describe(cycle, edges)


def test_function_level_imports_close_no_cycle_outside_the_cli():
    edges = graph(lazy_too=True)
    cycle = find_cycle(edges)
    assert cycle is None, ("a cycle through function-level imports (a lazy import that hides a layering "
                           "problem; only vitcraft.cli may import lazily what imports it):\n" + describe(cycle, edges))


def test_state_dict_imports_only_the_errors():
    imported = {imported for importer, imported, _, _ in IMPORTS if importer == "vitcraft.state_dict"}
    assert imported == {"vitcraft.errors"}


@pytest.mark.parametrize("dependent", ["vitcraft.interop", "vitcraft.runs", "vitcraft.registry", "vitcraft.train",
                                       "vitcraft.cli"])
def test_model_does_not_import_what_builds_on_it(dependent):
    """model.py sits under hub.py's dependents: importing the model must not load them (nor may its functions)."""
    eager = graph(lazy_too=False)
    start = {**eager, "vitcraft.model": graph(lazy_too=True)["vitcraft.model"]}  # model's own lazy imports too
    path = reachable(start, "vitcraft.model").get(dependent)
    assert path is None, f"vitcraft.model imports {dependent}:\n" + describe(path, start)
    assert dependent not in reachable(eager, "vitcraft.hub")


# --------------------------------------------------------------------------- README's code map
README = Path(__file__).resolve().parents[1] / "README.md"


def code_map() -> list[list[str]]:
    """The modules of README's code map, row by row from the top: [["vitcraft.cli"], ["vitcraft.train"], ...].

    A row names its modules in backticks (``inference.py``, ``serve.py``);
    ``variants/`` stands for the package and its modules, ``cpu_kernels.py`` + ``.c`` for the one module.
    """
    text = README.read_text()
    table = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue  # prose, the header or the separator row
        names = [name for name in cells[1].split("`")[1::2] if name.endswith((".py", "/"))]
        modules = []
        for name in names:
            if name.endswith("/"):
                package = "vitcraft." + name.rstrip("/")
                modules += [module for module in MODULES if module == package or module.startswith(package + ".")]
            else:
                modules.append("vitcraft." + name.removesuffix(".py"))
        rows.append(modules)
    return rows


def test_readme_code_map_names_every_module_once():
    listed = [module for row in code_map() for module in row]
    assert len(listed) == len(set(listed)), "a module is listed twice in README's code map"
    assert set(listed) == set(MODULES) - {"vitcraft", ENTRY_POINT}, (
        f"README's code map and src/vitcraft differ: not listed {sorted(set(MODULES) - set(listed))}, "
        f"not a module {sorted(set(listed) - set(MODULES))}")


def test_imports_point_down_readme_code_map():
    """README says a module imports only modules in its own row or below it: hold it to that, lazy imports too."""
    row_of = {module: i for i, row in enumerate(code_map()) for module in row}
    row_of["vitcraft"] = -1  # the package's __init__ gathers the public names: it may import anything
    row_of[ENTRY_POINT] = -1
    upward = [f"{importer} (row {row_of[importer]}) imports {imported} (row {row_of[imported]}) "
              f"[{MODULES[importer].relative_to(PACKAGE.parent)}:{line}]"
              for importer, imported, _, line in IMPORTS if row_of[imported] < row_of[importer]]
    assert not upward, "imports that point up README's code map:\n" + "\n".join(upward)
