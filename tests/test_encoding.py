"""Every text file the package reads or writes names its encoding (UTF-8): a config, a class-name list or a
report written on one machine reads the same on another, whatever its locale (Windows' cp1252, a Latin-1
locale). Python's default is the locale's encoding, so a call that leaves it out is found in the source
(ast): ``Path.read_text`` / ``write_text`` without ``encoding``, and ``open`` in a text mode without it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "sage_fast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


def _keywords(call: ast.Call) -> set:
    return {k.arg for k in call.keywords}


def _text_mode(call: ast.Call):
    """The mode of an ``open(...)`` call when it is a text mode, else None ("r" when the mode is left out)."""
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:
        return "r"
    if isinstance(mode, ast.Constant) and isinstance(mode.value, str):
        return None if "b" in mode.value else mode.value
    return "?"  # a mode computed at run time: name the encoding anyway


def unnamed_encodings(source: str) -> list:
    """(line, call) of each text read or write in `source` that leaves the encoding to the locale."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or "encoding" in _keywords(node):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in ("read_text", "write_text"):
            found.append((node.lineno, f.attr))
        elif isinstance(f, ast.Name) and f.id == "open" and _text_mode(node) is not None:
            found.append((node.lineno, "open"))
    return found


def test_the_finder_finds_a_locale_dependent_call():
    assert unnamed_encodings("p.read_text()\nopen(p, 'w')\nopen(p)\np.write_text(s)\n") == [
        (1, "read_text"), (2, "open"), (3, "open"), (4, "write_text")]
    assert unnamed_encodings("p.read_text(encoding='utf-8')\nopen(p, 'rb')\nopen(p, 'w', encoding='utf-8')\n"
                             "tarfile.open(fileobj=f, mode='w')\n") == []


def test_every_text_file_is_read_and_written_as_utf8():
    bad = {str(p.relative_to(ROOT)): calls for p in SOURCES
           if (calls := unnamed_encodings(p.read_text(encoding="utf-8")))}
    assert not bad, f"name the encoding (encoding='utf-8') in: {bad}"
