"""The arrows point one way: no import circle among the project's modules (every import counts,
module-level or inside a function), and the library never imports the programs."""

import ast
import os

from helpers import REPO

PACKAGES = ("transformer_jax", "train")


def project_modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the library and the programs."""
    out = {}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                    out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The project modules `name` imports: `import a.b`, `from a import b` (b a module or a name in a).
    A package's __init__ runs before any of its modules, so `from a import b` with b a module is an
    edge to a.b only."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # a submodule, or a name defined in `base` itself
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_finder_sees_a_circle():  # the check above could fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    edges = graph()
    assert "transformer_jax.tasks.text" in edges["transformer_jax.tasks.clm"]
    assert "transformer_jax.tasks.base" in edges["train.trainer"]


def test_the_library_never_imports_the_programs():
    wrong = {
        m: sorted(i for i in deps if i.split(".")[0] == "train")
        for m, deps in graph().items()
        if m.startswith("transformer_jax")
    }
    assert not {m: d for m, d in wrong.items() if d}


def test_design_layout_names_every_module():
    """docs/design.md's Layout names every package and module of the library and the programs."""
    import re

    text = open(os.path.join(REPO, "docs", "design.md"), encoding="utf-8").read()
    layout = text.split("## Layout", 1)[1].split("```")[1]
    missing = []
    for name, path in project_modules().items():
        if path.endswith("__init__.py"):
            if name.count(".") and f"{name.rsplit('.', 1)[1]}/" not in layout:
                missing.append(name)
        elif not re.search(rf"\b{re.escape(name.rsplit('.', 1)[1])}\b", layout):
            missing.append(name)
    assert not missing, f"docs/design.md's Layout does not name {missing}"
