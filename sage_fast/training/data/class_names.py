"""Class names from a data set's metadata files or its directory layout.

The text classifier is initialised from the names, so real names matter: a user's file
(`read_class_names`), an ImageNet synset file (`synset_names`), Places365's category file
(`places_names`), else the image directories (`names_from_paths`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UserError
from .text_files import read_lines


def read_class_names(path, allow_duplicates: bool = False) -> List[str]:
    """One class name per line (UTF-8), in label order. A line ``n01440764 tench, Tinca tinca`` gives ``tench``.

    Two lines giving the same name are a UserError naming both (two classes with one name get the same text
    classifier row), unless `allow_duplicates` (``data.allow_duplicates``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"class-names file not found: {path}")
    names, line_of = [], []
    for n, ln in enumerate(read_lines(path, "class-names file"), 1):
        if ln.strip():
            names.append(_strip_synset(ln.strip()))
            line_of.append(n)
    if not allow_duplicates:
        first = {}
        for k, name in enumerate(names):
            if name in first:
                j = first[name]
                raise UserError(f"{path}:{line_of[k]}: class {k} is named {name!r}, as class {j} (line {line_of[j]}): "
                                "two classes with one name start from the same text classifier row and are told "
                                "apart only by training; give each a distinct name (e.g. 'crane (bird)'), or set "
                                "data.allow_duplicates=true")
            first[name] = k
    return names


def _strip_synset(line: str) -> str:
    head, _, rest = line.partition(" ")
    if rest and head[:1] == "n" and head[1:].isdigit():
        return rest.split(",")[0].strip()
    return line


def names_from_paths(samples: Sequence[Tuple[str, int]], num_classes: int, drop_letter: bool = False) -> List[Optional[str]]:
    """Each class's name from the directory of its first sample, minus the leading directories all classes share."""
    dirs: Dict[int, List[str]] = {}
    for p, t in samples:
        if t not in dirs:
            dirs[t] = Path(p).parent.parts
    if len(dirs) < 2:
        return [None] * num_classes
    common = 0
    parts = list(dirs.values())
    while all(len(d) > common + 1 for d in parts) and len({d[common] for d in parts}) == 1:
        common += 1
    out: List[Optional[str]] = [None] * num_classes
    for t, d in dirs.items():
        rest = list(d[common:])
        if drop_letter and len(rest) > 1 and len(rest[0]) == 1:
            rest = rest[1:]  # Places365 keeps categories under their first letter: data_256/a/airfield/...
        if rest:
            out[t] = " ".join(rest)
    return out


def synset_names(root: Path) -> Optional[Dict[str, str]]:
    """{wnid: first name} from ``LOC_synset_mapping.txt`` or ``synset_words.txt`` in `root` (None: neither).

    Lines ``n01440764 tench, Tinca tinca``; ImageNet-LT's directories are the wnids.
    """
    for fname in ("LOC_synset_mapping.txt", "synset_words.txt"):
        f = root / fname
        if f.is_file():
            out = {}
            for ln in read_lines(f, "synset file"):
                wnid, _, rest = ln.strip().partition(" ")
                if rest:
                    out[wnid] = rest.split(",")[0].strip()
            return out
    return None


def places_names(root: Path) -> Optional[Dict[int, str]]:
    """{label: name} from Places365's ``categories_places365.txt`` in `root` (None: absent).

    Lines ``/a/apartment_building/outdoor 1`` give ``apartment_building outdoor``.
    """
    f = root / "categories_places365.txt"
    if not f.is_file():
        return None
    out = {}
    for n, ln in enumerate(read_lines(f, "Places365 category file"), 1):
        if ln.strip():
            try:
                cat, label = ln.rsplit(None, 1)
                out[int(label)] = " ".join(cat.strip("/").split("/")[1:])  # drops the first-letter directory
            except ValueError:
                raise UserError(f"{f}:{n}: expected '/letter/category label', got {ln.strip()!r}") from None
    return out
