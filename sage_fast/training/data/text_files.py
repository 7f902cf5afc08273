"""The data set's text files (split files, class-name files, iNaturalist's JSON) read as UTF-8, whatever the locale.

A byte that is not UTF-8 (a Latin-1 ``classnames.txt`` with "Café") is a `UserError` naming the file, the
line and the byte's offset, instead of a UnicodeDecodeError traceback; a leading byte-order mark (what some
Windows editors write) is dropped. Lines are split on "\\n" only (a trailing "\\r" is the caller's to strip),
so line numbers agree with the error's and with what an editor shows.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

from ..errors import UserError
from .images import NotRegularFileError, check_regular_file

_BOM = "\ufeff"


def read_text(path, what: str) -> str:
    """The text of the file `path`, decoded as UTF-8. what: what the file is, for the message ("split file")."""
    path = Path(path)
    try:
        check_regular_file(path)
    except (NotRegularFileError, IsADirectoryError) as e:
        reason = "a directory" if isinstance(e, IsADirectoryError) else str(e)
        raise UserError(f"{what} {path} cannot be read: {reason}") from None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = e.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise UserError(f"{path}:{line}: byte 0x{data[start]:02x} (file offset {start}, byte {column} of the line) is "
                        f"not valid UTF-8; the {what} must be UTF-8 text: convert it (e.g. iconv -f latin1 -t utf-8 "
                        f"{path.name}, if it is Latin-1)") from None
    return text[1:] if text.startswith(_BOM) else text


def read_lines(path, what: str) -> List[str]:
    """`read_text` split into lines ("\\n"); element i is line i + 1, ends not stripped (except the "\\n")."""
    lines = read_text(path, what).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line starts no line of its own
    return lines
