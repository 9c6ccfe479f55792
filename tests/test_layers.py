"""The package's import contract: capabilities form layers, imports point down, and no modules
import each other in a circle (llada_jax/__init__.py draws the layers).

Read from the source with `ast`, every import statement counts, including those inside
functions (a deferred import is still a dependency). Within a layer, capabilities separated by
`|` are independent: neither imports the other.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llada_jax")

# Top to bottom; a module may import its own capability and those in lower layers only.
LAYERS = [
    {"serve", "aot", "launcher"},
    {"rl"},
    {"evaluation"},
    {"train", "decode", "rewards"},
    {"model", "data"},
    {"kernels"},
    {"parallel"},
    {"timing"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every .py file of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, modules) -> list[tuple[int, str]]:
    """(line, imported llada_jax module) for every import in the file, resolved to the most
    specific module: `from llada_jax.model import masks` is llada_jax.model.masks, `from
    llada_jax.model import forward` is the package llada_jax.model."""
    is_pkg = path.endswith("__init__.py")
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "llada_jax"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] != "llada_jax":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in modules else base))
    return out


def capability(module: str) -> str:
    """The capability (first component under llada_jax) a module belongs to; '' for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def check_layers(graph: dict[str, list[tuple[int, str]]], modules) -> list[str]:
    errors = []
    for mod, deps in graph.items():
        here = capability(mod)
        if here == "":  # the root __init__ re-exports the public surface: it may import anything
            continue
        if here not in LEVEL:
            errors.append(f"{modules[mod]}: capability {here!r} is in no layer of tests/test_layers.py")
            continue
        for line, dep in deps:
            there = capability(dep)
            if there == here:
                continue
            where = f"{os.path.relpath(modules[mod], ROOT)}:{line}: {mod} imports {dep}"
            if there == "":
                errors.append(f"{where}: the package root is the public surface, not a dependency")
            elif there not in LEVEL:
                errors.append(f"{where}: {there!r} is in no layer")
            elif LEVEL[there] < LEVEL[here]:
                errors.append(f"{where}: an upward import ({there} is above {here})")
            elif LEVEL[there] == LEVEL[here]:
                errors.append(f"{where}: {here} and {there} are independent siblings of one layer")
    return errors


def find_cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for _, w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(w == v for _, w in graph.get(v, [])):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph():
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}, modules


def test_every_capability_is_in_a_layer():
    _, modules = _graph()
    found = {capability(m) for m in modules} - {""}
    assert found == set(LEVEL), f"capabilities {sorted(found ^ set(LEVEL))} are in the package or the layers, not both"


def test_imports_point_down():
    graph, modules = _graph()
    errors = check_layers(graph, modules)
    assert not errors, "\n".join(errors)


def test_no_import_cycles():
    graph, _ = _graph()
    cycles = find_cycles(graph)
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("case", ["upward", "sibling", "cycle"])
def test_the_checks_catch_a_violation(case):
    """The checks fail on what they forbid (an upward import, a sibling import, a circle)."""
    graph, modules = _graph()
    graph = {k: list(v) for k, v in graph.items()}
    if case == "upward":
        graph["llada_jax.model.transformer"].append((1, "llada_jax.rl.losses"))
        assert any("upward import" in e for e in check_layers(graph, modules))
    elif case == "sibling":
        graph["llada_jax.train.trainer"].append((1, "llada_jax.decode.loop"))
        assert any("independent siblings" in e for e in check_layers(graph, modules))
    else:
        graph["llada_jax.model.moe"].append((1, "llada_jax.model.transformer"))
        assert ["llada_jax.model.moe", "llada_jax.model.transformer"] in find_cycles(graph)


def test_readme_names_every_capability_and_only_files_that_exist():
    """The README's module table lists every capability, and every program, benchmark, config or
    test file it names exists (a newcomer follows those paths)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    missing = [c for c in LEVEL if f"`llada_jax.{c}`" not in readme]
    assert not missing, f"capabilities missing from README's table: {missing}"
    import re

    paths = set(re.findall(r"(?<![\w/.])((?:launch|bench|configs|tests|notebooks)/[\w/]+\.(?:py|ipynb|sh|txt|jsonl))", readme))
    assert paths, "no file paths found in README.md"
    gone = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not gone, f"README.md names files that do not exist: {gone}"
