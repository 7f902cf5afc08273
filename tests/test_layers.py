"""The layers import only downwards: utils, kernels <- ops <- model <- training; the reference math imports
no fused code. Read from the source (ast), so a lazy import inside a function counts too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sage_fast"


def _imports(path: Path) -> set:
    """Absolute names of the sage_fast modules `path` imports (relative imports resolved)."""
    parts = ["sage_fast", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
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
    "ops": ("sage_fast.model", "sage_fast.training"),
    "model": ("sage_fast.training",),
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    bad = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if n.startswith(FORBIDDEN[layer]))
        for path in (PACKAGE / layer).rglob("*.py")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_reference_math_imports_no_fused_code():
    imported = _imports(PACKAGE / "ops" / "reference.py")
    assert imported <= {"sage_fast.ops.checks"}, imported


def test_kernels_import_nothing_of_the_package():
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not {m for m in names if m.startswith("sage_fast")}, path.name
