"""The package's import graph: no cycle among megatron_spava modules, and nothing in
megatron_spava/ imports the command-line tools of tools/.

Read with `ast` from the source (nothing is imported). Every import statement counts:
module-level ones and those inside functions alike (a function-level import that closes a
cycle is a cycle that only waits for its call), except the ones under `if TYPE_CHECKING:`.
`from a import b` is an edge to the module a.b when a/b.py exists, else to a.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "megatron_spava"
TOOLS = {f[:-3] for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py")}


def _modules(root, package_dir):
    """{dotted module name: path} for every .py file under the package."""
    mods = {}
    for dirpath, _, files in os.walk(os.path.join(root, package_dir)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _type_checking_nodes(tree):
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(module, path):
    """Every imported dotted name (absolute) of one file, with its line number."""
    tree = ast.parse(open(path).read(), path)
    skip = _type_checking_nodes(tree)
    is_package = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name, [a.name for a in node.names], node.lineno


def import_graph(package_dir=PACKAGE, root=ROOT):
    """({module: {imported package module: first line}}, [(module, line, tools module)])."""
    mods = _modules(root, package_dir)
    graph, tool_imports = {}, []
    for module, path in mods.items():
        edges = graph.setdefault(module, {})
        for name, names, line in _imports(module, path):
            if name.split(".")[0] in TOOLS or name.split(".")[0] == "tools":
                tool_imports.append((module, line, name))
            targets = [f"{name}.{n}" for n in names if f"{name}.{n}" in mods]
            if len(targets) < len(names) or not names:
                targets.append(name)
            for target in targets:
                if target in mods and target != module:
                    edges.setdefault(target, line)
    return graph, tool_imports


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 50  # the walk found the package
    found = cycles(graph)
    detail = ["; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in c for b in c if b in graph[a])
              for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_the_package_does_not_import_tools():
    _, tool_imports = import_graph()
    assert not tool_imports, f"megatron_spava imports tools/: {tool_imports}"


def test_the_checker_finds_a_cycle_and_a_tools_import(tmp_path):
    """The walk is not vacuous: a package with a function-level cycle and a tools import."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .sub import b\n\ndef f():\n    return b.g()\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..a import f\n    import bench_prefill\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    graph, tool_imports = import_graph("toy", root=str(tmp_path))
    assert cycles(graph) == [["toy.a", "toy.sub.b"]]
    assert graph["toy.c"] == {}  # TYPE_CHECKING imports are not edges
    assert tool_imports == [("toy.sub.b", 3, "bench_prefill")]


def _tool_imports(path):
    """(line, tool module) for every import of a tools/ module by name in one file."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in TOOLS or name.split(".")[0] == "tools":
                yield node.lineno, name


def test_tools_are_commands_nothing_imports():
    """tools/*.py edit no sys.path and import no other tool (a tool may import itself, by
    name, so that run_ranks' ranks find its functions); no test imports a tool by name."""
    problems = []
    for f in sorted(os.listdir(os.path.join(ROOT, "tools"))):
        if not f.endswith(".py"):
            continue
        path = os.path.join(ROOT, "tools", f)
        if "sys.path" in ast.unparse(ast.parse(open(path).read())):
            problems.append(f"tools/{f} edits sys.path")
        problems += [f"tools/{f}:{line} imports {name}" for line, name in _tool_imports(path)
                     if name != f[:-3]]
    for f in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if f.endswith(".py") and f != os.path.basename(__file__):
            problems += [f"tests/{f}:{line} imports {name}"
                         for line, name in _tool_imports(os.path.join(ROOT, "tests", f))]
    assert not problems, "\n".join(problems)


def test_console_scripts_name_callables():
    """Every console script of setup.py points at a function of the package."""
    import importlib
    import re
    text = open(os.path.join(ROOT, "setup.py")).read()
    scripts = re.findall(r'"([\w-]+)=([\w.]+):(\w+)"', text)
    assert {"megatron-spava-convert", "megatron-spava-eval-needles", "megatron-spava-bench-prefill",
            "megatron-spava-patch-megatron-lm"} <= {name for name, _, _ in scripts}
    for name, module, func in scripts:
        assert module.startswith(PACKAGE + ".") and callable(getattr(importlib.import_module(module), func)), name
