"""Packaging: one version, the licence, the typing marker, no Triton requirement of our own, and source
that Python 3.10 (requires-python) can run. Read from the files, so it needs no build."""
import ast
import importlib.metadata
import re
from pathlib import Path

import sage_fast

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _dependencies() -> list:
    block = re.search(r"^dependencies = \[(.*?)^\]", PYPROJECT, re.S | re.M).group(1)
    return re.findall(r'^\s*"([^"]+)"', block, re.M)


def test_version_is_written_once():
    assert re.search(r'^dynamic = \["version"\]', PYPROJECT, re.M)
    assert 'version = {attr = "sage_fast._version.__version__"}' in PYPROJECT
    assert not re.search(r'^version = "', PYPROJECT, re.M)
    tree = ast.parse((ROOT / "sage_fast" / "_version.py").read_text())
    (assign,) = [n for n in tree.body if isinstance(n, ast.Assign)]
    assert assign.value.value == sage_fast.__version__
    hits = [p for p in (ROOT / "sage_fast").rglob("*.py") if re.search(r"__version__ = ", p.read_text())]
    assert hits == [ROOT / "sage_fast" / "_version.py"]
    assert importlib.metadata.version("sage-fast") == sage_fast.__version__


def test_license_and_typing_marker_ship():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert 'license = "Apache-2.0"' in PYPROJECT and 'license-files = ["LICENSE"]' in PYPROJECT
    assert (ROOT / "sage_fast" / "py.typed").is_file()
    assert '"sage_fast": ["py.typed"]' in (ROOT / "setup.py").read_text()


def test_triton_comes_with_torch():
    deps = _dependencies()
    assert any(d.startswith("torch>=") for d in deps)
    assert not [d for d in deps if d.lower().startswith("triton")]


# What Python 3.10 lacks (requires-python >= 3.10): builtins, and standard-library members (matched as
# attributes or imported names, e.g. datetime.UTC, from typing import Self), and except*.
PY311_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}
PY311_MEMBERS = {"tomllib", "TaskGroup", "file_digest", "StrEnum", "LiteralString", "Self", "Never",
                 "assert_never", "reveal_type", "batched", "UTC", "chdir"}


def test_sources_run_on_python_3_10():
    found = []
    for path in [*ROOT.glob("sage_fast/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id in PY311_BUILTINS:
                name = node.id
            elif isinstance(node, ast.Attribute) and node.attr in PY311_MEMBERS:
                name = node.attr
            elif isinstance(node, ast.alias) and node.name.split(".")[-1] in PY311_MEMBERS:
                name = node.name
            elif type(node).__name__ == "TryStar":
                name = "except*"
            else:
                continue
            found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')} {name}")
    assert not found, found
