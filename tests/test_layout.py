"""The package layout shows the design: data flows one way, no import circles, no module imports one above it.

Every import statement is read (module-level and inside functions alike): an import hidden in a function
is still a dependency.
"""

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "lukv_compile"

# Floors, bottom up (docs/architecture.md draws them). A module may import its own floor or any below.
FLOORS = {
    "kernels": 0, "log": 0, "config": 0, "compat": 0, "data": 0, "models": 0,
    "policy.scorers": 1,
    "profile": 2, "profiles": 2, "solver": 2,
    "policy": 3, "settings": 3, "profiling": 3,
    "runtime": 4,
    "passes": 5,
    "compiler": 6,
    "eval": 7,
    "tools": 8, "testing": 8,
    "": 9,  # the package's public face, lukv_compile/__init__.py
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The lukv_compile modules `path` imports (`from lukv_compile import x` counts x when x is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] == "lukv_compile"}
    return found


def floor(module: str) -> int:
    """The floor of the longest FLOORS prefix of `module` (without the package name)."""
    parts = module.split(".")[1:]
    prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)] + [""]
    return next(FLOORS[p] for p in prefixes if p in FLOORS)


def graph() -> nx.DiGraph:
    known = modules()
    g = nx.DiGraph()
    for name, path in known.items():
        g.add_node(name)
        for target in imported(path, known):
            if target != name:
                g.add_edge(name, target)
    return g


def test_every_top_level_part_has_a_floor():
    tops = {m.split(".")[1] for m in modules() if "." in m}
    assert tops <= set(FLOORS), sorted(tops - set(FLOORS))


def test_no_import_circles():
    cycles = list(nx.simple_cycles(graph()))
    assert cycles == []


def test_no_module_imports_one_above_it():
    upward = [(a, b) for a, b in graph().edges if floor(b) > floor(a)]
    assert upward == []


def dotted(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain, else ''."""
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return node.id if isinstance(node, ast.Name) else ""


def code_names(path: Path) -> set[str]:
    """Every name, attribute chain and imported module the code uses (strings and comments excluded)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Attribute, ast.Name)):
            names.add(dotted(node))
            names.add(node.attr if isinstance(node, ast.Attribute) else node.id)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


PRIVATE = ("torch._dynamo.eval_frame", "torch._dynamo.backends", "torch._dynamo.utils", "torch._dynamo.config",
           "torch._dynamo.exc", "torch._inductor", "_TorchDynamoContext", "OptimizedModule", "_compiled_call_impl",
           "_call_impl", "GenerationMixin", "_register_effectful_op", "GradientCheckpointingLayer")


def test_one_module_touches_private_torch_and_transformers_apis():
    """compat.py is the only module whose code names torch / transformers internals or the classes lukv hooks."""
    offenders = sorted(f"{name}: {used}" for name, path in modules().items() if not name.endswith(".compat")
                       for used in code_names(path) if any(used.startswith(p) or used == p for p in PRIVATE))
    assert offenders == []
