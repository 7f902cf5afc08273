"""Class names from a data set's metadata files or its directory layout.

The text classifier is initialised from the names, so real names matter: a user's file
(`read_class_names`), an ImageNet synset file (`synset_names`), Places365's category file
(`places_names`), else the image directories (`names_from_paths`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UserError


def read_class_names(path) -> List[str]:
    """One class name per line, in label order. A line ``n01440764 tench, Tinca tinca`` gives ``tench``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-names file not found: {path}")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return [_strip_synset(n) for n in names]


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
            for ln in f.read_text().splitlines():
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
    for n, ln in enumerate(f.read_text().splitlines(), 1):
        if ln.strip():
            try:
                cat, label = ln.rsplit(None, 1)
                out[int(label)] = " ".join(cat.strip("/").split("/")[1:])  # drops the first-letter directory
            except ValueError:
                raise UserError(f"{f}:{n}: expected '/letter/category label', got {ln.strip()!r}") from None
    return out
