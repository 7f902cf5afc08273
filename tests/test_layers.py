"""The layers import only downwards: utils, kernels <- ops <- model <- training <- cli; the reference math
imports no fused code; no module imports another that (directly or not) imports it back. Read from the
source (ast), so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sage_fast"


def _module_name(path: Path) -> str:
    parts = ["sage_fast", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set:
    """Absolute names of the sage_fast modules `path` imports (relative imports resolved)."""
    parts = _module_name(path).split(".")
    package = parts if path.name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{name}.{a.name}" if not node.module else name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n.startswith("sage_fast")}


# what each layer may not import
FORBIDDEN = {
    "utils": ("sage_fast.",),
    "ops": ("sage_fast.model", "sage_fast.training", "sage_fast.cli"),
    "model": ("sage_fast.training", "sage_fast.cli"),
    "training": ("sage_fast.cli",),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    bad = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.startswith(FORBIDDEN[layer]))
        for path in (PACKAGE / layer).rglob("*.py")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_only_the_command_line_parses_arguments():
    users = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                   if "argparse" in {a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Import)
                                     for a in n.names})
    assert users and all(u.startswith("sage_fast/cli/") for u in users), users


def _graph() -> dict:
    """sage_fast module -> the sage_fast modules it imports (a name that is no module, `from m import f`, is m)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(path):
            if imported.startswith("sage_fast.kernels"):
                continue  # kernels/ (installed as sage_fast.kernels) imports nothing of the package: a leaf
            while imported not in files and "." in imported:
                imported = imported.rsplit(".", 1)[0]  # an attribute of a module, not a module
            if imported in files and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_reference_math_imports_no_fused_code():
    imported = _imports(PACKAGE / "ops" / "reference.py")
    assert imported <= {"sage_fast.ops.checks"}, imported


def test_kernels_import_nothing_of_the_package():
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not {m for m in names if m.startswith("sage_fast")}, path.name
